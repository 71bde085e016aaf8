"""Device-agnostic benchmark harness: timing, copy bandwidth, table, JSON and plot.

A family module (e.g. :mod:`trous.kvcache.bench`) returns :class:`Case` objects; the harness times
each case's trous callable and its plain-PyTorch baseline on rotating, preallocated inputs and turns
the times into rows (ms, speed-up, effective GB/s, fraction of the measured copy bandwidth).

Timing:
  * CPU: ``time.perf_counter`` around each call; the trous and baseline calls of a case are
    interleaved, so that the machine's drift during a case reaches both sides alike.
  * CUDA: a pair of CUDA events around each call; before each call the stream is kept busy
    (:class:`GpuBusy`: calibrated ``torch.mm`` launches on small, L2-resident operands) for longer
    than the host needs to enqueue the call, so the interval between the events is GPU time only
    (no launch gaps), as if the op were part of a longer stream.
  * warm-up calls first, then the median of ``repeats`` calls. The
    number of repeats adapts to a time budget per case, within [min_repeats, max_repeats].
  * rotating inputs: several preallocated input sets, together at least twice the last-level cache
    (CPU L3 / GPU L2), are used in turn so that no call finds its inputs in the cache.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

MIB = 1 << 20


# ---------------------------------------------------------------------------------------------
# Cases and rows


@dataclasses.dataclass
class Case:
    """One benchmark case.

    ``make_inputs(i)`` builds the i-th input set (a tuple of arguments, on the device); ``fn`` is the
    trous call and ``baseline`` the plain-PyTorch composition, both called as ``fn(*inputs)``.
    ``bytes_moved`` counts what the op must read plus write (its inputs and outputs, once each);
    ``input_bytes`` the size of one input set (used to decide how many sets to rotate through).
    ``targets`` maps a metric of the row ("bw_fraction", "speedup") to its minimum for --check.
    """

    family: str
    op: str
    shape: str
    dtype: str
    make_inputs: Callable[[int], tuple]
    fn: Callable[..., Any]
    baseline: Optional[Callable[..., Any]]
    bytes_moved: int
    input_bytes: int
    baseline_name: str = ""
    targets: Dict[str, float] = dataclasses.field(default_factory=dict)
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.family}: {self.op} {self.shape} {self.dtype}"


@dataclasses.dataclass
class TimingConfig:
    warmup: int = 2
    min_repeats: int = 5
    max_repeats: int = 50
    budget_s: float = 0.4  # per callable per case, after warm-up
    max_sets: int = 8
    rotate_bytes: Optional[int] = None  # total size of the rotated input sets; default 2x the LLC
    max_rotate_bytes: int = 1 << 30  # memory cap on the rotated sets (4 GiB on GPU, see for_run)

    @classmethod
    def for_run(cls, quick: bool, repeats: Optional[int] = None, device: str = "cpu") -> "TimingConfig":
        cfg = cls(warmup=1, min_repeats=3, max_repeats=10, budget_s=0.1) if quick else cls()
        if device == "cuda":
            cfg.max_rotate_bytes = 4 << 30
            cfg.max_repeats *= 4  # GPU calls are short: more samples for the same time
        if repeats is not None:
            cfg.min_repeats = cfg.max_repeats = max(1, repeats)
        return cfg


# ---------------------------------------------------------------------------------------------
# Device description


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _slug(text: str) -> str:
    text = re.sub(r"\(r\)|\(tm\)|\bcpu\b|\bprocessor\b|@.*$|\d+-core", "", text, flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_name(device: str) -> str:
    """Short device name used in file names: ``cpu-<model>`` or the GPU's name, slugged."""
    if device == "cuda":
        return _slug(torch.cuda.get_device_name())
    return "cpu-" + (_slug(_cpu_model()) or "unknown")


def device_info(device: str) -> Dict[str, Any]:
    info: Dict[str, Any] = {"type": device, "name": device_name(device)}
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update({
            "model": props.name,
            "capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "memory_gib": round(props.total_memory / (1 << 30), 1),
            "l2_cache_bytes": getattr(props, "L2_cache_size", None),
            "cuda_runtime": torch.version.cuda,
            "driver": _nvidia_smi_field("driver_version"),
        })
    else:
        info.update({
            "model": _cpu_model(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "llc_bytes": _cpu_llc_bytes(),
            "isa": torch.backends.cpu.get_cpu_capability(),
        })
    return info


def _nvidia_smi_field(field: str) -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_llc_bytes() -> int:
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                with open(os.path.join(base, entry, "size")) as f:
                    text = f.read().strip()
            except OSError:
                continue
            m = re.fullmatch(r"(\d+)([KMG]?)", text)
            if m:
                best = max(best, int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)])
    except OSError:
        pass
    return best or 64 * MIB


