"""metazoo: MetaFormer-family vision backbones for timm, mmdet and mmseg.

``import metazoo`` registers every ``mz_*`` model with timm, and nothing else: the mmdet / mmseg
backbone adapter lives in :mod:`metazoo.integrations.openmmlab`, which an OpenMMLab config loads with
``custom_imports = dict(imports=["metazoo.integrations.openmmlab"])``.
"""
from . import backbones  # noqa: F401  (registers the models with timm)

__version__ = "0.1.0"
