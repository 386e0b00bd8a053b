"""Shared plumbing for the kernels: channels-innermost layouts and launch sizes (the only place for them)."""
from __future__ import annotations

import functools

import torch


def dense_in_layout(x: torch.Tensor, channels_first: bool) -> torch.Tensor:
    """``x`` with its channels innermost in memory: (..., C) rows contiguous, or an NCHW map in
    channels_last memory. Kernels then index ``row * C + c`` on the tensor itself (no permuted view),
    and ``torch.empty_like`` gives outputs of the same layout. A copy only when ``x`` is not so."""
    return x.contiguous(memory_format=torch.channels_last) if channels_first else x.contiguous()


def nhwc_shape(x: torch.Tensor) -> tuple[int, int, int, int]:
    """(B, H, W, C) of an NCHW map (read in channels_last memory by the kernels)."""
    B, C, H, W = x.shape
    return B, H, W, C


def stand_in(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A kernel's pointer for an absent optional tensor or output (None or 0-size): ``like``, never
    read or written because the kernel's flag for it is off."""
    return t if t is not None and t.numel() else like


def param_grid(n_tiles: int, device: torch.device) -> int:
    """Programs for kernels that also reduce parameter gradients: a few per SM, never more than tiles."""
    return max(1, min(n_tiles, 4 * sm_count(device)))


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere: the interpreter runs programs serially)."""
    return _sm_count(device.type, device.index)


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


def check_keep(keep: torch.Tensor | None, x: torch.Tensor, op: str) -> None:
    """Drop path's per-sample keep vector must be (B,) float32 (what the kernels read)."""
    if keep is not None and (keep.shape != (x.shape[0],) or keep.dtype != torch.float32):
        raise ValueError(f"{op}: keep must be a ({x.shape[0]},) float32 tensor, "
                         f"got {tuple(keep.shape)} {keep.dtype}")
