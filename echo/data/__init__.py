"""Data for echo: synthetic machine signals with known physics, and the small real recordings bundled with
the package (licences in samples/CREDITS.md)."""
from pathlib import Path

from .bundled import sample, samples

# The audio files echo picks out of folders (encode, eval, pretraining), all read by soundfile (libsndfile 1.1 or
# later for MP3, as soundfile's wheels bundle): field recordings come as MP3 and Opus too, and long monitoring
# recordings as RF64 or Wave64 (a WAV file stops at 4 GiB: 3 hours of 48 kHz stereo float32, 6 in 16-bit PCM).
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".aif", ".aiff", ".caf", ".w64", ".rf64")

# suffixes whose decoder a libsndfile may lack: soundfile's format and subtype (None: any) for them, and their name
_DECODERS = {".mp3": ("MP3", None, "MP3"), ".opus": ("OGG", "OPUS", "Opus")}


def missing_decoder(soundfile, path) -> str:
    """Why this soundfile reads no file of `path`'s kind ("" where it does, or cannot tell): a libsndfile before
    1.1 (a system's, under a distribution's soundfile) has no MP3 decoder and says "Format not recognised", as for
    a damaged file."""
    suffix = Path(path).suffix.lower()
    if suffix not in _DECODERS:
        return ""
    kind, subtype, name = _DECODERS[suffix]
    if kind in soundfile.available_formats() and (subtype is None or subtype in soundfile.available_subtypes(kind)):
        return ""
    return (f"this soundfile's libsndfile ({soundfile.__libsndfile_version__}) reads no {name} files: "
            f"pip install -U soundfile (its wheels bring a libsndfile that does)")


_NOT_THERE = "File does not exist or is not a regular file"  # libsndfile's words, also its MP3 reader's for no MP3


def libsndfile_words(error: str, path) -> str:
    """libsndfile's `error` on opening `path`, reworded where it misleads: its MP3 reader refuses data it cannot
    decode as "File does not exist or is not a regular file", said of a file that is there."""
    if error.startswith(_NOT_THERE) and Path(path).is_file():
        return "Format not recognised (no MP3 or other audio libsndfile can decode)"
    return error


UNKNOWN_FRAMES = 1 << 62  # from here a frame count is libsndfile's for "not given" (SF_COUNT_MAX)


def unknown_length(opened) -> str:
    """Why a file soundfile opened (a SoundFile or its info) is refused ("" where it is not): a FLAC written to a pipe
    gives no length in its header, and libsndfile fails before its end ("Internal psf_fseek() failed"): read whole it
    was "array is too big", streamed a clip cut short."""
    if opened.frames < UNKNOWN_FRAMES:
        return ""
    return ("its header gives no length (written to a pipe?), and libsndfile cannot read such a file to its end: "
            "write it again to a file (e.g. ffmpeg -i IN OUT.flac)")


__all__ = ["AUDIO_SUFFIXES", "libsndfile_words", "missing_decoder", "sample", "samples", "unknown_length"]
