"""Panopticon: an any-sensor foundation model for Earth observation, built on the DINOv2 codebase layout."""

__version__ = "0.1.0"
