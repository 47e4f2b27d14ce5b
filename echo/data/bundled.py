"""The short real recordings bundled with echo (echo/data/samples/*.wav; sources, licences and authors in
echo/data/samples/CREDITS.md; rebuilt by scripts/fetch_samples.py). Read with the standard library only."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .wav import read_wav

SAMPLES_DIR = Path(__file__).parent / "samples"


def names() -> list[str]:
    """The bundled recordings' names, sorted: what `sample` takes."""
    return sorted(path.stem for path in SAMPLES_DIR.glob("*.wav"))


def sample(name: str) -> tuple[np.ndarray, int]:
    """(float32 mono waveform, sample rate) of one bundled recording. The name is looked up, never joined to
    the folder as given: an absolute path or ../ in it would read any WAV file."""
    if name not in names():
        raise ValueError(f"no bundled sample {name!r}; bundled: {', '.join(names()) or 'none'}")
    return read_wav(SAMPLES_DIR / f"{name}.wav")


def samples() -> dict[str, tuple[np.ndarray, int]]:
    """Every bundled recording: name -> (waveform, sample rate)."""
    return {name: sample(name) for name in names()}
