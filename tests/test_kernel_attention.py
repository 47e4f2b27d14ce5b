"""The Triton varlen attention (echo_kernels/attention.py), forward and backward, against the reference."""
import math
import os

import pytest
import torch

from echo.ops import attention as attention_ops
from echo.packed import Packing

from conftest import assert_flash_rule, rel_err

pytest.importorskip("triton")
from echo_kernels import attention as kernel  # noqa: E402  (after the interpreter is chosen in conftest)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HEADS, DIM = 2, 128  # head dim 64, as ECHO's


def packed(lengths, dtype=torch.float64):
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    qkv = torch.randn(int(cu_seqlens[-1]), 3 * DIM, dtype=torch.float64).to(dtype)
    return qkv, cu_seqlens


def run(qkv, cu_seqlens, grad, block=None):
    """Kernel output and dqkv on the test device."""
    qkv = qkv.to(DEVICE).requires_grad_()
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if len(cu_seqlens) > 1 else 0
    out = kernel.varlen_attention(qkv, cu_seqlens.to(DEVICE), max_seqlen, HEADS, block=block)
    (dqkv,) = torch.autograd.grad(out, qkv, grad.to(DEVICE, qkv.dtype))
    return out.detach().cpu(), dqkv.cpu()


def reference(qkv, cu_seqlens, grad):
    qkv = qkv.clone().requires_grad_()
    out = attention_ops.varlen_attention(qkv, cu_seqlens, HEADS)
    (dqkv,) = torch.autograd.grad(out, qkv, grad.to(qkv.dtype))
    return out.detach(), dqkv


# With 16-row tiles: lengths 1 and 2, one tile exactly, one tile + 1, several tiles (online softmax
# rescaling), and a random mix; sequences straddle tile boundaries everywhere.
EDGE_LENGTHS = [1, 2, 16, 17, 3, 40]


@pytest.mark.parametrize("block", [16, None])
def test_forward_and_backward_fp32(block, poisoned_empty):
    lengths = EDGE_LENGTHS + torch.randint(1, 20, (3,)).tolist()
    qkv, cu_seqlens = packed(lengths)
    grad = torch.randn(qkv.shape[0], DIM, dtype=torch.float64)
    out, dqkv = run(qkv.float(), cu_seqlens, grad.float(), block)
    ref_out, ref_dqkv = reference(qkv, cu_seqlens, grad)
    assert not out.isnan().any() and not dqkv.isnan().any()
    assert rel_err(out, ref_out) < 1e-5
    assert rel_err(dqkv, ref_dqkv) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_flash_rule(dtype, poisoned_empty):
    """Outputs within 2x, gradients within 3x the error of the torch computation in the same dtype."""
    qkv, cu_seqlens = packed(EDGE_LENGTHS, dtype)
    grad = torch.randn(qkv.shape[0], DIM).to(dtype)
    out, dqkv = run(qkv, cu_seqlens, grad, block=16)
    exact_out, exact_dqkv = reference(qkv.double(), cu_seqlens, grad.double())
    low_out, low_dqkv = reference(qkv, cu_seqlens, grad)
    assert out.dtype == dtype and dqkv.dtype == dtype
    assert_flash_rule(out, low_out, exact_out, 2)
    assert_flash_rule(dqkv, low_dqkv, exact_dqkv, 3)


def test_dispatch_through_packing():
    lengths = torch.randint(1, 30, (4,))
    qkv, _ = packed(lengths.tolist(), torch.float32)
    packing = Packing.from_lengths(lengths)
    got = attention_ops.packed_attention(qkv.to(DEVICE), packing, HEADS, backend="triton")
    ref = attention_ops.varlen_attention(qkv, packing.cu_seqlens, HEADS)
    assert rel_err(got.cpu(), ref) < 1e-5


def test_empty_batch():
    qkv, cu_seqlens = packed([], torch.float32)
    out, dqkv = run(qkv, cu_seqlens, torch.empty(0, DIM))
    assert out.shape == (0, DIM) and dqkv.shape == (0, 3 * DIM)


@pytest.mark.parametrize("head_dim", [8, 48, 256])
def test_rejects_unsupported_head_dim(head_dim):
    """Past 128, a tile's whole heads (q, k and v, 64 rows each) outgrow a GPU's shared memory."""
    qkv = torch.randn(5, 3 * 2 * head_dim, device=DEVICE)
    with pytest.raises(ValueError, match=f"power-of-two head dim from 16 to 128, got {head_dim}"):
        kernel.varlen_attention(qkv, torch.tensor([0, 5], dtype=torch.int32), 5, heads=2)
    assert "triton" in attention_ops.unfit_backends(head_dim, torch.float32)  # never the default for them


def test_strided_cu_seqlens():
    """Sequence bounds given as a strided int32 view are read as their values, not as the base's."""
    qkv, cu_seqlens = packed([3, 20, 1], torch.float32)
    strided = torch.stack([cu_seqlens, torch.full_like(cu_seqlens, 7)], dim=1).reshape(-1)[::2]
    assert not strided.is_contiguous() and torch.equal(strided, cu_seqlens)
    got = kernel.varlen_attention(qkv.to(DEVICE), strided.to(DEVICE), 20, HEADS)
    assert rel_err(got.cpu(), attention_ops.varlen_attention(qkv.double(), cu_seqlens, HEADS)) < 1e-5


