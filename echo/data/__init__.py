"""Data for echo: synthetic machine signals with known physics, and the small real recordings bundled with
the package (licences in samples/CREDITS.md)."""
from .bundled import sample, samples
from .formats import AUDIO_SUFFIXES

__all__ = ["AUDIO_SUFFIXES", "sample", "samples"]
