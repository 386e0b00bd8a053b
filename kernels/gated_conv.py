"""MambaOut's gated token mixer after ``fc1``: ``h = gelu(g) * cat(i, dwconv(c))`` in channels-last.

``u = fc1(norm(x))`` is split into gate ``g`` (hidden), identity ``i`` and conv part ``c``. The
depthwise conv reads ``c`` in place (no split/permute copies); one pass then applies exact GELU,
the gate and the concat. Backward recomputes the small conv output instead of keeping it, and
writes every part of ``du`` straight into one buffer (no cat/split in the graph).

``gated_dwconv_linear`` also applies the block's output projection ``fc2`` and keeps only ``u``
for backward: ``h`` (hidden channels per pixel) is recomputed there instead of being saved for
``fc2``'s weight gradient, a quarter of the block's activation memory for one cheap extra pass.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dwconv
from ._autograd import BackwardOp, ForwardOp, grad_as, or_absent
from ._layout import cdiv, next_pow2
from ._linear import project, project_backward
from .dispatch import dispatcher, lazy_triton, resolve


# ----------------------------------------------------------------------------- input checks

def _check(u: Tensor, weight: Tensor, hidden: int):
    cc = weight.shape[0]
    if u.dim() != 4 or u.shape[-1] != 2 * hidden:
        raise ValueError(f"gated_dwconv: u must be NHWC with 2*hidden={2 * hidden} channels, got {tuple(u.shape)}")
    if not 0 < cc <= hidden or weight.dim() != 4 or weight.shape[1] != 1:
        raise ValueError(f"gated_dwconv: weight must be (cc, 1, K, K) with 0 < cc <= hidden={hidden}, "
                         f"got {tuple(weight.shape)}")


def _check_linear(hidden: int, fc_weight: Tensor, fc_bias: Optional[Tensor]):
    if fc_weight.dim() != 2 or fc_weight.shape[1] != hidden:
        raise ValueError(f"gated_dwconv_linear: fc_weight must be (out, hidden={hidden}), got {tuple(fc_weight.shape)}")
    if fc_bias is not None and tuple(fc_bias.shape) != (fc_weight.shape[0],):
        raise ValueError(f"gated_dwconv_linear: fc_bias must be ({fc_weight.shape[0]},), got {tuple(fc_bias.shape)}")


# ----------------------------------------------------------------------------- reference

def gated_dwconv_ref(u: Tensor, weight: Tensor, bias: Optional[Tensor], hidden: int,
                     backend: Optional[str] = None) -> Tensor:
    """Plain PyTorch reference: split, depthwise conv on the last ``cc`` channels, exact GELU gate, concat."""
    _check(u, weight, hidden)
    cc = weight.shape[0]
    g, i, c = torch.split(u, (hidden, hidden - cc, cc), dim=-1)
    c = torch.nn.functional.conv2d(c.permute(0, 3, 1, 2), weight.to(u.dtype),
                                   bias.to(u.dtype) if bias is not None else None,
                                   padding=weight.shape[-1] // 2, groups=cc).permute(0, 2, 3, 1)
    return torch.nn.functional.gelu(g) * torch.cat((i, c), dim=-1)


def gated_dwconv_linear_ref(u: Tensor, weight: Tensor, bias: Optional[Tensor], hidden: int, fc_weight: Tensor,
                            fc_bias: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """Plain PyTorch reference: ``fc(gated_dwconv_ref(u, ...))``."""
    _check_linear(hidden, fc_weight, fc_bias)
    return F.linear(gated_dwconv_ref(u, weight, bias, hidden), fc_weight, fc_bias)


# ----------------------------------------------------------------------------- Triton kernels

@lazy_triton
def _load(triton, tl):
    """Build this module's Triton kernels (run once, on first use)."""

    @triton.jit
    def gate(U, CV, HOUT, DH, DU, DCV, M, hidden, n_id, cc, BACKWARD: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < M
        mask = rmask[:, None] & (cols < hidden)[None, :]
        is_id = (cols < n_id)[None, :]
        u_row = rows[:, None].to(tl.int64) * (2 * hidden)
        g = tl.load(U + u_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        vi = tl.load(U + u_row + hidden + cols[None, :], mask=mask & is_id, other=0.0).to(tl.float32)
        cv_offs = rows[:, None].to(tl.int64) * cc + (cols - n_id)[None, :]
        vc = tl.load(CV + cv_offs, mask=mask & (~is_id), other=0.0).to(tl.float32)
        v = tl.where(is_id, vi, vc)
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        act = g * cdf
        h_offs = rows[:, None].to(tl.int64) * hidden + cols[None, :]
        if BACKWARD:
            dh = tl.load(DH + h_offs, mask=mask, other=0.0).to(tl.float32)
            dact = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327
            tl.store(DU + u_row + cols[None, :], (dh * v * dact).to(DU.dtype.element_ty), mask=mask)
            dv = dh * act
            tl.store(DU + u_row + hidden + cols[None, :], dv.to(DU.dtype.element_ty), mask=mask & is_id)
            tl.store(DCV + cv_offs, dv.to(DCV.dtype.element_ty), mask=mask & (~is_id))
        else:
            tl.store(HOUT + h_offs, (act * v).to(HOUT.dtype.element_ty), mask=mask)

    return SimpleNamespace(gate=gate)


# ----------------------------------------------------------------------------- launchers

def _launch(u: Tensor, cv: Tensor, hidden: int, cc: int, h: Optional[Tensor], dh: Optional[Tensor],
            du: Optional[Tensor], dcv: Optional[Tensor]):
    gate = _load().gate
    M = u.numel() // u.shape[-1]
    bn = min(128, next_pow2(hidden))
    bm = max(1, 4096 // bn)
    backward = dh is not None
    gate[(cdiv(M, bm), cdiv(hidden, bn))](
        u, cv, h if h is not None else u, dh if backward else u, du if backward else u,
        dcv if backward else u, M, hidden, hidden - cc, cc, BACKWARD=backward, BLOCK_M=bm, BLOCK_N=bn,
        num_warps=4)


def _conv_part(u: Tensor, cc: int) -> Tensor:
    return u[..., u.shape[-1] - cc:]


def _conv_out(c: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The depthwise conv of the conv channels ``c`` (NHWC, any pixel strides), dense NHWC out."""
    return dwconv.conv_forward(c, weight, bias, None, None)


def _conv_recompute(u: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Backward's (conv input, conv output): ``u``'s conv channels copied once to dense NHWC, read by both
    the recompute and the weight gradient (each would otherwise copy the strided slice for cuDNN)."""
    c = _conv_part(u, weight.shape[0]).contiguous()
    return c, _conv_out(c, weight, bias)


def _gate_forward(u: Tensor, cv: Tensor, hidden: int) -> Tensor:
    h = u.new_empty((*u.shape[:-1], hidden))
    _launch(u, cv, hidden, cv.shape[-1], h, None, None, None)
    return h


def _fwd_impl(u: Tensor, weight: Tensor, bias: Optional[Tensor], hidden: int) -> Tensor:
    return _gate_forward(u, _conv_out(_conv_part(u, weight.shape[0]), weight, bias), hidden)


def _gate_backward(dh: Tensor, u: Tensor, c: Tensor, cv: Tensor, weight: Tensor, has_bias: bool, hidden: int
                   ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """(du, dweight, dbias) from ``dh``, the conv input ``c`` and output ``cv`` (both from the caller)."""
    cc = weight.shape[0]
    du = torch.empty_like(u)
    dcv = torch.empty_like(cv)
    _launch(u, cv, hidden, cc, None, dh.contiguous(), du, dcv)
    dw, db, _, _ = dwconv.conv_backward(dcv, c, weight, has_bias, None, None, _conv_part(du, cc))
    return du, dw, db


def _bwd_impl(dh: Tensor, u: Tensor, weight: Tensor, bias: Optional[Tensor], hidden: int
              ) -> tuple[Tensor, Tensor, Tensor]:
    c, cv = _conv_recompute(u, weight, bias)
    du, dw, db = _gate_backward(dh, u, c, cv, weight, bias is not None, hidden)
    return du, dw, or_absent(db, u, torch.float32)


def _lin_fwd_impl(u: Tensor, weight: Tensor, bias: Optional[Tensor], hidden: int, fc_weight: Tensor,
                  fc_bias: Optional[Tensor]) -> Tensor:
    return project(_fwd_impl(u, weight, bias, hidden), fc_weight, fc_bias)


def _lin_bwd_impl(dy: Tensor, u: Tensor, weight: Tensor, bias: Optional[Tensor], hidden: int, fc_weight: Tensor,
                  has_fc_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    # the conv output is recomputed once and serves both h (for fc2's gradients) and the gate's backward
    c, cv = _conv_recompute(u, weight, bias)
    dh, dfw, dfb = project_backward(dy, _gate_forward(u, cv, hidden), fc_weight, has_fc_bias)
    du, dw, db = _gate_backward(dh, u, c, cv, weight, bias is not None, hidden)
    return du, dw, or_absent(db, u, torch.float32), dfw, dfb


# ----------------------------------------------------------------------------- op registration

def _fwd_fake(u, weight, bias, hidden):
    return u.new_empty((*u.shape[:-1], hidden))


def _bwd_fake(dh, u, weight, bias, hidden):
    f32 = torch.float32
    return (torch.empty_like(u), weight.new_empty(weight.shape, dtype=f32),
            u.new_empty(weight.shape[0] if bias is not None else 0, dtype=f32))


def _setup(ctx, inputs, output):
    u, weight, bias, hidden = inputs
    ctx.hidden = hidden
    ctx.save_for_backward(u, weight, bias)


def _backward(ctx, dh):
    u, weight, bias = ctx.saved_tensors
    du, dw, db = _bwd_op(dh, u, weight, bias, ctx.hidden)
    return du, dw.to(weight.dtype), grad_as(db, bias), None


_bwd_op = BackwardOp("metazoo::gated_dwconv_bwd", _bwd_impl, _bwd_fake)
_fwd = ForwardOp("metazoo::gated_dwconv_fwd", _fwd_impl, _fwd_fake, _setup, _backward)


def _lin_fwd_fake(u, weight, bias, hidden, fc_weight, fc_bias):
    return u.new_empty((*u.shape[:-1], fc_weight.shape[0]))


def _lin_bwd_fake(dy, u, weight, bias, hidden, fc_weight, has_fc_bias):
    f32 = torch.float32
    return (torch.empty_like(u), weight.new_empty(weight.shape, dtype=f32),
            u.new_empty(weight.shape[0] if bias is not None else 0, dtype=f32),
            fc_weight.new_empty(fc_weight.shape, dtype=f32),
            u.new_empty(fc_weight.shape[0] if has_fc_bias else 0, dtype=f32))


def _lin_setup(ctx, inputs, output):
    u, weight, bias, hidden, fc_weight, fc_bias = inputs
    ctx.hidden = hidden
    ctx.save_for_backward(u, weight, bias, fc_weight, fc_bias)


def _lin_backward(ctx, dy):
    u, weight, bias, fc_weight, fc_bias = ctx.saved_tensors
    du, dw, db, dfw, dfb = _lin_bwd_op(dy, u, weight, bias, ctx.hidden, fc_weight, fc_bias is not None)
    return du, dw.to(weight.dtype), grad_as(db, bias), None, dfw.to(fc_weight.dtype), grad_as(dfb, fc_bias)


_lin_bwd_op = BackwardOp("metazoo::gated_dwconv_linear_bwd", _lin_bwd_impl, _lin_bwd_fake)
_lin_fwd = ForwardOp("metazoo::gated_dwconv_linear_fwd", _lin_fwd_impl, _lin_fwd_fake, _lin_setup, _lin_backward)


# ----------------------------------------------------------------------------- public dispatcher

@dispatcher(gated_dwconv_ref)
def gated_dwconv(u: Tensor, weight: Tensor, bias: Optional[Tensor], hidden: int,
                 backend: Optional[str] = None) -> Tensor:
    """``gelu(g) * cat(i, dwconv(c))`` for ``u = [g | i | c]`` (NHWC, ``2*hidden`` channels) -> NHWC hidden."""
    _check(u, weight, hidden)
    if resolve(backend, u) == "torch":
        return gated_dwconv_ref(u, weight, bias, hidden)
    return _fwd(u.contiguous(), weight, bias, int(hidden))


@dispatcher(gated_dwconv_linear_ref)
def gated_dwconv_linear(u: Tensor, weight: Tensor, bias: Optional[Tensor], hidden: int, fc_weight: Tensor,
                        fc_bias: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """``linear(gated_dwconv(u, ...), fc_weight, fc_bias)`` keeping only ``u`` for backward (NHWC)."""
    _check(u, weight, hidden)
    _check_linear(hidden, fc_weight, fc_bias)
    if resolve(backend, u) == "torch":
        return gated_dwconv_linear_ref(u, weight, bias, hidden, fc_weight, fc_bias)
    return _lin_fwd(u.contiguous(), weight, bias, int(hidden), fc_weight, fc_bias)
