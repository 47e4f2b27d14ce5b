"""Front end: DC removal, STFT magnitude, log + normalise (spec section 1)."""
from __future__ import annotations

import torch

from .. import geometry


def remove_dc(waveform: torch.Tensor) -> torch.Tensor:
    """Subtract the mean of the whole signal (one scalar per signal, last axis)."""
    return waveform - waveform.mean(dim=-1, keepdim=True)


def stft_magnitude(waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """|STFT| of (..., N) -> (..., F, T): 25 ms periodic Hann window, 10 ms hop, no centring, one-sided."""
    window_length = geometry.n_fft(sample_rate)
    window = torch.hann_window(window_length, periodic=True, dtype=waveform.dtype, device=waveform.device)
    spectrum = torch.stft(
        waveform.reshape(-1, waveform.shape[-1]),
        n_fft=window_length,
        hop_length=geometry.hop(sample_rate),
        win_length=window_length,
        window=window,
        center=False,
        normalized=False,
        onesided=True,
        return_complex=True,
    )
    return spectrum.abs().reshape(*waveform.shape[:-1], *spectrum.shape[-2:])


def log_normalise(magnitude: torch.Tensor) -> torch.Tensor:
    """s = (ln(|X| + 1e-9) + 5.874158) / 10.446348."""
    return (torch.log(magnitude + geometry.LOG_EPS) + geometry.LOG_MEAN) / geometry.LOG_STD


def spectrogram(waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """The whole front end: (..., N) float32 -> normalised log magnitude (..., F, T), frequency first."""
    return log_normalise(stft_magnitude(remove_dc(waveform), sample_rate))
