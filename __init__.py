"""metazoo: MetaFormer-family vision backbones for timm, mmdet and mmseg.

``import metazoo`` registers every ``mz_*`` model with timm and, when mmdet / mmseg are
importable, the dense-task backbone adapter (``MetazooBackbone``) with their registries.
"""
from . import backbones  # noqa: F401  (registers the models with timm)
from .train.dense_backbone import register as _register_dense

_register_dense()

__version__ = "0.1.0"
