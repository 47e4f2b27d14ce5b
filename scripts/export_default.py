"""Turn a pretraining run into the bundled default model: the encoder the run exports (its --export, teacher
or student) from its newest checkpoint, or from the one `--step` names (scripts/select_checkpoint.py chooses
it), as fp16 safetensors (config in its metadata and in model.json beside it), the run's config and length,
and its training curve.

    python scripts/export_default.py RUN_DIR [--step N] [--out echo/data/default]

Writes OUT/model.safetensors, OUT/model.json, OUT/training.json, OUT/training_curve.png and, from the
corpus's data list, OUT/DATA_CREDITS.csv (every source, licence and credit of the pretraining audio, with
its file count and minutes); an OUT/evaluation.json, which measured the model replaced, is removed. They are
moved over the earlier export's only once all are written: an export that fails midway leaves that one whole (the
staging folder of one killed outright is removed by the next export). A run that has not finished is exported
as it stands; training.json says how many steps it got.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import echo  # noqa: E402
from echo import atomic  # noqa: E402
from echo.eval import plots, require  # noqa: E402
from echo.pretrain.trainer import PretrainConfig, run_encoder  # noqa: E402

CURVE_COLUMNS = ("step", "loss", "frame_loss", "utterance_loss", "lr")
DATALIST_COLUMNS = ("split", "source", "licence", "credit", "seconds")
# what an export writes, in the order it moves them into --out: the weights last, once the rest is in place
BUNDLE = ("training_curve.png", "DATA_CREDITS.csv", "training.json", "model.json", "model.safetensors")


def _read_csv(path: Path, columns: tuple[str, ...], parse) -> list:
    """`parse(row)` of every row of an input CSV; ValueError naming the file when it is missing, lacks one of
    `columns` or holds a value that does not parse."""
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in columns if column not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path} has no column {', '.join(missing)}")
        try:
            return [parse(row) for row in reader]
        except (TypeError, ValueError) as error:  # a short row gives None, a bad number ValueError
            raise ValueError(f"{path} line {reader.line_num}: {error}") from error


def _curve_rows(steps_csv: Path, exported_step: int) -> list[dict]:
    """The training curve's rows (step, losses, lr as numbers); ValueError when none is logged by the
    exported step."""
    rows = _read_csv(steps_csv, CURVE_COLUMNS, lambda row: {key: float(value) for key, value in row.items()})
    if not any(row["step"] <= exported_step for row in rows):
        raise ValueError(f"{steps_csv} has no step logged by step {exported_step}")
    return rows


def _credit_totals(datalist: Path) -> dict[tuple, list]:
    """(source, licence, credit) -> [files, minutes] of the data list's pretraining split; a ValueError naming
    --datalist when the list is missing or is not one."""
    if not datalist.is_file():
        raise ValueError(f"--datalist {datalist} does not exist: the export credits the audio of the run's corpus "
                         f"from its data list, which scripts/build_corpus.py writes; pass --datalist with the list of "
                         f"the corpus this run trained on")
    try:
        rows = _read_csv(datalist, DATALIST_COLUMNS, lambda row: row | {"seconds": float(row["seconds"])})
    except ValueError as error:
        raise ValueError(f"--datalist {error}") from None
    totals: dict[tuple, list] = {}
    for row in rows:
        if row["split"] == "pretrain":
            total = totals.setdefault((row["source"], row["licence"], row["credit"]), [0, 0.0])
            total[0] += 1
            total[1] += row["seconds"] / 60
    return totals


def _plot_curve(rows: list[dict], path: Path, exported_step: int) -> dict:
    """Plot loss (total, frame, utterance) and learning rate against the step, the exported step marked;
    return the last row logged at or before it."""
    step = [row["step"] for row in rows]
    figure, (loss_axis, lr_axis) = plots.new_figure(2, 1, figsize=(6, 4.5), sharex=True,
                                                    gridspec_kw={"height_ratios": [3, 1]})
    for column in ("loss", "frame_loss", "utterance_loss"):
        loss_axis.plot(step, [row[column] for row in rows], label=column.replace("_", " "))
    loss_axis.set(ylabel="training loss", title="ECHO default model: pretraining")
    if exported_step < step[-1]:
        loss_axis.axvline(exported_step, color="black", linestyle=":", label=f"exported (step {exported_step})")
    loss_axis.legend(fontsize=8)
    lr_axis.plot(step, [row["lr"] for row in rows], color="gray")
    lr_axis.set(xlabel="step", ylabel="learning rate")
    plots.save(figure, path)
    return [row for row in rows if row["step"] <= exported_step][-1]


def _write_credits(totals: dict[tuple, list], path: Path) -> None:
    """One row per (source, licence, credit) of the pretraining split: files and minutes."""
    atomic.write_csv(path, ("source", "licence", "credit", "files", "minutes"), (
        {"source": source, "licence": licence, "credit": credit, "files": files, "minutes": f"{minutes:.2f}"}
        for (source, licence, credit), (files, minutes) in sorted(totals.items())))


def _recorded_data(data: str) -> str:
    """The run's --data as training.json records it: relative to the repository when it lies inside (the
    recipe's corpus/pretrain), as the trainer records it absolute and the bundle ships with echo."""
    path = Path(data)
    return path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else data


