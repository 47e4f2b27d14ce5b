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
