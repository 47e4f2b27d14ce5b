"""The Triton residual + LayerNorm and bias + GELU (echo_kernels/norm.py), forward and backward, against
autograd of the references."""
import pytest
import torch
import torch.nn.functional as F

from echo.ops import norm as norm_ops

from conftest import assert_flash_rule, rel_err

pytest.importorskip("triton")
from echo_kernels import norm as kernel  # noqa: E402  (after the interpreter is chosen in conftest)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def grads(fn, inputs, grad):
    """fn(*inputs) and the gradients of <fn(*inputs), grad> for every input, computed on `inputs`' device."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves, grad.to(out.dtype))


def layer_norm_inputs(rows, dim, dtype=torch.float32):
    x, residual = torch.randn(rows, dim), torch.randn(rows, dim) * 2 + 0.5
    weight, bias = torch.rand(dim) + 0.5, torch.randn(dim) * 0.1
    return [x.to(dtype), residual.to(dtype), weight, bias]


def kernel_layer_norm(x, residual, weight, bias):
    return norm_ops.fused_residual_layer_norm(x, residual, weight, bias, 1e-6, backend="triton")


def reference_layer_norm(x, residual, weight, bias):
    return norm_ops.residual_layer_norm(x, residual, weight, bias, 1e-6)


def on_device(tensors):
    return [t.to(DEVICE) for t in tensors]


# 96 and 192 are not powers of two (masked columns); 1 and 37 rows leave a partial row block
@pytest.mark.parametrize("rows, dim", [(37, 96), (1, 192), (int(torch.randint(2, 60, ())), 64)])
def test_residual_layer_norm_fp32(rows, dim, poisoned_empty):
    inputs = layer_norm_inputs(rows, dim)
    grad = torch.randn(rows, dim)
    out, got = grads(kernel_layer_norm, on_device(inputs), grad.to(DEVICE))
    ref, expected = grads(reference_layer_norm, [t.double() for t in inputs], grad.double())
    assert not out.isnan().any() and rel_err(out.cpu(), ref) < 1e-5
    for name, g, e in zip(["x", "residual", "weight", "bias"], got, expected):
        assert not g.isnan().any() and rel_err(g.cpu(), e) < 1e-5, name


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_the_dispatch_hands_its_eps_to_the_backend(backend, poisoned_empty):
    """fused_residual_layer_norm passes its eps on to the backend it runs. Inputs of variance ~1e-6, where eps 1e-6
    and torch's default 1e-5 give outputs ~2x apart (at unit variance ~4e-6, under the tolerance above), against
    LayerNorm written out in float64."""
    rows, dim = int(torch.randint(1, 40, ())), 96
    x, residual = torch.randn(rows, dim) * 1e-3, torch.randn(rows, dim) * 1e-3
    weight, bias = torch.rand(dim) + 0.5, torch.randn(dim) * 0.1
    v = (x + residual).double()
    normed = (v - v.mean(-1, keepdim=True)) / torch.sqrt(v.var(-1, unbiased=False, keepdim=True) + 1e-6)
    out = norm_ops.fused_residual_layer_norm(*on_device([x, residual, weight, bias]), 1e-6, backend=backend)
    assert rel_err(out.cpu(), normed * weight.double() + bias.double()) < 1e-5  # eps 1e-5: ~0.5


@pytest.mark.parametrize("rows, cols", [(37, 200), (1, 64), (int(torch.randint(2, 60, ())), 384)])
def test_bias_gelu_fp32(rows, cols, poisoned_empty):
    inputs = [torch.randn(rows, 32), torch.randn(cols, 32) * 0.3, torch.randn(cols)]
    grad = torch.randn(rows, cols)
    out, got = grads(lambda *t: norm_ops.fused_linear_gelu(*t, backend="triton"), on_device(inputs), grad.to(DEVICE))
    ref, expected = grads(lambda x, w, b: norm_ops.bias_gelu(F.linear(x, w), b), [t.double() for t in inputs],
                          grad.double())
    assert not out.isnan().any() and rel_err(out.cpu(), ref) < 1e-5
    for name, g, e in zip(["x", "weight", "bias"], got, expected):
        assert not g.isnan().any() and rel_err(g.cpu(), e) < 1e-5, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_flash_rule(dtype, poisoned_empty):
    """Outputs within 2x, gradients within 3x the error of the torch computation in the same dtype."""
    inputs = layer_norm_inputs(29, 96, dtype)
    grad = torch.randn(29, 96).to(dtype)
    out, got = grads(kernel_layer_norm, on_device(inputs), grad.to(DEVICE))
    low, low_grads = grads(reference_layer_norm, inputs, grad)
    exact, exact_grads = grads(reference_layer_norm, [t.double() for t in inputs], grad.double())
    assert out.dtype == dtype
    assert_flash_rule(out.cpu(), low, exact, 2)
    for g, lo, e in zip(got, low_grads, exact_grads):
        assert_flash_rule(g.cpu(), lo, e, 3)

    x, bias = (torch.randn(29, 160) * 2).to(dtype), torch.randn(160).to(dtype)
    grad = torch.randn(29, 160).to(dtype)
    out, got = grads(kernel.bias_gelu, on_device([x, bias]), grad.to(DEVICE))
    low, low_grads = grads(norm_ops.bias_gelu, [x, bias], grad)
    exact, exact_grads = grads(norm_ops.bias_gelu, [x.double(), bias.double()], grad.double())
    assert_flash_rule(out.cpu(), low, exact, 2)
    for g, lo, e in zip(got, low_grads, exact_grads):
        assert_flash_rule(g.cpu(), lo, e, 3)


def test_mixed_dtypes_promote_like_torch():
    """A bf16 residual added to an fp32 stream gives an fp32 result, and each gradient its input's dtype."""
    x, residual, weight, bias = layer_norm_inputs(9, 64)
    residual = residual.bfloat16()
    inputs = on_device([x, residual, weight, bias])
    out, (gx, gr, _, _) = grads(kernel_layer_norm, inputs, torch.randn(9, 64).to(DEVICE))
    ref = reference_layer_norm(x, residual, weight, bias)
    assert out.dtype == ref.dtype == torch.float32 and rel_err(out.cpu(), ref) < 1e-5
    assert gx.dtype == torch.float32 and gr.dtype == torch.bfloat16


