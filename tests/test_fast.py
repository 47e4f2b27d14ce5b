import threading

import numpy as np
import pytest
import torch

import echo.fast as fast
from echo import geometry
from echo.plan import make_plan

from conftest import RATE_FAMILIES, random_model, rel_err


def samples_for(frames: int, rate: int) -> int:
    """A length giving exactly `frames` frames, plus a random remainder shorter than one hop."""
    return geometry.n_fft(rate) + (frames - 1) * geometry.hop(rate) + int(torch.randint(0, geometry.hop(rate), ()))


@pytest.fixture(scope="module")
def model():
    return random_model("tiny")


def mixed_batch(count_long: int = 1):
    """Every rate family; frame counts around patch boundaries (16k - 1, 16k + 1), short, and > 2000."""
    rates, signals = [], []
    frame_counts = [15, 17, 31, 1, 16 * int(torch.randint(2, 60, ())) - 1, int(torch.randint(40, 500, ()))]
    for i, rate in enumerate(RATE_FAMILIES):
        for frames in frame_counts[i % 3 : i % 3 + 3]:
            rates.append(rate)
            signals.append(torch.randn(samples_for(frames, rate)))
    for _ in range(count_long):
        rate = RATE_FAMILIES[int(torch.randint(0, len(RATE_FAMILIES), ()))]
        rates.append(rate)
        signals.append(torch.randn(samples_for(int(torch.randint(2001, 2600, ())), rate)))
    order = torch.randperm(len(signals)).tolist()
    return [signals[i] for i in order], [rates[i] for i in order]


def test_equals_reference_on_mixed_batch(model):
    signals, rates = mixed_batch()
    results = fast.encode(model, signals, rates, frames=True)
    assert len(results) == len(signals)
    for (utterance, frame_rows), signal, rate in zip(results, signals, rates):
        ref_u, ref_f = model.encode(signal, rate)
        assert utterance.dtype == torch.float32 and utterance.device.type == "cpu"
        assert frame_rows.shape == ref_f.shape
        assert rel_err(utterance, ref_u) < 1e-5 and rel_err(frame_rows, ref_f) < 1e-5


def test_equals_reference_on_the_bundled_real_recordings(model):
    """Real audio has what random signals lack: digital silence and near-silent bins, where a float32 front end
    once moved these embeddings by up to 5e-4."""
    from echo.data import bundled

    signals, rates = zip(*bundled.samples().values())
    for utterance, signal, rate in zip(fast.encode(model, list(signals), list(rates)), signals, rates):
        assert rel_err(utterance, model.encode(signal, rate)[0]) < 1e-5


@pytest.mark.parametrize("rate", [100, 149, 1000, 1999])
def test_slow_sensors_down_to_100_hz(model, rate):
    """Rates under the audio families (accelerometers at 1 kHz): windows of 2-49 samples, one band of 2-25 bins
    padded to 32, hops of 1-19 samples; short, patch-boundary and multi-segment lengths."""
    signals = [torch.randn(samples_for(frames, rate)) for frames in (1, 17, 32, 2100)]
    for (utterance, frame_rows), signal in zip(fast.encode(model, signals, rate, frames=True), signals):
        ref_u, ref_f = model.encode(signal, rate)
        assert rel_err(utterance, ref_u) < 1e-5 and rel_err(frame_rows, ref_f) < 1e-5


def test_utterances_only_and_single_signal(model):
    x = np.random.randn(16000).astype(np.float32)
    (utterance,) = fast.encode(model, x, 16000)
    assert rel_err(utterance, model.encode(x, 16000)[0]) < 1e-5


