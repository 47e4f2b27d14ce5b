"""Pretraining data: manifest caching and bad files, WebDataset shards, crops, bands, masks, token budget."""
import itertools
import re
import shutil
import sys
import weakref

import numpy as np
import pytest
import torch

pytest.importorskip("soundfile")
import soundfile as sf  # noqa: E402
from conftest import RATE_FAMILIES, pipe_watch, seeded_rng  # noqa: E402
from independent import numpy_spectrogram  # noqa: E402
from pretrain_corpus import write_corpus, write_damaged  # noqa: E402

from echo import geometry  # noqa: E402
from echo.ops import stft as stft_ops  # noqa: E402
from echo.ops import tokens as token_ops  # noqa: E402
from echo.pretrain import corpus, sampling, shards  # noqa: E402


def test_manifest_is_cached_and_bad_files_are_skipped(tmp_path, monkeypatch, caplog):
    root = write_corpus(tmp_path / "data", files=6)
    (root / "broken.wav").write_bytes(b"RIFF not really audio")
    for name in ("short.wav", "short2.wav"):
        sf.write(root / name, np.zeros(800, dtype=np.float32), 16000)  # 0.05 s
    with caplog.at_level("WARNING", logger=corpus.log.name):
        source = corpus.FolderCorpus(root, min_seconds=1.0)
    assert source.skipped == {"unreadable": 1, "too short": 2}
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "skipping unreadable broken.wav", "skipping 2 files shorter than 1 s (--min-seconds)"]
    assert len(source.files) == 6 and len(source.items) == 7  # file 0 has two channels: two examples
    assert (root / corpus.MANIFEST_NAME).is_file()

    opened = []
    original = corpus.probe
    monkeypatch.setattr(corpus, "probe", lambda root, rel: opened.append(rel) or original(root, rel))
    again = corpus.FolderCorpus(root, min_seconds=1.0)
    assert opened == [] and [f.path for f in again.files] == [f.path for f in source.files]
    changed = source.files[1]
    sf.write(root / changed.path, np.zeros(48000, dtype=np.float32), 16000)
    third = corpus.FolderCorpus(root, min_seconds=1.0)
    assert opened == [changed.path]
    assert next(f for f in third.files if f.path == changed.path).frames == 48000


def test_a_wav_cut_short_is_unreadable_not_short_to_the_corpus_and_the_shards(tmp_path, caplog):
    """Its header says more samples than it holds: "shorter than 1 s (--min-seconds)" said of a 3 s recording cut
    in a copy, or worse, trained on as a clip it is not."""
    root = write_corpus(tmp_path / "data", files=3)
    whole = root / "whole.wav"
    sf.write(whole, 0.1 * seeded_rng().normal(size=48000).astype(np.float32), 16000, subtype="PCM_16")
    (root / "cut.wav").write_bytes(whole.read_bytes()[:40000])
    with caplog.at_level("WARNING", logger=corpus.log.name):
        source = corpus.FolderCorpus(root, min_seconds=0.5)
    cut = [r.getMessage() for r in caplog.records if "cut.wav" in r.getMessage()]
    assert cut == [f"skipping unreadable cut.wav: truncated: its header promises 96,000 bytes of samples, the file "
                   f"holds {40000 - 44:,} (a copy or download cut short?)"]
    assert source.skipped["unreadable"] == 1 and "whole.wav" in {f.path for f in source.files}
    with caplog.at_level("WARNING", logger=shards.log.name):
        assert shards.shard_sample(root, 0, "cut.wav") is None and shards.shard_sample(root, 1, "whole.wav")
    assert any("leaving out cut.wav" in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)


def test_mp3_and_rf64_files_are_pretraining_data_and_an_mp3_no_decoder_reads_is_named(tmp_path, monkeypatch, caplog):
    """Folders of MP3 or RF64 recordings were no audio to pretraining; under a libsndfile without MP3 (before 1.1)
    an MP3 is skipped with that reason, not as "Format not recognised"."""
    if "MP3" not in sf.available_formats():
        pytest.skip(f"this libsndfile ({sf.__libsndfile_version__}) has no MP3 codec")
    root = tmp_path / "data"
    root.mkdir()
    sf.write(root / "a.mp3", 0.1 * seeded_rng().normal(size=24000), 24000, format="MP3")
    sf.write(root / "b.rf64", 0.1 * seeded_rng().normal(size=(20000, 2)), 16000, format="RF64")
    source = corpus.FolderCorpus(root, min_seconds=0.5)
    assert sorted((f.path, f.sample_rate, f.frames, f.channels) for f in source.files) == [
        ("a.mp3", 24000, 24000, 1), ("b.rf64", 16000, 20000, 2)]
    crop = next(source.examples(0, 0, 1))  # read through the same decoder
    assert np.isfinite(crop.read(0, 1000)).all()
    info = sf.info

    def without_mp3(path, *args):
        if str(path).endswith(".mp3"):
            raise sf.LibsndfileError(1, "Format not recognised")  # a libsndfile's words for an MP3 it cannot read
        return info(path, *args)

    monkeypatch.setattr(sf, "available_formats", lambda: {"WAV": "Microsoft WAV", "RF64": "RF64 WAV"})
    monkeypatch.setattr(sf, "info", without_mp3)
    (root / corpus.MANIFEST_NAME).unlink()
    with caplog.at_level("WARNING", logger=corpus.log.name):
        assert [f.path for f in corpus.FolderCorpus(root, min_seconds=0.5).files] == ["b.rf64"]
    assert (f"skipping unreadable a.mp3: this soundfile's libsndfile ({sf.__libsndfile_version__}) reads no MP3 "
            f"files: pip install -U soundfile (its wheels bring a libsndfile that does)") in [
        r.getMessage() for r in caplog.records]


def test_folder_examples_read_the_right_channel_and_split_across_streams(tmp_path):
    root = write_corpus(tmp_path / "data", files=6)
    source = corpus.FolderCorpus(root, min_seconds=1.0)
    epoch = [list(itertools.islice(source.examples(0, p, 3), len(range(p, len(source.items), 3)))) for p in range(3)]
    keys = [e.key for part in epoch for e in part]
    assert sorted(keys) == sorted(f"{f.path}:{c}" for f, c in source.items)  # each example once per epoch
    stereo = next(e for e in itertools.chain(*epoch) if e.key.endswith(":1"))
    data, rate = sf.read(root / stereo.key.rsplit(":", 1)[0], dtype="float32", always_2d=True)
    np.testing.assert_array_equal(stereo.read(100, 500), data[100:600, 1])
    assert stereo.sample_rate == rate and stereo.frames == len(data)


@pytest.mark.parametrize("container, subtype", [("WAV", "GSM610"), ("AIFF", "GSM610"), ("W64", "GSM610"),
                                                ("WAV", "G721_32")])
