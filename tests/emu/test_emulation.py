"""CUDA kernels run on the CPU through tests/emu/cuda_emu.h, under ASan+UBSan and under TSan.

Needs g++ with sanitizers and the CUDA headers (CUDA_HOME or /usr/local/cuda); neither torch nor a
built trous extension. Each kernel's test is tests/<family>/<subop>_emu.cpp, which EMU_TESTS
picks up. The planted-bug tests prove the harness catches each failure class, and the correct
kernel proves it raises no false alarm.
"""
import importlib.util
import re
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("trous_emu_build", Path(__file__).parent / "build.py")
emu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(emu)

SANITIZERS = ["asan", "tsan"]
# Every tests/<family>/<subop>_emu.cpp (adding the file is enough).
EMU_TESTS = emu.emu_tests()

# (variant of planted_bugs.cpp, build that must catch it, regex of the report)
PLANTED = [
    ("oob_write", "asan", r"ERROR: AddressSanitizer: heap-buffer-overflow"),
    # Through a pointer ASan reports global-buffer-overflow unless UBSan's object-size check fires first.
    ("smem_overflow", "asan",
     r"AddressSanitizer: global-buffer-overflow|runtime error: store to address .* insufficient space"),
    ("race", "tsan", r"WARNING: ThreadSanitizer: data race"),
    ("divergent_barrier", "asan", r"trous-emu: divergent __syncthreads"),
    ("divergent_barrier", "tsan", r"trous-emu: divergent __syncthreads"),
    ("divergent_shuffle", "asan", r"trous-emu: divergent warp collective"),
    ("divergent_shuffle", "tsan", r"trous-emu: divergent warp collective"),
    ("shuffle_mask_mismatch", "asan", r"trous-emu: divergent warp collective"),
]


def _needed_builds(items):
    pairs = []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "emu_test" in params:
            pairs.append((params["emu_test"], params["variant"]))
        elif "planted" in params:
            pairs.append(("planted_bugs", params["planted"][1]))
        elif "variant" in params:
            pairs.append(("planted_bugs", params["variant"]))
    return [p for p in pairs if emu.skip_reason(p[1]) is None]


@pytest.fixture(scope="module", autouse=True)
def _prebuild(request):
    """Compiles every binary the selected tests need, in parallel (each takes 10-40 s)."""
    items = [i for i in request.session.items if i.module is request.module]
    emu.build_all(_needed_builds(items))


def _run(name, variant, *args):
    why = emu.skip_reason(variant)
    if why:
        pytest.skip(why)
    res = emu.run(name, variant, args, timeout=600)
    return res, res.stdout + res.stderr


def _tail(text, n=3000):
    """The start (first report) and the end (summary) of a long output."""
    return text if len(text) <= 2 * n else text[:n] + "\n[...]\n" + text[-n:]


@pytest.mark.parametrize("variant", SANITIZERS)
@pytest.mark.parametrize("emu_test", EMU_TESTS)
def test_kernels_under_sanitizer(emu_test, variant):
    res, out = _run(emu_test, variant)
    assert res.returncode == 0, f"{emu_test} [{variant}] exit {res.returncode}:\n{_tail(out)}"
    assert not re.search(r"Sanitizer|runtime error|trous-emu:", out), _tail(out)
    assert re.search(r": \d+ passed, 0 failed", out), _tail(out)


@pytest.mark.parametrize("variant", SANITIZERS)
def test_correct_kernel_passes(variant):
    res, out = _run("planted_bugs", variant, "correct")
    assert res.returncode == 0 and "correct: ok" in out, _tail(out)
    assert not re.search(r"Sanitizer|runtime error|trous-emu:", out), _tail(out)


@pytest.mark.parametrize("planted", PLANTED, ids=[f"{p[0]}-{p[1]}" for p in PLANTED])
def test_planted_bug_is_caught(planted):
    variant_name, build, report = planted
    res, out = _run("planted_bugs", build, variant_name)
    assert res.returncode != 0, f"{variant_name} was not caught under {build}:\n{_tail(out)}"
    assert re.search(report, out), f"expected /{report}/ in:\n{_tail(out)}"
