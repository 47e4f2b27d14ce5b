"""The oneDNN-packed products (echo.ops.linear) and the packed encoder's CPU inference path (bf16 and float32)."""
import re

import pytest
import torch
import torch.nn.functional as F

import echo.fast as fast
from echo import packed
from echo.ops import linear as linear_ops

from conftest import random_model, rel_err

requires_onednn = pytest.mark.skipif(not linear_ops.available(), reason="no oneDNN bf16 linear ops on this CPU/torch")
requires_onednn_fp32 = pytest.mark.skipif(
    not linear_ops.available(torch.float32), reason="no oneDNN linear ops in this torch"
)


@requires_onednn
@pytest.mark.parametrize("rows", [1, 37, 4096, 5001])
@pytest.mark.parametrize("gelu", [False, True])
def test_packed_linear_matches_float64(rows, gelu):
    inputs, outputs = 384, int(torch.randint(100, 1600, ()))
    x, weight, bias = torch.randn(rows, inputs), torch.randn(outputs, inputs) * inputs**-0.5, torch.randn(outputs)
    out = linear_ops.PackedLinear(weight, bias)(x, gelu=gelu)
    # the reference sees the same bf16-rounded operands; what remains is the product's own rounding
    truth = F.linear(*(t.bfloat16().double() for t in (x, weight, bias)))
    truth = F.gelu(truth) if gelu else truth
    assert out.dtype == torch.bfloat16 and out.shape == (rows, outputs)
    assert rel_err(out, truth) < 1e-2
    eager = F.linear(x.bfloat16(), weight.bfloat16(), bias.bfloat16())
    eager = F.gelu(eager) if gelu else eager
    assert rel_err(out, truth) <= 1.5 * rel_err(eager, truth) + 1e-4  # no worse than torch's own bf16 path


@requires_onednn_fp32
@pytest.mark.parametrize("rows", [1, 37, 5001])
@pytest.mark.parametrize("gelu", [False, True])
def test_packed_linear_in_float32_matches_float64(rows, gelu):
    inputs, outputs = int(torch.randint(100, 1600, ())), int(torch.randint(100, 1600, ()))
    x, weight, bias = torch.randn(rows, inputs), torch.randn(outputs, inputs) * inputs**-0.5, torch.randn(outputs)
    out = linear_ops.PackedLinear(weight, bias, torch.float32)(x, gelu=gelu)
    truth = F.linear(x.double(), weight.double(), bias.double())
    truth = F.gelu(truth) if gelu else truth
    assert out.dtype == torch.float32 and out.shape == (rows, outputs)
    assert rel_err(out, truth) < 1e-6


@requires_onednn
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_inference_copy_prepares_every_layer_and_a_forced_backend_bypasses_it(monkeypatch, dtype):
    model = random_model("tiny")
    copy = packed.inference_copy(model, dtype)
    assert all(isinstance(packed._layer_ops(layer, None), packed._CPUInferenceOps) for layer in copy.encoder.layers)
    assert copy.encoder.layers[0].cpu_inference_ops.qkv.dtype == dtype
    assert isinstance(packed._layer_ops(copy.encoder.layers[0], "reference"), packed._EagerOps)
    monkeypatch.setenv("ECHO_BACKEND_NORM", "torch")
    assert isinstance(packed._layer_ops(copy.encoder.layers[0], None), packed._EagerOps)
    assert not hasattr(model.encoder.layers[0], "cpu_inference_ops")  # the original model is untouched
    assert model.encoder.layers[0].linear1.weight.dtype == torch.float32
    # the copy owns its tensors: a later write to the model cannot reach half of it
    owned = {id(tensor) for tensor in (*copy.parameters(), *copy.buffers())}
    assert not owned & {id(tensor) for tensor in (*model.parameters(), *model.buffers())}
    assert not hasattr(packed.inference_copy(model, torch.float16).encoder.layers[0], "cpu_inference_ops")


@requires_onednn
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_changed_model_is_never_encoded_with_stale_packed_weights(dtype):
    """The prepared copy is cached per model and dtype; an in-place change (an optimiser step, a load) or new
    parameter tensors rebuild it."""
    model = random_model("tiny")
    signal = torch.randn(12000)
    before = fast.encode(model, signal, 16000, dtype=dtype)[0]
    assert packed.inference_model(model, dtype) is packed.inference_model(model, dtype)
    with torch.no_grad():
        model.encoder.layers[3].linear2.weight.mul_(-2.0)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    changed = fast.encode(model, signal, 16000, dtype=dtype)[0]
    truth = model.encode(signal, 16000)[0]
    assert rel_err(changed, truth) < tolerance and rel_err(before, truth) > 1e-2
    model.load_state_dict({name: value.clone() for name, value in random_model("tiny").state_dict().items()})
    assert rel_err(fast.encode(model, signal, 16000, dtype=dtype)[0], model.encode(signal, 16000)[0]) < tolerance


