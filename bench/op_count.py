"""Ops issued by one training step (CPU): aten ops and Triton launches, ours vs timm.

Host time of an eager step grows with the number of ops it issues, so this count is a proxy that
needs no GPU. Triton kernels run under ``TRITON_INTERPRET=1`` with launches counted but not
executed (only the count matters here), and ``METAZOO_KERNELS=triton`` selects them on CPU. The
kernels' backward implementations are counted as eager runs them (called directly, see
``metazoo.kernels._autograd.BackwardOp``), not as one registered op.

    METAZOO_KERNELS=triton TRITON_INTERPRET=1 python bench/op_count.py poolformer_s12 caformer_s18 --drop-path 0.1
"""
from __future__ import annotations

import argparse
import collections

import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import metazoo  # noqa: F401  (registers mz_* models)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count(model_name: str, launches: collections.Counter, drop_path: float = 0.0) -> tuple[collections.Counter, int]:
    """(aten op counts, Triton launches) of one bf16-autocast train-mode forward + backward at 64 px, batch 2."""
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=10, drop_path_rate=drop_path)
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    launches.clear()
    with _CountOps() as ops:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().sum()
        loss.backward()
    return ops.counts, sum(launches.values())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="timm names; ours is mz_<name>")
    ap.add_argument("--drop-path", type=float, default=0.0, help="drop_path_rate of both models (recipes use 0.1-0.6)")
    args = ap.parse_args()
    if not 0.0 <= args.drop_path < 1.0:
        raise ValueError(f"--drop-path: {args.drop_path}; accepted: 0 <= p < 1")
    import triton.runtime.interpreter as interpreter

    from metazoo.kernels import _autograd

    launches = collections.Counter()
    interpreter.GridExecutor.__call__ = lambda self, *a, **k: launches.update([id(self)])
    # Count what eager runs: backward implementations called directly, as without the counting mode.
    _autograd._traced = lambda args: False
    for name in args.models:
        for model_name in (f"mz_{name}", name):
            ops, n_launch = count(model_name, launches, args.drop_path)
            top = ", ".join(f"{k} {v}" for k, v in ops.most_common(6))
            print(f"{model_name}: {sum(ops.values())} aten ops, {n_launch} Triton launches ({top})")


if __name__ == "__main__":
    main()
