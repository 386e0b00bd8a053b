"""Fused kernels (Triton) for the hot paths, each beside a plain PyTorch ``*_ref``.

Mixers call kernels only through the functions exported here; Triton is imported lazily
so ``import metazoo`` works on machines without Triton or a GPU.
"""
from .dispatch import BACKENDS, resolve, triton_available, use_backend

__all__ = ["BACKENDS", "resolve", "triton_available", "use_backend"]
