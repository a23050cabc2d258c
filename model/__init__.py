"""Masklet model package (filled in as the architecture boxes land)."""
