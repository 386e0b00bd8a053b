"""Kernels on vs off in the dense-task apps: iteration time, peak memory, loss and final metrics.

``python -m metazoo.bench.dense_bench --out DIR [--tasks detect,segment] [--backends triton,torch]
[--iters 300] [overrides...]`` runs ``python -m metazoo.train.<task>`` once per (task, kernel backend)
with ``METAZOO_KERNELS=<backend>`` and the same Hydra overrides (e.g. ``backbone.model_name=
mz_convformer_s18``), reads mmengine's ``vis_data/scalars.json`` of each run, and writes
``DIR/dense_bench.json`` and a Markdown table: median seconds per iteration (first logged interval
left out: warm-up), peak memory over the whole run and over the intervals after the first (steady
state, without warm-up transients such as cuDNN's algorithm search; mmengine logs memory on CUDA
only), last training loss, final metrics.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from metazoo.cards import dense_markdown as markdown
from metazoo.kernels.dispatch import BACKENDS, ENV_VAR
from metazoo.train.dense_runner import TASKS

METRIC_KEYS = {"detect": ("coco/bbox_mAP_50", "coco/segm_mAP_50", "coco/bbox_mAP"), "segment": ("mIoU", "aAcc")}


def summarize(scalars: Path, task: str) -> dict:
    """Summary of one run from mmengine's ``scalars.json`` (one JSON object per logged step)."""
    rows = [json.loads(line) for line in scalars.read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r and "time" in r]
    if not train:
        raise ValueError(f"{scalars}: no training iterations logged")
    times = [r["time"] for r in (train[1:] or train)]
    memory = [r["memory"] for r in train if "memory" in r]
    steady = memory[1:] or memory
    metrics = {}
    for r in rows:
        metrics.update({k: r[k] for k in METRIC_KEYS[task] if k in r})
    return {"s_per_iter": statistics.median(times), "peak_memory_mb": max(memory) if memory else None,
            "steady_memory_mb": max(steady) if steady else None,
            "last_loss": train[-1]["loss"], "iters_logged": len(train), "metrics": metrics}


def _csv(value: str, accepted: tuple, what: str) -> list[str]:
    items = [v for v in value.split(",") if v]
    bad = [v for v in items if v not in accepted]
    if bad or not items:
        raise SystemExit(f"{what}={value!r}: accepted values are {', '.join(accepted)}")
    return items


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m metazoo.bench.dense_bench", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--backends", default="triton,torch")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = p.parse_args(argv)
    tasks = _csv(args.tasks, TASKS, "--tasks")
    backends = _csv(args.backends, tuple(b for b in BACKENDS if b != "auto"), "--backends")
    if args.iters < 2:
        raise SystemExit(f"--iters={args.iters}: need at least 2 (the first logged interval is warm-up)")
    args.out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for task in tasks:
        for backend in backends:
            run_dir = (args.out / f"{task}_{backend}").resolve()
            cmd = [sys.executable, "-m", f"metazoo.train.{task}", f"hydra.run.dir={run_dir}", "wandb.mode=disabled",
                   f"schedule.iters={args.iters}", f"schedule.warmup={max(1, args.iters // 10)}",
                   f"mm.default_hooks.logger.interval={max(1, min(20, args.iters // 5))}", *args.overrides]
            log = args.out / f"{task}_{backend}.log"
            with open(log, "w") as f:
                proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, **{ENV_VAR: backend}))
            if proc.returncode != 0:
                raise SystemExit(f"{task} with {ENV_VAR}={backend} failed ({proc.returncode}), see {log}")
            scalars = sorted(run_dir.glob("*/vis_data/scalars.json"))
            if not scalars:
                raise SystemExit(f"{task} with {ENV_VAR}={backend}: no scalars.json under {run_dir}")
            runs[f"{task}/{backend}"] = summarize(scalars[-1], task)
    result = {"iters": args.iters, "overrides": args.overrides, "runs": runs}
    (args.out / "dense_bench.json").write_text(json.dumps(result, indent=1))
    table = markdown(runs)
    (args.out / "dense_bench.md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