def test_crops_of_a_codec_that_cannot_seek_are_read_from_the_folder_and_the_shards(tmp_path, monkeypatch, container,
                                                                                   subtype):
    """libsndfile refuses any seek in GSM 6.10 and G.721 (they decode from the start only): every crop of such a file
    was dropped as unreadable ("Seek attempted on unseekable file type"), so it was indexed but never trained on."""
    monkeypatch.setattr(corpus, "SKIP_BLOCK", 1000)  # the frames before a crop: dropped in blocks
    root, name = tmp_path / "data", f"call.{container.lower()}"
    root.mkdir()
    sf.write(root / name, 0.3 * seeded_rng().standard_normal(8001), 8000, format=container, subtype=subtype)
    data, _ = sf.read(root / name, dtype="float32")
    frames = corpus.FolderCorpus(root, min_seconds=0.5).files[0].frames
    member = shards.shard_sample(root, 0, name)[container.lower()]
    for read in (corpus.FolderCorpus._reader(root / name, 8000, frames, 0),
                 corpus.decoded_reader(member, 8000, frames, 0, "shard sample", "its JSON member")):
        for start, count in ((0, 400), (2999, 1001), (len(data) - 300, 300)):
            np.testing.assert_array_equal(read(start, count), data[start : start + count])


def test_shards_round_trip(tmp_path):
    pytest.importorskip("webdataset")
    root = write_corpus(tmp_path / "data", files=6)
    (root / "broken.wav").write_bytes(b"junk")
    written = shards.write_shards(root, tmp_path / "shards", per_shard=2)
    assert len(written) == 3 and not list((tmp_path / "shards").glob("*.tmp"))
    assert shards.is_shards(tmp_path / "shards") and not shards.is_shards(root)
    folder = corpus.FolderCorpus(root, min_seconds=1.0)
    source = shards.open_corpus(str(tmp_path / "shards" / "shard-{000000..000002}.tar"), min_seconds=1.0)
    assert isinstance(source, shards.ShardCorpus)
    streams = [list(itertools.islice(source.examples(0, p, 3), 1)) for p in range(3)]  # one shard each
    from_shards = {}
    for p in range(3):
        epoch = itertools.islice(source.examples(0, p, 3), 3)
        for example in epoch:
            from_shards.setdefault(example.key, example)
    assert all(streams)
    assert len(from_shards) == len(folder.items)
    for entry, channel in folder.items:
        example = from_shards[f"{shards.sample_key(folder.files.index(entry), entry.path)}:{channel}"]
        assert (example.sample_rate, example.frames) == (entry.sample_rate, entry.frames)
        data, _ = sf.read(root / entry.path, dtype="float32", always_2d=True)
        np.testing.assert_array_equal(example.read(7, 300), data[7:307, channel])


def test_a_short_shard_sample_is_reported_in_the_first_epoch_only(tmp_path, caplog):
    pytest.importorskip("webdataset")
    root = write_corpus(tmp_path / "data", files=2)
    sf.write(root / "short.wav", np.zeros(8000, dtype=np.float32), 16000)  # 0.5 s: written, too short to train
    shards.write_shards(root, tmp_path / "shards", per_shard=10, min_seconds=0.1)
    source = shards.ShardCorpus(tmp_path / "shards", min_seconds=1.0)
    with caplog.at_level("WARNING", logger=shards.log.name):
        examples = list(itertools.islice(source.examples(0, 0, 1), 12))  # three epochs of four channels
    key = shards.sample_key(2, "short.wav")  # after machine0/clip0.wav and machine1/clip1.flac
    assert not any(e.key.startswith(key) for e in examples)
    assert [r.getMessage() for r in caplog.records] == [f"skipping shard sample {key}: 0.500 s is shorter than 1 s"]


def test_too_few_shards_for_the_streams_is_a_clear_error(tmp_path):
    pytest.importorskip("webdataset")
    root = write_corpus(tmp_path / "data", files=2)
    shards.write_shards(root, tmp_path / "shards", per_shard=10)
    source = shards.ShardCorpus(tmp_path / "shards", min_seconds=1.0)
    with pytest.raises(ValueError, match="1 shard cannot feed 4 streams"):
        sampling.BatchStream(source, sampling.SamplingConfig(crop_seconds=2, tokens_per_batch=400), 0, workers=4)


@pytest.mark.parametrize("data", ["shard-{000000..000001}.tar", "shard-000000.tar", "."])
def test_shards_without_webdataset_name_the_extra_before_the_training(tmp_path, monkeypatch, capsys, data):
    """A brace pattern or one .tar file imported braceexpand (a webdataset dependency) first: a traceback; a folder
    of shards built the model and started the progress bar before saying that webdataset was missing."""
    from echo import cli

    for name in ("shard-000000.tar", "shard-000001.tar"):
        (tmp_path / name).write_bytes(b"")
    for module in ("webdataset", "braceexpand"):
        monkeypatch.setitem(sys.modules, module, None)  # importing it now raises ImportError
    monkeypatch.chdir(tmp_path)
    assert cli.main(["pretrain", "--data", data, "--out", "run", "--device", "cpu", "--workers", "0"]) == 2
    captured = capsys.readouterr()
    assert "webdataset: pip install 'echo-fm[data]'" in captured.err and "Traceback" not in captured.err
    assert "steps" not in captured.out + captured.err  # stopped before the training's first line


@pytest.mark.parametrize("command, options", [("pretrain", ["--device", "cpu", "--workers", "0", "--quiet"]),
                                               ("pretrain-shards", [])])
def test_an_indexed_folder_without_soundfile_names_the_extra_before_the_run_folder_is_written(tmp_path, monkeypatch,
                                                                                               capsys, command,
                                                                                               options):
    """Its cached manifest needs no soundfile to read: the run wrote config.json and built its model, and stopped
    at its first crop; pretrain-shards wrote its plan and started its bar, and stopped at its first file."""
    from echo import cli

    corpus.FolderCorpus(write_corpus(tmp_path / "data", files=2), min_seconds=1.0)  # caches the manifest
    monkeypatch.setitem(sys.modules, "soundfile", None)  # importing it now raises ImportError
    assert cli.main([command, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), *options]) == 2
    assert "soundfile: pip install 'echo-fm[data]'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_masks_keep_the_exact_ratio_and_the_student_sees_only_visible_patches(tmp_path):
    root = write_corpus(tmp_path / "data", files=5, seconds=(3, 12))
    ratio = float(np.random.uniform(0.75, 0.8))
    config = sampling.SamplingConfig(crop_seconds=10, tokens_per_batch=1500, clones=3, mask_ratio=ratio)
    stream = sampling.BatchStream(corpus.FolderCorpus(root, 1.0), config, seed=int(torch.randint(0, 999, ())))
    for batch in itertools.islice(iter(stream), 3):
        assert batch.teacher_tokens <= config.tokens_per_batch
        decoder_lengths = batch.lengths[batch.student_sequence]
        assert len(batch.student_sequence) == config.clones * len(batch.lengths)
        start = 0
        for j, length in enumerate(decoder_lengths.tolist()):
            masked = batch.masked[start : start + length]
            assert int(masked.sum()) == round(ratio * length)  # exactly, per sequence and clone
            assert int(batch.student_lengths[j]) == length - int(masked.sum()) + 1  # visible + CLS
            start += length
        # the student's rows are exactly the unmasked decoder rows; none of them is masked
        assert not batch.masked[batch.visible_rows].any()
        assert sorted(batch.visible_rows.tolist() + batch.masked_rows.tolist()) == list(range(len(batch.masked)))
        assert int(batch.student_lengths.sum()) == batch.student_tokens


