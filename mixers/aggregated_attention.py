"""TransNeXt token mixers: aggregated (pixel-focused) attention and the last stage's plain attention.

Both use L2-normalised queries and keys, a learned query embedding, a softplus temperature times a
log-length scale, and a continuous relative-position bias from a small MLP over log-spaced
coordinates. Parameter names follow the official implementation so its checkpoints load as-is.
Resolution-dependent tables are built from the actual feature size, so any input size runs.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch.utils.checkpoint import checkpoint

from metazoo.kernels.aggregated_attention import aggregated_attention, aggregated_attention_ref
from metazoo.kernels.dispatch import plain_pytorch

__all__ = ["AggregatedAttention", "LengthScaledAttention", "relative_position_table", "pool_size"]


def pool_size(height: int, width: int, sr_ratio: int) -> tuple[int, int]:
    """Pooled-key grid for an ``height×width`` map: the map divided by ``sr_ratio`` (at least 1×1)."""
    return max(1, height // sr_ratio), max(1, width // sr_ratio)


def _axis_offsets(length: int, keys: int) -> tuple[list[int], list[int]]:
    """One axis of the position table, in integer arithmetic on the sizes only (so TorchScript, torch.fx,
    torch.export and ONNX see no data-dependent shapes): the doubled offsets ``2·(query - key centre)``
    that occur, ascending, and for every (query, key) pair, row-major, its slot among them. Key centres
    are those of adaptive average pooling, ``(start + end - 1) / 2`` of each pooling bin."""
    lo = 2 * (length - 1)  # |doubled offset| <= 2·(length - 1)
    doubled: list[int] = []
    for q in range(length):
        for k in range(keys):
            doubled.append(2 * q - (k * length) // keys - ((k + 1) * length + keys - 1) // keys + 1)
    slot = [-1] * (2 * lo + 1)
    for d in doubled:
        slot[d + lo] = 0
    values: list[int] = []
    for s in range(len(slot)):
        if slot[s] == 0:
            slot[s] = len(values)
            values.append(s - lo)
    return values, [slot[d + lo] for d in doubled]


_axis_offsets_cached = functools.lru_cache(maxsize=64)(_axis_offsets)  # Python ints only: safe under any tracer


def relative_position_table(query_hw: tuple[int, int], key_hw: tuple[int, int], pretrain_hw: tuple[int, int],
                            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(index (Nq*Nk,), log-spaced coordinate table (U, 2)) for the continuous position bias.

    Coordinates are query minus pooled-key centre, scaled so ``pretrain_hw`` spans ±8, then
    sign·log2(1+|x|)/3; the table holds each distinct coordinate once, sorted (the official
    ``torch.unique`` table, bit for bit). It is the product of the two axes' distinct offsets, so it is
    built from the sizes alone: no ``torch.unique``, static shapes for every tracer and exporter.
    """
    if torch.jit.is_scripting():
        rows, row_slot = _axis_offsets(query_hw[0], key_hw[0])
        cols, col_slot = _axis_offsets(query_hw[1], key_hw[1])
    else:
        rows, row_slot = _axis_offsets_cached(query_hw[0], key_hw[0])
        cols, col_slot = _axis_offsets_cached(query_hw[1], key_hw[1])
    index = (torch.tensor(row_slot, device=device).view(query_hw[0], 1, key_hw[0], 1) * len(cols)
             + torch.tensor(col_slot, device=device).view(1, query_hw[1], 1, key_hw[1])).reshape(-1)
    dh = torch.tensor(rows, dtype=torch.float32, device=device) * 0.5 / (pretrain_hw[0] - 1) * 8
    dw = torch.tensor(cols, dtype=torch.float32, device=device) * 0.5 / (pretrain_hw[1] - 1) * 8
    coords = torch.stack(torch.meshgrid(dh, dw, indexing="ij"), dim=-1).reshape(-1, 2)
    return index, torch.sign(coords) * torch.log2(coords.abs() + 1.0) / 3.0  # log2(8) = 3


class _ScaledCosineMixin(nn.Module):
    """Parameters shared by both mixers: temperature, query embedding and the position-bias MLP."""

    def _init_shared(self, dim: int, num_heads: int, pretrain_hw):
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.pretrain_hw = tuple(pretrain_hw)
        # softplus(temperature) starts at 1/0.24
        self.temperature = nn.Parameter(torch.log(torch.expm1(torch.full((num_heads, 1, 1), 1 / 0.24))))
        self.query_embedding = nn.Parameter(nn.init.trunc_normal_(torch.empty(num_heads, 1, self.head_dim), std=0.02))
        self.cpb_fc1 = nn.Linear(2, 512)
        self.cpb_act = nn.ReLU(inplace=True)
        self.cpb_fc2 = nn.Linear(512, num_heads)

    def _position_bias(self, query_hw: tuple[int, int], key_hw: tuple[int, int],
                       rel_pos: tuple[torch.Tensor, torch.Tensor] | None, device: torch.device) -> torch.Tensor:
        """(heads, Nq, Nk) continuous relative-position bias; ``rel_pos`` = (index, table) or None."""
        if rel_pos is None:
            rel_pos = relative_position_table(query_hw, key_hw, self.pretrain_hw, device)
        index, table = rel_pos
        per_coord = self.cpb_fc2(self.cpb_act(self.cpb_fc1(table)))  # (U, heads)
        nq, nk = query_hw[0] * query_hw[1], key_hw[0] * key_hw[1]
        return per_coord.t()[:, index].reshape(self.num_heads, nq, nk)


