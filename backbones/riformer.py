"""RIFormer (Wang et al., "RIFormer: Keep Your Vision Backbone Effective While Removing Token Mixer",
CVPR 2023): PoolFormer's macro design with a re-parameterisable affine token mixer. Trained (and
released) with the mixer; ``model.reparameterize()`` folds it into the preceding one-group norm, and
the deploy form runs no token mixer at all. Weights: OpenMMLab mmpretrain (``backbone.``-prefixed
``network.*`` layout, converted on load; its deploy-form files with ``norm_reparam`` load too)."""
from __future__ import annotations

import torch
from timm.models import generate_default_cfgs
from torch import nn

from ..layers.norms import GroupNorm1
from ..mixers.affine import Affine, fold_affine
from ..mixers.identity import IdentityMixer
from . import _metaformer_baselines as baselines
from ._common import register_family, rename_keys, unwrap_state_dict
from .poolformer import SIZES

# PoolFormer v1's macro design (GroupNorm(1) with bias, GELU MLP with bias, layer scale, linear head),
# the affine mixer, and a head that normalises the map before pooling
SPEC = dict(token_mixers=Affine, norm_layers=GroupNorm1, mlp_act=nn.GELU, mlp_bias=True, res_scale_init_values=None,
            mlp_head=False, head_kwargs=dict(norm_layer=GroupNorm1, norm_first=True))
VARIANTS = {size: dict(**dd, **SPEC) for size, dd in SIZES.items()}  # size: _create arguments

_MM = "https://download.openmmlab.com/mmclassification/v1/riformer/riformer-"
_FILES = {  # size: (224 px file, 384 px file), configs/riformer/metafile.yml of mmpretrain
    "s12": ("s12_32xb128_in1k_20230406-6741ce71", "s12_32xb128_in1k-384px_20230406-145eda4c"),
    "s24": ("s24_32xb128_in1k_20230406-fdab072a", "s24_32xb128_in1k-384px_20230406-bafae7ab"),
    "s36": ("s36_32xb128_in1k_20230406-fdfcd3b0", "s36_32xb128_in1k-384px_20230406-017ed3c4"),
    "m36": ("m36_32xb128_in1k_20230406-2fcb9d9b", "m36_32xb128_in1k-384px_20230406-66a6f764"),
    "m48": ("m48_32xb128_in1k_20230406-2b9d1abf", "m48_32xb128_in1k-384px_20230406-2e874826"),
}


def _cfgs() -> dict:
    """224 and 384 px tags; crop_pct from mmpretrain's test pipelines (resize edge 248/236, 426/404)."""
    out = {}
    for s, (f224, f384) in _FILES.items():
        small = s.startswith("s")
        out[f"mz_riformer_{s}.mmpretrain_in1k"] = baselines.make_cfg(url=f"{_MM}{f224}.pth", crop_pct=0.9 if small else 0.95)
        out[f"mz_riformer_{s}.mmpretrain_in1k_384"] = baselines.make_cfg(
            url=f"{_MM}{f384}.pth", input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=0.9 if small else 0.95)
    return generate_default_cfgs(out)


default_cfgs = _cfgs()


def _to_model_form(sd: dict, model: nn.Module) -> dict:
    """Match the checkpoint's form (training: ``token_mixer.affine``; deploy: ``norm_reparam``) to the model's."""
    ref = model.state_dict()
    for p in [k[:-len(".norm2.weight")] for k in list(sd) if k.endswith(".norm2.weight")]:
        mixer, deploy_norm = f"{p}.token_mixer.affine", f"{p}.norm_reparam"
        model_trains = f"{mixer}.weight" in ref
        if f"{deploy_norm}.weight" in sd:  # deploy-form checkpoint
            sd[f"{p}.norm1.weight"], sd[f"{p}.norm1.bias"] = sd.pop(f"{deploy_norm}.weight"), sd.pop(f"{deploy_norm}.bias")
            if model_trains:  # a = 2, c = 0 makes the mixer the identity on the norm: affine(n) - n = n
                sd[f"{mixer}.weight"] = torch.full_like(ref[f"{mixer}.weight"], 2.0)
                sd[f"{mixer}.bias"] = torch.zeros_like(ref[f"{mixer}.bias"])
        elif f"{mixer}.weight" in sd and not model_trains:  # training-form checkpoint, deploy-form model
            a, c = sd.pop(f"{mixer}.weight"), sd.pop(f"{mixer}.bias")
            sd[f"{p}.norm1.weight"], sd[f"{p}.norm1.bias"] = fold_affine(
                sd[f"{p}.norm1.weight"], sd[f"{p}.norm1.bias"], a.flatten(), c)
    return sd


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """mmpretrain layout (``backbone.network.*``, ``backbone.norm6``, ``head.fc``) or ours -> ours."""
    sd = rename_keys(unwrap_state_dict(state_dict), [(r"^norm6\.", "norm.")])
    return _to_model_form(baselines.checkpoint_filter_fn(sd, model), model)


def _create(variant: str, pretrained: bool, deploy: bool = False, **kwargs):
    """``deploy=True`` builds the inference form directly (identity mixer; either checkpoint form loads)."""
    if deploy:
        kwargs["token_mixers"] = IdentityMixer
    return baselines.create(variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


register_family(__name__, VARIANTS, _create)
