"""The pretraining objective: packed loss, and its gradients under every backend, vs sequence by sequence; an
inference call in between changes nothing; the student never sees a masked token; EMA and learning-rate
schedules vs hand computations."""
import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("soundfile")
from conftest import random_model, rel_err  # noqa: E402
from independent import torch_layers  # noqa: E402
from pretrain_corpus import write_corpus  # noqa: E402

from echo import extension, fast  # noqa: E402
from echo.ops import backend as backends  # noqa: E402
from echo.packed import Packing  # noqa: E402
from echo.pretrain import corpus, objective, sampling, schedule  # noqa: E402


def small_batch(tmp_path, clones=2, seconds=(1.5, 3.0)):
    root = write_corpus(tmp_path / "data", files=5, seconds=seconds)
    config = sampling.SamplingConfig(crop_seconds=2, tokens_per_batch=250, clones=clones)
    stream = sampling.BatchStream(corpus.FolderCorpus(root, 1.0), config, seed=int(torch.randint(0, 999, ())))
    return next(iter(stream))


def random_learner(dim=64, depth=2, heads=1):
    student = random_model("tiny", dim=dim, depth=depth, heads=heads)
    decoder = objective.ConvDecoder(dim, layers=2)
    with torch.no_grad():
        for conv in decoder.convs:
            conv.bias.normal_(0, 0.1)
    return objective.Learner(student, decoder, utterance_weight=float(np.random.uniform(0.5, 2)))


def loss_sequence_by_sequence(learner, teacher, batch, utterance_target):
    """The same loss written per sequence, in the dtype of the models, with torch.nn.TransformerEncoder layers
    for the teacher and the student (the student's, returned with the loss, hold its encoder's gradients), the
    per-band token path and a padded nn.Conv1d decoder."""
    dim, dtype = teacher.config.dim, teacher.cls_token.dtype
    layers = torch_layers(teacher.state_dict(), dim, teacher.config.heads, teacher.config.depth).to(dtype).layers
    first = torch.cumsum(batch.lengths, 0) - batch.lengths
    targets, utterance_targets, bands = [], [], []
    for s, length in enumerate(batch.lengths.tolist()):
        rows = batch.patches[first[s] : first[s] + length].reshape(length, 32, 16).to(dtype)
        band = rows.permute(1, 0, 2).reshape(1, 32, length * 16)
        bands.append(band)
        with torch.no_grad():
            x = teacher.band_tokens(band, batch.positions[s : s + 1])
            average = raw_average = 0
            for layer in layers:
                x = layer(x)
                average = average + F.instance_norm(x[:, 1:].transpose(1, 2)).transpose(1, 2) / len(layers)
                raw_average = raw_average + x[0, 1:] / len(layers)
        target = F.layer_norm(average[0], (dim,))
        targets.append(target)
        if utterance_target == "frame-mean":
            utterance_targets.append(target.mean(0))
        else:
            utterance_targets.append(F.layer_norm(raw_average.mean(0), (dim,)))
    student, decoder = learner.student, learner.decoder
    student_layers = torch_layers(student.state_dict(), dim, student.config.heads, student.config.depth).to(dtype)
    masked_errors, utterance_errors = [], []
    start = 0
    for j, s in enumerate(batch.student_sequence.tolist()):
        length = int(batch.lengths[s])
        masked = batch.masked[start : start + length]
        start += length
        tokens = student.band_tokens(bands[s], batch.positions[s : s + 1])[0]
        visible = torch.cat([torch.tensor([0]), 1 + (~masked).nonzero().squeeze(1)])  # CLS + visible patches
        out = student.norm(student_layers(tokens[visible][None]))[0]
        x = decoder.mask_token.expand(length, dim).clone()
        x[~masked] = out[1:]
        x = x.T[None]
        for conv in decoder.convs:
            padded = F.conv1d(x, conv.weight, conv.bias, padding=conv.kernel_size[0] // 2, groups=conv.groups)
            x = x + F.gelu(F.layer_norm(padded.transpose(1, 2), (dim,))).transpose(1, 2)
        predicted = decoder.proj(x[0].T)
        masked_errors.append((predicted[masked] - targets[s][masked]) ** 2)
        utterance_errors.append((out[0] - utterance_targets[s]) ** 2)
    frame = torch.cat(masked_errors).mean()
    utterance = torch.stack(utterance_errors).mean()
    return (frame + learner.utterance_weight * utterance, frame, utterance), student_layers


def float64_gradients(learner, teacher, batch, utterance_target="frame-mean") -> dict:
    """The gradient of every trained parameter of `learner`, by name, of loss_sequence_by_sequence in float64."""
    learner, teacher = copy.deepcopy(learner).double(), copy.deepcopy(teacher).double()
    batch = copy.copy(batch)
    batch.patches = batch.patches.double()
    (loss, _, _), student_layers = loss_sequence_by_sequence(learner, teacher, batch, utterance_target)
    loss.backward()
    grads = {name: p.grad for name, p in learner.named_parameters() if p.requires_grad}
    grads.update({f"student.encoder.{name}": p.grad for name, p in student_layers.named_parameters()})
    return grads


def packed_loss(learner, teacher, batch, utterance_target="frame-mean"):
    targets, utterance_targets = objective.teacher_targets(teacher, batch, Packing.from_lengths(batch.lengths + 1),
                                                           utterance_target)
    return learner(batch, Packing.from_lengths(batch.student_lengths), targets, utterance_targets)


@pytest.mark.parametrize("utterance_target", objective.UTTERANCE_TARGETS)
def test_packed_loss_equals_the_loss_computed_sequence_by_sequence(tmp_path, utterance_target):
    batch = small_batch(tmp_path)
    learner = random_learner()
    teacher = random_model("tiny", dim=64, depth=2, heads=1)
    packed = packed_loss(learner, teacher, batch, utterance_target)
    with torch.no_grad():
        reference, _ = loss_sequence_by_sequence(learner, teacher, batch, utterance_target)
    for got, expected in zip(packed, reference):
        assert rel_err(got.detach(), expected) < 1e-5
    packed[0].backward()  # and it trains: every trained parameter gets a gradient
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.parameters() if p.requires_grad)


