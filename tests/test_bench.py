"""The benchmark harness on a tiny KV case on CPU: timing, rows, table, json fields, plot, --check."""
import io
import json
import os
import subprocess
import sys
import time

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
    bulk = [c for c in full if c.op.startswith(("quantize", "dequantize"))]
    assert {c.shape for c in bulk} == {"1x8x8192x128"} and {c.dtype for c in full} == {"fp16", "fp32"}
    # the cache rows of issue 13: one decode step's append, decode attention at 4k..32k, generate()
    for want in ("append decode step", "decode int4 G=32 vs grouped matmul", "decode int8 G=D vs dequantize+SDPA",
                 "generate 256 after 4096"):
        assert any(c.op.startswith(want) for c in full), want
    assert {c.shape for c in full if c.op.startswith("decode")} >= {"B=1 T=32768 Hq=32 Hkv=8 D=128"}
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


class _FakeEvent:
    """torch.cuda.Event stand-in on CPU: record() notes the host clock."""

    recorded = 0

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()
        _FakeEvent.recorded += 1

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


@pytest.fixture
def fake_cuda(monkeypatch):
    """The CUDA timing path on CPU: events read the host clock, synchronize is a no-op, the busy
    work is a tiny CPU matmul."""
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    busy = harness.GpuBusy("cpu", m=8, k=32, max_k=128, launches=2)
    monkeypatch.setattr(harness, "_gpu_busy", lambda device: busy.calibrate())
    _FakeEvent.recorded = 0
    return busy


def test_time_calls_picks_the_device_path(monkeypatch):
    seen = []
    monkeypatch.setattr(harness, "_time_cuda", lambda fn, inputs, warm, repeats: seen.append("cuda") or [1.0])
    monkeypatch.setattr(harness, "_time_cpu", lambda fn, inputs, warm, repeats: seen.append("cpu") or [2.0])
    monkeypatch.setattr(harness, "synchronize", lambda device: None)
    cfg = harness.TimingConfig(warmup=1, min_repeats=1, max_repeats=1, budget_s=0.0)
    assert harness.time_calls(lambda: None, [()], "cuda", cfg) == [1.0]
    assert harness.time_calls(lambda: None, [()], "cpu", cfg) == [2.0]
    assert seen == ["cuda", "cpu"]
    # Public APIs only: no private torch.cuda call left in the harness.
    src = open(harness.__file__).read()
    assert "torch.cuda._" not in src and "_sleep" not in src


def test_cuda_path_on_cpu(fake_cuda):
    """The CUDA timing code end to end on CPU (fake events): one event pair per timed call, inputs
    rotated in order after the warm-up, the busy work enqueued before each call."""
    order = []
    sets = [(i,) for i in range(3)]
    cfg = harness.TimingConfig(warmup=2, min_repeats=5, max_repeats=5, budget_s=0.0)
    launches = []
    orig = fake_cuda._launch
    fake_cuda._launch = lambda: (launches.append(1), orig())
    times = harness.time_calls(lambda i: order.append(i), sets, "cuda", cfg)
    assert len(times) == 5 and all(t >= 0 for t in times)
    assert order[-5:] == [2, 0, 1, 2, 0]  # warm-up 0, 1; enqueue estimate 0, 1, 2; timed from set 2 on
    assert fake_cuda.gpu_ms > 0 and fake_cuda.launches_for(1.0) >= 1 and launches
    # The whole row on the CUDA path (a CPU case; rotate_bytes given: no GPU properties needed).
    case = next(c for c in load_family("kv").cases("cpu", quick=True, shape=TINY) if c.op.startswith("quantize int4"))
    cfg = harness.TimingConfig(warmup=1, min_repeats=2, max_repeats=2, budget_s=0.0, rotate_bytes=1)
    _FakeEvent.recorded = 0
    row = harness.finish_row(harness.run_case(case, "cuda", cfg), 10.0)
    assert ROW_FIELDS <= set(row) and row["repeats"] == 2 and row["trous_ms"] > 0
    assert _FakeEvent.recorded >= 2 * (2 + 2)  # calibration pairs + one pair per timed call, both sides


def test_gpu_busy_launch_count():
    busy = harness.GpuBusy("cpu", m=4, k=8, max_k=8)
    busy.gpu_ms, busy.host_ms = 0.1, 0.02  # each launch adds 0.08 ms of queued work
    assert busy.launches_for(0.8) == 10
    busy.gpu_ms, busy.host_ms = 0.1, 0.2  # no queue growth: counts a quarter of the GPU time
    assert busy.launches_for(0.1) == 4