def test_empty_rows():
    inputs = on_device(layer_norm_inputs(0, 64))
    assert kernel_layer_norm(*inputs).shape == (0, 64)


def test_cpu_default_is_the_reference():
    """Without a backend request on the CPU the dispatch runs the reference itself (bit-identical)."""
    x, residual, weight, bias = layer_norm_inputs(5, 32)
    assert torch.equal(norm_ops.fused_residual_layer_norm(x, residual, weight, bias, 1e-6),
                       reference_layer_norm(x, residual, weight, bias))


@pytest.mark.parametrize("width", [32, 128])
def test_norm_parameters_of_another_width_are_refused(width):
    """A weight or bias narrower than the rows was read past its end (a plausible but wrong result), one wider
    was silently cut; torch's layer_norm refuses both."""
    x, residual, weight, bias = on_device(layer_norm_inputs(5, 64))
    for name, params in [("weight", (torch.rand(width, device=DEVICE), bias)),
                         ("bias", (weight, torch.rand(width, device=DEVICE)))]:
        with pytest.raises(ValueError, match=rf"{name} \({width},\) does not match the last axis of x \(5, 64\)"):
            kernel.residual_layer_norm(x, residual, *params, 1e-6)


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64])
def test_norm_kernels_refuse_what_they_cannot_compute(dtype):
    """Integer rows came back as truncated integers, float64 ones rounded to float32 precision in a float64
    tensor; torch's own ops raise for integers and keep float64."""
    x, residual, weight, bias = layer_norm_inputs(5, 64)
    x, residual = on_device([(x * 4).to(dtype), (residual * 4).to(dtype)])
    weight, bias = on_device([weight, bias])
    with pytest.raises(ValueError, match=f"float32, bfloat16 or float16 tensors; got x of {dtype}"):
        kernel.residual_layer_norm(x, residual, weight, bias, 1e-6)
    with pytest.raises(ValueError, match=f"float32, bfloat16 or float16 tensors; got x of {dtype}"):
        kernel.bias_gelu(x, bias.to(dtype))


def test_rows_past_two_to_the_31_values_are_addressed_in_int64():
    """The MLP's (tokens, 4D) hidden rows pass 2^31 values at 699k tokens of ECHO-base, where row * cols in int32
    wrapped to before the buffer. One block of a matrix so wide that its last row starts there, in an untouched
    allocation 2^31 values past its start (what a wrapped offset read, not a crash), GELU'd in place."""
    rows, block = 16, 128
    cols = -(-(2**31) // (rows - 1))  # only the last row's offsets pass 2^31
    try:
        x = torch.empty(2**31 + rows * cols, dtype=torch.float16, device=DEVICE)[2**31:].view(rows, cols)
        bias = torch.empty(cols, dtype=torch.float16, device=DEVICE)
    except RuntimeError:  # torch.OutOfMemoryError included: a machine that refuses even untouched memory
        pytest.skip("no room for a 9 GB allocation")
    values, bias_values = torch.randn(rows, block).to(torch.float16), torch.randn(block).to(torch.float16)
    x[:, :block], bias[:block] = values.to(DEVICE), bias_values.to(DEVICE)
    kernel._bias_gelu_forward_kernel[(1, 1)](x, bias, x, rows, cols, BLOCK_ROWS=rows, BLOCK_COLS=block)
    expected = F.gelu((values + bias_values).double())
    assert (x[:, :block].cpu().double() - expected).abs().max() < 1e-2
