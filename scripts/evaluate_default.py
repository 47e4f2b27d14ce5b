"""The default model's evaluation for its model card: trained weights vs the same architecture with random
weights vs a log-spectrogram baseline, on

  (a) the demo's task (echo/demo.py: healthy vs bearing-fault clips of four generated machines at 8-48 kHz
      over real background recordings; cosine 1-NN to a bank of healthy clips): AUC and pAUC per machine
      and their means;
  (b) bucklespring key switches held out of pretraining (corpus/heldout/bucklespring, 44.1 kHz, labelled
      press / release in corpus/datalist.csv): leave-one-out 5-NN accuracy (echo.eval.faults, Euclidean).

    python scripts/evaluate_default.py [--model default] [--corpus corpus] [--json results.json] [--demo-seeds 20]
    python scripts/evaluate_default.py --runs RUN [RUN ...] [--csv heldout.csv]

With --runs: the trained embedding of every checkpoint of those pretraining runs (the encoder each run exports,
rounded to fp16 as scripts/export_default.py writes it) on the same two tasks, for the model card's record of a
recipe's spread over seeds and steps. Not for choosing: scripts/select_checkpoint.py chooses on validation tasks.

Is a difference more than chance? On bucklespring the trained model and the baseline classify the same clips,
so an exact McNemar test (a binomial test on the clips only one of them gets right) says how likely a gap that
size is between two equal embeddings. The demo's task is one draw of clips: --demo-seeds N scores it again with
N clip seeds (the same four machines, other clips) and prints each embedding's mean and the paired difference
of the trained model to the others, with a 95% interval.

The log-spectrogram baseline is the time mean of the normalised log spectrogram of echo.ops.stft in the
model's band layout (every 32-bin band, concatenated): what the encoder starts from, without the encoder.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from echo import atomic, checkpoint, demo  # noqa: E402
from echo.data.wav import read_wav  # noqa: E402
from echo.eval import faults  # noqa: E402
from echo.model import EchoModel  # noqa: E402
from echo.ops import stft  # noqa: E402
from echo.pretrain import checkpoints  # noqa: E402
from echo.pretrain.trainer import checkpoint_encoder  # noqa: E402
from select_checkpoint import in_processes  # noqa: E402  (a sibling: importing this script puts its folder on the path)

HELD_OUT = "heldout/bucklespring/"


def log_spectrogram_features(signals: list, rates: list) -> list[np.ndarray]:
    """Per clip: the time mean of every bin of the band-layout normalised log spectrogram."""
    return [stft.band_layout(stft.spectrogram(torch.as_tensor(signal, dtype=torch.float32), rate), rate)
            .mean(-1).numpy() for signal, rate in zip(signals, rates)]


def embedders(model_name: str, seed: int) -> dict:
    """name -> function(signals, rates) -> list of vectors."""
    trained = checkpoint.load(model_name)
    torch.manual_seed(seed)
    random = EchoModel(trained.config).eval()

    return {f"trained ({model_name})": lambda signals, rates: demo.encode(trained, signals, rates),
            f"random weights (ECHO-{trained.config.size or 'custom'})":
                lambda signals, rates: demo.encode(random, signals, rates),
            "log-spectrogram baseline": log_spectrogram_features}


def bucklespring(corpus: Path, limit: int | None) -> tuple[list, list, list]:
    """(signals, rates, labels) of the held-out key switches; `limit` keeps that many of each label. SystemExit
    when the corpus lacks them."""
    datalist = corpus / "datalist.csv"
    if not datalist.is_file():
        raise SystemExit(f"{datalist} does not exist: run scripts/build_corpus.py (or pass --corpus)")
    with open(datalist, encoding="utf-8", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("path", "").startswith(HELD_OUT) and row["label"]]
    if not rows:
        raise SystemExit(f"no labelled {HELD_OUT} rows in {datalist}: run scripts/build_corpus.py")
    if limit:
        seen = Counter()
        rows = [row for row in rows if seen.update([row["label"]]) or seen[row["label"]] <= limit]
    try:
        signals, rates = zip(*(read_wav(corpus / row["path"]) for row in rows))
    except (OSError, ValueError) as error:
        raise SystemExit(f"a held-out clip of {datalist} does not read ({error}): run scripts/build_corpus.py "
                         "again, which rewrites missing and damaged files") from None
    return list(signals), list(rates), [row["label"] for row in rows]


def demo_numbers(task: demo.DemoTask, vectors: list) -> dict:
    """The demo's AUC, pAUC and per-machine numbers of one draw."""
    _, rows, summary = demo.score(task, vectors)
    return {"demo AUC": summary["AUC (demo)"], "demo pAUC": summary["pAUC (demo)"],
            "demo per machine": {f"{r['machine']} {r['metric']}": r["value"] for r in rows}}


