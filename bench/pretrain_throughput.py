"""Pretraining step throughput: packed varlen batches (echo.pretrain as it trains) against a padded step on
the same batches, same model, same loss.

The padded step is what a padded implementation does: every band sequence of the batch is padded to the
batch's longest (student: visible tokens + CLS; teacher: all tokens), every encoder op runs on the padded
buffer and attention ignores padded keys through a boolean mask. The library's own encoder code runs on that
buffer (only attention and the pad/unpad around the encoder are swapped in, see `padded_encoders`); token
building, targets, decoder, loss (on real tokens only), backward, AdamW and EMA are the library's, unchanged.
The script first checks that both give the same fp32 loss, so the comparison is fair.

Batches: the default sampling config (10 s crops, 2-5 bands, 4 clones, mask 0.8) on generated tones + noise
at 8/16/22.05/44.1/48 kHz, 1-10 s each (so crops of 1-10 s), made once and shared by every measurement. Each
measurement runs in a fresh subprocess (peak RSS, or peak CUDA memory, of that measurement alone); packed and
padded runs alternate.

    python bench/pretrain_throughput.py                                  # tiny and small, CPU
    python bench/pretrain_throughput.py --tokens-per-batch 4096 --steps 2 --repeats 2
    python bench/pretrain_throughput.py --device cuda --tokens-per-batch 16384
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

from _shared import device_option
from echo import geometry, host_memory, packed
from echo.model import EchoConfig, EchoModel
from echo.ops import attention as attention_ops
from echo.pretrain import objective, schedule
from echo.pretrain.corpus import Example
from echo.pretrain.sampling import Batch, SamplingConfig, masked_count, materialise, plan_batches
from echo.pretrain.trainer import PretrainConfig, parameter_groups

RATES = (8000, 16000, 22050, 44100, 48000)
PATHS = ("packed", "padded")
PAPER_STEPS, PAPER_CLIPS_PER_STEP = 400_000, 256  # the paper's schedule: 400k steps of 256 clips
LIBRARY_FORWARD = packed.forward
LIBRARY_ATTENTION = attention_ops.packed_attention


# --- batches -------------------------------------------------------------------------------------------------

def generated_audio(seed: int, index: int, rate: int, start: int, count: int) -> np.ndarray:
    rng = np.random.default_rng([seed, index])
    t = (start + np.arange(count)) / rate
    return (0.5 * np.sin(2 * np.pi * rng.uniform(50, rate / 3) * t) + 0.1 * rng.standard_normal(count)).astype(np.float32)


def generated_examples(seed: int, seconds: tuple[float, float]):
    """Endless mono examples at RATES, durations uniform in `seconds`, audio made when read."""
    rng = np.random.default_rng(seed)
    for index in itertools.count():
        rate = RATES[int(rng.integers(len(RATES)))]
        frames = int(rng.uniform(*seconds) * rate)
        yield Example(f"generated{index}", rate, frames, 0, partial(generated_audio, seed, index, rate))


def make_batches(count: int, config: SamplingConfig, seed: int, seconds=(1.0, 10.0)) -> list[Batch]:
    plans = plan_batches(generated_examples(seed, seconds), np.random.default_rng(seed), config)
    return [materialise(next(plans), config.clones) for _ in range(count)]


def padded_tokens(batch: Batch) -> int:
    """Tokens both encoders process when every sequence is padded to its batch's longest."""
    teacher = len(batch.lengths) * (int(batch.lengths.max()) + 1)
    return teacher + len(batch.student_lengths) * int(batch.student_lengths.max())


def real_tokens(batch: Batch) -> int:
    return batch.teacher_tokens + batch.student_tokens


# --- the padded baseline -------------------------------------------------------------------------------------

