"""Ragged STFT front end in Triton: DC removal, windowed DFT, magnitude, log + normalise, band layout.

Every signal of a batch lives back to back in one flat waveform buffer and may have its own sample rate,
so its own window length `n_fft` (400, 551, 1102, 1200, ... : rarely a power of two, so no FFT). The DFT is
done as a matrix product instead: for each signal, (rows, n_fft) cos and sin bases, with the periodic Hann
window folded in, times the (n_fft, frames) matrix of its frames, which is never materialised: frame t is
just the strided slice waves[t*hop : t*hop + n_fft]. One launch covers every tile of every signal through
a host-built tile table, so several sample rates share one launch.

The output is written straight into the band layout the token stage reads: signal i is a
(bands*32, frames) image at spec_offsets[i]; the bases are stored in that same row order, with zero rows
where the last band is padded, and the kernel writes exact zeros there.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from . import HOST, dot, dot_precision


@triton.jit
def _signal_mean_kernel(waves, wave_offsets, means, BLOCK: tl.constexpr):
    """One program per signal: the DC offset that the front end removes (one reduction pass)."""
    signal = tl.program_id(0)
    start = tl.load(wave_offsets + signal)
    length = tl.load(wave_offsets + signal + 1) - start
    # A vector of partial sums keeps each lane's running sum short, so fp32 stays accurate on long signals.
    partial = tl.zeros((BLOCK,), tl.float32)
    for first in range(0, length, BLOCK):
        index = first + tl.arange(0, BLOCK)
        partial += tl.load(waves + start + index, mask=index < length, other=0.0)
    tl.store(means + signal, tl.sum(partial, axis=0) / tl.maximum(length, 1))


@triton.jit
def _spectrogram_tile_kernel(
    waves, means, out, bases,
    tile_signal, tile_frame, tile_row,
    wave_offsets, n_ffts, hops, frames_of, bins_of, rows_of, spec_offsets, basis_offsets,
    log_eps, log_mean, log_std,
    BAND: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One (BLOCK_R output rows) x (BLOCK_T frames) tile of one signal's band-layout image."""
    tile = tl.program_id(0)
    signal = tl.load(tile_signal + tile)
    n_fft = tl.load(n_ffts + signal)
    hop = tl.load(hops + signal)
    frames = tl.load(frames_of + signal)
    bins = tl.load(bins_of + signal)
    rows = tl.load(rows_of + signal)
    wave = waves + tl.load(wave_offsets + signal)
    cos_basis = bases + tl.load(basis_offsets + signal)
    sin_basis = cos_basis + rows * n_fft
    mean = tl.load(means + signal)

    row = tl.load(tile_row + tile) + tl.arange(0, BLOCK_R)
    frame = tl.load(tile_frame + tile) + tl.arange(0, BLOCK_T)
    row_ok = row < rows
    frame_ok = frame < frames

    real = tl.zeros((BLOCK_R, BLOCK_T), tl.float32)
    imag = tl.zeros((BLOCK_R, BLOCK_T), tl.float32)
    for first in range(0, n_fft, BLOCK_K):
        k = first + tl.arange(0, BLOCK_K)
        k_ok = k < n_fft
        # (BLOCK_K, BLOCK_T) slice of the implicit frame matrix; the DC offset is removed here, before the
        # window, so a large offset never has to cancel against the DC bin afterwards.
        frame_mask = k_ok[:, None] & frame_ok[None, :]
        samples = tl.load(wave + frame[None, :] * hop + k[:, None], mask=frame_mask, other=0.0)
        samples = tl.where(frame_mask, samples - mean, 0.0)
        basis_mask = row_ok[:, None] & k_ok[None, :]
        basis_index = row[:, None] * n_fft + k[None, :]
        cos_tile = tl.load(cos_basis + basis_index, mask=basis_mask, other=0.0)
        sin_tile = tl.load(sin_basis + basis_index, mask=basis_mask, other=0.0)
        real += dot(cos_tile, samples, PRECISION)
        imag += dot(sin_tile, samples, PRECISION)

    value = (tl.log(tl.sqrt(real * real + imag * imag) + log_eps) + log_mean) / log_std
    # Rows [last_start, last_start + pad) are the zero padding in front of the last band's real bins.
    last_start = rows - BAND
    pad = rows - bins
    is_bin = (row < last_start) | (row >= last_start + pad)
    value = tl.where(is_bin[:, None], value, 0.0)
    target = out + tl.load(spec_offsets + signal) + row[:, None] * frames + frame[None, :]
    tl.store(target, value, mask=row_ok[:, None] & frame_ok[None, :])