def scores(embed, task: demo.DemoTask, keys: tuple[list, list, list]) -> dict:
    """One embedding's numbers on the demo's task and on the held-out key switches (signals, rates, labels)."""
    vectors = embed(task.signals, task.rates)
    signals, rates, labels = keys
    keys_result = faults.evaluate(np.stack(embed(signals, rates)), labels, "loocv", k=5)
    return {**demo_numbers(task, vectors), "bucklespring 5-NN LOOCV accuracy": keys_result.accuracy,
            "demo embedding spread": demo.embedding_spread(task, vectors),
            "bucklespring clips right": (keys_result.y_pred == keys_result.y_true).astype(int).tolist()}


def demo_over_seeds(embed, seeds: range, bank: int, tests: int, first: dict | None = None) -> dict:
    """The demo's task drawn with each clip seed: {"demo AUC over seeds": [...], "demo pAUC over seeds": [...],
    "demo per machine over seeds": {"fan AUC": [...], ...}} (a model can lead on the mean and trail at a rate).
    `first`: the numbers (demo_numbers, scores) of the draw of seeds.start, which is then not encoded again."""
    draws = [first] if first is not None else []
    for seed in seeds[len(draws):]:
        task = demo.build_task(seed, bank, tests)
        draws.append(demo_numbers(task, embed(task.signals, task.rates)))
    return {**{f"demo {metric} over seeds": [draw[f"demo {metric}"] for draw in draws] for metric in ("AUC", "pAUC")},
            "demo per machine over seeds": {key: [draw["demo per machine"][key] for draw in draws]
                                            for key in draws[0]["demo per machine"]}}


def mcnemar(right: list, other_right: list) -> tuple[int, int, float]:
    """(clips only the first gets right, clips only the other gets right, exact two-sided McNemar p-value)."""
    from scipy import stats

    only, other_only = (int(sum(a and not b for a, b in zip(x, y))) for x, y in ((right, other_right),
                                                                                  (other_right, right)))
    pvalue = stats.binomtest(only, only + other_only).pvalue if only + other_only else 1.0
    return only, other_only, float(pvalue)


def paired_difference(values: list, other_values: list) -> tuple[float, float, float, int]:
    """(mean of values - other_values, 95% t interval low, high, count where values is ahead)."""
    from scipy import stats

    differences = np.subtract(values, other_values)
    mean = float(differences.mean())
    if len(differences) < 2 or not differences.std():
        return mean, mean, mean, int((differences > 0).sum())
    low, high = stats.t.interval(0.95, len(differences) - 1, loc=mean, scale=stats.sem(differences))
    return mean, float(low), float(high), int((differences > 0).sum())


def print_machines(results: dict, width: int, title: str, values_of) -> None:
    """A table of each embedding's per-machine numbers (`values_of(its results)`: "fan AUC" -> value)."""
    machines = list(values_of(next(iter(results.values()))))
    print(f"\n{title.ljust(width)}  " + "  ".join(machines))
    for name, numbers in results.items():
        values = values_of(numbers)
        print(f"{name.ljust(width)}  " + "  ".join(f"{values[m]:.4f}".ljust(len(m)) for m in machines))


