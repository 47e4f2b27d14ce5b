"""Every container echo picks out of folders, in a spread of its encodings, rates and channel counts: each reader
(eval and encode's read_audio and audio_blocks, the header sizes that cut batches, pretraining's index and crops from
a folder and from a shard sample) gives soundfile's samples, rate and channels."""
import json
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from echo.data import AUDIO_SUFFIXES
from echo.encode_files import read_file
from echo.eval.datasets import audio_blocks, read_audio
from echo.eval.embed import decoded_sizes
from echo.pretrain import corpus, shards

soundfile = pytest.importorskip("soundfile")

CONTAINERS = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG", ".opus": "OGG", ".mp3": "MP3", ".aif": "AIFF",
              ".aiff": "AIFF", ".caf": "CAF", ".w64": "W64", ".rf64": "RF64"}
# (suffix, subtype, channels, rate): unsigned 8-bit, 64-bit float (read as float64), ADPCM padded to its blocks,
# codecs that cannot seek (GSM 6.10, G.721), lossy codecs with encoder delay and padding (Vorbis, Opus, MP3), ALAC
MATRIX = [(".wav", "PCM_U8", 2, 11025), (".wav", "IMA_ADPCM", 2, 22050), (".wav", "GSM610", 1, 8000),
          (".wav", "G721_32", 1, 16000), (".wav", "DOUBLE", 2, 50000), (".wav", "ULAW", 1, 8000),
          (".flac", "PCM_24", 6, 48000), (".flac", "PCM_S8", 1, 12000), (".ogg", "VORBIS", 2, 44100),
          (".opus", "OPUS", 6, 48000), (".opus", "OPUS", 1, 12000), (".mp3", "MPEG_LAYER_III", 2, 44100),
          (".aif", "PCM_16", 2, 44100), (".aiff", "GSM610", 1, 8000), (".aiff", "FLOAT", 1, 16000),
          (".caf", "ALAC_24", 2, 48000), (".caf", "ALAW", 1, 8000), (".w64", "MS_ADPCM", 2, 16000),
          (".w64", "DOUBLE", 1, 22050), (".rf64", "PCM_U8", 1, 8000), (".rf64", "PCM_24", 2, 50000)]


def test_the_matrix_covers_every_suffix_echo_reads():
    assert sorted({suffix for suffix, *_ in MATRIX}) == sorted(AUDIO_SUFFIXES) == sorted(CONTAINERS)


@pytest.mark.parametrize("suffix, subtype, channels, rate", MATRIX,
                         ids=[f"{suffix[1:]}-{kind}-{channels}ch-{rate}" for suffix, kind, channels, rate in MATRIX])
