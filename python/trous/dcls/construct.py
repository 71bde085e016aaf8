"""Fake kernels and autograd of the DCLS kernel-construction ops (schemas in csrc/dcls/construct_ops.cpp).

``torch.ops.trous.dcls_construct_kernel(weight, P, SIG, dilated_kernel_size, version)`` returns
dcls 0.1.1's dense kernel [O, I/g, *dilated_kernel_size]; its backward op gives the gradients of
weight, P and SIG in one pass. Autograd saves only weight, P and SIG (no kernel-sized tensor).

Non-finite parameters (csrc/dcls/params.h): an element with a non-finite weight, a NaN P (NaN SIG
for max / gauss), or an infinite P / SIG where dcls's formula is NaN (v0: infinite P; max: infinite
SIG; gauss: infinite P and SIG on one axis) makes its channel's kernel NaN throughout (dcls gives
NaN there too, or +-inf on the support of an infinite weight). Any other infinite P moves the
element out of the window (it contributes 0, as in dcls); an infinite gauss SIG spreads it evenly.
"""
import torch

_ops = torch.ops.trous


# No register_fake: the op's C++ validation is also its Meta kernel (csrc/dcls/construct_ops.cpp),
# so FakeTensorMode refuses exactly what the real kernel refuses.


def _setup_context(ctx, inputs, output):
    weight, P, SIG, dilated_kernel_size, version = inputs
    ctx.save_for_backward(weight, P, SIG)
    ctx.dilated_kernel_size = dilated_kernel_size
    ctx.version = version


def _backward(ctx, grad_K):
    weight, P, SIG = ctx.saved_tensors
    g_w, g_P, g_SIG = _ops.dcls_construct_kernel_backward(grad_K, weight, P, SIG, ctx.dilated_kernel_size,
                                                          ctx.version)
    return g_w, g_P, (g_SIG if SIG is not None else None), None, None


torch.library.register_autograd("trous::dcls_construct_kernel", _backward, setup_context=_setup_context)
