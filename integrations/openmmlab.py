"""mmdet / mmseg backbone adapter: any timm model (every ``mz_*`` family) through ``features_only``.

The adapter is a plain ``nn.Module`` with mmengine's ``init_weights`` protocol, so it imports and
runs without OpenMMLab. Importing this module calls :func:`register`, which adds it (as
``MetazooBackbone``) and the stage-wise layer-decay optimizer constructor to the mmdet and mmseg
registries when those import; an OpenMMLab config loads it with
``custom_imports = dict(imports=["metazoo.integrations.openmmlab"], allow_failed_imports=False)``.
"""
from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Mapping, Sequence

import timm
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from metazoo.backbones._common import load_checkpoint, validate_out_indices

OUT_NORMS = (None, "gn", "ln")
ADAPTER_NAME = "MetazooBackbone"
CONSTRUCTOR_NAME = "MetazooLayerDecayConstructor"


def _out_norm(kind: str | None, channels: int) -> nn.Module:
    """Extra norm on one output: GroupNorm(1, C) as PoolFormer's dense models, channel LN as ConvNeXt's."""
    if kind is None:
        return nn.Identity()
    if kind == "gn":
        return nn.GroupNorm(1, channels)
    return timm.layers.LayerNorm2d(channels)


def _resolve(body: nn.Module, name: str) -> str | None:
    """Name inside a timm features net of the original module ``name`` (flattened or wrapped);
    None when timm dropped it (stages after the last requested output)."""
    for cand in (name, name.replace(".", "_", 1), f"model.{name}"):
        try:
            body.get_submodule(cand)
            return cand
        except AttributeError:
            continue
    return None


def pyramid_indices(info: Sequence[Mapping]) -> tuple[int, ...]:
    """Default ``out_indices``: the stages of stride 4, 8, 16 and 32 (else the last four)."""
    idx = tuple(i for i, d in enumerate(info) if d["reduction"] in (4, 8, 16, 32))
    return idx if len(idx) == 4 else tuple(range(max(len(info) - 4, 0), len(info)))


