"""MambaOut's Gated CNN block: norm, fc1 -> (gate, identity, conv) split, depthwise kxk on the conv
part, ``act(gate) * [identity, conv]``, fc2, layer scale, drop path, residual. Channels-last."""
from __future__ import annotations

import torch
from timm.layers import DropPath, LayerScale
from torch import nn

from ..kernels.dispatch import plain_pytorch
from ..kernels.gated_conv import gated_dwconv_linear
from ..kernels.norm_linear import norm_linear
from ..kernels.norm_residual import scale_add
from ..layers.drop import drop_path_keep
from ..layers.norms import LayerNorm, norm_for_matmul


class GatedCNNBlock(nn.Module):
    """A whole residual block (token and channel mixing in one gated unit), NHWC in and out."""

    def __init__(self, dim: int, expansion_ratio: float = 8 / 3, kernel_size: int = 7, conv_ratio: float = 1.0,
                 ls_init_value: float | None = None, norm_layer=LayerNorm, act_layer=nn.GELU,
                 drop_path: float = 0.0):
        super().__init__()
        hidden = int(expansion_ratio * dim)
        conv_channels = int(conv_ratio * dim)
        self.split_indices = (hidden, hidden - conv_channels, conv_channels)
        self.norm = norm_layer(dim)
        self.fc1 = nn.Linear(dim, hidden * 2)
        self.act = act_layer()
        self.conv = nn.Conv2d(conv_channels, conv_channels, kernel_size, padding=kernel_size // 2,
                              groups=conv_channels)
        self.fc2 = nn.Linear(hidden, dim)
        self.ls = LayerScale(dim, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.fused = type(self.act) is nn.GELU and self.act.approximate == "none"  # the fused op's gate
        self.norm_fc1_fused = type(self.norm) is LayerNorm and not self.norm.channels_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: NHWC."""
        shortcut = x
        if torch.jit.is_scripting() or not self.fused or plain_pytorch("gated_dwconv_linear"):
            g, i, c = torch.split(self.fc1(self.norm(x)), self.split_indices, dim=-1)
            c = self.conv(c.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            y = self.fc2(self.act(g) * torch.cat((i, c), dim=-1))
        else:  # split, depthwise conv, exact GELU gate, concat and fc2 in one op that saves only u
            if self.norm_fc1_fused and not plain_pytorch("norm_linear"):  # keeps x, not the norm's output
                u = norm_linear(x, self.norm.weight, self.norm.bias, self.norm.eps, self.fc1.weight, self.fc1.bias)
            else:
                u = self.fc1(norm_for_matmul(self.norm, x))
            y = gated_dwconv_linear(u, self.conv.weight, self.conv.bias, self.split_indices[0],
                                    self.fc2.weight, self.fc2.bias)
        # Under torch.compile the residual follows the block's lead op: where inductor gets the gated conv, it
        # gets the residual too, to fuse it into fc2's neighbours (MambaOut-tiny, H100, reduce-overhead: the
        # custom scale_add beside inductor's block took 1.9 of the 37.3 GPU ms per training step;
        # bench/results/speed_mambaout_tiny*, session 13).
        if torch.jit.is_scripting() or plain_pytorch("gated_dwconv_linear") or plain_pytorch("scale_add"):
            return self.drop_path(self.ls(y)) + shortcut
        # residual, layer scale and drop path (its per-sample mask drawn as DropPath draws it) in one pass
        ls = self.ls.gamma if isinstance(self.ls, LayerScale) else None
        return scale_add(shortcut, y, None, ls, keep=drop_path_keep(self.drop_path, y))
