"""The one MetaFormer skeleton every hierarchical family is built from.

stem -> 4 stages (downsample, then blocks) -> head. A family supplies the stem, downsampling and
head classes and, per stage, a block class with its arguments: ``MetaFormerBlock`` (norm -> token
mixer -> scales + drop path -> norm -> channel mixer) or a self-contained block such as MambaOut's
gated CNN. Module names follow timm so timm state dicts load unchanged.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from timm.layers import DropPath, calculate_drop_path_rates, trunc_normal_
from timm.models._manipulate import checkpoint_seq
from torch import nn

from ..kernels.dtypes import matmul_input_dtype, norm_dtype
from ..kernels.dispatch import plain_pytorch
from ..kernels.group_norm import group_norm1
from ..kernels.norm_linear import norm_linear
from ..kernels.norm_residual import norm_residual, scale_add
from ..kernels.pool_mixer import pool_mixer
from ..layers.activations import Scale
from ..mixers.identity import IdentityMixer
from ..layers.drop import drop_path_keep
from ..mixers.mlp import Mlp
from ..layers.norms import GroupNorm1, LayerNorm, LayerNorm2d, norm_for_matmul
from ..mixers.pooling import Pooling
from ._timm_api import TimmBackboneMixin


class MetaFormerBlock(nn.Module):
    """``x = rs1(x) + ls1(dp(mixer(norm1(x))))``; ``x = rs2(x) + ls2(dp(mlp(norm2(x))))``.

    ``layout`` is the block's tensor layout: ``NCHW`` (conv/pool mixers, 1x1-conv MLP) or ``NLC``
    (attention, Linear MLP).
    """

    def __init__(self, dim: int, token_mixer: Callable[..., nn.Module], mixer_kwargs: dict | None = None,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, mlp_act=nn.GELU, mlp_bias: bool = False,
                 mlp_ratio: float = 4.0, proj_drop: float = 0.0, drop_path: float = 0.0,
                 layer_scale_init_value: float | None = None, res_scale_init_value: float | None = None,
                 layout: str = "NCHW"):
        super().__init__()
        if layout not in ("NCHW", "NLC"):
            raise ValueError(f"layout={layout!r} is not supported; accepted: 'NCHW', 'NLC'")
        self.layout = layout
        cf = layout == "NCHW"

        def scale(init):
            return Scale(dim, init, channels_first=cf) if init is not None else nn.Identity()

        self.norm1 = norm_layer(dim)
        self.token_mixer = token_mixer(dim=dim, proj_drop=proj_drop, **(mixer_kwargs or {}))
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.layer_scale1 = scale(layer_scale_init_value)
        self.res_scale1 = scale(res_scale_init_value)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), act_layer=mlp_act, bias=mlp_bias, drop=proj_drop, use_conv=cf)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.layer_scale2 = scale(layer_scale_init_value)
        self.res_scale2 = scale(res_scale_init_value)
        # Fused kernels (metazoo.kernels) merge the residual updates with the following norm; they
        # need norms they know. Drop path is folded into them per call (a per-sample keep vector).
        # ``fused_op`` is the kernel op leading the fused path ("" when there is none): pool_mixer
        # (PoolFormer), norm_residual (LayerNorm norm2), scale_add (one-group norm2); its
        # ``COMPILE_OPS`` entry decides the path torch.compile traces.
        pool = isinstance(self.token_mixer, Pooling) and type(self.norm1) is GroupNorm1 and cf
        if type(self.norm2) is GroupNorm1 and cf:
            self.fused_op = "pool_mixer" if pool else "scale_add"
        else:
            self.fused_op = "norm_residual" if type(self.norm2) is (LayerNorm2d if cf else LayerNorm) else ""
        # norm-affine mixers (identity, RIFormer's affine) fold into a one-group norm1: one norm pass
        self.folds = hasattr(self.token_mixer, "fold_into_norm") and type(self.norm1) is GroupNorm1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: NCHW or (B, N, C), per ``layout``."""
        if torch.jit.is_scripting() or not self.fused_op or plain_pytorch(self.fused_op):
            x = self.res_scale1(x) + self.layer_scale1(self.drop_path1(self.token_mixer(self.norm1(x))))
            return self.res_scale2(x) + self.layer_scale2(self.drop_path2(self.mlp(self.norm2(x))))
        return self._forward_fused(x)

    def unfuse(self) -> None:
        """Always take the plain path, so hooks on ``norm1``/``token_mixer`` see every call (distillation taps)."""
        self.fused_op = ""

    def _mixer_branch(self, x: torch.Tensor) -> torch.Tensor:
        """``token_mixer(norm1(x))``; a norm-affine mixer is folded into norm1's affine (one kernel pass)."""
        if not self.folds:
            matmul_first = getattr(self.token_mixer, "matmul_input", False)
            return self.token_mixer(norm_for_matmul(self.norm1, x) if matmul_first else self.norm1(x))
        w, b = self.token_mixer.fold_into_norm(self.norm1.weight, self.norm1.bias)
        return group_norm1(x, w, b, self.norm1.eps)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold a norm-affine token mixer into norm1 (RIFormer's deploy form; timm's
        ``reparameterize_model`` calls this). The mixer becomes ``IdentityMixer``; no-op otherwise."""
        if not hasattr(self.token_mixer, "fold_into_norm") or isinstance(self.token_mixer, IdentityMixer):
            return
        if self.norm1.bias is None:
            raise ValueError("reparameterize needs norm1 with a bias (the folded mixer adds one); "
                             f"got {type(self.norm1).__name__} without bias")
        w, b = self.token_mixer.fold_into_norm(self.norm1.weight, self.norm1.bias)
        self.norm1.weight.copy_(w)
        self.norm1.bias.copy_(b)
        self.token_mixer = IdentityMixer()

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """Same math as the plain path: residual+scales+drop path fused with norm2 (PoolFormer: norm1+pool
        too); drop path's masks are drawn in the plain path's order (branch 1, then branch 2). norm2's only
        consumer is the MLP's fc1, a matmul: its output is written in fc1's autocast input dtype."""
        cf = self.layout == "NCHW"
        rs1, ls1, rs2, ls2 = (getattr(m, "scale", None) for m in (
            self.res_scale1, self.layer_scale1, self.res_scale2, self.layer_scale2))
        if self.fused_op == "pool_mixer":
            x, moments = pool_mixer(x, self.norm1.weight, self.norm1.bias, self.norm1.eps, ls1, rs1,
                                    self.token_mixer.pool_size, keep=drop_path_keep(self.drop_path1, x, norm_dtype(x)))
            y = self._group_norm2_mlp(x, moments)
        else:
            y = self._mixer_branch(x)
            keep = drop_path_keep(self.drop_path1, y)
            if self.fused_op == "norm_residual":
                x, n2 = norm_residual(x, y, rs1, ls1, self.norm2.weight, self.norm2.bias, self.norm2.eps,
                                      channels_first=cf, keep=keep, n_dtype=matmul_input_dtype(x))
                y = self.mlp(n2)
            else:  # one-group norm2: residual update in one pass, then the group norm with fc1
                x = scale_add(x, y, rs1, ls1, channels_first=cf, keep=keep)
                y = self._group_norm2_mlp(x)
        return scale_add(x, y, rs2, ls2, channels_first=cf, keep=drop_path_keep(self.drop_path2, y))

    def _group_norm2_mlp(self, x: torch.Tensor, moments: tuple[torch.Tensor, torch.Tensor] | None = None
                         ) -> torch.Tensor:
        """``mlp(norm2(x))`` for a one-group norm2 (NCHW); ``moments`` of ``x`` skip the norm's statistics
        pass. The norm and fc1 run as one op that keeps ``x`` (the stream) and not the norm's output."""
        w, b, eps = self.norm2.weight, self.norm2.bias, self.norm2.eps
        if plain_pytorch("norm_linear"):
            return self.mlp(group_norm1(x, w, b, eps, moments=moments, n_dtype=matmul_input_dtype(x)))
        fc1 = self.mlp.fc1
        return self.mlp.forward_hidden(norm_linear(x, w, b, eps, fc1.weight, fc1.bias, True, "group1", moments))


