"""16-bit PCM WAV in and out with the standard library only, so the bundled samples (and the demo that
plays them) need no audio package."""
from __future__ import annotations

import io
import wave
from pathlib import Path

import numpy as np

from .. import atomic


def read_wav(source) -> tuple[np.ndarray, int]:
    """(float32 waveform in [-1, 1), rate) from a 16-bit PCM WAV path or bytes; (N,) for mono, else (C, N)."""
    handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
    try:
        with handle, wave.open(handle) as reader:
            if reader.getsampwidth() != 2:
                raise ValueError(f"{source if not isinstance(source, (bytes, bytearray)) else 'WAV data'}: "
                                 f"{8 * reader.getsampwidth()}-bit samples; only 16-bit PCM is read here")
            channels, rate = reader.getnchannels(), reader.getframerate()
            frames = reader.readframes(reader.getnframes())
            pcm = np.frombuffer(frames[: len(frames) - len(frames) % (2 * channels)], dtype="<i2")  # whole frames
    except (wave.Error, EOFError) as error:
        raise ValueError(f"not a readable PCM WAV file ({error})") from None
    waveform = pcm.reshape(-1, channels).T.astype(np.float32) / 32768
    return (waveform[0] if channels == 1 else waveform), rate


def write_wav(path, waveform, rate: int) -> Path:
    """Write a mono (N,) or (C, N) float waveform in [-1, 1] as 16-bit PCM, atomically (temp file + rename; the
    temp file is the process's own, so processes writing the same corpus side by side never share one)."""
    path = Path(path)
    samples = np.atleast_2d(np.asarray(waveform, dtype=np.float64))
    pcm = np.clip(np.rint(samples * 32768), -32768, 32767).astype("<i2")
    with atomic.replacing(path) as temporary, wave.open(str(temporary), "wb") as writer:
        writer.setnchannels(pcm.shape[0])
        writer.setsampwidth(2)
        writer.setframerate(int(rate))
        writer.writeframes(pcm.T.tobytes())
    return path
