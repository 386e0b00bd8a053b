"""Fused scaled residual + LayerNorm over channels: ``out = x*rs + y*ls``, ``n = LN(out)``.

One pass reads the shortcut and the branch and writes both the new residual stream and its
normalised copy, which the next mixer consumes. Without ``y`` it is a plain LayerNorm; without
``weight`` it is only the scaled residual. ``keep`` (B,) fp32, drop path's per-sample keep/(1-p),
scales the branch of each sample (``y*ls*keep``), so training with drop path stays fused. Outputs
take the plain ops' dtypes (``dtypes``): under autocast an fp32 scale makes ``out`` fp32, and on
CUDA ``n`` is fp32 unless the caller names ``n_dtype`` (its matmul consumer's input dtype). Works on
(..., C) rows and on NCHW maps, which it reads in place in channels_last memory (no permuted views:
each view is a host-side op, and eager training is host-bound).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

from ._autograd import BackwardOp, ForwardOp, absent, grad_as
from .dtypes import norm_dtype, promoted
from ._layout import cdiv, check_keep, dense_in_layout, next_pow2, param_grid, stand_in
from .dispatch import dispatcher, lazy_triton, resolve


# ----------------------------------------------------------------------------- input checks

def _check(x: Tensor, y: Optional[Tensor], weight: Optional[Tensor], channels_first: bool) -> None:
    if y is None and weight is None:
        raise ValueError("norm_residual needs y (a residual branch) or weight (a norm); got neither")
    if channels_first and x.dim() != 4:
        raise ValueError(f"norm_residual: channels_first=True expects an NCHW tensor, got shape {tuple(x.shape)}")


# ----------------------------------------------------------------------------- reference

def norm_residual_ref(x: Tensor, y: Optional[Tensor] = None, rs: Optional[Tensor] = None,
                      ls: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                      bias: Optional[Tensor] = None, eps: float = 1e-6, channels_first: bool = False,
                      backend: Optional[str] = None, keep: Optional[Tensor] = None,
                      n_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Plain PyTorch reference (timm's op order): returns ``(out, n)`` (``n`` is None without ``weight``;
    cast to ``n_dtype`` when given)."""
    shape = (-1, 1, 1) if channels_first else (-1,)
    out = x
    if y is not None:
        if keep is not None:  # drop path before the layer scale, its mask in the branch's dtype (timm's DropPath)
            y = y * keep.to(y.dtype).view((-1,) + (1,) * (y.dim() - 1))
        out = (x * rs.view(shape) if rs is not None else x) + (y * ls.view(shape) if ls is not None else y)
    if weight is None:
        return out, None
    o = out.permute(0, 2, 3, 1) if channels_first else out
    n = torch.nn.functional.layer_norm(o, (o.shape[-1],), weight, bias, eps)
    n = n.to(n_dtype) if n_dtype is not None else n
    return out, (n.permute(0, 3, 1, 2) if channels_first else n)


