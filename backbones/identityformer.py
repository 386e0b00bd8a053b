"""IdentityFormer (Yu et al., "MetaFormer Baselines for Vision", TPAMI 2024): the MetaFormer with
an identity token mixer, i.e. no token mixing at all; PoolFormerV2's norms, StarReLU MLPs, linear head."""
from __future__ import annotations

from timm.models import generate_default_cfgs

from ..layers.norms import group_norm1_no_bias, layer_norm2d_no_bias
from ..mixers.identity import IdentityMixer
from . import _metaformer_baselines as baselines
from ._common import register_family
from .poolformer import VARIANTS_V2

# PoolFormerV2's design around the token mixer: bias-free one-group norms, normed stem, linear head
SPEC = dict(norm_layers=group_norm1_no_bias, downsample_norm=layer_norm2d_no_bias, mlp_head=False)
SIZES = {size: dict(depths=row["depths"], dims=row["dims"]) for size, row in VARIANTS_V2.items()}
VARIANTS = {size: dict(**dd, **SPEC, token_mixers=IdentityMixer) for size, dd in SIZES.items()}  # baselines.create
SAIL_HUB = "https://huggingface.co/sail/dl/resolve/main"


def sail_cfgs(family: str) -> dict:
    """``mz_<family>_<size>.sail_in1k`` cfgs at the official release's weight files (converted on load)."""
    return generate_default_cfgs({f"mz_{family}_{s}.sail_in1k": baselines.make_cfg(url=f"{SAIL_HUB}/{family}/{family}_{s}.pth")
                                  for s in SIZES})


default_cfgs = sail_cfgs("identityformer")
register_family(__name__, VARIANTS, baselines.create)
