#!/usr/bin/env bash
# The recipe of echo's bundled default model (echo/data/default/): corpus, pretraining, checkpoint choice,
# export, evaluation.
# Run from a fresh clone with echo's dev extra installed (pip install -e '.[dev]'):
#
#     bash scripts/train_default.sh [RUN_DIR]      (default runs/default; an existing run resumes)
#
# On one CPU core the pretraining takes about 60-90 minutes; set DEVICE=cuda to use a GPU. STEPS, TOKENS
# (teacher tokens per step) and WORKERS (DataLoader workers) default to the bundled model's recipe (1500,
# 4096, 1); EXTRA=hydrogen-drumkits adds the drum kits to the corpus (not in the bundled recipe); a GPU run
# scales STEPS, TOKENS and WORKERS (an H100 took ~270 clips, 32768 tokens, per step at ~0.1 s: bench/RESULTS.md).
# The corpus (~220 MB) is built from Debian packages fetched with apt-get download (nothing is installed).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${1:-runs/default}
# The committed run used one CPU thread (the machine was shared, and two threads fighting other processes were
# several times slower); more threads are faster on an idle machine but change the float summation order.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PYTHON=${PYTHON:-python}

"$PYTHON" scripts/build_corpus.py --out corpus --synthetic 500 --seed 0 ${EXTRA:+--extra $EXTRA}
"$PYTHON" -m echo pretrain --data corpus/pretrain --out "$RUN_DIR" --size tiny --steps "${STEPS:-1500}" \
    --tokens-per-batch "${TOKENS:-4096}" --crop-seconds 4 --lr 2e-4 --warmup 25 --ema-start 0.999 --ema-end 0.9999 \
    --utterance-target layer-mean --export student --precision bf16 --workers "${WORKERS:-1}" --seed 0 \
    --save-every 100 --keep 15 --log-every 20 ${DEVICE:+--device "$DEVICE"}
# The checkpoint is chosen on a validation task (other machines and clips than the demo's), never on the
# held-out clips the model card reports.
STEP=$("$PYTHON" scripts/select_checkpoint.py "$RUN_DIR")
"$PYTHON" scripts/export_default.py "$RUN_DIR" --step "$STEP" --out echo/data/default --datalist corpus/datalist.csv
"$PYTHON" scripts/evaluate_default.py --model default --corpus corpus --json echo/data/default/evaluation.json
