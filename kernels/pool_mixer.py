"""PoolFormer's token-mixer branch fused with its norm, layer scale and residual, fwd and bwd.

``out = x*rs + ls * (avgpool(n) - n)`` with ``n = GroupNorm1(x)`` and ``count_include_pad=False``.
Average pooling commutes with the per-channel affine of the norm, so the branch equals
``ls * w * rstd * (avgpool(x) - x)``: neither ``n`` nor the pooled map is ever written, and the norm
bias cancels exactly (its gradient is zero). The pass also returns the per-sample moments of
``out`` so the following GroupNorm skips its statistics pass. ``keep`` (B,) fp32, drop path's
per-sample keep/(1-p), scales each sample's branch (it folds into ``rstd``'s branch factor), so
training with drop path stays fused. Channels-last maps. ``out`` takes the plain ops' dtype
(``dtypes``: fp32 under CUDA autocast, where the norm is fp32; with an fp32 layer scale, on CPU too).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

from ._autograd import BackwardOp, ForwardOp, absent
from .dtypes import norm_dtype, promoted
from ._layout import cdiv, check_keep, dense_in_layout, next_pow2, nhwc_shape, stand_in
from .dispatch import dispatcher, lazy_triton, resolve
from .group_norm import finish_moments, sample_moments


# ----------------------------------------------------------------------------- input checks

def _check(x: Tensor, pool_size: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"pool_mixer: x must be NCHW, got shape {tuple(x.shape)}")
    if pool_size % 2 != 1:
        raise ValueError(f"pool_mixer: pool_size must be odd, got {pool_size}")


# ----------------------------------------------------------------------------- reference

def pool_mixer_ref(x: Tensor, norm_weight: Tensor, norm_bias: Optional[Tensor] = None, eps: float = 1e-5,
                   ls: Optional[Tensor] = None, rs: Optional[Tensor] = None, pool_size: int = 3,
                   backend: Optional[str] = None, keep: Optional[Tensor] = None
                   ) -> tuple[Tensor, Optional[tuple[Tensor, Tensor]]]:
    """Plain PyTorch reference on NCHW: ``(x*rs + ls*(avgpool(n) - n)*keep, None)``, ``n = GroupNorm1(x)``."""
    n = torch.nn.functional.group_norm(x, 1, norm_weight, norm_bias, eps)
    p = torch.nn.functional.avg_pool2d(n, pool_size, 1, pool_size // 2, count_include_pad=False)
    branch = p - n
    if keep is not None:  # drop path before the layer scale, its mask in the branch's dtype (timm's DropPath)
        branch = branch * keep.to(branch.dtype).view(-1, 1, 1, 1)
    branch = branch * ls.view(-1, 1, 1) if ls is not None else branch
    return (x * rs.view(-1, 1, 1) if rs is not None else x) + branch, None


# ----------------------------------------------------------------------------- Triton kernels

@lazy_triton
def _load(triton, tl):
    """Build this module's Triton helpers and kernels (run once, on first use)."""

    @triton.jit
    def _tile(H, W, C, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
        """This program's tile: (pid, sample, row, columns, channels, channel mask, tile mask)."""
        pid = tl.program_id(0)
        ws = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        cs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cs < C
        return pid, pid // H, pid % H, ws, cs, cmask, (ws < W)[:, None] & cmask[None, :]

    @triton.jit
    def _window_mean(base, h, ws, cs, cmask, H, W, C, P: tl.constexpr, BLOCK_W: tl.constexpr,
                     BLOCK_C: tl.constexpr):
        """avg-pool PxP (stride 1, count_include_pad=False) of the map at ``base``, on this tile, fp32."""
        PAD: tl.constexpr = P // 2
        acc = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
        for i in tl.static_range(P):
            hh = h + i - PAD
            for j in tl.static_range(P):
                ww = ws + j - PAD
                m = ((hh >= 0) & (hh < H) & (ww >= 0) & (ww < W))[:, None] & cmask[None, :]
                acc += tl.load(base + hh * W * C + ww[:, None] * C + cs[None, :], mask=m, other=0.0).to(tl.float32)
        cnt = tl.maximum((tl.minimum(h + PAD, H - 1) - tl.maximum(h - PAD, 0) + 1)
                         * (tl.minimum(ws + PAD, W - 1) - tl.maximum(ws - PAD, 0) + 1), 1).to(tl.float32)
        return acc / cnt[:, None]

    @triton.jit
    def fwd(X, MEAN, RSTD, NW, LS, RS, OUT, PS, H, W, C, KEEP, P: tl.constexpr, HAS_LS: tl.constexpr,
            HAS_RS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, HAS_KEEP: tl.constexpr):
        pid, b, h, ws, cs, cmask, om = _tile(H, W, C, BLOCK_W, BLOCK_C)
        base = X + b.to(tl.int64) * H * W * C
        pooled = _window_mean(base, h, ws, cs, cmask, H, W, C, P, BLOCK_W, BLOCK_C)
        offs = h * W * C + ws[:, None] * C + cs[None, :]
        x = tl.load(base + offs, mask=om, other=0.0).to(tl.float32)
        a = tl.load(NW + cs, mask=cmask, other=0.0).to(tl.float32)
        if HAS_LS:
            a = a * tl.load(LS + cs, mask=cmask, other=0.0).to(tl.float32)
        mu = tl.load(MEAN + b)
        r = tl.load(RSTD + b)
        if HAS_KEEP:
            r = r * tl.load(KEEP + b)
        out = (pooled - x) * (a * r)[None, :]
        if HAS_RS:
            out += x * tl.load(RS + cs, mask=cmask, other=0.0).to(tl.float32)[None, :]
        else:
            out += x
        tl.store(OUT + b.to(tl.int64) * H * W * C + offs, out.to(OUT.dtype.element_ty), mask=om)
        d = tl.where(om, out - mu, 0.0)
        lin = (pid * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)
        tl.store(PS + lin * 2, tl.sum(tl.sum(d, axis=1), axis=0))
        tl.store(PS + lin * 2 + 1, tl.sum(tl.sum(d * d, axis=1), axis=0))

    @triton.jit
    def bwd_reduce(G, X, RSTD, NW, LS, PC, PS, H, W, C, KEEP, P: tl.constexpr, HAS_LS: tl.constexpr,
                   HAS_RS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, HAS_KEEP: tl.constexpr):
        # Per program: channel sums of rstd*g*d and g*x; the sample sum of g*a*d (d = pool(x) - x).
        pid, b, h, ws, cs, cmask, om = _tile(H, W, C, BLOCK_W, BLOCK_C)
        base = b.to(tl.int64) * H * W * C
        pooled = _window_mean(X + base, h, ws, cs, cmask, H, W, C, P, BLOCK_W, BLOCK_C)
        offs = base + h * W * C + ws[:, None] * C + cs[None, :]
        x = tl.load(X + offs, mask=om, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=om, other=0.0).to(tl.float32)
        gd = tl.where(om, g * (pooled - x), 0.0)
        if HAS_KEEP:  # the branch is keep_b * a * rstd_b * d: keep scales every branch partial
            gd = gd * tl.load(KEEP + b)
        a = tl.load(NW + cs, mask=cmask, other=0.0).to(tl.float32)
        if HAS_LS:
            a = a * tl.load(LS + cs, mask=cmask, other=0.0).to(tl.float32)
        lin = (pid * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)
        row = (pid * tl.num_programs(1) + tl.program_id(1)).to(tl.int64) * 2 * C
        tl.store(PC + row + cs, tl.sum(gd, axis=0) * tl.load(RSTD + b), mask=cmask)
        if HAS_RS:
            tl.store(PC + row + C + cs, tl.sum(g * x, axis=0), mask=cmask)
        tl.store(PS + lin, tl.sum(tl.sum(gd * a[None, :], axis=1), axis=0))

    @triton.jit
    def bwd_apply(G, X, MEAN, RSTD, PSUM, inv_n, NW, LS, RS, DX, H, W, C, KEEP, P: tl.constexpr,
                  HAS_LS: tl.constexpr, HAS_RS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
                  HAS_KEEP: tl.constexpr):
        # dx = rs*g + a*rstd*(P^T g - g) + coef_b*(x - mean_b), P^T g summing g/count over the window,
        # coef_b = -rstd_b^3 * PSUM_b / n from the sample's reduced partials (no host-side math).
        pid, b, h, ws, cs, cmask, om = _tile(H, W, C, BLOCK_W, BLOCK_C)
        PAD: tl.constexpr = P // 2
        base = b.to(tl.int64) * H * W * C
        acc = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
        for i in tl.static_range(P):
            hh = h + i - PAD
            ch = tl.minimum(hh + PAD, H - 1) - tl.maximum(hh - PAD, 0) + 1  # window size at hh
            for j in tl.static_range(P):
                ww = ws + j - PAD
                m = ((hh >= 0) & (hh < H) & (ww >= 0) & (ww < W))[:, None] & cmask[None, :]
                gq = tl.load(G + base + hh * W * C + ww[:, None] * C + cs[None, :], mask=m, other=0.0).to(tl.float32)
                cw = tl.minimum(ww + PAD, W - 1) - tl.maximum(ww - PAD, 0) + 1
                acc += gq / tl.maximum(ch * cw, 1).to(tl.float32)[:, None]
        offs = base + h * W * C + ws[:, None] * C + cs[None, :]
        x = tl.load(X + offs, mask=om, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=om, other=0.0).to(tl.float32)
        a = tl.load(NW + cs, mask=cmask, other=0.0).to(tl.float32)
        if HAS_LS:
            a = a * tl.load(LS + cs, mask=cmask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + b)
        coef = -tl.load(PSUM + b) * rstd * rstd * rstd * inv_n  # PSUM already carries keep
        r = rstd
        if HAS_KEEP:
            r = r * tl.load(KEEP + b)
        dx = (acc - g) * (a * r)[None, :] + coef * (x - tl.load(MEAN + b))
        if HAS_RS:
            dx += g * tl.load(RS + cs, mask=cmask, other=0.0).to(tl.float32)[None, :]
        else:
            dx += g
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=om)

    return SimpleNamespace(fwd=fwd, bwd_reduce=bwd_reduce, bwd_apply=bwd_apply)


