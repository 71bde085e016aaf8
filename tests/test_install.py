"""The package as a user gets it: an sdist, a CPU-only wheel built from it with --no-build-isolation,
installed into a fresh venv that has only the pinned torch (from local disk), where ``python -m
trous.info`` and one op of every family run; next to a different torch (where one installs from local
disk) and next to a faked build record, ``import trous`` fails with one clear ImportError.

The expensive part (one CPU-only build from a copy of the tree, ~2 min on 2 cores, and two venvs made
while it compiles) is one module fixture. TROUS_SKIP_INSTALL_TEST=1 skips it for a quick local run;
CI runs it (``make test``). The CUDA wheel is ``make wheel``'s, checked by hand or on a GPU machine.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import torch

from trous import _families, _version_check

ROOT = Path(__file__).resolve().parents[1]
PINNED = torch.__version__.split("+")[0]  # what `make venv` installed and the wheel must require
PY_TAG = f"cp{sys.version_info.major}{sys.version_info.minor}"
SKIP_ENV = "TROUS_SKIP_INSTALL_TEST"

# ---------------------------------------------------------------------------------------------------
# The import check's logic, without building anything.

BUILT = {"version": "0.1.0+torch2.14.1.cu130.sm90", "torch": "2.14.1+cu130", "torch_cuda": "13.0",
         "cuda": "13.0", "archs": "9.0", "cuda_kernels": True, "requires": ["torch==2.14.1"]}


@pytest.mark.parametrize("torch_version, cuda, ok", [
    ("2.14.1+cu130", "13.0", True),
    ("2.14.1", "13.2", True),           # the same CUDA major
    ("2.14.1+cu128", "12.8", False),    # another CUDA major
    ("2.14.1+cpu", None, False),        # CUDA kernels need a CUDA torch
    ("2.14.0+cu130", "13.0", False),
    ("2.13.0+cpu", None, False),
    ("2.15.0a0+git123", "13.0", False),
])
def test_mismatch(torch_version, cuda, ok):
    why = _version_check.mismatch(BUILT, torch_version, cuda)
    assert (why is None) == ok, why
    cpu_build = {**BUILT, "cuda": None, "archs": None, "cuda_kernels": False}
    assert (_version_check.mismatch(cpu_build, torch_version, cuda) is None) == torch_version.startswith("2.14.1")


def test_message_names_both_versions_and_the_fix():
    msg = _version_check.message(BUILT, _version_check.mismatch(BUILT, "2.13.0+cpu", None))
    for part in ("0.1.0+torch2.14.1.cu130.sm90", "2.14.1+cu130", "2.13.0+cpu", "pip install 'torch==2.14.1'",
                 "--no-build-isolation", _version_check.SKIP_ENV):
        assert part in msg, (part, msg)


def test_check_skips_without_build_info_and_with_the_env_var(monkeypatch, tmp_path):
    monkeypatch.setattr(_version_check, "BUILD_INFO", str(tmp_path / "missing.json"))
    _version_check.check()  # a source checkout before its build: the extension reports for itself
    bad = tmp_path / "_build_info.json"
    bad.write_text(json.dumps({**BUILT, "torch": "1.0.0"}))
    monkeypatch.setattr(_version_check, "BUILD_INFO", str(bad))
    monkeypatch.delenv(_version_check.SKIP_ENV, raising=False)
    with pytest.raises(ImportError, match="1.0.0"):
        _version_check.check()
    monkeypatch.setenv(_version_check.SKIP_ENV, "1")
    _version_check.check()


# ---------------------------------------------------------------------------------------------------
# The real thing: sdist, wheel, fresh venvs.

def _tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(extra)
    return env


def _start(cmd, log: Path, cwd: Path, **env) -> subprocess.Popen:
    f = open(log, "w")
    f.write(f"$ {cmd if isinstance(cmd, str) else ' '.join(map(str, cmd))}\n")
    f.flush()
    p = subprocess.Popen(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=_env(**env),
                         shell=isinstance(cmd, str))
    f.close()  # the child has its own handle
    return p


def _wait(p: subprocess.Popen, log: Path, what: str, timeout: float):
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        pytest.fail(f"{what} ran past {timeout:.0f} s:\n{_tail(log)}")
    assert rc == 0, f"{what} failed (rc {rc}):\n{_tail(log)}"


def _run(cmd, cwd: Path, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env(**env))


def _copy_tree(dst: Path):
    """The tracked and untracked-but-not-ignored files (no .venv, build/, _C*.so, _build_info.json)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                             capture_output=True).stdout.decode()
        files = [f for f in out.split("\0") if f and (ROOT / f).is_file()]
    except (OSError, subprocess.CalledProcessError):
        files = None
    if not files:
        ignore = shutil.ignore_patterns(".venv", "build", "dist", ".git", "*.so", "_build_info.json", "__pycache__",
                                        "*.egg-info", ".pytest_cache", ".ruff_cache")
        shutil.copytree(ROOT, dst, ignore=ignore, dirs_exist_ok=True)
        return
    for f in files:
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dst / f)


