"""Data-set layouts users meet that once gave a wrong number, a misleading note, or an error only after the
encoding."""
import os

import pytest

from echo.eval import datasets
from test_eval_datasets import touch


FAN = ("dev_data/fan/train/section_00_source_train_normal_0000.wav",
       "dev_data/fan/test/section_00_source_test_anomaly_0000.wav")


def test_a_test_clip_linked_to_a_bank_clip_is_refused(tmp_path):
    """test/normal/a.wav linked to normal/a.wav was scored at distance 0 from itself: a perfect normal that
    raised the AUC without a word."""
    touch(tmp_path, "normal/a.wav", "normal/b.wav", "test/anomalous/c.wav")
    (tmp_path / "test" / "normal").mkdir()
    os.symlink(tmp_path / "normal" / "a.wav", tmp_path / "test" / "normal" / "a.wav")
    with pytest.raises(ValueError, match=f"{tmp_path / 'test' / 'normal' / 'a.wav'} is the same file as "
                                         f"{tmp_path / 'normal' / 'a.wav'} \\(a test and a train clip"):
        datasets.load("folder", tmp_path)


def test_a_file_under_both_test_labels_is_refused(tmp_path):
    """One recording linked into test/normal/ and test/anomalous/ was counted twice, once per label."""
    touch(tmp_path, "normal/a.wav", "test/normal/b.wav")
    (tmp_path / "test" / "anomalous").mkdir()
    os.symlink(tmp_path / "test" / "normal" / "b.wav", tmp_path / "test" / "anomalous" / "b.wav")
    with pytest.raises(ValueError, match="is the same file as .*b.wav \\(a test and a test clip"):
        datasets.load("folder", tmp_path)


def test_a_dcase_test_clip_linked_to_a_training_clip_is_refused(tmp_path):
    touch(tmp_path, *FAN)
    os.symlink(tmp_path / FAN[0], tmp_path / "dev_data/fan/test/section_00_source_test_normal_0000.wav")
    with pytest.raises(ValueError, match="is the same file as .*section_00_source_train_normal_0000.wav"):
        datasets.load("dcase2023", tmp_path)


def test_a_test_section_without_training_clips_is_refused_before_the_encoding(tmp_path):
    """A section whose training clips are missing loaded, and failed only in scoring, after every file was
    encoded (hours on a DCASE set)."""
    touch(tmp_path, *FAN, "dev_data/fan/test/section_01_source_test_normal_0000.wav")
    with pytest.raises(ValueError, match="section_01_source_test_normal_0000.wav: dev fan section 01 has test "
                                         "clips but no training clip"):
        datasets.load("dcase2023", tmp_path)
    touch(tmp_path, "dev_data/fan/train/section_01_source_train_normal_0000.wav")
    assert {c.section for c in datasets.load("dcase2023", tmp_path).items} == {"00", "01"}


def test_macos_metadata_files_are_skipped_with_a_note(tmp_path):
    """A copy made by macOS on a USB drive holds ._<name> beside every file: they entered the bank (to fail
    as unreadable, one line each), and DCASE eval's were counted as test clips without a label."""
    touch(tmp_path, "normal/a.WAV", "normal/._a.WAV", "test/anomalous/c.wav", "test/anomalous/._c.wav",
          "normal/.DS_Store")
    data = datasets.load("folder", tmp_path)
    assert sorted(c.path.name for c in data.items) == ["a.WAV", "c.wav"]
    assert [note.split(" (")[0] for note in data.notes] == [
        f"skipped 1 macOS metadata file under {tmp_path / 'normal'}",
        f"skipped 1 macOS metadata file under {tmp_path / 'test' / 'anomalous'}"]

    root = tmp_path / "dcase"
    touch(root, "eval_data/fan/train/section_03_source_train_normal_0000.wav",
          "eval_data/fan/test/section_03_0000.wav", "eval_data/fan/test/._section_03_0000.wav")
    (root / "eval_data_list_2023.csv").write_text("fan\nsection_03_0000.wav,section_03_source_test_normal_0000.wav\n")
    data = datasets.load("dcase2023", root)
    assert sorted((c.path.name, c.label) for c in data.items) == [
        ("section_03_0000.wav", 0), ("section_03_source_train_normal_0000.wav", 0)]
    assert not any("no label" in note for note in data.notes)


def test_a_label_list_given_as_a_folder_is_named_as_a_folder(tmp_path):
    """--labels eval_data/ (the folder holding the list) was reported as a list that "does not exist"."""
    touch(tmp_path, *FAN)
    with pytest.raises(ValueError, match=f"label list {tmp_path} is a folder, not a csv file"):
        datasets.load("dcase2023", tmp_path, [tmp_path])
    with pytest.raises(ValueError, match=f"label list {tmp_path / 'gone.csv'} does not exist"):
        datasets.load("dcase2023", tmp_path, [tmp_path / "gone.csv"])
