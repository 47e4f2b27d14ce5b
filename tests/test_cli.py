"""The command line: `python -m echo demo` end to end, on a small random model saved to a file (fast, and
independent of the bundled weights), and what every command shares (Ctrl-C, stdout, bad output paths)."""
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import echo
from echo import demo
from echo.cli import COMMANDS
from echo.encode_files import read_embeddings
from conftest import random_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_command_prints_the_table_and_writes_the_plots(tmp_path):
    out = tmp_path / "demo"
    model = echo.save(random_model(dim=32, depth=1, heads=2), tmp_path / "small.safetensors")
    command = ["demo", "--model", str(model), "--out", str(out), "--seed", "1"]
    run = subprocess.run([sys.executable, "-m", "echo", *command],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = {line.split()[0]: line.split() for line in run.stdout.splitlines() if line.strip()}
    for spec in demo.MACHINES:
        row = lines[spec.name]
        assert row[1:3] == [str(spec.sample_rate), "Hz"] and row[3:5] == [str(demo.TEST_CLIPS)] * 2
        assert all(0 <= float(value) <= 1 for value in row[5:7])
        assert (out / f"roc_demo_{spec.name}.png").stat().st_size > 0
        assert (out / f"projection_{spec.name}.png").stat().st_size > 0
    assert (out / "roc_demo_all-machines.png").stat().st_size > 0
    scores = (out / "scores.csv").read_text().splitlines()
    assert len(scores) == 1 + 2 * demo.TEST_CLIPS * len(demo.MACHINES)


def test_demo_command_reports_a_missing_model_and_makes_no_output_folder(tmp_path):
    run = subprocess.run([sys.executable, "-m", "echo", "demo", "--model", str(tmp_path / "none.safetensors"),
                          "--out", str(tmp_path / "plots")], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and "does not exist" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "plots").exists()


@pytest.mark.parametrize("option,message", [(["--out", "{file}"], "cannot be a folder"),
                                            (["--out", "{file}/sub"], "file is a file, not a folder"),
                                            (["--seed", "-1"], "--seed must be 0 or more, got -1")])
def test_demo_command_refuses_bad_options_before_the_work(tmp_path, option, message, monkeypatch, capsys):
    from echo import cli

    (tmp_path / "file").write_text("")
    monkeypatch.setattr(demo, "build_task", lambda *args: pytest.fail("the work started"))
    argv = ["demo", "--out", str(tmp_path / "out"), *[o.format(file=tmp_path / "file") for o in option]]
    assert cli.main(argv) == 2 and message in capsys.readouterr().err


def test_demo_command_refuses_an_empty_out_as_bad_usage(tmp_path, monkeypatch, capsys):
    """`--out "$UNSET"` wrote the demo's fifteen files into the current folder."""
    from echo import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo, "build_task", lambda *args: pytest.fail("the work started"))
    with pytest.raises(SystemExit) as exited:
        cli.main(["demo", "--out", ""])
    assert exited.value.code == 2 and "argument --out: an empty path" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_demo_command_reads_a_tilde_in_out_as_the_home_folder(tmp_path, monkeypatch, capsys):
    """`--out=~/plots`, which the shell leaves as typed, made a folder named '~' in the current one."""
    from echo import cli

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    (tmp_path / "home").mkdir()
    (tmp_path / "here").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path / "here")
    monkeypatch.setattr(demo, "build_task", stop)  # the folder is made before the work
    model = echo.save(random_model(dim=32, depth=1, heads=2), tmp_path / "small.safetensors")
    assert cli.main(["demo", "--model", str(model), "--out=~/plots"]) == 130
    assert (tmp_path / "home" / "plots").is_dir() and list((tmp_path / "here").iterdir()) == []
    assert f"nothing was written to {tmp_path / 'home' / 'plots'}/" in capsys.readouterr().err


