"""echo.fast.encode: many signals of any lengths and sample rates in one call, packed with no padding within
or between sequences (a CPU pass gets one-token filler rows, never read back), the same embeddings as
EchoModel.encode.

plan -> ragged front end (one FFT per distinct rate) -> all patches in one matrix product -> encoder layers
on the packed buffer (attention per sequence) -> CLS and patch rows gathered back per signal.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Set as AbstractSet
from dataclasses import dataclass

import numpy as np
import torch

from . import geometry, inputs
from .checkpoint import WRAPPER_ATTRIBUTES
from .model import EchoModel, as_asked
from .ops import backend as backends
from .ops import stft as stft_ops
from .ops import tokens as token_ops
from . import packed
from .plan import make_plan
from .wording import counted

__all__ = ["encode", "StreamEncoder"]

# Tokens per packed pass. On CPU, 4096 keeps a layer's intermediates near the caches: the elementwise ops
# (GELU, norms, copies) ran ~3x slower per element at 32k tokens, for 10-15% of the whole (bench/RESULTS.md);
# a GPU wants large passes to fill the device.
DEFAULT_MAX_TOKENS = {"cpu": 4096}
DEFAULT_MAX_TOKENS_ELSEWHERE = 65536
# oneDNN builds a product for every row count it meets (~40 ms for a layer's four bf16 products on this CPU) and
# keeps the last 1024: passes of ever new sizes paid that at every pass and grew the process with the cache
# (bench/RESULTS.md). On a CPU a pass's rows are rounded up to a multiple of max(64, budget / 64), the budget
# being max_tokens or, if smaller, the call's own tokens rounded up to a power of two, so a budget meets at most
# ~64 row counts, each built once; the padding rows are one-token sequences of zeros, never read back.
CPU_ROW_COUNTS = 64
# Where frames=False runs the last layer on the CLS rows alone. Not on a GPU so far, where its per-length loop of
# small ops may cost more launches than the work it skips takes there (bench/encode_throughput.py's
# `fast-*-utterances-cls-layer` paths measure it).
CLS_LAYER_DEVICES = ("cpu",)


@dataclass
class _Mono:
    """One channel of one input signal, with its running results."""

    signal: int
    waveform: torch.Tensor
    sample_rate: int
    bands: int
    segment_patches: list[int]
    utterance_sum: torch.Tensor | None = None  # (bands * D,): the segments' CLS rows summed, band by band
    frames: torch.Tensor | None = None  # (patches, bands * D): its columns of its signal's frames (_frame_outputs)
    frames_done: int = 0  # rows of `frames` written so far, finished segments' in time order
    open_frames: torch.Tensor | None = None  # (patches, bands, D) of a segment whose bands are split over passes

    @property
    def tokens(self) -> int:
        return sum(self.bands * (patches + 1) for patches in self.segment_patches)

    @property
    def frame_count(self) -> int:
        return geometry.n_frames(self.waveform.shape[0], self.sample_rate)


def _as_list(signals, sample_rates) -> tuple[list, list[int]]:
    # one signal; an object array (pandas' ragged batches) is never one: it holds the signals
    one = isinstance(signals, torch.Tensor) or (isinstance(signals, np.ndarray) and signals.dtype != object)
    if one:
        signals = [signals]
    if isinstance(signals, AbstractSet):  # results come back in input order: a set has none the caller chose
        raise ValueError("signals must be given in order, not as a set: pass a list")
    # a dict iterates over its keys: {name: signal} was "signal 0: ... got str", {name: rate} "got 'a.wav'"
    if isinstance(signals, Mapping):
        raise ValueError("signals is a dict, which iterates over its keys: pass list(signals.values()), whose order "
                         "the results come back in")
    if isinstance(sample_rates, Mapping):
        raise ValueError("sample rates are a dict, which iterates over its keys: pass one rate per signal, in the "
                         "signals' order (a list)")
    try:
        signals = list(signals)
    except TypeError:
        raise ValueError(f"signals must be a signal or a list of signals, got {type(signals).__name__}") from None
    # one rate per signal from any iterable, as signals come (a generator, a dict's values); a string, a number
    # or a 0-d tensor or array is one rate for all
    per_signal = isinstance(sample_rates, Iterable) and not isinstance(sample_rates, (str, bytes)) and \
        getattr(sample_rates, "ndim", None) != 0
    if per_signal:
        if isinstance(sample_rates, AbstractSet):
            raise ValueError("sample rates must be given in the signals' order, not as a set: pass a list")
        sample_rates = list(sample_rates)
        if len(sample_rates) != len(signals):
            # a (B, N) batch is one signal of B channels (documented), and was left to the caller to work out
            batch = one and signals[0].ndim == 2 and signals[0].shape[0] == len(sample_rates)
            hint = (f"; a {tuple(signals[0].shape)} array is one signal of {signals[0].shape[0]} channels: pass "
                    f"list(batch) for {len(sample_rates)} signals") if batch else ""
            raise ValueError(f"got {counted(len(signals), 'signal')} but "
                             f"{counted(len(sample_rates), 'sample rate')}{hint}")
    else:
        sample_rates = [sample_rates] * len(signals)
    rates = [inputs.check_sample_rate(sr, f"signal {i}: ") for i, sr in enumerate(sample_rates)]
    return signals, rates


def _monos(signals, rates) -> list[_Mono]:
    monos = []
    for i, (signal, sr) in enumerate(zip(signals, rates)):
        waveform = inputs.as_signal(signal, sr, f"signal {i}: ")
        for channel in waveform if waveform.dim() == 2 else waveform[None]:
            frames = geometry.n_frames(channel.shape[0], sr)
            patches = [geometry.n_patches(e - s) for s, e in geometry.segments(frames)]
            monos.append(_Mono(i, channel, sr, geometry.n_bands(sr), patches))
    return monos


Piece = tuple[int, int, int]  # (segment index, first band, end band) of a mono


@dataclass
class _Span:
    """The frames [first, end) of a mono that one pass reads: the whole mono when it fits a pass, else the
    pass's whole segments, or one segment whose bands are split over passes. A pass's front end computes its
    spans' frames only, so a long signal is never one band-layout image (1.25-1.4x its size) at once."""

    mono: int
    first: int
    end: int
    pieces: list[tuple[int, int, int, int]]  # (first frame, end frame, first band, end band) within the span

    @property
    def key(self) -> tuple[int, int, int]:
        return self.mono, self.first, self.end

    def waveform(self, mono: _Mono) -> torch.Tensor:
        """Its samples, a view: the whole waveform for the whole mono (the samples after its last frame count in
        its mean), else those its frames read."""
        if self.first == 0 and self.end == mono.frame_count:
            return mono.waveform
        hop = geometry.hop(mono.sample_rate)
        return mono.waveform[self.first * hop : (self.end - 1) * hop + geometry.n_fft(mono.sample_rate)]


