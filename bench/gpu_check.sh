#!/usr/bin/env bash
# Every check that needs a CUDA machine, in one script: the kernel tests on the GPU (no interpreter), the
# pytest-benchmark microbenchmarks of every kernel against its reference and the library alternatives present,
# end-to-end encode throughput, the packed-vs-padded pretraining step, and the compiled extension's CUDA op
# (built here with nvcc, then its tests). Everything goes under $OUT (default ./gpu_out); each stage is
# time-boxed, and a failing stage is logged without stopping the others. STAGES picks a subset.
# Time limits (most stages end sooner): environment 1 minute, kernels + benchmarks 4.5, encode + pretrain 9.7,
# csrc build + tests 5; about 20 minutes if every stage ran to its limit. STAGES picks a subset to fit less.
#
#   OUT=/tmp/gpu_out bash bench/gpu_check.sh
#   STAGES="pretrain csrc" bash bench/gpu_check.sh
set -u
usage() { sed -n '2,/^set -u/{/^#/s/^# \{0,1\}//p}' "$0"; }  # the comment above
case "${1:-}" in
    -h|--help) usage; exit 0 ;;
    "") ;;
    *) echo "gpu_check.sh takes no arguments (OUT, STAGES, PYTHON are environment variables); got: $*" >&2
       usage >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
# without a GPU every stage would skip or run the CPU's tests again (and the csrc stage would rebuild the CPU
# extension in place): one line and exit 0, as the other benchmarks do; checked again below after an install.
# A $PYTHON without torch is judged by the NVIDIA driver: on a CPU machine it made ./gpu_out and pip-installed
# torch, triton and the rest into that Python before finding no GPU.
if "$PYTHON" -c 'import torch' 2>/dev/null; then
    "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null \
        || no_gpu="torch.cuda.is_available() is False"
elif [ ! -e /proc/driver/nvidia/version ] && ! command -v nvidia-smi >/dev/null; then
    no_gpu="no NVIDIA driver, and $PYTHON cannot import torch"
fi
if [ -n "${no_gpu:-}" ]; then
    echo "skipped: no CUDA device ($no_gpu); every stage of gpu_check.sh needs one"
    exit 0
fi
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # the real compiler, not the CPU interpreter

log() { echo "$*" | tee -a "$SUMMARY"; }
stage() {  # stage NAME SECONDS COMMAND...: run, log its output and exit status, never abort the script
    local name="$1" seconds="$2"; shift 2
    local start=$SECONDS
    timeout --kill-after=10 "$seconds" "$@" >"$OUT/$name.log" 2>&1
    local status=$?
    log "stage $name: exit $status ($((SECONDS - start)) s; log $OUT/$name.log)$([ $status -eq 124 ] || [ $status -eq 137 ] && echo ' TIMED OUT')"
    tail -n 25 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY" >/dev/null
}

: >"$SUMMARY"
log "gpu_check $(date -u +%FT%TZ) in $PWD"

# 1. environment: torch with CUDA, triton; install only when no torch is importable at all
# (the machine may have no network: pip gets one short try)
PIP="timeout 120 $PYTHON -m pip install --retries 0 --timeout 10"
if ! "$PYTHON" -c 'import torch' 2>/dev/null; then
    log "no importable torch: pip install torch triton (NOTE: installed by this script)"
    $PIP torch triton >"$OUT/pip.log" 2>&1 || log "pip install torch triton failed, see $OUT/pip.log"
fi
for module in triton pytest pytest_benchmark numpy safetensors tqdm scipy; do
    if ! "$PYTHON" -c "import $module" 2>/dev/null; then
        package="${module//_/-}"
        log "$module missing: pip install $package"
        $PIP "$package" >>"$OUT/pip.log" 2>&1 || log "pip install $package failed, see $OUT/pip.log"
    fi
done
stage environment 60 "$PYTHON" -c '
import torch
print("torch", torch.__version__, "cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(), "capability:", torch.cuda.get_device_capability())
try:
    import triton; print("triton", triton.__version__)
except ImportError as error:
    print("triton missing:", error)
for name in ("flash_attn",):
    try:
        __import__(name); print(name, "installed")
    except ImportError:
        print(name, "not installed")
'
if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    log "skipped: torch.cuda.is_available() is False (the kernel tests would run under the interpreter and the"
    log "benchmarks skip); every later stage needs a CUDA device"
    exit 0
fi

STAGES=" ${STAGES:-kernels benchmarks encode pretrain csrc} "
wanted() { [[ "$STAGES" == *" $1 "* ]]; }

# 2. the kernel tests on the GPU (the same files CI runs on the CPU interpreter)
wanted kernels && stage kernel_tests 120 "$PYTHON" -m pytest -q -m "" -p no:cacheprovider -rs --durations=5 \
    tests/test_kernel_stft.py tests/test_kernel_tokens.py tests/test_kernel_attention.py \
    tests/test_kernel_norm.py tests/test_kernel_encoder.py

# 3. microbenchmarks, each kernel against its reference and the library alternatives present
if wanted benchmarks; then
    stage benchmarks 150 "$PYTHON" -m pytest -q -s -p no:cacheprovider -rs --benchmark-only \
        --benchmark-json="$OUT/benchmarks.json" --benchmark-columns=median,iqr,rounds \
        bench/benchmark_stft.py bench/benchmark_tokens.py bench/benchmark_attention.py bench/benchmark_norm.py
    grep -E " ms .* GB/s " "$OUT/benchmarks.log" >"$OUT/rates.txt" 2>/dev/null
    log "achieved rates (also in $OUT/rates.txt):"
    sed 's/^/    /' "$OUT/rates.txt" | tee -a "$SUMMARY"
fi

# 4. end to end: fast.encode against the per-signal reference (issue 4)
# (the per-signal reference path dominates: W1 and W2 at --repeat 2 ran past 110 s on an H100)
wanted encode && stage encode 240 "$PYTHON" bench/encode_throughput.py --device cuda --workloads W1 W2 --repeat 2
# the GPU path is bound by the host (bf16 at 1-5% of the peak): where the host's time goes
wanted encode && stage encode_profile 60 "$PYTHON" bench/profile_encode.py --device cuda --python --utterances \
    --dtype bfloat16

# 5. pretraining: the packed step against the padded one, tiny and small (issue 7)
# 32768 teacher tokens: ~270 clips of the 1-10 s mix per step, the paper's batch of 256 (measured: ~200 s on an H100)
wanted pretrain && stage pretrain 280 "$PYTHON" bench/pretrain_throughput.py --device cuda \
    --tokens-per-batch 32768 --steps 3 --warmup 2 --repeats 2

# 6. the compiled extension's CUDA op: build it here with nvcc, then its tests on the GPU (issue 6)
if wanted csrc; then
    # The lent H100 image's default compiler (the one its Python was built with, /opt/gcc) links a C++ runtime
    # of its own, and setup.py refuses such a build; the system compiler is the one torch was built with there.
    if [ -z "${CXX:-}" ] && [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc; fi
    stage csrc_build 240 "$PYTHON" setup.py build_ext --inplace
    stage csrc_tests 60 "$PYTHON" -m pytest -q -p no:cacheprovider -rs tests/test_csrc.py
fi
log "done in $SECONDS s"
