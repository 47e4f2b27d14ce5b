import pytest
import torch

from echo import extension, geometry
from echo.ops import stft as stft_ops
from echo.ops import tokens as token_ops
from independent import numpy_spectrogram

from conftest import RATE_FAMILIES, random_model, rel_err


@pytest.mark.parametrize("rate", RATE_FAMILIES + [2000, 24000, 32000])
def test_spectrogram_matches_float64_numpy(rate):
    n = int(rate * torch.empty(1).uniform_(0.1, 1.3).item()) + int(torch.randint(0, 997, ()))
    x = torch.randn(n) * 0.3 + 0.2  # a DC offset, which the front end removes
    got = stft_ops.spectrogram(x, rate)
    ref = numpy_spectrogram(x.double().numpy(), rate)
    assert got.shape == ref.shape
    assert rel_err(got, torch.from_numpy(ref)) < 1e-5


@pytest.mark.parametrize("rate", RATE_FAMILIES)
def test_spectrogram_at_chosen_bins_is_the_same_numbers(rate):
    x = torch.randn(2, int(rate * 0.37) + int(torch.randint(0, 997, ()))) * 0.3 + 0.1
    full = stft_ops.spectrogram(x, rate)
    bins = torch.randperm(full.shape[-2])[: int(torch.randint(1, full.shape[-2] + 1, ()))].sort().values
    got = stft_ops.spectrogram_bins(x, rate, bins)
    assert got.dtype == x.dtype and torch.equal(got, full[..., bins, :])


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


def test_frame_groups_cut_in_order_under_the_budget():
    frames = [5, 3, 9, 2, 2, 20, 1]
    groups = stft_ops.frame_groups(list(range(7)), frames, budget=8)
    # (signal, first frame, frames): a signal over the budget in spans of the budget, its rest with the next ones
    assert groups == [[(0, 0, 5), (1, 0, 3)], [(2, 0, 8)], [(2, 8, 1), (3, 0, 2), (4, 0, 2)], [(5, 0, 8)],
                      [(5, 8, 8)], [(5, 16, 4), (6, 0, 1)]]


@pytest.mark.parametrize("group_samples", [40 * 400, 1024 * 400, None])
def test_torch_ragged_front_end_equals_the_per_signal_reference(monkeypatch, group_samples):
    """The batched torch path, cut into groups of frames (as on a CPU; the smallest budget cuts most signals here
    into spans) or not (None, as on a GPU), gives the reference's numbers."""
    from echo.plan import make_plan

    monkeypatch.setattr(stft_ops, "CPU_GROUP_SAMPLES", group_samples)
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    rates = [8000, 12000, 16000, 22050, 44100, 48000, 50000, 16000, 8000, 44100]
    seconds = [0.3, 1.7, 0.45, 2.3, 0.31, 1.05, 0.77, 0.26, 3.1, 0.9]
    # each with its own DC offset (taken off per signal), after 7 samples that belong to no signal
    signals = [torch.randn(int(s * r), generator=generator) * 0.3 + torch.randn((), generator=generator)
               for s, r in zip(seconds, rates)]
    plan = make_plan([len(x) for x in signals], rates)
    offsets = torch.full((len(signals) + 1,), 7, dtype=torch.int64)
    offsets[1:] += torch.cumsum(torch.tensor([len(x) for x in signals]), 0)
    waves = torch.cat([torch.full((7,), 1e6), *signals])
    out = stft_ops.ragged_spectrogram_torch(waves, offsets, plan)
    assert rel_err(out, stft_ops.ragged_spectrogram_reference(waves, offsets, plan)) < 1e-6


@pytest.mark.parametrize("group_samples", [1024 * 400, None])
def test_a_quiet_signal_after_a_loud_one_keeps_its_own_spectrum(monkeypatch, group_samples):
    """The GPU order takes each mean from one running sum over all signals: a quiet signal after a loud, offset
    one must come out as the reference makes it, signal by signal (a shared norm would hide it)."""
    from echo.plan import make_plan

    monkeypatch.setattr(stft_ops, "CPU_GROUP_SAMPLES", group_samples)
    rates = [48000, 8000, 16000]
    signals = [torch.randn(3 * 48000) * 10 + 1e3, torch.randn(8000) * 1e-3 + 1e-3, torch.randn(4000) * 1e-4]
    plan = make_plan([len(x) for x in signals], rates)
    offsets = torch.zeros(4, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor([len(x) for x in signals]), 0)
    waves = torch.cat(signals)
    out = stft_ops.ragged_spectrogram_torch(waves, offsets, plan)
    expected = stft_ops.ragged_spectrogram_reference(waves, offsets, plan)
    for i in range(3):
        rows = slice(int(plan.spec_offsets[i]), int(plan.spec_offsets[i + 1]))
        assert rel_err(out[rows], expected[rows]) < 1e-6, f"signal {i}"


