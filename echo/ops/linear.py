"""The encoder's matrix products for inference on the CPU through oneDNN, weights packed once, GELU fused.

torch's eager bf16 `F.linear` re-lays out the weight for oneDNN at every call, and GELU then reads the whole
hidden layer back from memory. Packing each weight once (for inference: the packed copy has no autograd) and
running GELU (exact erf) on the product's accumulators made an encode of ECHO-small 1.1-1.2x faster in bf16
and 1.1-1.3x in float32 on this AVX-512/AMX CPU in in-process A/Bs (bench/RESULTS.md; per op:
bench/cpu_inference_ops.py). These are torch's own (private) oneDNN ops, the ones inductor emits when it
freezes a CPU model; `available(dtype)` checks that this torch build has them (and, for bf16, that the CPU
runs bf16), and everything else uses F.linear.
"""
from __future__ import annotations

import functools

import torch

# Rows per product the packed layout is tuned for: fast.encode's CPU pass size (any row count runs).
PACKING_ROWS = 4096


@functools.cache
def available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether this torch build has oneDNN's packed linear ops and the CPU runs them in `dtype` (float32 or
    bfloat16)."""
    if dtype not in (torch.float32, torch.bfloat16):
        return False
    mkldnn = torch.ops.mkldnn
    try:
        return (
            torch.backends.mkldnn.is_available()
            and hasattr(mkldnn, "_linear_pointwise")
            and hasattr(mkldnn, "_reorder_linear_weight")
            and (dtype == torch.float32 or bool(mkldnn._is_mkldnn_bf16_supported()))
        )
    except (AttributeError, RuntimeError):
        return False


class PackedLinear:
    """x W^T + b in `dtype` (bf16 or float32) with W in oneDNN's packed layout; `gelu=True` applies exact GELU
    in the same op."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype = torch.bfloat16):
        self.dtype = dtype
        self.bias = bias.detach().to(dtype)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype), PACKING_ROWS)

    def __call__(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        """Any input dtype is cast to the layer's. An input of another width is refused here: oneDNN's own
        refusal ("could not create a primitive descriptor") names neither width."""
        if x.shape[-1:] != self.weight.shape[1:]:  # the packed weight keeps its (out, in) shape
            raise ValueError(f"PackedLinear takes inputs of width {self.weight.shape[1]}, got {tuple(x.shape)}")
        x = x.to(self.dtype)
        if gelu:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "gelu", [], "none")
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
