"""RIFormer (Wang et al., "RIFormer: Keep Your Vision Backbone Effective While Removing Token Mixer",
CVPR 2023): PoolFormer's macro design with a re-parameterisable affine token mixer. Trained (and
released) with the mixer; ``model.reparameterize()`` folds it into the preceding one-group norm, and
the deploy form runs no token mixer at all. Weights: OpenMMLab mmpretrain (``backbone.``-prefixed
``network.*`` layout, converted on load; its deploy-form files with ``norm_reparam`` load too)."""
from __future__ import annotations

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ..layers.norms import GroupNorm1
from ..mixers.affine import Affine, fold_affine
from ..mixers.identity import IdentityMixer
from . import _sail
from ._common import rename_keys, strip_prefixes
from .identityformer import VARIANTS as SIZES

VARIANTS = {s: dict(**SIZES[s], layer_scale_init_values=ls)
            for s, ls in (("s12", 1e-5), ("s24", 1e-5), ("s36", 1e-6), ("m36", 1e-6), ("m48", 1e-6))}

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
        out[f"mz_riformer_{s}.mmpretrain_in1k"] = _sail.make_cfg(url=f"{_MM}{f224}.pth", crop_pct=0.9 if small else 0.95)
        out[f"mz_riformer_{s}.mmpretrain_in1k_384"] = _sail.make_cfg(
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
    sd = rename_keys({strip_prefixes(k): v for k, v in state_dict.items()}, [(r"^norm6\.", "norm.")])
    return _to_model_form(_sail.checkpoint_filter_fn(sd, model), model)


def _create(size: str, pretrained: bool, deploy: bool = False, **kwargs):
    """``deploy=True`` builds the inference form directly (identity mixer; either checkpoint form loads)."""
    spec = dict(**VARIANTS[size], token_mixers=IdentityMixer if deploy else Affine, norm_layers=GroupNorm1,
                mlp_act=nn.GELU, mlp_bias=True, res_scale_init_values=None, mlp_head=False,
                head_kwargs=dict(norm_layer=GroupNorm1, norm_first=True))
    return _sail.create(f"mz_riformer_{size}", pretrained, spec, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


@register_model
def mz_riformer_s12(pretrained=False, **kwargs):
    return _create("s12", pretrained, **kwargs)


@register_model
def mz_riformer_s24(pretrained=False, **kwargs):
    return _create("s24", pretrained, **kwargs)


@register_model
def mz_riformer_s36(pretrained=False, **kwargs):
    return _create("s36", pretrained, **kwargs)


@register_model
def mz_riformer_m36(pretrained=False, **kwargs):
    return _create("m36", pretrained, **kwargs)


@register_model
def mz_riformer_m48(pretrained=False, **kwargs):
    return _create("m48", pretrained, **kwargs)
