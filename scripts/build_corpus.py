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
atomically, so a rerun skips finished files; silent files and files shorter than one 25 ms window are left
out and listed in the summary.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from echo import atomic, geometry  # noqa: E402
from echo.data import debian, synth  # noqa: E402
from echo.data.opensfx import read_catalogue  # noqa: E402
from echo.data.wav import read_wav, write_wav  # noqa: E402
from echo.encode_files import read_file  # noqa: E402

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
SILENCE = 1e-4  # peak below which a file counts as silent
COLUMNS = ("path", "split", "source", "original", "sample_rate", "seconds", "channels", "label", "licence", "credit")


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
        recipe = (index + seed * 1_000_003, fault, rate, int(seconds * rate))
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


def _corpus_file(out: Path, item: Item, source) -> tuple[dict | None, tuple[str, str] | None, bool]:
    """Write one corpus file (or reuse it, written atomically by an earlier run): (data-list row, None, reused),
    or (None, (original, why it was left out), False)."""
    target = out / item.relative
    try:
        reused = target.is_file()
        if reused:
            waveform, rate = read_wav(target)
        else:
            waveform, rate = _waveform(source)
            reason = _unusable(waveform, rate)
            if reason:
                return None, (item.original, reason), False
            target.parent.mkdir(parents=True, exist_ok=True)
            write_wav(target, waveform, rate)
    except (ValueError, OSError) as error:
        return None, (item.original, f"{type(error).__name__}: {error}"), False
    channels = 1 if waveform.ndim == 1 else waveform.shape[0]
    row = {"path": item.relative, "split": item.split, "source": item.source, "original": item.original,
           "sample_rate": rate, "seconds": round(waveform.shape[-1] / rate, 4), "channels": channels,
           "label": item.label, "licence": item.licence, "credit": item.credit}
    return row, None, reused


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("corpus"))
    parser.add_argument("--cache", type=Path, default=Path(".cache/debian"), help="where packages are kept")
    parser.add_argument("--synthetic", type=int, default=500, help="synthetic machine clips (2-10 s each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extra", nargs="+", choices=EXTRA_PACKAGES, default=[],
                        help="also these packages (each file with its own licence and credit in the data list)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="processes writing files (default: one per CPU; the files do not depend on it)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    work = []
    for package in (*PRETRAIN_PACKAGES, *args.extra, HELD_OUT_PACKAGE):
        root = debian.fetch(package, args.cache)
        work += _package_items(package, root, "heldout" if package == HELD_OUT_PACKAGE else "pretrain")
    work += _synthetic_items(args.synthetic, args.seed)
    clashes = sorted(path for path, count in Counter(item.relative for item, _ in work).items() if count > 1)
    if clashes:  # a rerun would take one file's output for the other's
        raise SystemExit(f"two sources would be written to the same corpus file: {clashes[:5]}")

    rows, skipped, reused = [], [], 0
    with ProcessPoolExecutor(args.jobs) if args.jobs > 1 else nullcontext() as pool:
        results = (pool.map(_corpus_file, repeat(args.out), *zip(*work), chunksize=8) if pool is not None
                   else map(_corpus_file, repeat(args.out), *zip(*work)))
        for row, skip, was_reused in tqdm(results, total=len(work), desc="corpus", unit="file", disable=args.quiet):
            if skip is not None:
                skipped.append(skip)
            else:
                rows.append(row)
                reused += was_reused

    datalist = args.out / "datalist.csv"
    atomic.write_csv(datalist, COLUMNS, rows)  # its temporary is the process's own: seeds build side by side

    print(f"{len(rows)} files in {args.out} ({reused} from an earlier run), {len(skipped)} left out; "
          f"data list {datalist}")
    for split in ("pretrain", "heldout"):
        chosen = [r for r in rows if r["split"] == split]
        rates = sorted({r["sample_rate"] for r in chosen})
        hours = sum(r["seconds"] for r in chosen) / 3600
        print(f"  {split}: {len(chosen)} files, {hours:.2f} h, rates {', '.join(map(str, rates))} Hz")
    for original, reason in skipped[:20]:
        print(f"  left out {original}: {reason}")
    if len(skipped) > 20:
        print(f"  ... and {len(skipped) - 20} more")
    return 0


if __name__ == "__main__":
    sys.exit(main())