class MetazooBackbone(nn.Module):
    """Multi-scale NCHW features of a timm model for detection / segmentation heads.

    ``out_indices`` (default: the stride 4/8/16/32 stages) picks the stages whose outputs go out.
    ``frozen_stages``: -1 freezes nothing, 0 the stem, k the stem and stages 1..k (no grad, eval
    mode). ``norm_eval`` keeps every BatchNorm in eval mode. ``init_cfg=dict(type='Pretrained',
    checkpoint=...)`` takes a file (a classification checkpoint, or a detector / adapter one with
    ``backbone.`` / ``module.`` prefixes) or a timm pretrained tag of ``model_name``.
    """

    def __init__(self, model_name: str, out_indices: Sequence[int] | None = None,
                 frozen_stages: int = -1, norm_eval: bool = False, drop_path_rate: float = 0.0,
                 out_norm: str | None = None, model_kwargs: Mapping | None = None,
                 init_cfg: Mapping | None = None):
        super().__init__()
        if not isinstance(model_name, str) or not timm.is_model(model_name):
            raise ValueError(f"model_name={model_name!r} is not a registered timm model; accepted: "
                             f"{', '.join(timm.list_models('mz_*')) or 'any mz_* model (import metazoo)'}")
        if out_norm not in OUT_NORMS:
            raise ValueError(f"out_norm={out_norm!r} is not supported; accepted values: {OUT_NORMS}")
        if init_cfg is not None and (not isinstance(init_cfg, Mapping) or init_cfg.get("type") != "Pretrained"
                                     or not init_cfg.get("checkpoint")):
            raise ValueError(f"init_cfg={init_cfg!r} is not supported; accepted: None or "
                             "dict(type='Pretrained', checkpoint=<file or pretrained tag>)")
        self.model_name = model_name
        self.model_kwargs = dict(model_kwargs or {})
        self.drop_path_rate = drop_path_rate
        info = self._features(model_name, None, device="meta").feature_info.info
        num_stages = len(info)
        if out_indices is None:
            out_indices = pyramid_indices(info)
        self.out_indices = tuple(i % num_stages for i in validate_out_indices(out_indices, num_stages))
        if not isinstance(frozen_stages, int) or not -1 <= frozen_stages <= num_stages:
            raise ValueError(f"frozen_stages={frozen_stages!r} is out of range; accepted: integers in "
                             f"[-1, {num_stages}] (-1 none, 0 stem, k stem and stages 1..k)")
        self.num_stages = num_stages
        self.frozen_stages = frozen_stages
        self.norm_eval = bool(norm_eval)
        self.init_cfg = dict(init_cfg) if init_cfg is not None else None
        self.body = self._features(model_name, self.out_indices)
        self.channels_last_out = str(getattr(self.body, "output_fmt", "NCHW")).upper().endswith("NHWC")
        self.out_channels = list(self.body.feature_info.channels())
        self.strides = list(self.body.feature_info.reduction())
        self.norms = nn.ModuleList(_out_norm(out_norm, c) for c in self.out_channels)
        self._groups = self._stage_groups()
        self._freeze()

    def _features(self, model_name, out_indices, device=None) -> nn.Module:
        """timm features net; with ``out_indices=None`` every stage (used to count them)."""
        kwargs = dict(self.model_kwargs, features_only=True, drop_path_rate=self.drop_path_rate)
        if out_indices is not None:
            kwargs["out_indices"] = out_indices
        if device is None:
            return timm.create_model(model_name, **kwargs)
        with torch.device(device):
            return timm.create_model(model_name, **kwargs)

    def _stage_groups(self) -> dict[str, int]:
        """Body module name -> 0 (stem), k (stage k, with its downsampling), num_stages + 1 (after)."""
        prefixes = [_resolve(self.body, d["module"]) for d in self.body.feature_info.info]
        groups, next_stage = {}, 0
        for name, _ in self.body.named_modules():
            inside = next((k for k, p in enumerate(prefixes)
                           if p is not None and (name == p or name.startswith(p + "."))), None)
            if inside is not None:
                next_stage = max(next_stage, inside + 1)
                groups[name] = inside + 1
            else:
                groups[name] = 0 if next_stage == 0 else next_stage + 1
        return groups

    def layer_id(self, param_name: str) -> int:
        """Stage group (0 stem .. num_stages + 1) of an adapter parameter, for layer-wise lr decay."""
        if param_name.startswith("norms."):
            return self.out_indices[int(param_name.split(".")[1])] + 1
        if not param_name.startswith("body."):
            return self.num_stages + 1
        module = param_name[len("body."):].rpartition(".")[0]
        return min(self._groups.get(module, self.num_stages + 1), self.num_stages + 1)

    def _freeze(self) -> None:
        """No grad and eval mode for the stem and stages 1..frozen_stages (and their out norms)."""
        if self.frozen_stages < 0:
            return
        for name, module in self.body.named_modules():
            if name and self._groups[name] <= self.frozen_stages:
                module.training = False  # non-recursive: containers may hold later stages
                for p in module.parameters(recurse=False):
                    p.requires_grad_(False)
        for i, norm in zip(self.out_indices, self.norms):
            if i + 1 <= self.frozen_stages:
                norm.eval()
                norm.requires_grad_(False)

    def train(self, mode: bool = True):
        """Switch mode, then re-apply ``frozen_stages`` and ``norm_eval``."""
        super().train(mode)
        self._freeze()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, 3, H, W) image batch -> one NCHW map per ``out_indices`` entry."""
        feats = self.body(x)
        if self.channels_last_out:
            feats = [f.permute(0, 3, 1, 2) for f in feats]
        return tuple(norm(f.contiguous()) for norm, f in zip(self.norms, feats))

    def init_weights(self) -> None:
        """Load ``init_cfg``'s checkpoint into the body (mmengine calls this once after building)."""
        if self.init_cfg is None:
            return
        ckpt = str(self.init_cfg["checkpoint"])
        if os.path.isfile(ckpt):
            state = load_checkpoint(ckpt)  # weights-only; strips module. / backbone. prefixes
            if not any(k.startswith("body.") for k in state):  # a classification checkpoint
                state = self._timm_state(pretrained_cfg_overlay=dict(file=ckpt))
        else:
            state = self._timm_state(tag=ckpt)
        own = self.state_dict()
        body_keys = {k for k in own if k.startswith("body.")}
        missing = sorted(body_keys - state.keys())
        if missing:
            raise ValueError(f"init_cfg.checkpoint={ckpt!r} does not match {self.model_name}: "
                             f"{len(missing)} backbone tensors missing, e.g. {missing[:3]}")
        self.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        self.is_init = True

    def _timm_state(self, tag: str | None = None, **kwargs) -> dict[str, torch.Tensor]:
        """A classification model's weights loaded by timm (its key filters apply), renamed to ours."""
        name = f"{self.model_name}.{tag}" if tag else self.model_name
        try:
            full = timm.create_model(name, pretrained=True, **self.model_kwargs, **kwargs)
        except RuntimeError as e:
            raise ValueError(f"init_cfg.checkpoint={tag!r} is neither a file nor a pretrained tag of "
                             f"{self.model_name} ({e})") from e
        body_keys = set(self.body.state_dict())
        out = {}
        for k, v in full.state_dict().items():
            for cand in (k, k.replace(".", "_", 1), f"model.{k}"):
                if cand in body_keys:
                    out[f"body.{cand}"] = v
                    break
        return out


