"""``python -m trous.smoke``: runs every registered trous op once or a few times on small and edge
shapes, for compute-sanitizer (memcheck / racecheck / synccheck) and as a quick device smoke test.

    python -m trous.smoke [--device cuda|cpu] [--quick] [--no-compare]

Each family's ``trous.<family>.smoke`` module has ``run(runner, quick)``; families are found by name.
The command fails if an op that has a kernel for the device is not exercised, if an op raises, or
(unless --no-compare) if a result disagrees with the family's reference beyond a loose tolerance
(the full correctness tests are in tests/; this only catches gross breakage). Grids stay small (a
few blocks) so the sanitizers finish in minutes. Exit status: 0 ok, 1 failures (listed on stderr).
"""
import argparse
import os
import sys
import time
import traceback

import torch

import trous

from . import _families
from .info import op_kernels, op_names


class Runner:
    def __init__(self, device: str, compare: bool):
        self.device, self.compare = device, compare
        self.calls = {}  # op -> number of calls
        self.failures = []
        self.n_checks = 0

    def call(self, op: str, *args):
        self.calls[op] = self.calls.get(op, 0) + 1
        return getattr(torch.ops.trous, op.split("::")[1])(*args)

    def case(self, label: str, fn):
        try:
            fn()
        except Exception as e:  # keep going: report every broken case
            self.failures.append(f"{label}: {type(e).__name__}: {e}")
            if os.environ.get("TROUS_SMOKE_TRACEBACK"):
                traceback.print_exc()

    def check(self, label: str, ok: bool, detail: str = ""):
        self.n_checks += 1
        if not ok:
            self.failures.append(f"{label}: {detail}")


def close(a, b, rtol, atol):
    return torch.allclose(a.float().cpu(), b.float().cpu(), rtol=rtol, atol=atol, equal_nan=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer shapes (for the sanitizers)")
    p.add_argument("--no-compare", action="store_true", help="run the ops only, no reference comparison")
    p.add_argument("--allow-missing", action="store_true",
                   help="ops without a smoke case are a warning, not a failure (the sanitizer runs use this, so "
                        "their status reflects what the sanitizer found)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("trous.smoke: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if args.device == "cuda" and not trous._C.build_info()["cuda_kernels"]:
        print("trous.smoke: this trous build has no CUDA kernels", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    r = Runner(args.device, compare=not args.no_compare)
    for family in _families.names():
        cases = _families.submodule(family, "smoke")
        if cases is not None:
            cases.run(r, args.quick)
    if args.device == "cuda":
        torch.cuda.synchronize()

    key = "cuda" if args.device == "cuda" else "cpu"
    registered = [n for n in op_names() if op_kernels(n)[key]]
    missing = [n for n in registered if n not in r.calls]
    for n in missing:
        msg = f"{n}: has a {key.upper()} kernel but no smoke case (add it to trous/<family>/smoke.py)"
        if args.allow_missing:
            print("WARNING " + msg, file=sys.stderr)
        else:
            r.failures.append(msg)
    n_calls = sum(r.calls.values())
    print(f"trous.smoke on {args.device}: {n_calls} op calls over {len(r.calls)} ops, {r.n_checks} checks, "
          f"{len(r.failures)} failures, {time.perf_counter() - t0:.1f} s")
    for op, n in sorted(r.calls.items()):
        print(f"  {op}: {n} calls")
    for f in r.failures:
        print("FAIL " + f, file=sys.stderr)
    return 1 if r.failures else 0


if __name__ == "__main__":
    sys.exit(main())
