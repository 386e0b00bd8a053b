"""The sail-sg MetaFormer baselines (PoolFormer v1/v2, ConvFormer, CAFormer, IdentityFormer,
RandFormer; RIFormer reuses it): the builder their variant rows are arguments of (``create``), their
pretrained-cfg defaults (``make_cfg``), and the conversion of the official checkpoint layouts
(``network.*`` for PoolFormer v1, ``downsample_layers.*`` / ``stages.i.j`` for the
MetaFormer-baselines release) to ours."""
from __future__ import annotations

from functools import partial

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from ..layers.activations import StarReLU
from ..mixers.attention import Attention
from ._common import build, check_in_chans, match_shapes, rename_keys, unwrap_state_dict
from ._layers import Downsampling, PatchStem, PoolNormHead
from .metaformer import MetaFormer, MetaFormerBlock, _per_stage

# official PoolFormer v1: network.{0,2,4,6} are stages, network.{1,3,5} the downsamplings between them
_POOLFORMER_V1_RULES = [
    (r"^patch_embed\.proj\.", "stem.conv."),
    *[(rf"^network\.{2 * i - 1}\.proj\.", f"stages.{i}.downsample.conv.") for i in (1, 2, 3)],
    *[(rf"^network\.{2 * i}\.(\d+)\.", rf"stages.{i}.blocks.\1.") for i in range(4)],
    (r"\.layer_scale_([12])$", r".layer_scale\1.scale"),
    (r"^norm\.", "head.norm."),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
]
# official MetaFormer baselines: downsample_layers.0 is the stem (post-norm), the others pre-norm
_METAFORMER_RULES = [
    (r"^downsample_layers\.0\.conv\.", "stem.conv."),
    (r"^downsample_layers\.0\.post_norm\.", "stem.norm."),
    (r"^downsample_layers\.(\d)\.pre_norm\.", r"stages.\1.downsample.norm."),
    (r"^downsample_layers\.(\d)\.conv\.", r"stages.\1.downsample.conv."),
    (r"^stages\.(\d)\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"^head\.(fc1|fc2|norm)\.", r"head.fc.\1."),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
    (r"^norm\.", "head.norm."),
]


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """Accept timm's layout as is; convert the two official sail-sg layouts (Linear -> 1x1 conv shapes)."""
    state_dict = unwrap_state_dict(state_dict)
    if "network.0.0.mlp.fc1.weight" in state_dict:
        state_dict = rename_keys(state_dict, _POOLFORMER_V1_RULES)
    elif "downsample_layers.0.conv.weight" in state_dict:
        state_dict = rename_keys(state_dict, _METAFORMER_RULES)
    state_dict = match_shapes(state_dict, model)
    check_in_chans(state_dict, "stem.conv", model)
    return state_dict


def make_cfg(url: str = "", **kwargs) -> dict:
    """Pretrained-cfg defaults of the MetaFormer baselines (224 px, bicubic, ImageNet mean/std)."""
    return {"url": url, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 1.0,
            "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
            "classifier": "head.fc", "first_conv": "stem.conv", "license": "apache-2.0", **kwargs}


def create(variant: str, pretrained: bool, *, depths, dims, token_mixers, norm_layers, mlp_act=StarReLU,
           mlp_bias: bool = False, downsample_norm=None, layer_scale_init_values=None,
           res_scale_init_values=(None, None, 1.0, 1.0), mlp_head: bool = True, proj_drop_rate: float = 0.0,
           head_kwargs: dict | None = None, pretrained_filter_fn=checkpoint_filter_fn, **kwargs) -> MetaFormer:
    """Build one variant: a family's table row plus timm's arguments (num_classes, in_chans, ...).
    ``token_mixers``, ``norm_layers`` and the scale inits take one value or one per stage."""
    n = len(depths)
    mixers = _per_stage(token_mixers, n, "token_mixers")
    norms = _per_stage(norm_layers, n, "norm_layers")
    ls = _per_stage(layer_scale_init_values, n, "layer_scale_init_values")
    rs = _per_stage(res_scale_init_values, n, "res_scale_init_values")
    block_kwargs = [dict(token_mixer=mixers[i], norm_layer=norms[i], mlp_act=mlp_act, mlp_bias=mlp_bias,
                         proj_drop=proj_drop_rate, layer_scale_init_value=ls[i], res_scale_init_value=rs[i],
                         layout="NLC" if mixers[i] is Attention else "NCHW") for i in range(n)]
    return build(MetaFormer, variant, pretrained, num_stages=n, pretrained_filter_fn=pretrained_filter_fn,
                 depths=depths, dims=dims, block_layer=MetaFormerBlock, block_kwargs=block_kwargs,
                 stem_layer=partial(PatchStem, norm_layer=downsample_norm),
                 downsample_layer=partial(Downsampling, norm_layer=downsample_norm),
                 head_layer=partial(PoolNormHead, mlp_classifier=mlp_head, **(head_kwargs or {})), **kwargs)

