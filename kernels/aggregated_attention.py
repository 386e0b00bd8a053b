"""TransNeXt aggregated attention: a k×k sliding window plus pooled keys under one softmax.

For every query token (row-major position ``n`` of an ``H×W`` map) and head, with L2-normalised
``q̂, k̂``::

    qs      = (q̂ + query_embedding) · softplus(temperature) · log(#valid window keys + P)
    logits  = [qs·k̂_j + local_bias_j  (j in the window, −inf outside the map),
               qs·k̂pool_p + pool_bias_np  (p < P)]
    a       = softmax(logits)                                  (one softmax over k·k + P)
    out     = Σ_j (a_j + q̂·tokens_j + token_bias_j) v_j + Σ_p a_p vpool_p

The Triton path gathers the window straight from the ``(B, N, 2C)`` key/value projection (no
unfold) and keeps the k·k + P logits in registers (online softmax over pooled-key blocks), so
inference writes only the output. Training stores the log-sum-exp; the backward runs three kernels: per
query block (dq, and two ``B×heads×k²×N`` fp32 maps: window softmax grads and effective window
weights), per pooled-key block (pooled k/v grads) and per key block (gathers the window maps into
k/v grads, no atomics). Only the batch-summed pool-bias grad uses atomics.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from ._autograd import BackwardOp, ForwardOp
from ._layout import cdiv, next_pow2, sm_count
from .dispatch import dispatcher, lazy_triton, resolve

_EPS = 1e-12  # F.normalize's default clamp on the norm


# ----------------------------------------------------------------------------- input checks

def _check(q: Tensor, kv: Tensor, kv_pool: Tensor, query_embedding: Tensor, local_bias: Tensor, pool_bias: Tensor,
           tokens: Tensor, token_bias: Tensor, height: int, width: int, num_heads: int,
           window_size: int) -> tuple[int, int, int, int, int, int]:
    """Shapes -> (B, N, C, D, P, k²); plain enough for TorchScript (the reference runs in scripted models)."""
    if q.dim() != 3:
        raise ValueError(f"q must be (B, N, C); got shape {list(q.shape)}")
    B, N, C = q.shape[0], q.shape[1], q.shape[2]
    if height * width != N or height < 1 or width < 1:
        raise ValueError(f"height*width must equal N={N}; got height={height}, width={width}")
    if num_heads < 1 or C % num_heads:
        raise ValueError(f"num_heads must divide C={C}; got num_heads={num_heads}")
    if window_size < 1 or window_size % 2 == 0:
        raise ValueError(f"window_size must be a positive odd integer; got {window_size}")
    D, KK = C // num_heads, window_size * window_size
    if list(kv.shape) != [B, N, 2 * C]:
        raise ValueError(f"kv must be (B, N, 2C)={[B, N, 2 * C]}; got {list(kv.shape)}")
    if kv_pool.dim() != 3 or kv_pool.shape[0] != B or kv_pool.shape[2] != 2 * C or kv_pool.shape[1] < 1:
        raise ValueError(f"kv_pool must be (B, P, 2C) with P >= 1; got {list(kv_pool.shape)}")
    P = kv_pool.shape[1]
    expected = {"query_embedding": [num_heads, D], "local_bias": [num_heads, KK],
                "pool_bias": [num_heads, N, P], "tokens": [num_heads, D, KK], "token_bias": [num_heads, KK]}
    got = {"query_embedding": query_embedding, "local_bias": local_bias, "pool_bias": pool_bias,
           "tokens": tokens, "token_bias": token_bias}
    for name, shape in expected.items():
        if list(got[name].shape) != shape:
            raise ValueError(f"{name} must have shape {shape}; got {list(got[name].shape)}")
    return B, N, C, D, P, KK


# ----------------------------------------------------------------------------- reference

def _window_length_scale(height: int, width: int, window_size: int, pool_len: int, device: torch.device) -> Tensor:
    """log(#in-map window keys + pooled keys) per query: TransNeXt's length-aware scale, (N,)."""
    ones = torch.ones(1, 1, height, width, device=device)
    count = F.avg_pool2d(ones, window_size, stride=1, padding=window_size // 2,
                         count_include_pad=True) * (window_size * window_size)
    return torch.log(count.round().flatten() + pool_len)


def _window_gather(t: Tensor, height: int, width: int, window_size: int) -> Tensor:
    """(B, N, X) -> (B, N, k², X): the k×k neighbours of each token, zeros outside the map."""
    B, N, X = t.shape
    r = window_size // 2
    padded = F.pad(t.reshape(B, height, width, X), (0, 0, r, r, r, r))
    kk = window_size * window_size
    shifts = [padded[:, j // window_size:j // window_size + height, j % window_size:j % window_size + width]
              for j in range(kk)]
    return torch.stack(shifts, dim=3).reshape(B, N, kk, X)


def aggregated_attention_ref(q: Tensor, kv: Tensor, kv_pool: Tensor, query_embedding: Tensor, temperature: Tensor,
                             local_bias: Tensor, pool_bias: Tensor, tokens: Tensor, token_bias: Tensor, height: int,
                             width: int, num_heads: int, window_size: int = 3,
                             backend: str | None = None) -> Tensor:
    """Plain PyTorch aggregated attention. q (B, N, C), kv (B, N, 2C), kv_pool (B, P, 2C) -> (B, N, C)."""
    B, N, C, D, P, KK = _check(q, kv, kv_pool, query_embedding, local_bias, pool_bias, tokens,
                               token_bias, height, width, num_heads, window_size)
    h = num_heads
    q_hat = F.normalize(q.reshape(B, N, h, D), dim=-1)                       # B N h D
    scale = F.softplus(temperature).reshape(1, 1, h, 1) * _window_length_scale(
        height, width, window_size, P, q.device).reshape(1, N, 1, 1)
    q_scaled = (q_hat + query_embedding.reshape(1, 1, h, D)) * scale
    k, v = kv.split(C, dim=-1)
    k_win = _window_gather(F.normalize(k.reshape(B, N, h, D), dim=-1).reshape(B, N, C), height, width,
                           window_size).reshape(B, N, KK, h, D)
    v_win = _window_gather(v, height, width, window_size).reshape(B, N, KK, h, D)
    inside = _window_gather(q.new_ones(1, N, 1), height, width, window_size).reshape(1, N, KK, 1) > 0
    logits_local = torch.einsum("bnhd,bnjhd->bnhj", q_scaled, k_win.to(q_scaled.dtype)) + local_bias
    logits_local = logits_local.masked_fill(~inside.reshape(1, N, 1, KK), float("-inf"))
    k_pool, v_pool = kv_pool.split(C, dim=-1)
    k_pool = F.normalize(k_pool.reshape(B, P, h, D), dim=-1)
    logits_pool = torch.einsum("bnhd,bphd->bnhp", q_scaled, k_pool.to(q_scaled.dtype)) + pool_bias.permute(1, 0, 2)
    attn = torch.cat([logits_local, logits_pool], dim=-1).softmax(dim=-1)
    attn_local, attn_pool = attn.split([KK, P], dim=-1)
    dynamic = torch.einsum("bnhd,hdj->bnhj", q_hat, tokens.to(q_hat.dtype)) + token_bias
    out = torch.einsum("bnhj,bnjhd->bnhd", attn_local + dynamic, v_win.to(attn.dtype))
    out = out + torch.einsum("bnhp,bphd->bnhd", attn_pool, v_pool.reshape(B, P, h, D).to(attn.dtype))
    return out.reshape(B, N, C).to(q.dtype)


# ----------------------------------------------------------------------------- Triton kernels

@lazy_triton
def _load(triton, tl):
    """Build this module's Triton helpers and kernels (run once, on first use)."""

    @triton.jit
    def _normalize_rows(x, eps):
        """(x / max(|x|, eps), |x|) per row; one reciprocal per row, not a division per element."""
        nrm = tl.sqrt(tl.sum(x * x, axis=1))
        return x * (1.0 / tl.maximum(nrm, eps))[:, None], nrm

    @triton.jit
    def _unit_rows(x, eps):
        return x * (1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), eps))[:, None]

    @triton.jit
    def _normalize_rows_grad(xn, nrm, g, eps):
        """Gradient w.r.t. x of x / max(|x|, eps) per row, given xn (that value), |x| and the output grad g."""
        dx = (g - xn * tl.sum(xn * g, axis=1)[:, None]) * (1.0 / tl.maximum(nrm, eps))[:, None]
        return tl.where((nrm > eps)[:, None], dx, g * (1.0 / eps))

    @triton.jit
    def _token_block(N, W, HEADS, D: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr):
        """Grid (token blocks, batch*heads): (b*heads+h, b, h, tokens, dims, their masks, row, col)."""
        pid_bh = tl.program_id(1)
        offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, DP)
        return pid_bh, pid_bh // HEADS, pid_bh % HEADS, offs, offs_d, offs < N, offs_d < D, offs // W, offs % W

    @triton.jit
    def _window_tap(kv_base, qs, LB_H, j: tl.constexpr, yy, xx, mask_n, offs_d, mask_d, H, W, C, skv_n, eps,
                    KS: tl.constexpr):
        """Window neighbour ``j`` of each query: (in-map mask, unit key, value, logit with local bias)."""
        R: tl.constexpr = KS // 2
        ny = yy + (j // KS - R)
        nx = xx + (j % KS - R)
        ok = mask_n & (ny >= 0) & (ny < H) & (nx >= 0) & (nx < W)
        m2 = ok[:, None] & mask_d[None, :]
        row = (ny * W + nx) * skv_n
        kj = _unit_rows(tl.load(kv_base + row[:, None] + offs_d[None, :], mask=m2, other=0.0).to(tl.float32), eps)
        vj = tl.load(kv_base + C + row[:, None] + offs_d[None, :], mask=m2, other=0.0).to(tl.float32)
        return ok, kj, vj, tl.sum(qs * kj, axis=1) + tl.load(LB_H + j).to(tl.float32)

    @triton.jit
    def _query_terms(Q, QE, T, q_row, h, offs_n, mask_n, offs_d, mask_d, yy, xx, H, W, P, eps,
                     D: tl.constexpr, R: tl.constexpr):
        """Loads a query block; returns (q̂, |q|, scale, q_scaled)."""
        m2 = mask_n[:, None] & mask_d[None, :]
        q = tl.load(Q + q_row[:, None] + h * D + offs_d[None, :], mask=m2, other=0.0).to(tl.float32)
        qn, nrm = _normalize_rows(q, eps)
        rows = tl.minimum(yy + R, H - 1) - tl.maximum(yy - R, 0) + 1
        cols = tl.minimum(xx + R, W - 1) - tl.maximum(xx - R, 0) + 1
        t = tl.load(T + h).to(tl.float32)
        scale = tl.where(mask_n, t * tl.log(tl.maximum(rows * cols + P, 1).to(tl.float32)), 0.0)
        qe = tl.load(QE + h * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        qs = (qn + qe[None, :]) * scale[:, None]
        return qn, nrm, scale, qs

    # sizes and head counts are not specialised: one compile per head dim and window, any map size
    @triton.jit(do_not_specialize=["N", "H", "W", "P", "C", "HEADS"])
    def fwd_kernel(Q, KV, KVP, QE, T, LB, PB, TOK, TB, O, LSE,
                   N, H, W, P, C, sq_b, sq_n, skv_b, skv_n, skp_b, skp_n, so_b, so_n, eps,
                   HEADS, D: tl.constexpr, DP: tl.constexpr, KS: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, STORE_LSE: tl.constexpr,
                   PREC: tl.constexpr):
        KK: tl.constexpr = KS * KS
        R: tl.constexpr = KS // 2
        pid_bh, b, h, offs_n, offs_d, mask_n, mask_d, yy, xx = _token_block(N, W, HEADS, D, DP, BLOCK_N)
        qn, _, _, qs = _query_terms(Q, QE, T, b * sq_b + offs_n * sq_n, h, offs_n, mask_n, offs_d, mask_d,
                                       yy, xx, H, W, P, eps, D, R)
        m_i = tl.full([BLOCK_N], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_N], tl.float32)
        acc = tl.zeros([BLOCK_N, DP], tl.float32)
        acc_dyn = tl.zeros([BLOCK_N, DP], tl.float32)
        kv_base = KV + b * skv_b + h * D
        for j in tl.static_range(KK):
            ok, kj, vj, s = _window_tap(kv_base, qs, LB + h * KK, j, yy, xx, mask_n, offs_d, mask_d, H, W, C,
                                         skv_n, eps, KS)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, s)
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new)
            l_i = l_i * alpha + p
            acc = acc * alpha[:, None] + p[:, None] * vj
            m_i = m_new
            tok = tl.load(TOK + h * D * KK + offs_d * KK + j, mask=mask_d, other=0.0).to(tl.float32)
            dyn = tl.sum(qn * tok[None, :], axis=1) + tl.load(TB + h * KK + j).to(tl.float32)
            acc_dyn += dyn[:, None] * vj
        kvp_base = KVP + b * skp_b + h * D
        for p0 in range(0, P, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            mask_p = offs_p < P
            mp2 = mask_p[:, None] & mask_d[None, :]
            kp = tl.load(kvp_base + offs_p[:, None] * skp_n + offs_d[None, :], mask=mp2, other=0.0).to(tl.float32)
            vp = tl.load(kvp_base + C + offs_p[:, None] * skp_n + offs_d[None, :], mask=mp2, other=0.0).to(tl.float32)
            kp = _unit_rows(kp, eps)
            pb = tl.load(PB + h * N * P + offs_n[:, None] * P + offs_p[None, :],
                         mask=mask_n[:, None] & mask_p[None, :], other=0.0).to(tl.float32)
            sp = tl.dot(qs, tl.trans(kp), input_precision=PREC) + pb
            sp = tl.where(mask_p[None, :], sp, float("-inf"))
            mp_new = tl.maximum(m_i, tl.max(sp, axis=1))
            alpha_p = tl.exp(m_i - mp_new)
            pp = tl.exp(sp - mp_new[:, None])
            l_i = l_i * alpha_p + tl.sum(pp, axis=1)
            acc = acc * alpha_p[:, None] + tl.dot(pp, vp, input_precision=PREC)
            m_i = mp_new
        out = acc * (1.0 / l_i)[:, None] + acc_dyn
        o_ptr = O + b * so_b + offs_n[:, None] * so_n + h * D + offs_d[None, :]
        tl.store(o_ptr, out.to(O.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])
        if STORE_LSE:
            tl.store(LSE + pid_bh * N + offs_n, m_i + tl.log(l_i), mask=mask_n)

    @triton.jit(do_not_specialize=["B", "N", "H", "W", "P", "C", "B_PER_PROG", "HEADS"])
    def bwd_query_kernel(Q, KV, KVP, QE, T, LB, PB, TOK, TB, O, DO, LSE,
                         DQ, DS, AEFF, DELTA, DPB, PART,
                         B, N, H, W, P, C, sq_b, sq_n, skv_b, skv_n, skp_b, skp_n, so_b, so_n, sdo_b, sdo_n,
                         eps, B_PER_PROG,
                         HEADS, D: tl.constexpr, DP: tl.constexpr, KS: tl.constexpr,
                         KKP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
                         SINGLE_P: tl.constexpr, PREC: tl.constexpr):
        """Per query block: dq, window softmax grads (DS) and weights (AEFF), the softmax row term
        (DELTA), pool-bias grads and per-program partial sums of the per-head parameter grads.

        One pass over the window: the taps' probabilities and ``do·v`` are kept as (queries, k²)
        tiles, so the softmax row term and every per-tap grad follow once per batch element, and
        the sums over queries (bias and token grads) run once per program, not once per tap."""
        pid_n = tl.program_id(0)
        h = tl.program_id(1)
        pid_b = tl.program_id(2)
        KK: tl.constexpr = KS * KS
        R: tl.constexpr = KS // 2
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, DP)
        offs_j = tl.arange(0, KKP)
        mask_n = offs_n < N
        mask_d = offs_d < D
        mask_j = offs_j < KK
        m2n = mask_n[:, None] & mask_d[None, :]
        mnj = mask_n[:, None] & mask_j[None, :]
        yy = offs_n // W
        xx = offs_n % W
        t = tl.load(T + h).to(tl.float32)
        qe = tl.load(QE + h * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        tb = tl.load(TB + h * KK + offs_j, mask=mask_j, other=0.0).to(tl.float32)
        tok = tl.load(TOK + h * D * KK + offs_d[:, None] * KK + offs_j[None, :],  # (DP, KKP)
                      mask=mask_d[:, None] & mask_j[None, :], other=0.0).to(tl.float32)
        offs_p0 = tl.arange(0, BLOCK_P)
        dpb_acc = tl.zeros([BLOCK_N, BLOCK_P], tl.float32)
        dlb_acc = tl.zeros([BLOCK_N, KKP], tl.float32)
        dtb_acc = tl.zeros([BLOCK_N, KKP], tl.float32)
        dtok_acc = tl.zeros([DP, KKP], tl.float32)
        dqe_acc = tl.zeros([BLOCK_N, DP], tl.float32)
        dt_acc = tl.zeros([BLOCK_N], tl.float32)
        b_lo = pid_b * B_PER_PROG
        b_hi = tl.minimum(b_lo + B_PER_PROG, B)
        for b in range(b_lo, b_hi):
            qn, qnrm, scale, qs = _query_terms(Q, QE, T, b * sq_b + offs_n * sq_n, h, offs_n, mask_n, offs_d,
                                                  mask_d, yy, xx, H, W, P, eps, D, R)
            do = tl.load(DO + b * sdo_b + offs_n[:, None] * sdo_n + h * D + offs_d[None, :], mask=m2n,
                         other=0.0).to(tl.float32)
            o = tl.load(O + b * so_b + offs_n[:, None] * so_n + h * D + offs_d[None, :], mask=m2n,
                        other=0.0).to(tl.float32)
            lse = tl.load(LSE + (b * HEADS + h) * N + offs_n, mask=mask_n, other=0.0)
            kv_base = KV + b * skv_b + h * D
            a_win = tl.zeros([BLOCK_N, KKP], tl.float32)   # window probabilities
            dp_win = tl.zeros([BLOCK_N, KKP], tl.float32)  # do·v_j
            ak = tl.zeros([BLOCK_N, DP], tl.float32)       # Σ_j a_j k̂_j
            adpk = tl.zeros([BLOCK_N, DP], tl.float32)     # Σ_j a_j (do·v_j) k̂_j
            for j in tl.static_range(KK):
                ok, kj, vj, s = _window_tap(kv_base, qs, LB + h * KK, j, yy, xx, mask_n, offs_d, mask_d, H, W, C,
                                             skv_n, eps, KS)
                a = tl.where(ok, tl.exp(s - lse), 0.0)
                dp = tl.sum(do * vj, axis=1)
                ak += a[:, None] * kj
                adpk += (a * dp)[:, None] * kj
                sel = (offs_j == j)[None, :]
                a_win = tl.where(sel, a[:, None], a_win)
                dp_win = tl.where(sel, dp[:, None], dp_win)
            dyn = tl.dot(qn, tok, input_precision=PREC) + tb[None, :]  # dynamic weights, (BLOCK_N, KKP)
            # delta = do·(softmax part of o) = do·o − Σ_j dynamic_j (do·v_j)
            delta = tl.sum(do * o, axis=1) - tl.sum(dyn * dp_win, axis=1)
            ds_win = a_win * (dp_win - delta[:, None])
            dqs = adpk - delta[:, None] * ak
            dqn = tl.dot(dp_win, tl.trans(tok), input_precision=PREC)
            win_ptr = ((b * HEADS + h) * KK) * N + offs_j[None, :] * N + offs_n[:, None]
            tl.store(DS + win_ptr, ds_win, mask=mnj)
            tl.store(AEFF + win_ptr, a_win + dyn, mask=mnj)
            dlb_acc += ds_win
            dtb_acc += dp_win
            dtok_acc += tl.dot(tl.trans(qn), dp_win, input_precision=PREC)
            kvp_base = KVP + b * skp_b + h * D
            tl.store(DELTA + (b * HEADS + h) * N + offs_n, delta, mask=mask_n)
            for p0 in range(0, P, BLOCK_P):
                offs_p = p0 + offs_p0
                mask_p = offs_p < P
                mp2 = mask_p[:, None] & mask_d[None, :]
                kp = tl.load(kvp_base + offs_p[:, None] * skp_n + offs_d[None, :], mask=mp2, other=0.0).to(tl.float32)
                vp = tl.load(kvp_base + C + offs_p[:, None] * skp_n + offs_d[None, :], mask=mp2,
                             other=0.0).to(tl.float32)
                kp = _unit_rows(kp, eps)
                mnp = mask_n[:, None] & mask_p[None, :]
                pb = tl.load(PB + h * N * P + offs_n[:, None] * P + offs_p[None, :], mask=mnp, other=0.0).to(tl.float32)
                sp = tl.dot(qs, tl.trans(kp), input_precision=PREC) + pb
                ap = tl.where(mnp, tl.exp(sp - lse[:, None]), 0.0)
                dpp = tl.dot(do, tl.trans(vp), input_precision=PREC)
                dsp = ap * (dpp - delta[:, None])
                dqs += tl.dot(dsp, kp, input_precision=PREC)
                if SINGLE_P:
                    dpb_acc += dsp
                else:
                    tl.atomic_add(DPB + h * N * P + offs_n[:, None] * P + offs_p[None, :], dsp, mask=mnp,
                                  sem="relaxed")
            dqs = tl.where(m2n, dqs, 0.0)
            dqe_acc += dqs * scale[:, None]
            dt_acc += tl.sum(dqs * (qn + qe[None, :]), axis=1) * (scale / t)
            dq = _normalize_rows_grad(qn, qnrm, dqs * scale[:, None] + dqn, eps)
            tl.store(DQ + b * sq_b + offs_n[:, None] * sq_n + h * D + offs_d[None, :],
                     dq.to(DQ.dtype.element_ty), mask=m2n)
        if SINGLE_P:
            mnp = mask_n[:, None] & (offs_p0 < P)[None, :]
            tl.atomic_add(DPB + h * N * P + offs_n[:, None] * P + offs_p0[None, :], dpb_acc, mask=mnp,
                          sem="relaxed")
        # per-program partials: [dlb (KKP) | dtb (KKP) | dt (1) | dqe (DP) | dtok (DP*KKP)]
        prog = (pid_n * tl.num_programs(2) + pid_b) * HEADS + h
        width: tl.constexpr = 2 * KKP + 1 + DP + DP * KKP
        base = PART + prog * width
        tl.store(base + offs_j, tl.sum(dlb_acc, axis=0))
        tl.store(base + KKP + offs_j, tl.sum(dtb_acc, axis=0))
        tl.store(base + 2 * KKP, tl.sum(dt_acc, axis=0))
        tl.store(base + 2 * KKP + 1 + offs_d, tl.sum(dqe_acc, axis=0))
        tl.store(base + 2 * KKP + 1 + DP + offs_d[:, None] * KKP + offs_j[None, :], dtok_acc)

    @triton.jit(do_not_specialize=["B", "N", "H", "W", "P", "C", "HEADS", "N_PER_PROG"])
    def bwd_pool_kernel(Q, KVP, QE, T, PB, DO, LSE, DELTA, DKVP,
                        B, N, H, W, P, C, sq_b, sq_n, skp_b, skp_n, sdo_b, sdo_n, eps, N_PER_PROG,
                        HEADS, D: tl.constexpr, DP: tl.constexpr, KS: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, PREC: tl.constexpr):
        """Per pooled-key block and query range: partial normalised-key and value grads (the
        query ranges, a third grid axis for parallelism, are summed afterwards)."""
        pid_p = tl.program_id(0)
        pid_bh = tl.program_id(1)
        pid_s = tl.program_id(2)
        b = pid_bh // HEADS
        h = pid_bh % HEADS
        R: tl.constexpr = KS // 2
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_d = tl.arange(0, DP)
        mask_p = offs_p < P
        mask_d = offs_d < D
        mp2 = mask_p[:, None] & mask_d[None, :]
        kvp_ptr = KVP + b * skp_b + offs_p[:, None] * skp_n + h * D + offs_d[None, :]
        kp = tl.load(kvp_ptr, mask=mp2, other=0.0).to(tl.float32)
        vp = tl.load(kvp_ptr + C, mask=mp2, other=0.0).to(tl.float32)
        kp = _unit_rows(kp, eps)
        dkp = tl.zeros([BLOCK_P, DP], tl.float32)
        dvp = tl.zeros([BLOCK_P, DP], tl.float32)
        n_lo = pid_s * N_PER_PROG
        n_hi = tl.minimum(n_lo + N_PER_PROG, N)
        for n0 in range(n_lo, n_hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < n_hi
            _, _, _, qs = _query_terms(Q, QE, T, b * sq_b + offs_n * sq_n, h, offs_n, mask_n, offs_d, mask_d,
                                          offs_n // W, offs_n % W, H, W, P, eps, D, R)
            do = tl.load(DO + b * sdo_b + offs_n[:, None] * sdo_n + h * D + offs_d[None, :],
                         mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            lse = tl.load(LSE + pid_bh * N + offs_n, mask=mask_n, other=0.0)
            delta = tl.load(DELTA + pid_bh * N + offs_n, mask=mask_n, other=0.0)
            mnp = mask_n[:, None] & mask_p[None, :]
            pb = tl.load(PB + h * N * P + offs_n[:, None] * P + offs_p[None, :], mask=mnp, other=0.0).to(tl.float32)
            s = tl.dot(qs, tl.trans(kp), input_precision=PREC) + pb
            a = tl.where(mnp, tl.exp(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(vp), input_precision=PREC)
            ds = a * (dp - delta[:, None])
            dkp += tl.dot(tl.trans(ds), qs, input_precision=PREC)
            dvp += tl.dot(tl.trans(a), do, input_precision=PREC)
        out = DKVP + (pid_s * B + b) * P * 2 * C + offs_p[:, None] * (2 * C) + h * D + offs_d[None, :]
        tl.store(out, dkp, mask=mp2)
        tl.store(out + C, dvp, mask=mp2)

    @triton.jit(do_not_specialize=["N", "H", "W", "P", "C", "HEADS"])
    def bwd_key_kernel(Q, KV, QE, T, DO, DS, AEFF, DKV,
                       N, H, W, P, C, sq_b, sq_n, skv_b, skv_n, sdo_b, sdo_n, eps,
                       HEADS, D: tl.constexpr, DP: tl.constexpr, KS: tl.constexpr,
                       BLOCK_N: tl.constexpr):
        """Per key block: gathers dk, dv from the queries whose window holds each key."""
        KK: tl.constexpr = KS * KS
        R: tl.constexpr = KS // 2
        _, b, h, offs_m, offs_d, mask_m, mask_d, my, mx = _token_block(N, W, HEADS, D, DP, BLOCK_N)
        m2 = mask_m[:, None] & mask_d[None, :]
        kv_ptr = KV + b * skv_b + offs_m[:, None] * skv_n + h * D + offs_d[None, :]
        k = tl.load(kv_ptr, mask=m2, other=0.0).to(tl.float32)
        kn, knrm = _normalize_rows(k, eps)
        dkn = tl.zeros([BLOCK_N, DP], tl.float32)
        dv = tl.zeros([BLOCK_N, DP], tl.float32)
        ds_base = ((b * HEADS + h) * KK) * N
        for j in tl.static_range(KK):
            qy = my - (j // KS - R)
            qx = mx - (j % KS - R)
            ok = mask_m & (qy >= 0) & (qy < H) & (qx >= 0) & (qx < W)
            n = qy * W + qx
            ds = tl.load(DS + ds_base + j * N + n, mask=ok, other=0.0)
            ae = tl.load(AEFF + ds_base + j * N + n, mask=ok, other=0.0)
            _, _, _, qs = _query_terms(Q, QE, T, b * sq_b + n * sq_n, h, n, ok, offs_d, mask_d,
                                          qy, qx, H, W, P, eps, D, R)
            do = tl.load(DO + b * sdo_b + n[:, None] * sdo_n + h * D + offs_d[None, :],
                         mask=ok[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            dkn += ds[:, None] * qs
            dv += ae[:, None] * do
        dk = _normalize_rows_grad(kn, knrm, dkn, eps)
        dkv_ptr = DKV + b * skv_b + offs_m[:, None] * skv_n + h * D + offs_d[None, :]
        tl.store(dkv_ptr, dk.to(DKV.dtype.element_ty), mask=m2)
        tl.store(dkv_ptr + C, dv.to(DKV.dtype.element_ty), mask=m2)

    return SimpleNamespace(fwd=fwd_kernel, bwd_query=bwd_query_kernel, bwd_pool=bwd_pool_kernel, bwd_key=bwd_key_kernel)


# ----------------------------------------------------------------------------- launchers

def _blocks(D: int, P: int):
    DP = max(16, next_pow2(D))
    BLOCK_P = min(64, max(16, next_pow2(P)))
    return DP, BLOCK_P


def _dot_precision(q) -> str:
    """tf32 tensor-core dots for 16-bit activations (their error stays under the inputs' rounding);
    exact fp32 (``ieee``) for fp32 inputs, so the fp32 path matches the reference to ~1e-6."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


_QUERY_LAUNCH = (32, 4)  # (queries per program, warps) of the query-side backward


_KEY_BLOCK_N = 32  # keys per program of the key-side backward


def _pool_block_n(prec: str) -> int:
    """Queries per step of the pooled-key backward: 64 spills registers with fp32 (ieee) dots on
    Hopper (measured 20.8 ms vs 1.8 ms at 32, micro stage 1), tf32 dots hold 64 (0.25 ms)."""
    return 32 if prec == "ieee" else 64


def _fwd_impl(q: Tensor, kv: Tensor, kv_pool: Tensor, qe: Tensor, t: Tensor, lb: Tensor, pb: Tensor, tok: Tensor,
              tb: Tensor, H: int, W: int, heads: int, window: int, need_lse: bool) -> tuple[Tensor, Tensor]:
    B, N, C = q.shape
    P = kv_pool.shape[1]
    D = C // heads
    DP, BLOCK_P = _blocks(D, P)
    BLOCK_N = 64 if DP <= 32 else 32
    out = torch.empty_like(q)
    lse = torch.empty(B * heads, N, device=q.device, dtype=torch.float32) if need_lse else out
    grid = (cdiv(N, BLOCK_N), B * heads)
    _load().fwd[grid](q, kv, kv_pool, qe, t, lb, pb, tok, tb, out, lse,
                      N, H, W, P, C, q.stride(0), q.stride(1), kv.stride(0), kv.stride(1),
                      kv_pool.stride(0), kv_pool.stride(1), out.stride(0), out.stride(1), _EPS,
                      HEADS=heads, D=D, DP=DP, KS=window, BLOCK_N=BLOCK_N, BLOCK_P=BLOCK_P, STORE_LSE=need_lse,
                      PREC=_dot_precision(q), num_warps=4)
    if not need_lse:
        lse = out.new_empty(0, dtype=torch.float32)
    return out, lse


def _normalize_backward(x, grad_hat):
    """Gradient of F.normalize(x, dim=-1) given the gradient of its output (the kernels normalise pooled keys)."""
    nrm = x.norm(dim=-1, keepdim=True)
    x_hat = x / nrm.clamp_min(_EPS)
    dx = (grad_hat - x_hat * (x_hat * grad_hat).sum(-1, keepdim=True)) / nrm.clamp_min(_EPS)
    return torch.where(nrm > _EPS, dx, grad_hat / _EPS)


def _bwd_impl(grad: Tensor, q: Tensor, kv: Tensor, kv_pool: Tensor, qe: Tensor, t: Tensor, lb: Tensor, pb: Tensor,
              tok: Tensor, tb: Tensor, out: Tensor, lse: Tensor, H: int, W: int, heads: int, window: int
              ) -> list[Tensor]:
    B, N, C = q.shape
    P = kv_pool.shape[1]
    D = C // heads
    KK = window * window
    KKP = next_pow2(KK)
    DP, BLOCK_P = _blocks(D, P)
    grad = grad.contiguous()
    prec = _dot_precision(q)
    BLOCK_N, query_warps = _QUERY_LAUNCH
    n_blocks = cdiv(N, BLOCK_N)
    target = 16 * sm_count(q.device)
    b_chunks = max(1, min(B, cdiv(target, n_blocks * heads)))
    b_per_prog = cdiv(B, b_chunks)
    b_chunks = cdiv(B, b_per_prog)
    dq = torch.empty_like(q)
    ds = torch.empty(B, heads, KK, N, device=q.device, dtype=torch.float32)
    aeff = torch.empty_like(ds)
    delta = torch.empty(B * heads, N, device=q.device, dtype=torch.float32)
    dpb = torch.zeros(heads, N, P, device=q.device, dtype=torch.float32)
    width = 2 * KKP + 1 + DP + DP * KKP
    part = torch.empty(n_blocks * b_chunks * heads, width, device=q.device, dtype=torch.float32)
    k = _load()
    k.bwd_query[(n_blocks, heads, b_chunks)](
        q, kv, kv_pool, qe, t, lb, pb, tok, tb, out, grad, lse, dq, ds, aeff, delta, dpb, part,
        B, N, H, W, P, C, q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), kv_pool.stride(0),
        kv_pool.stride(1), out.stride(0), out.stride(1), grad.stride(0), grad.stride(1), _EPS, b_per_prog,
        HEADS=heads, D=D, DP=DP, KS=window, KKP=KKP, BLOCK_N=BLOCK_N, BLOCK_P=BLOCK_P,
        SINGLE_P=P <= BLOCK_P, PREC=prec, num_warps=query_warps)
    # split the query axis so the pooled-key grads use the whole GPU (one program per (b, h) idled it)
    pool_programs = cdiv(P, BLOCK_P) * B * heads
    n_splits = max(1, min(cdiv(N, 64), cdiv(target, pool_programs)))
    n_per_prog = cdiv(cdiv(N, n_splits), 64) * 64
    n_splits = cdiv(N, n_per_prog)
    dkvp_parts = torch.empty(n_splits, B, P, 2 * C, device=q.device, dtype=torch.float32)
    k.bwd_pool[(cdiv(P, BLOCK_P), B * heads, n_splits)](
        q, kv_pool, qe, t, pb, grad, lse, delta, dkvp_parts, B, N, H, W, P, C, q.stride(0), q.stride(1),
        kv_pool.stride(0), kv_pool.stride(1), grad.stride(0), grad.stride(1), _EPS, n_per_prog,
        HEADS=heads, D=D, DP=DP, KS=window, BLOCK_N=_pool_block_n(prec), BLOCK_P=BLOCK_P, PREC=prec,
        num_warps=4)
    dkvp_hat = dkvp_parts.sum(0) if n_splits > 1 else dkvp_parts[0]
    dkv = torch.empty_like(kv)
    k.bwd_key[(cdiv(N, _KEY_BLOCK_N), B * heads)](
        q, kv, qe, t, grad, ds, aeff, dkv, N, H, W, P, C, q.stride(0), q.stride(1), kv.stride(0), kv.stride(1),
        grad.stride(0), grad.stride(1), _EPS, HEADS=heads, D=D, DP=DP, KS=window, BLOCK_N=_KEY_BLOCK_N,
        num_warps=4)
    part = part.view(n_blocks * b_chunks, heads, width).sum(0)
    dlb = part[:, :KK]
    dtb = part[:, KKP:KKP + KK]
    dt = part[:, 2 * KKP]
    dqe = part[:, 2 * KKP + 1:2 * KKP + 1 + D]
    dtok = part[:, 2 * KKP + 1 + DP:].view(heads, DP, KKP)[:, :D, :KK]
    dkp = _normalize_backward(kv_pool[..., :C].float().reshape(B, P, heads, D),
                              dkvp_hat[..., :C].reshape(B, P, heads, D))
    dkv_pool = torch.cat([dkp.reshape(B, P, C), dkvp_hat[..., C:]], dim=-1).to(kv_pool.dtype)
    params = [g.to(ref.dtype, copy=True) for g, ref in ((dqe, qe), (dt, t), (dlb, lb), (dpb, pb), (dtok, tok), (dtb, tb))]
    return [dq, dkv, dkv_pool, *params]


# ----------------------------------------------------------------------------- op registration

def _fwd_fake(q, kv, kv_pool, qe, t, lb, pb, tok, tb, height, width, num_heads, window, need_lse):
    B, N, _ = q.shape
    lse = q.new_empty((B * num_heads, N) if need_lse else (0,), dtype=torch.float32)
    return torch.empty_like(q), lse


def _bwd_fake(grad, q, kv, kv_pool, qe, t, lb, pb, tok, tb, out, lse, height, width, num_heads, window):
    return [torch.empty_like(x) for x in (q, kv, kv_pool, qe, t, lb, pb, tok, tb)]


def _setup(ctx, inputs, output):
    q, kv, kv_pool, qe, t, lb, pb, tok, tb, height, width, num_heads, window, _ = inputs
    out, lse = output
    ctx.save_for_backward(q, kv, kv_pool, qe, t, lb, pb, tok, tb, out, lse)
    ctx.geometry = (height, width, num_heads, window)


def _backward(ctx, grad_out, _grad_lse):
    grads = _bwd_op(grad_out, *ctx.saved_tensors, *ctx.geometry)
    return (*grads, None, None, None, None, None)


_bwd_op = BackwardOp("metazoo::aggregated_attention_bwd", _bwd_impl, _bwd_fake)
_fwd = ForwardOp("metazoo::aggregated_attention_fwd", _fwd_impl, _fwd_fake, _setup, _backward)


def _flops(q_shape, kv_pool_shape, num_heads, window):
    """Multiply-adds x2 of the fused op: window logits, dynamic bias, both value sums, pooled logits."""
    B, N, C = q_shape
    P = kv_pool_shape[1]
    return 2 * B * N * C * (3 * window * window + 2 * P)


def _register_flop_formulas():
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.metazoo.aggregated_attention_fwd)
    def _fwd_flops(q_shape, kv_shape, kv_pool_shape, *args, out_shape=None, **kwargs):
        return _flops(q_shape, kv_pool_shape, args[8], args[9])

    @register_flop_formula(torch.ops.metazoo.aggregated_attention_bwd)
    def _bwd_flops(grad_shape, q_shape, kv_shape, kv_pool_shape, *args, out_shape=None, **kwargs):
        return 2 * _flops(q_shape, kv_pool_shape, args[10], args[11])


_register_flop_formulas()


# ----------------------------------------------------------------------------- public dispatcher

@dispatcher(aggregated_attention_ref)
def aggregated_attention(q, kv, kv_pool, query_embedding, temperature, local_bias, pool_bias, tokens, token_bias,
                         height: int, width: int, num_heads: int, window_size: int = 3,
                         backend: str | None = None):
    """Aggregated attention; Triton-fused on CUDA (or under TRITON_INTERPRET), else the reference.

    Shapes: q (B, N, C), kv (B, N, 2C) keys then values, kv_pool (B, P, 2C), query_embedding (h, D),
    temperature (h,) before softplus, local_bias (h, k²), pool_bias (h, N, P), tokens (h, D, k²),
    token_bias (h, k²). Returns (B, N, C) in q's dtype.
    """
    _check(q, kv, kv_pool, query_embedding, local_bias, pool_bias, tokens, token_bias,
           height, width, num_heads, window_size)
    if resolve(backend, q, kv, kv_pool) == "torch":
        return aggregated_attention_ref(q, kv, kv_pool, query_embedding, temperature, local_bias, pool_bias,
                                        tokens, token_bias, height, width, num_heads, window_size)
    need_lse = torch.is_grad_enabled() and any(
        x.requires_grad for x in (q, kv, kv_pool, query_embedding, temperature, local_bias, pool_bias, tokens,
                                  token_bias))
    t = F.softplus(temperature.float())
    out, _ = _fwd(q.contiguous(), kv.contiguous(), kv_pool.contiguous(), query_embedding.contiguous(), t,
                  local_bias.contiguous(), pool_bias.contiguous(), tokens.contiguous(), token_bias.contiguous(),
                  height, width, num_heads, window_size, need_lse)
    return out
