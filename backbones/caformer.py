"""CAFormer (Yu et al., "MetaFormer Baselines for Vision", TPAMI 2024): separable conv in stages
1-2, vanilla self-attention in stages 3-4, StarReLU MLPs, MLP classifier head."""
from __future__ import annotations

from timm.models import generate_default_cfgs, register_model

from ..mixers.attention import Attention
from ..layers.norms import layer_norm2d_no_bias, layer_norm_no_bias
from ..mixers.sepconv import SepConv
from . import _sail
from ._common import mirror_timm_cfgs
from .convformer import VARIANTS

default_cfgs = generate_default_cfgs(mirror_timm_cfgs([f"caformer_{s}" for s in VARIANTS], _sail.make_cfg))


def _create(size: str, pretrained: bool, **kwargs):
    depths, dims = VARIANTS[size]
    spec = dict(depths=depths, dims=dims, token_mixers=[SepConv, SepConv, Attention, Attention],
                norm_layers=[layer_norm2d_no_bias] * 2 + [layer_norm_no_bias] * 2,
                downsample_norm=layer_norm2d_no_bias)
    return _sail.create(f"mz_caformer_{size}", pretrained, spec, **kwargs)


@register_model
def mz_caformer_s18(pretrained=False, **kwargs):
    return _create("s18", pretrained, **kwargs)


@register_model
def mz_caformer_s36(pretrained=False, **kwargs):
    return _create("s36", pretrained, **kwargs)


@register_model
def mz_caformer_m36(pretrained=False, **kwargs):
    return _create("m36", pretrained, **kwargs)


@register_model
def mz_caformer_b36(pretrained=False, **kwargs):
    return _create("b36", pretrained, **kwargs)