@requires_onednn_fp32
def test_cpu_float32_inference_path_matches_the_reference_and_the_eager_ops(monkeypatch):
    """fast.encode in float32 runs the prepared ops (packed products, one-pass norms) on a cached copy."""
    model = random_model("tiny")
    rates = [8000, 22050, 48000]
    signals = [torch.randn(int(rate * (0.3 + 2 * torch.rand(()).item()))) for rate in rates]
    assert isinstance(packed._layer_ops(packed.inference_model(model, torch.float32).encoder.layers[0], None),
                      packed._CPUInferenceOps)
    prepared = fast.encode(model, signals, rates, frames=True)
    monkeypatch.setenv("ECHO_BACKEND_NORM", "torch")
    eager = fast.encode(model, signals, rates, frames=True)
    for signal, rate, (u, f), (eu, ef) in zip(signals, rates, prepared, eager):
        ru, rf = model.encode(signal, rate)
        assert rel_err(u, ru) < 1e-5 and rel_err(f, rf) < 1e-5
        assert rel_err(eu, ru) < 1e-5 and rel_err(ef, rf) < 1e-5


@requires_onednn
def test_cpu_bf16_inference_path_as_close_to_float32_as_the_eager_bf16_path(monkeypatch):
    model = random_model("tiny")
    rates = [8000, 16000, 44100, 50000]
    signals = [torch.randn(int(rate * (0.3 + 2 * torch.rand(()).item()))) for rate in rates]
    truth = fast.encode(model, signals, rates, frames=True)
    prepared = fast.encode(model, signals, rates, frames=True, dtype=torch.bfloat16)
    monkeypatch.setenv("ECHO_BACKEND_NORM", "torch")  # the eager ops, as bench/encode_throughput.py's A/B
    eager = fast.encode(model, signals, rates, frames=True, dtype=torch.bfloat16)
    for (u, f), (eu, ef), (tu, tf) in zip(prepared, eager, truth):
        assert rel_err(u, tu) < 2e-2 and rel_err(f, tf) < 2e-2
        assert rel_err(u, tu) <= 1.5 * rel_err(eu, tu) + 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_without_the_compiled_extension_the_inference_path_falls_back_to_torch(monkeypatch, dtype):
    """No echo._C: the norm (and its bf16 copy) comes from torch (norm, then cast), attention from SDPA."""
    from echo import extension
    from echo.ops import norm as norm_ops

    monkeypatch.setattr(extension, "has_op", lambda name, device: False)
    x, residual = torch.randn(33, 64), torch.randn(33, 64).bfloat16()
    weight, bias = torch.randn(64), torch.randn(64)
    out, low = norm_ops.residual_layer_norm_inference(x, residual, weight, bias, 1e-5, dtype == torch.bfloat16)
    truth = F.layer_norm(x.double() + residual.double(), (64,), weight.double(), bias.double(), 1e-5)
    assert rel_err(out, truth) < 1e-6
    assert torch.equal(low, out.to(torch.bfloat16)) if dtype == torch.bfloat16 else low is None
    model = random_model("tiny")
    signals, rates = [torch.randn(8000), torch.randn(30000)], [8000, 48000]
    for signal, rate, got in zip(signals, rates, fast.encode(model, signals, rates, dtype=dtype)):
        assert rel_err(got, model.encode(signal, rate)[0]) < (2e-2 if dtype == torch.bfloat16 else 1e-5)


@requires_onednn_fp32
@pytest.mark.parametrize("shape", [(3, 12), (2, 3, 20), (16, 1)])
def test_packed_linear_refuses_an_input_of_another_width(shape):
    """oneDNN's own refusal ("could not create a primitive descriptor...") named neither width."""
    layer = linear_ops.PackedLinear(torch.randn(8, 16), torch.randn(8), torch.float32)
    with pytest.raises(ValueError, match=re.escape(f"PackedLinear takes inputs of width 16, got {shape}")):
        layer(torch.randn(shape))
