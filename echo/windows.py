"""Windows of a recording: equal spans of `window` seconds every `hop` seconds, each encoded as a signal of its own.

Why equal spans: an utterance embedding moves with a clip's length, so a long recording scored window by window
against a bank of normal windows needs every window the same length; the tail shorter than a window is left out.
"""
from __future__ import annotations

import re
from typing import Iterable, Iterator

import numpy as np

SHORTEST = 0.025  # seconds: one STFT frame (25 ms) at every rate
# seconds: past any recording (32 years), and in samples at any rate an int64 (starts); 1e305 s overflowed to inf
LONGEST = 1e9


def checked(window: float, hop: float | None) -> tuple[float, float]:
    """(window, hop) in seconds, hop defaulting to the window (end to end); refused unless the window is at least one
    frame, the hop over 0, and both at most LONGEST."""
    hop = window if hop is None else hop
    if not SHORTEST <= window <= LONGEST or not 0 < hop <= LONGEST:
        raise ValueError(f"a window must be at least {SHORTEST} s (one frame) and its hop over 0 s, both at most "
                         f"{LONGEST:g} s; got {window:g} and {hop:g}")
    return float(window), float(hop)


def too_short(samples: int, rate: int, window: float) -> str:
    """Why a recording of `samples` at `rate` has no window."""
    return f"shorter than one window ({samples / rate:.3f} s < {window:g} s)"


def named(number: int, hop: int, rate: int) -> str:
    """A window as a failure names it: its number and start."""
    return f"window {number} (from {number * hop / rate:.3f} s)"


def of(signal, window: int, hop: int) -> list:
    """The windows of a whole (N,) or (C, N) tensor, as views."""
    if signal.shape[-1] < window:
        return []
    strided = signal.unfold(-1, window, hop)  # (..., windows, window)
    return [strided[..., i, :] for i in range(strided.shape[-2])]


def spans(window: float, hop: float, rate: int) -> tuple[int, int]:
    """(window, hop) in samples at `rate`."""
    return _in_samples(window, rate), _in_samples(hop, rate)


def _in_samples(seconds: float, rate: int) -> int:
    """Rounded to the nearest sample, at least one."""
    return max(1, round(seconds * rate))


def fragment(number: int, window: int, hop: int, rate: int) -> str:
    """A window as a media fragment says it ("#t=10,20"): its first sample's time and its last's end, fixed point (an
    exponent is none of a fragment's), to 7 decimals: a sample at the highest rate (10 MHz), so windows a hop apart are
    named apart however late in a recording (six significant digits named 100000.25 s and 100000.5 s alike)."""
    start = number * hop
    return "#t=" + ",".join(np.format_float_positional(sample / rate, precision=7, trim="-")
                            for sample in (start, start + window))


def starts(windows: int, hop: float, rate: int) -> np.ndarray:
    """Each window's start in seconds, from its first sample."""
    return np.arange(windows) * _in_samples(hop, rate) / rate


def cut(blocks: Iterable[np.ndarray], window: int, hop: int) -> Iterator[np.ndarray]:
    """The (C, window) windows of a recording given as consecutive (C, n) blocks, in order, as views of a joining of
    the blocks they span. The blocks are held as they come and joined only once a window is complete: joined at
    every block, a window of minutes was copied again at each of its blocks, 2-3x its size at the peak."""
    held, first, count = [], 0, 0  # blocks not yet behind every window, the signal index of their first, samples
    next_start = 0
    for block in blocks:
        held.append(block)
        count += block.shape[1]
        if next_start + window > first + count:
            if next_start >= first + count:  # a gap between windows (hop > window): nothing held is needed
                held, first, count = [], first + count, 0
            continue
        joined = held[0] if len(held) == 1 else np.concatenate(held, axis=1)
        while next_start + window <= first + count:
            yield joined[:, next_start - first : next_start - first + window]
            next_start += hop
        kept = min(next_start, first + count) - first
        held = [joined[:, kept:].copy()] if kept < count else []  # a copy: the joining is freed with its windows
        first, count = first + kept, count - kept


def label(window: float, hop: float) -> str:
    """The windows as said in an output's model key and its files' keys: "window10.0s-hop5.0s"."""
    return f"window{window!r}s-hop{hop!r}s"


LABELLED = re.compile(r"window([^s]+)s-hop([^s]+)s-")  # a float's repr holds no "s", but may hold "-": 1e-05


def parsed(model_key: str) -> tuple[float, float] | None:
    """(window, hop) of an output's model key (see label), or None for one encoded whole; a ValueError for a key
    that begins as windows do but does not say them."""
    if not model_key.startswith("window"):
        return None
    said = LABELLED.match(model_key)
    if said is None:
        raise ValueError(f"model {model_key!r} does not say its windows as window<SECONDS>s-hop<SECONDS>s-")
    return float(said[1]), float(said[2])