def test_bf16_whatever_the_interpreter_setting_reads_now(monkeypatch):
    """How bf16 operands are multiplied follows what Triton chose when the kernels were defined. Triton also
    takes TRITON_INTERPRET=true; the kernels checked for "1" at each launch and then fed the interpreter's
    dot raw bf16 bits (relative error 1e9)."""
    monkeypatch.setenv("TRITON_INTERPRET", "true" if os.environ.get("TRITON_INTERPRET") == "1" else "0")
    qkv, cu_seqlens = packed([5, 30], torch.bfloat16)
    out = kernel.varlen_attention(qkv.to(DEVICE), cu_seqlens.to(DEVICE), 30, HEADS).cpu()
    exact = attention_ops.varlen_attention(qkv.double(), cu_seqlens, HEADS)
    assert_flash_rule(out, attention_ops.varlen_attention(qkv, cu_seqlens, HEADS), exact, 2)


@pytest.mark.parametrize("offsets", [[0, 3, 5], [0, 3, 9], [1, 3, 7], [0, 5, 3, 7]],
                         ids=["short-of-the-rows", "past-the-rows", "not-from-zero", "falling"])
def test_cu_seqlens_that_do_not_cover_the_rows_exactly_are_refused(offsets):
    """The kernels read cu_seqlens at each row's sequence id: rows past its end read out of bounds."""
    qkv = torch.randn(7, 3 * DIM)
    with pytest.raises(ValueError, match=r"cu_seqlens must rise from 0 to the 7 rows of qkv"):
        kernel.varlen_attention(qkv, torch.tensor(offsets, dtype=torch.int32), 4, HEADS)


@pytest.mark.parametrize("offsets", [[0, 3.5, 7], [0, 3, 7], [0, 3, 9]],
                         ids=["fractional", "whole", "past-the-rows"])
def test_float_cu_seqlens_are_refused(offsets):
    """The kernels' int32 copy truncated them: [0, 3.5, 7] ran as [0, 3, 7], with no word. The dtype is said
    first, on any device, before the offsets are read."""
    qkv = torch.randn(7, 3 * DIM, device=DEVICE)
    with pytest.raises(ValueError, match="cu_seqlens must be int32 or int64 offsets, got torch.float32"):
        kernel.varlen_attention(qkv, torch.tensor(offsets, dtype=torch.float32, device=DEVICE), 4, HEADS)


@pytest.mark.parametrize("heads", [0, -2, 2.0])
def test_heads_that_are_not_positive_are_refused(heads):
    """heads=0 raised ZeroDivisionError; a negative count was reported as a negative head dim, heads=2.0 as a
    float that has no '&'."""
    qkv, cu_seqlens = packed([3, 4], torch.float32)
    with pytest.raises(ValueError, match=f"heads must be a positive count, got {heads}"):
        kernel.varlen_attention(qkv.to(DEVICE), cu_seqlens, 4, heads)


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64])
def test_dtypes_the_kernel_does_not_take_are_refused(dtype):
    """Integer qkv failed deep in Triton ('Unsupported lhs dtype int32'); float64 ran at float32 precision. The
    dispatch already keeps both off the Triton backend; a direct call now says the same."""
    qkv, cu_seqlens = packed([3, 4], torch.float32)
    with pytest.raises(ValueError, match=f"float32, bf16 or fp16 heads, got {dtype}"):
        kernel.varlen_attention((qkv * 4).to(DEVICE, dtype), cu_seqlens, 4, HEADS)


def test_seq_ids_of_other_rows_are_refused():
    """A kept seq_ids of another packing (fewer rows) was read past its end: a plausible but wrong result."""
    qkv, cu_seqlens = packed([3, 4], torch.float32)
    stale = kernel.row_sequences(torch.tensor([0, 3], dtype=torch.int32, device=DEVICE), 3)
    with pytest.raises(ValueError, match=r"seq_ids must be int32 of the 7 rows of qkv on (cpu|cuda)"):
        kernel.varlen_attention(qkv.to(DEVICE), cu_seqlens, 4, HEADS, seq_ids=stale)


def test_rows_past_two_to_the_31_values_are_addressed_in_int64():
    """A pass of ~1M tokens of ECHO-base (max_tokens=2**20 on a large GPU) puts qkv rows past 2^31 values, where
    row * 3D in int32 wrapped to before the buffer. One tile of head 0 of a qkv so wide that its last row starts
    there, in an untouched allocation 2^31 values past its start (what a wrapped offset read, not a crash)."""
    rows, head_dim = 16, 16
    dim = -(-(2**31 // (3 * (rows - 1)) + 1) // head_dim) * head_dim  # only the last row's offsets pass 2^31
    try:
        qkv = torch.empty(2**31 + rows * 3 * dim, dtype=torch.float16, device=DEVICE)[2**31:].view(rows, 3 * dim)
        out = torch.empty(rows, dim, dtype=torch.float16, device=DEVICE)
    except RuntimeError:  # torch.OutOfMemoryError included: a machine that refuses even untouched memory
        pytest.skip("no room for a 9 GB allocation")
    heads = torch.randn(3, rows, head_dim).to(torch.float16)
    for i, part in enumerate(heads):
        qkv[:, i * dim : i * dim + head_dim] = part.to(DEVICE)
    lse = torch.empty(1, rows, device=DEVICE)
    seq_ids = torch.zeros(rows, dtype=torch.int32, device=DEVICE)
    cu_seqlens = torch.tensor([0, rows], dtype=torch.int32, device=DEVICE)
    kernel._forward_kernel[(1, 1)](  # head 0 alone: the width's other heads would be millions of programs
        qkv, out, lse, seq_ids, cu_seqlens, rows, dim, head_dim**-0.5 * math.log2(math.e),
        HEAD_DIM=head_dim, BLOCK_M=rows, BLOCK_N=rows, PRECISION=kernel.dot_precision(torch.float16),
    )
    q, k, v = heads.double()
    expected = torch.softmax(q @ k.T * head_dim**-0.5, -1) @ v
    assert (out[:, :head_dim].cpu().double() - expected).abs().max() < 1e-2
