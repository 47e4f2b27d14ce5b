"""Layouts and interruptions users meet with `python -m echo eval`: each once gave a silently wrong or incomplete
answer."""
from pathlib import Path

import numpy as np
import pytest

from conftest import random_model, seeded_rng
from echo.eval import datasets, embed
from echo.eval.datasets import read_audio
from test_eval_datasets import touch


MACHINE = ("train/section_00_source_train_normal_0000.wav", "test/section_00_0000.wav")


def test_a_machine_folder_or_raw_folder_given_as_data_keeps_its_name_and_split(tmp_path, monkeypatch):
    """`--data .` inside a machine folder named the machine "" (its eval labels were not found: nothing was
    measured), and a machine folder or the baseline's eval_data/raw/ given as --data made eval clips dev."""
    touch(tmp_path / "eval_data" / "raw" / "fan", *MACHINE)
    lists = tmp_path / "eval_data_list_2023.csv"
    lists.write_text("fan\nsection_00_0000.wav,section_00_source_test_anomaly_0000.wav\n")

    def clips(root):
        return {(c.split, c.machine, c.subset, c.label) for c in datasets.load("dcase2023", root, [lists]).items}

    expected = {("eval", "fan", "train", 0), ("eval", "fan", "test", 1)}
    assert clips(tmp_path / "eval_data" / "raw") == expected
    assert clips(tmp_path / "eval_data" / "raw" / "fan") == expected
    monkeypatch.chdir(tmp_path / "eval_data" / "raw" / "fan")
    assert clips(Path(".")) == expected


def test_above_the_data_folder_only_dcase_folder_names_say_the_split(tmp_path):
    """A home or project folder whose name starts with eval (evaldas/) makes no dev clip eval."""
    touch(tmp_path / "evaldas" / "data" / "fan", *MACHINE[:1], "test/section_00_source_test_anomaly_0000.wav")
    assert {c.split for c in datasets.load("dcase2023", tmp_path / "evaldas" / "data").items} == {"dev"}
    assert {c.split for c in datasets.load("dcase2023", tmp_path / "evaldas" / "data" / "fan").items} == {"dev"}


@pytest.mark.parametrize("test_folder", ["test", "source_test"])
def test_test_clips_without_training_clips_are_refused_not_left_out(tmp_path, test_folder):
    """The evaluation set's training clips are a download of their own: an eval_data/ holding test clips only was
    left out without a word, and the results held the development set alone."""
    touch(tmp_path, *(f"dev_data/fan/{name}" for name in MACHINE), f"eval_data/saw/{test_folder}/section_03_0000.wav")
    with pytest.raises(ValueError, match=f"{tmp_path / 'eval_data' / 'saw'}: test clips but no train/ folder"):
        datasets.load("dcase2023", tmp_path)
    (tmp_path / "eval_data" / "saw" / test_folder / "section_03_0000.wav").unlink()
    touch(tmp_path, f"eval_data/saw/{test_folder}/readme.txt")  # no audio: nothing is left out
    assert {c.machine for c in datasets.load("dcase2023", tmp_path).items} == {"fan"}


def test_cwru_data_without_12k_fault_files_is_named_as_such(tmp_path):
    """A folder holding only the 48 kHz or normal-baseline files failed after the model was loaded, with "no file
    could be embedded (0 failures)"."""
    touch(tmp_path, "48k_Drive_End_Bearing_Fault_Data/IR007_0.mat", "Normal_Baseline_Data/97.mat")
    with pytest.raises(ValueError, match="no 12 kHz fault file: the 2 .mat files are 48 kHz or normal baseline"):
        datasets.load("cwru", tmp_path)


