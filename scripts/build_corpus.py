"""Build the pretraining corpus of echo's default model from packages that install offline, plus synthetic
machine signals, with a data list of every file's source, licence and credit.

    python scripts/build_corpus.py [--out corpus] [--cache .cache/debian] [--synthetic 500] [--extra hydrogen-drumkits]
        [--jobs N]

    OUT/pretrain/<package>/...wav        real audio at its own rate: OpenSFX machinery, vehicles and tools
                                         (unpacked from opensfx.cat), Asterisk speech prompts (8 kHz),
                                         alsa-utils speaker-test voices (48 kHz), sound-icons (16 kHz);
                                         with --extra hydrogen-drumkits also the Hydrogen drum kits
                                         (percussive transients, 22.05-48 kHz; FLAC, AIFF and WAV samples
                                         written as 16-bit WAV; not in the bundled model's corpus)
    OUT/pretrain/synthetic/<rate>/...wav machines from echo.data.synth at mixed rates, healthy and with
                                         bearing faults
    OUT/heldout/bucklespring/...wav      bucklespring-data key switches (44.1 kHz), held out of pretraining
                                         for evaluation; label press (-0) / release (-1)
    OUT/datalist.csv                     path, split, source, original, rate, seconds, channels, label,
                                         licence, credit

Packages come from `apt-get download` + `dpkg-deb -x` (nothing is installed). Every file is written
atomically and its row recorded in OUT/datalist.partial.csv while the build runs (OUT/datalist.csv replaces
it when the build is done): every file's source before any is written, its length once it is. A rerun, or the
same command after an interruption, reuses a file only where that record says it came from the same source and
the file is whole (and reads at its recorded length, where one was recorded); others are written again. Audio
files of an earlier build that this one does not list are removed (pretraining would read them without their
credit); audio files no build listed stop the build. Silent files and files shorter
than one 25 ms window are left out and listed in the summary.
"""
from __future__ import annotations

import argparse
import csv
import errno
import os
import signal
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import numpy as np
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from echo import atomic, demo, geometry  # noqa: E402
from echo.data import debian, synth  # noqa: E402
from echo.data.opensfx import read_catalogue  # noqa: E402
from echo.data.wav import read_wav, write_wav  # noqa: E402
from echo.encode_files import read_file  # noqa: E402
from echo.pretrain.corpus import audio_files  # noqa: E402
from echo.wording import counted  # noqa: E402

PRETRAIN_PACKAGES = ("openttd-opensfx", "asterisk-core-sounds-en-wav", "alsa-utils", "sound-icons")
EXTRA_PACKAGES = ("hydrogen-drumkits",)  # more real wideband audio, for runs beyond the bundled model's recipe
HELD_OUT_PACKAGE = "bucklespring-data"
OPENSFX_CATALOGUE = "usr/share/games/openttd/baseset/opensfx/opensfx.cat"
HYDROGEN_KITS_FOLDER = "usr/share/hydrogen/data/drumkits"
# (licence, credit) of each kit of hydrogen-drumkits 2017.09.19~dfsg-1, from its debian/copyright (which says
# how each was confirmed); a kit not listed here is left out, never given a guessed licence.
HYDROGEN_KITS = {
    "Audiophob": ("CC0-1.0", "soundcloud.com/audiophobdubstep"),
    "BJA_Pacific": ("CC-BY-SA-3.0-US", "Luc Tanguay, Bransin James Anderson"),
    "ColomboAcousticDrumkit": ("GPL-2+ with composition exception", "Marcos Guglielmetti"),
    "ElectricEmpireKit": ("GPL-2+", "Artemiy Pavlov (ArtemioLabs)"),
    "ForzeeStereo": ("GPL-2", "Vladimir Sadovnikov, Alexander Belokurov"),
    "Gimme A Hand 1.0": ("GPL-2", "Glen MacArthur"),
    "HardElectro1": ("GPL-2+", "Artemiy Pavlov (ArtemioLabs)"),
    "Millo-Drums_v.1": ("GPL-2", "Emiliano Grilli (Emillo)"),
    "Millo_MultiLayered2": ("GPL-2", "Emiliano Grilli (Emillo)"),
    "Millo_MultiLayered3": ("GPL-2", "Emiliano Grilli (Emillo)"),
    "The Black Pearl 1.0": ("GPL-2", "Glen MacArthur"),
    "VariBreaks": ("GPL-2+", "Artemiy Pavlov (ArtemioLabs)"),
    "circAfrique v4": ("CC-BY-SA-3.0", "Jim Harney"),
    "rumpf_kit_z01_h2": ("CC-BY-3.0", "Emanuel Rumpf"),
}
HYDROGEN_SUFFIXES = (".wav", ".flac", ".aiff", ".aif")
SYNTHETIC_RATES = (8000, 12000, 16000, 22050, 44100, 48000, 50000)
# --seed S takes random_machine seeds S * SEED_STRIDE + 0 .. --synthetic - 1. The demo's and the checkpoint
# validation's machines (scripts/select_checkpoint.py) are drawn from demo.MACHINE_SEED up, below seed 1's first:
# only seed 0's can reach them.
SEED_STRIDE = 1_000_003
SILENCE = 1e-4  # peak below which a file counts as silent
COLUMNS = ("path", "split", "source", "original", "sample_rate", "seconds", "channels", "label", "licence", "credit")
PARTIAL = "datalist.partial.csv"  # the rows of the files written so far, while a build runs
LENGTH = ("sample_rate", "seconds", "channels")  # what a reused file must still read as
# Errors of the place written to, not of one file: every later file would fail the same way (_fatal).
FATAL = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENOTDIR, errno.EACCES, errno.EPERM}
FLUSH_EVERY = 50  # files between two saves of the partial data list


