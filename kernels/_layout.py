"""Shared plumbing for the row-wise kernels: NCHW <-> channels-last views and launch sizes."""
from __future__ import annotations

import functools

import torch


def channels_last_view(x: torch.Tensor, channels_first: bool) -> torch.Tensor:
    """Return a contiguous (..., C) tensor: NCHW inputs are permuted (free when already channels_last)."""
    if channels_first:
        if x.dim() != 4:
            raise ValueError(f"channels_first=True expects an NCHW tensor, got shape {tuple(x.shape)}")
        x = x.permute(0, 2, 3, 1)
    return x.contiguous()


def back_to_layout(y: torch.Tensor, channels_first: bool) -> torch.Tensor:
    """Inverse of :func:`channels_last_view`: an NHWC tensor becomes an NCHW view (channels_last strides)."""
    return y.permute(0, 3, 1, 2) if channels_first else y


def param_grid(n_tiles: int, device: torch.device) -> int:
    """Programs for kernels that also reduce parameter gradients: a few per SM, never more than tiles."""
    return max(1, min(n_tiles, 4 * _sm_count(device.type, device.index)))


@functools.lru_cache(maxsize=None)
def _sm_count(device_type: str, index) -> int:
    if device_type == "cuda":
        return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()).multi_processor_count
    return 1


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (Triton block sizes must be powers of two)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    """Ceil division (grid sizes)."""
    return (a + b - 1) // b
