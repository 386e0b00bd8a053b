"""Backbone families. Importing this package registers every ``mz_*`` model with timm.

Each family is one module in this folder; every public module (not starting with ``_``) is
imported here, so adding a family file is all it takes to register it.
"""
import importlib
import pkgutil

from ._common import list_families

for _mod in pkgutil.iter_modules(__path__):
    if not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["list_families"]
