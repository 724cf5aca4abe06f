#!/usr/bin/env bash
# The CUDA engines on a real GPU, in one prepared run (make gpu-check): build _C with CUDA against the
# machine's own python3 and torch, run the CUDA and GPU parity tests, count the host syncs per window, then
# the GPU benchmark. No network, no venv, no installs. Each phase runs under its own time limit inside one
# overall deadline (GPU_CHECK_SECONDS, default 420); a failing phase does not stop the later ones, and the
# exit code is the sum of the failed phases' bits: build 1, import 2, tests 4, sync 8, bench-core 16,
# bench 32. Everything lands in OUT (at most 8 files, as the device tool returns):
#   gpu_check.log  every phase's full output     summary.txt  one line per phase, the verdicts, the tables
#   sync.json      syncs per window (profiler)    core/results.{json,md}   engines vs eager, no compiles
#   bench/results.{json,md,png}  every contender, torch.compile and Lightning included
#
#   OUT=/tmp/out PYTHON=python3 bench/gpu_check.sh
# Knobs: PHASES (default "env build import tests sync bench-core bench"), BENCH_WORKLOADS (mlp16,mlp784),
# CORE_WORKLOADS (mlp16,mlp784,cnn), REPETITIONS (10), GPU_CHECK_SECONDS, BUILD_DIR (build/gpu), LIMIT_SCALE
# (1: every phase's own limit times this, for a slow rehearsal machine).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=$(command -v "${PYTHON:-python3}") || { echo "no ${PYTHON:-python3}"; exit 2; }
OUT=${OUT:-build/gpu-check/out}
BUILD=${BUILD_DIR:-build/gpu}
PHASES=${PHASES:-env build import tests sync bench-core bench}
SECONDS_TOTAL=${GPU_CHECK_SECONDS:-420}
REPS=${REPETITIONS:-10}
mkdir -p "$OUT" "$OUT/core" "$OUT/bench" "$(dirname "$BUILD")"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu_check.log SUMMARY=$OUT/summary.txt
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
: >"$LOG"
start=$(date +%s)
status=0
lines=()

if "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  DEVICE=cuda
else
  DEVICE=cpu  # a rehearsal without a GPU: everything runs, the CUDA tests skip, the benchmark is on CPU
fi

# phase NAME BIT LIMIT COMMAND...: run under min(LIMIT, time left), log it, record the outcome.
phase() {
  local name=$1 bit=$2 limit=$3 rc began took left
  shift 3
  [[ " $PHASES " == *" $name "* ]] || return 0
  limit=$((limit * ${LIMIT_SCALE:-1}))
  left=$((start + SECONDS_TOTAL - $(date +%s)))
  ((limit > left)) && limit=$left
  if ((limit < 10)); then
    lines+=("$(printf '%-10s %4s %6s %6s  %s' "$name" - - - "not run: the ${SECONDS_TOTAL} s deadline is spent")")
    status=$((status | bit))
    return 0
  fi
  echo "=== $name (limit ${limit} s) $(date -u +%H:%M:%S)" | tee -a "$LOG"
  began=$(date +%s)
  timeout -k 10 "$limit" bash -c '"$@"' "$name" "$@" >>"$LOG" 2>&1  # bash: the phase may be a function
  rc=$?
  took=$(($(date +%s) - began))
  local said=ok
  if ((rc == 124 || rc == 137)); then said="TIMED OUT"; elif ((rc != 0)); then said=FAILED; fi
  ((rc != 0)) && status=$((status | bit))
  echo "=== $name: $said (rc $rc, ${took} s)" | tee -a "$LOG"
  lines+=("$(printf '%-10s %4s %6s %6s  %s' "$name" "$rc" "$took" "$limit" "$said")")
}

environment() {
  date -u
  nvidia-smi || echo "no nvidia-smi"
  "$PY" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda,
    "available", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")'
  command -v nvcc && nvcc --version | tail -2
  "$PY" -c 'from importlib import metadata as m
for n in "triton lightning pybind11 scikit-build-core cmake ninja pytest hypothesis numpy fitstream".split():
    try: print(n, m.version(n))
    except m.PackageNotFoundError: print(n, "not installed")'
  nproc
}

import_check() {
  PYTHONPATH=$BUILD/pkg "$PY" -c '
import torch, hotloop
from hotloop._native import _C
print("hotloop from", hotloop.__file__, "| _C.WITH_CUDA", _C.WITH_CUDA, "| torch", torch.__version__)
assert _C.WITH_CUDA or torch.version.cuda is None, "torch has CUDA but _C was built without it"'
}

# The engines against the eager loops only (nothing compiles): numbers even if a compile later hangs.
bench_core() {
  PYTHONPATH=$BUILD/pkg:. "$PY" bench/run.py --device "$DEVICE" --sweep none --no-charts --out "$OUT/core" \
    --workloads "${CORE_WORKLOADS:-mlp16,mlp784,cnn}" --repetitions "$REPS" \
    --contenders hotloop,eager-loop,eager-fused,graph-floor
}

# Every contender, interleaved in one process: the headline table.
bench_full() {
  # perf_hints: the log says if inductor skipped CUDA graphs, and why
  TORCH_LOGS=${TORCH_LOGS:-perf_hints} PYTHONPATH=$BUILD/pkg:. "$PY" bench/run.py --device "$DEVICE" \
    --sweep none --out "$OUT/bench" --workloads "${BENCH_WORKLOADS:-mlp16,mlp784}" --repetitions "$REPS" \
    --contenders hotloop,eager-loop,eager-fused,torch-compile,compile-fullgraph,lightning,graph-floor
}

export -f environment import_check bench_core bench_full
export PY BUILD OUT DEVICE REPS
want_cuda=$("$PY" -c 'import torch; print("--require-cuda" if torch.version.cuda else "")' 2>/dev/null)
phase env 0 30 environment
phase build 1 200 bench/cuda_build.sh "$PY" "$BUILD" $want_cuda
phase import 2 30 import_check
phase tests 4 120 env PYTHONPATH= "$PY" -m pytest -q -rs -p no:cacheprovider -o "pythonpath=$BUILD/pkg" \
  tests/cuda tests/test_cuda_graph.py tests/test_native_eval.py
phase sync 8 60 env PYTHONPATH=$BUILD/pkg "$PY" bench/sync_check.py --out "$OUT/sync.json"
phase bench-core 16 60 bench_core
phase bench 32 600 bench_full

{
  echo "gpu-check $(date -u '+%Y-%m-%d %H:%M UTC'): $PY, device $DEVICE, $(($(date +%s) - start)) s of ${SECONDS_TOTAL}"
  printf '%-10s %4s %6s %6s  %s\n' phase rc secs limit result
  printf '%s\n' "${lines[@]}"
  echo "exit code $status (bits: build 1, import 2, tests 4, sync 8, bench-core 16, bench 32)"
  echo
  echo "tests: $(grep -E '^[0-9]+ (passed|failed)|^(FAILED|ERROR) |[0-9]+ (passed|failed|skipped|error)' "$LOG" | tail -8)"
  echo "sync: $(grep -h -E 'sync per window|no CUDA device' "$LOG" | tail -1)"
  for part in core bench; do
    [[ -f $OUT/$part/results.md ]] && { echo; echo "## $part"; cat "$OUT/$part/results.md"; }
  done
} >"$SUMMARY"
cat "$SUMMARY"
exit "$status"
