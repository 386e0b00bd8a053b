"""MambaOut (Yu & Wang, "MambaOut: Do We Really Need Mamba for Vision?", CVPR 2025): the MetaFormer
skeleton with Gated CNN blocks, channels-last, plus timm's ``_rw`` variants."""
from __future__ import annotations

from functools import partial

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import get_act_layer
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ..mixers.gated_cnn import GatedCNNBlock
from ._common import build, check_in_chans, mirror_timm_cfgs, rename_keys
from ._layers import ConvStem, DownsamplingNHWC, NormMlpHead
from .metaformer import MetaFormer

T_DIMS, B_DIMS = (96, 192, 384, 576), (128, 256, 512, 768)
_RW = dict(stem_mid_norm=False, downsample="conv_nf", ls_init_value=1e-6, head_fn="norm_mlp")
VARIANTS = {
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


def _create(size: str, pretrained: bool, **kwargs):
    spec = dict(VARIANTS[size])
    spec.update({k: kwargs.pop(k) for k in list(kwargs) if k in spec})  # timm: kwargs override the variant
    depths, dims = spec.pop("depths"), spec.pop("dims")
    act_name = spec.pop("act_layer", "gelu")
    act = nn.GELU if act_name == "gelu" else get_act_layer(act_name)  # nn.GELU: the fused gated-conv path
    stem_mid_norm = spec.pop("stem_mid_norm", True)
    norm_first = spec.pop("downsample", "conv") == "conv_nf"
    hidden_norm = spec.pop("head_fn", "default") == "default"
    return build(MetaFormer, f"mz_mambaout_{size}", pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                 depths=depths, dims=dims, block_layer=GatedCNNBlock, block_kwargs=dict(act_layer=act, **spec),
                 stem_layer=partial(ConvStem, mid_norm=stem_mid_norm, act_layer=act),
                 downsample_layer=partial(DownsamplingNHWC, norm_first=norm_first),
                 head_layer=partial(NormMlpHead, hidden_norm=hidden_norm), output_fmt="NHWC", **kwargs)


@register_model
def mz_mambaout_femto(pretrained=False, **kwargs):
    return _create("femto", pretrained, **kwargs)


@register_model
def mz_mambaout_kobe(pretrained=False, **kwargs):
    return _create("kobe", pretrained, **kwargs)


@register_model
def mz_mambaout_tiny(pretrained=False, **kwargs):
    return _create("tiny", pretrained, **kwargs)


@register_model
def mz_mambaout_small(pretrained=False, **kwargs):
    return _create("small", pretrained, **kwargs)


@register_model
def mz_mambaout_base(pretrained=False, **kwargs):
    return _create("base", pretrained, **kwargs)


@register_model
def mz_mambaout_small_rw(pretrained=False, **kwargs):
    return _create("small_rw", pretrained, **kwargs)


@register_model
def mz_mambaout_base_short_rw(pretrained=False, **kwargs):
    return _create("base_short_rw", pretrained, **kwargs)


@register_model
def mz_mambaout_base_tall_rw(pretrained=False, **kwargs):
    return _create("base_tall_rw", pretrained, **kwargs)


@register_model
def mz_mambaout_base_wide_rw(pretrained=False, **kwargs):
    return _create("base_wide_rw", pretrained, **kwargs)


@register_model
def mz_mambaout_base_plus_rw(pretrained=False, **kwargs):
    return _create("base_plus_rw", pretrained, **kwargs)
