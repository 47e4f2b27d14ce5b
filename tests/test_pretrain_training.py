"""Pretraining runs: a 30-step tiny run, exact resumption, checkpoints, export, the command line, 2-process
DDP on gloo."""
import csv
import dataclasses
import gc
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import weakref
from datetime import timedelta
from pathlib import Path

import pytest
import torch

pytest.importorskip("soundfile")
from conftest import rel_err  # noqa: E402
from pretrain_corpus import tiny_config, write_corpus, write_damaged  # noqa: E402
from test_default_model import import_script  # noqa: E402

import echo  # noqa: E402
from echo import cli  # noqa: E402
from echo.pretrain import checkpoints, objective, trainer  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "data", files=8)


def rows(run):
    with open(run / "steps.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_thirty_steps_learn_and_export_a_loadable_teacher(data, tmp_path):
    run = tmp_path / "run"
    torch.manual_seed(0)  # the run's seed: its initial weights
    initial = echo.EchoModel(tiny_config(data, run).model_config).state_dict()
    result = trainer.train(tiny_config(data, run), progress=False)
    log = rows(run)
    assert [int(r["step"]) for r in log] == [5, 10, 15, 20, 25, 30]
    assert float(log[-1]["loss"]) < 0.8 * float(log[0]["loss"])
    assert all(float(r["tokens_per_s"]) > 0 and 0.9998 <= float(r["ema_decay"]) <= 0.99999 for r in log)
    student, teacher = result["student"].state_dict(), result["teacher"].state_dict()
    moved = [k for k in student if not torch.equal(student[k], teacher[k])]
    assert len(moved) == len(student) - 1  # all but the frozen pos_embed
    assert any(not torch.equal(teacher[k], initial[k]) for k in teacher)  # the EMA moved the teacher
    loaded = echo.load(run / "model.safetensors")
    assert (loaded.config.dim, loaded.config.depth, loaded.config.heads) == (64, 2, 1)
    assert_same_state(loaded.state_dict(), teacher)
    assert json.loads((run / "config.json").read_text())["tokens_per_batch"] == 400
    kept = checkpoints.checkpoint_paths(run / "checkpoints")
    assert [p.name for p in kept] == ["step-000000020.pt", "step-000000030.pt"]  # keep=2
    assert not list((run / "checkpoints").glob("*.tmp"))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_after_a_step_the_teacher_is_the_ema_of_the_trained_student_in_every_tensor(data, tmp_path, precision):
    """teacher = decay * teacher + (1 - decay) * student, the student as the step's update left it, for every
    parameter and buffer of the real step (bf16 autocast, clipping, the optimizer): not another module's tensors,
    not the student before its update."""
    decay = float(torch.empty(()).uniform_(0.3, 0.9))  # far from 1, so a tensor left out or mispaired shows
    config = tiny_config(data, tmp_path / "run", steps=1, warmup=0, lr=1e-2, ema_start=decay, ema_end=decay,
                         precision=precision)
    torch.manual_seed(config.seed)
    initial = echo.EchoModel(config.model_config).state_dict()  # the teacher before the step
    result = trainer.train(config, progress=False)
    student, teacher = result["student"].state_dict(), result["teacher"].state_dict()
    assert teacher.keys() == student.keys() == initial.keys()
    for key, value in teacher.items():
        assert torch.equal(student[key], initial[key]) == (key == "pos_embed"), key  # all but it trained
        expected = decay * initial[key].double() + (1 - decay) * student[key].double()
        assert rel_err(value, expected) < 1e-6, key


@pytest.mark.parametrize("crops", [{}, {"shortest_crop_seconds": 0.3}], ids=["fixed-crops", "random-length-crops"])
def test_a_stopped_and_resumed_run_equals_a_straight_run(data, tmp_path, crops):
    """Checkpoints fall between log rows: the row of step 4 sums steps 1-3 from before the stop and step 4."""
    settings = dict(steps=8, save_every=3, log_every=4, keep=2, **crops)
    straight = trainer.train(tiny_config(data, tmp_path / "straight", **settings), progress=False)
    first = trainer.train(tiny_config(data, tmp_path / "resumed", **settings), progress=False, stop_at=5)
    assert first["step"] == 5 and first["exported"] is None  # "killed" after step 5; last checkpoint: step 3
    resumed = trainer.train(tiny_config(data, tmp_path / "resumed", **settings), progress=False)
    assert resumed["step"] == 8
    for part in ("student", "teacher", "decoder"):
        assert_same_state(straight[part].state_dict(), resumed[part].state_dict())
    assert rows(tmp_path / "straight") == [
        {**r, "steps_per_s": a["steps_per_s"], "tokens_per_s": a["tokens_per_s"]}
        for r, a in zip(rows(tmp_path / "resumed"), rows(tmp_path / "straight"))
    ]


def alive_at_each_step(monkeypatch, loaded: list) -> list:
    """How many of the tensors `loaded` weakly refers to are alive at each step's EMA update (garbage collected
    first): a list that fills as the run goes."""
    update, alive = trainer.schedule.ema_update, []

    def ema_update(*args):
        gc.collect()
        alive.append(sum(ref() is not None for ref in loaded))
        return update(*args)

    monkeypatch.setattr(trainer.schedule, "ema_update", ema_update)
    return alive


def test_a_resumed_run_trains_without_the_checkpoint_it_resumed_from(data, tmp_path, monkeypatch):
    """The loaded checkpoint stayed referenced for the whole resumed run: its student and teacher, copied into the
    models, held 2x the encoder's weights in host memory to the end (ECHO-small: +140 MB measured on a CPU;
    ECHO-base: +650 MB, +1.3 GB with the AdamW moments a GPU run holds on the device besides)."""
    run = tmp_path / "run"
    settings = dict(steps=3, save_every=1, log_every=1)
    trainer.train(tiny_config(data, run, **settings), progress=False, stop_at=1)
    newest, loaded = checkpoints.newest_readable, []

    def recorded(folder):
        found = newest(folder)
        loaded.extend(weakref.ref(tensor) for part in ("student", "teacher", "decoder")
                      for tensor in found[0][part].values())
        return found

    monkeypatch.setattr(checkpoints, "newest_readable", recorded)
    alive = alive_at_each_step(monkeypatch, loaded)
    assert trainer.train(tiny_config(data, run, **settings), progress=False)["step"] == 3
    assert len(loaded) > 0 and alive == [0, 0]  # steps 2 and 3


def test_a_run_from_init_trains_without_the_model_it_started_from(data, tmp_path, monkeypatch):
    """The --init model, copied into the student, stayed referenced for the whole run: the encoder's weights
    once more in memory to the end, as a resumed run's checkpoint had been."""
    start = echo.save(echo.EchoModel(echo.EchoConfig.preset("tiny", dim=64, depth=2, heads=1)),
                      tmp_path / "start.safetensors")
    read, loaded = trainer.initial_encoder, []

    def recorded(config):
        model = read(config)
        loaded.extend(weakref.ref(tensor) for tensor in model.parameters())
        return model

    monkeypatch.setattr(trainer, "initial_encoder", recorded)
    alive = alive_at_each_step(monkeypatch, loaded)
    trainer.train(tiny_config(data, tmp_path / "run", steps=2, log_every=1, init=str(start)), progress=False)
    assert len(loaded) > 0 and alive == [0, 0]


def test_a_run_over_damaged_audio_reports_it_skips_it_and_finishes(tmp_path, caplog):
    damaged = write_corpus(tmp_path / "data", files=4)
    write_damaged(damaged)
    with caplog.at_level("WARNING", logger="echo.pretrain"):
        result = trainer.train(tiny_config(damaged, tmp_path / "run", steps=6, log_every=1), progress=False)
    assert result["step"] == 6 and all(float(r["loss"]) < float("inf") for r in rows(tmp_path / "run"))
    assert all(torch.isfinite(w).all() for w in echo.load(tmp_path / "run" / "model.safetensors").state_dict().values())
    reports = sorted(r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping unreadable audio"))
    assert len(reports) == 2 and "nan.wav" in reports[0] and "truncated.flac" in reports[1]


def test_a_nan_loss_stops_the_run_naming_its_step_and_keeps_the_good_checkpoints(data, tmp_path, monkeypatch):
    original = objective.Learner.forward
    calls = []

    def nan_at_step_five(self, *args):
        loss, frame, utterance = original(self, *args)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 5 else loss), frame, utterance

    monkeypatch.setattr(objective.Learner, "forward", nan_at_step_five)
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="the loss or its gradients were NaN or infinite at step 5; stopped without "
                                         "checkpointing"):
        trainer.train(tiny_config(data, run, steps=8, save_every=2, log_every=3, keep=2), progress=False)
    assert [p.name for p in checkpoints.checkpoint_paths(run / "checkpoints")] == [
        "step-000000002.pt", "step-000000004.pt"]  # step 6 (NaN weights) neither written nor rotating them out
    assert all(torch.isfinite(w).all() for w in checkpoints.load_latest(run / "checkpoints")["student"].values())
    assert [int(r["step"]) for r in rows(run)] == [3] and not (run / "model.safetensors").exists()