def _spans(chunk: list[tuple[int, list[Piece]]], monos: list[_Mono]) -> list[_Span]:
    """A chunk's members as spans: a mono's consecutive whole segments make one span, a piece of a segment's
    bands the segment's own (the same span in every pass of that segment, computed once: see _FrontEnd)."""
    spans: list[_Span] = []
    for m, pieces in chunk:
        mono = monos[m]
        ranges = geometry.segments(mono.frame_count)
        joinable = False  # the last span is this mono's, of whole segments
        for k, first_band, end_band in pieces:
            start, end = ranges[k]
            whole = first_band == 0 and end_band == mono.bands
            if not (whole and joinable):
                spans.append(_Span(m, start, end, []))
            span = spans[-1]
            span.end = end
            span.pieces.append((start - span.first, end - span.first, first_band, end_band))
            joinable = whole
    return spans


def _chunks(monos: list[_Mono], max_tokens: int) -> list[list[tuple[int, list[Piece]]]]:
    """Consecutive (mono, pieces) groups of at most max_tokens tokens. A mono is split across chunks only when
    it alone exceeds the budget, by segment; a segment over the budget (a rate of hundreds of kHz has hundreds of
    bands) by band. One band sequence over the budget still runs, alone."""
    chunks, current, used = [], [], 0

    def add(m: int, pieces: list[Piece], tokens: int) -> None:
        nonlocal current, used
        if used + tokens > max_tokens and current:
            chunks.append(current)
            current, used = [], 0
        if current and current[-1][0] == m:
            current[-1][1].extend(pieces)
        else:
            current.append((m, list(pieces)))
        used += tokens

    for m, mono in enumerate(monos):
        if mono.tokens <= max_tokens:
            add(m, [(k, 0, mono.bands) for k in range(len(mono.segment_patches))], mono.tokens)
            continue
        for k, patches in enumerate(mono.segment_patches):
            per_band = patches + 1
            group = max(1, min(mono.bands, max_tokens // per_band))
            for first in range(0, mono.bands, group):
                end = min(first + group, mono.bands)
                add(m, [(k, first, end)], (end - first) * per_band)
    if current:
        chunks.append(current)
    return chunks


def checked_model(model) -> None:
    """What encodes is an EchoModel with weights, whose layers the packed path can run: a path, None or a model on
    the meta device failed in torch's attribute lookups or kernels, naming neither the model nor what to pass."""
    if not isinstance(model, EchoModel):
        # torch.compile's and DataParallel's wrappers hold it; the packed path runs its own ops, which they never reach
        wrapped = next((name for name in WRAPPER_ATTRIBUTES if isinstance(getattr(model, name, None), EchoModel)), None)
        if wrapped:
            raise TypeError(f"model must be an echo.EchoModel, got the {type(model).__name__} wrapping one: pass "
                            f"the model itself, its .{wrapped} (this encoder runs its own ops, not the wrapper's)")
        raise TypeError(f"model must be an echo.EchoModel (echo.load makes one from a file or a name), got "
                        f"{type(model).__name__} {model!r:.60}")
    if model.device.type == "meta":
        raise ValueError("the model is on the meta device: it has shapes but no weights; load its weights on a "
                         "device that computes (cpu, cuda, ...)")
    packed.check_layers_run_as_built(model)


def checked_encoder(model, device, dtype) -> torch.device:
    """The model's device, once the model, `device` (None, or the model's) and `dtype` are ones `encode` takes:
    a caller that reads files before encoding names a wrong argument before that work."""
    checked_model(model)
    if device is not None and not _same_device(inputs.checked_device(device), model.device):
        raise ValueError(f"model is on {model.device} but device={device} was asked; move the model first")
    packed.check_dtype(dtype)
    return model.device


@torch.no_grad()
def encode(
    model: EchoModel,
    signals,
    sample_rates,
    *,
    frames: bool = False,
    dtype: torch.dtype = torch.float32,
    device=None,
    max_tokens: int | None = None,
    backend: str | None = None,
    progress=None,
) -> list:
    """Embeddings of every signal, in input order: one utterance tensor each, or (utterance, frames) tuples
    with frames=True; float32 on the CPU, equal to model.encode of each signal. Utterances alone cost less on a
    CPU: the last layer then runs on the CLS rows only.

    `signals`: a list of (N,) or (C, N) tensors/arrays (or one signal); `sample_rates`: an int or one per signal.
    `dtype=torch.bfloat16` (or float16) runs the encoder's matrix products in that dtype; on a CPU the encoder
    runs on a cached copy of the model with its weights packed for oneDNN (packed.inference_model), rebuilt
    when the model changed in any way (each call compares its weights in full). Any floating model works in any
    of these dtypes: the encoder's residual stream is float32. `device`: None or the model's own (a check: the
    encoder runs where the model is; move the model to run elsewhere). `max_tokens` bounds the packed tokens
    per pass (default 4096 on CPU, 65536 on GPUs): any number of signals streams through in flat memory.
    `backend` forces every op's backend ("torch", "reference", "triton"); by default each op picks the fastest
    for the device. A process that encodes repeatedly on a CPU under glibc gains from
    echo.host_memory.keep_freed_memory() (a process-wide malloc setting, so it is the caller's choice).
    `progress(done, passes)` is called after each pass: one call over an hour-long recording runs for minutes.
    """
    backends.check_environment()  # a misspelt ECHO_BACKEND_<OP> would be ignored by the op it meant
    if progress is not None and not callable(progress):  # it failed once the first pass was encoded
        raise TypeError(f"progress must be a function (done, passes) or None, got {type(progress).__name__}")
    frames = checked_frames(frames)
    device = checked_encoder(model, device, dtype)
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS.get(device.type, DEFAULT_MAX_TOKENS_ELSEWHERE)
    max_tokens = checked_max_tokens(max_tokens)
    model = packed.inference_model(model, dtype)
    backends.check_argument(backends.OPS, device, backend, model.config.dim // model.config.heads, dtype)
    signal_list, rates = _as_list(signals, sample_rates)
    monos = _monos(signal_list, rates)
    # passes never exceed the call's own tokens: a budget far above them (max_tokens=10**9 for one pass) would
    # otherwise pad a pass to a multiple of max_tokens / 64 rows. The call's tokens are rounded up to a power of
    # two, so calls of any size still meet few row counts.
    call_tokens = sum(mono.tokens for mono in monos)
    row_step = pass_row_step(max_tokens, call_tokens, device)
    passes = [_spans(chunk, monos) for chunk in _chunks(monos, max_tokens)]
    front_end = _FrontEnd(monos, passes, device, backend)
    frame_outputs = _frame_outputs(monos, len(signal_list), model.config.dim) if frames else None
    with as_asked(device):
        for number, spans in enumerate(passes):
            plan = make_plan(
                [span.waveform(monos[span.mono]).shape[0] for span in spans],
                [monos[span.mono].sample_rate for span in spans],
                [span.pieces for span in spans],
            )
            # no name holds a pass's spectrogram: the next pass's is made after this one's is freed
            _encode_chunk(model, plan, front_end.spectrogram(number, spans, plan), [monos[s.mono] for s in spans],
                          frames, device, backend, row_step)
            if progress is not None:
                progress(number + 1, len(passes))
    return _gather(monos, len(signal_list), frame_outputs)


class _FrontEnd:
    """The band-layout spectrograms of a call's passes, each span's computed once: a segment whose bands are
    split over passes (rates of hundreds of kHz) keeps its own until its last pass. A span of a longer signal
    loses that signal's mean, as the front end of the whole would. (Recomputed in each pass, a segment of a
    1 MHz signal would go through the front end once for each of its ~12 passes. Before spans, every pass read
    the whole signal's image, which raised the peak of one 10-minute signal by 1.25-1.4x its size:
    bench/RESULTS.md, "Twenty-third session".)"""

    def __init__(self, monos: list[_Mono], passes: list[list[_Span]], device, backend):
        self.monos, self.device, self.backend = monos, device, backend
        passes_of: dict[tuple[int, int, int], list[int]] = {}
        for number, spans in enumerate(passes):
            for span in spans:
                passes_of.setdefault(span.key, []).append(number)
        self.last_pass = {key: numbers[-1] for key, numbers in passes_of.items() if len(numbers) > 1}
        self.kept: dict[tuple[int, int, int], torch.Tensor] = {}
        self.means: dict[int, float] = {}  # of the monos whose spans were computed

    def spectrogram(self, number: int, spans: list[_Span], plan) -> torch.Tensor:
        """The pass's spectrogram buffer, laid out as `plan` (its spans' in order)."""
        fresh = [span for span in spans if span.key not in self.kept]
        spec = self._computed(fresh, plan if len(fresh) == len(spans) else None)
        if len(fresh) < len(spans) or any(span.key in self.last_pass for span in fresh):
            size_of = dict(zip([span.key for span in spans], plan.spec_offsets.diff().tolist()))
            pieces = dict(zip([span.key for span in fresh], spec.split([size_of[span.key] for span in fresh])))
            self.kept.update({key: piece for key, piece in pieces.items() if key in self.last_pass})
            if len(fresh) < len(spans):
                spec = _joined([pieces[span.key] if span.key in pieces else self.kept[span.key] for span in spans])
        for span in spans:
            if self.last_pass.get(span.key) == number:
                del self.kept[span.key]
        return spec

    def _computed(self, fresh: list[_Span], plan) -> torch.Tensor:
        """The spectrograms of `fresh` spans back to back, in one front-end call (plan: theirs, when at hand)."""
        if not fresh:
            return torch.empty(0, device=self.device)
        monos = [self.monos[span.mono] for span in fresh]
        waveforms = [span.waveform(mono) for span, mono in zip(fresh, monos)]
        if plan is None:
            plan = make_plan([w.shape[0] for w in waveforms], [mono.sample_rate for mono in monos])
        wave_offsets = torch.tensor([0] + [w.shape[0] for w in waveforms], device="cpu").cumsum(0)
        means = None
        if any(waveform is not mono.waveform for waveform, mono in zip(waveforms, monos)):
            means = torch.tensor([self._mean(span.mono) for span in fresh], dtype=torch.float64, device="cpu")
        return stft_ops.ragged_spectrogram(_on_device(waveforms, self.device), wave_offsets, plan, self.backend,
                                           means)

    def _mean(self, m: int) -> float:
        if m not in self.means:
            self.means[m] = float(stft_ops.signal_mean(self.monos[m].waveform))
        return self.means[m]


def checked_max_tokens(max_tokens) -> int:
    """A positive whole number of tokens: 0.5 or inf is refused, not truncated or overflowed."""
    tokens = inputs.whole_number(max_tokens)
    if tokens is None or tokens <= 0:
        raise ValueError(f"max_tokens must be a positive whole number of tokens, got {max_tokens!r}")
    return tokens


def checked_frames(frames) -> bool:
    """`frames` as a bool: any other value was read by its truth, "no" as yes."""
    if not isinstance(frames, (bool, np.bool_)):
        raise TypeError(f"frames must be True or False, got {frames!r}")
    return bool(frames)


def _same_device(asked: torch.device, model_device: torch.device) -> bool:
    """"cuda" is the current CUDA device and "cpu:0" the CPU: other spellings of the model's device."""
    if asked.type != model_device.type:
        return False
    if asked.type == "cuda" and asked.index is None:
        asked = torch.device("cuda", torch.cuda.current_device())
    return asked.type == model_device.type and (asked.type == "cpu" or asked.index == model_device.index)


def _on_device(waveforms: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The waveforms back to back on `device`, each copied straight into its place: no wait for the device per
    signal (W2's 128 copies each waited), and no join on the host first (for W3 one more copy of 46 MB there).
    non_blocking is safe from pageable host memory: CUDA stages the samples before the call returns. A lone
    waveform already on `device` is not copied: the front end only reads it, and a long signal's copy was as
    large as the signal."""
    if len(waveforms) == 1 and waveforms[0].device == device:
        return waveforms[0]
    out = torch.empty(sum(waveform.shape[0] for waveform in waveforms), dtype=waveforms[0].dtype, device=device)
    start = 0
    for waveform in waveforms:
        out[start : start + waveform.shape[0]].copy_(waveform, non_blocking=True)
        start += waveform.shape[0]
    return out


def pass_row_step(max_tokens: int, tokens: int, device: torch.device) -> int:
    """A pass's rows are padded to a multiple of this (see CPU_ROW_COUNTS), for passes of at most `max_tokens`
    out of `tokens` in all (a call's, or a stream's pass's)."""
    budget = min(max_tokens, 1 << max(tokens - 1, 1).bit_length())
    return max(CPU_ROW_COUNTS, -(-budget // CPU_ROW_COUNTS)) if device.type == "cpu" else 1


def _encode_chunk(model, plan, spec, members: list[_Mono], frames: bool, device, backend, row_step: int) -> None:
    """Encode one packed chunk, its rows padded to a multiple of `row_step`, and add its segments' outputs
    to their monos."""
    proj = model.patch_embed.proj
    tokens = token_ops.pack_tokens(spec, plan, proj.weight, proj.bias, model.cls_token, model.pos_embed, backend)
    padding = -tokens.shape[0] % row_step
    if padding:
        tokens = torch.cat([tokens, tokens.new_zeros(padding, tokens.shape[1])])
    packing = plan.packing(device, padding)
    if not frames:
        if device.type in CLS_LAYER_DEVICES:
            # Only the CLS rows are read: the last layer runs on them alone (packed.cls_layer_forward), 6% fewer
            # FLOPs.
            out = packed.forward(model, tokens, packing, backend, cls_only=True, row_step=row_step)
            out = out[: plan.num_sequences]
        else:
            # The CLS rows are picked where they were computed: 1/(L+1) of the output crosses to the host.
            out = packed.forward(model, tokens, packing, backend)[packing.cu_seqlens[: plan.num_sequences].long()]
        out = out.float().cpu()
        for index, first, bands, _, first_band in plan.segments:
            _add_utterance(members[index], out[first : first + bands], first_band)
        return
    # Rows are picked in output order where they were computed (plan.output_rows): a member's frames come out in
    # one copy of their own, not a copy per segment and another to join them.
    out = packed.forward(model, tokens, packing, backend)
    rows = plan.output_rows().to(device)
    cls = out.index_select(0, rows[: plan.num_sequences]).float().cpu()
    patch_rows = rows[plan.num_sequences :]
    runs: list[list[int]] = []  # [member, first patch row, end]: a member's consecutive whole segments
    end = 0
    for index, first, bands, patches, first_band in plan.segments:
        mono = members[index]
        _add_utterance(mono, cls[first : first + bands], first_band)
        start, end = end, end + patches * bands
        if bands < mono.bands:  # a piece of a segment's bands: its columns of the segment's frames
            block = out.index_select(0, patch_rows[start:end]).float().cpu().view(patches, bands, -1)
            if first_band == 0:
                mono.open_frames = block.new_empty(patches, mono.bands, block.shape[2])
            mono.open_frames[:, first_band : first_band + bands] = block
            if first_band + bands == mono.bands:
                _put_frames(mono, mono.open_frames.view(patches, -1))
                mono.open_frames = None
        elif runs and runs[-1][0] == index and runs[-1][2] == start:
            runs[-1][2] = end
        else:
            runs.append([index, start, end])
    for index, start, end in runs:
        mono = members[index]
        block = out.index_select(0, patch_rows[start:end]).float().cpu()
        _put_frames(mono, block.view(-1, mono.bands * out.shape[1]))


def _add_utterance(mono: _Mono, cls: torch.Tensor, first_band: int) -> None:
    """Add a segment's (or a piece's) CLS rows (bands, D) to the mono's sum at their bands' place."""
    if mono.utterance_sum is None:
        mono.utterance_sum = cls.new_zeros(mono.bands * cls.shape[1])
    mono.utterance_sum[first_band * cls.shape[1] : (first_band + cls.shape[0]) * cls.shape[1]] += cls.reshape(-1)


def _frame_outputs(monos: list[_Mono], count: int, dim: int) -> list[torch.Tensor]:
    """Each input signal's frames (patches, channels * bands * D), float32 on the host, made before the passes:
    each mono's `frames` is its columns, which its passes fill row by row. (Gathered in pieces a pass each and
    joined at the end, a signal's frames were held twice at the peak, three times with several channels: each
    channel's join, then theirs: 30 minutes of 48 kHz stereo, ECHO-tiny, +1027 MB at the peak for 313 MB of frames.)"""
    rows, widths = [0] * count, [0] * count
    for mono in monos:  # a signal's channels have its length, so its patches
        rows[mono.signal], widths[mono.signal] = sum(mono.segment_patches), widths[mono.signal] + mono.bands * dim
    outputs = [torch.empty(r, w, dtype=torch.float32, device="cpu") for r, w in zip(rows, widths)]
    column = [0] * count
    for mono in monos:  # channels side by side, in order, as EchoModel.encode concatenates them
        width = mono.bands * dim
        mono.frames = outputs[mono.signal][:, column[mono.signal] : column[mono.signal] + width]
        column[mono.signal] += width
    return outputs


def _put_frames(mono: _Mono, rows: torch.Tensor) -> None:
    """Write a mono's next finished frames (its whole segments in time order) into their place."""
    mono.frames[mono.frames_done : mono.frames_done + rows.shape[0]] = rows
    mono.frames_done += rows.shape[0]


def _gather(monos: list[_Mono], count: int, frame_outputs: list[torch.Tensor] | None) -> list:
    """Per input signal: segments averaged, channels concatenated (as EchoModel.encode)."""
    utterances: list[list[torch.Tensor]] = [[] for _ in range(count)]
    for mono in monos:
        utterances[mono.signal].append(mono.utterance_sum / len(mono.segment_patches))
    results = [torch.cat(u) for u in utterances]
    if frame_outputs is not None:
        return list(zip(results, frame_outputs))
    return results


def _joined(pieces: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat, which copies even one piece: a pass's spectrogram is most of its memory."""
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


from .streaming import StreamEncoder  # noqa: E402  (re-exported: echo.fast.StreamEncoder)