class AggregatedAttention(_ScaledCosineMixin):
    """Pixel-focused attention: a ``window_size``² neighbourhood plus pooled keys, one softmax.

    ``pretrain_hw`` is the feature size of this stage at pre-training resolution (it scales the
    position-bias coordinates); ``sr_ratio`` sets the pooled grid (``H//sr × W//sr``).
    ``recompute_pool`` recomputes the pooled branch (1×1 conv, GELU, pool) in the backward instead
    of storing two full-resolution maps for it.
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, pretrain_hw, window_size: int = 3,
                 qkv_bias: bool = True, proj_drop: float = 0.0, backend: str | None = None,
                 recompute_pool: bool = True):
        super().__init__()
        if window_size < 1 or window_size % 2 == 0:
            raise ValueError(f"window_size must be a positive odd integer; got {window_size}")
        if sr_ratio < 1:
            raise ValueError(f"sr_ratio must be >= 1; got {sr_ratio}")
        self._init_shared(dim, num_heads, pretrain_hw)
        self.sr_ratio, self.window_size, self.backend = sr_ratio, window_size, backend
        self.recompute_pool = recompute_pool
        local_len = window_size * window_size
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr = nn.Conv2d(dim, dim, kernel_size=1)
        self.norm = nn.LayerNorm(dim)
        self.act = nn.GELU()
        self.relative_pos_bias_local = nn.Parameter(
            nn.init.trunc_normal_(torch.empty(num_heads, local_len), std=0.0004))
        self.learnable_tokens = nn.Parameter(
            nn.init.trunc_normal_(torch.empty(num_heads, self.head_dim, local_len), std=0.02))
        self.learnable_bias = nn.Parameter(torch.zeros(num_heads, 1, local_len))

    def pooled_tokens(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, N, C) -> (B, P, C): 1×1 conv, GELU, adaptive average pool, LayerNorm."""
        B, N, C = x.shape
        y = self.act(F.linear(x, self.sr.weight.reshape(C, C), self.sr.bias))
        y = y.reshape(B, height, width, C).permute(0, 3, 1, 2)
        y = F.adaptive_avg_pool2d(y, pool_size(height, width, self.sr_ratio))
        return self.norm(y.flatten(2).transpose(1, 2))

    def key_grid(self, height: int, width: int) -> tuple[int, int]:
        """Pooled-key grid this mixer uses on a ``height×width`` map."""
        return pool_size(height, width, self.sr_ratio)

    def forward(self, x: torch.Tensor, height: int, width: int,
                rel_pos: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x: (B, N, C) tokens of a row-major ``height×width`` map -> (B, N, C).

        ``rel_pos``: precomputed :func:`relative_position_table` for this map (shared by a stage).
        """
        if not torch.jit.is_scripting() and self.recompute_pool and torch.is_grad_enabled() and x.requires_grad:
            pooled = checkpoint(self.pooled_tokens, x, height, width, use_reentrant=False)
        else:
            pooled = self.pooled_tokens(x, height, width)
        kv_pool = self.kv(pooled)
        pool_bias = self._position_bias((height, width), self.key_grid(height, width), rel_pos, x.device)
        h = self.num_heads
        args = (self.q(x), self.kv(x), kv_pool, self.query_embedding.reshape(h, self.head_dim),
                self.temperature.reshape(h), self.relative_pos_bias_local, pool_bias, self.learnable_tokens,
                self.learnable_bias.reshape(h, -1))
        if torch.jit.is_scripting() or plain_pytorch("aggregated_attention"):
            out = aggregated_attention_ref(*args, height, width, h, self.window_size)
        else:
            out = aggregated_attention(*args, height, width, h, self.window_size, backend=self.backend)
        return self.proj_drop(self.proj(out))


class LengthScaledAttention(_ScaledCosineMixin):
    """Global attention of TransNeXt's last stage: cosine similarity scaled by log(N)·softplus(T)."""

    def __init__(self, dim: int, num_heads: int, pretrain_hw, qkv_bias: bool = True, proj_drop: float = 0.0):
        super().__init__()
        self._init_shared(dim, num_heads, pretrain_hw)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def key_grid(self, height: int, width: int) -> tuple[int, int]:
        """Every token is a key: the key grid is the map itself."""
        return height, width

    def forward(self, x: torch.Tensor, height: int, width: int,
                rel_pos: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x: (B, N, C) tokens of a row-major ``height×width`` map -> (B, N, C).

        ``rel_pos``: precomputed :func:`relative_position_table` for this map (shared by a stage).
        """
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        scale = F.softplus(self.temperature) * math.log(N)
        q = (F.normalize(q, dim=-1) + self.query_embedding) * scale
        bias = self._position_bias((height, width), (height, width), rel_pos, x.device)
        k = F.normalize(k, dim=-1)
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype),
                                             attn_mask=bias.to(q.dtype).expand(B, -1, -1, -1), scale=1.0)
        # a copy, never a view: CPU SDPA returns (B, N, h, D)-strided output, so export would record a view
        # that the ONNX exporter's SDPA decomposition (contiguous (B, h, N, D) output) cannot take
        out = out.transpose(1, 2).clone(memory_format=torch.contiguous_format)
        return self.proj_drop(self.proj(out.reshape(B, N, C).to(x.dtype)))
