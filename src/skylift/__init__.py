"""Skylift: over-the-air updates for fleets of embedded Linux devices."""

__version__ = "0.1.0"
__all__ = ["__version__"]
