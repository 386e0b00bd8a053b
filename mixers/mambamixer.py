"""MambaMixer's selective token mixer (four cross-scans over the 2-D map) and selective channel mixer
(S6 along the channel axis), as used by ViM2. Both run the S6 scan through
:func:`metazoo.kernels.selective_scan.selective_scan`; their S6 parameters follow Mamba's
initialisation (S4D-real A, log-uniform Δ in [dt_min, dt_max], D = 1).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..kernels.dispatch import fx_tracing, plain_pytorch
from ..kernels.selective_scan import selective_scan, selective_scan_chunked

# torch.fx records the chunked scan as one call (its chunk loop depends on the sequence length)
torch.fx.wrap("selective_scan_chunked")

__all__ = ["SelectiveTokenMixer", "SelectiveChannelMixer", "cross_scan", "cross_merge", "grouped_conv1d"]


class S6Params(nn.Module):
    """Per-direction S6 parameters: selection projection, Δ projection, A (as log), D, Δ bias.

    ``groups`` independent scans of ``channels`` channels each; the selection projection maps a
    step's ``channels`` features to ``dt_rank + 2 * d_state`` (Δ, B, C).
    """

    def __init__(self, groups: int, channels: int, d_state: int, dt_rank: int, dt_min: float = 1e-3,
                 dt_max: float = 0.1):
        super().__init__()
        self.groups, self.channels, self.d_state, self.dt_rank = groups, channels, d_state, dt_rank
        self.dt_min, self.dt_max = dt_min, dt_max
        self.x_proj_weight = nn.Parameter(torch.empty(groups, dt_rank + 2 * d_state, channels))
        self.dt_proj_weight = nn.Parameter(torch.empty(groups, channels, dt_rank))
        self.dt_proj_bias = nn.Parameter(torch.empty(groups, channels))
        self.A_log = nn.Parameter(torch.empty(groups * channels, d_state))
        self.D = nn.Parameter(torch.empty(groups * channels))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.uniform_(self.x_proj_weight, -self.channels ** -0.5, self.channels ** -0.5)
        nn.init.uniform_(self.dt_proj_weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        lo, hi = math.log(self.dt_min), math.log(self.dt_max)
        dt = torch.exp(torch.rand(self.groups, self.channels) * (hi - lo) + lo).clamp_min(1e-4)
        self.dt_proj_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand_as(self.A_log))
        self.D.fill_(1.0)

    def scan(self, xs: torch.Tensor) -> torch.Tensor:
        """xs: (batch, groups, channels, L) -> S6 output of the same shape."""
        bsz, g, c, seqlen = xs.shape
        # matmul broadcasts the (g, k, c) weight over the batch: one GEMM per (batch, group) with
        # no permuted copies. (einsum folded batch and length into one GEMM; for the channel mixer,
        # c = 4 and batch x length ~ 4e7, its weight-gradient GEMM took 0.3 s per layer on an H100.)
        x_dbl = torch.matmul(self.x_proj_weight.to(xs.dtype), xs)
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.matmul(self.dt_proj_weight.to(xs.dtype), dts)
        u, delta, A = xs.reshape(bsz, g * c, seqlen), dts.reshape(bsz, g * c, seqlen), -torch.exp(self.A_log.float())
        if torch.jit.is_scripting() or plain_pytorch("selective_scan"):
            y = selective_scan_chunked(u, delta, A, Bs, Cs, self.D.float(), self.dt_proj_bias.float().flatten(), True)
        else:
            y = selective_scan(u, delta, A, Bs, Cs, D=self.D.float(), delta_bias=self.dt_proj_bias.float().flatten(),
                               delta_softplus=True)
        return y.view(bsz, g, c, seqlen)


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4, C, H*W): row-major, column-major, and both reversed."""
    rows = x.flatten(2)
    cols = x.transpose(2, 3).flatten(2)
    return torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1)


