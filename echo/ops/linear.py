"""The encoder's bf16 matrix products on the CPU through oneDNN, with weights packed once and GELU fused.

torch's eager bf16 `F.linear` re-lays out the weight for oneDNN at every call and GELU then reads the whole
hidden layer back from memory. Packing each weight once (for inference: the packed copy has no autograd) and
running GELU (exact erf) on the product's accumulators made a bf16 encode of ECHO-small 1.1-1.2x faster on
this AVX-512/AMX CPU in an in-process A/B (bench/RESULTS.md; per op: bench/cpu_inference_ops.py). These are
torch's own (private) oneDNN ops, the ones inductor emits when it freezes a CPU model; `available()` checks
that this torch build has them and that the CPU runs bf16, and everything else uses F.linear.
"""
from __future__ import annotations

import functools

import torch

# Rows per product the packed layout is tuned for: fast.encode's CPU pass size (any row count runs).
PACKING_ROWS = 4096


@functools.cache
def available() -> bool:
    """Whether this torch build has oneDNN's packed linear ops and the CPU runs them in bf16."""
    mkldnn = torch.ops.mkldnn
    try:
        return (
            torch.backends.mkldnn.is_available()
            and hasattr(mkldnn, "_linear_pointwise")
            and hasattr(mkldnn, "_reorder_linear_weight")
            and bool(mkldnn._is_mkldnn_bf16_supported())
        )
    except (AttributeError, RuntimeError):
        return False


class PackedLinear:
    """x W^T + b in bf16 with W in oneDNN's packed layout; `gelu=True` applies exact GELU in the same op."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        weight = weight.detach().to(torch.bfloat16)
        self.bias = bias.detach().to(torch.bfloat16)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, PACKING_ROWS)

    def __call__(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        x = x.to(torch.bfloat16)
        if gelu:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "gelu", [], "none")
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
