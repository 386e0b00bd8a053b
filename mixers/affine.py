"""RIFormer's training-time token mixer: a per-channel affine map minus its input (Wang et al., CVPR 2023).

``affine(n) - n = (a - 1) * n + c`` is itself per-channel affine, so after a norm with affine
``(w, b)`` it folds into that norm: weight ``w * (a - 1)``, bias ``b * (a - 1) + c``. That is how the
deploy form drops the mixer, and how the fused block path runs the training form in one norm pass.
"""
from __future__ import annotations

import torch
from torch import nn


class Affine(nn.Module):
    """``x * (a - 1) + c`` per channel on NCHW; ``a``, ``c`` live in a depthwise 1x1 conv named
    ``affine`` (mmpretrain's parameter names, so its checkpoints load)."""

    def __init__(self, dim: int, **_):
        super().__init__()
        self.affine = nn.Conv2d(dim, dim, 1, groups=dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: NCHW."""
        bias = self.affine.bias
        assert bias is not None  # built with bias=True; TorchScript types a conv's bias as Optional
        return torch.addcmul(bias.view(-1, 1, 1), x, self.affine.weight.view(-1, 1, 1) - 1)

    def fold_into_norm(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Affine of ``norm(x; weight, bias)`` followed by this mixer (differentiable in all four)."""
        return fold_affine(weight, bias, self.affine.weight.flatten(), self.affine.bias)


def fold_affine(weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, c: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Norm affine ``(weight, bias)`` followed by ``n * (a - 1) + c`` -> one affine ``(weight', bias')``."""
    g = a - 1
    return weight * g, (bias * g if bias is not None else 0) + c
