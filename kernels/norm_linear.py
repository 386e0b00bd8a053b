"""A matmul on a LayerNorm's output, ``fc(LN(x))``, keeping only ``x`` and the norm's moments.

Unfused, autograd keeps ``x`` for the norm's backward and the normalised copy for the matmul's
weight gradient. Here the copy is recomputed in backward (one pass of the norm kernel), which removes
it: under autocast ``x`` is the fp32 residual stream and the copy bf16, a third of what the pair
keeps. The copy is written in autocast's matmul dtype (what ``fc`` would cast it to), else in the
norm's dtype. ``fc`` is a Linear over the last dim, or a 1x1 conv over an NCHW map
(``channels_first``), read in place in channels_last memory.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import norm_residual as nr
from ._autograd import BackwardOp, ForwardOp, grad_as, or_absent
from ._layout import dense_in_layout
from ._linear import project, project_backward
from .dispatch import dispatcher, resolve
from .dtypes import matmul_input_dtype, norm_dtype


# ----------------------------------------------------------------------------- input checks

def _check(x: Tensor, weight: Tensor, fc_weight: Tensor, channels_first: bool) -> None:
    if channels_first and x.dim() != 4:
        raise ValueError(f"norm_linear: channels_first=True expects an NCHW tensor, got shape {tuple(x.shape)}")
    C = x.shape[1] if channels_first else x.shape[-1]
    want = (fc_weight.shape[0], C, 1, 1) if channels_first else (fc_weight.shape[0], C)
    if tuple(weight.shape) != (C,) or tuple(fc_weight.shape) != want:
        raise ValueError(f"norm_linear: weight must be ({C},) and fc_weight {want}; "
                         f"got {tuple(weight.shape)} and {tuple(fc_weight.shape)}")


# ----------------------------------------------------------------------------- reference

def norm_linear_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float, fc_weight: Tensor,
                    fc_bias: Optional[Tensor] = None, channels_first: bool = False,
                    backend: Optional[str] = None) -> Tensor:
    """Plain PyTorch reference: the LayerNorm over channels, then the Linear / 1x1 conv."""
    n = nr.layer_norm_ref(x, weight, bias, eps, channels_first)
    return F.conv2d(n, fc_weight, fc_bias) if channels_first else F.linear(n, fc_weight, fc_bias)


# ----------------------------------------------------------------------------- launchers

def _normalise(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float, channels_first: bool,
               n_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(LN(x) in ``n_dtype``, mean, rstd) through the residual/norm kernel."""
    _, n, mean, rstd = nr._fwd_impl(x, None, None, None, weight, bias, eps, channels_first, x.dtype, n_dtype)
    return n, mean, rstd


def _fwd_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float, fc_weight: Tensor,
              fc_bias: Optional[Tensor], channels_first: bool, n_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    n, mean, rstd = _normalise(x, weight, bias, eps, channels_first, n_dtype)
    return project(n, fc_weight, fc_bias, channels_first), mean, rstd


def _bwd_impl(dy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float, fc_weight: Tensor,
              mean: Tensor, rstd: Tensor, has_fc_bias: bool, channels_first: bool, n_dtype: torch.dtype
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    n, _, _ = _normalise(x, weight, bias, eps, channels_first, n_dtype)  # recomputed, never saved
    dn, dfw, dfb = project_backward(dy, n, fc_weight, has_fc_bias, channels_first)
    dx, _, _, _, dw, db = nr._bwd_impl(None, dense_in_layout(dn, channels_first), None, None, x, None, None,
                                       weight, bias is not None, mean, rstd, False, x.dtype, x.dtype, channels_first)
    return dx, dw, or_absent(db, x, torch.float32), dfw, dfb


# ----------------------------------------------------------------------------- op registration

def _fwd_fake(x, weight, bias, eps, fc_weight, fc_bias, channels_first, n_dtype):
    C = x.shape[1] if channels_first else x.shape[-1]
    M = x.numel() // C
    if channels_first:
        y = x.new_empty((x.shape[0], fc_weight.shape[0], *x.shape[2:]), dtype=n_dtype)
        y = y.contiguous(memory_format=torch.channels_last)
    else:
        y = x.new_empty((*x.shape[:-1], fc_weight.shape[0]), dtype=n_dtype)
    return y, x.new_empty(M, dtype=torch.float32), x.new_empty(M, dtype=torch.float32)


def _bwd_fake(dy, x, weight, bias, eps, fc_weight, mean, rstd, has_fc_bias, channels_first, n_dtype):
    f32 = torch.float32
    return (torch.empty_like(x), weight.new_empty(weight.shape, dtype=f32),
            weight.new_empty(weight.shape if bias is not None else (0,), dtype=f32),
            fc_weight.new_empty(fc_weight.shape, dtype=f32),
            fc_weight.new_empty(fc_weight.shape[0] if has_fc_bias else 0, dtype=f32))


def _setup(ctx, inputs, output):
    x, weight, bias, eps, fc_weight, fc_bias, channels_first, n_dtype = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.eps, ctx.channels_first, ctx.n_dtype = eps, channels_first, n_dtype
    ctx.save_for_backward(x, weight, bias, fc_weight, fc_bias, mean, rstd)


def _backward(ctx, dy, g_mean, g_rstd):
    x, weight, bias, fc_weight, fc_bias, mean, rstd = ctx.saved_tensors
    dx, dw, db, dfw, dfb = _bwd_op(dy, x, weight, bias, ctx.eps, fc_weight, mean, rstd, fc_bias is not None,
                                   ctx.channels_first, ctx.n_dtype)
    return (dx, dw.to(weight.dtype), grad_as(db, bias), None, dfw.to(fc_weight.dtype), grad_as(dfb, fc_bias),
            None, None)


_bwd_op = BackwardOp("metazoo::norm_linear_bwd", _bwd_impl, _bwd_fake)
_fwd = ForwardOp("metazoo::norm_linear_fwd", _fwd_impl, _fwd_fake, _setup, _backward)


# ----------------------------------------------------------------------------- public dispatcher

@dispatcher(norm_linear_ref)
def norm_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float, fc_weight: Tensor,
                fc_bias: Optional[Tensor] = None, channels_first: bool = False,
                backend: Optional[str] = None) -> Tensor:
    """``fc(LayerNorm_C(x))`` that keeps only ``x`` and the norm's moments for backward."""
    _check(x, weight, fc_weight, channels_first)
    if resolve(backend, x) == "torch":
        return norm_linear_ref(x, weight, bias, eps, fc_weight, fc_bias, channels_first)
    n_dtype = matmul_input_dtype(x) or norm_dtype(x)
    y, _, _ = _fwd(dense_in_layout(x, channels_first), weight, bias, float(eps), fc_weight, fc_bias,
                   bool(channels_first), n_dtype)
    return y
