"""AFF token mixer (AFFNet): global token mixing by an input-adaptive filter in the frequency domain.

``y = irfft2(softshrink(MLP(F)) * F) + x`` with ``F = rfft2(x)`` (orthonormal), where the MLP is
block-diagonal over ``num_blocks`` channel groups and complex-valued. The FFTs run in fp32 on
cuFFT (half-precision cuFFT takes only power-of-two sizes); the filter runs in the autocast dtype
unless ``filter_dtype`` pins it (``torch.float32`` reproduces the official fp32-only mixer).
"""
from __future__ import annotations

import contextlib
import math

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from metazoo.kernels.aff_filter import ACTS, aff_filter
from metazoo.kernels.dispatch import plain_pytorch

__all__ = ["AFFMixer", "fft_flop_mapping"]

AUTOCAST_DEVICES = ("cuda", "cpu", "xpu")  # others (meta) run without an autocast context


class AFFMixer(nn.Module):
    """Adaptive frequency filter over an NCHW map (parameter names ``w1 b1 w2 b2`` as in the official code)."""

    def __init__(self, dim: int, num_blocks: int = 8, lambd: float = 0.01, act: str = "relu",
                 filter_dtype: torch.dtype | None = None, init_scale: float = 0.02):
        super().__init__()
        if num_blocks < 1 or dim % num_blocks:
            raise ValueError(f"dim={dim} must be divisible by num_blocks={num_blocks}; "
                             f"accepted: num_blocks among the divisors of {dim}")
        if act not in ACTS:
            raise ValueError(f"act={act!r} is not supported; accepted: {', '.join(ACTS)}")
        bs = dim // num_blocks
        self.num_blocks, self.lambd, self.act, self.filter_dtype = num_blocks, lambd, act, filter_dtype
        self.w1 = nn.Parameter(init_scale * torch.randn(2, num_blocks, bs, bs))
        self.b1 = nn.Parameter(init_scale * torch.randn(2, num_blocks, bs))
        self.w2 = nn.Parameter(init_scale * torch.randn(2, num_blocks, bs, bs))
        self.b2 = nn.Parameter(init_scale * torch.randn(2, num_blocks, bs))

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        if self.filter_dtype is not None:
            return self.filter_dtype
        dev = x.device.type
        if dev in AUTOCAST_DEVICES and torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
        return torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: NCHW -> NCHW (same dtype)."""
        if torch.jit.is_scripting() or plain_pytorch("aff_filter"):
            return self._forward_fp32(x)
        h, w = x.shape[-2:]
        cd = self._compute_dtype(x)
        no_autocast = (torch.autocast(x.device.type, enabled=False) if x.device.type in AUTOCAST_DEVICES
                       else contextlib.nullcontext())  # e.g. the meta device, used to count FLOPs
        with no_autocast:
            spec = torch.view_as_real(torch.fft.rfft2(x.float(), norm="ortho"))
            spec = aff_filter(spec, self.w1, self.b1, self.w2, self.b2, self.lambd, cd, self.act)
            out = torch.fft.irfft2(torch.view_as_complex(spec), s=(h, w), norm="ortho")
        return out.to(x.dtype) + x

    def _forward_fp32(self, x: torch.Tensor) -> torch.Tensor:
        """The mixer in fp32 with plain ops only (TorchScript, torch.fx): the reference filter's math."""
        h, w = x.shape[-2], x.shape[-1]
        spec = torch.fft.rfft2(x.float(), norm="ortho")
        b, c = spec.shape[0], spec.shape[1]
        xr = spec.real.reshape(b, self.num_blocks, c // self.num_blocks, -1)
        xi = spec.imag.reshape(b, self.num_blocks, c // self.num_blocks, -1)
        hr, hi = _complex_block_linear(xr, xi, self.w1, self.b1)
        if self.act == "relu":
            hr, hi = F.relu(hr), F.relu(hi)
        else:
            hr, hi = F.silu(hr), F.silu(hi)
        mr, mi = _complex_block_linear(hr, hi, self.w2, self.b2)
        mr, mi = F.softshrink(mr, self.lambd), F.softshrink(mi, self.lambd)
        out = torch.complex(mr * xr - mi * xi, mr * xi + mi * xr).reshape(spec.shape)
        return torch.fft.irfft2(out, s=[h, w], norm="ortho").to(x.dtype) + x

    def extra_repr(self) -> str:
        return f"num_blocks={self.num_blocks}, lambd={self.lambd}, act={self.act}"


def _complex_block_linear(ar: torch.Tensor, ai: torch.Tensor, w: torch.Tensor,
                          b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(real, imag) of ``a @ (w[0] + i w[1]) + (b[0] + i b[1])`` per channel block; a: (B, blocks, in, N)."""
    outr = torch.einsum("bkin,kio->bkon", ar, w[0]) - torch.einsum("bkin,kio->bkon", ai, w[1])
    outi = torch.einsum("bkin,kio->bkon", ai, w[0]) + torch.einsum("bkin,kio->bkon", ar, w[1])
    return outr + b[0, :, :, None], outi + b[1, :, :, None]


def _fft_flops(shape, dim, sizes) -> int:
    """Radix-2 count for real 2-D FFTs: 2.5 * N log2 N FLOPs per transform of N = prod(sizes) points."""
    pts = math.prod(sizes)
    batch = math.prod(shape) // math.prod(shape[d] for d in dim)
    return int(2.5 * pts * math.log2(max(pts, 2))) * batch


def fft_flop_mapping() -> dict:
    """``custom_mapping`` for ``FlopCounterMode``: counts cuFFT's r2c / c2r, which it skips by default."""
    aten = torch.ops.aten

    def r2c(x_shape, dim, *args, **kwargs):
        return _fft_flops(x_shape, dim, [x_shape[d] for d in dim])

    def c2r(x_shape, dim, normalization, last_dim_size, *args, **kwargs):
        return _fft_flops(x_shape, dim, [x_shape[d] for d in dim[:-1]] + [last_dim_size])

    return {aten._fft_r2c: r2c, aten._fft_c2r: c2r}
