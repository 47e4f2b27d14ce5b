"""Data for echo: synthetic machine signals with known physics, and the small real recordings bundled with
the package (licences in samples/CREDITS.md)."""
from .bundled import sample, samples

__all__ = ["sample", "samples"]
