"""Depthwise KxK convolution (stride 1, same padding) on channels-last maps, fwd and bwd.

Optionally applies StarReLU to the input (ConvFormer's SepConv: ``dwconv(act(pw1(x)))``); the
activated tensor is not kept for backward, which recomputes it. The input may be a channel slice
of a wider NHWC tensor (MambaOut's ``fc1`` output), or an NCHW map in channels_last memory: only
the channel dim must be unit-stride.
The forward and the input gradient are one Triton kernel (taps mirrored for the gradient) that
loads each input row once per horizontal tap and feeds every output row of its tile from it; the
activation is applied as the input is read in forward, and its derivative and scalar grads are
fused into the input gradient. The weight/bias gradient is cuDNN's channels-last depthwise kernel.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

from ._autograd import BackwardOp, ForwardOp, or_absent
from ._layout import cdiv, dense_in_layout, next_pow2, nhwc_shape
from .dispatch import dispatcher, lazy_triton, resolve
from .star_relu import star_relu_apply


# ----------------------------------------------------------------------------- input checks

def _check(x: Tensor, weight: Tensor, act_scale, act_bias, channels_first: bool):
    C = x.shape[1] if channels_first else x.shape[-1]
    K = weight.shape[-1]
    if x.dim() != 4:
        raise ValueError(f"dwconv2d: x must be 4-D (NCHW or NHWC), got shape {tuple(x.shape)}")
    if tuple(weight.shape) != (C, 1, K, K) or K % 2 != 1:
        raise ValueError(f"dwconv2d: weight must be (C, 1, K, K) with C={C} and odd K, got {tuple(weight.shape)}")
    if (act_scale is None) != (act_bias is None):
        raise ValueError("dwconv2d: act_scale and act_bias must be given together (StarReLU) or both None")


# ----------------------------------------------------------------------------- reference

def dwconv2d_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, act_scale: Optional[Tensor] = None,
                 act_bias: Optional[Tensor] = None, channels_first: bool = True,
                 backend: Optional[str] = None) -> Tensor:
    """Plain PyTorch reference: ``conv2d(starrelu(x) if act else x)``, depthwise, same padding."""
    _check(x, weight, act_scale, act_bias, channels_first)
    if act_scale is not None:
        x = (act_scale * torch.relu(x) ** 2 + act_bias).to(x.dtype)
    xc = x if channels_first else x.permute(0, 3, 1, 2)
    y = torch.nn.functional.conv2d(xc, weight.to(x.dtype), bias.to(x.dtype) if bias is not None else None,
                                   padding=weight.shape[-1] // 2, groups=weight.shape[0])
    return y if channels_first else y.permute(0, 2, 3, 1)


# ----------------------------------------------------------------------------- Triton kernels

@lazy_triton
def _load(triton, tl):
    """Build this module's Triton kernels (run once, on first use)."""

    @triton.jit
    def conv(X, Wt, Bias, AS, AB, Y, A, PS, PB, H, W, C, n_htiles, sxb, sxh, sxw, syb, syh, syw, sab, sah, saw,
             K: tl.constexpr, FLIP: tl.constexpr, ACT_IN: tl.constexpr, ACT_GRAD: tl.constexpr,
             HAS_BIAS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
        # One program: BLOCK_H output rows x BLOCK_W columns x BLOCK_C channels. Each of the
        # BLOCK_H + K - 1 input rows it reads is loaded once per horizontal tap (K loads) and
        # added to every output row it feeds, with that row's vertical tap gathered per row
        # (zero where out of the kernel): K loads per input row instead of K*K per output row.
        # FLIP mirrors the taps (the input gradient); ACT_IN applies StarReLU to what it reads
        # (rounded to the input dtype, as the reference's activated map); ACT_GRAD multiplies by
        # act'(a) and reduces the activation's scalar grads (one partial sum per program).
        # Taps are read as (K*K, C) in the input's dtype (as autocast's conv reads its weight). Loads
        # take the accumulator's 3-D shape (broadcast over rows or columns), so loads, taps and the
        # accumulator share one register layout: no layout conversion inside the loop (sm_90 SASS).
        pid_bh = tl.program_id(0)
        b = pid_bh // n_htiles
        h0 = (pid_bh % n_htiles) * BLOCK_H
        rows = tl.arange(0, BLOCK_H)[:, None, None]
        ws = (tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W))[None, :, None]
        cs = (tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C))[None, None, :]
        cmask = cs < C
        PAD: tl.constexpr = K // 2
        xb = X + b.to(tl.int64) * sxb
        if ACT_IN:
            s_in = tl.load(AS).to(tl.float32)
            b_in = tl.load(AB).to(tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_W, BLOCK_C], dtype=tl.float32)
        zero = tl.zeros([BLOCK_H, BLOCK_W, BLOCK_C], dtype=tl.int32)  # loads take the accumulator's shape
        full = zero == 0
        for r in range(BLOCK_H + K - 1):
            ih = h0 + r - PAD
            row_ok = (ih >= 0) & (ih < H)
            kh = r - rows  # vertical tap of each output row fed by this input row
            kh_ok = (kh >= 0) & (kh < K) & cmask
            if FLIP:
                kh = K - 1 - kh
            for kw in tl.static_range(K):
                iw = ws + kw - PAD
                m = row_ok & (iw >= 0) & (iw < W) & cmask
                v = tl.load(xb + ih * sxh + iw * sxw + cs + zero, mask=m & full, other=0.0)
                if ACT_IN:
                    rl = tl.maximum(v.to(tl.float32), 0.0)
                    v = tl.where(m, (s_in * rl * rl + b_in).to(X.dtype.element_ty), 0.0)
                tap = kh * K + (K - 1 - kw if FLIP else kw)
                wv = tl.load(Wt + tap * C + cs + zero, mask=kh_ok & full, other=0.0).to(tl.float32)
                acc += v.to(tl.float32) * wv
        hs = h0 + rows
        om = (hs < H) & (ws < W) & cmask
        if HAS_BIAS:
            acc += tl.load(Bias + cs, mask=cmask, other=0.0).to(tl.float32)
        if ACT_GRAD:
            s2 = tl.load(AS).to(tl.float32)
            a = tl.load(A + b.to(tl.int64) * sab + hs * sah + ws * saw + cs, mask=om, other=0.0).to(tl.float32)
            rl = tl.maximum(a, 0.0)
            lin = tl.program_id(0) * tl.num_programs(1) * tl.num_programs(2) + \
                tl.program_id(1) * tl.num_programs(2) + tl.program_id(2)
            tl.store(PS + lin, tl.sum(tl.sum(tl.sum(acc * rl * rl, axis=2), axis=1), axis=0))
            tl.store(PB + lin, tl.sum(tl.sum(tl.sum(tl.where(om, acc, 0.0), axis=2), axis=1), axis=0))
            acc = 2.0 * s2 * rl * acc
        tl.store(Y + b.to(tl.int64) * syb + hs * syh + ws * syw + cs, acc.to(Y.dtype.element_ty), mask=om)

    return SimpleNamespace(conv=conv)