def packed_gradients(learner, teacher, batch, autocast: bool) -> dict:
    """The gradient of every trained parameter of `learner`, by name, of the packed loss (the trainer's step:
    forward under bf16 autocast or none, backward outside it)."""
    learner.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = packed_loss(learner, teacher, batch)[0]
    loss.backward()
    return {name: p.grad for name, p in learner.named_parameters() if p.requires_grad}


TRITON = pytest.mark.skipif(not backends.triton_available(torch.device("cpu")),
                            reason="Triton's interpreter is not available")
# Every backend a user can pick for the ops a training step runs (attention and the norms), and the default,
# which runs the compiled attention in the teacher (no gradients there) but never in the student.
SETTINGS = [{}, {"ECHO_BACKEND": "torch"}, {"ECHO_BACKEND": "reference"}, {"ECHO_BACKEND_ATTENTION": "torch"},
            {"ECHO_BACKEND_ATTENTION": "reference"}, {"ECHO_BACKEND_NORM": "csrc"}, {"ECHO_BACKEND_NORM": "torch"},
            {"ECHO_BACKEND_NORM": "reference"},
            *(pytest.param(setting, marks=TRITON) for setting in (
                {"ECHO_BACKEND": "triton"}, {"ECHO_BACKEND_ATTENTION": "triton"}, {"ECHO_BACKEND_NORM": "triton"}))]


@pytest.mark.parametrize("heads", [1, 2])  # head dim 64 (as ECHO's, and the compiled attention's) or 32
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda setting: ",".join(f"{k}={v}" for k, v in setting.items())
                         or "default")
def test_every_gradient_equals_the_float64_per_sequence_gradient_under_every_backend(tmp_path, monkeypatch, setting,
                                                                                     heads):
    """A fast op without a backward (the compiled attention, an inference-only path) picked while training
    would stop or bend gradients silently: each parameter's gradient against float64 autograd of the loss
    written per sequence with torch.nn layers, float32 within 1e-5, bf16 autocast within 2e-2."""
    for name, value in setting.items():
        monkeypatch.setenv(name, value)
    batch = small_batch(tmp_path)
    learner, teacher = random_learner(heads=heads), random_model("tiny", dim=64, depth=2, heads=heads)
    expected = float64_gradients(learner, teacher, batch)
    for autocast, tolerance in ((False, 1e-5), (True, 2e-2)):
        got = packed_gradients(learner, teacher, batch, autocast)
        assert got.keys() == expected.keys()
        for name, grad in got.items():
            assert grad is not None and rel_err(grad, expected[name]) < tolerance, (name, autocast)


