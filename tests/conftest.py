import contextlib
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

RATE_FAMILIES = [8000, 12000, 16000, 22050, 44100, 48000, 50000]

if not torch.cuda.is_available():
    # Triton kernels run on the CPU interpreter; it must be chosen before any kernel is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """Fresh random inputs every run; the seed is printed so a failure can be replayed (ECHO_SEED=...)."""
    seed = int(os.environ.get("ECHO_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    print(f"ECHO_SEED={seed}")
    yield seed


def seeded_rng() -> np.random.Generator:
    """A numpy Generator drawn from the test's seed (`fresh_seed` seeds numpy's global state), so numpy inputs
    replay with ECHO_SEED as torch's do."""
    return np.random.default_rng(np.random.randint(2**63, dtype=np.int64))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = torch.as_tensor(out).double(), torch.as_tensor(ref).double()
    return ((out - ref).norm() / ref.norm()).item()


def same_weights(loaded, model) -> bool:
    return all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def random_model(size: str = "tiny", **overrides):
    """A model with every parameter random (biases and norms included), so no term can hide."""
    from echo import EchoConfig, EchoModel

    model = EchoModel(EchoConfig.preset(size, **overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name == "pos_embed":
                continue
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0, 0.02 if param.dim() > 1 else 0.1)
    return model


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty / empty_like return NaN-filled floating tensors, so an output element a kernel forgets to
    write cannot pass as a plausible value."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(tensor):
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: poison(empty(*args, **kwargs)))
    monkeypatch.setattr(torch, "empty_like", lambda *args, **kwargs: poison(empty_like(*args, **kwargs)))


def assert_flash_rule(out, same_dtype_ref, exact_ref, factor: float):
    """The tolerance of a low-precision kernel (FlashAttention's rule): its error against the float64 truth is
    at most `factor` times that of the torch computation in the same dtype. The Triton interpreter (CPU)
    truncates fp32 -> bf16 instead of rounding to nearest as GPUs do, which doubles bf16 rounding errors:
    there the factor is doubled for bf16."""
    if out.dtype == torch.bfloat16 and out.device.type == "cpu":  # only the interpreter runs kernels on a CPU
        factor *= 2
    kernel_err, torch_err = rel_err(out, exact_ref), rel_err(same_dtype_ref, exact_ref)
    assert kernel_err <= factor * torch_err + 1e-6, (kernel_err, torch_err, factor)


def float32_front_end(waves: torch.Tensor, offsets: torch.Tensor, plan) -> torch.Tensor:
    """The released front end as it runs in float32 (torch.stft, float32 mean), in the ragged band layout:
    the yardstick for float32 fast paths, whose rounding near-zero bins turn into ~1e-3 after the log."""
    from echo import geometry
    from echo.ops.stft import band_layout

    pieces = []
    bounds = offsets.tolist()
    for i, rate in enumerate(plan.sample_rates):
        x = waves[bounds[i] : bounds[i + 1]].float().cpu()
        x = x - x.mean()
        n_fft = geometry.n_fft(rate)
        window = torch.hann_window(n_fft, periodic=True)
        spec = torch.stft(x, n_fft, geometry.hop(rate), window=window, center=False, return_complex=True).abs()
        spec = (torch.log(spec + 1e-9) + 5.874158) / 10.446348
        pieces.append(band_layout(spec, rate).reshape(-1))
    return torch.cat(pieces) if pieces else torch.empty(0)


def assert_front_end_close(out: torch.Tensor, waves: torch.Tensor, offsets: torch.Tensor, plan) -> None:
    """A float32 front end (the Triton kernel) against the float64 reference, in two domains.
    Magnitudes |X| (the normalisation undone): the FFT is norm-wise stable there, so float32's rule applies,
    under 1e-5 (measured ~3e-7).
    The normalised log the model sees: a near-zero bin turns float32 rounding into a large log error, and two
    correct float32 computations differ there by luck: at most twice the error of the released float32
    computation on the same input (the flash-attention rule), or 1e-3 (over 6000 random signals a float32
    torch.stft reached 3.6e-4 and a float32 compiled op 2.2e-4)."""
    from echo.ops import stft as stft_ops

    truth = stft_ops.ragged_spectrogram_reference(waves.double().cpu(), offsets, plan)
    assert_spectrogram_close(out, truth, float32_front_end(waves, offsets, plan))


def assert_spectrogram_close(out: torch.Tensor, truth: torch.Tensor, released: torch.Tensor) -> None:
    """The two-domain rule of `assert_front_end_close`, given the float64 truth and the released float32 result."""
    from echo import geometry

    magnitude = lambda normalised: torch.exp(normalised.double() * geometry.LOG_STD - geometry.LOG_MEAN)
    assert rel_err(magnitude(out.cpu()), magnitude(truth)) < 1e-5
    assert rel_err(out.cpu(), truth) < max(1e-3, 2 * rel_err(released, truth))


@pytest.fixture
def lock_folder(monkeypatch):
    """lock_folder(path): listing that folder fails with "Permission denied", as for a user who may not read it
    (the tests run as root, who reads any folder)."""
    locked, scandir = set(), os.scandir

    def scan(path="."):
        if isinstance(path, (str, os.PathLike)) and Path(path) in locked:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", scan)
    return lambda path: locked.add(Path(path))


@pytest.fixture
def broken_triton(monkeypatch):
    """A triton that is installed but whose kernels do not import (a driver mismatch): "libcuda mismatch"."""
    import importlib

    from echo.ops import backend as backends

    real_import = importlib.import_module

    def broken(name, *args):
        if name == "echo_kernels":
            raise ImportError("libcuda mismatch")
        return real_import(name, *args)

    monkeypatch.setattr(backends.importlib, "import_module", broken)
    monkeypatch.setattr(backends, "triton_installed", lambda: True)


@contextlib.contextmanager
def pipe_watch(pipe: Path, seconds: float = 10):
    """For a test that a pipe is not opened for reading: after `seconds`, a reader still waiting on it (for ever,
    with no writer) is let go, and the list yielded says so."""
    waited = []

    def release():
        with contextlib.suppress(OSError):  # ENXIO: no reader waits on it
            os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
            waited.append(True)

    timer = threading.Timer(seconds, release)
    timer.start()
    try:
        yield waited
    finally:
        timer.cancel()