def layer_norm_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, eps: float = 1e-6,
                   channels_first: bool = False, backend: Optional[str] = None,
                   n_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Reference of :func:`layer_norm`."""
    return norm_residual_ref(x, None, None, None, weight, bias, eps, channels_first, n_dtype=n_dtype)[1]


def scale_add_ref(x: Tensor, y: Tensor, rs: Optional[Tensor], ls: Optional[Tensor], channels_first: bool = False,
                  backend: Optional[str] = None, keep: Optional[Tensor] = None) -> Tensor:
    """Reference of :func:`scale_add`."""
    return norm_residual_ref(x, y, rs, ls, None, None, 0.0, channels_first, keep=keep)[0]


# ----------------------------------------------------------------------------- Triton kernels

@lazy_triton
def _load(triton, tl):
    """Build this module's Triton kernels (run once, on first use)."""

    @triton.jit
    def fwd(X, Y, RS, LS, W, B, OUT, N, MEAN, RSTD, M, C, eps, KEEP, rows_per_sample,
            HAS_Y: tl.constexpr, HAS_RS: tl.constexpr, HAS_LS: tl.constexpr, HAS_NORM: tl.constexpr,
            HAS_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, HAS_KEEP: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_C)
        rmask = rows < M
        cmask = cols < C
        mask = rmask[:, None] & cmask[None, :]
        offs = rows[:, None].to(tl.int64) * C + cols[None, :]
        o = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_Y:
            if HAS_RS:
                o = o * tl.load(RS + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_LS:
                y = y * tl.load(LS + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            if HAS_KEEP:
                y = y * tl.load(KEEP + rows // rows_per_sample, mask=rmask, other=0.0)[:, None]
            o = o + y
            tl.store(OUT + offs, o.to(OUT.dtype.element_ty), mask=mask)
        if HAS_NORM:
            mean = tl.sum(o, axis=1) / C
            d = tl.where(mask, o - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
            n = d * rstd[:, None] * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            if HAS_B:
                n = n + tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            tl.store(N + offs, n.to(N.dtype.element_ty), mask=mask)
            tl.store(MEAN + rows, mean, mask=rmask)
            tl.store(RSTD + rows, rstd, mask=rmask)

    @triton.jit
    def bwd(GO, GN, X, Y, O, RS, LS, W, MEAN, RSTD, DX, DY, PW, PB, PRS, PLS, M, C, n_tiles, KEEP,
            rows_per_sample,
            HAS_GO: tl.constexpr, HAS_Y: tl.constexpr, HAS_RS: tl.constexpr, HAS_LS: tl.constexpr,
            HAS_NORM: tl.constexpr, HAS_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
            HAS_KEEP: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_C)
        cmask = cols < C
        if HAS_NORM:
            w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        if HAS_RS:
            rs = tl.load(RS + cols, mask=cmask, other=0.0).to(tl.float32)
        if HAS_LS:
            ls = tl.load(LS + cols, mask=cmask, other=0.0).to(tl.float32)
        # parameter-gradient partials stay 2-D across the loop and are reduced once at the end
        acc_w = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        acc_rs = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        acc_ls = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        for t in range(pid, n_tiles, tl.num_programs(0)):
            rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
            rmask = rows < M
            mask = rmask[:, None] & cmask[None, :]
            offs = rows[:, None].to(tl.int64) * C + cols[None, :]
            g = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
            if HAS_GO:
                g += tl.load(GO + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_NORM:
                gn = tl.load(GN + offs, mask=mask, other=0.0).to(tl.float32)
                o = tl.load(O + offs, mask=mask, other=0.0).to(tl.float32)
                mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
                rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
                xhat = tl.where(mask, (o - mean[:, None]) * rstd[:, None], 0.0)
                wg = gn * w[None, :]
                c1 = tl.sum(xhat * wg, axis=1) / C
                c2 = tl.sum(wg, axis=1) / C
                g += tl.where(mask, (wg - xhat * c1[:, None] - c2[:, None]) * rstd[:, None], 0.0)
                acc_w += gn * xhat
                if HAS_B:
                    acc_b += gn
            if HAS_Y:
                dx = g
                if HAS_RS:
                    dx = g * rs[None, :]
                    acc_rs += g * tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
                dy = g
                if HAS_KEEP:  # the branch is y*ls*keep: keep scales its gradient and ls's
                    dy = dy * tl.load(KEEP + rows // rows_per_sample, mask=rmask, other=0.0)[:, None]
                if HAS_LS:
                    acc_ls += dy * tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
                    dy = dy * ls[None, :]
                tl.store(DY + offs, dy.to(DY.dtype.element_ty), mask=mask)
            else:
                tl.store(DX + offs, g.to(DX.dtype.element_ty), mask=mask)
        poffs = pid * C + cols
        if HAS_NORM:
            tl.store(PW + poffs, tl.sum(acc_w, axis=0), mask=cmask)
            if HAS_B:
                tl.store(PB + poffs, tl.sum(acc_b, axis=0), mask=cmask)
        if HAS_RS:
            tl.store(PRS + poffs, tl.sum(acc_rs, axis=0), mask=cmask)
        if HAS_LS:
            tl.store(PLS + poffs, tl.sum(acc_ls, axis=0), mask=cmask)

    return SimpleNamespace(fwd=fwd, bwd=bwd)


# ----------------------------------------------------------------------------- launchers

def _blocks(C: int, tile: int = 4096):
    """Rows per program and padded channel block; the backward uses smaller tiles (2-D accumulators)."""
    block_c = next_pow2(C)
    block_m = max(1, min(64, tile // block_c))
    return block_m, block_c, (8 if block_c >= 2048 else 4)


def _fwd_impl(x: Tensor, y: Optional[Tensor], rs: Optional[Tensor], ls: Optional[Tensor],
              weight: Optional[Tensor], bias: Optional[Tensor], eps: float, channels_first: bool,
              out_dtype: torch.dtype, n_dtype: torch.dtype, keep: Optional[Tensor] = None
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    C = x.shape[1] if channels_first else x.shape[-1]
    M = x.numel() // C
    out = torch.empty_like(x, dtype=out_dtype) if y is not None else absent(x)
    has_norm = weight is not None
    n = torch.empty_like(x, dtype=n_dtype) if has_norm else absent(x)
    f32 = torch.float32
    mean = torch.empty(M, dtype=f32, device=x.device) if has_norm else absent(x, f32)
    rstd = torch.empty(M, dtype=f32, device=x.device) if has_norm else absent(x, f32)
    bm, bc, nw = _blocks(C)
    _load().fwd[(cdiv(M, bm),)](
        x, *(stand_in(t, x) for t in (y, rs, ls, weight, bias, out, n, mean, rstd)), M, C, eps,
        stand_in(keep, x), M // max(x.shape[0], 1),
        HAS_Y=y is not None, HAS_RS=rs is not None, HAS_LS=ls is not None, HAS_NORM=has_norm,
        HAS_B=bias is not None, BLOCK_M=bm, BLOCK_C=bc, num_warps=nw, HAS_KEEP=keep is not None and y is not None)
    return out, n, mean, rstd


def _bwd_impl(g_out: Optional[Tensor], g_n: Optional[Tensor], x: Optional[Tensor], y: Optional[Tensor],
              out: Optional[Tensor], rs: Optional[Tensor], ls: Optional[Tensor], weight: Optional[Tensor],
              has_bias: bool, mean: Tensor, rstd: Tensor, has_y: bool, x_dtype: torch.dtype, y_dtype: torch.dtype,
              channels_first: bool, keep: Optional[Tensor] = None
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    # x / y / out arrive only where backward reads them (scale grads, the norm); shapes come from the grads
    ref = g_out if g_out is not None else g_n
    C = ref.shape[1] if channels_first else ref.shape[-1]
    M = ref.numel() // C
    bm, bc, nw = _blocks(C, 1024)
    n_tiles = cdiv(M, bm)
    grid = param_grid(n_tiles, ref.device)
    has_norm = weight is not None and g_n is not None
    has_rs, has_ls = rs is not None and has_y, ls is not None and has_y
    dx = torch.empty_like(ref, dtype=x_dtype)
    dy = torch.empty_like(ref, dtype=y_dtype) if has_y else absent(ref)

    def partial(flag):
        return torch.empty((grid, C), dtype=torch.float32, device=ref.device) if flag else absent(ref, torch.float32)

    pw, pb = partial(has_norm), partial(has_norm and has_bias)
    prs, pls = partial(has_rs), partial(has_ls)
    _load().bwd[(grid,)](
        *(stand_in(t, ref) for t in (g_out, g_n, x, y, out, rs, ls, weight, mean, rstd)), dx,
        *(stand_in(t, ref) for t in (dy, pw, pb, prs, pls)), M, C, n_tiles, stand_in(keep, ref),
        M // max(ref.shape[0], 1), HAS_KEEP=keep is not None and has_y,
        HAS_GO=g_out is not None, HAS_Y=has_y, HAS_RS=has_rs, HAS_LS=has_ls, HAS_NORM=has_norm,
        HAS_B=has_norm and has_bias, BLOCK_M=bm, BLOCK_C=bc, num_warps=nw)

    def reduce(p):
        return p.sum(0) if p is not None else p

    return dx, dy, reduce(prs), reduce(pls), reduce(pw), reduce(pb)


# ----------------------------------------------------------------------------- op registration

def _fwd_fake(x, y, rs, ls, weight, bias, eps, channels_first, out_dtype, n_dtype, keep=None):
    C = x.shape[1] if channels_first else x.shape[-1]
    M = x.numel() // C
    out = torch.empty_like(x, dtype=out_dtype) if y is not None else x.new_empty(0)
    has_norm = weight is not None
    n = torch.empty_like(x, dtype=n_dtype) if has_norm else x.new_empty(0)
    mean = x.new_empty(M if has_norm else 0, dtype=torch.float32)
    return out, n, mean, x.new_empty(M if has_norm else 0, dtype=torch.float32)


def _bwd_fake(g_out, g_n, x, y, out, rs, ls, weight, has_bias, mean, rstd, has_y, x_dtype, y_dtype, channels_first,
              keep=None):
    ref = g_out if g_out is not None else g_n
    C = ref.shape[1] if channels_first else ref.shape[-1]
    has_norm = weight is not None and g_n is not None

    def vec(flag):
        return ref.new_empty((C,) if flag else (0,), dtype=torch.float32)

    return (torch.empty_like(ref, dtype=x_dtype),
            torch.empty_like(ref, dtype=y_dtype) if has_y else ref.new_empty(0),
            vec(rs is not None and has_y), vec(ls is not None and has_y), vec(has_norm), vec(has_norm and has_bias))


def _setup(ctx, inputs, output):
    x, y, rs, ls, weight, bias, eps, channels_first, _, _, keep = inputs
    out, n, mean, rstd = output
    ctx.has_bias, ctx.has_y, ctx.channels_first = bias is not None, y is not None, channels_first
    ctx.x_dtype, ctx.y_dtype = x.dtype, (y.dtype if y is not None else x.dtype)
    # Keep only what backward reads: x for rs's grad, y for ls's grad, the normalised tensor for the norm.
    keep_x = x if y is not None and rs is not None else None
    keep_y = y if y is not None and ls is not None else None
    keep_out = (out if y is not None else x) if weight is not None else None
    ctx.save_for_backward(keep_x, keep_y, keep_out, rs, ls, weight, mean, rstd, keep if y is not None else None)


def _backward(ctx, g_out, g_n, g_mean, g_rstd):
    x, y, out, rs, ls, weight, mean, rstd, keep = ctx.saved_tensors
    cf = ctx.channels_first
    g_out = dense_in_layout(g_out, cf) if ctx.has_y and g_out is not None else None
    g_n = dense_in_layout(g_n, cf) if weight is not None and g_n is not None else None
    if g_out is None and g_n is None:  # neither output reached the loss
        return (None,) * 11
    dx, dy, drs, dls, dw, db = _bwd_op(g_out, g_n, x, y, out, rs, ls, weight, ctx.has_bias, mean, rstd,
                                       ctx.has_y, ctx.x_dtype, ctx.y_dtype, cf, keep)

    return (dx, dy if ctx.has_y else None, grad_as(drs, rs), grad_as(dls, ls), grad_as(dw, weight),
            grad_as(db, weight) if ctx.has_bias else None, None, None, None, None, None)


_bwd_op = BackwardOp("metazoo::norm_residual_bwd", _bwd_impl, _bwd_fake)
_fwd = ForwardOp("metazoo::norm_residual_fwd", _fwd_impl, _fwd_fake, _setup, _backward)


# ----------------------------------------------------------------------------- public dispatchers

@dispatcher(norm_residual_ref)
def norm_residual(x: Tensor, y: Optional[Tensor] = None, rs: Optional[Tensor] = None,
                  ls: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                  bias: Optional[Tensor] = None, eps: float = 1e-6, channels_first: bool = False,
                  backend: Optional[str] = None, keep: Optional[Tensor] = None,
                  n_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Optional[Tensor]]:
    """``out = x*rs + y*ls*keep`` (terms optional; ``keep`` per sample) and ``n = LayerNorm_C(out)``;
    returns ``(out, n)``. ``n_dtype``: write ``n`` in it (default: the plain LayerNorm's dtype)."""
    _check(x, y, weight, channels_first)
    check_keep(keep, x, "norm_residual")
    if resolve(backend, x) == "torch":
        return norm_residual_ref(x, y, rs, ls, weight, bias, eps, channels_first, keep=keep, n_dtype=n_dtype)
    xr = dense_in_layout(x, channels_first)
    yr = dense_in_layout(y, channels_first) if y is not None else None
    out_dtype = promoted(x, y, rs, ls) if y is not None else x.dtype
    n_dtype = n_dtype or norm_dtype(x, out_dtype)
    out, n, _, _ = _fwd(xr, yr, rs, ls, weight, bias, float(eps), bool(channels_first), out_dtype, n_dtype, keep)
    return (out if y is not None else x), (n if weight is not None else None)


@dispatcher(layer_norm_ref)
def layer_norm(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, eps: float = 1e-6,
               channels_first: bool = False, backend: Optional[str] = None,
               n_dtype: Optional[torch.dtype] = None) -> Tensor:
    """LayerNorm over channels (last dim, or dim 1 of NCHW when ``channels_first``)."""
    return norm_residual(x, None, None, None, weight, bias, eps, channels_first, backend, n_dtype=n_dtype)[1]


@dispatcher(scale_add_ref)
def scale_add(x: Tensor, y: Tensor, rs: Optional[Tensor], ls: Optional[Tensor], channels_first: bool = False,
              backend: Optional[str] = None, keep: Optional[Tensor] = None) -> Tensor:
    """Residual update ``x*rs + y*ls*keep`` in one pass (scales optional, per channel; keep per sample)."""
    return norm_residual(x, y, rs, ls, None, None, 0.0, channels_first, backend, keep)[0]
