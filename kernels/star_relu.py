"""StarReLU ``s * relu(x)**2 + b`` (scalar learnable ``s``, ``b``) as one elementwise pass, fwd and bwd.

Eager PyTorch runs four kernels forward (relu, square, mul, add) and keeps two intermediates for
backward; this keeps only ``x`` and reduces the scalar gradients in the same pass.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

from ._autograd import BackwardOp, ForwardOp
from ._layout import cdiv, param_grid
from .dispatch import dispatcher, lazy_triton, resolve

_BLOCK = 2048


# ----------------------------------------------------------------------------- input checks

def _check(scale: Tensor, bias: Tensor) -> None:
    if scale.numel() != 1 or bias.numel() != 1:
        raise ValueError(f"star_relu: scale and bias must hold one element each, "
                         f"got {scale.numel()} and {bias.numel()}")


# ----------------------------------------------------------------------------- reference

def star_relu_ref(x: Tensor, scale: Tensor, bias: Tensor, backend: Optional[str] = None) -> Tensor:
    """Plain PyTorch reference (timm's expression)."""
    return scale * torch.relu(x) ** 2 + bias


# ----------------------------------------------------------------------------- Triton kernels

@lazy_triton
def _load(triton, tl):
    """Build this module's Triton kernels (run once, on first use)."""

    @triton.jit
    def fwd(X, S, B, Y, numel, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        x = tl.maximum(tl.load(X + offs, mask=mask, other=0.0).to(tl.float32), 0.0)
        y = tl.load(S).to(tl.float32) * x * x + tl.load(B).to(tl.float32)
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def bwd(G, X, S, DX, PS, PB, numel, n_tiles, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        s = tl.load(S).to(tl.float32)
        acc_s = tl.zeros([BLOCK], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK], dtype=tl.float32)
        for t in range(pid, n_tiles, tl.num_programs(0)):
            offs = t * BLOCK + tl.arange(0, BLOCK)
            mask = offs < numel
            g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
            r = tl.maximum(tl.load(X + offs, mask=mask, other=0.0).to(tl.float32), 0.0)
            tl.store(DX + offs, (2.0 * s * r * g).to(DX.dtype.element_ty), mask=mask)
            acc_s += g * r * r
            acc_b += g
        tl.store(PS + pid, tl.sum(acc_s, axis=0))
        tl.store(PB + pid, tl.sum(acc_b, axis=0))

    return SimpleNamespace(fwd=fwd, bwd=bwd)


# ----------------------------------------------------------------------------- launchers

def _dense(x: Tensor) -> Tensor:
    """Elementwise kernels walk storage: accept contiguous or channels_last tensors as they are."""
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    return x.contiguous()


def star_relu_apply(x: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    """Launch the forward kernel (no autograd) on a dense ``x``; also used to recompute activations."""
    x = _dense(x)
    y = torch.empty_like(x)
    _load().fwd[(cdiv(x.numel(), _BLOCK),)](x, scale, bias, y, x.numel(), BLOCK=_BLOCK, num_warps=8)
    return y


def _bwd_impl(g: Tensor, x: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    n_tiles = cdiv(x.numel(), _BLOCK)
    grid = param_grid(n_tiles, x.device)
    dx = torch.empty_like(x)
    ps = torch.empty(grid, dtype=torch.float32, device=x.device)
    pb = torch.empty_like(ps)
    _load().bwd[(grid,)](g, x, scale, dx, ps, pb, x.numel(), n_tiles, BLOCK=_BLOCK, num_warps=8)
    return dx, ps.sum().reshape(1), pb.sum().reshape(1)


# ----------------------------------------------------------------------------- op registration

def _fwd_fake(x, scale, bias):
    return torch.empty_like(x)


def _bwd_fake(g, x, scale):
    return torch.empty_like(x), scale.new_empty(1, dtype=torch.float32), scale.new_empty(1, dtype=torch.float32)


def _setup(ctx, inputs, output):
    x, scale, bias = inputs
    ctx.save_for_backward(x, scale)
    ctx.bias_dtype = bias.dtype


def _backward(ctx, g):
    x, scale = ctx.saved_tensors
    if g.stride() != x.stride():
        g = torch.empty_like(x).copy_(g)
    dx, ds, db = _bwd_op(g, x, scale)
    return dx, ds.to(scale.dtype), db.to(ctx.bias_dtype)


_bwd_op = BackwardOp("metazoo::star_relu_bwd", _bwd_impl, _bwd_fake)
_fwd = ForwardOp("metazoo::star_relu_fwd", star_relu_apply, _fwd_fake, _setup, _backward)


# ----------------------------------------------------------------------------- public dispatcher

@dispatcher(star_relu_ref)
def star_relu(x: Tensor, scale: Tensor, bias: Tensor, backend: Optional[str] = None) -> Tensor:
    """``scale * relu(x)**2 + bias`` with one-element ``scale``/``bias``; any layout, output dtype of ``x``."""
    _check(scale, bias)
    if resolve(backend, x) == "torch":
        return star_relu_ref(x, scale, bias)
    return _fwd(_dense(x), scale, bias)
