"""TransNeXt (Shi, CVPR 2024): aggregated attention + Convolutional GLU, four overlapping-patch stages.

Family file: variant table, official checkpoint handling, timm registration. Module and parameter
names equal the official ``classification/transnext.py`` so its ``.pth`` files load with
``strict=True`` (only the ``model`` wrapper is removed). Runs at any input size >= 32: the
position-bias tables are built from the actual feature size (integer arithmetic on the sizes, so
TorchScript, torch.fx, torch.export and ONNX trace them); at the construction size they equal the
official buffers, kept here as non-persistent buffers.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import DropPath, register_notrace_module
from timm.models import generate_default_cfgs
from timm.models._manipulate import checkpoint

from metazoo.mixers.aggregated_attention import AggregatedAttention, LengthScaledAttention, relative_position_table
from metazoo.mixers.convglu import ConvGLU

from ._common import (build, check_global_pool, check_in_chans, check_input_size, like_model, register_family,
                      unwrap_state_dict)
from ._timm_api import TimmBackboneMixin

__all__ = ["TransNeXt", "checkpoint_filter_fn", "VARIANTS"]

MIN_INPUT = 32
NUM_STAGES = 4

VARIANTS = {  # size: TransNeXt arguments (embed dims, heads, depths; sr ratios, window sizes, image sizes)
    "micro": dict(embed_dims=(48, 96, 192, 384), num_heads=(2, 4, 8, 16), depths=(2, 2, 15, 2)),
    "tiny": dict(embed_dims=(72, 144, 288, 576), num_heads=(3, 6, 12, 24), depths=(2, 2, 15, 2)),
    "small": dict(embed_dims=(72, 144, 288, 576), num_heads=(3, 6, 12, 24), depths=(5, 5, 22, 5)),
    "base": dict(embed_dims=(96, 192, 384, 768), num_heads=(4, 8, 16, 32), depths=(5, 5, 23, 5)),
    "micro_aaaa": dict(embed_dims=(48, 96, 192, 384), num_heads=(2, 4, 8, 16), depths=(2, 2, 15, 2),
                       sr_ratios=(16, 8, 4, 2), window_sizes=(3, 3, 3, 3), img_size=256, pretrain_size=256),
}


class OverlapPatchEmbed(nn.Module):
    """Strided conv with overlapping kernel (7/4 at the stem, 3/2 between stages), then LayerNorm."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor):
        """x: NCHW -> ((B, N, C) tokens, H, W)."""
        x = self.proj(x)
        H, W = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), H, W


RECOMPUTE_PARTS = ("gate", "pool")


def recompute_parts(recompute) -> frozenset:
    """``recompute`` (True, False, or a subset of RECOMPUTE_PARTS) -> the set of branches to recompute."""
    if isinstance(recompute, bool):
        return frozenset(RECOMPUTE_PARTS if recompute else ())
    parts = (recompute,) if isinstance(recompute, str) or not hasattr(recompute, "__iter__") else tuple(recompute)
    if any(p not in RECOMPUTE_PARTS for p in parts):
        raise ValueError(f"recompute must be True, False or a subset of {RECOMPUTE_PARTS}; got {recompute!r}")
    return frozenset(parts)


class TransNeXtBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))``, then ``x + ConvGLU(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int, window_size, pretrain_hw,
                 drop_path: float = 0.0, proj_drop: float = 0.0, backend: str | None = None, recompute=True):
        super().__init__()
        recompute = recompute_parts(recompute)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if sr_ratio == 1:
            self.attn = LengthScaledAttention(dim, num_heads, pretrain_hw, proj_drop=proj_drop)
        else:
            self.attn = AggregatedAttention(dim, num_heads, sr_ratio, pretrain_hw, window_size=window_size or 3,
                                            proj_drop=proj_drop, backend=backend, recompute_pool="pool" in recompute)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ConvGLU(dim, int(dim * mlp_ratio), drop=proj_drop, recompute_gate="gate" in recompute)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, height: int, width: int, rel_pos: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x: (B, N, C) tokens -> (B, N, C)."""
        x = x + self.drop_path(self.attn(self.norm1(x), height, width, rel_pos))
        return x + self.drop_path(self.mlp(self.norm2(x), height, width))


@register_notrace_module  # timm's FX tracer keeps a stage whole: its tables and sizes come from the input
class TransNeXtStage(nn.ModuleList):
    """The blocks of one stage (``block<i>.<j>``, the official names) and the stage's position tables:
    non-persistent buffers at the construction size ``hw`` (the official layout keeps them out of state
    dicts), built from the map size at any other size."""

    def __init__(self, blocks: list[TransNeXtBlock], hw: tuple[int, int], pretrain_hw: tuple[int, int]):
        super().__init__(blocks)
        self.buffer_hw, self.pretrain_hw = tuple(hw), tuple(pretrain_hw)
        index, table = relative_position_table(self.buffer_hw, blocks[0].attn.key_grid(*hw), self.pretrain_hw,
                                               torch.device("cpu"))
        device = torch.get_default_device()
        self.register_buffer("relative_pos_index", index.to(device, copy=True), persistent=False)
        self.register_buffer("relative_coords_table", table.to(device, copy=True), persistent=False)

    def position_tables(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(index, coordinate table) of :func:`relative_position_table` for a ``height×width`` map."""
        if height == self.buffer_hw[0] and width == self.buffer_hw[1]:
            return self.relative_pos_index, self.relative_coords_table
        return relative_position_table((height, width), self[0].attn.key_grid(height, width), self.pretrain_hw,
                                       self.relative_coords_table.device)

    def forward(self, x: torch.Tensor, height: int, width: int, grad_checkpointing: bool = False) -> torch.Tensor:
        """x: (B, N, C) tokens of a row-major ``height×width`` map -> (B, N, C)."""
        rel_pos = self.position_tables(height, width)
        for blk in self:
            if grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, height, width, rel_pos)
            else:
                x = blk(x, height, width, rel_pos)
        return x


