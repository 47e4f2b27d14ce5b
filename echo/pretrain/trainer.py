"""The pretraining run: config, distributed setup, the training step, logging, checkpoints, export.

One process per device (`torchrun --nproc_per_node=N -m echo pretrain ...`; NCCL on GPUs, gloo on CPU), each
reading its own share of the corpus. The student and decoder are trained under DDP; the teacher is the EMA of
the student, updated identically on every rank, so it never needs communicating.
"""
from __future__ import annotations

import copy
import csv
import json
import os
import time
from contextlib import nullcontext
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from .. import checkpoint as model_files
from .. import host_memory
from ..model import EchoConfig, EchoModel
from ..packed import Packing
from . import checkpoints, schedule
from .objective import UTTERANCE_TARGETS, ConvDecoder, Learner, teacher_targets
from .sampling import MIN_CLIP_SECONDS, BatchStream, SamplingConfig, nominal_clips_per_batch
from .shards import open_corpus


@dataclass
class PretrainConfig:
    data: str
    out: str
    size: str = "tiny"
    dim: int | None = None  # overrides of the preset, for custom (e.g. test) sizes
    depth: int | None = None
    heads: int | None = None
    steps: int = 400_000
    # sampling fields: their defaults are SamplingConfig's, the one place they are set
    crop_seconds: float = SamplingConfig.crop_seconds
    min_seconds: float = 1.0
    min_bands: int = SamplingConfig.min_bands
    max_bands: int = SamplingConfig.max_bands
    clones: int = SamplingConfig.clones
    mask_ratio: float = SamplingConfig.mask_ratio
    tokens_per_batch: int = SamplingConfig.tokens_per_batch  # teacher tokens per rank and step
    lr: float | None = None  # peak lr; default base_lr x clips per step (all ranks) / 256
    base_lr: float = 1e-4
    min_lr: float = 1e-5
    warmup: int | None = None  # default 5% of the steps
    weight_decay: float = 0.05
    clip_grad: float = 4.0
    ema_start: float = 0.9998
    ema_end: float = 0.99999
    ema_anneal_steps: int | None = None  # default: all the steps
    decoder_layers: int = 4
    decoder_kernel: int = 3
    decoder_groups: int = 16
    utterance_weight: float = 1.0
    utterance_target: str = "frame-mean"  # objective.UTTERANCE_TARGETS
    precision: str = "auto"  # auto (bf16 where the GPU supports it), fp32, bf16
    workers: int = 2  # DataLoader workers per rank
    seed: int = 0
    save_every: int = 1000
    keep: int = 3
    log_every: int = 50
    export: str = "teacher"
    device: str | None = None
    manifest: str | None = None

    # What a resumed run may change without changing what it computes.
    FREE_ON_RESUME = ("data", "out", "save_every", "keep", "log_every", "export", "device", "manifest")

    def __post_init__(self):
        self.sampling, self.model_config  # building them validates their fields
        if self.steps <= 0 or self.keep <= 0 or self.save_every <= 0 or self.log_every <= 0:
            raise ValueError(f"steps ({self.steps}), keep ({self.keep}), save_every ({self.save_every}) and "
                             f"log_every ({self.log_every}) must be positive")
        if self.min_seconds < MIN_CLIP_SECONDS:
            raise ValueError(f"min_seconds must be at least {MIN_CLIP_SECONDS} (two patches, one to mask), "
                             f"got {self.min_seconds}")
        if self.utterance_target not in UTTERANCE_TARGETS:
            raise ValueError(f"utterance_target must be one of {UTTERANCE_TARGETS}, got {self.utterance_target!r}")
        if not 0 < self.ema_start <= self.ema_end < 1:
            raise ValueError(f"need 0 < ema_start <= ema_end < 1, got {self.ema_start} and {self.ema_end}")
        if self.precision not in ("auto", "fp32", "bf16") or self.export not in ("teacher", "student"):
            raise ValueError(f"precision must be auto/fp32/bf16 and export teacher/student, got {self.precision!r} "
                             f"and {self.export!r}")

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.crop_seconds, self.min_bands, self.max_bands, self.clones, self.mask_ratio,
                              self.tokens_per_batch)

    @property
    def model_config(self) -> EchoConfig:
        overrides = {k: v for k, v in (("dim", self.dim), ("depth", self.depth), ("heads", self.heads)) if v}
        return EchoConfig.preset(self.size, **overrides)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def check_resumable(self, saved: dict) -> None:
        # A field the saved run predates had its default there.
        saved = {**{f.name: f.default for f in fields(self) if f.default is not MISSING}, **saved}
        changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in self.to_dict().items()
                   if k not in self.FREE_ON_RESUME and saved.get(k) != v]
        if changed:
            raise ValueError(f"{self.out} holds a run with another config; resuming would not continue it "
                             f"({'; '.join(changed)}). Use a new --out or the same options")