def test_an_interrupted_embedding_says_what_it_kept(tmp_path, monkeypatch, capsys):
    """Ctrl-C said only "interrupted", on the progress bar's line: nothing told that the finished batches were
    kept and that the same command goes on from them."""
    soundfile = pytest.importorskip("soundfile")
    files = [tmp_path / "data" / f"{i}.wav" for i in range(3)]
    files[0].parent.mkdir()
    for path in files:
        soundfile.write(str(path), 0.3 * seeded_rng().normal(size=4000).astype(np.float32), 8000)
    model, original = random_model("tiny", depth=1), embed._encode

    def interrupted_at(call):
        calls = []

        def encode(*args, **kwargs):
            calls.append(args)
            if len(calls) == call:
                raise KeyboardInterrupt
            return original(*args, **kwargs)
        return encode

    def run():
        return embed.embed_files(model, files, read_audio, tmp_path / "cache", "key", batch_files=1)

    monkeypatch.setattr(embed, "_encode", interrupted_at(1))
    with pytest.raises(KeyboardInterrupt, match="^no batch was finished, so nothing was kept; the same command starts"):
        try:
            run()
        finally:  # where the command line prints the message: the bar's line is ended, the message starts its own
            assert capsys.readouterr().err.endswith("\n")
    monkeypatch.setattr(embed, "_encode", interrupted_at(2))
    with pytest.raises(KeyboardInterrupt) as interruption:
        run()
    folder = next((tmp_path / "cache").iterdir())
    assert str(interruption.value) == (f"embeddings of 1 file are kept in {folder}; the same command encodes only "
                                       f"the other 2")


