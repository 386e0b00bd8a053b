"""1 -> N GPU scaling check of the training app: same global batch, same data order, img/s and losses.

``python -m metazoo.bench.ddp_scaling --out DIR [--gpus 2] [overrides...]`` runs the app once on one GPU
(gradient accumulation reaches the global batch) and once under torchrun on N GPUs (one micro-batch
per GPU), then writes ``DIR/ddp_scaling.json`` and a Markdown table: throughput, scaling factor and the
largest step-loss difference between the two runs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def _run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}), see {log}: {' '.join(cmd)}")


def _summary(run_dir: Path) -> dict:
    m = json.loads((run_dir / "metrics.json").read_text())
    epochs = m["epochs"]
    steady = [r["img_per_s"] for r in epochs[1:]] or [epochs[0]["img_per_s"]]  # epoch 0 includes warm-up
    return {"img_per_s": statistics.median(steady), "step_loss": [s["loss"] for r in epochs for s in r["steps"]],
            "final_top1": m["summary"]["final_top1"], "epochs": len(epochs)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m metazoo.bench.ddp_scaling", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=128)
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for both runs")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    global_batch = args.micro_batch * args.gpus
    defaults = {"logger.wandb": "disabled", "logger.progress": "false", "logger.log_interval": "1",
                "ckpt.interval": "1000"}  # unless overridden: Hydra refuses a key given twice
    given = {o.split("=", 1)[0] for o in args.overrides}
    common = [f"data.batch_size={args.micro_batch}", f"optim.global_batch={global_batch}", *args.overrides,
              *(f"{k}={v}" for k, v in defaults.items() if k not in given)]
    one = args.out / "gpu1"
    _run([sys.executable, "-m", "metazoo.train", f"hydra.run.dir={one}", *common], args.out / "gpu1.log")
    many = args.out / f"gpu{args.gpus}"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}", "-m",
          "metazoo.train", f"hydra.run.dir={many}", *common], args.out / f"gpu{args.gpus}.log")
    a, b = _summary(one), _summary(many)
    n = min(len(a["step_loss"]), len(b["step_loss"]))
    diffs = [abs(x - y) for x, y in zip(a["step_loss"][:n], b["step_loss"][:n])]
    result = {
        "global_batch": global_batch, "micro_batch": args.micro_batch, "gpus": args.gpus, "steps": n,
        "img_per_s_1gpu": a["img_per_s"], f"img_per_s_{args.gpus}gpu": b["img_per_s"],
        "scaling": b["img_per_s"] / a["img_per_s"],
        "max_abs_step_loss_diff_first10": max(diffs[:10]), "max_abs_step_loss_diff": max(diffs),
        "final_loss_1gpu": a["step_loss"][n - 1], f"final_loss_{args.gpus}gpu": b["step_loss"][n - 1],
        "final_top1_1gpu": a["final_top1"], f"final_top1_{args.gpus}gpu": b["final_top1"],
        "overrides": args.overrides,
    }
    (args.out / "ddp_scaling.json").write_text(json.dumps(result, indent=1))
    table = ("| GPUs | global batch | img/s | scaling | final step loss | final top-1 |\n|---|---|---|---|---|---|\n"
             f"| 1 | {global_batch} (accum {args.gpus}) | {a['img_per_s']:.0f} | 1.00 | {a['step_loss'][n - 1]:.4f} | "
             f"{a['final_top1']:.2f} |\n| {args.gpus} | {global_batch} | {b['img_per_s']:.0f} | {result['scaling']:.2f} | "
             f"{b['step_loss'][n - 1]:.4f} | {b['final_top1']:.2f} |\n\nmax |step loss diff| over {n} steps: "
             f"{result['max_abs_step_loss_diff']:.2e} (first 10 steps: {result['max_abs_step_loss_diff_first10']:.2e})\n")
    (args.out / "ddp_scaling.md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
