import pytest
import torch

from echo.ops import stft as stft_ops
from echo.ops import tokens as token_ops
from independent import numpy_spectrogram

from conftest import RATE_FAMILIES, rel_err


@pytest.mark.parametrize("rate", RATE_FAMILIES + [2000, 24000, 32000])
def test_spectrogram_matches_float64_numpy(rate):
    n = int(rate * torch.empty(1).uniform_(0.1, 1.3).item()) + int(torch.randint(0, 997, ()))
    x = torch.randn(n) * 0.3 + 0.2  # a DC offset, which the front end removes
    got = stft_ops.spectrogram(x, rate)
    ref = numpy_spectrogram(x.double().numpy(), rate)
    assert got.shape == ref.shape
    assert rel_err(got, torch.from_numpy(ref)) < 1e-5


@pytest.mark.parametrize("rate", RATE_FAMILIES)
def test_band_split_padding_rule(rate):
    spec = torch.randn(rate * 25 // 1000 // 2 + 1, 37)
    bands = token_ops.band_split(spec, rate)
    bins = spec.shape[0]
    assert bands.shape == (-(-bins // 32), 32, 37)
    for b in range(bands.shape[0]):
        lo, hi = 32 * b, min(32 * b + 32, bins)
        pad = 32 - (hi - lo)
        assert torch.equal(bands[b, pad:], spec[lo:hi])
        assert torch.all(bands[b, :pad] == 0)


def test_position_table():
    dim = 192
    table = token_ops.time_position_table(dim)
    assert table.shape == (1, 126, dim) and table.dtype == torch.float32
    assert torch.all(table[0, 0] == 0)
    p = torch.arange(125, dtype=torch.float64)[:, None]
    w = 1 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    assert torch.allclose(table[0, 1:, : dim // 2].double(), torch.sin(p * w), atol=1e-7)
    assert torch.allclose(table[0, 1:, dim // 2 :].double(), torch.cos(p * w), atol=1e-7)
    assert torch.all(table[0, 1, : dim // 2] == 0) and torch.all(table[0, 1, dim // 2 :] == 1)


def test_frequency_encoding_16k():
    dim = 384
    p = token_ops.band_positions(16000)
    assert p.tolist() == pytest.approx([0.0775, 0.2375, 0.3975, 0.5575, 0.7175, 0.8775, 0.98], rel=1e-6)
    fpe = token_ops.frequency_encoding(p, dim)
    i = torch.arange(dim // 2, dtype=torch.float64)
    angle = 25 * p.double()[:, None] * torch.exp(2 * i * -torch.log(torch.tensor(10000.0, dtype=torch.float64)) / dim)
    assert torch.allclose(fpe[:, 0::2].double(), torch.sin(angle), atol=2e-6)
    assert torch.allclose(fpe[:, 1::2].double(), torch.cos(angle), atol=2e-6)
