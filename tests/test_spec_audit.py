"""An audit of the reference path against ../shared/spec/echo-model.md, rule by rule.

Every expected value here is worked out from the spec's own wording (hand-computed numbers, closed forms, or the
spec's formula written out again in numpy/math), never read back from the code under test. Each test names the
spec section it pins.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import echo
from echo import geometry
from echo.ops import stft as stft_ops
from echo.ops import tokens as token_ops

from conftest import random_model, rel_err


def s_of(magnitude: float) -> float:
    """Spec section 1: s = (ln(|X| + 1e-9) + 5.874158) / 10.446348, in float64."""
    return (math.log(magnitude + 1e-9) + 5.874158) / 10.446348


def spec_fpe(p: float, dim: int) -> np.ndarray:
    """Spec section 3, float64: angle_i = (25 p) exp(2i (-ln 10000) / D); fpe[2i] = sin, fpe[2i+1] = cos."""
    out = np.empty(dim)
    for i in range(dim // 2):
        angle = 25 * p * math.exp(2 * i * -math.log(10000) / dim)
        out[2 * i], out[2 * i + 1] = math.sin(angle), math.cos(angle)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Section 1: window, hop, frames, bins (floor, not round)


@pytest.mark.parametrize(
    "rate,n_fft,hop",
    [
        (1999, 49, 19),  # 0.025 * 1999 = 49.975, 0.01 * 1999 = 19.99: rounding would give 50 and 20
        (7999, 199, 79),  # 199.975, 79.99
        (11025, 275, 110),  # 275.625 (round: 276), 110.25
        (44100, 1102, 441),  # 1102.5: round-half-up would give 1103
        (22050, 551, 220),  # 551.25, 220.5 (round-half-up: 221)
        (100, 2, 1),  # the lowest accepted rate: F = 2, one band
        (119, 2, 1),  # 2.975, 1.19
    ],
)
def test_window_and_hop_are_floored(rate, n_fft, hop):
    assert geometry.n_fft(rate) == n_fft and geometry.hop(rate) == hop
    assert geometry.n_bins(rate) == n_fft // 2 + 1


@pytest.mark.parametrize("rate", [1999, 11025, 22050])
def test_frame_count_and_short_signal_boundary(rate):
    """T = 1 + (N - n_fft) // hop on the spectrogram itself; N = n_fft - 1 is a clear ValueError, N = n_fft one
    frame. n_fft and hop written out from the spec (floor of 25 ms and 10 ms)."""
    n_fft, hop = math.floor(rate * 25 / 1000), math.floor(rate * 10 / 1000)
    for n in (n_fft, n_fft + hop - 1, n_fft + hop, n_fft + 7 * hop + 3):
        spec = stft_ops.spectrogram(torch.randn(n), rate)
        assert spec.shape == (n_fft // 2 + 1, 1 + (n - n_fft) // hop)
    model = random_model("tiny", depth=1)
    with pytest.raises(ValueError, match=f"shorter than one 25 ms window at {rate} Hz"):
        model.encode(torch.randn(n_fft - 1), rate)
    utterance, frames = model.encode(torch.randn(n_fft), rate)
    bands = math.ceil((n_fft // 2 + 1) / 32)
    assert utterance.shape == (bands * 192,) and frames.shape == (1, bands * 192)  # T = 1 -> L = 1


# ---------------------------------------------------------------------------------------------------------------
# Section 1: the front end's numbers (periodic Hann, no centring, |X| not |X|^2, not normalised, natural log,
# eps 1e-9, the two constants, DC removal of the whole signal)


def test_silence_gives_the_log_floor():
    """|X| = 0 everywhere: every value is (ln(1e-9) + 5.874158) / 10.446348 = -1.421464...."""
    spec = stft_ops.spectrogram(torch.zeros(16000), 16000)
    expected = (math.log(1e-9) + 5.874158) / 10.446348
    assert expected == pytest.approx(-1.421464, abs=1e-6)  # ln(1e-9) = -20.723266
    assert torch.allclose(spec.double(), torch.full(spec.shape, expected, dtype=torch.float64), rtol=0, atol=1e-6)


def test_sinusoid_on_a_bin_gives_the_hann_lines():
    """x = cos(2 pi k n / n_fft) + 3 (a DC offset the front end removes). A periodic Hann window of length n has
    the DFT n/2 at 0, -n/4 at +-1 and 0 elsewhere, so every frame has |X[k]| = n/4 = 100, |X[k+-1]| = n/8 = 50 and
    |X| = 0 at every other bin. A symmetric window, power, normalisation, log10 or another eps or constant
    gives other numbers."""
    rate, n_fft, k = 16000, 400, 37
    n = 4000  # a whole number of periods: the mean of the cosine is 0, the signal's mean is exactly 3
    t = torch.arange(n, dtype=torch.float64)
    x = (torch.cos(2 * math.pi * k * t / n_fft) + 3).float()
    spec = stft_ops.spectrogram(x, rate).double()
    assert spec.shape == (201, 1 + (n - n_fft) // 160)
    expected = torch.full((201,), s_of(0.0), dtype=torch.float64)
    expected[k], expected[k - 1], expected[k + 1] = s_of(100.0), s_of(50.0), s_of(50.0)
    # float32 samples carry rounding of ~1e-7 per sample: |X| of the empty bins is ~1e-6, not 0; there
    # ln(|X| + 1e-9) moves by up to ~7, so those bins are only checked to lie well below the lines
    lines = [k - 1, k, k + 1]
    assert torch.allclose(spec[lines], expected[lines, None].expand(3, spec.shape[1]), rtol=0, atol=1e-5)
    others = torch.ones(201, dtype=torch.bool)
    others[lines] = False
    assert spec[others].max() < s_of(1e-3)


def test_frames_start_at_sample_zero_and_dc_is_the_whole_signal_mean():
    """One impulse at sample m = 1000 of N = 4000 (16 kHz: n_fft 400, hop 160). DC removal leaves delta_m - 1/N.
    Frame t covers [160 t, 160 t + 400) (no centring), so the impulse is inside frames 4, 5, 6 at window
    offsets 360, 200, 40. Every other frame holds the constant -1/N alone: |X[0]| = (n/2)/N = 0.05,
    |X[1]| = (n/4)/N = 0.025, |X[k>=2]| = 0. Frame 5 sees w[200] = 1: |X[k>=2]| = 1, |X[0]| = 1 - 0.05 = 0.95
    (|X|, not |X|^2). A per-frame mean would zero the frames away from the impulse."""
    n, m = 4000, 1000
    x = torch.zeros(n, dtype=torch.float64)
    x[m] = 1.0
    spec = stft_ops.spectrogram(x, 16000)  # float64 in, float64 out: no input rounding
    assert spec.shape == (201, 23)
    hann = lambda j: 0.5 - 0.5 * math.cos(2 * math.pi * j / 400)  # periodic
    for t in range(23):
        if t in (4, 5, 6):
            w = hann(m - 160 * t)
            assert spec[2:, t].tolist() == pytest.approx([s_of(w)] * 199, abs=1e-9)
            # X[0] = w - (n_fft/2)/N (the impulse's bin-0 term is real and positive)
            assert spec[0, t].item() == pytest.approx(s_of(abs(w - 0.05)), abs=1e-9)
        else:
            assert spec[0, t].item() == pytest.approx(s_of(0.05), abs=1e-9)
            assert spec[1, t].item() == pytest.approx(s_of(0.025), abs=1e-9)
            assert spec[2:, t].tolist() == pytest.approx([s_of(0.0)] * 199, abs=1e-6)
    assert spec[0, 5].item() == pytest.approx(s_of(0.95), abs=1e-9)


@pytest.mark.parametrize("rate", [1999, 11025, 22050, 44100, 50000])
def test_impulse_frames_at_odd_rates(rate):
    """Section 1 at rates whose window or hop is a rounded-down 25 ms / 10 ms (odd n_fft at 1999, 11025, 22050;
    hop 220 at 22050, not 221): one impulse at sample m of N, in float64. DC removal leaves delta_m - 1/N; frame t
    covers [hop t, hop t + n_fft) (no centring); a periodic Hann window sums to n_fft/2 and its DFT is zero at
    every bin k >= 2 of the one-sided range, so |X[k >= 2]| of frame t is w(m - hop t) where the impulse lies in
    the frame and 0 elsewhere, and X[0] = w(m - hop t) [in frame] - (n_fft / 2) / N. w(j) = 0.5 - 0.5
    cos(2 pi j / n_fft) (periodic): a symmetric window (cos(2 pi j / (n_fft - 1))), a rounded hop or window, or
    centring give other numbers."""
    n_fft, hop = math.floor(Fraction(25, 1000) * rate), math.floor(Fraction(10, 1000) * rate)
    n = n_fft + 20 * hop + hop // 2
    m = 9 * hop + n_fft // 3
    x = torch.zeros(n, dtype=torch.float64)
    x[m] = 1.0
    spec = stft_ops.spectrogram(x, rate)
    frames, bins = 1 + (n - n_fft) // hop, n_fft // 2 + 1
    assert spec.shape == (bins, frames)
    hann = lambda j: 0.5 - 0.5 * math.cos(2 * math.pi * j / n_fft)
    hit = [t for t in range(frames) if hop * t <= m < hop * t + n_fft]
    assert len(hit) >= 2
    for t in range(frames):
        w = hann(m - hop * t) if t in hit else 0.0
        assert spec[2:, t].tolist() == pytest.approx([s_of(w)] * (bins - 2), abs=1e-8), t
        assert spec[0, t].item() == pytest.approx(s_of(abs(w - n_fft / 2 / n)), abs=1e-8), t


# ---------------------------------------------------------------------------------------------------------------
# Section 2: band split at the edges of the 32-bin grid


@pytest.mark.parametrize(
    "rate,bins,bands,last_real",
    [
        (2480, 32, 1, 32),  # n_fft 62: F = 32 exactly, no padding
        (2520, 32, 1, 32),  # n_fft 63 (odd): F = 32
        (2560, 33, 2, 1),  # n_fft 64: F = 33, the last band is 31 zero rows then bin 32
        (5040, 64, 2, 32),  # n_fft 126: F = 64
        (100, 2, 1, 2),  # the lowest rate: one band of 30 zero rows and 2 real bins
    ],
)
def test_band_split_at_the_grid_edges(rate, bins, bands, last_real):
    assert geometry.n_bins(rate) == bins and geometry.n_bands(rate) == bands
    assert geometry.band_edges(rate, bands - 1) == (32 * (bands - 1), bins)
    frames = 5
    spec = torch.arange(1, bins * frames + 1, dtype=torch.float32).reshape(bins, frames)  # no zero of its own
    split = token_ops.band_split(spec, rate)
    expected = torch.zeros(bands, 32, frames)
    for b in range(bands):
        lo, hi = 32 * b, min(32 * b + 32, bins)
        expected[b, 32 - (hi - lo) :] = spec[lo:hi]  # padding rows BEFORE the real bins
    assert torch.equal(split, expected)
    assert int((split[-1].abs().sum(dim=1) > 0).sum()) == last_real
    # the band layout the ragged reference path reads is the same rows stacked
    assert torch.equal(stft_ops.band_layout(spec, rate), expected.reshape(bands * 32, frames))


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000, 2560])
def test_band_layout_is_band_split_stacked(rate):
    bins = geometry.n_bins(rate)
    spec = torch.randn(bins, 21)
    layout = stft_ops.band_layout(spec, rate)
    bands = math.ceil(bins / 32)
    pad = 32 * bands - bins
    assert layout.shape == (32 * bands, 21)
    assert torch.equal(layout[: 32 * (bands - 1)], spec[: 32 * (bands - 1)])
    assert torch.all(layout[32 * (bands - 1) : 32 * (bands - 1) + pad] == 0)
    assert torch.equal(layout[32 * (bands - 1) + pad :], spec[32 * (bands - 1) :])


# ---------------------------------------------------------------------------------------------------------------
# Section 3: patches (order, flattening, time padding)


def one_hot_projection() -> tuple[torch.Tensor, torch.Tensor]:
    """A 'projection' with D = 512 whose output channel c reads patch element (c // 16, c % 16) alone: the
    flattening of a 32 x 16 patch as the conv kernel (D, 1, 32, 16) sees it, bin-major."""
    weight = torch.eye(512).reshape(512, 1, 32, 16)
    return weight, torch.zeros(512)


@pytest.mark.parametrize("frames", [16, 17, 31, 40])
def test_patch_order_flattening_and_time_padding(frames):
    """Patch j (0-based) holds frames [16 j, 16 j + 16), element (r, c) = band[r, 16 j + c], flattened r * 16 + c;
    L = ceil(T / 16) and the frames past T are zeros."""
    band = torch.arange(1, 32 * frames + 1, dtype=torch.float32).reshape(1, 32, frames)
    weight, bias = one_hot_projection()
    out = token_ops.patch_project(band, weight, bias)
    length = -(-frames // 16)
    assert out.shape == (1, length, 512)
    for j in range(length):
        for r in range(32):
            for c in range(16):
                col = 16 * j + c
                want = float(band[0, r, col]) if col < frames else 0.0
                assert out[0, j, r * 16 + c].item() == want
    # the pretraining path's patch matrix is the same flattening
    assert torch.equal(token_ops.band_patches(band), out)


def test_patch_projection_adds_its_bias_once_per_patch():
    weight = torch.zeros(3, 1, 32, 16)
    bias = torch.tensor([1.0, -2.0, 0.5])
    out = token_ops.patch_project(torch.randn(2, 32, 33), weight, bias)
    assert out.shape == (2, 3, 3) and torch.equal(out, bias.expand(2, 3, 3))


# ---------------------------------------------------------------------------------------------------------------
# Section 3: positional encodings


def test_time_table_is_float64_then_float32_halves_concatenated():
    """Row 1 + p = [sin(p w_k) | cos(p w_k)], w_k = 1 / 10000^(k / (D/2)), float64 then cast; row 0 zero."""
    for dim in (192, 384):
        half = dim // 2
        expected = np.zeros((126, dim))
        for p in range(125):
            for k in range(half):
                w = 1 / 10000 ** (k / half)
                expected[p + 1, k], expected[p + 1, half + k] = math.sin(p * w), math.cos(p * w)
        table = token_ops.time_position_table(dim)
        assert table.shape == (1, 126, dim) and table.dtype == torch.float32
        # math's and numpy's sin may differ by an ulp of float64, never by one of float32 after the cast
        assert np.abs(table[0].double().numpy() - expected.astype(np.float32)).max() <= 2 ** -24
        # a float32 computation of the angles is ~1e-5 off at p = 124: this tolerance sees it
        assert np.abs(table[0].double().numpy() - expected).max() < 1e-7


@pytest.mark.parametrize(
    "rate,fractions",
    [
        # p = (start + end - 1) / 2 * sr / n_fft / (sr / 2) = (start + end - 1) / n_fft, by hand
        (16000, [31 / 400, 95 / 400, 159 / 400, 223 / 400, 287 / 400, 351 / 400, 392 / 400]),
        (22050, [(32 * b + 32 * b + 31) / 551 for b in range(8)] + [(256 + 276 - 1) / 551]),
        (8000, [31 / 200, 95 / 200, 159 / 200, (96 + 101 - 1) / 200]),
        (100, [1 / 2]),  # F = 2: bins 0, 1, centre 0.5, n_fft 2
        (11025, [(64 * b + 31) / 275 for b in range(4)] + [(128 + 138 - 1) / 275]),  # F = 138: last band 10 bins
        (44100, [(64 * b + 31) / 1102 for b in range(17)] + [(544 + 552 - 1) / 1102]),  # F = 552: last 8 bins
    ],
)
def test_band_positions_are_centre_bins_over_nyquist(rate, fractions):
    got = [geometry.band_position(rate, *geometry.band_edges(rate, b)) for b in range(geometry.n_bands(rate))]
    assert got == pytest.approx(fractions, rel=1e-14)
    assert token_ops.band_positions(rate).tolist() == [float(np.float32(f)) for f in fractions]


def test_frequency_encoding_hand_values():
    """p = 0.0775 (16 kHz, band 0), D = 192: angle_0 = 25 * 0.0775 = 1.9375 at fpe[0] (sin), fpe[1] (cos);
    angle_1 = 1.9375 * 10000^(-2/192); angle_95 = 1.9375 * 10000^(-190/192) at fpe[190], fpe[191]."""
    fpe = token_ops.frequency_encoding(0.0775, 192).double()
    assert fpe.shape == (192,)
    a0, a1, a95 = 1.9375, 1.9375 * 10000 ** (-2 / 192), 1.9375 * 10000 ** (-190 / 192)
    hand = {0: math.sin(a0), 1: math.cos(a0), 2: math.sin(a1), 3: math.cos(a1), 190: math.sin(a95),
            191: math.cos(a95)}
    for index, value in hand.items():
        assert fpe[index].item() == pytest.approx(value, abs=1e-6), index
    # interleaved, not halves: fpe[96] is sin(angle_48), not cos(angle_0)
    a48 = 1.9375 * 10000 ** (-96 / 192)
    assert fpe[96].item() == pytest.approx(math.sin(a48), abs=1e-6)
    for dim, p in ((192, 0.98), (384, 0.5575), (384, 1.0), (384, 0.0)):
        assert np.abs(token_ops.frequency_encoding(p, dim).double().numpy() - spec_fpe(p, dim)).max() < 3e-6


def test_frequency_encoding_is_computed_in_float32():
    """Spec: the angles are float32. Written as the released get_sincos_encoding_1d writes the spec's formula:
    p as float32, exp of arange(0, D, 2) (float32) times the float64 constant -ln(10000)/D, then (p * 25) times it."""
    dim = 384
    positions = [0.0775, 0.2375, 0.98, 531 / 551, 0.5]
    p = torch.tensor(positions, dtype=torch.float32)[:, None]
    div_term = torch.exp(torch.arange(0, dim, 2).float() * (-math.log(10000.0) / dim))
    angle = p * 25 * div_term
    expected = torch.zeros(len(positions), dim)
    expected[:, 0::2], expected[:, 1::2] = torch.sin(angle), torch.cos(angle)
    assert torch.equal(token_ops.frequency_encoding(torch.tensor(positions, dtype=torch.float32), dim), expected)


def test_token_assembly_rows():
    """Token i (1-based) = proj(patch i) + pos_embed[i] + fpe; CLS = cls_token + fpe, no time row (not row 0)."""
    config = echo.EchoConfig(dim=192, depth=1, heads=3)
    model = echo.EchoModel(config).eval()
    with torch.no_grad():
        model.patch_embed.proj.weight.zero_()
        model.patch_embed.proj.bias.zero_()
        model.cls_token.copy_(torch.full((1, 1, 192), 0.25))
        model.pos_embed.copy_(torch.arange(126, dtype=torch.float32)[None, :, None].expand(1, 126, 192) * 1000)
        model.pos_embed[0, 0] = 7.0  # row 0 is unused: a file's non-zero row 0 must reach no token
    positions = torch.tensor([0.0775, 0.98])
    tokens = model.band_tokens(torch.zeros(2, 32, 40), positions)  # 40 frames -> L = 3
    assert tokens.shape == (2, 4, 192)
    for b, p in enumerate(positions.tolist()):
        fpe = torch.from_numpy(spec_fpe(p, 192))
        assert torch.allclose(tokens[b, 0].double(), 0.25 + fpe, atol=3e-6)
        for i in (1, 2, 3):
            assert torch.allclose(tokens[b, i].double(), 1000.0 * i + fpe, atol=1e-3)


def test_pos_embed_comes_from_the_checkpoint(tmp_path):
    """Spec section 3: pos_embed is stored in checkpoints and loaded from there, not regenerated."""
    model = random_model("tiny")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["pos_embed"] = torch.randn(1, 126, 192)
    save_file(state, str(tmp_path / "released.safetensors"))
    loaded = echo.load(tmp_path / "released.safetensors")
    assert torch.equal(loaded.pos_embed, state["pos_embed"])


def test_packed_reference_tokens_of_a_two_segment_signal():
    """echo/ops/tokens.py's pack_tokens_reference over a plan, against the tokens built from the spec: 2001 frames
    at 8 kHz are segments [0, 2000) and [1, 2001), 4 bands each (101 bins: last band 27 zero rows + 5 bins),
    125 patches of 32 x 16 flattened bin-major, pos rows 1..125, the band's FPE on every token and the CLS."""
    from echo.plan import make_plan

    rate, n = 8000, 200 + 2000 * 80
    x = torch.randn(n)
    plan = make_plan([n], [rate])
    spec_flat = stft_ops.ragged_spectrogram_reference(x, torch.tensor([0, n]), plan)
    model = random_model("tiny")
    weight, bias = model.patch_embed.proj.weight.detach(), model.patch_embed.proj.bias.detach()
    cls, pos = model.cls_token.detach(), model.pos_embed.detach()
    tokens = token_ops.pack_tokens_reference(spec_flat, plan, weight, bias, cls, pos)
    spec = stft_ops.spectrogram(x, rate).double().numpy()
    assert spec.shape == (101, 2001)
    w = weight.double().reshape(192, 512).numpy()
    expected = []
    for start in (0, 1):
        segment = spec[:, start : start + 2000]
        for b in range(4):
            lo, hi = 32 * b, min(32 * b + 32, 101)
            image = np.zeros((32, 2000))
            image[32 - (hi - lo) :] = segment[lo:hi]
            fpe = spec_fpe((lo + hi - 1) / 2 * rate / 200 / (rate / 2), 192)
            expected.append(cls[0, 0].double().numpy() + fpe)
            for j in range(125):
                patch = image[:, 16 * j : 16 * j + 16].reshape(-1)
                expected.append(w @ patch + bias.double().numpy() + pos[0, j + 1].double().numpy() + fpe)
    assert tokens.shape == (8 * 126, 192)
    assert rel_err(tokens, torch.from_numpy(np.stack(expected))) < 1e-6


# ---------------------------------------------------------------------------------------------------------------
# Section 4: the encoder layer written out (float64), heads as contiguous slices, erf GELU, post-norm


def layer_norm(x: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased, as LayerNorm
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def spec_layer(x: torch.Tensor, sd: dict, prefix: str, heads: int, gelu) -> torch.Tensor:
    """x = LN1(x + MHA(x)); x = LN2(x + W2 gelu(W1 x)); eps 1e-6; in_proj rows Q, K, V; head h = columns
    [64 h, 64 h + 64); scale 1/sqrt(64); no mask."""
    g = lambda name: sd[prefix + name].double()
    dim = x.shape[-1]
    w, b = g("self_attn.in_proj_weight"), g("self_attn.in_proj_bias")
    q, k, v = (x @ w[i * dim : (i + 1) * dim].T + b[i * dim : (i + 1) * dim] for i in range(3))
    outs = []
    for h in range(heads):
        cols = slice(64 * h, 64 * h + 64)
        scores = q[..., cols] @ k[..., cols].transpose(-1, -2) / 8.0
        outs.append(torch.softmax(scores, dim=-1) @ v[..., cols])
    attn = torch.cat(outs, dim=-1) @ g("self_attn.out_proj.weight").T + g("self_attn.out_proj.bias")
    x = layer_norm(x + attn, g("norm1.weight"), g("norm1.bias"), 1e-6)
    hidden = gelu(x @ g("linear1.weight").T + g("linear1.bias"))
    return layer_norm(x + hidden @ g("linear2.weight").T + g("linear2.bias"), g("norm2.weight"), g("norm2.bias"), 1e-6)


def gelu_erf(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


@pytest.mark.parametrize("size,heads", [("tiny", 3), ("small", 6)])
def test_encoder_layers_and_final_norm_as_written_in_the_spec(size, heads):
    model = random_model(size, depth=2)
    assert model.config.heads == heads and model.config.dim // heads == 64
    with torch.no_grad():
        for layer in model.encoder.layers:
            layer.linear1.weight.mul_(8)  # GELU inputs of a few units, where erf and tanh GELU part by ~1e-4
    sd = model.state_dict()
    x = torch.randn(3, 1 + int(torch.randint(1, 126, ())), model.config.dim)
    with torch.no_grad():
        out = model(x)
    ref, ref_tanh = x.double(), x.double()
    for i in range(2):
        ref = spec_layer(ref, sd, f"encoder.layers.{i}.", heads, gelu_erf)
        ref_tanh = spec_layer(ref_tanh, sd, f"encoder.layers.{i}.", heads, gelu_tanh)
    final = lambda y: layer_norm(y, sd["norm.weight"].double(), sd["norm.bias"].double(), 1e-6)  # every token
    assert rel_err(out, final(ref)) < 2e-6
    assert rel_err(final(ref_tanh), final(ref)) > 2e-5  # the check above would see a tanh GELU


def test_sequences_never_attend_to_each_other():
    """Section 2: every band is its own sequence. Changing every token of sequence 0 leaves sequences 1, 2 as they
    were (no attention, no norm across the batch), and does change sequence 0."""
    model = random_model("tiny", depth=2)
    x = torch.randn(3, 9, 192)
    y = x.clone()
    y[0] = torch.randn(9, 192)
    with torch.no_grad():
        out_x, out_y = model(x), model(y)
    assert rel_err(out_y[1:], out_x[1:]) < 1e-6
    assert rel_err(out_y[0], out_x[0]) > 0.1


# ---------------------------------------------------------------------------------------------------------------
# Section 7: the released key layout


def released_layout(dim: int, depth: int = 12) -> dict[str, tuple[int, ...]]:
    keys = {"cls_token": (1, 1, dim), "pos_embed": (1, 126, dim), "patch_embed.proj.weight": (dim, 1, 32, 16),
            "patch_embed.proj.bias": (dim,), "norm.weight": (dim,), "norm.bias": (dim,)}
    for i in range(depth):
        p = f"encoder.layers.{i}."
        keys.update({p + "self_attn.in_proj_weight": (3 * dim, dim), p + "self_attn.in_proj_bias": (3 * dim,),
                     p + "self_attn.out_proj.weight": (dim, dim), p + "self_attn.out_proj.bias": (dim,),
                     p + "linear1.weight": (4 * dim, dim), p + "linear1.bias": (4 * dim,),
                     p + "linear2.weight": (dim, 4 * dim), p + "linear2.bias": (dim,)})
        keys.update({p + f"norm{n}.{w}": (dim,) for n in (1, 2) for w in ("weight", "bias")})
    return keys


@pytest.mark.parametrize("size,dim", [("tiny", 192), ("small", 384)])
def test_state_dict_is_exactly_the_released_layout(size, dim):
    with torch.device("meta"):
        model = echo.EchoModel(echo.EchoConfig.preset(size))
    layout = released_layout(dim)
    assert len(layout) == 150
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == layout


def test_a_file_missing_one_released_key_or_misshaping_one_is_refused(tmp_path):
    model = random_model("tiny")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    missing = dict(state)
    del missing["encoder.layers.7.norm2.bias"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys: encoder\.layers\.7\.norm2\.bias"):
        echo.load(tmp_path / "missing.safetensors")
    misshaped = dict(state, **{"pos_embed": torch.zeros(1, 125, 192)})
    save_file(misshaped, str(tmp_path / "misshaped.safetensors"))
    with pytest.raises(ValueError, match=r"mis-shaped keys: pos_embed \(1, 125, 192\)"):
        echo.load(tmp_path / "misshaped.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# Sections 5 and 6: assembly of the outputs


def test_outputs_are_band_ordered_cls_and_frame_rows():
    """Utterance = the final CLS of band 0, then band 1, ...; frame row t = the band outputs at patch t in band
    order, from the model's own forward on the spec's tokens (one segment)."""
    model = random_model("tiny", depth=1)
    rate = 12000  # 151 bins: 5 bands, the last 23 real bins
    x = torch.randn(rate // 2)
    utterance, frames = model.encode(x, rate)
    spec = stft_ops.spectrogram(x, rate)
    frames_t = 1 + (rate // 2 - 300) // 120
    assert spec.shape == (151, frames_t)
    length = -(-frames_t // 16)
    bands = torch.zeros(5, 32, frames_t)
    for b in range(5):
        lo, hi = 32 * b, min(32 * b + 32, 151)
        bands[b, 32 - (hi - lo) :] = spec[lo:hi]
    positions = torch.tensor([(32 * b + min(32 * b + 32, 151) - 1) / 2 / 150 for b in range(5)])
    with torch.no_grad():
        out = model(model.band_tokens(bands, positions))  # (5, L + 1, 192)
    assert utterance.shape == (5 * 192,) and frames.shape == (length, 5 * 192)
    for b in range(5):
        assert torch.allclose(utterance[192 * b : 192 * (b + 1)], out[b, 0], atol=1e-5)
        for t in (0, length - 1):
            assert torch.allclose(frames[t, 192 * b : 192 * (b + 1)], out[b, 1 + t], atol=1e-5)


@pytest.mark.parametrize(
    "frames,expected",
    [
        (1, [(0, 1)]),
        (1999, [(0, 1999)]),
        (2000, [(0, 2000)]),
        (2001, [(0, 2000), (1, 2001)]),
        (3999, [(0, 2000), (1999, 3999)]),
        (4000, [(0, 2000), (2000, 4000)]),
        (4001, [(0, 2000), (2000, 4000), (2001, 4001)]),
        (6000, [(0, 2000), (2000, 4000), (4000, 6000)]),
    ],
)
def test_segments_whole_blocks_then_the_last_2000(frames, expected):
    assert geometry.segments(frames) == expected
    assert [math.ceil((b - a) / 16) for a, b in expected] == geometry.SignalGeometry(
        16000, 400 + (frames - 1) * 160).segment_patches


def test_three_segments_average_and_stack():
    """Section 6 with three segments: 4001 frames are [0, 2000), [2000, 4000) and the LAST 2000, [2001, 4001), cut
    from the spectrogram of the whole signal (one DC mean). Utterance = the plain mean of the three CLS vectors;
    frames = the three segments' 125 rows each, stacked in that order. 2 kHz: n_fft 50, hop 20, F = 26, one band
    (6 zero rows, then the 26 bins), p = (0 + 26 - 1) / 2 / 25 = 0.5."""
    model = random_model("tiny", depth=1)
    rate, n = 2000, 50 + 4000 * 20
    x = torch.randn(n) + 0.5
    utterance, frames = model.encode(x, rate)
    spec = stft_ops.spectrogram(x, rate)
    assert spec.shape == (26, 4001)
    cls, rows = [], []
    with torch.no_grad():
        for start in (0, 2000, 2001):
            band = torch.zeros(1, 32, 2000)
            band[0, 6:] = spec[:, start : start + 2000]
            out = model(model.band_tokens(band, torch.tensor([0.5])))  # (1, 126, 192)
            cls.append(out[0, 0])
            rows.append(out[0, 1:])
    assert utterance.shape == (192,) and frames.shape == (375, 192)
    assert rel_err(utterance, (cls[0] + cls[1] + cls[2]) / 3) < 1e-6
    for k in range(3):
        assert rel_err(frames[125 * k : 125 * (k + 1)], rows[k]) < 1e-6, k


def test_integer_pcm_is_scaled_by_its_full_scale():
    """Not in the spec (it takes float32): int16 and int32 samples are read as WAV/soundfile PCM, x / 32768 and
    x / 2**31, from torch or numpy. The front end is not scale-free (the log's eps), so a wrong scale shows."""
    model = random_model("tiny", depth=1)
    rate = 8000
    pcm16 = torch.randint(-32768, 32768, (4000,), dtype=torch.int16)
    pcm32 = torch.randint(-(2**31), 2**31, (4000,), dtype=torch.int64).to(torch.int32)
    for pcm, full_scale in ((pcm16, 32768), (pcm32, 2**31)):
        scaled = torch.from_numpy(pcm.numpy().astype(np.float64) / full_scale).float()
        want_u, want_f = model.encode(scaled, rate)
        for given in (pcm, pcm.numpy()):
            got_u, got_f = model.encode(given, rate)
            assert torch.equal(got_u, want_u) and torch.equal(got_f, want_f), (pcm.dtype, type(given))
