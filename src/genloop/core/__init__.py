"""Shared foundations: params, workspace, storage, errors, tables, lock, provenance, logs, images."""
