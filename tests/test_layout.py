"""The layout's rules (CONTRIBUTING.md), checked on the tree: one folder per family everywhere, the
suffix of a file tells whether it may include torch, every schema sits beside its impls, and every
CUDA kernel header has an emulation test."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
SHARED = "trous"  # csrc/trous/: the shared vocabulary, not a family
SOURCE_SUFFIXES = {".h", ".cuh", ".cu", ".cpp"}
TORCH_INCLUDE = re.compile(r'#include\s*[<"](torch/|ATen/|c10/)')
PROJECT_INCLUDE = re.compile(r'#include\s*"([^"]+)"')


def _families():
    return sorted(p.name for p in CSRC.iterdir() if p.is_dir() and p.name != SHARED)


def _sources():
    return sorted(p for p in CSRC.rglob("*") if p.is_file())


def may_use_torch(path: Path) -> bool:
    """The suffix rule: only <stem>_cpu.{h,cpp} (CPU kernels) and <stem>_ops.{h,cpp} (the op layer)
    may include torch, ATen or c10; every other file compiles without torch."""
    return path.suffix in (".h", ".cpp") and path.stem.endswith(("_cpu", "_ops"))


def test_csrc_is_the_shared_folder_and_one_folder_per_family():
    loose = [p.name for p in CSRC.iterdir() if p.is_file()]
    assert not loose, f"files directly in csrc/ belong in csrc/trous/ or csrc/<family>/: {loose}"
    assert (CSRC / SHARED).is_dir()
    assert _families(), "no family folder under csrc/"
    for p in _sources():
        assert len(p.relative_to(CSRC).parts) == 2, f"{p.relative_to(ROOT)}: one level below csrc/ only"
        assert p.suffix in SOURCE_SUFFIXES, f"{p.relative_to(ROOT)}: unexpected kind of file"


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(CSRC)))
def test_suffix_says_whether_torch_is_included(path):
    text = path.read_text()
    if not may_use_torch(path):
        assert not TORCH_INCLUDE.search(text), f"{path.relative_to(ROOT)} is torch-free by its name but includes torch"
        for inc in PROJECT_INCLUDE.findall(text):
            target = CSRC / inc
            if target.is_file():
                assert not may_use_torch(target), f"{path.relative_to(ROOT)} (torch-free) includes {inc}"
    if path.suffix == ".cu":
        assert path.stem.endswith("_cuda"), f"{path.name}: CUDA launchers are <subop>_cuda.cu"
    if path.suffix == ".cuh" and path.parent.name != SHARED:
        assert path.stem.endswith("_kernels"), f"{path.name}: a family's CUDA kernels are <subop>_kernels.cuh"


def test_schemas_sit_beside_their_impls():
    for p in _sources():
        text = p.read_text()
        assert not re.search(r"TORCH_LIBRARY\s*\(", text), f"{p.relative_to(ROOT)}: a TORCH_LIBRARY block is a " \
            "table every family edits; declare schemas with TORCH_LIBRARY_FRAGMENT in the family's op file"
        if "TORCH_LIBRARY_FRAGMENT" in text or "TORCH_LIBRARY_IMPL" in text:
            assert p.name.endswith("_ops.cpp"), f"{p.relative_to(ROOT)}: registration belongs in an *_ops.cpp"


@pytest.mark.parametrize("family", _families())
def test_family_has_op_file_package_tests_and_emulation_tests(family):
    ops = [p for p in (CSRC / family).glob("*_ops.cpp") if "TORCH_LIBRARY_FRAGMENT" in p.read_text()]
    assert ops, f"csrc/{family}/ has no *_ops.cpp declaring its schemas"
    package = ROOT / "python" / "trous" / family
    assert (package / "__init__.py").is_file(), f"no Python package python/trous/{family}/"
    assert (package / "reference.py").is_file(), f"python/trous/{family}/ has no reference.py"
    tests = ROOT / "tests" / family
    assert list(tests.glob("test_*.py")), f"tests/{family}/ has no test_*.py"
    for kernels in (CSRC / family).glob("*_kernels.cuh"):
        subop = kernels.name[: -len("_kernels.cuh")]
        emu = tests / f"{subop}_emu.cpp"
        assert emu.is_file(), f"{kernels.relative_to(ROOT)} has no emulation test {emu.relative_to(ROOT)}"
        assert kernels.name in emu.read_text() or f"{subop}_cuda" in emu.read_text(), \
            f"{emu.relative_to(ROOT)} does not compile {kernels.name}"


def test_python_families_are_found_by_name():
    import trous
    from trous import _families as discovery

    found = discovery.names()
    assert set(_families()) <= set(found), (found, _families())
    for family in found:
        assert getattr(trous, family).__name__ == f"trous.{family}"


def test_trous_nn_holds_every_family_layer():
    import trous

    for family in trous._families.names():
        for name in getattr(getattr(trous, family), "NN", ()):
            assert getattr(trous.nn, name) is getattr(getattr(trous, family), name), name
    assert trous.nn.Dcls2d is trous.Dcls2d and trous.nn.PConv2d is trous.PConv2d


# CPU prefetches go through trous/simd_cpu.h's prefetch_line (volatile asm): GCC deems a function
# whose only effect is __builtin_prefetch `const` and deletes its calls when it is not inlined first.
PREFETCH_HOME = CSRC / "trous" / "simd_cpu.h"


def test_cpu_prefetches_go_through_prefetch_line():
    offenders = [str(p.relative_to(ROOT)) for p in _sources()
                 if p != PREFETCH_HOME and p.suffix in (".h", ".cpp") and "__builtin_prefetch" in p.read_text()]
    assert offenders == [], f"__builtin_prefetch outside simd_cpu.h (use trous::cpu::prefetch_line): {offenders}"


def test_built_extension_holds_the_l2_prefetches():
    """The attention forward's K / V prefetches (towards L2) are in the binary: they were once deleted
    by the compiler without a warning."""
    import platform
    import shutil
    import subprocess

    if platform.machine() != "x86_64" or shutil.which("objdump") is None:
        pytest.skip("needs x86-64 and objdump")
    import trous._C as ext

    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", ext.__file__], capture_output=True, text=True,
                         check=True).stdout
    assert re.search(r"\sprefetcht1\s", asm), "no prefetcht1 in the extension: the CPU prefetches were compiled out"
