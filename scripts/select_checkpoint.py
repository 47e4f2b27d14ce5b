"""Choose which checkpoint of pretraining runs to bundle, on a validation task and never on the held-out clips.

Self-distillation's loss keeps falling while the embeddings can get worse (echo/data/default/MODEL_CARD.md),
so the loss cannot choose. The validation task is the demo's task (healthy vs bearing-fault clips over real
backgrounds, cosine 1-NN to a healthy bank) with other machines and other clips (`--machine-seeds`, `--seed`)
than the demo and the model card's evaluation use; six sets of four machines, because one set's AUC moves
with how hard its machines happen to be (0.65-0.88 for the log-spectrogram baseline). Every checkpoint of the
runs is scored (AUC, pAUC and embedding spread, means over the sets); the one with the highest AUC is chosen,
the earlier step on a tie, then the run named first. Several runs are runs of one recipe with other seeds: the
seed moves every score as much as most changes of recipe (the model card), so the choice is made across them.

    python scripts/select_checkpoint.py RUN_DIR [RUN_DIR ...] [--which student] [--baselines]
        [--csv RUN_DIR/validation.csv] [--jobs N] [--print-run]

The table goes to stderr (each run's rows also to RUN_DIR/validation.csv, rewritten as each checkpoint is
scored: a rerun with the same task settings scores only the checkpoints it lacks or whose file changed) and
the choice to stdout, so a recipe can pass it on: for one run the step alone,
`python scripts/export_default.py RUN_DIR --step "$(python scripts/select_checkpoint.py RUN_DIR)"`;
for several, or with --print-run, the chosen run's folder and its step, separated by a space
(scripts/train_seeds.sh).
"""
from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import signal
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import echo  # noqa: E402
from echo import atomic, demo  # noqa: E402
from echo.model import EchoConfig, EchoModel  # noqa: E402
from echo.pretrain import checkpoints  # noqa: E402
from echo.pretrain.trainer import PretrainConfig, checkpoint_encoder  # noqa: E402

# The demo's machines are random_machine(90 000 + i) (demo.MACHINE_SEED), the corpus's random_machine(0 ..).
VALIDATION_MACHINE_SEEDS = (95_000, 96_000, 97_000, 98_000, 99_000, 100_000)
VALIDATION_SEED = 1  # the demo and the model card's evaluation use clip seed 0
COLUMNS = ("step", "validation AUC", "validation pAUC", "embedding spread")
# "size", "mtime_ns": the checkpoint file scored, so that one retrained in the same folder is scored again;
# "task": the settings the scores were made with. A rerun reuses a row only when all three are equal.
STAMP = ("size", "mtime_ns")
CSV_COLUMNS = (*COLUMNS, *STAMP, "task")


def scored(embed, tasks: list[demo.DemoTask]) -> dict:
    """Validation AUC, pAUC and embedding spread of one embedding function (signals, rates -> vectors), each
    the mean over the tasks."""
    scores = []
    for task in tasks:
        embeddings = embed(task.signals, task.rates)
        _, _, summary = demo.score(task, embeddings)
        scores.append((summary["AUC (demo)"], summary["pAUC (demo)"], demo.embedding_spread(task, embeddings)))
    return dict(zip(COLUMNS[1:], map(float, np.mean(scores, axis=0))))


def encoder(model):
    return lambda signals, rates: demo.encode(model, signals, rates)


_TASKS: list[demo.DemoTask] = []  # set by validate before it forks


def forks(jobs: int) -> bool:
    """Whether checkpoints are scored in forked processes (of one torch thread each, _score_checkpoint)."""
    return jobs > 1 and "fork" in multiprocessing.get_all_start_methods()


def scoring_threads(jobs: int) -> int:
    """Torch threads of the processes that score: their sums, and so the scores' last digits, depend on it."""
    return 1 if forks(jobs) else torch.get_num_threads()


def _scoring_process() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops the pool
    torch.set_num_threads(1)


def in_processes(score, paths: list[Path], jobs: int) -> Iterator:
    """score(path) for each path, in order: in `jobs` processes of one torch thread each, which fork from this
    one and so share its module state (the tasks), where fork exists; else here, in turn."""
    if not paths or not forks(jobs):
        yield from map(score, paths)
        return
    pool = multiprocessing.get_context("fork").Pool(min(jobs, len(paths)), _scoring_process)
    try:
        yield from pool.imap(score, paths, chunksize=1)
    finally:
        pool.terminate()


