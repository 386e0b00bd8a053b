"""PoolFormer v1 and v2 (Yu et al., "MetaFormer Is Actually What You Need for Vision", CVPR 2022;
"MetaFormer Baselines for Vision", TPAMI 2024): pooling token mixer in every stage."""
from __future__ import annotations

from timm.models import generate_default_cfgs, register_model
from torch import nn

from ..layers.norms import GroupNorm1, group_norm1_no_bias, layer_norm2d_no_bias
from ..mixers.pooling import Pooling
from . import _sail
from ._common import mirror_timm_cfgs

S_DIMS, M_DIMS = (64, 128, 320, 512), (96, 192, 384, 768)
# name: (depths, dims, v1 layer-scale init)
VARIANTS = {
    "s12": ((2, 2, 6, 2), S_DIMS, 1e-5),
    "s24": ((4, 4, 12, 4), S_DIMS, 1e-5),
    "s36": ((6, 6, 18, 6), S_DIMS, 1e-6),
    "m36": ((6, 6, 18, 6), M_DIMS, 1e-6),
    "m48": ((8, 8, 24, 8), M_DIMS, 1e-6),
}

default_cfgs = generate_default_cfgs(mirror_timm_cfgs(
    [f"poolformer{v}_{s}" for v in ("", "v2") for s in VARIANTS], _sail.make_cfg))


def _v1(size: str, pretrained: bool, **kwargs):
    """v1: GroupNorm(1) with bias, GELU MLP with bias, layer scale, no stem/downsample norm, linear head."""
    depths, dims, ls = VARIANTS[size]
    spec = dict(depths=depths, dims=dims, token_mixers=Pooling, norm_layers=GroupNorm1, mlp_act=nn.GELU,
                mlp_bias=True, layer_scale_init_values=ls, res_scale_init_values=None, mlp_head=False)
    return _sail.create(f"mz_poolformer_{size}", pretrained, spec, **kwargs)


def _v2(size: str, pretrained: bool, **kwargs):
    """v2: bias-free GroupNorm(1), StarReLU MLP, residual scale in stages 3-4, normed stem, linear head."""
    depths, dims, _ = VARIANTS[size]
    spec = dict(depths=depths, dims=dims, token_mixers=Pooling, norm_layers=group_norm1_no_bias,
                downsample_norm=layer_norm2d_no_bias, mlp_head=False)
    return _sail.create(f"mz_poolformerv2_{size}", pretrained, spec, **kwargs)


@register_model
def mz_poolformer_s12(pretrained=False, **kwargs):
    return _v1("s12", pretrained, **kwargs)


@register_model
def mz_poolformer_s24(pretrained=False, **kwargs):
    return _v1("s24", pretrained, **kwargs)


@register_model
def mz_poolformer_s36(pretrained=False, **kwargs):
    return _v1("s36", pretrained, **kwargs)


@register_model
def mz_poolformer_m36(pretrained=False, **kwargs):
    return _v1("m36", pretrained, **kwargs)


@register_model
def mz_poolformer_m48(pretrained=False, **kwargs):
    return _v1("m48", pretrained, **kwargs)


@register_model
def mz_poolformerv2_s12(pretrained=False, **kwargs):
    return _v2("s12", pretrained, **kwargs)


@register_model
def mz_poolformerv2_s24(pretrained=False, **kwargs):
    return _v2("s24", pretrained, **kwargs)


@register_model
def mz_poolformerv2_s36(pretrained=False, **kwargs):
    return _v2("s36", pretrained, **kwargs)


@register_model
def mz_poolformerv2_m36(pretrained=False, **kwargs):
    return _v2("m36", pretrained, **kwargs)


@register_model
def mz_poolformerv2_m48(pretrained=False, **kwargs):
    return _v2("m48", pretrained, **kwargs)