def test_every_reader_gives_soundfiles_samples(tmp_path, suffix, subtype, channels, rate):
    container = CONTAINERS[suffix]
    if subtype not in soundfile.available_subtypes(container):
        pytest.skip(f"this libsndfile ({soundfile.__libsndfile_version__}) has no {subtype} {container}")
    path = tmp_path / f"clip{suffix}"
    soundfile.write(path, np.random.default_rng(3).uniform(-0.6, 0.6, (3001, channels)), rate, format=container,
                    subtype=subtype)
    # MP3 decodes a few last bits apart after a seek (soundfile.read seeks to 0; a fresh decoder does not)
    tolerance = 1e-6 if suffix == ".mp3" else 0
    expected, _ = soundfile.read(path, dtype="float64" if subtype == "DOUBLE" else "float32", always_2d=True)
    frames = len(expected)
    assert frames == soundfile.info(path).frames  # ADPCM padding and codec delays: the header tells what decodes

    for signal, read_rate in (read_audio(path), read_file(path)):
        assert read_rate == rate and signal.dtype == expected.dtype
        np.testing.assert_allclose(signal, expected[:, 0] if channels == 1 else expected.T, rtol=0, atol=tolerance)
    # blocks of 1200 frames, the last one 601: a last read of a few frames decodes an Opus file's last frames
    # otherwise (libsndfile 1.2.2; echo's blocks of 2^22 samples meet it in their last tens of samples at most)
    block_rate, block_channels, block_frames, blocks = audio_blocks(path, 1200 * channels)
    assert (block_rate, block_channels, block_frames) == (rate, channels, frames)
    np.testing.assert_allclose(np.concatenate(list(blocks), axis=1), expected.T, rtol=0, atol=tolerance)
    with ThreadPoolExecutor(1) as pool:
        assert decoded_sizes([path], pool) == [frames * channels]

    entry = corpus.probe(tmp_path, path.name)
    assert (entry.problem, entry.sample_rate, entry.frames, entry.channels) == ("", rate, frames, channels)
    sample = shards.shard_sample(tmp_path, 0, path.name)
    assert shards.written_facts(sample["json"]) == (rate, frames, channels) == tuple(
        json.loads(sample["json"])[key] for key in ("sample_rate", "frames", "channels"))
    as_float32 = soundfile.read(path, dtype="float32", always_2d=True)[0]  # pretraining reads float32
    channel = channels - 1
    for read in (corpus.FolderCorpus._reader(path, rate, frames, channel),
                 corpus.decoded_reader(sample[suffix[1:]], rate, frames, channel, "shard sample", "its JSON member")):
        for start, count in ((0, 300), (1501, 777), (frames - 301, 301)):
            np.testing.assert_allclose(read(start, count), as_float32[start : start + count, channel], rtol=0,
                                       atol=tolerance)


def test_a_flac_whose_header_gives_no_length_is_refused_by_every_reader(tmp_path, caplog):
    """A FLAC written to a pipe has 0 samples in its header, which libsndfile counts as 2^63 - 1 frames and fails
    to read to the end ("Internal psf_fseek() failed" a block before it): read whole it was "array is too big",
    streamed a clip cut short, indexed for pretraining crops past its end."""
    soundfile.write(str(tmp_path / "whole.flac"), np.random.default_rng(3).uniform(-0.5, 0.5, 30000), 16000)
    content = bytearray((tmp_path / "whole.flac").read_bytes())
    fields = int.from_bytes(content[18:26], "big")  # STREAMINFO: rate (20 bits), channels, bits, samples (36 bits)
    content[18:26] = (fields & ~((1 << 36) - 1)).to_bytes(8, "big")
    (tmp_path / "piped.flac").write_bytes(content)
    assert soundfile.info(str(tmp_path / "piped.flac")).frames > 1 << 62  # the header as libsndfile reads it
    said = "its header gives no length (written to a pipe?), and libsndfile cannot read such a file to its end"
    for read in (read_audio, read_file, lambda path: audio_blocks(path, 4096)):
        with pytest.raises(ValueError, match=re.escape(said)):
            read(tmp_path / "piped.flac")
    assert corpus.probe(tmp_path, "piped.flac").problem.startswith(said)
    with caplog.at_level("WARNING", logger=shards.log.name):
        assert shards.shard_sample(tmp_path, 0, "piped.flac") is None
    assert said in caplog.text
    assert corpus.probe(tmp_path, "whole.flac").problem == ""


def test_a_file_named_mp3_that_is_none_is_said_so_not_missing(tmp_path):
    """libsndfile's MP3 reader refuses data it cannot decode as "File does not exist or is not a regular file
    (possibly a pipe?)", said of a file that is there: encode, eval and pretraining passed that on."""
    from echo.eval.embed import read_checked

    (tmp_path / "pump.mp3").write_bytes(b"ID3 but no MPEG frame after it" * 10)
    said = "Format not recognised (no MP3 or other audio libsndfile can decode)"
    assert read_checked(read_file, tmp_path / "pump.mp3") == f"not a readable audio file (libsndfile: {said})"
    assert corpus.probe(tmp_path, "pump.mp3").problem == said
    assert corpus.probe(tmp_path, "gone.mp3").problem.startswith("cannot be opened: No such file")
