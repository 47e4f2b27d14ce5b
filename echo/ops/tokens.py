"""From a normalised spectrogram to the token sequences of its bands (spec sections 2 and 3)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .. import geometry


def band_split(spec: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """(F, T) -> (nb, 32, T). Band b holds bins [32b, min(32b+32, F)); a narrower last band is zero-padded
    with rows BEFORE its real bins (0 is a value of the normalised domain)."""
    if spec.dim() != 2 or spec.shape[0] != geometry.n_bins(sample_rate):  # other rows would be cut or misplaced
        raise ValueError(f"{sample_rate} Hz has {geometry.n_bins(sample_rate)} frequency bins, got a spectrogram of "
                         f"shape {tuple(spec.shape)}")
    bins, frames = spec.shape
    bands = geometry.n_bands(sample_rate)
    pad = bands * geometry.BAND_BINS - bins
    last_start = (bands - 1) * geometry.BAND_BINS
    last = F.pad(spec[last_start:], (0, 0, pad, 0))
    full = spec[:last_start].reshape(bands - 1, geometry.BAND_BINS, frames)
    return torch.cat([full, last[None]], dim=0)


def time_position_table(dim: int, rows: int = geometry.MAX_PATCHES + 1) -> torch.Tensor:
    """pos_embed (1, rows, D): row 0 zero; row i = [sin(p w_k) | cos(p w_k)] for p = i - 1,
    w_k = 10000^(-k / (D/2)), computed in float64 and cast to float32."""
    half = dim // 2
    omega = 1.0 / 10000 ** (np.arange(half, dtype=np.float64) / half)
    angles = np.arange(rows - 1, dtype=np.float64)[:, None] * omega[None, :]
    table = np.zeros((rows, dim), dtype=np.float64)
    table[1:] = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    return torch.from_numpy(table).to(torch.float32)[None]


def frequency_encoding(position: torch.Tensor | float, dim: int) -> torch.Tensor:
    """FPE of band positions p (fraction of Nyquist), (...,) -> (..., D), float32, sin/cos interleaved:
    angle_i = (25 p) * exp(2i * -ln(10000) / D). Positions in a tensor stay on its device (as_tensor alone moves
    them to torch's default device); a number is put on the CPU."""
    position = torch.as_tensor(position, dtype=torch.float32,
                               device=position.device if isinstance(position, torch.Tensor) else "cpu")
    inverse_freq = torch.exp(
        torch.arange(0, dim, 2, dtype=torch.float32, device=position.device) * (-math.log(10000.0) / dim)
    )
    angles = (geometry.FPE_SCALE * position)[..., None] * inverse_freq
    return torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).flatten(-2)


def band_positions(sample_rate: int) -> torch.Tensor:
    """p of every grid band of a rate, from the centre of its real bins (on the CPU, whatever torch's default
    device)."""
    return torch.tensor(
        [
            geometry.band_position(sample_rate, *geometry.band_edges(sample_rate, b))
            for b in range(geometry.n_bands(sample_rate))
        ],
        dtype=torch.float64,
        device="cpu",
    ).to(torch.float32)