# ----------------------------------------------------------------------------- launchers

Tiles = tuple[int, int, int, int]  # (BLOCK_H, BLOCK_W, BLOCK_C, num_warps)


def _tiles(H: int, W: int, C: int) -> Tiles:
    """Default launch tiles: 8 output rows x 8 columns x 64 channels, 4 warps."""
    return min(8, next_pow2(H)), min(8, next_pow2(W)), min(64, next_pow2(C)), 4


def _nhwc(t: Tensor, channels_first: bool) -> tuple[tuple[int, int, int, int], tuple[int, int, int]]:
    """(B, H, W, C) and the (batch, row, column) strides of a map whose channel dim is unit-stride."""
    if channels_first:
        return nhwc_shape(t), (t.stride(0), t.stride(2), t.stride(3))
    return tuple(t.shape), (t.stride(0), t.stride(1), t.stride(2))


def new_map(x: Tensor, channels_first: bool) -> Tensor:
    """An uninitialised map shaped like ``x``: NCHW in channels_last memory, or contiguous NHWC."""
    if channels_first:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _launch(src: Tensor, weight: Tensor, out: Tensor, channels_first: bool, tiles: Optional[Tiles], *,
            flip: bool = False, bias: Optional[Tensor] = None, act_scale: Optional[Tensor] = None,
            act_bias: Optional[Tensor] = None, act_in: Optional[Tensor] = None) -> Optional[Tensor]:
    """Run the conv kernel from ``src`` into ``out`` (same shape, any unit-stride-channel strides).
    With ``act_in`` (the forward input ``x``; ``flip`` set) the activation's derivative at ``x`` is
    applied and the (2, n_programs) partial sums of its scalar grads are returned."""
    conv = _load().conv
    (B, H, W, C), ss = _nhwc(src, channels_first)
    K = weight.shape[-1]
    tiles = tiles or _tiles(H, W, C)
    bh, bw, bc, warps = tiles
    n_h = cdiv(H, bh)
    grid = (B * n_h, cdiv(W, bw), cdiv(C, bc))
    grad = act_in is not None
    parts = torch.empty(2, grid[0] * grid[1] * grid[2], dtype=torch.float32, device=src.device) if grad else None
    taps = weight.reshape(C, K * K).t().to(src.dtype).contiguous()  # (K*K, C): a tap's channels contiguous
    conv[grid](
        src, taps, bias if bias is not None else taps, act_scale if act_scale is not None else taps,
        act_bias if act_bias is not None else taps, out, act_in if grad else src,
        parts[0] if grad else taps, parts[1] if grad else taps, H, W, C, n_h, *ss,
        *_nhwc(out, channels_first)[1], *_nhwc(act_in if grad else src, channels_first)[1],
        K=K, FLIP=flip, ACT_IN=act_scale is not None and not grad, ACT_GRAD=grad, HAS_BIAS=bias is not None,
        BLOCK_H=bh, BLOCK_W=bw, BLOCK_C=bc, num_warps=warps)
    return parts


