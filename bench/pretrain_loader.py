"""The pretraining data worker's batch time: `sampling.materialise` as it runs (the front end taken at the bins
of each crop's bands only) against the same batches built from each crop's whole spectrogram (the reference
front end, `stft_ops.spectrogram`). On a GPU the trainer waits for these workers (bench/RESULTS.md, "Through
python -m echo pretrain on an H100"), so their rate is the pretraining rate.

The script first checks that both give the same patches, bit for bit; then times them alternately, one torch
thread (as each worker runs), on the same batch plans.

    python bench/pretrain_loader.py                       # generated machines at the 7 rate families
    python bench/pretrain_loader.py --data corpus/pretrain  # the default model's corpus (scripts/build_corpus.py)
"""
from __future__ import annotations

import argparse
import itertools
import logging
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from echo.data import synth
from echo.ops import stft as stft_ops
from echo.pretrain import corpus, sampling

RATES = (8000, 12000, 16000, 22050, 44100, 48000, 50000)


def whole_spectrogram(plan: sampling.ClipPlan) -> torch.Tensor:
    wave = torch.from_numpy(np.ascontiguousarray(plan.example.read(plan.start, plan.samples)))
    return stft_ops.spectrogram(wave, plan.example.sample_rate)


def reference_front_end():
    """Within it, materialise cuts every crop's bands from its whole spectrogram."""
    return mock.patch.object(sampling, "clip_spectrogram", whole_spectrogram)


def soundfile_missing() -> str | None:
    """Why the pretraining corpus cannot be read or generated here (it needs soundfile, an optional package)."""
    try:
        corpus.soundfile()
    except ValueError as error:
        return str(error)
    return None


def generated_folder(root: Path, files: int, seconds: float) -> Path:
    import soundfile

    for i in range(files):
        rate = RATES[i % len(RATES)]
        wave = synth.machine_signal(synth.random_machine(i), rate, int(seconds * rate), seed=i)
        soundfile.write(root / f"machine{i:03d}_{rate}.wav", wave, rate)
    return root


def batch_seconds(plans: list, repeats: int) -> tuple[list[float], list[float]]:
    """Per batch: the best of `repeats` alternating runs of each path."""
    library, reference = [], []
    for batch in plans:
        times = {"library": [], "reference": []}
        for _ in range(repeats):
            for name, front_end in (("library", nullcontext()), ("reference", reference_front_end())):
                with front_end:
                    start = time.perf_counter()
                    sampling.materialise(batch, clones=4)
                    times[name].append(time.perf_counter() - start)
        library.append(min(times["library"]))
        reference.append(min(times["reference"]))
    return library, reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="audio folder (default: generated machines, 6 s each)")
    parser.add_argument("--tokens-per-batch", type=int, default=16384)
    parser.add_argument("--crop-seconds", type=float, default=4.0)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.batches < 1 or args.repeats < 1:  # else plans[0] of no plans, min() of no times
        parser.error("--batches and --repeats must be at least 1")
    try:
        config = sampling.SamplingConfig(crop_seconds=args.crop_seconds, tokens_per_batch=args.tokens_per_batch)
    except ValueError as error:
        parser.error(str(error))
    if reason := soundfile_missing():
        print(f"skipped: {reason}")
        return
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)  # skipped short files are not this script's business
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.data or generated_folder(Path(scratch), files=70, seconds=6.0)
        try:
            source = corpus.FolderCorpus(folder, 1.0, manifest=Path(scratch) / "manifest.csv")
        except ValueError as error:  # a --data folder that does not exist or holds no usable audio
            parser.error(f"--data: {error}")
        plans = list(itertools.islice(sampling.plan_batches(source.examples(0, 0, 1), np.random.default_rng(0), config),
                                      args.batches))
        with reference_front_end():
            expected = sampling.materialise(plans[0], clones=4).patches
        if not torch.equal(sampling.materialise(plans[0], clones=4).patches, expected):
            raise SystemExit("the two front ends gave different patches")
        library, reference = batch_seconds(plans, args.repeats)
    clips = statistics.mean(len(p) for p in plans)
    print(f"{source.describe()}\n{len(plans)} batches of {args.tokens_per_batch} teacher tokens (~{clips:.0f} clips of "
          f"<= {args.crop_seconds:g} s), 4 clones, 1 torch thread, best of {args.repeats} per batch; patches equal\n")
    print(f"{'front end':<42}{'s per batch (median)':>22}{'batches/s':>12}")
    for name, seconds in (("whole spectrogram (reference)", reference), ("bins of the crop's bands (materialise)", library)):
        median = statistics.median(seconds)
        print(f"{name:<42}{median:>22.3f}{1 / median:>12.2f}")
    ratios = [r / lib for r, lib in zip(reference, library)]
    print(f"\nreference / materialise, per batch: median {statistics.median(ratios):.2f}x "
          f"(range {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
