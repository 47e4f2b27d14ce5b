"""Varlen attention on the packed sequences of W1 / W2, ECHO-small (D = 384, 6 heads of 64), forward and
forward + backward: Triton row-tiled varlen vs SDPA grouped by length vs SDPA padded to the longest
sequence (with the pad/unpad copies) vs flash-attn varlen and torch's varlen_attn when installed.

    pytest bench/benchmark_attention.py --benchmark-only -s
"""
import pytest
import torch
import torch.nn.functional as F

from echo.ops import attention as attention_ops
from echo.packed import Packing

from .conftest import NO_GPU, workload

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
DIM, HEADS = 384, 6


def costs(lengths: torch.Tensor, itemsize: int, backward: bool) -> tuple[float, float]:
    """Forward: read qkv, write out; 4 L^2 D FLOPs per sequence (scores and weighted sum). The backward adds
    reading qkv, out and dout and writing dqkv, and 2.5x the forward FLOPs (five products instead of two)."""
    total = int(lengths.sum())
    flops = float((4 * lengths.double() ** 2 * DIM).sum())
    if not backward:
        return itemsize * total * 4 * DIM, flops
    return itemsize * total * (4 * DIM + 8 * DIM), 3.5 * flops


def sequence_lengths(name: str) -> torch.Tensor:
    from echo.plan import make_plan

    signals, rates = workload(name)
    return make_plan([len(s) for s in signals], rates).seq_patches + 1


def padded_attention(qkv, index, valid):
    """SDPA over every sequence padded to the longest (padding keys masked), then unpadded."""
    q, k, v = attention_ops.split_heads(qkv[index], HEADS)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
    return attention_ops.merge_heads(out)[valid]


def implementations(packing: Packing, lengths: torch.Tensor):
    from echo_kernels import attention as kernel

    longest = int(lengths.max())
    starts = packing.cu_seqlens[:-1].long()
    offsets = torch.arange(longest, device="cuda")
    valid = offsets[None, :] < lengths.cuda()[:, None]
    index = torch.where(valid, starts[:, None] + offsets[None, :], 0)
    found = {
        "triton": lambda qkv: kernel.varlen_attention(qkv, packing.cu_seqlens, packing.max_seqlen, HEADS),
        "sdpa-grouped": lambda qkv: attention_ops.grouped_attention(qkv, packing.groups, HEADS),
        "sdpa-padded": lambda qkv: padded_attention(qkv, index, valid),
    }
    try:
        from flash_attn import flash_attn_varlen_qkvpacked_func

        found["flash-attn-varlen"] = lambda qkv: flash_attn_varlen_qkvpacked_func(
            qkv.view(-1, 3, HEADS, DIM // HEADS), packing.cu_seqlens, packing.max_seqlen
        ).flatten(1)
    except ImportError:
        pass
    try:
        from torch.nn.attention.varlen import varlen_attn

        def torch_varlen(qkv):
            q, k, v = qkv.view(-1, 3, HEADS, DIM // HEADS).unbind(1)
            cu = packing.cu_seqlens
            return varlen_attn(q, k, v, cu, cu, packing.max_seqlen, packing.max_seqlen).flatten(1)

        found["torch-varlen-attn"] = torch_varlen
    except ImportError:
        pass
    return found


@pytest.mark.parametrize("workload_name", ["W1", "W2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize(
    "impl", ["triton", "sdpa-grouped", "sdpa-padded", "flash-attn-varlen", "torch-varlen-attn"]
)
def test_varlen_attention(benchmark, measure, workload_name, dtype, backward, impl):
    lengths = sequence_lengths(workload_name)
    packing = Packing.from_lengths(lengths, device="cuda")
    found = implementations(packing, lengths)
    if impl not in found:
        pytest.skip(f"{impl} is not installed")
    qkv = torch.randn(packing.total_tokens, 3 * DIM, device="cuda").to(dtype).requires_grad_(backward)
    grad = torch.randn(packing.total_tokens, DIM, device="cuda").to(dtype)
    attend = found[impl]
    try:
        attend(qkv)  # some library kernels take half precision only
    except RuntimeError as error:
        pytest.skip(f"{impl} does not run {dtype}: {str(error)[:120]}")

    def step():
        out = attend(qkv)
        if backward:
            torch.autograd.grad(out, qkv, grad)

    benchmark.group = f"attention {workload_name} {dtype} {'fwd+bwd' if backward else 'fwd'}"
    bytes_moved, flops = costs(lengths, qkv.element_size(), backward)
    measure(step, bytes_moved, flops, dtype,
            label=f"attention {workload_name} {str(dtype)[6:]} {'fwd+bwd' if backward else 'fwd'} {impl}")
