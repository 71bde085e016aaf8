"""Build of trous._C: CPU kernels always, CUDA kernels whenever nvcc and a CUDA build of torch exist.

TROUS_CUDA=auto|0|1 (default auto). CUDA is never gated on a visible GPU, so GPU-less
builders still produce CUDA objects. TORCH_CUDA_ARCH_LIST is honoured; without it and
without a GPU the default is 8.0 and 9.0 (+PTX of 9.0).

A C++ extension only loads with the exact torch it was compiled against, so the build is always
against the torch already installed (``pip wheel . --no-build-isolation``; torch is deliberately not
in pyproject's build requirements, so that pip's isolated build stops here with a clear message
instead of fetching some other torch). The wheel says what it was built for:

- version ``0.1.0+torch2.14.1.cu130.sm80.sm90ptx`` (``+torch2.14.1.cpu`` without CUDA kernels). A wheel
  built from an sdist keeps the sdist's plain version, as PEP 643 asks (pip rejects the wheel of an
  sdist from an index or --find-links whose version differs); TROUS_LOCAL_VERSION=auto|0|1 (default
  auto: the label unless building from an sdist) overrides that;
- ``Requires-Dist: torch==2.14.1``, and extras (``extras()``) whose pins follow that torch;
- ``trous/_build_info.json`` (read by the import check, trous._version_check, and trous.info).

``python setup.py --requirements EXTRA...`` prints the requirements of the named extras (``build``:
pyproject's build requirements), one a line, for the Makefile; nothing is built.
"""
import ast
import glob
import json
import os
import re
import shutil
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"
DEFAULT_ARCHS = "8.0;9.0+PTX"
# The drop-in peer the DCLS tests compare against (its wheel declares no dependencies).
DCLS_PEER = "dcls==0.1.1"

_BUILDS = {"build", "build_py", "build_ext", "bdist", "bdist_wheel", "bdist_egg", "dist_info", "install", "develop",
           "editable_wheel"}
_ARGS = set(sys.argv[1:])
# An sdist is the sources only: it needs no torch and pins nothing (the wheel built from it does).
SDIST_ONLY = "sdist" in _ARGS and not _ARGS & _BUILDS
# egg_info alone is what the get_requires_for_build_* hooks run: torch is not needed there yet.
EGG_INFO_ONLY = "egg_info" in _ARGS and not _ARGS & (_BUILDS | {"sdist"})

REBUILD_HELP = (
    "trous is built against the torch already installed: install the torch you will run with, then\n"
    "    pip install --no-build-isolation .            (a source checkout or an unpacked sdist)\n"
    "    pip install --no-build-isolation trous-{v}.tar.gz\n"
    "    make wheel                                    (TORCH_CUDA_ARCH_LIST=\"9.0\" for one GPU)"
).format(v=VERSION)


def _isolated():
    """True inside a PEP 517 isolated build environment (pip's pip-build-env-*, build's build-env-*)."""
    return any(re.search(r"(pip-build-env|build-env-)", p or "") for p in sys.path + [sys.prefix])


def _import_torch():
    try:
        import torch
    except ImportError as e:
        if _isolated():
            sys.exit("trous: pip is building in an isolated environment, which has no torch; it would have\n"
                     "to fetch one, and the extension only loads with the exact torch it was built against.\n"
                     "Build with --no-build-isolation instead.\n" + REBUILD_HELP)
        sys.exit(f"trous: torch is not installed ({e}).\n" + REBUILD_HELP)
    if re.search(r"(pip-build-env|build-env-)", torch.__file__):
        sys.exit(f"trous: the build would use torch {torch.__version__} from an isolated build environment\n"
                 f"({os.path.dirname(torch.__file__)}), not the one you run with.\n" + REBUILD_HELP)
    return torch


def public_version(version):
    """'2.14.1+cu130' -> '2.14.1'."""
    return str(version).split("+", 1)[0]


def _arch_tag(arch):
    """'9.0' -> 'sm90', '9.0+PTX' -> 'sm90ptx', '9.0a' -> 'sm90a', 'Hopper' -> 'hopper'."""
    arch = arch.strip().lower()
    ptx = arch.endswith("+ptx")
    arch = arch[: -len("+ptx")] if ptx else arch
    tag = "sm" + arch.replace(".", "") if re.match(r"^\d+\.\d+[a-z]?$", arch) else arch
    return re.sub(r"[^a-z0-9]", "", tag + ("ptx" if ptx else ""))


def local_label(torch_version, cuda, archs):
    """The PEP 440 local label of a build: 'torch2.14.1.cu130.sm90', or 'torch2.14.1.cpu' without CUDA."""
    parts = ["torch" + public_version(torch_version)]
    if cuda:
        parts.append("cu" + cuda.replace(".", ""))
        parts += [_arch_tag(a) for a in re.split(r"[;,\s]+", archs or "") if a.strip()]
    else:
        parts.append("cpu")
    return ".".join(parts)


def torchvision_requirement(torch_version):
    """The torchvision released with a torch: 0.(m+15).p with 2.m.p (0.29.1 with 2.14.1, 0.28.0 with 2.13.0)."""
    m = re.match(r"^2\.(\d+)\.(\d+)$", public_version(torch_version))
    return f"torchvision==0.{int(m.group(1)) + 15}.{m.group(2)}" if m else "torchvision"


def extras(torch_version=None):
    """The optional dependencies; ``pip install 'trous[hf]'`` etc. The Makefile installs them too."""
    bench = ["matplotlib", "tqdm", "numpy"]
    return {
        "hf": ["transformers"],
        "timm": ["timm", torchvision_requirement(torch_version) if torch_version else "torchvision"],
        "bench": bench,
        "test": ["pytest", "hypothesis", *bench, DCLS_PEER],
    }


