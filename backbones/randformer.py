"""RandFormer (Yu et al., "MetaFormer Baselines for Vision", TPAMI 2024): identity token mixer in
stages 1-2, a frozen random token-mixing matrix in stages 3-4 (14x14 and 7x7 tokens at 224 px;
resized at other sizes, see ``metazoo.mixers.random_mixing``); otherwise IdentityFormer."""
from __future__ import annotations

from functools import partial

from ..mixers.identity import IdentityMixer
from ..mixers.random_mixing import RandomMixing
from . import _metaformer_baselines as baselines
from ._common import register_family
from .identityformer import SIZES, SPEC, sail_cfgs

# tokens of stages 3 and 4 at the 224 px training size (strides 16 and 32)
MIXERS = [IdentityMixer, IdentityMixer, partial(RandomMixing, num_tokens=14 * 14), partial(RandomMixing, num_tokens=7 * 7)]
VARIANTS = {size: dict(**dd, **SPEC, token_mixers=MIXERS) for size, dd in SIZES.items()}  # baselines.create

default_cfgs = sail_cfgs("randformer")
register_family(__name__, VARIANTS, baselines.create)
