import re

import pytest
import torch

import echo
from echo import geometry
from independent import eps_felt_reference, independent_encode, torch_layers

from conftest import RATE_FAMILIES, random_model, rel_err


@pytest.mark.parametrize("size,params", [("tiny", 5_461_632), ("small", 21_540_096)])
def test_state_dict_layout(size, params):
    model = echo.EchoModel(echo.EchoConfig.preset(size))
    state = model.state_dict()
    d = model.config.dim
    assert len(state) == 150
    assert sum(p.numel() for p in model.parameters()) == params
    assert state["cls_token"].shape == (1, 1, d) and state["pos_embed"].shape == (1, 126, d)
    assert state["patch_embed.proj.weight"].shape == (d, 1, 32, 16)
    assert state["encoder.layers.11.self_attn.in_proj_weight"].shape == (3 * d, d)
    assert state["encoder.layers.0.linear2.weight"].shape == (d, 4 * d)
    assert state["norm.bias"].shape == (d,)


def test_presets():
    assert [(c.dim, c.depth, c.heads) for c in echo.PRESETS.values()] == [
        (192, 12, 3), (384, 12, 6), (768, 12, 12), (1024, 24, 16)]
    assert echo.EchoConfig.preset("small").final_norm_eps == 1e-6
    with pytest.raises(ValueError, match="unknown ECHO size 'huge'"):
        echo.EchoConfig.preset("huge")


def test_an_unknown_field_given_to_a_preset_is_named_with_the_valid_ones():
    """It was the dataclass's TypeError "unexpected keyword argument", which lists no field."""
    with pytest.raises(TypeError, match=re.escape("unknown EchoConfig field(s) layers, nope; valid: dim, depth, heads, "
                                                  "mlp_ratio, layer_norm_eps, final_norm_eps")):
        echo.EchoConfig.preset("tiny", nope=1, layers=2, depth=2)


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_layers_match_torch_transformer(size):
    model = random_model(size)
    reference = torch_layers(model.state_dict(), model.config.dim, model.config.heads, model.config.depth)
    x = torch.randn(5, 1 + int(torch.randint(1, 126, ())), model.config.dim)
    with torch.no_grad():
        ours = x
        for layer in model.encoder.layers:
            ours = layer(ours)
        assert rel_err(ours, reference(x)) < 1e-5


@pytest.mark.parametrize("rate", RATE_FAMILIES)
def test_encode_matches_independent_formulation(rate):
    model = random_model("tiny")
    frames = int(torch.randint(7, 300, ()))
    n = rate * 25 // 1000 + (frames - 1) * (rate * 10 // 1000) + int(torch.randint(0, rate // 100, ()))
    x = torch.randn(n)
    utterance, frame_rows = model.encode(x, rate)
    ref_u, ref_f = independent_encode(model.state_dict(), model.config.heads, x.numpy(), rate)
    g = geometry.SignalGeometry(rate, n)
    assert utterance.shape == (g.bands * 192,) and frame_rows.shape == (g.frame_rows, g.bands * 192)
    assert rel_err(utterance, ref_u) < 1e-5 and rel_err(frame_rows, ref_f) < 1e-5