def _pip_locations() -> list:
    """The find-links folders and file:// indexes pip is configured with (pip config, PIP_* variables)."""
    values = [os.environ.get("PIP_FIND_LINKS", ""), os.environ.get("PIP_EXTRA_INDEX_URL", ""),
              os.environ.get("PIP_INDEX_URL", "")]
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if re.search(r"(find-links|index-url)", line):
            values.append(line.split("=", 1)[1].strip().strip("'\""))
    return [v.removeprefix("file://") for v in " ".join(values).split() if not re.match(r"^https?://", v)]


def _other_local_torch():
    """A torch wheel on local disk whose major.minor.patch is not the pinned one, or None."""
    pinned = _version_check.release(PINNED)
    candidates = []
    for loc in _pip_locations():
        p = Path(loc)
        candidates += p.glob("torch-*.whl") if p.is_dir() else []
        index = p / "torch" / "index.html"
        if index.is_file():
            for href in re.findall(r'href="([^"#]+\.whl)', index.read_text()):
                candidates.append((index.parent / href).resolve())
    for whl in sorted(set(candidates), reverse=True):
        m = re.match(r"^torch-([^-]+)-(cp\d+)-", whl.name)
        if m and m.group(2) == PY_TAG and whl.is_file() and _version_check.release(m.group(1)) != pinned:
            return whl, m.group(1)
    return None