def cross_merge(ys: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`cross_scan`, summing the four directions: (B, 4, C, H*W) -> (B, C, H, W)."""
    bsz, _, c, _ = ys.shape
    rows = ys[:, 0] + ys[:, 2].flip(-1)
    cols = ys[:, 1] + ys[:, 3].flip(-1)
    return rows.view(bsz, c, height, width) + cols.view(bsz, c, width, height).transpose(2, 3)


class SelectiveTokenMixer(nn.Module):
    """Selective token mixer: shared input projection and depthwise 3x3 conv, four cross-scan S6s
    (own parameters each) mapped back to positions and summed, normed, gated by SiLU(Linear(x)),
    output projection."""

    def __init__(self, dim: int, expand: float = 2.0, d_state: int = 16, dt_rank: int | None = None,
                 conv_kernel: int = 3, proj_drop: float = 0.0):
        super().__init__()
        inner = int(expand * dim)
        self.inner = inner
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.conv = nn.Conv2d(inner, inner, conv_kernel, padding=conv_kernel // 2, groups=inner)
        self.act = nn.SiLU()
        self.ssm = S6Params(4, inner, d_state, dt_rank or math.ceil(dim / 16))
        self.out_norm = nn.LayerNorm(inner)
        self.out_proj = nn.Linear(inner, dim, bias=False)
        self.drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: NHWC -> NHWC."""
        _, height, width, _ = x.shape
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u = self.act(self.conv(u.permute(0, 3, 1, 2)))
        y = cross_merge(self.ssm.scan(cross_scan(u)), height, width)
        y = self.out_norm(y.permute(0, 2, 3, 1)) * self.act(z)
        return self.drop(self.out_proj(y))


def grouped_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``F.conv1d(x, weight, bias, padding=K//2, groups=G)`` for (T, G, L) inputs with one channel per
    group, as K shifted multiply-adds. For the channel mixer's ~2e5 short sequences conv1d picks
    PyTorch's depthwise kernel, whose weight gradient took ~10 ms per layer on an H100."""
    tokens, groups, length = x.shape
    k = weight.shape[-1]
    w = weight.view(groups, -1, k).to(x.dtype)
    xp = torch.nn.functional.pad(x, (k // 2, k // 2))[:, :, None]  # (T, G, 1, L + K - 1)
    y = bias.view(1, groups, -1, 1).to(x.dtype) + w[None, :, :, 0, None] * xp[..., :length]
    for j in range(1, k):
        y = y + w[None, :, :, j, None] * xp[..., j:j + length]
    return y.reshape(tokens, -1, length)


class SelectiveChannelMixer(nn.Module):
    """Selective channel mixer: each token's channels, projected to ``width``, are the sequence.

    Per direction (forward and reversed channel order, own input projection and S6 parameters) a
    1-D conv along the channel axis makes ``streams`` feature streams, an S6 scans them along the
    channels with Δ, B, C selected from the step's stream values; the directions' streams are
    merged by learned weights, gated by SiLU(Linear(x)) and projected back to ``dim``. No weight
    depends on the token count.
    """

    def __init__(self, dim: int, width: int | None = None, streams: int = 4, d_state: int = 16,
                 conv_kernel: int = 3, proj_drop: float = 0.0):
        super().__init__()
        width = width or 2 * dim
        self.width, self.streams, self.directions = width, streams, 2
        self.in_proj = nn.Linear(dim, self.directions * width, bias=False)
        self.gate = nn.Linear(dim, width, bias=False)
        self.conv = nn.Conv1d(self.directions, self.directions * streams, conv_kernel, padding=conv_kernel // 2,
                              groups=self.directions)
        self.act = nn.SiLU()
        self.ssm = S6Params(self.directions, streams, d_state, dt_rank=1)
        self.stream_weight = nn.Parameter(torch.full((self.directions, streams), 1.0 / streams))
        self.out_proj = nn.Linear(width, dim, bias=False)
        self.drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: NHWC (any leading dims, channels last) -> same shape."""
        shape = x.shape
        t = x.reshape(-1, shape[-1])
        s = self.in_proj(t).view(-1, self.directions, self.width)
        s = torch.stack([s[:, 0], s[:, 1].flip(-1)], dim=1)
        if torch.jit.is_scripting() or fx_tracing():
            s = self.conv(s)  # the same conv (the shifted multiply-adds loop over the kernel's taps)
        else:
            s = grouped_conv1d(s, self.conv.weight, self.conv.bias)
        s = self.act(s).view(-1, self.directions, self.streams, self.width)
        y = self.ssm.scan(s)
        y = torch.stack([y[:, 0], y[:, 1].flip(-1)], dim=1)
        y = torch.einsum("tdpw,dp->tw", y, self.stream_weight.to(y.dtype))
        y = self.out_proj(y * self.act(self.gate(t)))
        return self.drop(y).view(shape)
