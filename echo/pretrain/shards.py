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
import re
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm

from .. import atomic
from ..data.formats import AUDIO_SUFFIXES, logged_truncation, unknown_length
from ..wording import counted
from . import corpus

log = logging.getLogger("echo.pretrain")

# What write_shards is writing into its --out, so that a stopped write resumes only into shards of the same plan.
PLAN_NAME = ".echo_shards.json"


def webdataset():
    try:
        import webdataset as wds
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ValueError("tar shards are read and written with webdataset: pip install 'echo-fm[data]'") from error
    return wds


def shard_urls(spec) -> list[str]:
    """Shard files from a folder of .tar files, one .tar file, or a brace pattern (`shards-{000..015}.tar`).
    Without webdataset this is where pretraining stops, before the model is built: its reader and braceexpand
    (a webdataset dependency) come with it."""
    webdataset()
    path = Path(spec)
    if path.is_dir():
        urls = sorted(str(p.absolute()) for p in path.glob("*.tar"))
    else:
        from braceexpand import braceexpand

        # absolute: webdataset takes what precedes a ":" as a URL scheme, so shards in a folder mic:A were refused
        urls = [str(Path(url).absolute()) for url in braceexpand(str(spec))]
        missing = [u for u in urls if not Path(u).is_file()]
        if missing:
            raise ValueError(f"{len(missing)} of {len(urls)} shard files do not exist, e.g. {missing[0]}")
    if not urls:
        raise ValueError(f"no .tar shards in {spec}")
    return urls


def is_shards(spec) -> bool:
    """--data names shards when it is a .tar file or pattern, or a folder holding .tar files and no audio. A
    folder holding both is refused: training on either would silently leave the other out."""
    path = Path(spec)
    if path.is_dir():
        tars = list(path.glob("*.tar"))
        loose = corpus.audio_files(path) if tars else []
        if loose:
            raise ValueError(f"{spec} holds both .tar shards ({len(tars)}) and audio files ({len(loose)}), e.g. "
                             f"{tars[0].name} and {loose[0]}: move one or the other out, or name the shards by a "
                             f"pattern ({Path(spec) / 'shard-{000000..000009}.tar'})")
        return bool(tars)
    return str(spec).endswith(".tar")


def sample_key(index: int, relative: str) -> str:
    """The WebDataset key of the corpus's `index`-th file: no dots (they separate a key from its extensions).
    The index, up to the first "_", keeps keys unique where names differ only in replaced characters ("a b.wav"
    and "a_b.wav"); webdataset would merge two such samples into one."""
    return f"{index}_" + re.sub(r"[^A-Za-z0-9_/-]", "_", relative)