@dataclass
class Item:
    """One corpus file to write: where it goes, how to make its waveform, and its data-list row."""

    relative: str
    split: str
    source: str
    original: str
    licence: str
    credit: str
    label: str = ""


def _package_items(package: str, root: Path, split: str) -> list[tuple[Item, object]]:
    """(item, waveform source) for every audio file of a fetched package: a path, or WAV bytes."""
    licence, credit = debian.LICENCES[package]
    source = debian.version(root)
    folder = "heldout/bucklespring" if split == "heldout" else f"pretrain/{package}"
    items = []
    if package == "openttd-opensfx":
        for sound in read_catalogue(root / OPENSFX_CATALOGUE):
            if sound.wav:
                name = f"{sound.index:02d}_{_slug(sound.title.lower())}"
                items.append((Item(f"{folder}/{name}.wav", split, source, f"opensfx.cat#{sound.index} "
                                   f"\"{sound.title}\"", sound.licence, sound.credit), sound.wav))
        return items
    if package == "hydrogen-drumkits":
        return _hydrogen_items(root, folder, source)
    for path in sorted(root.rglob("*.wav")):
        relative = path.relative_to(root)
        label = {"0": "press", "1": "release"}.get(path.stem.rsplit("-", 1)[-1], "") if split == "heldout" else ""
        short = Path(*relative.parts[-2:]) if len(relative.parts) > 1 else relative
        items.append((Item(f"{folder}/{short}", split, source, str(relative), licence, credit, label), path))
    return items


def _slug(name: str) -> str:
    """A file name made of letters, digits and underscores."""
    return "".join(c if c.isalnum() else "_" for c in name)


def _hydrogen_items(root: Path, folder: str, source: str) -> list[tuple[Item, object]]:
    """Every sample of every kit whose licence is recorded in HYDROGEN_KITS, under pretrain/<package>/<kit>/."""
    items = []
    for kit in sorted(p for p in (root / HYDROGEN_KITS_FOLDER).iterdir() if p.is_dir()):
        if kit.name not in HYDROGEN_KITS:
            print(f"hydrogen-drumkits: kit {kit.name!r} left out: no licence recorded for it in HYDROGEN_KITS")
            continue
        licence, credit = HYDROGEN_KITS[kit.name]
        for path in sorted(p for p in kit.rglob("*") if p.suffix.lower() in HYDROGEN_SUFFIXES):
            relative = f"{folder}/{_slug(kit.name)}/{_slug(path.stem)}.wav"
            items.append((Item(relative, "pretrain", source, str(path.relative_to(root)), licence, credit), path))
    return items


