"""Activations and scaling layers of the MetaFormer baselines (parameter names as in timm)."""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.dispatch import plain_pytorch
from ..kernels.star_relu import star_relu


class StarReLU(nn.Module):
    """StarReLU: ``s * relu(x) ** 2 + b`` with learnable scalars ``s`` and ``b``."""

    def __init__(self, scale_value: float = 1.0, bias_value: float = 0.0, learnable: bool = True):
        super().__init__()
        self.scale = nn.Parameter(torch.full((1,), float(scale_value)), requires_grad=learnable)
        self.bias = nn.Parameter(torch.full((1,), float(bias_value)), requires_grad=learnable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Any layout."""
        if torch.jit.is_scripting() or plain_pytorch("star_relu"):
            return self.scale * torch.relu(x) ** 2 + self.bias
        return star_relu(x, self.scale, self.bias)


class SquaredReLU(nn.Module):
    """``relu(x) ** 2``, the activation of the MetaFormer MLP classifier head."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.square(torch.relu(x))


class Scale(nn.Module):
    """Per-channel learnable scale (layer scale / residual scale) for NCHW or channels-last input."""

    def __init__(self, dim: int, init_value: float = 1.0, channels_first: bool = True):
        super().__init__()
        self.channels_first = channels_first
        self.scale = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: NCHW when ``channels_first`` else (..., C)."""
        return x * (self.scale.view(-1, 1, 1) if self.channels_first else self.scale)
