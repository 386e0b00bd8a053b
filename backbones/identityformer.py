"""IdentityFormer (Yu et al., "MetaFormer Baselines for Vision", TPAMI 2024): the MetaFormer with
an identity token mixer, i.e. no token mixing at all; PoolFormerV2's norms, StarReLU MLPs, linear head."""
from __future__ import annotations

from timm.models import generate_default_cfgs, register_model

from ..layers.norms import group_norm1_no_bias, layer_norm2d_no_bias
from ..mixers.identity import IdentityMixer
from . import _sail

S_DIMS, M_DIMS = (64, 128, 320, 512), (96, 192, 384, 768)
VARIANTS = {
    "s12": dict(depths=(2, 2, 6, 2), dims=S_DIMS),
    "s24": dict(depths=(4, 4, 12, 4), dims=S_DIMS),
    "s36": dict(depths=(6, 6, 18, 6), dims=S_DIMS),
    "m36": dict(depths=(6, 6, 18, 6), dims=M_DIMS),
    "m48": dict(depths=(8, 8, 24, 8), dims=M_DIMS),
}
SAIL_HUB = "https://huggingface.co/sail/dl/resolve/main"


def sail_cfgs(family: str) -> dict:
    """``mz_<family>_<size>.sail_in1k`` cfgs at the official release's weight files (converted on load)."""
    return generate_default_cfgs({f"mz_{family}_{s}.sail_in1k": _sail.make_cfg(url=f"{SAIL_HUB}/{family}/{family}_{s}.pth")
                                  for s in VARIANTS})


default_cfgs = sail_cfgs("identityformer")


# PoolFormerV2's design around the token mixer: bias-free one-group norms, normed stem, linear head
SPEC = dict(norm_layers=group_norm1_no_bias, downsample_norm=layer_norm2d_no_bias, mlp_head=False)


def _create(size: str, pretrained: bool, **kwargs):
    spec = dict(**VARIANTS[size], **SPEC, token_mixers=IdentityMixer)
    return _sail.create(f"mz_identityformer_{size}", pretrained, spec, **kwargs)


@register_model
def mz_identityformer_s12(pretrained=False, **kwargs):
    return _create("s12", pretrained, **kwargs)


@register_model
def mz_identityformer_s24(pretrained=False, **kwargs):
    return _create("s24", pretrained, **kwargs)


@register_model
def mz_identityformer_s36(pretrained=False, **kwargs):
    return _create("s36", pretrained, **kwargs)


@register_model
def mz_identityformer_m36(pretrained=False, **kwargs):
    return _create("m36", pretrained, **kwargs)


@register_model
def mz_identityformer_m48(pretrained=False, **kwargs):
    return _create("m48", pretrained, **kwargs)
