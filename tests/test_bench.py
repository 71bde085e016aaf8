"""The benchmark harness on a tiny KV case on CPU: timing, rows, table, json fields, plot, --check."""
import json
import os
import subprocess
import sys

import pytest
import torch

import trous  # noqa: F401
from trous.bench import FAMILIES, harness, load_family

TINY = (1, 2, 64, 128)
ROW_FIELDS = {"family", "op", "shape", "dtype", "trous_ms", "baseline_ms", "speedup", "bytes", "gbps",
              "bw_fraction", "targets", "misses", "meets_targets", "repeats", "input_sets"}


def test_registry_has_kv():
    assert "kv" in FAMILIES
    mod = load_family("kv")
    assert callable(mod.cases) and callable(mod.targets)
    with pytest.raises(KeyError):
        load_family("no-such-family")


def test_kv_cases_cover_the_schemes():
    names = [c.op for c in load_family("kv").cases("cpu", quick=False, shape=TINY)]
    for want in ("quantize int8 G=128=D", "quantize int4 G=32", "quantize int2 G=64", "dequantize int2 G=32",
                 "quantize sym int8", "quantize KIVI int2 G=32", "dequantize KIVI int4 G=32",
                 "quantize fp8 e4m3 per-tensor", "dequantize fp8 e4m3 per-head"):
        assert any(n.startswith(want) for n in names), (want, names)
    full = load_family("kv").cases("cpu", quick=False)
    assert {c.shape for c in full} == {"1x8x8192x128"} and {c.dtype for c in full} == {"fp16", "fp32"}
    assert len(load_family("kv").cases("cpu", quick=True)) < len(full)


def test_harness_rows_table_json(tmp_path):
    cases = [c for c in load_family("kv").cases("cpu", quick=True, shape=TINY)
             if c.op.startswith(("quantize int4", "dequantize int4"))]
    assert len(cases) == 2
    cfg = harness.TimingConfig(warmup=1, min_repeats=2, max_repeats=2, budget_s=0.0)
    copy = harness.copy_bandwidth("cpu", 8 * harness.MIB, repeats=2)
    assert copy["gbps"] > 0
    rows = [harness.finish_row(harness.run_case(c, "cpu", cfg), copy["gbps"]) for c in cases]
    for r in rows:
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        assert r["repeats"] == 2 and r["trous_ms"] > 0 and r["baseline_ms"] > 0
        assert r["bw_fraction"] == pytest.approx(r["gbps"] / copy["gbps"])
        assert r["targets"] == {"bw_fraction": 0.5, "speedup": 3.0}
    # bytes: int4 G=32 fp16 [1,2,64,128]: x 32 KiB, codes 8 KiB, params 1*2*64*4*2 fp16 = 2 KiB.
    assert rows[0]["bytes"] == 32768 + 8192 + 2048
    table = harness.format_table(rows, copy["gbps"])
    assert "quantize int4 G=32" in table and "speed-up" in table and "of copy" in table
    report = harness.make_report("cpu", True, copy, rows, ["kv"], 1.0)
    path = tmp_path / "r.json"
    harness.write_json(str(path), report)
    back = json.loads(path.read_text())
    for key in ("device", "torch", "trous", "copy_bandwidth", "rows", "date", "quick"):
        assert key in back
    assert back["device"]["name"].startswith("cpu-")
    assert back["trous"]["binary"]["cuda_kernels"] in (True, False)
    pytest.importorskip("matplotlib")
    assert harness.write_plot(str(tmp_path / "r.png"), rows, "test") is None
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_verdicts():
    row = {"gbps": 10.0, "speedup": 2.0, "targets": {"bw_fraction": 0.5, "speedup": 3.0}}
    harness.finish_row(row, 40.0)
    assert row["misses"] == ["bw_fraction", "speedup"] and not row["meets_targets"]
    row = {"gbps": 30.0, "speedup": 4.0, "targets": {"bw_fraction": 0.5, "speedup": 3.0}}
    assert harness.finish_row(row, 40.0)["meets_targets"]


def test_input_rotation():
    cfg = harness.TimingConfig(rotate_bytes=100 * harness.MIB, max_sets=8, max_rotate_bytes=1 << 30)
    assert harness.n_input_sets(30 * harness.MIB, "cpu", cfg) == 5
    assert harness.n_input_sets(1, "cpu", cfg) == 8
    assert harness.n_input_sets(600 * harness.MIB, "cpu", cfg) == 1  # two would not fit the cap


def test_cli_quick_tiny_check(tmp_path):
    """The command line end to end (tiny shape, one scheme): prints the table, writes json + png,
    and --check lists the rows that miss (tiny shapes miss the bandwidth bar) with exit status 3."""
    cmd = [sys.executable, "-m", "trous.bench", "--family", "kv", "--quick", "--shape", "1,2,64,128",
           "-k", "int8 G=128=D", "--repeats", "2", "--copy-mib", "8", "--out", str(tmp_path), "--check"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode in (0, 3), p.stdout + p.stderr
    assert "baseline ms" in p.stdout and "kv quantize int8 G=128=D" in p.stdout
    files = sorted(os.listdir(tmp_path))
    assert any(f.endswith("-quick.json") for f in files), files
    report = json.loads((tmp_path / next(f for f in files if f.endswith(".json"))).read_text())
    assert len(report["rows"]) == 4  # quantize + dequantize, asymmetric and symmetric int8
    missed = [r for r in report["rows"] if not r["meets_targets"]]
    if missed:
        assert p.returncode == 3 and "miss a target" in p.stdout
    else:
        assert p.returncode == 0
