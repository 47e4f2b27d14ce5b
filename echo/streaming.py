"""StreamEncoder: encode audio that arrives in pieces, emitting each 2000-frame segment as soon as the
released segmenting rule makes it final, and ending with what echo.fast.encode gives on the whole, to float32
rounding (its own front end computes with a running mean, corrected at the end: relative error < 1e-5).

Why this works although the front end subtracts the mean of the WHOLE signal: a constant c changes the STFT
of a frame by c * W[k], W the DFT of the periodic Hann window, which is zero at every bin but 0 and 1. So
only band 0 depends on the final mean. Bands >= 1 of a full segment are final when its 2000 frames exist;
band 0 is emitted with the running mean (provisional) and recomputed at finish(), along with the last,
overlapping segment. For that a stream keeps, per frame, bins 0 and 1 as complex128 with the DC estimate they
were computed with, and bins 2..31 once as their final float32 values: 160 bytes (32 + 8 + 120).
Where the whole signal's mean is known before its end (a file read twice: `mean=`), every band is final when its
segment is emitted, and the stream keeps nothing per frame.
"""
from __future__ import annotations

import math
import numbers

import torch

from . import geometry, inputs, packed
from .model import EchoModel, as_asked
from .ops import backend as backends
from .ops import stft as stft_ops
from .ops import tokens as token_ops

FRAMES_AT_ONCE = 1024  # a push's new frames go through the FFT in groups of this many


class _Rows:
    """Rows appended to one buffer whose capacity doubles. A small tensor per push (~1200 per 10 minutes in
    0.5 s chunks) sat between each push's large temporaries, so glibc's heap could not shrink: RSS grew ~15x
    faster than the state."""

    def __init__(self, width: int, dtype: torch.dtype):
        self.buffer = torch.empty(0, width, dtype=dtype, device="cpu")
        self.count = 0

    def append(self, rows: torch.Tensor) -> None:
        end = self.count + rows.shape[0]
        if end > self.buffer.shape[0]:
            grown = self.buffer.new_empty(max(end, 2 * self.buffer.shape[0]), self.buffer.shape[1])
            grown[: self.count] = self.buffer[: self.count]
            self.buffer = grown
        self.buffer[self.count : end] = rows
        self.count = end

    def __getitem__(self, frames: slice) -> torch.Tensor:
        return self.buffer[: self.count][frames]

    def truncate(self, count: int) -> None:
        self.count = min(self.count, count)


class _Window:
    """Rows of the frames from `start` on: appended at the end, dropped from the front, in one buffer
    reallocated at twice the live rows when full. They were one torch.cat a push, which re-copied every frame
    kept: over the first segment, a push of one hop at 48 kHz went from 0.17 to 2.1 ms (now 0.14 ms throughout:
    bench/stream_push_time.py). The stream computes and drops a segment at a time, so the buffer never outgrows
    twice the two segments' rows it can hold at once."""

    def __init__(self, width: int, dtype: torch.dtype):
        self.buffer = torch.empty(0, width, dtype=dtype, device="cpu")
        self.offset = 0  # buffer row of frame `start`
        self.count = 0
        self.start = 0

    def _reallocate(self, rows: int) -> None:
        live = self.buffer[self.offset : self.offset + self.count]
        self.buffer = self.buffer.new_empty(rows, self.buffer.shape[1])
        self.buffer[: self.count] = live
        self.offset = 0

    def append(self, rows: torch.Tensor) -> None:
        if self.offset + self.count + rows.shape[0] > self.buffer.shape[0]:
            self._reallocate(2 * (self.count + rows.shape[0]))
        end = self.offset + self.count
        self.buffer[end : end + rows.shape[0]] = rows
        self.count += rows.shape[0]

    def drop_before(self, frame: int) -> None:
        dropped = frame - self.start
        self.offset, self.count, self.start = self.offset + dropped, self.count - dropped, frame

    def truncate(self, end: int) -> None:
        """Forget the rows of frames from `end` on."""
        self.count = min(self.count, end - self.start)

    def frames(self, start: int, end: int) -> torch.Tensor:
        """Rows of frames start:end (a view)."""
        return self.buffer[self.offset + start - self.start : self.offset + end - self.start]