@pytest.mark.skipif(not extension.has_op("short_attention", "cpu"), reason="echo._C has no compiled attention")
def test_a_forced_compiled_attention_runs_the_teacher_but_refuses_to_train(tmp_path, monkeypatch):
    """The compiled attention has no backward: forced, it runs where no gradient is needed (the teacher) and
    is an error naming the setting in the student, never a silent stop of the gradients."""
    monkeypatch.setenv("ECHO_BACKEND_ATTENTION", "csrc")
    batch = small_batch(tmp_path)
    learner, teacher = random_learner(), random_model("tiny", dim=64, depth=2, heads=1)
    targets = objective.teacher_targets(teacher, batch, Packing.from_lengths(batch.lengths + 1))
    with pytest.raises(backends.BackendError, match="ECHO_BACKEND_ATTENTION=csrc"):
        learner(batch, Packing.from_lengths(batch.student_lengths), *targets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_inference_call_neither_changes_training_nor_keeps_serving_the_old_weights(tmp_path, dtype):
    """echo.fast.encode on the student may cache an inference copy (weights packed for oneDNN, no autograd):
    the gradients after it are the same, the step trains the real parameters and the next encode sees them."""
    batch = small_batch(tmp_path)
    learner, teacher = random_learner(), random_model("tiny", dim=64, depth=2, heads=1)
    student, signal, rate = learner.student, torch.randn(int(np.random.randint(4000, 16000))), 16000
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    before = packed_gradients(learner, teacher, batch, autocast=False)
    (old,) = fast.encode(student, [signal], rate, dtype=dtype)
    assert rel_err(old, student.encode(signal, rate)[0]) < tolerance
    after = packed_gradients(learner, teacher, batch, autocast=False)
    assert all(torch.equal(after[name], grad) for name, grad in before.items())
    weights = {name: p.detach().clone() for name, p in learner.named_parameters() if p.requires_grad}
    torch.optim.AdamW(learner.parameters(), lr=1e-2).step()
    assert not any(torch.equal(p, weights[name]) for name, p in learner.named_parameters() if p.requires_grad)
    (new,) = fast.encode(student, [signal], rate, dtype=dtype)
    assert rel_err(new, student.encode(signal, rate)[0]) < tolerance
    assert rel_err(new, old) > 10 * tolerance  # the step moved the embedding: the comparison above could tell


def test_the_student_never_sees_a_masked_patch(tmp_path):
    batch = small_batch(tmp_path, clones=1)
    learner, teacher = random_learner(), random_model("tiny", dim=64, depth=2, heads=1)
    targets, utterance_targets = objective.teacher_targets(teacher, batch, Packing.from_lengths(batch.lengths + 1))
    clean = learner(batch, Packing.from_lengths(batch.student_lengths), targets, utterance_targets)
    poisoned = copy.copy(batch)
    poisoned.patches = batch.patches.clone()
    poisoned.patches[batch.decoder_source[batch.masked_rows]] = float("nan")  # one clone: rows map 1:1
    dirty = learner(poisoned, Packing.from_lengths(batch.student_lengths), targets, utterance_targets)
    for a, b in zip(clean, dirty):
        assert torch.equal(a, b)


def test_ema_update_matches_the_hand_computation():
    student = random_model("tiny", dim=64, depth=1, heads=1)
    teacher = random_model("tiny", dim=64, depth=1, heads=1)
    before = {k: v.double().clone() for k, v in teacher.state_dict().items()}
    decay = float(np.random.uniform(0.99, 0.99999))
    schedule.ema_update(teacher, student, decay)
    for key, value in teacher.state_dict().items():
        expected = decay * before[key] + (1 - decay) * student.state_dict()[key].double()
        if key == "pos_embed":
            expected = before[key]  # frozen: not averaged (equal in teacher and student anyway)
        assert rel_err(value, expected) < 1e-6, key


def test_ema_decay_rises_linearly_then_stays():
    start, end, steps = 0.9998, 0.99999, 1000
    values = [schedule.ema_decay(step, start, end, steps) for step in (0, 250, 500, 1000, 5000)]
    assert values == pytest.approx([start, start + (end - start) / 4, (start + end) / 2, end, end], abs=1e-12)


def test_cosine_schedule_warms_up_then_decays_to_the_minimum():
    lr = schedule.CosineSchedule(peak=1e-3, minimum=1e-5, warmup=10, total=110)
    assert lr.lr(0) == pytest.approx(1e-4) and lr.lr(9) == pytest.approx(1e-3)
    assert lr.lr(60) == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2)  # halfway through the cosine
    assert lr.lr(110) == pytest.approx(1e-5) and lr.lr(500) == pytest.approx(1e-5)
    decreasing = [lr.lr(s) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(decreasing))


