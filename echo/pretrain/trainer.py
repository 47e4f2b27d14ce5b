"""The pretraining run: config, distributed setup, the training step, logging, checkpoints, export.

One process per device (`torchrun --nproc_per_node=N -m echo pretrain ...`; NCCL on GPUs, gloo on CPU), each
reading its own share of the corpus. The student and decoder are trained under DDP; the teacher is the EMA of
the student, updated identically on every rank, so it never needs communicating.
"""
from __future__ import annotations

import copy
import csv
import json
import math
import os
import shlex
import signal
import time
from contextlib import nullcontext
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from .. import checkpoint as model_files
from .. import atomic, geometry, host_memory, process_group
from ..model import PRESETS, EchoConfig, EchoModel
from ..packed import Packing
from ..wording import counted
from . import checkpoints, schedule
from .objective import UTTERANCE_TARGETS, ConvDecoder, Learner, check_decoder_shape, teacher_targets
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
    init: str | None = None  # a model to start from (file, run folder or name): continued pretraining
    steps: int = 400_000
    # sampling fields: their defaults are SamplingConfig's, the one place they are set
    crop_seconds: float = SamplingConfig.crop_seconds
    shortest_crop_seconds: float | None = SamplingConfig.shortest_crop_seconds
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
    export: str | None = None  # teacher or student; not given: a resumed run's own choice, a new run's teacher
    device: str | None = None
    manifest: str | None = None

    # What a resumed run may change without changing what it computes. (--data may name a moved copy of the
    # corpus; the checkpoint's fingerprint of it is checked instead, check_same_corpus.)
    # precision too: `auto` follows the device, and a resume in either precision continues the run, with a note
    FREE_ON_RESUME = ("data", "out", "save_every", "keep", "log_every", "export", "device", "manifest", "precision")

    def __post_init__(self):
        self.sampling, self.model_config  # building them validates their fields
        # groups that do not divide the width are refused by train() for a new run only: a run started before
        # that was checked (its decoder has gcd(groups, width) groups) still resumes, and its checkpoints export
        check_decoder_shape(None, self.decoder_layers, self.decoder_kernel, self.decoder_groups)
        # `not value > 0` rather than `value <= 0`: NaN is refused too. None means "the default". An infinite lr
        # or weight decay makes the first update's weights NaN under a finite loss: that step's checkpoint would be
        # written before the next step's loss showed it.
        problems = [f"{name} must be {rule}, got {value}" for name, value, rule, fine in (
            ("steps", self.steps, "positive", self.steps > 0),
            ("keep", self.keep, "positive", self.keep > 0),
            ("save_every", self.save_every, "positive", self.save_every > 0),
            ("log_every", self.log_every, "positive", self.log_every > 0),
            ("lr", self.lr, "positive and finite", self.lr is None or 0 < self.lr < math.inf),
            ("base_lr", self.base_lr, "positive and finite", 0 < self.base_lr < math.inf),
            ("min_lr", self.min_lr, "zero or more and finite", 0 <= self.min_lr < math.inf),
            ("warmup", self.warmup, "zero or more", self.warmup is None or self.warmup >= 0),
            ("ema_anneal_steps", self.ema_anneal_steps, "positive",
             self.ema_anneal_steps is None or self.ema_anneal_steps > 0),
            ("clip_grad", self.clip_grad, "positive", self.clip_grad > 0),
            ("weight_decay", self.weight_decay, "zero or more and finite", 0 <= self.weight_decay < math.inf),
            ("utterance_weight", self.utterance_weight, "zero or more and finite",
             0 <= self.utterance_weight < math.inf),
            ("workers", self.workers, "zero or more", self.workers >= 0),
            # torch.manual_seed takes 64 bits: a larger seed failed after the indexing, as "Overflow when unpacking"
            ("seed", self.seed, "in 0 .. 2**64 - 1", 0 <= self.seed < 2**64)) if not fine]
        if problems:
            raise ValueError("; ".join(problems))
        if not self.min_seconds >= MIN_CLIP_SECONDS:  # NaN too
            raise ValueError(f"min_seconds must be at least {MIN_CLIP_SECONDS} (two patches, one to mask), "
                             f"got {self.min_seconds}")
        if self.utterance_target not in UTTERANCE_TARGETS:
            raise ValueError(f"utterance_target must be one of {UTTERANCE_TARGETS}, got {self.utterance_target!r}")
        if not 0 < self.ema_start <= self.ema_end < 1:
            raise ValueError(f"need 0 < ema_start <= ema_end < 1, got {self.ema_start} and {self.ema_end}")
        if self.precision not in ("auto", "fp32", "bf16") or self.export not in (None, "teacher", "student"):
            raise ValueError(f"precision must be auto/fp32/bf16 and export teacher/student, got {self.precision!r} "
                             f"and {self.export!r}")

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.crop_seconds, self.min_bands, self.max_bands, self.clones, self.mask_ratio,
                              self.tokens_per_batch, self.shortest_crop_seconds)

    @property
    def model_config(self) -> EchoConfig:
        overrides = {k: v for k, v in (("dim", self.dim), ("depth", self.depth), ("heads", self.heads))
                     if v is not None}
        return EchoConfig.preset(self.size, **overrides)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def clips_per_step(self, world: int) -> int:
        """Clips of a step of all `world` ranks, as the derived lr counts them."""
        return world * nominal_clips_per_batch(self.sampling)

    def peak_lr(self, world: int) -> float:
        """--lr, or the lr derived from --base-lr and the clips of a step on `world` ranks."""
        return self.lr if self.lr is not None else self.base_lr * self.clips_per_step(world) / 256

    def with_lr_option_of(self, saved: dict, trained_lr: float, world: int) -> PretrainConfig:
        """This config with the lr option of the saved config (None where the run derived its lr) where its own
        peak lr on `world` ranks is `trained_lr`, the one that run trained with: `--lr X` resumes a run whose
        derived lr was X (a derived lr follows the world size, which a config does not hold), and the run's
        config stays as it was, so the command it was started with still resumes it."""
        return replace(self, lr=saved.get("lr")) if self.peak_lr(world) == trained_lr else self

    def check_resumable(self, saved: dict, trained_lr: float | None = None) -> None:
        """Refuse a config that would not continue the saved run's; `trained_lr`, the peak lr the run trained
        with, describes a derived lr (None in `saved`) in the refusal."""
        # A field the saved run predates had its default there.
        saved = with_derived_defaults({**{f.name: f.default for f in fields(self) if f.default is not MISSING},
                                       **saved})

        def described(key: str, value) -> str:
            derived_lr = key == "lr" and value is None and trained_lr is not None
            return f"derived {trained_lr!r}" if derived_lr else repr(value)

        changed = [f"{k}: {described(k, saved.get(k))} -> {v!r}"
                   for k, v in with_derived_defaults(self.to_dict()).items()
                   if k not in self.FREE_ON_RESUME and saved.get(k) != v]
        if changed:
            raise ValueError(f"{self.out} holds a run with another config; resuming would not continue it "
                             f"({'; '.join(changed)}). Use a new --out or the same options")

    def check_same_corpus(self, saved: dict | None, fingerprint: dict) -> None:
        """Refuse a resume over other data, by the corpus's `fingerprint` (--data may name a moved copy;
        checkpoints without a fingerprint predate it and pass)."""
        if saved is not None and saved.get("corpus") not in (None, fingerprint):
            def described(facts: dict) -> str:
                return ", ".join(f"{key} {value}" for key, value in facts.items())

            raise ValueError(f"{self.data} is not the corpus the run in {self.out} was trained on (it had "
                             f"{described(saved['corpus'])}; this has {described(fingerprint)}). Resume "
                             f"with the same files, or start a new run (a new --out)")


