"""Depthwise KxK convolution (stride 1, same padding) on channels-last maps, fwd and bwd.

Optionally applies StarReLU to the input (ConvFormer's SepConv: ``dwconv(act(pw1(x)))``); the
activated tensor is not kept for backward, which recomputes it. The input may be a channel slice
of a wider NHWC tensor (MambaOut's ``fc1`` output), or an NCHW map in channels_last memory: only
the channel dim must be unit-stride.
The forward conv and the weight/bias gradient are cuDNN's channels-last depthwise kernels; the
input gradient is Triton, fused with the activation's derivative and its scalar grads. Profiled in
the whole ConvFormer-S18 training step (H100, bf16, batch 128; bench/results/speed_convformer_s18*):
cuDNN's forward took 3.2 ms, our Triton forward with the activation fused ~6.4 ms; the Triton input
gradient (~6.4 ms with the activation's grads) matches cuDNN's (7.0 ms without them).
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
    def conv(G, Wt, AS, DX, A, PS, PB, H, W, C, n_htiles, sgb, sgh, sgw, sdb, sdh, sdw, sab, sah, saw,
             K: tl.constexpr, ACT_GRAD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
             BLOCK_C: tl.constexpr):
        # Input gradient of y = conv(act(x)): one program, BLOCK_H x BLOCK_W pixels (flattened to one
        # tile axis) x BLOCK_C channels, taps mirrored. With ACT_GRAD it multiplies by act'(a) at the
        # centre and reduces the activation's scalar grads (one partial sum per program).
        pid_bh = tl.program_id(0)
        b = pid_bh // n_htiles
        r = tl.arange(0, BLOCK_H * BLOCK_W)
        hs = (pid_bh % n_htiles) * BLOCK_H + r // BLOCK_W
        ws = tl.program_id(1) * BLOCK_W + r % BLOCK_W
        cs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cs < C
        PAD: tl.constexpr = K // 2
        acc = tl.zeros([BLOCK_H * BLOCK_W, BLOCK_C], dtype=tl.float32)
        gb = G + b.to(tl.int64) * sgb
        for kh in tl.static_range(K):
            hh = hs + PAD - kh
            hval = (hh >= 0) & (hh < H)
            for kw in tl.static_range(K):
                ww = ws + PAD - kw
                m = (hval & (ww >= 0) & (ww < W))[:, None] & cmask[None, :]
                v = tl.load(gb + (hh * sgh + ww * sgw)[:, None] + cs[None, :], mask=m, other=0.0).to(tl.float32)
                wv = tl.load(Wt + cs * (K * K) + (kh * K + kw), mask=cmask, other=0.0).to(tl.float32)
                acc += v * wv[None, :]
        om = ((hs < H) & (ws < W))[:, None] & cmask[None, :]
        if ACT_GRAD:
            s2 = tl.load(AS).to(tl.float32)
            a = tl.load(A + b.to(tl.int64) * sab + (hs * sah + ws * saw)[:, None] + cs[None, :], mask=om,
                        other=0.0).to(tl.float32)
            rl = tl.maximum(a, 0.0)
            lin = tl.program_id(0) * tl.num_programs(1) * tl.num_programs(2) + \
                tl.program_id(1) * tl.num_programs(2) + tl.program_id(2)
            tl.store(PS + lin, tl.sum(tl.sum(acc * rl * rl, axis=1), axis=0))
            tl.store(PB + lin, tl.sum(tl.sum(tl.where(om, acc, 0.0), axis=1), axis=0))
            acc = 2.0 * s2 * rl * acc
        tl.store(DX + b.to(tl.int64) * sdb + (hs * sdh + ws * sdw)[:, None] + cs[None, :],
                 acc.to(DX.dtype.element_ty), mask=om)

    return SimpleNamespace(conv=conv)


# ----------------------------------------------------------------------------- launchers

Tiles = tuple[int, int, int, int]  # (BLOCK_H, BLOCK_W, BLOCK_C, num_warps)


def _tiles(H: int, W: int, C: int) -> Tiles:
    """Default launch tiles of the input-gradient pass: 2 rows x 8 columns x 128 channels was its fastest of
    12 tiles at ConvFormer and MambaOut shapes on an H100 (``bench/dwconv_sweep.py``, results/dwconv_sweep.json;
    1.4x-1.7x the 1x16x64 tile it replaced)."""
    return min(2, H), min(8, next_pow2(W)), min(128, next_pow2(C)), 4


def _grid(B: int, H: int, W: int, C: int, tiles: Tiles) -> tuple[tuple[int, int, int], int]:
    bh, bw, bc, _ = tiles
    n_h = cdiv(H, bh)
    return (B * n_h, cdiv(W, bw), cdiv(C, bc)), n_h


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


def _as_nchw(t: Tensor, channels_first: bool) -> Tensor:
    """``t`` as an NCHW view of channels_last memory (copied only when not densely packed so)."""
    t = t if channels_first else t.permute(0, 3, 1, 2)
    return t.contiguous(memory_format=torch.channels_last)


def conv_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], act_scale: Optional[Tensor],
                 act_bias: Optional[Tensor], channels_first: bool = False) -> Tensor:
    """cuDNN's depthwise conv of ``act(x)`` (``x`` NHWC, or NCHW with ``channels_first``; channel dim
    unit-stride); returns a map of the same shape (contiguous NHWC, or NCHW channels_last)."""
    a = star_relu_apply(x, act_scale, act_bias) if act_scale is not None else x
    K = weight.shape[-1]
    with torch.autocast(x.device.type, enabled=False):  # the op's output dtype is the input's
        y = torch.ops.aten.convolution(
            _as_nchw(a, channels_first), weight.to(a.dtype), bias.to(a.dtype) if bias is not None else None,
            [1, 1], [K // 2, K // 2], [1, 1], False, [0, 0], weight.shape[0])
    y = y.contiguous(memory_format=torch.channels_last)
    return y if channels_first else y.permute(0, 2, 3, 1)


def conv_backward(g: Tensor, x: Tensor, weight: Tensor, has_bias: bool, act_scale: Optional[Tensor],
                  act_bias: Optional[Tensor], dx: Tensor, tiles: Optional[Tiles] = None, channels_first: bool = False
                  ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Write the input gradient into ``dx`` (Triton; any strides with a unit-stride channel dim, layout
    as :func:`conv_forward`); return (dweight, dbias, dact_scale, dact_bias)."""
    conv = _load().conv
    (B, H, W, C), sx = _nhwc(x, channels_first)
    K = weight.shape[-1]
    g = dense_in_layout(g, channels_first)
    tiles = tiles or _tiles(H, W, C)
    grid, n_h = _grid(B, H, W, C, tiles)
    act = act_scale is not None
    n_prog = grid[0] * grid[1] * grid[2]
    ps = torch.empty(n_prog, dtype=torch.float32, device=x.device) if act else None
    pb = torch.empty_like(ps) if act else None
    conv[grid](
        g, weight, act_scale if act else g, dx, x, ps if act else g, pb if act else g, H, W, C, n_h,
        *_nhwc(g, channels_first)[1], *_nhwc(dx, channels_first)[1], *sx,
        K=K, ACT_GRAD=act, BLOCK_H=tiles[0], BLOCK_W=tiles[1], BLOCK_C=tiles[2], num_warps=tiles[3])
    # Weight (and bias) gradient: a reduction over the whole batch, where cuDNN's depthwise kernel
    # beats a Triton reduction; it needs the activated input, recomputed here instead of stored.
    a = star_relu_apply(x, act_scale, act_bias) if act else x
    if not channels_first:
        g, a = g.permute(0, 3, 1, 2), a.permute(0, 3, 1, 2)
    _, dweight, dbias = torch.ops.aten.convolution_backward(
        g, a, weight.to(x.dtype), [C] if has_bias else None, [1, 1],
        [K // 2, K // 2], [1, 1], False, [0, 0], C, [False, True, has_bias])
    return (dweight.float(), dbias.float() if has_bias else None, (ps.sum().reshape(1) if act else None),
            (pb.sum().reshape(1) if act else None))


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