@pytest.mark.parametrize("rate", [100, 2480, 2560])
@pytest.mark.parametrize("frames,leftover", [(1, False), (16, False), (17, True)])
def test_encode_at_the_edges_matches_independent_formulation(rate, frames, leftover):
    """The spec's edges end to end: the lowest rate (n_fft 2, hop 1, one band of 2 real bins), F = 32 exactly
    (one full band) and F = 33 (a second band of one real bin); the smallest signal (one frame), a whole patch,
    a patch and one frame; `leftover` adds the hop - 1 samples that make no frame (none at 100 Hz: hop 1)."""
    model = random_model("tiny", depth=2)
    hop = rate * 10 // 1000
    n = rate * 25 // 1000 + (frames - 1) * hop + (hop - 1 if leftover else 0)
    x = torch.randn(n) + 0.5
    utterance, frame_rows = model.encode(x, rate)
    ref_u, ref_f = independent_encode(model.state_dict(), model.config.heads, x.numpy(), rate)
    bands = -(-(rate * 25 // 1000 // 2 + 1) // 32)
    assert utterance.shape == (bands * 192,) and frame_rows.shape == (-(-frames // 16), bands * 192)
    assert rel_err(utterance, ref_u) < 1e-5 and rel_err(frame_rows, ref_f) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("size,rate,frames", [("small", 16000, 2001), ("tiny", 8000, 4500), ("tiny", 48000, 2000)])
def test_long_signals_match_independent_formulation(size, rate, frames):
    model = random_model(size)
    n = rate * 25 // 1000 + (frames - 1) * (rate * 10 // 1000)
    x = torch.randn(n)
    utterance, frame_rows = model.encode(x, rate)
    ref_u, ref_f = independent_encode(model.state_dict(), model.config.heads, x.numpy(), rate)
    segments = geometry.segments(frames)
    assert frame_rows.shape[0] == 125 * len(segments)
    assert rel_err(utterance, ref_u) < 1e-5 and rel_err(frame_rows, ref_f) < 1e-5


def test_segment_average_rule():
    """2001 frames: utterance = mean of segments [0, 2000) and [1, 2001) of the whole spectrogram; frames stacked."""
    from echo.ops import stft as stft_ops
    from echo.ops import tokens as token_ops

    model = random_model("tiny")
    rate = 8000
    x = torch.randn(200 + 2000 * 80)
    utterance, frame_rows = model.encode(x, rate)
    spec = stft_ops.spectrogram(x, rate)
    assert spec.shape[1] == 2001
    outs = []
    with torch.no_grad():
        for start in (0, 1):
            bands = token_ops.band_split(spec[:, start : start + 2000], rate)
            outs.append(model(model.band_tokens(bands, token_ops.band_positions(rate))))
    assert frame_rows.shape == (250, 4 * 192)
    assert rel_err(utterance, (outs[0][:, 0].flatten() + outs[1][:, 0].flatten()) / 2) < 1e-6
    assert rel_err(frame_rows[:125], outs[0][:, 1:].transpose(0, 1).flatten(1)) < 1e-6
    assert rel_err(frame_rows[125:], outs[1][:, 1:].transpose(0, 1).flatten(1)) < 1e-6


def test_multichannel_concatenates_channels():
    model = random_model("tiny")
    x = torch.randn(2, 12000)
    utterance, frame_rows = model.encode(x, 12000)
    u0, f0 = model.encode(x[0], 12000)
    u1, f1 = model.encode(x[1], 12000)
    assert torch.equal(utterance, torch.cat([u0, u1]))
    assert torch.equal(frame_rows, torch.cat([f0, f1], dim=-1))


def test_final_norm_eps_is_configurable():
    model = random_model("tiny", final_norm_eps=1e-5)
    assert model.norm.eps == 1e-5 and model.encoder.layers[0].norm1.eps == 1e-6


def test_encode_runs_in_the_models_dtype():
    """A model converted with .double() or .bfloat16() encodes in its own dtype and still returns float32."""
    model = random_model("tiny")
    rate = RATE_FAMILIES[int(torch.randint(len(RATE_FAMILIES), ()))]
    x = torch.randn(int(torch.randint(rate // 4, rate, ())))
    ref_u, ref_f = independent_encode(model.state_dict(), model.config.heads, x.numpy(), rate)
    utterance, frame_rows = model.double().encode(x, rate)
    assert utterance.dtype == frame_rows.dtype == torch.float32
    assert rel_err(utterance, ref_u) < 1e-6 and rel_err(frame_rows, ref_f) < 1e-6
    utterance, frame_rows = model.bfloat16().encode(x, rate)
    assert utterance.dtype == frame_rows.dtype == torch.float32
    assert rel_err(utterance, ref_u) < 2e-2 and rel_err(frame_rows, ref_f) < 2e-2


def test_an_autocast_around_encode_leaves_it_in_the_models_dtype():
    """encode is the reference fast.encode is checked against: under a caller's bf16 autocast (a training loop's
    validation) its products silently ran in bf16, 2e-3 off, while fast.encode's stayed float32."""
    model = random_model("tiny", depth=2)
    x = torch.randn(int(torch.randint(8000, 16000, ())))
    truth = model.encode(x, 16000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model.encode(x, 16000)
        assert torch.is_autocast_enabled("cpu")  # the caller's setting is theirs again after the call
    assert all(rel_err(out, ref) < 1e-6 for out, ref in zip(got, truth))


def test_a_model_on_the_meta_device_is_named():
    model = echo.EchoModel(echo.EchoConfig.preset("tiny", depth=1), device="meta")
    with pytest.raises(ValueError, match="the model is on the meta device"):
        model.encode(torch.randn(4000), 16000)


def test_an_unknown_device_is_named_as_echo_load_names_it():
    """It was torch's RuntimeError listing every device type torch was built with."""
    with pytest.raises(ValueError, match=re.escape("unknown device 'gpu'; e.g. cpu, cuda, cuda:1")):
        echo.EchoModel(echo.EchoConfig.preset("tiny", depth=1), device="gpu")
    with pytest.raises(ValueError, match=re.escape("unknown device 'gpu'; e.g. cpu, cuda, cuda:1")):
        echo.load("default", device="gpu")


@pytest.mark.parametrize("config, dtype, message", [
    ("small", None, "config must be an EchoConfig, e.g. EchoConfig.preset('small') or EchoConfig(**fields) "
                    "(echo.load reads a checkpoint), got str 'small'"),  # was "'str' object has no attribute 'dim'"
    ({"dim": 192}, None, "config must be an EchoConfig, e.g. EchoConfig.preset('small')"),
    (None, torch.int32, "dtype must be a floating-point torch dtype such as torch.float32, got torch.int32"),
    (None, "float16", "dtype must be a floating-point torch dtype such as torch.float32, got 'float16'"),
])
def test_a_config_or_dtype_of_the_wrong_kind_is_named(config, dtype, message):
    with pytest.raises(TypeError, match=re.escape(message)):
        echo.EchoModel(config, dtype=dtype)


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_layer_norm_eps_is_felt_and_is_the_released_1e6(size):
    """Every LayerNorm (norm1, norm2 of each layer, the final norm) sees inputs of variance ~1e-6, where eps
    1e-6 and 1e-5 give outputs ~2x apart (at unit variance they differ by ~4e-6, under the end-to-end tests'
    tolerance). The preset's model against the spec's definition: torch's TransformerEncoderLayer with
    layer_norm_eps=1e-6, then LayerNorm with eps 1e-6."""
    model = random_model(size)
    state, reference = eps_felt_reference(model)
    x = torch.randn(3, 1 + int(torch.randint(1, 126, ())), model.config.dim) * 1e-3
    with torch.no_grad():
        ours = model(x)
        ref = torch.nn.functional.layer_norm(reference(x), (model.config.dim,), state["norm.weight"],
                                             state["norm.bias"], 1e-6)
    assert rel_err(ours, ref) < 1e-5  # measured ~2e-7; eps 1e-5 in the layers or the final norm gives ~0.6-0.9


def test_config_fields_given_as_numpy_scalars_are_plain_numbers(tmp_path):
    """heads=np.int64(3) (read from an array, a table, a sweep's grid) was kept as given: echo.save then failed
    with "Object of type int64 is not JSON serializable", after the model was trained."""
    import json

    import numpy as np

    config = echo.EchoConfig(dim=np.int64(192), depth=np.int32(2), heads=np.int64(3), mlp_ratio=np.uint8(4),
                             layer_norm_eps=np.float32(1e-6), final_norm_eps=np.float64(1e-5))
    fields = config.to_dict()
    assert [type(fields[name]) for name in ("dim", "depth", "heads", "mlp_ratio")] == [int] * 4
    assert type(fields["layer_norm_eps"]) is float and type(fields["final_norm_eps"]) is float
    assert fields == {"dim": 192, "depth": 2, "heads": 3, "mlp_ratio": 4, "layer_norm_eps": float(np.float32(1e-6)),
                      "final_norm_eps": 1e-5}
    model = random_model("tiny", depth=2)
    loaded = echo.load(echo.save(model, tmp_path / "model.safetensors"), heads=np.int64(3),
                       final_norm_eps=np.float64(1e-5))
    path = echo.save(loaded, tmp_path / "again.safetensors")
    assert json.loads(path.with_suffix(".json").read_text())["heads"] == 3