def stamp(path: Path) -> dict:
    info = path.stat()
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns}


def validate(runs: list[Path], which: str | None, tasks: list[demo.DemoTask], jobs: int = 1,
             earlier: dict | None = None, save=None) -> list[dict]:
    """One row per readable checkpoint of the runs, run by run, oldest first, each naming its run. A row of
    `earlier` ((run, step) -> row, scored before on the same tasks) is taken as it is when its size and mtime_ns
    are the checkpoint file's; `save(run, rows)` is called with that run's rows so far after each of its
    checkpoints scored. With jobs > 1 the checkpoints of all runs are scored in that many processes of one
    torch thread each, which fork from this one and so share its tasks."""
    global _TASKS
    _TASKS = tasks
    earlier = earlier or {}
    paths = [path for run in runs for path in checkpoints.checkpoint_paths(run / "checkpoints")]
    # Stamped before any reading: a file replaced while it is scored then differs from its row next time.
    stamps = {path: stamp(path) for path in paths}
    rows = {}
    for path in paths:
        row = earlier.get((path.parents[1], checkpoints.step_of(path)))
        rows[path] = row if row is not None and {key: row[key] for key in STAMP} == stamps[path] else None
    todo = [path for path in paths if rows[path] is None]
    progress = partial(tqdm, total=len(todo), desc="checkpoints", unit="ckpt", file=sys.stderr)
    # strict: the bar is asked for one more row after the last, which ends it at N of N, not N - 1
    scores = progress(in_processes(partial(_score_checkpoint, which=which), todo, jobs))
    for path, row in zip(todo, scores, strict=True):
        if row is None:
            continue
        rows[path] = {**row, **stamps[path]}
        if save is not None:
            run = path.parents[1]
            save(run, [row for row in rows.values() if row is not None and row["run"] == run])
    return [rows[path] for path in paths if rows[path] is not None]


def _score_checkpoint(path: Path, which: str | None) -> dict | None:
    saved = checkpoints.read_or_report(path)
    if saved is None:
        return None
    return {"run": path.parents[1], "step": saved["step"],
            **scored(encoder(checkpoint_encoder(saved, which).eval()), _TASKS)}


def baselines(config: EchoConfig, tasks: list[demo.DemoTask], init: str | None = None) -> list[dict]:
    """Rows of the same architecture with random weights, of the model a run started from (`init`: an --init
    run's checkpoints are to be compared with it, not with random weights) and of the log-spectrogram baseline."""
    from evaluate_default import log_spectrogram_features

    torch.manual_seed(0)
    random = EchoModel(config).eval()
    rows = [{"step": "random weights", **scored(encoder(random), tasks)}]
    if init is not None:
        try:
            rows.append({"step": f"--init {init}", **scored(encoder(echo.load(init)), tasks)})
        except ValueError as error:  # moved or deleted since the run began: the other rows still say something
            print(f"not scoring the run's --init model: {error}", file=sys.stderr)
    return rows + [{"step": "log-spectrogram", **scored(log_spectrogram_features, tasks)}]


def chosen(rows: list[dict]) -> dict:
    """The highest validation AUC; the earliest step among equals, then the first row (the run named first)."""
    return max(rows, key=lambda row: (row["validation AUC"], -row["step"]))


def read_csv(run: Path, path: Path, task: str) -> dict:
    """(run, step) -> row of an earlier table of `run` scored with the same `task` settings."""
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8", newline="") as handle:
        try:
            return {(run, int(row["step"])): {"run": run, "step": int(row["step"]),
                                              **{column: float(row[column]) for column in COLUMNS[1:]},
                                              **{column: int(row[column]) for column in STAMP}}
                    for row in csv.DictReader(handle) if row.get("task") == task}
        except (KeyError, TypeError, ValueError):  # a table of another layout: scored again
            return {}