def with_derived_defaults(config: dict) -> dict:
    """A config's fields with the defaults that follow from other fields filled in (warm-up 5% of the steps, the
    EMA annealed over all of them, the preset's shape): `--warmup 5` names the same run as the default where that
    is 5%, `--dim 192` the same as tiny's own width. (The derived lr also follows the world size, which a config
    does not hold.)"""
    preset = EchoConfig.preset(config["size"])
    return {**config, "warmup": max(1, config["steps"] // 20) if config["warmup"] is None else config["warmup"],
            "ema_anneal_steps": config["ema_anneal_steps"] or config["steps"],
            **{name: getattr(preset, name) if config[name] is None else config[name]
               for name in ("dim", "depth", "heads")}}


def initial_encoder(config: PretrainConfig) -> EchoModel | None:
    """The model `config.init` names, whose weights a new run starts from, checked to have the run's shape: the
    run's options name the shape (it is in config.json and every checkpoint), and those to give are said."""
    if config.init is None:
        return None
    model = model_files.load(config.init)
    if model.config == config.model_config:
        return model

    def described(model_config: EchoConfig, names=("dim", "depth", "heads")) -> str:
        return ", ".join(f"{name} {getattr(model_config, name)}" for name in names)

    shape = {name: getattr(model.config, name) for name in ("dim", "depth", "heads")}
    if model.config != EchoConfig.preset("tiny", **shape):  # the MLP width or an eps, which no option sets
        fixed = ("mlp_ratio", "layer_norm_eps", "final_norm_eps")
        raise ValueError(f"--init {config.init} has {described(model.config, fixed)}, where pretraining builds "
                         f"the presets' {described(EchoConfig.preset('tiny'), fixed)}")
    size = next((name for name in PRESETS if EchoConfig.preset(name) == model.config), None)
    options = f"--size {size}" if size else " ".join(f"--{name} {value}" for name, value in shape.items())
    # they override the preset: "--size tiny" alone was the advice to a run given --size tiny --heads 6
    given = " ".join(f"--{name} {getattr(config, name)}" for name in shape if getattr(config, name) is not None)
    if size and given:
        options += f" and without {given}"
    raise ValueError(f"--init {config.init} is a model of {described(model.config)}, and this run's options make "
                     f"{described(config.model_config)}: start it with {options}")


def _written_config(out: Path) -> dict:
    """The config a run stopped before its first checkpoint wrote (config.json), or {} for a new run."""
    try:
        written = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return written if isinstance(written, dict) else {}


def schedule_notes(peak: float, min_lr: float, warmup: int, steps: int) -> list[str]:
    """What the schedule will do that its options do not say: settings it can only honour in part."""
    notes = []
    if min_lr > peak:
        notes.append(f"--min-lr {min_lr:.3g} is above the peak lr {peak:.3g}: the lr stays at the peak after the "
                     "warm-up (set --lr, or a lower --min-lr)")
    if warmup > steps:
        notes.append(f"the warm-up ({warmup} steps) is longer than the run ({steps} steps): the peak lr is never "
                     "reached")
    return notes


def training_device(name: str | None, local_rank: int = 0) -> torch.device:
    """The device `--device` names (default: a GPU where there is one; plain "cuda": this process's GPU).
    ValueError for a name torch does not know or a GPU this machine lacks: torch's own errors for them are
    tracebacks from deep inside it."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device.index >= gpus:
            raise ValueError(f"device {device} is not on this machine: it has {gpus} CUDA GPU(s)")
    return device


# What a run needs at least, to refuse one that cannot fit before the corpus is indexed (hours on a large one) or a
# model is built: a mistyped --tokens-per-batch packed clips into its first batch until the memory ran out, an
# absurd --dim or --depth failed in torch's allocator. Lower bounds, so that no run that fits is refused:
# - weights: those of the student's and decoder's matrices (biases, norms, tokens: under 2% of a preset's), in
#   float32 with a gradient and two AdamW moments each, and the encoder's with the EMA teacher's copy too;
# - a step's activations, per unit of width: per visible student token and encoder layer (the teacher's outputs
#   included), and per decoder row (every patch of every clone) and decoder layer. A step's peak memory against its
#   teacher tokens, measured on a CPU (glibc's mmap threshold at 64 KiB, so that freed blocks leave the process;
#   widths 64-192, 2-12 layers, 1-4 decoder layers, 1-4 clones), fitted about 67 and 20-28 bytes in fp32, 39-54
#   and 12-21 under bf16 autocast; about half of the bf16 figures is taken (a GPU's fused attention keeps no
#   probabilities), a bound of 0.3-0.7x every measured step.
# ECHO-base at 65536 tokens (4 clones, mask 0.8) needs at least 24 GiB by these, ECHO-large 54 GiB: both pass on
# an 80 GB GPU; the default model's recipe (ECHO-tiny, 16384 tokens) 1.5 GiB.
ENCODER_WEIGHT_BYTES = 4 * 5  # weight, gradient, two AdamW moments, EMA teacher
DECODER_WEIGHT_BYTES = 4 * 4
STUDENT_ACTIVATION_BYTES = 32
DECODER_ACTIVATION_BYTES = 10


def device_memory(device: torch.device) -> int:
    """The total memory of `device` in bytes: the GPU's own, or the machine's for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def matrix_weights(config: PretrainConfig) -> tuple[int, int]:
    """(encoder, decoder) weights in their matrices, from the shapes alone: a model too large to fit cannot be
    built to count them. Attention 4 D^2 and MLP 2 r D^2 per layer and the patch projection; the grouped convs
    (with the run's gcd grouping) and the projection of the decoder."""
    model = config.model_config
    dim = model.dim
    encoder = model.depth * (4 + 2 * model.mlp_ratio) * dim * dim + geometry.BAND_BINS * geometry.PATCH_FRAMES * dim
    groups = math.gcd(config.decoder_groups, dim)
    decoder = config.decoder_layers * dim * (dim // groups) * config.decoder_kernel + dim * dim
    return encoder, decoder


def binary_size(size: float) -> str:
    """`size` bytes in GiB, or in TiB to EiB for sizes no machine has."""
    units = ("GiB", "TiB", "PiB", "EiB")
    power = min(len(units) - 1, max(0, int(math.log(max(size, 1), 1024)) - 3))
    return f"{size / 1024 ** (power + 3):.1f} {units[power]}"


def check_memory(config: PretrainConfig, device: torch.device) -> None:
    """ValueError naming the option when the run needs more than the total memory of `device` (the CPU's shared by
    the processes torchrun started on this machine), by the lower bounds above: the run would fail at its first
    step, or be killed, after the corpus was indexed."""
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if device.type == "cpu" else 1
    total = device_memory(device)
    available = total // ranks
    has = f"{device} has {binary_size(total)}" + (f", shared by this machine's {ranks} processes" if ranks > 1 else "")
    model = config.model_config
    encoder, decoder = matrix_weights(config)
    weights = encoder * ENCODER_WEIGHT_BYTES + decoder * DECODER_WEIGHT_BYTES
    if weights > available:
        given = " ".join([f"--size {config.size}"] + [f"--{name} {value}" for name, value in
                                                       (("dim", config.dim), ("depth", config.depth))
                                                       if value is not None])
        raise ValueError(f"the model of {given} (width {model.dim}, {model.depth} layers) with --decoder-layers "
                         f"{config.decoder_layers} cannot fit in memory: its matrices hold {encoder + decoder:.3g} "
                         f"weights, which with their gradients, AdamW moments and the EMA teacher need at least "
                         f"{binary_size(weights)}; {has}. Choose a smaller model")
    per_token = config.clones * model.dim * ((1 - config.mask_ratio) * model.depth * STUDENT_ACTIVATION_BYTES
                                             + config.decoder_layers * DECODER_ACTIVATION_BYTES)
    activations = per_token * config.tokens_per_batch
    if weights + activations > available:
        raise ValueError(
            f"--tokens-per-batch {config.tokens_per_batch} cannot fit in memory: a step of it needs at least "
            f"{binary_size(activations)} of activations (--clones {config.clones} masked copies of each token "
            f"through {model.depth} student layers of width {model.dim} and --decoder-layers "
            f"{config.decoder_layers}), besides {binary_size(weights)} for the weights and their training state; "
            f"{has}. By this lower bound at most {int((available - weights) / per_token)} tokens could fit: lower "
            f"--tokens-per-batch (16384 to 65536 are usual)")


def setup_distributed(device: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; one process alone needs none of it."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    device = training_device(device, int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        process_group.join("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def attempt(function, *args):
    """(function(*args), None), or (None, the exception it raised)."""
    try:
        return function(*args), None
    except Exception as error:
        return None, error


def raise_together(error: Exception | None, world: int, device: torch.device) -> None:
    """Raise `error` here and an error on every other rank when any rank met one: a rank that went on alone
    would wait for the failed one at its next collective, forever. Every rank calls it."""
    if world > 1:
        failed = every_rank(torch.tensor([error is not None], device=device), world)[:, 0].nonzero()[:, 0].tolist()
        if failed and error is None:  # named: the ranks print at once, and theirs came below as often as above
            error = ValueError(f"{'rank' if len(failed) == 1 else 'ranks'} {', '.join(map(str, failed))} of this "
                               f"run failed, so this process stopped too; the failed process prints why")
        if error is not None:
            error.raised_together = True  # every rank raises here, none waits in a collective: see train()
    if error is not None:
        raise error


def parameter_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only, not on biases, norms, CLS or mask tokens."""
    decay, plain = [], []
    for name, param in module.named_parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 and not name.endswith("_token") else plain).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


class CsvLog:
    """steps.csv in the run folder; on resume, rows after the checkpoint's step are dropped, and so are rows a
    power cut left damaged (appended rows are not flushed to the disk, checkpoints are: a row can come back as
    NUL bytes beside the checkpoint of its step)."""

    COLUMNS = ("step", "loss", "frame_loss", "utterance_loss", "lr", "ema_decay", "steps_per_s", "tokens_per_s",
               "clips", "audio_seconds")

    def __init__(self, path: Path, resumed_step: int):
        self.path = path
        rows = []
        if path.is_file() and resumed_step:
            with open(path, encoding="utf-8", newline="") as handle:
                steps_and_rows = [(logged_step(r), r) for r in csv.DictReader(handle)]
            rows = [r for step, r in steps_and_rows if step is not None and step <= resumed_step]
            damaged = sum(step is None for step, _ in steps_and_rows)
            if damaged:
                print(f"note: {path} held {damaged} damaged row(s) (a crash or power cut while it was written); "
                      "dropped")
        atomic.write_csv(path, self.COLUMNS, rows)

    def write(self, row: dict) -> None:
        """Append a row; OSError naming the file and the checkpoint the run resumes from when that fails (a full
        disk: Python's error names neither)."""
        try:
            with open(self.path, "a", encoding="utf-8", newline="") as handle:
                csv.DictWriter(handle, self.COLUMNS).writerow(row)
        except OSError as error:
            raise OSError(f"{self.path} could not be written ({error}); "
                          f"{checkpoints.resume_note(self.path.parent / 'checkpoints')}") from error


def logged_step(row: dict) -> int | None:
    """The step of a steps.csv row, or None for a damaged one."""
    try:
        return int(row["step"])
    except ValueError:
        return None


class Meter:
    """Sums since the last log line, reduced over ranks when read. A checkpoint holds those not yet logged
    (`pending`, each rank's own) and a resumed run starts from them (`restored`), so its first row covers the
    same steps as without the stop, to the last bit (float sums depend on their order: a resumed rank adds on to
    its own sums, as without the stop); the rates count only the steps timed in this process."""

    KEYS = ("loss", "frame_loss", "utterance_loss", "steps", "tokens", "clips", "audio_seconds")

    def __init__(self, device, restored: torch.Tensor | None = None, rank: int = 0):
        """`restored`: a checkpoint's `pending`, a row per rank. Checkpoints written before the rows were kept
        per rank hold one row, the sums of every rank, which rank 0 takes."""
        self.device = device
        self.reset()
        if restored is not None and (restored.dim() == 2 or rank == 0):
            mine = (restored[rank] if restored.dim() == 2 else restored).to(device)
            self.sums += mine
            self.untimed += mine

    def reset(self):
        self.sums = torch.zeros(len(self.KEYS), dtype=torch.float64, device=self.device)
        self.untimed = torch.zeros_like(self.sums)  # the part of `sums` restored from a checkpoint
        self.started = time.perf_counter()

    def add(self, loss, frame, utterance, tokens: int, clips: int, seconds: float):
        self.sums += torch.stack([loss.detach().double(), frame.double(), utterance.double(),
                                  *torch.tensor([1, tokens, clips, seconds], dtype=torch.float64, device=self.device)])

    def read(self, world: int) -> dict:
        sums = torch.stack([self.sums, self.untimed])
        if world > 1:
            dist.all_reduce(sums)
        values = dict(zip(self.KEYS, sums[0].tolist()))
        timed = dict(zip(self.KEYS, (sums[0] - sums[1]).tolist()))
        elapsed = time.perf_counter() - self.started
        out = {k: values[k] / values["steps"] for k in ("loss", "frame_loss", "utterance_loss")}
        out.update(steps_per_s=timed["steps"] / world / elapsed, tokens_per_s=timed["tokens"] / elapsed,
                   clips=int(values["clips"]), audio_seconds=values["audio_seconds"])
        self.reset()
        return out

    def pending(self, world: int) -> torch.Tensor:
        """(world, len(KEYS)) on the CPU: each rank's sums since the last log line (a collective: every rank
        calls it)."""
        return every_rank(self.sums, world)


def every_rank(mine: torch.Tensor, world: int) -> torch.Tensor:
    """(world, *mine.shape) on the CPU: `mine` of each rank, in rank order (a collective: every rank calls it)."""
    if world == 1:
        return mine[None].cpu()
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    return torch.stack(gathered).cpu()


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
                         f"checkpointing it ({out / 'checkpoints'} keeps the last good checkpoints). Check the "
                         f"data, or start again with a lower --lr in a new --out (a run's lr is fixed on resume)")


def export(model: EchoModel, out: Path, encoder: str, step: int) -> Path:
    """The encoder as RUN_DIR/model.safetensors, the released key layout (loadable by echo.load), and
    RUN_DIR/export.json saying which encoder of which step it is (model.json holds the config alone: a teacher and
    a student exported in turn could not be told apart). A disk that cannot take it is said with the file and
    what is kept: "[Errno 28] No space left on device" alone read as if the run were lost."""
    path = Path(out) / "model.safetensors"
    try:
        model_files.save(model, path)
        atomic.write_text(Path(out) / "export.json", json.dumps({"encoder": encoder, "step": step}) + "\n")
        return path
    except OSError as error:
        raise OSError(f"{path} could not be written ({error}); the run's checkpoints are kept, and the same command "
                      f"(or --export-only) exports it again") from None


def checkpoint_encoder(saved: dict, which: str | None = None) -> EchoModel:
    """The teacher or student of a loaded checkpoint, in float32 on the CPU whatever torch's default device and dtype
    (a default meta device gave a model without weights); `which` defaults to the run's own export choice."""
    model = EchoModel(PretrainConfig(**saved["config"]).model_config, device="cpu", dtype=torch.float32)
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
            steps = [checkpoints.step_of(p) for p in checkpoints.checkpoint_paths(folder)]
            raise ValueError(f"no checkpoint of step {step} in {folder} (it holds steps {steps or 'none'})")
        saved = checkpoints.read(path)
    return checkpoint_encoder(saved, which), saved


def export_run(run_dir, which: str | None = None) -> str:
    """Export the teacher or student of a run's newest readable checkpoint (default: the run's own --export);
    what was exported, its step said: an unreadable newer checkpoint makes it an earlier one."""
    model, saved = run_encoder(run_dir, which)
    which = which or saved["config"]["export"]
    path = export(model, Path(run_dir), which, saved["step"])
    return f"the {which} of step {saved['step']} to {path}"


def _leave_stopping_to_trainer(worker_id: int) -> None:
    """A DataLoader worker ignores SIGTERM, as torch's ignore Ctrl-C: torchrun and Slurm send it to a rank's workers
    too, and a worker it ended first turned the trainer's "interrupted: the same command resumes from ..." into a
    traceback (DataLoader worker killed by signal: Terminated). The trainer ends its workers as it stops."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def train(config: PretrainConfig, progress: bool = True, stop_at: int | None = None) -> dict:
    """Run (or resume) pretraining to config.steps. `stop_at` ends the process's work after that step as a
    kill would (no final checkpoint or export): for tests of exact resumption."""
    if stop_at is not None and stop_at < 0:
        raise ValueError(f"stop_at must be zero or more, got {stop_at}")
    made_group = int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized()
    rank, world, device = setup_distributed(config.device)
    # A run needs autograd whatever its caller set (no grad, inference mode), and torch's default device on the CPU:
    # torch's DataLoader and AdamW make tensors there (the run's own device is --device). That default is set only
    # where a caller moved it, as it takes every torch call through Python.
    on_host = nullcontext() if torch.get_default_device().type == "cpu" else torch.device("cpu")
    try:
        with on_host, torch.enable_grad(), torch.inference_mode(False):
            result = _train(config, progress, stop_at, rank, world, device)
    except KeyboardInterrupt:  # the command line prints its message: where the same command resumes
        raise KeyboardInterrupt(checkpoints.resume_note(Path(config.out) / "checkpoints")) from None
    except Exception as error:
        # an error every rank raised at once: the group is destroyed as after a run's end (left alive, gloo's
        # threads aborted the process at exit at times, SIGABRT after the error's message). Not after another
        # error: destroying a group while other ranks wait in a collective can hang them (NCCL)
        if made_group and getattr(error, "raised_together", False):
            dist.barrier()
            dist.destroy_process_group()
        raise
    # after the run's last barrier: a process that exits with its group alive can abort in gloo's threads
    if made_group:
        dist.destroy_process_group()
    return result


def _train(config: PretrainConfig, progress: bool, stop_at: int | None, rank: int, world: int,
           device: torch.device) -> dict:
    # recorded absolute: a run started on a relative --data and resumed from another folder said it had been
    # "trained on data, not data"
    config = replace(config, data=os.path.abspath(config.data))
    if config.init is not None and os.path.exists(os.path.expanduser(config.init)):  # a name ("default") stays one
        config = replace(config, init=os.path.abspath(os.path.expanduser(config.init)))
    _, error = attempt(check_memory, config, device)  # before the corpus is indexed and any model built
    raise_together(error, world, device)
    out = Path(config.out)
    folder = out / "checkpoints"
    found, error = attempt(checkpoints.newest_readable, folder)
    raise_together(error, world, device)
    saved, unreadable_newer = found
    # a shared file system that lists the folder differently on another machine would resume ranks at other steps
    steps = every_rank(torch.tensor([saved["step"] if saved is not None else -1], device=device), world)[:, 0]
    if len(set(steps.tolist())) > 1:
        found_by_rank = ", ".join("none" if step < 0 else str(step) for step in steps.tolist())
        raise ValueError(f"the processes of this run found different newest checkpoints in {folder} (steps by rank: "
                         f"{found_by_rank}); every process must see the same run folder")
    checkpoints.check_run_folder(out, saved)
    if config.export is None:  # a resumed run exports the encoder it was started to export
        started = saved["config"] if saved is not None else _written_config(out)
        config = replace(config, export=started.get("export") or "teacher")
    initial = None
    if saved is None:  # a new run: its decoder groups must divide the width, and --init is read (not on a resume)
        width = config.model_config.dim  # said as the option, as check_memory does: the command line gives it
        if width % config.decoder_groups:
            raise ValueError(f"--decoder-groups must divide the model's width {width}, got {config.decoder_groups}")
        initial, error = attempt(initial_encoder, config)
        raise_together(error, world, device)
    else:
        if (saved["world"], saved["workers"]) != (world, config.workers):
            raise ValueError(f"the run was started on {saved['world']} processes with {saved['workers']} data "
                             f"workers each; resume it the same way (now {world} and {config.workers})")
        trained_lr = saved["scheduler"]["base_lrs"][0]  # the peak lr its optimizer was built with
        # the model the run started from stays the one its config names: a resume does not read --init
        config = replace(config, init=saved["config"].get("init"))
        config = config.with_lr_option_of(saved["config"], trained_lr, world)
        config.check_resumable(saved["config"], trained_lr)
    corpus, error = None, None
    if rank == 0:  # indexes (or reuses) the manifest, which the other ranks then read
        corpus, error = attempt(open_corpus, config.data, config.min_seconds, config.manifest)
    raise_together(error, world, device)  # also: every rank has read its checkpoint before rank 0 sets any aside
    if rank != 0:
        corpus, error = attempt(open_corpus, config.data, config.min_seconds, config.manifest)
    raise_together(error, world, device)
    fingerprint = corpus.fingerprint()  # a hash over every file: once, not at every checkpoint
    config.check_same_corpus(saved, fingerprint)
    if rank == 0:  # the run folder is written only once everything is checked
        out.mkdir(parents=True, exist_ok=True)
        checkpoints.remove_temporaries(folder)
        checkpoints.set_aside(unreadable_newer)
        if saved is None:  # a resumed run's config is its own, in config.json: "resuming at step N" says enough
            print(json.dumps(config.to_dict(), indent=2))
        atomic.write_text(out / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")
        print(f"data: {corpus.describe()}")
        trained_on = saved["config"]["data"] if saved is not None else config.data
        if Path(trained_on).resolve() != Path(config.data).resolve():  # the fingerprint cannot tell contents apart
            print(f"note: the run was trained on {trained_on}, not {config.data}; their files match by name and "
                  f"size, so it goes on over {config.data}")

    torch.manual_seed(config.seed)  # the same initial weights on every rank
    # made in float32 on the CPU, then moved: the same initial weights whatever torch's default device and dtype
    # (a default float64 trained float64 models from other weights)
    host = {"device": "cpu", "dtype": torch.float32}
    student = EchoModel(config.model_config, **host)
    if initial is not None:  # drawn first all the same: the decoder starts as it would from random weights
        student.load_state_dict(initial.state_dict())
    # gcd: the grouping a run started before the groups had to divide the width was built with (checked above
    # for a new run, where it is the groups themselves)
    decoder = ConvDecoder(student.config.dim, config.decoder_layers, config.decoder_kernel,
                          math.gcd(config.decoder_groups, student.config.dim), **host)
    learner = Learner(student, decoder, config.utterance_weight).to(device)
    teacher = copy.deepcopy(student).requires_grad_(False)
    peak = config.peak_lr(world)
    derived = with_derived_defaults(config.to_dict())
    warmup = derived["warmup"]
    lr_schedule = schedule.CosineSchedule(peak, min(config.min_lr, peak), warmup, config.steps)
    optimizer = torch.optim.AdamW(parameter_groups(learner, config.weight_decay), lr=peak, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule)
    step, positions, pending = 0, None, None
    if saved is not None:
        student.load_state_dict(saved["student"])
        teacher.load_state_dict(saved["teacher"])
        decoder.load_state_dict(saved["decoder"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        checkpoints.restore_rng_states(saved["rng"])
        step = saved["step"]
        if "positions" in saved:  # checkpoints written before these were kept resume from `step` alone
            positions = saved["positions"][rank].tolist()
            pending = saved["meter"]
        if rank == 0:
            print(f"resuming at step {step}")
    model = torch.nn.parallel.DistributedDataParallel(learner) if world > 1 else learner
    anneal = derived["ema_anneal_steps"]
    bf16 = config.precision == "bf16" or (
        config.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    if rank == 0:
        print(f"{world} process(es) on {device}, {'bf16' if bf16 else 'fp32'}; peak lr {peak:.3g} "
              f"(~{config.clips_per_step(world)} clips per step), warm-up {warmup} steps")
        for note in schedule_notes(peak, config.min_lr, warmup, config.steps):
            print(f"note: {note}")
        if saved is not None and saved.get("bf16", bf16) != bf16:  # auto follows the device, which may change
            print(f"note: the run trained in {'bf16' if saved['bf16'] else 'fp32'} up to step {step}; it goes on in "
                  f"{'bf16' if bf16 else 'fp32'} (--precision {config.precision} on {device})")
        advice = host_memory.allocator_advice(device.type)
        if advice:
            print(advice)
    # the checkpoint resumed from is in the models and the optimizer now: held as it was loaded, its student and
    # teacher stayed in memory for the whole run (ECHO-small: +140 MB measured; ECHO-base: +650 MB, and +1.3 GB
    # where a GPU run's AdamW moments were copied to the device). So did the --init model, copied into the student
    del saved, found, initial

    def state(positions_of_ranks: torch.Tensor, pending_sums: torch.Tensor) -> dict:
        return {"step": step, "student": student.state_dict(), "teacher": teacher.state_dict(),
                "decoder": decoder.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": checkpoints.rng_states(), "config": config.to_dict(),
                "world": world, "workers": config.workers, "corpus": fingerprint, "bf16": bf16,
                "positions": positions_of_ranks, "meter": pending_sums}

    stream = BatchStream(corpus, config.sampling, config.seed, rank, world, config.workers, consumed=step,
                         positions=positions)
    positions = list(stream.positions)  # per stream of this rank: planned batches trained on
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=config.workers,
                                         pin_memory=device.type == "cuda", worker_init_fn=_leave_stopping_to_trainer)
    log = CsvLog(out / "steps.csv", step) if rank == 0 else None
    meter = Meter(device, pending, rank)
    last = {}
    first_nonfinite = torch.full((), NO_STEP, dtype=torch.int64, device=device)  # step of the first bad loss
    # closed on an error too: the error then starts a line of its own, not the bar's
    with tqdm(total=config.steps, initial=step, disable=rank != 0 or not progress, unit="step") as bar:
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
            positions[host_batch.stream] = host_batch.plan_index + 1
            # a finite loss can still overflow backward
            finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
            first_nonfinite = torch.where(finite, first_nonfinite, first_nonfinite.clamp(max=step))
            if step % config.log_every == 0 or step % config.save_every == 0 or step == config.steps:
                stop_if_diverged(first_nonfinite, world, out)
            meter.add(loss, frame, utterance, host_batch.teacher_tokens + host_batch.student_tokens, host_batch.clips,
                      host_batch.audio_seconds)
            if step % config.log_every == 0 or step == config.steps:
                last = {"step": step, **meter.read(world), "lr": lr_schedule.lr(step - 1), "ema_decay": decay}
                error = None
                if rank == 0:
                    _, error = attempt(log.write, last)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}", ema=f"{decay:.6f}",
                                    tok_s=f"{last['tokens_per_s']:.0f}", it_s=f"{last['steps_per_s']:.2f}")
                raise_together(error, world, device)  # every rank stops, as for a checkpoint below
            bar.update(1)
            if step % config.save_every == 0 or step == config.steps:
                positions_of_ranks = every_rank(torch.tensor(positions, dtype=torch.int64, device=device), world)
                pending_sums = meter.pending(world)
                # a write that failed (a full disk) stops every rank, not rank 0 alone: the others would wait for
                # it at their next collective, forever under a launcher that does not end them as torchrun does
                error = None
                if rank == 0:
                    _, error = attempt(checkpoints.save, folder, step, state(positions_of_ranks, pending_sums),
                                       config.keep)
                raise_together(error, world, device)
    exported, error = None, None
    if rank == 0 and step >= config.steps:
        exported, error = attempt(export, teacher if config.export == "teacher" else student, out, config.export,
                                  step)
    raise_together(error, world, device)
    if rank == 0 and step >= config.steps:
        trained = f"last loss {last['loss']:.4f}" if last else "the run was already finished"  # not "loss nan"
        # quoted, to be pasted: a run folder "my run" gave --model my run, two arguments in a shell
        print(f"done: {counted(step, 'step')}; {trained}; {config.export} -> {exported} (echo.load({str(out)!r}), or "
              f"--model {shlex.quote(str(out))}); the losses in {out / 'steps.csv'}")
    elif rank == 0:  # stopped by stop_at
        print(f"stopped at step {step} of {config.steps} (--stop-at {stop_at}); {checkpoints.resume_note(folder)}")
    if world > 1:
        dist.barrier()
    return {"step": step, "student": student, "teacher": teacher, "decoder": decoder, "exported": exported,
            "last": last}
