import math

import pytest

from echo import geometry

# rate: (n_fft, hop, bins, bands, real bins in the last band), worked out by hand from spec section 1-2
TABLE = {
    1999: (49, 19, 25, 1, 25),  # 49.975 and 19.99 rounded down
    2000: (50, 20, 26, 1, 26),
    8000: (200, 80, 101, 4, 5),
    11025: (275, 110, 138, 5, 10),  # 275.625, 110.25: odd window
    12000: (300, 120, 151, 5, 23),
    16000: (400, 160, 201, 7, 9),
    22050: (551, 220, 276, 9, 20),
    24000: (600, 240, 301, 10, 13),
    32000: (800, 320, 401, 13, 17),
    44100: (1102, 441, 552, 18, 8),
    48000: (1200, 480, 601, 19, 25),
    50000: (1250, 500, 626, 20, 18),
    96000: (2400, 960, 1201, 38, 17),
}


@pytest.mark.parametrize("rate", sorted(TABLE))
def test_rate_geometry(rate):
    g = geometry.SignalGeometry(rate, 10 * rate)
    assert (g.n_fft, g.hop, g.bins, g.bands, g.last_band_bins) == TABLE[rate]
    # bands tile the bins exactly: no overlap, no bin dropped
    edges = [geometry.band_edges(rate, b) for b in range(g.bands)]
    assert edges[0][0] == 0 and edges[-1][1] == g.bins
    assert all(a[1] == b[0] for a, b in zip(edges, edges[1:]))


@pytest.mark.parametrize("rate,size,dim", [(16000, 2688, 384), (48000, 7296, 384), (16000, 1344, 192)])
def test_output_sizes(rate, size, dim):
    assert geometry.SignalGeometry(rate, rate).utterance_dim(dim) == size


def test_frames_and_patches():
    assert geometry.n_frames(399, 16000) == 0
    assert geometry.n_frames(400, 16000) == 1
    assert geometry.n_frames(400 + 160 * 15, 16000) == 16
    assert geometry.n_patches(16) == 1 and geometry.n_patches(17) == 2 and geometry.n_patches(1) == 1
    g = geometry.SignalGeometry(16000, 16000 * 10)
    assert g.frames == 998 and g.segment_patches == [math.ceil(998 / 16)]


@pytest.mark.parametrize(
    "frames,expected",
    [
        (7, [(0, 7)]),
        (2000, [(0, 2000)]),
        (2001, [(0, 2000), (1, 2001)]),
        (4000, [(0, 2000), (2000, 4000)]),
        (4500, [(0, 2000), (2000, 4000), (2500, 4500)]),
    ],
)
def test_segments(frames, expected):
    assert geometry.segments(frames) == expected


def test_band_positions_16k():
    """The spec's p values at 16 kHz."""
    expected = [0.0775, 0.2375, 0.3975, 0.5575, 0.7175, 0.8775, 0.98]
    got = [geometry.band_position(16000, *geometry.band_edges(16000, b)) for b in range(7)]
    assert got == pytest.approx(expected, abs=1e-12)