@pytest.mark.parametrize("seconds", [0.15, 0.0, 20.5])
def test_a_crop_with_no_token_to_mask_or_past_one_pass_is_refused(seconds):
    """At 0.15 s every band sequence is one patch: nothing was masked and the frame loss was NaN."""
    with pytest.raises(ValueError, match=r"crop_seconds must be in \[0.2, 20\]"):
        sampling.SamplingConfig(crop_seconds=seconds)
    crop = sampling.SamplingConfig(crop_seconds=sampling.MIN_CLIP_SECONDS, tokens_per_batch=400, clones=1)
    assert crop.max_clip_patches == 2 and sampling.masked_count(crop.max_clip_patches, crop.mask_ratio) >= 1


def test_ratio_over_a_ten_second_band_is_in_the_spec_range():
    patches = geometry.n_patches(geometry.n_frames(160000, 16000))
    assert 0.75 <= sampling.masked_count(patches, 0.8) / patches <= 0.8


def test_batches_fill_the_token_budget_and_mix_rates(tmp_path):
    root = write_corpus(tmp_path / "data", files=10)
    config = sampling.SamplingConfig(crop_seconds=2, tokens_per_batch=300, clones=1)
    examples = corpus.FolderCorpus(root, 1.0).examples(0, 0, 1)
    plans = list(itertools.islice(sampling.plan_batches(examples, np.random.default_rng(1), config), 8))
    for batch, following in zip(plans, plans[1:]):
        used = sum(clip.tokens for clip in batch)
        assert used <= config.tokens_per_batch < used + following[0].tokens
    assert any(len({clip.example.sample_rate for clip in batch}) > 1 for batch in plans)
    for clip in itertools.chain(*plans):
        assert config.min_bands <= len(clip.band_starts) <= config.max_bands
        assert max(clip.band_starts) <= geometry.n_bins(clip.example.sample_rate) - geometry.BAND_BINS


def test_band_patches_and_positions_come_from_each_bands_own_bins(tmp_path):
    root = write_corpus(tmp_path / "data", files=5)
    config = sampling.SamplingConfig(crop_seconds=2, tokens_per_batch=400, clones=1)
    source = corpus.FolderCorpus(root, 1.0)
    clip = sampling.draw_clip(next(source.examples(0, 0, 1)), seeded_rng(), config)
    batch = sampling.materialise([clip], clones=1)
    rate = clip.example.sample_rate
    spec = numpy_spectrogram(clip.example.read(clip.start, clip.samples), rate)
    frames = spec.shape[1]
    for s, start in enumerate(clip.band_starts):  # one clip: all bands have the same length, order kept
        rows = batch.patches[batch.patch_sequence == s].reshape(-1, 32, 16).permute(1, 0, 2).reshape(32, -1)
        np.testing.assert_allclose(rows[:, :frames].numpy(), spec[start : start + 32], atol=2e-5)
        assert not rows[:, frames:].any()  # zero time padding of the last patch
        centre = start + 15.5  # 32 real bins from `start`
        assert batch.positions[s].item() == pytest.approx(centre * rate / geometry.n_fft(rate) / (rate / 2), rel=1e-6)


def test_patches_equal_those_cut_from_the_whole_spectrogram(tmp_path):
    root = write_corpus(tmp_path / "data", files=6)
    config = sampling.SamplingConfig(crop_seconds=2, clones=1)
    examples = itertools.islice(corpus.FolderCorpus(root, 1.0).examples(0, 0, 1), 7)
    plans = [sampling.draw_clip(example, seeded_rng(), config) for example in examples]
    images = []
    for plan in plans:
        rate = plan.example.sample_rate
        spec = stft_ops.spectrogram(torch.from_numpy(plan.example.read(plan.start, plan.samples)), rate)
        images += [token_ops.band_patches(sampling.band_image(spec, rate, start)[0]) for start in plan.band_starts]
    order = torch.sort(torch.tensor([len(image) for image in images]), stable=True).indices
    assert torch.equal(sampling.materialise(plans, clones=1).patches, torch.cat([images[i] for i in order]))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_continues_with_the_same_batches(tmp_path, workers):
    root = write_corpus(tmp_path / "data", files=6)
    config = sampling.SamplingConfig(crop_seconds=2, tokens_per_batch=300, clones=2)
    source = corpus.FolderCorpus(root, 1.0)

    def batches(consumed, count):
        stream = sampling.BatchStream(source, config, seed=3, workers=workers, consumed=consumed)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
        return list(itertools.islice(loader, count))

    straight = batches(0, 5)
    resumed = batches(3, 2)
    for a, b in zip(straight[3:], resumed):
        assert torch.equal(a.patches, b.patches) and torch.equal(a.masked, b.masked)
        assert torch.equal(a.positions, b.positions)


@pytest.mark.parametrize("from_shards", [False, True])
def test_clips_that_cannot_be_read_are_dropped_and_their_file_reported_once(tmp_path, caplog, from_shards):
    root = write_corpus(tmp_path / "data", files=4)
    write_damaged(root)
    source = corpus.FolderCorpus(root, min_seconds=1.0)
    assert source.skipped == {"unreadable": 0, "too short": 0}  # the headers hide the damage
    if from_shards:
        pytest.importorskip("webdataset")
        shards.write_shards(root, tmp_path / "shards", per_shard=10)
        source = shards.ShardCorpus(tmp_path / "shards", min_seconds=1.0)
    config = sampling.SamplingConfig(crop_seconds=2, tokens_per_batch=300, clones=1)

    def batches(consumed, count):
        return list(itertools.islice(sampling.BatchStream(source, config, seed=0, consumed=consumed), count))

    with caplog.at_level("WARNING", logger=corpus.log.name):
        straight = batches(0, 12)
    reports = sorted(r.getMessage() for r in caplog.records)
    assert len(reports) == 2, reports  # each damaged file once, however many of its crops were dropped
    assert "nan" in reports[0] and reports[0].endswith(": NaN or infinite samples")
    assert "truncated" in reports[1]
    assert all(torch.isfinite(batch.patches).all() for batch in straight)
    # dropping a clip leaves the plan alone: a resumed stream still replays the same batches
    for a, b in zip(straight[8:], batches(8, 4)):
        assert torch.equal(a.patches, b.patches) and torch.equal(a.masked, b.masked)


def test_a_resumed_stream_skips_the_planned_batches_it_trained_on_with_passed_over_ones(tmp_path):
    """At 70 tokens a batch holds one clip, so a damaged clip leaves a planned batch empty and passed over. Each
    batch names its stream and plan index; the positions they give resume both workers' streams exactly."""
    root = write_corpus(tmp_path / "data", files=3)
    write_damaged(root)
    source = corpus.FolderCorpus(root, 1.0)
    config = sampling.SamplingConfig(crop_seconds=2, tokens_per_batch=70, clones=1)

    def batches(consumed, positions, count):
        stream = sampling.BatchStream(source, config, seed=0, workers=2, consumed=consumed, positions=positions)
        return list(itertools.islice(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2), count))

    straight = batches(0, None, 9)
    positions = [0, 0]
    for batch in straight[:5]:
        positions[batch.stream] = batch.plan_index + 1
    assert positions != [sampling.batches_to_skip(5, stream, 2) for stream in (0, 1)]  # batches were passed over
    for a, b in zip(straight[5:], batches(5, positions, 4), strict=True):
        assert (a.stream, a.plan_index) == (b.stream, b.plan_index) and torch.equal(a.patches, b.patches)


