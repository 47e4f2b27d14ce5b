"""End-to-end throughput of echo.fast.encode against the per-signal reference path (EchoModel.encode).

Prints, for each workload and path: audio-seconds per second, achieved GFLOP/s (model FLOPs counted from the
plan), the speed-up over the reference path, the fraction of this machine's measured matrix-product peak,
the ceiling (the speed-up a path would reach running every FLOP at that peak: what a target can ask of this
machine), and the peak RSS of the process that ran it (each path runs in its own process; the paths of a
workload are timed round-robin, so a drift of the machine's speed hits them alike).

    python bench/encode_throughput.py                   # ECHO-small, W1 W2 W3, CPU
    python bench/encode_throughput.py --size tiny --workloads W2 --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

WORKLOADS = {
    "W1": "16 clips x 10 s at 16 kHz",
    "W2": "128 segments of 0.5-2.5 s at 12/16/48/50 kHz",
    "W3": "4 signals of 60 s at 48 kHz",
    # not run by default: one signal over a pass's budget between two short ones (fast.encode's _FrontEnd)
    "W4": "180 s at 48 kHz between two 2 s signals",
}
PATHS = ("reference", "fast-fp32", "fast-fp32-eager", "fast-bf16", "fast-bf16-eager", "fast-bf16-kept-heap",
         "fast-fp32-utterances", "fast-bf16-utterances")
# fast-*-eager: the path with the layer's eager torch ops (ECHO_BACKEND_NORM=torch), i.e. without the CPU
# inference ops (oneDNN packed products with GELU fused, compiled one-pass norm): their A/B.
PATH_ENV = {"fast-fp32-eager": {"ECHO_BACKEND_NORM": "torch"}, "fast-bf16-eager": {"ECHO_BACKEND_NORM": "torch"},
            # not in PATHS, asked for by --paths: the compiled attention kernels (csrc) off, SDPA for every length
            "fast-bf16-sdpa": {"ECHO_BACKEND_ATTENTION": "torch"}}
# fast-*-kept-heap: the process keeps the blocks an encode frees (echo.host_memory.keep_freed_memory, what
# `python -m echo encode` does on a CPU): its A/B against the library's default, glibc's own settings.
# fast-*-utterances: frames=False, what the encode and eval commands ask for: on a CPU the last layer runs on
# the CLS rows alone (echo.packed.cls_layer_forward). Every other path returns the frames too, as the reference.
# fast-*-utterances-cls-layer (not in PATHS, for GPUs): the CLS-only last layer on every device, its A/B there.
CPU_ONLY_PATHS = (*PATH_ENV, "fast-fp32-kept-heap", "fast-bf16-kept-heap", "fast-fp32-utterances",
                  "fast-bf16-utterances")
# every path --paths takes: serve() reads a path's settings from its name, so a misspelt one would run as plain
# fast-fp32 (or fast-bf16) under the name asked for
KNOWN_PATHS = tuple(dict.fromkeys((*PATHS, *CPU_ONLY_PATHS, "fast-fp32-utterances-cls-layer",
                                   "fast-bf16-utterances-cls-layer")))


def workload(name: str) -> tuple[list[torch.Tensor], list[int]]:
    generator = torch.Generator().manual_seed(0)
    if name == "W1":
        rates = [16000] * 16
        seconds = [10.0] * 16
    elif name == "W2":
        rates = [(12000, 16000, 48000, 50000)[i % 4] for i in range(128)]
        seconds = (0.5 + 2.0 * torch.rand(128, generator=generator)).tolist()
    elif name == "W3":
        rates, seconds = [48000] * 4, [60.0] * 4
    elif name == "W4":
        rates, seconds = [48000] * 3, [2.0, 180.0, 2.0]
    else:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    signals = [torch.randn(int(s * r), generator=generator) for s, r in zip(seconds, rates)]
    return signals, rates


def model_flops(signals, rates, dim: int, depth: int, cls_only: bool = False) -> float:
    """Matrix-product FLOPs of the encoder: per sequence of n tokens and layer, 24 n D^2 (in/out projections
    and MLP) + 4 n^2 D (scores and weighted sum); plus the patch projection 2 * 512 * D per patch. With
    cls_only, the last layer makes the keys and values of all n tokens and the rest for the CLS alone:
    6 n D^2 + 4 n D + 18 D^2."""
    from echo.plan import make_plan

    plan = make_plan([len(s) for s in signals], rates)
    n = (plan.seq_patches + 1).double()
    per_layer = (24 * n * dim**2 + 4 * n**2 * dim).sum().item()
    last_layer = (6 * n * dim**2 + 4 * n * dim + 18 * dim**2).sum().item() if cls_only else per_layer
    return (depth - 1) * per_layer + last_layer + 2 * 512 * dim * plan.seq_patches.sum().item()


def matmul_peak(dtype: torch.dtype, device: str, shape: tuple[int, int, int], repeat: int = 5,
                warm_seconds: float = 2.0) -> float:
    """FLOP/s of the best of `repeat` (M, K) @ (K, N) products, timed warm."""
    rows, inner, cols = shape
    a = torch.randn(rows, inner, device=device).to(dtype)
    b = torch.randn(inner, cols, device=device).to(dtype)
    # This CPU's bf16 (AMX) products speed up ~2x over their first second of use: time them warm, as the
    # paths are (each runs a warm-up call first).
    warm_until = time.perf_counter() + warm_seconds
    while time.perf_counter() < warm_until:
        a @ b
        if device == "cuda":  # else the host queues products for 2 s and the GPU then runs them all (minutes in fp32)
            torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * rows * inner * cols / min(times)


def machine_peak(dtype: torch.dtype, device: str) -> float:
    """The best of a large square product and one the size of ECHO-small's MLP product on a 4096-token pass:
    on this shared VM the square one (96 MB in bf16) sometimes ran 2x slower than the cache-sized one."""
    shapes = [(8192, 8192, 8192)] if device == "cuda" else [(4096, 4096, 4096), (4096, 384, 1536)]
    return max(matmul_peak(dtype, device, shape) for shape in shapes)


def serve(name: str, path: str, size: str, device: str, backend: str | None) -> None:
    """A worker for one (workload, path): warms up, then times one call per `time` line on stdin; `quit`
    reports its peak memory. One process per path keeps the peak RSS apart; the parent interleaves them."""
    import echo
    import echo.fast
    from echo import host_memory

    if path.endswith("-kept-heap"):
        host_memory.keep_freed_memory()
    if path.endswith("-cls-layer"):
        echo.fast.CLS_LAYER_DEVICES = (device,)
    torch.manual_seed(0)
    model = echo.EchoModel(echo.EchoConfig.preset(size)).eval().to(device)
    signals, rates = workload(name)
    if path == "reference":
        call = lambda: [model.encode(s, r) for s, r in zip(signals, rates)]  # noqa: E731
    else:
        dtype = torch.bfloat16 if path.startswith("fast-bf16") else torch.float32
        frames = "-utterances" not in path
        call = lambda: echo.fast.encode(  # noqa: E731
            model, signals, rates, dtype=dtype, frames=frames, backend=backend)
    call()  # warm-up
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    cls_only = "-utterances" in path and device in echo.fast.CLS_LAYER_DEVICES
    print(json.dumps({"audio_seconds": sum(len(s) / r for s, r in zip(signals, rates)),
                      "flops": model_flops(signals, rates, model.config.dim, model.config.depth, cls_only=cls_only)}),
          flush=True)
    for command in sys.stdin:
        if command.strip() != "time":
            break
        sync()
        start = time.perf_counter()
        call()
        sync()
        print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)
    print(json.dumps({
        "peak_rss_mb": host_memory.peak_rss_mb(),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0,
    }), flush=True)


def measure(name: str, paths: list[str], args) -> dict[str, dict]:
    """Every path of one workload, timed round-robin (one call of each path per round, `repeat` rounds) so
    that a machine whose speed drifts over minutes (this shared VM's does, by up to 2x) slows all paths
    alike; each path's time is its best call."""
    workers, results = {}, {}
    for path in paths:  # started one after another: their warm-ups do not compete
        command = [sys.executable, __file__, "--serve", name, path, "--size", args.size, "--device", args.device]
        command += ["--backend", args.backend] if args.backend else []
        env = {**os.environ, **PATH_ENV.get(path, {})}
        workers[path] = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        results[path] = _reply(workers[path], path, name)
        results[path]["times"] = []
    for _ in range(args.repeat):
        for path, worker in workers.items():
            worker.stdin.write("time\n")
            worker.stdin.flush()
            results[path]["times"].append(_reply(worker, path, name)["seconds"])
    for path, worker in workers.items():
        worker.stdin.write("quit\n")
        worker.stdin.flush()
        results[path].update(_reply(worker, path, name))
        if worker.wait():
            raise SystemExit(f"the {path} worker of {name} failed")
        # best of `repeat`: on a shared machine interference only ever adds time
        results[path]["seconds"] = min(results[path]["times"])
    return results


def _reply(worker, path: str, name: str) -> dict:
    line = worker.stdout.readline()
    if not line:  # the worker died: its own error went to stderr, above
        raise SystemExit(f"the {path} worker of {name} stopped with exit status {worker.wait()}; its error is above")
    return json.loads(line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", help="model preset (default: small)")
    # exactly these two: the timing loops synchronise CUDA where the device is "cuda" (a "cuda:0" would go unsynced)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu or cuda (default: cpu)")
    parser.add_argument("--workloads", nargs="+", default=["W1", "W2", "W3"], choices=list(WORKLOADS),
                        help="default: W1 W2 W3")
    parser.add_argument("--paths", nargs="+", default=None, choices=KNOWN_PATHS, metavar="PATH",
                        help=f"default: {' '.join(PATHS)} (no fast-*-eager, -kept-heap or -utterances on CUDA, "
                             "where they change nothing the GPU runs); also fast-fp32-kept-heap, fast-bf16-sdpa, "
                             "fast-fp32-utterances-cls-layer, fast-bf16-utterances-cls-layer")
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds per path, the best kept (default: 5)")
    parser.add_argument("--backend", default=None, help="force every op of the fast path: torch, triton, reference")
    parser.add_argument("--serve", nargs=2, metavar=("WORKLOAD", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(*args.serve, args.size, args.device, args.backend)
        return 0
    if args.repeat < 1:  # else min() of no times, after every worker's warm-up
        parser.error("--repeat must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("skipped: --device cuda but no CUDA device is available")
        return 0
    if args.backend:  # a backend this machine cannot run is named now, not after the peak measurement
        import echo
        import echo.fast

        try:
            echo.fast.encode(echo.EchoModel(echo.EchoConfig.preset("tiny")).to(args.device), torch.randn(4000),
                             16000, backend=args.backend)
        except ValueError as error:
            raise SystemExit(f"--backend {args.backend}: {error}") from None
    if args.paths is None:
        args.paths = [path for path in PATHS if args.device == "cpu" or path not in CPU_ONLY_PATHS]
    dtypes = (torch.float32, torch.bfloat16)
    peaks = {dtype: machine_peak(dtype, args.device) for dtype in dtypes}
    measured = {}
    for name in args.workloads:
        measured[name] = measure(name, args.paths, args)
        # the peak again after each workload, the best kept: a drifting machine read low once is not its peak
        peaks = {dtype: max(peaks[dtype], machine_peak(dtype, args.device)) for dtype in dtypes}
        print(f"measured {name}", file=sys.stderr, flush=True)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device {device_name}, fast-path backend {args.backend or 'default'}, ECHO-{args.size}; measured matmul peak "
          f"(best of {len(args.workloads) + 1} measurements): fp32 {peaks[torch.float32] / 1e9:.0f} GFLOP/s, bf16 "
          f"{peaks[torch.bfloat16] / 1e9:.0f} GFLOP/s; times: best of {args.repeat} rounds, the paths interleaved, "
          f"each in its own process")
    print("| workload | path | audio s/s | GFLOP/s | x reference | % of peak | ceiling (x ref. at peak) | peak RSS MB "
          "| peak GPU MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, results in measured.items():
        reference_time = results["reference"]["seconds"] if "reference" in results else None
        for path, result in results.items():
            speedup = f"{reference_time / result['seconds']:.2f}" if reference_time else "-"
            peak = peaks[torch.bfloat16 if path.startswith("fast-bf16") else torch.float32]
            achieved = result["flops"] / result["seconds"]
            ceiling = f"{reference_time * peak / result['flops']:.2f}" if reference_time else "-"
            print(f"| {name} | {path} | {result['audio_seconds'] / result['seconds']:.1f} | {achieved / 1e9:.1f} | "
                  f"{speedup} | {100 * achieved / peak:.0f}% | {ceiling} | {result['peak_rss_mb']:.0f} | "
                  f"{result['peak_gpu_mb']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
