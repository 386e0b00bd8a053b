"""RandFormer (Yu et al., "MetaFormer Baselines for Vision", TPAMI 2024): identity token mixer in
stages 1-2, a frozen random token-mixing matrix in stages 3-4 (14x14 and 7x7 tokens at 224 px;
resized at other sizes, see ``metazoo.mixers.random_mixing``); otherwise IdentityFormer."""
from __future__ import annotations

from functools import partial

from timm.models import register_model

from ..mixers.identity import IdentityMixer
from ..mixers.random_mixing import RandomMixing
from . import _sail
from .identityformer import SPEC, VARIANTS, sail_cfgs

default_cfgs = sail_cfgs("randformer")
# tokens of stages 3 and 4 at the 224 px training size (strides 16 and 32)
MIXERS = [IdentityMixer, IdentityMixer, partial(RandomMixing, num_tokens=14 * 14), partial(RandomMixing, num_tokens=7 * 7)]


def _create(size: str, pretrained: bool, **kwargs):
    spec = dict(**VARIANTS[size], **SPEC, token_mixers=MIXERS)
    return _sail.create(f"mz_randformer_{size}", pretrained, spec, **kwargs)


@register_model
def mz_randformer_s12(pretrained=False, **kwargs):
    return _create("s12", pretrained, **kwargs)


@register_model
def mz_randformer_s24(pretrained=False, **kwargs):
    return _create("s24", pretrained, **kwargs)


@register_model
def mz_randformer_s36(pretrained=False, **kwargs):
    return _create("s36", pretrained, **kwargs)


@register_model
def mz_randformer_m36(pretrained=False, **kwargs):
    return _create("m36", pretrained, **kwargs)


@register_model
def mz_randformer_m48(pretrained=False, **kwargs):
    return _create("m48", pretrained, **kwargs)