def write_csv(rows: list[dict], path: Path, task: str) -> None:
    atomic.write_csv(path, CSV_COLUMNS, ({**row, "task": task} for row in rows))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", metavar="run",
                        help="run folder of python -m echo pretrain (several: the same recipe with other seeds)")
    parser.add_argument("--which", choices=["teacher", "student"], default=None,
                        help="which encoder to score (default: the run's --export)")
    parser.add_argument("--machine-seeds", type=int, nargs="+", default=VALIDATION_MACHINE_SEEDS,
                        help="first random_machine seed of each set of validation machines")
    parser.add_argument("--seed", type=int, default=VALIDATION_SEED, help="seed of the validation clips")
    parser.add_argument("--bank", type=int, default=demo.BANK_CLIPS, help="healthy bank clips per machine")
    parser.add_argument("--tests", type=int, default=demo.TEST_CLIPS, help="test clips per machine and class")
    parser.add_argument("--baselines", action="store_true",
                        help="also print random weights, an --init run's starting model and the log-spectrogram "
                             "baseline on the same tasks")
    parser.add_argument("--csv", type=Path, default=None,
                        help="with one run, write its table here instead of RUN/validation.csv")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="checkpoints scored at once, each in a process of one torch thread (default: one per CPU)")
    parser.add_argument("--print-run", action="store_true",
                        help="print the chosen run's folder before its step even for one run")
    args = parser.parse_args(argv)

    if args.csv is not None and len(args.runs) > 1:
        parser.error("--csv takes one run; with several, each run's table goes to RUN/validation.csv")
    if args.bank < 1 or args.tests < 1 or args.jobs < 1:
        parser.error("--bank, --tests and --jobs must be at least 1")
    if not 0 <= args.seed < 2**32 or not all(0 <= seed < 2**32 for seed in args.machine_seeds):
        parser.error("--seed and --machine-seeds must be in [0, 2**32)")
    files = [str(run) for run in args.runs if run.exists() and not run.is_dir()]
    if files:  # e.g. a glob that caught the runs' logs
        raise SystemExit(f"not a run folder: {', '.join(files)} (give the folders python -m echo pretrain --out wrote)")
    empty = [str(run / "checkpoints") for run in args.runs if not checkpoints.checkpoint_paths(run / "checkpoints")]
    if empty:
        raise SystemExit(f"no checkpoint in {', '.join(empty)}")
    task = (f"which={args.which or 'export'} machine-seeds={','.join(map(str, args.machine_seeds))} "
            f"seed={args.seed} bank={args.bank} tests={args.tests} threads={scoring_threads(args.jobs)}")
    tables = {run: args.csv or run / "validation.csv" for run in args.runs}
    earlier = {key: row for run, table in tables.items() for key, row in read_csv(run, table, task).items()}

    def save(run: Path, rows: list[dict]) -> None:
        write_csv(rows, tables[run], task)

    try:  # before scoring anything: every table must be writable
        for run, table in tables.items():
            table.parent.mkdir(parents=True, exist_ok=True)
            save(run, [row for key, row in earlier.items() if key[0] == run])
    except OSError as error:
        raise SystemExit(f"cannot write the validation table: {error}") from None
    tasks = [demo.build_task(args.seed, args.bank, args.tests, machine_seed=seed) for seed in args.machine_seeds]
    rows = validate(args.runs, args.which, tasks, args.jobs, earlier, save)
    if not rows:
        raise SystemExit(f"no readable checkpoint in {', '.join(str(run / 'checkpoints') for run in args.runs)}")
    for run in args.runs:  # without the rows of checkpoints gone since (--keep) or changed
        save(run, [row for row in rows if row["run"] == run])
    best = chosen(rows)
    columns = ("run",) * (len(args.runs) > 1) + COLUMNS
    widths = [max(18, 2 + max(len(str(run)) for run in args.runs)) if column == "run" else 18 for column in columns]
    rows_shown = rows
    if args.baselines:  # as long as a checkpoint or two: said, not a silent wait under the table's header
        run_config = PretrainConfig(**json.loads((args.runs[0] / "config.json").read_text(encoding="utf-8")))
        started = f", the --init model {run_config.init}" if run_config.init else ""
        print(f"scoring random weights{started} and the log-spectrogram baseline on the same tasks", file=sys.stderr)
        rows_shown = rows + baselines(run_config.model_config, tasks, run_config.init)
    print("".join(column.ljust(width) for column, width in zip(columns, widths)), file=sys.stderr)
    for row in rows_shown:
        cells = [str(row.get(column, "")) if column in ("run", "step") else f"{row[column]:.4f}" for column in columns]
        print("".join(cell.ljust(width) for cell, width in zip(cells, widths)) + ("<- chosen" if row is best else ""),
              file=sys.stderr)
    print(best["step"] if len(args.runs) == 1 and not args.print_run else f"{best['run']} {best['step']}")
    return 0


def cli(argv=None) -> int:
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("\ninterrupted: the scores made so far are kept in each run's validation.csv; the same command "
              "scores the rest", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
