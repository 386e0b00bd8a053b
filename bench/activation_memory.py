"""Activation memory of one training forward: bytes autograd keeps for backward, per image, by module.

Device-independent (runs on CPU; Triton kernels through the interpreter there), so memory work can
be measured without a GPU; the GPU peak (``bench/models.py``) adds weights, grads, optimizer state
and allocator slack on top. Saved tensors are counted once per storage, under bf16 autocast, and
attributed to the innermost module running when autograd saved them. On CPU, norms follow CUDA's
autocast policy by default (fp32: it sets the precision, and so the size, of the residual stream).

    TRITON_INTERPRET=1 python bench/activation_memory.py --models mambaout_tiny,poolformer_s12 --size 64
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections import defaultdict
from unittest import mock

import torch

from metazoo.bench.models import MODELS
from metazoo.kernels import dtypes, use_backend


def saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Bytes saved for backward by one forward of ``model(x)``, keyed by innermost module class."""
    stack, seen, by_module = ["(top)"], set(), defaultdict(int)

    def enter(mod, _args) -> None:
        stack.append(type(mod).__name__)

    def leave(*_) -> None:  # must return None: a forward hook's return value replaces the output
        stack.pop()

    hooks = [h for m in model.modules() for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]

    def pack(t: torch.Tensor):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            by_module[stack[-1]] += t.untyped_storage().nbytes()
        return t

    device = x.device.type
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast(device, dtype=torch.bfloat16):
            model(x).float().sum().backward()
    finally:
        for h in hooks:
            h.remove()
    return dict(by_module)


@contextlib.contextmanager
def cuda_norm_policy(device: str):
    """On ``device``, run norms under autocast as CUDA's autocast does (inputs cast to fp32, fp32 out),
    in plain PyTorch (timm, our references) and in our kernels alike."""
    F = torch.nn.functional

    def fp32_under_autocast(fn):
        def call(x, *args, **kwargs):
            if torch.is_autocast_enabled(device):
                with torch.autocast(device, enabled=False):
                    return fn(x.float(), *(a.float() if torch.is_tensor(a) else a for a in args),
                              **{k: v.float() if torch.is_tensor(v) else v for k, v in kwargs.items()})
            return fn(x, *args, **kwargs)
        return call

    with mock.patch.object(F, "layer_norm", fp32_under_autocast(F.layer_norm)), \
            mock.patch.object(F, "group_norm", fp32_under_autocast(F.group_norm)), \
            mock.patch.object(dtypes, "NORMS_FP32_UNDER_AUTOCAST", dtypes.NORMS_FP32_UNDER_AUTOCAST | {device}):
        yield


def measure(name: str, ours: bool, batch: int, size: int, device: str, drop_path: float = 0.0,
            norms: str = "cuda") -> dict:
    """Per-image saved bytes: the difference between a forward at ``1 + batch`` images and at one,
    so batch-independent saves (autocast's bf16 weight copies) cancel out."""
    import timm

    import metazoo  # noqa: F401  (registers mz_* models)

    torch.manual_seed(0)
    model = timm.create_model(MODELS[name] if ours else name, num_classes=1000,
                              drop_path_rate=drop_path).to(device).train()
    runs = []
    emulate = norms == "cuda" and device != "cuda"
    for n in (1, 1 + batch):
        x = torch.randn(n, 3, size, size, device=device)
        with use_backend("triton" if ours else "torch"), \
                (cuda_norm_policy(device) if emulate else contextlib.nullcontext()):
            runs.append(saved_bytes(model, x))
    parts = {k: (runs[1].get(k, 0) - runs[0].get(k, 0)) / batch for k in runs[0].keys() | runs[1].keys()}
    return dict(model=name, impl="ours" if ours else "timm", batch=batch, size=size, drop_path=drop_path, norms=norms,
                bytes_per_image=sum(parts.values()),
                by_module={k: v for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v})


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--batch", type=int, default=1, help="extra images of the second forward")
    p.add_argument("--size", type=int, default=64, help="input side (activations scale with its square)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--drop-path", type=float, default=0.0, help="drop_path_rate of both models (train mode)")
    p.add_argument("--norms", choices=("cuda", "device"), default="cuda",
                   help="autocast policy of the norms: CUDA's (fp32; emulated off CUDA) or the device's own")
    p.add_argument("--out", default=None, help="folder for activation_memory.json")
    args = p.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        pair = [measure(name, ours, args.batch, args.size, args.device, args.drop_path, args.norms)
                for ours in (False, True)]
        rows += pair
        ratio = pair[1]["bytes_per_image"] / pair[0]["bytes_per_image"]
        print(f"{name}: timm {pair[0]['bytes_per_image'] / 2**20:.3f} MiB/img, ours "
              f"{pair[1]['bytes_per_image'] / 2**20:.3f} MiB/img ({ratio:.2f}x)")
        for r in pair:
            top = ", ".join(f"{k} {v / 2**20:.3f}" for k, v in list(r["by_module"].items())[:6])
            print(f"  {r['impl']}: {top}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "activation_memory.json"), "w") as f:
            json.dump(dict(device=args.device, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