def write_shards(folder, out, per_shard: int = 1000, min_seconds: float = 1.0) -> list[Path]:
    """Every usable file of a folder into tar shards of at most `per_shard` files. Each shard is written to a
    temporary name and renamed, so a crash leaves no half shard, and the same command after a stop writes only
    the shards still missing: `out` keeps the plan (PLAN_NAME: the files, by path, size and time, and the
    options), and shards are resumed only under the same plan, or, where only the files' times differ (a copy
    of the folder), where the shards written hold exactly what this write would put in them (check_resumable).
    An `out` holding other .tar files is refused: pretraining reads every .tar of a folder, so it would mix those
    with the new shards."""
    wds = webdataset()
    corpus.soundfile()  # first: a folder indexed before is listed without it, and its plan was written, then it failed
    out = Path(out)
    earlier = sorted(path.name for path in out.glob("*.tar"))
    plan_path = out / PLAN_NAME
    if earlier and not plan_path.is_file():
        raise other_write(out, earlier, "other files or options")
    atomic.check_can_make(out, f"--out {out}")  # before the folder is indexed (hours for a large one)
    source = corpus.FolderCorpus(folder, min_seconds)
    plan = {"per_shard": per_shard, "min_seconds": min_seconds,
            "files": corpus.content_hash([(entry.path, entry.size, entry.mtime_ns) for entry in source.files])}
    if earlier:
        check_resumable(out, earlier, saved_plan(plan_path), plan, source)
    out.mkdir(parents=True, exist_ok=True)
    atomic.remove_abandoned(out, "shard-*.tar.*.tmp")  # a killed write's half shard: a shard's worth of disk
    atomic.write_text(plan_path, json.dumps(plan) + "\n")
    written: list[Path] = []
    gone = resumed = 0
    for first in tqdm(range(0, len(source.files), per_shard), desc="shards", unit="shard"):
        final = out / shard_name(len(written))
        written.append(final)
        if final.is_file():  # written whole by an earlier, stopped, run of this plan
            resumed += 1
            continue
        try:  # an open file, not a name: webdataset reads "mic:" in a name mic:A/shard-000000.tar as a URL scheme
            with atomic.replacing(final) as temporary, open(temporary, "wb") as stream, \
                    wds.TarWriter(stream, encoder=False) as writer:
                for index, entry in enumerate(source.files[first : first + per_shard], start=first):
                    sample = shard_sample(source.root, index, entry.path)
                    if sample is None:
                        gone += 1
                    else:
                        writer.write(sample)
        except OSError as error:  # a full disk: "[Errno 28]" alone named neither the shard nor the ones kept
            raise OSError(f"{final} could not be written ({error}); {kept_note(out)}") from error
    changed = f"; {gone} file(s) gone or unreadable since indexing, left out" if gone else ""
    if resumed == len(written):
        print(f"nothing to do: every shard in {out} ({len(written)}) was written by an earlier run; "
              f"{source.describe()}{changed}")
    else:
        kept = f" ({resumed} more by an earlier run)" if resumed else ""
        print(f"wrote {counted(len(written) - resumed, 'shard')}{kept} to {out}: {source.describe()}{changed}")
    return written


def kept_note(out: Path) -> str:
    """What a stopped write leaves in `out`, and that the same command goes on from it."""
    kept = sorted(path.name for path in out.glob("shard-*.tar"))
    if not kept:
        return "no shard was finished, so none was kept; the same command starts again"
    names = kept[0] if len(kept) == 1 else f"{kept[0]} to {kept[-1]}"
    return (f"{counted(len(kept), 'finished shard')} {'is' if len(kept) == 1 else 'are'} kept in {out} ({names}); "
            f"the same command writes only the missing ones")


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


def other_write(out: Path, earlier: list[str], why: str) -> ValueError:
    """The refusal of an `out` whose .tar files (`earlier`) this write would not continue."""
    return ValueError(f"{out} already holds {len(earlier)} .tar files ({', '.join(earlier[:3])}"
                      f"{', ...' if len(earlier) > 3 else ''}) of another write ({why}); pretraining on it would "
                      f"read them with the new shards. Delete them or write to another --out")


def check_resumable(out: Path, earlier: list[str], saved: dict | None, plan: dict, source) -> None:
    """Refuse to write into `out`, holding the shards `earlier`, unless this write continues the one that wrote
    them: the same options, and the same files by path, size and time; where the times (or sizes, or the file
    list) differ, as they do in a copy of the folder (`cp -r` gives every file a new time), each shard written
    must hold exactly the samples that this write would put in it, compared byte for byte (reading the shards and
    their files again takes about as long as writing them did: its progress is shown)."""
    def options(written_plan: dict) -> dict:
        return {key: value for key, value in written_plan.items() if key != "files"}

    if not isinstance(saved, dict) or options(saved) != options(plan):
        raise other_write(out, earlier, "other files or options")
    if saved.get("files") == plan["files"]:
        return
    per_shard = plan["per_shard"]
    planned = {shard_name(number): first for number, first in enumerate(range(0, len(source.files), per_shard))}
    with tqdm(earlier, desc="checking shards", unit="shard") as bar:  # closed on a refusal: it starts its own line
        for name in bar:
            if name not in planned:
                raise other_write(out, earlier, f"{name} is not a shard of the files of {source.root} now")
            difference = shard_difference(out / name, source, planned[name], per_shard)
            if difference:
                raise other_write(out, earlier, f"{name} {difference}")


