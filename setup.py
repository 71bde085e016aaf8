"""Build of trous._C: CPU kernels always, CUDA kernels whenever nvcc and a CUDA build of torch exist.

TROUS_CUDA=auto|0|1 (default auto). CUDA is never gated on a visible GPU, so GPU-less
builders still produce CUDA objects. TORCH_CUDA_ARCH_LIST is honoured; without it and
without a GPU the default is 8.0 and 9.0 (+PTX of 9.0).
"""
import glob
import json
import os
import shutil
import sys

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"
DEFAULT_ARCHS = "8.0;9.0+PTX"


def _cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and os.path.exists("/usr/local/cuda/bin/nvcc"):
        home = "/usr/local/cuda"  # nvcc on PATH may be a wrapper from which torch guesses /usr/local
    if not home and shutil.which("nvcc"):
        home = os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc"))))
    return home


def _want_cuda():
    mode = os.environ.get("TROUS_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"TROUS_CUDA must be auto, 0 or 1, got {mode!r}")
    home = _cuda_home()
    have = torch.version.cuda is not None and home is not None and os.path.exists(os.path.join(home, "bin", "nvcc"))
    if mode == "1" and not have:
        sys.exit(f"TROUS_CUDA=1 but no CUDA build is possible (torch.version.cuda={torch.version.cuda}, "
                 f"CUDA_HOME={home})")
    if mode == "0" or not have:
        cpu_torch = torch.version.cuda is None
        why = "TROUS_CUDA=0" if mode == "0" else ("torch is a CPU build" if cpu_torch else "nvcc not found")
        print(f"trous: building CPU kernels only ({why})")
        return False
    os.environ["CUDA_HOME"] = home
    cpp_extension.CUDA_HOME = home
    return True


def _arch_list():
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not archs:
        archs = DEFAULT_ARCHS
        if torch.cuda.is_available():  # only picks the arch, never decides whether CUDA is built
            major, minor = torch.cuda.get_device_capability()
            archs = f"{major}.{minor}"
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    return archs


def _pip_cuda_includes():
    # CUDA torch builds include headers (cusparse.h, ...) that a minimal toolkit lacks; pip ships them.
    dirs = []
    for site in sys.path:
        dirs += glob.glob(os.path.join(site, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(site, "nvidia", "*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def _write_build_info(with_cuda, archs):
    info = {
        "version": VERSION,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if with_cuda else None,
        "archs": archs if with_cuda else None,
        "cuda_kernels": with_cuda,
    }
    with open(os.path.join(ROOT, "python", "trous", "_build_info.json"), "w") as f:
        json.dump(info, f, indent=1)


def _extension():
    with_cuda = _want_cuda()
    # csrc/<family>/*.cpp (CPU kernels and op files) and csrc/trous/*.cpp (the module); see CONTRIBUTING.md.
    sources = sorted(glob.glob("csrc/*/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc")]
    # -fopenmp: at::parallel_for is inline and runs serially unless the extension itself is built
    # with OpenMP; the libgomp.so.1 it links is the one torch has already loaded.
    cxx = ["-O3", "-std=c++20", "-Wall", "-Wno-unused-function", "-fno-math-errno", "-fopenmp"]
    link = ["-fopenmp"]
    macros = []
    archs = None
    if with_cuda:
        archs = _arch_list()
        sources += sorted(glob.glob("csrc/*/*.cu"))
        include_dirs += _pip_cuda_includes()
        macros.append(("TROUS_WITH_CUDA", None))
        nvcc = [
            "-O3", "-std=c++20", "-lineinfo",
            # Spills and local memory are bugs here; the -v report stays in the build log.
            "-Xptxas=-v,-warn-spills,-warn-lmem-usage",
            "-Werror=all-warnings",
        ]
        ext = cpp_extension.CUDAExtension(
            "trous._C", sources, include_dirs=include_dirs, define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link)
    else:
        ext = cpp_extension.CppExtension(
            "trous._C", sources, include_dirs=include_dirs, define_macros=macros,
            extra_compile_args={"cxx": cxx}, extra_link_args=link)
    _write_build_info(with_cuda, archs)
    return ext


setup(
    name="trous",
    version=VERSION,
    description="Hand-written CPU and CUDA kernels for operators that skip work",
    package_dir={"": "python"},
    packages=find_packages("python"),
    package_data={"trous": ["_build_info.json"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
)
