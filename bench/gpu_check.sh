#!/usr/bin/env bash
# One command for a bare CUDA machine (torch, nvcc, ninja, pybind11, pytest and compute-sanitizer
# installed; no network, no venv, no pip): build for the local GPU, run the test suite on CUDA, run
# compute-sanitizer memcheck / racecheck / synccheck over every CUDA kernel, run the benchmarks.
#
#   bash bench/gpu_check.sh OUT_DIR
#
# Every step logs to OUT_DIR/<step>.log and is timed; a failed step does not stop the others (a
# failed build skips the steps that need it). Ends with a table (step, status, seconds) printed and
# written to OUT_DIR/summary.md. Benchmark results go to bench/results/ (check them in) and are
# copied to OUT_DIR. Exit status: 0 when every step passed, 1 otherwise.
#
# Environment: PYTHON (default: the first of python, python3 that imports torch), TORCH_CUDA_ARCH_LIST
# (default: the local GPU's), CUDA_HOME, MAX_JOBS, SKIP (space-separated step names to skip),
# SANITIZER (default: compute-sanitizer on PATH or under CUDA_HOME/bin).
# shellcheck disable=SC2317  # the step functions below are called through `step`
set -uo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: bash bench/gpu_check.sh OUT_DIR" >&2
  exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1" || exit 2
OUT="$(cd "$1" && pwd)"
cd "$ROOT" || exit 2

SUMMARY_ROWS=()
FAILED=0
SKIP="${SKIP:-}"
T_ALL=$SECONDS

log() { printf '[gpu_check %s] %s\n' "$(date +%H:%M:%S)" "$*" | tee -a "$OUT/gpu_check.log"; }

# step NAME COMMAND...: runs COMMAND with stdout+stderr to $OUT/NAME.log, records status and seconds.
# Status: ok, FAIL (rc N), "targets missed" (bench --check exit 3), skipped.
step() {
  local name="$1"
  shift
  if [[ " $SKIP " == *" $name "* ]]; then
    SUMMARY_ROWS+=("| $name | skipped | 0 | |")
    log "$name: skipped (SKIP)"
    return 0
  fi
  log "$name: $*"
  local t0=$SECONDS rc
  {
    echo "# $*"
    echo "# started $(date -Is)"
    "$@"
  } >"$OUT/$name.log" 2>&1
  rc=$?
  local dt=$((SECONDS - t0)) status
  if [[ $rc -eq 0 ]]; then
    status="ok"
  elif [[ $name == bench* && $rc -eq 3 ]]; then
    status="targets missed"
    FAILED=1
  else
    status="FAIL (rc $rc)"
    FAILED=1
  fi
  echo "# finished $(date -Is), rc $rc, ${dt} s" >>"$OUT/$name.log"
  SUMMARY_ROWS+=("| $name | $status | $dt | $name.log |")
  log "$name: $status in ${dt} s"
  return $rc
}

skip_step() {
  SUMMARY_ROWS+=("| $1 | skipped ($2) | 0 | |")
  log "$1: skipped ($2)"
}

# ---- environment
if [[ -z "${PYTHON:-}" ]]; then
  for candidate in python python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c "import torch" 2>/dev/null; then
      PYTHON="$(command -v "$candidate")"
      break
    fi
  done
fi
if [[ -z "${PYTHON:-}" ]]; then
  echo "no python with torch found (set PYTHON=...)" >&2
  exit 2
fi
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
export TROUS_TEST_DEVICE=cuda
export PYTHONUNBUFFERED=1
if [[ -z "${CUDA_HOME:-}" ]]; then
  if [[ -x /usr/local/cuda/bin/nvcc ]]; then
    CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null; then
    CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
  fi
fi
export CUDA_HOME="${CUDA_HOME:-}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  TORCH_CUDA_ARCH_LIST="$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)"
fi
export TORCH_CUDA_ARCH_LIST
SANITIZER="${SANITIZER:-$(command -v compute-sanitizer || echo "${CUDA_HOME:+$CUDA_HOME/bin/compute-sanitizer}")}"

env_report() {
  echo "host: $(hostname)  date: $(date -Is)"
  echo "git: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo none) $(git -C "$ROOT" status --porcelain 2>/dev/null | wc -l) changed files"
  echo "python: $PYTHON"
  echo "CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
  echo "sanitizer: ${SANITIZER:-none}"
  nvidia-smi || true
  "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version || true
  "$PYTHON" -c 'import torch, sys; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")'
  "$PYTHON" -c 'import ninja, pybind11, pytest; print("ninja", ninja.__version__, "pybind11", pybind11.__version__, "pytest", pytest.__version__)' || true
  [[ -n "$TORCH_CUDA_ARCH_LIST" ]] || { echo "no GPU visible to torch: cannot pick TORCH_CUDA_ARCH_LIST"; return 1; }
}