def _synthetic_items(count: int, seed: int) -> list[tuple[Item, object]]:
    rng = np.random.default_rng(seed)
    items = []
    for index in range(count):
        rate = int(rng.choice(SYNTHETIC_RATES))
        fault = [None, "outer", "inner", "ball"][int(rng.integers(4))]
        seconds = float(rng.uniform(2, 10))
        name = f"pretrain/synthetic/{rate}/machine_{index:05d}_{fault or 'healthy'}.wav"
        recipe = (index + seed * SEED_STRIDE, fault, rate, int(seconds * rate))
        items.append((Item(name, "pretrain", "echo.data.synth", f"random_machine(seed={recipe[0]}, fault={fault})",
                           "generated by echo (no third-party rights)", "echo.data.synth", fault or "healthy"),
                      recipe))
    return items


def _waveform(source) -> tuple[np.ndarray, int]:
    if isinstance(source, tuple):
        machine_seed, fault, rate, n = source
        signal = synth.machine_signal(synth.random_machine(machine_seed, fault), rate, n, seed=machine_seed)
        return signal / max(float(np.abs(signal).max()), 1e-9) * 0.9, rate
    if isinstance(source, Path):
        return read_file(source)
    return read_wav(source)


def _unusable(waveform: np.ndarray, rate: int) -> str | None:
    if waveform.shape[-1] < geometry.n_fft(rate):
        return f"{waveform.shape[-1]} samples, shorter than one 25 ms window ({geometry.n_fft(rate)})"
    if np.abs(waveform).max() < SILENCE:
        return "silent"
    return None


def _planned_row(item: Item) -> dict:
    """The data-list row of a file not written yet: its source, and no length ("")."""
    return {"path": item.relative, "split": item.split, "source": item.source, "original": item.original,
            **dict.fromkeys(LENGTH, ""), "label": item.label, "licence": item.licence, "credit": item.credit}


def _row(item: Item, waveform: np.ndarray, rate: int) -> dict:
    """The data-list row of a written file, its values as the CSV holds them."""
    channels = 1 if waveform.ndim == 1 else waveform.shape[0]
    return {**_planned_row(item), "sample_rate": str(rate), "seconds": str(round(waveform.shape[-1] / rate, 4)),
            "channels": str(channels)}


def _corpus_file(out: Path, item: Item, source, recorded: dict) -> tuple[dict | None, tuple | None, bool]:
    """Write one corpus file, or reuse the one there when it is whole and reads at the length `recorded` (its
    row, of this source) gives, or at any length where the row has none yet (the file was written after its
    source was recorded, atomically, but the build stopped before keeping its length). (data-list row, None,
    reused), or (None, (original, why it was left out), False). Errors of the output folder (FATAL) are raised."""
    target = out / item.relative
    try:
        try:
            row = _row(item, *read_wav(target))
            if _whole(target) and all(recorded[column] in ("", row[column]) for column in LENGTH):
                return row, None, True
        except (ValueError, OSError):  # missing, empty or damaged: written again below
            pass
        waveform, rate = _waveform(source)
        reason = _unusable(waveform, rate)
        if reason:
            target.unlink(missing_ok=True)  # an earlier build's file here would stay in pretraining, unlisted
            return None, (item.original, reason), False
        target.parent.mkdir(parents=True, exist_ok=True)
        write_wav(target, waveform, rate)
    except (ValueError, OSError) as error:
        if _fatal(error, out):
            raise
        return None, (item.original, f"{type(error).__name__}: {error}"), False
    return _row(item, waveform, rate), None, False


def _whole(path: Path) -> bool:
    """Whether a WAV file is as long as its RIFF header says (read_wav reads the frames of a file cut short)."""
    with open(path, "rb") as handle:
        header = handle.read(8)
    return len(header) == 8 and int.from_bytes(header[4:], "little") + 8 == path.stat().st_size