def test_a_wav_cut_short_is_refused_and_a_streamed_ones_placeholder_is_not(tmp_path):
    """A copy cut short read as a shorter clip without a word (libsndfile notes it in its log only), and scored as
    the most anomalous clip of its folder. A streaming recorder's placeholder size in the header loses nothing."""
    import struct

    soundfile = pytest.importorskip("soundfile")
    signal = 0.1 * seeded_rng().normal(size=16000).astype(np.float32)
    whole = tmp_path / "whole.wav"
    soundfile.write(whole, signal, 16000, subtype="PCM_16")
    data = whole.read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(data[: len(data) // 3])
    held = len(data) // 3 - (data.find(b"data") + 8)
    reason = embed.read_checked(read_audio, cut)
    assert reason == f"ValueError: truncated: its header promises {2 * len(signal):,} bytes of samples, the file " \
        f"holds {held:,} (a copy or download cut short?)"
    streamed = bytearray(data)
    at = data.find(b"data") + 4
    streamed[at:at + 4] = struct.pack("<I", 0xFFFFFFFF)
    (tmp_path / "streamed.wav").write_bytes(streamed)
    np.testing.assert_array_equal(read_audio(tmp_path / "streamed.wav")[0], read_audio(whole)[0])


@pytest.mark.parametrize("container, promised", [("W64", "{riff:,} bytes"), ("RF64", "{frames:,} frames"),
                                                 ("AIFF", "{ssnd:,} bytes of sound data")], ids=["W64", "RF64", "AIFF"])
def test_a_wave64_rf64_or_aiff_file_cut_short_is_refused_as_a_wav_is(tmp_path, container, promised):
    """Only a WAV's log was read for a header promising more than the file holds: a Wave64 or RF64 copy of a long
    recording cut short, or an AIFF, read as a shorter clip with nothing said, in eval, encode and pretraining."""
    soundfile = pytest.importorskip("soundfile")
    from echo.data.formats import logged_truncation
    from echo.pretrain import corpus

    frames = 3001
    whole = tmp_path / f"whole.{container.lower()}"
    soundfile.write(whole, 0.1 * seeded_rng().standard_normal((frames, 2)), 16000, format=container, subtype="PCM_16")
    data = whole.read_bytes()
    assert logged_truncation(soundfile.info(whole)) == ""
    cut = tmp_path / f"cut.{container.lower()}"
    cut.write_bytes(data[: len(data) // 2])
    said = promised.format(riff=len(data), frames=frames, ssnd=4 * frames + 8)
    assert f"truncated: its header promises {said}, the file holds " in embed.read_checked(read_audio, cut)
    assert corpus.probe(tmp_path, cut.name).problem.startswith(f"truncated: its header promises {said}")


@pytest.mark.parametrize("channels", [1, 2])
def test_an_mp3_cut_short_is_refused_by_the_whole_and_the_block_reader(tmp_path, channels):
    """An MP3 keeps its header's frame count (its Xing tag's) when cut short, and libsndfile decodes what is there:
    a download cut short read as a shorter clip with nothing said, where a WAV cut short is refused."""
    soundfile = pytest.importorskip("soundfile")
    if "MP3" not in soundfile.available_formats():
        pytest.skip(f"this libsndfile ({soundfile.__libsndfile_version__}) has no MP3 codec")
    from echo.eval.datasets import audio_blocks

    whole = tmp_path / "whole.mp3"
    soundfile.write(whole, 0.1 * seeded_rng().standard_normal((48000, channels)), 16000, format="MP3")
    assert len(read_audio(whole)[0].T) == 48000  # whole, it decodes to what its header gives
    data = whole.read_bytes()
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(data[: len(data) // 2])
    assert soundfile.info(cut).frames == 48000  # the header as libsndfile reads it: no sign of the cut
    said = "truncated: its header promises 48,000 frames, the file holds "
    assert said in embed.read_checked(read_audio, cut)
    with pytest.raises(ValueError, match=said):
        list(audio_blocks(cut, 4096)[3])


def test_read_audio_of_a_missing_file_says_so_and_names_it(tmp_path):
    pytest.importorskip("soundfile")
    with pytest.raises(FileNotFoundError, match="missing.wav"):  # was libsndfile's "System error"
        read_audio(tmp_path / "missing.wav")


def test_read_audio_keeps_a_64_bit_float_file_in_float64(tmp_path):
    """libsndfile's float32 reading turned a double WAV's samples past float32's range into Inf, refused as "NaN or
    Inf" samples the file does not hold, and rounded away a small signal on a large offset."""
    soundfile = pytest.importorskip("soundfile")
    from echo import inputs

    samples = 1e5 + 1e-3 * seeded_rng().standard_normal((2, 800))
    samples[1, 5] = 1e300
    soundfile.write(tmp_path / "x.wav", samples.T, 16000, subtype="DOUBLE")
    soundfile.write(tmp_path / "mono.wav", samples[0], 16000, subtype="DOUBLE")
    stereo, mono = read_audio(tmp_path / "x.wav")[0], read_audio(tmp_path / "mono.wav")[0]
    np.testing.assert_array_equal(stereo, samples)
    np.testing.assert_array_equal(mono, samples[0])
    with pytest.raises(ValueError, match=r"1 sample\(s\) beyond float32's range .*channel 1, index 5"):
        inputs.as_signal(stereo, 16000)


@pytest.mark.parametrize("container, subtype", [("WAV", "GSM610"), ("AIFF", "GSM610"), ("W64", "GSM610"),
                                                ("WAV", "G721_32"), ("WAV", "NMS_ADPCM_16")])
def test_read_audio_reads_a_codec_that_cannot_seek(tmp_path, container, subtype):
    """GSM 6.10, G.721 and NMS ADPCM decode from the start only: soundfile refuses to read "all" of such a file
    ("frames must be specified for non-seekable files"), so encode and eval skipped every one."""
    soundfile = pytest.importorskip("soundfile")
    if subtype not in soundfile.available_subtypes(container):
        pytest.skip(f"this libsndfile writes no {subtype} {container}")
    path = tmp_path / f"phone.{container.lower()}"
    soundfile.write(path, 0.3 * seeded_rng().standard_normal(2001), 8000, format=container, subtype=subtype)
    expected, rate = soundfile.read(path, dtype="float32")
    signal, read_rate = read_audio(path)
    assert read_rate == rate == 8000 and signal.dtype == np.float32
    np.testing.assert_array_equal(signal, expected)


def test_an_mp3_that_decodes_a_little_short_of_its_tag_is_read_not_refused():
    """lame's own 22.05 kHz file decodes 216 frames short of its tag's count (libsndfile 1.2.2): refused as cut
    short, a healthy MP3 would be skipped; an MP3 is refused only beyond two MPEG frames short."""
    soundfile = pytest.importorskip("soundfile")
    if "MP3" not in soundfile.available_formats():
        pytest.skip(f"this libsndfile ({soundfile.__libsndfile_version__}) has no MP3 codec")
    from echo.eval.datasets import audio_blocks

    path = Path(__file__).parent / "data" / "lame-22050hz-mono.mp3"
    header = soundfile.info(path).frames
    signal, rate = read_audio(path)
    blocks = np.concatenate(list(audio_blocks(path, 4096)[3]), axis=1)
    assert rate == 22050 and 0 < header - len(signal) <= 2 * 1152 and blocks.shape == (1, len(signal))
