#!/usr/bin/env bash
# One command for a lent CUDA machine (torch, nvcc, ninja, pybind11, pytest and compute-sanitizer
# installed; no network, no venv, no pip), sized for the lease: one call, a time budget, at most 5
# files back.
#
#   bash bench/gpu_check.sh OUT_DIR [--budget SECONDS] [--family NAME]... [--dry-run]
#
# Stages, in order of value (a stage is one or more steps; each step has its own log):
#   1 env         environment, tools, families found, torch compatibility (every torch.* name the
#                 project's Python uses must exist in the installed torch: "torch X compat: ok")
#   2 build       build in place for the local GPU's arch only, every core (ptxas: the -Xptxas -v
#                 report, spills fail; info: python -m trous.info)
#   3 tests       pytest's CUDA-device tests (-k cuda); smoke: python -m trous.smoke on CUDA
#   4 sanitizers  compute-sanitizer memcheck over the smoke cases (caching allocator off), then
#                 racecheck and synccheck on trous kernels only
#   5 bench       python -m trous.bench --device cuda --quick --check, rows that have GPU targets
#
# Budget: the default 540 s fits one 10-minute device command with the machine's start and the
# transfers. Each step gets a share of what is left (its weight over the weights of the steps still to
# run, so time a step leaves unused goes to the later ones) and is stopped by `timeout` when its share
# runs out: its status is "ran out (N s)" and its partial log is kept.
#
# OUT_DIR gets at most 5 files, rewritten after every step (a killed run still leaves the steps done):
#   summary.md      stage table (status, start, share, seconds), bench table, failures with their first lines
#   <stem>.json/png the benchmark results of all families in one file each (check them in under bench/results/)
#   logs.tar.gz     every log (largest trimmed to head and tail so that the archive stays under 15 MiB)
#
# --family NAME (repeatable, or comma-separated): only that family (its folder name, e.g. kvcache, or its
#   bench name, e.g. kv); families are found in python/trous/<family>/ and tests/<family>/. A family
#   with no tests, no bench or no CUDA kernels is skipped in that stage, with a line saying so.
# --dry-run: the same stages on a CPU machine, the CPU-possible parts only: a CPU-only build
#   (TROUS_CUDA=0) of a copy of the tree in a temporary folder (the checkout's build outputs are not
#   touched), the CPU tests of one family (the given one, else the one with the smallest test files),
#   the CPU smoke cases, the CPU bench of that family, the packing. tests/test_gpu_check.py runs it.
#
# Environment: PYTHON (default: the first of python, python3 that imports torch), TORCH_CUDA_ARCH_LIST
# (default: the local GPU's), CUDA_HOME, MAX_JOBS (default: every core), SKIP (steps to skip, space- or
# comma-separated: env build ptxas info tests smoke memcheck racecheck synccheck bench; or a whole stage:
# sanitizers, or its number 1-5; SKIP=build uses the build already there), SANITIZER (default: compute-sanitizer on PATH or under CUDA_HOME/bin), PYTEST_WORKERS
# (pytest-xdist workers for the tests, default min(8, cores); 0: none), BENCH_FULL=1 (no --quick),
# BENCH_ALL_ROWS=1 (also rows without a target), KEEP_WORK=1 (keep the temporary folder).
# Exit status: 0 when every step passed or was skipped, 1 otherwise, 2 for a usage error.
# shellcheck disable=SC2317,SC2329  # the step functions below are called through `timeout bash -c`
set -uo pipefail

usage() {
  echo "usage: bash bench/gpu_check.sh OUT_DIR [--budget SECONDS] [--family NAME]... [--dry-run]" >&2
  exit 2
}

OUT_ARG=""
BUDGET=540
DRY_RUN=0
FAMILY_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --budget) [[ $# -ge 2 && $2 =~ ^[0-9]+$ ]] || usage; BUDGET=$2; shift 2 ;;
    --budget=*) BUDGET=${1#--budget=}; [[ $BUDGET =~ ^[0-9]+$ ]] || usage; shift ;;
    --family) [[ $# -ge 2 ]] || usage; IFS=, read -ra parts <<<"$2"; FAMILY_ARGS+=("${parts[@]}"); shift 2 ;;
    --family=*) IFS=, read -ra parts <<<"${1#--family=}"; FAMILY_ARGS+=("${parts[@]}"); shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) sed -n '2,/^# shellcheck/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) usage ;;
    *) [[ -z $OUT_ARG ]] || usage; OUT_ARG=$1; shift ;;
  esac
done
[[ -n $OUT_ARG ]] || usage
for tool in timeout tar gzip; do
  command -v "$tool" >/dev/null || { echo "gpu_check: $tool not found" >&2; exit 2; }
done