class Installed:
    """What the fixture made: paths, the wheel, the two venvs and their timings."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.src = tmp / "src"
        self.run_dir = tmp / "run"  # an empty cwd, so that nothing but the venv's trous is importable
        self.sdist: Path = None
        self.wheel: Path = None
        self.pinned_venv = tmp / "venv-pinned"
        self.other_venv = tmp / "venv-other"
        self.other_torch = None  # (wheel path, version) or None
        self.other_error = None  # why the other venv is missing
        self.times = {}

    def py(self, venv: Path) -> str:
        return str(venv / "bin" / "python")

    def site_trous(self, venv: Path) -> Path:
        out = _run([self.py(venv), "-c", "import importlib.util as u; print(u.find_spec('trous').origin)"],
                   self.run_dir, timeout=120, TROUS_SKIP_TORCH_CHECK="1")
        assert out.returncode == 0, out.stderr
        return Path(out.stdout.strip()).parent


@pytest.fixture(scope="module")
def installed():
    if os.environ.get(SKIP_ENV, "") not in ("", "0"):
        pytest.skip(f"{SKIP_ENV} is set")
    tmp = Path(tempfile.mkdtemp(prefix="trous-install-"))
    jobs = {}
    try:
        yield _make(Installed(tmp), jobs)
    finally:
        for p in jobs.values():  # a failed step leaves no pip running in a folder being removed
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)  # two venvs, ~6 GB: never left behind


def _make(it: Installed, jobs: dict) -> Installed:
    t0 = time.monotonic()
    it.src.mkdir()
    it.run_dir.mkdir()
    _copy_tree(it.src)
    base = getattr(sys, "_base_executable", None) or sys.executable
    pip_q = "-m pip install --quiet --disable-pip-version-check --no-cache-dir"

    # The venvs are made while the wheel compiles: the pinned torch, and another torch from local disk.
    logs = {k: it.tmp / f"{k}.log" for k in ("pinned", "other", "sdist", "wheel")}
    jobs["pinned"] = (_start(f"'{base}' -m venv '{it.pinned_venv}' && '{it.py(it.pinned_venv)}' {pip_q} "
                             f"'torch=={PINNED}'", logs["pinned"], it.tmp))
    it.other_torch = _other_local_torch()
    if it.other_torch:
        jobs["other"] = _start(f"'{base}' -m venv '{it.other_venv}' && '{it.py(it.other_venv)}' {pip_q} "
                               f"'{it.other_torch[0]}'", logs["other"], it.tmp)
    else:
        it.other_error = f"no torch wheel other than {PINNED} for {PY_TAG} on local disk ({_pip_locations()})"

    # The sdist (no torch needed), then the CPU-only wheel built from it against this venv's torch;
    # TROUS_LOCAL_VERSION=1 keeps the local label a wheel built from a checkout gets (make wheel).
    build_sdist = "from setuptools import build_meta as b; print(b.build_sdist('dist'))"
    jobs["sdist"] = sdist = _start([sys.executable, "-c", build_sdist], logs["sdist"], it.src)
    _wait(sdist, logs["sdist"], "building the sdist", 120)
    it.sdist = next((it.src / "dist").glob("trous-*.tar.gz"))
    t1 = time.monotonic()
    cmd = [sys.executable, "-m", "pip", "wheel", str(it.sdist), "--no-build-isolation", "--no-deps", "--no-cache-dir",
           "-w", str(it.tmp / "wheels")]
    jobs["wheel"] = wheel = _start(cmd, logs["wheel"], it.tmp, TROUS_CUDA="0", TROUS_LOCAL_VERSION="1",
                                   MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    _wait(wheel, logs["wheel"], "pip wheel <sdist> --no-build-isolation (TROUS_CUDA=0)", 900)
    it.times["wheel build"] = time.monotonic() - t1
    it.wheel = next((it.tmp / "wheels").glob("trous-*.whl"))

    _wait(jobs["pinned"], logs["pinned"], f"a fresh venv with torch=={PINNED}", 900)
    if "other" in jobs:
        try:
            _wait(jobs["other"], logs["other"], f"a fresh venv with torch {it.other_torch[1]}", 900)
        except pytest.fail.Exception as e:
            it.other_error = f"torch {it.other_torch[1]} did not install from {it.other_torch[0]}: {e}"
    it.times["venvs ready"] = time.monotonic() - t0

    # The wheel with its dependencies: torch==PINNED is already there, so pip must leave it alone.
    out = _run([it.py(it.pinned_venv), *pip_q.split(), str(it.wheel)], it.run_dir)
    assert out.returncode == 0, out.stdout + out.stderr
    if it.other_error is None:
        out = _run([it.py(it.other_venv), *pip_q.split(), "--no-deps", str(it.wheel)], it.run_dir)
        assert out.returncode == 0, out.stdout + out.stderr
    it.times["total"] = time.monotonic() - t0
    print(f"\ninstall test timings (s): {', '.join(f'{k} {v:.0f}' for k, v in it.times.items())}")
    return it


def _wheel_metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        build = json.loads(z.read("trous/_build_info.json"))
    return names, meta, build


def test_wheel_metadata(installed):
    label = f"torch{PINNED}.cpu"
    assert installed.wheel.name == f"trous-0.1.0+{label}-{PY_TAG}-{PY_TAG}-linux_x86_64.whl", installed.wheel.name
    names, meta, build = _wheel_metadata(installed.wheel)
    assert f"Version: 0.1.0+{label}" in meta.splitlines(), meta
    requires = [ln.split(":", 1)[1].strip() for ln in meta.splitlines() if ln.startswith("Requires-Dist:")]
    assert f"torch=={PINNED}" in requires, requires
    for extra in ("hf", "timm", "test"):
        assert f"Provides-Extra: {extra}" in meta, meta
    assert 'transformers; extra == "hf"' in requires and 'timm; extra == "timm"' in requires, requires
    m = re.match(r"^2\.(\d+)\.(\d+)$", PINNED)
    if m:  # torchvision 0.(m+15).p was released with torch 2.m.p
        assert f'torchvision==0.{int(m.group(1)) + 15}.{m.group(2)}; extra == "timm"' in requires, requires
    for dep in ("pytest", "hypothesis", "dcls==0.1.1"):
        assert f'{dep}; extra == "test"' in requires, requires
    # No License or Project-URL yet: the project has chosen neither (see the note of issue 15).
    assert "Classifier: Operating System :: POSIX :: Linux" in meta and re.search(r"^Summary: .+", meta, re.M)
    assert any(re.match(r"^trous/_C\..*\.so$", n) for n in names), names
    assert build["version"] == f"0.1.0+{label}" and build["cuda_kernels"] is False, build
    assert build["requires"] == [f"torch=={PINNED}"] and build["torch"] == torch.__version__, build


def test_sdist_has_every_source_and_no_build_product(installed):
    with tarfile.open(installed.sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    csrc = {str(p.relative_to(installed.src)) for p in (installed.src / "csrc").rglob("*") if p.is_file()}
    assert csrc and csrc <= names, sorted(csrc - names)
    assert {"setup.py", "pyproject.toml", "README.md", "PKG-INFO", "python/trous/_version_check.py"} <= names
    assert not [n for n in names if n.endswith((".so", ".o")) or n.endswith("_build_info.json")], names


def test_sdist_from_an_index_keeps_its_version(installed):
    """pip rejects the wheel of an sdist from an index / --find-links unless the versions agree (PEP 643)."""
    out = _run([sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--no-build-isolation", "--no-deps",
                "--no-cache-dir", "--no-index", "--find-links", str(installed.sdist.parent), "--report", "-",
                "trous"], installed.run_dir, TROUS_CUDA="0", TROUS_LOCAL_VERSION="auto")
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout[out.stdout.index("{"):])
    meta = report["install"][0]["metadata"]
    assert meta["version"] == "0.1.0" and f"torch=={PINNED}" in meta["requires_dist"], meta


def test_isolated_build_stops_with_a_clear_message(installed):
    out = _run([sys.executable, "-m", "pip", "wheel", str(installed.src), "--no-deps", "--no-cache-dir",
                "-w", str(installed.tmp / "isolated")], installed.run_dir, timeout=300)
    text = out.stdout + out.stderr
    if out.returncode != 0 and "isolated environment" not in text and "Could not find a version" in text:
        pytest.skip(f"pip could not install the build requirements in an isolated env:\n{text[-2000:]}")
    assert out.returncode != 0, text
    assert "isolated environment" in text and "--no-build-isolation" in text, text
    assert not list((installed.tmp / "isolated").glob("*.whl"))


def test_fresh_venv_info_and_every_family_op(installed):
    py = installed.py(installed.pinned_venv)
    out = _run([py, "-m", "pip", "list", "--format", "json"], installed.run_dir)
    dists = {d["name"].lower(): d["version"] for d in json.loads(out.stdout)}
    assert dists.get("torch", "").split("+")[0] == PINNED and dists.get("trous") == f"0.1.0+torch{PINNED}.cpu", dists
    assert installed.site_trous(installed.pinned_venv).is_relative_to(installed.pinned_venv)

    out = _run([py, "-m", "trous.info"], installed.run_dir, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"trous 0.1.0+torch{PINNED}.cpu", out.stdout
    assert any(ln.split() == ["requires", f"torch=={PINNED}"] for ln in lines), out.stdout
    assert "warning:" not in out.stdout, out.stdout

    # Every family of the source tree is in the wheel, found by name there too.
    out = _run([py, "-c", "from trous import _families; print(' '.join(_families.names()))"], installed.run_dir)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.split() == _families.names(), out.stdout

    # Every registered op of every family once, against the references shipped in the wheel (smoke fails
    # when an op has no case), so each family's ops run from the installed wheel.
    out = _run([py, "-m", "trous.smoke", "--device", "cpu", "--quick"], installed.run_dir, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def _import_trous(py: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    return _run([py, "-c", "import trous; print('imported', trous.__file__)"], cwd, timeout=180, **env)


def _assert_clear_import_error(out: subprocess.CompletedProcess, built: str, running: str):
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "imported" not in out.stdout, text
    err = text.strip().splitlines()[-1]
    assert err.startswith("ImportError: trous 0.1.0+"), text
    for part in (built, running, "--no-build-isolation", _version_check.SKIP_ENV):
        assert part in err, (part, err)
    assert "undefined symbol" not in text, text


def test_faked_build_record_gives_the_clear_import_error(installed):
    py = installed.py(installed.pinned_venv)
    record = installed.site_trous(installed.pinned_venv) / "_build_info.json"
    saved = record.read_text()
    info = json.loads(saved)
    try:
        record.write_text(json.dumps({**info, "torch": "2.11.0+cu130"}))
        out = _import_trous(py, installed.run_dir)
        _assert_clear_import_error(out, "2.11.0+cu130", torch.__version__)
        info_out = _run([py, "-m", "trous.info"], installed.run_dir)  # the same one message there
        assert info_out.returncode != 0 and "ImportError: trous" in info_out.stderr, info_out.stderr
        # A CUDA build of trous needs a torch of the same CUDA major.
        record.write_text(json.dumps({**info, "cuda_kernels": True, "cuda": "9.2", "archs": "9.0"}))
        out = _import_trous(py, installed.run_dir)
        _assert_clear_import_error(out, "CUDA 9.2", torch.__version__)
        # Those who know better: the check is skipped (the real torch matches, so the import works).
        record.write_text(json.dumps({**info, "torch": "2.11.0+cu130"}))
        out = _import_trous(py, installed.run_dir, TROUS_SKIP_TORCH_CHECK="1")
        assert out.returncode == 0 and "imported" in out.stdout, out.stdout + out.stderr
    finally:
        record.write_text(saved)
    out = _import_trous(py, installed.run_dir)
    assert out.returncode == 0, out.stdout + out.stderr


def test_other_torch_gives_the_clear_import_error(installed):
    if installed.other_error:
        pytest.skip(installed.other_error)
    py = installed.py(installed.other_venv)
    out = _run([py, "-c", "import torch; print(torch.__version__)"], installed.run_dir, timeout=180)
    assert out.returncode == 0, out.stderr
    running = out.stdout.strip()
    assert _version_check.release(running) != _version_check.release(PINNED), running
    _assert_clear_import_error(_import_trous(py, installed.run_dir), torch.__version__, running)
