"""Judges: feature extractors, distribution metrics, reference statistics, the promotion gate."""
