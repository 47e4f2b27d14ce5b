"""The command line: `python -m echo COMMAND` (or `echo-fm COMMAND`; `echo` alone is a shell builtin).

Each command lives in the module that owns its job and exposes `add_arguments(parser)`
and `run(args) -> int`; it is listed in COMMANDS and imported only when asked for.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading
import traceback
from pathlib import Path


# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("echo.pretrain.command", "self-supervised teacher-student pretraining on an audio folder or shards"),
    "pretrain-shards": ("echo.pretrain.shards", "write an audio folder as WebDataset tar shards for pretraining"),
    "encode": ("echo.encode_files", "audio files or folders to ECHO embeddings (.npz or .parquet), resumable"),
    "eval": ("echo.eval.cli", "evaluate embeddings: anomaly detection (DCASE, or your machine's normal and "
             "test clips) or fault classification (kNN: CWRU, MAFAULDA, IDMT-ISA, or your own class folders)"),
    "demo": ("echo.demo", "anomaly detection on generated machines at four rates with the default model: table + plots"),
    "info": ("echo.info", "which backend each op uses on CPU and CUDA, and why (compiled extension, triton, env)"),
}


class CommandParser(argparse.ArgumentParser):
    """A command's parser: an argument it does not know is its own error, shown under its usage (argparse hands
    such arguments up to the top-level parser, whose usage names no command's options)."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, unknown = super().parse_known_args(args, namespace)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        return namespace, unknown

    def error(self, message):
        if _left_to_local_rank_0(on_every_rank(ValueError(message))):  # the command line's: every rank's alike
            self.exit(2)
        super().error(message)


def build_parser(argv, prog: str = "echo-fm") -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog=prog, description="ECHO embeddings for machine signals")
    parser.add_argument("--version", action="version", version=f"echo-fm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)  # `COMMAND -h` says what it does
        if name in argv:  # import a command's module only when it runs
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(run=module.run)
    return parser


def user_path(text: str) -> Path:
    """A path option as the user meant it: "~" is their home (where a shell leaves `--out=~/x` alone;
    "~nobody-here" stays as typed, as a shell leaves it, where pathlib's expanduser raises); an empty one, an unset
    variable's, is refused rather than read as the current folder."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path; give a file or folder")
    return Path(os.path.expanduser(text))


def main(argv=None, prog: str = "echo-fm") -> int:
    """`prog`: the command as the user typed it, for usage lines (`echo-fm`, or `python -m echo`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    stdout = sys.stdout
    sys.stdout = stdout and ReaderStdout(stdout)  # None when the shell closed it (`>&-`): print() then drops
    terminate = _stop_on_sigterm()
    try:
        args = build_parser(argv, prog).parse_args(argv)  # imports the command's module: Ctrl-C can come here
        if args.command != "info":  # info reports a bad setting row by row: it is where one goes to find it
            from .ops.backend import check_environment

            check_environment()
        status = args.run(args)
        if sys.stdout is not None:  # here, not only below: a full disk under `> file` is an error like any other
            sys.stdout.flush()
        return status
    except WorkKept as kept:  # the error that stopped the command, then what it kept
        status = _report(kept.__cause__)
        print(kept, file=sys.stderr)
        return status
    except (ValueError, OSError) as error:
        return _report(error)
    except KeyboardInterrupt as interrupt:  # a command that kept work says what, in the interrupt's message
        # SIGTERM's own word and status (128 + 15), which a scheduler reads: not Ctrl-C's
        word, status = ("terminated", 143) if _terminated else ("interrupted", 130)
        print(f"{word}: {interrupt}" if interrupt.args else word, file=sys.stderr)
        return status
    finally:
        if sys.stdout is not None:
            with contextlib.suppress(OSError):  # a command that failed has said so; this one would hide it
                sys.stdout.flush()
        sys.stdout = stdout
        if terminate is not None:
            signal.signal(signal.SIGTERM, terminate)


_terminated = []  # the SIGTERMs that came, as the KeyboardInterrupts they were turned into say nothing of it


def _stop_on_sigterm():
    """Make SIGTERM (a scheduler's time limit, `timeout`, `docker stop`) stop the command as Ctrl-C does, saying
    what it kept and removing its temporaries; Python's default ended it silently, mid-write. The handler it
    replaces, to restore; None where another one was set (by the program calling main) or none can be (a thread)."""
    _terminated.clear()  # a program calling main again: this command's own
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None
    return signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum, frame):
    _terminated.append(signum)
    raise KeyboardInterrupt


class WorkKept(Exception):
    """Raised by a command, `from` the error that stopped it, when it had kept finished work: its message says
    what and how to resume, and follows the error's own, however that is said."""


def on_every_rank(error: Exception) -> Exception:
    """`error`, marked as one that every process of a torchrun launch on this machine meets alike (an option's
    value, a missing input), which only the machine's first process (LOCAL_RANK 0) then prints: N processes printed
    it N times. Errors of one process's own (its GPU, its share of the work) are left unmarked, said by each."""
    error.on_every_rank = True
    return error


def _left_to_local_rank_0(error: BaseException) -> bool:
    return getattr(error, "on_every_rank", False) and int(os.environ.get("WORLD_SIZE", "1")) > 1 and \
        int(os.environ.get("LOCAL_RANK", "0")) != 0


def _report(error: BaseException) -> int:
    """Say `error` on stderr; the exit status. A ValueError is bad usage (2), an OSError the machine's, not echo's:
    a full disk, a permission, a vanished folder (1); anything else no one foresaw, a bug: its traceback (1). One
    that every process of a launch meets alike is said by the machine's first (on_every_rank)."""
    if _left_to_local_rank_0(error):
        return 2 if isinstance(error, ValueError) else 1
    if isinstance(error, ValueError):
        print(f"error: {worker_message(error)}", file=sys.stderr)
        return 2
    if isinstance(error, OSError):
        print(f"error: {error}", file=sys.stderr)
        return 1
    traceback.print_exception(error)
    return 1


def _named(error: OSError) -> OSError:
    """`error` of stdout, naming it: a bare "[Errno 28] No space left on device" read as if the command's output
    files (written whole) could not be written."""
    if error.filename is None:
        error.filename = "standard output"
    return error


class ReaderStdout:
    """stdout during a command: what its reader cannot take is not the command's failure, which would lose the
    work (encode's output is written after its skip list is printed). Text the encoding lacks (a path under
    LANG=C) is escaped, as stderr does; once the reader has gone (`| head`) the rest is dropped."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except UnicodeEncodeError:
            encoding = self.stream.encoding
            return self.write(text.encode(encoding, "backslashreplace").decode(encoding))
        except BrokenPipeError:
            self._drop()
            return len(text)
        except OSError as error:  # a full disk: the command's error; the rest is dropped, as it would fail at exit
            self._drop()
            raise _named(error)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self._drop()
        except OSError as error:  # a full disk: said once; the text kept would fail again at exit ("Exception ignored")
            self._drop()
            raise _named(error)

    def _drop(self) -> None:
        """Point the descriptor at /dev/null, so neither later writes nor the flush at exit fail."""
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, self.stream.fileno())
        os.close(null)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def worker_message(error: ValueError) -> str:
    """The error's own message. One raised in a DataLoader worker (pretraining's data) reaches this process
    wrapped by torch, the worker's traceback included: its last line is the message."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    return last.split(": ", 1)[1] if last.startswith(f"{type(error).__name__}: ") else last
