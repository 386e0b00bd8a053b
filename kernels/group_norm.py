"""One-group GroupNorm (PoolFormer's norm) on channels-last maps: per-sample moments, apply, fwd and bwd.

Statistics are over (C, H, W) of each sample; the affine is per channel. ``moments`` is shared with
the fused pooling mixer, which also hands the moments of its output to the next norm so that norm
skips its own statistics pass. The output takes F.group_norm's dtype (fp32 under CUDA autocast)
unless the caller names ``n_dtype`` (its matmul consumer's input dtype).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

from ._autograd import BackwardOp, ForwardOp
from .dtypes import norm_dtype
from ._layout import cdiv, dense_in_layout, next_pow2
from .dispatch import dispatcher, lazy_triton, resolve

_FLAT = 4096


# ----------------------------------------------------------------------------- input checks

def _check(x: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"group_norm1: x must be NCHW, got shape {tuple(x.shape)}")


# ----------------------------------------------------------------------------- reference

def group_norm1_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, eps: float = 1e-5,
                    moments: Optional[tuple[Tensor, Tensor]] = None, backend: Optional[str] = None,
                    n_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Plain PyTorch reference: ``F.group_norm(x, 1, ...)`` on NCHW (``moments`` is only a hint, unused),
    cast to ``n_dtype`` when given."""
    n = torch.nn.functional.group_norm(x, 1, weight, bias, eps)
    return n.to(n_dtype) if n_dtype is not None else n


# ----------------------------------------------------------------------------- Triton kernels

@lazy_triton
def _load(triton, tl):
    """Build this module's Triton kernels (run once, on first use)."""

    @triton.jit
    def moments(X, P, N, BLOCK: tl.constexpr):
        # Shifted sums (pivot = the sample's first element) keep E[x^2]-E[x]^2 well conditioned.
        # Per sample b: the n tile sums of d, then the n tile sums of d*d.
        b = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        base = X + b.to(tl.int64) * N
        pivot = tl.load(base).to(tl.float32)
        d = tl.where(mask, tl.load(base + offs, mask=mask, other=0.0).to(tl.float32) - pivot, 0.0)
        n = tl.num_programs(1)
        out = P + b * 2 * n + tl.program_id(1)
        tl.store(out, tl.sum(d, axis=0))
        tl.store(out + n, tl.sum(d * d, axis=0))

    @triton.jit
    def finalize(P, PIV, MEAN, VAR, RSTD, n, sp, se, s2, spiv, inv_n, eps, HAS_RSTD: tl.constexpr,
                 BLOCK: tl.constexpr):
        # Sample b: n partial sums of (v - pivot) at P + b*sp + i*se and of (v - pivot)^2 at + s2
        # -> mean, biased variance (and 1/sqrt(var + eps)) of v.
        b = tl.program_id(0)
        base = P + b.to(tl.int64) * sp
        a1 = tl.zeros([BLOCK], dtype=tl.float32)
        a2 = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n, BLOCK):
            i = start + tl.arange(0, BLOCK)
            m = i < n
            a1 += tl.load(base + i * se, mask=m, other=0.0)
            a2 += tl.load(base + s2 + i * se, mask=m, other=0.0)
        m1 = tl.sum(a1, axis=0) * inv_n
        var = tl.maximum(tl.sum(a2, axis=0) * inv_n - m1 * m1, 0.0)
        tl.store(MEAN + b, tl.load(PIV + b.to(tl.int64) * spiv).to(tl.float32) + m1)
        tl.store(VAR + b, var)
        if HAS_RSTD:
            tl.store(RSTD + b, 1.0 / tl.sqrt(var + eps))

    @triton.jit
    def apply(X, MEAN, RSTD, W, B, Y, N, C, HAS_B: tl.constexpr, BLOCK: tl.constexpr):
        s = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        c = offs % C
        base = s.to(tl.int64) * N
        x = tl.load(X + base + offs, mask=mask, other=0.0).to(tl.float32)
        y = (x - tl.load(MEAN + s)) * tl.load(RSTD + s) * tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            y += tl.load(B + c, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + base + offs, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def bwd_reduce(G, X, MEAN, RSTD, W, PS, PC, HW, C, rows_per_prog,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # Per program: sample sums of w*g and w*g*xhat; channel sums of g*xhat and g.
        b = tl.program_id(0)
        cols = tl.arange(0, BLOCK_C)
        cmask = cols < C
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + b)
        rstd = tl.load(RSTD + b)
        a_gx = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        a_g = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        r0 = tl.program_id(1) * rows_per_prog
        for r in range(r0, r0 + rows_per_prog, BLOCK_R):
            rows = r + tl.arange(0, BLOCK_R)
            mask = ((rows < HW) & (rows < r0 + rows_per_prog))[:, None] & cmask[None, :]
            offs = b.to(tl.int64) * HW * C + rows[:, None] * C + cols[None, :]
            g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
            xhat = tl.where(mask, (tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) - mean) * rstd, 0.0)
            a_gx += g * xhat
            a_g += g
        a_gx = tl.sum(a_gx, axis=0)
        a_g = tl.sum(a_g, axis=0)
        a_wg = a_g * w
        a_wgx = a_gx * w
        lin = b * tl.num_programs(1) + tl.program_id(1)
        tl.store(PS + lin * 2, tl.sum(a_wg, axis=0))
        tl.store(PS + lin * 2 + 1, tl.sum(a_wgx, axis=0))
        tl.store(PC + lin * 2 * C + cols, a_gx, mask=cmask)
        tl.store(PC + lin * 2 * C + C + cols, a_g, mask=cmask)

    @triton.jit
    def bwd_apply(G, X, MEAN, RSTD, W, PS, n_chunks, inv_n, DX, N, C, BLOCK: tl.constexpr, BLOCK_CH: tl.constexpr):
        # The sample's sums of w*g and w*g*xhat come from bwd_reduce's per-chunk partials.
        s = tl.program_id(0)
        ch = tl.arange(0, BLOCK_CH)
        part = PS + s * n_chunks * 2 + ch * 2
        sa = tl.sum(tl.load(part, mask=ch < n_chunks, other=0.0), axis=0) * inv_n
        sb = tl.sum(tl.load(part + 1, mask=ch < n_chunks, other=0.0), axis=0) * inv_n
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        c = offs % C
        base = s.to(tl.int64) * N
        rstd = tl.load(RSTD + s)
        xhat = (tl.load(X + base + offs, mask=mask, other=0.0).to(tl.float32) - tl.load(MEAN + s)) * rstd
        wg = tl.load(G + base + offs, mask=mask, other=0.0).to(tl.float32) * tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
        dx = rstd * (wg - sa - xhat * sb)
        tl.store(DX + base + offs, dx.to(DX.dtype.element_ty), mask=mask)

    return SimpleNamespace(moments=moments, apply=apply, bwd_reduce=bwd_reduce, bwd_apply=bwd_apply,
                           finalize=finalize)


