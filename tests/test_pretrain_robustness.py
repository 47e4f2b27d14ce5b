"""A long pretraining run stopped early, by a full disk at a checkpoint, Ctrl-C or a power cut: the work kept is
named, and the same command resumes from it. A run that cannot fit in memory is refused before it starts."""
import csv
import math
import re
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("soundfile")
from pretrain_corpus import tiny_config, write_corpus  # noqa: E402
from test_cli import interrupt_call  # noqa: E402

from echo import cli  # noqa: E402
from echo.pretrain import checkpoints, objective, trainer  # noqa: E402

# torch.save's own error when the disk fills up under it (seen on a full tmpfs)
TORCH_FULL_DISK = "[enforce fail at inline_container.cc:672] . unexpected pos 1026240 vs 1026128"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "data", files=4)


def command(data, run, quiet: bool = True) -> list[str]:
    return ["pretrain", "--data", str(data), "--out", str(run), "--dim", "64", "--depth", "2", "--heads", "1",
            "--steps", "6", "--crop-seconds", "2", "--tokens-per-batch", "400", "--clones", "2", "--lr", "1e-3",
            "--warmup", "1", "--workers", "0", "--log-every", "2", "--save-every", "2", "--keep", "3",
            *(["--quiet"] if quiet else [])]


def test_a_full_disk_at_a_checkpoint_is_an_error_naming_it_and_the_run_resumes_from_the_one_before(
        data, tmp_path, monkeypatch, capsys):
    """torch raises a RuntimeError about "unexpected pos" for a full disk: it came out of the command line as a
    traceback, without a word on what was kept."""
    real_save = torch.save

    def disk_full_after_step_2(state, path):
        if state["step"] > 2:
            path.write_bytes(b"PK half a checkpoint")
            raise RuntimeError(TORCH_FULL_DISK)
        real_save(state, path)

    run = tmp_path / "run"
    monkeypatch.setattr(torch, "save", disk_full_after_step_2)
    assert cli.main(command(data, run)) == 1
    error = capsys.readouterr().err
    assert f"error: checkpoint {run / 'checkpoints' / 'step-000000004.pt'} could not be written" in error
    assert TORCH_FULL_DISK in error and "MiB free on its disk" in error
    assert error.rstrip().endswith(f"the same command resumes from {run / 'checkpoints'}/step-000000002.pt (step 2)")
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000000002.pt"]  # no half file
    monkeypatch.undo()  # space freed
    assert cli.main(command(data, run)) == 0
    assert "resuming at step 2" in capsys.readouterr().out
    assert checkpoints.load_latest(run / "checkpoints")["step"] == 6 and (run / "model.safetensors").is_file()


def test_an_interrupted_run_says_where_the_same_command_resumes(data, tmp_path, monkeypatch, capsys):
    """Ctrl-C printed a bare "interrupted": whether any step was kept was not said."""
    run = tmp_path / "run"
    interrupt_call(monkeypatch, objective.Learner, "forward", 5)  # in step 5
    assert cli.main(command(data, run)) == 130
    assert capsys.readouterr().err.strip() == (
        f"interrupted: the same command resumes from {run / 'checkpoints'}/step-000000004.pt (step 4)")


def test_a_row_of_steps_csv_a_power_cut_zeroed_is_dropped_and_the_run_resumes(data, tmp_path, capsys):
    """Appended rows are not flushed to the disk, checkpoints are: after a power cut the row of the checkpoint's
    step can read back as NUL bytes, and resuming failed on "invalid literal for int()"."""
    run = tmp_path / "run"
    settings = dict(steps=8, save_every=2, log_every=2)
    trainer.train(tiny_config(data, run, **settings), progress=False, stop_at=6)
    lines = (run / "steps.csv").read_bytes().splitlines(keepends=True)
    assert lines[-1].startswith(b"6,")
    (run / "steps.csv").write_bytes(b"".join(lines[:-1]) + b"\0" * (len(lines[-1]) - 1) + b"\n")
    assert trainer.train(tiny_config(data, run, **settings), progress=False)["step"] == 8
    assert f"note: {run / 'steps.csv'} held 1 damaged row(s)" in capsys.readouterr().out
    with open(run / "steps.csv", newline="") as handle:
        assert [int(row["step"]) for row in csv.DictReader(handle)] == [2, 4, 8]