def print_chance(results: dict, seeds: range) -> None:
    """How the trained embedding (the first) compares with each other one, beyond the draw of the clips."""
    (trained, numbers), *others = results.items()
    print(f"\n{trained} against the others (more than chance?)")
    for name, other in others:
        only, other_only, pvalue = mcnemar(numbers["bucklespring clips right"], other["bucklespring clips right"])
        print(f"  {name}: bucklespring, clips only one gets right: {only} trained, {other_only} {name}; "
              f"exact McNemar p = {pvalue:.3g}")
        if len(seeds) > 1:
            for metric in ("AUC", "pAUC"):
                mean, low, high, ahead = paired_difference(numbers[f"demo {metric} over seeds"],
                                                           other[f"demo {metric} over seeds"])
                print(f"    demo {metric} over {len(seeds)} clip seeds: trained - {name} = {mean:+.4f} "
                      f"(95% interval {low:+.4f} to {high:+.4f}), trained ahead in {ahead}")


_TASKS: tuple = ()  # (demo task, key switches, demo clip seeds, bank, tests), set before the scoring processes fork


def _score_checkpoint(path: Path) -> dict | None:
    saved = checkpoints.read_or_report(path)
    if saved is None:
        return None
    model = checkpoint_encoder(saved).half().float().eval()  # as exported
    embed = lambda signals, rates: demo.encode(model, signals, rates)  # noqa: E731
    task, keys, seeds, bank, tests = _TASKS
    numbers = scores(embed, task, keys)
    if len(seeds) > 1:
        draws = demo_over_seeds(embed, seeds, bank, tests, numbers)
        numbers.update({f"demo {metric} {len(seeds)}-draw mean": float(np.mean(draws[f"demo {metric} over seeds"]))
                        for metric in ("AUC", "pAUC")})
        numbers.update({f"{key} {len(seeds)}-draw mean": float(np.mean(values))
                        for key, values in draws["demo per machine over seeds"].items()})
    del numbers["demo per machine"], numbers["bucklespring clips right"]
    return {"run": str(path.parents[1]), "step": saved["step"], **numbers,
            "bucklespring clips": round(numbers["bucklespring 5-NN LOOCV accuracy"] * len(keys[2]))}


