"""Varlen multi-head attention in Triton, forward and backward, on the packed (total, 3D) qkv buffer.

Sequences are rows cu_seqlens[s]:cu_seqlens[s+1] (FlashAttention convention) and never attend to each
other. ECHO's sequences are short (2..126 tokens) and ragged, so a tile per sequence would waste most of
its rows on padding. Instead the packed rows are cut into fixed tiles regardless of sequence boundaries:
a query tile may hold the tail of one sequence, several whole short ones and the head of the next. It
visits only the key rows of the sequences it touches, and a block-diagonal mask (sequence id of the query
row == sequence id of the key row) keeps sequences apart. So no row is padding except the last tile's, the
grid is known from the buffer's shape alone (no `.item()`, no host sync), and long sequences (thousands of
tokens) run as ordinary flash attention with an online softmax.

Softmax statistics are fp32 and kept in base 2 (exp2 is the hardware's native exponential), so the saved
log-sum-exp is log2-domain; q.k products accumulate in fp32 whatever the input dtype.
"""
from __future__ import annotations

import math
import numbers

import torch
import triton
import triton.language as tl

from . import dot, dot_precision


@triton.jit
def _tile_span(seq_ids, cu_seqlens, first_row, total, BLOCK: tl.constexpr):
    """Rows [lo, hi) of every sequence that rows [first_row, first_row + BLOCK) of the packed buffer touch."""
    first_seq = tl.load(seq_ids + first_row)
    last_seq = tl.load(seq_ids + tl.minimum(first_row + BLOCK, total) - 1)
    return tl.load(cu_seqlens + first_seq), tl.load(cu_seqlens + last_seq + 1)


@triton.jit
def _key_block(qkv, seq_ids, key, key_ok, col, dim):
    """Sequence ids, K and V of a block of key rows (ids of rows past the span never match a query's)."""
    key = key.to(tl.int64)  # rows are 3D values apart: past 2^31 values from 932k tokens of ECHO-base
    seq_k = tl.load(seq_ids + key, mask=key_ok, other=-2)
    k = tl.load(qkv + key[:, None] * (3 * dim) + dim + col[None, :], mask=key_ok[:, None], other=0.0)
    v = tl.load(qkv + key[:, None] * (3 * dim) + 2 * dim + col[None, :], mask=key_ok[:, None], other=0.0)
    return seq_k, k, v