def test_non_finite_gradients_under_a_finite_loss_stop_the_run_too(data, tmp_path, monkeypatch):
    """bf16 can overflow in the backward pass while the loss stays finite: the update still makes NaN weights."""
    clip, calls = torch.nn.utils.clip_grad_norm_, []

    def overflow_at_step_three(*args, **kwargs):
        calls.append(1)
        norm = clip(*args, **kwargs)
        return norm * float("inf") if len(calls) == 3 else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", overflow_at_step_three)
    with pytest.raises(ValueError, match="NaN or infinite at step 3"):
        trainer.train(tiny_config(data, tmp_path / "run", steps=6, save_every=2, log_every=3), progress=False)


def test_resuming_with_another_config_is_refused(data, tmp_path):
    trainer.train(tiny_config(data, tmp_path / "run", steps=2, save_every=1), progress=False)
    with pytest.raises(ValueError, match="mask_ratio: 0.8 -> 0.75"):
        trainer.train(tiny_config(data, tmp_path / "run", steps=4, mask_ratio=0.75), progress=False)


def trained_lr(run: Path) -> float:
    """The peak lr the optimizer of a run's newest checkpoint was built with."""
    return checkpoints.load_latest(run / "checkpoints")["optimizer"]["param_groups"][0]["initial_lr"]


def test_an_lr_named_by_the_value_a_run_trained_with_resumes_it_and_another_is_refused(data, tmp_path):
    """A derived lr follows the world size, which the saved config does not hold: `--lr X` naming the lr a run
    derived was refused as "lr: None -> X", and so was a plain resume of a run whose --lr was its derived value."""
    settings = dict(steps=4, save_every=2, log_every=2)
    derived = tmp_path / "derived"
    trainer.train(tiny_config(data, derived, lr=None, **settings), progress=False, stop_at=2)
    peak = trained_lr(derived)
    assert peak != tiny_config(data, derived).lr  # not the explicit lr of the other runs
    with pytest.raises(ValueError, match=re.escape(f"(lr: derived {peak!r} -> {peak * 2!r})")):
        trainer.train(tiny_config(data, derived, lr=peak * 2, **settings), progress=False)
    assert trainer.train(tiny_config(data, derived, lr=peak, **settings), progress=False)["step"] == 4
    assert trained_lr(derived) == peak
    assert json.loads((derived / "config.json").read_text())["lr"] is None  # still resumes without --lr

    explicit = tmp_path / "explicit"
    trainer.train(tiny_config(data, explicit, lr=peak, **settings), progress=False, stop_at=2)
    assert trainer.train(tiny_config(data, explicit, lr=None, **settings), progress=False)["step"] == 4
    assert trained_lr(explicit) == peak


def test_a_run_whose_decoder_groups_do_not_divide_the_width_still_resumes_and_exports(data, tmp_path):
    """Before decoder groups had to divide the width, the decoder took gcd(groups, width) of them (width 64 and
    --decoder-groups 24: 8 groups): such a run must still resume, and its checkpoints export; a new one is refused."""
    run = tmp_path / "run"
    trainer.train(tiny_config(data, run, steps=2, save_every=1, decoder_groups=8), progress=False, stop_at=1)
    # what the older code wrote for --decoder-groups 24: the same 8-group decoder, the config as given
    path = checkpoints.checkpoint_paths(run / "checkpoints")[-1]
    saved = checkpoints.read(path)
    saved["config"]["decoder_groups"] = 24
    torch.save(saved, path)
    (run / "config.json").write_text(json.dumps(saved["config"]))
    trainer.run_encoder(run)  # the export of a saved run builds its config
    assert trainer.train(tiny_config(data, run, steps=2, save_every=1, decoder_groups=24),
                         progress=False)["step"] == 2
    with pytest.raises(ValueError, match="--decoder-groups must divide the model's width 64, got 24"):
        trainer.train(tiny_config(data, tmp_path / "new", steps=2, decoder_groups=24), progress=False)


def test_a_run_saved_before_a_config_field_existed_resumes_with_its_default(tmp_path):
    config = trainer.PretrainConfig(data=str(tmp_path), out=str(tmp_path / "run"))
    older = {k: v for k, v in config.to_dict().items() if k != "utterance_target"}
    config.check_resumable(older)  # the older run used the default, "frame-mean"
    with pytest.raises(ValueError, match="utterance_target: 'frame-mean' -> 'layer-mean'"):
        trainer.PretrainConfig(data=str(tmp_path), out=str(tmp_path / "run"),
                               utterance_target="layer-mean").check_resumable(older)
    # naming a default's value names the same run; another value does not
    defaults = trainer.PretrainConfig(data=str(tmp_path), out=str(tmp_path / "run"), steps=100).to_dict()
    trainer.PretrainConfig(data=str(tmp_path), out=str(tmp_path / "run"), steps=100, warmup=5,
                           ema_anneal_steps=100).check_resumable(defaults)
    with pytest.raises(ValueError, match="warmup: 5 -> 6"):
        trainer.PretrainConfig(data=str(tmp_path), out=str(tmp_path / "run"), steps=100,
                               warmup=6).check_resumable(defaults)
    # the preset's own width, depth and heads, named, are the preset
    trainer.PretrainConfig(data=str(tmp_path), out=str(tmp_path / "run"), steps=100, dim=192, depth=12,
                           heads=3).check_resumable(defaults)
    with pytest.raises(ValueError, match="depth: 12 -> 6"):
        trainer.PretrainConfig(data=str(tmp_path), out=str(tmp_path / "run"), steps=100,
                               depth=6).check_resumable(defaults)
    with pytest.raises(ValueError, match="utterance_target must be one of"):
        trainer.PretrainConfig(data=str(tmp_path), out=str(tmp_path / "run"), utterance_target="frames")


