"""Two-layer MLP channel mixer (fc1, act, fc2) as Linear (channels-last) or 1x1 Conv2d (NCHW)."""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.act_linear import act_linear
from ..kernels.dispatch import plain_pytorch
from ..layers.activations import StarReLU


class Mlp(nn.Module):
    """``fc2(drop(act(fc1(x))))``; ``use_conv`` picks 1x1 convs so NCHW maps need no permute."""

    def __init__(self, dim: int, hidden_dim: int | None = None, out_dim: int | None = None,
                 act_layer=nn.GELU, bias: bool = True, drop: float = 0.0, use_conv: bool = False):
        super().__init__()
        hidden_dim = hidden_dim or 4 * dim
        out_dim = out_dim or dim
        if use_conv:
            self.fc1 = nn.Conv2d(dim, hidden_dim, 1, bias=bias)
            self.fc2 = nn.Conv2d(hidden_dim, out_dim, 1, bias=bias)
        else:
            self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
            self.fc2 = nn.Linear(hidden_dim, out_dim, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.drop2 = nn.Dropout(drop)
        self.use_conv = use_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: NCHW when built with ``use_conv`` else (..., C)."""
        return self.forward_hidden(self.fc1(x))

    def forward_hidden(self, z: torch.Tensor) -> torch.Tensor:
        """The MLP after fc1, ``z = fc1(x)``: for callers that fuse fc1 with the norm before it."""
        if torch.jit.is_scripting() or plain_pytorch("act_linear") or (self.drop1.p > 0 and self.training):
            return self.drop2(self.fc2(self.drop1(self.act(z))))
        if isinstance(self.act, StarReLU):  # act + fc2 in one op that keeps only z for backward
            y = act_linear(z, self.fc2.weight, self.fc2.bias, "star_relu", self.act.scale, self.act.bias, self.use_conv)
        elif type(self.act) is nn.GELU and self.act.approximate == "none":
            y = act_linear(z, self.fc2.weight, self.fc2.bias, "gelu", channels_first=self.use_conv)
        else:
            y = self.fc2(self.act(z))
        return self.drop2(y)