# ----------------------------------------------------------------------------- launchers

def finish_moments(parts: Tensor, B: int, n: int, sample_stride: int, elem_stride: int, second: int,
                   pivot: Tensor, pivot_stride: int, N: int, eps: Optional[float] = None
                   ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Per-sample fp32 (mean, var, rstd or None) of a value from ``n`` partial sums per sample of
    ``v - pivot`` (at ``parts + b*sample_stride + i*elem_stride``) and of its square (``+ second``),
    over ``N`` values; one launch instead of a chain of small reductions on the host."""
    finalize = _load().finalize
    f32 = torch.float32
    mean = torch.empty(B, dtype=f32, device=parts.device)
    var = torch.empty(B, dtype=f32, device=parts.device)
    rstd = torch.empty(B, dtype=f32, device=parts.device) if eps is not None else None
    finalize[(B,)](parts, pivot, mean, var, rstd if rstd is not None else var, n, sample_stride, elem_stride,
                   second, pivot_stride, 1.0 / N, float(eps or 0.0), HAS_RSTD=rstd is not None,
                   BLOCK=max(16, min(1024, next_pow2(n))), num_warps=4)
    return mean, var, rstd


def sample_moments(x: Tensor, eps: Optional[float] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Per-sample fp32 (mean, biased variance, ``rsqrt(var + eps)`` when ``eps`` is given) of a
    contiguous (B, ...) tensor: Triton tile sums, then one finishing launch."""
    moments = _load().moments
    B = x.shape[0]
    N = x.numel() // B
    n_tiles = cdiv(N, _FLAT)
    parts = torch.empty((B, 2, n_tiles), dtype=torch.float32, device=x.device)
    moments[(B, n_tiles)](x, parts, N, BLOCK=_FLAT, num_warps=8)
    return finish_moments(parts, B, n_tiles, 2 * n_tiles, 1, n_tiles, x, N, N, eps)


def _fwd_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float, mean: Optional[Tensor],
              var: Optional[Tensor], n_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    if mean is None or var is None:
        mean, _, rstd = sample_moments(x, eps)
    else:
        mean, rstd = mean.clone(), torch.rsqrt(var + eps)  # outputs must not alias the inputs
    return normalise(x, mean, rstd, weight, bias, n_dtype), mean, rstd


def normalise(x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor, bias: Optional[Tensor],
              n_dtype: torch.dtype) -> Tensor:
    """The norm's output in ``n_dtype`` from known per-sample ``mean`` and ``rstd`` (one apply pass)."""
    y = torch.empty_like(x, dtype=n_dtype)
    B, C = x.shape[0], x.shape[1]
    N = x.numel() // B
    _load().apply[(B, cdiv(N, _FLAT))](x, mean, rstd, weight, bias if bias is not None else weight, y, N, C,
                                       HAS_B=bias is not None, BLOCK=_FLAT, num_warps=8)
    return y


def _bwd_impl(g: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    k = _load()
    B, C = x.shape[0], x.shape[1]
    N = x.numel() // B
    HW = N // C
    bc = next_pow2(C)
    br = max(1, 2048 // bc)
    chunks = max(1, min(cdiv(HW, br), cdiv(512, B)))
    rows_per_prog = cdiv(cdiv(HW, chunks), br) * br
    chunks = cdiv(HW, rows_per_prog)
    ps = torch.empty((B, chunks, 2), dtype=torch.float32, device=x.device)
    pc = torch.empty((B, chunks, 2, C), dtype=torch.float32, device=x.device)
    k.bwd_reduce[(B, chunks)](g, x, mean, rstd, weight, ps, pc, HW, C, rows_per_prog, BLOCK_R=br, BLOCK_C=bc,
                              num_warps=4)
    dx = torch.empty_like(x)
    k.bwd_apply[(B, cdiv(N, _FLAT))](g, x, mean, rstd, weight, ps, chunks, 1.0 / N, dx, N, C, BLOCK=_FLAT,
                                     BLOCK_CH=max(16, next_pow2(chunks)), num_warps=8)
    return dx, pc[:, :, 0].sum((0, 1)), pc[:, :, 1].sum((0, 1))


# ----------------------------------------------------------------------------- op registration

def _fwd_fake(x, weight, bias, eps, mean, var, n_dtype):
    B = x.shape[0]
    return torch.empty_like(x, dtype=n_dtype), x.new_empty(B, dtype=torch.float32), x.new_empty(B, dtype=torch.float32)


def _bwd_fake(g, x, weight, mean, rstd):
    C = x.shape[1]
    return torch.empty_like(x), x.new_empty(C, dtype=torch.float32), x.new_empty(C, dtype=torch.float32)


def _setup(ctx, inputs, output):
    x, weight, bias, eps, mean, var, _ = inputs
    _, mean_used, rstd = output
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, mean_used, rstd)


def _backward(ctx, g, g_mean, g_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _bwd_op(dense_in_layout(g, True), x, weight, mean, rstd)
    return dx, dw.to(weight.dtype), (db.to(weight.dtype) if ctx.has_bias else None), None, None, None, None


_bwd_op = BackwardOp("metazoo::group_norm1_bwd", _bwd_impl, _bwd_fake)
_fwd = ForwardOp("metazoo::group_norm1_fwd", _fwd_impl, _fwd_fake, _setup, _backward)


# ----------------------------------------------------------------------------- public dispatcher

@dispatcher(group_norm1_ref)
def group_norm1(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, eps: float = 1e-5,
                moments: Optional[tuple[Tensor, Tensor]] = None, backend: Optional[str] = None,
                n_dtype: Optional[torch.dtype] = None) -> Tensor:
    """One-group GroupNorm of an NCHW map. ``moments`` = per-sample (mean, var) of ``x`` when already known;
    ``n_dtype``: write the result in it (default: F.group_norm's dtype)."""
    _check(x)
    if resolve(backend, x) == "torch":
        return group_norm1_ref(x, weight, bias, eps, n_dtype=n_dtype)
    mean, var = moments if moments is not None else (None, None)
    y, _, _ = _fwd(dense_in_layout(x, True), weight, bias, float(eps), mean, var, n_dtype or norm_dtype(x))
    return y