def llc_bytes(device: str) -> int:
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return int(getattr(props, "L2_cache_size", 0) or 64 * MIB)
    return _cpu_llc_bytes()


def build_info() -> Dict[str, Any]:
    """What the installed trous says about itself: the package's _build_info.json, the binary's
    build_info() and the git commit of the source tree when there is one."""
    out: Dict[str, Any] = {}
    try:
        import trous

        out["version"] = getattr(trous, "__version__", None)
        path = os.path.join(os.path.dirname(trous.__file__), "_build_info.json")
        if os.path.exists(path):
            with open(path) as f:
                out["package"] = json.load(f)
        out["binary"] = dict(trous._C.build_info())
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(trous.__file__))))
        git = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if git.returncode == 0:
            dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10)
            out["git"] = git.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except Exception as e:  # the benchmark still runs; the json says why the info is missing
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def reuse_freed_memory(threshold: int = 1 << 30) -> bool:
    """glibc only: serve large allocations from the heap (mallopt M_MMAP_THRESHOLD, M_TRIM_THRESHOLD)
    so that an op's output reuses memory freed by the previous call instead of a fresh mmap that
    page-faults on first write (glibc maps every block >= 32 MiB afresh by default: an fp32
    [1, 8, 8192, 128] output costs ~8k page faults per call). Returns whether it took effect."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, threshold)) and bool(libc.mallopt(m_trim_threshold, 4 * threshold))
    except (OSError, AttributeError):
        return False


# ---------------------------------------------------------------------------------------------
# Timing


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class GpuBusy:
    """Keeps the current CUDA stream busy for a requested time with public ops, so that the host can
    enqueue the next call before the GPU reaches it.

    The work is ``torch.mm`` of a [m, k] by [k, m] fp32 pair, preallocated: long on the GPU (about
    2 m^2 k flops), small on the host (one launch) and light on memory (at the default k the
    operands, 8 MiB each, stay in L2 between launches; the m x m output is 256 KiB).
    :meth:`calibrate` measures one launch's GPU time with CUDA events and its host time with
    ``time.perf_counter``; :meth:`__call__` enqueues enough launches for the stream to hold the
    requested milliseconds of work after the host is done enqueueing them. ``device`` is "cuda"
    except in tests.
    """

    def __init__(self, device: str = "cuda", m: int = 256, k: int = 8192, max_k: int = 1 << 16,
                 launches: int = 8):
        self.device, self.m, self.k, self.max_k, self.launches = device, m, k, max_k, launches
        self.gpu_ms = self.host_ms = 0.0
        self._alloc()

    def _alloc(self) -> None:
        self.a = torch.empty(self.m, self.k, device=self.device).uniform_(-0.5, 0.5)
        self.b = torch.empty(self.k, self.m, device=self.device).uniform_(-0.5, 0.5)
        self.out = torch.empty(self.m, self.m, device=self.device)

    def _launch(self) -> None:
        torch.mm(self.a, self.b, out=self.out)

    def calibrate(self) -> "GpuBusy":
        """GPU and host milliseconds of one launch; doubles ``k`` (up to ``max_k``) while a launch
        is not at least twice as long on the GPU as on the host (the queue would hardly grow)."""
        while True:
            self._launch()  # first call: cuBLAS handle and workspace
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            for _ in range(self.launches):
                self._launch()
            host = (time.perf_counter() - t0) * 1e3 / self.launches
            end.record()
            torch.cuda.synchronize()
            self.gpu_ms = max(start.elapsed_time(end) / self.launches, 1e-4)
            self.host_ms = host
            if self.gpu_ms >= 2 * self.host_ms or self.k >= self.max_k:
                return self
            self.k *= 2
            self._alloc()

    def launches_for(self, ms: float) -> int:
        """Launches after which the stream still holds ``ms`` of work once the host is done."""
        gain = max(self.gpu_ms - self.host_ms, 0.25 * self.gpu_ms)  # queued work each launch adds
        return max(1, math.ceil(ms / gain))

    def __call__(self, ms: float) -> None:
        for _ in range(self.launches_for(ms)):
            self._launch()


_BUSY: Dict[str, GpuBusy] = {}


def _gpu_busy(device: str) -> GpuBusy:
    """The :class:`GpuBusy` of ``device``, kept for the run, calibrated afresh (a few launches) for
    each timed callable: a family may change matmul settings such as TF32 between cases."""
    if device not in _BUSY:
        _BUSY[device] = GpuBusy(device)
    return _BUSY[device].calibrate()


def _repeats(fn: Callable[..., Any], inputs: Sequence[tuple], device: str, cfg: TimingConfig) -> Tuple[int, int]:
    """Warm-up calls (loads code, fills allocator caches; the inputs were written, so already paged
    in), then how many calls fit the time budget. Returns (warm-up calls made, repeats)."""
    n = len(inputs)
    host_ms = []
    warm = max(cfg.warmup, 1)
    for i in range(warm):
        synchronize(device)
        t0 = time.perf_counter()
        fn(*inputs[i % n])
        synchronize(device)
        host_ms.append((time.perf_counter() - t0) * 1e3)
    est_ms = max(min(host_ms), 1e-4)
    return warm, int(min(cfg.max_repeats, max(cfg.min_repeats, math.ceil(cfg.budget_s * 1e3 / est_ms))))


def _time_cpu(fn: Callable[..., Any], inputs: Sequence[tuple], warm: int, repeats: int) -> List[float]:
    """``time.perf_counter`` around each call."""
    n = len(inputs)
    times: List[float] = []
    for r in range(repeats):
        args = inputs[(warm + r) % n]  # continue the rotation: never the set used just before
        t0 = time.perf_counter()
        fn(*args)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def interleave_order(n_a: int, n_b: int) -> List[int]:
    """The order of n_a calls of side 0 and n_b of side 1 spread evenly over one run: side 0's call j
    at (j + 1/2) / n_a, side 1's call k at (k + 1/2) / n_b of the way through."""
    keys = [((j + 0.5) / n_a, 0) for j in range(n_a)] + [((k + 0.5) / n_b, 1) for k in range(n_b)]
    return [side for _, side in sorted(keys)]


