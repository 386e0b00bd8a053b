"""Stems, downsampling layers and classifier heads of the hierarchical families (timm key names for
the timm families; ViM2's patchify stem, separable-conv downsampling and norm-pool head)."""
from __future__ import annotations

from collections import OrderedDict

import torch
from timm.layers import SelectAdaptivePool2d
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..kernels.dispatch import fx_tracing
from ..layers.activations import SquaredReLU
from ..layers.norms import LayerNorm, LayerNorm2d
from ._common import check_global_pool, check_input_size

TOTAL_STRIDE = 32


class PatchStem(nn.Module):
    """MetaFormer stem: 7x7 stride-4 conv (padding 2) then an optional norm; NCHW."""

    def __init__(self, in_chans: int, dim: int, norm_layer=None):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, dim, 7, stride=4, padding=2)
        self.norm = norm_layer(dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: NCHW image -> NCHW at stride 4."""
        if not torch.jit.is_scripting():  # a global int is no TorchScript constant
            check_input_size(x, TOTAL_STRIDE)
        return self.norm(self.conv(x))


class ConvStem(nn.Module):
    """MambaOut stem: two 3x3 stride-2 convs with LayerNorm (mid norm optional) and act; NCHW -> NHWC.

    With gradients on, the mid norm and act are recomputed in backward from conv1's output: the norm's
    output (the act's input, fp32 under CUDA autocast) is the largest map of the network, twice conv1's
    bf16 output per pixel at stride 2, and autograd would otherwise keep it for the whole step."""

    def __init__(self, in_chans: int, dim: int, mid_norm: bool = True, act_layer=nn.GELU, norm_layer=LayerNorm):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1)
        self.norm1 = norm_layer(dim // 2) if mid_norm else None
        self.act = act_layer()
        self.conv2 = nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1)
        self.norm2 = norm_layer(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: NCHW image -> NHWC at stride 4."""
        if not torch.jit.is_scripting():  # a global int is no TorchScript constant
            check_input_size(x, TOTAL_STRIDE)
        x = self.conv1(x)
        if torch.jit.is_scripting() or self.norm1 is None or fx_tracing() or not torch.is_grad_enabled():
            x = self._norm_act(x)  # without the mid norm, act keeps conv1's output anyway
        else:  # keeps conv1's output only (bit-equal: the recompute runs the same ops under the same autocast)
            x = checkpoint(self._norm_act, x, use_reentrant=False)
        return self.norm2(self.conv2(x).permute(0, 2, 3, 1))

    def _norm_act(self, x: torch.Tensor) -> torch.Tensor:
        """act(norm1(x)) on conv1's NCHW output (norm over channels)."""
        if self.norm1 is not None:
            x = self.norm1(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.act(x)


class Downsampling(nn.Module):
    """Optional pre-norm then 3x3 stride-2 conv; NCHW (MetaFormer)."""

    def __init__(self, in_dim: int, out_dim: int, norm_layer=None):
        super().__init__()
        self.norm = norm_layer(in_dim) if norm_layer else nn.Identity()
        self.conv = nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: NCHW."""
        return self.conv(self.norm(x))


class DownsamplingNHWC(nn.Module):
    """3x3 stride-2 conv with a LayerNorm after it (or before it, ``norm_first``); NHWC (MambaOut)."""

    def __init__(self, in_dim: int, out_dim: int, norm_first: bool = False, norm_layer=LayerNorm):
        super().__init__()
        self.norm_first = norm_first
        self.conv = nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1)
        self.norm = norm_layer(in_dim if norm_first else out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: NHWC."""
        if self.norm_first:
            x = self.norm(x)
        x = self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x if self.norm_first else self.norm(x)


class MlpClassifier(nn.Module):
    """MetaFormer MLP classifier: fc1, SquaredReLU, LayerNorm, dropout, fc2."""

    def __init__(self, dim: int, num_classes: int, mlp_ratio: float = 4, drop_rate: float = 0.0):
        super().__init__()
        hidden = int(mlp_ratio * dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = SquaredReLU()
        self.norm = LayerNorm(hidden)
        self.head_drop = nn.Dropout(drop_rate)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.head_drop(self.norm(self.act(self.fc1(x)))))


class PoolNormHead(nn.Module):
    """MetaFormer head on NCHW: global pool, channels-first LayerNorm, flatten, dropout, classifier.
    ``norm_first`` normalises the map before pooling (RIFormer: one-group GroupNorm, then pool)."""

    def __init__(self, dim: int, num_classes: int, pool_type: str = "avg", drop_rate: float = 0.0,
                 mlp_classifier: bool = False, norm_layer=LayerNorm2d, norm_first: bool = False):
        super().__init__()
        self.in_features = self.num_features = dim
        self.mlp_classifier = mlp_classifier
        self.norm_first = norm_first
        self.global_pool = SelectAdaptivePool2d(pool_type=pool_type)
        self.norm = norm_layer(dim)
        self.flatten = nn.Flatten(1) if pool_type else nn.Identity()
        self.drop = nn.Dropout(drop_rate)
        self.fc = self._classifier(num_classes)

    def _classifier(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        return MlpClassifier(self.in_features, num_classes) if self.mlp_classifier else nn.Linear(self.in_features, num_classes)

    def reset(self, num_classes: int, pool_type: str | None = None, reset_other: bool = False) -> None:
        """Replace the classifier (and the pooling / final norm when asked), as timm's ``reset_classifier``."""
        if pool_type is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=pool_type)
            self.flatten = nn.Flatten(1) if pool_type else nn.Identity()
        if reset_other:
            self.norm = nn.Identity()
        self.fc = self._classifier(num_classes)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """x: NCHW features -> logits (or pooled, normed features with ``pre_logits``)."""
        x = self.global_pool(self.norm(x)) if self.norm_first else self.norm(self.global_pool(x))
        x = self.drop(self.flatten(x))
        return x if pre_logits else self.fc(x)


class _ResetClassifier:
    """``reset`` of the NHWC heads: new pool type, the layers before the classifier dropped on
    ``reset_other`` (``_reset_other``), a new classifier on ``num_features``."""

    def reset(self, num_classes: int, pool_type: str | None = None, reset_other: bool = False) -> None:
        if pool_type is not None:
            self.pool_type = check_global_pool(pool_type)
        if reset_other:
            self._reset_other()
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


class NormMlpHead(_ResetClassifier, nn.Module):
    """MambaOut head on NHWC: mean over H, W, LayerNorm, fc + act (+ LayerNorm), dropout, classifier."""

    def __init__(self, dim: int, num_classes: int, pool_type: str = "avg", drop_rate: float = 0.0,
                 mlp_ratio: float = 4, hidden_norm: bool = True, act_layer=nn.GELU):
        super().__init__()
        self.pool_type = check_global_pool(pool_type)
        self.in_features = dim
        hidden = int(mlp_ratio * dim)
        self.norm = LayerNorm(dim)
        layers = [("fc", nn.Linear(dim, hidden)), ("act", act_layer())]
        if hidden_norm:
            layers.append(("norm", LayerNorm(hidden)))
        self.pre_logits = nn.Sequential(OrderedDict(layers))
        self.num_features = hidden
        self.head_dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(hidden, num_classes) if num_classes > 0 else nn.Identity()

    def _reset_other(self) -> None:
        self.norm, self.pre_logits = nn.Identity(), nn.Identity()
        self.num_features = self.in_features

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """x: NHWC features -> logits (or the hidden MLP features with ``pre_logits``)."""
        if self.pool_type == "avg":
            x = x.mean((1, 2))
        x = self.head_dropout(self.pre_logits(self.norm(x)))
        return x if pre_logits else self.fc(x)


class PatchifyStem(nn.Module):
    """4x4 stride-4 conv then LayerNorm; NCHW image -> NHWC."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, dim, 4, stride=4)
        self.norm = LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # a global int is no TorchScript constant
            check_input_size(x, TOTAL_STRIDE)
        return self.norm(self.conv(x).permute(0, 2, 3, 1))


class SepConvDownsample(nn.Module):
    """LayerNorm, depthwise 3x3 stride-2 conv, pointwise projection to ``out_dim``; NHWC."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm = LayerNorm(in_dim)
        self.conv = nn.Conv2d(in_dim, in_dim, 3, stride=2, padding=1, groups=in_dim)
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: NHWC."""
        x = self.conv(self.norm(x).permute(0, 3, 1, 2))
        return self.proj(x.permute(0, 2, 3, 1))


class NormPoolHead(_ResetClassifier, nn.Module):
    """LayerNorm, global average pool, dropout, linear classifier; NHWC features."""

    def __init__(self, dim: int, num_classes: int, pool_type: str = "avg", drop_rate: float = 0.0):
        super().__init__()
        self.in_features = self.num_features = dim
        self.norm = LayerNorm(dim)
        self.pool_type = check_global_pool(pool_type)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def _reset_other(self) -> None:
        self.norm = nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """x: NHWC -> logits (or pooled features with ``pre_logits``)."""
        x = self.norm(x)
        if self.pool_type == "avg":
            x = x.mean((1, 2))
        x = self.drop(x)
        return x if pre_logits else self.fc(x)