_PICKLED_AS = "_echo_pickled_as"  # the attribute of a stream's model that pickles it, one for all its streams


class _PickledModel:
    """A stream's inference model in a pickle: rebuilt from its config, weights and norms' eps."""

    def __init__(self, model, dtype: torch.dtype):
        self.model, self.dtype = model, dtype

    def __reduce__(self):
        eps = [module.eps for module in self.model.modules() if isinstance(module, torch.nn.LayerNorm)]
        return _rebuilt, (self.model.config, self.model.state_dict(), eps, self.dtype)


def _rebuilt(config, weights: dict, eps: list, dtype: torch.dtype):
    model = EchoModel(config, device=next(iter(weights.values())).device)
    model.load_state_dict(weights)
    for module, value in zip((m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)), eps):
        module.eps = value
    return packed.inference_model(model, dtype, snapshot=True)


class MeanMismatch(ValueError):
    """The `mean` a stream was given is not its samples'."""


MEAN_TOLERANCE = 1e-7  # of float64 chunks' peak less their offset: the float32 rounding of the samples (6e-8)
# of float64 chunks' offset, and of other chunks' peak (their samples are encoded as pushed): a float64 mean's rounding
# (1e-16, more summed in blocks). 1e-7 of the peak was too loose for float32 chunks: a float32 mean (off by 6e-8 of
# 1.0 + 1e-3 noise) moved their frames by 7e-5, a mean off by 1e-7 those of half silence by 7e-3; 1e-12 of the offset
# those of 1e5 + 1e-2 noise by 6e-4 (8 kHz)
SUM_ROUNDING = 1e-14


