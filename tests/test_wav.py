"""The standard-library WAV reader and writer against files built byte by byte: the samples must be those
written, as soundfile reads them (the same file gives the same embedding with or without soundfile), and every
other file a ValueError naming it."""
import re
import struct
import sys

import numpy as np
import pytest

from echo.data.wav import read_wav, wav_blocks, write_wav
from echo.encode_files import read_file
from echo.eval.datasets import audio_blocks

try:
    import soundfile
except ImportError:  # the standard-library paths are tested all the same
    soundfile = None

SUBTYPE_PCM = b"\x01\x00\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"  # KSDATAFORMAT_SUBTYPE_PCM


def chunk(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack("<I", len(payload)) + payload + b"\0" * (len(payload) % 2)


def fmt_chunk(channels: int, rate: int, bits: int = 16, tag: int = 1, extensible: bool = False) -> bytes:
    block = channels * bits // 8
    fields = struct.pack("<HHIIHH", 0xFFFE if extensible else tag, channels, rate, rate * block, block, bits)
    if extensible:
        fields += struct.pack("<HHI", 22, bits, (1 << channels) - 1) + SUBTYPE_PCM
    return chunk(b"fmt ", fields)


def riff(*chunks: bytes, riff_size: int | None = None) -> bytes:
    body = b"WAVE" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body) if riff_size is None else riff_size) + body


def pcm16(channels: int, frames: int) -> np.ndarray:
    return np.random.default_rng(channels).integers(-32768, 32768, (channels, frames)).astype(np.int16)


def interleaved(pcm: np.ndarray) -> bytes:
    return pcm.T.astype("<i2").tobytes()


def as_read(pcm: np.ndarray) -> np.ndarray:
    """The float32 samples every reader must give for int16 PCM (soundfile's convention): (N,) for mono."""
    expected = pcm.astype(np.float64) / 32768
    return (expected[0] if len(pcm) == 1 else expected).astype(np.float32)


