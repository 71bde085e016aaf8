"""Partial convolutions. Channel-partial (FasterNet PConv): ``channel_partial_conv2d``, ``PConv2d``,
``convert_fasternet``; PConv + pointwise 1x1 without the PConv output: ``pconv_pointwise``;
PATNet blocks ``PATChannel``, ``PATSpatial``, ``PATSelf`` (``patnet``). Mask-aware (inpainting,
NVIDIA's layer; ATen convolution + one fused epilogue): ``masked_partial_conv2d/3d``,
``PartialConv2d/3d`` (``masked``); the PConv-UNet of Liu et al. 2018 at reduced width: ``PConvUNet`` (``unet``).

``channel_partial`` holds the function and the op's autograd, ``modules`` the nn.Modules,
``reference`` the slow reference written from the spec, ``bench`` and ``smoke`` the cases of
``python -m trous.bench --family pconv`` / ``trous.smoke``.
"""
from .channel_partial import channel_partial_conv2d
from .masked import PartialConv2d, PartialConv3d, masked_partial_conv2d, masked_partial_conv3d
from .modules import PConv2d, convert_fasternet
from .patnet import PATChannel, PATSelf, PATSpatial
from .pointwise import pconv_pointwise
from .unet import PConvUNet

# The layers and the converter, as trous.nn.PConv2d, trous.nn.convert_fasternet, ... (and trous.PConv2d).
NN = ("PConv2d", "convert_fasternet", "PATChannel", "PATSpatial", "PATSelf", "PartialConv2d", "PartialConv3d",
      "PConvUNet")
TOP_LEVEL = NN

__all__ = ["channel_partial_conv2d", "pconv_pointwise", "PConv2d", "convert_fasternet", "PATChannel", "PATSpatial",
           "PATSelf", "masked_partial_conv2d", "masked_partial_conv3d", "PartialConv2d", "PartialConv3d", "PConvUNet"]
