"""PoolFormer v1 and v2 (Yu et al., "MetaFormer Is Actually What You Need for Vision", CVPR 2022;
"MetaFormer Baselines for Vision", TPAMI 2024): pooling token mixer in every stage."""
from __future__ import annotations

from timm.models import generate_default_cfgs
from torch import nn

from ..layers.norms import GroupNorm1, group_norm1_no_bias, layer_norm2d_no_bias
from ..mixers.pooling import Pooling
from . import _metaformer_baselines as baselines
from ._common import mirror_timm_cfgs, register_family

S_DIMS, M_DIMS = (64, 128, 320, 512), (96, 192, 384, 768)
# v1: GroupNorm(1) with bias, GELU MLP with bias, layer scale, no stem/downsample norm, linear head
V1 = dict(token_mixers=Pooling, norm_layers=GroupNorm1, mlp_act=nn.GELU, mlp_bias=True, res_scale_init_values=None,
          mlp_head=False)
# v2: bias-free GroupNorm(1), StarReLU MLP, residual scale in stages 3-4, normed stem, linear head
V2 = dict(token_mixers=Pooling, norm_layers=group_norm1_no_bias, downsample_norm=layer_norm2d_no_bias, mlp_head=False)

SIZES = {  # size: depths, dims, v1 layer-scale init (shared with IdentityFormer, RandFormer, RIFormer)
    "s12": dict(depths=(2, 2, 6, 2), dims=S_DIMS, layer_scale_init_values=1e-5),
    "s24": dict(depths=(4, 4, 12, 4), dims=S_DIMS, layer_scale_init_values=1e-5),
    "s36": dict(depths=(6, 6, 18, 6), dims=S_DIMS, layer_scale_init_values=1e-6),
    "m36": dict(depths=(6, 6, 18, 6), dims=M_DIMS, layer_scale_init_values=1e-6),
    "m48": dict(depths=(8, 8, 24, 8), dims=M_DIMS, layer_scale_init_values=1e-6),
}
VARIANTS = {size: dict(**dd, **V1) for size, dd in SIZES.items()}  # size: baselines.create arguments
VARIANTS_V2 = {size: dict(depths=dd["depths"], dims=dd["dims"], **V2) for size, dd in SIZES.items()}

default_cfgs = generate_default_cfgs(mirror_timm_cfgs(
    [f"poolformer{v}_{s}" for v in ("", "v2") for s in VARIANTS], baselines.make_cfg))
register_family(__name__, VARIANTS, baselines.create)
register_family(__name__, VARIANTS_V2, baselines.create, family="poolformerv2")