def test_a_crop_read_short_or_with_infinite_samples_is_unreadable():
    def read(samples):
        return lambda: np.asarray(samples, dtype=np.float32)

    assert corpus.checked_read("x.wav", read([0.1, 0.2]), 2).tolist() == pytest.approx([0.1, 0.2])
    with pytest.raises(corpus.UnreadableAudio, match="x.wav: 1 of 2 samples read"):
        corpus.checked_read("x.wav", read([0.1]), 2)
    with pytest.raises(corpus.UnreadableAudio, match="x.wav: NaN or infinite samples"):
        corpus.checked_read("x.wav", read([0.1, np.inf]), 2)


def test_shards_without_a_usable_sample_are_a_clear_error_not_an_endless_loop(tmp_path, monkeypatch):
    pytest.importorskip("webdataset")
    import tarfile

    root = write_corpus(tmp_path / "data", files=2, seconds=(0.5, 0.8))
    shards.write_shards(root, tmp_path / "shards", per_shard=1, min_seconds=0.2)
    with tarfile.open(tmp_path / "shards" / "notes.tar", "w") as tar:  # a .tar without audio
        tar.add(__file__, arcname="readme.txt")
    epochs = []
    original = corpus.epoch_order

    def epoch_order(count, seed, epoch):
        assert epoch < 5, "the stream loops over empty epochs"  # fails the test where it would hang
        epochs.append(epoch)
        return original(count, seed, epoch)

    monkeypatch.setattr(corpus, "epoch_order", epoch_order)
    source = shards.ShardCorpus(tmp_path / "shards", min_seconds=1.0)
    for part in range(3):
        with pytest.raises(ValueError, match=r"no usable audio under .*shards: 3 samples in 3 shards, skipped "
                                             r"3 \(unreadable: 1, too short: 2\)"):
            next(source.examples(0, part, 3))
    assert max(epochs) == 0


def test_writing_shards_into_a_folder_with_earlier_shards_is_refused(tmp_path):
    pytest.importorskip("webdataset")
    root = write_corpus(tmp_path / "data", files=3)
    shards.write_shards(root, tmp_path / "shards", per_shard=1)
    with pytest.raises(ValueError, match=r"shards already holds 3 .tar files \(shard-000000.tar, "):
        shards.write_shards(root, tmp_path / "shards", per_shard=10)
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [
        ".echo_shards.json", *(f"shard-00000{i}.tar" for i in range(3))]


def test_files_whose_names_sanitise_alike_keep_distinct_shard_samples(tmp_path):
    pytest.importorskip("webdataset")
    root = tmp_path / "data"
    root.mkdir()
    waves = {name: np.random.default_rng(i).standard_normal(16000).astype(np.float32) * 0.1
             for i, name in enumerate(["a b.wav", "a_b.wav", "a.b.wav"])}
    for name, wave in waves.items():
        sf.write(root / name, wave, 16000, subtype="FLOAT")
    shards.write_shards(root, tmp_path / "shards", per_shard=10)
    source = shards.ShardCorpus(tmp_path / "shards", min_seconds=1.0)
    examples = list(itertools.islice(source.examples(0, 0, 1), 3))
    assert len({e.key for e in examples}) == 3
    read = sorted(e.read(0, 16000).tobytes() for e in examples)
    assert read == sorted(wave.tobytes() for wave in waves.values())