@dataclass
class PaddedLayout:
    """Sequences of a Packing, each padded to the longest: packed row i is padded row rows[i] of (S * L, D)."""

    sequences: int
    longest: int
    rows: torch.Tensor  # (total,) int64
    keep: torch.Tensor  # (S, 1, 1, L) bool: True where the key is a real token

    @classmethod
    def of(cls, packing: packed.Packing) -> "PaddedLayout":
        cu = packing.cu_seqlens.long()
        lengths = cu.diff()
        sequence = torch.repeat_interleave(torch.arange(len(lengths), device=cu.device), lengths)
        position = torch.arange(int(cu[-1]), device=cu.device) - cu[sequence]
        longest = packing.max_seqlen
        keep = torch.arange(longest, device=cu.device) < lengths[:, None]
        return cls(len(lengths), longest, sequence * longest + position, keep[:, None, None, :])

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(self.sequences * self.longest, x.shape[-1]).index_put((self.rows,), x)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        return x[self.rows]


def masked_attention(qkv: torch.Tensor, layout, heads: int, backend: str | None = None) -> torch.Tensor:
    """Attention over a padded (S * L, 3D) buffer, padded keys masked out (SDPA with a boolean mask)."""
    if not isinstance(layout, PaddedLayout):
        return LIBRARY_ATTENTION(qkv, layout, heads, backend)
    q, k, v = attention_ops.split_heads(qkv.view(layout.sequences, layout.longest, -1), heads)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.keep)
    return attention_ops.merge_heads(out).reshape(qkv.shape[0], -1)


def padded_forward(model, x: torch.Tensor, packing: packed.Packing, backend: str | None = None,
                   return_layers: bool = False):
    """echo.packed.forward's contract (packed rows in and out), computed on the padded buffer."""
    layout = PaddedLayout.of(packing)
    result = LIBRARY_FORWARD(model, layout.pad(x), layout, backend, return_layers)
    if return_layers:
        out, layers = result
        return layout.unpad(out), [layout.unpad(layer) for layer in layers]
    return layout.unpad(result)


@contextmanager
def padded_encoders(enabled: bool = True):
    """Inside, every encoder forward of the objective (teacher and student) runs padded."""
    with ExitStack() as stack:
        if enabled:
            stack.enter_context(mock.patch.object(packed, "forward", padded_forward))
            stack.enter_context(mock.patch.object(attention_ops, "packed_attention", masked_attention))
        yield


# --- the training step ---------------------------------------------------------------------------------------

@dataclass
class Trainer:
    learner: objective.Learner
    teacher: EchoModel
    optimizer: torch.optim.Optimizer
    clip_grad: float
    ema_decay: float
    device: torch.device
    autocast: object


def make_trainer(model_config: EchoConfig, device: torch.device, bf16: bool, seed: int = 0) -> Trainer:
    """Student, EMA teacher, decoder and AdamW as echo.pretrain.trainer builds them (its defaults)."""
    defaults = PretrainConfig(data="", out="")
    torch.manual_seed(seed)
    student = EchoModel(model_config)
    decoder = objective.ConvDecoder(model_config.dim, defaults.decoder_layers, defaults.decoder_kernel,
                                    defaults.decoder_groups)
    learner = objective.Learner(student, decoder, defaults.utterance_weight).to(device)
    teacher = copy.deepcopy(student).requires_grad_(False)
    optimizer = torch.optim.AdamW(parameter_groups(learner, defaults.weight_decay), lr=defaults.base_lr,
                                  betas=(0.9, 0.95))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    return Trainer(learner, teacher, optimizer, defaults.clip_grad, defaults.ema_start, device, autocast)


def losses(trainer: Trainer, host_batch: Batch, padded: bool):
    """(loss, frame loss, utterance loss) of one batch, packed or padded."""
    batch = host_batch.to(trainer.device, non_blocking=True)
    teacher_packing = packed.Packing.from_lengths(host_batch.lengths + 1, trainer.device)
    student_packing = packed.Packing.from_lengths(host_batch.student_lengths, trainer.device)
    with padded_encoders(padded), trainer.autocast:
        targets, utterance_targets = objective.teacher_targets(trainer.teacher, batch, teacher_packing)
        return trainer.learner(batch, student_packing, targets, utterance_targets)


def train_step(trainer: Trainer, host_batch: Batch, padded: bool) -> float:
    """One full step as the trainer takes it: targets, loss, backward, clipping, AdamW, EMA."""
    loss, _, _ = losses(trainer, host_batch, padded)
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainer.learner.parameters(), trainer.clip_grad)
    trainer.optimizer.step()
    schedule.ema_update(trainer.teacher, trainer.learner.student, trainer.ema_decay)
    return loss.item()


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm()).item()