def test_sigterm_stops_a_command_as_ctrl_c_does(tmp_path, monkeypatch, capsys):
    """SIGTERM (a scheduler's time limit, `timeout`) ended a command silently, saying nothing of what it kept. It
    says so as Ctrl-C does, under SIGTERM's own word and status (128 + 15), and Ctrl-C's stay Ctrl-C's."""
    import signal

    from echo import cli

    def terminated(*args, **kwargs):
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler), "SIGTERM would end the process at once"
        handler(signal.SIGTERM, None)  # what the signal runs

    monkeypatch.setattr(demo, "build_task", terminated)
    model = echo.save(random_model(dim=32, depth=1, heads=2), tmp_path / "small.safetensors")
    assert cli.main(["demo", "--model", str(model), "--out", str(tmp_path / "out")]) == 143
    assert f"terminated: nothing was written to {tmp_path / 'out'}/" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the process's own handling comes back
    monkeypatch.setattr(demo, "build_task", lambda *args, **kwargs: signal.raise_signal(signal.SIGINT))
    assert cli.main(["demo", "--model", str(model), "--out", str(tmp_path / "out")]) == 130
    assert f"interrupted: nothing was written to {tmp_path / 'out'}/" in capsys.readouterr().err


def test_demo_command_refuses_a_forced_backend_this_model_cannot_run_before_the_work(tmp_path, monkeypatch, capsys):
    """The setting was found by fast.encode once the clips were made, and left an empty --out behind."""
    from echo import cli

    monkeypatch.setenv("ECHO_BACKEND_ATTENTION", "csrc")  # the compiled attention takes heads of 64 only
    monkeypatch.setattr(demo, "build_task", lambda *args: pytest.fail("the work started"))
    model = echo.save(random_model(dim=32, depth=1, heads=2), tmp_path / "small.safetensors")
    assert cli.main(["demo", "--model", str(model), "--out", str(tmp_path / "out")]) == 2
    assert "ECHO_BACKEND_ATTENTION=csrc" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_demo_command_refuses_a_folder_it_cannot_write_before_the_work(tmp_path, monkeypatch, capsys):
    """A read-only --out was found only after the table was printed."""
    from echo import cli

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "out"))

    monkeypatch.setattr("tempfile.TemporaryFile", read_only)
    monkeypatch.setattr(demo, "build_task", lambda *args: pytest.fail("the work started"))
    assert cli.main(["demo", "--out", str(tmp_path / "out")]) == 2
    assert "--out " + str(tmp_path / "out") + " cannot be written: Permission denied" in capsys.readouterr().err


class _NoAudio(torch.utils.data.IterableDataset):
    def __iter__(self):
        raise ValueError("no usable audio under somewhere")


def test_an_error_raised_in_a_data_loader_worker_is_printed_as_its_own_message():
    """torch wraps a worker's exception with the worker's whole traceback; the command prints the message."""
    from echo import cli

    with pytest.raises(ValueError) as raised:
        next(iter(torch.utils.data.DataLoader(_NoAudio(), batch_size=None, num_workers=1)))
    assert "Original Traceback" in str(raised.value)
    assert cli.worker_message(raised.value) == "no usable audio under somewhere"
    assert cli.worker_message(ValueError("plain")) == "plain"


def interrupt_call(monkeypatch, owner, name: str, number: int = 1):
    """Call `number` of `owner.name` raises KeyboardInterrupt, as Ctrl-C there would (the others run it);
    returns the real function."""
    real, calls = getattr(owner, name), []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == number:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, interrupted)
    return real


def test_ctrl_c_while_the_command_loads_exits_130_without_a_traceback(monkeypatch, capsys):
    """The command's module is imported while the arguments are parsed, which took a Ctrl-C as a traceback."""
    from echo import cli

    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.importlib, "import_module", interrupted)
    assert cli.main(["info"]) == 130 and capsys.readouterr().err.startswith("interrupted")


