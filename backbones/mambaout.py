"""MambaOut (Yu & Wang, "MambaOut: Do We Really Need Mamba for Vision?", CVPR 2025): the MetaFormer
skeleton with Gated CNN blocks, channels-last, plus timm's ``_rw`` variants."""
from __future__ import annotations

from functools import partial

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import get_act_layer
from timm.models import generate_default_cfgs
from torch import nn

from ..mixers.gated_cnn import GatedCNNBlock
from ._common import build, check_in_chans, mirror_timm_cfgs, register_family, rename_keys, unwrap_state_dict
from ._layers import ConvStem, DownsamplingNHWC, NormMlpHead
from .metaformer import MetaFormer

T_DIMS, B_DIMS = (96, 192, 384, 576), (128, 256, 512, 768)
_RW = dict(stem_mid_norm=False, downsample="conv_nf", ls_init_value=1e-6, head_fn="norm_mlp")
VARIANTS = {  # size: _create arguments
    "femto": dict(depths=(3, 3, 9, 3), dims=(48, 96, 192, 288)),
    "kobe": dict(depths=(3, 3, 15, 3), dims=(48, 96, 192, 288)),
    "tiny": dict(depths=(3, 3, 9, 3), dims=T_DIMS),
    "small": dict(depths=(3, 4, 27, 3), dims=T_DIMS),
    "base": dict(depths=(3, 4, 27, 3), dims=B_DIMS),
    "small_rw": dict(depths=(3, 4, 27, 3), dims=T_DIMS, **_RW),
    "base_short_rw": dict(depths=(3, 3, 25, 3), dims=B_DIMS, expansion_ratio=3.0, conv_ratio=1.25, **_RW),
    "base_tall_rw": dict(depths=(3, 4, 30, 3), dims=B_DIMS, expansion_ratio=2.5, conv_ratio=1.25, **_RW),
    "base_wide_rw": dict(depths=(3, 4, 27, 3), dims=B_DIMS, expansion_ratio=3.0, conv_ratio=1.5,
                         act_layer="silu", **_RW),
    "base_plus_rw": dict(depths=(3, 4, 30, 3), dims=B_DIMS, expansion_ratio=3.0, conv_ratio=1.5,
                         act_layer="silu", **_RW),
}

# official yuweihao/MambaOut layout -> ours
_OFFICIAL_RULES = [
    (r"^downsample_layers\.0\.", "stem."),
    (r"^downsample_layers\.(\d)\.", r"stages.\1.downsample."),
    (r"^stages\.(\d)\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"^head\.fc1\.", "head.pre_logits.fc."),
    (r"^head\.norm\.", "head.pre_logits.norm."),
    (r"^head\.fc2\.", "head.fc."),
    (r"^norm\.", "head.norm."),  # after the head rules: the final norm must not become the MLP's
]


def checkpoint_filter_fn(state_dict: dict, model) -> dict:
    """Accept timm's layout as is; convert the official release's layout."""
    state_dict = unwrap_state_dict(state_dict)
    if "downsample_layers.0.conv1.weight" in state_dict:
        state_dict = rename_keys(state_dict, _OFFICIAL_RULES)
    check_in_chans(state_dict, "stem.conv1", model)
    return state_dict


def _cfg(url: str = "", **kwargs) -> dict:
    return {"url": url, "num_classes": 1000, "input_size": (3, 224, 224), "test_input_size": (3, 288, 288),
            "pool_size": (7, 7), "crop_pct": 1.0, "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "first_conv": "stem.conv1", "classifier": "head.fc",
            "license": "apache-2.0", **kwargs}


default_cfgs = generate_default_cfgs(mirror_timm_cfgs([f"mambaout_{s}" for s in VARIANTS], _cfg))

BLOCK_ARGS = ("expansion_ratio", "kernel_size", "conv_ratio", "ls_init_value")  # GatedCNNBlock arguments


def _create(variant: str, pretrained: bool, *, depths, dims, act_layer: str = "gelu", stem_mid_norm: bool = True,
            downsample: str = "conv", head_fn: str = "default", **kwargs):
    """Build one variant from its row (timm's MambaOut arguments) plus timm's arguments."""
    act = nn.GELU if act_layer == "gelu" else get_act_layer(act_layer)  # nn.GELU: the fused gated-conv path
    block_kwargs = dict(act_layer=act, **{k: kwargs.pop(k) for k in BLOCK_ARGS if k in kwargs})
    return build(MetaFormer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                 depths=depths, dims=dims, block_layer=GatedCNNBlock, block_kwargs=block_kwargs,
                 stem_layer=partial(ConvStem, mid_norm=stem_mid_norm, act_layer=act),
                 downsample_layer=partial(DownsamplingNHWC, norm_first=downsample == "conv_nf"),
                 head_layer=partial(NormMlpHead, hidden_norm=head_fn == "default"), output_fmt="NHWC", **kwargs)


register_family(__name__, VARIANTS, _create)
