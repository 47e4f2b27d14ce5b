"""The Triton ragged front end (echo_kernels/stft.py) against the reference and float64 numpy."""
import pytest
import torch

from echo import geometry
from echo.ops import stft as stft_ops
from echo.plan import make_plan
from independent import numpy_spectrogram

from conftest import assert_front_end_close, assert_spectrogram_close, float32_front_end, rel_err

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def ragged_batch(lengths, rates):
    """Signals with a DC offset back to back, their offsets and plan."""
    waves = [torch.randn(n) * 0.3 + torch.empty(1).uniform_(-1, 1) for n in lengths]
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    flat = torch.cat(waves) if waves else torch.empty(0)
    return waves, flat.to(DEVICE), offsets, make_plan(lengths, rates)


def samples_for(frames: int, rate: int, extra: int = 0) -> int:
    return geometry.n_fft(rate) + (frames - 1) * geometry.hop(rate) + extra


def test_mixed_rates_one_launch(poisoned_empty):
    rates = [8000, 12000, 16000, 8000, 22050]
    # 1 frame, one 64-frame tile exactly, one tile + 1, and arbitrary lengths (samples beyond the last frame)
    frames = [1, 64, 65, int(torch.randint(2, 30, ())), int(torch.randint(2, 30, ()))]
    lengths = [samples_for(t, sr, int(torch.randint(0, geometry.hop(sr), ()))) for t, sr in zip(frames, rates)]
    waves, flat, offsets, plan = ragged_batch(lengths, rates)
    got = stft_ops.ragged_spectrogram(flat, offsets, plan, backend="triton")
    assert got.shape == (int(plan.spec_offsets[-1]),) and not got.isnan().any()
    assert_front_end_close(got, flat, offsets, plan)
    # and against float64 numpy, signal by signal, by the same rule (zero rows included: compared exactly)
    released = float32_front_end(flat, offsets, plan)
    for i, (wave, sr) in enumerate(zip(waves, rates)):
        rows = slice(int(plan.spec_offsets[i]), int(plan.spec_offsets[i + 1]))
        image = got[rows].view(-1, plan.frames[i]).cpu()
        exact = stft_ops.band_layout(torch.from_numpy(numpy_spectrogram(wave.double().numpy(), sr)), sr)
        assert_spectrogram_close(image, exact, released[rows].view_as(image))
        pad_start = (plan.bands[i] - 1) * geometry.BAND_BINS
        pad = plan.bands[i] * geometry.BAND_BINS - geometry.n_bins(sr)
        assert torch.all(image[pad_start : pad_start + pad] == 0)


def test_given_means_are_the_dc_each_signal_loses(poisoned_empty):
    """fast.encode's passes over a long signal give each span of it the whole signal's mean, not its own."""
    rates = [8000, 16000, 12000]
    lengths = [samples_for(int(torch.randint(2, 70, ())), sr, 3) for sr in rates]
    waves, flat, offsets, plan = ragged_batch(lengths, rates)
    means = torch.stack([wave.double().mean() for wave in waves]) + torch.empty(len(rates)).uniform_(-2, 2).double()
    got = stft_ops.ragged_spectrogram(flat, offsets, plan, backend="triton", means=means)
    truth = stft_ops.ragged_spectrogram_reference(flat.double().cpu(), offsets, plan, means)
    assert_spectrogram_close(got, truth, truth)  # the log's bound: 1e-3
    own = stft_ops.ragged_spectrogram_reference(flat.double().cpu(), offsets, plan)
    assert rel_err(own, truth) > 1e-2


@pytest.mark.parametrize("rate", [100, 1000])
def test_slow_sensor_rates(rate, poisoned_empty):
    """Windows of 2 and 25 samples: one band, most of its 32 rows padding."""
    lengths = [samples_for(frames, rate, 1) for frames in (1, 70)]
    _, flat, offsets, plan = ragged_batch(lengths, [rate] * 2)
    got = stft_ops.ragged_spectrogram(flat, offsets, plan, backend="triton")
    assert not got.isnan().any()
    assert_front_end_close(got, flat, offsets, plan)


@pytest.mark.parametrize("rate", [44100, 48000, 50000])
def test_high_rates(rate, poisoned_empty):
    """Window lengths 1102, 1200, 1250 (many k-steps) and the widest band layouts."""
    lengths = [samples_for(int(torch.randint(1, 5, ())), rate, 7)]
    _, flat, offsets, plan = ragged_batch(lengths, [rate])
    got = stft_ops.ragged_spectrogram(flat, offsets, plan, backend="triton")
    assert not got.isnan().any()
    assert_front_end_close(got, flat, offsets, plan)


def test_empty_batch():
    _, flat, offsets, plan = ragged_batch([], [])
    got = stft_ops.ragged_spectrogram(flat, offsets, plan, backend="triton")
    assert got.shape == (0,)


