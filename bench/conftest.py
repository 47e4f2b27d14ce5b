"""Shared pieces of the kernel microbenchmarks (bench/benchmark_<op>.py): the ECHO-shaped inputs, the device's
peaks, and a `measure` fixture that times one implementation and prints time, achieved GB/s and TFLOP/s
and the fraction of the device's peak (the roofline floor of bench/RESULTS.md is the same formula)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from encode_throughput import workload  # noqa: E402  (W1 / W2 of the end-to-end benchmark)

if torch.cuda.is_available():
    # Real kernel speed: Triton's compiler, never its CPU interpreter (a TRITON_INTERPRET=1 left in the shell from
    # a CPU test run). Triton reads the variable when a kernel is defined: it goes before echo_kernels is imported.
    os.environ.pop("TRITON_INTERPRET", None)

# Dense peaks from the datasheets (bytes/s, FLOP/s per dtype for matrix products; fp32 without tensor cores).
PEAKS = {
    "H100 SXM": {"bandwidth": 3.35e12, torch.float32: 67e12, "tf32": 495e12, torch.bfloat16: 989e12, torch.float16: 989e12},
    "H100 PCIe": {"bandwidth": 2.0e12, torch.float32: 51e12, "tf32": 378e12, torch.bfloat16: 756e12, torch.float16: 756e12},
    "H200": {"bandwidth": 4.8e12, torch.float32: 67e12, "tf32": 495e12, torch.bfloat16: 989e12, torch.float16: 989e12},
}
NO_GPU = "kernel microbenchmarks need a CUDA GPU (the Triton kernels are tested on CPU under the interpreter)"


def device_peaks() -> tuple[str, dict]:
    name = torch.cuda.get_device_name()
    if "H200" in name:
        return name, PEAKS["H200"]
    if "H100" in name:
        return name, PEAKS["H100 PCIe" if "PCIe" in name else "H100 SXM"]
    return name, {}


def ragged_inputs(name: str, device: str = "cuda"):
    """(signals on device back to back, offsets, plan) of workload W1 or W2."""
    from echo.plan import make_plan

    signals, rates = workload(name)
    plan = make_plan([len(s) for s in signals], rates)
    offsets = torch.zeros(len(signals) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor([len(s) for s in signals]), 0)
    return torch.cat(signals).to(device), offsets, plan


@pytest.fixture(autouse=True)
def compiled_triton(request):
    """A Triton benchmark is skipped where echo_kernels was defined in the interpreter before this conftest could
    drop TRITON_INTERPRET (imported earlier in the same pytest session): it would time the interpreter."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if "triton" in (params.get("backend"), params.get("impl")) and torch.cuda.is_available():
        import echo_kernels

        if echo_kernels.INTERPRETED:
            pytest.skip("echo_kernels was defined under TRITON_INTERPRET=1 (the CPU interpreter): not timed")


@pytest.fixture
def measure(benchmark):
    """measure(fn, bytes_moved, flops, dtype, label): time fn (CUDA-synchronised) and report its rates."""

    def run(fn, bytes_moved: float, flops: float, dtype=torch.float32, label: str = ""):
        def synced():
            fn()
            torch.cuda.synchronize()

        synced()  # compile and warm up outside the timed rounds
        benchmark.pedantic(synced, rounds=20, iterations=1, warmup_rounds=2)
        seconds = benchmark.stats.stats.median
        name, peaks = device_peaks()
        gbps, tflops = bytes_moved / seconds / 1e9, flops / seconds / 1e12
        floor = max(bytes_moved / peaks["bandwidth"], flops / peaks[dtype]) if peaks else float("nan")
        benchmark.extra_info.update(
            device=name, median_ms=seconds * 1e3, GB_per_s=gbps, TFLOP_per_s=tflops, floor_ms=floor * 1e3,
            fraction_of_roofline=floor / seconds,
        )
        print(
            f"\n{label:<40} {seconds * 1e3:9.3f} ms  {gbps:8.1f} GB/s  {tflops:7.2f} TFLOP/s  "
            f"floor {floor * 1e3:.3f} ms = {floor / seconds:6.1%} of roofline on {name}"
        )

    return run
