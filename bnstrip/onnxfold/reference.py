"""float64 kernels for onnx's reference evaluator where its own are wrong or slow (onnx 1.23).

Its BatchNormalization-9 (no training_mode attribute: opsets 9-13) applies the momentum
update to the statistics even in inference, its BatchNormalization-7 path ignores nothing
better, and its grouped ConvTranspose fails to reshape the weight; its Conv is a slow
im2col. These replacements compute in float64 with torch's kernels (inference semantics,
which is what ONNX runtimes do for these nodes), and defer to onnx's own code for the
attribute combinations they do not cover (auto_pad, output_shape).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from onnx.reference.op_run import OpRun
from onnx.reference.ops.op_conv import Conv as _OnnxConv
from onnx.reference.ops.op_conv_transpose import ConvTranspose as _OnnxConvTranspose


def _t(array: Any) -> Any:
    import torch

    return torch.from_numpy(np.array(array, dtype=np.float64))  # a writable copy


def _plain_pads(pads: Any, dims: int) -> list[int] | None:
    """Symmetric pads as torch wants them, or None when begin != end."""
    pads = list(pads) if pads is not None else [0] * (2 * dims)
    begin, end = pads[:dims], pads[dims:]
    return begin if begin == end else None


class Conv(OpRun):
    op_domain = ""

    def _run(self, X, W, B=None, auto_pad=None, dilations=None, group=None, kernel_shape=None, pads=None,
             strides=None):
        import torch.nn.functional as F

        dims = X.ndim - 2
        padding = _plain_pads(pads, dims)
        if X.dtype != np.float64 or auto_pad not in (None, "NOTSET", b"NOTSET", "VALID", b"VALID") \
                or padding is None or dims not in (1, 2, 3):
            return _OnnxConv._run(self, X, W, B, auto_pad, dilations, group, kernel_shape, pads, strides)
        conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
        out = conv(_t(X), _t(W), None if B is None else _t(B), stride=list(strides or [1] * dims), padding=padding,
                   dilation=list(dilations or [1] * dims), groups=int(group or 1))
        return (out.numpy(),)


class ConvTranspose(OpRun):
    op_domain = ""

    def _run(self, X, W, B=None, auto_pad=None, dilations=None, group=None, kernel_shape=None,
             output_padding=None, output_shape=None, pads=None, strides=None):
        import torch.nn.functional as F

        dims = X.ndim - 2
        padding = _plain_pads(pads, dims)
        if X.dtype != np.float64 or output_shape is not None or auto_pad not in (None, "NOTSET", b"NOTSET") \
                or padding is None or dims not in (1, 2, 3):
            return _OnnxConvTranspose._run(self, X, W, B, auto_pad, dilations, group, kernel_shape, output_padding,
                                           output_shape, pads, strides)
        conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
        out = conv(_t(X), _t(W), None if B is None else _t(B), stride=list(strides or [1] * dims), padding=padding,
                   output_padding=list(output_padding or [0] * dims), groups=int(group or 1),
                   dilation=list(dilations or [1] * dims))
        return (out.numpy(),)


class BatchNormalization(OpRun):
    """Inference BatchNormalization of every opset (bnstrip refuses training_mode=1 before any check)."""

    op_domain = ""

    def _run(self, x, scale, bias, mean, var, epsilon=None, momentum=None, training_mode=None, spatial=None,
             is_test=None, consumed_inputs=None):
        shape = (1, -1) + (1,) * (x.ndim - 2)
        eps = 1e-5 if epsilon is None else epsilon
        wide = np.float64
        y = (x.astype(wide) - mean.astype(wide).reshape(shape)) / np.sqrt(var.astype(wide).reshape(shape) + eps)
        y = y * scale.astype(wide).reshape(shape) + bias.astype(wide).reshape(shape)
        return (y.astype(x.dtype),)


NEW_OPS = [Conv, ConvTranspose, BatchNormalization]