def loss_mismatch(trainer: Trainer, batch: Batch) -> float:
    """Largest relative error of the padded (loss, frame loss, utterance loss) against the packed ones."""
    with torch.no_grad():
        packed_parts = losses(trainer, batch, padded=False)
        padded_parts = losses(trainer, batch, padded=True)
    return max(relative_error(a, b) for a, b in zip(padded_parts, packed_parts))


# --- measurement ---------------------------------------------------------------------------------------------

def sampling_config(args) -> SamplingConfig:
    return SamplingConfig(tokens_per_batch=args.tokens_per_batch, clones=args.clones)


def bf16_wanted(args, device: torch.device) -> bool:
    if args.precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return args.precision == "bf16"


def measure(args, size: str, path: str) -> dict:
    """One measurement (run in its own process): warm-up steps, then timed steps on the shared batches."""
    device = args.device
    batches = torch.load(args.batches, weights_only=False)
    trainer = make_trainer(EchoConfig.preset(size), device, bf16_wanted(args, device), args.seed)
    padded = path == "padded"
    for batch in batches[: args.warmup]:
        train_step(trainer, batch, padded)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for batch in batches[args.warmup :]:
        start = time.perf_counter()
        train_step(trainer, batch, padded)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    timed = batches[args.warmup :]
    return {
        "seconds": sum(times),
        "steps": len(times),
        "tokens": sum(real_tokens(b) for b in timed),
        "padded_tokens": sum(padded_tokens(b) for b in timed),
        "clips": sum(b.clips for b in timed),
        "peak_rss_mb": host_memory.peak_rss_mb(),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0.0,
    }


def full_clip_tokens(config: SamplingConfig) -> float:
    """Teacher + student tokens of an average full-length (crop_seconds) clip: the paper's 10 s crops."""
    patches = min(config.max_clip_patches, geometry.MAX_PATCHES)
    bands = (config.min_bands + config.max_bands) / 2
    visible = patches - masked_count(patches, config.mask_ratio)
    return bands * (patches + 1) + config.clones * bands * (visible + 1)


