"""The memory-bound glue of a post-norm layer: residual-add + LayerNorm, and bias + GELU (erf)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def residual_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """LayerNorm(x + residual) over the last axis."""
    return F.layer_norm(x + residual, (x.shape[-1],), weight, bias, eps)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(x + bias), exact erf form."""
    return F.gelu(x + bias)


def available_backends(device: torch.device) -> tuple[str, ...]:
    """The norms' backends, in order of preference; "torch" (so ECHO_BACKEND=torch forces every op) is the
    reference: torch's own kernels. "csrc", where built, is the compiled norm of CPU inference
    (residual_layer_norm_inference, run by echo.packed); elsewhere (autograd) it means torch's kernels."""
    from .. import extension

    return ("triton", *(("csrc",) if extension.has_op("residual_layer_norm", device) else ()), "torch", "reference")


def _backend(device: torch.device, requested: str | None) -> str:
    from . import backend as backends

    return backends.choose("norm", device, requested, available=available_backends(device))


def fused_residual_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
    backend: str | None = None,
) -> torch.Tensor:
    """Dispatch of residual_layer_norm: the fused Triton kernel (forward + backward) or the reference."""
    if _backend(x.device, backend) == "triton":
        from echo_kernels import norm as kernel

        return kernel.residual_layer_norm(x, residual, weight, bias, eps)
    return residual_layer_norm(x, residual, weight, bias, eps)


def fused_linear_gelu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, backend: str | None = None
) -> torch.Tensor:
    """gelu(x W^T + b) (erf): on Triton the bias add is fused into the GELU kernel (forward + backward);
    otherwise torch adds the bias inside the matrix product, then applies GELU."""
    if _backend(x.device, backend) == "triton":
        from echo_kernels import norm as kernel

        return kernel.bias_gelu(F.linear(x, weight), bias)
    return F.gelu(F.linear(x, weight, bias))


def residual_layer_norm_inference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, bf16_copy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """LayerNorm(x + residual) for inference, and with `bf16_copy` its bf16 copy, which a bf16 product reads
    next: the compiled op (csrc/norm.cpp) does the add, the norm and the cast in one pass over memory, ~1.7-2x
    faster than torch's passes (bench/cpu_inference_ops.py); without it, torch's norm (then a cast)."""
    from .. import extension

    if x.dtype == torch.float32 and residual.dtype in (torch.float32, torch.bfloat16) and extension.has_op(
        "residual_layer_norm", x.device
    ):
        out, low = torch.ops.echo.residual_layer_norm(x.contiguous(), residual.contiguous(), weight, bias, eps, bf16_copy)
        return out, low if bf16_copy else None
    out = residual_layer_norm(x, residual, weight, bias, eps)
    return out, out.to(torch.bfloat16) if bf16_copy else None
