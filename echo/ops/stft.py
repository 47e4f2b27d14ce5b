"""Front end: DC removal, STFT magnitude, log + normalise (spec section 1)."""
from __future__ import annotations

import functools

import torch

from .. import geometry, inputs


def remove_dc(waveform: torch.Tensor, mean: float | None = None) -> torch.Tensor:
    """Subtract the mean of the whole signal (one scalar per signal, last axis): its own, or `mean` when the
    waveform is a span of frames of a longer signal, whose mean is the spec's DC."""
    return waveform - (waveform.mean(dim=-1, keepdim=True) if mean is None else mean)


def complex_stft(waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """Complex STFT of (..., N) -> (..., F, T): 25 ms periodic Hann window, 10 ms hop, no centring, one-sided."""
    window_length = geometry.n_fft(sample_rate)
    if waveform.shape[-1] < window_length:  # no frame: the spec wants an error a user can read, not torch's
        raise ValueError(f"signal of {waveform.shape[-1]} samples is shorter than one 25 ms window at {sample_rate} "
                         f"Hz ({window_length} samples)")
    window = torch.hann_window(window_length, periodic=True, dtype=waveform.dtype, device=waveform.device)
    spectrum = torch.stft(
        waveform.reshape(-1, waveform.shape[-1]),
        n_fft=window_length,
        hop_length=geometry.hop(sample_rate),
        win_length=window_length,
        window=window,
        center=False,
        normalized=False,
        onesided=True,
        return_complex=True,
    )
    return spectrum.reshape(*waveform.shape[:-1], *spectrum.shape[-2:])


def stft_magnitude(waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """|STFT| of (..., N) -> (..., F, T)."""
    return complex_stft(waveform, sample_rate).abs()


def log_normalise(magnitude: torch.Tensor) -> torch.Tensor:
    """s = (ln(|X| + 1e-9) + 5.874158) / 10.446348."""
    return (torch.log(magnitude + geometry.LOG_EPS) + geometry.LOG_MEAN) / geometry.LOG_STD


def spectrogram(waveform: torch.Tensor, sample_rate: int, mean: float | None = None) -> torch.Tensor:
    """The whole front end: (..., N) float32 -> normalised log magnitude (..., F, T), frequency first
    (`mean`: see remove_dc).

    Computed in float64, returned in the input's dtype. The log of a near-zero bin (the Nyquist bin of a
    noisy signal, say) turns float32 FFT rounding into errors of ~1e-3 at that bin; the released float32 code
    carries that noise, the reference does not (it agrees with the released front end to float32 rounding
    everywhere else)."""
    return log_normalise(stft_magnitude(remove_dc(waveform.double(), mean), sample_rate)).to(waveform.dtype)


def spectrogram_bins(waveform: torch.Tensor, sample_rate: int, bins: torch.Tensor) -> torch.Tensor:
    """`spectrogram(waveform, sample_rate)[..., bins, :]`, the same numbers, with |X| and the log taken at those
    bins only: a pretraining clip uses 2-5 of its bands, and |X| and the log of every bin took ~40% of a data
    worker's time (bench/RESULTS.md, "The pretraining loader")."""
    spectrum = complex_stft(remove_dc(waveform.double()), sample_rate)[..., bins, :]
    return log_normalise(spectrum.abs()).to(waveform.dtype)


def band_layout(spec: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """(..., F, T) -> (..., nb*32, T): the band split of every band stacked, zero rows inserted before the
    last band's real bins. This is the layout the token stage reads."""
    bins = spec.shape[-2]
    bands = geometry.n_bands(sample_rate)
    last_start = (bands - 1) * geometry.BAND_BINS
    pad = bands * geometry.BAND_BINS - bins
    zeros = spec.new_zeros(*spec.shape[:-2], pad, spec.shape[-1])
    return torch.cat([spec[..., :last_start, :], zeros, spec[..., last_start:, :]], dim=-2)


def ragged_spectrogram_reference(waves: torch.Tensor, wave_offsets: torch.Tensor, plan,
                                 means: torch.Tensor | None = None) -> torch.Tensor:
    """All signals of a plan, back to back in `waves` (signal i = waves[wave_offsets[i]:wave_offsets[i+1]]),
    -> one flat buffer holding each signal's band-layout spectrogram (nb*32, T) at plan.spec_offsets[i].

    `means` (float64, one per signal, on the CPU), when given, is the DC each signal loses instead of its own
    mean: a signal that is a span of frames of a longer one (fast.encode's passes over a long signal) loses
    that signal's mean, as the spec's front end of the whole would."""
    bounds = wave_offsets.tolist()
    dc = [None] * len(plan.sample_rates) if means is None else means.tolist()
    pieces = [
        band_layout(spectrogram(waves[bounds[i] : bounds[i + 1]], sr, dc[i]), sr).reshape(-1)
        for i, sr in enumerate(plan.sample_rates)
    ]
    return torch.cat(pieces) if pieces else waves.new_empty(0)


# On a CPU one FFT over every frame of a rate runs out of cache: on the encode benchmark's workloads it was
# 1.4-3.3x slower than the per-signal reference (bench/RESULTS.md, "The front end's torch path"). Groups of frames
# of at most this many window samples (1024 frames at 16 kHz) keep the FFT, |X| and log in cache, and bound the
# float64 temporaries of a long signal: whole, 10 minutes at 48 kHz took 1.9 GB, and 1024 frames at 1 MHz 0.8 GB.
# A GPU takes each rate in one group (ragged_spectrogram_by_rate; None sends a CPU there too, the tests' way to
# run it).
CPU_GROUP_SAMPLES: int | None = 1024 * 400


def frame_groups(members: list[int], frames: list[int], budget: int) -> list[list[tuple[int, int, int]]]:
    """The frames of `members` (signal indices), in order, in groups of at most `budget`: (signal, first frame,
    frames) spans, whole signals where they fit, a longer signal cut into spans of `budget` frames."""
    groups, group, used = [], [], 0
    for i in members:
        for first in range(0, frames[i], budget):
            count = min(budget, frames[i] - first)
            if group and used + count > budget:
                groups.append(group)
                group, used = [], 0
            group.append((i, first, count))
            used += count
    return groups + [group]


def signal_mean(samples: torch.Tensor) -> torch.Tensor:
    """The mean of 1-D samples, summed in float64 as the reference's, without a float64 copy of a long signal."""
    return inputs.float64_sum(samples) / samples.shape[0]


def ragged_spectrogram_torch(waves: torch.Tensor, wave_offsets: torch.Tensor, plan,
                             means: torch.Tensor | None = None) -> torch.Tensor:
    """Same result, one windowed real FFT per distinct sample rate over the frames of all its signals (on a CPU
    per group of CPU_GROUP_SAMPLES samples of frames), in float64 like the reference."""
    if waves.device.type != "cpu" or CPU_GROUP_SAMPLES is None:
        return ragged_spectrogram_by_rate(waves, wave_offsets, plan, means)
    out = waves.new_empty(int(plan.spec_offsets[-1]))
    bounds = wave_offsets.tolist()
    spec_bounds = plan.spec_offsets.tolist()
    for sr, members in _by_rate(plan).items():
        window_length, step = geometry.n_fft(sr), geometry.hop(sr)
        window = torch.hann_window(window_length, periodic=True, dtype=torch.float64, device=waves.device)
        dc = {i: signal_mean(waves[bounds[i] : bounds[i + 1]]) if means is None else means[i] for i in members}
        for group in frame_groups(members, plan.frames, max(1, CPU_GROUP_SAMPLES // window_length)):
            framed = torch.cat([
                (waves[bounds[i] + first * step : bounds[i] + (first + count - 1) * step + window_length].double()
                 - dc[i]).unfold(0, window_length, step)
                for i, first, count in group
            ])
            spec = log_normalise(torch.fft.rfft(framed * window).abs())  # (frames of the group, F)
            row = 0
            for i, first, count in group:
                image = out[spec_bounds[i] : spec_bounds[i + 1]].view(-1, plan.frames[i])
                image[:, first : first + count] = band_layout(spec[row : row + count].T, sr)
                row += count
    return out


def ragged_spectrogram_by_rate(waves: torch.Tensor, wave_offsets: torch.Tensor, plan,
                               means: torch.Tensor | None = None) -> torch.Tensor:
    """The same for a GPU: every rate in one group, each signal's mean taken off its frames, the rate's band
    layout made at once and copied into each signal's place. Three launches per signal (its mean, its frames,
    its layout) where the CPU's loop takes ~7, which made W2's 128 signals 2.5x slower on an H200
    (bench/RESULTS.md). A running sum over all signals would spare the means' launches but carries a loud
    signal's magnitude into a quiet one's mean. On a CPU this order is slower: its passes run out of cache."""
    starts = wave_offsets.tolist()
    samples = waves.double()
    if means is None:
        means = torch.stack([samples[starts[i] : starts[i + 1]].mean() for i in range(len(starts) - 1)])
    else:
        means = means.to(waves.device, non_blocking=True)
    spec_bounds = plan.spec_offsets.tolist()
    out = waves.new_empty(spec_bounds[-1])
    for sr, members in _by_rate(plan).items():
        window_length, step = geometry.n_fft(sr), geometry.hop(sr)
        window = torch.hann_window(window_length, periodic=True, dtype=torch.float64, device=waves.device)
        framed = torch.cat([samples[starts[i] : starts[i + 1]].unfold(0, window_length, step) for i in members])
        signals, counts = torch.tensor([members, [plan.frames[i] for i in members]], device=waves.device)
        frame_means = torch.repeat_interleave(means[signals], counts, output_size=framed.shape[0])
        spectrum = torch.fft.rfft((framed - frame_means[:, None]) * window)  # (frames, F)
        layout = band_layout(log_normalise(spectrum.abs()).T, sr)  # (rows, frames)
        column = 0
        for i in members:
            frames = plan.frames[i]
            out[spec_bounds[i] : spec_bounds[i + 1]].view(-1, frames).copy_(layout[:, column : column + frames])
            column += frames
    return out


def _by_rate(plan) -> dict[int, list[int]]:
    by_rate: dict[int, list[int]] = {}
    for i, sr in enumerate(plan.sample_rates):
        by_rate.setdefault(sr, []).append(i)
    return by_rate


def ragged_spectrogram_csrc(waves: torch.Tensor, wave_offsets: torch.Tensor, plan,
                            means: torch.Tensor | None = None) -> torch.Tensor:
    """Same result from the compiled op (csrc/frontend.cpp, csrc/cuda/frontend.cu), geometry from the plan.
    Inputs are checked here: the op's own checks are a last guard, not an error message."""
    if waves.dtype != torch.float32:
        raise ValueError(f"compiled front end: waves must be float32, got {waves.dtype}")
    wave_offsets = checked_offsets(waves, wave_offsets, plan, "compiled front end")
    signal_geometry = torch.tensor(
        [[geometry.n_fft(sr), geometry.hop(sr), t, nb] for sr, t, nb in zip(plan.sample_rates, plan.frames, plan.bands)],
        dtype=torch.int64, device="cpu",
    ).reshape(-1, 4)
    dc = () if means is None else (means,)  # a build from older sources takes no means: not passed when None
    return torch.ops.echo.ragged_spectrogram(
        waves.contiguous(), wave_offsets, plan.spec_offsets, signal_geometry,
        geometry.LOG_EPS, geometry.LOG_MEAN, geometry.LOG_STD, *dc,
    )


def checked_offsets(waves: torch.Tensor, wave_offsets: torch.Tensor, plan, front_end: str) -> torch.Tensor:
    """wave_offsets (int64, on the CPU), refused unless 1-D `waves` holds the plan's signals at them: a backend
    would fail deep inside, or (the reference) return fewer frames than the plan holds."""
    wave_offsets = wave_offsets.to("cpu", torch.int64).contiguous()
    lengths = wave_offsets.diff().tolist()
    if waves.dim() != 1 or waves.numel() < int(wave_offsets[-1]) or lengths != plan.lengths:
        raise ValueError(
            f"{front_end}: waves must be 1-D, holding the plan's signals back to back; got {waves.dtype} "
            f"{tuple(waves.shape)}, offsets to {int(wave_offsets[-1])} samples, signal lengths {lengths[:8]} where "
            f"the plan has {plan.lengths[:8]}"
        )
    return wave_offsets


def available_backends(device: torch.device) -> tuple[str, ...]:
    """The front end's backends on this device, fastest first: the compiled op, when built for this device,
    beats the torch path on CPU and both torch and Triton on CUDA (bench/RESULTS.md, "Compiled front end")."""
    from .. import extension

    fallbacks = ("triton", "torch", "reference")
    return ("csrc", *fallbacks) if extension.has_op("ragged_spectrogram", device) else fallbacks


def ragged_spectrogram(waves: torch.Tensor, wave_offsets: torch.Tensor, plan, backend: str | None = None,
                       means: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatch of the ragged front end (see ragged_spectrogram_reference for the contract)."""
    from . import backend as backends

    means = checked_means(means, plan)
    available = available_backends(waves.device)
    if means is not None and "csrc" in available and not _compiled_op_takes_means():
        requested, source = backends.request("stft", backend)
        if requested == "csrc":
            from .. import extension

            raise backends.BackendError(f"{source}: this build of the compiled stft takes no means; rebuild it: "
                                        f"{extension.REBUILD}")
        available = tuple(name for name in available if name != "csrc")
    if waves.dtype != torch.float32 and "csrc" in available:  # the compiled op reads float32 samples only
        requested, source = backends.request("stft", backend)
        if requested == "csrc":  # not "no csrc backend here", which would send a user to rebuild a working one
            raise backends.BackendError(f"{source}: the compiled stft reads float32 samples, got {waves.dtype}")
        available = tuple(name for name in available if name != "csrc")  # the other paths keep the dtype
    chosen = backends.choose("stft", waves.device, backend, available=available)
    if chosen == "csrc":
        return ragged_spectrogram_csrc(waves, wave_offsets, plan, means)
    wave_offsets = checked_offsets(waves, wave_offsets, plan, f"the {chosen} front end")
    if chosen == "triton":
        from echo_kernels import stft as kernel

        return kernel.ragged_spectrogram(
            waves,
            wave_offsets,
            [geometry.n_fft(sr) for sr in plan.sample_rates],
            [geometry.hop(sr) for sr in plan.sample_rates],
            plan.frames,
            plan.bands,
            plan.spec_offsets,
            log_eps=geometry.LOG_EPS,
            log_mean=geometry.LOG_MEAN,
            log_std=geometry.LOG_STD,
            band=geometry.BAND_BINS,
            means=means,
        )
    if chosen == "reference":
        return ragged_spectrogram_reference(waves, wave_offsets, plan, means)
    return ragged_spectrogram_torch(waves, wave_offsets, plan, means)


def checked_means(means, plan) -> torch.Tensor | None:
    """Given DCs as a contiguous CPU float64 tensor of one finite value per signal, or refused by name."""
    if means is None:
        return None
    means = torch.as_tensor(means, dtype=torch.float64, device="cpu").contiguous()
    if means.shape != (len(plan.lengths),):
        raise ValueError(f"means must hold one DC per signal of the plan ({len(plan.lengths)}), got shape "
                         f"{tuple(means.shape)}")
    if not bool(torch.isfinite(means).all()):
        raise ValueError(f"means must be finite, got {means.tolist()[:8]}")
    return means


@functools.cache
def _compiled_op_takes_means() -> bool:
    """Whether the loaded echo._C's ragged_spectrogram has a `means` argument (builds before it had none)."""
    schema = torch.ops.echo.ragged_spectrogram.default._schema
    return any(argument.name == "means" for argument in schema.arguments)
