"""CAFormer (Yu et al., "MetaFormer Baselines for Vision", TPAMI 2024): separable conv in stages
1-2, vanilla self-attention in stages 3-4, StarReLU MLPs, MLP classifier head."""
from __future__ import annotations

from timm.models import generate_default_cfgs

from ..layers.norms import layer_norm2d_no_bias, layer_norm_no_bias
from ..mixers.attention import Attention
from ..mixers.sepconv import SepConv
from . import _metaformer_baselines as baselines
from ._common import mirror_timm_cfgs, register_family
from .convformer import SIZES

VARIANTS = {  # size: baselines.create arguments
    size: dict(**dd, token_mixers=[SepConv, SepConv, Attention, Attention],
               norm_layers=[layer_norm2d_no_bias] * 2 + [layer_norm_no_bias] * 2, downsample_norm=layer_norm2d_no_bias)
    for size, dd in SIZES.items()}

default_cfgs = generate_default_cfgs(mirror_timm_cfgs([f"caformer_{s}" for s in VARIANTS], baselines.make_cfg))
register_family(__name__, VARIANTS, baselines.create)