def _time_cpu_interleaved(fns: Sequence[Callable[..., Any]], inputs: Sequence[tuple], start: int,
                          repeats: Sequence[int]) -> List[List[float]]:
    """``time.perf_counter`` around each call of the trous callable and of its baseline, the calls
    interleaved (:func:`interleave_order`) so that both sides see the same machine: on a shared VM
    the speed of a core drifts by tens of percent within seconds, and timing one side after the
    other turned that drift into the ratio. One rotation of the input sets for both sides: no call
    finds the set of the call just before it."""
    n = len(inputs)
    times: List[List[float]] = [[], []]
    for i, side in enumerate(interleave_order(repeats[0], repeats[1])):
        args = inputs[(start + i) % n]
        t0 = time.perf_counter()
        fns[side](*args)
        times[side].append((time.perf_counter() - t0) * 1e3)
    return times


def _time_cuda(fn: Callable[..., Any], inputs: Sequence[tuple], warm: int, repeats: int,
               device: str = "cuda") -> List[float]:
    """A pair of CUDA events around each call, the stream kept busy (:class:`GpuBusy`) before each
    call for twice as long as the host takes to enqueue one, so that the events see back-to-back
    GPU work: GPU time without launch gaps, as if the op were part of a longer stream."""
    n = len(inputs)
    t0 = time.perf_counter()
    for i in range(3):
        fn(*inputs[i % n])
    enqueue_ms = (time.perf_counter() - t0) * 1e3 / 3
    torch.cuda.synchronize()
    busy = _gpu_busy(device)
    busy_ms = min(2 * enqueue_ms + 0.05, 50.0)
    events = []
    for r in range(repeats):
        args = inputs[(warm + r) % n]  # continue the rotation: never the set used just before
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        busy(busy_ms)
        start.record()
        fn(*args)
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in events]


def time_calls(fn: Callable[..., Any], inputs: Sequence[tuple], device: str, cfg: TimingConfig) -> List[float]:
    """Milliseconds of each timed call of ``fn`` over the rotating ``inputs`` (CPU: wall time of
    each call; CUDA: GPU time of each call, see :func:`_time_cuda`)."""
    warm, repeats = _repeats(fn, inputs, device, cfg)
    if device == "cuda":
        return _time_cuda(fn, inputs, warm, repeats)
    return _time_cpu(fn, inputs, warm, repeats)


def n_input_sets(input_bytes: int, device: str, cfg: TimingConfig) -> int:
    """Enough input sets to cover ``rotate_bytes`` (default twice the last-level cache), at least 2,
    at most ``max_sets`` and within ``max_rotate_bytes`` of memory."""
    target = cfg.rotate_bytes if cfg.rotate_bytes is not None else 2 * llc_bytes(device)
    size = max(input_bytes, 1)
    n = min(max(2, math.ceil(target / size) + 1), cfg.max_sets)
    while n > 1 and n * size > cfg.max_rotate_bytes:
        n -= 1
    return n


