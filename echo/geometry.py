"""Every geometry rule of ECHO in one place: window, hop, frames, bins, bands, patches, segments.

Every later stage (reference model, fast path, kernels, pretraining) reads these numbers from here, so a
rule changes in one line or not at all.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

BAND_BINS = 32  # frequency rows of one patch (and of one band)
PATCH_FRAMES = 16  # time columns of one patch
MAX_PATCHES = 125  # patches per band sequence in one pass (pos_embed rows 1..125)
SEGMENT_FRAMES = MAX_PATCHES * PATCH_FRAMES  # 2000 frames, ~20 s
LOG_EPS = 1e-9
LOG_MEAN = 5.874158  # s = (ln(|X| + 1e-9) + LOG_MEAN) / LOG_STD
LOG_STD = 10.446348
FPE_SCALE = 25.0  # gamma of the frequency positional encoding
MIN_SAMPLE_RATE = 100  # the lowest rate whose 10 ms hop is a whole sample (the spec: any positive rate)
MAX_SAMPLE_RATE = 10_000_000  # 10 MHz: past acoustic-emission sensors (~1-2 MHz)


def n_fft(sample_rate: int) -> int:
    """25 ms window, rounded down: 400 at 16 kHz, 1102 at 44.1 kHz."""
    return sample_rate * 25 // 1000


def hop(sample_rate: int) -> int:
    """10 ms hop, rounded down."""
    return sample_rate * 10 // 1000


def n_bins(sample_rate: int) -> int:
    return n_fft(sample_rate) // 2 + 1


def n_bands(sample_rate: int) -> int:
    return max(1, math.ceil(n_bins(sample_rate) / BAND_BINS))


def n_frames(n_samples: int, sample_rate: int) -> int:
    """Frames of a non-centred STFT; 0 when the signal is shorter than one window."""
    if n_samples < n_fft(sample_rate):
        return 0
    return 1 + (n_samples - n_fft(sample_rate)) // hop(sample_rate)


def n_patches(frames: int) -> int:
    """Tokens after the CLS: the last, zero-padded patch is a real token."""
    return math.ceil(frames / PATCH_FRAMES)


def band_edges(sample_rate: int, band: int) -> tuple[int, int]:
    """Real bins [start, end) of a band; the band is zero-padded before them to 32 rows."""
    start = band * BAND_BINS
    return start, min(start + BAND_BINS, n_bins(sample_rate))


def band_position(sample_rate: int, start: float, end: float) -> float:
    """Centre of real bins [start, end) as a fraction of Nyquist: the FPE's input p in [0, 1].

    `start`/`end` need not lie on the 32-bin grid (pretraining draws bands at random offsets).
    """
    centre = (start + end - 1) / 2
    return centre * sample_rate / n_fft(sample_rate) / (sample_rate / 2)


def segments(frames: int) -> list[tuple[int, int]]:
    """Frame ranges of the released segmenting rule: whole 2000-frame blocks, then the LAST 2000 frames
    once if any remain (overlapping the previous block). A signal of <= 2000 frames is one segment."""
    if frames <= SEGMENT_FRAMES:
        return [(0, frames)]
    full = frames // SEGMENT_FRAMES
    out = [(k * SEGMENT_FRAMES, (k + 1) * SEGMENT_FRAMES) for k in range(full)]
    if frames % SEGMENT_FRAMES:
        out.append((frames - SEGMENT_FRAMES, frames))
    return out


@dataclass(frozen=True)
class SignalGeometry:
    """All shapes of one mono signal through the encoder."""

    sample_rate: int
    n_samples: int

    @property
    def n_fft(self) -> int:
        return n_fft(self.sample_rate)

    @property
    def hop(self) -> int:
        return hop(self.sample_rate)

    @property
    def bins(self) -> int:
        return n_bins(self.sample_rate)

    @property
    def bands(self) -> int:
        return n_bands(self.sample_rate)

    @property
    def last_band_bins(self) -> int:
        start, end = band_edges(self.sample_rate, self.bands - 1)
        return end - start

    @property
    def frames(self) -> int:
        return n_frames(self.n_samples, self.sample_rate)

    @property
    def segments(self) -> list[tuple[int, int]]:
        return segments(self.frames)

    @property
    def segment_patches(self) -> list[int]:
        return [n_patches(end - start) for start, end in self.segments]

    @property
    def frame_rows(self) -> int:
        """Rows of the frame embedding: patches of all segments stacked (overlapped ones twice)."""
        return sum(self.segment_patches)

    def utterance_dim(self, dim: int) -> int:
        return self.bands * dim
