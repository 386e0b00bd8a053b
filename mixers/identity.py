"""Identity token mixer (IdentityFormer, and RIFormer's deploy form): no token mixing at all."""
from __future__ import annotations

import torch
from torch import nn


class IdentityMixer(nn.Module):
    """Returns its input; as a norm-affine mixer it folds into the preceding norm unchanged."""

    def __init__(self, dim: int | None = None, **_):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @staticmethod
    def fold_into_norm(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``mixer(norm(x; w, b)) = norm(x; w, b)``: the norm's affine as is."""
        return weight, bias
