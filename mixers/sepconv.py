"""ConvFormer's token mixer: inverted separable conv (1x1 expand, act, depthwise kxk, 1x1 project)."""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.dispatch import plain_pytorch
from ..kernels.dwconv import dwconv2d
from ..layers.activations import StarReLU


class SepConv(nn.Module):
    """MobileNetV2-style separable conv on NCHW; 1x1 convs kept as Conv2d (timm's weight layout)."""

    matmul_input = True  # its first op is pwconv1: the norm before it may hand over autocast's dtype

    def __init__(self, dim: int, expansion_ratio: float = 2.0, act1_layer=StarReLU, act2_layer=nn.Identity,
                 bias: bool = False, kernel_size: int = 7, **_):
        super().__init__()
        mid = int(expansion_ratio * dim)
        self.pwconv1 = nn.Conv2d(dim, mid, 1, bias=bias)
        self.act1 = act1_layer()
        self.dwconv = nn.Conv2d(mid, mid, kernel_size, padding=kernel_size // 2, groups=mid, bias=bias)
        self.act2 = act2_layer()
        self.pwconv2 = nn.Conv2d(mid, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: NCHW."""
        x = self.pwconv1(x)
        if torch.jit.is_scripting() or plain_pytorch("dwconv2d"):
            return self.pwconv2(self.act2(self.dwconv(self.act1(x))))
        if isinstance(self.act1, StarReLU) and isinstance(self.act2, nn.Identity):
            # StarReLU applied inside the depthwise conv's loads: the activation is never stored
            return self.pwconv2(dwconv2d(x, self.dwconv.weight, self.dwconv.bias, self.act1.scale, self.act1.bias))
        return self.pwconv2(self.act2(self.dwconv(self.act1(x))))
