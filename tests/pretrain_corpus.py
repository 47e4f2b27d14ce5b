"""Small generated audio corpora and configs for the pretraining tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np

RATES = [8000, 12000, 16000, 22050, 44100]


def write_corpus(root: Path, files: int = 8, seconds=(1.5, 3.0), seed: int = 0) -> Path:
    """Tones + noise at mixed rates as WAV and FLAC; file 0 has two channels."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        rate = RATES[i % len(RATES)]
        n = int(rate * rng.uniform(*seconds))
        t = np.arange(n) / rate
        wave = 0.5 * np.sin(2 * np.pi * rng.uniform(50, rate / 3) * t) + 0.1 * rng.standard_normal(n)
        data = np.stack([wave, rng.standard_normal(n) * 0.2], axis=1) if i == 0 else wave
        sub = root / f"machine{i % 3}"
        sub.mkdir(exist_ok=True)
        sf.write(sub / f"clip{i}.{'flac' if i % 2 else 'wav'}", data.astype(np.float32), rate)
    return root


def write_damaged(root: Path) -> None:
    """Next to a write_corpus corpus, files whose headers are fine but whose crops cannot be trained on: a FLAC
    cut in half (decoding fails past the cut) and a float WAV with NaNs in the middle (every 2 s crop covers
    them)."""
    import soundfile as sf

    raw = (root / "machine1" / "clip1.flac").read_bytes()
    (root / "truncated.flac").write_bytes(raw[: len(raw) // 2])
    wave = np.full(48000, 0.1, dtype=np.float32)
    wave[22000:26000] = np.nan
    sf.write(root / "nan.wav", wave, 16000, subtype="FLOAT")


def tiny_config(data, out, **overrides):
    from echo.pretrain.trainer import PretrainConfig

    settings = dict(dim=64, depth=2, heads=1, steps=30, crop_seconds=2.0, tokens_per_batch=400, clones=2,
                    lr=1e-3, warmup=5, workers=0, log_every=5, save_every=10, keep=2)
    settings.update(overrides)
    return PretrainConfig(data=str(data), out=str(out), **settings)