class StreamEncoder:
    """`push(chunk)` returns the segments that became final, as (index, utterance, frames) with band 0
    provisional; `finish()` returns utterance, or (utterance, frames) with frames=True, of the whole signal.
    `dtype=torch.bfloat16` runs the matrix products in bf16, as in echo.fast.encode. `max_tokens` bounds the
    tokens of every pass, as in echo.fast.encode. A stream encodes with the model's weights as they were when it
    was made: a later change does not reach it. `mean`, the whole signal's mean where it is known before the
    end (summed in float64), makes band 0 final when emitted and the stream's memory flat; finish() refuses a
    mean that is not the samples'."""

    def __init__(self, model: EchoModel, sample_rate, *, frames: bool = False, dtype: torch.dtype = torch.float32,
                 backend: str | None = None, max_tokens: int | None = None, mean=None):
        from . import fast  # its module imports this one

        backends.check_environment()
        fast.checked_model(model)
        frames = fast.checked_frames(frames)
        # as fast.encode (products in dtype, CPU inference ops), and a copy of the weights as they are now: every
        # segment of a stream is encoded with the same weights, whatever is written to the model meanwhile
        self.model = packed.inference_model(model, dtype, snapshot=True)
        self.dtype = dtype
        self.rate = inputs.check_sample_rate(sample_rate)
        self.frames = frames
        # the ops `backend` reaches; one they cannot run (or whose attention cannot take the model's heads) is
        # said now, not at the first segment's encode, 20 s on
        device, config = self.model.device, self.model.config
        backends.check_argument(("attention", "norm"), device, backend, config.dim // config.heads, dtype)
        self.backend = backend
        if max_tokens is None:
            max_tokens = fast.DEFAULT_MAX_TOKENS.get(self.model.device.type, fast.DEFAULT_MAX_TOKENS_ELSEWHERE)
        self.max_tokens = fast.checked_max_tokens(max_tokens)
        self.n_fft, self.hop = geometry.n_fft(self.rate), geometry.hop(self.rate)
        self.bands = geometry.n_bands(self.rate)
        self.positions = token_ops.band_positions(self.rate)
        # the stream's state is on the CPU in the dtypes given here, whatever torch's default device and dtype
        self.window = torch.hann_window(self.n_fft, periodic=True, dtype=torch.float64, device="cpu")
        self.window_dft = torch.fft.rfft(self.window)[:2]  # W[0], W[1]: the bins a DC change moves
        self.low_bins = min(geometry.BAND_BINS, geometry.n_bins(self.rate))  # band 0's real bins
        self.mean = _checked_mean(mean)
        self.peak = 0.0  # of the samples less the offset, with `mean`: the scale finish() checks it on
        self.samples = 0
        self.total = torch.zeros((), dtype=torch.float64, device="cpu")  # running sum, for the mean
        self.wide = None  # whether the chunks are float64: set by the first
        self.offset = 0.0  # taken off float64 chunks before their float32 rounding: the first chunk's mean
        self.audio = torch.zeros(0, dtype=torch.float32, device="cpu")  # the stream's copy of samples from audio_start
        self.audio_start = 0
        self.chunk = self.audio  # during a push, the chunk's samples (the last ones), read in place
        # per computed frame, for finish() where `mean` is not given: bins 0 and 1 (float64: their correction
        # subtracts nearly equal numbers), the DC estimate they were computed with, and bins 2.. of band 0 as final
        # float32 (a DC change does not move them)
        self.dc_bins = _Rows(2, torch.complex128)
        self.estimates = _Rows(1, torch.float64)
        self.low_rows = _Rows(self.low_bins - 2, torch.float32)
        self.upper = _Window(self.bands * geometry.BAND_BINS, torch.float32)  # per frame, its band-layout rows
        self.done_frames = 0
        self.outputs = []  # per emitted full segment: (nb, L+1, D) outputs, band 0 provisional ((nb, 1, D) CLS
        # rows alone without frames: what finish() reads of them)
        self.unreturned = []  # segments encoded but not yet handed out: a push that failed after them returns none
        self.finished = False

    def __getstate__(self) -> dict:
        """The stream as it stands, for pickle (a service saves its streams and takes them up after a restart).
        Its model's products are packed for oneDNN, which does not pickle them: the model is pickled as the
        config, weights and norms' eps it encodes with, and rebuilt on loading, once for all the streams of one
        model pickled together (`pickle.dump(streams)`), which share it again, as they did."""
        state = dict(vars(self))
        state["model"] = vars(self.model).setdefault(_PICKLED_AS, _PickledModel(self.model, self.dtype))
        return state

    def __setstate__(self, state: dict) -> None:
        """A pickle's state holds the rebuilt model; copy.copy's, the model's stand-in for pickle."""
        model = state["model"]
        vars(self).update(state, model=model.model if isinstance(model, _PickledModel) else model)

    # the stream's buffers are never inference tensors: pushes inside torch.inference_mode() (per thread: a
    # serving handler's) made them so, and a later push outside it may not write into them
    @torch.inference_mode(False)
    @torch.no_grad()  # chunks that require grad must not chain the whole stream into one autograd graph
    def push(self, chunk) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """Adds a 1-D chunk of samples at the stream's rate; returns the segments (2000 frames, ~20 s) it made
        final, in order: (segment index, utterance (nb*D,), frames (rows, nb*D)), float32 on the CPU, frames
        whatever `frames` is. Band 0 is provisional (the signal's mean is not known yet, unless given as `mean`);
        finish() fixes it."""
        if self.finished:
            raise ValueError("push() after finish(): start a new StreamEncoder for a new signal")
        what = f"chunk at sample {self.samples}"  # every refusal names it alike: a numpy uint8 chunk was "chunk"
        chunk = inputs.as_tensor(chunk, what=what)
        if chunk.dim() != 1:  # the advice on channels fits (channels, samples) chunks, not a lone sample
            advice = ("; stream each channel through a StreamEncoder of its own and concatenate their embeddings, as "
                      "model.encode does" if chunk.dim() == 2 else "")
            raise ValueError(f"{what}: push() takes 1-D chunks of samples, got shape {tuple(chunk.shape)}{advice}")
        # an empty chunk is checked as any other, and still computes and returns what a failed push left
        converted = inputs.as_float32(chunk, what=what)
        if chunk.numel():  # float64 chunks lose an offset in float64, as model.encode takes a float64 signal's DC off
            wide = chunk.dtype == torch.float64
            if self.wide is None:  # any offset will do: the front end removes the signal's mean
                self.wide, self.offset = wide, chunk.mean().item() if wide else 0.0
            if wide != self.wide:  # one chunk's offset taken off and another's not: a step in the signal
                raise ValueError(f"{what} is {chunk.dtype}, the stream's earlier chunks "
                                 f"{'float64' if self.wide else 'not float64'}: float64 chunks have the stream's "
                                 f"offset taken off in float64, others cannot; push all as float64 or none")
            if wide and inputs.less_offset(chunk, self.offset, converted) is None:
                raise ValueError(f"{what}: its samples less the stream's offset {self.offset:.3g} (its first "
                                 f"chunk's mean) exceed float32's range (3.4e38)")
        chunk = converted.cpu()  # the stream's state is on the CPU
        # the chunk is read in place: joined whole to the samples kept, it was copied (+110 MB for 10 minutes at 48
        # kHz). Only its head is joined to them, enough for every group of frames that starts before the chunk.
        # Joined and summed before anything changes, so that a failure (out of memory) leaves samples and counts
        # matching: frames not computed yet are computed by the next push or finish()
        kept = torch.cat([self._samples(self.audio_start, self.samples), chunk[: self._span(FRAMES_AT_ONCE)]])
        total = self.total + inputs.float64_sum(chunk)
        if self.mean is not None and chunk.numel():
            self.peak = max(self.peak, *(abs(bound.item()) for bound in torch.aminmax(chunk)))
        self.audio, self.chunk, self.total, self.samples = kept, chunk, total, self.samples + chunk.numel()
        try:
            # a segment at a time, its band rows dropped once emitted: a push of a whole 10-minute file at 48 kHz
            # kept those of all its frames, and widened all its samples to float64 for their sum: a peak of 2.2x
            # that of fast.encode on the file (1.3x now)
            while True:
                segment_end = (len(self.outputs) + 1) * geometry.SEGMENT_FRAMES
                self._compute_frames(segment_end)
                if self.done_frames < segment_end:
                    break
                self.unreturned.append(self._emit_block(len(self.outputs)))
                self._drop_band_rows()
            self._drop_band_rows()
        finally:  # after a failure too: the caller may refill the chunk, which the stream must not read later
            self._drop_computed_audio()
        emitted, self.unreturned = self.unreturned, []
        return emitted

    def _span(self, frames: int) -> int:
        """The samples that `frames` consecutive frames read."""
        return self.n_fft + (frames - 1) * self.hop

    def _samples(self, first: int, end: int) -> torch.Tensor:
        """Samples first:end of the signal: a view where they lie in the stream's copy or in the chunk being pushed,
        else the two joined: only what a failed push left, as a push's head holds every group that starts before it."""
        chunk_start = self.samples - self.chunk.numel()
        if first >= chunk_start:
            return self.chunk[first - chunk_start : end - chunk_start]
        audio_end = self.audio_start + self.audio.numel()
        if end <= audio_end:
            return self.audio[first - self.audio_start : end - self.audio_start]
        beyond_audio = self.chunk[audio_end - chunk_start : end - chunk_start]
        return torch.cat([self.audio[first - self.audio_start :], beyond_audio])

    def _compute_frames(self, end: int | None = None) -> None:
        """Compute the frames that the samples complete, up to frame `end` if given."""
        available = geometry.n_frames(self.samples, self.rate)
        if end is not None:
            available = min(available, end)
        if available <= self.done_frames:
            return
        # rows a failed push appended (out of memory in a later append) would shift every later frame's
        for rows in (self.dc_bins, self.estimates, self.low_rows, self.upper):
            rows.truncate(self.done_frames)
        estimate = self.total / self.samples if self.mean is None else torch.tensor(self.mean - self.offset,
                                                                                     dtype=torch.float64)
        # in groups of frames, as the encoders' front end: one push of a whole 10-minute file at 48 kHz raised
        # the peak RSS by 1.5 GB of float64 and complex128 temporaries (0.37 GB in groups, ECHO-tiny)
        while self.done_frames < available:
            count = min(available - self.done_frames, FRAMES_AT_ONCE)
            first = self.done_frames * self.hop
            span = self._samples(first, first + self._span(count))
            spectrum = torch.fft.rfft((span.double() - estimate).unfold(0, self.n_fft, self.hop) * self.window)
            levels = stft_ops.log_normalise(spectrum.abs()).float()  # (count, bins)
            if self.mean is None:
                self.dc_bins.append(spectrum[:, :2])
                self.estimates.append(estimate.expand(count, 1))
                self.low_rows.append(levels[:, 2 : self.low_bins])
            self.upper.append(stft_ops.band_layout(levels.T, self.rate).T)
            self.done_frames += count

    def _band0(self, mean: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Band-0 rows (32, end - start) of computed frames start:end, DC removed with `mean`. Only those
        frames are read: an emission costs the same however long the stream, and finish() holds one pass's."""
        frames = slice(start, end)
        corrected = self.dc_bins[frames] - (mean - self.estimates[frames]) * self.window_dft
        levels = torch.cat([stft_ops.log_normalise(corrected.abs()).float(), self.low_rows[frames]], dim=1)
        # band 0 of the band layout without the layout of every band: its 32 bins, or at rates with fewer bins
        # (band 0 is then the last band) zero rows before them. A view of the whole layout held it all: finish()
        # kept one per emitted segment (+170 MB for 10 minutes at 48 kHz)
        return torch.nn.functional.pad(levels.T, (0, 0, geometry.BAND_BINS - self.low_bins, 0))

    def _encode(self, bands: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(B, 32, T) band images -> (B, L+1, D) outputs through the packed encoder, in passes of at most
        max_tokens tokens (a segment of a rate of hundreds of kHz has hundreds of bands). On a CPU a pass's rows
        are padded as fast.encode pads them (CPU_ROW_COUNTS), to the row counts it meets: oneDNN keeps a product
        per row count (up to 1024), and streams of any length and rate met new ones at almost every finish(): 800
        streams of 0.3-19 s at four rates grew a process by 610 MB (ECHO-tiny, fp32 and bf16); 330 MB now, and
        fast.encode of the same signals 310 MB."""
        from . import fast  # its module imports this one

        length = geometry.n_patches(bands.shape[2]) + 1
        group = max(1, self.max_tokens // length)
        outputs = []
        with as_asked(self.model.device):
            for first in range(0, bands.shape[0], group):
                tokens = self.model.band_tokens(bands[first : first + group], positions[first : first + group])
                count, _, dim = tokens.shape
                rows = tokens.reshape(-1, dim)
                padding = -rows.shape[0] % fast.pass_row_step(self.max_tokens, rows.shape[0], rows.device)
                rows = torch.nn.functional.pad(rows, (0, 0, 0, padding))  # one-token sequences, never read back
                packing = packed.Packing.from_lengths([length] * count + [1] * padding, tokens.device)
                out = packed.forward(self.model, rows, packing, self.backend)[: count * length]
                outputs.append(out.view(count, length, dim).float().cpu())
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _segment_bands(self, start: int, end: int) -> torch.Tensor:
        """The (bands, 32, end - start) images of frames start:end, band 0 with the signal's mean as now known."""
        image = self.upper.frames(start, end).T.clone(memory_format=torch.contiguous_format)
        if self.mean is None:  # else computed with it
            image[: geometry.BAND_BINS] = self._band0(self.total / self.samples, start, end)
        return image.view(self.bands, geometry.BAND_BINS, end - start)

    def _emit_block(self, k: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        start, end = k * geometry.SEGMENT_FRAMES, (k + 1) * geometry.SEGMENT_FRAMES
        out = self._encode(self._segment_bands(start, end).to(self.model.device), self.positions)
        self.outputs.append(out if self.frames else out[:, :1].clone())
        return k, out[:, 0].reshape(-1), out[:, 1:].transpose(0, 1).flatten(1)

    def _drop_band_rows(self) -> None:
        """Keep only the band rows that the last segment may still need."""
        keep_frame = max(0, self.done_frames - geometry.SEGMENT_FRAMES)
        self.upper.drop_before(min(keep_frame, len(self.outputs) * geometry.SEGMENT_FRAMES))

    def _drop_computed_audio(self) -> None:
        """Keep only the samples of frames not yet computed, as a copy: a view kept all of a push's audio alive
        (115 MB after one push of 10 minutes at 48 kHz, for less than one window's samples)."""
        keep_sample = self.done_frames * self.hop
        audio = self._samples(keep_sample, self.samples).clone()
        self.audio, self.audio_start, self.chunk = audio, keep_sample, audio[:0]

    def _with_band0_redone(self, segments: list[tuple[int, int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The emitted `segments`' outputs, band 0's encoded again with the exact mean, in passes of at most
        max_tokens tokens: one pass over them all once took ~30x the stream's state at its peak (ECHO-small, 1M
        frames: +1.4 GB)."""
        mean, parts = self.total / self.samples, []
        per_pass = max(1, self.max_tokens // (geometry.MAX_PATCHES + 1))
        for first in range(0, len(segments), per_pass):
            batch = segments[first : first + per_pass]
            images = torch.stack([self._band0(mean, start, end) for start, end in batch])
            fixed = self._encode(images.to(self.model.device), self.positions[:1].expand(len(batch)))
            fixed = fixed if self.frames else fixed[:, :1]
            parts += [(fixed[i : i + 1], self.outputs[first + i][1:]) for i in range(len(batch))]
        return parts

    def _check_mean(self) -> None:
        """The `mean` given is the samples': a wrong one made every segment's band 0 wrong, and the stream kept
        nothing to redo them with."""
        given, pushed = self.mean - self.offset, (self.total / self.samples).item()
        rounding = MEAN_TOLERANCE if self.wide else SUM_ROUNDING
        if abs(given - pushed) > rounding * self.peak + SUM_ROUNDING * abs(self.offset):
            raise MeanMismatch(
                f"mean={self.mean!r} was given, but the {self.samples} samples pushed have mean "
                f"{pushed + self.offset!r}: the segments emitted were encoded with the wrong one. Give the mean "
                f"of the samples as pushed, summed in float64 (e.g. signal.mean(dtype=numpy.float64)), or none")

    @torch.inference_mode(False)  # as push(): it computes the frames of a push that failed
    @torch.no_grad()
    def finish(self):
        """Ends the stream: the whole signal's utterance (nb*D,), or (utterance, frames (rows, nb*D)) with
        frames=True, float32 on the CPU, as model.encode of the whole signal gives."""
        if self.finished:
            raise ValueError("finish() was already called")
        if self.samples < self.n_fft:  # the stream stays open: more audio may follow
            raise ValueError(
                f"signal of {self.samples} samples is shorter than one 25 ms window at {self.rate} Hz "
                f"({self.n_fft} samples)"
            )
        self._compute_frames()  # those of a push that failed after keeping its samples: they are the signal's
        if self.mean is not None:
            self._check_mean()
        segments = geometry.segments(self.done_frames)
        emitted = len(self.outputs)
        # per segment: band 0's outputs (1, L+1, D) and the other bands' (nb - 1, L+1, D); given the mean, an
        # emitted segment's are final
        parts = [(out[:1], out[1:]) for out in self.outputs] if self.mean is not None else \
            self._with_band0_redone(segments[:emitted])
        for start, end in segments[emitted:]:
            out = self._encode(self._segment_bands(start, end).to(self.model.device), self.positions)
            parts.append((out[:1], out[1:]))
        utterance = torch.stack([torch.cat([low[:, 0], rest[:, 0]]).reshape(-1) for low, rest in parts]).mean(0)
        self.finished = True  # only now: a finish() that failed (out of memory, say) can be called again
        if not self.frames:
            return utterance
        # each segment's rows written once, in place: joined per segment, transposed, then joined, they raised the
        # peak by 2.5x the frames' size (10 minutes at 48 kHz, ECHO-tiny: +130 MB for 52 MB of frames; +78 MB now)
        frames = torch.empty(sum(low.shape[1] - 1 for low, _ in parts), self.bands, parts[0][0].shape[2],
                             dtype=torch.float32, device="cpu")
        row = 0
        for low, rest in parts:
            count = low.shape[1] - 1
            frames[row : row + count, :1] = low[:, 1:].transpose(0, 1)
            frames[row : row + count, 1:] = rest[:, 1:].transpose(0, 1)
            row += count
        return utterance, frames.flatten(1)


def _checked_mean(mean) -> float | None:
    """`mean` as a float (float64), or None; refused where it is not one finite real number."""
    if isinstance(mean, torch.Tensor) and mean.dim() == 0 and not mean.is_complex():
        mean = mean.item()
    if mean is not None and (isinstance(mean, bool) or not isinstance(mean, numbers.Real) or not math.isfinite(mean)):
        raise ValueError(f"mean must be one finite real number, the whole signal's, or None; got {mean!r}")
    return None if mean is None else float(mean)
