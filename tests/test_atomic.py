import csv
import os
import threading

import pytest

from echo import atomic


def test_replacing_writes_flushes_and_renames(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    target.write_text("old")
    flushed = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (flushed.append(os.readlink(f"/proc/self/fd/{fd}")), fsync(fd)))
    with atomic.replacing(target) as temporary:
        assert temporary.parent == tmp_path and temporary != target
        temporary.write_text("new")
        assert target.read_text() == "old"
    assert target.read_text() == "new"
    # the data before the rename, then the folder's entry
    assert flushed == [str(temporary), str(tmp_path)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_an_error_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.csv"
    atomic.write_csv(target, ("a", "b"), [{"a": 1, "b": 2, "ignored": 3}])
    with pytest.raises(KeyboardInterrupt):
        with atomic.replacing(target) as temporary:
            temporary.write_text("half")
            raise KeyboardInterrupt
    assert target.read_text().splitlines() == ["a,b", "1,2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]


def test_temporaries_are_the_writers_own(tmp_path):
    names = [atomic.temporary_name(tmp_path / "x.wav")]
    thread = threading.Thread(target=lambda: names.append(atomic.temporary_name(tmp_path / "x.wav")))
    thread.start()
    thread.join()
    assert names[0] != names[1] and all(f".{os.getpid()}-" in name.name for name in names)


def test_threads_writing_one_path_at_once_each_write_whole_files(tmp_path):
    """Threads of one process shared one temporary: one's rename failed or found the other's removed, or the file
    it put in place held the other's half-written bytes."""
    target = tmp_path / "out.bin"
    start, errors, seen = threading.Barrier(3), [], []
    whole = {bytes([letter]) * 2**16 for letter in b"ab"}

    def write(letter: int) -> None:
        start.wait()
        try:
            for _ in range(40):
                with atomic.replacing(target) as temporary, open(temporary, "wb") as handle:
                    for _ in range(16):  # in pieces: the other writer meets this one mid-file
                        handle.write(bytes([letter]) * 2**12)
        except Exception as error:  # a thread's error would only be printed: asserted below
            errors.append(error)

    def read() -> None:
        start.wait()
        while any(writer.is_alive() for writer in writers):
            if target.exists():
                seen.append(target.read_bytes())

    writers = [threading.Thread(target=write, args=(letter,)) for letter in b"ab"]
    reader = threading.Thread(target=read)
    for thread in [*writers, reader]:
        thread.start()
    for thread in [*writers, reader]:
        thread.join()
    assert not errors
    assert seen and all(contents in whole for contents in seen) and target.read_bytes() in whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_a_file_gets_the_permissions_any_new_file_gets(tmp_path):
    """safetensors makes its files 0600: a model exported for others could not be loaded by them."""
    import torch
    from safetensors.torch import save_file

    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    with atomic.replacing(tmp_path / "model.safetensors") as temporary:
        save_file({"weight": torch.zeros(2)}, str(temporary))
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_the_writers_error_is_the_one_raised(tmp_path):
    """A temporary that cannot even be removed (its folder is a file) must not hide why writing failed."""
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError) as caught:
        atomic.write_text(tmp_path / "file" / "x.txt", "text")
    assert caught.value.__context__ is None


def test_a_temporary_left_under_this_process_id_is_replaced(tmp_path):
    """A killed process's temporary, when this process has its id again (a container restarts from the same
    ids), neither blocks the write nor lends it its permissions."""
    target = tmp_path / "x.txt"
    stale = atomic.temporary_name(target)
    stale.write_text("half")
    stale.chmod(0o600)
    atomic.write_text(target, "whole")
    assert target.read_text() == "whole" and not stale.exists()
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert target.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_only_the_temporaries_of_writers_that_are_gone_are_removed(tmp_path):
    dead = tmp_path / "sub" / "x.wav.999999999.tmp"  # above any pid_max
    dead.parent.mkdir()
    dead.write_bytes(b"half")
    mine = tmp_path / f"y.wav.{os.getpid()}-999999999.tmp"  # a killed process's whose id this one now has
    mine.write_bytes(b"half")
    earlier = tmp_path / f"v.wav.{os.getpid()}.tmp"  # the same, named as earlier versions named them
    earlier.write_bytes(b"half")
    gone = tmp_path / "w.wav.999999999-5.tmp"
    gone.write_bytes(b"half")
    alive = tmp_path / f"z.wav.{os.getppid()}.tmp"  # a live writer's: the parent process
    alive.write_bytes(b"being written")
    alive_thread = tmp_path / f"u.wav.{os.getppid()}-7.tmp"  # a thread of it
    alive_thread.write_bytes(b"being written")
    huge = tmp_path / "take.20240101123045.tmp"  # a date, not a process id
    huge.write_bytes(b"a user's")
    folder = tmp_path / "kit.wav.999999999.tmp"  # a folder of that name is no temporary of this module
    folder.mkdir()
    other = tmp_path / "notes.tmp"
    other.write_text("not of temporary_name's form")
    atomic.remove_abandoned(tmp_path, "*.tmp")
    assert dead.exists()  # not in the top folder
    atomic.remove_abandoned(tmp_path, "**/*.tmp")
    assert not dead.exists() and not mine.exists() and not earlier.exists() and not gone.exists()
    assert alive.exists() and alive_thread.exists() and huge.exists() and folder.is_dir() and other.exists()
    assert atomic.process_alive(os.getpid()) and not atomic.process_alive(999999999)


def test_the_temporary_another_thread_of_this_process_writes_is_kept(tmp_path):
    """This process's id on a temporary was taken for a killed process's: a thread removing abandoned temporaries
    deleted the one another thread was writing, whose rename then failed."""
    target, writing, written = tmp_path / "x.csv", threading.Event(), threading.Event()
    errors = []

    def write() -> None:
        try:
            with atomic.replacing(target) as temporary:
                temporary.write_text("whole")
                writing.set()
                written.wait(10)
        except Exception as error:  # asserted below
            errors.append(error)

    thread = threading.Thread(target=write)
    thread.start()
    try:
        assert writing.wait(10)
        atomic.remove_abandoned(tmp_path, "x.csv.*.tmp")
    finally:
        written.set()
        thread.join()
    assert not errors and target.read_text() == "whole"


def test_a_csv_holds_any_name_in_utf8_whatever_the_locale_encodes(tmp_path):
    """Written in the locale's encoding, a path 日本.wav stopped eval at scores.csv where that is cp1252 (Windows)
    or ASCII (LC_ALL=C with PYTHONUTF8=0), after every file was encoded; and über was written in cp1252."""
    import subprocess
    import sys

    names = ["日本.wav", "über,\n\"x\".wav"]
    write = ("import csv, importlib.util, sys; spec = importlib.util.spec_from_file_location('atomic', sys.argv[1]); "
             "atomic = importlib.util.module_from_spec(spec); spec.loader.exec_module(atomic); "
             f"atomic.write_csv(sys.argv[2], ['path'], [{{'path': name}} for name in {ascii(names)}])")
    environment = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0"}  # names as escapes: argv would decode them
    subprocess.run([sys.executable, "-c", write, atomic.__file__, str(tmp_path / "a.csv")], check=True,
                   env=environment)
    with open(tmp_path / "a.csv", encoding="utf-8", newline="") as handle:
        assert [row["path"] for row in csv.DictReader(handle)] == names
