#!/usr/bin/env bash
# Several seeds of the default model's recipe side by side (on one GPU when torch sees one), every checkpoint of
# every seed scored on validation, the best across seeds and steps exported and evaluated, then every checkpoint
# scored on the evaluation's tasks too (ROOT/heldout.csv, for the record, not to choose). The seed moves every
# score as much as most changes of recipe do, so a recipe is only measured, and its checkpoint only chosen, over
# several.
# Run from a fresh clone with echo's dev extra installed (pip install -e '.[dev]'):
#
#     SEEDS="0 1 2 3" STOP_AT=400 SAVE_EVERY=50 bash scripts/train_seeds.sh [ROOT]   (default runs/seeds)
#
# Seed N trains into ROOT/seed-N (log: ROOT/seed-N.log) through scripts/train_default.sh, whose settings (STEPS,
# TOKENS, LR, WARMUP, EXTRA, SHORTEST_CROP, MIN_SECONDS, STOP_AT, SAVE_EVERY, DEVICE) apply to every seed; WORKERS (default 14) are shared out
# among the seeds. The chosen encoder is exported to EXPORT_DIR (default ROOT/chosen) with its evaluation: the
# bundled model is replaced only when asked, with EXPORT_DIR=echo/data/default. (Not OUT: CI and other tools set
# OUT for their own output, and a device machine's once received the export.)
# Both evaluations draw the demo's clips DEMO_SEEDS times (default 20; one draw says little, see the model card's
# "More than chance?"); each draw costs a few seconds a checkpoint.
set -euo pipefail
# an option or a second folder would otherwise be taken for the root folder, hours before anyone notices
if [ $# -gt 1 ] || [[ ${1:-} = -* ]]; then
    echo "usage: bash scripts/train_seeds.sh [ROOT]   (settings as VAR=value before it: see the script's header)" >&2
    exit 2
fi
REPO=$(cd "$(dirname "$0")/.." && pwd)
source "$REPO/scripts/paths.sh"  # absolute, PYTHON
ROOT=${1:-$REPO/runs/seeds}
absolute ROOT
EXPORT_DIR=${EXPORT_DIR:-$ROOT/chosen}
absolute EXPORT_DIR
export PYTHON
cd "$REPO"
read -r -a seeds <<< "${SEEDS-0 1 2 3}"
[ ${#seeds[@]} -gt 0 ] || { echo "SEEDS is empty: give at least one seed, e.g. SEEDS=\"0 1\"" >&2; exit 2; }
# seed N trains into ROOT/seed-N: a repeated seed would run two trainings into one folder at once
for seed in "${seeds[@]}"; do
    [[ $seed =~ ^(0|[1-9][0-9]*)$ ]] || { echo "SEEDS holds '$seed': give whole numbers, e.g. SEEDS=\"0 1\"" >&2; exit 2; }
done
[ "$(printf '%s\n' "${seeds[@]}" | sort -u | wc -l)" -eq ${#seeds[@]} ] || {
    echo "SEEDS repeats a seed (${seeds[*]}): each trains into its own ROOT/seed-N" >&2; exit 2; }
workers=$(( ${WORKERS:-14} / ${#seeds[@]} ))
mkdir -p "$ROOT"
"$PYTHON" scripts/build_corpus.py --out corpus --synthetic 500 --seed 0 ${EXTRA:+--extra $EXTRA} >"$ROOT/corpus.log"
pids=()
for seed in "${seeds[@]}"; do
    SEED=$seed WORKERS=$(( workers > 0 ? workers : 1 )) TRAIN_ONLY=1 CORPUS_BUILT=1 \
        bash scripts/train_default.sh "$ROOT/seed-$seed" >"$ROOT/seed-$seed.log" 2>&1 &
    pids+=($!)
done
failed=0
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || { echo "seed ${seeds[$i]} failed: see $ROOT/seed-${seeds[$i]}.log"; failed=1; }
done
[ "$failed" -eq 0 ] || exit 1
runs=()
for seed in "${seeds[@]}"; do runs+=("$ROOT/seed-$seed"); done
# one torch thread per scoring process, as the model card's numbers were scored
export OMP_NUM_THREADS=1
choice=$("$PYTHON" scripts/select_checkpoint.py "${runs[@]}" --baselines --print-run \
    2> >(tee "$ROOT/validation.txt" >&2))
CHOSEN=${choice% *} STEP=${choice##* }  # "RUN STEP": the run folder may hold spaces
"$PYTHON" scripts/export_default.py "$CHOSEN" --step "$STEP" --out "$EXPORT_DIR" --datalist corpus/datalist.csv
"$PYTHON" scripts/evaluate_default.py --model "$EXPORT_DIR/model.safetensors" --corpus corpus \
    --demo-seeds "${DEMO_SEEDS:-20}" --json "$EXPORT_DIR/evaluation.json"
# for the record of the recipe's spread, after the choice: every checkpoint on the reported tasks
"$PYTHON" scripts/evaluate_default.py --runs "${runs[@]}" --corpus corpus --demo-seeds "${DEMO_SEEDS:-20}" \
    --csv "$ROOT/heldout.csv"