def largest_temporary(call) -> tuple[torch.Tensor, int]:
    """`call()`'s result and the largest block an op of it allocated on the CPU, its result's aside."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        out = call()
    result = out.numel() * out.element_size()
    return out, max(event.cpu_memory_usage for event in profiler.events() if event.cpu_memory_usage != result)


@pytest.mark.parametrize("backend", ["torch", "csrc"])
def test_a_long_signal_goes_through_the_cpu_front_end_a_few_frames_at_a_time(backend):
    """No float64 copy of a whole signal, and no group of frames larger than ~1 MB of windows: the torch path took
    a long signal in one group (10 minutes at 48 kHz: +1.9 GB), and the compiled op 64 frames per work item
    whatever the window (at 1 MHz, 13 MB of frames and as much spectrum per thread)."""
    if backend == "csrc" and not extension.has_op("ragged_spectrogram", "cpu"):
        pytest.skip(f"compiled front end unavailable: {extension.why_unavailable('ragged_spectrogram', 'cpu')}")
    from echo.plan import make_plan

    rate = 1_000_000
    waves = torch.randn(int(rate * torch.empty(()).uniform_(1.1, 1.5))) + 0.1  # 25 ms windows of 25,000 samples
    plan = make_plan([len(waves)], [rate])
    offsets = torch.tensor([0, len(waves)])
    out, temporary = largest_temporary(lambda: stft_ops.ragged_spectrogram(waves, offsets, plan, backend=backend))
    assert 2**20 < temporary <= 4 * 2**20  # over 1 MB: the profiler saw the groups' blocks
    assert rel_err(out, stft_ops.ragged_spectrogram_reference(waves, offsets, plan)) < 1e-6


def spans_of(signal: torch.Tensor, rate: int, ranges: list[tuple[int, int]]):
    """Views of `signal` holding the frames [first, end) of each range back to back, their offsets and plan."""
    from echo.plan import make_plan

    hop, n_fft = geometry.hop(rate), geometry.n_fft(rate)
    views = [signal[first * hop : (end - 1) * hop + n_fft] for first, end in ranges]
    offsets = torch.tensor([0] + [len(view) for view in views]).cumsum(0)
    return torch.cat(views), offsets, make_plan([len(view) for view in views], [rate] * len(views))


@pytest.mark.parametrize("backend", ["reference", "torch", "torch-by-rate", "csrc"])
def test_spans_of_frames_given_their_signal_mean_are_those_columns_of_the_whole_image(backend, monkeypatch):
    """fast.encode's passes over a long signal compute only their spans' frames: a span loses the whole
    signal's mean (the spec's DC removal), given as `means`, not its own."""
    if backend == "csrc" and not extension.has_op("ragged_spectrogram", "cpu"):
        pytest.skip(f"compiled front end unavailable: {extension.why_unavailable('ragged_spectrogram', 'cpu')}")
    if backend == "torch-by-rate":
        monkeypatch.setattr(stft_ops, "CPU_GROUP_SAMPLES", None)
        backend = "torch"
    from echo.plan import make_plan

    rate = RATE_FAMILIES[int(torch.randint(len(RATE_FAMILIES), ()))]
    frames = int(torch.randint(300, 500, ()))
    signal = torch.randn(geometry.n_fft(rate) + (frames - 1) * geometry.hop(rate) + 7)
    signal += torch.linspace(-2, 3, len(signal))  # a drifting DC: each span's own mean is far from the signal's
    whole = stft_ops.ragged_spectrogram_reference(signal, torch.tensor([0, len(signal)]), make_plan([len(signal)], [rate]))
    whole = whole.view(-1, frames)
    ranges = [(0, 37), (int(torch.randint(40, 200, ())), frames - 1), (frames - 16, frames)]
    waves, offsets, plan = spans_of(signal, rate, ranges)
    means = torch.full((len(ranges),), float(signal.double().mean()))
    out = stft_ops.ragged_spectrogram(waves, offsets, plan, backend=backend, means=means)
    images = out.split(plan.spec_offsets.diff().tolist())
    for image, (first, end) in zip(images, ranges):
        assert rel_err(image.view(-1, end - first), whole[:, first:end]) < 1e-6
    own = stft_ops.ragged_spectrogram(waves, offsets, plan, backend=backend)  # each span's own mean: not the same
    assert rel_err(own.split(plan.spec_offsets.diff().tolist())[0].view(-1, 37), whole[:, :37]) > 1e-3


@pytest.mark.parametrize("means,message", [
    (torch.zeros(3), r"one DC per signal of the plan \(2\), got shape \(3,\)"),
    (torch.tensor([0.0, float("nan")]), "means must be finite"),
])
def test_means_that_do_not_fit_the_plan_are_refused(means, message):
    waves, offsets, plan = spans_of(torch.randn(4000), 8000, [(0, 10), (5, 20)])
    with pytest.raises(ValueError, match=message):
        stft_ops.ragged_spectrogram(waves, offsets, plan, means=means)


def test_a_long_signal_over_several_passes_goes_through_the_front_end_a_span_at_a_time(monkeypatch):
    """fast.encode's passes over a long signal each compute their own segments' frames, read in place (views of
    the signal) and DC-free by the whole signal's mean. Before, the front end made the whole signal's
    band-layout image (1.25-1.4x its size) and kept it through every pass. A segment whose bands are split over
    passes goes through the front end once. The embeddings are the one-pass ones."""
    import echo.fast as fast

    model = random_model("tiny")
    rate = 8000
    frames = int(torch.randint(10_050, 11_000, ()))  # 6 segments, the last overlapping the fifth
    signal = torch.randn(geometry.n_fft(rate) + (frames - 1) * geometry.hop(rate) + 3)
    signal += torch.linspace(-1, 2, len(signal))
    whole = fast.encode(model, signal, rate, frames=True, max_tokens=10**6)
    computed = []
    front_end = stft_ops.ragged_spectrogram

    def recorded_front_end(waves, offsets, plan, *args, **kwargs):
        computed.append((waves.data_ptr(), sum(plan.frames)))
        return front_end(waves, offsets, plan, *args, **kwargs)

    monkeypatch.setattr(stft_ops, "ragged_spectrogram", recorded_front_end)
    # 4 bands of 126 tokens a segment: passes of one or two whole segments, or of some of a segment's bands
    budget = int(torch.randint(130, 1100, ()))
    ((utterance, frame_rows),) = fast.encode(model, signal, rate, frames=True, max_tokens=budget)
    start = signal.data_ptr()
    assert all(start <= pointer < start + signal.numel() * 4 for pointer, _ in computed)
    assert max(count for _, count in computed) <= 2 * geometry.SEGMENT_FRAMES
    assert sum(count for _, count in computed) <= frames + geometry.SEGMENT_FRAMES  # the overlap, at most
    assert rel_err(utterance, whole[0][0]) < 1e-6 and rel_err(frame_rows, whole[0][1]) < 1e-6


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_offsets_that_disagree_with_the_plan_are_refused_by_every_front_end(backend):
    """The torch path failed in a reshape, and the reference returned fewer frames than the plan holds."""
    from echo.plan import make_plan

    lengths = [int(torch.randint(2000, 9000, ())), int(torch.randint(2000, 9000, ()))]
    plan = make_plan(lengths, [16000, 8000])
    waves = torch.randn(sum(lengths))
    short = torch.tensor([0, lengths[0] - 7, sum(lengths) - 7])
    with pytest.raises(ValueError, match=rf"front end: waves must be 1-D.*signal lengths \[{lengths[0] - 7}, "):
        stft_ops.ragged_spectrogram(waves, short, plan, backend=backend)
    with pytest.raises(ValueError, match="offsets to .* samples"):
        stft_ops.ragged_spectrogram(waves[:-1], torch.tensor([0, lengths[0], sum(lengths)]), plan, backend=backend)


def test_the_default_front_end_takes_what_the_reference_takes():
    """int32 or strided offsets and float64 samples: the default backend answers as the reference does."""
    from echo.plan import make_plan

    lengths = [int(torch.randint(400, 3000, ())), int(torch.randint(400, 3000, ()))]
    plan = make_plan(lengths, [16000, 16000])
    waves = torch.randn(sum(lengths))
    offsets = torch.tensor([0, lengths[0], sum(lengths)])
    expected = stft_ops.ragged_spectrogram(waves, offsets, plan, backend="reference")
    strided = torch.stack([offsets, offsets]).T.flatten()[::2]
    for waves_in, offsets_in in ((waves, offsets.int()), (waves, strided), (waves.double(), offsets)):
        out = stft_ops.ragged_spectrogram(waves_in, offsets_in, plan)
        assert out.dtype == waves_in.dtype and rel_err(out, expected) < 1e-5


@pytest.mark.parametrize("rate", [16000, 22050, 11025])
def test_a_signal_shorter_than_one_window_is_a_clear_error_at_the_front_end(rate):
    """Spec section 1: a signal shorter than n_fft = floor(0.025 sr) has no frame, "an error the user must see, not
    a crash inside torch", also when the front end is called on its own (scripts do). N = n_fft is one frame."""
    n_fft = rate * 25 // 1000
    for call in (lambda x: stft_ops.spectrogram(x, rate),
                 lambda x: stft_ops.spectrogram_bins(x, rate, torch.tensor([0, 3]))):
        with pytest.raises(ValueError, match=rf"signal of {n_fft - 1} samples is shorter than one 25 ms window at "
                                             rf"{rate} Hz \({n_fft} samples\)"):
            call(torch.randn(2, n_fft - 1))
        assert call(torch.randn(n_fft)).shape[-1] == 1
