"""echo gives the same answers whatever global state its caller set in torch: a default device or dtype, grad
mode, inference mode, deterministic algorithms, denormals flushed, one thread. (echo.load's own: test_checkpoint.)"""
import itertools
from contextlib import contextmanager, nullcontext
from dataclasses import fields

import pytest
import torch

from conftest import random_model, rel_err

import echo.fast
from echo import EchoConfig, EchoModel, geometry
from echo.ops import tokens as token_ops
from echo.plan import make_plan
from echo.pretrain import corpus, sampling, trainer

# What a user's script may set before calling echo; "meta" stands in for a default GPU, which a CPU cannot have:
# both put a tensor made without a device somewhere else than the CPU. The last four never changed a result: the
# slow runs check that they still do not.
SETTINGS = ("default device meta", "default dtype float64", "grad disabled", "inference mode",
            "deterministic algorithms", "anomaly detection", "denormals flushed", "one thread")
QUIET = SETTINGS[4:]


def cases(settings=SETTINGS, *others):
    """Parameters of each setting, crossed with the lists in `others`; those of QUIET settings marked slow."""
    return [pytest.param(*case, marks=[pytest.mark.slow] if case[0] in QUIET else [])
            for case in itertools.product(settings, *others)]


@contextmanager
def torch_setting(name: str):
    """The body runs under one of SETTINGS; torch's state is restored afterwards, whatever happens."""
    device, dtype, grad = torch.get_default_device(), torch.get_default_dtype(), torch.is_grad_enabled()
    deterministic, anomaly, threads = (torch.are_deterministic_algorithms_enabled(), torch.is_anomaly_enabled(),
                                       torch.get_num_threads())
    try:
        with torch.inference_mode() if name == "inference mode" else nullcontext():
            {"default device meta": lambda: torch.set_default_device("meta"),
             "default dtype float64": lambda: torch.set_default_dtype(torch.float64),
             "grad disabled": lambda: torch.set_grad_enabled(False),
             "inference mode": lambda: None,
             "deterministic algorithms": lambda: torch.use_deterministic_algorithms(True),
             "anomaly detection": lambda: torch.autograd.set_detect_anomaly(True),
             "denormals flushed": lambda: torch.set_flush_denormal(True),
             "one thread": lambda: torch.set_num_threads(1)}[name]()
            yield
    finally:
        torch.set_default_device(None if device.type == "cpu" else device)
        torch.set_default_dtype(dtype)
        torch.set_grad_enabled(grad)
        torch.use_deterministic_algorithms(deterministic)
        torch.autograd.set_detect_anomaly(anomaly)
        torch.set_flush_denormal(False)  # torch's default: it has no getter
        torch.set_num_threads(threads)


@pytest.mark.parametrize("setting", ["default device meta", "default dtype float64"])
def test_a_model_is_made_whole_on_torchs_default_device_and_dtype(setting):
    """Like any nn.Module, EchoModel(config) follows torch's defaults, but its pos_embed was always float32 on the
    CPU: under a default GPU a model that could not encode (its tensors on two devices)."""
    with torch_setting(setting):
        made = EchoModel(EchoConfig.preset("tiny", depth=2))
        default = torch.get_default_device(), torch.get_default_dtype()
    assert {(p.device, p.dtype) for p in made.parameters()} == {default}


@pytest.mark.parametrize("setting", ["default device meta", "default dtype float64"])
def test_a_model_is_made_where_asked_with_the_weights_of_torchs_defaults(setting):
    """device= and dtype=, as nn.Linear takes them: the initial weights the defaults give under the same seed
    (pretraining builds its models so)."""
    config = EchoConfig.preset("tiny", depth=2)
    seed = int(torch.randint(2**31, ()))
    torch.manual_seed(seed)
    expected = EchoModel(config).state_dict()
    with torch_setting(setting):
        torch.manual_seed(seed)
        asked = EchoModel(config, device="cpu", dtype=torch.float32)
    assert asked.state_dict().keys() == expected.keys()
    for key, value in asked.state_dict().items():
        assert value.device.type == "cpu" and value.dtype == torch.float32 and torch.equal(value, expected[key]), key


def stream_encode(model, signal, rate, dtype):
    stream = echo.fast.StreamEncoder(model, rate, frames=True, dtype=dtype)
    pushed = [tensor for _, *segment in stream.push(signal) for tensor in segment]
    assert stream.audio.dtype == torch.float32  # the samples it holds, whatever torch's default dtype
    return [*pushed, *stream.finish()]