def test_an_error_during_training_starts_its_own_line_after_the_progress_bar(data, tmp_path, monkeypatch, capsys):
    """The bar was left open: its line had no end, and the error was printed on it ("tok_s=1796]error: ...")."""
    original, calls = objective.Learner.forward, []

    def nan_at_step_3(self, *args):
        loss, frame, utterance = original(self, *args)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), frame, utterance

    monkeypatch.setattr(objective.Learner, "forward", nan_at_step_3)
    assert cli.main(command(data, tmp_path / "run", quiet=False)) == 2
    error = capsys.readouterr().err
    assert "3/6" in error and re.search(r"^error: the loss or its gradients were NaN or infinite at step 3", error,
                                        re.MULTILINE)


def test_a_full_disk_at_a_log_row_is_an_error_naming_steps_csv_and_where_the_run_resumes(
        data, tmp_path, monkeypatch, capsys):
    """An append to steps.csv that failed came out as a bare "[Errno 28] No space left on device": neither the
    file nor the checkpoint kept was named."""
    real_writerow = csv.DictWriter.writerow

    def disk_full_at_step_4(self, row):
        if row.get("step") == 4:
            raise OSError(28, "No space left on device")
        return real_writerow(self, row)

    run = tmp_path / "run"
    monkeypatch.setattr(csv.DictWriter, "writerow", disk_full_at_step_4)
    assert cli.main(command(data, run)) == 1
    error = capsys.readouterr().err.strip()
    assert error == (f"error: {run / 'steps.csv'} could not be written ([Errno 28] No space left on device); the "
                     f"same command resumes from {run / 'checkpoints'}/step-000000002.pt (step 2)")
    monkeypatch.undo()  # space freed
    assert cli.main(command(data, run)) == 0
    with open(run / "steps.csv", newline="") as handle:
        assert [int(row["step"]) for row in csv.DictReader(handle)] == [2, 4, 6]


@pytest.mark.parametrize("blocker", ["file", "broken link"])
def test_a_checkpoints_path_that_is_not_a_folder_is_refused_before_training(data, tmp_path, capsys, blocker):
    """The run trained until its first checkpoint and failed there ("File exists")."""
    run = tmp_path / "run"
    run.mkdir()
    if blocker == "file":
        (run / "checkpoints").write_text("not a folder")
    else:
        (run / "checkpoints").symlink_to(tmp_path / "gone")
    assert cli.main(command(data, run)) == 2
    assert f"{run / 'checkpoints'} is not a folder (a file or a broken link)" in capsys.readouterr().err
    assert not (run / "steps.csv").exists()  # refused before any step


def test_decoder_groups_that_do_not_divide_the_width_are_named_as_the_option(tmp_path, monkeypatch, capsys):
    """train() checks them for a new run only (a resumed one keeps its grouping), past the command line's words for
    the config's fields: the error named the field decoder_groups."""
    monkeypatch.setattr(trainer, "open_corpus", lambda *args: pytest.fail("the corpus was indexed"))
    run = tmp_path / "run"
    assert cli.main(command(tmp_path, run) + ["--decoder-groups", "24"]) == 2
    assert capsys.readouterr().err == "error: --decoder-groups must divide the model's width 64, got 24\n"
    assert not run.exists()


def test_a_new_run_over_an_export_whose_checkpoints_are_gone_is_refused(data, tmp_path, capsys):
    """The same command after the checkpoints were deleted trained again from step 0, over the exported encoder."""
    run = tmp_path / "run"
    assert cli.main(command(data, run)) == 0
    exported = (run / "model.safetensors").read_bytes()
    for path in (run / "checkpoints").iterdir():
        path.unlink()
    assert cli.main(command(data, run)) == 2
    assert "holds an exported encoder (model.safetensors) and no checkpoint to resume" in capsys.readouterr().err
    assert (run / "model.safetensors").read_bytes() == exported
    (run / "model.safetensors").rename(run / "kept.safetensors")  # as the message says: the run starts over
    assert cli.main(command(data, run)) == 0 and (run / "model.safetensors").exists()


GIB = 2**30


