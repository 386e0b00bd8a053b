"""AFF frequency-domain filter: one fused Triton kernel (forward and backward) beside its reference.

The filter (AFFNet, Huang et al. 2023) takes the 2-D real FFT of a feature map, runs a
block-diagonal complex two-layer MLP (ReLU between, soft-shrinkage after) over channel groups of
that spectrum to get a mask, and multiplies the mask into the spectrum. Unfused, PyTorch keeps a
dozen spectrum-sized fp32 temporaries alive for backward; the kernel reads the spectrum once,
keeps the MLP in registers, writes the product once, and recomputes the MLP in backward.

Layout: ``x`` is the interleaved real/imag spectrum ``(B, C, *S, 2)`` (``torch.view_as_real`` of
``torch.fft.rfft2``); weights use the official layout ``w (2, nb, bs, bs)``, ``b (2, nb, bs)`` with
index 0 real and 1 imaginary, ``C = nb * bs``. ``compute_dtype`` is the MLP's operand dtype
(bf16/fp16 under autocast); accumulation, shrinkage and the complex product stay in fp32.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from ._autograd import BackwardOp, ForwardOp
from ._layout import cdiv, next_pow2, sm_count
from .dispatch import dispatcher, interpret_mode, lazy_triton, resolve

COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ACTS = ("relu", "silu")


# ----------------------------------------------------------------------------- input checks

def _check(x, w1, b1, w2, b2, lambd, compute_dtype, act):
    """Validate shapes/dtypes at the boundary; returns ``(num_blocks, block_size, compute_dtype)``."""
    if x.dim() < 3 or x.shape[-1] != 2:
        raise ValueError(f"x must be an interleaved real/imag spectrum of shape (B, C, *spatial, 2), "
                         f"got {tuple(x.shape)}")
    if x.dtype not in COMPUTE_DTYPES:
        raise ValueError(f"x.dtype={x.dtype} is not supported; accepted: {COMPUTE_DTYPES}")
    if w1.dim() != 4 or w1.shape[0] != 2 or w1.shape[2] != w1.shape[3]:
        raise ValueError(f"w1 must have shape (2, num_blocks, block_size, block_size), got {tuple(w1.shape)}")
    nb, bs = w1.shape[1], w1.shape[2]
    for name, t, shape in (("w2", w2, (2, nb, bs, bs)), ("b1", b1, (2, nb, bs)), ("b2", b2, (2, nb, bs))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (from w1), got {tuple(t.shape)}")
    if x.shape[1] != nb * bs:
        raise ValueError(f"x has {x.shape[1]} channels; accepted: num_blocks * block_size = {nb * bs}")
    if not lambd >= 0:
        raise ValueError(f"lambd={lambd} must be >= 0 (soft-shrinkage threshold)")
    if act not in ACTS:
        raise ValueError(f"act={act!r} is not supported; accepted: {', '.join(ACTS)}")
    cd = x.dtype if compute_dtype is None else compute_dtype
    if cd not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype={compute_dtype} is not supported; accepted: None, {COMPUTE_DTYPES}")
    return nb, bs, cd


# ----------------------------------------------------------------------------- reference

def aff_filter_ref(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                   b2: torch.Tensor, lambd: float = 0.01, compute_dtype: torch.dtype | None = None,
                   act: str = "relu", backend: str | None = None) -> torch.Tensor:
    """Plain PyTorch filter: ``softshrink(MLP(x)) * x`` on complex channel groups (see module doc)."""
    nb, bs, cd = _check(x, w1, b1, w2, b2, lambd, compute_dtype, act)
    shape = x.shape
    xf = x.float().reshape(shape[0], nb, bs, -1, 2)
    xr, xi = xf[..., 0], xf[..., 1]

    def clinear(ar, ai, w, b):
        wr, wi = w[0].to(cd), w[1].to(cd)
        ar, ai = ar.to(cd), ai.to(cd)
        mm = functools.partial(torch.einsum, "bkin,kio->bkon")
        outr = (mm(ar, wr) - mm(ai, wi)).float() + b[0, :, :, None].float()
        outi = (mm(ai, wr) + mm(ar, wi)).float() + b[1, :, :, None].float()
        return outr, outi

    hr, hi = clinear(xr, xi, w1, b1)
    actf = F.relu if act == "relu" else F.silu
    mr, mi = clinear(actf(hr), actf(hi), w2, b2)
    mr, mi = F.softshrink(mr, lambd), F.softshrink(mi, lambd)
    y = torch.stack((mr * xr - mi * xi, mr * xi + mi * xr), dim=-1)
    return y.reshape(shape).to(x.dtype)


# ----------------------------------------------------------------------------- Triton kernels

@lazy_triton
def _load(triton, tl):
    """Build this module's Triton helpers and kernels (run once, on first use)."""

    @triton.jit
    def _load_tile(rows, R, N, C, k, BS, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """Offsets/mask of a [BLOCK_R, BLOCK_D, 2] tile: rows (batch*spatial) x group channels x re/im."""
        b = rows // N
        n = rows - b * N
        row_off = b.to(tl.int64) * C * N * 2 + n * 2
        d = tl.arange(0, BLOCK_D)
        ch_off = (k * BS + d).to(tl.int64) * N * 2
        ri = tl.arange(0, 2)
        off = row_off[:, None, None] + ch_off[None, :, None] + ri[None, None, :]
        mask = (rows < R)[:, None, None] & (d < BS)[None, :, None] & (ri < 2)[None, None, :]
        return off, mask

    @triton.jit
    def _load_w(w_ptr, k, C, BS, BLOCK_D: tl.constexpr):
        """Real and imaginary [BLOCK_D, BLOCK_D] weight tiles of group ``k`` (zero padded)."""
        d = tl.arange(0, BLOCK_D)
        off = (k * BS + d[:, None]) * BS + d[None, :]
        mask = (d < BS)[:, None] & (d < BS)[None, :]
        wr = tl.load(w_ptr + off, mask=mask, other=0.0).to(tl.float32)
        wi = tl.load(w_ptr + C * BS + off, mask=mask, other=0.0).to(tl.float32)
        return wr, wi

    @triton.jit
    def _load_b(b_ptr, k, C, BS, BLOCK_D: tl.constexpr):
        d = tl.arange(0, BLOCK_D)
        m = d < BS
        br = tl.load(b_ptr + k * BS + d, mask=m, other=0.0).to(tl.float32)
        bi = tl.load(b_ptr + C + k * BS + d, mask=m, other=0.0).to(tl.float32)
        return br, bi

    @triton.jit
    def _op(a, CD: tl.constexpr, EMU: tl.constexpr):
        """Dot operand in CD. EMU (interpreter, whose half-precision dots are broken) keeps fp32 values
        rounded to CD; bf16 is rounded to nearest-even by hand since the interpreter truncates."""
        if EMU:
            if CD == tl.bfloat16:
                bits = a.to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                return bits.to(tl.float32, bitcast=True)
            return a.to(CD).to(tl.float32)
        return a.to(CD)

    @triton.jit
    def _cdot(ar, ai, wr, wi, CD: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr):
        """Complex product (ar + i ai) @ (wr + i wi) with operands in CD, fp32 accumulation."""
        ar, ai = _op(ar, CD, EMU), _op(ai, CD, EMU)
        wr_c, wi_c, nwi_c = _op(wr, CD, EMU), _op(wi, CD, EMU), _op(-wi, CD, EMU)
        outr = tl.dot(ai, nwi_c, tl.dot(ar, wr_c, input_precision=PREC), input_precision=PREC)
        outi = tl.dot(ar, wi_c, tl.dot(ai, wr_c, input_precision=PREC), input_precision=PREC)
        return outr, outi

    @triton.jit
    def _cdot_t(gr, gi, wr, wi, CD: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr):
        """Backward of :func:`_cdot` w.r.t. its input: (gr + i gi) @ conj(w)^T."""
        gr, gi = _op(gr, CD, EMU), _op(gi, CD, EMU)
        wrt, wit = _op(tl.trans(wr), CD, EMU), _op(tl.trans(wi), CD, EMU)
        nwit = _op(tl.trans(-wi), CD, EMU)
        outr = tl.dot(gi, wit, tl.dot(gr, wrt, input_precision=PREC), input_precision=PREC)
        outi = tl.dot(gr, nwit, tl.dot(gi, wrt, input_precision=PREC), input_precision=PREC)
        return outr, outi

    @triton.jit
    def _act(a, ACT: tl.constexpr):
        """ReLU (ACT=0) or SiLU (ACT=1), in fp32."""
        if ACT == 0:
            return tl.maximum(a, 0.0)
        return a * tl.sigmoid(a)

    @triton.jit
    def _act_grad(a, g, ACT: tl.constexpr):
        """Gradient through :func:`_act` at pre-activation ``a``."""
        if ACT == 0:
            return tl.where(a > 0.0, g, 0.0)
        s = tl.sigmoid(a)
        return g * s * (1.0 + a * (1.0 - s))

    @triton.jit
    def _shrink(o, lambd):
        return tl.where(o > lambd, o - lambd, tl.where(o < -lambd, o + lambd, 0.0))

    @triton.jit
    def fwd(x_ptr, y_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, R, N, C, BS, lambd,
             BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, CD: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr,
             ACT: tl.constexpr):
        k = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        off, mask = _load_tile(rows, R, N, C, k, BS, BLOCK_R, BLOCK_D)
        xr, xi = tl.split(tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32))
        w1r, w1i = _load_w(w1_ptr, k, C, BS, BLOCK_D)
        w2r, w2i = _load_w(w2_ptr, k, C, BS, BLOCK_D)
        b1r, b1i = _load_b(b1_ptr, k, C, BS, BLOCK_D)
        b2r, b2i = _load_b(b2_ptr, k, C, BS, BLOCK_D)
        hr, hi = _cdot(xr, xi, w1r, w1i, CD, PREC, EMU)
        hr = _act(hr + b1r[None, :], ACT)
        hi = _act(hi + b1i[None, :], ACT)
        mr, mi = _cdot(hr, hi, w2r, w2i, CD, PREC, EMU)
        mr = _shrink(mr + b2r[None, :], lambd)
        mi = _shrink(mi + b2i[None, :], lambd)
        y = tl.join(mr * xr - mi * xi, mr * xi + mi * xr)
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def bwd(x_ptr, gy_ptr, gx_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, gw_ptr, gb_ptr,
             R, N, C, BS, lambd, n_tiles,
             BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, CD: tl.constexpr, PREC: tl.constexpr,
             EMU: tl.constexpr, ACT: tl.constexpr):
        """Recompute the MLP per row tile, write dx, accumulate this program's dW/db partial sums."""
        pid = tl.program_id(0)
        k = tl.program_id(1)
        w1r, w1i = _load_w(w1_ptr, k, C, BS, BLOCK_D)
        w2r, w2i = _load_w(w2_ptr, k, C, BS, BLOCK_D)
        b1r, b1i = _load_b(b1_ptr, k, C, BS, BLOCK_D)
        b2r, b2i = _load_b(b2_ptr, k, C, BS, BLOCK_D)
        gw1r = tl.zeros((BLOCK_D, BLOCK_D), tl.float32)
        gw1i = tl.zeros((BLOCK_D, BLOCK_D), tl.float32)
        gw2r = tl.zeros((BLOCK_D, BLOCK_D), tl.float32)
        gw2i = tl.zeros((BLOCK_D, BLOCK_D), tl.float32)
        gb1r = tl.zeros((BLOCK_D,), tl.float32)
        gb1i = tl.zeros((BLOCK_D,), tl.float32)
        gb2r = tl.zeros((BLOCK_D,), tl.float32)
        gb2i = tl.zeros((BLOCK_D,), tl.float32)
        for t in range(pid, n_tiles, tl.num_programs(0)):
            rows = t * BLOCK_R + tl.arange(0, BLOCK_R)
            off, mask = _load_tile(rows, R, N, C, k, BS, BLOCK_R, BLOCK_D)
            xr, xi = tl.split(tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32))
            gr, gi = tl.split(tl.load(gy_ptr + off, mask=mask, other=0.0).to(tl.float32))
            # recompute forward
            ar, ai = _cdot(xr, xi, w1r, w1i, CD, PREC, EMU)
            ar += b1r[None, :]
            ai += b1i[None, :]
            hr = _act(ar, ACT)
            hi = _act(ai, ACT)
            orr, oi = _cdot(hr, hi, w2r, w2i, CD, PREC, EMU)
            orr += b2r[None, :]
            oi += b2i[None, :]
            mr = _shrink(orr, lambd)
            mi = _shrink(oi, lambd)
            # y = m * x (complex): gradients to the mask and to x directly
            dxr = gr * mr + gi * mi
            dxi = gi * mr - gr * mi
            dor = tl.where(tl.abs(orr) > lambd, gr * xr + gi * xi, 0.0)
            doi = tl.where(tl.abs(oi) > lambd, gi * xr - gr * xi, 0.0)
            # layer 2
            gb2r += tl.sum(dor, axis=0)
            gb2i += tl.sum(doi, axis=0)
            hrt, hit = _op(tl.trans(hr), CD, EMU), _op(tl.trans(hi), CD, EMU)
            dor_c, doi_c = _op(dor, CD, EMU), _op(doi, CD, EMU)
            gw2r = tl.dot(hit, doi_c, tl.dot(hrt, dor_c, gw2r, input_precision=PREC), input_precision=PREC)
            gw2i = tl.dot(hrt, doi_c, gw2i, input_precision=PREC) - tl.dot(hit, dor_c, input_precision=PREC)
            dhr, dhi = _cdot_t(dor, doi, w2r, w2i, CD, PREC, EMU)
            dar = _act_grad(ar, dhr, ACT)
            dai = _act_grad(ai, dhi, ACT)
            # layer 1
            gb1r += tl.sum(dar, axis=0)
            gb1i += tl.sum(dai, axis=0)
            xrt, xit = _op(tl.trans(xr), CD, EMU), _op(tl.trans(xi), CD, EMU)
            dar_c, dai_c = _op(dar, CD, EMU), _op(dai, CD, EMU)
            gw1r = tl.dot(xit, dai_c, tl.dot(xrt, dar_c, gw1r, input_precision=PREC), input_precision=PREC)
            gw1i = tl.dot(xrt, dai_c, gw1i, input_precision=PREC) - tl.dot(xit, dar_c, input_precision=PREC)
            d1r, d1i = _cdot_t(dar, dai, w1r, w1i, CD, PREC, EMU)
            gx = tl.join(dxr + d1r, dxi + d1i)
            tl.store(gx_ptr + off, gx.to(gx_ptr.dtype.element_ty), mask=mask)
        # partial sums: gw[pid, k, j] (j = w1r, w1i, w2r, w2i), gb[pid, k, j]
        d = tl.arange(0, BLOCK_D)
        sq = BLOCK_D * BLOCK_D
        base = (pid * tl.num_programs(1) + k) * 4
        woff = d[:, None] * BLOCK_D + d[None, :]
        tl.store(gw_ptr + (base + 0) * sq + woff, gw1r)
        tl.store(gw_ptr + (base + 1) * sq + woff, gw1i)
        tl.store(gw_ptr + (base + 2) * sq + woff, gw2r)
        tl.store(gw_ptr + (base + 3) * sq + woff, gw2i)
        tl.store(gb_ptr + (base + 0) * BLOCK_D + d, gb1r)
        tl.store(gb_ptr + (base + 1) * BLOCK_D + d, gb1i)
        tl.store(gb_ptr + (base + 2) * BLOCK_D + d, gb2r)
        tl.store(gb_ptr + (base + 3) * BLOCK_D + d, gb2i)

    dtypes = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
    return SimpleNamespace(fwd=fwd, bwd=bwd, dtypes=dtypes)


