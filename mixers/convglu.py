"""Convolutional GLU channel mixer (TransNeXt): ``fc2(GELU(dwconv3x3(x1)) * x2)``, ``[x1, x2] = fc1(x)``."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ConvGLU"]


class _DepthwiseConv(nn.Module):
    """3×3 depthwise conv on (B, N, C) tokens; nested as ``dwconv.dwconv`` like the official keys."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        B, N, C = x.shape
        y = x.reshape(B, height, width, C).permute(0, 3, 1, 2)  # channels-last NCHW view, no copy
        y = F.conv2d(y, self.dwconv.weight, self.dwconv.bias, padding=1, groups=C)
        return y.permute(0, 2, 3, 1).reshape(B, N, C)


class ConvGLU(nn.Module):
    """Gated channel mixer with a depthwise 3×3 conv on the gate branch.

    ``hidden_dim`` is the MLP width before TransNeXt's 2/3 reduction (``int(2 * hidden_dim / 3)``
    channels per branch keeps the parameter count of a plain MLP).
    """

    def __init__(self, dim: int, hidden_dim: int, act_layer=nn.GELU, drop: float = 0.0):
        super().__init__()
        hidden = int(2 * hidden_dim / 3)
        self.fc1 = nn.Linear(dim, hidden * 2)
        self.dwconv = _DepthwiseConv(hidden)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """x: (B, N, C) tokens of a row-major ``height×width`` map -> (B, N, C)."""
        gate, value = self.fc1(x).chunk(2, dim=-1)
        x = self.drop(self.act(self.dwconv(gate, height, width)) * value)
        return self.drop(self.fc2(x))
