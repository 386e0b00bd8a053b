"""Multi-head self-attention token mixer (CAFormer's upper stages) on top of SDPA."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Vanilla MHSA; heads of ``head_dim`` channels; ``F.scaled_dot_product_attention`` does the math."""

    matmul_input = True  # its first op is qkv: the norm before it may hand over autocast's dtype

    def __init__(self, dim: int, head_dim: int = 32, num_heads: int | None = None, qkv_bias: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, proj_bias: bool = False, **_):
        super().__init__()
        self.head_dim = head_dim
        self.num_heads = max(1, num_heads or dim // head_dim)
        inner = self.num_heads * head_dim
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, inner * 3, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, C)."""
        B, N, _ = x.shape
        # q, k, v as (B, heads, N, head_dim) views of qkv's output; unbinding dim 2 of (B, N, 3, heads, head_dim)
        # makes backward stack dq, dk, dv straight into qkv's layout (one copy, where permute + unbind(0) need two)
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).unbind(2)
        x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        return self.proj_drop(self.proj(x))