def setup_distributed(device: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; one process alone needs none of it."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if device.index is None:  # plain "cuda": this process's GPU
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def parameter_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only, not on biases, norms, CLS or mask tokens."""
    decay, plain = [], []
    for name, param in module.named_parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 and not name.endswith("_token") else plain).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


class CsvLog:
    """steps.csv in the run folder; on resume, rows after the checkpoint's step are dropped."""

    COLUMNS = ("step", "loss", "frame_loss", "utterance_loss", "lr", "ema_decay", "steps_per_s", "tokens_per_s",
               "clips", "audio_seconds")

    def __init__(self, path: Path, resumed_step: int):
        self.path = path
        rows = []
        if path.is_file() and resumed_step:
            with open(path, newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= resumed_step]
        temporary = path.with_name(path.name + ".tmp")
        with open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, self.COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(temporary, path)

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, self.COLUMNS).writerow(row)


class Meter:
    """Sums since the last log line, reduced over ranks when read."""

    KEYS = ("loss", "frame_loss", "utterance_loss", "steps", "tokens", "clips", "audio_seconds")

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.sums = torch.zeros(len(self.KEYS), dtype=torch.float64, device=self.device)
        self.started = time.perf_counter()

    def add(self, loss, frame, utterance, tokens: int, clips: int, seconds: float):
        self.sums += torch.stack([loss.detach().double(), frame.double(), utterance.double(),
                                  *torch.tensor([1, tokens, clips, seconds], dtype=torch.float64, device=self.device)])

    def read(self, world: int) -> dict:
        if world > 1:
            dist.all_reduce(self.sums)
        values = dict(zip(self.KEYS, self.sums.tolist()))
        elapsed = time.perf_counter() - self.started
        steps = values["steps"] / world
        out = {k: values[k] / values["steps"] for k in ("loss", "frame_loss", "utterance_loss")}
        out.update(steps_per_s=steps / elapsed, tokens_per_s=values["tokens"] / elapsed, clips=int(values["clips"]),
                   audio_seconds=values["audio_seconds"])
        self.reset()
        return out


NO_STEP = torch.iinfo(torch.int64).max  # "no non-finite loss yet"


def stop_if_diverged(first_nonfinite: torch.Tensor, world: int, out: Path) -> None:
    """Raise when a step (on any rank) had a NaN or infinite loss or gradient. Its update made every weight NaN,
    so the run stops before logging that as progress or checkpointing it: checkpoints/ keeps the last good ones.
    The flag lives on the device and is read only here, at log and checkpoint steps, so other steps never wait."""
    if world > 1:
        dist.all_reduce(first_nonfinite, op=dist.ReduceOp.MIN)
    step = int(first_nonfinite)
    if step != NO_STEP:
        raise ValueError(f"the loss or its gradients were NaN or infinite at step {step}; stopped without "
                         f"checkpointing it ({out / 'checkpoints'} keeps the last good checkpoints). Lower --lr or "
                         f"check the data")


def export(model: EchoModel, out: Path) -> Path:
    """The encoder as RUN_DIR/model.safetensors, the released key layout (loadable by echo.load)."""
    return model_files.save(model, Path(out) / "model.safetensors")


def checkpoint_encoder(saved: dict, which: str | None = None) -> EchoModel:
    """The teacher or student of a loaded checkpoint; `which` defaults to the run's own export choice."""
    model = EchoModel(PretrainConfig(**saved["config"]).model_config)
    model.load_state_dict(saved[which or saved["config"]["export"]])
    return model


def run_encoder(run_dir, which: str | None = None, step: int | None = None) -> tuple[EchoModel, dict]:
    """(the teacher or student of a run's checkpoint at `step`, default the newest; that checkpoint)."""
    folder = Path(run_dir) / "checkpoints"
    if step is None:
        saved = checkpoints.load_latest(folder)
        if saved is None:
            raise ValueError(f"no checkpoint in {folder}")
    else:
        path = folder / checkpoints.file_name(step)
        if not path.is_file():
            steps = [int(checkpoints.NAME.match(p.name)[1]) for p in checkpoints.checkpoint_paths(folder)]
            raise ValueError(f"no checkpoint of step {step} in {folder} (it holds steps {steps or 'none'})")
        saved = checkpoints.read(path)
    return checkpoint_encoder(saved, which), saved


def export_run(run_dir, which: str = "teacher") -> Path:
    """Export the teacher or student of a run's newest checkpoint."""
    return export(run_encoder(run_dir, which)[0], Path(run_dir))