def patch_project(bands: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(B, 32, T) -> (B, L, D): non-overlapping 32x16 patches (a strided conv), time right-padded with zeros
    to L = ceil(T / 16) patches."""
    frames = bands.shape[-1]
    padded = F.pad(bands, (0, geometry.n_patches(frames) * geometry.PATCH_FRAMES - frames))
    return F.conv2d(padded[:, None], weight, bias, stride=(geometry.BAND_BINS, geometry.PATCH_FRAMES)).flatten(2).transpose(1, 2)


def assemble_sequences(
    patches: torch.Tensor, cls_token: torch.Tensor, pos_embed: torch.Tensor, fpe: torch.Tensor
) -> torch.Tensor:
    """(B, L, D) projected patches -> (B, L+1, D) sequences [CLS, patch 1..L]: patch i gets pos_embed row i and
    its band's FPE; CLS = cls_token + FPE (no time row)."""
    length = patches.shape[1]
    tokens = patches + pos_embed[:, 1 : length + 1] + fpe[:, None]
    cls = cls_token.reshape(1, 1, -1) + fpe[:, None]
    return torch.cat([cls, tokens], dim=1)


def pack_tokens_reference(spec: torch.Tensor, plan, weight, bias, cls_token, pos_embed) -> torch.Tensor:
    """Flat band-layout spectrogram buffer (see ops.stft.ragged_spectrogram) -> the packed (total_tokens, D)
    token buffer of the plan: sequence s = [cls + fpe, proj(patch i) + pos_embed[i] + fpe for i = 1..L],
    its patches cut from band seq_band[s] of its signal, frames [start, start + frames), zero-padded in time."""
    dim = weight.shape[0]
    out = []
    for s in range(plan.num_sequences):
        i = int(plan.seq_signal[s])
        band, start, frames = int(plan.seq_band[s]), int(plan.seq_frame_start[s]), int(plan.seq_frames[s])
        image = spec[int(plan.spec_offsets[i]) : int(plan.spec_offsets[i + 1])].view(-1, plan.frames[i])
        rows = image[geometry.BAND_BINS * band : geometry.BAND_BINS * (band + 1), start : start + frames]
        patches = patch_project(rows[None], weight, bias)
        fpe = frequency_encoding(plan.seq_position[s : s + 1].to(spec.device), dim).to(patches.dtype)
        out.append(assemble_sequences(patches, cls_token, pos_embed, fpe)[0])
    return torch.cat(out) if out else spec.new_empty(0, dim)


def patch_matrix(spec: torch.Tensor, plan) -> torch.Tensor:
    """Every patch of every sequence as one (patches, 512) matrix, in packed order (rows: 32 bins x 16
    frames, bin-major like the conv kernel)."""
    pieces = []
    spec_bounds = plan.spec_offsets.tolist()
    for signal, first, bands, patches, first_band in plan.segments:
        start = int(plan.seq_frame_start[first])
        frames = int(plan.seq_frames[first])
        image = spec[spec_bounds[signal] : spec_bounds[signal + 1]].view(plan.bands[signal], geometry.BAND_BINS, -1)
        segment = image[first_band : first_band + bands, :, start : start + frames]
        segment = F.pad(segment, (0, patches * geometry.PATCH_FRAMES - frames))
        pieces.append(
            segment.reshape(bands, geometry.BAND_BINS, patches, geometry.PATCH_FRAMES)
            .transpose(1, 2)
            .reshape(bands * patches, geometry.BAND_BINS * geometry.PATCH_FRAMES)
        )
    return torch.cat(pieces) if pieces else spec.new_empty(0, geometry.BAND_BINS * geometry.PATCH_FRAMES)


def pack_tokens_torch(spec, plan, weight, bias, cls_token, pos_embed) -> torch.Tensor:
    """Same result: one matrix product over all patches of all sequences, positions added by gather."""
    dim = weight.shape[0]
    patch_rows = plan.patch_rows()
    cls_rows = plan.cls_rows()
    fpe = frequency_encoding(plan.seq_position.to(spec.device), dim).to(weight.dtype)  # (S, D)
    seq_of_patch = torch.repeat_interleave(torch.arange(plan.num_sequences, device=plan.seq_patches.device),
                                           plan.seq_patches)
    patch_index = patch_rows - plan.cu_seqlens[:-1].long()[seq_of_patch]  # 1..L within its sequence
    projected = torch.addmm(bias, patch_matrix(spec, plan).to(weight.dtype), weight.reshape(dim, -1).T)
    tokens = torch.empty(plan.total_tokens, dim, dtype=weight.dtype, device=spec.device)
    tokens[patch_rows] = projected + pos_embed[0, patch_index.to(spec.device)] + fpe[seq_of_patch.to(spec.device)]
    tokens[cls_rows] = cls_token.reshape(1, dim) + fpe
    return tokens


def available_backends(device: torch.device) -> tuple[str, ...]:
    """The token stage's backends, in order of preference (no compiled op: the torch path is one GEMM)."""
    return ("triton", "torch", "reference")


def pack_tokens(spec, plan, weight, bias, cls_token, pos_embed, backend: str | None = None) -> torch.Tensor:
    """Dispatch of the token stage (see pack_tokens_reference for the contract)."""
    from . import backend as backends

    chosen = backends.choose("tokens", spec.device, backend, available=available_backends(spec.device))
    if chosen == "triton":
        from echo_kernels import tokens as kernel

        signal_frames = torch.tensor(plan.frames, dtype=torch.int64, device=plan.seq_signal.device)[plan.seq_signal]
        return kernel.pack_tokens(
            spec,
            weight,
            bias,
            cls_token,
            pos_embed,
            image_offsets=plan.spec_offsets[plan.seq_signal] + plan.seq_band * geometry.BAND_BINS * signal_frames,
            image_strides=signal_frames,
            frame_starts=plan.seq_frame_start,
            frames=plan.seq_frames,
            patches=plan.seq_patches,
            cu_seqlens=plan.cu_seqlens,
            positions=plan.seq_position,
            fpe_scale=geometry.FPE_SCALE,
        )
    if chosen == "reference":
        return pack_tokens_reference(spec, plan, weight, bias, cls_token, pos_embed)
    return pack_tokens_torch(spec, plan, weight, bias, cls_token, pos_embed)


def band_patches(bands: torch.Tensor) -> torch.Tensor:
    """(..., 32, T) band images -> (..., L, 512) patch rows (32 bins x 16 frames, bin-major like the conv
    kernel), time right-padded with zeros to L = ceil(T / 16): the input of the patch projection as a matrix
    product (used by pretraining, whose bands are not on the 32-bin grid)."""
    frames = bands.shape[-1]
    patches = geometry.n_patches(frames)
    padded = F.pad(bands, (0, patches * geometry.PATCH_FRAMES - frames))
    grid = padded.reshape(*bands.shape[:-2], geometry.BAND_BINS, patches, geometry.PATCH_FRAMES)
    return grid.transpose(-3, -2).reshape(*bands.shape[:-2], patches, geometry.BAND_BINS * geometry.PATCH_FRAMES)


def scatter_sequences(
    projected: torch.Tensor,
    patch_sequence: torch.Tensor,
    patch_position: torch.Tensor,
    cls_token: torch.Tensor,
    pos_embed: torch.Tensor,
    fpe: torch.Tensor,
) -> torch.Tensor:
    """Packed [CLS, patches] sequences from projected patches (N, D) grouped by sequence (`patch_sequence`
    non-decreasing, each sequence's patches in the order they appear): patch j gets pos_embed row
    patch_position[j] (1-based time index, so a subset of a band's patches keeps its time positions) and
    fpe[patch_sequence[j]]; CLS = cls_token + fpe. fpe is (S, D); returns (S + N, D), differentiable."""
    sequences, dim = fpe.shape[0], fpe.shape[1]
    counts = torch.bincount(patch_sequence, minlength=sequences)
    cls_rows = torch.cumsum(counts + 1, 0) - (counts + 1)
    patch_rows = torch.arange(len(patch_sequence), device=projected.device) + patch_sequence + 1
    patch_tokens = projected + pos_embed[0, patch_position] + fpe[patch_sequence]
    tokens = patch_tokens.new_empty(sequences + len(patch_sequence), dim)
    tokens[patch_rows] = patch_tokens
    tokens[cls_rows] = (cls_token.reshape(1, dim) + fpe).to(tokens.dtype)
    return tokens
