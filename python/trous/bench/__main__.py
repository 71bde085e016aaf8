"""python -m trous.bench [--family kv] [--device cpu|cuda] [--quick] [--out DIR] [--check]

Prints a table (op, shape, trous ms, baseline ms, speed-up, GB/s, fraction of copy bandwidth) and
writes <out>/<device>-<YYYY-MM-DD>[-quick].json and .png (see bench/README.md for the fields).
--check exits with status 3 when a row misses its family's target (the rows are listed).
"""
import argparse
import inspect
import os
import sys
import time

import torch

from . import FAMILIES, harness, load_family

EXIT_TARGETS_MISSED = 3


def _shape(text):
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 1,8,8192,128, got {text!r}") from None
    return shape


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m trous.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", action="append", choices=sorted(FAMILIES),
                   help="family to run (repeatable; default: all registered)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cpu (cuda must be asked for, so results land under the right name)")
    p.add_argument("--quick", action="store_true", help="fewer cases and repeats")
    p.add_argument("--out", default=None, help="results folder (default: <repo>/bench/results)")
    p.add_argument("--check", action="store_true",
                   help=f"exit {EXIT_TARGETS_MISSED} if a row misses its target (after writing the results)")
    p.add_argument("-k", "--filter", default=None, help="only cases whose name contains this text")
    p.add_argument("--shape", type=_shape, default=None, help="replace the families' shapes, e.g. 1,8,1024,128")
    p.add_argument("--repeats", type=int, default=None, help="fixed number of timed calls per case")
    p.add_argument("--copy-mib", type=int, default=None,
                   help="copy-bandwidth buffer size in MiB (default 256 on CPU, 1024 on GPU)")
    p.add_argument("--reuse-memory", action="store_true",
                   help="CPU: let large outputs reuse freed heap memory instead of fresh page-faulting mmaps "
                        "(glibc mallopt); isolates kernel time from allocation cost. Files get a -reuse suffix")
    p.add_argument("--no-save", action="store_true", help="print the table only")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p.parse_args(argv)


def _family_cases(mod, device, quick, shape):
    if shape is None:
        return mod.cases(device, quick)
    if "shape" not in inspect.signature(mod.cases).parameters:
        raise SystemExit(f"family {mod.__name__} does not take --shape")
    return mod.cases(device, quick, shape=shape)


def main(argv=None):
    args = parse_args(argv)
    device = args.device or "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("trous.bench: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    import trous  # noqa: F401  (fails loudly if the extension is not built)

    t_start = time.perf_counter()
    families = args.family or list(FAMILIES)
    all_cases = []
    for name in families:
        all_cases += _family_cases(load_family(name), device, args.quick, args.shape)
    if args.filter:
        all_cases = [c for c in all_cases if args.filter in c.name]
    if not all_cases:
        print("trous.bench: no case selected", file=sys.stderr)
        return 2

    malloc = "default"
    if args.reuse_memory and device == "cpu":
        reused = harness.reuse_freed_memory()
        malloc = "reuse (mallopt M_MMAP_THRESHOLD 1 GiB)" if reused else "default (mallopt failed)"
    load_before = os.getloadavg()[0]
    if device == "cpu" and load_before > 0.5 * (os.cpu_count() or 1):
        print(f"trous.bench: warning: load average {load_before:.1f} on {os.cpu_count()} cores before the run; "
              f"CPU timings will be noisy", file=sys.stderr)
    cfg = harness.TimingConfig.for_run(args.quick, args.repeats, device)
    progress = harness.Progress(len(all_cases) + 1, desc=f"trous.bench {device}", enabled=not args.no_progress)
    progress.update("copy bandwidth")
    copy_bytes = args.copy_mib * harness.MIB if args.copy_mib else None
    copy_repeats = 5 if args.quick else 10
    copy = harness.copy_bandwidth(device, copy_bytes, repeats=copy_repeats)
    raw = []
    for case in all_cases:
        progress.update(case.name)
        raw.append(harness.run_case(case, device, cfg))
    progress.close()
    # Copy bandwidth again at the end: the machine's capability is the better of the two (a busy
    # moment during one measurement would otherwise inflate every fraction).
    again = harness.copy_bandwidth(device, copy_bytes, repeats=copy_repeats)
    copy["gbps_start"], copy["gbps_end"] = copy["gbps"], again["gbps"]
    copy["gbps"] = max(copy["gbps"], again["gbps"])
    rows = [harness.finish_row(r, copy["gbps"]) for r in raw]

    print(harness.format_table(rows, copy["gbps"]))
    report = harness.make_report(device, args.quick, copy, rows, families, time.perf_counter() - t_start)
    report["load_average"] = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}
    report["malloc"] = malloc
    if not args.no_save:
        out = args.out or harness.default_out_dir()
        stem = os.path.join(out, harness.result_stem(device, args.quick, suffix="-reuse" if args.reuse_memory else ""))
        harness.write_json(stem + ".json", report)
        print(f"wrote {stem}.json")
        if not args.no_plot:
            title = f"trous {', '.join(families)} on {report['device']['name']} (torch {torch.__version__})"
            why = harness.write_plot(stem + ".png", rows, title)
            print(f"wrote {stem}.png" if why is None else f"no plot: {why}")

    missed = [r for r in rows if not r["meets_targets"]]
    if missed:
        print(f"\n{len(missed)} of {len(rows)} rows miss a target:")
        for r in missed:
            detail = ", ".join(
                f"{m} {r.get(m) if r.get(m) is None else round(r[m], 3)} < {r['targets'][m]}" for m in r["misses"])
            print(f"  {r['family']} {r['op']} {r['shape']} {r['dtype']}: {detail}")
    else:
        print(f"\nall {len(rows)} rows meet their targets")
    if args.check and missed:
        return EXIT_TARGETS_MISSED
    return 0


if __name__ == "__main__":
    sys.exit(main())
