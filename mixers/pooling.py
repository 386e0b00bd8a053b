"""PoolFormer's token mixer: 3x3 average pooling (padding excluded from the mean) minus the input."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Pooling(nn.Module):
    """``avg_pool(x) - x`` with ``count_include_pad=False``; stride 1, same size."""

    def __init__(self, dim: int | None = None, pool_size: int = 3, **_):
        super().__init__()
        if pool_size % 2 != 1:
            raise ValueError(f"pool_size={pool_size} must be odd (same-size pooling)")
        self.pool_size = pool_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: NCHW."""
        p = self.pool_size
        return F.avg_pool2d(x, p, stride=1, padding=p // 2, count_include_pad=False) - x