def test_the_package_loads_torch_only_inside_the_command_so_ctrl_c_there_is_caught():
    """A Ctrl-C while `import echo` loaded torch came before any handler (a traceback): the package now defers
    torch to the command's module, which cli.main imports inside its handler (the test above)."""
    probe = ("import sys, echo, echo.cli; loaded = 'torch' in sys.modules; "
             "from echo import EchoModel, load; import echo.geometry as g; "
             "print(loaded, 'torch' in sys.modules, echo.fast.__name__, sorted(set(echo.__all__) - set(dir(echo))))")
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                           cwd=Path(__file__).resolve().parents[1]).stdout.split()
    assert shown == ["False", "True", "echo.fast", "[]"]
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        echo.no_such_name


def test_version_prints_the_packages_version(capsys):
    """`--version` was answered by "the following arguments are required: command", which names no version."""
    from echo import cli

    version = importlib.metadata.version("echo-fm")  # pip's, read by pyproject.toml from echo.__version__
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out == f"echo-fm {version}\n"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_commands_help_says_what_it_does(capsys, command):
    """`python -m echo demo -h`, the first a new user types, listed the options alone, not what the demo does."""
    from echo import cli

    with pytest.raises(SystemExit) as exited:
        cli.main([command, "-h"], prog="python -m echo")
    assert exited.value.code == 0 and COMMANDS[command][1] in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("argv, usage, error", [
    (["encode", "--bogus"], "usage: python -m echo encode [-h] [--model MODEL]", "python -m echo encode: error:"),
    (["--bogus", "info"], "usage: python -m echo [-h]", "python -m echo: error:")])
def test_an_unknown_option_is_shown_under_the_usage_of_the_parser_it_was_given_to(capsys, argv, usage, error):
    """argparse handed a command's unknown option up to the top-level parser, whose usage names no command's
    options."""
    from echo import cli

    with pytest.raises(SystemExit) as exited:
        cli.main(argv, prog="python -m echo")
    assert exited.value.code == 2
    printed = capsys.readouterr().err
    assert printed.startswith(usage) and printed.endswith(f"\n{error} unrecognized arguments: --bogus\n")


def _wav(path, seconds=0.5, rate=8000):
    from echo.data.wav import write_wav

    path.parent.mkdir(parents=True, exist_ok=True)
    write_wav(path, (0.1 * np.sin(np.arange(int(seconds * rate)) / 3)).astype(np.float32), rate)
    return path


def test_a_reader_that_went_away_neither_stops_the_command_nor_prints_a_traceback(tmp_path):
    """`encode ... | head` lost the output when the skip list broke the pipe (error: Broken pipe, exit 1), and
    a buffered stdout broke at exit ('Exception ignored ... BrokenPipeError', exit 120)."""
    _wav(tmp_path / "in" / "good.wav")
    (tmp_path / "in" / "bad.wav").write_text("not audio")
    out = tmp_path / "out.npz"
    for unbuffered, command in (("1", ["encode", str(tmp_path / "in"), "--out", str(out), "--quiet"]),
                                ("", ["info"])):
        reader, writer = os.pipe()
        os.close(reader)
        env = {**os.environ, "PYTHONUNBUFFERED": unbuffered}
        run = subprocess.run([sys.executable, "-m", "echo", *command], stdout=writer, stderr=subprocess.PIPE,
                             text=True, cwd=ROOT, env=env)
        os.close(writer)
        assert run.returncode == 0 and run.stderr == "", run.stderr
    assert set(read_embeddings(out)["files"]) == {str(tmp_path / "in" / "good.wav")}