def build_requirements():
    """pyproject.toml's [build-system] requires (no TOML parser needed: it is one literal list)."""
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        m = re.search(r"^requires\s*=\s*(\[[^\]]*\])", f.read(), re.M)
    return ast.literal_eval(m.group(1))


def _print_requirements(names):
    torch_version = None
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        pass
    table = extras(torch_version)
    for name in names:
        if name != "build" and name not in table:
            sys.exit(f"unknown extra {name!r}: build, {', '.join(table)}")
        for req in build_requirements() if name == "build" else table[name]:
            print(req)


def _cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and os.path.exists("/usr/local/cuda/bin/nvcc"):
        home = "/usr/local/cuda"  # nvcc on PATH may be a wrapper from which torch guesses /usr/local
    if not home and shutil.which("nvcc"):
        home = os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc"))))
    return home


def _want_cuda(torch, cpp_extension):
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


def _arch_list(torch):
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


def _extension(torch, with_cuda, archs):
    from torch.utils import cpp_extension

    # csrc/<family>/*.cpp (CPU kernels and op files) and csrc/trous/*.cpp (the module); see CONTRIBUTING.md.
    sources = sorted(glob.glob("csrc/*/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc")]
    # -fopenmp: at::parallel_for is inline and runs serially unless the extension itself is built
    # with OpenMP; the libgomp.so.1 it links is the one torch has already loaded.
    # TROUS_CXX_OPT: the host compiler's optimisation level (default -O3); gpu_check's CPU dry run
    # builds with -O1 to fit its build share on a 2-core machine (it checks the stages, not speed).
    opt = os.environ.get("TROUS_CXX_OPT", "-O3")
    if opt not in ("-O0", "-O1", "-O2", "-O3"):
        sys.exit(f"trous: TROUS_CXX_OPT must be -O0, -O1, -O2 or -O3, got {opt!r}")
    cxx = [opt, "-std=c++20", "-Wall", "-Wno-unused-function", "-fno-math-errno", "-fopenmp"]
    link = ["-fopenmp"]
    macros = []
    if with_cuda:
        sources += sorted(glob.glob("csrc/*/*.cu"))
        include_dirs += _pip_cuda_includes()
        macros.append(("TROUS_WITH_CUDA", None))
        nvcc = [
            "-O3", "-std=c++20", "-lineinfo",
            # Spills and local memory are bugs here; the -v report stays in the build log.
            "-Xptxas=-v,-warn-spills,-warn-lmem-usage",
            "-Werror=all-warnings",
        ]
        return cpp_extension.CUDAExtension(
            "trous._C", sources, include_dirs=include_dirs, define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link)
    return cpp_extension.CppExtension(
        "trous._C", sources, include_dirs=include_dirs, define_macros=macros,
        extra_compile_args={"cxx": cxx}, extra_link_args=link)


def _labelled():
    """Whether the version carries the build's local label (see the module doc, TROUS_LOCAL_VERSION)."""
    mode = os.environ.get("TROUS_LOCAL_VERSION", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"TROUS_LOCAL_VERSION must be auto, 0 or 1, got {mode!r}")
    if mode == "auto":
        return not os.path.exists(os.path.join(ROOT, "PKG-INFO"))  # an unpacked sdist has one
    return mode == "1"


def _build_info(torch, with_cuda, archs):
    cuda = torch.version.cuda if with_cuda else None
    label = local_label(torch.__version__, cuda, archs)
    return {
        "version": f"{VERSION}+{label}" if _labelled() else VERSION,
        "label": label,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,  # the CUDA of the torch built against, even for a CPU-only build
        "cuda": cuda,
        "archs": archs if with_cuda else None,
        "cuda_kernels": with_cuda,
        "requires": [f"torch=={public_version(torch.__version__)}"],
    }


def _write_build_info(info, package_dir):
    os.makedirs(package_dir, exist_ok=True)
    with open(os.path.join(package_dir, "_build_info.json"), "w") as f:
        json.dump(info, f, indent=1)


def _config():
    """setup() arguments: the sources only for an sdist; the extension, exact pins and build info otherwise."""
    sources_only = {"version": VERSION, "install_requires": ["torch"], "extras_require": extras()}
    if SDIST_ONLY:
        return sources_only
    if EGG_INFO_ONLY:
        try:
            import torch  # noqa: F401
        except ImportError:
            return sources_only  # an isolated build stops at the next hook, in _import_torch
    torch = _import_torch()
    from torch.utils import cpp_extension

    with_cuda = _want_cuda(torch, cpp_extension)
    archs = _arch_list(torch) if with_cuda else None
    info = _build_info(torch, with_cuda, archs)

    from setuptools.command.build_py import build_py

    class BuildPy(build_py):
        """Writes trous/_build_info.json next to the built package (a wheel's), never into the sources."""

        def run(self):
            super().run()
            _write_build_info(info, os.path.join(self.build_lib, "trous"))

    class BuildExt(cpp_extension.BuildExtension):
        """An in-place build (make build) records its build info in the source tree."""

        def run(self):
            super().run()
            if self.inplace:
                _write_build_info(info, os.path.join(ROOT, "python", "trous"))

    return {
        "version": info["version"],
        "install_requires": info["requires"],
        "extras_require": extras(torch.__version__),
        "ext_modules": [_extension(torch, with_cuda, archs)],
        "cmdclass": {"build_py": BuildPy, "build_ext": BuildExt.with_options(use_ninja=True)},
    }


def main():
    from setuptools import find_packages, setup

    setup(package_dir={"": "python"}, packages=find_packages("python"), **_config())


if sys.argv[1:2] == ["--requirements"]:  # stdlib only: works before setuptools or torch is installed
    _print_requirements(sys.argv[2:])
else:
    main()