def train(config: PretrainConfig, progress: bool = True, stop_at: int | None = None) -> dict:
    """Run (or resume) pretraining to config.steps. `stop_at` ends the process's work after that step as a
    kill would (no final checkpoint or export): for tests of exact resumption."""
    rank, world, device = setup_distributed(config.device)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = checkpoints.load_latest(out / "checkpoints")
    if saved is not None:
        config.check_resumable(saved["config"])
        if (saved["world"], saved["workers"]) != (world, config.workers):
            raise ValueError(f"the run was started on {saved['world']} processes with {saved['workers']} data "
                             f"workers each; resume it the same way (now {world} and {config.workers})")
    if rank == 0:
        print(json.dumps(config.to_dict(), indent=2))
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        corpus = open_corpus(config.data, config.min_seconds, config.manifest)  # indexes (or reuses) the manifest
    if world > 1:
        dist.barrier()
    if rank != 0:
        corpus = open_corpus(config.data, config.min_seconds, config.manifest)
    if rank == 0:
        print(f"data: {corpus.describe()}")

    torch.manual_seed(config.seed)  # the same initial weights on every rank
    student = EchoModel(config.model_config)
    decoder = ConvDecoder(student.config.dim, config.decoder_layers, config.decoder_kernel, config.decoder_groups)
    learner = Learner(student, decoder, config.utterance_weight).to(device)
    teacher = copy.deepcopy(student).requires_grad_(False)
    clips_per_step = world * nominal_clips_per_batch(config.sampling)
    peak = config.lr if config.lr is not None else config.base_lr * clips_per_step / 256
    warmup = config.warmup if config.warmup is not None else max(1, config.steps // 20)
    lr_schedule = schedule.CosineSchedule(peak, min(config.min_lr, peak), warmup, config.steps)
    optimizer = torch.optim.AdamW(parameter_groups(learner, config.weight_decay), lr=peak, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule)
    step = 0
    if saved is not None:
        student.load_state_dict(saved["student"])
        teacher.load_state_dict(saved["teacher"])
        decoder.load_state_dict(saved["decoder"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        checkpoints.restore_rng_states(saved["rng"])
        step = saved["step"]
        if rank == 0:
            print(f"resuming at step {step}")
    model = torch.nn.parallel.DistributedDataParallel(learner) if world > 1 else learner
    anneal = config.ema_anneal_steps or config.steps
    bf16 = config.precision == "bf16" or (
        config.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    if rank == 0:
        print(f"{world} process(es) on {device}, {'bf16' if bf16 else 'fp32'}; peak lr {peak:.3g} "
              f"(~{clips_per_step} clips per step), warm-up {warmup} steps")
        advice = host_memory.allocator_advice(device.type)
        if advice:
            print(advice)

    def state() -> dict:
        return {"step": step, "student": student.state_dict(), "teacher": teacher.state_dict(),
                "decoder": decoder.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": checkpoints.rng_states(), "config": config.to_dict(),
                "world": world, "workers": config.workers}

    stream = BatchStream(corpus, config.sampling, config.seed, rank, world, config.workers, consumed=step)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=config.workers,
                                         pin_memory=device.type == "cuda")
    log = CsvLog(out / "steps.csv", step) if rank == 0 else None
    meter = Meter(device)
    bar = tqdm(total=config.steps, initial=step, disable=rank != 0 or not progress, unit="step")
    last = {}
    first_nonfinite = torch.full((), NO_STEP, dtype=torch.int64, device=device)  # step of the first bad loss
    for host_batch in loader:
        if step >= config.steps or (stop_at is not None and step >= stop_at):
            break
        batch = host_batch.to(device, non_blocking=True)
        teacher_packing = Packing.from_lengths(host_batch.lengths + 1, device)
        student_packing = Packing.from_lengths(host_batch.student_lengths, device)
        with autocast:
            targets, utterance_targets = teacher_targets(teacher, batch, teacher_packing, config.utterance_target)
            loss, frame, utterance = model(batch, student_packing, targets, utterance_targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(learner.parameters(), config.clip_grad)
        optimizer.step()
        scheduler.step()
        decay = schedule.ema_decay(step, config.ema_start, config.ema_end, anneal)
        schedule.ema_update(teacher, student, decay)
        step += 1
        finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)  # a finite loss can still overflow backward
        first_nonfinite = torch.where(finite, first_nonfinite, first_nonfinite.clamp(max=step))
        if step % config.log_every == 0 or step % config.save_every == 0 or step == config.steps:
            stop_if_diverged(first_nonfinite, world, out)
        meter.add(loss, frame, utterance, host_batch.teacher_tokens + host_batch.student_tokens, host_batch.clips,
                  host_batch.audio_seconds)
        if step % config.log_every == 0 or step == config.steps:
            last = {"step": step, **meter.read(world), "lr": lr_schedule.lr(step - 1), "ema_decay": decay}
            if rank == 0:
                log.write(last)
                bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}", ema=f"{decay:.6f}",
                                tok_s=f"{last['tokens_per_s']:.0f}", it_s=f"{last['steps_per_s']:.2f}")
        bar.update(1)
        if rank == 0 and (step % config.save_every == 0 or step == config.steps):
            checkpoints.save(out / "checkpoints", step, state(), config.keep)
    bar.close()
    exported = None
    if rank == 0 and step >= config.steps:
        exported = export(teacher if config.export == "teacher" else student, out)
        trained = f"last loss {last['loss']:.4f}" if last else "the run was already finished"  # not "loss nan"
        print(f"done: {step} steps; {trained}; {config.export} -> {exported}")
    if world > 1:
        dist.barrier()
    return {"step": step, "student": student, "teacher": teacher, "decoder": decoder, "exported": exported,
            "last": last}
