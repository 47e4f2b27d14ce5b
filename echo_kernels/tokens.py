"""Token packing in Triton: band split + patch projection + bias + time and frequency positions + CLS,
written straight into the packed (total_tokens, D) buffer.

A patch is a (band rows x patch frames) window of a band-layout spectrogram image; projecting it is a matrix
product of the (patches, rows*frames) patch matrix with the (rows*frames, D) conv weight. The patch matrix is
never materialised: each program gathers its patches from the image (zero past the segment's last frame,
the time padding of the last patch) and feeds them to `tl.dot`. Positions are added in the epilogue, the
frequency encoding computed on the fly from the sequence's band position, so the packed buffer is written
exactly once.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import HOST, dot, dot_precision


@triton.jit
def _pack_tokens_kernel(
    spec, weight, bias, cls_token, pos_embed, out,
    tile_sequence, tile_patch,
    image_offsets, image_strides, frame_starts, frames_of, patches_of, token_starts, positions,
    dim, fpe_scale, fpe_rate,
    BAND: tl.constexpr, PATCH: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """BLOCK_P tokens x BLOCK_D features of one sequence; the sequence's first tile also writes its CLS."""
    tile = tl.program_id(0)
    sequence = tl.load(tile_sequence + tile)
    first_patch = tl.load(tile_patch + tile)
    image = spec + tl.load(image_offsets + sequence)
    stride = tl.load(image_strides + sequence)  # frames of the whole signal: one image row
    frame_start = tl.load(frame_starts + sequence)
    frames = tl.load(frames_of + sequence)  # frames of this segment
    patches = tl.load(patches_of + sequence)
    token_start = tl.load(token_starts + sequence)

    patch = first_patch + tl.arange(0, BLOCK_P)
    feature = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    patch_ok = patch < patches
    feature_ok = feature < dim

    acc = tl.zeros((BLOCK_P, BLOCK_D), tl.float32)
    for first in range(0, BAND * PATCH, BLOCK_K):
        # k runs bin-major over the patch (bin * PATCH + frame), the order of the conv weight's last two axes.
        k = first + tl.arange(0, BLOCK_K)
        frame = patch[:, None] * PATCH + (k % PATCH)[None, :]
        x = tl.load(
            image + (k // PATCH)[None, :] * stride + frame_start + frame,
            mask=patch_ok[:, None] & (frame < frames),
            other=0.0,
        )
        w = tl.load(weight + feature[None, :] * (BAND * PATCH) + k[:, None], mask=feature_ok[None, :], other=0.0)
        acc += dot(x.to(w.dtype), w, PRECISION)

    # Frequency encoding of the band: angle_i = (scale p) * exp(2i * fpe_rate), fpe_rate = -ln(base) / D,
    # sin at even and cos at odd features; fp32 in the reference's order so the rounding matches.
    pair = (feature - feature % 2).to(tl.float32)
    angle = (fpe_scale * tl.load(positions + sequence)) * tl.exp(pair * fpe_rate)
    fpe = tl.where(feature % 2 == 0, tl.sin(angle), tl.cos(angle))

    row_bias = tl.load(bias + feature, mask=feature_ok, other=0.0).to(tl.float32)
    time_row = tl.load(
        pos_embed + (patch[:, None] + 1) * dim + feature[None, :],
        mask=patch_ok[:, None] & feature_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    tokens = acc + row_bias[None, :] + time_row + fpe[None, :]
    out_rows = token_start + 1 + patch
    tl.store(
        out + out_rows[:, None] * dim + feature[None, :],
        tokens.to(out.dtype.element_ty),
        mask=patch_ok[:, None] & feature_ok[None, :],
    )
    if first_patch == 0:
        cls = tl.load(cls_token + feature, mask=feature_ok, other=0.0).to(tl.float32) + fpe
        tl.store(out + token_start * dim + feature, cls.to(out.dtype.element_ty), mask=feature_ok)


def _check_layout(patches: torch.Tensor, cu_seqlens: torch.Tensor, dim: int, bias: torch.Tensor,
                  cls_token: torch.Tensor, pos_embed: torch.Tensor) -> None:
    """ValueError unless each sequence's rows are exactly its CLS and patches and the per-feature parameters cover
    what the kernel reads: it writes rows cu_seqlens[s]:cu_seqlens[s] + patches[s] + 1 of a buffer of cu_seqlens[-1]
    rows and reads pos_embed rows up to the longest sequence's patches, none of it bounds-checked."""
    if cu_seqlens.shape != (len(patches) + 1,) or cu_seqlens[0] != 0 or not torch.equal(cu_seqlens.diff(), patches + 1):
        raise ValueError(f"cu_seqlens must step by patches + 1 from 0 (a CLS and the patches of each of the "
                         f"{len(patches)} sequences), got {cu_seqlens.tolist()[:8]} for patches {patches.tolist()[:8]}")
    for name, param in (("bias", bias), ("cls_token", cls_token)):
        if param.numel() != dim:
            raise ValueError(f"{name} {tuple(param.shape)} must hold the {dim} features of the weight")
    needed_rows = int(patches.max()) + 1 if len(patches) else 0
    if pos_embed.shape[-1] != dim or pos_embed.numel() < needed_rows * dim:
        raise ValueError(f"pos_embed {tuple(pos_embed.shape)} must hold {needed_rows} rows (CLS and the longest "
                         f"sequence's patches) of the {dim} features of the weight")


def _check_images(spec: torch.Tensor, band: int, per_sequence: dict[str, torch.Tensor]) -> None:
    """ValueError unless every per-sequence tensor has one value per sequence and each sequence's frames lie in
    its image inside spec: the kernel reads band rows of image_strides[s] frames from image_offsets[s], frames
    [frame_starts[s], + frames[s]) of each, unchecked (outside spec: other memory, NaN or a crash)."""
    sequences = len(per_sequence["patches"])
    counts = {name: len(values) for name, values in per_sequence.items()}
    if set(counts.values()) != {sequences}:
        raise ValueError(f"image_offsets, image_strides, frame_starts, frames, patches and positions need one value "
                         f"per sequence, got {', '.join(f'{name} {count}' for name, count in counts.items())}")
    offsets, strides, starts, frames = (per_sequence[name] for name in
                                        ("image_offsets", "image_strides", "frame_starts", "frames"))
    ends = offsets + (band - 1) * strides + starts + frames  # one past the last sample read
    wrong = (offsets < 0) | (starts < 0) | (frames < 0) | (starts + frames > strides) | (ends > spec.numel())
    if wrong.any():
        s = int(wrong.nonzero()[0])
        raise ValueError(f"sequence {s}: frames {int(starts[s])}-{int(starts[s] + frames[s])} of an image of {band} "
                         f"rows of {int(strides[s])} frames at offset {int(offsets[s])} must lie inside its rows and "
                         f"the {spec.numel()} values of spec")


def pack_tokens(
    spec: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    cls_token: torch.Tensor,
    pos_embed: torch.Tensor,
    image_offsets: torch.Tensor,
    image_strides: torch.Tensor,
    frame_starts: torch.Tensor,
    frames: torch.Tensor,
    patches: torch.Tensor,
    cu_seqlens: torch.Tensor,
    positions: torch.Tensor,
    *,
    fpe_scale: float,
    fpe_base: float = 10000.0,
    block_patches: int = 32,
    block_dim: int = 64,
    block_k: int = 64,
) -> torch.Tensor:
    """Sequence s reads the (band, frames) image at spec[image_offsets[s]:] (rows image_strides[s] apart),
    frames [frame_starts[s], + frames[s]) as patches[s] patches, and becomes rows cu_seqlens[s]:cu_seqlens[s+1]
    of the packed (total, D) output: [cls + fpe, weight . patch_i + bias + pos_embed[i] + fpe for i = 1..L],
    fpe from the band position positions[s]. `weight` is the (D, 1, band, patch) conv weight; the output has
    its dtype. The per-sequence tensors are host data (the plan's), so no device sync is needed.
    """
    dim, _, band, patch = weight.shape
    spec = spec.contiguous()  # the kernel reads images at offsets into one flat buffer
    device = spec.device
    patches = torch.as_tensor(patches, dtype=torch.int64, device=HOST)
    cu_seqlens = torch.as_tensor(cu_seqlens, dtype=torch.int64, device=HOST)
    _check_layout(patches, cu_seqlens, dim, bias, cls_token, pos_embed)
    per_sequence = {name: torch.as_tensor(values, dtype=torch.int64, device=HOST).reshape(-1) for name, values in (
        ("image_offsets", image_offsets), ("image_strides", image_strides), ("frame_starts", frame_starts),
        ("frames", frames), ("patches", patches))}
    _check_images(spec, band, per_sequence | {"positions": torch.as_tensor(positions).reshape(-1)})
    total = int(cu_seqlens[-1])
    out = torch.empty(total, dim, dtype=weight.dtype, device=device)
    if len(patches) == 0:
        return out
    # One tile per BLOCK_P patches of each sequence (at least one, which writes the CLS).
    tiles = ((patches + block_patches - 1) // block_patches).clamp(min=1)
    tile_sequence = torch.repeat_interleave(torch.arange(len(patches), device=HOST), tiles)
    tile_first = torch.cumsum(tiles, 0) - tiles
    tile_patch = (torch.arange(len(tile_sequence), device=HOST) - tile_first[tile_sequence]) * block_patches

    # Every per-tile and per-sequence integer in one host -> device copy; row j is one kernel argument.
    sequences = len(patches)
    per_sequence = torch.stack([*per_sequence.values(), cu_seqlens[:-1]])
    table = torch.cat([
        torch.stack([tile_sequence, tile_patch]).reshape(-1), per_sequence.reshape(-1)
    ]).to(device, non_blocking=True)
    tile_sequence, tile_patch = table[: 2 * len(tile_sequence)].view(2, -1)
    per_sequence = table[2 * len(tile_sequence) :].view(-1, sequences)
    positions = torch.as_tensor(positions, dtype=torch.float32, device=HOST).to(device, non_blocking=True).contiguous()

    grid = (len(tile_sequence), triton.cdiv(dim, block_dim))
    _pack_tokens_kernel[grid](
        spec, weight.reshape(dim, band * patch).contiguous(), bias.contiguous(), cls_token.contiguous(),
        pos_embed.contiguous(), out, tile_sequence, tile_patch, *per_sequence, positions,
        dim, fpe_scale, -math.log(fpe_base) / dim,
        BAND=band, PATCH=patch, BLOCK_P=block_patches, BLOCK_D=block_dim, BLOCK_K=block_k,
        PRECISION=dot_precision(weight.dtype),
    )
    return out
