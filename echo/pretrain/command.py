"""`python -m echo pretrain`: the options are PretrainConfig's fields (--tokens-per-batch for
tokens_per_batch, ...), so the command line and the saved config.json never drift apart."""
from __future__ import annotations

import logging
import re
from dataclasses import MISSING, fields
from pathlib import Path

from .. import atomic
from ..cli import on_every_rank, user_path
from ..model import PRESETS
from .corpus import MANIFEST_NAME
from .objective import UTTERANCE_TARGETS
from .trainer import PretrainConfig, export_run, train

HELP = {
    "data": "audio folder (WAV/FLAC/OGG/Opus/MP3/AIFF/CAF/W64/RF64, any rate, indexed once into a cached manifest) or "
            "WebDataset shards (a folder of .tar files, one .tar, or a brace pattern)",
    "out": "run folder: config.json, steps.csv, checkpoints/, model.safetensors; an existing run resumes",
    "size": "model preset",
    "dim": "custom width (overrides the preset)",
    "depth": "custom layer count",
    "heads": "custom head count",
    "init": "start from this model's weights, not random ones (a checkpoint file, a run folder, or a name: default, "
            "echo-small, ...): continued pretraining on your data; its shape must be the run's (--size or "
            "--dim/--depth/--heads: the error says which)",
    "crop_seconds": "crop length (<= 20 s, one pass)",
    "shortest_crop_seconds": "crops of random length, log-uniform from this to --crop-seconds, for embeddings of "
                             "short clips (default: every crop is --crop-seconds)",
    "min_seconds": "files shorter than this are skipped",
    "min_bands": "fewest random 32-bin bands per clip",
    "max_bands": "most random 32-bin bands per clip",
    "clones": "masked copies of each clip sharing one teacher pass",
    "mask_ratio": "fraction of each band sequence's patches the student does not see (spec: 0.75-0.8)",
    "tokens_per_batch": "teacher tokens per process and step (clips are packed up to this, nothing padded)",
    "lr": "peak learning rate (default: base-lr x clips per step / 256)",
    "warmup": "warm-up steps (default 5%% of the steps)",
    "ema_anneal_steps": "steps over which the EMA decay rises from ema-start to ema-end (default: all)",
    "utterance_target": "what the student's CLS regresses to: frame-mean = the time mean of the frame targets "
                        "(spec, EAT); layer-mean = the time mean of the teacher's layer outputs without instance "
                        "normalisation (keeps each clip's stationary content)",
    "precision": "bf16 autocast: auto = on GPUs that support it",
    "workers": "DataLoader workers per process",
    "save_every": "checkpoint every N steps",
    "keep": "checkpoints kept",
    "log_every": "log line (steps.csv, progress bar) every N steps",
    "export": "which encoder goes to RUN_DIR/model.safetensors at the end (default: a resumed run's own choice, "
              "also with --export-only; teacher for a new run)",
    "manifest": "where the folder manifest is cached (default DATA/.echo_manifest.csv)",
}
CHOICES = {"size": list(PRESETS), "precision": ["auto", "fp32", "bf16"], "export": ["teacher", "student"],
           "utterance_target": list(UTTERANCE_TARGETS)}
PATHS = ("data", "out", "manifest")


def path_text(text: str) -> str:
    """A path option read as cli.user_path reads one ("~" expanded, an empty one refused: it named the current
    folder, where a run then wrote its files), kept as text for the config."""
    return str(user_path(text))


def add_arguments(parser) -> None:
    for field in fields(PretrainConfig):
        kind = (path_text if field.name in PATHS else int if "int" in field.type else float if "float" in field.type
                else str)
        option = "--" + field.name.replace("_", "-")
        if field.default is MISSING and field.name == "data":  # --export-only reads no data
            parser.add_argument(option, type=kind, help=HELP[field.name] + " (not needed with --export-only)")
        elif field.default is MISSING:
            parser.add_argument(option, type=kind, required=True, help=HELP.get(field.name))
        else:
            default_text = "" if field.default is None else f" (default {field.default})"
            parser.add_argument(option, type=kind, default=field.default, choices=CHOICES.get(field.name),
                                help=(HELP.get(field.name) or field.name.replace("_", " ")) + default_text)
    parser.add_argument("--export-only", action="store_true",
                        help="write model.safetensors from the run's newest checkpoint (the encoder its --export "
                             "named, unless given here) and stop")
    parser.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                        help="end this process after STEP, as a kill would (the checkpoint of a STEP that is a "
                             "multiple of --save-every is written); the same command resumes the run")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.export_only:
        print(f"exported {export_run(args.out, args.export)}")
        return 0
    try:
        config = checked_config(args)
    except ValueError as error:
        on_every_rank(error)
        raise
    train(config, progress=not args.quiet, stop_at=args.stop_at)
    return 0


def checked_config(args) -> PretrainConfig:
    """The run's config from the options, which are checked, and --out and --manifest, before the data is indexed
    (hours)."""
    if args.data is None:
        raise ValueError("--data is needed to train (only --export-only goes without it)")
    if args.stop_at is not None and args.stop_at < 0:
        raise ValueError(f"--stop-at must be zero or more, got {args.stop_at}")
    try:
        config = PretrainConfig(**{f.name: getattr(args, f.name) for f in fields(PretrainConfig)})
    except ValueError as error:  # the config's words are its fields': said as the options they came from
        raise ValueError(as_options(str(error))) from None
    atomic.check_can_make(Path(config.out), f"--out {config.out}")
    if config.manifest is not None:
        if Path(config.manifest).is_dir():  # found only when the index, hours in, was written
            raise ValueError(f"--manifest {config.manifest} is a folder: name the file, e.g. "
                             f"{Path(config.manifest) / MANIFEST_NAME}")
        atomic.check_can_make(Path(config.manifest).parent, f"--manifest {config.manifest}")
    return config


def as_options(message: str) -> str:
    """`message` with PretrainConfig's field names (tokens_per_batch) as their options (--tokens-per-batch)."""
    names = sorted((field.name for field in fields(PretrainConfig)), key=len, reverse=True)
    return re.sub(rf"(?<![\w-])({'|'.join(names)})\b", lambda found: "--" + found[1].replace("_", "-"), message)
