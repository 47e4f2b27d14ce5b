"""Triton kernels for ECHO's ops, one file per op. They import no model code; `echo/ops/` holds the
references and the dispatch."""

import torch


def dot_precision(dtype: torch.dtype) -> str:
    """Precision of fp32 `tl.dot`s, mirroring torch's own matmul setting: exact fp32 ("ieee") unless the
    user allowed TF32 (`torch.backends.cuda.matmul.allow_tf32`), so a kernel never silently loses digits
    that the torch path it replaces keeps. Half-precision inputs always use tensor cores."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"
