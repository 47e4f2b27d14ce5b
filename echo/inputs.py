"""Turning what users pass (tensors, numpy arrays, integer PCM) into checked float32 signals.

Every public entry point goes through here, so a bad input fails with one clear `ValueError` that names
the problem and its numbers, never deep inside torch and never as a silently wrong embedding.

Integer PCM is accepted and scaled to [-1, 1): int16 by 1/32768, int32 by 1/2147483648 (the convention of
soundfile and WAV). Other integers (uint8, int8, int64, ...), bool and complex inputs are refused.
"""
from __future__ import annotations

import decimal
import numbers
import os
import sys
import warnings

import numpy as np
import torch

from . import geometry

PCM_SCALES = {torch.int16: 1 / 32768, torch.int32: 1 / 2147483648}


def first_items(items, shown: int = 8) -> str:
    """The first few of a list, comma-separated, and how many there are: an error about hundreds of bad keys
    or rows stays readable."""
    items = [str(item) for item in items]
    return ", ".join(items[:shown]) + (f", ... ({len(items)} in all)" if len(items) > shown else "")


def checked_device(device, allow_meta: bool = False) -> torch.device:
    """A device torch can put a model on: a typo or a GPU this machine lacks is named before any work.
    `allow_meta`: the meta device too, where a module has shapes and no weights (EchoModel's, as any module's)."""
    try:
        checked = torch.device(device)
    except (RuntimeError, TypeError) as error:  # torch's own text names every device type it was built with
        if isinstance(device, str) or isinstance(error, TypeError):
            raise ValueError(f"unknown device {device!r}; e.g. cpu, cuda, cuda:1") from None
        raise ValueError(f"device {device!r} is not available here: {_first_sentence(error)}") from None
    if checked.type == "meta" and not allow_meta:  # a model there has no weights: encode would fail deep in torch
        raise ValueError("device meta holds no data; choose a device that computes: cpu, cuda, ...")
    try:
        torch.empty(0, device=checked)
    except Exception as error:  # not compiled in, no such GPU, a backend module missing: each says so its way
        raise ValueError(f"device {checked} is not available here: {_first_sentence(error)}") from None
    return checked


def _first_sentence(error: Exception) -> str:
    return (str(error).strip() or type(error).__name__).splitlines()[0].split(". ")[0]


def whole_number(value) -> int | None:
    """`value` as an int if it is a whole number (16000, 16000.0, Decimal("16000"), numpy's or a 0-d tensor's,
    10**400), else None (bool, 0.5, inf, NaN, text)."""
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0:
        value = value.item()
    if isinstance(value, decimal.Decimal):  # how boto3 (DynamoDB) and SQL NUMERIC columns give numbers
        return int(value) if value.is_finite() and value == value.to_integral_value() else None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    if isinstance(value, numbers.Integral):  # before float(): 10**400 has none
        return int(value)
    return int(value) if float(value).is_integer() else None


def check_sample_rate(sample_rate, where: str = "") -> int:
    """An integer rate of 100 Hz (below, the 10 ms hop is no whole sample; slow sensors such as 1 kHz
    accelerometers get one band) to 10 MHz (above, one window holds over 250 000 samples in some 3900 bands: a
    typo, not a sensor); a 0-d tensor or array is its value."""
    if _half_precision(sample_rate):  # its value is a whole number already rounded: checked, it passed as such
        raise ValueError(f"{where}sample rate given as a {sample_rate.dtype} ({float(sample_rate)!r}), which holds most "
                         f"rates only rounded (44100 reads 44096 in float16, 44032 in bfloat16); pass it as an int")
    rate = whole_number(sample_rate)
    if rate is None:
        raise ValueError(f"{where}sample rate must be an integer number of Hz, got {sample_rate!r}")
    if not geometry.MIN_SAMPLE_RATE <= rate <= geometry.MAX_SAMPLE_RATE:
        raise ValueError(f"{where}sample rate {rate} Hz is outside {geometry.MIN_SAMPLE_RATE} to "
                         f"{geometry.MAX_SAMPLE_RATE} Hz")
    return rate


