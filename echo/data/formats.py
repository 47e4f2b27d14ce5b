"""The audio files echo reads through soundfile (encode, eval, pretraining): their suffixes, the codecs a libsndfile
may lack, and what libsndfile reads of a file without a word or says misleadingly: a header promising more than
the file holds, a length the header does not give, a file named as missing that is there."""
from __future__ import annotations

import re
from pathlib import Path

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


STREAMED_DATA_SIZE = 0x7FFFFFFF  # a data size at or above it is a placeholder left by a recorder that streams
# libsndfile's words where a header promises more than the file holds, the unit, and the size from which the promise
# is a streaming recorder's placeholder: a WAV's data chunk and an AIFF's SSND chunk (its 8 bytes of offset and block
# size included) have 32-bit sizes; a Wave64's riff size (the whole file) has 64, no placeholder for a recording past
# 4 GiB; an RF64's frames are its ds64 chunk's count (its 32-bit data size is 0xFFFFFFFF by design)
_PROMISED = r"(?P<promised>\d+) \(should be (?P<held>\d+)\)"
LOGGED_SIZES = (
    (re.compile(rf"^data\s*:\s*{_PROMISED}", re.MULTILINE), "bytes of samples", STREAMED_DATA_SIZE),
    (re.compile(rf"^ SSND\s*:\s*{_PROMISED}", re.MULTILINE), "bytes of sound data", STREAMED_DATA_SIZE),
    (re.compile(rf"^riff\s*:\s*{_PROMISED}", re.MULTILINE), "bytes", 1 << 63),
    (re.compile(r"Calculated frame count (?P<held>\d+) does not match value from 'ds64' chunk of (?P<promised>\d+)"),
     "frames", 1 << 63))


def truncation(promised: int, held: int, unit: str = "bytes of samples", streamed: int = STREAMED_DATA_SIZE) -> str:
    """Why a file whose header promises more samples than it holds is refused ("" where it is not): cut short by a
    copy or download, it read as a shorter clip (in an anomaly test set, the most anomalous of all). A header
    promising less, 0 or a streaming placeholder (`streamed` or more), loses nothing."""
    if streamed > promised > held:
        return (f"truncated: its header promises {promised:,} {unit}, the file holds {held:,} (a copy or download "
                f"cut short?)")
    return ""


def logged_truncation(opened) -> str:
    """`truncation` of a file soundfile opened (a SoundFile or its info: WAV, AIFF, Wave64 or RF64), read from
    libsndfile's log of the header: libsndfile reads such a file as shorter and says so nowhere else."""
    for pattern, unit, streamed in LOGGED_SIZES:
        if found := pattern.search(opened.extra_info):
            return truncation(int(found["promised"]), int(found["held"]), unit, streamed)
    return ""
