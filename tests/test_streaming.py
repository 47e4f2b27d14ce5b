import pytest
import torch

import echo.fast as fast
from echo import geometry
from echo.ops import stft as stft_ops

from conftest import random_model, rel_err


@pytest.fixture(scope="module")
def model():
    return random_model("tiny")


def push_in_random_pieces(stream, x):
    emitted, position = [], 0
    while position < len(x):
        step = int(torch.randint(1, len(x) // 4 + 2, ()))
        emitted += stream.push(x[position : position + step])
        position += step
    return emitted


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
    assert [k for k, _, _ in emitted] == list(range(frames // geometry.SEGMENT_FRAMES if frames > 2000 else int(frames == 2000)))
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


def test_utterance_only_and_pcm(model):
    pcm = (torch.randn(30000) * 2000).to(torch.int16)
    stream = fast.StreamEncoder(model, 12000)
    push_in_random_pieces(stream, pcm)
    utterance = stream.finish()
    assert rel_err(utterance, model.encode(pcm, 12000)[0]) < 1e-5


def test_utterances_alone_keep_only_the_cls_rows_of_emitted_segments(model):
    """Without frames, finish() reads the emitted segments' CLS rows alone: the rest is not kept."""
    rate = 1000  # 2000 frames of 10 ms in few samples
    x = torch.randn(geometry.n_fft(rate) + (2 * 2000 + int(torch.randint(1, 900, ()))) * geometry.hop(rate)) + 2.0
    stream = fast.StreamEncoder(model, rate)
    assert len(push_in_random_pieces(stream, x)) == 2
    assert all(out.shape == (geometry.n_bands(rate), 1, model.config.dim) for out in stream.outputs)
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
        with pytest.raises(ValueError, match=f"chunk must be a torch.Tensor or numpy array, got {kind}"):
            stream.push(chunk)


def test_a_push_that_fails_part_way_loses_no_finished_segment(model, monkeypatch):
    """A push that completes two segments and fails encoding the second (out of memory, say) had stored the
    first without returning it: the next push returned only the second."""
    rate = 2000
    x = torch.randn(geometry.n_fft(rate) + 4100 * geometry.hop(rate))
    stream = fast.StreamEncoder(model, rate, frames=True)
    encode, calls = stream._encode, []

    def fails_once(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return encode(*args)

    monkeypatch.setattr(stream, "_encode", fails_once)
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
    whole = stream._band0(mean)
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
    assert not (stream.total.requires_grad or stream.audio.requires_grad or stream.upper.requires_grad)
    utterance = stream.finish()
    assert not utterance.requires_grad and rel_err(utterance, model.encode(x, rate)[0]) < 1e-5


def test_chunk_checks_are_those_of_whole_signals(model):
    """Beyond float32's range was reported as "NaN or Inf"; big-endian PCM and meta tensors failed in torch."""
    import numpy as np

    stream = fast.StreamEncoder(model, 8000)
    stream.push(torch.randn(100))
    with pytest.raises(ValueError, match=r"chunk at sample 100 has 3 sample\(s\) beyond float32's range"):
        stream.push(torch.tensor([0.0, 1e300, -1e300, 1e39], dtype=torch.float64))
    with pytest.raises(ValueError, match="chunk is a meta tensor"):
        stream.push(torch.empty(10, device="meta"))
    pcm = (np.random.randn(8000) * 3000).astype(np.int16)
    swapped = fast.StreamEncoder(model, 8000)
    push_in_random_pieces(swapped, pcm.astype(">i2"))
    assert rel_err(swapped.finish(), model.encode(pcm, 8000)[0]) < 1e-5
