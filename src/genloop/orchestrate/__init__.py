"""Orchestration: Prefect flows, their cache policy and code deps, and the local services."""