def _layer_decay_constructor():
    """Optimizer constructor scaling each backbone stage's lr by ``decay ** (num_stages + 1 - stage)``."""
    from mmengine.optim import DefaultOptimWrapperConstructor
    from mmengine.registry import OPTIM_WRAPPERS, OPTIMIZERS

    class MetazooLayerDecayConstructor(DefaultOptimWrapperConstructor):
        """``paramwise_cfg=dict(layer_decay_rate=0.9)``; 1-D weights and biases get no weight decay."""

        def __call__(self, model: nn.Module):
            model = getattr(model, "module", model)
            rate = float(self.paramwise_cfg.get("layer_decay_rate", 1.0))
            backbone = model.backbone
            top = backbone.num_stages + 1
            groups: dict[tuple[int, bool], dict] = {}
            for name, p in model.named_parameters():
                if not p.requires_grad:
                    continue
                lid = backbone.layer_id(name[len("backbone."):]) if name.startswith("backbone.") else top
                no_wd = p.ndim == 1 or name.endswith(".bias")
                g = groups.setdefault((lid, no_wd), dict(
                    params=[], lr=self.base_lr * rate ** (top - lid),
                    weight_decay=0.0 if no_wd else self.base_wd))
                g["params"].append(p)
            optimizer_cfg = dict(self.optimizer_cfg, params=list(groups.values()))
            optimizer = OPTIMIZERS.build(optimizer_cfg)
            return OPTIM_WRAPPERS.build(dict(self.optim_wrapper_cfg), default_args=dict(optimizer=optimizer))

    return MetazooLayerDecayConstructor


def register() -> list[str]:
    """Register the adapter with mmdet's and mmseg's model registries, the layer-decay optimizer
    constructor with mmengine's (which both scopes search).

    Returns the scopes registered; packages that are not installed are skipped, so this is safe
    on a classification-only install.
    """
    done = []
    try:  # the constructor is scope-free: mmdet's and mmseg's registries find it in mmengine's
        from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS
    except ImportError:
        return done
    OPTIM_WRAPPER_CONSTRUCTORS.register_module(name=CONSTRUCTOR_NAME, module=_layer_decay_constructor(),
                                               force=True)
    for scope in ("mmdet", "mmseg"):
        try:
            registry = importlib.import_module(f"{scope}.registry")
        except (ImportError, AssertionError) as e:  # absent, or an mmcv build / version they reject
            if isinstance(e, ModuleNotFoundError) and e.name in (scope, "mmengine", "mmcv"):
                continue  # not installed: nothing to register
            warnings.warn(f"metazoo: {scope} is installed but does not import ({e}); "
                          f"the {ADAPTER_NAME} backbone is not registered there")
            continue
        registry.MODELS.register_module(name=ADAPTER_NAME, module=MetazooBackbone, force=True)
        done.append(scope)
    return done


register()
