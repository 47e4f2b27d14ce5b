"""The pretraining objective: packed loss vs sequence by sequence, the student never sees a masked token,
EMA and learning-rate schedules vs hand computations."""
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
    """The same loss written per sequence, with torch.nn.TransformerEncoder layers for the teacher, the model's
    own per-band path for the student and a padded nn.Conv1d decoder."""
    dim = teacher.config.dim
    layers = torch_layers(teacher.state_dict(), dim, teacher.config.heads, teacher.config.depth).layers
    first = torch.cumsum(batch.lengths, 0) - batch.lengths
    targets, utterance_targets, bands = [], [], []
    for s, length in enumerate(batch.lengths.tolist()):
        rows = batch.patches[first[s] : first[s] + length].reshape(length, 32, 16)
        band = rows.permute(1, 0, 2).reshape(1, 32, length * 16)
        bands.append(band)
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
    masked_errors, utterance_errors = [], []
    start = 0
    for j, s in enumerate(batch.student_sequence.tolist()):
        length = int(batch.lengths[s])
        masked = batch.masked[start : start + length]
        start += length
        tokens = student.band_tokens(bands[s], batch.positions[s : s + 1])[0]
        visible = torch.cat([torch.tensor([0]), 1 + (~masked).nonzero().squeeze(1)])  # CLS + visible patches
        out = student(tokens[visible][None])[0]
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
    return frame + learner.utterance_weight * utterance, frame, utterance


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
        reference = loss_sequence_by_sequence(learner, teacher, batch, utterance_target)
    for got, expected in zip(packed, reference):
        assert rel_err(got.detach(), expected) < 1e-5
    packed[0].backward()  # and it trains: every trained parameter gets a gradient
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.parameters() if p.requires_grad)


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
