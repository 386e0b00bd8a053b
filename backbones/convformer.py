"""ConvFormer (Yu et al., "MetaFormer Baselines for Vision", TPAMI 2024): separable-conv token
mixer in every stage, StarReLU MLPs, MLP classifier head."""
from __future__ import annotations

from timm.models import generate_default_cfgs

from ..layers.norms import layer_norm2d_no_bias
from ..mixers.sepconv import SepConv
from . import _metaformer_baselines as baselines
from ._common import mirror_timm_cfgs, register_family

SIZES = {  # shared with CAFormer
    "s18": dict(depths=(3, 3, 9, 3), dims=(64, 128, 320, 512)),
    "s36": dict(depths=(3, 12, 18, 3), dims=(64, 128, 320, 512)),
    "m36": dict(depths=(3, 12, 18, 3), dims=(96, 192, 384, 576)),
    "b36": dict(depths=(3, 12, 18, 3), dims=(128, 256, 512, 768)),
}
VARIANTS = {  # size: baselines.create arguments
    size: dict(**dd, token_mixers=SepConv, norm_layers=layer_norm2d_no_bias, downsample_norm=layer_norm2d_no_bias)
    for size, dd in SIZES.items()}

default_cfgs = generate_default_cfgs(mirror_timm_cfgs([f"convformer_{s}" for s in VARIANTS], baselines.make_cfg))
register_family(__name__, VARIANTS, baselines.create)