def copy_bandwidth(device: str, nbytes: Optional[int] = None, repeats: int = 10) -> Dict[str, Any]:
    """Copy bandwidth of ``dst.copy_(src)`` into a preallocated buffer: (read + write bytes) / time.

    Default buffer size: 256 MiB on CPU, 1 GiB on GPU (each of src and dst).
    """
    nbytes = nbytes or (1 << 30 if device == "cuda" else 256 * MIB)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src).zero_()  # touched: no page faults inside the timing
    cfg = TimingConfig(warmup=2, min_repeats=repeats, max_repeats=repeats)
    times = time_calls(lambda s, d: d.copy_(s), [(src, dst)], device, cfg)
    ms = statistics.median(times)
    moved = 2 * src.numel() * src.element_size()
    del src, dst
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"gbps": moved / ms / 1e6, "buffer_bytes": nbytes, "ms": ms, "repeats": repeats,
            "method": "dst.copy_(src), preallocated, (read + write bytes) / median time"}


def run_case(case: Case, device: str, cfg: TimingConfig) -> Dict[str, Any]:
    n = n_input_sets(case.input_bytes, device, cfg)
    inputs = [case.make_inputs(i) for i in range(n)]
    synchronize(device)
    # The baseline is the slow side: fewer calls suffice for its median (its precision matters less).
    base_cfg = dataclasses.replace(cfg, warmup=1, min_repeats=min(cfg.min_repeats, 3))
    if device == "cpu" and case.baseline is not None:
        warm, reps = _repeats(case.fn, inputs, device, cfg)
        warm_b, reps_b = _repeats(case.baseline, inputs, device, base_cfg)
        t, b = _time_cpu_interleaved([case.fn, case.baseline], inputs, warm + warm_b, [reps, reps_b])
    else:
        t = time_calls(case.fn, inputs, device, cfg)
        b = time_calls(case.baseline, inputs, device, base_cfg) if case.baseline is not None else None
    del inputs
    if device == "cuda":
        torch.cuda.empty_cache()
    trous_ms = statistics.median(t)
    base_ms = statistics.median(b) if b else None
    return {
        "family": case.family,
        "op": case.op,
        "shape": case.shape,
        "dtype": case.dtype,
        "trous_ms": trous_ms,
        "trous_ms_min": min(t),
        "baseline_ms": base_ms,
        "baseline_ms_min": min(b) if b else None,
        "baseline": case.baseline_name,
        "speedup": base_ms / trous_ms if base_ms else None,
        "bytes": case.bytes_moved,
        "gbps": case.bytes_moved / trous_ms / 1e6,
        "baseline_gbps": case.bytes_moved / base_ms / 1e6 if base_ms else None,
        "repeats": len(t),
        "baseline_repeats": len(b) if b else 0,
        "input_sets": n,
        "load_average": round(os.getloadavg()[0], 2),
        "targets": dict(case.targets),
        **({"extra": case.extra} if case.extra else {}),
    }


def finish_row(row: Dict[str, Any], copy_gbps: float) -> Dict[str, Any]:
    """Adds the fraction of copy bandwidth and the target verdicts (``misses``: the failed ones)."""
    row["bw_fraction"] = row["gbps"] / copy_gbps if copy_gbps else None
    misses = []
    for metric, minimum in row.get("targets", {}).items():
        value = row.get(metric)
        if value is None or value < minimum:
            misses.append(metric)
    row["misses"] = misses
    row["meets_targets"] = not misses
    return row


# ---------------------------------------------------------------------------------------------
# Progress


class Progress:
    """A tqdm progress bar on stderr, one step per case, the step's label after the bar; shown only
    when ``enabled`` and stderr is a terminal (no carriage-return redraws in logs). When enabled,
    :meth:`close` writes one summary line (cases and seconds) either way."""

    def __init__(self, total: int, desc: str = "bench", enabled: bool = True):
        from tqdm import tqdm

        self.total, self.n, self.desc, self.enabled = total, 0, desc, enabled
        self.t0 = time.perf_counter()
        self.bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=False, dynamic_ncols=True,
                        mininterval=0, miniters=1,  # redraw at every step: the label is the news
                        disable=not (enabled and sys.stderr.isatty()))

    def update(self, label: str) -> None:
        """Call before starting the next step, with that step's label."""
        self.bar.set_postfix_str(label, refresh=False)
        if self.n:
            self.bar.update(1)
        else:
            self.bar.refresh()
        self.n += 1

    def close(self) -> None:
        if self.n:
            self.bar.update(1)
        self.bar.close()
        if self.enabled:
            sys.stderr.write(f"{self.desc}: {self.n} cases in {time.perf_counter() - self.t0:.1f} s\n")
            sys.stderr.flush()


