"""Rebuild echo/data/samples/ (the bundled real recordings and CREDITS.md) from Debian packages.

    python scripts/fetch_samples.py [--cache .cache/debian]

Each sample is cut from one file of one package (trimmed, mono, 16-bit WAV at the file's own rate).
`apt-get download` + `dpkg-deb -x` fetch the packages into the cache without installing anything.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from echo import atomic  # noqa: E402
from echo.data import debian  # noqa: E402
from echo.data.opensfx import read_catalogue  # noqa: E402
from echo.data.bundled import SAMPLES_DIR  # noqa: E402
from echo.data.wav import read_wav, write_wav  # noqa: E402

OPENSFX_CATALOGUE = "usr/share/games/openttd/baseset/opensfx/opensfx.cat"


@dataclass(frozen=True)
class Cut:
    name: str
    package: str
    member: str  # path inside the package, or "opensfx.cat#INDEX" for a sound of the OpenSFX catalogue
    start: float  # seconds
    seconds: float
    description: str


CUTS = [
    Cut("circular_saw", "openttd-opensfx", "opensfx.cat#40", 0.5, 2.5, "circular saw cross-cutting (sawmill)"),
    Cut("mine_elevator", "openttd-opensfx", "opensfx.cat#11", 0.0, 2.3, "elevator machinery (mining machinery)"),
    Cut("truck_engine", "openttd-opensfx", "opensfx.cat#25", 0.0, 3.0, "truck engine starting and pulling away"),
    Cut("voice_prompt", "asterisk-core-sounds-en-wav",
        "usr/share/asterisk/sounds/en_US_f_Allison/at-tone-time-exactly.wav", 0.0, 3.5,
        "telephone voice prompt (speech)"),
    Cut("front_center", "alsa-utils", "usr/share/sounds/alsa/Front_Center.wav", 0.0, 1.5,
        "speaker-test voice 'front center'"),
    Cut("glass_water", "sound-icons", "usr/share/sounds/sound-icons/glass-water-1.wav", 0.0, 1.0,
        "water poured into a glass (sound icon)"),
]


def check_members(package: str, root: Path) -> None:
    """SystemExit naming the package's version and every file of it that CUTS takes and it no longer holds (a
    newer release moved or renamed them), rather than a traceback at the first."""
    wanted = {OPENSFX_CATALOGUE if cut.member.startswith("opensfx.cat#") else cut.member
              for cut in CUTS if cut.package == package}
    missing = sorted(member for member in wanted if not (root / member).is_file())
    if missing:
        try:
            source = f"{package} ({debian.version(root)})"
        except OSError:  # no record of the .deb it came from: its version unknown
            source = package
        raise SystemExit(f"{source} has no {', '.join(missing)}: the package changed; point CUTS in "
                         "scripts/fetch_samples.py at where its files are now")


def cut_waveform(cut: Cut, root: Path) -> tuple[np.ndarray, int, str, str, str]:
    """(mono waveform, rate, original file name, licence, authors/credit) of one cut."""
    if cut.member.startswith("opensfx.cat#"):
        sound = read_catalogue(root / OPENSFX_CATALOGUE)[int(cut.member.split("#")[1])]
        waveform, rate = read_wav(sound.wav)
        original, licence, authors = f"{cut.member} \"{sound.title}\"", sound.licence, sound.credit
    else:
        waveform, rate = read_wav(root / cut.member)
        original, (licence, authors) = Path(cut.member).name, debian.LICENCES[cut.package]
    if waveform.ndim == 2:
        waveform = waveform.mean(axis=0)
    start = int(cut.start * rate)
    return waveform[start: start + int(cut.seconds * rate)], rate, original, licence, authors


def credits_text(rows: list[tuple[Cut, int, float, str, str, str, str]]) -> str:
    lines = [
        "# Bundled samples: sources, licences, authors",
        "",
        "Short excerpts (trimmed, mono, 16-bit PCM WAV at the original sample rate) of files shipped in Debian",
        "packages, made by `scripts/fetch_samples.py`. Each file keeps the licence of its source, which is not",
        "echo's own licence. The packages' copyright statements are quoted below the table.",
        "",
        "| file | rate | seconds | what | Debian package | original file | licence | authors / credit |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for cut, rate, seconds, deb, original, licence, authors in rows:
        lines.append(f"| {cut.name}.wav | {rate} Hz | {seconds:.2f} | {cut.description} | {deb} | {original} "
                     f"| {licence} | {authors.replace('|', '/')} |")
    lines += [
        "",
        "Licence texts: CC BY 3.0 https://creativecommons.org/licenses/by/3.0/, CC BY-SA 3.0",
        "https://creativecommons.org/licenses/by-sa/3.0/, CC0 1.0 https://creativecommons.org/publicdomain/zero/1.0/,",
        "GPL-2 / GPL-2+ https://www.gnu.org/licenses/old-licenses/gpl-2.0.html (on Debian:",
        "/usr/share/common-licenses/GPL-2). OpenSFX (openttd-opensfx) lists each sound's authors and licence in",
        "the catalogue entry quoted above; its package copyright: 'Files: src/wav/* License: CC-BY-SA-3.0'",
        "(individual sounds CC BY 3.0, CC BY-SA 3.0 or CC0). asterisk-core-sounds-en: 'Copyright: 2003-2010,",
        "Allison Smith', CC-BY-SA-3.0. alsa-utils: 'Copyright: 1998-2022 Jaroslav Kysela and others', GPL-2.",
        "sound-icons: 'Copyright: 2003 Brailcom, o.p.s.', GPL-2+.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=REPO / ".cache/debian",
                        help="where packages are kept (default: the repository's .cache/debian)")
    parser.add_argument("--out", type=Path, default=SAMPLES_DIR)
    args = parser.parse_args(argv)
    try:  # before fetching anything
        atomic.check_writable(args.out, f"--out {args.out}")
    except ValueError as error:
        raise SystemExit(str(error)) from None
    rows = []
    for cut in CUTS:
        try:
            root = debian.fetch(cut.package, args.cache)
        except (debian.FetchError, OSError) as error:
            raise SystemExit(f"fetching {cut.package}: {error}") from None
        check_members(cut.package, root)
        waveform, rate, original, licence, authors = cut_waveform(cut, root)
        write_wav(args.out / f"{cut.name}.wav", waveform, rate)
        rows.append((cut, rate, len(waveform) / rate, debian.version(root), original, licence, authors))
        print(f"{cut.name}.wav: {rate} Hz, {len(waveform) / rate:.2f} s from {cut.package} {original}")
    atomic.write_text(args.out / "CREDITS.md", credits_text(rows))
    total = sum(path.stat().st_size for path in args.out.glob("*.wav"))
    print(f"{len(rows)} samples, {total / 1e6:.2f} MB in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