build() {
  # TROUS_CUDA=1: fail instead of silently building CPU kernels only. -Xptxas -v goes to this log.
  TROUS_CUDA=1 "$PYTHON" setup.py build_ext --inplace || return $?
  "$PYTHON" -c 'import trous; print("trous._C", trous._C.__file__, dict(trous._C.build_info()))'
}

ptxas_report() {
  # Registers / shared memory / stack / spills per kernel, extracted from the build log. Fails when no
  # kernel was compiled (no CUDA build) or one spills or uses a stack frame (local memory).
  [[ -s "$OUT/build.log" ]] || { echo "no build log"; return 1; }
  grep -E "ptxas info|ptxas warning|Compiling entry function|bytes stack frame" "$OUT/build.log" >"$OUT/ptxas.txt"
  local n
  n=$(grep -c "Compiling entry function" "$OUT/ptxas.txt")
  echo "$n kernel compilations (kernels x archs); report in ptxas.txt"
  grep -E "Used [0-9]+ registers" "$OUT/ptxas.txt" | sed -E 's/.*Used ([0-9]+) registers.*/\1/' | sort -n | tail -1 |
    sed 's/^/most registers used by a kernel: /'
  [[ $n -gt 0 ]] || { echo "no kernel compiled"; return 1; }
  if grep -qE "ptxas warning|[1-9][0-9]* bytes (spill|stack frame)" "$OUT/ptxas.txt"; then
    echo "spills, stack frames or ptxas warnings:"
    grep -E "ptxas warning|[1-9][0-9]* bytes (spill|stack frame)" "$OUT/ptxas.txt"
    return 1
  fi
}

run_pytest() {
  "$PYTHON" -m pytest tests -q -ra --junitxml="$OUT/pytest.xml"
}

sanitize() {
  # compute-sanitizer over the smoke script. PyTorch's caching allocator would hide out-of-bounds
  # accesses inside its pooled blocks: disable it so every tensor is its own cudaMalloc.
  local tool="$1"
  shift
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 99 --print-limit 200 "$@" \
    "$PYTHON" -m trous.smoke --device cuda --quick --allow-missing
}

bench() {
  "$PYTHON" -m trous.bench --device cuda --out "$ROOT/bench/results" --check --no-progress
  local rc=$? f
  # Copy what it wrote ("wrote PATH" lines of this step's log) next to the logs.
  while read -r _ f; do
    cp "$f" "$OUT"/
  done < <(grep '^wrote /' "$OUT/bench.log")
  return "$rc"
}

log "output: $OUT"
step env env_report
if step build build; then
  BUILT=1
  step ptxas ptxas_report
else
  BUILT=0
  skip_step ptxas "build failed"
fi
if [[ $BUILT -eq 1 ]]; then
  step info "$PYTHON" -m trous.info
  step pytest run_pytest
  step smoke "$PYTHON" -m trous.smoke --device cuda
  if [[ -n "$SANITIZER" && -x "$SANITIZER" ]]; then
    # memcheck: every kernel the script launches (torch's too); racecheck / synccheck: trous's kernels
    # only (their names contain "trous"), torch's own kernels would take most of the time.
    step memcheck sanitize memcheck
    step racecheck sanitize racecheck --kernel-name kns=trous
    step synccheck sanitize synccheck --kernel-name kns=trous
  else
    for t in memcheck racecheck synccheck; do skip_step $t "compute-sanitizer not found"; done
  fi
  step bench bench
else
  for s in info pytest smoke memcheck racecheck synccheck bench; do skip_step "$s" "build failed"; done
fi

{
  echo "# gpu_check $(date -Is)"
  echo
  echo "$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1), torch $("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null), archs $TORCH_CUDA_ARCH_LIST, git $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo none)"
  echo
  echo "| step | status | seconds | log |"
  echo "| --- | --- | ---: | --- |"
  printf '%s\n' "${SUMMARY_ROWS[@]}"
  echo
  echo "total: $((SECONDS - T_ALL)) s"
  if grep -q '^op  ' "$OUT/bench.log" 2>/dev/null; then
    echo
    echo '```'
    sed -n '/^op  /,/^copy bandwidth/p' "$OUT/bench.log"
    sed -n '/rows miss a target/,$p;/rows meet their targets/p' "$OUT/bench.log" | grep -v '^# finished'
    echo '```'
  fi
} >"$OUT/summary.md"
cat "$OUT/summary.md"
exit $FAILED
