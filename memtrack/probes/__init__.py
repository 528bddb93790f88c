"""Cheap signals that need no full sampling (loss gap)."""