def test_dataloader_workers_leave_sigterm_to_the_trainer(data, tmp_path, monkeypatch):
    """torchrun and Slurm send SIGTERM to a rank's DataLoader workers too: a worker it ended first turned the
    trainer's "interrupted: the same command resumes from ..." into a traceback (DataLoader worker killed)."""
    real, made = torch.utils.data.DataLoader, []

    def recorded(*args, **kwargs):
        made.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", recorded)
    trainer.train(tiny_config(data, tmp_path / "run", steps=1, workers=1), progress=False)
    before = signal.getsignal(signal.SIGTERM)
    try:
        made[0].get("worker_init_fn", lambda worker: None)(0)  # what each worker runs as it starts
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)


def training_state(step: int) -> dict:
    """The least a checkpoint holds (checkpoints.TRAINING_STATE), for tests of the files alone."""
    return {"step": step, "config": {}, "student": {"w": torch.randn(3)}, "teacher": {}}


def test_checkpoints_are_atomic_and_a_broken_one_is_passed_over(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    checkpoints.save(folder, 1, training_state(1), keep=3)
    checkpoints.save(folder, 2, training_state(2), keep=3)

    def crash(state, path):
        with open(path, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        checkpoints.save(folder, 3, {"step": 3}, keep=3)
    monkeypatch.undo()
    assert [p.name for p in checkpoints.checkpoint_paths(folder)] == ["step-000000001.pt", "step-000000002.pt"]
    assert checkpoints.load_latest(folder)["step"] == 2
    (folder / "step-000000002.pt").write_bytes(b"truncated")
    assert checkpoints.load_latest(folder)["step"] == 1
    for step in range(3, 7):
        checkpoints.save(folder, step, {"step": step}, keep=3)
    assert [p.name for p in checkpoints.checkpoint_paths(folder)] == [f"step-00000000{s}.pt" for s in (4, 5, 6)]


def test_another_tools_file_named_as_a_checkpoint_is_passed_over_not_resumed_from(tmp_path):
    """A state dict saved as step-NNNNNNNNN.pt (a model's weights, another trainer's file) loads, and resuming from
    it ended in a KeyError traceback: it is passed over as a checkpoint that does not load."""
    folder = tmp_path / "checkpoints"
    checkpoints.save(folder, 1, training_state(1), keep=3)
    torch.save({"cls_token": torch.randn(1, 1, 4)}, folder / checkpoints.file_name(2))
    state, unreadable = checkpoints.newest_readable(folder)
    assert state["step"] == 1 and unreadable == [folder / checkpoints.file_name(2)]
    with pytest.raises(ValueError, match="is no echo pretraining checkpoint: it holds no step, config, student, "
                                         "teacher"):
        checkpoints.read(folder / checkpoints.file_name(2))


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path):
    """Files of later steps (say, a run's unreadable leftovers) neither count toward `keep` nor push out the
    newest checkpoint."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "step-000000009.pt").write_bytes(b"not this run's")
    for step in (1, 2, 3):
        checkpoints.save(folder, step, {"step": step}, keep=1)
    assert [p.name for p in checkpoints.checkpoint_paths(folder)] == ["step-000000003.pt", "step-000000009.pt"]


def test_checkpoints_that_do_not_load_stop_the_run_instead_of_restarting_it(data, tmp_path):
    run = tmp_path / "run"
    trainer.train(tiny_config(data, run, steps=6, save_every=2, log_every=2, keep=1), progress=False, stop_at=4)
    (run / "checkpoints" / "step-000000004.pt").write_bytes(b"torn")
    logged = (run / "steps.csv").read_text()
    with pytest.raises(ValueError, match=r"no checkpoint in .*checkpoints loads \(step-000000004.pt\)"):
        trainer.train(tiny_config(data, run, steps=6, save_every=2, log_every=2, keep=1), progress=False)
    assert (run / "steps.csv").read_text() == logged  # not started over from step 0


def test_newer_unreadable_checkpoints_are_set_aside_and_stale_temporaries_removed(data, tmp_path, capsys):
    run = tmp_path / "run"
    settings = dict(steps=6, save_every=2, log_every=2, keep=2)
    trainer.train(tiny_config(data, run, **settings), progress=False, stop_at=4)  # checkpoints of steps 2, 4
    folder = run / "checkpoints"
    (folder / "step-000000004.pt").write_bytes(b"torn")
    (folder / "step-000000006.pt.999999999.tmp").write_bytes(b"a write a kill interrupted")
    capsys.readouterr()
    trainer.train(tiny_config(data, run, **settings), progress=False, stop_at=3)  # resumes from step 2
    assert f"note: step-000000004.pt does not load; set aside as {folder / 'step-000000004.pt.unreadable'}" in (
        capsys.readouterr().out)
    assert sorted(p.name for p in folder.iterdir()) == [
        "step-000000002.pt", "step-000000004.pt.unreadable"]  # step 3 is no checkpoint step
    trainer.train(tiny_config(data, run, **settings), progress=False)
    assert sorted(p.name for p in folder.iterdir()) == [
        "step-000000004.pt", "step-000000004.pt.unreadable", "step-000000006.pt"]


def test_a_run_that_met_a_batch_without_readable_audio_resumes_exactly(tmp_path):
    """Planned batch 8 of this corpus holds only damaged clips and is passed over: step 9 trains on planned
    batch 9, and the checkpoint of step 9 must resume at planned batch 10, not 9."""
    damaged = write_corpus(tmp_path / "data", files=3)
    write_damaged(damaged)
    settings = dict(steps=11, save_every=9, tokens_per_batch=70)  # 70: one clip, rarely two, per batch
    straight = trainer.train(tiny_config(damaged, tmp_path / "straight", **settings), progress=False)
    trainer.train(tiny_config(damaged, tmp_path / "resumed", **settings), progress=False, stop_at=10)
    resumed = trainer.train(tiny_config(damaged, tmp_path / "resumed", **settings), progress=False)
    for part in ("student", "teacher", "decoder"):
        assert_same_state(straight[part].state_dict(), resumed[part].state_dict())


def test_resuming_on_other_data_is_refused_but_a_moved_copy_resumes(data, tmp_path):
    run = tmp_path / "run"
    trainer.train(tiny_config(data, run, steps=4, save_every=2), progress=False, stop_at=2)
    moved = shutil.copytree(data, tmp_path / "moved")
    fewer = shutil.copytree(data, tmp_path / "fewer")
    next(fewer.rglob("*.flac")).unlink()
    with pytest.raises(ValueError, match=r"fewer is not the corpus the run in .*run was trained on \(it had "
                                         r"examples 9, hash \w+; this has examples 8, hash \w+\)"):
        trainer.train(tiny_config(fewer, run, steps=4, save_every=2), progress=False)
    assert trainer.train(tiny_config(moved, run, steps=4, save_every=2), progress=False)["step"] == 4


def test_resuming_over_another_folder_whose_files_match_by_name_and_size_says_so(data, tmp_path, capsys):
    """Corpora of equal-length WAV files with systematic names (one machine's recordings and another's) match by
    name, size and length: a resume over the wrong folder passed the corpus check and went on without a word."""
    run = tmp_path / "run"
    trainer.train(tiny_config(data, run, steps=4, save_every=2), progress=False, stop_at=2)
    other = shutil.copytree(data, tmp_path / "other")
    for wav in other.rglob("*.wav"):  # other samples, the same header and size
        raw = wav.read_bytes()
        wav.write_bytes(raw[:-64] + bytes(b ^ 0xFF for b in raw[-64:]))
    capsys.readouterr()
    assert trainer.train(tiny_config(other, run, steps=4, save_every=2), progress=False)["step"] == 4
    assert (f"note: the run was trained on {data}, not {other}; their files match by name and size, so it goes on "
            f"over {other}") in capsys.readouterr().out
    trainer.train(tiny_config(other, run, steps=4, save_every=2), progress=False)  # its own folder now
    assert "note: the run was trained on" not in capsys.readouterr().out


def test_a_run_resumed_in_another_precision_says_so(data, tmp_path, capsys):
    """--precision auto is bf16 on a GPU that has it and fp32 elsewhere, and --device may change on resume: a run
    trained in bf16 went on in fp32 (or the other way) without a word."""
    run = tmp_path / "run"
    trainer.train(tiny_config(data, run, steps=4, save_every=2), progress=False, stop_at=2)
    path = checkpoints.checkpoint_paths(run / "checkpoints")[-1]
    saved = checkpoints.read(path)
    assert saved["bf16"] is False  # auto on the CPU
    torch.save({**saved, "bf16": True}, path)  # as written on a GPU with bf16
    capsys.readouterr()
    trainer.train(tiny_config(data, run, steps=4, save_every=2), progress=False)
    assert "note: the run trained in bf16 up to step 2; it goes on in fp32 (--precision auto on cpu)" in (
        capsys.readouterr().out)


def test_a_run_resumed_with_its_precision_named_or_another_goes_on(data, tmp_path, capsys):
    """An `auto` run resumed as --precision fp32 (what auto is on a CPU) was refused as another config, though the
    README says a resume in another precision goes on, with a note."""
    run = tmp_path / "run"
    trainer.train(tiny_config(data, run, steps=6, save_every=2), progress=False, stop_at=2)
    assert trainer.train(tiny_config(data, run, steps=6, save_every=2, precision="fp32"), progress=False,
                         stop_at=4)["step"] == 4
    assert "note: the run trained in" not in capsys.readouterr().out
    assert trainer.train(tiny_config(data, run, steps=6, save_every=2, precision="bf16"), progress=False)["step"] == 6
    assert "note: the run trained in fp32 up to step 4; it goes on in bf16 (--precision bf16 on cpu)" in (
        capsys.readouterr().out)


def test_a_relative_data_folder_resumed_from_another_folder_is_the_same(data, tmp_path, capsys, monkeypatch):
    """A run started on a relative --data and resumed from another working folder (the same data named from
    there) said "the run was trained on data, not ../data"."""
    run = tmp_path / "run"
    monkeypatch.chdir(data.parent)
    trainer.train(tiny_config(data.name, run, steps=4, save_every=2), progress=False, stop_at=2)
    (data.parent / "elsewhere").mkdir()
    monkeypatch.chdir(data.parent / "elsewhere")
    capsys.readouterr()
    assert trainer.train(tiny_config(f"../{data.name}", run, steps=4, save_every=2), progress=False)["step"] == 4
    assert "note: the run was trained on" not in capsys.readouterr().out


@pytest.mark.parametrize("option, value, message", [
    ("seed", 2**64, "seed must be in 0 .. 2**64 - 1, got 18446744073709551616"),
    ("lr", 0.0, "lr must be positive and finite, got 0.0"),
    ("base_lr", 0.0, "base_lr must be positive and finite, got 0.0"),
    ("lr", float("nan"), "lr must be positive and finite, got nan"),
    ("lr", float("inf"), "lr must be positive and finite, got inf"),
    ("base_lr", float("inf"), "base_lr must be positive and finite, got inf"),
    ("min_lr", -1e-5, "min_lr must be zero or more"),
    ("min_lr", float("inf"), "min_lr must be zero or more and finite, got inf"),
    ("warmup", -3, "warmup must be zero or more, got -3"),
    ("ema_anneal_steps", -5, "ema_anneal_steps must be positive, got -5"),
    ("ema_anneal_steps", 0, "ema_anneal_steps must be positive, got 0"),
    ("clip_grad", 0.0, "clip_grad must be positive, got 0.0"),
    ("utterance_weight", -1.0, "utterance_weight must be zero or more and finite, got -1.0"),
    ("utterance_weight", float("inf"), "utterance_weight must be zero or more and finite, got inf"),
    ("weight_decay", -1.0, "weight_decay must be zero or more and finite, got -1.0"),
    ("weight_decay", float("inf"), "weight_decay must be zero or more and finite, got inf"),
    ("decoder_groups", 0, "decoder_groups must be positive, got 0"),
    ("decoder_kernel", 2, "decoder_kernel must be odd and positive, got 2"),
    ("seed", -1, "seed must be in 0 .. 2**64 - 1, got -1"),
    ("workers", -1, "workers must be zero or more, got -1"),
    ("dim", 0, "invalid ECHO config: dim=0"),
    ("shortest_crop_seconds", 10.5, "shortest_crop_seconds must be in [0.2, crop_seconds = 10.0], got 10.5"),
])
def test_bad_options_are_refused_naming_them(tmp_path, option, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        trainer.PretrainConfig(data=str(tmp_path), out=str(tmp_path / "run"), **{option: value})


def test_a_bad_option_on_the_command_line_writes_nothing(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["pretrain", "--data", str(data), "--out", str(run), "--lr", "0", "--quiet"]) == 2
    assert "lr must be positive and finite, got 0.0" in capsys.readouterr().err and not run.exists()


@pytest.mark.parametrize("device, message", [
    ("foo", "device must be cpu, cuda or cuda:N, got 'foo'"),
    (f"cuda:{torch.cuda.device_count()}", f"is not on this machine: it has {torch.cuda.device_count()} CUDA GPU(s)"),
])
def test_a_device_this_machine_lacks_is_refused_without_a_traceback(data, tmp_path, capsys, device, message):
    run = tmp_path / "run"
    assert cli.main(["pretrain", "--data", str(data), "--out", str(run), "--device", device, "--quiet"]) == 2
    assert message in capsys.readouterr().err and not run.exists()


def test_a_negative_stop_at_is_refused(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["pretrain", "--data", str(data), "--out", str(run), "--stop-at", "-1", "--quiet"]) == 2
    assert "--stop-at must be zero or more, got -1" in capsys.readouterr().err and not run.exists()


def test_export_only_writes_the_encoder_the_run_chose_unless_told(data, tmp_path, capsys):
    """A run trained with --export student: --export-only alone must not overwrite its student with the teacher.
    It says which encoder of which step it wrote (past an unreadable newer checkpoint, an earlier one)."""
    run = tmp_path / "run"
    trainer.train(tiny_config(data, run, steps=2, save_every=2, export="student"), progress=False)
    saved = checkpoints.load_latest(run / "checkpoints")
    assert not torch.equal(saved["student"]["norm.weight"], saved["teacher"]["norm.weight"])
    capsys.readouterr()
    for asked, expected in ([], "student"), (["--export", "teacher"], "teacher"), (["--export", "student"], "student"):
        (run / "model.safetensors").unlink()
        assert cli.main(["pretrain", "--data", "unused", "--out", str(run), "--export-only", *asked]) == 0
        assert_same_state(echo.load(run / "model.safetensors").state_dict(), saved[expected])
        assert capsys.readouterr().out.strip().endswith(
            f"exported the {expected} of step 2 to {run / 'model.safetensors'}")
        # what the file holds is written beside it: model.json is the config alone, the same for both encoders
        assert json.loads((run / "export.json").read_text()) == {"encoder": expected, "step": 2}
    (run / "checkpoints" / checkpoints.file_name(4)).write_bytes(b"cut short")
    assert cli.main(["pretrain", "--data", "unused", "--out", str(run), "--export-only"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"exported the student of step 2 to {run / 'model.safetensors'}")


def test_an_export_the_disk_cannot_take_names_the_file_and_what_is_kept(data, tmp_path, monkeypatch):
    """A full disk at the end said "[Errno 28] No space left on device" alone: neither the file nor that the run's
    checkpoints were kept and the export could be made again."""
    run = tmp_path / "run"
    saved = trainer.model_files.save

    def full_disk(model, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer.model_files, "save", full_disk)
    with pytest.raises(OSError, match=re.escape(
            f"{run / 'model.safetensors'} could not be written ([Errno 28] No space left on device); the run's "
            f"checkpoints are kept, and the same command (or --export-only) exports it again")):
        trainer.train(tiny_config(data, run, steps=2, save_every=2), progress=False)
    assert checkpoints.checkpoint_paths(run / "checkpoints")
    monkeypatch.setattr(trainer.model_files, "save", saved)
    assert trainer.train(tiny_config(data, run, steps=2, save_every=2), progress=False)["exported"] == (
        run / "model.safetensors")


def test_a_resumed_run_exports_what_it_was_started_to_export_unless_told(data, tmp_path):
    """--export left out when resuming a student run exported the teacher at the end."""
    run = tmp_path / "run"
    trainer.train(tiny_config(data, run, steps=4, save_every=2, export="student"), progress=False, stop_at=2)
    done = trainer.train(tiny_config(data, run, steps=4, save_every=2), progress=False)  # --export not given
    assert_same_state(echo.load(run / "model.safetensors").state_dict(), done["student"].state_dict())
    assert json.loads((run / "config.json").read_text())["export"] == "student"
    fresh = trainer.train(tiny_config(data, tmp_path / "new", steps=2, save_every=2), progress=False)
    assert_same_state(echo.load(tmp_path / "new" / "model.safetensors").state_dict(), fresh["teacher"].state_dict())


def test_export_script_checks_every_input_before_writing(data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    trainer.train(tiny_config(data, run, steps=2, save_every=2, log_every=1), progress=False)
    export_default = import_script("export_default")
    monkeypatch.setattr(export_default, "REPO", tmp_path / "repo")  # --datalist's default is the repository's
    monkeypatch.chdir(tmp_path)  # ... not the working folder's
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "datalist.csv").write_text("path,split,source,licence,credit,seconds\n")
    out = tmp_path / "bundle"
    with pytest.raises(SystemExit, match=re.escape(f"--datalist {tmp_path / 'repo' / 'corpus' / 'datalist.csv'} does "
                                                   f"not exist: the export credits the audio") + ".*scripts/build_corpus.py"):
        export_default.main([str(run), "--out", str(out)])
    datalist = tmp_path / "repo" / "corpus" / "datalist.csv"
    datalist.parent.mkdir(parents=True)
    datalist.write_text("path,split,source,licence,credit,seconds\na.wav,pretrain,pkg,CC0,Someone,ninety\n")
    with pytest.raises(SystemExit, match=r"datalist.csv line 2: could not convert string to float: 'ninety'"):
        export_default.main([str(run), "--out", str(out)])
    datalist.write_text("path,split,source,licence,credit,seconds\na.wav,pretrain,pkg,CC0,Someone,90\n")
    (run / "steps.csv").rename(run / "elsewhere.csv")
    with pytest.raises(SystemExit, match=r"steps.csv does not exist"):
        export_default.main([str(run), "--out", str(out)])
    (run / "elsewhere.csv").rename(run / "steps.csv")
    (run / "checkpoints" / "step-000000002.pt").write_bytes(b"torn")
    with pytest.raises(SystemExit, match=r"checkpoint .*step-000000002.pt does not load"):
        export_default.main([str(run), "--out", str(out), "--step", "2"])
    assert not out.exists()


def test_command_line_writes_shards_trains_on_them_and_exports(data, tmp_path, capsys):
    pytest.importorskip("webdataset")
    assert cli.main(["pretrain-shards", "--data", str(data), "--out", str(tmp_path / "shards"),
                     "--per-shard", "3"]) == 0
    run = tmp_path / "run"
    argv = ["pretrain", "--data", str(tmp_path / "shards"), "--out", str(run), "--dim", "64", "--depth", "2",
            "--heads", "1", "--steps", "3", "--crop-seconds", "2", "--tokens-per-batch", "400", "--workers", "1",
            "--log-every", "1", "--save-every", "1", "--export", "student", "--quiet"]
    assert cli.main(argv + ["--stop-at", "2"]) == 0  # a time-boxed process: checkpoint at 2, no export
    assert checkpoints.load_latest(run / "checkpoints")["step"] == 2 and not (run / "model.safetensors").exists()
    first = capsys.readouterr().out
    assert '"tokens_per_batch": 400' in first and first.strip().splitlines()[-1] == (
        f"stopped at step 2 of 3 (--stop-at 2); the same command resumes from {run / 'checkpoints'}"
        f"/step-000000002.pt (step 2)")
    assert cli.main(argv) == 0  # the same command resumes and finishes
    assert checkpoints.load_latest(run / "checkpoints")["step"] == 3
    with pytest.raises(ValueError, match=r"is a pretraining checkpoint \(step 3: a student and a teacher"):
        echo.load(checkpoints.checkpoint_paths(run / "checkpoints")[-1])  # not "expected a flat dict of tensors"
    assert cli.main(argv) == 0  # once more: nothing left to train, and no "last loss nan"
    out = capsys.readouterr().out
    # a resumed run's config is config.json's: not printed again, 40 lines at every start
    assert "3 WebDataset shards" in out and "resuming at step 2" in out and '"tokens_per_batch"' not in out
    assert out.strip().splitlines()[-1] == (
        f"done: 3 steps; the run was already finished; student -> {run / 'model.safetensors'} (echo.load('{run}'), "
        f"or --model {run}); the losses in {run / 'steps.csv'}")
    student = echo.load(run / "model.safetensors")
    (run / "model.safetensors").unlink()
    assert cli.main(["pretrain", "--data", "unused", "--out", str(run), "--export-only", "--export", "student"]) == 0
    assert_same_state(echo.load(run / "model.safetensors").state_dict(), student.state_dict())
    assert cli.main(argv[:-1] + ["--mask-ratio", "1.5"]) == 2
    assert "--mask-ratio must be in (0, 1), got 1.5" in capsys.readouterr().err


def ddp_worker(rank, world, port, data, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    result = trainer.train(tiny_config(data, out, steps=4, log_every=2, save_every=4), progress=False)
    torch.save({"student": result["student"].state_dict(), "teacher": result["teacher"].state_dict(),
                "last": result["last"]}, f"{out}/rank{rank}.pt")
    assert not torch.distributed.is_initialized()  # the run destroyed the group it made


@pytest.mark.parametrize("asked, local_rank, expected", [("cuda", None, "cuda:0"), ("cuda", "1", "cuda:1"),
                                                         ("cuda:2", "1", "cuda:2")])
def test_a_plain_cuda_device_gets_this_processs_gpu_index(monkeypatch, asked, local_rank, expected):
    """torch.cuda.set_device refuses a device without an index: `--device cuda` failed on a GPU."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: chosen.append(device))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    if local_rank is not None:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    rank, world, device = trainer.setup_distributed(asked)
    assert (rank, world, device) == (0, 1, torch.device(expected)) and chosen == [torch.device(expected)]


@pytest.mark.parametrize("rendezvous_error", [
    None,  # MASTER_ADDR unset: torch's ValueError
    torch.distributed.DistStoreError("Timed out after 1801 seconds waiting for clients. 1/2 clients joined."),
])
def test_a_world_size_left_in_the_environment_is_named_with_the_way_out(monkeypatch, rendezvous_error):
    """A stale WORLD_SIZE (a shell in a cluster job's container) failed with torch's "environment variable
    MASTER_ADDR expected", or after 30 minutes with a traceback of its rendezvous: neither said why one process
    waited for others."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    if rendezvous_error is not None:
        def times_out(backend):
            raise rendezvous_error

        monkeypatch.setattr(torch.distributed, "init_process_group", times_out)
    with pytest.raises(ValueError, match=r"^WORLD_SIZE=2 and RANK=0 in the environment make this process one of a "
                                         r"2-process run, which could not be joined \(.*(MASTER_ADDR|1/2 clients).*\); "
                                         r"run it under torchrun .*, or unset WORLD_SIZE and RANK for one process$"):
        trainer.setup_distributed("cpu")
    assert not torch.distributed.is_initialized()


def test_ctrl_c_and_sigterm_end_a_process_waiting_in_the_rendezvous_at_once(monkeypatch):
    """Their Python handlers (KeyboardInterrupt, the command line's for SIGTERM) run only once torch's rendezvous
    returns: a process waiting for ranks that never came ignored both for up to 30 minutes."""
    from echo import process_group

    monkeypatch.setenv("WORLD_SIZE", "2")
    waiting = []
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend: waiting.append([signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]))
    before = signal.signal(signal.SIGTERM, cli._interrupt)
    try:
        process_group.join("gloo")
        assert waiting == [[signal.SIG_DFL, signal.SIG_DFL]]
        assert signal.getsignal(signal.SIGTERM) is cli._interrupt  # the command line's again, once joined
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.mark.parametrize("ending", [None, ValueError("no audio")])
def test_the_process_group_a_run_made_is_destroyed_when_it_finishes(tmp_path, monkeypatch, ending):
    """Under torchrun the run makes its process group: a rank that left with it alive could abort at exit
    ("terminate called without an active exception"). After an error it is left to the process's exit: destroying
    a group while other ranks wait in a collective can hang them."""
    destroyed = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(trainer.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(trainer, "setup_distributed", lambda device: (1, 2, torch.device("cpu")))
    monkeypatch.setattr(trainer.dist, "destroy_process_group", lambda: destroyed.append(True))

    def run(*args):
        if ending is not None:
            raise ending
        return {"step": 4}

    monkeypatch.setattr(trainer, "_train", run)
    config = trainer.PretrainConfig(data=str(tmp_path), out=str(tmp_path / "run"))
    if ending is None:
        assert trainer.train(config) == {"step": 4} and destroyed == [True]
    else:
        with pytest.raises(ValueError):
            trainer.train(config)
        assert destroyed == []


def failing_rank_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        trainer.raise_together(ValueError("no corpus here") if rank == 0 else None, world, torch.device("cpu"))
    except ValueError as error:
        Path(out, f"rank{rank}.txt").write_text(str(error))
    torch.distributed.destroy_process_group()


def spawn_two_ranks(worker, *args) -> None:
    """worker(rank, 2, port, *args) in two processes, on a free local port."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(worker, args=(2, port, *args), nprocs=2, join=True)


# what the other ranks say: the failed rank named, as the ranks print at once (said "their error is above", it often
# came above that error)
STOPPED_WITH_RANK_0 = "rank 0 of this run failed, so this process stopped too; the failed process prints why"


def test_an_error_on_one_rank_stops_every_rank(tmp_path):
    """Rank 0 could not open the corpus: rank 1 must stop too, not wait for it at the next collective."""
    spawn_two_ranks(failing_rank_worker, str(tmp_path))
    assert (tmp_path / "rank0.txt").read_text() == "no corpus here"
    assert (tmp_path / "rank1.txt").read_text() == STOPPED_WITH_RANK_0


def as_torchrun_rank(rank, world, port, group: bool = False) -> None:
    """This spawned process as torchrun would set up rank `rank`; with `group`, its gloo group made here, with a
    minute's timeout, not gloo's half hour, for a rank left waiting."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if group:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))


def train_noting_the_ending(config, out, rank) -> None:
    """Train, writing what this rank ended with (an exception's type and message) to OUT/rank<rank>.txt."""
    try:
        trainer.train(config, progress=False)
    except Exception as error:
        Path(out, f"rank{rank}.txt").write_text(f"{type(error).__name__}: {error}")


def full_disk(*args, **kwargs):
    raise OSError("No space left on device")


def failing_checkpoint_worker(rank, world, port, data, out):
    """A two-rank run whose rank 0 cannot write its checkpoint (a full disk)."""
    as_torchrun_rank(rank, world, port)
    checkpoints.save = full_disk
    train_noting_the_ending(tiny_config(data, out, steps=2, log_every=1, save_every=1), out, rank)
    Path(out, f"group{rank}.txt").write_text(str(torch.distributed.is_initialized()))
    gc.collect()  # the run's DDP model, in cycles of the error's frames, holds the group: freed now, not at exit


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_written_stops_every_rank(data, tmp_path):
    """Rank 0 alone stopped; rank 1 waited for it at its next collective (torchrun ends such ranks, other
    launchers need not). Stopped together, they left their group alive, which could abort them at exit."""
    spawn_two_ranks(failing_checkpoint_worker, str(data), str(tmp_path))
    assert (tmp_path / "rank0.txt").read_text() == "OSError: No space left on device"
    assert (tmp_path / "rank1.txt").read_text() == f"ValueError: {STOPPED_WITH_RANK_0}"
    assert [(tmp_path / f"group{rank}.txt").read_text() for rank in range(2)] == ["False", "False"]


def failing_log_worker(rank, world, port, data, out):
    """A two-rank run whose rank 0 cannot append to steps.csv (a full disk)."""
    as_torchrun_rank(rank, world, port, group=True)
    trainer.CsvLog.write = full_disk
    train_noting_the_ending(tiny_config(data, out, steps=2, log_every=1, save_every=2), out, rank)
    # the group is this worker's: left alive at exit, or held there by the run's DDP model in cycles of the error's
    # frames, gloo aborted the process at times (SIGABRT, "terminate called without an active exception")
    gc.collect()
    torch.distributed.barrier()  # both stopped at the same collective: none waits in another
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_a_log_row_that_cannot_be_written_stops_every_rank(data, tmp_path):
    """Rank 0 alone stopped, as a failed checkpoint once did; rank 1 waited for it at its next collective."""
    spawn_two_ranks(failing_log_worker, str(data), str(tmp_path))
    assert (tmp_path / "rank0.txt").read_text() == "OSError: No space left on device"
    assert (tmp_path / "rank1.txt").read_text() == f"ValueError: {STOPPED_WITH_RANK_0}"


def disagreeing_checkpoints_worker(rank, world, port, data, out):
    """A two-rank run stopped after step 2, resumed where rank 1's listing of the run folder misses step 2's
    checkpoint (a shared file system's stale listing on another machine)."""
    as_torchrun_rank(rank, world, port, group=True)
    config = tiny_config(data, out, steps=4, log_every=1, save_every=1)
    trainer.train(config, progress=False, stop_at=2)
    if rank == 1:
        listed = checkpoints.checkpoint_paths
        checkpoints.checkpoint_paths = lambda folder: listed(folder)[:-1]
    train_noting_the_ending(config, out, rank)
    torch.distributed.barrier()  # both refused at the same place: none waits in a collective
    torch.distributed.destroy_process_group()  # a process leaving with its group alive can abort in gloo's threads


@pytest.mark.slow
def test_ranks_that_find_different_newest_checkpoints_are_refused(data, tmp_path):
    """Each rank resumed from the newest checkpoint it saw: ranks at other steps, and weights that differ."""
    spawn_two_ranks(disagreeing_checkpoints_worker, str(data), str(tmp_path))
    for rank in range(2):
        assert (tmp_path / f"rank{rank}.txt").read_text() == (
            f"ValueError: the processes of this run found different newest checkpoints in {tmp_path / 'checkpoints'} "
            "(steps by rank: 2, 1); every process must see the same run folder")


# Each rank's audio seconds of two steps: float sums that depend on their order, (0.1 + 0.7) + (0.2 + 0.3) being
# 1.2999999999999998 and ((0.1 + 0.2) + 0.7) + 0.3 being 1.3.
SECONDS_OF_RANKS = [[0.1, 0.7], [0.2, 0.3]]


def meter_worker(rank, world, port, out):
    """Rank `rank`'s meter over two steps, read straight, and read after a stop after step 1 that restored it
    from the checkpoint's `pending`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)

    def step(meter, seconds):
        loss = torch.tensor(seconds, dtype=torch.float64)
        meter.add(loss, loss, loss, tokens=100, clips=2, seconds=seconds)

    first, second = SECONDS_OF_RANKS[rank]
    straight = trainer.Meter(torch.device("cpu"))
    step(straight, first)
    step(straight, second)
    stopped = trainer.Meter(torch.device("cpu"))
    step(stopped, first)
    checkpointed = stopped.pending(world)
    resumed = trainer.Meter(torch.device("cpu"), checkpointed, rank)
    step(resumed, second)
    torch.save({"straight": straight.read(world), "resumed": resumed.read(world)}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_a_resumed_meter_logs_the_numbers_of_a_straight_run_on_every_rank_to_the_last_bit(tmp_path):
    """A checkpoint held every rank's sums reduced into rank 0's: the resumed run added them in another order,
    and steps.csv showed audio_seconds 120.35380555555557 where the straight run had 120.35380555555555."""
    spawn_two_ranks(meter_worker, str(tmp_path))
    for rank in range(2):
        logged = torch.load(tmp_path / f"rank{rank}.pt")
        straight, resumed = logged["straight"], logged["resumed"]
        (a, b), (c, d) = SECONDS_OF_RANKS
        assert straight["audio_seconds"] == (a + b) + (c + d) and straight["clips"] == 8
        assert straight["loss"] == ((a + b) + (c + d)) / 4
        for key in ("loss", "frame_loss", "utterance_loss", "clips", "audio_seconds"):
            assert resumed[key] == straight[key], key


def test_a_checkpoint_of_the_meter_before_it_was_kept_per_rank_restores_on_rank_0():
    """Older checkpoints hold one row, every rank's sums together: rank 0 takes it, the others start at 0."""
    older = torch.arange(7, dtype=torch.float64)
    assert torch.equal(trainer.Meter(torch.device("cpu"), older, rank=0).sums, older)
    assert torch.equal(trainer.Meter(torch.device("cpu"), older, rank=1).sums, torch.zeros(7, dtype=torch.float64))


@pytest.mark.slow
def test_two_process_gloo_ddp_keeps_ranks_identical(data, tmp_path):
    spawn_two_ranks(ddp_worker, str(data), str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert_same_state(ranks[0]["student"], ranks[1]["student"])
    assert_same_state(ranks[0]["teacher"], ranks[1]["teacher"])
    assert ranks[0]["last"]["loss"] == ranks[1]["last"]["loss"]  # reduced over ranks
    assert (tmp_path / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_killed_process_resumes_exactly(data, tmp_path):
    settings = dict(steps=10, save_every=1, keep=2, log_every=1)
    straight = trainer.train(tiny_config(data, tmp_path / "straight", **settings), progress=False)
    run = tmp_path / "killed"
    argv = [sys.executable, "-m", "echo", "pretrain", "--data", str(data), "--out", str(run), "--dim", "64",
            "--depth", "2", "--heads", "1", "--steps", "10", "--crop-seconds", "2", "--tokens-per-batch", "400",
            "--clones", "2", "--lr", "1e-3", "--warmup", "5", "--workers", "0", "--save-every", "1", "--keep", "2",
            "--log-every", "1", "--quiet"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not checkpoints.checkpoint_paths(run / "checkpoints") and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoints.checkpoint_paths(run / "checkpoints"), "the run wrote no checkpoint before it was killed"
    resumed = trainer.train(tiny_config(data, run, **settings), progress=False)
    for part in ("student", "teacher", "decoder"):
        assert_same_state(straight[part].state_dict(), resumed[part].state_dict())


def test_a_schedule_its_options_cannot_honour_is_said_at_the_start(data, tmp_path, capsys):
    """A derived peak lr under --min-lr was clamped to a constant lr, and a warm-up longer than the run never
    reached its peak, both without a word."""
    trainer.train(tiny_config(data, tmp_path / "run", steps=2, save_every=2, lr=1e-6, min_lr=1e-5, warmup=5),
                  progress=False)
    printed = capsys.readouterr().out
    assert "note: --min-lr 1e-05 is above the peak lr 1e-06" in printed
    assert "note: the warm-up (5 steps) is longer than the run (2 steps)" in printed
    trainer.train(tiny_config(data, tmp_path / "plain", steps=6, save_every=6, warmup=2), progress=False)
    printed = capsys.readouterr().out
    assert "above the peak lr" not in printed and "never reached" not in printed


def test_a_run_stopped_before_its_first_checkpoint_keeps_its_export(data, tmp_path):
    run = tmp_path / "run"
    trainer.train(tiny_config(data, run, steps=4, save_every=2, export="student"), progress=False, stop_at=1)
    assert not list((run / "checkpoints").glob("*.pt"))
    done = trainer.train(tiny_config(data, run, steps=4, save_every=2), progress=False)  # --export not given
    assert json.loads((run / "config.json").read_text())["export"] == "student"
    assert_same_state(echo.load(run / "model.safetensors").state_dict(), done["student"].state_dict())


def test_each_step_trains_with_the_scheduled_lr_and_ema_decay(data, tmp_path):
    """Spec section 8 wired into the run: step k (1-based) of S trains with lr peak (k / W) during the W warm-up
    steps, then min + (peak - min) (1 + cos(pi (k - 1 - W) / (S - W))) / 2, and updates the teacher with decay
    start + (end - start) (k - 1) / A (A: ema_anneal_steps, default S); the log says both. Each checkpoint's
    optimizer holds the lr of the next step and AdamW's betas (0.9, 0.95), and its teacher is the EMA of the one
    before."""
    peak, minimum, warmup, steps, start, end = 1e-3, 1e-4, 2, 6, 0.5, 0.9
    run = tmp_path / "run"
    config = tiny_config(data, run, steps=steps, warmup=warmup, lr=peak, min_lr=minimum, ema_start=start,
                         ema_end=end, log_every=1, save_every=1, keep=steps)
    torch.manual_seed(config.seed)
    initial = echo.EchoModel(config.model_config).state_dict()
    trainer.train(config, progress=False)

    def lr(k):  # of 1-based step k
        if k <= warmup:
            return peak * k / warmup
        return minimum + (peak - minimum) * 0.5 * (1 + math.cos(math.pi * (k - 1 - warmup) / (steps - warmup)))

    logged = rows(run)
    assert [int(r["step"]) for r in logged] == list(range(1, steps + 1))
    teacher = initial
    for k in range(1, steps + 1):
        decay = start + (end - start) * (k - 1) / steps
        assert float(logged[k - 1]["lr"]) == pytest.approx(lr(k), rel=1e-9)
        assert float(logged[k - 1]["ema_decay"]) == pytest.approx(decay, rel=1e-12)
        saved = checkpoints.read(run / "checkpoints" / checkpoints.file_name(k))
        if k < steps:
            assert [group["lr"] for group in saved["optimizer"]["param_groups"]] == pytest.approx([lr(k + 1)] * 2)
        assert [tuple(group["betas"]) for group in saved["optimizer"]["param_groups"]] == [(0.9, 0.95)] * 2
        for key, value in saved["teacher"].items():
            expected = decay * teacher[key].double() + (1 - decay) * saved["student"][key].double()
            assert rel_err(value, expected) < 1e-6, (k, key)
        teacher = saved["teacher"]


def test_weight_decay_falls_on_matrices_only_and_every_trained_parameter_is_in_one_group():
    """AdamW's decay (0.05) on the weight matrices of the encoder and decoder (conv kernels included), none on
    biases, norms, the CLS and mask tokens; the frozen pos_embed in no group."""
    student = echo.EchoModel(echo.EchoConfig.preset("tiny", dim=64, depth=1, heads=1), device="cpu")
    learner = objective.Learner(student, objective.ConvDecoder(64, layers=2))
    decayed, plain = trainer.parameter_groups(learner, 0.05)
    assert (decayed["weight_decay"], plain["weight_decay"]) == (0.05, 0.0)
    names = {id(p): name for name, p in learner.named_parameters()}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    plain_names = {names[id(p)] for p in plain["params"]}
    assert not decayed_names & plain_names
    trained = {name for name, p in learner.named_parameters() if name != "student.pos_embed"}
    assert decayed_names | plain_names == trained
    for name, p in learner.named_parameters():
        if name in decayed_names:
            assert p.dim() >= 2 and not name.endswith("_token"), name
        elif name in plain_names:
            assert p.dim() == 1 or name.endswith("_token"), name
    assert {"student.cls_token", "decoder.mask_token"} <= plain_names
    assert any(name.startswith("decoder.convs") and name.endswith("weight") for name in decayed_names)


def test_the_finished_run_names_its_folder_in_a_form_to_paste(data, tmp_path, capsys):
    """The last line's `--model my run's` was three words in a shell, and `echo.load('my run's')` no Python."""
    import shlex

    run = tmp_path / "my run's"
    trainer.train(tiny_config(data, run, steps=1, warmup=0), progress=False)
    said = capsys.readouterr().out.strip().splitlines()[-1]
    model = said.split("--model ", 1)[1].split("); the losses", 1)[0]
    assert shlex.split(model) == [str(run)]
    assert eval(said.split("(echo.load(", 1)[1].split("), or", 1)[0]) == str(run)


def test_a_run_from_init_starts_from_its_weights_and_another_shape_is_refused_first(data, tmp_path):
    """--init: continued pretraining. Under a learning rate too small to move them, the first step's student and
    teacher hold the given model's weights, not random ones. A model of another shape is refused before the data
    is indexed, naming the options that make its shape; a resume does not read --init again."""
    start = echo.EchoModel(echo.EchoConfig.preset("tiny", dim=64, depth=2, heads=1))
    path = echo.save(start, tmp_path / "start.safetensors")
    run = tmp_path / "run"
    config = tiny_config(data, run, steps=2, warmup=0, lr=1e-12, min_lr=0, weight_decay=0, save_every=1,
                         init=str(path))
    trainer.train(config, progress=False, stop_at=1)
    saved = checkpoints.read(run / "checkpoints" / checkpoints.file_name(1))
    for key, value in start.state_dict().items():
        assert torch.allclose(saved["student"][key], value, atol=1e-6), key
        assert torch.allclose(saved["teacher"][key], value, atol=1e-6), key
    path.unlink()  # read once, when the run began: a resume without it goes on, and the run still names it
    trainer.train(dataclasses.replace(config, init=None), progress=False)
    assert checkpoints.read(run / "checkpoints" / checkpoints.file_name(2))["step"] == 2
    assert json.loads((run / "config.json").read_text())["init"] == str(path)
    other = tmp_path / "other"
    with pytest.raises(ValueError, match=r"dim 64, depth 2, heads 1, and this run's options make dim 64, depth 3, "
                                         r"heads 1: start it with --dim 64 --depth 2 --heads 1$"):
        trainer.train(tiny_config(data, other, depth=3, init=str(echo.save(start, tmp_path / "m.safetensors"))),
                      progress=False)
    assert not other.exists()


def test_init_of_a_preset_shape_under_overriding_shape_options_says_to_drop_them(tmp_path):
    """--init default --size tiny --heads 6 was told "start it with --size tiny", which it had been given."""
    start = echo.save(echo.EchoModel(echo.EchoConfig.preset("tiny")), tmp_path / "tiny.safetensors")
    config = tiny_config(tmp_path / "data", tmp_path / "run", init=str(start), dim=None, depth=None, heads=6)
    with pytest.raises(ValueError, match=r"heads 6: start it with --size tiny and without --heads 6$"):
        trainer.initial_encoder(config)