def test_duplicates_and_multichannel(model):
    x = torch.randn(2, samples_for(100, 22050))
    out = fast.encode(model, [x, x[0], x[0]], [22050, 22050, 22050], frames=True)
    ref_u, ref_f = model.encode(x, 22050)
    assert rel_err(out[0][0], ref_u) < 1e-5 and rel_err(out[0][1], ref_f) < 1e-5
    assert torch.equal(out[1][0], out[2][0])
    assert rel_err(out[1][0], ref_u[: ref_u.shape[0] // 2]) < 1e-5


def test_small_token_budget_streams_through(model):
    signals, rates = mixed_batch(count_long=2)
    whole = fast.encode(model, signals, rates, frames=True)
    budget = int(torch.randint(150, 3000, ()))
    chunked = fast.encode(model, signals, rates, frames=True, max_tokens=budget)
    for (u, f), (cu, cf) in zip(whole, chunked):
        assert rel_err(cu, u) < 1e-6 and rel_err(cf, f) < 1e-6


def test_progress_is_called_after_every_pass(model):
    """One call over a long recording runs for minutes: a caller's progress bar learns of every pass."""
    signals, rates = [torch.randn(samples_for(200, 16000))], [16000]
    calls = []
    out = fast.encode(model, signals, rates, max_tokens=60, progress=lambda done, passes: calls.append((done, passes)))
    passes = calls[0][1]
    assert passes > 1 and calls == [(done, passes) for done in range(1, passes + 1)]
    for u, plain in zip(out, fast.encode(model, signals, rates, max_tokens=60)):
        assert torch.equal(u, plain)


def test_a_progress_that_cannot_be_called_is_refused_before_any_pass(model, monkeypatch):
    """progress=tqdm_bar (a bar, not its update) failed with "'tqdm' object is not callable" after the first pass."""
    monkeypatch.setattr(fast, "_encode_chunk", lambda *args: pytest.fail("encoded"))
    with pytest.raises(TypeError, match="progress must be a function \\(done, passes\\) or None, got int"):
        fast.encode(model, [torch.randn(samples_for(200, 16000))], 16000, progress=5)


def test_signals_of_exactly_max_tokens_take_one_pass(model):
    """max_tokens bounds a pass's tokens inclusively: signals whose tokens add up to it exactly are one pass, one
    token fewer is two."""
    rates = [8000, 16000, 12000]
    signals = [torch.randn(int(torch.randint(400, 4000, ()))) for _ in rates]
    tokens = sum(geometry.n_bands(sr) * (geometry.n_patches(geometry.n_frames(len(x), sr)) + 1)
                 for x, sr in zip(signals, rates))
    for budget, expected in ((tokens, 1), (tokens - 1, 2)):
        calls = []
        fast.encode(model, signals, rates, max_tokens=budget, progress=lambda done, passes: calls.append(passes))
        assert calls[-1] == expected


@pytest.mark.parametrize("frames", ["no", 0, None])
def test_frames_that_is_no_bool_is_refused(model, monkeypatch, frames):
    """frames="no" was taken by its truth: frames were returned."""
    monkeypatch.setattr(fast, "_encode_chunk", lambda *args: pytest.fail("encoded"))
    message = f"frames must be True or False, got {frames!r}"
    with pytest.raises(TypeError, match=message):
        fast.encode(model, [torch.randn(samples_for(20, 16000))], 16000, frames=frames)
    with pytest.raises(TypeError, match=message):
        fast.StreamEncoder(model, 16000, frames=frames)
    monkeypatch.undo()  # numpy's bool is one
    assert isinstance(fast.encode(model, [torch.randn(samples_for(20, 16000))], 16000, frames=np.bool_(True))[0], tuple)


def test_a_signal_split_across_passes_goes_through_the_front_end_once(model, monkeypatch):
    """A long signal between short ones, over several passes: every frame is transformed once (it was up to 3
    times, with each pass's other signals), but for the frames a signal's last segment shares with the one
    before it when the two fall in different passes; the result is the one-pass result."""
    from echo.ops import stft as stft_ops

    rates = [16000, 48000, 8000, 48000, 12000]
    frame_counts = (300, 6100, 40, 4500, 2001)
    signals = [torch.randn(samples_for(t, r)) for t, r in zip(frame_counts, rates)]
    whole = fast.encode(model, signals, rates, frames=True, max_tokens=10**6)
    transformed = []
    real = stft_ops.ragged_spectrogram
    monkeypatch.setattr(stft_ops, "ragged_spectrogram",
                        lambda waves, offsets, plan, *a, **k: transformed.append(sum(plan.frames))
                        or real(waves, offsets, plan, *a, **k))
    chunked = fast.encode(model, signals, rates, frames=True, max_tokens=int(torch.randint(1500, 4000, ())))
    shared = [max(0, ranges[-2][1] - ranges[-1][0]) if len(ranges) > 1 else 0
              for ranges in map(geometry.segments, frame_counts)]
    assert len(transformed) > 1 and sum(frame_counts) <= sum(transformed) <= sum(frame_counts) + sum(shared)
    for (u, f), (cu, cf) in zip(whole, chunked):
        assert rel_err(cu, u) < 1e-6 and rel_err(cf, f) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_passes_padded_to_few_row_counts_give_the_unpadded_result(model, monkeypatch, dtype):
    from echo import packed

    signals, rates = mixed_batch()
    budget = int(torch.randint(300, 3000, ()))
    rows, forward = [], packed.forward

    def recorded(model, tokens, *rest, **options):
        rows.append(len(tokens))
        return forward(model, tokens, *rest, **options)

    monkeypatch.setattr(packed, "forward", recorded)
    padded = fast.encode(model, signals, rates, frames=True, max_tokens=budget, dtype=dtype)
    tokens = make_plan([len(s) for s in signals], rates).total_tokens
    assert rows and all(count % fast.pass_row_step(budget, tokens, torch.device("cpu")) == 0 for count in rows)
    monkeypatch.setattr(fast, "pass_row_step", lambda max_tokens, tokens, device: 1)
    unpadded = fast.encode(model, signals, rates, frames=True, max_tokens=budget, dtype=dtype)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-3  # the same products over more rows may block differently
    for (u, f), (pu, pf) in zip(unpadded, padded):
        assert rel_err(pu, u) < tolerance and rel_err(pf, f) < tolerance


def test_a_budget_far_above_the_call_pads_by_the_call_not_by_the_budget(model, monkeypatch):
    """max_tokens=10**9 (one pass, whatever the call) once padded the pass to a multiple of 10**9 / 64 rows."""
    from echo import packed

    signals, rates = mixed_batch(count_long=0)
    rows, forward = [], packed.forward
    monkeypatch.setattr(packed, "forward", lambda model, tokens, *rest, **options: (
        rows.append(len(tokens)), forward(model, tokens, *rest, **options))[1])
    out = fast.encode(model, signals, rates, max_tokens=10**9)
    tokens = make_plan([len(s) for s in signals], rates).total_tokens
    assert len(rows) == 1 and tokens <= rows[0] < tokens + max(64, tokens // 32 + 1)  # a step of <= 2 tokens / 64
    assert all(rel_err(u, model.encode(s, r)[0]) < 1e-5 for u, s, r in zip(out, signals, rates))


def test_a_cpu_budget_meets_at_most_64_row_counts():
    """oneDNN builds a product per row count: the passes of any budget, padded to its step, come in at most 64 row
    counts (and no more padding than a step of max(64, budget / 64) needs); a GPU pads nothing."""
    for budget in [*torch.randint(64, 2**17, (20,)).tolist(), 4096, 65536]:
        step = fast.pass_row_step(budget, budget, torch.device("cpu"))
        assert len({-(-rows // step) for rows in range(1, budget + 1)}) <= fast.CPU_ROW_COUNTS
        assert step <= max(64, budget / 64 + 1)
        assert fast.pass_row_step(budget, budget, torch.device("cuda")) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cls_only_forward_equals_the_cls_rows_of_the_whole_forward(model, monkeypatch, dtype):
    """In any order of lengths; the last layer's rows after attention padded to a multiple of the step."""
    from echo import packed

    lengths = torch.randint(2, 40, (int(torch.randint(10, 40, ())),))
    inference = packed.inference_model(model, dtype)
    for order in (lengths, lengths.sort().values):
        packing = packed.Packing.from_lengths(order)
        tokens = torch.randn(packing.total_tokens, model.config.dim)
        whole = packed.forward(inference, tokens, packing)[packing.cu_seqlens[:-1].long()]
        step = int(torch.randint(2, 50, ()))
        rows, after_attention = [], packed._after_attention

        def recorded(ops, layer, x, attended):
            rows.append(len(x))
            return after_attention(ops, layer, x, attended)

        monkeypatch.setattr(packed, "_after_attention", recorded)
        cls = packed.forward(inference, tokens, packing, cls_only=True, row_step=step)
        monkeypatch.undo()
        assert rows[:-1] == [packing.total_tokens] * (len(rows) - 1)
        assert rows[-1] % step == 0 and 0 <= rows[-1] - len(order) < step
        assert cls.shape == whole.shape
        assert rel_err(cls, whole) < (1e-6 if dtype == torch.float32 else 1e-2)
    with pytest.raises(ValueError, match="return_layers"):
        packed.forward(inference, tokens, packing, return_layers=True, cls_only=True)


@pytest.mark.parametrize("prepared", [False, True], ids=["eager-ops", "cpu-inference-ops"])
def test_packed_forward_norms_read_their_own_eps(prepared):
    """Every LayerNorm of the packed encoder (norm1, norm2, the final norm) reads its module's eps, on the eager
    ops (a GPU's path, or a forced norm backend) and on the CPU inference ops. Inputs of variance ~1e-6, where eps
    1e-6 and 1e-5 give outputs ~2x apart (at unit variance ~4e-6, under the end-to-end tolerance), against
    torch's TransformerEncoderLayer with layer_norm_eps=1e-6 and a final LayerNorm with eps 1e-6, per sequence."""
    import torch.nn.functional as F

    from echo import packed
    from echo.ops import linear as linear_ops
    from independent import eps_felt_reference

    if prepared and not linear_ops.available(torch.float32):
        pytest.skip("no oneDNN linear ops in this torch")
    model = random_model("tiny", depth=2)
    state, reference = eps_felt_reference(model)
    packing = packed.Packing.from_lengths(torch.randint(2, 40, (int(torch.randint(3, 10, ())),)).sort().values)
    tokens = torch.randn(packing.total_tokens, model.config.dim) * 1e-3
    runner = packed.inference_model(model, torch.float32) if prepared else model
    assert (getattr(runner.encoder.layers[0], "cpu_inference_ops", None) is not None) == prepared
    bounds = packing.cu_seqlens.tolist()
    with torch.no_grad():
        out = packed.forward(runner, tokens, packing)
        ref = torch.cat([F.layer_norm(reference(tokens[start:end][None])[0], (model.config.dim,), state["norm.weight"],
                                      state["norm.bias"], 1e-6) for start, end in zip(bounds[:-1], bounds[1:])])
    assert rel_err(out, ref) < 1e-5  # eps 1e-5 in any norm: ~0.5


@pytest.mark.parametrize("cls_layer", [True, False], ids=["cls-only-last-layer", "cls-rows-picked"])
def test_utterances_only_equal_reference_in_small_passes(model, monkeypatch, cls_layer):
    """frames=False runs the last layer on the CLS rows alone, over several passes and long signals; where it
    does not (GPUs), the CLS rows are picked from the whole output before it leaves the device."""
    monkeypatch.setattr(fast, "CLS_LAYER_DEVICES", ("cpu",) if cls_layer else ())
    signals, rates = mixed_batch(count_long=2)
    results = fast.encode(model, signals, rates, max_tokens=int(torch.randint(150, 3000, ())))
    for utterance, signal, rate in zip(results, signals, rates):
        assert rel_err(utterance, model.encode(signal, rate)[0]) < 1e-5


@pytest.mark.parametrize("rate,budget", [(16000, 2000), (16000, 300), (200000, 1000), (200000, 100)])
def test_chunks_respect_budget_and_cover_every_band_of_every_segment(rate, budget):
    """A segment over the budget is split by band (200 kHz: 79 bands of up to 126 tokens, 9954 a segment);
    only a lone band sequence may exceed it."""
    monos = fast._monos([torch.randn(samples_for(t, rate)) for t in (10, 3000, 500, 6100, 30)], [rate] * 5)
    chunks = fast._chunks(monos, budget)
    seen = [(m, k, band) for chunk in chunks for m, pieces in chunk for k, first, end in pieces
            for band in range(first, end)]
    assert seen == [(m, k, band) for m, mono in enumerate(monos) for k in range(len(mono.segment_patches))
                    for band in range(mono.bands)]
    for chunk in chunks:
        sequences = [monos[m].segment_patches[k] + 1 for m, pieces in chunk for k, first, end in pieces
                     for _ in range(first, end)]
        assert sum(sequences) <= budget or len(sequences) == 1


@pytest.mark.parametrize("frames", [False, True])
def test_segments_of_very_high_rates_split_by_band_equal_the_reference(model, frames, monkeypatch):
    """max_tokens bounds every pass: a segment of a 1 MHz signal (391 bands) once ran whole, ~49k tokens past a
    4096-token budget. Split by band over passes, it gives model.encode's result, also with its pieces' passes
    shared with other signals."""
    passes = []
    real = fast._encode_chunk
    monkeypatch.setattr(fast, "_encode_chunk", lambda model, plan, *a: passes.append(plan.total_tokens)
                        or real(model, plan, *a))
    rates = [1_000_000, 16000, 24_001, 1_000_000]
    signals = [torch.randn(samples_for(t, r)) for t, r in zip((33, 40, 2003, 1), rates)]
    budget = int(torch.randint(300, 700, ()))
    results = fast.encode(model, signals, rates, frames=frames, max_tokens=budget)
    assert max(passes) <= budget and len(passes) > 4
    for result, signal, rate in zip(results, signals, rates):
        ref_u, ref_f = model.encode(signal, rate)
        utterance, frame_rows = result if frames else (result, None)
        assert rel_err(utterance, ref_u) < 1e-5
        if frames:
            assert frame_rows.shape == ref_f.shape and rel_err(frame_rows, ref_f) < 1e-5


def test_bf16_close_to_reference(model):
    signals, rates = mixed_batch(count_long=0)
    results = fast.encode(model, signals, rates, dtype=torch.bfloat16)
    for utterance, signal, rate in zip(results, signals, rates):
        assert rel_err(utterance, model.encode(signal, rate)[0]) < 2e-2


def test_reference_backend_agrees(model):
    signals, rates = mixed_batch(count_long=0)
    a = fast.encode(model, signals[:6], rates[:6], backend="reference")
    b = fast.encode(model, signals[:6], rates[:6], backend="torch")
    assert all(rel_err(x, y) < 1e-5 for x, y in zip(a, b))


def test_plan_orders_sequences_by_length_into_slices():
    lengths = [samples_for(t, r) for t, r in ((40, 16000), (500, 8000), (41, 48000), (2500, 12000))]
    plan = make_plan(lengths, [16000, 8000, 48000, 12000])
    packing = plan.packing()
    assert all(isinstance(rows, slice) for rows in packing.groups.values())
    covered = sorted(r for length, rows in packing.groups.items() for r in range(rows.start, rows.stop))
    assert covered == list(range(plan.total_tokens))
    assert plan.num_sequences == 7 + 4 * 1 + 19 + 5 * 2
    padded = plan.packing(padding=5)  # one-token sequences after the plan's: one slice of their own
    assert padded.groups[1] == slice(plan.total_tokens, plan.total_tokens + 5)
    assert padded.cu_seqlens[: plan.num_sequences + 1].tolist() == packing.cu_seqlens.tolist()


def test_a_plan_needs_one_rate_per_signal():
    """Zipped, a third length without its rate was left out of the plan (bench scripts call make_plan directly)."""
    with pytest.raises(ValueError, match="one sample rate per signal: 3 lengths, 2 rates"):
        make_plan([16000, 8000, 4000], [16000, 8000])


def test_output_rows_put_cls_rows_first_then_each_segment_patch_major():
    """Checked against the layout written out segment by segment: CLS rows in sequence order, then per segment
    patch 0 of every band, patch 1 of every band, ..."""
    lengths = [samples_for(t, r) for t, r in ((40, 16000), (500, 8000), (4100, 48000), (17, 12000), (2000, 8000))]
    plan = make_plan(lengths, [16000, 8000, 48000, 12000, 8000])
    starts = plan.cu_seqlens.tolist()
    expected = list(starts[:-1])
    for _, first, bands, patches, _ in plan.segments:
        expected += [starts[first + b] + 1 + p for p in range(patches) for b in range(bands)]
    assert plan.output_rows().tolist() == expected
    assert sorted(expected) == list(range(plan.total_tokens))


def test_a_plan_of_band_pieces_holds_those_bands_laid_out_as_their_own_blocks():
    """Pieces of a segment's bands (fast.encode's passes at very high rates): each piece's sequences read its
    own bands at their positions, and its frame rows are a (patches, piece bands) block."""
    rate = 200000
    length = samples_for(2100, rate)
    bands = geometry.n_bands(rate)
    whole = make_plan([length], [rate])
    plan = make_plan([length], [rate], [[(100, 2100, 5, 9), (0, 2000, 70, bands)]])
    assert [(segment[4], segment[2]) for segment in plan.segments] == [(70, bands - 70), (5, 4)]
    assert plan.seq_band.tolist() == list(range(70, bands)) + list(range(5, 9))
    assert plan.seq_frame_start.tolist() == [0] * (bands - 70) + [100] * 4
    keep = torch.cat([torch.arange(70, bands), bands + torch.arange(5, 9)])
    assert torch.equal(plan.seq_position, whole.seq_position[keep])
    starts = plan.cu_seqlens.tolist()
    expected = list(starts[:-1])
    for _, first, count, patches, _ in plan.segments:
        expected += [starts[first + b] + 1 + p for p in range(patches) for b in range(count)]
    assert plan.output_rows().tolist() == expected


@pytest.mark.parametrize(
    "signals,rates,message",
    [
        ([torch.randn(16000), torch.randn(100)], 16000, "signal 1: signal of 100 samples is shorter"),
        ([torch.randn(16000), torch.randn(16000)], [16000], "2 signals but 1 sample rate$"),
        ([torch.randn(16000), torch.randn(16000)], [16000, 99], "signal 1: sample rate 99 Hz is outside"),
        (None, 16000, "signals must be a signal or a list of signals, got NoneType"),
        ([torch.randn(8000), torch.full((9000,), float("nan"))], 8000, "signal 1: signal contains 9000 NaN"),
    ],
)
def test_bad_input_names_the_signal(model, signals, rates, message):
    with pytest.raises(ValueError, match=message):
        fast.encode(model, signals, rates)


def test_rates_as_tensors_and_other_spellings_of_the_device(model):
    x = torch.randn(8000)
    expected = fast.encode(model, [x, x], 8000)
    for rates in (torch.tensor(8000), np.array(8000), torch.tensor([8000, 8000]), np.array([8000, 8000])):
        assert all(torch.equal(a, b) for a, b in zip(fast.encode(model, [x, x], rates), expected))
    assert torch.equal(fast.encode(model, [x, x], 8000, device="cpu:0")[0], expected[0])
    if not torch.cuda.is_available():  # a CPU-only torch: the clear error, not torch's "not compiled with CUDA"
        with pytest.raises(ValueError, match="device cuda is not available here"):
            fast.encode(model, [x], 8000, device="cuda")
    with pytest.raises(ValueError, match="unknown device 'bogus'; e.g. cpu, cuda, cuda:1"):
        fast.encode(model, [x], 8000, device="bogus")


def test_bad_options(model):
    for max_tokens in (0, -3, 0.5, float("inf"), float("nan"), "4096", True, 10**400 * -1):
        with pytest.raises(ValueError, match="max_tokens must be a positive whole number of tokens"):
            fast.encode(model, [torch.randn(8000)], 8000, max_tokens=max_tokens)
    # whole numbers of any kind are budgets, as rates are
    assert fast.checked_max_tokens(torch.tensor(4096)) == fast.checked_max_tokens(np.int64(4096)) == 4096
    assert fast.checked_max_tokens(10**400) == 10**400
    with pytest.raises(ValueError, match="dtype must be"):
        fast.encode(model, [torch.randn(8000)], 8000, dtype=torch.int8)
    # a name was echoed bare, "got bfloat16", as if torch.bfloat16 were refused
    with pytest.raises(ValueError, match="got 'bfloat16': pass torch.bfloat16, not its name$"):
        fast.encode(model, [torch.randn(8000)], 8000, dtype="bfloat16")
    with pytest.raises(ValueError, match="got 'fp16'$"):
        fast.StreamEncoder(model, 8000, dtype="fp16")
    with pytest.raises(ValueError, match="unknown backend"):
        fast.encode(model, [torch.randn(8000)], 8000, backend="magic")


def test_what_is_not_a_model_with_weights_is_refused_by_name(model):
    """A path, None or a model on the meta device failed in torch ('str' object has no attribute 'device', or
    a meta kernel's NotImplementedError), and a StreamEncoder took a meta model and failed at its first segment."""
    with torch.device("meta"):
        meta = random_model(dim=32, depth=1, heads=2)
    for given, error, message in (("model.safetensors", TypeError, "model must be an echo.EchoModel .*got str"),
                                  (None, TypeError, "got NoneType"), (meta, ValueError, "on the meta device")):
        with pytest.raises(error, match=message):
            fast.encode(given, [torch.randn(8000)], 8000)
        with pytest.raises(error, match=message):
            fast.StreamEncoder(given, 8000)


def test_a_wrapped_model_is_refused_naming_the_model_inside(model):
    """A torch.compile'd model was refused as "got OptimizedModule" with a hint to echo.load one."""
    for wrapper, attribute in ((torch.compile(model), "_orig_mod"), (torch.nn.DataParallel(model), "module")):
        with pytest.raises(TypeError, match=rf"wrapping one: pass the model itself, its \.{attribute}"):
            fast.encode(wrapper, [torch.randn(8000)], 8000)
        with pytest.raises(TypeError, match=rf"its \.{attribute}"):
            fast.StreamEncoder(wrapper, 8000)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_writes_the_version_counter_misses_and_eps_changes_rebuild_the_cached_copy(dtype):
    """`p.data.copy_(q.data)` (EMA, weight sync) bumps no version counter: a copy cached by version mixed old
    and new weights (rel err 1.4). A norm's eps is no tensor at all."""
    from echo import packed

    model, other = random_model("tiny"), random_model("tiny")
    signal = torch.randn(int(torch.randint(8000, 20000, ())))
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    fast.encode(model, signal, 16000, dtype=dtype)
    stale = packed.inference_model(model, dtype)
    layer = int(torch.randint(0, model.config.depth, ()))
    model.encoder.layers[layer].norm2.bias.data.copy_(other.encoder.layers[layer].norm2.bias.data)
    assert packed.inference_model(model, dtype) is not stale  # one small tensor, anywhere, is seen
    for p, q in zip(model.parameters(), other.parameters()):
        p.data.copy_(q.data)
    assert rel_err(fast.encode(model, signal, 16000, dtype=dtype)[0], model.encode(signal, 16000)[0]) < tolerance
    model.norm.eps = 0.1
    model.encoder.layers[layer].norm1.eps = 0.05
    assert rel_err(fast.encode(model, signal, 16000, dtype=dtype)[0], model.encode(signal, 16000)[0]) < tolerance
    assert packed.inference_model(model, dtype) is packed.inference_model(model, dtype)  # unchanged: kept


def test_a_write_to_any_one_tensor_rebuilds_the_cached_copy():
    """Every tensor of the model is compared, the first and the last too: a write to any one, through `p.data`,
    gives a new copy holding the new value. The first, the last and one drawn between (each rebuild ~0.3 s: all
    30 took 14 s)."""
    from echo import packed

    model = random_model("tiny", depth=2)
    named = list(model.named_parameters())
    for name, tensor in (named[0], named[int(torch.randint(1, len(named) - 1, ()))], named[-1]):
        stale = packed.inference_model(model, torch.bfloat16)
        tensor.data.add_(torch.rand_like(tensor) + 0.5)
        fresh = packed.inference_model(model, torch.bfloat16)
        assert fresh is not stale, name
        copied = fresh.get_parameter(name)
        assert torch.equal(copied, tensor.to(copied.dtype)), name


def assert_fast_paths_give(truth, model, signal, dtype, tolerance):
    """fast.encode and a StreamEncoder fed the whole 16 kHz signal both give `truth` within `tolerance`."""
    assert rel_err(fast.encode(model, signal, 16000, dtype=dtype)[0], truth) < tolerance
    stream = fast.StreamEncoder(model, 16000, dtype=dtype)
    stream.push(signal)
    assert rel_err(stream.finish(), truth) < tolerance


def test_a_model_made_under_inference_mode(model):
    """Inference tensors have no version counter: reading one raised inside fast.encode and StreamEncoder."""
    with torch.inference_mode():
        inference = random_model("tiny")
    signal = torch.randn(int(torch.randint(8000, 20000, ())))
    truth = inference.encode(signal, 16000)[0]
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        assert_fast_paths_give(truth, inference, signal, dtype, tolerance)


def test_an_autocast_around_the_call_does_not_lower_float32_products(model):
    """dtype says the products' precision: under a caller's bf16 autocast float32 calls were 5e-5 (utterances)
    to 1e-3 (a stream) off, within bf16's tolerance but not float32's."""
    signal = torch.randn(int(torch.randint(30000, 50000, ())))  # over 2000 frames: the stream emits a segment
    truth = model.encode(signal, 16000)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_fast_paths_give(truth, model, signal, torch.float32, 1e-5)
        assert torch.is_autocast_enabled("cpu")  # the caller's setting is theirs again after the call


@pytest.mark.parametrize("conversion", ["double", "half", "bfloat16"])
def test_models_of_any_float_dtype_in_every_compute_dtype(conversion):
    """The fast path keeps a float32 residual stream whatever the model's dtype; a .half() model once fed its
    half residual stream to float32 products. A float32 computation of a float64 model is fp32-accurate."""
    model = getattr(random_model("tiny"), conversion)()
    signal = torch.randn(int(torch.randint(8000, 20000, ())))
    truth = model.encode(signal, 16000)[0]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        tolerance = 1e-5 if dtype == torch.float32 and conversion == "double" else 2e-2
        assert_fast_paths_give(truth, model, signal, dtype, tolerance)


def test_a_model_with_a_hook_whose_owner_cannot_be_copied():
    """A feature-capture hook, a bound method of an object holding a lock, made fast.encode and StreamEncoder
    raise "cannot pickle '_thread.lock' object": the inference copy deep-copied the model's hooks, owners and all."""
    class Capture:
        def __init__(self):
            self.lock, self.outputs = threading.Lock(), []

        def keep(self, module, args, output):
            with self.lock:
                self.outputs.append(output)

    model, capture = random_model("tiny", depth=2), Capture()
    model.encoder.layers[0].register_forward_hook(capture.keep)
    signal = torch.randn(int(torch.randint(8000, 20000, ())))
    truth = model.encode(signal, 16000)[0]
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        assert_fast_paths_give(truth, model, signal, dtype, tolerance)
    assert len(capture.outputs) == 1  # the model keeps its hook; only the reference call ran it


def test_a_model_holding_objects_that_cannot_be_copied():
    """A lock or an open file hung on the model or one of its modules (a service's bookkeeping) made the
    inference copy fail with "cannot pickle"; the copy now shares such attributes, and changes none."""
    model = random_model("tiny", depth=2)
    model.lock = threading.Lock()
    with open(__file__) as log:
        model.encoder.layers[1].bookkeeping = {"log": log, "calls": [threading.Lock()]}
        signal = torch.randn(int(torch.randint(8000, 20000, ())))
        truth = model.encode(signal, 16000)[0]
        for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            assert_fast_paths_give(truth, model, signal, dtype, tolerance)
        assert model.encoder.layers[1].bookkeeping["log"] is log and not log.closed


def test_big_endian_and_meta_signals(model):
    """Big-endian arrays (AIFF, network data) are encoded like native ones; a meta tensor is refused by name."""
    native = np.random.randn(16000).astype(np.float32)
    pcm = (native * 3000).astype(np.int16)
    expected = fast.encode(model, [native, pcm], 16000)
    out = fast.encode(model, [native.astype(">f4"), pcm.astype(">i2")], 16000)
    assert torch.equal(out[0], expected[0]) and torch.equal(out[1], expected[1])
    with pytest.raises(ValueError, match="signal 1: signal is a meta tensor"):
        fast.encode(model, [native, torch.empty(16000, device="meta")], 16000)


def test_a_misspelt_backend_setting_is_refused_not_ignored(monkeypatch):
    model = random_model("tiny", depth=1)
    monkeypatch.setenv("ECHO_BACKEND_ATTENTON", "reference")
    with pytest.raises(ValueError, match="ECHO_BACKEND_ATTENTON: no such op"):
        fast.encode(model, [torch.randn(4000)], 16000)
    with pytest.raises(ValueError, match="ECHO_BACKEND_ATTENTON: no such op"):
        fast.StreamEncoder(model, 16000)


def test_a_forced_attention_backend_runs_in_the_cls_only_last_layer(monkeypatch):
    """Utterances alone: the last layer attends from the CLS rows; a forced backend must still be the one run."""
    from echo.ops import attention as attention_ops

    model = random_model("tiny", depth=2)
    signals = [torch.randn(int(torch.randint(2000, 30000, ()))) for _ in range(3)]
    expected = fast.encode(model, signals, 16000)
    ran = []
    for name in ("varlen_attention", "first_token_attention"):
        real = getattr(attention_ops, name)
        monkeypatch.setattr(attention_ops, name, lambda *a, real=real, name=name, **k: ran.append(name) or real(*a, **k))
    out = fast.encode(model, signals, 16000, backend="reference")
    assert set(ran) == {"varlen_attention"} and ran.count("varlen_attention") == 2
    assert all(rel_err(o, e) < 1e-5 for o, e in zip(out, expected))


def test_the_weight_check_on_a_gpu_sees_one_changed_value():
    """The GPU's check reduces on the device and waits once; run here on CPU tensors through that branch."""
    from echo import packed

    model = random_model("tiny", depth=1)
    weights = [tensor.detach().clone() for _, tensor in packed._named_tensors(model)]
    gpu = torch.device("cuda")
    assert packed._unchanged(packed._named_tensors(model), weights, gpu)
    with torch.no_grad():
        parameters = list(model.parameters())
        parameters[int(torch.randint(len(parameters), ()))].view(-1)[0] += 1e-3
    assert not packed._unchanged(packed._named_tensors(model), weights, gpu)


@pytest.mark.parametrize("change", [1e-30, float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_gpu_weight_check_sees_tiny_and_non_finite_changes(change, dtype):
    """A change too small to survive squaring, or to NaN or Inf, in any floating dtype, and in an integer buffer
    (compared elementwise), is a change; equal tensors, NaN where it was, are not."""
    from echo import packed

    model = random_model("tiny", depth=1).to(dtype)
    model.register_buffer("counts", torch.arange(5))
    named = packed._named_tensors(model)
    gpu = torch.device("cuda")
    with torch.no_grad():
        target = list(model.parameters())[int(torch.randint(len(list(model.parameters())), ()))]
        target.view(-1)[0] = 0.0
        weights = [tensor.detach().clone() for _, tensor in named]
        assert packed._unchanged(named, weights, gpu)
        target.view(-1)[0] = change
        assert (target.view(-1)[0] != 0).item(), "the change must be representable in this dtype"
        assert not packed._unchanged(named, weights, gpu)
        if change != change:  # NaN in both: equal as far as the copy goes (the model is what it was)
            weights = [tensor.detach().clone() for _, tensor in named]
            assert not packed._unchanged(named, weights, gpu)  # NaN - NaN is NaN: rebuilt, never stale
        target.view(-1)[0] = 0.0
        model.counts[3] = 7
        weights_before = [tensor.detach().clone() for _, tensor in named]
        model.counts[3] = 3
        assert not packed._unchanged(named, weights_before, gpu)


def test_rates_from_any_iterable_as_signals_are(model):
    """Signals could come from a generator, their rates only from a list, tuple or array: a generator or a dict's
    values was refused as "signal 0: sample rate must be an integer number of Hz, got <generator ...>"."""
    clips = {"pump": (torch.randn(8000), 8000), "fan": (torch.randn(12000), 12000)}
    expected = [model.encode(signal, rate)[0] for signal, rate in clips.values()]
    signals = [signal for signal, _ in clips.values()]
    rates = {name: rate for name, (_, rate) in clips.items()}
    for given in ((rate for rate in rates.values()), rates.values()):
        assert all(rel_err(u, e) < 1e-5 for u, e in zip(fast.encode(model, signals, given), expected))
    with pytest.raises(ValueError, match="got 2 signals but 3 sample rates"):
        fast.encode(model, signals, (rate for rate in (8000, 8000, 8000)))
    with pytest.raises(ValueError, match="signal 0: sample rate must be an integer number of Hz, got '8000'"):
        fast.encode(model, signals, "8000")  # a string is one (bad) rate, not one rate per character


def test_an_object_array_of_signals_is_a_list_of_signals(model):
    """A ragged batch as pandas gives it (df["audio"].to_numpy(): a 1-D object array of arrays) was taken for one
    signal and refused as "signal 0: signal has unsupported dtype object"; no object array is one signal."""
    signals = [np.random.randn(8000).astype(np.float32), np.random.randn(9000).astype(np.float32)]
    batch = np.empty(2, dtype=object)
    batch[:] = signals
    expected = [model.encode(signal, 8000)[0] for signal in signals]
    assert all(rel_err(u, e) < 1e-5 for u, e in zip(fast.encode(model, batch, 8000), expected))
    with pytest.raises(ValueError, match="signal 1: signal must be a torch.Tensor or numpy array, got str"):
        fast.encode(model, np.array([signals[0], "clip.wav"], dtype=object), 8000)


def test_sets_of_signals_or_rates_are_refused(model):
    """A set has no order the caller chooses: its rates would be matched to the signals in the set's iteration
    order, and its signals' results (a set of tensors was taken) could not be matched back to them."""
    signals = [torch.randn(8000), torch.randn(16000)]
    with pytest.raises(ValueError, match="sample rates must be given in the signals' order, not as a set"):
        fast.encode(model, signals, {8000, 16000})
    with pytest.raises(ValueError, match="signals must be given in order, not as a set"):
        fast.encode(model, set(signals), 8000)


def test_dicts_of_signals_or_rates_are_refused(model):
    """A dict iterates over its keys: {name: signal} was refused as "signal 0: ... got str", and {index: rate}
    read its keys as rates ("sample rate 0 Hz is outside ...")."""
    signals = [torch.randn(8000), torch.randn(16000)]
    with pytest.raises(ValueError, match=r"signals is a dict, which iterates over its keys: pass list\(signals"):
        fast.encode(model, {"a.wav": signals[0], "b.wav": signals[1]}, 8000)
    with pytest.raises(ValueError, match="sample rates are a dict, which iterates over its keys"):
        fast.encode(model, signals, {0: 8000, 1: 16000})


def test_a_batch_array_with_a_rate_per_row_is_said_to_be_one_signal(model):
    """A (B, N) array is one signal of B channels; given with B rates it was refused as "got 1 signals but B
    sample rates", leaving the caller to find out why."""
    with pytest.raises(ValueError, match=r"got 1 signal but 3 sample rates; a \(3, 8000\) array is one signal of 3 "
                                         r"channels: pass list\(batch\) for 3 signals$"):
        fast.encode(model, np.zeros((3, 8000), np.float32), [8000] * 3)
    with pytest.raises(ValueError, match="got 2 signals but 3 sample rates$"):
        fast.encode(model, [torch.randn(3, 8000)] * 2, [8000] * 3)


def test_a_pass_spectrogram_is_freed_before_the_next_is_made(model, monkeypatch):
    """The call held each pass's spectrogram until the next one was made: two alive at once, for long signals
    in separate passes (3 x 10 minutes at 48 kHz: +301 MB at the peak against +178 MB)."""
    import weakref

    made = []
    spectrogram = fast._FrontEnd.spectrogram

    def watched(self, *args):
        assert all(ref() is None for ref in made), "an earlier pass's spectrogram is still alive"
        spec = spectrogram(self, *args)
        made.append(weakref.ref(spec))
        return spec

    monkeypatch.setattr(fast._FrontEnd, "spectrogram", watched)
    # 7 bands of 26-38 patches: 182-273 tokens, a pass each
    signals = [torch.randn(samples_for(int(torch.randint(400, 600, ())), 16000)) for _ in range(3)]
    results = fast.encode(model, signals, 16000, max_tokens=280)
    assert len(made) == 3
    for utterance, signal in zip(results, signals):
        assert rel_err(utterance, model.encode(signal, 16000)[0]) < 1e-5


def test_a_pass_frames_are_let_go_once_written_into_their_signals_frames(model, monkeypatch):
    """Each pass's frames were kept to the call's end and then joined by torch.cat, a signal's channels joined
    again: a long signal's frames were held twice at the peak, three times for stereo (30 minutes at 48 kHz stereo,
    ECHO-tiny: +1027 MB for 313 MB of frames; written into place, +395 MB)."""
    import weakref

    made, alive = [], []
    index_select, encode_chunk = torch.Tensor.index_select, fast._encode_chunk

    def recorded(self, *args, **kwargs):  # what a pass brings out of its output: CLS rows and frames
        selected = index_select(self, *args, **kwargs)
        made.append(weakref.ref(selected))
        return selected

    def watched(*args):
        alive.append(sum(ref() is not None for ref in made))
        return encode_chunk(*args)

    monkeypatch.setattr(torch.Tensor, "index_select", recorded)
    monkeypatch.setattr(fast, "_encode_chunk", watched)
    # 7 bands of 125 + 1 tokens a full segment: a segment a pass, a signal over 3 passes
    signals = [torch.randn(2, samples_for(5000, 16000)), torch.randn(samples_for(4500, 16000))]
    results = fast.encode(model, signals, 16000, frames=True, max_tokens=900)
    assert len(alive) >= 6 and alive == [0] * len(alive)
    monkeypatch.undo()
    for (utterance, frame_rows), signal in zip(results, signals):
        ref_u, ref_f = model.encode(signal, 16000)
        assert frame_rows.shape == ref_f.shape and frame_rows.is_contiguous()
        assert rel_err(utterance, ref_u) < 1e-5 and rel_err(frame_rows, ref_f) < 1e-5


def test_a_layer_module_whose_forward_the_packed_path_would_skip_is_refused():
    """A LoRA adapter in place of out_proj or linear2 (peft's target modules) runs in model.encode, which calls
    those modules; fast.encode and StreamEncoder read their weights only and were 0.36 off, silently. A subclass
    that keeps the class's forward (weight norm's parametrization) still encodes."""
    from torch.nn.utils import parametrizations

    class LoRA(torch.nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base_layer, self.down = base, torch.nn.Linear(base.in_features, 2, bias=False)

        weight, bias = property(lambda self: self.base_layer.weight), property(lambda self: self.base_layer.bias)

        def forward(self, x):
            return self.base_layer(x) + self.down(x).sum(-1, keepdim=True)

    model = random_model("tiny", depth=2)
    signal = torch.randn(8000)
    parametrizations.weight_norm(model.encoder.layers[1].linear2)
    assert_fast_paths_give(model.encode(signal, 16000)[0], model, signal, torch.float32, 1e-5)
    model.encoder.layers[1].linear2 = LoRA(model.encoder.layers[1].linear2)
    for encoder in (lambda: fast.encode(model, signal, 16000), lambda: fast.StreamEncoder(model, 16000)):
        with pytest.raises(ValueError, match=r"model.encoder.layers.1.linear2 is a LoRA, whose forward is not Linear's"):
            encoder()
    del model.encoder.layers[1].self_attn.out_proj
    with pytest.raises(ValueError, match=r"layers.1.self_attn.out_proj is a NoneType"):
        fast.encode(model, signal, 16000)
    patched = random_model("tiny", depth=1)
    patched.encoder.layers[0].linear2.forward = lambda x: torch.zeros(())  # on the instance: its class is Linear
    with pytest.raises(ValueError, match=r"model.encoder.layers.0.linear2 has a forward set on the module itself"):
        fast.encode(patched, signal, 16000)


def test_a_model_that_refers_to_itself_is_freed_after_encoding():
    """The inference copy shares the model's plain attributes; one that leads back to the model (a bound method,
    a patched forward) made the global weak-keyed cache of copies keep the model, its copy and their weights
    alive for good: a leak per model that a service loads. A copy or a pickle of the model starts with no copy."""
    import copy
    import gc
    import io
    import weakref

    model = random_model("tiny", depth=1)
    model.encode_signal = model.encode
    fast.encode(model, torch.randn(8000), 16000)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
    model = random_model("tiny", depth=1)
    fast.encode(model, torch.randn(8000), 16000)
    saved = io.BytesIO()
    torch.save(model, saved)
    for fresh in (copy.deepcopy(model), torch.load(io.BytesIO(saved.getvalue()), weights_only=False)):
        assert not vars(fresh).get("_echo_inference_copies")
