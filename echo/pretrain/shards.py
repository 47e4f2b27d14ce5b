"""WebDataset tar shards for corpora too large for a folder: written from a folder by
`python -m echo pretrain-shards`, read with the `webdataset` library, split across ranks and DataLoader
workers by whole shards.

A sample is the original audio file's bytes (`KEY.flac`, `.wav`, ...) and `KEY.json` with its sample rate,
frames and channels, so sampling can be planned (and replayed on resume) without decoding audio.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from . import corpus

log = logging.getLogger("echo.pretrain")


def webdataset():
    try:
        import webdataset as wds
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ValueError("tar shards are read and written with webdataset: pip install 'echo-fm[data]'") from error
    return wds


def shard_urls(spec) -> list[str]:
    """Shard files from a folder of .tar files, one .tar file, or a brace pattern (`shards-{000..015}.tar`)."""
    path = Path(spec)
    if path.is_dir():
        urls = sorted(str(p) for p in path.glob("*.tar"))
    else:
        from braceexpand import braceexpand  # a webdataset dependency

        webdataset()
        urls = list(braceexpand(str(spec)))
        missing = [u for u in urls if not Path(u).is_file()]
        if missing:
            raise ValueError(f"{len(missing)} of {len(urls)} shard files do not exist, e.g. {missing[0]}")
    if not urls:
        raise ValueError(f"no .tar shards in {spec}")
    return urls


def is_shards(spec) -> bool:
    """--data names shards when it is a .tar file or pattern, or a folder holding .tar files and no audio."""
    path = Path(spec)
    if path.is_dir():
        return any(path.glob("*.tar")) and not corpus.audio_files(path)
    return str(spec).endswith(".tar")


def sample_key(relative: str) -> str:
    """A WebDataset key: no dots (they separate a key from its extensions)."""
    return re.sub(r"[^A-Za-z0-9_/-]", "_", relative)


def write_shards(folder, out, per_shard: int = 1000, min_seconds: float = 1.0) -> list[Path]:
    """Every usable file of a folder into tar shards of at most `per_shard` files. Each shard is written to a
    temporary name and renamed, so a crash leaves no half shard."""
    wds = webdataset()
    source = corpus.FolderCorpus(folder, min_seconds)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for first in tqdm(range(0, len(source.files), per_shard), desc="shards", unit="shard"):
        final = out / f"shard-{len(written):06d}.tar"
        temporary = final.with_name(final.name + ".tmp")
        with wds.TarWriter(str(temporary), encoder=False) as writer:
            for entry in source.files[first : first + per_shard]:
                meta = {"sample_rate": entry.sample_rate, "frames": entry.frames, "channels": entry.channels,
                        "path": entry.path}
                suffix = Path(entry.path).suffix.lower().lstrip(".")
                writer.write({"__key__": sample_key(entry.path), suffix: (source.root / entry.path).read_bytes(),
                              "json": json.dumps(meta).encode()})
        os.replace(temporary, final)
        written.append(final)
    print(f"wrote {len(written)} shards to {out}: {source.describe()}")
    return written


class ShardCorpus:
    """Examples of tar shards: each epoch reshuffles the shard order; stream `part` reads every `parts`-th
    shard in order, so every sample is read once per epoch across all ranks and workers."""

    def __init__(self, spec, min_seconds: float):
        self.urls = shard_urls(spec)
        self.min_seconds = min_seconds

    def describe(self) -> str:
        return f"{len(self.urls)} WebDataset shards"

    def check_parts(self, parts: int) -> None:
        if len(self.urls) < parts:
            raise ValueError(f"{len(self.urls)} shards cannot feed {parts} streams (ranks x DataLoader workers): "
                             f"write more, smaller shards (pretrain-shards --per-shard) or use fewer workers")

    def examples(self, seed: int, part: int, parts: int) -> Iterator[corpus.Example]:
        wds = webdataset()
        epoch = 0
        while True:
            urls = [self.urls[i] for i in corpus.epoch_order(len(self.urls), seed, epoch)[part::parts]]
            samples = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=wds.warn_and_continue))
            for sample in samples:
                yield from self._channels(sample, report=log.warning if epoch == 0 else log.debug)
            epoch += 1

    def _channels(self, sample: dict, report) -> Iterator[corpus.Example]:
        """The sample's channels as examples; a bad or short sample is skipped and reported (by `report`: a
        warning in the first epoch, not again in every later one)."""
        key = sample["__key__"]
        audio = next((k for k in sample if f".{k}" in corpus.AUDIO_SUFFIXES), None)
        if audio is None:
            report("skipping shard sample %s: no audio member (%s)", key, ", ".join(sample))
            return
        data = sample[audio]
        if "json" in sample:
            meta = json.loads(sample["json"])
            rate, frames, channels = meta["sample_rate"], meta["frames"], meta["channels"]
        else:  # shards from elsewhere: read the header
            try:
                info = corpus.soundfile().info(io.BytesIO(data))
            except RuntimeError as error:
                report("skipping unreadable shard sample %s: %s", key, error)
                return
            rate, frames, channels = info.samplerate, info.frames, info.channels
        if corpus.too_short(frames, rate, self.min_seconds):
            report("skipping shard sample %s: %.3f s is shorter than %g s", key, frames / rate, self.min_seconds)
            return
        for channel in range(channels):
            yield corpus.Example(f"{key}:{channel}", rate, frames, channel, corpus.decoded_reader(data, channel))


def open_corpus(spec, min_seconds: float, manifest=None):
    """A FolderCorpus or a ShardCorpus, from what --data names."""
    if is_shards(spec):
        return ShardCorpus(spec, min_seconds)
    return corpus.FolderCorpus(spec, min_seconds, manifest)


def add_arguments(parser) -> None:
    parser.add_argument("--data", required=True, help="folder of audio files (WAV/FLAC/OGG, any rate)")
    parser.add_argument("--out", required=True, help="folder to write shard-NNNNNN.tar files to")
    parser.add_argument("--per-shard", type=int, default=1000, help="files per shard")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="skip files shorter than this")


def run(args) -> int:
    if args.per_shard <= 0:
        raise ValueError(f"--per-shard must be positive, got {args.per_shard}")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    write_shards(args.data, args.out, args.per_shard, args.min_seconds)
    return 0
