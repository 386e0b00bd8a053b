"""S6 selective scan (Mamba's SSM with input-dependent Δ, B, C) as a chunked Triton kernel.

Recurrence per channel ``d`` and state ``n`` (zero-order hold, exactly as the ViM2 paper states
it, i.e. without Mamba's Euler shortcut for B̄)::

    x_t = Δ_t A          a_t = exp(x_t)          b_t = Δ_t φ(x_t) B_t u_t,   φ(x) = (e^x - 1) / x
    h_t = a_t h_{t-1} + b_t                      y_t = Σ_n C_t h_t + D u_t

Layouts: ``u, delta`` (batch, D, L); ``A`` (D, N); ``B, C`` (batch, N, L) or (batch, G, N, L)
with ``D % G == 0`` (group ``g`` drives channels ``g*D/G ... (g+1)*D/G - 1``, which is how the
four cross-scan directions share one launch); ``D, delta_bias`` (D,). The kernels walk the
sequence in chunks, keep the (channels x N) state in registers, scan each chunk with
``tl.associative_scan`` and only write the state at chunk starts (1/CHUNK of the full state)
for the backward pass, which replays each chunk and runs the adjoint scan in reverse.
Tiles are (CHUNK, channels, N) with time outermost, so each thread holds its steps of a chunk
and both scans run in registers (the reverse one on ``tl.flip``-ped tiles, which Triton lowers
to register renaming; ``reverse=True`` went through warp shuffles). Δφ(ΔA) = (e^{ΔA} - 1)/A
and its derivatives use a per-program 1/A, so the loop body has no divisions.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ._autograd import BackwardOp, ForwardOp, or_absent
from ._layout import cdiv, next_pow2
from .dispatch import dispatcher, interpret_mode, lazy_triton, resolve

__all__ = ["selective_scan", "selective_scan_chunked", "selective_scan_ref"]

_SERIES_BELOW = 0.1  # |x| under which φ and φ' use their Taylor series (no cancellation)


# ----------------------------------------------------------------------------- input checks

def _check(u, delta, A, B, C, D, delta_bias):
    """Validate shapes; return (B4, C4) as (batch, G, N, L) views."""
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, D, L); got shape {tuple(u.shape)}")
    bsz, dim, seqlen = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must have u's shape {tuple(u.shape)}; got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (D={dim}, N); got {tuple(A.shape)}")
    n = A.shape[1]
    out = []
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 3:
            t = t.unsqueeze(1)
        if t.dim() != 4 or t.shape[0] != bsz or t.shape[2] != n or t.shape[3] != seqlen or dim % t.shape[1]:
            raise ValueError(f"{name} must be (batch={bsz}, N={n}, L={seqlen}) or (batch, G, N, L) with "
                             f"D={dim} divisible by G; got {tuple(t.shape)}")
        out.append(t)
    if out[0].shape[1] != out[1].shape[1]:
        raise ValueError(f"B and C must have the same number of groups; got {out[0].shape[1]} and {out[1].shape[1]}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (dim,):
            raise ValueError(f"{name} must be (D={dim},) or None; got {tuple(t.shape)}")
    return out[0], out[1]


# ----------------------------------------------------------------------------- reference

def _phi_ref(x: torch.Tensor) -> torch.Tensor:
    """φ(x) = (e^x - 1)/x with φ(0) = 1, differentiable everywhere."""
    small = x.abs() < 1e-6
    xs = torch.where(small, torch.ones_like(x), x)
    return torch.where(small, 1 + 0.5 * x, torch.expm1(xs) / xs)


def selective_scan_ref(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, backend=None):
    """Sequential PyTorch S6 scan (the truth the kernel is tested against); differentiable."""
    B4, C4 = _check(u, delta, A, B, C, D, delta_bias)
    dtype_out = u.dtype
    ct = torch.float64 if u.dtype == torch.float64 else torch.float32
    bsz, dim, seqlen = u.shape
    groups = B4.shape[1]
    u_, dt = u.to(ct), delta.to(ct)
    if delta_bias is not None:
        dt = dt + delta_bias.to(ct)[None, :, None]
    if delta_softplus:
        dt = F.softplus(dt)
    n = A.shape[1]
    # grouped views: (batch, G, D/G, L[, N]); a_t, b_t for every step, then the sequential recurrence
    dt = dt.view(bsz, groups, dim // groups, seqlen, 1)
    x = dt * A.to(ct).view(1, groups, dim // groups, 1, n)
    a = torch.exp(x)
    b = dt * u_.view(bsz, groups, dim // groups, seqlen, 1) * _phi_ref(x) * B4.to(ct).transpose(2, 3)[:, :, None]
    h = u_.new_zeros(bsz, groups, dim // groups, n)
    hs = []
    for a_t, b_t in zip(a.unbind(3), b.unbind(3)):  # unbind: one gradient stack, not one per step
        h = torch.addcmul(b_t, a_t, h)
        hs.append(h)
    y = torch.einsum("bgdln,bgnl->bgdl", torch.stack(hs, dim=3), C4.to(ct)).reshape(bsz, dim, seqlen)
    if D is not None:
        y = y + D.to(ct)[None, :, None] * u_
    return y.to(dtype_out)


def selective_scan_chunked(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                           C: torch.Tensor, D: Optional[torch.Tensor] = None,
                           delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False,
                           chunk: int = 64) -> torch.Tensor:
    """The reference's recurrence in ``log2(chunk) + log2(L/chunk)`` vectorised steps, not L (CPU,
    TorchScript, export: a graph of a few hundred ops whatever L).

    Steps are padded to whole chunks with identity steps (Δ = 0). Within every chunk at once: the
    decay from the chunk start is ``exp(cumsum(ΔA))`` (a sum of non-positive terms, so no overflow)
    and the zero-start state comes from a doubling scan over the chunk's positions; a doubling scan
    over the chunks then carries the state across chunk boundaries. Shapes as
    :func:`selective_scan_ref`. Batches
    run in slices of at most ~2^24 state elements (ViM2's channel mixer scans one sequence per pixel).
    """
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1")
    bsz = u.shape[0]
    step = max(1, (1 << 24) // (u.shape[1] * u.shape[2] * A.shape[1]))
    if bsz <= step:
        return _scan_chunked(u, delta, A, B, C, D, delta_bias, delta_softplus, chunk)
    parts = []
    for i in range(0, bsz, step):
        parts.append(_scan_chunked(u[i:i + step], delta[i:i + step], A, B[i:i + step], C[i:i + step], D, delta_bias,
                                   delta_softplus, chunk))
    return torch.cat(parts, dim=0)


def _doubling_scan(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """``h_t = a_t h_{t-1} + b_t`` from ``h_{-1} = 0`` along ``dim``, in ceil(log2 L) vectorised steps
    (Hillis-Steele: after the step of span k each element holds the map of its last 2k steps). Only
    products of the a's (decays, at most 1) are formed, so nothing overflows; a graph of O(log L) ops."""
    length = a.shape[dim]
    k = 1
    while k < length:
        rest = length - k
        b = torch.cat([b.narrow(dim, 0, k), torch.addcmul(b.narrow(dim, k, rest), a.narrow(dim, k, rest),
                                                           b.narrow(dim, 0, rest))], dim)
        if 2 * k < length:  # the last step needs no new a
            a = torch.cat([a.narrow(dim, 0, k), a.narrow(dim, k, rest) * a.narrow(dim, 0, rest)], dim)
        k *= 2
    return b


def _step_scan(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """:func:`_doubling_scan` as a loop over the steps (less arithmetic, one op per step)."""
    h = b.select(dim, 0)
    hs = [h]
    for t in range(1, a.shape[dim]):
        h = torch.addcmul(b.select(dim, t), a.select(dim, t), h)
        hs.append(h)
    return torch.stack(hs, dim)


def _scan_chunked(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                  D: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor], delta_softplus: bool,
                  chunk: int) -> torch.Tensor:
    """:func:`selective_scan_chunked` on one batch slice."""
    ct = torch.float64 if u.dtype == torch.float64 else torch.float32
    bsz, dim, seqlen = u.shape
    n = A.shape[1]
    B4 = B.unsqueeze(1) if B.dim() == 3 else B
    C4 = C.unsqueeze(1) if C.dim() == 3 else C
    groups = B4.shape[1]
    dg = dim // groups
    dt = delta.to(ct)
    if delta_bias is not None:
        dt = dt + delta_bias.to(ct)[None, :, None]
    if delta_softplus:
        dt = F.softplus(dt)
    nc = (seqlen + chunk - 1) // chunk
    pad = nc * chunk - seqlen  # padded steps have Δ = 0: a = 1, b = 0, the identity map
    dt = F.pad(dt, (0, pad)).view(bsz, groups, dg, nc, chunk, 1)
    uc = F.pad(u.to(ct), (0, pad)).view(bsz, groups, dg, nc, chunk, 1)
    Bc = F.pad(B4.to(ct), (0, pad)).view(bsz, groups, 1, n, nc, chunk).permute(0, 1, 2, 4, 5, 3)
    x = dt * A.to(ct).view(1, groups, dg, 1, 1, n)  # (batch, G, D/G, chunks, chunk, N)
    a = torch.exp(x)
    b = dt * uc * _phi_ref(x) * Bc
    decay = torch.exp(torch.cumsum(x, dim=4))  # product of a from the chunk start
    # traced graphs (torch.compile, export, ONNX) take log-depth scans: O(log L) ops, not O(L); eager and
    # TorchScript loop over the steps (half the arithmetic: ViM2-T at 384 px, 2 CPU cores, 27 s vs 57 s)
    if torch.jit.is_scripting() or not torch.compiler.is_compiling():
        local = _step_scan(a, b, 4)  # zero-start state within every chunk
        ends = _step_scan(decay[:, :, :, :, -1], local[:, :, :, :, -1], 3)  # state after each chunk
    else:
        local = _doubling_scan(a, b, 4)
        ends = _doubling_scan(decay[:, :, :, :, -1], local[:, :, :, :, -1], 3)
    starts = F.pad(ends[:, :, :, :-1], (0, 0, 1, 0))  # state entering each chunk (zero before the first)
    h = torch.addcmul(local, decay, starts[:, :, :, :, None])
    Cc = F.pad(C4.to(ct), (0, pad)).view(bsz, groups, n, nc * chunk)
    y = torch.einsum("bgdln,bgnl->bgdl", h.reshape(bsz, groups, dg, nc * chunk, n), Cc)
    y = y.reshape(bsz, dim, nc * chunk)[:, :, :seqlen]
    if D is not None:
        y = y + D.to(ct)[None, :, None] * u.to(ct)
    return y.to(u.dtype)


# ----------------------------------------------------------------------------- Triton kernels

@lazy_triton
def _load(triton, tl):
    """Build this module's Triton helpers and kernels (run once, on first use)."""

    @triton.jit
    def _lin_combine(a1, b1, a2, b2):
        # compose h -> a1 h + b1 (earlier) with h -> a2 h + b2 (later)
        return a1 * a2, a2 * b1 + b2

    @triton.jit
    def _adj_combine(p1, l1, w1, p2, l2, w2):
        # reverse scan: (p1, l1, w1) summarises later times, (p2, l2, w2) earlier ones.
        # g_s = w_s + a_{s+1} g_{s+1}; p = product of a over the segment without its earliest
        # element, l = a of the earliest element, w = the segment's g with zero carry.
        k = l1 * p2
        return p1 * k, l2, w2 + k * w1

    @triton.jit
    def _dt_phi(x, a, dt, inv_A, SERIES_BELOW: tl.constexpr):
        # Δ φ(ΔA) = (e^{ΔA} - 1) / A; Taylor series of φ near 0 avoids the cancellation in e^x - 1
        small = tl.abs(x) < SERIES_BELOW
        series = dt * (1.0 + x * (0.5 + x * (1.0 / 6 + x * (1.0 / 24 + x * (1.0 / 120)))))
        return tl.where(small, series, (a - 1.0) * inv_A)

    @triton.jit
    def _dt2_psi(x, a, dt, dt_phi, inv_A, SERIES_BELOW: tl.constexpr):
        # Δ² φ'(ΔA) = (Δ e^{ΔA} - Δ φ) / A, the A-derivative of Δ φ(ΔA); series near 0 as above
        small = tl.abs(x) < SERIES_BELOW
        series = dt * dt * (0.5 + x * (1.0 / 3 + x * (0.125 + x * (1.0 / 30 + x * (1.0 / 144)))))
        return tl.where(small, series, (dt * a - dt_phi) * inv_A)

    @triton.jit
    def _chunk_scan(u, dt, Bt, A, inv_A, h0, SERIES_BELOW: tl.constexpr):
        # one chunk's forward recurrence from state h0 over (CHUNK, BLOCK_D, BLOCK_N) tiles:
        # (x = ΔA, a = e^x, Δφ(x), B u, b = Δφ B u, the state after every step)
        dt3 = dt[:, :, None]
        x = dt3 * A[None, :, :]
        a = tl.exp(x)
        dt_phi = _dt_phi(x, a, dt3, inv_A[None, :, :], SERIES_BELOW)
        Bu = u[:, :, None] * Bt[:, None, :]
        b = dt_phi * Bu
        acum, hloc = tl.associative_scan((a, b), axis=0, combine_fn=_lin_combine)
        return x, a, dt_phi, Bu, b, hloc + acum * h0[None, :, :]

    @triton.jit
    def _load_chunk(u_ptr, dt_ptr, bias, offs_d, mask_d, t, mask_t, s_ud, s_ul, s_dd, s_dl,
                    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
        # u and Δ (after bias and softplus) for one chunk as (CHUNK, BLOCK_D), zero outside the sequence
        m2 = mask_t[:, None] & mask_d[None, :]
        u = _load_t(u_ptr, offs_d, mask_d, t, mask_t, s_ud, s_ul)
        raw = _load_t(dt_ptr, offs_d, mask_d, t, mask_t, s_dd, s_dl)
        if HAS_BIAS:
            raw = raw + bias[None, :]
        dt = raw
        if SOFTPLUS:
            dt = tl.where(raw <= 20.0, tl.log(1.0 + tl.exp(raw)), raw)
        dt = tl.where(m2, dt, 0.0)
        return u, raw, dt

    @triton.jit
    def _load_t(base, offs_r, mask_r, t, mask_t, s_r, s_l):
        # a (rows, L) operand's chunk as fp32 (CHUNK, rows), zero outside. Loaded as (rows, CHUNK)
        # and transposed: Triton then keeps lanes along the contiguous time axis for the load
        # (coalesced) and moves the tile to the compute layout through shared memory.
        x = tl.load(base + offs_r[:, None] * s_r + t[None, :] * s_l, mask=mask_r[:, None] & mask_t[None, :],
                    other=0.0)
        return tl.trans(x).to(tl.float32)

    @triton.jit
    def _store_t(base, val, offs_r, mask_r, t, mask_t, s_r, s_l):
        # store a (CHUNK, rows) tile into a (rows, L) operand, transposed first like _load_t
        tl.store(base + offs_r[:, None] * s_r + t[None, :] * s_l, tl.trans(val).to(base.dtype.element_ty),
                 mask=mask_r[:, None] & mask_t[None, :])

    @triton.jit
    def _channel_block(A_ptr, D_ptr, bias_ptr, G, DG, N, s_ad, s_an, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
        # this program's (batch, group, channel block) and its per-channel parameters: A and 1/A (padded
        # entries -1, so 1/A stays finite), Δ bias and D (zeros when absent)
        pid_bg = tl.program_id(0)
        bi = (pid_bg // G).to(tl.int64)  # int64: batch offsets exceed 2**31 for token-batched scans
        gi = pid_bg % G
        offs_dl = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_dl < DG
        offs_d = gi * DG + offs_dl
        offs_n = tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        A = tl.load(A_ptr + offs_d[:, None] * s_ad + offs_n[None, :] * s_an,
                    mask=mask_d[:, None] & mask_n[None, :], other=-1.0).to(tl.float32)
        bias = tl.zeros((BLOCK_D,), tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        Dv = tl.zeros((BLOCK_D,), tl.float32)
        if HAS_D:
            Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        return bi, gi, offs_d, mask_d, offs_n, mask_n, A, 1.0 / A, bias, Dv

    @triton.jit
    def _put_bc(ptrs, val, mask, ATOMIC: tl.constexpr):
        # one channel block's share of dB or dC: added atomically, or stored if it is the only one
        if ATOMIC:
            tl.atomic_add(ptrs, val, mask=mask)
        else:
            tl.store(ptrs, val.to(ptrs.dtype.element_ty), mask=mask)

    # sizes and outer strides vary per layer: one compiled kernel serves them all (inner strides,
    # usually 1, stay specialised for vector loads)
    _RUNTIME_INTS = ["L", "DG", "G", "N", "n_chunks", "s_ub", "s_ud", "s_db", "s_dd", "s_ad", "s_bb", "s_bg",
                     "s_bn", "s_cb", "s_cg", "s_cn", "s_yb", "s_yd"]

    @triton.jit(do_not_specialize=_RUNTIME_INTS)
    def fwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, y_ptr, st_ptr,
                   L, DG, G, N, n_chunks,
                   s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_ad, s_an,
                   s_bb, s_bg, s_bn, s_bl, s_cb, s_cg, s_cn, s_cl, s_yb, s_yd, s_yl,
                   HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                   SAVE_STATES: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                   CHUNK: tl.constexpr, SERIES_BELOW: tl.constexpr):
        bi, gi, offs_d, mask_d, offs_n, mask_n, A, inv_A, bias, Dv = _channel_block(
            A_ptr, D_ptr, bias_ptr, G, DG, N, s_ad, s_an, HAS_D, HAS_BIAS, BLOCK_D, BLOCK_N)
        offs_c = tl.arange(0, CHUNK)
        u_base = u_ptr + bi * s_ub
        dt_base = dt_ptr + bi * s_db
        B_base = B_ptr + bi * s_bb + gi * s_bg
        C_base = C_ptr + bi * s_cb + gi * s_cg
        y_base = y_ptr + bi * s_yb
        st_base = st_ptr + ((bi * G * DG + offs_d)[:, None] * n_chunks) * BLOCK_N + offs_n[None, :]
        h = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
        for c in range(0, n_chunks):
            t = c * CHUNK + offs_c
            mask_t = t < L
            u, raw, dt = _load_chunk(u_base, dt_base, bias, offs_d, mask_d, t, mask_t, s_ud, s_ul, s_dd, s_dl,
                                     HAS_BIAS, SOFTPLUS)
            Bt = _load_t(B_base, offs_n, mask_n, t, mask_t, s_bn, s_bl)
            Ct = _load_t(C_base, offs_n, mask_n, t, mask_t, s_cn, s_cl)
            if SAVE_STATES:
                tl.store(st_base + c * BLOCK_N, h, mask=mask_d[:, None])
            _, _, _, _, _, hs = _chunk_scan(u, dt, Bt, A, inv_A, h, SERIES_BELOW)
            y = tl.sum(hs * Ct[:, None, :], axis=2)
            if HAS_D:
                y = y + Dv[None, :] * u
            _store_t(y_base, y, offs_d, mask_d, t, mask_t, s_yd, s_yl)
            h = tl.sum(tl.where((offs_c == CHUNK - 1)[:, None, None], hs, 0.0), axis=0)

    @triton.jit(do_not_specialize=_RUNTIME_INTS)
    def bwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, dy_ptr, st_ptr,
                   du_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
                   L, DG, G, N, n_chunks,
                   s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_ad, s_an,
                   s_bb, s_bg, s_bn, s_bl, s_cb, s_cg, s_cn, s_cl, s_yb, s_yd, s_yl,
                   HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
                   SERIES_BELOW: tl.constexpr, ATOMIC_BC: tl.constexpr):
        # du/ddt are written with u's/Δ's strides made contiguous (batch, D, L); dA/dD/dbias are
        # per-batch partials (batch, D, N)/(batch, D); dB/dC (batch, G, N, L) are accumulated in
        # fp32 with atomics over the channel blocks of a group (ATOMIC_BC), or stored when one
        # block holds the whole group.
        bi, gi, offs_d, mask_d, offs_n, mask_n, A, inv_A, bias, Dv = _channel_block(
            A_ptr, D_ptr, bias_ptr, G, DG, N, s_ad, s_an, HAS_D, HAS_BIAS, BLOCK_D, BLOCK_N)
        DT = G * DG
        mask_dn = mask_d[:, None] & mask_n[None, :]
        offs_c = tl.arange(0, CHUNK)
        u_base = u_ptr + bi * s_ub
        dt_base = dt_ptr + bi * s_db
        B_base = B_ptr + bi * s_bb + gi * s_bg
        C_base = C_ptr + bi * s_cb + gi * s_cg
        dy_base = dy_ptr + bi * s_yb
        st_base = st_ptr + ((bi * DT + offs_d)[:, None] * n_chunks) * BLOCK_N + offs_n[None, :]
        dBC_off = (bi * G + gi) * N * L + offs_n[None, :] * L
        dl_base = bi * DT * L
        g_next = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)  # adjoint at the first step of the next chunk
        a_next = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)  # a at that step
        dA_acc = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
        dD_acc = tl.zeros((BLOCK_D,), tl.float32)
        dbias_acc = tl.zeros((BLOCK_D,), tl.float32)
        for cc in range(0, n_chunks):
            c = n_chunks - 1 - cc
            t = c * CHUNK + offs_c
            mask_t = t < L
            m2 = mask_t[:, None] & mask_d[None, :]
            mnt = mask_t[:, None] & mask_n[None, :]
            u, raw, dt = _load_chunk(u_base, dt_base, bias, offs_d, mask_d, t, mask_t, s_ud, s_ul, s_dd, s_dl,
                                     HAS_BIAS, SOFTPLUS)
            Bt = _load_t(B_base, offs_n, mask_n, t, mask_t, s_bn, s_bl)
            Ct = _load_t(C_base, offs_n, mask_n, t, mask_t, s_cn, s_cl)
            dy = _load_t(dy_base, offs_d, mask_d, t, mask_t, s_yd, s_yl)
            h0 = tl.load(st_base + c * BLOCK_N, mask=mask_d[:, None], other=0.0)
            # replay the chunk's forward scan
            x, a, dt_phi, Bu, b, hs = _chunk_scan(u, dt, Bt, A, inv_A, h0, SERIES_BELOW)
            dt3 = dt[:, :, None]
            # adjoint g_s = C_s dy_s + a_{s+1} g_{s+1}, scanned from the chunk's end
            w = Ct[:, None, :] * dy[:, :, None]
            p, _, gloc = tl.associative_scan((tl.full(a.shape, 1.0, tl.float32), tl.flip(a, 0), tl.flip(w, 0)),
                                             axis=0, combine_fn=_adj_combine)
            p, gloc = tl.flip(p, 0), tl.flip(gloc, 0)
            g = gloc + p * (a_next * g_next)[None, :, :]
            first = (offs_c == 0)[:, None, None]
            g_next = tl.sum(tl.where(first, g, 0.0), axis=0)
            a_next = tl.sum(tl.where(first, a, 0.0), axis=0)
            # gradients; a h_{s-1} = h_s - b_s
            ah_prev = hs - b
            dC = tl.sum(hs * dy[:, :, None], axis=1)
            _put_bc(dC_ptr + dBC_off + t[:, None], dC, mnt, ATOMIC_BC)
            g_dt_phi = g * dt_phi
            du = tl.sum(g_dt_phi * Bt[:, None, :], axis=2)
            if HAS_D:
                du += Dv[None, :] * dy
                dD_acc += tl.sum(dy * u, axis=0)
            _store_t(du_ptr + dl_base, du, offs_d, mask_d, t, mask_t, L, 1)
            dB = tl.sum(g_dt_phi * u[:, :, None], axis=1)
            _put_bc(dB_ptr + dBC_off + t[:, None], dB, mnt, ATOMIC_BC)
            dt2_psi = _dt2_psi(x, a, dt3, dt_phi, inv_A[None, :, :], SERIES_BELOW)
            dA_acc += tl.sum(g * (dt3 * ah_prev + dt2_psi * Bu), axis=0)
            ddt = tl.sum(g * (A[None, :, :] * ah_prev + a * Bu), axis=2)
            if SOFTPLUS:
                ddt = tl.where(raw <= 20.0, ddt * tl.sigmoid(raw), ddt)
            ddt = tl.where(m2, ddt, 0.0)
            if HAS_BIAS:
                dbias_acc += tl.sum(ddt, axis=0)
            _store_t(ddt_ptr + dl_base, ddt, offs_d, mask_d, t, mask_t, L, 1)
        tl.store(dA_ptr + (bi * DT + offs_d)[:, None] * N + offs_n[None, :], dA_acc, mask=mask_dn)
        if HAS_D:
            tl.store(dD_ptr + bi * DT + offs_d, dD_acc, mask=mask_d)
        if HAS_BIAS:
            tl.store(dbias_ptr + bi * DT + offs_d, dbias_acc, mask=mask_d)

    return SimpleNamespace(fwd=fwd_kernel, bwd=bwd_kernel)


# ----------------------------------------------------------------------------- launchers

def _launch_cfg(dim_per_group: int, n: int):
    """(BLOCK_D, BLOCK_N, CHUNK, num_warps): small tiles in the interpreter, GPU-sized otherwise.

    Narrow groups (the channel mixer's 4 streams) get fewer warps, so that each thread keeps
    ``_GPU_CFG``'s share of the tile (the steps of a chunk for a few (channel, state) pairs).
    """
    block_n = max(2, next_pow2(n))
    if interpret_mode():
        return 4, block_n, 16, 1
    block_d = min(_GPU_CFG["block_d"], next_pow2(dim_per_group))
    full = _GPU_CFG["block_d"] * 16 * _GPU_CFG["chunk"]  # the tile the warp count was tuned for (N = 16)
    warps = max(1, _GPU_CFG["num_warps"] * block_d * block_n * _GPU_CFG["chunk"] // full)
    return block_d, block_n, _GPU_CFG["chunk"], min(warps, _GPU_CFG["num_warps"])


# From the H100 sweeps in bench/vim2.py and bench/results/vim2.json: at L=3136, D=384, N=16 a
# 4-step chunk was 2-4% faster, but the channel mixer's narrow scans (4 channels per group) ran 26%
# faster with 8-step chunks; one config serves both. Override for experiments.
_GPU_CFG = {"block_d": 32, "chunk": 8, "num_warps": 4}


def _bc_strides(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _fwd_impl(u: Tensor, delta: Tensor, A: Tensor, B4: Tensor, C4: Tensor, D: Optional[Tensor],
              delta_bias: Optional[Tensor], delta_softplus: bool, save_states: bool) -> tuple[Tensor, Tensor]:
    """y and the chunk-start states (a placeholder unless ``save_states``)."""
    bsz, dim, seqlen = u.shape
    groups, n = B4.shape[1], A.shape[1]
    dg = dim // groups
    block_d, block_n, chunk, warps = _launch_cfg(dg, n)
    n_chunks = cdiv(seqlen, chunk)
    y = torch.empty((bsz, dim, seqlen), device=u.device, dtype=u.dtype)
    states = torch.empty((bsz, dim, n_chunks, block_n) if save_states else (1,), device=u.device,
                         dtype=torch.float32)
    dummy = A
    grid = (bsz * groups, cdiv(dg, block_d))
    _load().fwd[grid](
        u, delta, A, B4, C4, D if D is not None else dummy, delta_bias if delta_bias is not None else dummy,
        y, states, seqlen, dg, groups, n, n_chunks,
        *u.stride(), *delta.stride(), *A.stride(), *_bc_strides(B4), *_bc_strides(C4), *y.stride(),
        HAS_D=D is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        SAVE_STATES=save_states, BLOCK_D=block_d, BLOCK_N=block_n, CHUNK=chunk,
        SERIES_BELOW=_SERIES_BELOW, num_warps=warps)
    return y, states


def _bwd_impl(dy: Tensor, u: Tensor, delta: Tensor, A: Tensor, B4: Tensor, C4: Tensor, D: Optional[Tensor],
              delta_bias: Optional[Tensor], states: Tensor, delta_softplus: bool
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(du, ddelta, dA, dB, dC, dD, ddelta_bias); the last two absent without D / delta_bias."""
    bsz, dim, seqlen = u.shape
    groups, n = B4.shape[1], A.shape[1]
    dg = dim // groups
    block_d, block_n, chunk, warps = _launch_cfg(dg, n)
    n_chunks = states.shape[2]
    dev = u.device
    du = torch.empty((bsz, dim, seqlen), device=dev, dtype=u.dtype)
    ddelta = torch.empty((bsz, dim, seqlen), device=dev, dtype=delta.dtype)
    dA = torch.empty((bsz, dim, n), device=dev, dtype=torch.float32)
    atomic = dg > block_d  # several channel blocks add into one group's dB/dC
    alloc = torch.zeros if atomic else torch.empty
    dB = alloc((bsz, groups, n, seqlen), device=dev, dtype=torch.float32 if atomic else B4.dtype)
    dC = alloc((bsz, groups, n, seqlen), device=dev, dtype=torch.float32 if atomic else C4.dtype)
    dD = torch.empty((bsz, dim), device=dev, dtype=torch.float32) if D is not None else None
    dbias = torch.empty((bsz, dim), device=dev, dtype=torch.float32) if delta_bias is not None else None
    dummy = A
    grid = (bsz * groups, cdiv(dg, block_d))
    _load().bwd[grid](
        u, delta, A, B4, C4, D if D is not None else dummy, delta_bias if delta_bias is not None else dummy,
        dy, states, du, ddelta, dA, dB, dC, dD if dD is not None else dA, dbias if dbias is not None else dA,
        seqlen, dg, groups, n, n_chunks,
        *u.stride(), *delta.stride(), *A.stride(), *_bc_strides(B4), *_bc_strides(C4), *dy.stride(),
        HAS_D=D is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        BLOCK_D=block_d, BLOCK_N=block_n, CHUNK=chunk, SERIES_BELOW=_SERIES_BELOW, ATOMIC_BC=atomic,
        num_warps=warps)
    return (du, ddelta, dA.sum(0).to(A.dtype), dB.to(B4.dtype), dC.to(C4.dtype),
            or_absent(dD.sum(0).to(D.dtype) if D is not None else None, u),
            or_absent(dbias.sum(0).to(delta_bias.dtype) if delta_bias is not None else None, u))


# ----------------------------------------------------------------------------- op registration

def _fwd_fake(u, delta, A, B, C, D, delta_bias, delta_softplus, save_states):
    bsz, dim, seqlen = u.shape
    _, block_n, chunk, _ = _launch_cfg(dim // B.shape[1], A.shape[1])
    shape = (bsz, dim, cdiv(seqlen, chunk), block_n) if save_states else (1,)
    return u.new_empty(u.shape), u.new_empty(shape, dtype=torch.float32)


def _bwd_fake(dy, u, delta, A, B, C, D, delta_bias, states, delta_softplus):
    like = [u, delta, A, B, C, D, delta_bias]
    return tuple(t.new_empty(t.shape) if t is not None else u.new_empty(0) for t in like)


def _setup(ctx, inputs, output):
    u, delta, A, B4, C4, D, delta_bias, delta_softplus, save_states = inputs
    _, states = output
    ctx.mark_non_differentiable(states)
    if save_states:
        ctx.save_for_backward(u, delta, A, B4, C4, D, delta_bias, states)
    ctx.delta_softplus = delta_softplus


def _backward(ctx, dy, _dstates):
    u, delta, A, B4, C4, D, delta_bias, states = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, dbias = _bwd_op(dy.contiguous(), u, delta, A, B4, C4, D, delta_bias, states,
                                                ctx.delta_softplus)
    return (du, ddelta, dA, dB, dC, dD if D is not None else None, dbias if delta_bias is not None else None,
            None, None)


_bwd_op = BackwardOp("metazoo::selective_scan_bwd", _bwd_impl, _bwd_fake)
_fwd = ForwardOp("metazoo::selective_scan_fwd", _fwd_impl, _fwd_fake, _setup, _backward)


# ----------------------------------------------------------------------------- public dispatcher

@dispatcher(selective_scan_ref)
def selective_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, backend=None):
    """S6 selective scan y (batch, D, L); Triton on CUDA (or the interpreter), else the chunked reference.

    ``backend`` is 'auto' | 'torch' | 'triton' (see :mod:`metazoo.kernels.dispatch`).
    """
    B4, C4 = _check(u, delta, A, B, C, D, delta_bias)
    if resolve(backend, u, delta, A, B4, C4) == "torch":
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():  # backward recomputes the scan
            return checkpoint(selective_scan_chunked, u, delta, A, B, C, D, delta_bias, bool(delta_softplus),
                              use_reentrant=False)
        return selective_scan_chunked(u, delta, A, B, C, D, delta_bias, delta_softplus)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (u, delta, A, B, C, D, delta_bias))
    y, _ = _fwd(u, delta, A, B4, C4, D, delta_bias, bool(delta_softplus), save)
    return y
