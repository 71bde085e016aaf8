"""bench/gpu_check.sh --dry-run on CPU: the same stages as on a lent GPU, the CPU-possible parts only
(a CPU-only build of a copy of the tree, one family's CPU tests and bench, the packing). Checks what
would come back from a lease: at most 5 files under the limits, the stage table, the budget accounting."""
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
STEPS = ["env", "build", "ptxas", "info", "tests", "smoke", "memcheck", "racecheck", "synccheck", "bench"]
STAGES = {"env": "1 env", "build": "2 build", "ptxas": "2 build", "info": "2 build", "tests": "3 tests",
          "smoke": "3 tests", "memcheck": "4 sanitizers", "racecheck": "4 sanitizers", "synccheck": "4 sanitizers",
          "bench": "5 bench"}
MAX_FILES, MAX_BYTES, MAX_FOLDERS = 5, 16 * 1024 * 1024, 2  # what comes back from a device lease
SLACK_S = 8  # timeout's kill grace (5 s) and the step's own bookkeeping

_missing = [t for t in ("bash", "tar", "gzip", "timeout") if shutil.which(t) is None]
pytestmark = pytest.mark.skipif(bool(_missing), reason=f"gpu_check.sh needs {', '.join(_missing)} (not found)")


def _run(out: Path, *args: str, timeout: int = 900):
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), str(out), "--dry-run", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=str(ROOT))


def _table(summary: str):
    rows = {}
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[1] in STEPS:
            stage, step, status, start, share, secs, log = cells
            rows[step] = dict(stage=stage, status=status, start=int(start), share=int(share), time=int(secs), log=log)
    return rows


def _totals(summary: str):
    m = re.search(r"^budget: (\d+) s \((\d+) s kept for packing\); total: (\d+) s; steps: (\d+) s; ran out: (.*)$",
                  summary, re.M)
    assert m, summary
    return dict(budget=int(m[1]), reserve=int(m[2]), total=int(m[3]), steps=int(m[4]), ran_out=m[5].strip())


def _returned_files(out: Path):
    """Every file under out, as the device tool would bring it back, checked against its limits."""
    files = [p for p in out.rglob("*") if p.is_file() or p.is_symlink()]
    for p in files:
        rel = p.relative_to(out)
        assert p.is_file() and not p.is_symlink(), rel
        assert len(rel.parts) - 1 <= MAX_FOLDERS, rel
        assert all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in rel.parts), rel
        assert p.stat().st_size < MAX_BYTES, (rel, p.stat().st_size)
    assert len(files) <= MAX_FILES, [str(p.relative_to(out)) for p in files]
    return {str(p.relative_to(out)): p for p in files}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check_out")
    return out, _run(out)


def test_dry_run_returns_at_most_5_files_under_the_limits(dry_run):
    out, proc = dry_run
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]
    files = _returned_files(out)
    assert "summary.md" in files and "logs.tar.gz" in files, sorted(files)
    jsons = [f for f in files if f.endswith(".json")]
    assert len(jsons) == 1 and jsons[0].startswith("cpu-"), sorted(files)
    if any(f.endswith(".png") for f in files):
        assert len([f for f in files if f.endswith(".png")]) == 1


def test_dry_run_summary_has_every_stage(dry_run):
    out, proc = dry_run
    summary = (out / "summary.md").read_text()
    assert "(dry run, CPU)" in summary
    rows = _table(summary)
    assert list(rows) == STEPS, summary
    for step, row in rows.items():
        assert row["stage"] == STAGES[step], row
    # The CPU-possible parts ran and passed; the GPU-only ones say why they did not run.
    for step in ("env", "build", "info", "tests", "smoke"):
        assert rows[step]["status"] == "ok", (step, summary)
    assert rows["bench"]["status"] in ("ok", "targets missed"), summary
    assert rows["ptxas"]["status"].startswith("skipped (dry run"), summary
    for step in ("memcheck", "racecheck", "synccheck"):
        assert rows[step]["status"] == "skipped (dry run: no GPU)", summary
    assert re.search(r"^torch \S+ compat: ok", summary, re.M), summary
    assert "## Bench" in summary and "copy bandwidth" in summary


def test_dry_run_budget_accounting(dry_run):
    out, _ = dry_run
    summary = (out / "summary.md").read_text()
    t = _totals(summary)
    rows = _table(summary)
    assert t["budget"] == 540 and t["ran_out"] == "none"
    assert t["steps"] == sum(r["time"] for r in rows.values())
    assert t["steps"] <= t["total"] <= t["budget"]
    end = 0
    for step, row in rows.items():
        # Steps run one after the other; none is offered more than what is left of the budget less the
        # packing reserve, and none takes longer than its share.
        assert row["start"] >= end - 1, (step, row, end)
        end = row["start"] + row["time"]
        if row["status"].startswith("skipped"):
            assert row["time"] == 0, row
        else:
            assert 0 < row["share"] <= t["budget"] - t["reserve"] - row["start"], (step, row)
            assert row["time"] <= row["share"] + SLACK_S, (step, row)
    assert end <= t["total"] + 1


def test_dry_run_archive_lists_the_logs(dry_run):
    out, _ = dry_run
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
        for step in ("env", "build", "info", "tests", "smoke", "bench"):
            assert f"gpu_check-logs/{step}.log" in names, sorted(names)
        assert "gpu_check-logs/gpu_check.log" in names and "gpu_check-logs/pytest.xml" in names
        tests_log = tar.extractfile("gpu_check-logs/tests.log").read().decode()
    assert re.search(r"\d+ passed", tests_log), tests_log[-2000:]


def test_dry_run_builds_a_copy_not_the_checkout(dry_run):
    # The build and everything after it use a copy of the tree in a temporary folder: the checkout's
    # python/trous/_C*.so and build/ (maybe a CUDA build) stay as they are.
    out, _ = dry_run
    with tarfile.open(out / "logs.tar.gz") as tar:
        build = tar.extractfile("gpu_check-logs/build.log").read().decode()
    m = re.search(r"^trous\._C (\S+) ", build, re.M)
    assert m and "'cuda_kernels': False" in build, build[-2000:]
    built = Path(m[1])
    assert ROOT not in built.parents and built.parent.parent.parent.name == "tree", built
    assert str(ROOT / "csrc") not in build and str(built.parents[2] / "csrc") in build


def test_a_stage_that_runs_out_is_stopped_at_its_share(tmp_path):
    # 120 s: the build's share (about 40 s) is far shorter than a CPU build; it is stopped there, its
    # partial log kept, and the stages that need it are skipped. The env step gets its floor (20 s).
    out = tmp_path / "out"
    proc = _run(out, "--budget", "120", timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = _returned_files(out)
    summary = files["summary.md"].read_text()
    rows = _table(summary)
    t = _totals(summary)
    assert t["budget"] == 120 and t["ran_out"] == "build", summary
    assert rows["build"]["status"] == f"ran out ({rows['build']['share']} s)", summary
    assert rows["env"]["share"] >= 20, summary  # the env step's floor
    assert rows["build"]["time"] <= rows["build"]["share"] + SLACK_S
    assert t["total"] <= t["budget"] + SLACK_S
    for step in ("tests", "bench"):
        assert rows[step]["status"] == "skipped (build ran out)", summary
    assert "### build: ran out" in summary
    with tarfile.open(files["logs.tar.gz"]) as tar:
        log = tar.extractfile("gpu_check-logs/build.log").read().decode()
    assert log.startswith("# step_build") and "copied" in log, log[:500]
