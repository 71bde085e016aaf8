"""Build and run the CUDA-emulation tests (tests/emu/<name>.cpp) with g++ and sanitizers.

Torch-free: usable from pytest (tests/test_emulation.py), from CMake-less shells and by hand:

    python3 tests/emu/build.py kvcache/quantize_emu               # build + run under asan and tsan
    python3 tests/emu/build.py kvcache/quantize_emu plain tsan -- token

A test is named by its source: <family>/<subop>_emu for tests/<family>/<subop>_emu.cpp (found by
emu_tests(), so a new kernel only adds its file), planted_bugs for the harness's own test.
Binaries go to build/emu/<family>_<subop>_emu_<variant>; a build is reused while the compiler, the
flags and the content of every project header it includes (g++ -MMD) are unchanged.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS_DIR = ROOT / "tests"
EMU_DIR = TESTS_DIR / "emu"
OUT_DIR = ROOT / "build" / "emu"

# torch's CUDAExtension compiles every .cu with these: kernels must not rely on half operators.
TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
]
# float-cast-overflow is not part of -fsanitize=undefined, but (int)NaN in a kernel is exactly the
# kind of host/GPU divergence these tests exist for.
VARIANTS = {
    "plain": [],
    "asan": ["-fsanitize=address,undefined,float-cast-overflow", "-fno-sanitize-recover=all",
             "-fno-omit-frame-pointer"],
    "tsan": ["-fsanitize=thread"],
}
SANITIZER_ENV = {
    "ASAN_OPTIONS": "abort_on_error=0:detect_leaks=1",
    "UBSAN_OPTIONS": "print_stacktrace=1",
    "TSAN_OPTIONS": "halt_on_error=0:second_deadlock_stack=1",
}


def compiler() -> str:
    return os.environ.get("CXX", "g++")


@functools.lru_cache(maxsize=None)
def cuda_include() -> Path | None:
    """The CUDA toolkit's include folder (CUDA_HOME, CUDA_PATH, then /usr/local/cuda), or None."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_fp16.h").is_file():
            return Path(home) / "include"
    return None


def flags(variant: str) -> list[str]:
    # CUDA headers as -isystem: no warnings from them and -MMD leaves them out of the dependencies.
    return ["-std=c++17", "-O1", "-g", "-pthread", "-Wall", "-Wno-unknown-pragmas",
            f"-I{ROOT / 'csrc'}", f"-I{EMU_DIR}", f"-isystem{cuda_include()}",
            *TORCH_NVCC_DEFINES, *VARIANTS[variant]]


