"""RandFormer's token mixer: a frozen random token-mixing matrix (Yu et al., "MetaFormer Baselines
for Vision", TPAMI 2024).

The matrix is ``softmax(U(0, 1))`` over rows, drawn once, never trained, and saved with the model
(a persistent buffer, so official checkpoints load and optimizers never see it). It is tied to the
token grid it was made for (14x14 and 7x7 in the last two stages at 224 px). At any other grid
the matrix is resized: its (query grid, key grid) form is bilinearly interpolated to the new grid
on both axes and each row renormalised to sum to 1, so every output token stays a convex mix of
the input tokens. At the native grid the stored matrix is used as is.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import nn


@register_notrace_module  # timm's FX tracer keeps the mixer whole: the matrix it uses depends on the grid size
class RandomMixing(nn.Module):
    """``out[:, :, m] = sum_n M[m, n] x[:, :, n]`` over the flattened H*W tokens of an NCHW map."""

    def __init__(self, dim: int | None = None, num_tokens: int = 196, **_):
        super().__init__()
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(f"num_tokens={num_tokens} must be a square (a side x side token grid); "
                             f"accepted: e.g. 196 (14x14) or 49 (7x7)")
        self.side = side
        self.register_buffer("random_matrix", torch.softmax(torch.rand(num_tokens, num_tokens), dim=-1))

    def matrix(self, h: int, w: int) -> torch.Tensor:
        """The (h*w, h*w) mixing matrix for an h x w grid: stored one, or resized and row-renormalised."""
        m = self.random_matrix
        s = self.side
        if (h, w) == (s, s):
            return m
        n = s * s
        m = F.interpolate(m.reshape(n, 1, s, s), size=(h, w), mode="bilinear", align_corners=False)  # keys
        m = m.reshape(s, s, h * w).permute(2, 0, 1).unsqueeze(1)  # (new keys, 1, query grid)
        m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False).reshape(h * w, h * w).t()
        return m / m.sum(-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: NCHW."""
        B, C, H, W = x.shape
        m = self.matrix(H, W).to(x.dtype)
        return torch.matmul(x.reshape(B, C, H * W), m.t()).reshape(B, C, H, W)
