"""``python -m trous.info``: what this trous build holds and what the running machine offers.

Prints the trous version (with its build's local label, ``0.1.0+torch2.14.1.cu130.sm90``, as in the wheel's
name), the torch it requires, the torch / CUDA versions and CUDA archs it was built with (the package's
``_build_info.json``, written by setup.py, and the binary's own ``trous._C.build_info()``), whether
CUDA is available now, and for every op registered under ``torch.ops.trous`` whether it has a CPU
kernel, a CUDA kernel, a fake (Meta) kernel for torch.compile / export, and an autograd kernel.
Works without a GPU. ``--json`` prints the same as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List, Optional

import torch

from trous import _version_check

NAMESPACE = "trous"


def _load_build_json() -> Optional[Dict[str, Any]]:
    return _version_check.build_info()


def op_names(namespace: str = NAMESPACE) -> List[str]:
    """Every operator registered under ``namespace::`` (qualified names, overloads folded)."""
    names = set()
    for full in torch._C._dispatch_get_all_op_names():
        if full.startswith(namespace + "::"):
            names.add(full.split(".", 1)[0])  # "trous::op.overload" -> "trous::op"
    return sorted(names)


def _has(name: str, key: str) -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(name, key))
    except RuntimeError:
        return False


def _has_python_fake(name: str) -> bool:
    try:
        from torch._library import simple_registry

        return simple_registry.singleton.find(name).fake_impl.kernel is not None
    except Exception:
        return False


def op_kernels(name: str) -> Dict[str, bool]:
    composite = _has(name, "CompositeImplicitAutograd")
    return {
        "cpu": _has(name, "CPU") or _has(name, "CompositeExplicitAutograd") or composite,
        "cuda": _has(name, "CUDA") or _has(name, "CompositeExplicitAutograd") or composite,
        # register_fake puts a Meta kernel in the dispatcher; a C++ Meta kernel counts too.
        "fake": _has(name, "Meta") or _has_python_fake(name) or composite,
        "autograd": _has(name, "Autograd") or _has(name, "AutogradCPU") or composite,
    }


def collect() -> Dict[str, Any]:
    """Everything ``python -m trous.info`` prints, as a dict."""
    info: Dict[str, Any] = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "devices": [],
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["devices"].append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}"})
    info["build"] = _load_build_json()
    try:
        import trous

        # The build's full version (the wheel's: 0.1.0+torch2.14.1.cu130.sm90); the package's without one.
        info["version"] = (info["build"] or {}).get("version") or getattr(trous, "__version__", None)
        info["binary"] = dict(trous._C.build_info())
        info["import_error"] = None
    except Exception as e:  # still report what can be known without the extension
        info["version"] = None
        info["binary"] = None
        info["import_error"] = f"{type(e).__name__}: {e}"
    info["requires"] = (info["build"] or {}).get("requires")
    info["ops"] = {name: op_kernels(name) for name in op_names()}
    info["warnings"] = _warnings(info)
    return info


def _warnings(info: Dict[str, Any]) -> List[str]:
    out = []
    build, binary = info.get("build") or {}, info.get("binary") or {}
    built_torch = binary.get("torch_version_at_build") or build.get("torch")
    why = _version_check.mismatch({**build, "torch": built_torch}, info["torch"], info["torch_cuda"])
    if why:
        out.append(f"built against {why}: rebuild the extension")
    if build and binary and bool(build.get("cuda_kernels")) != bool(binary.get("cuda_kernels")):
        out.append("_build_info.json and the binary disagree about CUDA kernels (stale _build_info.json?)")
    if binary.get("cuda_kernels") and info["devices"]:
        archs = str(build.get("archs") or "")
        listed = {a.replace("+PTX", "").strip() for a in archs.replace(",", ";").replace(" ", ";").split(";") if a}
        ptx = "+PTX" in archs
        for d in info["devices"]:
            cap = d["capability"]
            if listed and cap not in listed and not ptx:
                out.append(f"GPU {d['index']} ({d['name']}) is sm_{cap.replace('.', '')}, not among the built "
                           f"archs {archs}: the CUDA kernels will not load on it")
    if info["cuda_available"] and not binary.get("cuda_kernels") and binary:
        out.append("a GPU is available but this build has no CUDA kernels (built without nvcc or TROUS_CUDA=0)")
    return out


def _yn(v: bool) -> str:
    return "yes" if v else "-"


def format_info(info: Dict[str, Any]) -> str:
    build = info.get("build") or {}
    binary = info.get("binary") or {}
    version = str(info.get("version") or build.get("version") or "?")
    if "+" not in version and build.get("label"):  # a wheel built from an sdist keeps its plain version
        version += f" (build {build['label']})"
    lines = [
        f"trous {version}",
        f"  requires               {' '.join(info.get('requires') or []) or '?'}",
        f"  torch (running)        {info['torch']} (CUDA {info['torch_cuda'] or 'none'})",
        f"  torch (built against)  {binary.get('torch_version_at_build') or build.get('torch') or '?'}",
        f"  CUDA (built with)      {build.get('cuda') or 'none'}",
        f"  CUDA archs compiled    {build.get('archs') or 'none'}",
        f"  CUDA kernels in binary {binary.get('cuda_kernels') if binary else '?'}",
        f"  CUDA available now     {info['cuda_available']}"
        + "".join(f"\n    cuda:{d['index']} {d['name']} (sm_{d['capability'].replace('.', '')})"
                  for d in info["devices"]),
    ]
    if not build:
        lines.append("  (no _build_info.json next to the package: built by something other than setup.py?)")
    if info.get("import_error"):
        lines.append(f"  import trous failed: {info['import_error']}")
    ops = info["ops"]
    lines.append("")
    lines.append(f"ops under torch.ops.{NAMESPACE} ({len(ops)}):")
    width = max([len("op")] + [len(n) for n in ops])
    lines.append(f"  {'op'.ljust(width)}  CPU  CUDA  fake  autograd")
    for name, k in ops.items():
        lines.append(f"  {name.ljust(width)}  {_yn(k['cpu']).ljust(3)}  {_yn(k['cuda']).ljust(4)}  "
                     f"{_yn(k['fake']).ljust(4)}  {_yn(k['autograd'])}")
    for w in info["warnings"]:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trous.info", description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=1) if args.json else format_info(info))
    return 1 if info.get("import_error") else 0


if __name__ == "__main__":
    sys.exit(main())
