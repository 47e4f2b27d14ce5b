"""Turning what users pass (tensors, numpy arrays, integer PCM) into checked float32 signals.

Every public entry point goes through here, so a bad input fails with one clear `ValueError` that names
the problem and its numbers, never deep inside torch and never as a silently wrong embedding.

Integer PCM is accepted and scaled to [-1, 1): int16 by 1/32768, int32 by 1/2147483648 (the convention of
soundfile and WAV). uint8, bool and complex inputs are refused.
"""
from __future__ import annotations

import numbers

import numpy as np
import torch

from . import geometry

PCM_SCALES = {torch.int16: 1 / 32768, torch.int32: 1 / 2147483648}


def check_sample_rate(sample_rate, where: str = "") -> int:
    """An integer rate >= 2000 Hz (below that the 25 ms window has under 50 samples)."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real):
        raise ValueError(f"{where}sample rate must be an integer number of Hz, got {sample_rate!r}")
    if isinstance(sample_rate, torch.Tensor):
        sample_rate = sample_rate.item()
    if not float(sample_rate).is_integer():
        raise ValueError(f"{where}sample rate must be an integer number of Hz, got {sample_rate!r}")
    sample_rate = int(sample_rate)
    if sample_rate < geometry.MIN_SAMPLE_RATE:
        raise ValueError(
            f"{where}sample rate {sample_rate} Hz is below the minimum of {geometry.MIN_SAMPLE_RATE} Hz"
        )
    return sample_rate


def as_signal(waveform, sample_rate: int, where: str = "") -> torch.Tensor:
    """A checked float32 tensor of shape (N,) or (C, N), every channel at least one window long."""
    if isinstance(waveform, np.ndarray):
        if waveform.dtype.kind not in "fi":
            raise ValueError(f"{where}signal has unsupported dtype {waveform.dtype}; pass float or int16/int32 PCM")
        waveform = torch.from_numpy(np.ascontiguousarray(waveform))
    elif not isinstance(waveform, torch.Tensor):
        raise ValueError(f"{where}signal must be a torch.Tensor or numpy array, got {type(waveform).__name__}")
    if waveform.dtype in PCM_SCALES:
        waveform = waveform.to(torch.float32) * PCM_SCALES[waveform.dtype]
    elif not waveform.is_floating_point():
        raise ValueError(f"{where}signal has unsupported dtype {waveform.dtype}; pass float or int16/int32 PCM")
    if waveform.dim() not in (1, 2):
        raise ValueError(
            f"{where}signal must be 1-D (samples) or 2-D (channels, samples), got shape {tuple(waveform.shape)}"
        )
    if waveform.numel() == 0:
        raise ValueError(f"{where}signal is empty (shape {tuple(waveform.shape)})")
    window = geometry.n_fft(sample_rate)
    n = waveform.shape[-1]
    if n < window:
        hint = ""
        if waveform.dim() == 2 and waveform.shape[0] >= window:
            hint = "; channels come first: pass (channels, samples), not (samples, channels)"
        raise ValueError(
            f"{where}signal of {n} samples is shorter than one 25 ms window at {sample_rate} Hz "
            f"({window} samples){hint}"
        )
    waveform = waveform.to(torch.float32)
    # one pass: NaN/Inf propagate into the sum, and float32 samples cannot overflow a float64 sum
    if not torch.isfinite(waveform.sum(dtype=torch.float64)):
        bad = (~torch.isfinite(waveform)).sum().item()
        raise ValueError(f"{where}signal contains {bad} NaN or Inf sample(s)")
    return waveform