def test_a_stream_of_nothing_but_unreadable_clips_stops_with_a_clear_error(tmp_path, monkeypatch):
    root = tmp_path / "data"
    root.mkdir()
    sf.write(root / "all_nan.wav", np.full(32000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    monkeypatch.setattr(sampling, "UNREADABLE_BATCHES_LIMIT", 3)
    config = sampling.SamplingConfig(crop_seconds=1, tokens_per_batch=300, clones=1)
    stream = sampling.BatchStream(corpus.FolderCorpus(root, min_seconds=1.0), config, seed=0)
    with pytest.raises(ValueError, match=r"3 batches in a row held no readable clip: .*all_nan.wav"):
        next(iter(stream))


def test_a_stream_lets_go_of_a_batchs_plans_before_it_plans_the_next(tmp_path, monkeypatch):
    """A shard's clip plans hold their files' bytes, and the stream kept a batch's plans while it drew the next
    batch's: two batches' files at once, +69 MB per data worker for 10 s clips at 48 kHz (16384 tokens a batch)."""
    write_corpus(tmp_path / "data", files=4)
    shards.write_shards(tmp_path / "data", tmp_path / "shards", per_shard=2)
    materialise, draw, materialised, held = sampling.materialise, sampling.draw_clip, [], []

    def recorded(plans, *args):
        materialised.extend(weakref.ref(plan) for plan in plans)
        return materialise(plans, *args)

    def drawn(*args):
        held.append(sum(ref() is not None for ref in materialised))
        return draw(*args)

    monkeypatch.setattr(sampling, "materialise", recorded)
    monkeypatch.setattr(sampling, "draw_clip", drawn)
    config = sampling.SamplingConfig(crop_seconds=1, tokens_per_batch=300, clones=1)
    stream = sampling.BatchStream(shards.ShardCorpus(tmp_path / "shards", min_seconds=1.0), config, seed=0)
    batches = list(itertools.islice(stream, 3))
    assert sum(batch.clips for batch in batches) == len(materialised) and max(held) == 0


def test_a_file_changed_since_it_was_indexed_is_dropped_not_read_wrongly(tmp_path, caplog):
    """A stereo 16 kHz file rewritten as mono 8 kHz mid-run: channel 1 crashed the worker (IndexError), and channel
    0's samples were trained on as if at 16 kHz."""
    root = tmp_path / "data"
    root.mkdir()
    wave = seeded_rng().standard_normal((32000, 2)).astype(np.float32) * 0.1
    sf.write(root / "a.wav", wave, 16000)
    source = corpus.FolderCorpus(root, min_seconds=1.0)
    examples = sorted(itertools.islice(source.examples(0, 0, 1), 2), key=lambda example: example.channel)
    sf.write(root / "a.wav", wave[:, 0], 8000)
    for example in examples:
        with pytest.raises(corpus.UnreadableAudio, match=r"a.wav: changed since it was indexed: the audio is 8000 Hz, "
                                                         r"32000 frames, 1 channel; its index says 16000 Hz, 32000 "):
            example.read(0, 100)


def test_shard_json_from_elsewhere_falls_back_to_the_audio_header(tmp_path):
    """Shards written by other tools often carry a JSON member of their own (labels): it raised KeyError."""
    wds = pytest.importorskip("webdataset")
    import io
    import json

    wave = seeded_rng().standard_normal(24000).astype(np.float32) * 0.1
    buffer = io.BytesIO()
    sf.write(buffer, wave, 12000, format="WAV", subtype="FLOAT")
    (tmp_path / "shards").mkdir()
    with wds.TarWriter(str(tmp_path / "shards" / "other.tar"), encoder=False) as writer:
        writer.write({"__key__": "labelled", "wav": buffer.getvalue(), "json": json.dumps({"label": "pump"}).encode()})
        writer.write({"__key__": "garbled", "wav": buffer.getvalue(), "json": b"{not json"})
    examples = list(itertools.islice(shards.ShardCorpus(tmp_path / "shards", 1.0).examples(0, 0, 1), 2))
    assert [e.key for e in examples] == ["labelled:0", "garbled:0"]
    for example in examples:
        assert (example.sample_rate, example.frames) == (12000, 24000)
        assert example.read(0, 24000).tobytes() == wave.tobytes()


@pytest.mark.parametrize("claimed", [dict(sample_rate=10**12, frames=10**13), dict(frames=30 * 12000),
                                     dict(channels=2)])
def test_shard_json_that_does_not_describe_its_audio_is_said_so(tmp_path, claimed):
    """It was said to have "changed since it was indexed" (shards are not indexed), or a crop past the audio's end
    failed in libsndfile ("Internal psf_fseek() failed")."""
    wds = pytest.importorskip("webdataset")
    import io
    import json

    frames = int(seeded_rng().integers(20000, 30000))
    buffer = io.BytesIO()
    sf.write(buffer, seeded_rng().standard_normal(frames).astype(np.float32) * 0.1, 12000, format="WAV")
    meta = {"sample_rate": 12000, "frames": frames, "channels": 1, **claimed}
    (tmp_path / "shards").mkdir()
    with wds.TarWriter(str(tmp_path / "shards" / "s.tar"), encoder=False) as writer:
        writer.write({"__key__": "k", "wav": buffer.getvalue(), "json": json.dumps(meta).encode()})
    examples = shards.ShardCorpus(tmp_path / "shards", 0.5).examples(0, 0, 1)
    example = next(example for example in examples if example.channel == meta["channels"] - 1)
    said = (f"sample k: its JSON member does not describe its audio: the audio is 12000 Hz, {frames} frames, 1 "
            f"channel; its JSON member says {meta['sample_rate']} Hz, {meta['frames']} frames, at least "
            f"{meta['channels']} channel")
    with pytest.raises(corpus.UnreadableAudio, match=re.escape(said)):
        example.read(example.frames - 6000, 6000)


@pytest.mark.parametrize("rate", [11025, *RATE_FAMILIES])
def test_a_clip_never_takes_more_tokens_than_the_budget_is_checked_for(rate):
    """At 22050 Hz the hop is 220 samples, not 220.5: a 16 s crop of samples held 1602 frames, 101 patches, and a
    5-band clip 510 teacher tokens, past a budget of 505 that the config accepted as enough for one clip."""
    config = sampling.SamplingConfig(crop_seconds=16, min_bands=5, max_bands=5, clones=1, tokens_per_batch=505)
    assert config.max_clip_tokens == 5 * (100 + 1)  # 1600 frames of 10 ms: 100 patches
    example = corpus.Example("long.wav:0", rate, 60 * rate, 0, lambda start, count: np.zeros(count, np.float32))
    clip = sampling.draw_clip(example, seeded_rng(), config)
    assert clip.tokens <= config.tokens_per_batch
    assert clip.samples >= round(15.9 * rate)  # still a 16 s crop, give or take the last hop


def test_a_manifest_from_an_older_version_or_damaged_is_rebuilt(tmp_path, caplog):
    root = write_corpus(tmp_path / "data", files=3)
    (root / corpus.MANIFEST_NAME).write_text("path,size\nmachine0/clip0.wav,12\n")
    with caplog.at_level("WARNING", logger=corpus.log.name):
        source = corpus.FolderCorpus(root, min_seconds=1.0)
    assert len(source.files) == 3
    assert any("indexing the folder again" in r.getMessage() for r in caplog.records)
    assert corpus.read_manifest(root / corpus.MANIFEST_NAME).keys() == {f.path for f in source.files}


def test_files_whose_names_are_not_utf8_or_broken_links_are_reported_skips(tmp_path, caplog, monkeypatch):
    """A name with undecodable bytes (a Windows archive unpacked on Linux) crashed indexing with a
    UnicodeEncodeError; a broken link was left out unseen."""
    import os

    monkeypatch.setattr(corpus, "MANIFEST_SAVE_SECONDS", 0.0, raising=False)  # the manifest saved as it goes too
    root = write_corpus(tmp_path / "data", files=2)
    (root / "fine.wav").write_bytes((root / "machine0" / "clip0.wav").read_bytes())
    os.rename(root / "fine.wav", os.fsdecode(os.fsencode(root) + b"/caf\xe9.wav"))  # Latin-1 bytes
    (root / "gone.wav").symlink_to(root / "nowhere.wav")
    (root / "machine0" / "loop").symlink_to(root)  # not followed: indexing ends
    with caplog.at_level("WARNING", logger=corpus.log.name):
        source = corpus.FolderCorpus(root, min_seconds=0.5)
    assert len(source.files) == 2 and source.skipped == {"unreadable": 2, "too short": 0}
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert "caf" in messages and "not valid UTF-8" in messages and "gone.wav" in messages
    manifest = root / corpus.MANIFEST_NAME
    written = manifest.stat().st_mtime_ns
    monkeypatch.setattr(corpus, "probe", lambda *args: pytest.fail(f"opened {args[1]} again"))
    assert len(corpus.FolderCorpus(root, min_seconds=0.5).files) == 2  # and again, from the manifest alone
    assert manifest.stat().st_mtime_ns == written  # a still-broken link is no change to record


def test_a_link_to_a_pipe_is_reported_unreadable_not_opened(tmp_path, caplog):
    """Indexing opened what a link named .wav led to for its header: a pipe waits for a writer for ever, and
    pretraining hung before its first step. The timer lets such a reader go, and says it found one waiting."""
    import os

    root = write_corpus(tmp_path / "data", files=2)
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    (root / "live.wav").symlink_to(pipe)
    with pipe_watch(pipe) as waited, caplog.at_level("WARNING", logger=corpus.log.name):
        source = corpus.FolderCorpus(root, min_seconds=0.5)
    assert not waited
    assert len(source.files) == 2 and source.skipped == {"unreadable": 1, "too short": 0}
    assert "skipping unreadable live.wav: not a regular file" in [r.getMessage() for r in caplog.records]


def test_indexing_saves_its_progress_so_an_interrupted_index_resumes(tmp_path, monkeypatch):
    """Opening a large corpus's files takes hours; the manifest was written only at the end, so a stop lost all."""
    root = write_corpus(tmp_path / "data", files=6)
    monkeypatch.setattr(corpus, "MANIFEST_SAVE_SECONDS", 0.0, raising=False)
    opened = []
    original = corpus.probe

    def probe_then_stop(root, relative):
        if len(opened) == 4:
            raise KeyboardInterrupt
        opened.append(relative)
        return original(root, relative)

    monkeypatch.setattr(corpus, "probe", probe_then_stop)
    with pytest.raises(KeyboardInterrupt):
        corpus.FolderCorpus(root, min_seconds=1.0)
    assert corpus.read_manifest(root / corpus.MANIFEST_NAME).keys() == set(opened)
    monkeypatch.setattr(corpus, "probe", lambda root, relative: opened.append(relative) or original(root, relative))
    assert len(corpus.FolderCorpus(root, min_seconds=1.0).files) == 6
    assert len(opened) == 6 and len(set(opened)) == 6  # the 4 indexed before the stop were not opened again


def test_a_file_gone_or_changed_while_shards_are_written_is_skipped_or_described_as_written(tmp_path, monkeypatch,
                                                                                               caplog):
    """Files deleted after indexing crashed the writer (FileNotFoundError) after the earlier shards; a file
    rewritten at another rate got the indexed rate in its JSON, and was read at the wrong rate."""
    pytest.importorskip("webdataset")
    root = write_corpus(tmp_path / "data", files=3)
    original = corpus.usable

    def usable_then_changed(entries, min_seconds):
        kept = original(entries, min_seconds)
        (root / "machine0" / "clip0.wav").unlink()
        sf.write(root / "machine1" / "clip1.flac", np.full(20000, 0.25, np.float32), 8000)
        return kept

    monkeypatch.setattr(corpus, "usable", usable_then_changed)
    with caplog.at_level("WARNING", logger=shards.log.name):
        shards.write_shards(root, tmp_path / "shards", per_shard=1)
    assert any("machine0/clip0.wav" in r.getMessage() for r in caplog.records)
    examples = list(itertools.islice(shards.ShardCorpus(tmp_path / "shards", 1.0).examples(0, 0, 1), 2))
    assert sorted(e.key.split("_", 1)[1] for e in examples) == ["machine1/clip1_flac:0", "machine2/clip2_wav:0"]
    changed = next(e for e in examples if "clip1" in e.key)
    assert (changed.sample_rate, changed.frames) == (8000, 20000)
    np.testing.assert_array_equal(changed.read(0, 20000), np.full(20000, 0.25, np.float32))


def test_a_folder_with_both_shards_and_audio_files_is_a_clear_error(tmp_path):
    pytest.importorskip("webdataset")
    root = write_corpus(tmp_path / "data", files=2)
    shards.write_shards(root, root, per_shard=1)
    with pytest.raises(ValueError, match=r"data holds both .tar shards \(2\) and audio files \(2\)"):
        shards.open_corpus(root, min_seconds=1.0)


def test_data_naming_one_audio_file_is_refused_as_a_file_not_as_missing(tmp_path):
    """It said "audio folder .../clip0.wav does not exist" of a file that does."""
    one_file = next(write_corpus(tmp_path / "data", files=1).rglob("clip0.wav"))
    with pytest.raises(ValueError, match=f"audio folder {one_file} is a file: name the folder that holds it"):
        shards.open_corpus(one_file, min_seconds=1.0)
    with pytest.raises(ValueError, match="audio folder .*missing does not exist"):
        shards.open_corpus(tmp_path / "missing", min_seconds=1.0)


def stop_a_shard_write_in_its_second_shard(root, out, monkeypatch) -> list[int]:
    """Write shards of two files from `root` into `out`, stopped (as by Ctrl-C) at file 3; returns the list that
    the indices of the files later writes read are appended to."""
    original = shards.shard_sample

    def sample_then_stop(root, index, relative):
        if index == 3:
            raise KeyboardInterrupt
        return original(root, index, relative)

    monkeypatch.setattr(shards, "shard_sample", sample_then_stop)
    with pytest.raises(KeyboardInterrupt):
        shards.write_shards(root, out, per_shard=2)
    assert sorted(p.name for p in out.glob("*.tar*")) == ["shard-000000.tar"]  # no half shard
    written = []
    monkeypatch.setattr(shards, "shard_sample", lambda *args: written.append(args[1]) or original(*args))
    return written


def shard_examples(folder) -> dict[str, bytes]:
    source = shards.ShardCorpus(folder, min_seconds=1.0)
    return {e.key: e.read(0, e.frames).tobytes() for e in itertools.islice(source.examples(0, 0, 1), 6)}


def test_a_stopped_shard_write_resumes_with_the_missing_shards_only(tmp_path, monkeypatch):
    """A stop left whole shards, but the same command then refused the folder: hours of finished shards lost."""
    pytest.importorskip("webdataset")
    root = write_corpus(tmp_path / "data", files=5)
    shards.write_shards(root, tmp_path / "straight", per_shard=2)
    written = stop_a_shard_write_in_its_second_shard(root, tmp_path / "shards", monkeypatch)
    (tmp_path / "shards" / "shard-000001.tar.999999999.tmp").write_bytes(b"half a shard, its writer killed")
    assert len(shards.write_shards(root, tmp_path / "shards", per_shard=2)) == 3
    assert written == [2, 3, 4]  # shard 0 kept, shards 1 and 2 written
    assert not list((tmp_path / "shards").glob("*.tmp"))
    assert shard_examples(tmp_path / "shards") == shard_examples(tmp_path / "straight")
    (root / "machine0" / "clip0.wav").unlink()  # another corpus now: its shards would not match those kept
    with pytest.raises(ValueError, match=r"already holds 3 .tar files .* of another write"):
        shards.write_shards(root, tmp_path / "shards", per_shard=2)


def test_a_full_disk_while_a_shard_is_written_names_it_and_the_shards_kept(tmp_path, monkeypatch):
    """"error: [Errno 28] No space left on device" alone named neither the shard nor the ones kept."""
    pytest.importorskip("webdataset")
    root, out = write_corpus(tmp_path / "data", files=5), tmp_path / "shards"
    original = shards.shard_sample

    def disk_full_at_file_2(folder, index, path):
        if index == 2:
            raise OSError(28, "No space left on device")
        return original(folder, index, path)

    monkeypatch.setattr(shards, "shard_sample", disk_full_at_file_2)
    with pytest.raises(OSError) as stopped:
        shards.write_shards(root, out, per_shard=2)
    assert str(stopped.value) == (f"{out / 'shard-000001.tar'} could not be written ([Errno 28] No space left on "
                                  f"device); 1 finished shard is kept in {out} (shard-000000.tar); the same command "
                                  f"writes only the missing ones")
    assert sorted(path.name for path in out.iterdir()) == [shards.PLAN_NAME, "shard-000000.tar"]
    monkeypatch.undo()  # space freed
    assert len(shards.write_shards(root, out, per_shard=2)) == 3


def test_a_shard_write_resumes_from_a_copy_of_its_folder_but_not_from_changed_content(tmp_path, monkeypatch,
                                                                                      capsys):
    """`cp -r` of the folder gives every file a new time, and the plan held the times: the copy was refused.
    Only the times may differ: a file whose bytes changed at the same size and header is still refused. The
    check reads every shard written and its files again, as long as writing them took: its progress is shown."""
    pytest.importorskip("webdataset")
    root = write_corpus(tmp_path / "data", files=5)
    shards.write_shards(root, tmp_path / "straight", per_shard=2)
    stop_a_shard_write_in_its_second_shard(root, tmp_path / "shards", monkeypatch)
    copy = shutil.copytree(root, tmp_path / "copy", copy_function=shutil.copy)  # as cp -r: new times
    changed = shutil.copytree(root, tmp_path / "changed", copy_function=shutil.copy)
    assert (copy / "machine0" / "clip0.wav").stat().st_mtime_ns != (root / "machine0" / "clip0.wav").stat().st_mtime_ns
    raw = (changed / "machine0" / "clip0.wav").read_bytes()  # file 0, in the shard written
    (changed / "machine0" / "clip0.wav").write_bytes(raw[:-64] + bytes(b ^ 0xFF for b in raw[-64:]))
    assert sf.info(changed / "machine0" / "clip0.wav").frames == sf.info(root / "machine0" / "clip0.wav").frames

    first_shard = tmp_path / "shards" / "shard-000000.tar"
    kept = (first_shard.stat().st_ino, first_shard.stat().st_mtime_ns)
    with pytest.raises(ValueError, match=r"of another write \(shard-000000.tar does not hold machine0/clip0.wav "
                                         r"as it is now\)"):
        shards.write_shards(changed, tmp_path / "shards", per_shard=2)
    assert sorted(p.name for p in (tmp_path / "shards").glob("*.tar")) == ["shard-000000.tar"]
    capsys.readouterr()
    assert len(shards.write_shards(copy, tmp_path / "shards", per_shard=2)) == 3
    assert re.search(r"checking shards: 100%.* 1/1 ", capsys.readouterr().err)
    assert (first_shard.stat().st_ino, first_shard.stat().st_mtime_ns) == kept  # resumed, not written again
    assert shard_examples(tmp_path / "shards") == shard_examples(tmp_path / "straight")


def test_crops_of_random_length_span_the_range_log_uniformly_and_fixed_crops_draw_nothing():
    """Short crops train the embedding of clips as short as those it is asked about; a fixed crop must not draw
    a length, or every run made before the option would replay other batches."""
    rate = int(np.random.choice(RATE_FAMILIES))
    example = corpus.Example("long.wav:0", rate, 60 * rate, 0, lambda start, count: np.zeros(count, np.float32))
    config = sampling.SamplingConfig(crop_seconds=4, shortest_crop_seconds=0.2, tokens_per_batch=1000, clones=1)
    rng = seeded_rng()
    seconds = np.array([sampling.draw_clip(example, rng, config).samples / rate for _ in range(3000)])
    assert seconds.min() >= 0.2 - 1 / rate and seconds.max() <= 4 + 1 / rate
    # log-uniform: the log lengths' quartiles split [log 0.2, log 4] in four equal parts
    quartiles = np.quantile(np.log(seconds), [0.25, 0.5, 0.75])
    expected = np.log(0.2) + np.log(20) * np.array([0.25, 0.5, 0.75])
    assert np.abs(quartiles - expected).max() < 0.1
    assert min(sampling.draw_clip(example, rng, config).masks.sum(-1).min() for _ in range(200)) >= 1
    # more clips fit a batch, and lr scaling counts them
    fixed = sampling.SamplingConfig(crop_seconds=4, tokens_per_batch=1000, clones=1)
    assert sampling.nominal_clips_per_batch(config) > 2 * sampling.nominal_clips_per_batch(fixed)
    # a fixed crop's first draw is still its start
    seed = int(np.random.randint(0, 10**6))
    clip = sampling.draw_clip(example, np.random.default_rng(seed), fixed)
    assert clip.start == np.random.default_rng(seed).integers(0, example.frames - clip.samples + 1)


@pytest.mark.parametrize("shortest", [0.1, 4.5, float("nan")])
def test_a_shortest_crop_outside_two_patches_to_the_crop_is_refused(shortest):
    with pytest.raises(ValueError, match=r"shortest_crop_seconds must be in \[0.2, crop_seconds = 4"):
        sampling.SamplingConfig(crop_seconds=4, shortest_crop_seconds=shortest)


def test_a_shard_folder_that_cannot_be_written_is_refused_before_indexing(tmp_path, monkeypatch):
    """--out naming a file gave "[Errno 17] File exists" after the whole folder was indexed."""
    pytest.importorskip("webdataset")
    (tmp_path / "taken").write_text("a file")
    monkeypatch.setattr(corpus, "FolderCorpus", lambda *args: pytest.fail("indexed before the check"))
    with pytest.raises(ValueError, match=r"--out .*taken cannot be written"):
        shards.write_shards(tmp_path / "data", tmp_path / "taken")


def test_the_default_sampling_is_the_spec_recipe():
    """Spec section 8: masking ratio 0.75 to 0.8, 2 to 5 bands per clip, several clones per clip."""
    config = sampling.SamplingConfig()
    assert 0.75 <= config.mask_ratio <= 0.8
    assert (config.min_bands, config.max_bands) == (2, 5)
    assert config.clones >= 2


def ten_second_clips(count: int, config: sampling.SamplingConfig, rate: int = 16000) -> list:
    example = corpus.Example("long.wav:0", rate, 60 * rate, 0, lambda start, n: np.zeros(n, np.float32))
    rng = seeded_rng()
    return [sampling.draw_clip(example, rng, config) for _ in range(count)]


def test_each_clip_draws_two_to_five_bands_at_any_bin_offset():
    """Spec section 8: 2 to 5 random 32-bin bands per clip at random bin offsets, not on the 32-bin grid: at
    16 kHz (201 bins) every start from 0 to 169 occurs, and every count from 2 to 5."""
    clips = ten_second_clips(2000, sampling.SamplingConfig())
    assert {len(clip.band_starts) for clip in clips} == {2, 3, 4, 5}
    assert {start for clip in clips for start in clip.band_starts} == set(range(201 - 32 + 1))


def test_masks_are_uniform_random_independently_per_band_sequence_and_clone():
    """Spec section 8: MAE-style uniform random masking per band sequence, and each clone masked anew. A 10 s
    band at 16 kHz has 998 frames, 63 patches; with m masked, uniform sampling without replacement masks each
    patch with probability m / 63 and two neighbours with m (m - 1) / (63 * 62); block masking (EAT's inverse
    block) masks neighbours together far more often."""
    config = sampling.SamplingConfig()
    clips = ten_second_clips(300, config)
    masks = np.concatenate([clip.masks.reshape(-1, clip.patches) for clip in clips])  # (sequences, 63)
    assert masks.shape[1] == 63
    m = int(masks[0].sum())
    assert (masks.sum(-1) == m).all() and 0.75 <= m / 63 <= 0.8
    assert np.abs(masks.mean(0) - m / 63).max() < 0.05  # every position alike: no position is favoured
    neighbours = (masks[:, 1:] & masks[:, :-1]).mean()
    assert neighbours == pytest.approx(m * (m - 1) / (63 * 62), abs=0.01)
    for clip in clips:  # every clone and every band has a mask of its own
        flat = clip.masks.reshape(-1, clip.patches)
        assert len({row.tobytes() for row in flat}) == len(flat)


def test_a_folder_without_usable_audio_says_what_was_skipped_in_words(tmp_path):
    """It printed the counts as a Python dict: "skipped {'unreadable': 1, 'too short': 1}"."""
    (tmp_path / "broken.wav").write_bytes(b"RIFF not really")
    sf.write(tmp_path / "short.wav", np.zeros(800, dtype=np.float32), 8000)
    with pytest.raises(ValueError, match=re.escape(f"no usable audio under {tmp_path}: 2 files, skipped 2 "
                                                   "(unreadable: 1, too short: 1)")):
        corpus.FolderCorpus(tmp_path, min_seconds=1.0)


def test_every_band_sequence_keeps_a_visible_patch_and_masks_round_ratio_times_its_length():
    """masked_count: round(ratio * L) masked, but at least one patch left visible. A two-patch sequence (a 0.2 s
    crop, as random-length crops draw) at ratio 0.75-0.8 rounds to two masked: the student would see only its CLS."""
    rng = seeded_rng()
    for patches in range(2, 130):
        for ratio in (0.75, 0.8, float(rng.uniform(0.05, 0.999))):
            masked = sampling.masked_count(patches, ratio)
            assert 1 <= patches - masked, (patches, ratio)
            if round(ratio * patches) < patches:
                assert masked == round(ratio * patches), (patches, ratio)
    assert sampling.masked_count(2, 0.8) == 1
    rate = int(rng.choice(RATE_FAMILIES))
    example = corpus.Example("short.wav:0", rate, rate // 5, 0, lambda start, n: np.zeros(n, np.float32))
    config = sampling.SamplingConfig(crop_seconds=0.2, tokens_per_batch=400, clones=4)
    for _ in range(20):
        clip = sampling.draw_clip(example, rng, config)
        assert clip.patches == 2 and (~clip.masks).sum(-1).min() >= 1 and clip.masks.sum(-1).min() >= 1


def test_each_clone_in_a_batch_has_the_mask_drawn_for_it():
    """materialise lays out `clones` student sequences per band sequence: their masks are the plan's masks of
    that band, one per clone (not one clone's mask repeated, nor another sequence's). One band per clip and crops
    of distinct lengths, so a teacher sequence's length names its clip whatever the batch's order."""
    rng = seeded_rng()
    clones = int(rng.integers(2, 5))
    config = sampling.SamplingConfig(crop_seconds=10, min_bands=1, max_bands=1, clones=clones,
                                     mask_ratio=float(rng.uniform(0.5, 0.8)), tokens_per_batch=1000)
    plans = []
    for seconds in rng.permutation([0.5, 0.8, 1.1, 1.4, 2.0]):
        example = corpus.Example(f"{seconds}.wav:0", 16000, int(seconds * 16000), 0,
                                 lambda start, n: rng.standard_normal(n).astype(np.float32))
        plans.append(sampling.draw_clip(example, rng, config))
    by_length = {plan.patches: plan for plan in plans}
    assert len(by_length) == len(plans)
    batch = sampling.materialise(plans, clones)
    starts = torch.cumsum(batch.lengths[batch.student_sequence], 0) - batch.lengths[batch.student_sequence]
    for s, length in enumerate(batch.lengths.tolist()):
        students = (batch.student_sequence == s).nonzero().squeeze(1).tolist()
        got = sorted(batch.masked[starts[j]: starts[j] + length].numpy().tobytes() for j in students)
        expected = sorted(mask.tobytes() for mask in by_length[length].masks[:, 0])
        assert got == expected, s


def test_a_clip_that_fills_the_budget_exactly_stays_in_its_batch():
    """Only a clip that would overflow the budget starts the next batch. A 2 s crop at 16 kHz is
    1 + (32000 - 400) // 160 = 198 frames, ceil(198 / 16) = 13 patches, 14 tokens per band: with two bands a clip
    takes 28 tokens, so a budget of 84 holds exactly three clips and one of 83 two."""
    example = corpus.Example("long.wav:0", 16000, 60 * 16000, 0, lambda start, n: np.zeros(n, np.float32))
    for budget, per_batch in ((84, 3), (83, 2), (112, 4)):
        config = sampling.SamplingConfig(crop_seconds=2, min_bands=2, max_bands=2, clones=1, tokens_per_batch=budget)
        batches = list(itertools.islice(sampling.plan_batches(itertools.repeat(example), seeded_rng(), config), 5))
        assert all(clip.tokens == 28 for batch in batches for clip in batch)
        assert [len(batch) for batch in batches] == [per_batch] * 5, budget


@pytest.mark.parametrize("shortest, longest", [(0.2, 4.0), (0.5, 10.0), (1.0, 20.0)])
def test_the_nominal_clip_of_random_length_crops_is_as_long_as_their_mean(shortest, longest):
    """The lr scaling counts clips of a batch by an average clip: for log-uniform crop lengths on [a, b] the mean
    is (b - a) / ln(b / a) (checked here against a sample), at 100 frames per second, 16 frames per patch, one CLS
    per band and 3.5 bands on average."""
    mean = (longest - shortest) / np.log(longest / shortest)
    drawn = np.exp(seeded_rng().uniform(np.log(shortest), np.log(longest), 200_000))
    assert drawn.mean() == pytest.approx(mean, rel=0.01)
    tokens = 3.5 * (-(-round(mean * 100) // 16) + 1)
    config = sampling.SamplingConfig(crop_seconds=longest, shortest_crop_seconds=shortest, tokens_per_batch=4000)
    assert sampling.expected_clip_tokens(config) == pytest.approx(tokens)
    assert sampling.nominal_clips_per_batch(config) == int(4000 // tokens)


@pytest.mark.parametrize("from_shards", [False, True])
def test_each_epoch_is_a_new_permutation_and_the_order_follows_the_seed(tmp_path, from_shards):
    """Examples come epoch after epoch, each epoch every example once in an order of its own, and another seed
    gives another order (8 files, 9 examples: two orders coincide by chance with probability at most 1 / 8!).
    Shards: each epoch reshuffles the shard order (one file per shard here)."""
    root = write_corpus(tmp_path / "data", files=8)
    source = corpus.FolderCorpus(root, 1.0)
    count = len(source.items)
    assert count == 9  # file 0 is stereo
    if from_shards:
        pytest.importorskip("webdataset")
        shards.write_shards(root, tmp_path / "shards", per_shard=1)
        source = shards.ShardCorpus(tmp_path / "shards", min_seconds=1.0)
    seed = int(np.random.randint(0, 10**6))

    def epochs(seed, number):
        keys = [e.key for e in itertools.islice(source.examples(seed, 0, 1), number * count)]
        return [keys[k * count: (k + 1) * count] for k in range(number)]

    orders = epochs(seed, 3)
    assert all(sorted(order) == sorted(orders[0]) and len(set(order)) == count for order in orders)
    assert orders[0] != orders[1] and orders[1] != orders[2]
    assert epochs(seed, 1)[0] == orders[0]  # replayed
    assert epochs(seed + 1, 1)[0] != orders[0]


def test_the_streams_of_ranks_and_workers_draw_crops_bands_and_masks_of_their_own(tmp_path):
    """Each stream's generator is its own (seeded by the seed and its part): files alike in rate and length
    still get other crops, bands and masks in another stream, not the same draws."""
    root = tmp_path / "data"
    root.mkdir()
    rng = seeded_rng()
    for i in range(4):
        sf.write(root / f"clip{i}.wav", (0.1 * rng.standard_normal(40000)).astype(np.float32), 16000)
    config = sampling.SamplingConfig(crop_seconds=2, tokens_per_batch=300, clones=2)
    source = corpus.FolderCorpus(root, 1.0)
    seed = int(rng.integers(0, 10**6))
    first = [next(iter(sampling.BatchStream(source, config, seed, rank=rank, world=2))) for rank in (0, 1)]
    assert not (torch.equal(first[0].positions, first[1].positions) and torch.equal(first[0].masked, first[1].masked))
    loader = torch.utils.data.DataLoader(sampling.BatchStream(source, config, seed, workers=2), batch_size=None,
                                         num_workers=2)
    a, b = itertools.islice(loader, 2)
    assert (a.stream, b.stream) == (0, 1)
    assert not (torch.equal(a.positions, b.positions) and torch.equal(a.masked, b.masked))


def test_shards_in_a_folder_whose_name_holds_a_colon_are_written_and_read(tmp_path, monkeypatch):
    """webdataset takes "mic" in a relative path mic:A/shard-000000.tar for a URL scheme: writing the shards
    stopped with "no gopen handler defined", and so did reading them."""
    pytest.importorskip("webdataset")
    root = write_corpus(tmp_path / "data", files=2)
    monkeypatch.chdir(tmp_path)
    shards.write_shards(root, "mic:A", per_shard=1)
    for spec in ("mic:A", "mic:A/shard-{000000..000001}.tar"):
        source = shards.ShardCorpus(spec, min_seconds=1.0)
        examples = list(itertools.islice(source.examples(0, 0, 1), len(corpus.FolderCorpus(root, 1.0).items)))
        assert len({example.key for example in examples}) == len(examples) > 0
