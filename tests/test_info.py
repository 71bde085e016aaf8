"""`python -m trous.info` runs without a GPU, prints the build's version (with its local label) and the torch
it requires, and lists every KV op with its kernels."""
import json
import subprocess
import sys

import trous
from trous import _version_check

KV_OPS = ["trous::kv_quantize", "trous::kv_dequantize", "trous::kv_quantize_channel",
          "trous::kv_dequantize_channel", "trous::kv_quantize_fp8", "trous::kv_dequantize_fp8"]


def _run(*args):
    p = subprocess.run([sys.executable, "-m", "trous.info", *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def test_info_text_lists_kv_ops():
    out = _run()
    assert "trous 0." in out and "torch" in out and "CUDA available now" in out
    build = _version_check.build_info()
    if build and "label" in build:  # the version line is the wheel's: 0.1.0+torch2.14.1.cu130.sm90
        first = out.splitlines()[0]
        assert first.startswith(f"trous {build['version']}") and build["label"] in first, out
        assert f"requires               {' '.join(build['requires'])}" in out, out
    cuda = bool(trous._C.build_info()["cuda_kernels"])
    for op in KV_OPS:
        line = next((ln for ln in out.splitlines() if ln.split()[:1] == [op]), None)
        assert line is not None, f"{op} missing from:\n{out}"
        cols = line.split()
        assert cols[1] == "yes", line  # CPU
        assert cols[2] == ("yes" if cuda else "-"), line  # CUDA
        assert cols[3] == "yes", line  # fake


def test_info_json_matches_build():
    info = json.loads(_run("--json"))
    binary = trous._C.build_info()
    assert info["binary"]["cuda_kernels"] == binary["cuda_kernels"]
    assert info["build"] is not None and info["build"]["version"].split("+")[0] == trous.__version__
    assert info["version"] == info["build"]["version"] and info["requires"] == info["build"].get("requires")
    if "label" in info["build"]:
        torch_part = "torch" + info["build"]["torch"].split("+")[0]
        assert info["build"]["label"].startswith(torch_part + (".cu" if binary["cuda_kernels"] else ".cpu"))
    for op in KV_OPS:
        k = info["ops"][op]
        assert k["cpu"] and k["fake"]
        assert k["cuda"] == bool(binary["cuda_kernels"])
