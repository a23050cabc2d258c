"""Masklet pipeline package."""
