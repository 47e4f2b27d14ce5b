"""Triton kernels for ECHO's ops, one file per op. They import no model code; `echo/ops/` holds the
references and the dispatch."""

import torch
import triton
import triton.language as tl

# Where the launch tables are built before their one copy to the device: the host, whatever torch's default
# device (torch.as_tensor and factories without a device follow a caller's set_default_device).
HOST = torch.device("cpu")


def dot_precision(dtype: torch.dtype) -> str:
    """How a kernel's `dot` multiplies operands of this dtype.

    fp32 mirrors torch's own matmul setting: exact fp32 ("ieee") unless the user allowed TF32
    (`torch.backends.cuda.matmul.allow_tf32`), so a kernel never silently loses digits that the torch path
    it replaces keeps. Half precision uses tensor cores, except bf16 in Triton's interpreter: it multiplies
    bf16 as raw bits, so there the operands are widened to fp32 first ("upcast"), which is exactly what a
    tensor core computes (bf16 products are exact in fp32, accumulation is fp32).
    """
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    if dtype == torch.bfloat16 and INTERPRETED:
        return "upcast"
    return "tf32"  # ignored by tl.dot for half-precision operands


@triton.jit
def dot(a, b, PRECISION: tl.constexpr):
    """tl.dot with fp32 accumulation at the precision chosen by dot_precision."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


# Whether these kernels run in Triton's interpreter (CPU tensors): Triton decides once, when a kernel is defined,
# from TRITON_INTERPRET as it reads it ("1", "true", "on", ...); the variable's value later on no longer matters.
INTERPRETED = not isinstance(dot, triton.runtime.JITFunction)