def _fatal(error: Exception, out: Path) -> bool:
    """A FATAL error of the output, not of reading one package's source file (reported, and that file left
    out). A write to an open file fails without a file name."""
    return (isinstance(error, OSError) and error.errno in FATAL
            and (error.filename is None or Path(os.path.abspath(error.filename)).is_relative_to(out)))


def _records(out: Path) -> dict[str, dict]:
    """path -> data-list row of the files an earlier build wrote: those of the build under way when it was
    interrupted, else those of the last finished one."""
    for name in (PARTIAL, "datalist.csv"):
        if (out / name).is_file():
            with open(out / name, encoding="utf-8", newline="") as handle:
                return {row["path"]: row for row in csv.DictReader(handle)}
    return {}


def _unlisted(out: Path, listed: set[str], records: dict[str, dict]) -> list[str]:
    """Audio files in OUT/pretrain and OUT/heldout outside this build's list; SystemExit naming those no build
    recorded (not ours to delete)."""
    present = [f"{split}/{name}" for split in ("pretrain", "heldout") for name in audio_files(out / split)]
    unlisted = [path for path in present if path not in listed]
    foreign = [path for path in unlisted if path not in records]
    if foreign:
        raise SystemExit(f"{out} holds {counted(len(foreign), 'audio file')} that no build of this script listed, "
                         f"which pretraining would read without their credit: {', '.join(foreign[:5])}"
                         f"{' ...' if len(foreign) > 5 else ''}; move them away or choose another --out")
    return unlisted


def _ignore_interrupts() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent alone handles it