def shard_difference(shard: Path, source, first: int, per_shard: int) -> str:
    """How `shard` differs from the shard of `source`'s files from the `first`-th on that this write would
    write, or "" where it holds exactly those samples."""
    written = iter(ShardCorpus._samples([str(shard)]))
    for index, entry in enumerate(source.files[first : first + per_shard], start=first):
        expected = shard_sample(source.root, index, entry.path)
        sample = next(written, None)
        if expected is None or sample is None or written_members(sample) != expected:
            return f"does not hold {entry.path} as it is now"
    extra = next(written, None)
    return f"also holds {extra['__key__']}, which is no file of {source.root} now" if extra is not None else ""


def written_members(sample: dict) -> dict:
    """A sample read from a shard as shard_sample made it: its key and members, without the reader's facts
    (`__url__`, ...)."""
    return {key: value for key, value in sample.items() if key == "__key__" or not key.startswith("__")}


def saved_plan(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # gone or damaged: no plan to resume under
        return None


def shard_sample(root: Path, index: int, relative: str) -> dict | None:
    """The sample of one file: its bytes, and JSON facts taken from those bytes' header, not from the index (the
    file may have changed since). None, with a warning, for a file that has gone or can no longer be read."""
    try:
        data = (root / relative).read_bytes()
        info = corpus.soundfile().info(io.BytesIO(data))
        if problem := logged_truncation(info) or unknown_length(info):
            raise RuntimeError(problem)
    except (OSError, RuntimeError) as error:  # soundfile raises LibsndfileError (a RuntimeError) for bad files
        log.warning("leaving out %s, gone or unreadable since the folder was indexed: %s", relative,
                    str(error).replace("\n", " "))
        return None
    meta = {"sample_rate": info.samplerate, "frames": info.frames, "channels": info.channels, "path": relative}
    return {"__key__": sample_key(index, relative), Path(relative).suffix.lower().lstrip("."): data,
            "json": json.dumps(meta).encode()}


def written_facts(member: bytes | None) -> tuple[int, int, int] | None:
    """(sample rate, frames, channels) from the JSON member that pretrain-shards writes; None for JSON that is not
    that (shards from other tools carry labels or captions) or no JSON at all."""
    try:
        meta = json.loads(member)
        facts = (meta["sample_rate"], meta["frames"], meta["channels"])
    except (TypeError, ValueError, KeyError):  # no member, not JSON, not a dict, another dict
        return None
    return facts if all(isinstance(value, int) and value > 0 for value in facts) else None


class ShardCorpus:
    """Examples of tar shards: each epoch reshuffles the shard order; stream `part` reads every `parts`-th
    shard in order, so every sample is read once per epoch across all ranks and workers."""

    def __init__(self, spec, min_seconds: float):
        self.spec = spec
        self.urls = shard_urls(spec)
        self.min_seconds = min_seconds

    def describe(self) -> str:
        return f"{len(self.urls)} WebDataset shards"

    def fingerprint(self) -> dict:
        """What a resumed run must find again: the shards by file name and size (moved shards pass)."""
        return {"shards": len(self.urls),
                "hash": corpus.content_hash([(Path(url).name, Path(url).stat().st_size) for url in self.urls])}

    def check_parts(self, parts: int) -> None:
        if len(self.urls) < parts:
            raise ValueError(f"{counted(len(self.urls), 'shard')} cannot feed {parts} streams (ranks x DataLoader "
                             f"workers): write more, smaller shards (pretrain-shards --per-shard) or use fewer workers")

    def examples(self, seed: int, part: int, parts: int) -> Iterator[corpus.Example]:
        """Endless. A stream whose share of the shards has yielded nothing yet checks, once, that some shard
        holds a usable sample: otherwise it would loop over empty epochs for ever."""
        epoch, yielded = 0, False
        while True:
            urls = [self.urls[i] for i in corpus.epoch_order(len(self.urls), seed, epoch)[part::parts]]
            for sample in self._samples(urls):
                for example in self._channels(sample, log.warning if epoch == 0 else log.debug):
                    yielded = True
                    yield example
            if not yielded and epoch == 0:
                self._check_usable()
            epoch += 1

    @staticmethod
    def _samples(urls: list[str]) -> Iterable[dict]:
        wds = webdataset()
        return wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=wds.warn_and_continue))

    def _check_usable(self) -> None:
        """The folder's "no usable audio" error when no shard holds a usable sample."""
        samples, skipped = 0, {"unreadable": 0, "too short": 0}
        for sample in self._samples(self.urls):
            samples += 1
            if next(self._channels(sample, log.debug, skipped), None) is not None:
                return
        raise ValueError(f"no usable audio under {self.spec}: {counted(samples, 'sample')} in "
                         f"{counted(len(self.urls), 'shard')}, {corpus.skipped_text(skipped)}")

    def _channels(self, sample: dict, report, skipped: dict[str, int] | None = None) -> Iterator[corpus.Example]:
        """The sample's channels as examples; a bad or short sample is skipped, counted in `skipped` and reported
        (by `report`: a warning in the first epoch, not again in every later one)."""
        skipped = {"unreadable": 0, "too short": 0} if skipped is None else skipped
        key = sample["__key__"]
        source = f"{sample.get('__url__', 'shard')} sample {key}"
        audio = next((k for k in sample if f".{k}" in AUDIO_SUFFIXES), None)
        if audio is None:
            report("skipping shard sample %s: no audio member (%s)", key, ", ".join(sample))
            skipped["unreadable"] += 1
            return
        data = sample[audio]
        facts = written_facts(sample.get("json"))
        told_by = "its JSON member" if facts is not None else "its header"
        if facts is not None:
            rate, frames, channels = facts
        else:  # shards from elsewhere: read the header
            try:
                info = corpus.soundfile().info(io.BytesIO(data))
                if problem := unknown_length(info):
                    raise RuntimeError(problem)
            except RuntimeError as error:
                report("skipping unreadable shard sample %s: %s", key, error)
                skipped["unreadable"] += 1
                return
            rate, frames, channels = info.samplerate, info.frames, info.channels
        if corpus.too_short(frames, rate, self.min_seconds):
            report("skipping shard sample %s: %.3f s is shorter than %g s", key, frames / rate, self.min_seconds)
            skipped["too short"] += 1
            return
        for channel in range(channels):
            reader = corpus.decoded_reader(data, rate, frames, channel, source, told_by)
            yield corpus.Example(f"{key}:{channel}", rate, frames, channel, reader)