def conv_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], act_scale: Optional[Tensor],
                 act_bias: Optional[Tensor], channels_first: bool = False, tiles: Optional[Tiles] = None) -> Tensor:
    """Depthwise conv of ``act(x)`` (``x`` NHWC, or NCHW with ``channels_first``; any strides with a
    unit-stride channel dim); returns a map of the same shape (contiguous NHWC, or NCHW channels_last)."""
    y = new_map(x, channels_first)
    _launch(x, weight, y, channels_first, tiles, bias=bias, act_scale=act_scale, act_bias=act_bias)
    return y


def conv_backward(g: Tensor, x: Tensor, weight: Tensor, has_bias: bool, act_scale: Optional[Tensor],
                  act_bias: Optional[Tensor], dx: Tensor, tiles: Optional[Tiles] = None, channels_first: bool = False
                  ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Write the input gradient into ``dx`` (Triton; any strides with a unit-stride channel dim, layout
    as :func:`conv_forward`); return (dweight, dbias, dact_scale, dact_bias)."""
    C = x.shape[1] if channels_first else x.shape[-1]
    K = weight.shape[-1]
    g = dense_in_layout(g, channels_first)
    act = act_scale is not None
    parts = _launch(g, weight, dx, channels_first, tiles, flip=True, act_scale=act_scale,
                    act_in=x if act else None)
    # Weight (and bias) gradient: a reduction over the whole batch, where cuDNN's depthwise kernel
    # beats a Triton reduction; it needs the activated input, recomputed here instead of stored.
    a = star_relu_apply(x, act_scale, act_bias) if act else x
    if not channels_first:
        g, a = g.permute(0, 3, 1, 2), a.permute(0, 3, 1, 2)
    _, dweight, dbias = torch.ops.aten.convolution_backward(
        g, a, weight.to(x.dtype), [C] if has_bias else None, [1, 1],
        [K // 2, K // 2], [1, 1], False, [0, 0], C, [False, True, has_bias])
    dscale, dbias_act = (parts[0].sum().reshape(1), parts[1].sum().reshape(1)) if act else (None, None)
    return dweight.float(), dbias.float() if has_bias else None, dscale, dbias_act


def _fwd_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], act_scale: Optional[Tensor],
              act_bias: Optional[Tensor], channels_first: bool) -> Tensor:
    return conv_forward(x, weight, bias, act_scale, act_bias, channels_first=channels_first)


def _bwd_impl(g: Tensor, x: Tensor, weight: Tensor, has_bias: bool, act_scale: Optional[Tensor],
              act_bias: Optional[Tensor], channels_first: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dx = new_map(x, channels_first)
    dw, db, ds, dab = conv_backward(g, x, weight, has_bias, act_scale, act_bias, dx, channels_first=channels_first)
    f32 = torch.float32
    return dx, dw, or_absent(db, x, f32), or_absent(ds, x, f32), or_absent(dab, x, f32)


# ----------------------------------------------------------------------------- op registration

def _fwd_fake(x, weight, bias, act_scale, act_bias, channels_first):
    return new_map(x, channels_first)


def _bwd_fake(g, x, weight, has_bias, act_scale, act_bias, channels_first):
    C = x.shape[1] if channels_first else x.shape[-1]
    act = act_scale is not None
    f32 = torch.float32
    return (new_map(x, channels_first), weight.new_empty(weight.shape, dtype=f32),
            x.new_empty(C if has_bias else 0, dtype=f32), x.new_empty(1 if act else 0, dtype=f32),
            x.new_empty(1 if act else 0, dtype=f32))


def _setup(ctx, inputs, output):
    x, weight, bias, act_scale, act_bias, channels_first = inputs
    ctx.has_bias, ctx.channels_first = bias is not None, channels_first
    ctx.save_for_backward(x, weight, act_scale, act_bias)


def _backward(ctx, g):
    x, weight, act_scale, act_bias = ctx.saved_tensors
    dx, dw, db, ds, dab = _bwd_op(g, x, weight, ctx.has_bias, act_scale, act_bias, ctx.channels_first)
    act = act_scale is not None
    return (dx, dw.to(weight.dtype), db.to(weight.dtype) if ctx.has_bias else None,
            ds.to(act_scale.dtype) if act else None, dab.to(act_bias.dtype) if act else None, None)


_bwd_op = BackwardOp("metazoo::dwconv_bwd", _bwd_impl, _bwd_fake)
_fwd = ForwardOp("metazoo::dwconv_fwd", _fwd_impl, _fwd_fake, _setup, _backward)


# ----------------------------------------------------------------------------- public dispatcher

@dispatcher(dwconv2d_ref)
def dwconv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, act_scale: Optional[Tensor] = None,
             act_bias: Optional[Tensor] = None, channels_first: bool = True,
             backend: Optional[str] = None) -> Tensor:
    """Depthwise conv (weight (C,1,K,K), same padding) of ``starrelu(x)`` when ``act_*`` are given, else of x."""
    _check(x, weight, act_scale, act_bias, channels_first)
    if resolve(backend, x) == "torch":
        return dwconv2d_ref(x, weight, bias, act_scale, act_bias, channels_first)
    if channels_first:  # read in place when channels are unit-stride (channels_last memory)
        xr = x if x.stride(1) == 1 else x.contiguous(memory_format=torch.channels_last)
    else:
        xr = x if x.stride(-1) == 1 else x.contiguous()
    return _fwd(xr, weight, bias, act_scale, act_bias, bool(channels_first))
