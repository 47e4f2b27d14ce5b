"""Data for echo: synthetic machine signals with known physics, and the small real recordings bundled with
the package (licences in samples/CREDITS.md)."""
from .bundled import sample, samples

# The audio files echo picks out of folders (encode, eval, pretraining), all read by soundfile.
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".aif", ".aiff")

__all__ = ["AUDIO_SUFFIXES", "sample", "samples"]
