"""Drop path as a per-sample keep vector that fused residual kernels fold into the branch scale."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def drop_path_keep(drop_path: nn.Module, like: torch.Tensor, dtype: Optional[torch.dtype] = None
                   ) -> Optional[torch.Tensor]:
    """(B,) fp32 ``mask/(1-p)`` of a timm ``DropPath`` on the branch ``like`` (drawn exactly as its
    forward draws it: ``like``'s rank, ``dtype`` or ``like``'s), or None when it does nothing (eval,
    p = 0, Identity)."""
    p = getattr(drop_path, "drop_prob", 0.0)
    if not p or not drop_path.training:
        return None
    shape = (like.shape[0],) + (1,) * (like.dim() - 1)
    keep = like.new_empty(shape, dtype=dtype or like.dtype).bernoulli_(1 - p)
    if p < 1 and drop_path.scale_by_keep:
        keep.div_(1 - p)
    return keep.view(-1).float()