@triton.jit
def _query_block(qkv, grad_out, lse, delta, seq_ids, row, row_ok, head, col, total, dim):
    """What the backward needs of a block of query rows: sequence ids, Q, dO, log-sum-exp and delta."""
    row = row.to(tl.int64)  # as in _key_block
    seq_q = tl.load(seq_ids + row, mask=row_ok, other=-1)
    q = tl.load(qkv + row[:, None] * (3 * dim) + col[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(grad_out + row[:, None] * dim + col[None, :], mask=row_ok[:, None], other=0.0)
    row_lse = tl.load(lse + head * total + row, mask=row_ok, other=0.0)
    row_delta = tl.load(delta + head * total + row, mask=row_ok, other=0.0)
    return seq_q, q, do, row_lse, row_delta


@triton.jit
def _probabilities_and_grad(q, k, v, do, row_lse, row_delta, same_sequence, qk_scale, PRECISION: tl.constexpr):
    """P of one (query, key) tile, recomputed from the saved log-sum-exp, and dS = P * (dP - delta)."""
    scores = dot(q, tl.trans(k), PRECISION) * qk_scale
    p = tl.where(same_sequence, tl.exp2(scores - row_lse[:, None]), 0.0)
    grad_p = dot(do, tl.trans(v), PRECISION)
    return p, p * (grad_p - row_delta[:, None])


@triton.jit
def _forward_kernel(
    qkv, out, lse, seq_ids, cu_seqlens, total, dim, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    first_row = tl.program_id(0).to(tl.int64) * BLOCK_M  # as in _key_block
    head = tl.program_id(1)
    col = head * HEAD_DIM + tl.arange(0, HEAD_DIM)
    row = first_row + tl.arange(0, BLOCK_M)
    row_ok = row < total
    seq_q = tl.load(seq_ids + row, mask=row_ok, other=-1)
    q = tl.load(qkv + row[:, None] * (3 * dim) + col[None, :], mask=row_ok[:, None], other=0.0)
    kv_lo, kv_hi = _tile_span(seq_ids, cu_seqlens, first_row, total, BLOCK_M)

    row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    for start in range(kv_lo, kv_hi, BLOCK_N):
        key = start + tl.arange(0, BLOCK_N)
        seq_k, k, v = _key_block(qkv, seq_ids, key, key < kv_hi, col, dim)
        scores = dot(q, tl.trans(k), PRECISION) * qk_scale
        scores = tl.where(seq_q[:, None] == seq_k[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        # A row may see no key of its sequence in this block (its max stays -inf): shift by 0 instead, so
        # exp2(-inf - -inf) never produces a NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.exp2(scores - shift[:, None])
        rescale = tl.exp2(row_max - shift)
        row_sum = row_sum * rescale + tl.sum(p, axis=1)
        acc = acc * rescale[:, None] + dot(p.to(v.dtype), v, PRECISION)
        row_max = new_max

    # Every real row sees at least its own key, so row_sum > 0 there; the guard only covers the padding rows.
    row_sum = tl.where(row_ok, row_sum, 1.0)
    tl.store(out + row[:, None] * dim + col[None, :], (acc / row_sum[:, None]).to(out.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(lse + head * total + row, row_max + tl.log2(row_sum), mask=row_ok)


@triton.jit
def _backward_kv_kernel(
    qkv, grad_out, lse, delta, seq_ids, cu_seqlens, grad_qkv, total, dim, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """dK and dV of one key tile, visiting the query rows of the sequences it touches."""
    first_key = tl.program_id(0).to(tl.int64) * BLOCK_N  # as in _key_block
    head = tl.program_id(1)
    col = head * HEAD_DIM + tl.arange(0, HEAD_DIM)
    key = first_key + tl.arange(0, BLOCK_N)
    key_ok = key < total
    seq_k, k, v = _key_block(qkv, seq_ids, key, key_ok, col, dim)
    q_lo, q_hi = _tile_span(seq_ids, cu_seqlens, first_key, total, BLOCK_N)

    grad_k = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    grad_v = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    for start in range(q_lo, q_hi, BLOCK_M):
        row = start + tl.arange(0, BLOCK_M)
        seq_q, q, do, row_lse, row_delta = _query_block(
            qkv, grad_out, lse, delta, seq_ids, row, row < q_hi, head, col, total, dim
        )
        p, grad_s = _probabilities_and_grad(
            q, k, v, do, row_lse, row_delta, seq_q[:, None] == seq_k[None, :], qk_scale, PRECISION
        )
        grad_v += dot(tl.trans(p.to(do.dtype)), do, PRECISION)
        grad_k += dot(tl.trans(grad_s.to(q.dtype)), q, PRECISION)

    target = grad_qkv + key[:, None] * (3 * dim) + col[None, :]
    tl.store(target + dim, (grad_k * scale).to(grad_qkv.dtype.element_ty), mask=key_ok[:, None])
    tl.store(target + 2 * dim, grad_v.to(grad_qkv.dtype.element_ty), mask=key_ok[:, None])


@triton.jit
def _backward_q_kernel(
    qkv, grad_out, lse, delta, seq_ids, cu_seqlens, grad_qkv, total, dim, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """dQ of one query tile: a second pass over the keys, so no atomics and a deterministic result."""
    first_row = tl.program_id(0).to(tl.int64) * BLOCK_M  # as in _key_block
    head = tl.program_id(1)
    col = head * HEAD_DIM + tl.arange(0, HEAD_DIM)
    row = first_row + tl.arange(0, BLOCK_M)
    row_ok = row < total
    seq_q, q, do, row_lse, row_delta = _query_block(
        qkv, grad_out, lse, delta, seq_ids, row, row_ok, head, col, total, dim
    )
    kv_lo, kv_hi = _tile_span(seq_ids, cu_seqlens, first_row, total, BLOCK_M)

    grad_q = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    for start in range(kv_lo, kv_hi, BLOCK_N):
        key = start + tl.arange(0, BLOCK_N)
        seq_k, k, v = _key_block(qkv, seq_ids, key, key < kv_hi, col, dim)
        _, grad_s = _probabilities_and_grad(
            q, k, v, do, row_lse, row_delta, seq_q[:, None] == seq_k[None, :], qk_scale, PRECISION
        )
        grad_q += dot(grad_s.to(k.dtype), k, PRECISION)

    tl.store(grad_qkv + row[:, None] * (3 * dim) + col[None, :], (grad_q * scale).to(grad_qkv.dtype.element_ty),
             mask=row_ok[:, None])


def _tile_size(max_seqlen: int) -> int:
    """Rows per tile: at least 16 (the smallest tensor-core product), at most 64; a batch of only very
    short sequences gets small tiles, so a tile rarely spans many sequences it must mask out."""
    return min(64, max(16, triton.next_power_of_2(max(1, max_seqlen))))


def row_sequences(cu_seqlens: torch.Tensor, rows: int) -> torch.Tensor:
    """The sequence of each of the `rows` packed rows (int32), computed on cu_seqlens' device: no host round
    trip. A caller running many layers over one packing computes it once (three launches a call otherwise)."""
    positions = torch.arange(rows, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:], positions, right=True).to(torch.int32)


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cu_seqlens, seq_ids, heads, block):
        total, three_dim = qkv.shape
        dim = three_dim // 3
        head_dim = dim // heads
        out = torch.empty(total, dim, dtype=qkv.dtype, device=qkv.device)
        lse = torch.empty(heads, total, dtype=torch.float32, device=qkv.device)
        scale = head_dim**-0.5
        if total:
            _forward_kernel[(triton.cdiv(total, block), heads)](
                qkv, out, lse, seq_ids, cu_seqlens, total, dim, scale * math.log2(math.e),
                HEAD_DIM=head_dim, BLOCK_M=block, BLOCK_N=block, PRECISION=dot_precision(qkv.dtype),
            )
        ctx.save_for_backward(qkv, out, lse, seq_ids, cu_seqlens)
        ctx.heads, ctx.block, ctx.scale = heads, block, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qkv, out, lse, seq_ids, cu_seqlens = ctx.saved_tensors
        heads, block, scale = ctx.heads, ctx.block, ctx.scale
        total, dim = out.shape
        grad_out = grad_out.contiguous()
        grad_qkv = torch.empty_like(qkv)
        if total:
            # delta_i = sum_j P_ij dP_ij = dO_i . O_i, per row and head (the softmax backward's row term).
            delta = (grad_out.float() * out.float()).view(total, heads, -1).sum(-1).T.contiguous()
            args = (qkv, grad_out, lse, delta, seq_ids, cu_seqlens, grad_qkv, total, dim,
                    scale * math.log2(math.e), scale)
            meta = dict(HEAD_DIM=dim // heads, BLOCK_M=block, BLOCK_N=block, PRECISION=dot_precision(qkv.dtype))
            grid = (triton.cdiv(total, block), heads)
            _backward_kv_kernel[grid](*args, **meta)
            _backward_q_kernel[grid](*args, **meta)
        return grad_qkv, None, None, None, None


def check_cover(cu_seqlens: torch.Tensor, rows: int) -> None:
    """ValueError unless cu_seqlens is 1-D integer offsets and, on the host, 0, then non-decreasing offsets,
    ending at `rows`. Offsets on a device are not read: that would wait for the device."""
    if cu_seqlens.dim() != 1 or len(cu_seqlens) < 1:
        raise ValueError(f"cu_seqlens must be 1-D with at least one offset, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):  # the kernels' int32 copy would truncate 3.5 to 3
        raise ValueError(f"cu_seqlens must be int32 or int64 offsets, got {cu_seqlens.dtype}")
    if cu_seqlens.device.type != "cpu":
        return
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != rows or any(b < a for a, b in zip(offsets, offsets[1:])):
        shown = offsets if len(offsets) <= 6 else [*offsets[:3], "...", *offsets[-2:]]
        raise ValueError(f"cu_seqlens must rise from 0 to the {rows} rows of qkv, got {shown}")


def varlen_attention(
    qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, heads: int, block: int | None = None,
    seq_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v within each packed sequence: qkv (total, 3D) with rows Q, K, V per token
    and heads as contiguous D/H slices -> (total, D) in qkv's dtype. Differentiable (dqkv).

    `max_seqlen` (host int) only picks the tile size; `block` overrides it (a power of two >= 16).
    `cu_seqlens` is int32 or int64; a host one is checked to cover the rows exactly (the kernels would read past
    it), the values of one already on the device are trusted, as checking them would wait for the device.
    `seq_ids`: row_sequences(cu_seqlens on qkv's device, rows of qkv), when the caller keeps it for many calls.
    """
    if not isinstance(heads, numbers.Integral) or heads < 1:
        raise ValueError(f"heads must be a positive count, got {heads!r}")
    if qkv.dtype not in (torch.float32, torch.bfloat16, torch.float16):  # what the kernels' dot and fp32 softmax keep
        raise ValueError(f"the Triton attention takes float32, bf16 or fp16 heads, got {qkv.dtype}")
    if qkv.dim() != 2 or qkv.shape[1] % (3 * heads):
        raise ValueError(f"qkv must be (total, 3*D) with D divisible by heads={heads}, got {tuple(qkv.shape)}")
    head_dim = qkv.shape[1] // (3 * heads)
    if not 16 <= head_dim <= 128 or head_dim & (head_dim - 1):  # a tile holds whole heads in shared memory
        raise ValueError(f"the Triton attention needs a power-of-two head dim from 16 to 128, got {head_dim}")
    block = block or _tile_size(max_seqlen)
    if block < 16 or block & (block - 1):
        raise ValueError(f"attention tile must be a power of two >= 16, got {block}")
    check_cover(cu_seqlens, qkv.shape[0])
    cu_seqlens = cu_seqlens.to(device=qkv.device, dtype=torch.int32).contiguous()
    if seq_ids is None:
        seq_ids = row_sequences(cu_seqlens, qkv.shape[0])
    elif seq_ids.shape != qkv.shape[:1] or seq_ids.dtype != torch.int32 or seq_ids.device != qkv.device:
        # a kept one of another packing: the kernels would read it past its end
        raise ValueError(f"seq_ids must be int32 of the {qkv.shape[0]} rows of qkv on {qkv.device}, got "
                         f"{seq_ids.dtype} {tuple(seq_ids.shape)} on {seq_ids.device}")
    return _VarlenAttention.apply(qkv.contiguous(), cu_seqlens, seq_ids, heads, block)
