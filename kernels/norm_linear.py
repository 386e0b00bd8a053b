"""A matmul on a norm's output, ``fc(norm(x))``, keeping only ``x`` and the norm's moments.

Unfused, autograd keeps ``x`` for the norm's backward and the normalised copy for the matmul's
weight gradient. Here the copy is recomputed in backward (one pass of the norm kernel), which removes
it: under autocast ``x`` is the fp32 residual stream and the copy bf16, a third of what the pair
keeps. The copy is written in autocast's matmul dtype (what ``fc`` would cast it to), else in the
norm's dtype. The norm is a LayerNorm over channels (``norm="layer"``) or PoolFormer's one-group
GroupNorm (``norm="group1"``, NCHW; ``moments`` of ``x`` skip its statistics pass). ``fc`` is a
Linear over the last dim, or a 1x1 conv over an NCHW map (``channels_first``), read in place in
channels_last memory.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import group_norm as gn
from . import norm_residual as nr
from ._autograd import BackwardOp, ForwardOp, absent, grad_as, or_absent
from ._layout import dense_in_layout
from ._linear import project, project_backward, project_fake
from .dispatch import dispatcher, resolve
from .dtypes import matmul_input_dtype, norm_dtype


# ----------------------------------------------------------------------------- input checks

NORMS = ("layer", "group1")


def _check(x: Tensor, weight: Tensor, fc_weight: Tensor, channels_first: bool, norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm_linear: norm={norm!r} is not supported; accepted values: {NORMS}")
    if norm == "group1" and not channels_first:
        raise ValueError("norm_linear: norm='group1' normalises NCHW maps; it needs channels_first=True")
    if channels_first and x.dim() != 4:
        raise ValueError(f"norm_linear: channels_first=True expects an NCHW tensor, got shape {tuple(x.shape)}")
    C = x.shape[1] if channels_first else x.shape[-1]
    want = (fc_weight.shape[0], C, 1, 1) if channels_first else (fc_weight.shape[0], C)
    if tuple(weight.shape) != (C,) or tuple(fc_weight.shape) != want:
        raise ValueError(f"norm_linear: weight must be ({C},) and fc_weight {want}; "
                         f"got {tuple(weight.shape)} and {tuple(fc_weight.shape)}")


# ----------------------------------------------------------------------------- reference

def norm_linear_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float, fc_weight: Tensor,
                    fc_bias: Optional[Tensor] = None, channels_first: bool = False, norm: str = "layer",
                    moments: Optional[tuple[Tensor, Tensor]] = None, backend: Optional[str] = None) -> Tensor:
    """Plain PyTorch reference: the norm (``moments`` only a hint, unused), then the Linear / 1x1 conv."""
    if norm == "group1":
        n = gn.group_norm1_ref(x, weight, bias, eps)
    else:
        n = nr.layer_norm_ref(x, weight, bias, eps, channels_first)
    return F.conv2d(n, fc_weight, fc_bias) if channels_first else F.linear(n, fc_weight, fc_bias)


# ----------------------------------------------------------------------------- launchers

def _normalise(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float, channels_first: bool, norm: str,
               n_dtype: torch.dtype, mean: Optional[Tensor] = None, var: Optional[Tensor] = None
               ) -> tuple[Tensor, Tensor, Tensor]:
    """(norm(x) in ``n_dtype``, mean, rstd) through the norm's kernel (the group norm skips its
    statistics pass given ``mean`` and ``var``)."""
    if norm == "group1":
        return gn._fwd_impl(x, weight, bias, eps, mean, var, n_dtype)
    _, n, mean, rstd = nr._fwd_impl(x, None, None, None, weight, bias, eps, channels_first, x.dtype, n_dtype)
    return n, mean, rstd


def _fwd_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float, fc_weight: Tensor,
              fc_bias: Optional[Tensor], channels_first: bool, norm: str, n_dtype: torch.dtype,
              mean: Optional[Tensor] = None, var: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    n, mean, rstd = _normalise(x, weight, bias, eps, channels_first, norm, n_dtype, mean, var)
    return project(n, fc_weight, fc_bias, channels_first), mean, rstd


def _bwd_impl(dy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float, fc_weight: Tensor,
              mean: Tensor, rstd: Tensor, has_fc_bias: bool, channels_first: bool, norm: str, n_dtype: torch.dtype
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if norm == "group1":  # recomputed from the saved moments, never saved
        n = gn.normalise(x, mean, rstd, weight, bias, n_dtype)
    else:
        n, _, _ = _normalise(x, weight, bias, eps, channels_first, norm, n_dtype)
    dn, dfw, dfb = project_backward(dy, n, fc_weight, has_fc_bias, channels_first)
    dn = dense_in_layout(dn, channels_first)
    if norm == "group1":
        dx, dw, db = gn._bwd_impl(dn, x, weight, mean, rstd)
        return dx, dw, db if bias is not None else absent(x, torch.float32), dfw, dfb
    dx, _, _, _, dw, db = nr._bwd_impl(None, dn, None, None, x, None, None, weight, bias is not None, mean, rstd,
                                       False, x.dtype, x.dtype, channels_first)
    return dx, dw, or_absent(db, x, torch.float32), dfw, dfb


# ----------------------------------------------------------------------------- op registration

def _fwd_fake(x, weight, bias, eps, fc_weight, fc_bias, channels_first, norm, n_dtype, mean=None, var=None):
    C = x.shape[1] if channels_first else x.shape[-1]
    M = x.shape[0] if norm == "group1" else x.numel() // C
    y = project_fake(x, fc_weight.shape[0], channels_first, n_dtype)  # n is laid out as x
    return y, x.new_empty(M, dtype=torch.float32), x.new_empty(M, dtype=torch.float32)


def _bwd_fake(dy, x, weight, bias, eps, fc_weight, mean, rstd, has_fc_bias, channels_first, norm, n_dtype):
    f32 = torch.float32
    return (torch.empty_like(x), weight.new_empty(weight.shape, dtype=f32),
            weight.new_empty(weight.shape if bias is not None else (0,), dtype=f32),
            fc_weight.new_empty(fc_weight.shape, dtype=f32),
            fc_weight.new_empty(fc_weight.shape[0] if has_fc_bias else 0, dtype=f32))


def _setup(ctx, inputs, output):
    x, weight, bias, eps, fc_weight, fc_bias, channels_first, norm, n_dtype, _, _ = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.eps, ctx.channels_first, ctx.norm, ctx.n_dtype = eps, channels_first, norm, n_dtype
    ctx.save_for_backward(x, weight, bias, fc_weight, fc_bias, mean, rstd)


def _backward(ctx, dy, g_mean, g_rstd):
    x, weight, bias, fc_weight, fc_bias, mean, rstd = ctx.saved_tensors
    dx, dw, db, dfw, dfb = _bwd_op(dy, x, weight, bias, ctx.eps, fc_weight, mean, rstd, fc_bias is not None,
                                   ctx.channels_first, ctx.norm, ctx.n_dtype)
    return (dx, dw.to(weight.dtype), grad_as(db, bias), None, dfw.to(fc_weight.dtype), grad_as(dfb, fc_bias),
            None, None, None, None, None)


_bwd_op = BackwardOp("metazoo::norm_linear_bwd", _bwd_impl, _bwd_fake)
_fwd = ForwardOp("metazoo::norm_linear_fwd", _fwd_impl, _fwd_fake, _setup, _backward)


# ----------------------------------------------------------------------------- public dispatcher

@dispatcher(norm_linear_ref)
def norm_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float, fc_weight: Tensor,
                fc_bias: Optional[Tensor] = None, channels_first: bool = False, norm: str = "layer",
                moments: Optional[tuple[Tensor, Tensor]] = None, backend: Optional[str] = None) -> Tensor:
    """``fc(norm(x))`` that keeps only ``x`` and the norm's moments for backward; ``moments``: per-sample
    (mean, var) of ``x`` when already known (``norm="group1"``)."""
    _check(x, weight, fc_weight, channels_first, norm)
    if resolve(backend, x) == "torch":
        return norm_linear_ref(x, weight, bias, eps, fc_weight, fc_bias, channels_first, norm)
    n_dtype = matmul_input_dtype(x) or norm_dtype(x)
    mean, var = moments if moments is not None and norm == "group1" else (None, None)
    y, _, _ = _fwd(dense_in_layout(x, channels_first), weight, bias, float(eps), fc_weight, fc_bias,
                   bool(channels_first), norm, n_dtype, mean, var)
    return y