@pytest.mark.parametrize("options, refusal", [
    (["--tokens-per-batch", "100000000000"],
     "--tokens-per-batch 100000000000 cannot fit in memory: a step of it needs at least 8.0 PiB of activations "
     "(--clones 4 masked copies of each token through 12 student layers of width 192 and --decoder-layers 4), "
     "besides 0.1 GiB for the weights and their training state; cpu has 8.0 GiB. By this lower bound at most 94543 "
     "tokens could fit"),
    (["--dim", "1000000", "--heads", "8"],
     "the model of --size tiny --dim 1000000 (width 1000000, 12 layers) with --decoder-layers 4 cannot fit in "
     "memory: its matrices hold 1.46e+14 weights, which with their gradients, AdamW moments and the EMA teacher "
     "need at least 2.6 PiB; cpu has 8.0 GiB. Choose a smaller model"),
    (["--size", "small", "--depth", "100000"],
     "the model of --size small --depth 100000 (width 384, 100000 layers) with --decoder-layers 4 cannot fit in "
     "memory: its matrices hold 1.77e+11 weights")])
def test_a_run_that_cannot_fit_in_memory_is_refused_before_the_corpus_is_indexed(tmp_path, monkeypatch, capsys,
                                                                                 options, refusal):
    """The budget was packed into the first batch until the machine's memory ran out (the process was killed),
    the model failed in torch's allocator: both after the corpus had been indexed."""
    monkeypatch.setattr(trainer, "device_memory", lambda device: 8 * GIB)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(trainer, "open_corpus", lambda *args: pytest.fail("the corpus was indexed"))
    run = tmp_path / "run"
    assert cli.main(["pretrain", "--data", str(tmp_path), "--out", str(run), "--device", "cpu", *options]) == 2
    assert f"error: {refusal}" in capsys.readouterr().err
    assert not run.exists()


@pytest.mark.parametrize("size, tokens, memory", [
    ("tiny", 16384, 8 * GIB), ("small", 65536, 80 * 10**9), ("base", 65536, 80 * 10**9),
    ("large", 65536, 80 * 10**9)])
def test_the_usual_runs_are_not_refused(monkeypatch, size, tokens, memory):
    """The default model's recipe on a small machine, the presets at the usual budgets on an 80 GB GPU."""
    monkeypatch.setattr(trainer, "device_memory", lambda device: memory)
    trainer.check_memory(trainer.PretrainConfig(data="d", out="o", size=size, tokens_per_batch=tokens),
                         torch.device("cuda", 0))


def test_the_processes_of_a_cpu_run_share_its_memory(monkeypatch):
    """torchrun's processes on one machine each hold a model and a step in its memory; on GPUs each has its own."""
    config = trainer.PretrainConfig(data="d", out="o", size="tiny", tokens_per_batch=65536)  # >= 5.6 GiB
    monkeypatch.setattr(trainer, "device_memory", lambda device: 16 * GIB)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    trainer.check_memory(config, torch.device("cpu"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    trainer.check_memory(config, torch.device("cuda", 0))
    with pytest.raises(ValueError, match="cpu has 16.0 GiB, shared by this machine's 4 processes. By this lower "
                                         "bound at most 46663 tokens"):
        trainer.check_memory(config, torch.device("cpu"))


def test_the_memory_of_a_gpu_is_its_own(monkeypatch):
    """Not the machine's: a run on a GPU is bounded by the GPU's memory."""
    monkeypatch.setattr(torch.cuda, "get_device_properties", {torch.device("cuda", 1): SimpleNamespace(
        total_memory=80 * 10**9)}.get)
    assert trainer.device_memory(torch.device("cuda", 1)) == 80 * 10**9


@pytest.mark.parametrize("settings", [
    dict(size="tiny"), dict(size="base", depth=1), dict(dim=64, depth=2, heads=1, decoder_layers=2, decoder_groups=6)])
def test_the_weights_counted_from_the_shapes_are_nearly_all_of_the_models_and_no_more(settings):
    """A lower bound: counted without building the model, which may not fit (groups that do not divide the width:
    a run started before they had to is built with gcd(groups, width))."""
    config = trainer.PretrainConfig(data="d", out="o", **settings)
    dim = config.model_config.dim
    student = trainer.EchoModel(config.model_config, device="cpu")
    decoder = objective.ConvDecoder(dim, config.decoder_layers, config.decoder_kernel,
                                    math.gcd(config.decoder_groups, dim), device="cpu")
    for counted, model in zip(trainer.matrix_weights(config), (student, decoder)):
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert 0.98 * trained <= counted <= trained
