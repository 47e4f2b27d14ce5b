"""The memory-bound glue of a post-norm layer in Triton, forward and backward:
LayerNorm(x + residual) and gelu(x + bias) (exact erf form).

Each op reads its inputs once and writes its output once; the backward recomputes what it needs (the
normalised row, the GELU input) instead of saving it, and reduces the parameter gradients in two stages
(per-program partial sums, then one small torch sum) so the result is deterministic, without atomics.
The sum x + residual (x + bias) is rounded to the output dtype before use, as the torch reference's
addition does (a bf16 x with an fp32 bias promotes to fp32, as in torch).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


COMPUTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_computable(**tensors: torch.Tensor) -> None:
    """The kernels compute in fp32 and store in the inputs' dtype: integers would come back truncated, float64
    with fp32 precision; torch's own ops refuse the first and keep the second."""
    for name, tensor in tensors.items():
        if tensor.dtype not in COMPUTED_DTYPES:
            raise ValueError(f"the Triton norms take float32, bfloat16 or float16 tensors; got {name} of {tensor.dtype}")


def _check_width(x: torch.Tensor, **params: torch.Tensor) -> None:
    """Per-feature parameters of x's last axis: the kernels read one value per column, so a shorter one would be
    read past its end."""
    for name, param in params.items():
        if param.shape != x.shape[-1:]:
            raise ValueError(f"{name} {tuple(param.shape)} does not match the last axis of x {tuple(x.shape)}")


@triton.jit
def _residual_sum(x, residual, index, mask, dtype: tl.constexpr):
    """x + residual in fp32, rounded to the output dtype as the reference's addition is (every operand is
    widened first: arithmetic stays fp32, which is also all the Triton interpreter can do with bf16)."""
    summed = tl.load(x + index, mask=mask, other=0.0).to(tl.float32) + tl.load(
        residual + index, mask=mask, other=0.0
    ).to(tl.float32)
    return summed.to(dtype).to(tl.float32)


