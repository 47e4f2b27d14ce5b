"""16-bit PCM WAV in and out with the standard library only, so the bundled samples (and the demo that
plays them) need no audio package."""
from __future__ import annotations

import io
import numbers
import struct
import wave
from pathlib import Path
from typing import Iterator

import numpy as np

from .. import atomic
from .formats import truncation

PCM, FLOAT, EXTENSIBLE = 0x0001, 0x0003, 0xFFFE  # WAVE format tags
OTHER_RIFFS = {b"RIFX": "a big-endian RIFX WAV file", b"RF64": "an RF64 WAV file (the form for over 4 GiB)"}


def read_wav(source) -> tuple[np.ndarray, int]:
    """(float32 waveform, rate) from a 16-bit PCM WAV path or bytes: int16 / 32768, as soundfile reads it, so a
    file gives the same samples with or without soundfile; (N,) for mono, else (C, N).

    The chunks are walked here rather than by `wave`, which before Python 3.12 refuses WAVE_FORMAT_EXTENSIBLE
    (multichannel recorders write it) and refuses a RIFF size of 0 (left by recorders stopped mid-write). A data
    chunk cut short is refused (`truncation`), as echo refuses it from soundfile. Every error names the file."""
    in_memory = isinstance(source, (bytes, bytearray, memoryview))
    name = "WAV data" if in_memory else str(source)
    with io.BytesIO(source) if in_memory else open(source, "rb") as handle:
        channels, rate, size = _pcm16_chunks(handle, name)
        waveform = _scaled(handle.read(size), channels)
    return (waveform[0] if channels == 1 else waveform), rate


def wav_blocks(path, samples: int) -> tuple[int, int, int, Iterator[np.ndarray]]:
    """(rate, channels, frames in all, blocks) of a 16-bit PCM WAV file: read_wav's samples as (C, n) blocks of at
    most `samples` samples (at least a frame), read one at a time, so a long recording is never whole in memory."""
    handle = open(path, "rb")
    try:
        channels, rate, size = _pcm16_chunks(handle, str(path))
    except BaseException:
        handle.close()
        raise
    return rate, channels, size // (2 * channels), _blocks(handle, channels, size, max(samples // channels, 1))


def _blocks(handle, channels: int, size: int, frames: int) -> Iterator[np.ndarray]:
    with handle:
        for start in range(0, size // (2 * channels), frames):  # not past the data chunk: chunks may follow
            yield _scaled(handle.read(min(frames, size // (2 * channels) - start) * 2 * channels), channels)


def _scaled(data: bytes, channels: int) -> np.ndarray:
    """(C, N) float32 samples of 16-bit PCM bytes, whole frames: int16 / 32768, as soundfile reads them."""
    pcm = np.frombuffer(data, dtype="<i2", count=len(data) // (2 * channels) * channels)
    waveform = np.ascontiguousarray(pcm.reshape(-1, channels).T, dtype=np.float32)  # (C, N) rows, as soundfile's
    waveform /= 32768  # in place: a long recording is not held twice in float32
    return waveform


def _pcm16_chunks(handle, name: str) -> tuple[int, int, int]:
    """(channels, rate, bytes of samples) of an open WAV file, left at the start of its samples."""
    end = handle.seek(0, io.SEEK_END)
    handle.seek(0)
    header = handle.read(12)
    if header[:4] in OTHER_RIFFS:
        raise ValueError(f"{name}: {OTHER_RIFFS[header[:4]]}; only 16-bit PCM RIFF WAV is read without soundfile")
    if len(header) < 12 or header[:4] != b"RIFF" or header[8:] != b"WAVE":
        raise ValueError(f"{name}: not a WAV file (it starts with {header!r})")
    layout = None
    while len(chunk := handle.read(8)) == 8:  # the RIFF size is not trusted: streaming recorders leave 0 there
        kind, size = chunk[:4], int.from_bytes(chunk[4:], "little")
        start, available = handle.tell(), end - handle.tell()
        if kind == b"data":
            if layout is None:
                raise ValueError(f"{name}: the data chunk comes before the fmt chunk")
            if problem := truncation(size, available):
                raise ValueError(f"{name}: {problem}")
            # a placeholder past the end (0xFFFFFFFF from a recorder that never finished) reads what is there,
            # without asking read() for gigabytes first
            return (*layout, min(size, available))
        if kind == b"fmt ":
            layout = _pcm16_layout(handle.read(min(size, available)), name)
        handle.seek(start + size + size % 2)  # odd-sized chunks are followed by a pad byte
    raise ValueError(f"{name}: no {'data' if layout else 'fmt'} chunk")


def _pcm16_layout(fmt: bytes, name: str) -> tuple[int, int]:
    """(channels, rate) of a fmt chunk describing 16-bit PCM; any other encoding is refused, named."""
    if len(fmt) < 16:
        raise ValueError(f"{name}: fmt chunk of {len(fmt)} bytes, under the 16 of any WAV")
    tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", fmt[:16])
    if tag == EXTENSIBLE and len(fmt) >= 26:
        tag = int.from_bytes(fmt[24:26], "little")  # the sub-format GUID starts with the plain format tag
    if tag != PCM or (bits + 7) // 8 != 2:
        encoding = {PCM: f"{bits}-bit PCM", FLOAT: f"{bits}-bit float"}.get(tag, f"format tag {tag:#06x}")
        raise ValueError(f"{name}: {encoding} samples; only 16-bit PCM is read here (soundfile reads the rest)")
    if channels == 0 or rate == 0:
        raise ValueError(f"{name}: fmt chunk gives {channels} channels at {rate} Hz")
    return channels, rate


def write_wav(path, waveform, rate: int) -> Path:
    """Write a mono (N,) or (C, N) waveform as 16-bit PCM, atomically (temp file + rename; the temp file is the
    process's own, so processes writing the same corpus side by side never share one). Floats in [-1, 1] are
    scaled by 32768 and values beyond are clipped; int16/int32 PCM is scaled as echo.inputs scales it. NaN, Inf
    and other dtypes are refused: a cast would write them as arbitrary samples."""
    path = Path(path)
    samples = np.asarray(waveform)
    if samples.dtype.kind == "i" and samples.dtype.itemsize in (2, 4):
        samples = samples / float(2 ** (8 * samples.dtype.itemsize - 1))
    elif samples.dtype.kind != "f":
        raise ValueError(f"{path}: samples of dtype {samples.dtype}; pass floats in [-1, 1] or int16/int32 PCM")
    if samples.ndim not in (1, 2) or not 0 < np.atleast_2d(samples).shape[0] <= 0xFFFF:
        raise ValueError(f"{path}: waveform of shape {samples.shape}; pass (samples,) or (channels, samples), "
                         f"1 to 65535 channels")
    if not np.isfinite(samples).all():
        raise ValueError(f"{path}: waveform has {np.count_nonzero(~np.isfinite(samples))} NaN or Inf sample(s)")
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not float(rate).is_integer() \
            or not 0 < rate < 2 ** 32:
        raise ValueError(f"{path}: sample rate must be a whole number of Hz from 1 to 2**32 - 1, got {rate!r}")
    pcm = np.clip(np.rint(np.atleast_2d(samples).astype(np.float64) * 32768), -32768, 32767).astype("<i2")
    with atomic.replacing(path) as temporary, wave.open(str(temporary), "wb") as writer:
        writer.setnchannels(pcm.shape[0])
        writer.setsampwidth(2)
        writer.setframerate(int(rate))
        writer.writeframes(pcm.T.tobytes())
    return path
