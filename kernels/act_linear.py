"""The MLP's second half, ``fc2(act(z))``, keeping only ``z`` for backward.

Unfused, autograd keeps both ``z`` (for the activation's derivative) and ``act(z)`` (for ``fc2``'s
weight gradient): two hidden-width tensors per block, the largest activations of a MetaFormer.
Here ``act(z)`` is recomputed in backward (one elementwise pass: exact GELU, or StarReLU through
its Triton kernel), which removes one of them. ``fc2`` is a Linear over the last dim, or a 1x1
conv over NCHW (``channels_first``, in whichever memory format the input has).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._autograd import BackwardOp, ForwardOp, absent, grad_as
from ._linear import project, project_backward, project_fake
from .dispatch import dispatcher, resolve
from .star_relu import _bwd_op as _star_relu_bwd
from .star_relu import star_relu_apply, star_relu_ref

ACTS = ("gelu", "star_relu")


# ----------------------------------------------------------------------------- input checks

def _check(z: Tensor, fc_weight: Tensor, fc_bias: Optional[Tensor], act: str, act_scale, act_bias,
           channels_first: bool) -> None:
    if act not in ACTS:
        raise ValueError(f"act_linear: act={act!r} is not supported; accepted values: {ACTS}")
    if act == "star_relu" and (act_scale is None or act_bias is None or act_scale.numel() != 1
                               or act_bias.numel() != 1):
        raise ValueError("act_linear: act='star_relu' needs one-element act_scale and act_bias")
    if channels_first and z.dim() != 4:
        raise ValueError(f"act_linear: channels_first needs an NCHW z, got shape {tuple(z.shape)}")
    hidden = z.shape[1 if channels_first else -1]
    w_ok = fc_weight.dim() == (4 if channels_first else 2) and fc_weight.shape[1] == hidden and \
        all(k == 1 for k in fc_weight.shape[2:])
    if not w_ok:
        raise ValueError(f"act_linear: fc_weight must be (out, {hidden}{', 1, 1' if channels_first else ''}), "
                         f"got {tuple(fc_weight.shape)}")
    if fc_bias is not None and tuple(fc_bias.shape) != (fc_weight.shape[0],):
        raise ValueError(f"act_linear: fc_bias must be ({fc_weight.shape[0]},), got {tuple(fc_bias.shape)}")

# ----------------------------------------------------------------------------- reference

def act_linear_ref(z: Tensor, fc_weight: Tensor, fc_bias: Optional[Tensor] = None, act: str = "gelu",
                   act_scale: Optional[Tensor] = None, act_bias: Optional[Tensor] = None,
                   channels_first: bool = False, backend: Optional[str] = None) -> Tensor:
    """Plain PyTorch reference: ``fc2(act(z))`` as the unfused MLP computes it."""
    _check(z, fc_weight, fc_bias, act, act_scale, act_bias, channels_first)
    a = F.gelu(z) if act == "gelu" else star_relu_ref(z, act_scale, act_bias)
    return F.conv2d(a, fc_weight, fc_bias) if channels_first else F.linear(a, fc_weight, fc_bias)

# ----------------------------------------------------------------------------- launchers

def _activate(z: Tensor, act: str, scale: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    return F.gelu(z) if act == "gelu" else star_relu_apply(z, scale, bias)


def _fwd_impl(z: Tensor, fc_weight: Tensor, fc_bias: Optional[Tensor], act: str, act_scale: Optional[Tensor],
              act_bias: Optional[Tensor], channels_first: bool) -> Tensor:
    return project(_activate(z, act, act_scale, act_bias), fc_weight, fc_bias, channels_first)


def _bwd_impl(dy: Tensor, z: Tensor, fc_weight: Tensor, act: str, act_scale: Optional[Tensor],
              act_bias: Optional[Tensor], has_fc_bias: bool, channels_first: bool
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    a = _activate(z, act, act_scale, act_bias)  # recomputed, never saved
    da, dfw, dfb = project_backward(dy, a, fc_weight, has_fc_bias, channels_first)
    f32 = torch.float32
    if da.stride() != z.stride():  # dz takes z's layout (as the fake says); StarReLU's kernel needs it
        da = torch.empty_like(z).copy_(da)
    if act == "gelu":
        dz = torch.ops.aten.gelu_backward(da, z)
        ds, db = absent(dy, f32), absent(dy, f32)
    else:
        dz, ds, db = _star_relu_bwd(da, z, act_scale)
    return dz, dfw, dfb, ds, db

# ----------------------------------------------------------------------------- op registration

def _fwd_fake(z, fc_weight, fc_bias, act, act_scale, act_bias, channels_first):
    return project_fake(z, fc_weight.shape[0], channels_first)


def _bwd_fake(dy, z, fc_weight, act, act_scale, act_bias, has_fc_bias, channels_first):
    f32 = torch.float32
    star = act != "gelu"
    return (torch.empty_like(z), fc_weight.new_empty(fc_weight.shape, dtype=f32),
            z.new_empty(fc_weight.shape[0] if has_fc_bias else 0, dtype=f32),
            z.new_empty(1 if star else 0, dtype=f32), z.new_empty(1 if star else 0, dtype=f32))


def _setup(ctx, inputs, output):
    z, fc_weight, fc_bias, act, act_scale, act_bias, channels_first = inputs
    ctx.act, ctx.channels_first = act, channels_first
    ctx.save_for_backward(z, fc_weight, fc_bias, act_scale, act_bias)


def _backward(ctx, dy):
    z, fc_weight, fc_bias, act_scale, act_bias = ctx.saved_tensors
    dz, dfw, dfb, ds, db = _bwd_op(dy, z, fc_weight, ctx.act, act_scale, act_bias, fc_bias is not None,
                                   ctx.channels_first)

    return (dz, dfw.to(fc_weight.dtype), grad_as(dfb, fc_bias), None, grad_as(ds, act_scale), grad_as(db, act_bias),
            None)


_bwd_op = BackwardOp("metazoo::act_linear_bwd", _bwd_impl, _bwd_fake)
_fwd = ForwardOp("metazoo::act_linear_fwd", _fwd_impl, _fwd_fake, _setup, _backward)


# ----------------------------------------------------------------------------- public dispatcher

@dispatcher(act_linear_ref)
def act_linear(z: Tensor, fc_weight: Tensor, fc_bias: Optional[Tensor] = None, act: str = "gelu",
               act_scale: Optional[Tensor] = None, act_bias: Optional[Tensor] = None,
               channels_first: bool = False, backend: Optional[str] = None) -> Tensor:
    """``fc2(act(z))`` (exact GELU or StarReLU) that keeps only ``z`` for backward; output dtype of ``z``."""
    _check(z, fc_weight, fc_bias, act, act_scale, act_bias, channels_first)
    if resolve(backend, z) == "torch":
        return act_linear_ref(z, fc_weight, fc_bias, act, act_scale, act_bias, channels_first)
    return _fwd(z, fc_weight, fc_bias, act, act_scale, act_bias, bool(channels_first))