def test_a_stdout_on_a_full_disk_is_an_error_not_a_traceback(tmp_path, monkeypatch, capsys):
    """`echo info > file` on a full disk: the flush after the command raised out of main, a traceback, and the
    text it kept failed again at exit ('Exception ignored', exit 120). Then its error named no file, as if the
    command's output files (`encode`'s, written whole) could not be written: it names standard output."""
    import errno

    from echo import cli

    target = open(tmp_path / "out.txt", "w")

    class FullDisk:
        encoding = "utf-8"

        def write(self, text):
            return len(text)

        def flush(self):
            raise OSError(errno.ENOSPC, "No space left on device")

        def fileno(self):
            return target.fileno()

    monkeypatch.setattr(sys, "stdout", FullDisk())
    assert cli.main(["info"]) == 1
    assert capsys.readouterr().err == "error: [Errno 28] No space left on device: 'standard output'\n"
    target.write("dropped")
    target.close()  # its descriptor now writes to /dev/null: the exit's flush cannot fail again
    assert (tmp_path / "out.txt").read_text() == ""


def test_text_the_terminal_cannot_show_is_escaped_not_a_failure(tmp_path):
    """Under an ASCII stdout (LANG=C without UTF-8 mode) a path's 'ü' in a printed line raised UnicodeEncodeError,
    a ValueError: exit 2 and a codec message, after the encoding."""
    _wav(tmp_path / "ü" / "a.wav")
    out = tmp_path / "ü.npz"
    run = subprocess.run([sys.executable, "-m", "echo", "encode", str(tmp_path / "ü"), "--out", str(out), "--quiet"],
                         capture_output=True, cwd=ROOT, env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert run.returncode == 0, run.stderr
    assert f"wrote {tmp_path}/\\xfc.npz: 1 file ".encode() in run.stdout and out.is_file()


@pytest.mark.parametrize("option, shown, message", [
    ("--out", "file", "file is a file, not a folder"), ("--out", "file/run", "file is a file, not a folder"),
    ("--manifest", "file/manifest.csv", "file is a file, not a folder")])
def test_pretrain_refuses_an_output_it_cannot_write_before_indexing_the_data(tmp_path, monkeypatch, capsys, option,
                                                                             shown, message):
    """They failed (error: [Errno 17] File exists, exit 1) once the whole folder had been indexed."""
    from echo import cli
    from echo.pretrain import command

    (tmp_path / "file").write_text("")
    monkeypatch.setattr(command, "train", lambda *args, **kwargs: pytest.fail("the work started"))
    options = {"--out": str(tmp_path / "run"), option: str(tmp_path / shown)}
    argv = ["pretrain", "--data", str(tmp_path), *[text for pair in options.items() for text in pair]]
    assert cli.main(argv) == 2
    assert f"{option} {tmp_path / shown} cannot be written: {tmp_path / message}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("local_rank", [0, 1])
def test_an_error_every_process_of_a_launch_meets_is_printed_by_the_machines_first_only(tmp_path, monkeypatch, capsys,
                                                                                      local_rank):
    """Under torchrun every process printed a bad option's error, or a missing input's: N processes, N copies. The
    machine's first (LOCAL_RANK 0) says it; an error of a process's own is said by each."""
    import echo.encode_files
    from echo import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    out = str(tmp_path / "e.npz")
    said = (lambda text: text) if local_rank == 0 else (lambda text: "")
    assert cli.main(["encode", "--out", out, "--batch-files", "0"]) == 2
    assert capsys.readouterr().err == said("error: --batch-files must be at least 1, got 0\n")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["encode", "--out", out, "--max-tokens", "many"])
    assert exit_.value.code == 2
    assert ("invalid int value: 'many'" in capsys.readouterr().err) == (local_rank == 0)
    assert cli.main(["pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--steps", "-3"]) == 2
    assert capsys.readouterr().err == said("error: --steps must be positive, got -3\n")

    def own_error(args):
        raise ValueError(f"device cuda:{local_rank} is not available here")
    monkeypatch.setattr(echo.encode_files, "run", own_error)
    assert cli.main(["encode", "--out", out]) == 2
    assert capsys.readouterr().err == f"error: device cuda:{local_rank} is not available here\n"
