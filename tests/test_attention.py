import pytest
import torch

from echo.ops import attention as attention_ops
from echo.packed import Packing

from conftest import rel_err


def per_sequence_float64(qkv, cu_seqlens, heads):
    """softmax(q k^T / sqrt(d)) v of each sequence on its own, in float64, written from the spec."""
    dim = qkv.shape[1] // 3
    out = torch.empty(qkv.shape[0], dim, dtype=torch.float64)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        x = qkv[start:end].double()
        for h in range(heads):
            cols = slice(h * dim // heads, (h + 1) * dim // heads)
            q, k, v = x[:, :dim][:, cols], x[:, dim : 2 * dim][:, cols], x[:, 2 * dim :][:, cols]
            out[start:end, cols] = torch.softmax(q @ k.T / (dim // heads) ** 0.5, dim=-1) @ v
    return out


def test_grouped_attention_slices_and_gathers():
    """Random order of lengths (gathered groups) and lengths sorted (slices) both equal the float64 truth."""
    lengths = torch.randint(1, 40, (int(torch.randint(20, 60, ())),))
    for order in (lengths, lengths.sort().values):
        packing = Packing.from_lengths(order)
        qkv = torch.randn(packing.total_tokens, 3 * 128)
        truth = per_sequence_float64(qkv, packing.cu_seqlens, heads=2)
        assert rel_err(attention_ops.grouped_attention(qkv, packing.groups, 2), truth) < 1e-5
        assert rel_err(attention_ops.varlen_attention(qkv, packing.cu_seqlens, 2), truth) < 1e-5
    assert all(isinstance(rows, slice) for rows in Packing.from_lengths(lengths.sort().values).groups.values())


def test_leading_sequences_up_to_a_length_include_that_length():
    """leading_up_to(t): the leading sequences of at most t tokens (a kernel's limit is inclusive), counted by hand."""
    lengths = torch.randint(1, 40, (int(torch.randint(20, 60, ())),)).sort().values
    packing = Packing.from_lengths(lengths)
    for tokens in {0, *lengths.tolist(), 40}:
        fits = [int(n) for n in lengths if n <= tokens]
        rows, bounds = packing.leading_up_to(tokens)
        assert rows == sum(fits)
        assert bounds.tolist() == [sum(fits[:i]) for i in range(len(fits) + 1)]


def test_first_token_attention_equals_the_cls_rows():
    """One query per sequence, for slices and gathered groups alike, equals the first row of each sequence."""
    lengths = torch.randint(1, 40, (int(torch.randint(20, 60, ())),))
    for order in (lengths, lengths.sort().values):
        packing = Packing.from_lengths(order)
        qkv = torch.randn(packing.total_tokens, 3 * 128)
        truth = per_sequence_float64(qkv, packing.cu_seqlens, heads=2)[packing.cu_seqlens[:-1].long()]
        assert rel_err(attention_ops.first_token_attention(qkv, packing, 2), truth) < 1e-5


def test_every_backend_takes_a_strided_qkv():
    """A column slice of a wider buffer: the default (compiled on CPU where built) equals the torch path."""
    packing = Packing.from_lengths(torch.tensor([3, 9, 30, 126]))
    qkv = torch.randn(packing.total_tokens, 3 * 2 * 64 + 8)[:, 4:4 + 3 * 2 * 64]
    expected = attention_ops.packed_attention(qkv.contiguous(), packing, 2, backend="reference")
    for backend in (None, "torch"):
        assert rel_err(attention_ops.packed_attention(qkv, packing, 2, backend=backend), expected) < 1e-5


def test_triton_is_offered_only_for_head_dims_and_dtypes_its_kernel_takes(monkeypatch):
    """A custom config's 48-dim heads (or a float64 model) made the Triton kernel, CUDA's default, refuse the
    call instead of the dispatch choosing another backend."""
    from echo.ops import backend as backends

    offered, choose = [], backends.choose

    def recording(op, device, requested=None, available=backends.BACKENDS):
        offered.append(available)
        return choose(op, device, requested, available)

    monkeypatch.setattr(backends, "choose", recording)
    packing = Packing.from_lengths(torch.tensor([5, 17]))
    for heads, dim, dtype, takes in ((4, 192, torch.float32, False), (3, 192, torch.float32, True),
                                     (3, 192, torch.float64, False)):
        qkv = torch.randn(packing.total_tokens, 3 * dim, dtype=dtype)
        truth = per_sequence_float64(qkv, packing.cu_seqlens, heads)
        assert rel_err(attention_ops.packed_attention(qkv, packing, heads), truth) < 1e-5
        assert ("triton" in offered[-1]) == takes, (heads, dtype)


def test_a_forced_triton_attention_says_why_it_cannot_take_the_heads():
    import pytest

    from echo.ops.backend import BackendError

    packing = Packing.from_lengths(torch.tensor([5, 17]))
    for heads, dtype in ((4, torch.float32), (3, torch.float64)):
        qkv = torch.randn(packing.total_tokens, 3 * 192, dtype=dtype)
        with pytest.raises(BackendError, match=f"got {dtype} heads of dim {192 // heads}"):
            attention_ops.packed_attention(qkv, packing, heads, backend="triton")


def test_a_forced_backend_names_the_setting_and_why_it_cannot_take_the_heads(monkeypatch):
    """A custom config's heads (dim 40, 5 heads: dim 8) under ECHO_BACKEND_ATTENTION=csrc were refused as if
    attention had no compiled backend ("it has torch, reference"), though it is built and the heads were the
    reason; the Triton refusal did not name the setting that asked for it."""
    import pytest

    from echo import extension
    from echo.ops import backend as backends

    packing = Packing.from_lengths(torch.tensor([5, 17]))
    qkv = torch.randn(packing.total_tokens, 3 * 40)
    forced = [name for name, runs in (("csrc", extension.has_op("short_attention", "cpu")),
                                      ("triton", backends.triton_available(qkv.device))) if runs]
    for name in forced:
        with pytest.raises(backends.BackendError, match=f"^backend='{name}': .*got torch.float32 heads of dim 8$"):
            attention_ops.packed_attention(qkv, packing, 5, backend=name)
        monkeypatch.setenv("ECHO_BACKEND_ATTENTION", name)
        with pytest.raises(backends.BackendError, match=f"^ECHO_BACKEND_ATTENTION={name}: .*heads of dim 8$"):
            attention_ops.packed_attention(qkv, packing, 5)
        monkeypatch.delenv("ECHO_BACKEND_ATTENTION")
    if "csrc" in forced:
        with pytest.raises(backends.BackendError, match="heads of dim 64 that need gradients$"):
            attention_ops.packed_attention(torch.randn(22, 3 * 128, requires_grad=True), packing, 2, backend="csrc")


@pytest.mark.parametrize("heads", [0, -2, 2.0, 5, 3])
def test_heads_that_are_not_a_positive_count_dividing_the_width_are_refused(heads):
    """heads=0 raised ZeroDivisionError, a count that does not divide the width a reshape error in a backend.
    heads=3 divides 3*D = 384 but not D = 128: each head must be a whole slice of D, not of the packed rows."""
    packing = Packing.from_lengths(torch.tensor([5, 17]))
    qkv = torch.randn(packing.total_tokens, 3 * 128)
    message = f"D divisible by heads={heads}" if heads in (3, 5) else f"heads must be a positive count, got {heads}"
    with pytest.raises(ValueError, match=message):
        attention_ops.packed_attention(qkv, packing, heads)


@pytest.mark.parametrize("lengths, message", [
    (torch.tensor([5, 0, 17]), "lengths must be >= 1, got 0"),
    (torch.tensor([5, -3]), "lengths must be >= 1, got -3"),
    (torch.tensor([5.7, 17.0]), "lengths must be integers, got torch.float32"),
    (torch.tensor([True, True]), "lengths must be integers, got torch.bool"),
    (torch.tensor([[5, 17]]), r"lengths must be 1-D \(one per sequence\), got shape \(1, 2\)"),
    (torch.tensor(5), r"lengths must be 1-D \(one per sequence\), got shape \(\)"),
])
def test_lengths_that_are_no_sequence_lengths_are_refused(lengths, message):
    """They made a packing silently (5.7 cut to 5; a 0 or negative length a sequence of no rows or one overlapping
    the next, whose first row is another sequence's), or failed deep inside on the shape (2-D, 0-D)."""
    with pytest.raises(ValueError, match=f"^Packing {message}"):
        Packing.from_lengths(lengths)
