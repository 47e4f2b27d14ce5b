"""Reading OpenTTD sound catalogues (`.cat`, e.g. Debian's openttd-opensfx `opensfx.cat`).

Layout (little-endian): a table of (uint32 offset, uint32 size) pairs, one per sound; the first offset
also ends the table, so there are offset / 8 entries. The top bit of each offset is set in catalogues whose
WAV rates are to be honoured (OpenTTD plays old Transport Tycoon files, without that bit, at 11025 Hz).
Each entry is a length byte, a NUL-terminated name (OpenSFX stores each sound's title, authors and licence
there), then a complete RIFF WAVE file of the table's size: the size counts the WAV alone, not the name before
it (in Debian's opensfx.cat each is its WAV's RIFF size + 8, and the WAV's source file name follows it). An
unused slot holds a WAV without samples.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

HONOUR_RATE_BIT = 1 << 31


@dataclass(frozen=True)
class CatalogueSound:
    index: int
    credit: str  # OpenSFX: '"Title". Original "file" by "author". Edited by ... License: ...'
    wav: bytes  # a whole RIFF WAVE file; b"" for an unused slot

    @property
    def title(self) -> str:
        match = re.match(r'\s*"([^"]*)"', self.credit)
        return match.group(1) if match else self.credit

    @property
    def licence(self) -> str:
        match = re.search(r"License:\s*(.*?)\.(\s|$)", self.credit)
        return match.group(1) if match else "unknown"


def read_catalogue(path) -> list[CatalogueSound]:
    data = Path(path).read_bytes()
    if len(data) < 8:
        raise ValueError(f"{path}: {len(data)} bytes is too short for a sound catalogue")
    count = (struct.unpack_from("<I", data, 0)[0] & ~HONOUR_RATE_BIT) // 8
    if not 0 < count * 8 <= len(data):
        raise ValueError(f"{path}: not an OpenTTD sound catalogue (table of {count} entries)")
    sounds = []
    for index in range(count):
        offset, size = struct.unpack_from("<II", data, 8 * index)
        offset &= ~HONOUR_RATE_BIT
        start = offset + 1 + (data[offset] if offset < len(data) else 0)  # past the length byte and the name
        if start + size > len(data):
            raise ValueError(f"{path}: entry {index} ({offset}+{start - offset}+{size}) lies outside the "
                             f"{len(data)}-byte file")
        name = data[offset + 1: start].split(b"\0")[0].decode("utf-8", "replace")
        body = data[start: start + size]
        sounds.append(CatalogueSound(index, name, body if body[:4] == b"RIFF" and _has_samples(body) else b""))
    return sounds


def _has_samples(wav: bytes) -> bool:
    """Whether a RIFF WAVE file holds a non-empty data chunk (OpenSFX fills unused slots with a bare header)."""
    position = 12
    while position + 8 <= len(wav):
        kind, size = wav[position: position + 4], int.from_bytes(wav[position + 4: position + 8], "little")
        if kind == b"data":
            return size > 0 and position + 8 < len(wav)
        position += 8 + size + size % 2
    return False
