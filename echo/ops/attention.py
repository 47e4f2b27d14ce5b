"""Multi-head self-attention of the ECHO layer (spec section 4): packed in-projection, heads are contiguous
D/H slices, scale 1/sqrt(head_dim), no mask."""
from __future__ import annotations

import functools
import numbers

import torch


def split_heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(..., L, 3D) packed rows Q, K, V -> three (..., H, L, D/H)."""
    *lead, length, three_dim = qkv.shape
    head_dim = three_dim // (3 * heads)
    q, k, v = qkv.reshape(*lead, length, 3, heads, head_dim).movedim(-3, 0).transpose(-3, -2).unbind(0)
    return q, k, v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (..., L, d); softmax in float32 whatever the input dtype."""
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    return (scores.softmax(dim=-1).to(v.dtype)) @ v


def merge_heads(out: torch.Tensor) -> torch.Tensor:
    """(..., H, L, d) -> (..., L, H*d)."""
    return out.transpose(-3, -2).flatten(-2)


def varlen_attention(qkv: torch.Tensor, cu_seqlens: torch.Tensor, heads: int) -> torch.Tensor:
    """Reference for packed sequences: qkv (total, 3D), sequence s is rows cu_seqlens[s]:cu_seqlens[s+1];
    no token attends outside its own sequence. Returns (total, D)."""
    bounds = cu_seqlens.tolist()
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, v = split_heads(qkv[start:end], heads)
        pieces.append(merge_heads(attention(q, k, v)))
    return torch.cat(pieces) if pieces else qkv.new_empty(0, qkv.shape[-1] // 3)


def grouped_attention(qkv: torch.Tensor, groups: dict[int, torch.Tensor], heads: int) -> torch.Tensor:
    """Same contract as varlen_attention: SDPA once per distinct sequence length over the rows of all
    sequences of that length (`groups`: length -> a slice of consecutive rows, or row indices to gather), so
    nothing is padded."""
    dim = qkv.shape[1] // 3
    out = qkv.new_empty(qkv.shape[0], dim)
    for length, rows in groups.items():
        q, k, v = split_heads(qkv[rows].view(-1, length, qkv.shape[1]), heads)
        result = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # (n, H, L, d)
        if isinstance(rows, slice):  # write the heads straight into their rows: one copy, not two
            out[rows].view(-1, length, heads, dim // heads).copy_(result.transpose(1, 2))
        else:
            out[rows] = merge_heads(result).reshape(-1, dim)
    return out


def first_token_attention(qkv: torch.Tensor, packing, heads: int) -> torch.Tensor:
    """The attention output of each sequence's first token (its CLS) alone: (S, D) in sequence order, equal to
    those rows of varlen_attention. An encoder whose last layer feeds only the CLS rows needs no more: one
    query per sequence against all its keys, SDPA once per distinct length."""
    dim = qkv.shape[1] // 3
    starts = packing.cu_seqlens[:-1].long()
    host_starts = starts.cpu()  # one copy per call, not a device sync per group
    out = qkv.new_empty(len(starts), dim)
    for length, rows in packing.groups.items():
        q, k, v = split_heads(qkv[rows].view(-1, length, qkv.shape[1]), heads)
        result = merge_heads(torch.nn.functional.scaled_dot_product_attention(q[:, :, :1], k, v)).squeeze(1)
        if isinstance(rows, slice):  # consecutive sequences
            first = int(torch.searchsorted(host_starts, rows.start))
            out[first : first + result.shape[0]] = result
        else:
            out[torch.searchsorted(starts, rows.view(-1, length)[:, 0].contiguous())] = result
    return out


# The compiled kernel (csrc/attention.cpp) takes sequences up to this many tokens with 64-dim heads: every ECHO
# sequence (at most 126). Against grouped SDPA it measured 1.4-7x at 5-63 tokens, and at 64, where SDPA is at
# its best, 0.9-1.1x in bf16, 1.6-1.8x in fp32 on an AMX CPU (bench/RESULTS.md, fifth session); 1.6-2.1x at
# 64-126 tokens in bf16 and fp32 on an AVX-512 CPU without AMX (twelfth session).
SHORT_TOKENS = 128
COMPILED_HEAD_DIM = 64
# In bf16, on a CPU with AMX tiles, sequences of TILE_FROM to TILE_TOKENS tokens (ECHO's are at most 126) go
# to the tile kernel (csrc/tile_attention.cpp): 1.2-1.7x the FMA kernel from 14-17 tokens on and 1.5-2.8x
# SDPA at 64-126. Below ~12 tokens the tile kernel's fixed costs per (sequence, head) make it level with the
# FMA kernel or slower, by up to 1.7x in this VM's slow states (bench/RESULTS.md, eleventh session).
TILE_FROM = 13
TILE_TOKENS = 128


@functools.cache
def tiles_usable() -> bool:
    """Whether the tile kernel runs here: echo._C built with it, a CPU with AMX, a kernel that allows it."""
    from .. import extension

    return extension.has_op("tile_attention", "cpu") and bool(torch.ops.echo.tile_attention_usable())


def compiled_then_grouped_attention(qkv: torch.Tensor, packing, heads: int) -> torch.Tensor:
    """Same contract as varlen_attention: the compiled kernels on the leading sequences (a plan orders
    sequences by length, so all short ones lead), in bf16 with AMX the FMA kernel below TILE_FROM tokens and
    the tile kernel up to TILE_TOKENS, else the FMA kernel up to SHORT_TOKENS; grouped SDPA on the rest."""
    tiles = qkv.dtype == torch.bfloat16 and tiles_usable()
    short_rows, short_bounds = packing.leading_up_to(TILE_FROM - 1 if tiles else SHORT_TOKENS)
    rows, bounds = packing.leading_up_to(TILE_TOKENS) if tiles else (short_rows, short_bounds)
    pieces = []  # (rows, their output)
    if short_rows:
        pieces.append((slice(0, short_rows), torch.ops.echo.short_attention(qkv[:short_rows], short_bounds, heads)))
    if rows > short_rows:
        tile_bounds = bounds[len(short_bounds) - 1 :] - short_rows
        tiled = torch.ops.echo.tile_attention(qkv[short_rows:rows], tile_bounds, heads)
        pieces.append((slice(short_rows, rows), tiled))
    if len(pieces) == 1 and rows == qkv.shape[0]:
        return pieces[0][1]
    rest = {length: group for length, group in packing.groups.items()
            if not (isinstance(group, slice) and group.stop <= rows)}
    out = grouped_attention(qkv, rest, heads)
    for where, result in pieces:
        out[where] = result
    return out


def available_backends(device: torch.device) -> tuple[str, ...]:
    """Attention's backends, in order of preference: the compiled kernels where built (inference only: they
    have no backward), then SDPA grouped by length (the torch path)."""
    from .. import extension

    fallbacks = ("triton", "torch", "reference")
    return ("csrc", *fallbacks) if extension.has_op("short_attention", device) else fallbacks


# What the backends that take only some heads take (echo info says it too).
TAKES = {
    "csrc": f"float32 or bf16 heads of dim {COMPILED_HEAD_DIM} in inference (no backward)",
    "triton": "float32, bf16 or fp16 heads of a power-of-two dim from 16 to 128",
}


@functools.cache
def unfit_backends(head_dim: int, dtype: torch.dtype, needs_grad: bool = False) -> dict[str, str]:
    """The backends that cannot take these heads, each with the reason: a custom config's heads (dim 8, 25, 48,
    256...) run on the next backend by default, and a forced one that cannot take them is an error saying why.
    Cached: every layer of every pass asks, with the same few answers (callers only read the dict)."""
    got = f"got {dtype} heads of dim {head_dim}{' that need gradients' if needs_grad else ''}"
    unfit = {}
    if needs_grad or head_dim != COMPILED_HEAD_DIM or dtype not in (torch.float32, torch.bfloat16):
        unfit["csrc"] = f"the compiled attention takes {TAKES['csrc']}, {got}"
    # (echo_kernels.attention's own check: a tile holds whole heads, and 64 rows of 256 float32 channels, times
    # q, k and v, pass the shared memory of a GPU)
    if not 16 <= head_dim <= 128 or head_dim & (head_dim - 1) or \
            dtype not in (torch.float32, torch.bfloat16, torch.float16):
        unfit["triton"] = f"the Triton attention takes {TAKES['triton']}, {got}"
    return unfit


def fitting_backends(head_dim: int, dtype: torch.dtype, device: torch.device, backend: str | None = None,
                     needs_grad: bool = False) -> tuple[str, ...]:
    """The backends on `device` that take these heads, fastest first; a forced one that cannot take them is an
    error saying why (and one not built or not on this device says that first)."""
    from . import backend as backends

    unfit = unfit_backends(head_dim, dtype, needs_grad)
    available = available_backends(device)
    requested, source = backends.request("attention", backend)
    if requested in unfit:
        backends.choose("attention", device, backend, available)
        raise backends.BackendError(f"{source}: {unfit[requested]}")
    return tuple(name for name in available if name not in unfit)


def check_heads(qkv: torch.Tensor, heads: int) -> None:
    """ValueError unless qkv is (total, 3D) rows of `heads` whole heads: heads=0 was a ZeroDivisionError and a
    count that does not divide D a reshape error deep in a backend. (echo_kernels.attention.varlen_attention
    says the same for a direct call: the kernels import no model code.)"""
    if not isinstance(heads, numbers.Integral) or heads < 1:
        raise ValueError(f"heads must be a positive count, got {heads!r}")
    if qkv.dim() != 2 or qkv.shape[1] % (3 * heads):
        raise ValueError(f"qkv must be (total, 3*D) with D divisible by heads={heads}, got {tuple(qkv.shape)}")


def packed_attention(qkv: torch.Tensor, packing, heads: int, backend: str | None = None) -> torch.Tensor:
    """Dispatch of varlen attention on a packed (total, 3D) buffer described by an echo.packed.Packing."""
    from . import backend as backends

    check_heads(qkv, heads)
    fitting = fitting_backends(qkv.shape[1] // (3 * heads), qkv.dtype, qkv.device, backend,
                               torch.is_grad_enabled() and qkv.requires_grad)
    chosen = backends.choose("attention", qkv.device, backend, fitting)
    if chosen == "csrc":  # the compiled kernels read rows of 3D values back to back
        return compiled_then_grouped_attention(qkv.contiguous(), packing, heads)
    if chosen == "triton":
        from echo_kernels import attention as kernel

        return kernel.varlen_attention(qkv, packing.cu_seqlens, packing.max_seqlen, heads,
                                       seq_ids=packing.row_sequences(qkv.shape[0], qkv.device))
    if chosen == "reference":
        return varlen_attention(qkv, packing.cu_seqlens, heads)
    return grouped_attention(qkv, packing.groups, heads)