ENCODERS = {
    "model.encode": lambda model, signal, rate: list(model.encode(signal, rate)),
    # max_tokens 200: the long signal's passes take spans of it, given its mean (made on the default device once)
    "fast.encode": lambda model, signal, rate: [
        t for dtype in (torch.float32, torch.bfloat16) for max_tokens in (None, 200)
        for pair in echo.fast.encode(model, [signal, signal[: rate // 2]], rate, frames=True, dtype=dtype,
                                     max_tokens=max_tokens)
        for t in pair],
    "StreamEncoder": lambda model, signal, rate: [
        t for dtype in (torch.float32, torch.bfloat16) for t in stream_encode(model, signal, rate, dtype)],
}
@pytest.mark.parametrize("setting, encoder", cases(SETTINGS, ENCODERS))
def test_encoders_give_float32_on_the_cpu_as_under_torchs_defaults(setting, encoder):
    """A model made under torch's defaults encodes the same under any setting: under a default meta device the
    band positions and a stream's state were made there ("Cannot copy out of meta tensor"), and under a default
    float64 a stream held its audio in float64."""
    model, rate = random_model("tiny", depth=2), 4000  # two bands
    signal = torch.randn(rate * 21)  # over 2000 frames: two segments, and a stream emits one before finish()
    truth = ENCODERS[encoder](model, signal, rate)
    with torch_setting(setting):
        got = ENCODERS[encoder](model, signal, rate)
    assert len(got) == len(truth)
    for out, ref in zip(got, truth):
        assert out.device.type == "cpu" and out.dtype == torch.float32 and out.shape == ref.shape
        assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
def test_the_token_stage_follows_its_plan_not_torchs_default_device(backend):
    """pack_tokens and the plan made tensors on torch's default device beside the plan's host tensors: the band
    positions' (the reference), the plan's patch rows (torch), the Triton wrapper's launch tables (triton)."""
    if backend == "triton":
        pytest.importorskip("triton")
    model, rates = random_model("tiny", depth=1), [8000, 16000]
    plan = make_plan([geometry.n_fft(rate) + 40 * geometry.hop(rate) for rate in rates], rates)
    spec = torch.randn(int(plan.spec_offsets[-1]))
    proj = model.patch_embed.proj
    arguments = (spec, plan, proj.weight, proj.bias, model.cls_token, model.pos_embed, backend)
    truth = token_ops.pack_tokens(*arguments)
    with torch_setting("default device meta"):
        got = token_ops.pack_tokens(*arguments)
    assert got.device.type == "cpu" and torch.equal(got, truth)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    pytest.importorskip("soundfile")
    from pretrain_corpus import write_corpus

    return write_corpus(tmp_path_factory.mktemp("corpus") / "data", files=4)


def batches(data) -> list:
    config = sampling.SamplingConfig(crop_seconds=2, tokens_per_batch=400)
    return list(itertools.islice(sampling.BatchStream(corpus.FolderCorpus(data, 1.0), config, seed=0), 2))


def assert_same_tensors(got: dict, truth: dict) -> None:
    """The same keys, each an equal CPU tensor of the same dtype."""
    assert got.keys() == truth.keys()
    for key, ref in truth.items():
        assert got[key].device.type == "cpu" and got[key].dtype == ref.dtype and torch.equal(got[key], ref), key


@pytest.mark.parametrize("setting", cases())
def test_pretraining_batches_are_made_on_the_host_as_under_torchs_defaults(data, setting):
    """Batches are made on the host: under a default meta device (a GPU, in a forked data worker) their index
    tensors were made there."""
    truth = batches(data)
    with torch_setting(setting):
        got = batches(data)
    assert len(got) == len(truth)
    for out, ref in zip(got, truth):
        tensors = {f.name for f in fields(ref) if isinstance(getattr(ref, f.name), torch.Tensor)}
        assert_same_tensors({n: getattr(out, n) for n in tensors}, {n: getattr(ref, n) for n in tensors})


def train(data, out):
    from pretrain_corpus import tiny_config

    return trainer.train(tiny_config(data, out, steps=2, save_every=2, log_every=1), progress=False)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A two-step run under torch's defaults."""
    return train(data, tmp_path_factory.mktemp("defaults") / "run")


# (one thread sums in another order, and AdamW scales the rounding noise of the key biases' gradient, zero in exact
# arithmetic as softmax ignores them, into steps of a fair part of the lr: those biases differ, the losses do not)
@pytest.mark.parametrize("setting", cases([setting for setting in SETTINGS if setting != "one thread"]))
def test_pretraining_trains_and_reads_its_checkpoints_as_under_torchs_defaults(data, trained, tmp_path, setting):
    """The run's models are float32 on --device, whatever torch's defaults: under a default float64 it trained
    float64 models from other initial weights; under a default meta device it failed moving them to the CPU, and
    a checkpoint's encoder read there had no weights. With grad disabled or in inference mode a step could not
    backpropagate."""
    with torch_setting(setting):
        result = train(data, tmp_path / "run")
        encoder, _ = trainer.run_encoder(tmp_path / "run")
    for part in ("student", "teacher", "decoder"):
        assert_same_tensors(result[part].state_dict(), trained[part].state_dict())
    assert_same_tensors(encoder.state_dict(), trained["teacher"].state_dict())