def score_checkpoints(runs: list[Path], task: demo.DemoTask, keys: tuple, jobs: int, seeds: range = range(1),
                      bank: int = demo.BANK_CLIPS, tests: int = demo.TEST_CLIPS) -> list[dict]:
    """A row per readable checkpoint of the runs, in order, scored as select_checkpoint.py scores them; with
    several clip `seeds`, also the demo's mean AUC and pAUC over those draws."""
    global _TASKS
    _TASKS = (task, keys, seeds, bank, tests)
    paths = [path for run in runs for path in checkpoints.checkpoint_paths(run / "checkpoints")]
    return [row for row in in_processes(_score_checkpoint, paths, jobs) if row is not None]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="checkpoint name or path (default: default)")
    parser.add_argument("--corpus", type=Path, default=REPO / "corpus",
                        help="built by scripts/build_corpus.py (default: the repository's corpus/)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the demo clips and of the random weights")
    parser.add_argument("--bank", type=int, default=demo.BANK_CLIPS, help="demo: healthy bank clips per machine")
    parser.add_argument("--tests", type=int, default=demo.TEST_CLIPS, help="demo: test clips per machine and class")
    parser.add_argument("--limit", type=int, default=None, help="bucklespring: clips per label (default: all)")
    parser.add_argument("--demo-seeds", type=int, default=1,
                        help="also score the demo's task drawn with this many clip seeds from --seed (default: 1); "
                             "with --runs, each checkpoint's mean over them")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument("--runs", type=Path, nargs="+", default=None, metavar="RUN",
                        help="instead of --model: every checkpoint of these pretraining runs, for the record")
    parser.add_argument("--csv", type=Path, default=None, help="with --runs, also write the rows here")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="with --runs, checkpoints scored at once (default: one per CPU)")
    args = parser.parse_args(argv)
    if args.runs is None and args.csv is not None:
        parser.error("--csv goes with --runs")
    if args.runs is not None and args.json is not None:
        parser.error("--json goes with --model; with --runs the rows go to --csv")
    if args.csv is not None and args.csv.is_dir():
        raise SystemExit(f"--csv {args.csv} is a folder: it takes the file to write")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.bank < 1 or args.tests < 1 or args.demo_seeds < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--bank, --tests, --demo-seeds and --limit must be at least 1")
    if not 0 <= args.seed <= 2**32 - args.demo_seeds:
        parser.error("--seed must be in [0, 2**32 - --demo-seeds]")
    if args.json is not None:  # before the evaluation: its result must have somewhere to go
        if args.json.is_dir():
            raise SystemExit(f"--json {args.json} is a folder: it takes the file to write")
        try:
            atomic.check_writable(args.json.parent, f"--json {args.json}")
        except ValueError as error:
            raise SystemExit(str(error)) from None

    if args.runs is not None:
        empty = [str(run) for run in args.runs if not checkpoints.checkpoint_paths(run / "checkpoints")]
        if empty:
            raise SystemExit(f"no checkpoint in {', '.join(empty)} (give the folders python -m echo pretrain "
                             "--out wrote)")
    key_signals, key_rates, key_labels = bucklespring(args.corpus, args.limit)
    if args.runs is not None:
        return _record_checkpoints(args, (key_signals, key_rates, key_labels))
    try:
        embedding = embedders(args.model, args.seed)
    except (OSError, ValueError) as error:
        raise SystemExit(f"--model {args.model}: {error}") from None
    task = demo.build_task(args.seed, args.bank, args.tests)
    # Embeddings of a nearly collapsed model nearly tie, so AUCs can move by ~0.01 with the float summation
    # order, which the thread count changes: say which it was.
    print(f"demo task: {len(task.clips)} clips (seed {args.seed}); bucklespring: {len(key_labels)} clips "
          f"({', '.join(f'{key_labels.count(label)} {label}' for label in sorted(set(key_labels)))}); "
          f"torch threads: {torch.get_num_threads()}")  # as the demo says it
    seeds = range(args.seed, args.seed + args.demo_seeds)
    results = {}
    for name, embed in embedding.items():
        started = time.perf_counter()
        results[name] = scores(embed, task, (key_signals, key_rates, key_labels))
        if len(seeds) > 1:
            results[name].update(demo_over_seeds(embed, seeds, args.bank, args.tests, results[name]))
        print(f"{name}: {time.perf_counter() - started:.1f} s")
    columns = ["demo AUC", "demo pAUC", "bucklespring 5-NN LOOCV accuracy", "demo embedding spread"]
    width = max(len(name) for name in results)
    print(f"\n{'embedding'.ljust(width)}  " + "  ".join(columns))
    for name, numbers in results.items():
        print(f"{name.ljust(width)}  " + "  ".join(f"{numbers[c]:.4g}".ljust(len(c)) for c in columns))
    print_machines(results, width, "per machine", lambda numbers: numbers["demo per machine"])
    if len(seeds) > 1:
        print(f"\n{f'demo, clip seeds {seeds.start}-{seeds.stop - 1}'.ljust(width)}  mean AUC (sd)    mean pAUC (sd)")
        for name, numbers in results.items():
            auc, pauc = (np.asarray(numbers[f"demo {metric} over seeds"]) for metric in ("AUC", "pAUC"))
            print(f"{name.ljust(width)}  {auc.mean():.4f} ({auc.std(ddof=1):.4f})  "
                  f"{pauc.mean():.4f} ({pauc.std(ddof=1):.4f})")
        print_machines(results, width, f"per machine, {len(seeds)}-draw mean", lambda numbers: {
            key: float(np.mean(values)) for key, values in numbers["demo per machine over seeds"].items()})
    print_chance(results, seeds)
    if args.json:
        atomic.write_text(args.json, json.dumps(results, indent=2) + "\n")
    return 0


def _record_checkpoints(args, keys: tuple) -> int:
    """--runs: every checkpoint's numbers, printed and optionally written as CSV."""
    if args.csv is not None:
        try:
            atomic.check_writable(args.csv.parent, f"--csv {args.csv}")
        except ValueError as error:
            raise SystemExit(str(error)) from None
    rows = score_checkpoints(args.runs, demo.build_task(args.seed, args.bank, args.tests), keys, args.jobs,
                             range(args.seed, args.seed + args.demo_seeds), args.bank, args.tests)
    if not rows:
        raise SystemExit(f"no readable checkpoint in {', '.join(str(run / 'checkpoints') for run in args.runs)}")
    columns = list(rows[0])
    print("  ".join(columns))
    for row in rows:
        print("  ".join(f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in columns))
    if args.csv is not None:
        atomic.write_csv(args.csv, columns, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