# ---------------------------------------------------------------------------------------------
# Output: table, json, plot


def _fmt(v: Optional[float], spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(rows: Sequence[Dict[str, Any]], copy_gbps: float) -> str:
    headers = ["op", "shape", "trous ms", "baseline ms", "speed-up", "GB/s", "of copy", "targets"]
    body = []
    for r in rows:
        verdict = "ok" if not r.get("targets") else ("ok" if r["meets_targets"] else "MISS " + ",".join(r["misses"]))
        body.append([
            f"{r['family']} {r['op']}",
            f"{r['shape']} {r['dtype']}",
            _fmt(r["trous_ms"], ".3f"),
            _fmt(r["baseline_ms"], ".3f"),
            _fmt(r["speedup"], ".1f") + ("x" if r["speedup"] is not None else ""),
            _fmt(r["gbps"], ".1f"),
            _fmt(100 * r["bw_fraction"] if r["bw_fraction"] is not None else None, ".0f") + "%",
            verdict,
        ])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(headers)]
    right = {2, 3, 4, 5, 6}

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(headers), line(["-" * w for w in widths])] + [line(b) for b in body]
    out.append(f"copy bandwidth: {copy_gbps:.1f} GB/s (read + write); GB/s = bytes read + written by the op / "
               f"median time")
    return "\n".join(out)


def default_out_dir() -> str:
    """<repo>/bench/results when trous runs from a source tree, else ./bench/results."""
    import trous

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(trous.__file__))))
    if os.path.isdir(os.path.join(root, "bench")) and os.path.exists(os.path.join(root, "setup.py")):
        return os.path.join(root, "bench", "results")
    return os.path.join(os.getcwd(), "bench", "results")


def result_stem(device: str, quick: bool, date: Optional[datetime.date] = None, suffix: str = "") -> str:
    date = date or datetime.date.today()
    return f"{device_name(device)}-{date.isoformat()}" + ("-quick" if quick else "") + suffix


def write_json(path: str, report: Dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")


def write_plot(path: str, rows: Sequence[Dict[str, Any]], title: str) -> Optional[str]:
    """Two horizontal bar charts (speed-up over the baseline; fraction of copy bandwidth), one bar per
    case, target lines dashed. Returns None on success, else why no plot was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib unavailable ({e})"
    labels = [f"{r['op']} {r['shape']} {r['dtype']}" for r in rows]
    speed = [r["speedup"] or 0.0 for r in rows]
    frac = [100 * (r["bw_fraction"] or 0.0) for r in rows]
    ok = ["tab:blue" if r["meets_targets"] else "tab:red" for r in rows]
    height = max(3.0, 0.22 * len(rows) + 1.5)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, height), sharey=True)
    y = list(range(len(rows)))
    ax1.barh(y, speed, color=ok)
    ax1.set_xscale("log")
    ax1.set_xlabel("speed-up over the plain-PyTorch baseline (log)")
    ax1.axvline(1.0, color="black", lw=0.8)
    ax2.barh(y, frac, color=ok)
    ax2.set_xlabel("% of copy bandwidth")
    for i, (sp, fr) in enumerate(zip(speed, frac)):
        if sp > 0:
            ax1.text(sp, i, f" {sp:.1f}x", va="center", fontsize=6)
        ax2.text(fr, i, f" {fr:.0f}%", va="center", fontsize=6)
    for metric, ax, scale in (("speedup", ax1, 1.0), ("bw_fraction", ax2, 100.0)):
        levels = sorted({r["targets"][metric] for r in rows if metric in r.get("targets", {})})
        for level in levels:
            ax.axvline(level * scale, color="tab:green", ls="--", lw=1)
    ax1.set_yticks(y)
    ax1.set_yticklabels(labels, fontsize=7)
    ax1.invert_yaxis()
    fig.suptitle(title + "   (red: misses a target; dashed: targets)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def make_report(device: str, quick: bool, copy: Dict[str, Any], rows: List[Dict[str, Any]],
                families: Sequence[str], wall_s: float) -> Dict[str, Any]:
    return {
        "schema": 1,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device_info(device),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "trous": build_info(),
        "families": list(families),
        "quick": quick,
        "copy_bandwidth": copy,
        "wall_s": round(wall_s, 1),
        "rows": rows,
    }
