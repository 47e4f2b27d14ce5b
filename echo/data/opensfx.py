"""Reading OpenTTD sound catalogues (`.cat`, e.g. Debian's openttd-opensfx `opensfx.cat`).

Layout (little-endian): a table of (uint32 offset, uint32 size) pairs, one per sound; the first offset
also ends the table, so there are offset / 8 entries. The top bit of each offset is set in catalogues whose
WAV rates are to be honoured (OpenTTD plays old Transport Tycoon files, without that bit, at 11025 Hz).
Each entry is a length byte, a NUL-terminated name (OpenSFX stores each sound's title, authors and licence
there), then a complete RIFF WAVE file (empty for unused slots).
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
        if offset + size > len(data) or size < 1:
            raise ValueError(f"{path}: entry {index} ({offset}+{size}) lies outside the {len(data)}-byte file")
        name_length = data[offset]
        name = data[offset + 1: offset + 1 + name_length].split(b"\0")[0].decode("utf-8", "replace")
        body = data[offset + 1 + name_length: offset + size]
        sounds.append(CatalogueSound(index, name, body if body[:4] == b"RIFF" else b""))
    return sounds