@functools.lru_cache(maxsize=64)
def _basis(n_fft: int, rows: int, band: int, device: torch.device) -> torch.Tensor:
    """(2, rows, n_fft) float32 cos and sin DFT rows times the periodic Hann window, in band-layout row
    order (zero rows where the last band is padded). Built in float64 with the phase n*k reduced mod n_fft,
    so the fp32 bases are exact to rounding even for the highest bins."""
    bins = n_fft // 2 + 1
    pad = rows - bins
    last_start = rows - band
    row = torch.arange(rows, dtype=torch.int64, device=HOST)
    k = torch.where(row < last_start, row, row - pad)
    is_bin = (row < last_start) | (row >= last_start + pad)
    n = torch.arange(n_fft, dtype=torch.int64, device=HOST)
    phase = 2 * math.pi * ((k[:, None] * n[None, :]) % n_fft).double() / n_fft
    window = 0.5 - 0.5 * torch.cos(2 * math.pi * n.double() / n_fft)
    basis = torch.stack([torch.cos(phase), torch.sin(phase)]) * window * is_bin[:, None]
    return basis.float().to(device)


@functools.lru_cache(maxsize=16)
def _bases(shapes: tuple[tuple[int, int], ...], band: int, device: torch.device) -> tuple[torch.Tensor, dict]:
    """One flat buffer holding the bases of every distinct (n_fft, rows) of a launch, and each one's offset."""
    parts = [_basis(n_fft, rows, band, device).reshape(-1) for n_fft, rows in shapes]
    offsets, total = {}, 0
    for shape, part in zip(shapes, parts):
        offsets[shape] = total
        total += part.numel()
    return torch.cat(parts), offsets


def _check_geometry(waves, wave_offsets, n_fft, hop, frames, bands, spec_bounds: torch.Tensor, band: int) -> None:
    """ValueError unless every signal's frames lie inside its samples and its image holds its bins: the kernels
    read and write at these offsets unchecked. Offsets already on the device are trusted, as checking them would
    wait for it."""
    signals = len(frames)
    if not len(n_fft) == len(hop) == len(bands) == signals or spec_bounds.shape != (signals + 1,):
        raise ValueError(f"n_fft, hop, frames and bands need one value per signal and spec_offsets one more; got "
                         f"{len(n_fft)}, {len(hop)}, {signals}, {len(bands)} and {len(spec_bounds)}")
    for i, (step, count) in enumerate(zip(hop, frames)):
        if step < 1 or count < 0:  # a negative hop read before the signal, negative frames wrote before the image
            raise ValueError(f"signal {i}: hop must be at least 1 and frames at least 0, got hop {step}, frames {count}")
    for i, (window, rows) in enumerate(zip(n_fft, (b * band for b in bands))):
        if not rows - band < window // 2 + 1 <= rows:
            raise ValueError(f"signal {i}: the {window // 2 + 1} bins of n_fft {window} need "
                             f"{-(-(window // 2 + 1) // band)} bands of {band} rows, got {bands[i]}")
    sizes = [b * band * t for b, t in zip(bands, frames)]
    if spec_bounds[0] != 0 or spec_bounds.diff().tolist() != sizes:
        raise ValueError(f"spec_offsets must step by each signal's bands x {band} rows x frames from 0, got "
                         f"{spec_bounds.tolist()[:8]} for sizes {sizes[:8]}")
    if isinstance(wave_offsets, torch.Tensor) and wave_offsets.device.type != "cpu":
        return
    bounds = torch.as_tensor(wave_offsets, dtype=torch.int64, device=HOST).reshape(-1).tolist()
    needed = [window + (t - 1) * step for window, step, t in zip(n_fft, hop, frames)]
    if len(bounds) != signals + 1 or (signals and (bounds[0] < 0 or bounds[-1] > waves.numel())) or any(
        end - start < need for start, end, need in zip(bounds, bounds[1:], needed)
    ):
        raise ValueError(f"wave_offsets must bound each signal's samples inside the {waves.numel()} of waves, with "
                         f"the samples of its frames; got {bounds[:8]} for signals of at least {needed[:8]} samples")