@functools.lru_cache(maxsize=None)
def skip_reason(variant: str) -> str | None:
    """Why `variant` cannot be built here (no compiler, no CUDA headers, no sanitizer), or None."""
    if shutil.which(compiler()) is None:
        return f"no C++ compiler {compiler()!r} on PATH"
    if cuda_include() is None:
        return "no CUDA headers (set CUDA_HOME; cuda_fp16.h is needed)"
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "probe.cpp", Path(tmp) / "probe"
        src.write_text("#include <cuda_fp16.h>\n#include <thread>\n"
                       "int main() { std::thread t([] {}); t.join(); return (int)__half2float(__float2half(0.f)); }\n")
        cmd = [compiler(), *flags(variant), str(src), "-o", str(exe)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            return f"{compiler()} cannot build the {variant} variant: {res.stderr.strip()[-400:]}"
        res = _run_exe([str(exe)], timeout=60)
        if res.returncode != 0:
            return f"a trivial {variant} binary does not run here: {(res.stdout + res.stderr).strip()[-400:]}"
    return None


def _dep_hash(dep_file: Path, cmd: list[str]) -> str | None:
    """Hash of the command and of every dependency listed by g++ -MMD, None if one is missing."""
    if not dep_file.is_file():
        return None
    text = dep_file.read_text().replace("\\\n", " ")
    deps = text.split(":", 1)[1].split() if ":" in text else []
    h = hashlib.sha256("\0".join(cmd).encode())
    h.update(_compiler_version().encode())
    for dep in sorted(set(deps)):
        p = Path(dep)
        if not p.is_file():
            return None
        h.update(dep.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def _compiler_version() -> str:
    return subprocess.run([compiler(), "--version"], capture_output=True, text=True).stdout


def emu_tests() -> list[str]:
    """Every kernel emulation test: <family>/<subop>_emu for each tests/<family>/<subop>_emu.cpp."""
    return sorted(f"{p.parent.name}/{p.stem}" for p in TESTS_DIR.glob("*/*_emu.cpp"))


def source(name: str) -> Path:
    """tests/<family>/<subop>_emu.cpp for "<family>/<subop>_emu", tests/emu/<name>.cpp otherwise."""
    return TESTS_DIR / f"{name}.cpp" if "/" in name else EMU_DIR / f"{name}.cpp"


def build(name: str, variant: str, verbose: bool = False) -> Path:
    """Compiles the source of test `name` for `variant` unless an up-to-date binary exists; returns it."""
    src = source(name)
    if not src.is_file():
        raise FileNotFoundError(src)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    exe = OUT_DIR / f"{name.replace('/', '_')}_{variant}"
    dep, stamp = exe.with_suffix(".d"), exe.with_suffix(".stamp")
    cmd = [compiler(), *flags(variant), str(src)]
    if exe.is_file() and stamp.is_file() and stamp.read_text() == _dep_hash(dep, cmd):
        return exe
    # Build under temporary names, then rename: concurrent builders never see half a binary.
    tmp_exe, tmp_dep = exe.with_name(f".{exe.name}.{os.getpid()}"), dep.with_name(f".{dep.name}.{os.getpid()}")
    full = [*cmd, "-MMD", "-MF", str(tmp_dep), "-MT", "target", "-o", str(tmp_exe)]
    if verbose:
        print(" ".join(full), flush=True)
    t0 = time.monotonic()
    res = subprocess.run(full, capture_output=True, text=True)
    if res.returncode != 0:
        tmp_exe.unlink(missing_ok=True)
        tmp_dep.unlink(missing_ok=True)
        raise RuntimeError(f"compiling {src.name} ({variant}) failed:\n{res.stderr[-8000:]}")
    os.replace(tmp_dep, dep)
    os.replace(tmp_exe, exe)
    stamp.write_text(_dep_hash(dep, cmd) or "")
    if verbose:
        print(f"built {exe.relative_to(ROOT)} in {time.monotonic() - t0:.1f} s", flush=True)
    return exe


def build_all(pairs, jobs: int | None = None) -> dict:
    """Builds several (name, variant) pairs in parallel; returns {pair: path or exception}."""
    pairs = list(dict.fromkeys(pairs))
    jobs = jobs or os.cpu_count() or 1

    def one(pair):
        try:
            return build(*pair)
        except Exception as e:  # reported by whoever runs the binary
            return e

    with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(pairs) or 1))) as pool:
        return dict(zip(pairs, pool.map(one, pairs)))


def _run_exe(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, **{k: v for k, v in SANITIZER_ENV.items() if k not in os.environ}}
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    # TSan needs its fixed shadow layout; with some kernels' ASLR settings it refuses to start.
    if "unexpected memory mapping" in res.stderr and shutil.which("setarch"):
        res = subprocess.run(["setarch", platform.machine(), "-R", *argv], capture_output=True, text=True,
                             timeout=timeout, env=env)
    return res


def run(name: str, variant: str, args=(), timeout: float = 600) -> subprocess.CompletedProcess:
    """Builds (if needed) and runs test `name`'s binary; stdout and stderr are captured."""
    return _run_exe([str(build(name, variant)), *map(str, args)], timeout)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help=f"one of {', '.join(emu_tests())} or planted_bugs")
    ap.add_argument("variants", nargs="*", metavar="variant", help=f"any of {', '.join(VARIANTS)} (default: asan tsan)")
    ns = ap.parse_args(argv)
    ns.variants = ns.variants or ["asan", "tsan"]
    bad = [v for v in ns.variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    status = 0
    for variant in ns.variants:
        why = skip_reason(variant)
        if why:
            print(f"{ns.name} [{variant}]: SKIPPED: {why}")
            continue
        build(ns.name, variant, verbose=True)
        t0 = time.monotonic()
        res = run(ns.name, variant, args)
        sys.stdout.write(res.stdout)
        sys.stderr.write(res.stderr)
        print(f"{ns.name} [{variant}]: exit {res.returncode} in {time.monotonic() - t0:.1f} s", flush=True)
        status = status or res.returncode
    return status


if __name__ == "__main__":
    sys.exit(main())
