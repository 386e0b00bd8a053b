"""Host-side cost of a training step (GPU): where eager time goes when the GPU is not the bottleneck.

At a tiny batch the GPU finishes each kernel long before Python issues the next, so a training
step's wall time is its host overhead. Reports, for ours and timm: ms per training step at
``--batch`` x ``--size`` px; and a cProfile table (functions by own time) of ours, written to
``overhead.txt`` under ``--out``. Models run at their recipe drop path (``--drop-path`` overrides).

    python bench/overhead.py --out $OUT
    python bench/overhead.py --device cpu --models poolformer_s12 --iters 1 --size 32 --out /tmp/o  # smoke
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats

import torch

from models import MODELS, _seconds, _sync, build, make_train_step, recipe_drop_path


def step_ms(step, iters: int, device: str) -> float:
    for _ in range(3):
        step()
    _sync(device)
    return _seconds(step, iters, device) / iters * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--top", type=int, default=45)
    ap.add_argument("--drop-path", type=float, default=None, help="default: the recipe's rate")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = ap.parse_args()
    rows, report = [], io.StringIO()
    for name in args.models.split(","):
        row = dict(model=name)
        for impl in ("ours_eager", "timm_eager"):
            dp = recipe_drop_path(name) if args.drop_path is None else args.drop_path
            model = build(name, impl, dp, args.device).train()
            step = make_train_step(model, args.batch, args.size, args.device)
            row[impl] = step_ms(step, args.iters, args.device)
            if impl == "ours_eager":
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(5):
                    step()
                _sync(args.device)
                prof.disable()
                report.write(f"### {name} ours_eager: 5 training steps, batch {args.batch}, {args.size} px\n")
                pstats.Stats(prof, stream=report).sort_stats("tottime").print_stats(args.top)
            del model, step
        print(f"{name}: host ms/step ours {row['ours_eager']:.2f}, timm {row['timm_eager']:.2f}", flush=True)
        rows.append(row)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "overhead.txt"), "w") as f:
        f.write(report.getvalue())
    with open(os.path.join(args.out, "overhead.json"), "w") as f:
        json.dump(dict(batch=args.batch, size=args.size, device=args.device, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