def test_progress(capsys, monkeypatch):
    p = harness.Progress(2, desc="t", enabled=False)
    p.update("a"), p.update("b"), p.close()
    assert capsys.readouterr().err == ""
    p = harness.Progress(2, desc="t")  # stderr is not a terminal here: no bar, the summary line only
    p.update("a"), p.update("b"), p.close()
    err = capsys.readouterr().err
    assert err.startswith("t: 2 cases in ") and "\r" not in err

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    p = harness.Progress(3, desc="t")
    p.update("first case")
    p.update("second case")
    assert p.bar.n == 1 and "second case" in p.bar.postfix
    p.close()
    assert "1/3" in tty.getvalue() and "t: 2 cases in " in tty.getvalue()


def test_dcls_route_is_public():
    """The DCLS bench learns the route from the module's public ``route`` (no private method)."""
    from trous import dcls

    src = open(load_family("dcls").__file__).read()
    assert "._direct(" not in src and ".route(" in src
    x = torch.randn(2, 4, 20)
    banded = dcls.Dcls1d(4, 6, 1, dilated_kernel_size=5, version="v1", strategy="direct")
    assert banded.route(x) == "banded"
    assert dcls.Dcls1d(4, 6, 1, dilated_kernel_size=5, strategy="construct").route(x) == "construct"
    dw = dcls.Dcls2d(4, 4, 3, padding=2, dilated_kernel_size=5, groups=4, version="v1", strategy="direct")
    assert dw.route(torch.randn(1, 4, 9, 9)) == "direct"
    assert dcls.Dcls2d(4, 4, 3, padding=2, dilated_kernel_size=5, groups=4, strategy="construct").route(
        torch.randn(1, 4, 9, 9)) == "construct"
    auto = dcls.Dcls2d(4, 4, 3, padding=2, dilated_kernel_size=5, groups=4)
    assert auto.route(torch.randn(1, 4, 9, 9)) in ("direct", "construct")


def test_fma_lanes():
    """The printed FMA peak counts 512-bit FMAs at 16 lanes except where they run as two 256-bit
    halves (AMD family 25: Zen 3 / Zen 4)."""
    from trous.attention.bench import fma_lanes

    zen4 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
    zen5 = zen4.replace(": 25", ": 26")
    intel = "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n"
    assert fma_lanes("AVX512", zen4) == 8
    assert fma_lanes("AVX512", zen5) == 16
    assert fma_lanes("AVX512", intel) == 16
    assert fma_lanes("AVX2", intel) == 8
    assert fma_lanes("AVX512", "") == 16


def test_interleave_order_spreads_both_sides():
    for n_a, n_b in [(10, 3), (3, 10), (5, 5), (1, 1), (50, 3)]:
        order = harness.interleave_order(n_a, n_b)
        assert order.count(0) == n_a and order.count(1) == n_b
        # each side's calls sit evenly in the run: the k-th call of side 1 lies within one slot of
        # its share of the way through
        pos = [i for i, s in enumerate(order) if s == 1]
        for k, p in enumerate(pos):
            assert abs(p - (k + 0.5) / n_b * (n_a + n_b)) <= n_a / n_b + 1, (n_a, n_b, order)


def test_cpu_case_interleaves_trous_and_baseline():
    """On CPU the timed calls of the two sides alternate as interleave_order says, after each side's
    warm-up, one rotation of the input sets for both: no timed call gets the set of the call before
    it."""
    calls = []
    case = harness.Case(family="kv", op="t", shape="s", dtype="fp32", make_inputs=lambda i: (i,),
                        fn=lambda i: calls.append(("t", i)), baseline=lambda i: calls.append(("b", i)),
                        bytes_moved=1, input_bytes=1)
    cfg = harness.TimingConfig(warmup=1, min_repeats=6, max_repeats=6, budget_s=0.0, rotate_bytes=3)
    row = harness.run_case(case, "cpu", cfg)
    assert row["repeats"] == 6 and row["baseline_repeats"] == 3 and row["input_sets"] == 4
    timed = calls[2:]  # after one warm-up call per side
    assert [s for s, _ in calls[:2]] == ["t", "b"]
    assert [s for s, _ in timed] == ["t" if side == 0 else "b" for side in harness.interleave_order(6, 3)]
    sets = [i for _, i in calls[1:]]  # from the baseline's warm-up (both warm-ups take set 0)
    assert all(a != b for a, b in zip(sets, sets[1:]))
