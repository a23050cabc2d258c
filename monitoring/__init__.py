"""Masklet monitoring package."""
