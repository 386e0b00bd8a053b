"""mmpretrain's RIFormer as a plain PyTorch classifier, for the benchmark's official rows, without mmcv,
mmengine or mmpretrain installed.

``load(folder)`` imports ``riformer.py`` (and the ``poolformer.py`` it imports ``Mlp`` / ``PatchEmbed``
from) out of a folder holding read-only copies of ``mmpretrain/models/backbones/`` files of
github.com/open-mmlab/mmpretrain. The few names those files import from mmcv, mmengine and mmpretrain
are stood in for here (only while the files are imported; real packages, if installed, are untouched):
``DropPath`` (timm's: same per-sample drop and 1/keep rescale), ``build_norm_layer`` / ``build_activation_layer``
for the configs RIFormer uses (``GN``, ``GELU``), ``BaseModule`` / ``BaseBackbone`` (``nn.Module`` taking
``init_cfg``) and a registry whose decorator returns the class. Filling the folder, e.g. from a clone::

    mkdir -p .carry/official_riformer
    for f in riformer poolformer; do
        git -C MMPRETRAIN show HEAD:mmpretrain/models/backbones/$f.py > .carry/official_riformer/$f.py
    done
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
import types

import torch
from torch import nn

FILES = ("riformer.py", "poolformer.py")
PACKAGE = "_mmpretrain_official"  # the folder is imported as this package (its files use relative imports)


def build_norm_layer(cfg: dict, num_features: int, postfix: str = "") -> tuple[str, nn.Module]:
    """mmcv's ``build_norm_layer`` for ``type='GN'`` (``nn.GroupNorm``; other keys passed on)."""
    cfg = dict(cfg)
    kind = cfg.pop("type")
    if kind != "GN":
        raise ValueError(f"norm_cfg type={kind!r}; accepted here: 'GN' (what mmpretrain's RIFormer uses)")
    requires_grad = cfg.pop("requires_grad", True)
    layer = nn.GroupNorm(num_channels=num_features, **cfg)
    layer.requires_grad_(requires_grad)
    return f"gn{postfix}", layer


def build_activation_layer(cfg: dict) -> nn.Module:
    """mmcv's ``build_activation_layer`` for ``type='GELU'``."""
    if cfg.get("type") != "GELU":
        raise ValueError(f"act_cfg={cfg!r}; accepted here: dict(type='GELU') (what mmpretrain's RIFormer uses)")
    return nn.GELU()


class BaseModule(nn.Module):
    """mmengine's ``BaseModule`` without its weight-init machinery (a constructed model keeps PyTorch's init,
    as mmengine's does until ``init_weights`` runs)."""

    def __init__(self, init_cfg=None):
        super().__init__()
        self.init_cfg = init_cfg


class _Registry:
    """mmpretrain's ``MODELS``: ``register_module()`` returns the class unchanged."""

    @staticmethod
    def register_module(*_, **__):
        return lambda cls: cls


def _stand_ins() -> dict[str, types.ModuleType]:
    from timm.layers import DropPath

    def module(name: str, **attrs) -> types.ModuleType:
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        return m

    bricks = dict(DropPath=DropPath, build_norm_layer=build_norm_layer, build_activation_layer=build_activation_layer)
    return {"mmcv": module("mmcv"), "mmcv.cnn": module("mmcv.cnn", **bricks),
            "mmcv.cnn.bricks": module("mmcv.cnn.bricks", **bricks),
            "mmengine": module("mmengine"), "mmengine.model": module("mmengine.model", BaseModule=BaseModule),
            "mmpretrain": module("mmpretrain"), "mmpretrain.registry": module("mmpretrain.registry", MODELS=_Registry()),
            f"{PACKAGE}.base_backbone": module(f"{PACKAGE}.base_backbone", BaseBackbone=BaseModule)}


@contextlib.contextmanager
def _modules(mods: dict[str, types.ModuleType]):
    """``sys.modules`` with ``mods`` in place for the block, then as it was."""
    saved = {k: sys.modules.get(k) for k in mods}
    sys.modules.update(mods)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def check_folder(folder: str) -> bool:
    """Whether ``folder`` holds the mmpretrain files this module imports."""
    return all(os.path.isfile(os.path.join(folder, f)) for f in FILES)


def load(folder: str) -> types.ModuleType:
    """The imported official ``riformer`` module of ``folder``."""
    if not check_folder(folder):
        raise ValueError(f"--official-dir={folder!r} lacks {' or '.join(FILES)}; accepted: a folder with "
                         "mmpretrain's mmpretrain/models/backbones/riformer.py and poolformer.py")
    for stale in [k for k in sys.modules if k.startswith(f"{PACKAGE}.")]:  # an earlier folder's files
        del sys.modules[stale]
    package = types.ModuleType(PACKAGE)
    package.__path__ = [os.path.abspath(folder)]
    with _modules({PACKAGE: package, **_stand_ins()}):
        return importlib.import_module(f"{PACKAGE}.riformer")


class Classifier(nn.Module):
    """mmpretrain's ``ImageClassifier`` for RIFormer: backbone (last stage, normed by ``norm6``) ->
    ``GlobalAveragePooling`` -> ``LinearClsHead`` (``head.fc``): its checkpoints' key layout."""

    def __init__(self, backbone: nn.Module, dim: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Module()
        self.head.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.fc(self.backbone(x)[-1].mean((2, 3)))


def riformer(module: types.ModuleType, arch: str, num_classes: int = 1000, drop_path_rate: float = 0.0) -> Classifier:
    """The official RIFormer classifier of size ``arch`` (s12, s24, s36, m36, m48), training form."""
    backbone = module.RIFormer(arch=arch, drop_path_rate=drop_path_rate)
    return Classifier(backbone, module.RIFormer.arch_settings[arch]["embed_dims"][-1], num_classes)
