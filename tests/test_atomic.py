import os

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


def test_temporaries_are_the_processs_own(tmp_path):
    assert str(os.getpid()) in atomic.temporary_name(tmp_path / "x.wav").name