def ragged_spectrogram(
    waves: torch.Tensor,
    wave_offsets: Sequence[int] | torch.Tensor,
    n_fft: Sequence[int],
    hop: Sequence[int],
    frames: Sequence[int],
    bands: Sequence[int],
    spec_offsets: Sequence[int] | torch.Tensor,
    *,
    log_eps: float,
    log_mean: float,
    log_std: float,
    band: int = 32,
    block_rows: int = 64,
    block_frames: int = 64,
    block_k: int = 32,
    means: torch.Tensor | None = None,
) -> torch.Tensor:
    """Signal i = waves[wave_offsets[i]:wave_offsets[i+1]] (float32) with window n_fft[i], hop[i] and
    frames[i] frames -> flat float32 buffer: signal i's (bands[i]*band, frames[i]) image of
    (ln(|X| + log_eps) + log_mean) / log_std at spec_offsets[i], zero rows before its last band's real bins.
    Each signal loses its own mean, or means[i] when given (a span of frames of a longer signal).

    The per-signal integers are host data (the plan's), so building the tile table needs no device sync.
    """
    if waves.dtype != torch.float32:
        raise ValueError(f"ragged_spectrogram takes float32 waveforms, got {waves.dtype}")
    waves = waves.contiguous()  # the kernel reads samples at offsets into one flat buffer
    device = waves.device
    spec_bounds = torch.as_tensor(spec_offsets, dtype=torch.int64, device=HOST)
    signals = len(frames)
    _check_geometry(waves, wave_offsets, n_fft, hop, frames, bands, spec_bounds, band)
    if means is not None and means.shape != (signals,):  # the kernel reads means[i] for signal i, unchecked
        raise ValueError(f"means must hold one DC per signal ({signals}), got shape {tuple(means.shape)}")
    out = torch.empty(int(spec_bounds[-1]) if signals else 0, dtype=torch.float32, device=device)
    if signals == 0 or out.numel() == 0:
        return out
    rows = [b * band for b in bands]
    shapes = tuple(sorted(set(zip(n_fft, rows))))
    bases, basis_at = _bases(shapes, band, device)

    # Per-signal integers, one host -> device copy; row j is one kernel argument.
    per_signal = torch.tensor(
        [n_fft, hop, frames, [n // 2 + 1 for n in n_fft], rows, [basis_at[shape] for shape in zip(n_fft, rows)]],
        dtype=torch.int64, device=HOST,
    )
    per_signal = torch.cat([per_signal, spec_bounds[None, :-1]]).to(device, non_blocking=True)
    offsets = torch.as_tensor(wave_offsets, dtype=torch.int64,
                              device=wave_offsets.device if torch.is_tensor(wave_offsets) else HOST)
    offsets = offsets.to(device, non_blocking=True).contiguous()
    # Tile table: every (row block, frame block) of every signal, signal-major, built without a Python loop.
    row_tiles = (torch.tensor(rows, device=HOST) + block_rows - 1) // block_rows
    frame_tiles = (torch.tensor(frames, device=HOST) + block_frames - 1) // block_frames
    tile_signal = torch.repeat_interleave(torch.arange(signals, device=HOST), row_tiles * frame_tiles)
    first_tile = torch.cumsum(row_tiles * frame_tiles, 0) - row_tiles * frame_tiles
    local = torch.arange(len(tile_signal), device=HOST) - first_tile[tile_signal]
    tiles = torch.stack([
        tile_signal, (local % frame_tiles[tile_signal]) * block_frames, (local // frame_tiles[tile_signal]) * block_rows
    ]).to(device, non_blocking=True)

    if means is None:
        means = torch.empty(signals, dtype=torch.float32, device=device)
        _signal_mean_kernel[(signals,)](waves, offsets, means, BLOCK=1024)
    else:
        means = means.to(device, torch.float32, non_blocking=True)
    n_ffts, hops, frames_of, bins_of, rows_of, basis_offsets, signal_spec_offsets = per_signal
    _spectrogram_tile_kernel[(tiles.shape[1],)](
        waves, means, out, bases, *tiles,
        offsets, n_ffts, hops, frames_of, bins_of, rows_of, signal_spec_offsets, basis_offsets,
        log_eps, log_mean, log_std,
        BAND=band, BLOCK_R=block_rows, BLOCK_T=block_frames, BLOCK_K=block_k,
        PRECISION=dot_precision(torch.float32),
    )
    return out
