"""Bundled samples, the stdlib WAV reader/writer and the OpenSFX catalogue reader."""
import io
import re
import struct
import wave

import numpy as np
import pytest

import echo.data
from echo.data import bundled
from echo.data.opensfx import read_catalogue
from echo.data.wav import read_wav, write_wav


def test_bundled_samples_are_real_short_and_credited():
    every = echo.data.samples()
    assert len(every) >= 3
    rates = {rate for _, rate in every.values()}
    assert len(rates) >= 3 and {8000, 44100} <= rates
    credits = (bundled.SAMPLES_DIR / "CREDITS.md").read_text()
    for name, (waveform, rate) in every.items():
        assert waveform.dtype == np.float32 and waveform.ndim == 1
        assert 0.5 * rate <= len(waveform) <= 4 * rate, name
        assert 0.01 < np.abs(waveform).max() <= 1.0 and waveform.std() > 1e-3, name  # not silent
        row = next(line for line in credits.splitlines() if line.startswith(f"| {name}.wav |"))
        assert f"| {rate} Hz |" in row and ".deb |" in row
        assert any(licence in row for licence in ("Creative Commons", "CC-BY", "GPL-2"))
    assert sum(path.stat().st_size for path in bundled.SAMPLES_DIR.iterdir()) < 2_000_000
    waveform, rate = echo.data.sample(sorted(every)[0])
    assert np.array_equal(waveform, every[sorted(every)[0]][0])


SPDX = {"Creative Commons Attribution 3.0": "CC-BY-3.0", "Creative Commons Attribution 3.0 Unported": "CC-BY-3.0",
        "CC-BY-SA-3.0": "CC-BY-SA-3.0", "Creative Commons Attribution-ShareAlike 3.0 Unported": "CC-BY-SA-3.0",
        "Creative Commons Zero 1.0": "CC0-1.0", "GPL-2": "GPL-2.0-only", "GPL-2+": "GPL-2.0-or-later"}


def test_the_package_metadata_names_every_licence_it_ships():
    """The wheel declared Apache-2.0 alone while it ships GPL-2 and CC recordings and a model trained on them: each
    licence of the samples and of the default model's data is in the expression, and their credits in the wheel."""
    import csv
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11 on
    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    samples = [row.split(" | ")[6] for row in (bundled.SAMPLES_DIR / "CREDITS.md").read_text().splitlines()
               if row.startswith("| ") and ".wav |" in row]
    credits = bundled.SAMPLES_DIR.parent / "default" / "DATA_CREDITS.csv"
    with open(credits, newline="", encoding="utf-8") as handle:
        trained_on = [row["licence"] for row in csv.DictReader(handle) if row["source"] != "echo.data.synth"]
    assert len(samples) == len(echo.data.samples()) and trained_on
    declared = set(project["license"].split(" AND "))
    assert {SPDX[licence] for licence in samples + trained_on} | {"Apache-2.0"} == declared
    assert {"echo/data/samples/CREDITS.md", "echo/data/default/DATA_CREDITS.csv"} <= set(project["license-files"])


def test_unknown_sample_names_the_known_ones():
    with pytest.raises(ValueError, match="no bundled sample 'nope'; bundled: .*circular_saw"):
        echo.data.sample("nope")


@pytest.mark.parametrize("channels", [1, 3])
def test_wav_round_trip(tmp_path, channels):
    rate = int(np.random.choice([8000, 22050, 50000]))
    waveform = np.random.uniform(-0.9, 0.9, (channels, 1001)).squeeze(0) if channels == 1 else \
        np.random.uniform(-0.9, 0.9, (channels, 1001))
    path = write_wav(tmp_path / "x.wav", waveform, rate)
    back, back_rate = read_wav(path)
    assert back_rate == rate and back.shape == waveform.shape
    assert np.abs(back - waveform).max() <= 0.5 / 32768 + 1e-7
    assert not list(tmp_path.glob("x.wav*.tmp"))


def wav_bytes(samples, rate):
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(np.asarray(samples, dtype="<i2").tobytes())
    return buffer.getvalue()


def catalogue(entries, trailer=b"\0\x14src/wav/osfx_00.wav\0"):
    """A sound catalogue laid out as Debian's opensfx.cat: each table size counts the WAV alone; the name comes
    before the WAV and its source file name after it."""
    table = 8 * len(entries)
    body, header = b"", b""
    for name, data in entries:
        header += struct.pack("<II", (table + len(body)) | (1 << 31), len(data))
        body += bytes([len(name)]) + name + data + trailer
    return header + body


