"""Graph capture of the DCLS modules (issue 9): torch.jit.script raises one clear error pointing to
torch.compile / torch.export; torch.jit.trace works (its sanity check reruns the module under
no_grad: "auto" constructs while tracing so the graph does not depend on grad mode); torch.compile
(fullgraph, dynamic) and torch.export run every module class and match eager."""
import os

import pytest
import torch
import torch.nn as nn

import trous

BACKEND = os.environ.get("TROUS_TEST_COMPILE_BACKEND", "aot_eager")

CASES = {
    "Dcls1d": (lambda: trous.Dcls1d(4, 6, 3, dilated_kernel_size=5, padding=2, groups=2), (2, 4, 11)),
    "Dcls1d-depthwise": (lambda: trous.Dcls1d(4, 4, 3, dilated_kernel_size=5, padding=2, groups=4), (2, 4, 11)),
    "Dcls2d": (lambda: trous.Dcls2d(4, 4, 3, dilated_kernel_size=5, padding=2, groups=4), (2, 4, 9, 7)),
    "Dcls3d": (lambda: trous.Dcls3d(2, 4, 2, dilated_kernel_size=3, padding=1, version="v1"), (1, 2, 5, 6, 5)),
    "Dcls3_1d": (lambda: trous.Dcls3_1d(2, 2, 2, dense_kernel_size=3, dilated_kernel_size=5, padding=(1, 1, 2)),
                 (1, 2, 5, 5, 7)),
    "Dcls2dK1d": (lambda: trous.Dcls2dK1d(4, 4, 3, dilated_kernel_size=5, padding=(2, 0), groups=4), (2, 4, 9, 7)),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # each test compiles new layers: no recompile limit across tests
    yield
    torch._dynamo.reset()


def _case(name, strategy="auto"):
    make, shape = CASES[name]
    torch.manual_seed(0)
    layer = make()
    layer.strategy = strategy
    return layer, torch.randn(shape)


@pytest.mark.parametrize("name", ["Dcls2d", "Dcls1d", "Dcls3_1d", "Dcls2dK1d"])
def test_jit_script_raises_one_clear_error(name):
    layer, _ = _case(name)
    for target in (layer, nn.Sequential(nn.Identity(), layer), layer.DCK):
        with pytest.raises(RuntimeError, match=r"torch.jit.script does not support trous's DCLS modules "
                                               r"\(\w+\).*torch.compile\(model\).*torch.export.export"):
            torch.jit.script(target)


@pytest.mark.parametrize("strategy", ["auto", "construct", "direct"])
@pytest.mark.parametrize("name", ["Dcls2d", "Dcls1d", "Dcls1d-depthwise"])
def test_jit_trace_works_and_matches_eager(name, strategy):
    layer, x = _case(name, strategy)
    traced = torch.jit.trace(layer, (x,))  # check_trace=True: reruns under no_grad, compares graphs
    torch.testing.assert_close(traced(x), layer(x), rtol=1e-5, atol=1e-6)
    x2 = torch.randn(x.shape)
    torch.testing.assert_close(traced(x2), layer(x2), rtol=1e-5, atol=1e-6)
    traced(x).sum().backward()  # gradients flow through the traced graph
    assert layer.P.grad is not None and layer.P.grad.abs().sum() > 0


def test_jit_trace_of_auto_takes_the_construct_route():
    layer, x = _case("Dcls2d")
    assert layer.route(x) == "direct"  # eager training: direct
    graph = str(torch.jit.trace(layer, (x,)).inlined_graph)
    assert "trous::dcls_construct_kernel" in graph and "trous::dcls_conv" not in graph
    layer.strategy = "direct"
    graph = str(torch.jit.trace(layer, (x,)).inlined_graph)
    assert "trous::dcls_conv" in graph


def _ops_in_graph(fn, *args, **compile_kw):
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    out = torch.compile(fn, backend=backend, **compile_kw)(*args)
    return out, seen


COMPILED = [(n, s) for n in CASES for s in ("auto", "construct", "direct")
            if s != "direct" or n in ("Dcls1d", "Dcls1d-depthwise", "Dcls2d")]  # those with a direct route


@pytest.mark.parametrize("name,strategy", COMPILED, ids=[f"{n}-{s}" for n, s in COMPILED])
def test_torch_compile_fullgraph_dynamic_matches_eager(name, strategy):
    layer, x = _case(name, strategy)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend=BACKEND)
    want = layer(x)
    torch.testing.assert_close(compiled(x), want, rtol=1e-5, atol=1e-6)
    x2 = torch.randn(x.shape[0] + 1, *x.shape[1:-1], x.shape[-1] + 2)  # another shape, same graph
    torch.testing.assert_close(compiled(x2), layer(x2), rtol=1e-5, atol=1e-6)
    compiled(x).sum().backward()
    assert layer.P.grad is not None and torch.isfinite(layer.P.grad).all()


def test_torch_compile_auto_constructs_and_direct_stays_direct():
    layer, x = _case("Dcls2d")
    _, ops = _ops_in_graph(layer, x, fullgraph=True)
    assert any("dcls_construct_kernel" in o for o in ops) and not any("dcls_conv" in o for o in ops), ops
    layer.strategy = "direct"
    _, ops = _ops_in_graph(layer, x, fullgraph=True)
    assert any("dcls_conv" in o for o in ops), ops


@pytest.mark.parametrize("name", list(CASES))
def test_torch_export_runs_and_matches_eager(name):
    layer, x = _case(name)
    ep = torch.export.export(layer, (x,))
    torch.testing.assert_close(ep.module()(x), layer(x), rtol=1e-5, atol=1e-6)
    assert any("dcls_construct_kernel" in str(n.target) for n in ep.graph.nodes)


def test_torch_export_dynamic_batch():
    layer, x = _case("Dcls2d")
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(layer, (x,), dynamic_shapes=({0: batch},))
    x5 = torch.randn(5, *x.shape[1:])
    torch.testing.assert_close(ep.module()(x5), layer(x5), rtol=1e-5, atol=1e-6)