class TransNeXt(TimmBackboneMixin, nn.Module):
    """Four stages of overlapping patch embedding + TransNeXt blocks + LayerNorm; mean-pool head.

    ``img_size`` only seeds the cached position tables; any input >= 32 px runs. ``pretrain_size``
    (default ``img_size``) is the pre-training resolution that scales the position-bias
    coordinates: keep 224 when running 224-pretrained weights at another size. ``recompute``
    (training only; True, False, or a subset of ``("gate", "pool")``) recomputes the cheap ConvGLU
    gate and/or pooled-key branches in the backward instead of storing their full-resolution
    intermediates (both: about 35% less activation memory). Module names are the official ones
    (``patch_embed<i>``, ``block<i>``, ``norm<i>``, a bare ``head`` Linear), so the stage and head
    hooks of :class:`TimmBackboneMixin` are overridden.
    """

    stem_group = r"^patch_embed1\."
    coarse_block_groups = r"^(?:patch_embed|block|norm)(\d+)"
    block_groups = [(r"^patch_embed(\d+)", (-1,)), (r"^block(\d+)\.(\d+)", None), (r"^norm(\d+)", (99999,))]
    # the official list: query embeddings, local biases, position-bias MLPs, temperatures
    no_weight_decay_pattern = r"query_embedding|relative_pos_bias_local|cpb|temperature"
    head_layer = None

    def __init__(self, img_size: int = 224, pretrain_size: int | None = None, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "avg", embed_dims=(48, 96, 192, 384),
                 num_heads=(2, 4, 8, 16), depths=(2, 2, 15, 2), sr_ratios=(8, 4, 2, 1),
                 window_sizes=(3, 3, 3, None), mlp_ratios=(8, 8, 4, 4), drop_rate: float = 0.0,
                 proj_drop_rate: float = 0.0, drop_path_rate: float = 0.0, backend: str | None = None,
                 recompute=True):
        super().__init__()
        recompute = recompute_parts(recompute)  # validated once; the blocks take the parsed set
        self.num_classes, self.global_pool, self.in_chans = num_classes, check_global_pool(global_pool), in_chans
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.embed_dims, self.sr_ratios, self.num_stages = tuple(embed_dims), tuple(sr_ratios), NUM_STAGES
        self.grad_checkpointing = False
        pretrain_size = pretrain_size or img_size
        self.pretrain_hw = [(pretrain_size // 2 ** (i + 2),) * 2 for i in range(NUM_STAGES)]
        total = sum(depths)
        dpr = [drop_path_rate * k / max(1, total - 1) for k in range(total)]  # linear stochastic-depth rule
        self.feature_info = []
        for i in range(NUM_STAGES):
            embed = OverlapPatchEmbed(in_chans if i == 0 else embed_dims[i - 1], embed_dims[i],
                                      patch_size=7 if i == 0 else 3, stride=4 if i == 0 else 2)
            blocks = [TransNeXtBlock(embed_dims[i], num_heads[i], mlp_ratios[i], sr_ratios[i], window_sizes[i],
                                     self.pretrain_hw[i], drop_path=dpr[sum(depths[:i]) + j], proj_drop=proj_drop_rate,
                                     backend=backend, recompute=recompute)
                      for j in range(depths[i])]
            setattr(self, f"patch_embed{i + 1}", embed)
            setattr(self, f"block{i + 1}", TransNeXtStage(blocks, (img_size // 2 ** (i + 2),) * 2, self.pretrain_hw[i]))
            setattr(self, f"norm{i + 1}", nn.LayerNorm(embed_dims[i], eps=1e-6))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=2 ** (i + 2), module=f"block{i + 1}"))
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0, (2.0 / fan_out) ** 0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # --- timm API: the bare Linear head and the official stage layout ---------------------------
    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None, reset_other: bool = False):
        if global_pool is not None:
            self.global_pool = check_global_pool(global_pool)
        self.num_classes = num_classes
        self.head = like_model(nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity(), self)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def _num_stages(self) -> int:
        return self.num_stages

    def _forward_stages(self, x: torch.Tensor, last: int, take: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """NCHW image -> NCHW output of stage ``last`` (after its LayerNorm), plus the stages in ``take``.

        Stages are named by literals, one ``if`` each: TorchScript reaches attributes by literal names
        only, and decides ``hasattr`` when compiling (stages removed by pruning are skipped).
        """
        if not torch.jit.is_scripting():  # a global int is no TorchScript constant
            check_input_size(x, MIN_INPUT)
        taken: list[torch.Tensor] = []
        if hasattr(self, "block1") and last >= 0:
            t, h, w = self.patch_embed1(x)
            x = _to_map(self.norm1(self.block1(t, h, w, self.grad_checkpointing)), h, w)
            if 0 in take:
                taken.append(x)
        if hasattr(self, "block2") and last >= 1:
            t, h, w = self.patch_embed2(x)
            x = _to_map(self.norm2(self.block2(t, h, w, self.grad_checkpointing)), h, w)
            if 1 in take:
                taken.append(x)
        if hasattr(self, "block3") and last >= 2:
            t, h, w = self.patch_embed3(x)
            x = _to_map(self.norm3(self.block3(t, h, w, self.grad_checkpointing)), h, w)
            if 2 in take:
                taken.append(x)
        if hasattr(self, "block4") and last >= 3:
            t, h, w = self.patch_embed4(x)
            x = _to_map(self.norm4(self.block4(t, h, w, self.grad_checkpointing)), h, w)
            if 3 in take:
                taken.append(x)
        return x, taken

    def _keep_stages(self, n: int) -> None:
        for i in range(n, self.num_stages):
            for name in (f"patch_embed{i + 1}", f"block{i + 1}", f"norm{i + 1}"):
                delattr(self, name)
        self.num_stages = n



def _to_map(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, N, C) row-major tokens -> (B, C, height, width)."""
    return x.transpose(1, 2).reshape(x.shape[0], -1, height, width)


def checkpoint_filter_fn(state_dict, model: TransNeXt):
    """Official checkpoints already use our names: unwrap ``model``, strip wrapper prefixes, drop
    derived tables (none are persistent in the official files, older exports may hold them)."""
    derived = ("relative_pos_index", "relative_coords_table", "seq_length_scale", "padding_mask")
    out = {k: v for k, v in unwrap_state_dict(state_dict).items() if not k.split(".")[-1].startswith(derived)}
    check_in_chans(out, "patch_embed1.proj", model)
    return out


def _cfg(variant: str, size: int = 224, ft: bool = False, **kwargs):
    res = f"{size}-1k-ft-1k" if ft else f"{size}-1k"
    repo_variant = variant.replace("_aaaa", "-AAAA")
    file_variant = variant.replace("_aaaa", "_AAAA")
    return dict(
        hf_hub_id=f"DaiShiResearch/transnext-{repo_variant}-{res}",
        hf_hub_filename=f"transnext_{file_variant}_{res.replace('-', '_')}.pth",
        num_classes=1000, input_size=(3, size, size), pool_size=(size // 32, size // 32),
        crop_pct=1.0 if size >= 384 else 0.875, crop_mode="squash" if size >= 384 else "center",
        interpolation="bicubic", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        first_conv="patch_embed1.proj", classifier="head", license="apache-2.0",
        paper_ids="arXiv:2311.17132", **kwargs)


default_cfgs = generate_default_cfgs({
    "mz_transnext_micro.in1k": _cfg("micro"),
    "mz_transnext_tiny.in1k": _cfg("tiny"),
    "mz_transnext_small.in1k": _cfg("small"),
    "mz_transnext_small.in1k_384": _cfg("small", 384, ft=True),
    "mz_transnext_base.in1k": _cfg("base"),
    "mz_transnext_base.in1k_384": _cfg("base", 384, ft=True),
    "mz_transnext_micro_aaaa.in1k": _cfg("micro_aaaa", 256),
})


def _create(variant: str, pretrained: bool, **kwargs) -> TransNeXt:
    """A ``<model>.in1k_384`` tag builds its tables at 384 px unless ``img_size`` is given."""
    if "img_size" not in kwargs and isinstance(kwargs.get("pretrained_cfg"), str):
        tag_cfg = default_cfgs[variant].cfgs.get(kwargs["pretrained_cfg"])
        if tag_cfg is not None:
            kwargs["img_size"] = tag_cfg.input_size[-1]
    kwargs.setdefault("pretrain_size", 224)
    return build(TransNeXt, variant, pretrained, num_stages=NUM_STAGES, pretrained_filter_fn=checkpoint_filter_fn,
                 feature_cfg=dict(feature_cls="getter"), **kwargs)


register_family(__name__, VARIANTS, _create)
