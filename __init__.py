"""metazoo: MetaFormer-family vision backbones for timm, mmdet and mmseg.

``import metazoo`` registers every ``mz_*`` model with timm (and, when mmdet / mmseg are
importable, the dense-task backbone adapter with their registries).
"""
from . import backbones  # noqa: F401  (registers the models with timm)

__version__ = "0.1.0"