def _staging(out: Path) -> Path:
    """A new staging folder in `out`, export-PID-XXXXXXXX.tmp. Those of processes no longer alive (an export
    killed mid-write) are removed first: nothing else ever would. The process id tells them from a concurrent
    export's into the same folder, which an age would not (a slow disk can take long to write one), nor a lock
    (a killed process's lock is as stale as its folder). This process's own id on one is a killed process's:
    a restarted container gives the same ids again."""
    for left in out.glob("export-*.tmp"):
        match = re.fullmatch(r"export-(\d+)-\w+\.tmp", left.name)
        if match and left.is_dir() and (int(match[1]) == os.getpid() or not atomic.process_alive(int(match[1]))):
            shutil.rmtree(left, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"export-{os.getpid()}-", suffix=".tmp", dir=out))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="run folder of python -m echo pretrain")
    parser.add_argument("--out", type=Path, default=REPO / "echo/data/default")
    parser.add_argument("--step", type=int, default=None, help="the checkpoint of this step (default: the newest)")
    parser.add_argument("--datalist", type=Path, default=REPO / "corpus/datalist.csv",
                        help="the corpus's data list (scripts/build_corpus.py; default: the repository's)")
    args = parser.parse_args(argv)

    if args.out.exists() and not args.out.is_dir():
        raise SystemExit(f"--out {args.out} is a file: it takes the folder to export into")
    try:  # every input is read and checked before anything in --out is written; the data list first, at once
        credits = _credit_totals(args.datalist)
        model, saved = run_encoder(args.run, step=args.step)
        curve = _curve_rows(args.run / "steps.csv", saved["step"])
        require("matplotlib", "the training curve")
    except (ValueError, ImportError) as error:
        raise SystemExit(str(error))
    config = PretrainConfig(**saved["config"])
    try:
        atomic.check_writable(args.out, f"--out {args.out}")
    except ValueError as error:
        raise SystemExit(str(error)) from None
    # Every file is written into a folder of its own inside --out first, and moved over the old ones only once
    # all are: an error midway leaves the old set whole, never new weights beside the old curve and credits.
    staging = _staging(args.out)
    try:
        echo.save(model, staging / "model.safetensors", dtype=torch.float16)
        last = _plot_curve(curve, staging / "training_curve.png", saved["step"])
        _write_credits(credits, staging / "DATA_CREDITS.csv")
        record = {"steps_trained": saved["step"], "steps_planned": config.steps, "exported": config.export,
                  "last_logged": last,
                  "pretrain_config": {k: v for k, v in config.to_dict().items() if k not in ("out", "device")}
                  | {"data": _recorded_data(config.data)}}
        atomic.write_text(staging / "training.json", json.dumps(record, indent=2) + "\n")
        # It measured the model about to be replaced: kept, it would pass for the new one's until evaluated
        # again. Removed before the moves, so that even a move failing midway leaves no new file beside it.
        evaluation = args.out / "evaluation.json"
        if evaluation.is_file():
            evaluation.unlink()
            print(f"removed {evaluation}, the evaluation of the model replaced: run scripts/evaluate_default.py "
                  "--json to measure the new one")
        for name in BUNDLE:
            os.replace(staging / name, args.out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size = (args.out / "model.safetensors").stat().st_size
    print(f"exported the {config.export} at step {saved['step']} of {config.steps} to "
          f"{args.out / 'model.safetensors'} ({size / 2**20:.1f} MiB, fp16)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
