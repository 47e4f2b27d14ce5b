#!/usr/bin/env bash
# The recipe of echo's bundled default model (echo/data/default/): corpus, pretraining, checkpoint choice,
# export, evaluation.
# Run from a fresh clone with echo's dev extra installed (pip install -e '.[dev]'):
#
#     bash scripts/train_default.sh [RUN_DIR]      (default runs/default; an existing run resumes)
#
# The bundled model was trained on one H100 GPU (~11 steps/s; the model card has the run); a GPU is used when
# torch sees one (DEVICE=cpu or DEVICE=cuda:1 to choose). On a 2-core CPU a step takes ~10 s: STOP_AT=200 stops
# after the bundled checkpoint's step (~35 minutes) with the schedule unchanged.
# STEPS, TOKENS (teacher tokens per step), LR, WARMUP, WORKERS (DataLoader workers, which also fix the order of
# the data), SEED and SAVE_EVERY default to the bundled model's recipe (1400, 16384, 8e-4, 100, 14, 0, 200). The
# seed moved every score as much as most changes of recipe did (the model card): compare configs over several
# (scripts/train_seeds.sh runs seeds side by side). EXTRA=hydrogen-drumkits adds the drum kits to the corpus (not
# in the bundled recipe); SHORTEST_CROP=0.2 draws crops of random length from 0.2 s to 4 s, MIN_SECONDS=0.2 keeps
# files from 0.2 s (the recipe: 4 s crops, files from 1 s). TRAIN_ONLY=1 stops after training, before the choice, export and evaluation;
# CORPUS_BUILT=1 skips the corpus step (scripts/train_seeds.sh builds it once for all seeds).
# The corpus (~220 MB) is built from Debian packages fetched with apt-get download (nothing is installed).
set -euo pipefail
# an option or a second folder would otherwise be taken for the run folder, hours before anyone notices
if [ $# -gt 1 ] || [[ ${1:-} = -* ]]; then
    echo "usage: bash scripts/train_default.sh [RUN_DIR]   (settings as VAR=value before it: see the script's header)" >&2
    exit 2
fi
REPO=$(cd "$(dirname "$0")/.." && pwd)
source "$REPO/scripts/paths.sh"  # absolute, PYTHON
RUN_DIR=${1:-$REPO/runs/default}
absolute RUN_DIR
cd "$REPO"
# One torch thread per process: the data workers are the processes that need the cores, and the checkpoint
# choice and evaluation below were scored with one thread (more change the float summation order).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# On a CPU, glibc's heap fragments over a run (echo/host_memory.py): large blocks mapped on huge pages.
if [ "${DEVICE:-}" = cpu ] || ! "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.mmap_threshold=4194304:glibc.malloc.hugetlb=1}
fi

[ -n "${CORPUS_BUILT:-}" ] || "$PYTHON" scripts/build_corpus.py --out corpus --synthetic 500 --seed 0 ${EXTRA:+--extra $EXTRA}
# A step is logged by the first checkpoint's, so that every checkpoint can be exported with its curve
SAVE_EVERY=${SAVE_EVERY:-200}
LOG_EVERY=$(( SAVE_EVERY < 20 ? SAVE_EVERY : 20 ))
"$PYTHON" -m echo pretrain --data corpus/pretrain --out "$RUN_DIR" --size tiny --steps "${STEPS:-1400}" \
    --tokens-per-batch "${TOKENS:-16384}" --crop-seconds 4 --lr "${LR:-8e-4}" --warmup "${WARMUP:-100}" \
    --ema-start 0.999 --ema-end 0.9999 --utterance-target layer-mean --export student --precision bf16 \
    --workers "${WORKERS:-14}" --seed "${SEED:-0}" --save-every "$SAVE_EVERY" --keep 20 --log-every "$LOG_EVERY" ${DEVICE:+--device "$DEVICE"} \
    ${STOP_AT:+--stop-at "$STOP_AT"} ${SHORTEST_CROP:+--shortest-crop-seconds "$SHORTEST_CROP"} \
    ${MIN_SECONDS:+--min-seconds "$MIN_SECONDS"}
[ -z "${TRAIN_ONLY:-}" ] || exit 0
# The checkpoint is chosen on a validation task (other machines and clips than the demo's), never on the
# held-out clips the model card reports.
STEP=$("$PYTHON" scripts/select_checkpoint.py "$RUN_DIR")
"$PYTHON" scripts/export_default.py "$RUN_DIR" --step "$STEP" --out echo/data/default --datalist corpus/datalist.csv
"$PYTHON" scripts/evaluate_default.py --model default --corpus corpus --demo-seeds 20 \
    --json echo/data/default/evaluation.json
