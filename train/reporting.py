"""Rank-0 reporting: progress bar, wandb (offline by default), metrics JSON and a loss/accuracy plot."""
from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

METRICS_FILE, PLOT_FILE = "metrics.json", "metrics.png"


class Progress:
    """tqdm bar over one epoch showing loss, lr and img/s; epoch summaries are printed on rank 0 either way."""

    def __init__(self, bar: bool, is_main: bool):
        self.enabled = bar and is_main
        self.is_main = is_main
        self.bar = None

    def start_epoch(self, epoch: int, epochs: int, total: int) -> None:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", file=sys.stderr,
                            dynamic_ncols=True, leave=True)

    def update_step(self, done: int, total: int, loss: float, lr: float, img_per_s: float) -> None:
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{img_per_s:.1f}", refresh=True)

    def end_epoch(self, summary: str) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.is_main:
            print(summary, flush=True)


class Reporter:
    """Collects per-epoch records; rank 0 writes metrics.json + metrics.png each epoch and logs to wandb."""

    def __init__(self, cfg_dict: dict, run_dir: Path, is_main: bool, wandb_mode: str, project: str,
                 name: str | None, history: list[dict] | None = None):
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.cfg = cfg_dict
        self.history = list(history or [])
        self.wandb = None
        wandb_mode = os.environ.get("WANDB_MODE", wandb_mode)  # the environment wins, as wandb users expect
        if is_main and wandb_mode != "disabled":
            try:
                import wandb
            except ImportError:
                warnings.warn("wandb is not installed: logging to metrics.json only (pip install wandb, "
                              "or set logger.wandb=disabled to silence this)", stacklevel=2)
            else:
                self.wandb = wandb.init(project=project, name=name, mode=wandb_mode, dir=str(self.run_dir),
                                        config=cfg_dict, resume="allow",
                                        id=name or self.run_dir.name.replace(os.sep, "-"))

    def log_epoch(self, record: dict) -> None:
        self.history.append(record)
        if not self.is_main:
            return
        if self.wandb is not None:
            for s in record.get("steps", []):
                self.wandb.log({"train/loss": s["loss"], "train/lr": s["lr"]}, step=s["step"])
            flat = {k: v for k, v in record.items() if isinstance(v, (int, float))}
            self.wandb.log({f"epoch/{k}": v for k, v in flat.items()}, step=record["num_updates"])
        self.write()

    def summary(self) -> dict:
        last = self.history[-1] if self.history else {}
        best = max(self.history, key=lambda r: r["val_top1"]) if self.history else {}
        return {
            "epochs": len(self.history), "final_top1": last.get("val_top1"), "final_top5": last.get("val_top5"),
            "final_val_loss": last.get("val_loss"), "best_top1": best.get("val_top1"),
            "best_epoch": best.get("epoch"), "final_ema_top1": last.get("ema_top1"),
            "train_time_s": sum(r["train_time_s"] for r in self.history),
            "mean_img_per_s": (sum(r["img_per_s"] for r in self.history) / len(self.history)) if self.history else None,
        }

    def write(self) -> None:
        """metrics.json (atomic) and metrics.png in the run dir."""
        payload = {"summary": self.summary(), "epochs": self.history, "config": self.cfg}
        tmp = self.run_dir / f".{METRICS_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(payload, indent=1))
        os.replace(tmp, self.run_dir / METRICS_FILE)
        self._plot()

    def _plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
        steps = [s for r in self.history for s in r.get("steps", [])]
        if steps:
            ax_loss.plot([s["step"] for s in steps], [s["loss"] for s in steps], lw=0.8, label="train (step)")
        ends = [r["num_updates"] for r in self.history]
        ax_loss.plot(ends, [r["train_loss"] for r in self.history], "o-", label="train (epoch mean)")
        ax_loss.plot(ends, [r["val_loss"] for r in self.history], "s-", label="val")
        ax_loss.set_xlabel("optimizer step")
        ax_loss.set_ylabel("loss")
        ax_loss.legend()
        epochs = [r["epoch"] + 1 for r in self.history]
        ax_acc.plot(epochs, [r["val_top1"] for r in self.history], "o-", label="top-1")
        ax_acc.plot(epochs, [r["val_top5"] for r in self.history], "s-", label="top-5")
        if any(r.get("ema_top1") is not None for r in self.history):
            ax_acc.plot(epochs, [r.get("ema_top1") for r in self.history], "^-", label="EMA top-1")
        ax_acc.set_xlabel("epoch")
        ax_acc.set_ylabel("val accuracy (%)")
        ax_acc.legend()
        fig.tight_layout()
        tmp = self.run_dir / f".{PLOT_FILE}.{os.getpid()}.tmp.png"
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, self.run_dir / PLOT_FILE)

    def finish(self) -> dict:
        summary = self.summary()
        if self.is_main and self.wandb is not None:
            self.wandb.summary.update({k: v for k, v in summary.items() if v is not None})
            self.wandb.finish()
        return summary
