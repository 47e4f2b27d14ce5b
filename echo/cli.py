"""The command line: `python -m echo COMMAND` (or `echo-fm COMMAND`; `echo` alone is a shell builtin).

Each command other than `demo` lives in the module that owns its job and exposes `add_arguments(parser)`
and `run(args) -> int`; it is listed in COMMANDS and imported only when asked for.
"""
from __future__ import annotations

import argparse
import importlib
import math
import sys

import torch

from . import geometry
from .model import PRESETS, EchoConfig, EchoModel


def demo(args) -> int:
    """Encode a generated machine-like signal and print what comes out."""
    torch.manual_seed(args.seed)
    model = EchoModel(EchoConfig.preset(args.size)).eval()
    t = torch.arange(int(args.seconds * args.rate)) / args.rate
    shaft = 29.5  # Hz: a 1770 rpm motor with harmonics and noise
    signal = sum(math.pow(0.6, h) * torch.sin(2 * math.pi * shaft * (h + 1) * t) for h in range(8))
    signal = signal + 0.05 * torch.randn_like(t)
    utterance, frames = model.encode(signal, args.rate)
    print(f"ECHO-{args.size} (randomly initialised), {args.seconds:g} s at {args.rate} Hz: "
          f"{geometry.n_frames(len(t), args.rate)} frames, {geometry.n_bands(args.rate)} bands")
    print(f"utterance embedding {tuple(utterance.shape)}, frame embeddings {tuple(frames.shape)}")
    return 0


# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("echo.pretrain.command", "self-supervised teacher-student pretraining on an audio folder or shards"),
    "pretrain-shards": ("echo.pretrain.shards", "write an audio folder as WebDataset tar shards for pretraining"),
    "encode": ("echo.encode_files", "audio files or folders to ECHO embeddings (.npz or .parquet), resumable"),
    "eval": ("echo.eval.cli", "evaluate embeddings: DCASE anomaly detection or fault classification (kNN)"),
    "info": ("echo.info", "which backend each op uses on CPU and CUDA, and why (compiled extension, triton, env)"),
}


def build_parser(argv) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="echo-fm", description="ECHO embeddings for machine signals")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text)
        if name in argv:  # import a command's module only when it runs
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(run=module.run)
    demo_parser = commands.add_parser("demo", help="encode a generated signal and print the embedding shapes")
    demo_parser.add_argument("--size", choices=list(PRESETS), default="tiny")
    demo_parser.add_argument("--rate", type=int, default=16000, help="sample rate in Hz")
    demo_parser.add_argument("--seconds", type=float, default=10.0)
    demo_parser.add_argument("--seed", type=int, default=0)
    demo_parser.set_defaults(run=demo)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return args.run(args)
    except ValueError as error:
        print(f"error: {error}")
        return 2