# ----------------------------------------------------------------------------- launchers

def _grid(x: Tensor):
    B, H, W, C = nhwc_shape(x)
    bw, bc = min(16, next_pow2(W)), min(64, next_pow2(C))
    return (B * H, cdiv(W, bw), cdiv(C, bc)), bw, bc


def _fwd_impl(x: Tensor, norm_weight: Tensor, norm_bias: Optional[Tensor], eps: float, ls: Optional[Tensor],
              rs: Optional[Tensor], pool_size: int, out_dtype: torch.dtype, keep: Optional[Tensor] = None
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    mean, _, rstd = sample_moments(x, eps)
    grid, bw, bc = _grid(x)
    out = torch.empty_like(x, dtype=out_dtype)
    ps = torch.empty((grid[0], grid[1] * grid[2], 2), dtype=torch.float32, device=x.device)
    _load().fwd[grid](x, mean, rstd, norm_weight, stand_in(ls, x), stand_in(rs, x), out, ps, *nhwc_shape(x)[1:],
                      stand_in(keep, x), P=pool_size, HAS_LS=ls is not None, HAS_RS=rs is not None, BLOCK_W=bw,
                      BLOCK_C=bc, num_warps=4, HAS_KEEP=keep is not None)
    B = x.shape[0]
    n = ps.numel() // (2 * B)  # partials per sample, (sum, sum of squares) of out - mean interleaved
    out_mean, out_var, _ = finish_moments(ps, B, n, 2 * n, 2, 1, mean, 1, x.numel() // B)
    return out, mean, rstd, out_mean, out_var


def _bwd_impl(g: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, norm_weight: Tensor, ls: Optional[Tensor],
              rs: Optional[Tensor], pool_size: int, keep: Optional[Tensor] = None
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    B, H, W, C = nhwc_shape(x)
    grid, bw, bc = _grid(x)
    pc = torch.empty((grid[0] * grid[1], 2, C), dtype=torch.float32, device=x.device)
    ps = torch.empty((B, H * grid[1] * grid[2]), dtype=torch.float32, device=x.device)
    flags = dict(P=pool_size, HAS_LS=ls is not None, HAS_RS=rs is not None, BLOCK_W=bw, BLOCK_C=bc, num_warps=4,
                 HAS_KEEP=keep is not None)
    k = _load()
    k.bwd_reduce[grid](g, x, rstd, norm_weight, stand_in(ls, x), pc, ps, H, W, C, stand_in(keep, x), **flags)
    dx = torch.empty_like(x)
    k.bwd_apply[grid](g, x, mean, rstd, ps.sum(1), 1.0 / (x.numel() // B), norm_weight, stand_in(ls, x),
                      stand_in(rs, x), dx, H, W, C, stand_in(keep, x), **flags)
    s = pc[:, 0].sum(0)
    dw = s * ls.float() if ls is not None else s
    dls = s * norm_weight.float() if ls is not None else absent(x, torch.float32)
    drs = pc[:, 1].sum(0) if rs is not None else absent(x, torch.float32)
    return dx, dw, dls, drs


# ----------------------------------------------------------------------------- op registration

def _fwd_fake(x, norm_weight, norm_bias, eps, ls, rs, pool_size, out_dtype, keep=None):
    B = x.shape[0]

    def vec():
        return x.new_empty(B, dtype=torch.float32)

    return torch.empty_like(x, dtype=out_dtype), vec(), vec(), vec(), vec()


def _bwd_fake(g, x, mean, rstd, norm_weight, ls, rs, pool_size, keep=None):
    C = x.shape[1]

    def vec(flag):
        return x.new_empty(C if flag else 0, dtype=torch.float32)

    return torch.empty_like(x), vec(True), vec(ls is not None), vec(rs is not None)


def _setup(ctx, inputs, output):
    x, norm_weight, norm_bias, eps, ls, rs, pool_size, _, keep = inputs
    out, mean, rstd, out_mean, out_var = output
    ctx.mark_non_differentiable(mean, rstd, out_mean, out_var)
    ctx.pool_size = pool_size
    ctx.has_bias = norm_bias is not None
    ctx.save_for_backward(x, mean, rstd, norm_weight, ls, rs, keep)


def _backward(ctx, g, *_):
    x, mean, rstd, norm_weight, ls, rs, keep = ctx.saved_tensors
    dx, dw, dls, drs = _bwd_op(dense_in_layout(g, True), x, mean, rstd, norm_weight, ls, rs, ctx.pool_size, keep)
    db = torch.zeros_like(norm_weight) if ctx.has_bias else None
    return (dx, dw.to(norm_weight.dtype), db, None, dls.to(ls.dtype) if ls is not None else None,
            drs.to(rs.dtype) if rs is not None else None, None, None, None)


_bwd_op = BackwardOp("metazoo::pool_mixer_bwd", _bwd_impl, _bwd_fake)
_fwd = ForwardOp("metazoo::pool_mixer_fwd", _fwd_impl, _fwd_fake, _setup, _backward)


# ----------------------------------------------------------------------------- public dispatcher

@dispatcher(pool_mixer_ref)
def pool_mixer(x: Tensor, norm_weight: Tensor, norm_bias: Optional[Tensor] = None, eps: float = 1e-5,
               ls: Optional[Tensor] = None, rs: Optional[Tensor] = None, pool_size: int = 3,
               backend: Optional[str] = None, keep: Optional[Tensor] = None
               ) -> tuple[Tensor, Optional[tuple[Tensor, Tensor]]]:
    """PoolFormer token-mixer half-block on NCHW (``keep``: drop path's per-sample keep/(1-p), fp32).
    Returns ``(out, moments of out or None)``; pass the
    moments to :func:`metazoo.kernels.group_norm.group_norm1` to skip its statistics pass."""
    _check(x, pool_size)
    check_keep(keep, x, "pool_mixer")
    if resolve(backend, x) == "torch":
        return pool_mixer_ref(x, norm_weight, norm_bias, eps, ls, rs, pool_size, keep=keep)
    out_dtype = promoted(x, rs, ls, norm_dtype(x))
    out, _, _, out_mean, out_var = _fwd(dense_in_layout(x, True), norm_weight, norm_bias, float(eps),
                                           ls, rs, int(pool_size), out_dtype, keep)
    return out, (out_mean, out_var)
