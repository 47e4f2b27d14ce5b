"""Turn a pretraining run into the bundled default model: the encoder the run exports (its --export, teacher
or student) from its newest checkpoint, or from the one `--step` names (scripts/select_checkpoint.py chooses
it), as fp16 safetensors (config in its metadata and in model.json beside it), the run's config and length,
and its training curve.

    python scripts/export_default.py RUN_DIR [--step N] [--out echo/data/default]

Writes OUT/model.safetensors, OUT/model.json, OUT/training.json, OUT/training_curve.png and, from the
corpus's data list, OUT/DATA_CREDITS.csv (every source, licence and credit of the pretraining audio, with
its file count and minutes). A run that has not finished is exported as it stands; training.json says how
many steps it got.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import echo  # noqa: E402
from echo.eval import plots  # noqa: E402
from echo.pretrain.trainer import PretrainConfig, run_encoder  # noqa: E402


def _curve(steps_csv: Path, path: Path, exported_step: int) -> dict:
    """Plot loss (total, frame, utterance) and learning rate against the step, the exported step marked;
    return the last row logged at or before it."""
    with open(steps_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    logged = [row for row in rows if int(row["step"]) <= exported_step]
    if not logged:
        raise SystemExit(f"{steps_csv} has no step logged by step {exported_step}")
    step = [int(row["step"]) for row in rows]
    plt = plots._pyplot()
    figure, (loss_axis, lr_axis) = plt.subplots(2, 1, figsize=(6, 4.5), sharex=True,
                                                gridspec_kw={"height_ratios": [3, 1]})
    for column in ("loss", "frame_loss", "utterance_loss"):
        loss_axis.plot(step, [float(row[column]) for row in rows], label=column.replace("_", " "))
    loss_axis.set(ylabel="training loss", title="ECHO default model: pretraining")
    if exported_step < step[-1]:
        loss_axis.axvline(exported_step, color="black", linestyle=":", label=f"exported (step {exported_step})")
    loss_axis.legend(fontsize=8)
    lr_axis.plot(step, [float(row["lr"]) for row in rows], color="gray")
    lr_axis.set(xlabel="step", ylabel="learning rate")
    plots._save(figure, path)
    return logged[-1]


def _credits(datalist: Path, path: Path) -> None:
    """One row per (source, licence, credit) of the pretraining split: files and minutes."""
    totals: dict[tuple, list] = {}
    with open(datalist, newline="") as handle:
        for row in csv.DictReader(handle):
            if row["split"] == "pretrain":
                total = totals.setdefault((row["source"], row["licence"], row["credit"]), [0, 0.0])
                total[0] += 1
                total[1] += float(row["seconds"]) / 60
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["source", "licence", "credit", "files", "minutes"])
        for (source, licence, credit), (files, minutes) in sorted(totals.items()):
            writer.writerow([source, licence, credit, files, f"{minutes:.2f}"])
    os.replace(temporary, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="run folder of python -m echo pretrain")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "echo/data/default")
    parser.add_argument("--step", type=int, default=None, help="the checkpoint of this step (default: the newest)")
    parser.add_argument("--datalist", type=Path, default=Path("corpus/datalist.csv"),
                        help="the corpus's data list (scripts/build_corpus.py)")
    args = parser.parse_args(argv)

    try:
        model, saved = run_encoder(args.run, step=args.step)
    except ValueError as error:
        raise SystemExit(str(error))
    config = PretrainConfig(**saved["config"])
    args.out.mkdir(parents=True, exist_ok=True)
    echo.save(model, args.out / "model.safetensors", dtype=torch.float16)
    last = _curve(args.run / "steps.csv", args.out / "training_curve.png", saved["step"])
    _credits(args.datalist, args.out / "DATA_CREDITS.csv")
    record = {"steps_trained": saved["step"], "steps_planned": config.steps, "exported": config.export,
              "last_logged": {key: float(value) for key, value in last.items()},
              "pretrain_config": {k: v for k, v in config.to_dict().items() if k not in ("out", "device")}}
    temporary = args.out / "training.json.tmp"
    temporary.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(temporary, args.out / "training.json")
    size = (args.out / "model.safetensors").stat().st_size
    print(f"exported the {config.export} at step {saved['step']} of {config.steps} to "
          f"{args.out / 'model.safetensors'} ({size / 2**20:.1f} MiB, fp16)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
