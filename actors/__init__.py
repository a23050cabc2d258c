"""Masklet actors package."""