def test_bf16_autocast_loss_is_close_to_the_float32_loss(tmp_path):
    batch = small_batch(tmp_path)
    learner, teacher = random_learner(), random_model("tiny", dim=64, depth=2, heads=1)
    reference = packed_loss(learner, teacher, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = packed_loss(learner, teacher, batch)
    for got, expected in zip(low, reference):
        assert rel_err(got.detach(), expected.detach()) < 2e-2


def test_the_peak_lr_is_the_base_lr_times_the_clips_of_a_step_over_256(tmp_path):
    """Spec section 8: base lr 1e-4 scaled by the effective batch size / 256, min lr 1e-5. A default clip is a
    10 s crop: at 16 kHz 1 + (160000 - 400) // 160 = 998 frames, ceil(998 / 16) = 63 patches, 64 tokens per
    band, 3.5 bands on average (2 to 5): 224 teacher tokens, so 16384 tokens hold 73 clips per process."""
    from echo.pretrain.trainer import PretrainConfig

    config = PretrainConfig(data=str(tmp_path), out=str(tmp_path / "run"))
    assert (config.base_lr, config.min_lr, config.lr, config.tokens_per_batch) == (1e-4, 1e-5, None, 16384)
    clips = 16384 // int(3.5 * (-(-(1 + (160000 - 400) // 160) // 16) + 1))
    assert clips == 73
    for world in (1, 4):
        assert config.peak_lr(world) == pytest.approx(1e-4 * world * clips / 256, rel=1e-12)


def test_the_default_objective_and_ema_are_the_spec_recipe(tmp_path):
    """Spec section 8 with `python -m echo pretrain`'s defaults: frame-mean utterance target with weight 1,
    a decoder of conv blocks with kernel 3, grouped, LayerNorm without affine (no norm parameters), then one
    linear layer; weight decay 0.05; EMA decay from 0.9998 to 0.99999 over the whole run."""
    from echo.pretrain.trainer import PretrainConfig, with_derived_defaults

    config = PretrainConfig(data=str(tmp_path), out=str(tmp_path / "run"), steps=1000)
    assert (config.utterance_target, config.utterance_weight, config.weight_decay) == ("frame-mean", 1.0, 0.05)
    assert config.decoder_kernel == 3 and config.decoder_groups > 1 and config.decoder_layers >= 2
    assert (config.ema_start, config.ema_end) == (0.9998, 0.99999)
    assert with_derived_defaults(config.to_dict())["ema_anneal_steps"] == 1000
    decoder = objective.ConvDecoder(192, config.decoder_layers, config.decoder_kernel, config.decoder_groups)
    assert objective.Learner(random_model("tiny", dim=64, depth=1, heads=1), decoder).utterance_weight == 1.0
    assert {name.split(".")[0] for name, _ in decoder.named_parameters()} == {"mask_token", "convs", "proj"}
    assert all(conv.kernel_size == (3,) and conv.groups > 1 for conv in decoder.convs)
    assert isinstance(decoder.proj, torch.nn.Linear)


def test_the_ema_covers_the_whole_encoder_state_and_only_the_encoder():
    """The teacher is the EMA of the student: every trained tensor of the encoder, and no buffer is left out
    (the encoder has none). The decoder is not part of the teacher."""
    student = random_model("tiny", dim=64, depth=1, heads=1)
    assert not list(student.buffers())
    assert set(student.state_dict()) == {name for name, _ in student.named_parameters()}
    assert [name for name, p in student.named_parameters() if not p.requires_grad] == ["pos_embed"]
