"""Fake kernels and autograd of the DCLS kernel-construction ops (schemas in csrc/dcls/construct_ops.cpp).

``torch.ops.trous.dcls_construct_kernel(weight, P, SIG, dilated_kernel_size, version)`` returns
dcls 0.1.1's dense kernel [O, I/g, *dilated_kernel_size]; its backward op gives the gradients of
weight, P and SIG in one pass. Autograd saves only weight, P and SIG (no kernel-sized tensor).
"""
import torch

_ops = torch.ops.trous


@torch.library.register_fake("trous::dcls_construct_kernel")
def _(weight, P, SIG, dilated_kernel_size, version):
    return weight.new_empty((weight.shape[0], weight.shape[1], *dilated_kernel_size))


@torch.library.register_fake("trous::dcls_construct_kernel_backward")
def _(grad_K, weight, P, SIG, dilated_kernel_size, version):
    g_sig = torch.empty_like(SIG) if SIG is not None else weight.new_empty((0,))
    return torch.empty_like(weight), torch.empty_like(P), g_sig


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