def _half_precision(value) -> bool:
    """Whether `value` is one 16-bit (or narrower) float, tensor or numpy: whole numbers above 2048 (float16) or
    256 (bfloat16) it rounds to a multiple of 2 or more, so a rate there (a batch's tensors cast
    .to(torch.bfloat16)) is a whole number already wrong."""
    if getattr(value, "ndim", None) != 0:  # not one number: whole_number refuses it
        return False
    dtype = getattr(value, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype.is_floating_point and dtype.itemsize < 4
    return isinstance(dtype, np.dtype) and dtype.kind == "f" and dtype.itemsize < 4


def _unsupported_dtype(dtype, integer: bool, where: str, what: str) -> ValueError:
    """The refusal of a dtype; for integers it says how to scale, for "pass int16 PCM" alone invites
    x.astype(int16), which reads 8-bit samples (uint8 WAV, int8) 256 times too quiet, without a word."""
    advice = ("only int16 and int32 are read as PCM: convert other integers to float in [-1, 1) by their full "
              "scale, e.g. (x - 128) / 128 for 8-bit WAV's uint8" if integer else "pass float or int16/int32 PCM")
    return ValueError(f"{where}{what} has unsupported dtype {dtype}; {advice}")


def as_tensor(samples, where: str = "", what: str = "signal") -> torch.Tensor:
    """A tensor of the samples of a tensor or numpy array (float or integer PCM dtypes; float128 is narrowed
    to float64, which torch holds; big-endian data is put in native order); anything else is refused here
    rather than by torch."""
    if isinstance(samples, np.ma.MaskedArray):  # its data holds arbitrary values where the mask hides samples
        masked = np.ma.count_masked(samples)
        if masked:
            raise ValueError(f"{where}{what} has {masked} masked sample(s); fill them (np.ma.filled) or pass .data")
        samples = samples.data
    if isinstance(samples, np.ndarray):
        if samples.dtype.kind not in "fi":
            raise _unsupported_dtype(samples.dtype, samples.dtype.kind in "iu", where, what)
        if samples.dtype.kind == "f" and samples.dtype.itemsize > 8:
            samples = samples.astype(np.float64)
        # reshaped because ascontiguousarray makes a 0-d array 1-d, which would pass as a one-sample signal
        samples = np.ascontiguousarray(samples, dtype=samples.dtype.newbyteorder("=")).reshape(samples.shape)
        # torch warns on read-only arrays (np.frombuffer, read-only memmaps); a copy is quiet, where silencing the
        # warning would change the process's warning filters under the file-reading threads
        return torch.from_numpy(samples if samples.flags.writeable else samples.copy())
    if not isinstance(samples, torch.Tensor):
        raise ValueError(f"{where}{what} must be a torch.Tensor or numpy array, got {_not_an_array(samples)}")
    if samples.is_meta:
        raise ValueError(f"{where}{what} is a meta tensor: it has a shape but no samples")
    if samples.is_nested:
        raise ValueError(f"{where}{what} is a nested tensor; pass a list of its signals (.unbind())")
    if samples.layout != torch.strided:  # sparse or mkldnn: most ops the front end runs have no kernel for them
        raise ValueError(f"{where}{what} is a {samples.layout} tensor; pass a dense one (.to_dense())")
    return samples


def _not_an_array(samples) -> str:
    """What was passed instead of an array, and what the likely mistake is: a list of numbers as fast.encode's
    signals (or list(array)) is one signal per number, each refused as "got float32", which read like a dtype."""
    if isinstance(samples, numbers.Number):  # numpy's scalars too
        return (f"the number {samples!r:.40}, not an array of samples (a list of numbers given as fast.encode's "
                f"signals is one signal per number): pass the samples as one array (np.asarray)")
    if isinstance(samples, (str, bytes, os.PathLike)):
        return (f"{type(samples).__name__} {samples!r:.80}: read an audio file first (echo.eval.datasets.read_audio "
                f"gives its samples, channels first, and rate) or encode files with `python -m echo encode`")
    if isinstance(samples, (list, tuple)):
        return f"{type(samples).__name__}; np.asarray makes one of its samples"
    return type(samples).__name__


SUM_BLOCK = 1 << 16  # samples widened to float64 at a time by float64_sum


def float64_sum(samples: torch.Tensor) -> torch.Tensor:
    """The sum of all samples in float64, widened a block at a time: torch's sum(dtype=float64) widens them all
    at once, a copy twice the size of a float32 signal (+221 MB for 10 minutes at 48 kHz). One block's at once: the
    blocks' generator cost a few samples' push to a stream 30 us, twice (bench/stream_push_time.py)."""
    if samples.numel() <= SUM_BLOCK:
        return samples.sum(dtype=torch.float64)
    return sum((block.sum(dtype=torch.float64) for block in samples.reshape(-1).split(SUM_BLOCK)),
               torch.zeros((), dtype=torch.float64, device=samples.device))


def as_float32(samples: torch.Tensor, where: str = "", what: str = "signal") -> torch.Tensor:
    """The samples (a tensor from as_tensor) as float32, integer PCM scaled; refused if any is NaN, Inf or
    beyond float32's range."""
    if samples.dtype in PCM_SCALES:
        return samples.to(torch.float32) * PCM_SCALES[samples.dtype]
    if not samples.is_floating_point():
        integer = not samples.is_complex() and samples.dtype != torch.bool
        raise _unsupported_dtype(samples.dtype, integer, where, what)
    converted = samples.to(torch.float32)
    # one pass: NaN/Inf propagate into the sum, and float32 samples cannot overflow a float64 sum
    if not torch.isfinite(float64_sum(converted)):
        bad = ~torch.isfinite(samples)
        if bad.any():  # where the first is, so that a recording's dropout can be found in it
            raise ValueError(f"{where}{what} contains {bad.sum().item()} NaN or Inf sample(s), the first at "
                             f"{_position(bad)}")
        beyond = ~torch.isfinite(converted)
        raise ValueError(f"{where}{what} has {beyond.sum().item()} sample(s) beyond float32's range (|x| > 3.4e38), "
                         f"the first at {_position(beyond)}")
    return converted


def _position(mask: torch.Tensor) -> str:
    """Where the first True of a (N,) or (C, N) mask is, within what was checked: "index i", or "channel c, index
    i"."""
    index = mask.flatten().nonzero()[0].item()
    if mask.dim() < 2:
        return f"index {index}"
    return f"channel {index // mask.shape[-1]}, index {index % mask.shape[-1]}"


def as_signal(waveform, sample_rate: int, where: str = "") -> torch.Tensor:
    """A checked float32 tensor of shape (N,) or (C, N), every channel at least one window long."""
    waveform = as_tensor(waveform, where)
    if waveform.dim() not in (1, 2):
        raise ValueError(
            f"{where}signal must be 1-D (samples) or 2-D (channels, samples), got shape {tuple(waveform.shape)}"
        )
    if waveform.numel() == 0:
        raise ValueError(f"{where}signal is empty (shape {tuple(waveform.shape)})")
    window = geometry.n_fft(sample_rate)
    n = waveform.shape[-1]
    flipped = waveform.dim() == 2 and waveform.shape[0] > n  # more channels than samples: (samples, channels)?
    if n < window:
        hint = "; channels come first: pass (channels, samples), not (samples, channels)" if flipped else ""
        raise ValueError(
            f"{where}signal of {n} samples is shorter than one 25 ms window at {sample_rate} Hz ({window} samples)"
            f"{hint}"
        )
    if flipped:  # it may be valid (a sensor array, briefly): said, not refused
        warnings.warn(f"{where}signal of shape {tuple(waveform.shape)} is read as {waveform.shape[0]} channels of "
                      f"{n} samples; if it is (samples, channels), pass its transpose", UserWarning,
                      stacklevel=_caller_stacklevel())
    converted = as_float32(waveform, where)
    if waveform.dtype == torch.float64:
        centred = less_offset(waveform, waveform.mean(dim=-1, keepdim=True), converted)
        return centred if centred is not None else waveform.to(torch.float32)
    return converted


def less_offset(samples: torch.Tensor, offset, converted: torch.Tensor) -> torch.Tensor | None:
    """float64 samples less their DC `offset`, written over `converted` (their float32 copy) a block at a time, or
    None where that would leave float32's range (samples near +-3.4e38 of both signs): the front end removes the
    DC anyway, and a signal on a large offset (a pressure in Pa, 1e5 + 1e-2 sin) cast to float32 first lost its
    variation in the offset's rounding. By blocks, the float64 difference costs no copy of the signal."""
    for start in range(0, samples.shape[-1], SUM_BLOCK):
        centred = (samples[..., start : start + SUM_BLOCK] - offset).to(torch.float32)
        if not bool(torch.isfinite(centred).all()):
            return None
        converted[..., start : start + SUM_BLOCK] = centred
    return converted


# echo's own files and torch's (its no_grad wrapper sits between model.encode and its caller)
_LIBRARY_DIRS = (os.path.dirname(__file__) + os.sep, os.path.dirname(torch.__file__) + os.sep)


def _caller_stacklevel() -> int:
    """The stacklevel, for a warning raised by this function's caller, of the first frame outside echo and
    torch: the warning then names the user's line, where filters by module and readers look for it."""
    level, frame = 1, sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        level, frame = level + 1, frame.f_back
    return level
