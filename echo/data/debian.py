"""Files of Debian packages without installing them: `apt-get download NAME` and `dpkg-deb -x` into a cache
folder (changes nothing on the system). Used by the scripts that rebuild the bundled samples and the
pretraining corpus."""
from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

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


def _run(command: list[str], cwd: Path) -> None:
    if shutil.which(command[0]) is None:
        raise RuntimeError(f"`{command[0]}` is not available: fetching Debian packages needs a Debian-like system")
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed ({result.returncode}): {result.stderr.strip()[-500:]}")


def fetch(package: str, cache) -> Path:
    """The folder holding `package`'s extracted files (downloaded and extracted once, then reused)."""
    cache = Path(cache).resolve()
    root = cache / "extracted" / package
    done = root / ".extracted"
    if done.is_file():
        return root
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    archives = sorted(debs.glob(f"{package}_*.deb"))
    if not archives:
        _run(["apt-get", "download", package], debs)
        archives = sorted(debs.glob(f"{package}_*.deb"))
    if not archives:
        raise RuntimeError(f"apt-get download {package} produced no {package}_*.deb in {debs}")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    _run(["dpkg-deb", "-x", str(archives[-1].resolve()), str(root)], cache)
    done.write_text(archives[-1].name + "\n")
    return root


def version(root: Path) -> str:
    """The .deb file name a fetched package came from (name_version_arch.deb)."""
    return (Path(root) / ".extracted").read_text().strip()


def copyright_text(root: Path, package: str) -> str:
    path = Path(root) / "usr/share/doc" / package / "copyright"
    if path.is_file():
        return path.read_text(errors="replace")
    gz = path.with_suffix(".gz")
    return gzip.decompress(gz.read_bytes()).decode(errors="replace") if gz.is_file() else ""
