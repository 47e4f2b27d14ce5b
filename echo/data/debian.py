"""Files of Debian packages without installing them: `apt-get download NAME` and `dpkg-deb -x` into a cache
folder (changes nothing on the system). Used by the scripts that rebuild the bundled samples and the
pretraining corpus. Processes fetching into one cache side by side each download and extract into a folder of
their own and rename the result into place, so none ever sees another's half-written files."""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

from .. import atomic

# Licence and authors of the audio in each package, from its /usr/share/doc/PACKAGE/copyright. OpenSFX
# sounds carry their own credit and licence (CC BY 3.0, CC BY-SA 3.0 or CC0) in the catalogue.
LICENCES = {
    "openttd-opensfx": ("CC-BY-SA-3.0 (per sound: see its credit)", "OpenSFX authors, see each sound's credit"),
    "asterisk-core-sounds-en-wav": ("CC-BY-SA-3.0", "Allison Smith (recording); Digium, Inc."),
    "alsa-utils": ("GPL-2", "Jaroslav Kysela and the ALSA project"),
    "sound-icons": ("GPL-2+", "Brailcom, o.p.s."),
    "hydrogen-drumkits": ("per kit (GPL-2, GPL-2+, CC-BY-3.0, CC-BY-SA-3.0, CC0-1.0): see its credit",
                          "the Hydrogen drum kits' authors, see each kit's credit"),
    "bucklespring-data": ("GPL-2+", "Ico Doornekamp (bucklespring)"),
}


class FetchError(RuntimeError):
    """A package could not be fetched: a missing tool, no network, a damaged .deb. Its message says which."""


def _run(command: list[str], cwd: Path) -> None:
    if shutil.which(command[0]) is None:
        raise FetchError(f"`{command[0]}` is not available: fetching Debian packages needs a Debian-like system")
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise FetchError(f"`{' '.join(command)}` failed ({result.returncode}): {result.stderr.strip()[-500:]}")


def _private(folder: Path, kind: str = "") -> Path:
    """A folder name beside `folder`, this process's own (FOLDER.[KIND.]PID.tmp). Such folders of processes no
    longer alive (killed mid-download or mid-extraction) are removed first: nothing else ever would."""
    if folder.parent.is_dir():
        for left in folder.parent.glob(f"{glob.escape(folder.name)}.*tmp"):
            match = re.fullmatch(rf"{re.escape(folder.name)}\.(?:\w+\.)?(\d+)\.tmp", left.name)
            if match and left.is_dir() and not atomic.process_alive(int(match[1])):
                shutil.rmtree(left, ignore_errors=True)
    private = folder.with_name(f"{folder.name}.{kind + '.' if kind else ''}{os.getpid()}.tmp")
    shutil.rmtree(private, ignore_errors=True)
    return private


def _download(package: str, debs: Path) -> Path:
    """`package`'s .deb in `debs`, downloaded once."""
    archives = sorted(debs.glob(f"{package}_*.deb"))
    if archives:
        return archives[-1]
    private = _private(debs / package)
    private.mkdir(parents=True)
    try:
        _run(["apt-get", "download", package], private)
        downloaded = sorted(private.glob(f"{package}_*.deb"))
        if not downloaded:
            raise FetchError(f"apt-get download {package} produced no {package}_*.deb")
        os.replace(downloaded[-1], debs / downloaded[-1].name)  # another process's copy is the same file
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return debs / downloaded[-1].name


def fetch(package: str, cache) -> Path:
    """The folder holding `package`'s extracted files (downloaded and extracted once, then reused)."""
    cache = Path(cache).resolve()
    root = cache / "extracted" / package
    if (root / ".extracted").is_file():
        return root
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    archive = _download(package, debs)
    private = _private(root)
    private.mkdir(parents=True)
    try:
        try:
            _run(["dpkg-deb", "-x", str(archive), str(private)], cache)
        except FetchError as error:
            if shutil.which("dpkg-deb") is None:
                raise
            raise FetchError(f"{error}\n{archive} may be damaged (an interrupted download): delete it and run "
                             "again to download it anew") from None
        (private / ".extracted").write_text(archive.name + "\n")
        if root.is_dir() and not (root / ".extracted").is_file():  # left by an extraction that did not finish
            # Renamed away first (atomic: one process wins), so that no two delete it together.
            stale = _private(root, "stale")
            try:
                root.rename(stale)
            except OSError:
                pass
            shutil.rmtree(stale, ignore_errors=True)
        try:
            private.rename(root)
        except OSError:
            if not (root / ".extracted").is_file():
                raise
            # another process extracted it first: its copy is the same
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return root


def version(root: Path) -> str:
    """The .deb file name a fetched package came from (name_version_arch.deb)."""
    return (Path(root) / ".extracted").read_text().strip()