class MetaFormerStage(nn.Module):
    """Downsample then a sequence of blocks; converts NCHW <-> NLC around blocks that need tokens."""

    def __init__(self, downsample: nn.Module, blocks: Sequence[nn.Module], tokens: bool):
        super().__init__()
        self.grad_checkpointing = False
        self.tokens = tokens
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: the model's layout (NCHW or NHWC); same layout out."""
        x = self.downsample(x)
        B, C, H, W = x.shape
        if self.tokens:
            x = x.reshape(B, C, H * W).transpose(1, 2)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        if self.tokens:
            x = x.transpose(1, 2).reshape(B, C, H, W)
        return x


def _per_stage(value, n: int, name: str) -> list:
    """Broadcast a scalar/class/dict argument to one entry per stage."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries; accepted: one value or {n} (one per stage)")
        return list(value)
    return [value] * n


class MetaFormer(TimmBackboneMixin, nn.Module):
    """Hierarchical MetaFormer: ``stem_layer(in_chans, dims[0])``, ``downsample_layer(d_in, d_out)``
    before stages 1.., ``block_layer[i](dim=, drop_path=, **block_kwargs[i])``, ``head_layer(dim,
    num_classes, pool_type=, drop_rate=)``. ``output_fmt`` is the layout between stages. timm's model API
    comes from :class:`TimmBackboneMixin`."""

    def __init__(self, depths: Sequence[int], dims: Sequence[int], *, stem_layer, downsample_layer, head_layer,
                 block_layer=MetaFormerBlock, block_kwargs: dict | Sequence[dict] = (), in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "avg", drop_path_rate: float = 0.0,
                 drop_rate: float = 0.0, output_fmt: str = "NCHW"):
        super().__init__()
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt={output_fmt!r}; accepted: 'NCHW', 'NHWC'")
        if len(depths) != len(dims):
            raise ValueError(f"depths ({len(depths)}) and dims ({len(dims)}) must have one entry per stage")
        n = len(depths)
        self.num_classes, self.in_chans, self.drop_rate = num_classes, in_chans, drop_rate
        self.num_features = dims[-1]
        self.grad_checkpointing = False
        if output_fmt == "NHWC":
            self.output_fmt = output_fmt  # timm's features_only reads this attribute
        block_layers = _per_stage(block_layer, n, "block_layer")
        block_kwargs = _per_stage(dict(block_kwargs) if not isinstance(block_kwargs, (list, tuple)) else block_kwargs,
                                  n, "block_kwargs")
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)

        self.stem = stem_layer(in_chans, dims[0])
        self.feature_info = []
        stages = []
        for i in range(n):
            blocks = [block_layers[i](dim=dims[i], drop_path=dpr[i][j], **block_kwargs[i]) for j in range(depths[i])]
            tokens = output_fmt == "NCHW" and getattr(blocks[0], "layout", "NCHW") == "NLC"
            down = downsample_layer(dims[i - 1], dims[i]) if i > 0 else nn.Identity()
            stages.append(MetaFormerStage(down, blocks, tokens))
            self.feature_info.append(dict(num_chs=dims[i], reduction=2 ** (i + 2), module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.head_layer = head_layer
        self.head = head_layer(dims[-1], num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.head_hidden_size = self.head.num_features
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def reparameterize(self) -> "MetaFormer":
        """Inference form: every block folds a re-parameterisable token mixer away (RIFormer); in place."""
        for m in self.modules():
            if isinstance(m, MetaFormerBlock):
                m.reparameterize()
        return self

    switch_to_deploy = reparameterize  # mmpretrain's name for the same switch