def test_rejects_non_float32():
    _, flat, offsets, plan = ragged_batch([400], [16000])
    with pytest.raises(ValueError, match="float32"):
        stft_ops.ragged_spectrogram(flat.double(), offsets, plan, backend="triton")


def every_other(values: torch.Tensor) -> torch.Tensor:
    """The same values as a strided view, every other element of a larger buffer."""
    strided = torch.stack([values, torch.randn_like(values.double()).to(values.dtype)], dim=1).reshape(-1)[::2]
    assert not strided.is_contiguous() and torch.equal(strided, values)
    return strided


@pytest.mark.parametrize("strided", ["waves", "offsets"])
def test_strided_inputs(strided):
    """A waveform buffer or offsets given as strided views are read as their values: the kernel indexes flat
    buffers, and read the base's elements in between (samples: relative error 0.1; offsets: garbage)."""
    lengths = [samples_for(4, 16000, 3), samples_for(6, 8000)]
    _, flat, offsets, plan = ragged_batch(lengths, [16000, 8000])
    waves, wave_offsets = (every_other(flat), offsets) if strided == "waves" else (flat, every_other(offsets))
    got = stft_ops.ragged_spectrogram(waves, wave_offsets, plan, backend="triton")
    assert_front_end_close(got, flat, offsets, plan)


@pytest.mark.parametrize("change", ["waves cut short", "signal shorter than its frames", "offset missing"])
def test_offsets_that_do_not_hold_the_plans_signals_are_refused(change):
    """The kernels read each signal's frames at its offset, unchecked: a buffer shorter than the offsets or a signal
    shorter than its frames need was read past its end (a plausible spectrogram of other memory), a missing offset
    crashed the process."""
    lengths = [samples_for(4, 16000, 3), samples_for(6, 8000)]
    _, flat, offsets, plan = ragged_batch(lengths, [16000, 8000])
    if change == "waves cut short":
        flat = flat[: len(flat) - 100]
    elif change == "signal shorter than its frames":
        offsets = torch.tensor([0, lengths[0] - 200, sum(lengths)])
    else:
        offsets = offsets[:-1]
    from echo_kernels import stft as kernel

    with pytest.raises(ValueError, match="wave_offsets"):  # the kernel's own check (the dispatch has its own)
        kernel.ragged_spectrogram(
            flat, offsets, [geometry.n_fft(sr) for sr in plan.sample_rates],
            [geometry.hop(sr) for sr in plan.sample_rates], plan.frames, plan.bands, plan.spec_offsets,
            log_eps=geometry.LOG_EPS, log_mean=geometry.LOG_MEAN, log_std=geometry.LOG_STD)


def test_bands_that_do_not_hold_the_bins_are_refused():
    """One band of 32 rows for a 400-sample window's 201 bins computed 32 rows and dropped the rest silently."""
    from echo_kernels import stft as kernel

    waves = torch.randn(samples_for(4, 16000)).to(DEVICE)
    with pytest.raises(ValueError, match=r"201 bins of n_fft 400 need 7 bands of 32 rows, got 1"):
        kernel.ragged_spectrogram(waves, [0, len(waves)], [400], [160], [4], [1], [0, 32 * 4],
                                  log_eps=geometry.LOG_EPS, log_mean=geometry.LOG_MEAN, log_std=geometry.LOG_STD)



@pytest.mark.parametrize("change, message", [
    ("negative hop", "signal 1: hop must be at least 1 and frames at least 0, got hop -160, frames 2"),
    ("negative frames", "signal 0: hop must be at least 1 and frames at least 0, got hop 160, frames -1"),
    ("means of another count", r"means must hold one DC per signal \(2\), got shape \(3,\)"),
])
def test_a_geometry_that_reads_or_writes_outside_its_buffers_is_refused(change, message):
    """Called directly, the kernel took a negative hop (frames read before their signal: plausible values of other
    memory), negative frames with offsets stepping by them (written before the output: a corrupted heap, the
    process aborted) and means of another count than the signals (read past their end)."""
    from echo_kernels import stft as kernel

    waves = torch.randn(samples_for(4, 16000) + samples_for(2, 16000)).to(DEVICE)
    hop, frames, spec_offsets, means = [160, 160], [4, 2], [0, 7 * 32 * 4, 7 * 32 * 6], None
    if change == "negative hop":
        hop[1] = -160
    elif change == "negative frames":
        frames[0], spec_offsets = -1, [0, -7 * 32, 7 * 32]
    else:
        means = torch.zeros(3)
    with pytest.raises(ValueError, match=message):
        kernel.ragged_spectrogram(waves, [0, samples_for(4, 16000), len(waves)], [400, 400], hop, frames, [7, 7],
                                  spec_offsets, log_eps=geometry.LOG_EPS, log_mean=geometry.LOG_MEAN,
                                  log_std=geometry.LOG_STD, means=means)