def joined_blocks(read_blocks, path, samples: int = 97) -> tuple[np.ndarray, int]:
    """(waveform, rate) as read_wav gives it, from a block reader's blocks of `samples` samples (encode's reader of
    long files), whose count of frames is checked against theirs."""
    rate, channels, frames, blocks = read_blocks(path, samples)
    blocks = list(blocks)
    assert all(b.shape == (channels, max(samples // channels, 1)) for b in blocks[:-1]) and blocks[-1].shape[1]
    waveform = np.concatenate(blocks, axis=1)
    assert waveform.shape[1] == frames
    return (waveform[0] if channels == 1 else waveform), rate


def every_reader(path, monkeypatch) -> list:
    """(waveform, rate) from read_wav, read_file with soundfile and read_file without it, and the block readers."""
    results = [read_wav(path), joined_blocks(wav_blocks, path), joined_blocks(wav_blocks, path, samples=1)]
    if soundfile is not None:
        results += [read_file(path), joined_blocks(audio_blocks, path)]
    with monkeypatch.context() as patched:
        patched.setitem(sys.modules, "soundfile", None)
        results.append(read_file(path))
    return results


PCM6 = pcm16(6, 701)
PCM1 = pcm16(1, 701)
READABLE = {
    # Python < 3.12's wave refused the extensible header that multichannel recorders write
    "extensible 6 channels": (riff(fmt_chunk(6, 48000, extensible=True), chunk(b"data", interleaved(PCM6))), PCM6),
    # recorders stopped mid-write leave the RIFF size 0; wave read the file as "not a WAVE file"
    "RIFF size 0": (riff(fmt_chunk(1, 8000), chunk(b"data", interleaved(PCM1)), riff_size=0), PCM1),
    "RIFF size 0xFFFFFFFF": (riff(fmt_chunk(1, 8000), chunk(b"data", interleaved(PCM1)), riff_size=2**32 - 1), PCM1),
    "chunks around data": (riff(chunk(b"LIST", b"INFOodd"), fmt_chunk(6, 100), chunk(b"fact", b"\0" * 4),
                                chunk(b"data", interleaved(PCM6)), chunk(b"cue ", b"\0" * 4)), PCM6),
    # a recorder that streams leaves a placeholder for the size it never knew
    "data size 0xFFFFFFFF": (riff(fmt_chunk(1, 8000), b"data" + struct.pack("<I", 2**32 - 1) + interleaved(PCM1)),
                             PCM1),
    "odd data with its pad byte": (riff(fmt_chunk(1, 8000), chunk(b"data", interleaved(PCM1)[:-1])), PCM1[:, :-1]),
}


@pytest.mark.parametrize("name", list(READABLE))
def test_every_reader_gives_the_written_samples(tmp_path, monkeypatch, name):
    content, pcm = READABLE[name]
    path = tmp_path / "x.wav"
    path.write_bytes(content)
    rate = struct.unpack("<I", content[content.index(b"fmt ") + 12:][:4])[0]
    for waveform, read_rate in every_reader(path, monkeypatch):
        assert read_rate == rate and waveform.dtype == np.float32 and waveform.flags.c_contiguous
        assert np.array_equal(waveform, as_read(pcm))
    waveform, _ = read_wav(content)
    assert np.array_equal(waveform, as_read(pcm))


def test_a_wav_cut_short_is_refused_by_every_reader(tmp_path, monkeypatch):
    """Its whole frames were read, as a shorter clip: an embedding of another clip, with nothing said (libsndfile
    says it only in its log). Every reader refuses it, with the same words."""
    content = riff(fmt_chunk(6, 1000000), b"data" + struct.pack("<I", 10**6) + interleaved(PCM6) + b"\1\2\3")
    path = tmp_path / "x.wav"
    path.write_bytes(content)
    held = len(interleaved(PCM6)) + 3  # 3 bytes of a frame that never came
    said = f"truncated: its header promises 1,000,000 bytes of samples, the file holds {held:,} (a copy or download"
    readers = [read_wav, read_file, lambda path: wav_blocks(path, 100)]
    readers += [lambda path: audio_blocks(path, 100)] if soundfile is not None else []
    for read in readers:
        with pytest.raises(ValueError, match=re.escape(said)):
            read(path)
    with monkeypatch.context() as patched, pytest.raises(ValueError, match=re.escape(said)):
        patched.setitem(sys.modules, "soundfile", None)
        read_file(path)


UNREADABLE = {
    "not a WAV file": (b"hello, this is text", "not a WAV file"),
    "empty": (b"", "not a WAV file"),
    "FLAC named .wav": (b"fLaC\0\0\0\x22" + b"\0" * 40, "not a WAV file"),
    "RIFX": (b"RIFX" + riff(fmt_chunk(1, 8000), chunk(b"data", b"\0" * 8))[4:], "big-endian RIFX"),
    "8-bit": (riff(fmt_chunk(1, 8000, bits=8), chunk(b"data", b"\x80" * 8)), "8-bit PCM samples; only 16-bit"),
    "24-bit": (riff(fmt_chunk(2, 8000, bits=24), chunk(b"data", b"\0" * 12)), "24-bit PCM samples"),
    "float": (riff(fmt_chunk(1, 8000, bits=32, tag=3), chunk(b"data", b"\0" * 8)), "32-bit float samples"),
    "rate 0": (riff(fmt_chunk(1, 0), chunk(b"data", b"\0" * 8)), "1 channels at 0 Hz"),
    # divided by 0 channels before the reader said which file
    "0 channels": (riff(fmt_chunk(0, 8000), chunk(b"data", b"\0" * 8)), "0 channels at 8000 Hz"),
    "data before fmt": (riff(chunk(b"data", b"\0" * 8), fmt_chunk(1, 8000)), "data chunk comes before the fmt"),
    "no data": (riff(fmt_chunk(1, 8000)), "no data chunk"),
}


@pytest.mark.parametrize("name", list(UNREADABLE))
def test_unreadable_files_are_named_with_the_reason(tmp_path, name):
    content, reason = UNREADABLE[name]
    path = tmp_path / "bad.wav"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"^{path}: .*{reason}"):
        read_wav(path)


def test_write_wav_writes_pcm_as_the_readers_scale_it(tmp_path):
    pcm = pcm16(2, 300)
    back, rate = read_wav(write_wav(tmp_path / "int16.wav", pcm, 8000))
    assert rate == 8000 and np.array_equal(back, as_read(pcm))
    back, _ = read_wav(write_wav(tmp_path / "int32.wav", pcm.astype(np.int32) << 16, 8000))
    assert np.array_equal(back, as_read(pcm))
    back, _ = read_wav(write_wav(tmp_path / "loud.wav", np.array([1.0, -1.0, 2.5, -2.5, 0.5]), 8000))
    assert np.array_equal(back, np.array([32767, -32768, 32767, -32768, 16384], dtype=np.float32) / 32768)


@pytest.mark.parametrize("waveform,rate,reason", [
    (np.array([0.5, np.nan, 0.25]), 8000, r"1 NaN or Inf"),  # was written as a silent 0
    (np.array([np.inf, -np.inf]), 8000, r"2 NaN or Inf"),
    (np.zeros((2, 2, 5)), 8000, r"shape \(2, 2, 5\)"),  # was written as 2 channels of 10 interleaved samples
    (np.zeros((0, 5)), 8000, r"shape \(0, 5\)"),  # wave's own error, naming no file: "# channels not specified"
    (np.ones(4, dtype=bool), 8000, "dtype bool"),
    (np.ones(4, dtype=np.int64), 8000, "dtype int64"),  # was clipped to full scale
    (np.zeros(4), 44100.5, "got 44100.5"),  # was written at 44100 Hz
    (np.zeros(4), 0, "got 0"),
    (np.zeros(4), 2 ** 32, "got 4294967296"),  # over the header's 32 bits: struct's error, naming no file
])
def test_write_wav_refuses_what_it_cannot_write_faithfully(tmp_path, waveform, rate, reason):
    path = tmp_path / "x.wav"
    with pytest.raises(ValueError, match=f"^{path}: .*{reason}"):
        write_wav(path, waveform, rate)
    assert list(tmp_path.iterdir()) == []
