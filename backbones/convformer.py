"""ConvFormer (Yu et al., "MetaFormer Baselines for Vision", TPAMI 2024): separable-conv token
mixer in every stage, StarReLU MLPs, MLP classifier head."""
from __future__ import annotations

from timm.models import generate_default_cfgs, register_model

from ..layers.norms import layer_norm2d_no_bias
from ..mixers.sepconv import SepConv
from . import _sail
from ._common import mirror_timm_cfgs

VARIANTS = {  # name: (depths, dims)
    "s18": ((3, 3, 9, 3), (64, 128, 320, 512)),
    "s36": ((3, 12, 18, 3), (64, 128, 320, 512)),
    "m36": ((3, 12, 18, 3), (96, 192, 384, 576)),
    "b36": ((3, 12, 18, 3), (128, 256, 512, 768)),
}

default_cfgs = generate_default_cfgs(mirror_timm_cfgs([f"convformer_{s}" for s in VARIANTS], _sail.make_cfg))


def _create(size: str, pretrained: bool, **kwargs):
    depths, dims = VARIANTS[size]
    spec = dict(depths=depths, dims=dims, token_mixers=SepConv, norm_layers=layer_norm2d_no_bias,
                downsample_norm=layer_norm2d_no_bias)
    return _sail.create(f"mz_convformer_{size}", pretrained, spec, **kwargs)


@register_model
def mz_convformer_s18(pretrained=False, **kwargs):
    return _create("s18", pretrained, **kwargs)


@register_model
def mz_convformer_s36(pretrained=False, **kwargs):
    return _create("s36", pretrained, **kwargs)


@register_model
def mz_convformer_m36(pretrained=False, **kwargs):
    return _create("m36", pretrained, **kwargs)


@register_model
def mz_convformer_b36(pretrained=False, **kwargs):
    return _create("b36", pretrained, **kwargs)