def _write(out: Path, work: list, recorded: dict[str, dict], jobs: int, quiet: bool) -> tuple[list, list, int]:
    """(rows in the order of `work`, left out, reused) of writing every file, reusing those that `recorded`
    (path -> row of this source) allows (_corpus_file); the partial data list (`recorded`, then the row of every
    finished file) is saved as files finish and when the build stops."""
    done = dict(recorded)
    results = {}
    pool = ProcessPoolExecutor(jobs, initializer=_ignore_interrupts) if jobs > 1 else None
    try:
        arguments = (repeat(out), *zip(*work), [recorded[item.relative] for item, _ in work])
        outcomes = pool.map(_corpus_file, *arguments, chunksize=8) if pool else map(_corpus_file, *arguments)
        # strict: the bar is asked for one more outcome after the last, which ends it at N of N, not N - 1
        progress = tqdm(outcomes, total=len(work), desc="corpus", unit="file", disable=quiet)
        for number, ((item, _), outcome) in enumerate(zip(work, progress, strict=True), 1):
            results[item.relative] = outcome
            if outcome[0] is not None:
                done[item.relative] = outcome[0]
            if number % FLUSH_EVERY == 0:
                atomic.write_csv(out / PARTIAL, COLUMNS, done.values())
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        atomic.write_csv(out / PARTIAL, COLUMNS, done.values())
    rows = [results[item.relative][0] for item, _ in work if results[item.relative][0] is not None]
    skipped = [results[item.relative][1] for item, _ in work if results[item.relative][1] is not None]
    return rows, skipped, sum(outcome[2] for outcome in results.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "corpus", help="default: the repository's corpus/")
    parser.add_argument("--cache", type=Path, default=REPO / ".cache/debian",
                        help="where packages are kept (default: the repository's .cache/debian)")
    parser.add_argument("--synthetic", type=int, default=500,
                        help=f"synthetic machine clips (2-10 s each; at most {demo.MACHINE_SEED} with --seed 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extra", nargs="+", choices=EXTRA_PACKAGES, default=[],
                        help="also these packages (each file with its own licence and credit in the data list)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="processes writing files (default: one per CPU; the files do not depend on it)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.synthetic < 0 or args.jobs < 1 or not 0 <= args.seed < 2**32:
        parser.error("--synthetic must be >= 0, --jobs >= 1 and --seed in [0, 2**32)")
    if args.seed == 0 and args.synthetic > demo.MACHINE_SEED:  # the machines it is tested on, in its training data
        parser.error(f"--synthetic must be at most {demo.MACHINE_SEED} with --seed 0: its machines take "
                     f"random_machine seeds 0 to {args.synthetic - 1}, and the held-out ones (the demo's and "
                     f"checkpoint validation's machines) begin at {demo.MACHINE_SEED}")
    try:
        return _build(args)
    except KeyboardInterrupt:
        raise SystemExit("interrupted; the same command resumes") from None


def _build(args) -> int:
    out = args.out.resolve()
    try:  # before fetching anything
        atomic.check_writable(out, f"the corpus folder {out}")
    except ValueError as error:
        raise SystemExit(str(error)) from None

    work = []
    try:
        for package in (*PRETRAIN_PACKAGES, *args.extra, HELD_OUT_PACKAGE):
            root = debian.fetch(package, args.cache)
            work += _package_items(package, root, "heldout" if package == HELD_OUT_PACKAGE else "pretrain")
    except (debian.FetchError, OSError) as error:
        raise SystemExit(f"fetching {package}: {error}") from None
    work += _synthetic_items(args.synthetic, args.seed)
    planned = {item.relative: item for item, _ in work}
    if len(planned) < len(work):  # a rerun would take one file's output for the other's
        clashes = sorted(path for path, count in Counter(item.relative for item, _ in work).items() if count > 1)
        raise SystemExit(f"two sources would be written to the same corpus file: {clashes[:5]}")

    for written in ("pretrain/**/*.tmp", "heldout/**/*.tmp", "datalist*.csv.*.tmp"):  # ours: --out may hold others'
        atomic.remove_abandoned(out, written)
    records = _records(out)
    unlisted = _unlisted(out, set(planned), records)
    # Only records of the same source are kept: a file about to be written from another one is no longer what
    # its record says, even if the build stops before it is.
    kept = {path: row for path, row in records.items()
            if path in planned and (row["source"], row["original"]) == (planned[path].source, planned[path].original)}
    # Every other planned file is recorded as this script's with no source (so never reused) while the files at
    # their paths (of other sources, or unrecorded) are deleted, and the unlisted ones, which keep their rows
    # until then.
    others = [path for path in planned if path not in kept]
    try:
        atomic.write_csv(out / PARTIAL, COLUMNS, [*kept.values(), *({"path": path} for path in others),
                                                  *(records[path] for path in unlisted)])
        (out / "datalist.csv").unlink(missing_ok=True)  # it lists the corpus only once the build is done
        for path in [*unlisted, *others]:
            (out / path).unlink(missing_ok=True)
        # Then with their sources, before any is written: a file there is then of that source, and whole (written
        # atomically), so one that workers finish after an interruption, its length never recorded, is reused.
        recorded = {**{path: _planned_row(item) for path, item in planned.items()}, **kept}
        atomic.write_csv(out / PARTIAL, COLUMNS, recorded.values())
        rows, skipped, reused = _write(out, work, recorded, args.jobs, args.quiet)
        datalist = out / "datalist.csv"
        atomic.write_csv(datalist, COLUMNS, rows)  # atomic: a kill leaves the partial list, never a torn one
        (out / PARTIAL).unlink()
    except OSError as error:
        raise SystemExit(f"cannot write the corpus to {out}: {error}; the same command resumes") from None

    if unlisted:
        print(f"removed {counted(len(unlisted), 'file')} of an earlier build that this one does not list, e.g. "
              f"{unlisted[0]}")
    print(f"{counted(len(rows), 'file')} in {out} ({reused} from an earlier run), {len(skipped)} left out; "
          f"data list {datalist}")
    for split in ("pretrain", "heldout"):
        chosen = [r for r in rows if r["split"] == split]
        rates = sorted({int(r["sample_rate"]) for r in chosen})
        hours = sum(float(r["seconds"]) for r in chosen) / 3600
        print(f"  {split}: {counted(len(chosen), 'file')}, {hours:.2f} h, rates {', '.join(map(str, rates))} Hz")
    for original, reason in skipped[:20]:
        print(f"  left out {original}: {reason}")
    if len(skipped) > 20:
        print(f"  ... and {len(skipped) - 20} more")
    return 0


if __name__ == "__main__":
    sys.exit(main())
