"""One training epoch (grad accumulation, AMP, mixup, EMA, per-step lr) and a distributed evaluation."""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from .config import RunError
from .distributed import DistEnv


@dataclass
class StepContext:
    """What a training epoch needs besides the model and the data."""

    raw_model: nn.Module  # the unwrapped model (EMA source)
    optimizer: torch.optim.Optimizer
    scheduler: object  # timm Scheduler or None
    loss_fn: nn.Module
    accum_steps: int
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    clip_grad: float | None
    ema: object | None  # timm ModelEmaV3 or None
    mixup: object | None  # timm Mixup or None
    dist: DistEnv
    log_interval: int
    distill: object | None = None  # train.distill.Distiller or None
    max_nonfinite_steps: int = 0  # updates with a non-finite loss that are skipped before the run stops
    nonfinite_steps: int = 0  # skipped so far (carried across epochs)


def diverged(loss: float, epoch: int, step: int, lr: float) -> RunError:
    """The error that stops a run whose loss is NaN or infinite (before any checkpoint of it is written)."""
    return RunError(f"training diverged: loss {loss} at epoch {epoch + 1}, optimizer step {step} (lr {lr:.3g}); "
                    f"no checkpoint of this epoch was written. Lower config key 'optim.lr', or set "
                    f"'max_nonfinite_steps' to skip a few overflowing (AMP) steps")


def skip_nonfinite(ctx: StepContext, update_loss: torch.Tensor, epoch: int, step: int) -> bool:
    """True when any rank's loss of this update is non-finite and the step is to be skipped; raises once
    more than ``max_nonfinite_steps`` were skipped. One host sync per update, so only when enabled."""
    if ctx.max_nonfinite_steps == 0:
        return False
    if ctx.dist.all_reduce_sum([float(not torch.isfinite(update_loss).item())])[0] == 0:
        return False
    ctx.nonfinite_steps += 1
    if ctx.nonfinite_steps > ctx.max_nonfinite_steps:
        raise diverged(update_loss.item(), epoch, step, ctx.optimizer.param_groups[0]["lr"])
    return True


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_one_epoch(model: nn.Module, loader, ctx: StepContext, epoch: int, num_updates: int,
                    progress=None) -> tuple[dict, int]:
    """Train for one pass over ``loader``; returns (stats, updated optimizer step count).

    Loss values in the stats are means over every rank's samples, so they do not depend on how
    the global batch is split across processes.
    """
    model.train()
    dev = ctx.dist.device
    steps_per_update = ctx.accum_steps
    n_batches = len(loader) - len(loader) % steps_per_update  # drop a trailing partial accumulation
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.dist.device)  # summed on device: no per-step sync
    update_loss = torch.zeros((), dtype=torch.float64, device=ctx.dist.device)  # over one update's micro-batches
    seen, update_seen, logged = 0, 0, []
    t_epoch = time.perf_counter()
    t0 = None  # throughput clock starts at the first batch: loader start-up is not training speed
    ctx.optimizer.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(loader):
        if i >= n_batches:
            break
        if t0 is None:
            t0 = time.perf_counter()
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        if ctx.mixup is not None:
            x, y = ctx.mixup(x, y)
        last_micro = (i + 1) % steps_per_update == 0
        torch.compiler.cudagraph_mark_step_begin()  # under model.compile=reduce-overhead: a new step's graphs
        ddp = isinstance(model, DistributedDataParallel)
        sync = model.no_sync() if ddp and not last_micro else contextlib.nullcontext()
        with sync:
            with autocast(dev, ctx.amp_dtype):
                logits = model(x)
                loss = ctx.loss_fn(logits, y) if ctx.distill is None else ctx.distill.loss(logits, x, y, ctx.loss_fn)
            scaled = loss / steps_per_update
            (ctx.scaler.scale(scaled) if ctx.scaler is not None else scaled).backward()
        update_loss += loss.detach().double() * x.shape[0]
        seen += x.shape[0]
        update_seen += x.shape[0]
        if not last_micro:
            continue
        if skip_nonfinite(ctx, update_loss, epoch, num_updates + 1):
            seen -= update_seen  # the skipped update counts in neither the loss nor the sample count
            ctx.optimizer.zero_grad(set_to_none=True)
            update_loss.zero_()
            update_seen = 0
            continue
        loss_sum += update_loss
        if ctx.clip_grad is not None:
            if ctx.scaler is not None:
                ctx.scaler.unscale_(ctx.optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), ctx.clip_grad)
        if ctx.scaler is not None:
            ctx.scaler.step(ctx.optimizer)
            ctx.scaler.update()
        else:
            ctx.optimizer.step()
        ctx.optimizer.zero_grad(set_to_none=True)
        num_updates += 1
        if ctx.ema is not None:
            ctx.ema.update(ctx.raw_model, step=num_updates)
        if ctx.scheduler is not None:
            ctx.scheduler.step_update(num_updates=num_updates)
        if num_updates % ctx.log_interval == 0 or i + 1 == n_batches:
            total, count = ctx.dist.all_reduce_sum([update_loss.item(), update_seen])
            lr = ctx.optimizer.param_groups[0]["lr"]
            if not math.isfinite(total):
                raise diverged(total / count, epoch, num_updates, lr)
            rate = seen * ctx.dist.world_size / max(time.perf_counter() - t0, 1e-9)
            logged.append({"step": num_updates, "loss": total / count, "lr": lr})
            if progress is not None:
                progress.update_step(i + 1, n_batches, total / count, lr, rate)
        update_loss.zero_()
        update_seen = 0
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    now = time.perf_counter()
    total, count = ctx.dist.all_reduce_sum([loss_sum.item(), seen])
    if not math.isfinite(total):
        raise diverged(total / max(count, 1), epoch, num_updates, ctx.optimizer.param_groups[0]["lr"])
    rate = count / (now - t0) if t0 is not None and now > t0 else 0.0
    stats = {"epoch": epoch, "train_loss": total / max(count, 1), "lr": ctx.optimizer.param_groups[0]["lr"],
             "train_time_s": now - t_epoch, "img_per_s": rate, "steps": logged}
    return stats, num_updates


@torch.no_grad()
def evaluate(model: nn.Module, loader, dist: DistEnv, amp_dtype: torch.dtype | None,
             num_classes: int) -> dict:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over the whole split, summed across ranks."""
    model.eval()
    dev = dist.device
    k = min(5, num_classes)
    loss_sum = top1 = top5 = count = 0.0
    for x, y in loader:
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        torch.compiler.cudagraph_mark_step_begin()
        with autocast(dev, amp_dtype):
            logits = model(x)
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        pred = logits.topk(k, dim=1).indices
        hit = pred.eq(y[:, None])
        top1 += hit[:, 0].sum().item()
        top5 += hit.any(dim=1).sum().item()
        count += y.numel()
    loss_sum, top1, top5, count = dist.all_reduce_sum([loss_sum, top1, top5, count])
    count = max(count, 1)
    return {"loss": loss_sum / count, "top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count,
            "count": int(count)}