def test_opensfx_catalogue_is_read(tmp_path):
    """Every sample of each sound is read. The size was taken to count the name too: each WAV lost its last
    1 + name-length bytes (Debian's opensfx.cat: 77 to 256 bytes, up to 128 samples per sound)."""
    pcm = np.random.randint(-30000, 30000, 777)
    empty = wav_bytes([], 44100)  # OpenSFX's unused slots: a WAV header without samples
    entries = [
        (b'"Saw". Original "saw.wav" by "someone". License: Creative Commons Zero 1.0.\0', wav_bytes(pcm, 44100)),
        (b'"Unused/Nothing". Trivial empty sound file. License: Creative Commons Zero 1.0.\0', empty),
        (b'"Corrupt sound"\0', b"\0" * 44),
    ]
    path = tmp_path / "test.cat"
    path.write_bytes(catalogue(entries))
    sounds = read_catalogue(path)
    assert [s.title for s in sounds] == ["Saw", "Unused/Nothing", "Corrupt sound"]
    assert sounds[0].licence == "Creative Commons Zero 1.0" and sounds[1].wav == sounds[2].wav == b""
    assert sounds[0].wav == entries[0][1]
    waveform, rate = read_wav(sounds[0].wav)
    assert rate == 44100 and np.array_equal(waveform * 32768, pcm.astype(np.float32))
    data = catalogue(entries)
    path.write_bytes(data[:8] + struct.pack("<II", 10**9, 5) + data[16:])
    with pytest.raises(ValueError, match="entry 1 .* lies outside"):
        read_catalogue(path)
    path.write_bytes(catalogue(entries, trailer=b"")[:-1])  # the last WAV cut short by a byte
    with pytest.raises(ValueError, match="entry 2 .* lies outside"):
        read_catalogue(path)


def test_a_catalogue_whose_last_wav_ends_the_file_is_read_whole(tmp_path):
    """The last sound of a catalogue without a source name after its WAV ends exactly at the file's end: it lies
    inside the file, and is read with every sample."""
    pcm = np.random.default_rng(0).integers(-30000, 30000, 301)
    entries = [(b'"First"\0', wav_bytes(pcm[:100], 22050)), (b'"Last"\0', wav_bytes(pcm, 44100))]
    path = tmp_path / "test.cat"
    path.write_bytes(catalogue(entries, trailer=b""))
    sounds = read_catalogue(path)
    assert [s.title for s in sounds] == ["First", "Last"] and sounds[1].wav == entries[1][1]
    waveform, rate = read_wav(sounds[1].wav)
    assert rate == 44100 and np.array_equal(waveform * 32768, pcm.astype(np.float32))


def test_unused_slots_are_told_by_the_data_chunk_wherever_it_lies(tmp_path):
    """A WAV with an odd-sized chunk before its data (a LIST of tags; a pad byte follows it) holds samples, and a
    WAV whose data chunk is empty is an unused slot also where another chunk follows it."""
    def chunk(kind, payload):
        return kind + struct.pack("<I", len(payload)) + payload + b"\0" * (len(payload) % 2)

    fmt = chunk(b"fmt ", struct.pack("<HHIIHH", 1, 1, 8000, 16000, 2, 16))
    samples = np.arange(-50, 50, dtype="<i2")
    tagged = b"WAVE" + fmt + chunk(b"LIST", b"INFOx") + chunk(b"data", samples.tobytes())
    empty = b"WAVE" + fmt + chunk(b"data", b"") + chunk(b"LIST", b"INFOtags")
    entries = [(b'"Tagged"\0', b"RIFF" + struct.pack("<I", len(tagged)) + tagged),
               (b'"Unused"\0', b"RIFF" + struct.pack("<I", len(empty)) + empty)]
    path = tmp_path / "test.cat"
    path.write_bytes(catalogue(entries))
    sounds = read_catalogue(path)
    assert sounds[0].wav == entries[0][1] and sounds[1].wav == b""
    assert np.array_equal(read_wav(sounds[0].wav)[0] * 32768, samples.astype(np.float32))


def test_sample_reads_only_bundled_names(tmp_path):
    """A name is looked up among the bundled recordings, never resolved as a path to some other WAV file."""
    outside = write_wav(tmp_path / "elsewhere.wav", np.zeros(100), 8000)
    for name in (str(outside.with_suffix("")), f"../samples/{bundled.names()[0]}", "../../data/samples/x"):
        with pytest.raises(ValueError, match=re.escape(f"no bundled sample {name!r}; bundled: ")):
            echo.data.sample(name)