# ----------------------------------------------------------------------------- launchers

def _config(bs: int, backward: bool):
    """(rows per program, padded group width, warps), picked from ptxas reports for sm_90 with bf16
    operands: no or few register spills, and >= 8 resident warps per SM."""
    block_d = max(16, next_pow2(bs))
    if backward:
        return 16, block_d, 8 if block_d >= 64 else 4
    block_r, warps = {16: (128, 8), 32: (64, 8)}.get(block_d, (16, 4))
    return block_r, block_d, warps


def _bwd_programs(n_tiles: int, nb: int, block_d: int, device: torch.device) -> int:
    """Backward programs per group: ~8 per SM in all, capped so the dW/db partial sums stay <= 16 MiB."""
    cap = max(1, (16 << 20) // (nb * 4 * block_d * block_d * 4))
    return max(1, min(n_tiles, cdiv(8 * sm_count(device), nb), cap))


def _precision(cd: torch.dtype) -> str:
    """fp32 operands: exact fp32 (or TF32 when PyTorch's matmul allows it); half operands ignore it."""
    if interpret_mode():
        return "ieee"
    if cd != torch.float32 or torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _geometry(x: torch.Tensor):
    B, C = x.shape[:2]
    N = x[0, 0, ..., 0].numel()
    return B, C, N, B * N


def _fwd_impl(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, lambd: float, compute_dtype: torch.dtype,
              act: str) -> Tensor:
    x = x.contiguous()
    B, C, N, R = _geometry(x)
    nb, bs = w1.shape[1], w1.shape[2]
    y = torch.empty_like(x)
    block_r, block_d, warps = _config(bs, backward=False)
    k = _load()
    k.fwd[(cdiv(R, block_r), nb)](
        x, y, w1.contiguous(), b1.contiguous(), w2.contiguous(), b2.contiguous(), R, N, C, bs, float(lambd),
        BLOCK_R=block_r, BLOCK_D=block_d, CD=k.dtypes[compute_dtype], PREC=_precision(compute_dtype),
        EMU=interpret_mode(), ACT=ACTS.index(act), num_warps=warps)
    return y


def _bwd_impl(gy: Tensor, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, lambd: float,
              compute_dtype: torch.dtype, act: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    x, gy = x.contiguous(), gy.contiguous()
    B, C, N, R = _geometry(x)
    nb, bs = w1.shape[1], w1.shape[2]
    block_r, block_d, warps = _config(bs, backward=True)
    n_tiles = cdiv(R, block_r)
    grid0 = _bwd_programs(n_tiles, nb, block_d, x.device)
    gx = torch.empty_like(x)
    gw = torch.empty(grid0, nb, 4, block_d, block_d, device=x.device, dtype=torch.float32)
    gb = torch.empty(grid0, nb, 4, block_d, device=x.device, dtype=torch.float32)
    k = _load()
    k.bwd[(grid0, nb)](
        x, gy, gx, w1.contiguous(), b1.contiguous(), w2.contiguous(), b2.contiguous(), gw, gb,
        R, N, C, bs, float(lambd), n_tiles,
        BLOCK_R=block_r, BLOCK_D=block_d, CD=k.dtypes[compute_dtype], PREC=_precision(compute_dtype),
        EMU=interpret_mode(), ACT=ACTS.index(act), num_warps=warps)
    gw = gw.sum(0)[..., :bs, :bs]  # (nb, 4, bs, bs)
    gb = gb.sum(0)[..., :bs]       # (nb, 4, bs)
    gw1 = gw[:, 0:2].transpose(0, 1).to(w1.dtype)
    gw2 = gw[:, 2:4].transpose(0, 1).to(w2.dtype)
    gb1 = gb[:, 0:2].transpose(0, 1).to(b1.dtype)
    gb2 = gb[:, 2:4].transpose(0, 1).to(b2.dtype)
    return gx, gw1.contiguous(), gb1.contiguous(), gw2.contiguous(), gb2.contiguous()


# ----------------------------------------------------------------------------- op registration

def _fwd_fake(x, w1, b1, w2, b2, lambd, compute_dtype, act):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _bwd_fake(gy, x, w1, b1, w2, b2, lambd, compute_dtype, act):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(w1),
            torch.empty_like(b1), torch.empty_like(w2), torch.empty_like(b2))


def _setup(ctx, inputs, output):
    """Saves only the spectrum and the weights: backward recomputes the MLP."""
    x, w1, b1, w2, b2, lambd, compute_dtype, act = inputs
    ctx.save_for_backward(x, w1, b1, w2, b2)
    ctx.args = (lambd, compute_dtype, act)


def _backward(ctx, gy):
    x, w1, b1, w2, b2 = ctx.saved_tensors
    return (*_bwd_op(gy, x, w1, b1, w2, b2, *ctx.args), None, None, None)


_bwd_op = BackwardOp("metazoo::aff_filter_bwd", _bwd_impl, _bwd_fake)
_fwd = ForwardOp("metazoo::aff_filter_fwd", _fwd_impl, _fwd_fake, _setup, _backward)


def aff_filter_flops(x_shape, num_blocks: int, block_size: int) -> int:
    """FLOPs of one filter call: two complex block linears (8 real MACs per weight) + shrink + product."""
    rows = x_shape[0] * (int(torch.Size(x_shape[2:-1]).numel()))
    mlp = 2 * 2 * 4 * num_blocks * block_size * block_size  # 2 layers, 4 real matmuls each, 2 FLOPs/MAC
    pointwise = num_blocks * block_size * (2 * 2 + 2 * 2 + 6)  # biases+act, shrink, complex multiply
    return rows * (mlp + pointwise)


def _register_flops():
    """Let ``torch.utils.flop_counter.FlopCounterMode`` count the fused op (it is opaque otherwise)."""
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.metazoo.aff_filter_fwd)
    def _fwd_flops(x_shape, w1_shape, *args, **kwargs) -> int:
        return aff_filter_flops(x_shape, w1_shape[1], w1_shape[2])

    @register_flop_formula(torch.ops.metazoo.aff_filter_bwd)
    def _bwd_flops(gy_shape, x_shape, w1_shape, *args, **kwargs) -> int:
        return 2 * aff_filter_flops(x_shape, w1_shape[1], w1_shape[2])


_register_flops()


# ----------------------------------------------------------------------------- public dispatcher

@dispatcher(aff_filter_ref)
def aff_filter(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
               lambd: float = 0.01, compute_dtype: torch.dtype | None = None,
               act: str = "relu", backend: str | None = None) -> torch.Tensor:
    """Fused AFF filter (Triton) or its reference, chosen by :func:`metazoo.kernels.dispatch.resolve`."""
    _, _, cd = _check(x, w1, b1, w2, b2, lambd, compute_dtype, act)
    if resolve(backend, x) == "torch":
        return aff_filter_ref(x, w1, b1, w2, b2, lambd, cd, act)
    return _fwd(x.contiguous(), w1, b1, w2, b2, float(lambd), cd, act)