@triton.jit
def _layer_norm_forward_kernel(
    x, residual, weight, bias, out, mean_out, rstd_out, rows, dim, eps,
    BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # int64 rows: row * dim passes 2^31 at 2.8M tokens of ECHO-base (GELU's row * cols at 699k)
    row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col = tl.arange(0, BLOCK_D)
    col_ok = col < dim
    mask = (row < rows)[:, None] & col_ok[None, :]
    index = row[:, None] * dim + col[None, :]
    h = _residual_sum(x, residual, index, mask, out.dtype.element_ty)
    mean = tl.sum(h, axis=1) / dim
    centred = tl.where(mask, h - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / dim + eps)
    w = tl.load(weight + col, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(bias + col, mask=col_ok, other=0.0).to(tl.float32)
    y = centred * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(out + index, y.to(out.dtype.element_ty), mask=mask)
    tl.store(mean_out + row, mean, mask=row < rows)
    tl.store(rstd_out + row, rstd, mask=row < rows)


@triton.jit
def _layer_norm_backward_kernel(
    grad_out, x, residual, weight, mean_in, rstd_in, grad_in, partial_w, partial_b, rows, dim,
    BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    block = tl.program_id(0).to(tl.int64)  # int64: see the LayerNorm forward
    row = block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col = tl.arange(0, BLOCK_D)
    col_ok = col < dim
    row_ok = row < rows
    mask = row_ok[:, None] & col_ok[None, :]
    index = row[:, None] * dim + col[None, :]
    h = _residual_sum(x, residual, index, mask, grad_in.dtype.element_ty)
    mean = tl.load(mean_in + row, mask=row_ok, other=0.0)
    rstd = tl.load(rstd_in + row, mask=row_ok, other=0.0)
    normed = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
    dy = tl.load(grad_out + index, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(weight + col, mask=col_ok, other=0.0).to(tl.float32)
    d_normed = dy * w[None, :]
    # d/dh of (h - mean) * rstd: project out the row's mean and its component along the normalised row.
    mean_d = tl.sum(d_normed, axis=1) / dim
    mean_d_normed = tl.sum(d_normed * normed, axis=1) / dim
    dh = rstd[:, None] * (d_normed - mean_d[:, None] - normed * mean_d_normed[:, None])
    tl.store(grad_in + index, dh.to(grad_in.dtype.element_ty), mask=mask)
    tl.store(partial_w + block * dim + col, tl.sum(dy * normed, axis=0), mask=col_ok)
    tl.store(partial_b + block * dim + col, tl.sum(dy, axis=0), mask=col_ok)


def _layer_norm_blocks(dim: int) -> tuple[int, int]:
    """Whole rows per program (a row's statistics need all of it), ~4096 elements per tile."""
    block_d = triton.next_power_of_2(dim)
    return max(1, 4096 // block_d), block_d


class _ResidualLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps):
        shape = x.shape
        x, residual = _rows(x), _rows(residual)
        rows, dim = x.shape
        out = torch.empty(rows, dim, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
        mean = torch.empty(rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        block_rows, block_d = _layer_norm_blocks(dim)
        if rows:
            _layer_norm_forward_kernel[(triton.cdiv(rows, block_rows),)](
                x, residual, weight, bias, out, mean, rstd, rows, dim, eps, BLOCK_ROWS=block_rows, BLOCK_D=block_d
            )
        ctx.save_for_backward(x, residual, weight, mean, rstd)
        ctx.shape = shape
        return out.view(shape)

    @staticmethod
    def backward(ctx, grad_out):
        x, residual, weight, mean, rstd = ctx.saved_tensors
        rows, dim = x.shape
        grad_out = _rows(grad_out)
        block_rows, block_d = _layer_norm_blocks(dim)
        blocks = triton.cdiv(rows, block_rows)
        grad_in = torch.empty(rows, dim, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
        partial_w = torch.zeros(max(blocks, 1), dim, dtype=torch.float32, device=x.device)
        partial_b = torch.zeros_like(partial_w)
        if rows:
            _layer_norm_backward_kernel[(blocks,)](
                grad_out, x, residual, weight, mean, rstd, grad_in, partial_w, partial_b, rows, dim,
                BLOCK_ROWS=block_rows, BLOCK_D=block_d,
            )
        grad_in = grad_in.view(ctx.shape)
        grad_w, grad_b = partial_w.sum(0).to(weight.dtype), partial_b.sum(0).to(weight.dtype)
        return grad_in.to(x.dtype), grad_in.to(residual.dtype), grad_w, grad_b, None


def residual_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """LayerNorm(x + residual) over the last axis, in their promoted dtype, as torch's x + residual
    (statistics in fp32). Differentiable."""
    if x.shape != residual.shape:
        raise ValueError(f"x {tuple(x.shape)} and residual {tuple(residual.shape)} must have the same shape")
    _check_computable(x=x, residual=residual)
    _check_width(x, weight=weight, bias=bias)
    return _ResidualLayerNorm.apply(x, residual, weight.contiguous(), bias.contiguous(), eps)


@triton.jit
def _gelu_input(x, bias, index, col, mask, col_ok, dtype: tl.constexpr):
    """The GELU input h = x + bias, rounded to the output dtype as the reference's addition is."""
    summed = (
        tl.load(x + index, mask=mask, other=0.0).to(tl.float32)
        + tl.load(bias + col, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    )
    return summed.to(dtype).to(tl.float32)


@triton.jit
def _bias_gelu_forward_kernel(x, bias, out, rows, cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # int64: see the LayerNorm
    col = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_ok = col < cols
    mask = (row < rows)[:, None] & col_ok[None, :]
    index = row[:, None] * cols + col[None, :]
    h = _gelu_input(x, bias, index, col, mask, col_ok, out.dtype.element_ty)
    y = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    tl.store(out + index, y.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_backward_kernel(
    grad_out, x, bias, grad_in, partial_b, rows, cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr
):
    block = tl.program_id(0).to(tl.int64)  # int64: see the LayerNorm forward
    row = block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_ok = col < cols
    mask = (row < rows)[:, None] & col_ok[None, :]
    index = row[:, None] * cols + col[None, :]
    h = _gelu_input(x, bias, index, col, mask, col_ok, grad_out.dtype.element_ty)
    # gelu'(h) = Phi(h) + h * phi(h): the normal CDF plus h times the normal density.
    slope = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476)) + h * tl.exp(-0.5 * h * h) * 0.3989422804014327
    dh = tl.load(grad_out + index, mask=mask, other=0.0).to(tl.float32) * slope
    dh = tl.where(mask, dh, 0.0)
    tl.store(grad_in + index, dh.to(grad_in.dtype.element_ty), mask=mask)
    tl.store(partial_b + block * cols + col, tl.sum(dh, axis=0), mask=col_ok)


_GELU_BLOCK_ROWS, _GELU_BLOCK_COLS = 16, 128


class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias):
        shape = x.shape
        x = _rows(x)
        rows, cols = x.shape
        out = torch.empty(rows, cols, dtype=torch.promote_types(x.dtype, bias.dtype), device=x.device)
        if rows:
            grid = (triton.cdiv(rows, _GELU_BLOCK_ROWS), triton.cdiv(cols, _GELU_BLOCK_COLS))
            _bias_gelu_forward_kernel[grid](
                x, bias, out, rows, cols, BLOCK_ROWS=_GELU_BLOCK_ROWS, BLOCK_COLS=_GELU_BLOCK_COLS
            )
        ctx.save_for_backward(x, bias)
        ctx.shape = shape
        return out.view(shape)

    @staticmethod
    def backward(ctx, grad_out):
        x, bias = ctx.saved_tensors
        rows, cols = x.shape
        grad_out = _rows(grad_out)
        grid = (triton.cdiv(rows, _GELU_BLOCK_ROWS), triton.cdiv(cols, _GELU_BLOCK_COLS))
        grad_in = torch.empty_like(x)
        partial_b = torch.zeros(max(grid[0], 1), cols, dtype=torch.float32, device=x.device)
        if rows:
            _bias_gelu_backward_kernel[grid](
                grad_out, x, bias, grad_in, partial_b, rows, cols,
                BLOCK_ROWS=_GELU_BLOCK_ROWS, BLOCK_COLS=_GELU_BLOCK_COLS,
            )
        return grad_in.view(ctx.shape), partial_b.sum(0).to(bias.dtype)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(x + bias), exact erf form, over the last axis; in the promoted dtype of x and bias, as torch's
    x + bias. Differentiable."""
    _check_computable(x=x, bias=bias)
    _check_width(x, bias=bias)
    return _BiasGelu.apply(x, bias.contiguous())
