"""The output projection of the fused ops that recompute their input in backward (``act_linear``,
``gated_dwconv_linear``, ``norm_linear``): run as autocast runs it, in the activation's dtype with copies of the
fp32 parameters in that dtype, as a Linear over the last dim or a 1x1 conv over NCHW in either
memory format. Autocast is switched off inside, so the result does not depend on its state."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._autograd import or_absent


def project(a: Tensor, weight: Tensor, bias: Optional[Tensor], channels_first: bool = False) -> Tensor:
    """``linear(a)`` (weight ``(out, in)``) or, with ``channels_first``, ``conv1x1(a)`` (``(out, in, 1, 1)``)."""
    w = weight.to(a.dtype)
    b = bias.to(a.dtype) if bias is not None else None
    with torch.autocast(a.device.type, enabled=False):
        return F.conv2d(a, w, b) if channels_first else F.linear(a, w, b)


def project_fake(a: Tensor, out_channels: int, channels_first: bool = False,
                 dtype: Optional[torch.dtype] = None) -> Tensor:
    """An empty tensor shaped, laid out and typed as :func:`project`'s result on ``a`` (fake impls): a 1x1
    conv's output is channels_last where its input is channels_last and not also contiguous."""
    dtype = dtype or a.dtype
    if channels_first:
        fmt = torch.channels_last if a.is_contiguous(memory_format=torch.channels_last) and not a.is_contiguous() \
            else torch.contiguous_format
        return a.new_empty((a.shape[0], out_channels, *a.shape[2:]), dtype=dtype).contiguous(memory_format=fmt)
    return a.new_empty((*a.shape[:-1], out_channels), dtype=dtype)


def project_backward(dy: Tensor, a: Tensor, weight: Tensor, has_bias: bool, channels_first: bool = False
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`project`: ``(da, dweight, dbias)``; the parameter grads in fp32 with standard
    strides (as the custom ops' fake implementations say), ``dbias`` absent without a bias."""
    f32 = torch.float32
    w = weight.to(a.dtype)
    with torch.autocast(a.device.type, enabled=False):
        dy = dy.to(a.dtype)
        if channels_first:
            da, dw, db = torch.ops.aten.convolution_backward(
                dy, a, w, [w.shape[0]] if has_bias else None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                [True, True, has_bias])
            dw = dw.to(f32, memory_format=torch.contiguous_format)
            db = db.to(f32) if has_bias else None
        else:
            dy_rows = dy.reshape(-1, w.shape[0])
            dw = (dy_rows.t() @ a.reshape(-1, w.shape[1])).to(f32)
            db = dy_rows.sum(0, dtype=f32) if has_bias else None
            da = (dy_rows @ w).reshape(a.shape)
    return da, dw, or_absent(db, dy, f32)