def run_measurement(args, size: str, path: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--one", size, path, "--batches", args.batches,
               "--device", str(args.device), "--precision", args.precision,
               "--tokens-per-batch", str(args.tokens_per_batch),
               "--clones", str(args.clones), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--seed", str(args.seed)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"measurement {size}/{path} failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--device", type=device_option, default="cpu")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="auto: bf16 autocast on a GPU that supports it, fp32 otherwise (as the trainer)")
    parser.add_argument("--tokens-per-batch", type=int, default=SamplingConfig.tokens_per_batch)
    parser.add_argument("--clones", type=int, default=SamplingConfig.clones)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="measurements per size and path, alternated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--one", nargs=2, metavar=("SIZE", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--batches", help=argparse.SUPPRESS)  # the measurements' batches, saved by the parent
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args, *args.one)))
        return 0
    # at once, not after the batches and the loss check (a KeyError, a division by zero)
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--steps and --repeats must be at least 1, --warmup at least 0")
    try:
        config = sampling_config(args)
    except ValueError as error:  # a budget no clip fits, no clones
        parser.error(str(error))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        print("skipped: --device cuda but no CUDA device is available")
        return 0
    device = args.device
    bf16 = bf16_wanted(args, device)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"cpu, {torch.get_num_threads()} threads, {os.cpu_count()} cores"
    print(f"device: {device_name}; {'bf16 autocast' if bf16 else 'fp32'}; {args.tokens_per_batch}-token budget "
          f"(teacher tokens), {args.clones} clones, mask {config.mask_ratio}, {config.min_bands}-{config.max_bands} "
          f"bands, crops 1-10 s at {'/'.join(f'{r / 1000:g}' for r in RATES)} kHz")
    if device.type == "cpu":
        load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"timings on a loaded machine shared with other jobs (load average {load} on {os.cpu_count()} "
              f"cores): {args.repeats} measurements per row, packed and padded alternated; median and best")

    started = time.perf_counter()
    batches = make_batches(args.warmup + args.steps, config, args.seed)
    print(f"{len(batches)} batches of {statistics.mean(b.clips for b in batches):.0f} clips made in "
          f"{time.perf_counter() - started:.0f} s")
    fair = True
    for size in args.sizes:
        error = loss_mismatch(make_trainer(EchoConfig.preset(size), device, False, args.seed), batches[0])
        fair &= error < 1e-5
        print(f"ECHO-{size}: padded fp32 loss vs packed: relative error {error:.1e} "
              f"({'ok' if error < 1e-5 else 'MISMATCH'}, limit 1e-5)")
    if not fair:
        print("the padded step does not compute the packed loss: no comparison")
        return 1

    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        args.batches = os.path.join(scratch, "batches.pt")
        torch.save(batches, args.batches)
        for size in args.sizes:
            for repeat in range(args.repeats):
                for path in PATHS if repeat % 2 == 0 else PATHS[::-1]:
                    result = run_measurement(args, size, path)
                    results.setdefault((size, path), []).append(result)
                    print(f"  {size} {path}: {result['tokens'] / result['seconds']:,.0f} tokens/s", file=sys.stderr,
                          flush=True)

    memory = "peak GPU MiB" if device.type == "cuda" else "peak RSS MiB"
    print(f"| size | path | tokens/s (median, best) | clips/s | step time s (median, min) | {memory} | "
          f"packed/padded tokens/s | padded-token waste |")
    print("|---|---|---|---|---|---|---|---|")
    tokens_per_s, clips_per_s = {}, {}
    for size in args.sizes:
        for path in PATHS:
            runs = results[size, path]
            seconds = [r["seconds"] for r in runs]
            median, steps, tokens = statistics.median(seconds), runs[0]["steps"], runs[0]["tokens"]
            tokens_per_s[size, path] = tokens / median
            clips_per_s[size, path] = runs[0]["clips"] / median
            waste = 1 - tokens / runs[0]["padded_tokens"] if path == "padded" else 0.0
            speedup = f"{tokens_per_s[size, 'packed'] / tokens_per_s[size, path]:.2f}x" if path == "padded" else ""
            peak = max(r["peak_gpu_mb"] if device.type == "cuda" else r["peak_rss_mb"] for r in runs)
            print(f"| {size} | {path} | {tokens / median:,.0f} ({tokens / min(seconds):,.0f}) | "
                  f"{clips_per_s[size, path]:.1f} | {median / steps:.2f} ({min(seconds) / steps:.2f}) | {peak:,.0f} | "
                  f"{speedup} | {100 * waste:.0f}% |")
    first = results[args.sizes[0], "padded"][0]
    print(f"\npadding on this mix: the padded encoder runs {first['padded_tokens'] / first['tokens']:.2f}x the real "
          f"tokens. Where the step's cost follows its token count (a CPU) that caps what packing gains, and only as "
          f"far as the encoder dominates (token building, targets, decoder, optimizer and EMA are shared); on a "
          f"GPU, masked attention over the padded length and the padded kernels can cost more than their token "
          f"share")
    tokens_per_clip = results[args.sizes[0], "packed"][0]["tokens"] / results[args.sizes[0], "packed"][0]["clips"]
    print(f"\nthis mix: {tokens_per_clip:.0f} tokens (teacher + student) per clip; a full {config.crop_seconds:g} s "
          f"clip takes {full_clip_tokens(config):.0f}")
    print(f"paper schedule ({PAPER_STEPS:,} steps x {PAPER_CLIPS_PER_STEP} clips) at the packed rate, "
          f"device-hours on {device_name}:")
    for size in args.sizes:
        clips = PAPER_STEPS * PAPER_CLIPS_PER_STEP
        this_mix = clips / clips_per_s[size, "packed"] / 3600
        full = clips * full_clip_tokens(config) / tokens_per_s[size, "packed"] / 3600
        print(f"  ECHO-{size}: {this_mix:,.0f} h with this mix of 1-10 s crops, {full:,.0f} h with "
              f"{config.crop_seconds:g} s crops (from tokens/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