def open_corpus(spec, min_seconds: float, manifest=None):
    """A FolderCorpus or a ShardCorpus, from what --data names. Both read their audio with soundfile, checked here:
    a folder indexed before (its manifest cached) let a run without it write its run folder and build its model."""
    corpus.soundfile()
    if is_shards(spec):
        return ShardCorpus(spec, min_seconds)
    return corpus.FolderCorpus(spec, min_seconds, manifest)


def add_arguments(parser) -> None:
    parser.add_argument("--data", required=True,
                        help="folder of audio files (WAV/FLAC/OGG/Opus/MP3/AIFF/CAF/W64/RF64, any rate)")
    parser.add_argument("--out", required=True,
                        help="folder to write shard-NNNNNN.tar files to; the same command after a stop writes "
                             "only the missing shards, but one holding .tar files of another write (other files or "
                             "options) is refused, since pretraining reads every .tar in the folder")
    parser.add_argument("--per-shard", type=int, default=1000, help="files per shard (default: 1000)")
    parser.add_argument("--min-seconds", type=float, default=1.0,
                        help="skip files shorter than this many seconds (default: 1.0, as pretrain)")


def run(args) -> int:
    if args.per_shard <= 0:
        raise ValueError(f"--per-shard must be positive, got {args.per_shard}")
    if not 0 <= args.min_seconds < float("inf"):  # NaN skipped nothing and -1 said it skipped files
        raise ValueError(f"--min-seconds must be 0 or more, got {args.min_seconds}")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        write_shards(args.data, args.out, args.per_shard, args.min_seconds)
    except KeyboardInterrupt:  # every finished shard is whole on disk: the command line says which, and how to go on
        raise KeyboardInterrupt(kept_note(Path(args.out))) from None
    return 0
