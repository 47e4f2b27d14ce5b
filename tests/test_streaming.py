import copy

import pytest
import torch

import echo.fast as fast
from echo import geometry, streaming
from echo.ops import stft as stft_ops

from conftest import random_model, rel_err


@pytest.fixture(scope="module")
def model():
    return random_model("tiny")


class TorchWithCat:
    """torch as echo.streaming sees it (monkeypatched in as its `torch`), with torch.cat replaced by `cat`."""

    def __init__(self, cat):
        self.cat = cat

    def __getattr__(self, name):
        return getattr(torch, name)


def push_in_random_pieces(stream, x):
    emitted, position = [], 0
    while position < len(x):
        step = int(torch.randint(1, len(x) // 4 + 2, ()))
        emitted += stream.push(x[position : position + step])
        position += step
    return emitted


def finish_counting_tokens(stream):
    """stream.finish() and the tokens of each of its encoder passes."""
    encode, passes = stream._encode, []

    def counted(bands, positions):
        passes.append(bands.shape[0] * (geometry.n_patches(bands.shape[-1]) + 1))
        return encode(bands, positions)

    stream._encode = counted
    return stream.finish(), passes


@pytest.mark.parametrize(
    "rate,frames",
    [(16000, 700), (8000, 2000), (12000, 2001), (1000, 2300), (100, 40),
     pytest.param(2000, 4500, marks=pytest.mark.slow), pytest.param(22050, 4000, marks=pytest.mark.slow)],
)
def test_stream_equals_offline(model, rate, frames):
    n = geometry.n_fft(rate) + (frames - 1) * geometry.hop(rate) + int(torch.randint(0, geometry.hop(rate), ()))
    x = torch.randn(n) * 0.5 + float(torch.randn(()) * 3)  # a large DC offset: only known at the end
    ref_u, ref_f = fast.encode(model, [x], rate, frames=True)[0]
    stream = fast.StreamEncoder(model, rate, frames=True)
    emitted = push_in_random_pieces(stream, x)
    utterance, frame_rows = stream.finish()
    assert frame_rows.shape == ref_f.shape
    assert rel_err(utterance, ref_u) < 1e-5 and rel_err(frame_rows, ref_f) < 1e-5
    # every full 2000-frame block is emitted once, in order, as soon as it exists; bands >= 1 already final
    full_segments = frames // geometry.SEGMENT_FRAMES if frames > 2000 else int(frames == 2000)
    assert [k for k, _, _ in emitted] == list(range(full_segments))
    dim = model.config.dim
    for k, _, rows in emitted:
        final = ref_f[125 * k : 125 * (k + 1)]
        if geometry.n_bands(rate) > 1:
            assert rel_err(rows[:, dim:], final[:, dim:]) < 1e-5


def test_stream_in_bf16_equals_offline_bf16(model):
    rate = 16000
    x = torch.randn(geometry.n_fft(rate) + 2600 * geometry.hop(rate)) * 0.5 + 1.0
    ref_u, ref_f = fast.encode(model, [x], rate, frames=True, dtype=torch.bfloat16)[0]
    exact_u, exact_f = model.encode(x, rate)
    stream = fast.StreamEncoder(model, rate, frames=True, dtype=torch.bfloat16)
    emitted = push_in_random_pieces(stream, x)
    utterance, frame_rows = stream.finish()
    assert [k for k, _, _ in emitted] == [0] and frame_rows.shape == ref_f.shape
    assert rel_err(utterance, ref_u) < 5e-3 and rel_err(frame_rows, ref_f) < 5e-3  # the same bf16 ops
    assert rel_err(utterance, exact_u) < 2e-2 and rel_err(frame_rows, exact_f) < 2e-2


@pytest.mark.parametrize("layout", ["float32", "non-contiguous", "int16", "float64 numpy"])
def test_chunks_of_any_layout_pushed_whole_or_in_pieces_equal_the_signal_encoded_whole(model, monkeypatch, layout):
    """A push reads its chunk in place but for the head it joins to the samples kept; groups of frames (37 here)
    cross the chunk's start, the head's end and the segment ends."""
    import numpy as np
    from echo import streaming

    monkeypatch.setattr(streaming, "FRAMES_AT_ONCE", 37)
    rate = 1000
    n_fft, hop = geometry.n_fft(rate), geometry.hop(rate)
    x = torch.randn(n_fft + int(torch.randint(2100, 2600, ())) * hop) * 0.3 + 0.5
    signal = {"float32": x, "non-contiguous": torch.stack([x, -x], 1)[:, 0], "int16": (x * 10000).to(torch.int16),
              "float64 numpy": x.double().numpy()}[layout]
    assert isinstance(signal, np.ndarray) or signal.is_contiguous() == (layout != "non-contiguous")
    ref_u, ref_f = fast.encode(model, [signal], rate, frames=True)[0]
    cut = int(torch.randint(1, n_fft + hop, ()))  # less than a window, then the rest: its head completes a frame
    for push in (lambda stream: stream.push(signal), lambda stream: push_in_random_pieces(stream, signal),
                 lambda stream: stream.push(signal[:cut]) + stream.push(signal[cut:])):
        stream = fast.StreamEncoder(model, rate, frames=True)
        assert [k for k, _, _ in push(stream)] == [0]
        utterance, frame_rows = stream.finish()
        assert rel_err(utterance, ref_u) < 1e-5 and rel_err(frame_rows, ref_f) < 1e-5


def test_one_push_of_a_whole_file_reads_it_in_place(model, monkeypatch):
    """A push joined its whole chunk to the samples kept (torch.cat): a copy of the chunk, +110 MB at the peak of a
    push of 10 minutes at 48 kHz. It joins only the chunk's head now, the span of a group of frames (50 here)."""
    from echo import streaming

    monkeypatch.setattr(streaming, "FRAMES_AT_ONCE", 50)
    rate = 1000
    n_fft, hop = geometry.n_fft(rate), geometry.hop(rate)
    x = torch.randn(n_fft + int(torch.randint(2100, 2600, ())) * hop) + 0.5
    stream = fast.StreamEncoder(model, rate, frames=True)
    cut = int(torch.randint(1, n_fft + 3 * hop, ()))  # some samples kept before the push
    stream.push(x[:cut])
    joined = []  # the samples of each torch.cat of samples

    def recording(tensors, *args, **kwargs):
        if tensors[0].dim() == 1:  # samples, not band rows
            joined.append(sum(t.numel() for t in tensors))
        return torch.cat(tensors, *args, **kwargs)

    monkeypatch.setattr(streaming, "torch", TorchWithCat(recording))
    assert [k for k, _, _ in stream.push(x[cut:])] == [0]
    monkeypatch.setattr(streaming, "torch", torch)
    assert joined and max(joined) <= cut + n_fft + 49 * hop < len(x) // 20, (joined, len(x))
    ref_u, ref_f = fast.encode(model, [x], rate, frames=True)[0]
    utterance, frame_rows = stream.finish()
    assert rel_err(utterance, ref_u) < 1e-5 and rel_err(frame_rows, ref_f) < 1e-5


def test_utterance_only_and_pcm(model):
    pcm = (torch.randn(30000) * 2000).to(torch.int16)
    stream = fast.StreamEncoder(model, 12000)
    push_in_random_pieces(stream, pcm)
    utterance = stream.finish()
    assert rel_err(utterance, model.encode(pcm, 12000)[0]) < 1e-5


def test_utterances_alone_keep_only_the_cls_rows_of_emitted_segments(model):
    """Without frames, finish() reads the emitted segments' CLS rows alone: the rest is not kept (nor held alive
    by a view of the CLS rows, whose storage is the whole segment's outputs)."""
    rate = 1000  # 2000 frames of 10 ms in few samples
    x = torch.randn(geometry.n_fft(rate) + (2 * 2000 + int(torch.randint(1, 900, ()))) * geometry.hop(rate)) + 2.0
    stream = fast.StreamEncoder(model, rate)
    assert len(push_in_random_pieces(stream, x)) == 2
    assert all(out.shape == (geometry.n_bands(rate), 1, model.config.dim) for out in stream.outputs)
    assert all(out.untyped_storage().nbytes() == out.nbytes for out in stream.outputs)
    assert rel_err(stream.finish(), fast.encode(model, [x], rate)[0]) < 1e-5


def test_stream_errors(model):
    stream = fast.StreamEncoder(model, 16000)
    with pytest.raises(ValueError, match="1-D chunks"):
        stream.push(torch.zeros(2, 10))
    with pytest.raises(ValueError, match="dtype must be"):
        fast.StreamEncoder(model, 16000, dtype=torch.int8)
    with pytest.raises(ValueError, match="NaN or Inf"):
        stream.push(torch.tensor([0.0, float("nan")]))
    x = torch.randn(8000)
    stream.push(x[:100])
    with pytest.raises(ValueError, match="signal of 100 samples is shorter than one 25 ms window"):
        stream.finish()
    stream.push(x[100:])  # a finish() refused for too little audio leaves the stream open
    assert rel_err(stream.finish(), model.encode(x, 16000)[0]) < 1e-5
    with pytest.raises(ValueError, match="after finish"):
        stream.push(torch.zeros(10))
    with pytest.raises(ValueError, match="outside 100 to"):
        fast.StreamEncoder(model, 50)
    with pytest.raises(ValueError, match="outside 100 to"):  # refused before a window of 1e28 samples is made
        fast.StreamEncoder(model, 1e30)
    stream = fast.StreamEncoder(model, 16000)
    for chunk, kind in (("abc", "str"), (None, "NoneType"), ([0.0, 1.0], "list")):
        with pytest.raises(ValueError, match=f"^chunk at sample 0 must be a torch.Tensor or numpy array, got {kind}"):
            stream.push(chunk)


def second_encode_fails(stream, monkeypatch) -> None:
    """The stream's second encode from now on raises, as out of memory would; the others run."""
    encode, calls = stream._encode, []

    def fails_once(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return encode(*args)

    monkeypatch.setattr(stream, "_encode", fails_once)


def test_a_push_that_fails_part_way_loses_no_finished_segment(model, monkeypatch):
    """A push that completes two segments and fails encoding the second (out of memory, say) had stored the
    first without returning it: the next push returned only the second."""
    rate = 2000
    x = torch.randn(geometry.n_fft(rate) + 4100 * geometry.hop(rate))
    stream = fast.StreamEncoder(model, rate, frames=True)
    second_encode_fails(stream, monkeypatch)
    cut = geometry.n_fft(rate) + 4050 * geometry.hop(rate)
    with pytest.raises(RuntimeError, match="out of memory"):
        stream.push(x[:cut])
    assert [k for k, _, _ in stream.push(x[cut:])] == [0, 1]
    assert rel_err(stream.finish()[0], model.encode(x, rate)[0]) < 1e-5


def test_stream_keeps_160_bytes_a_frame_in_doubling_buffers_and_emits_from_the_segments_own_frames(model, monkeypatch):
    """finish() needs per frame bins 0 and 1 (complex128) with their DC estimate and bins 2..31 as final float32:
    160 bytes. They were 32 complex bins (512 bytes) in one small tensor per push, which kept glibc's heap from
    shrinking (RSS grew ~15x faster than the state); band 0 of an emitted segment was once recomputed over
    every frame since the start."""
    rate = 16000
    first, hop = geometry.n_fft(rate), geometry.hop(rate)
    x = torch.randn(first + int(torch.randint(2000, 2600, ())) * hop)
    stream = fast.StreamEncoder(model, rate)
    state = (stream.dc_bins, stream.estimates, stream.low_rows)
    stream.push(x[:first])
    buffers, allocations = [rows.buffer for rows in state], 0
    for start in range(first, len(x), hop):  # a frame a push
        stream.push(x[start : start + hop])
        allocations += sum(rows.buffer is not buffer for rows, buffer in zip(state, buffers))
        buffers = [rows.buffer for rows in state]
    frames = stream.done_frames
    assert sum(rows[:].nbytes for rows in state) == 160 * frames
    assert all(rows.count == frames <= rows.buffer.shape[0] <= 2 * frames for rows in state)
    assert allocations <= 3 * frames.bit_length()  # capacity doubles: not an allocation a push
    mean = stream.total / stream.samples
    whole = stream._band0(mean, 0, frames)
    start = int(torch.randint(0, frames, ()))
    end = int(torch.randint(start + 1, frames + 1, ()))
    log_normalise, corrected = stft_ops.log_normalise, []
    monkeypatch.setattr(stft_ops, "log_normalise", lambda m: corrected.append(len(m)) or log_normalise(m))
    assert torch.equal(stream._band0(mean, start, end), whole[:, start:end])
    assert corrected == [end - start]  # the frames outside start:end are not corrected


@pytest.mark.parametrize("rate", [16000, 2000])
def test_stream_with_digital_silence_and_a_dc_offset(model, rate):
    """Silent frames put bins 2..31 at the log floor; they are kept as computed with the running estimate (0
    for the leading silence, far from the final mean), not corrected to the final mean: fast.encode agrees.
    At 2000 Hz band 0 holds 26 real bins after 6 zero rows."""
    n = geometry.n_fft(rate) + int(torch.randint(4100, 4400, ())) * geometry.hop(rate)
    third = n // 3
    x = torch.zeros(n)
    x[third:] = float(torch.empty(()).uniform_(2, 5))  # a DC offset from one third on, constant in the last
    x[third : 2 * third] += torch.randn(third) * 0.5
    ref_u, ref_f = fast.encode(model, [x], rate, frames=True)[0]
    stream = fast.StreamEncoder(model, rate, frames=True)
    assert len(push_in_random_pieces(stream, x)) == 2
    utterance, frame_rows = stream.finish()
    assert rel_err(utterance, ref_u) < 1e-5 and rel_err(frame_rows, ref_f) < 1e-5


def test_chunks_that_require_grad_build_no_graph(model):
    """push() once chained every chunk of the stream into one autograd graph (memory grew with the stream)."""
    rate = 8000
    x = torch.randn(geometry.n_fft(rate) + int(torch.randint(2000, 2300, ())) * geometry.hop(rate))
    stream = fast.StreamEncoder(model, rate)
    emitted = push_in_random_pieces(stream, x.clone().requires_grad_())
    assert emitted and not any(t.requires_grad for _, u, f in emitted for t in (u, f))
    assert not (stream.total.requires_grad or stream.audio.requires_grad or stream.upper.buffer.requires_grad)
    utterance = stream.finish()
    assert not utterance.requires_grad and rel_err(utterance, model.encode(x, rate)[0]) < 1e-5


def test_chunk_checks_are_those_of_whole_signals(model):
    """Beyond float32's range was reported as "NaN or Inf"; big-endian PCM and meta tensors failed in torch; an
    empty chunk of a refused dtype was taken."""
    import numpy as np

    stream = fast.StreamEncoder(model, 8000)
    stream.push(torch.randn(100))
    for dtype in (torch.bool, torch.uint8, torch.complex64):
        with pytest.raises(ValueError, match=f"^chunk at sample 100 has unsupported dtype {dtype}"):
            stream.push(torch.zeros(0, dtype=dtype))
    with pytest.raises(ValueError, match=r"chunk at sample 100 has 3 sample\(s\) beyond float32's range"):
        stream.push(torch.tensor([0.0, 1e300, -1e300, 1e39], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^chunk at sample 100: push\(\) takes 1-D chunks of samples, got shape "
                                         r"\(2, 50\); stream each channel through a StreamEncoder of its own"):
        stream.push(torch.randn(2, 50))
    with pytest.raises(ValueError, match="^chunk at sample 100 is a meta tensor"):
        stream.push(torch.empty(10, device="meta"))
    pcm = (np.random.randn(8000) * 3000).astype(np.int16)
    swapped = fast.StreamEncoder(model, 8000)
    push_in_random_pieces(swapped, pcm.astype(">i2"))
    assert rel_err(swapped.finish(), model.encode(pcm, 8000)[0]) < 1e-5


def test_a_push_allocates_for_its_own_frames_not_for_the_whole_segment(model):
    """The band rows of the current segment were one torch.cat a push, re-copying every frame kept: small pushes
    got slower with each frame of the first segment (0.2 -> 2.2 ms a push at 48 kHz), quadratic in all."""
    from torch.profiler import ProfilerActivity, profile

    rate = 16000
    first, hop = geometry.n_fft(rate), geometry.hop(rate)
    x = torch.randn(first + 1999 * hop) + 1.0
    stream = fast.StreamEncoder(model, rate, frames=True)

    def median_bytes_allocated(frames):  # per push of one hop, over pushes completing these frames
        sizes = []
        for frame in frames:
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                assert stream.push(x[first + (frame - 1) * hop : first + frame * hop]) == []
            sizes.append(sum(max(event.self_cpu_memory_usage, 0) for event in prof.events()))
        return sorted(sizes)[len(sizes) // 2]

    stream.push(x[:first])
    early = median_bytes_allocated(range(1, 16))
    stream.push(x[first + 15 * hop : first + 1980 * hop])
    late = median_bytes_allocated(range(1981, 1996))
    assert late < 2 * early, (early, late)
    stream.push(x[first + 1995 * hop :])
    ref_u, ref_f = fast.encode(model, [x], rate, frames=True)[0]
    utterance, frame_rows = stream.finish()
    assert rel_err(utterance, ref_u) < 1e-5 and rel_err(frame_rows, ref_f) < 1e-5


@pytest.mark.parametrize("rate", [4000, 1000])  # band 0 one of two bands; band 0 the only band, zero rows first
def test_band_0_images_hold_only_their_own_rows(model, rate):
    """Band 0 was a view of the layout of every band: finish() kept one per emitted segment, +170 MB for 10
    minutes at 48 kHz (24 bands) over a stream state of 24 MB."""
    x = torch.randn(geometry.n_fft(rate) + int(torch.randint(2 * 2000 + 1, 3 * 2000, ())) * geometry.hop(rate)) + 1.0
    stream = fast.StreamEncoder(model, rate)
    band0, images = stream._band0, []

    def recorded(mean, start, end):
        images.append(band0(mean, start, end))
        return images[-1]

    stream._band0 = recorded
    push_in_random_pieces(stream, x)
    utterance = stream.finish()
    assert len(images) == 2 + 3  # at each emission, then at finish() for the emitted ones and the last segment
    for image in images:
        assert image.shape == (geometry.BAND_BINS, geometry.SEGMENT_FRAMES)
        assert image.untyped_storage().nbytes() == image.numel() * image.element_size()
    assert rel_err(utterance, fast.encode(model, [x], rate)[0]) < 1e-5


def test_finish_encodes_the_emitted_segments_in_passes_of_max_tokens(model):
    """finish() re-encoded band 0 of every emitted segment in one pass: at 1M frames (ECHO-small) its peak took
    1.4 GB over a state of 38 MB. It now keeps to max_tokens a pass, as fast.encode does (4096 on a CPU)."""
    rate = 100  # a frame a sample: 34 segments cost little audio
    x = torch.randn(geometry.n_fft(rate) + int(torch.randint(33 * 2000 + 1, 34 * 2000, ()))) * 0.5 + 2.0
    ref_u, ref_f = fast.encode(model, [x], rate, frames=True)[0]
    # the default first (4096 tokens on a CPU), utterances alone; then a few segments a pass, with frames
    for frames, options in ((False, {}), (True, {"max_tokens": int(torch.randint(126, 600, ()))})):
        stream = fast.StreamEncoder(model, rate, frames=frames, **options)
        push_in_random_pieces(stream, x)
        out, passes = finish_counting_tokens(stream)
        assert max(passes) <= options.get("max_tokens", fast.DEFAULT_MAX_TOKENS["cpu"])
        assert rel_err(out[0] if frames else out, ref_u) < 1e-5
        assert not frames or rel_err(out[1], ref_f) < 1e-5
    with pytest.raises(ValueError, match="max_tokens must be a positive whole number"):
        fast.StreamEncoder(model, rate, max_tokens=0)


@pytest.mark.parametrize("short_of_whole_bands", [False, True])
def test_every_pass_keeps_to_max_tokens_at_rates_of_many_bands(model, monkeypatch, short_of_whole_bands):
    """A segment's bands (10 at 24 kHz; hundreds at the rates of acoustic-emission sensors) went through the
    encoder in one pass, past max_tokens: now in passes of whole bands within it, at emission and at finish().
    A budget one or two tokens short of k bands' sequences (126 tokens each) gets passes of k - 1 bands."""
    from echo import packed

    rate, budget = 24001, int(torch.randint(260, 500, ()))
    if short_of_whole_bands:
        budget = (geometry.MAX_PATCHES + 1) * int(torch.randint(2, 4, ())) - int(torch.randint(1, 3, ()))
    x = torch.randn(geometry.n_fft(rate) + 2100 * geometry.hop(rate)) + 0.5
    ref_u, ref_f = fast.encode(model, [x], rate, frames=True)[0]
    passes, forward = [], packed.forward

    def counted(model, tokens, packing, *rest, **options):  # the tokens of the bands' sequences, not the padding
        lengths = packing.cu_seqlens.diff()
        passes.append(int(lengths[lengths > 1].sum()))
        return forward(model, tokens, packing, *rest, **options)

    monkeypatch.setattr(packed, "forward", counted)
    stream = fast.StreamEncoder(model, rate, frames=True, max_tokens=budget)
    emitted = push_in_random_pieces(stream, x)
    utterance, frame_rows = stream.finish()
    assert len(emitted) == 1 and max(passes) <= budget and len(passes) > 6
    assert rel_err(utterance, ref_u) < 1e-5 and rel_err(frame_rows, ref_f) < 1e-5


def test_the_band_rows_window_grows_by_doubling_and_keeps_its_rows():
    """A stream appends each push's band rows to one window: reallocated at each append, it re-copied every kept
    frame a push. Frames kept read back as appended, across reallocations and drops."""
    from echo.streaming import _Window

    window, appended, reallocations = _Window(3, torch.float32), [], 0
    for _ in range(int(torch.randint(300, 600, ()))):
        rows = torch.randn(int(torch.randint(1, 6, ())), 3)
        buffer = window.buffer
        window.append(rows)
        reallocations += window.buffer is not buffer
        appended.append(rows)
        if torch.rand(()) < 0.02:  # the stream drops the frames it no longer needs
            window.drop_before(int(torch.randint(window.start, window.start + window.count + 1, ())))
    every = torch.cat(appended)
    assert torch.equal(window.frames(window.start, len(every)), every[window.start :])
    assert reallocations <= 2 * len(every).bit_length() + 20  # a few per drop at most, not one an append


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_passes_on_a_cpu_are_padded_to_the_few_row_counts_of_fast_encode(model, monkeypatch, dtype):
    """Streams of many lengths and rates met a new row count at almost every pass, each a product oneDNN builds
    and keeps (up to 1024 of them): 800 streams of 0.3-19 s grew a process by 610 MB (ECHO-tiny). Rows are now
    padded to a multiple of fast.encode's step, with the unpadded result."""
    from echo import packed

    signals = []
    for rate in (8000, 22050, 44100):
        frames = int(torch.randint(20, 2000, ()))
        x = torch.randn(geometry.n_fft(rate) + (frames - 1) * geometry.hop(rate))
        signals.append((x, rate, fast.encode(model, [x], rate, dtype=dtype)[0]))
    rows, forward = [], packed.forward
    monkeypatch.setattr(packed, "forward", lambda model, tokens, *a, **k: rows.append(tokens.shape[0])
                        or forward(model, tokens, *a, **k))
    for x, rate, expected in signals:
        stream = fast.StreamEncoder(model, rate, dtype=dtype)
        push_in_random_pieces(stream, x)
        tolerance = 1e-5 if dtype == torch.float32 else 5e-3  # as test_stream_in_bf16_equals_offline_bf16
        assert rel_err(stream.finish(), expected) < tolerance
    step = fast.pass_row_step(fast.DEFAULT_MAX_TOKENS["cpu"], 1, torch.device("cpu"))
    assert rows and all(count % step == 0 for count in rows), rows


def test_finish_writes_the_frames_once(model, monkeypatch):
    """finish() joined each segment's rows, transposed them and joined the segments: its peak rose by 2.5x the
    frames' size (+130 MB for 10 minutes at 48 kHz, ECHO-tiny). They are written once, in place."""
    from echo import streaming

    rate = 4000  # two bands: band 0 and the others are written apart
    x = torch.randn(geometry.n_fft(rate) + int(torch.randint(2000 + 1, 2 * 2000, ())) * geometry.hop(rate)) + 0.5
    stream = fast.StreamEncoder(model, rate, frames=True)
    push_in_random_pieces(stream, x)
    joined = []  # the values of each torch.cat of encoder outputs in finish() (rows of dim or bands x dim)

    def recording(tensors, *args, **kwargs):
        if tensors[0].shape[-1] % model.config.dim == 0:  # not band 0's spectrogram rows
            joined.append(sum(t.numel() for t in tensors))
        return torch.cat(tensors, *args, **kwargs)

    monkeypatch.setattr(streaming, "torch", TorchWithCat(recording))
    utterance, frame_rows = stream.finish()
    monkeypatch.setattr(streaming, "torch", torch)
    assert sum(joined) < frame_rows.numel() // 10, (joined, frame_rows.shape)
    ref_u, ref_f = fast.encode(model, [x], rate, frames=True)[0]
    assert rel_err(utterance, ref_u) < 1e-5 and rel_err(frame_rows, ref_f) < 1e-5


def test_a_finish_that_failed_can_be_called_again(model, monkeypatch):
    """finish() marked the stream finished before encoding: one that failed (out of memory, say) lost the stream."""
    rate = 1000
    x = torch.randn(geometry.n_fft(rate) + int(torch.randint(2001, 3999, ())) * geometry.hop(rate))
    stream = fast.StreamEncoder(model, rate, frames=True)
    push_in_random_pieces(stream, x)
    second_encode_fails(stream, monkeypatch)
    with pytest.raises(RuntimeError, match="out of memory"):
        stream.finish()
    utterance, frame_rows = stream.finish()
    ref_u, ref_f = model.encode(x, rate)
    assert rel_err(utterance, ref_u) < 1e-5 and rel_err(frame_rows, ref_f) < 1e-5
    with pytest.raises(ValueError, match="finish\\(\\) was already called"):
        stream.finish()


def test_pushes_of_several_segments_between_pushes_of_a_hop(model):
    """The band rows' buffer grows for a long push and shrinks back after it; what it keeps stays right."""
    rate = 1000
    first, hop = geometry.n_fft(rate), geometry.hop(rate)
    x = torch.randn(first + int(torch.randint(11000, 12000, ())) * hop) * 0.5 - 1.0
    cuts = [0, first, first + 4500 * hop, first + 4520 * hop, first + 9100 * hop, first + 9101 * hop, len(x)]
    ref_u, ref_f = fast.encode(model, [x], rate, frames=True)[0]
    stream = fast.StreamEncoder(model, rate, frames=True)
    emitted = [k for start, end in zip(cuts, cuts[1:]) for k, _, _ in stream.push(x[start:end])]
    utterance, frame_rows = stream.finish()
    assert emitted == list(range(geometry.n_frames(len(x), rate) // geometry.SEGMENT_FRAMES))
    assert rel_err(utterance, ref_u) < 1e-5 and rel_err(frame_rows, ref_f) < 1e-5


@pytest.mark.parametrize("packed_ops", [True, False], ids=["cpu-inference-ops", "model-itself"])
def test_a_stream_encodes_with_the_weights_it_started_with(monkeypatch, packed_ops):
    """Where fast.encode runs the model itself (no packed ops: a GPU in float32), a stream held the model, so a
    change of its weights mid-stream reached the last segments and finish() but not the emitted ones."""
    from echo import packed

    if not packed_ops:
        monkeypatch.setattr(packed.linear_ops, "available", lambda dtype: False)
    model = random_model("tiny", depth=1)  # its weights change below
    rate = 8000
    signal = torch.randn(geometry.hop(rate) * 4500)
    before = copy.deepcopy(model)
    stream = fast.StreamEncoder(model, rate)
    stream.push(signal[: len(signal) // 2])
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    stream.push(signal[len(signal) // 2 :])
    assert rel_err(stream.finish(), fast.encode(before, [signal], rate)[0]) < 1e-5


def test_a_push_whose_audio_could_not_be_kept_changes_nothing_and_can_be_repeated(model, monkeypatch):
    """A push that fails while keeping its audio (out of memory) must not count samples it did not keep."""
    import echo.streaming as streaming

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory")

    rate = 8000
    signal = torch.randn(geometry.hop(rate) * 2300 + 17)
    stream = fast.StreamEncoder(model, rate)
    stream.push(signal[:5000])
    monkeypatch.setattr(streaming, "torch", TorchWithCat(out_of_memory))
    with pytest.raises(RuntimeError, match="out of memory"):
        stream.push(signal[5000:])
    monkeypatch.undo()
    stream.push(signal[5000:])  # the caller retries the chunk
    assert rel_err(stream.finish(), fast.encode(model, [signal], rate)[0]) < 1e-5


def keeping_frames_fails_once(monkeypatch) -> None:
    """The next growth of a stream's band rows raises, as out of memory would: the last buffer a push appends to."""
    import echo.streaming as streaming

    reallocate = streaming._Window._reallocate

    def fails_once(window, rows):
        monkeypatch.setattr(streaming._Window, "_reallocate", reallocate)
        raise RuntimeError("out of memory")
    monkeypatch.setattr(streaming._Window, "_reallocate", fails_once)


def test_a_push_that_fails_while_keeping_its_frames_leaves_no_rows_behind(model, monkeypatch):
    """Out of memory in the last buffer a push appends to: the rows already appended to the others must not
    shift the frames of the next push. The samples kept are the stream's copy, not a view of the chunk (read in
    place during the push), which the caller may refill."""
    from echo import streaming

    monkeypatch.setattr(streaming, "FRAMES_AT_ONCE", 37)  # a chunk longer than the head joined to the samples kept
    rate = 8000
    hop = geometry.hop(rate)
    signal = torch.randn(hop * 2300 + 31)
    stream = fast.StreamEncoder(model, rate, frames=True)
    first = geometry.n_fft(rate) + 2 * hop  # 3 frames: the band rows' buffer grows in the next push's first group
    stream.push(signal[:first])
    keeping_frames_fails_once(monkeypatch)
    chunk = signal[first : hop * 1000].clone()
    with pytest.raises(RuntimeError, match="out of memory"):
        stream.push(chunk)
    chunk.fill_(float("nan"))  # the caller's buffer, refilled
    stream.push(signal[hop * 1000 :])  # the failed push's samples were kept: not pushed again
    utterance, frames = stream.finish()
    expected_utterance, expected_frames = fast.encode(model, [signal], rate, frames=True)[0]
    assert rel_err(utterance, expected_utterance) < 1e-5 and rel_err(frames, expected_frames) < 1e-5


@pytest.mark.parametrize("then", ["finish", "empty push"])
def test_the_frames_of_a_last_push_that_failed_are_in_the_result(model, monkeypatch, then):
    """A push that fails while keeping its frames keeps its samples (not to be pushed again), but finish() right
    after it read only the frames computed before: 7 frame rows of 250, no error. An empty push did not compute
    them either, nor return the segment they complete."""
    rate = 8000
    signal = torch.randn(geometry.hop(rate) * 2300 + int(torch.randint(0, geometry.hop(rate), ())))
    stream = fast.StreamEncoder(model, rate, frames=True)
    stream.push(signal[: geometry.hop(rate) * 100])
    keeping_frames_fails_once(monkeypatch)
    with pytest.raises(RuntimeError, match="out of memory"):
        stream.push(signal[geometry.hop(rate) * 100 :])
    if then == "empty push":
        assert [k for k, _, _ in stream.push(signal[len(signal) :])] == [0]
    utterance, frame_rows = stream.finish()
    expected_utterance, expected_frames = fast.encode(model, [signal], rate, frames=True)[0]
    assert frame_rows.shape == expected_frames.shape
    assert rel_err(utterance, expected_utterance) < 1e-5 and rel_err(frame_rows, expected_frames) < 1e-5


def test_a_backend_that_cannot_run_is_refused_when_the_stream_is_made(model):
    """It was first used by the first segment's encode: a typo surfaced 20 s into a stream, after its audio was
    gone."""
    from echo.ops.backend import BackendError

    for backend in ("magic", "Torch"):
        with pytest.raises(BackendError, match=f"^backend={backend!r}: unknown backend {backend!r}"):
            fast.StreamEncoder(model, 16000, backend=backend)
    x = torch.randn(geometry.n_fft(1000) + 2100 * geometry.hop(1000))
    stream = fast.StreamEncoder(model, 1000, backend="reference")
    assert len(push_in_random_pieces(stream, x)) == 1
    assert rel_err(stream.finish(), model.encode(x, 1000)[0]) < 1e-5


def test_a_forced_attention_that_cannot_take_the_heads_is_refused_when_the_stream_is_made():
    """A 1-head dim-48 model with backend="csrc" built its stream and failed at the first segment, 20 s on."""
    from echo import extension
    from echo.ops.backend import BackendError

    if not extension.has_op("short_attention", torch.device("cpu")):
        pytest.skip("the compiled extension is not built")
    custom = random_model("tiny", dim=48, heads=1, depth=1)
    with pytest.raises(BackendError, match=r"^backend='csrc': the compiled attention takes .* got torch.float32 heads "
                                           r"of dim 48"):
        fast.StreamEncoder(custom, 16000, backend="csrc")
    x = torch.randn(16000)
    stream = fast.StreamEncoder(custom, 16000)  # unforced: the heads run where they can
    push_in_random_pieces(stream, x)
    assert rel_err(stream.finish(), custom.encode(x, 16000)[0]) < 1e-5


def test_a_stream_pushed_partly_inside_inference_mode(model):
    """Pushes inside torch.inference_mode() (a serving thread's handler; the mode is per thread) grew the stream's
    buffers as inference tensors, which a later push outside it may not write into: torch's "Inplace update to
    inference tensor outside InferenceMode" instead of the embeddings."""
    rate = 1000
    x = torch.randn(geometry.n_fft(rate) + int(torch.randint(2001, 2600, ())) * geometry.hop(rate)) + 1.0
    stream = fast.StreamEncoder(model, rate, frames=True)
    pieces = torch.tensor_split(x, 4)
    with torch.inference_mode():
        for piece in pieces[:2]:
            stream.push(piece)
    for piece in pieces[2:]:
        stream.push(piece)
    utterance, frame_rows = stream.finish()
    ref_u, ref_f = model.encode(x, rate)
    assert rel_err(utterance, ref_u) < 1e-5 and rel_err(frame_rows, ref_f) < 1e-5


def test_a_chunk_that_is_not_1d_is_refused_with_advice_that_fits_its_shape(model):
    """A lone sample (0-d) or a 3-D chunk was told to "stream each channel through a StreamEncoder of its own":
    advice for (channels, samples) chunks alone."""
    import numpy as np

    stream = fast.StreamEncoder(model, 8000)
    for chunk, shape in ((torch.tensor(0.5), r"\(\)"), (np.zeros((2, 3, 50), np.float32), r"\(2, 3, 50\)")):
        with pytest.raises(ValueError, match=rf"^chunk at sample 0: push\(\) takes 1-D chunks of samples, got shape "
                                             rf"{shape}$"):
            stream.push(chunk)
    with pytest.raises(ValueError, match=r"got shape \(2, 50\); stream each channel through a StreamEncoder"):
        stream.push(torch.zeros(2, 50))
    x = torch.randn(9000)
    stream.push(x)  # the refusals kept nothing
    assert rel_err(stream.finish(), model.encode(x, 8000)[0]) < 1e-5


def test_one_push_of_a_whole_long_signal_goes_through_the_fft_in_groups(model, monkeypatch):
    """A push of a whole file took the FFT of all its frames at once: +1.5 GB of peak RSS for 10 minutes at 48
    kHz. In groups of FRAMES_AT_ONCE (37 here, so that the groups cross segment ends), the same embeddings."""
    from echo import streaming

    monkeypatch.setattr(streaming, "FRAMES_AT_ONCE", 37)
    rate = 1000
    x = torch.randn(geometry.n_fft(rate) + int(torch.randint(2100, 2600, ())) * geometry.hop(rate)) + 0.5
    stream = fast.StreamEncoder(model, rate, frames=True)
    rfft, rows = torch.fft.rfft, []

    def counting(frames, *args, **kwargs):
        rows.append(frames.shape[0])
        return rfft(frames, *args, **kwargs)

    monkeypatch.setattr(torch.fft, "rfft", counting)
    assert [k for k, _, _ in stream.push(x)] == [0]
    frames = geometry.n_frames(len(x), rate)
    assert sum(rows) == frames and max(rows) == 37
    monkeypatch.setattr(torch.fft, "rfft", rfft)
    utterance, frame_rows = stream.finish()
    ref_u, ref_f = model.encode(x, rate)
    assert rel_err(utterance, ref_u) < 1e-5 and rel_err(frame_rows, ref_f) < 1e-5


def test_a_push_keeps_only_the_samples_of_frames_not_yet_computed(model):
    """The samples kept after a push were a view of all the push's audio, which stayed alive: 115 MB after one
    push of 10 minutes at 48 kHz, for less than one window's samples."""
    rate = 8000
    x = torch.randn(geometry.n_fft(rate) + int(torch.randint(100, 400, ())) * geometry.hop(rate)) + 0.5
    stream = fast.StreamEncoder(model, rate)
    cut = int(torch.randint(len(x) // 2, len(x), ()))
    for piece in (x[:cut], x[cut:]):
        stream.push(piece)
        assert stream.audio.untyped_storage().nbytes() == stream.audio.nbytes < geometry.n_fft(rate) * 4
    assert rel_err(stream.finish(), fast.encode(model, [x], rate)[0]) < 1e-5


@pytest.mark.slow  # ~2 s of profiled encoding
def test_one_push_of_a_whole_file_allocates_nothing_larger_than_its_audio():
    """A push of several segments kept the band rows of all its frames until its end (1.6x its audio at 8 kHz, in
    a buffer that doubles) and widened its chunk to float64 at once (2x): for 10 minutes at 48 kHz its peak was
    2.2x that of fast.encode on the file. Its largest allocation was then a copy of its audio, now not made either
    (test_one_push_of_a_whole_file_reads_it_in_place)."""
    from torch.profiler import ProfilerActivity, profile

    model = random_model("tiny", depth=1)  # 7 segments to encode
    rate = 8000
    x = torch.randn(geometry.n_fft(rate) + int(torch.randint(14000, 14500, ())) * geometry.hop(rate)) - 0.5
    stream = fast.StreamEncoder(model, rate)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        assert [k for k, _, _ in stream.push(x)] == list(range(7))
    largest = max(event.self_cpu_memory_usage for event in prof.events())
    assert largest <= x.nbytes, (largest, x.nbytes)
    assert rel_err(stream.finish(), fast.encode(model, [x], rate)[0]) < 1e-5


@pytest.mark.parametrize("rate", [16000, 1000])
def test_a_signal_of_exactly_one_window_finishes(model, rate):
    """One window's samples make one frame, the shortest signal fast.encode takes: finish() must encode it,
    refusing only signals shorter than a window."""
    n_fft = geometry.n_fft(rate)
    x = torch.randn(n_fft) + float(torch.randn(()))
    stream = fast.StreamEncoder(model, rate, frames=True)
    push_in_random_pieces(stream, x[:-1])
    with pytest.raises(ValueError, match=f"signal of {n_fft - 1} samples is shorter than one 25 ms window"):
        stream.finish()
    stream.push(x[-1:])
    utterance, frame_rows = stream.finish()
    ref_u, ref_f = fast.encode(model, [x], rate, frames=True)[0]
    assert frame_rows.shape == ref_f.shape
    assert rel_err(utterance, ref_u) < 1e-5 and rel_err(frame_rows, ref_f) < 1e-5


def test_band_rows_once_dropped_are_never_read(model, monkeypatch):
    """Rows before the band window's start stay in its buffer until it is reallocated: a stream that dropped one
    row too many of the last, overlapping segment read it there unnoticed, and a wrong row after the next
    reallocation. Dropped rows are poisoned (NaN) here, so reading one cannot pass."""
    from echo import streaming

    drop = streaming._Window.drop_before

    def poisoning(window, frame):
        drop(window, frame)
        window.buffer[: window.offset] = float("nan")

    monkeypatch.setattr(streaming._Window, "drop_before", poisoning)
    rate = 4000  # two bands: at 1000 Hz band 0 is the only one, and its rows come from elsewhere
    x = torch.randn(geometry.n_fft(rate) + int(torch.randint(2001, 3999, ())) * geometry.hop(rate)) + 0.5
    ref_u, ref_f = fast.encode(model, [x], rate, frames=True)[0]
    stream = fast.StreamEncoder(model, rate, frames=True)
    push_in_random_pieces(stream, x)
    utterance, frame_rows = stream.finish()
    assert rel_err(utterance, ref_u) < 1e-5 and rel_err(frame_rows, ref_f) < 1e-5


def test_finish_keeps_to_a_max_tokens_just_below_whole_segments(model):
    """finish() re-encodes band 0 of the emitted segments, MAX_PATCHES + 1 tokens each (CLS included), as many a
    pass as max_tokens holds: a budget one token short of k segments takes k - 1, not k (a random budget
    rarely lands there)."""
    rate = 100  # a frame a sample
    per_segment = geometry.MAX_PATCHES + 1
    budget = int(torch.randint(2, 5, ())) * per_segment - 1
    x = torch.randn(geometry.n_fft(rate) + int(torch.randint(5 * 2000 + 1, 6 * 2000, ()))) + 1.0
    stream = fast.StreamEncoder(model, rate, max_tokens=budget)
    push_in_random_pieces(stream, x)
    utterance, passes = finish_counting_tokens(stream)
    assert max(passes) <= budget
    assert rel_err(utterance, fast.encode(model, [x], rate)[0]) < 1e-5


def test_float64_chunks_on_a_large_offset_keep_their_variation(model):
    """float64 chunks lose an offset (the first chunk's mean) before they are rounded to float32, as model.encode
    takes the signal's DC off first: 1e5 + 1e-2 noise was the quantised signal's embedding."""
    variation = 1e-2 * torch.randn(30000, dtype=torch.float64)
    stream = fast.StreamEncoder(model, 1000)
    push_in_random_pieces(stream, 1e5 + variation)
    assert rel_err(stream.finish(), fast.encode(model, [variation], 1000)[0]) < 1e-5
    stream = fast.StreamEncoder(model, 16000)
    stream.push(torch.full((500,), 3e38, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"chunk at sample 500: its samples less the stream's offset 3e\+38 .* "
                                         r"exceed float32's range"):
        stream.push(torch.full((500,), -3e38, dtype=torch.float64))


@pytest.mark.parametrize("first", [torch.float32, torch.float64])
def test_float64_chunks_and_others_are_not_mixed_in_one_stream(model, first):
    """Only float64 chunks lose the stream's offset before their rounding: a float32 chunk and a float64 one on a
    large offset made a step in the signal (7% off the embedding)."""
    other = torch.float64 if first == torch.float32 else torch.float32
    stream = fast.StreamEncoder(model, 8000)
    stream.push(1000 + torch.randn(4000, dtype=first))
    stream.push(torch.zeros(0, dtype=other))  # an empty chunk holds no samples to mix
    with pytest.raises(ValueError, match=rf"chunk at sample 4000 is {other}, the stream's earlier chunks "
                                         rf"{'not ' if first == torch.float32 else ''}float64"):
        stream.push(1000 + torch.randn(4000, dtype=other))


def test_a_push_of_a_few_samples_sums_them_without_the_blocks_of_a_long_chunk(monkeypatch):
    """The float64 sums of a push (its finiteness check, the stream's running total) split every chunk into blocks
    for a generator to add: for a chunk of one sample, two thirds of a push's ~126 us. One block is summed at once,
    to the same value."""
    stream = fast.StreamEncoder(random_model("tiny", depth=1), 16000)
    split, calls = torch.Tensor.split, []
    monkeypatch.setattr(torch.Tensor, "split", lambda *args, **kwargs: calls.append(args) or split(*args, **kwargs))
    chunks = [torch.randn(int(torch.randint(1, 200, ()))) for _ in range(3)]
    for chunk in chunks:
        stream.push(chunk)
    assert calls == []
    assert stream.total == sum(chunk.sum(dtype=torch.float64) for chunk in chunks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_pickled_stream_takes_up_where_it_stood(dtype):
    """A stream could not be pickled (its products' oneDNN-packed weights do not pickle): a service could not save
    its streams across a restart. Unpickled mid-stream, it goes on as the stream itself does, to the bit, with the
    weights it started with (the model changed since), and ends with fast.encode's embeddings."""
    import pickle

    rate = 4000  # two bands (band 0, redone by finish(), and one final when emitted): the cheapest passes
    x = torch.randn(geometry.n_fft(rate) + 4300 * geometry.hop(rate) + 7) * 0.3 + 0.2  # two segments and a last
    work = random_model("tiny", depth=2)  # its weights change below
    reference = fast.encode(work, [x], rate, frames=True, dtype=dtype)[0]
    stream = fast.StreamEncoder(work, rate, frames=True, dtype=dtype)
    head = 2100 * geometry.hop(rate) + 5  # past the first segment: one emitted, band 0 provisional
    first = stream.push(x[:head])
    saved = pickle.dumps(stream)
    with torch.no_grad():
        for parameter in work.parameters():
            parameter.mul_(1.5)  # the stream keeps the weights it started with; so does its pickle
    restored = pickle.loads(saved)
    outputs = [(s.push(x[head:]), s.finish()) for s in (stream, restored)]
    (emitted, (utterance, frames)), (emitted_again, (utterance_again, frames_again)) = outputs
    assert len(first) == 1 and [k for k, _, _ in emitted] == [k for k, _, _ in emitted_again] == [1]
    assert torch.equal(utterance, utterance_again) and torch.equal(frames, frames_again)
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) for a, b in zip(emitted, emitted_again))
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(utterance_again, reference[0]) < tolerance and rel_err(frames_again, reference[1]) < tolerance


def test_a_pickled_stream_keeps_a_changed_norm_eps():
    """The model is rebuilt from its config on loading: a norm's eps set on the module was the config's again."""
    import pickle

    felt = random_model("tiny", depth=2)
    for module in felt.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = 0.5  # large enough to move every embedding
    rate = 8000
    x = torch.randn(geometry.n_fft(rate) + 300 * geometry.hop(rate))
    stream = fast.StreamEncoder(felt, rate)
    stream.push(x[:1000])
    restored = pickle.loads(pickle.dumps(stream))
    for s in (stream, restored):
        s.push(x[1000:])
    assert torch.equal(stream.finish(), restored.finish())


def test_streams_pickled_together_share_one_model_again():
    """Streams of one model share its weights' copy; loaded each with its own rebuilt model, 800 streams of a service
    took 800 copies of the weights."""
    import pickle

    model = random_model("tiny", depth=1)
    streams = [fast.StreamEncoder(model, rate) for rate in (8000, 16000, 16000)]
    streams.append(fast.StreamEncoder(model, 16000, dtype=torch.bfloat16))
    for stream in streams:
        stream.push(torch.randn(3000))
    loaded = pickle.loads(pickle.dumps(streams))
    assert loaded[0].model is loaded[1].model is loaded[2].model and loaded[3].model is not loaded[0].model
    assert [s.model.encoder.layers[0].linear1.weight.dtype for s in loaded] == [torch.float32] * 3 + [torch.bfloat16]
    assert copy.copy(streams[0]).model is streams[0].model  # not the stand-in that pickles it
    assert copy.deepcopy(streams[0]).model.encoder.layers[0].linear1.weight.dtype == torch.float32


@pytest.mark.parametrize("rate,frames", [(8000, 4123), (22050, 2000), (48000, 2345), (12000, 700)])
def test_a_stream_given_the_mean_emits_final_segments_and_keeps_nothing_per_frame(model, rate, frames):
    """Without the mean, a stream keeps 160 bytes a frame to redo band 0 at the end (~1-2 MB a minute of audio,
    without end) and emits band 0 provisional. Given the whole signal's mean (a file read twice), every emitted
    segment is final, finish() encodes only what was not emitted, and the stream's state does not grow."""
    n = geometry.n_fft(rate) + (frames - 1) * geometry.hop(rate) + int(torch.randint(0, geometry.hop(rate), ()))
    x = torch.randn(n) * 0.5 + float(torch.randn(()) * 3)
    ref_u, ref_f = fast.encode(model, [x], rate, frames=True)[0]
    stream = fast.StreamEncoder(model, rate, frames=True, mean=x.double().mean())
    emitted = push_in_random_pieces(stream, x)
    assert all(rows.count == 0 for rows in (stream.dc_bins, stream.estimates, stream.low_rows))
    for k, utterance, rows in emitted:  # band 0 too
        assert rel_err(rows, ref_f[125 * k : 125 * (k + 1)]) < 1e-5
    (utterance, frame_rows), passes = finish_counting_tokens(stream)
    assert rel_err(utterance, ref_u) < 1e-5 and rel_err(frame_rows, ref_f) < 1e-5
    segments = geometry.segments(geometry.n_frames(n, rate))
    tokens = [geometry.n_bands(rate) * (geometry.n_patches(end - start) + 1) for start, end in segments]
    assert sum(passes) == sum(tokens[len(emitted):])  # no band 0 encoded again


def test_a_wrong_mean_is_refused_at_finish_and_a_mean_off_by_float64_rounding_is_not(model):
    """The stream keeps nothing to redo band 0 with: a mean that is not the samples' would be a wrong answer."""
    x = torch.randn(30011) + 0.25
    stream = fast.StreamEncoder(model, 8000, mean=x.numpy().mean(dtype="float64"))  # pairwise: not the stream's sum
    stream.push(x)
    assert rel_err(stream.finish(), fast.encode(model, [x], 8000)[0]) < 1e-5
    stream = fast.StreamEncoder(model, 8000, mean=x[:15000].double().mean())  # the first half's
    stream.push(x)
    with pytest.raises(ValueError, match=r"mean=0\.2.* was given, but the 30011 samples pushed have mean 0\.2"):
        stream.finish()
    variation = 1e-2 * torch.randn(30000, dtype=torch.float64)  # float64 on a large offset: its own scale
    for mean, right in ((1e5 + variation.mean(), True), (1e5 + variation.mean() + 1e-6, False)):
        stream = fast.StreamEncoder(model, 1000, mean=mean)
        push_in_random_pieces(stream, 1e5 + variation)
        if right:
            assert rel_err(stream.finish(), fast.encode(model, [variation], 1000)[0]) < 1e-5
        else:
            with pytest.raises(ValueError, match="the 30000 samples pushed have mean"):
                stream.finish()


@pytest.mark.parametrize("mean", ["0.5", float("nan"), float("inf"), True, [0.5], 1j, torch.ones(2)])
def test_a_mean_that_is_not_one_finite_real_number_is_refused(model, mean):
    with pytest.raises(ValueError, match="mean must be one finite real number"):
        fast.StreamEncoder(model, 8000, mean=mean)


def test_the_float64_mean_of_a_small_variation_on_an_offset_is_not_refused(model):
    """Its samples less the offset peak at ~4e-6, so 1e-7 of that refused the float64 rounding of the mean itself
    (~1e-11 at 1e5): `echo encode` skipped such a float64 file as one that changed while it was read."""
    x = 1e5 + 0.3 + 1e-6 * torch.randn(30011, dtype=torch.float64)
    stream = fast.StreamEncoder(model, 8000, mean=float(x.numpy().mean()))
    for start in range(0, len(x), 7001):
        stream.push(x[start : start + 7001])
    assert rel_err(stream.finish(), fast.encode(model, [x], 8000)[0]) < 1e-5


@pytest.mark.parametrize("signal", ["dc", "half silence"])
def test_a_mean_that_the_stream_accepts_gives_the_encoding_of_its_samples(model, signal):
    """Band 0 moves with the mean's error by error * W[0] at bin 0: far from nothing where the signal is quiet next
    to its DC, or where frames are silent. A float32 mean of 1.0 + 1e-3 noise (6e-8 off) was accepted (1e-7 of the
    peak) and moved the frames by 7e-5, a mean 1e-7 off those of half silence by 7e-3."""
    x = torch.randn(16000 * 25) * 1e-3 + 1.0
    if signal == "half silence":
        noise = torch.randn(len(x) // 2) * 0.3
        x = torch.cat([torch.zeros(len(x) // 2), noise - noise.double().mean().float()])  # a small mean: DC-free
    exact = x.double().mean().item()
    accepted = []
    for mean in (exact, x.mean().item(), exact + 0.5e-7 * x.abs().max().item()):  # float32's rounding, such an error
        stream = fast.StreamEncoder(model, 16000, frames=True, mean=mean)
        stream.push(x)
        try:
            utterance, frame_rows = stream.finish()
        except streaming.MeanMismatch:
            continue
        accepted.append(mean)
        assert rel_err(frame_rows, fast.encode(model, [x], 16000, frames=True)[0][1]) < 1e-5
    assert accepted == [exact]  # else the loop checked nothing; the float32 mean is refused, as README says
