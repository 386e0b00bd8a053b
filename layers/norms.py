"""Normalisation layers used by the MetaFormer families (parameter names as in timm).

``GroupNorm1`` (one group, NCHW) is PoolFormer's norm; ``LayerNorm2d`` normalises the channels of
an NCHW map; ``LayerNorm`` normalises the last dim (NLC / NHWC). ``bias=False`` gives the
"no bias" variants of the MetaFormer baselines.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.dispatch import plain_pytorch
from ..kernels.dtypes import matmul_input_dtype
from ..kernels.group_norm import group_norm1
from ..kernels.norm_residual import layer_norm


class GroupNorm1(nn.GroupNorm):
    """GroupNorm with a single group over an NCHW tensor (normalises over C, H, W)."""

    def __init__(self, num_channels: int, eps: float = 1e-5, bias: bool = True):
        super().__init__(1, num_channels, eps=eps)
        if not bias:
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: NCHW."""
        if torch.jit.is_scripting() or plain_pytorch("group_norm1"):
            return F.group_norm(x, 1, self.weight, self.bias, self.eps)
        return group_norm1(x, self.weight, self.bias, self.eps)


class LayerNorm(nn.LayerNorm):
    """LayerNorm over the last dimension (NLC or NHWC), eps 1e-6 by default."""

    def __init__(self, num_channels: int, eps: float = 1e-6, bias: bool = True, channels_first: bool = False):
        super().__init__(num_channels, eps=eps, bias=bias)
        self.channels_first = channels_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., C), or NCHW when ``channels_first``."""
        if torch.jit.is_scripting() or plain_pytorch("layer_norm"):
            if self.channels_first:
                x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
                return x.permute(0, 3, 1, 2)
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return layer_norm(x, self.weight, self.bias, self.eps, channels_first=self.channels_first)


class LayerNorm2d(LayerNorm):
    """LayerNorm over the channels of an NCHW tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-6, bias: bool = True):
        super().__init__(num_channels, eps=eps, bias=bias, channels_first=True)


def norm_for_matmul(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` whose only consumer is a matmul (linear, 1x1 conv). Our LayerNorms' kernel then writes
    it in the dtype autocast casts that matmul's input to: the bits autocast would make of the fp32
    result, in half the bytes and without the cast. Other norms, and the plain path, run as they are."""
    if type(norm) in (LayerNorm, LayerNorm2d) and not plain_pytorch("layer_norm"):
        return layer_norm(x, norm.weight, norm.bias, norm.eps, channels_first=norm.channels_first,
                          n_dtype=matmul_input_dtype(x))
    return norm(x)


def group_norm1_no_bias(num_channels: int) -> GroupNorm1:
    """PoolFormerV2's norm: one-group GroupNorm without bias, eps 1e-6."""
    return GroupNorm1(num_channels, eps=1e-6, bias=False)


def layer_norm2d_no_bias(num_channels: int) -> LayerNorm2d:
    """ConvFormer/CAFormer conv-stage norm: channels-first LayerNorm without bias."""
    return LayerNorm2d(num_channels, eps=1e-6, bias=False)


def layer_norm_no_bias(num_channels: int) -> LayerNorm:
    """CAFormer attention-stage norm: LayerNorm (last dim) without bias."""
    return LayerNorm(num_channels, eps=1e-6, bias=False)
