"""Output dtypes of the fused kernels: those that eager PyTorch gives the plain ops they replace.

Under autocast this decides the precision of the residual stream. timm's blocks add fp32 layer/res
scales to a bf16 branch, and on CUDA its norms return fp32, so its stream is fp32; a kernel that
wrote the stream in its input's bf16 would round it once per block (ConvFormer-S18, CPU with the GPU's
rounding: 1.33x timm's own bf16 gradient error; 1.01x with these rules).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

# Device types whose autocast runs layer_norm / group_norm in fp32 (PyTorch's autocast op lists:
# CUDA casts them to fp32; CPU autocast leaves them in the input's dtype).
NORMS_FP32_UNDER_AUTOCAST = {"cuda"}


def promoted(*items: Union[torch.Tensor, torch.dtype, None]) -> torch.dtype:
    """Type promotion over the present tensors / dtypes: the dtype of ``x*rs + y*ls`` in eager PyTorch.
    Same-dtype calls skip ``promote_types`` (itself a dispatched op: eager steps are host-bound)."""
    dtype = None
    for item in items:
        if item is None:
            continue
        d = item if isinstance(item, torch.dtype) else item.dtype
        dtype = d if dtype is None or d == dtype else torch.promote_types(dtype, d)
    if dtype is None:
        raise ValueError("promoted needs at least one tensor or dtype")
    return dtype


def _autocast_on(x: torch.Tensor) -> bool:
    return x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)  # meta: no autocast


def norm_dtype(x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.dtype:
    """dtype of a LayerNorm / GroupNorm of ``x`` (computed in ``dtype``, default ``x``'s): fp32 where
    the device's autocast runs norms in fp32, else the input's."""
    if x.device.type in NORMS_FP32_UNDER_AUTOCAST and _autocast_on(x):
        return torch.float32
    return dtype or x.dtype


def matmul_input_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast casts a matmul's (linear, conv) input to, or None outside autocast. A norm
    whose only consumer is a matmul may write its output in it directly: the same bits as writing
    fp32 and letting autocast cast, in half the bytes."""
    return torch.get_autocast_dtype(x.device.type) if _autocast_on(x) else None
