"""Masklet deploy package."""