# A relative PYTHON (.venv/bin/python) is the caller's: the steps run in other folders.
if [[ -n ${PYTHON:-} && $PYTHON == */* && $PYTHON != /* ]]; then PYTHON="$PWD/$PYTHON"; fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$OUT_ARG" || exit 2
OUT="$(cd "$OUT_ARG" && pwd)"
# OUT_DIR holds only what comes back: refuse a folder with other files (bench/results, say).
if [[ -n "$(ls -A "$OUT")" ]]; then
  if [[ -f $OUT/summary.md ]]; then
    rm -f "$OUT"/summary.md "$OUT"/logs.tar.gz "$OUT"/*.json "$OUT"/*.png
  fi
  if [[ -n "$(ls -A "$OUT")" ]]; then
    echo "gpu_check: $OUT is not empty (and not an earlier gpu_check output)" >&2
    exit 2
  fi
fi
cd "$ROOT" || exit 2

WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")" || exit 2
LOGS="$WORK/logs"
mkdir -p "$LOGS" "$WORK/bench"
cleanup() { [[ ${KEEP_WORK:-0} == 1 ]] || rm -rf "$WORK"; }
trap cleanup EXIT

T0=$SECONDS
RESERVE=15          # seconds kept for the last packing
GRACE=5             # seconds between timeout's TERM and its KILL
MIN_SHARE=5         # the least share a step is given; with less than that left it is skipped ("budget spent")
# Steps whose cost is mostly fixed get at least this much (within what is left): env imports torch
# three times (a cold CUDA torch import alone takes seconds), whatever the budget.
declare -A FLOOR=([env]=20)
ARCHIVE_MAX=$((15 * 1024 * 1024))
NCORES="$(nproc 2>/dev/null || echo 2)"

log() { printf '[gpu_check %s] %s\n' "$(date +%H:%M:%S)" "$*" | tee -a "$LOGS/gpu_check.log"; }

# ---- the plan: step, stage, weight (shares of the budget are weight-proportional)
STEPS=(env build ptxas info tests smoke memcheck racecheck synccheck bench)
declare -A STAGE=([env]=1 [build]=2 [ptxas]=2 [info]=2 [tests]=3 [smoke]=3 [memcheck]=4 [racecheck]=4
  [synccheck]=4 [bench]=5)
declare -A STAGE_NAME=([1]=env [2]=build [3]=tests [4]=sanitizers [5]=bench)
declare -A WEIGHT=([env]=3 [build]=20 [ptxas]=1 [info]=1 [tests]=10 [smoke]=2 [memcheck]=6 [racecheck]=5
  [synccheck]=3 [bench]=8)
declare -A STATUS START SHARE TIME SKIP_WHY
for s in "${STEPS[@]}"; do STATUS[$s]=pending; START[$s]=""; SHARE[$s]=""; TIME[$s]=""; done
NOTES=()
FAILED=0

# SKIP: step names; a stage's name that is no step's (sanitizers) or its number skips the whole stage.
SKIP="${SKIP:-}"
for s in ${SKIP//,/ }; do
  known=0
  for t in "${STEPS[@]}"; do
    if [[ $s == "$t" ]]; then SKIP_WHY[$t]="SKIP"; known=1; fi
  done
  [[ $known == 1 ]] && continue
  for t in "${STEPS[@]}"; do
    if [[ $s == "${STAGE_NAME[${STAGE[$t]}]}" || $s == "${STAGE[$t]}" ]]; then SKIP_WHY[$t]="SKIP"; known=1; fi
  done
  [[ $known == 1 ]] || { echo "gpu_check: SKIP=$s is no step or stage (${STEPS[*]} sanitizers 1-5)" >&2; exit 2; }
done
[[ -n ${SKIP_WHY[build]:-} ]] && SKIP_WHY[ptxas]=${SKIP_WHY[ptxas]:-"build skipped"}
if [[ $DRY_RUN == 1 ]]; then
  # On a 2-core CPU machine the build of every family is the dry run's long pole (one family's tests
  # and quick bench are short): it gets twice the weight.
  WEIGHT[build]=40
  SKIP_WHY[ptxas]=${SKIP_WHY[ptxas]:-"dry run: CPU-only build"}
  for t in memcheck racecheck synccheck; do SKIP_WHY[$t]=${SKIP_WHY[$t]:-"dry run: no GPU"}; done
fi

# ---- python and CUDA
if [[ -z "${PYTHON:-}" ]]; then
  for candidate in python python3; do
    if command -v "$candidate" >/dev/null && timeout 120 "$candidate" -c "import torch" 2>/dev/null; then
      PYTHON="$(command -v "$candidate")"
      break
    fi
  done
fi
if [[ -z "${PYTHON:-}" ]]; then
  echo "gpu_check: no python with torch found (set PYTHON=...)" >&2
  exit 2
fi
if [[ -z "${CUDA_HOME:-}" ]]; then
  if [[ -x /usr/local/cuda/bin/nvcc ]]; then
    CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null; then
    CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
  fi
fi
CUDA_HOME="${CUDA_HOME:-}"
MAX_JOBS="${MAX_JOBS:-$NCORES}"
if [[ $DRY_RUN == 0 && -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  TORCH_CUDA_ARCH_LIST="$(timeout 120 "$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)"
fi
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-}"
GPU_LINE="$(timeout 30 nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
SANITIZER="${SANITIZER:-$(command -v compute-sanitizer || echo "${CUDA_HOME:+$CUDA_HOME/bin/compute-sanitizer}")}"
if [[ $DRY_RUN == 1 ]]; then DEVICE=cpu; RUN_ROOT="$WORK/tree"; else DEVICE=cuda; RUN_ROOT="$ROOT"; fi
if [[ -z "${PYTEST_WORKERS:-}" ]]; then
  PYTEST_WORKERS=$((NCORES < 8 ? NCORES : 8))
  "$PYTHON" -c "import xdist" 2>/dev/null || PYTEST_WORKERS=0
fi
[[ $DRY_RUN == 1 ]] && PYTEST_WORKERS=0

# ---- families, found by name (python/trous/<family>/ packages; bench name from <family>/bench.py)
mapfile -t FAM_ALL < <(PYTHONDONTWRITEBYTECODE=1 "$PYTHON" - "$ROOT/python/trous/_families.py" <<'EOF'
import importlib.util, sys
spec = importlib.util.spec_from_file_location("trous_families", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
print("\n".join(mod.names()))
EOF
)
declare -A BENCH_NAME
for fam in "${FAM_ALL[@]}"; do
  f="$ROOT/python/trous/$fam/bench.py"
  if [[ -f $f ]]; then
    name="$(sed -nE 's/^FAMILY *(: *str *)?= *["'\'']([^"'\'']+)["'\''].*/\2/p' "$f" | head -1)"
    BENCH_NAME[$fam]="${name:-$fam}"
  fi
done
SEL_FAMS=()
for want in "${FAMILY_ARGS[@]}"; do
  hit=""
  for fam in "${FAM_ALL[@]}"; do
    if [[ $want == "$fam" || $want == "${BENCH_NAME[$fam]:-}" ]]; then hit=$fam; fi
  done
  if [[ -z $hit ]]; then
    bench_names=""
    for fam in "${!BENCH_NAME[@]}"; do bench_names+=" ${BENCH_NAME[$fam]}"; done
    echo "gpu_check: unknown family '$want'; found: ${FAM_ALL[*]} (bench names:$bench_names)" >&2
    exit 2
  fi
  [[ " ${SEL_FAMS[*]} " == *" $hit "* ]] || SEL_FAMS+=("$hit")
done
FILTERED=0
if [[ ${#SEL_FAMS[@]} -gt 0 ]]; then FILTERED=1; else SEL_FAMS=("${FAM_ALL[@]}"); fi
[[ ${#SEL_FAMS[@]} -gt 0 ]] || { echo "gpu_check: no family found under python/trous/" >&2; exit 2; }

has_cuda() { compgen -G "$ROOT/csrc/$1/*.cu" >/dev/null; }
has_tests() { compgen -G "$ROOT/tests/$1/test_*.py" >/dev/null; }
if [[ $DRY_RUN == 1 ]]; then
  # One family: the given one, else the one with the smallest test files (the quickest to run).
  DRY_FAMILY=""
  best=""
  for fam in "${SEL_FAMS[@]}"; do
    has_tests "$fam" || continue
    size=$(cat "$ROOT/tests/$fam"/test_*.py | wc -c)
    if [[ -z $best || $size -lt $best ]]; then best=$size; DRY_FAMILY=$fam; fi
    [[ $FILTERED == 1 ]] && break
  done
  DRY_FAMILY=${DRY_FAMILY:-${SEL_FAMS[0]}}
  RUN_FAMS=("$DRY_FAMILY")
  NOTES+=("dry run: CPU-only copy of the tree in a temporary folder; tests and bench of family $DRY_FAMILY on CPU")
else
  RUN_FAMS=("${SEL_FAMS[@]}")
fi
TEST_PATHS=()
SAN_FAMS=()
BENCH_FAMS=()
for fam in "${RUN_FAMS[@]}"; do
  if has_tests "$fam"; then TEST_PATHS+=("tests/$fam"); else NOTES+=("family $fam: no tests/$fam, skipped in tests"); fi
  if [[ -n ${BENCH_NAME[$fam]:-} ]]; then
    if [[ $DEVICE == cuda ]] && ! has_cuda "$fam"; then
      NOTES+=("family $fam: no CUDA kernels (csrc/$fam/*.cu), skipped in bench")
    else
      BENCH_FAMS+=("${BENCH_NAME[$fam]}")
    fi
  else
    NOTES+=("family $fam: no bench (python/trous/$fam/bench.py), skipped in bench")
  fi
  if has_cuda "$fam"; then SAN_FAMS+=("$fam"); else NOTES+=("family $fam: no CUDA kernels, skipped in the sanitizers"); fi
done
# Without a filter the CUDA tests are the whole suite's (-k cuda) but the emulation and this script's own.
if [[ $DRY_RUN == 0 && $FILTERED == 0 ]]; then TEST_PATHS=(tests --ignore=tests/emu --ignore=tests/test_gpu_check.py); fi
[[ ${#TEST_PATHS[@]} -gt 0 ]] || SKIP_WHY[tests]=${SKIP_WHY[tests]:-"no tests in ${RUN_FAMS[*]}"}
[[ ${#BENCH_FAMS[@]} -gt 0 ]] || SKIP_WHY[bench]=${SKIP_WHY[bench]:-"no bench for ${RUN_FAMS[*]}"}
# The smoke cases (and the sanitizers over them): on CUDA, the families that have CUDA kernels.
if [[ $DRY_RUN == 1 ]]; then SMOKE_FAMS=("${RUN_FAMS[@]}"); else SMOKE_FAMS=("${SAN_FAMS[@]}"); fi
SMOKE_ALL=0
[[ "${SMOKE_FAMS[*]}" == "${FAM_ALL[*]}" ]] && SMOKE_ALL=1
if [[ $DRY_RUN == 0 ]]; then
  if [[ ${#SAN_FAMS[@]} -eq 0 ]]; then
    SKIP_WHY[smoke]=${SKIP_WHY[smoke]:-"no CUDA kernels in ${RUN_FAMS[*]}"}
    for t in memcheck racecheck synccheck; do SKIP_WHY[$t]=${SKIP_WHY[$t]:-"no CUDA kernels in ${RUN_FAMS[*]}"}; done
  elif [[ -z $SANITIZER || ! -x $SANITIZER ]]; then
    for t in memcheck racecheck synccheck; do SKIP_WHY[$t]=${SKIP_WHY[$t]:-"compute-sanitizer not found"}; done
  fi
fi

export ROOT RUN_ROOT OUT WORK LOGS PYTHON CUDA_HOME MAX_JOBS TORCH_CUDA_ARCH_LIST SANITIZER DRY_RUN DEVICE
export PYTEST_WORKERS NCORES SMOKE_ALL
export SEL_FAMS_STR="${SEL_FAMS[*]}" RUN_FAMS_STR="${RUN_FAMS[*]}" SAN_FAMS_STR="${SAN_FAMS[*]}" SMOKE_FAMS_STR="${SMOKE_FAMS[*]}"
export BENCH_FAMS_STR="${BENCH_FAMS[*]}" TEST_PATHS_STR="${TEST_PATHS[*]}"
# Pure-Python wheels carried to the device machine in .whl/ (the dcls peer package, say) go on the path
# as they are: no pip there.
WHEELS=""
for whl in "$ROOT"/.whl/*-none-any.whl; do
  [[ -f $whl ]] && WHEELS+=":$whl" && NOTES+=("on PYTHONPATH: .whl/$(basename "$whl")")
done
export PYTHONPATH="$RUN_ROOT/python$WHEELS${PYTHONPATH:+:$PYTHONPATH}"
export TROUS_TEST_DEVICE=$DEVICE
export PYTHONUNBUFFERED=1

# ---- python snippets
# Every torch.* name the project's Python uses (and every `from torch.x import y`) must resolve.
# shellcheck disable=SC2089  # python source, quotes and all
COMPAT_PY='
import importlib, pathlib, re, sys
import torch
root = pathlib.Path(sys.argv[1])
names = set()
files = [*(root / "python").rglob("*.py"), *(root / "tests").rglob("*.py"), root / "setup.py"]
for p in files:
    text = p.read_text(errors="replace")
    names |= set(re.findall(r"\btorch(?:\.[A-Za-z_][A-Za-z0-9_]*)+(?![\w.{])", text))
    for mod, what in re.findall(r"^\s*from\s+(torch[\w.]*)\s+import\s+([\w, ]+)$", text, re.M):
        names |= {mod + "." + w.split(" as ")[0].strip() for w in what.split(",") if w.strip()}
names = sorted(n for n in names if not n.startswith("torch.ops.") and n.rsplit(".", 1)[1] != "_")

def resolve(name):
    parts = name.split(".")
    obj = torch
    for i, attr in enumerate(parts[1:], 1):
        if hasattr(obj, attr):
            obj = getattr(obj, attr)
            continue
        try:
            obj = importlib.import_module(".".join(parts[: i + 1]))
        except Exception:
            return False
    return True

missing = [n for n in names if not resolve(n)]
version = torch.__version__.split("+")[0]
if missing:
    print(f"torch {version} compat: MISSING {len(missing)} of {len(names)} names the project uses: " + ", ".join(missing))
    sys.exit(1)
print(f"torch {version} compat: ok ({len(names)} torch names the project uses resolve)")
'
# python -c "$SMOKE_PY" FAMILIES ARGS...: python -m trous.smoke on some families only.
SMOKE_PY='
import sys
import trous._families as families
want = sys.argv[1].split()
every = families.names
families.names = lambda: [n for n in every() if n in want]
from trous.smoke import main
sys.exit(main(sys.argv[2:]))
'
# python -c "$BENCH_PY" BENCH_NAME ARGS...: python -m trous.bench on one family, on the rows that have a
# target on the device (all rows with --all-rows, or when none has one: a baseline package missing there).
# shellcheck disable=SC2089
BENCH_PY='
import sys
import trous.bench.__main__ as bench
fam, argv = sys.argv[1], sys.argv[2:]
all_rows = "--all-rows" in argv
argv = [a for a in argv if a != "--all-rows"]
load = bench.load_family

class Targeted:
    def __init__(self, mod):
        self._mod = mod
    def __getattr__(self, name):
        return getattr(self._mod, name)
    def cases(self, device, quick, shape=None):
        cases = self._mod.cases(device, quick) if shape is None else self._mod.cases(device, quick, shape=shape)
        targeted = [c for c in cases if c.targets]
        if all_rows or not targeted:
            if not all_rows and cases:
                print(f"family {fam}: none of its {len(cases)} rows has a target on this device "
                      "(a baseline package missing?); all of them run")
            return cases
        print(f"family {fam}: {len(targeted)} of {len(cases)} rows have a target on this device")
        return targeted

bench.load_family = lambda name: Targeted(load(name))
sys.exit(bench.main(["--family", fam] + argv))
'
# python -c "$MERGE_PY" OUT JSON...: one json and one png for every family benched.
MERGE_PY='
import json, os, shutil, sys
out, files = sys.argv[1], sys.argv[2:]
stem = os.path.basename(files[0])[: -len(".json")]
if len(files) == 1:
    shutil.copy(files[0], os.path.join(out, stem + ".json"))
    png = files[0][: -len(".json")] + ".png"
    if os.path.exists(png):
        shutil.copy(png, os.path.join(out, stem + ".png"))
    sys.exit(0)
from trous.bench import harness
reports = [json.load(open(f)) for f in files]
merged = dict(reports[0])
merged["rows"] = [row for r in reports for row in r["rows"]]
merged["families"] = [fam for r in reports for fam in r["families"]]
merged["wall_s"] = round(sum(r.get("wall_s", 0) for r in reports), 3)
merged["copy_bandwidth_by_family"] = {",".join(r["families"]): r["copy_bandwidth"] for r in reports}
harness.write_json(os.path.join(out, stem + ".json"), merged)
import torch
fams, device = ", ".join(merged["families"]), merged["device"]["name"]
title = f"trous {fams} on {device} (torch {torch.__version__})"
why = harness.write_plot(os.path.join(out, stem + ".png"), merged["rows"], title)
print("merged", len(files), "bench files" + ("" if why is None else f"; no plot: {why}"))
'
# shellcheck disable=SC2090
export COMPAT_PY SMOKE_PY BENCH_PY

# ---- the steps (each runs as `timeout SHARE bash -c STEP`, stdout+stderr to LOGS/STEP.log)
step_env() {
  echo "host: $(hostname)  date: $(date -Is)  cores: $NCORES"
  echo "git: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo none) $(git -C "$ROOT" status --porcelain 2>/dev/null | wc -l) changed files"
  echo "python: $PYTHON"
  echo "CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS PYTEST_WORKERS=$PYTEST_WORKERS"
  echo "families: $SEL_FAMS_STR (run: $RUN_FAMS_STR; tests: ${TEST_PATHS_STR:-none}; smoke: ${SMOKE_FAMS_STR:-none}; bench: ${BENCH_FAMS_STR:-none}; sanitizers: ${SAN_FAMS_STR:-none})"
  echo "sanitizer: ${SANITIZER:-none}$([[ -n $SANITIZER && ! -x $SANITIZER ]] && echo ' (not found)')"
  "$PYTHON" -c 'import torch, sys; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")'
  "$PYTHON" -c "$COMPAT_PY" "$ROOT"
  local compat=$?
  "$PYTHON" -c 'import ninja, pybind11, pytest; print("ninja", ninja.__version__, "pybind11", pybind11.__version__, "pytest", pytest.__version__)' || true
  if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
  if [[ -n $CUDA_HOME ]]; then "$CUDA_HOME/bin/nvcc" --version || true; else echo "nvcc: not found"; fi
  if [[ -n $SANITIZER && -x $SANITIZER ]]; then "$SANITIZER" --version | tail -2; fi
  [[ $compat -eq 0 ]] || return 1
  if [[ $DRY_RUN == 0 && -z $TORCH_CUDA_ARCH_LIST ]]; then
    echo "no GPU visible to torch: cannot pick TORCH_CUDA_ARCH_LIST"
    return 1
  fi
}

step_build() {
  if [[ $DRY_RUN == 1 ]]; then
    # A copy of the tree (tracked and untracked-not-ignored files), built there: the checkout's own
    # build outputs (python/trous/_C*.so, build/) stay as they are.
    mkdir -p "$RUN_ROOT"
    if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
      git -C "$ROOT" ls-files -co --exclude-standard -z |
        tar -C "$ROOT" --null -T - --ignore-failed-read -cf - | tar -C "$RUN_ROOT" -xf - || return 1
    else
      tar -C "$ROOT" --exclude=.git --exclude=.venv --exclude=build --exclude='*.so' \
        --exclude=_build_info.json -cf - . | tar -C "$RUN_ROOT" -xf - || return 1
    fi
    echo "copied $(find "$RUN_ROOT" -type f | wc -l) files to $RUN_ROOT"
    cd "$RUN_ROOT" || return 1
    # -O1: the 2-core CI machine builds every family within the build share (speed is not measured here)
    TROUS_CUDA=0 TROUS_CXX_OPT=-O1 "$PYTHON" setup.py build_ext --inplace || return $?
  else
    cd "$RUN_ROOT" || return 1
    # TROUS_CUDA=1: fail instead of silently building CPU kernels only. -Xptxas -v goes to this log.
    TROUS_CUDA=1 "$PYTHON" setup.py build_ext --inplace || return $?
  fi
  cd / && "$PYTHON" -c 'import trous; print("trous._C", trous._C.__file__, dict(trous._C.build_info()))'
}

step_ptxas() {
  # Registers / shared memory / stack / spills per kernel, from the build log. Fails when no kernel was
  # compiled (no CUDA build) or one spills or uses a stack frame (local memory).
  [[ -s "$LOGS/build.log" ]] || { echo "no build log"; return 1; }
  grep -E "ptxas info|ptxas warning|Compiling entry function|bytes stack frame" "$LOGS/build.log" >"$LOGS/ptxas.txt"
  local n
  n=$(grep -c "Compiling entry function" "$LOGS/ptxas.txt")
  echo "$n kernel compilations (kernels x archs); report in ptxas.txt"
  grep -E "Used [0-9]+ registers" "$LOGS/ptxas.txt" | sed -E 's/.*Used ([0-9]+) registers.*/\1/' | sort -n | tail -1 |
    sed 's/^/most registers used by a kernel: /'
  [[ $n -gt 0 ]] || { echo "no kernel compiled"; return 1; }
  if grep -qE "ptxas warning|[1-9][0-9]* bytes (spill|stack frame)" "$LOGS/ptxas.txt"; then
    echo "spills, stack frames or ptxas warnings:"
    grep -E "ptxas warning|[1-9][0-9]* bytes (spill|stack frame)" "$LOGS/ptxas.txt"
    return 1
  fi
}

step_info() {
  cd "$RUN_ROOT" && "$PYTHON" -m trous.info
}

step_tests() {
  cd "$RUN_ROOT" || return 1
  local args=(-q -ra -p no:cacheprovider --junitxml="$LOGS/pytest.xml")
  # shellcheck disable=SC2206  # the paths have no spaces (tests/<family>, --ignore=...)
  local paths=($TEST_PATHS_STR)
  if [[ $DRY_RUN == 1 ]]; then
    args+=(-x -k "not cuda")
  else
    args+=(-k cuda)
    if [[ $PYTEST_WORKERS -gt 0 ]]; then
      args+=(-n "$PYTEST_WORKERS")
      export OMP_NUM_THREADS=$((NCORES / PYTEST_WORKERS > 0 ? NCORES / PYTEST_WORKERS : 1))
    fi
  fi
  echo "# pytest ${paths[*]} ${args[*]}"
  "$PYTHON" -m pytest "${paths[@]}" "${args[@]}"
  local rc=$?
  if [[ $rc -eq 5 ]]; then echo "no test selected"; return 0; fi
  return "$rc"
}

step_smoke() {
  if [[ $DRY_RUN == 1 ]]; then
    SMOKE_EXTRA=(--device cpu --quick)
  else
    SMOKE_EXTRA=(--device cuda)
  fi
  smoke_cmd
}

smoke_cmd() {
  cd "$RUN_ROOT" || return 1
  if [[ $SMOKE_ALL == 0 ]]; then
    "$@" "$PYTHON" -c "$SMOKE_PY" "$SMOKE_FAMS_STR" --allow-missing "${SMOKE_EXTRA[@]}"
  else
    "$@" "$PYTHON" -m trous.smoke "${SMOKE_EXTRA[@]}"
  fi
}

step_sanitize() {
  # compute-sanitizer over the smoke cases (--quick). PyTorch's caching allocator would hide
  # out-of-bounds accesses inside its pooled blocks: disable it so every tensor is its own cudaMalloc.
  # racecheck / synccheck: trous kernels only (their names contain "trous"); torch's own kernels would
  # take most of the time.
  local tool="$1"
  local extra=()
  [[ $tool == memcheck ]] || extra=(--kernel-name kns=trous)
  SMOKE_EXTRA=(--device cuda --quick --allow-missing)
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  smoke_cmd "$SANITIZER" --tool "$tool" --error-exitcode 99 --print-limit 200 "${extra[@]}"
}

step_bench() {
  cd "$RUN_ROOT" || return 1
  # shellcheck disable=SC2206
  local fams=($BENCH_FAMS_STR) n i=0 worst=0 rc now left sub fam
  local args=(--device "$DEVICE" --check --no-progress)
  [[ ${BENCH_FULL:-0} == 1 ]] || args+=(--quick)
  [[ ${BENCH_ALL_ROWS:-0} == 1 ]] && args+=(--all-rows)
  n=${#fams[@]}
  # Families in turn, each with an equal part of what is left: a slow one does not starve the next.
  for fam in "${fams[@]}"; do
    now=$(date +%s)
    left=$((STEP_DEADLINE - now - 2))
    sub=$((left / (n - i)))
    i=$((i + 1))
    echo "## bench family $fam: $sub s"
    if [[ $sub -lt 5 ]]; then
      echo "family $fam: ran out (no time left)"
      worst=124
      continue
    fi
    mkdir -p "$WORK/bench/$fam"
    timeout -k 3 "$sub" "$PYTHON" -c "$BENCH_PY" "$fam" "${args[@]}" --out "$WORK/bench/$fam"
    rc=$?
    case $rc in
      0) echo "family $fam: ok" ;;
      3) echo "family $fam: targets missed"; [[ $worst -eq 0 ]] && worst=3 ;;
      124 | 137) echo "family $fam: ran out ($sub s)"; worst=124 ;;
      *) echo "family $fam: FAIL (rc $rc)"; [[ $worst -eq 0 || $worst -eq 3 ]] && worst=$rc ;;
    esac
  done
  return "$worst"
}
export -f step_env step_build step_ptxas step_info step_tests step_smoke smoke_cmd step_sanitize step_bench

# ---- outputs
# trim_copy SRC DST MAX: copy, or keep the first third and the last two thirds of MAX bytes.
trim_copy() {
  local src=$1 dst=$2 max=$3 size
  size=$(stat -c %s "$src")
  if [[ $size -le $max ]]; then
    cp "$src" "$dst"
  else
    {
      head -c $((max / 3)) "$src"
      printf '\n\n[gpu_check: trimmed %d of %d bytes here; head and tail kept]\n\n' $((size - max)) "$size"
      tail -c $((max * 2 / 3)) "$src"
    } >"$dst"
  fi
}

pack_logs() {
  local max=$((4 * 1024 * 1024)) f dir="$WORK/pack/gpu_check-logs"
  for _ in 1 2 3 4 5 6; do
    rm -rf "$WORK/pack"
    mkdir -p "$dir"
    for f in "$LOGS"/*; do [[ -f $f ]] && trim_copy "$f" "$dir/$(basename "$f")" "$max"; done
    for f in "$WORK"/bench/*/*.json; do [[ -f $f ]] && cp "$f" "$dir/bench-$(basename "$(dirname "$f")")-$(basename "$f")"; done
    tar -C "$WORK/pack" -czf "$WORK/logs.tar.gz" gpu_check-logs || return 1
    [[ $(stat -c %s "$WORK/logs.tar.gz") -lt $ARCHIVE_MAX ]] && break
    max=$((max / 3))
  done
  mv -f "$WORK/logs.tar.gz" "$OUT/logs.tar.gz"
}

merge_bench() {
  local files=()
  mapfile -t files < <(ls "$WORK"/bench/*/*.json 2>/dev/null)
  [[ ${#files[@]} -gt 0 ]] || return 0
  rm -f "$OUT"/*.json "$OUT"/*.png
  (cd "$RUN_ROOT" && timeout -k 2 30 "$PYTHON" -c "$MERGE_PY" "$OUT" "${files[@]}") >>"$LOGS/gpu_check.log" 2>&1
}

# failure_lines STEP: the first lines that say what went wrong.
failure_lines() {
  local f="$LOGS/$1.log" lines=""
  case $1 in
    tests) lines="$(grep -E '^(FAILED|ERROR) |^E   ' "$f" | head -20)" ;;
    memcheck | racecheck | synccheck) lines="$(grep -E '^========= ' "$f" | grep -vE 'COMPUTE-SANITIZER|^========= *$' | head -20)" ;;
    build) lines="$(grep -E 'error:|Error [0-9]|FAILED:|ptxas warning|Traceback|Error: ' "$f" | head -20)" ;;
    smoke) lines="$(grep -E '^FAIL ' "$f" | head -20)" ;;
    bench) lines="$(grep -E '^family |rows miss a target|^trous\.bench:|^Traceback|Error: ' "$f" | head -20)" ;;
  esac
  [[ -n $lines ]] || lines="$(grep -v '^# ' "$f" | tail -15)"
  printf '%s\n' "$lines" | cut -c1-240
}

write_summary() {
  local s total=$((SECONDS - T0)) sum=0 ran_out=() torch_v compat
  for s in "${STEPS[@]}"; do
    sum=$((sum + ${TIME[$s]:-0}))
    [[ ${STATUS[$s]} == "ran out"* ]] && ran_out+=("$s")
  done
  torch_v="$(sed -nE 's/^torch ([^ ]+) cuda.*/\1/p' "$LOGS/env.log" 2>/dev/null | head -1)"
  compat="$(grep -m1 ' compat: ' "$LOGS/env.log" 2>/dev/null)"
  {
    echo "# gpu_check $(date -Is)$([[ $DRY_RUN == 1 ]] && echo ' (dry run, CPU)')"
    echo
    echo "${GPU_LINE:-no GPU}, torch ${torch_v:-?}, archs ${TORCH_CUDA_ARCH_LIST:-none}, git $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo none), families: ${RUN_FAMS[*]}"
    echo
    echo "${compat:-torch compat: not checked}"
    echo
    echo "budget: $BUDGET s ($RESERVE s kept for packing); total: $total s; steps: $sum s; ran out: ${ran_out[*]:-none}"
    echo
    echo "start: seconds into the run; share: the step's part of what was left (its weight over the"
    echo "weights of the steps still to run), after which timeout stops it; time: what it took."
    echo
    echo "| stage | step | status | start s | share s | time s | log |"
    echo "| --- | --- | --- | ---: | ---: | ---: | --- |"
    for s in "${STEPS[@]}"; do
      local logname=""
      [[ -f $LOGS/$s.log ]] && logname="$s.log"
      echo "| ${STAGE[$s]} ${STAGE_NAME[${STAGE[$s]}]} | $s | ${STATUS[$s]} | ${START[$s]} | ${SHARE[$s]} | ${TIME[$s]} | $logname |"
    done
    echo
    echo "Logs: logs.tar.gz (gpu_check-logs/STEP.log, pytest.xml, ptxas.txt)."
    if [[ ${#NOTES[@]} -gt 0 ]]; then
      echo
      printf -- '- %s\n' "${NOTES[@]}"
    fi
    if grep -q '^op  ' "$LOGS/bench.log" 2>/dev/null; then
      echo
      echo "## Bench"
      echo
      echo '```'
      awk '/^## bench family/ || /^family [^ ]*: / || /rows meet their targets/ { print; next }
        /^op  / { t = 1 }
        t { print; if ($0 ~ /^copy bandwidth/) t = 0; next }
        /rows miss a target/ { m = 1; print; next }
        m && /^  / { print; next }
        { m = 0 }' "$LOGS/bench.log"
      echo '```'
    fi
    local header=0
    for s in "${STEPS[@]}"; do
      case ${STATUS[$s]} in
        FAIL* | "ran out"* | "targets missed" | interrupted)
          if [[ $header == 0 ]]; then echo; echo "## Failures"; header=1; fi
          echo
          echo "### $s: ${STATUS[$s]} ($s.log)"
          echo
          echo '```'
          failure_lines "$s"
          echo '```'
          ;;
      esac
    done
  } >"$OUT/summary.md.tmp"
  mv -f "$OUT/summary.md.tmp" "$OUT/summary.md"
}

write_outputs() {
  write_summary
  pack_logs || log "packing the logs failed"
}

# ---- running the plan
# share_of STEP: its weight over the weights of the steps not yet run or skipped, times what is left.
share_of() {
  local name=$1 after=0 s w=0 left share
  for s in "${STEPS[@]}"; do
    [[ $s == "$name" ]] && after=1
    [[ $after == 1 && ${STATUS[$s]} == pending && -z ${SKIP_WHY[$s]:-} ]] && w=$((w + WEIGHT[$s]))
  done
  left=$((BUDGET - (SECONDS - T0) - RESERVE))
  [[ $left -ge $MIN_SHARE && $w -gt 0 ]] || { echo 0; return; }
  share=$((left * WEIGHT[$name] / w))
  local floor=${FLOOR[$name]:-$MIN_SHARE}
  share=$((share < floor ? floor : share))
  echo $((share > left ? left : share))
}

# run_step STEP FUNCTION ARGS...
run_step() {
  local name=$1 share t0 rc dt status
  shift
  START[$name]=$((SECONDS - T0))
  if [[ -n ${SKIP_WHY[$name]:-} ]]; then
    STATUS[$name]="skipped (${SKIP_WHY[$name]})"; SHARE[$name]=0; TIME[$name]=0
    log "$name: ${STATUS[$name]}"
    write_outputs
    return 0
  fi
  share=$(share_of "$name")
  if [[ $share -lt $MIN_SHARE ]]; then
    STATUS[$name]="skipped (budget spent)"; SHARE[$name]=$share; TIME[$name]=0
    log "$name: ${STATUS[$name]}"
    write_outputs
    return 1
  fi
  SHARE[$name]=$share
  STATUS[$name]="running"
  log "$name: $* (share $share s)"
  t0=$SECONDS
  CURRENT_STEP=$name
  # In the background and waited for, so that a signal to this script is handled at once (on_signal).
  {
    echo "# $* (share $share s)"
    echo "# started $(date -Is)"
    STEP_DEADLINE=$(($(date +%s) + share)) timeout -k "$GRACE" "$share" bash -c 'set -o pipefail; "$@"' _ "$@" &
    STEP_PID=$!
    wait "$STEP_PID"
  } >"$LOGS/$name.log" 2>&1
  rc=$?
  CURRENT_STEP=""
  dt=$((SECONDS - t0))
  if [[ $rc -eq 0 ]]; then
    status="ok"
  elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
    status="ran out ($share s)"
    FAILED=1
  elif [[ $name == bench && $rc -eq 3 ]]; then
    status="targets missed"
    FAILED=1
  else
    status="FAIL (rc $rc)"
    FAILED=1
  fi
  echo "# finished $(date -Is), rc $rc, ${dt} s" >>"$LOGS/$name.log"
  STATUS[$name]=$status; TIME[$name]=$dt
  log "$name: $status in ${dt} s"
  [[ $name == bench ]] && merge_bench
  write_outputs
  return $rc
}
export STEP_DEADLINE=0
CURRENT_STEP=""

# A signal (Ctrl-C, a TERM from the caller): stop the step running, write what there is, exit.
on_signal() {
  trap - INT TERM
  log "interrupted${CURRENT_STEP:+ during $CURRENT_STEP}"
  if [[ -n $CURRENT_STEP ]]; then
    kill -TERM "$STEP_PID" 2>/dev/null
    sleep 1
    STATUS[$CURRENT_STEP]="interrupted"
    TIME[$CURRENT_STEP]=$((SECONDS - T0 - START[$CURRENT_STEP]))
    FAILED=1
  fi
  write_outputs
  exit 130
}
trap on_signal INT TERM

log "output: $OUT  budget: $BUDGET s  work: $WORK$([[ $DRY_RUN == 1 ]] && echo '  (dry run)')"
write_outputs
run_step env step_env
if run_step build step_build || [[ ${STATUS[build]} == "skipped (SKIP)" ]]; then
  run_step ptxas step_ptxas
  run_step info step_info
  run_step tests step_tests
  run_step smoke step_smoke
  run_step memcheck step_sanitize memcheck
  run_step racecheck step_sanitize racecheck
  run_step synccheck step_sanitize synccheck
  run_step bench step_bench
else
  why="build ${STATUS[build]%% (*}"
  [[ ${STATUS[build]} == FAIL* ]] && why="build failed"
  for s in ptxas info tests smoke memcheck racecheck synccheck bench; do
    SKIP_WHY[$s]=${SKIP_WHY[$s]:-$why}
    run_step "$s" true
  done
fi
write_outputs
cat "$OUT/summary.md"
exit $FAILED
