"""The ``python -m metazoo.train`` Hydra app: builds everything from the config and runs the epochs."""
from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from .checkpoint import load_latest_intact, load_training_state, remove_interrupted, rng_state, save_checkpoint, set_rng_state
from .config import RunError, check_config, compile_mode, config_error, register_configs
from .data import build_loaders
from .distill import Distiller
from .distributed import DistEnv, init_distributed, shutdown_distributed
from .engine import StepContext, evaluate, train_one_epoch
from .preflight import check_img_size, probe_writable
from .reporting import Progress, Reporter
from .resume import check_resume
from .runlock import RunLock

_AMP = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed for one (epoch, rank): every epoch's randomness is a function of it, so resume replays it."""
    return (seed * 1_000_003 + epoch * 1_009 + rank) % 2**63


def batch_plan(cfg, world_size: int) -> tuple[int, int, float]:
    """(gradient accumulation steps, effective global batch, lr scaled linearly to that batch)."""
    per_step = cfg.data.batch_size * world_size
    accum = 1 if cfg.optim.global_batch is None else max(1, round(cfg.optim.global_batch / per_step))
    global_batch = per_step * accum
    return accum, global_batch, cfg.optim.lr * global_batch / cfg.optim.lr_base_batch


def build_model(cfg, num_classes: int, dist: DistEnv) -> torch.nn.Module:
    """timm model by name (mz_* are registered on ``import metazoo``), optionally from local weights."""
    import timm

    import metazoo  # noqa: F401
    from metazoo.backbones._common import create_with_weights

    table = cfg.per_model.get(cfg.model.name, {})
    drop_path = cfg.model.drop_path_rate if cfg.model.drop_path_rate is not None else table.get("drop_path_rate", 0.0)
    drop_rate = cfg.model.drop_rate if cfg.model.drop_rate is not None else table.get("drop_rate", 0.0)
    kwargs = dict(OmegaConf.to_container(cfg.model.kwargs, resolve=True), num_classes=num_classes,
                  drop_rate=drop_rate, drop_path_rate=drop_path)
    if cfg.model.checkpoint is None:
        model = timm.create_model(cfg.model.name, pretrained=cfg.model.pretrained, **kwargs)
    else:  # strict: only a classifier head trained for other classes may differ
        try:
            model = create_with_weights(cfg.model.name, os.path.expanduser(cfg.model.checkpoint), **kwargs)
        except ValueError as err:
            raise config_error("model.checkpoint", str(err)) from err
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(dist.device)
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if cfg.model.sync_bn and has_bn and dist.distributed and dist.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def build_loss(cfg, mixup) -> torch.nn.Module:
    """timm's soft-target losses: mixup/cutmix targets, label smoothing, or BCE."""
    from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if cfg.aug.bce_loss:
        return BinaryCrossEntropy(smoothing=0.0 if mixup is not None else cfg.aug.smoothing)
    if mixup is not None:
        return SoftTargetCrossEntropy()
    if cfg.aug.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.aug.smoothing)
    return torch.nn.CrossEntropyLoss()


def _run_dir(dist: DistEnv) -> Path:
    """Rank 0's Hydra output dir, shared with every rank (their own timestamps may differ)."""
    from hydra.core.hydra_config import HydraConfig

    path = [HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else os.getcwd()]
    if dist.distributed:
        torch.distributed.broadcast_object_list(path, src=0)
    return Path(path[0])


def train(cfg: DictConfig) -> dict:
    """Validate the config, then train and evaluate; returns the final summary (also in metrics.json)."""
    check_config(cfg)
    check_img_size(cfg)  # builds the model on the meta device: before any data is generated
    dist = init_distributed(cfg.device)
    lock = None
    try:
        run_dir = _run_dir(dist)
        if dist.is_main:
            probe_writable(run_dir, "hydra.run.dir")
            probe_writable(_ckpt_dir(cfg, run_dir), "ckpt.dir")
            lock = RunLock(run_dir)
            lock.acquire()
        return _train(cfg, dist, run_dir)
    finally:
        if lock is not None:
            lock.release()
        shutdown_distributed()


def _ckpt_dir(cfg: DictConfig, run_dir: Path) -> Path:
    return Path(cfg.ckpt.dir) if os.path.isabs(cfg.ckpt.dir) else run_dir / cfg.ckpt.dir


def build_optimizer(cfg: DictConfig, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """timm optimizer from the ``optim`` group; betas, eps and fused are passed only when set."""
    from timm.optim import create_optimizer_v2

    opt_kwargs = {k: v for k, v in (("betas", cfg.optim.betas), ("eps", cfg.optim.eps), ("fused", cfg.optim.fused))
                  if v is not None}
    if "betas" in opt_kwargs:
        opt_kwargs["betas"] = tuple(opt_kwargs["betas"])
    return create_optimizer_v2(model, opt=cfg.optim.name, lr=lr, weight_decay=cfg.optim.weight_decay,
                               momentum=cfg.optim.momentum, layer_decay=cfg.optim.layer_decay, **opt_kwargs)


def _find_resume(cfg: DictConfig, ckpt_dir: Path, dist: DistEnv) -> tuple[str | None, tuple | None]:
    """(checkpoint folder, its loaded content) to resume from: the newest intact one for ``auto``
    (rank 0 decides; unreadable newer ones are reported and passed over), else the given folder."""
    if cfg.ckpt.resume is None:
        return None, None
    if cfg.ckpt.resume != "auto":
        path = os.path.expanduser(cfg.ckpt.resume)
    else:
        found = None
        if dist.is_main:
            remove_interrupted(ckpt_dir)
            found = load_latest_intact(ckpt_dir)
        chosen = [str(found[0]) if found else ""]
        if dist.distributed:
            torch.distributed.broadcast_object_list(chosen, src=0)
        if found is not None:
            return chosen[0], found[1]
        if not chosen[0]:
            return None, None
        path = chosen[0]
    try:
        return path, load_training_state(path)
    except ValueError as err:
        raise config_error("ckpt.resume", str(err)) from err


def _restore(cfg_dict: dict, path: str, loaded: tuple, global_batch: int, model, optimizer, scheduler, scaler,
             ema, is_main: bool) -> tuple[int, int, list]:
    """Load a checkpoint into the run's objects under the new config: changes the saved state can follow
    (lr, epochs, schedule, ...) are applied and printed; the others are refused by ``check_resume``."""
    weights, ema_weights, state = loaded
    changes = check_resume(path, state.get("config", cfg_dict), cfg_dict, state.get("global_batch"), global_batch)
    model.load_state_dict(weights)
    new_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])  # moments; hyper-parameters come back from the new config
    if changes:
        for group, hyper in zip(optimizer.param_groups, new_groups):
            group.update(hyper)
    start_epoch, num_updates = state["epoch"] + 1, state["num_updates"]
    if scheduler is not None:
        if changes or state.get("scheduler") is None:  # the new schedule, at the saved position
            scheduler.step(start_epoch)
            scheduler.step_update(num_updates=num_updates)
        else:
            scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    if ema is not None:
        ema.module.load_state_dict(ema_weights if ema_weights is not None else weights)
    set_rng_state(state["rng"])
    if is_main:
        print(f"[metazoo.train] resuming from {path}" + (f"; config changes applied: {'; '.join(changes)}"
                                                         if changes else ""), flush=True)
    return start_epoch, num_updates, state["history"]


def _nonfinite_weights(state_dict: dict) -> list[str]:
    return [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]


def _train(cfg: DictConfig, dist: DistEnv, run_dir: Path) -> dict:
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    ckpt_dir = _ckpt_dir(cfg, run_dir)
    cfg_dict = OmegaConf.to_container(cfg, resolve=True)

    seed_all(cfg.seed)  # identical initial weights on every rank
    loaders = build_loaders(cfg, dist, cfg.seed)
    model = build_model(cfg, loaders.num_classes, dist)
    distiller = Distiller(cfg.distill, model, loaders.num_classes, dist.device) if cfg.distill.enabled else None
    accum, global_batch, lr = batch_plan(cfg, dist.world_size)
    optimizer = build_optimizer(cfg, model, lr)
    updates_per_epoch = len(loaders.train) // accum
    if updates_per_epoch < 1:
        raise config_error("optim.global_batch", f"{global_batch} is larger than one epoch of data")
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=cfg.sched.name, num_epochs=cfg.epochs, warmup_epochs=cfg.sched.warmup_epochs,
        warmup_lr=cfg.sched.warmup_lr, min_lr=cfg.sched.min_lr, cooldown_epochs=cfg.sched.cooldown_epochs,
        step_on_epochs=cfg.sched.step_on_epochs, updates_per_epoch=updates_per_epoch)
    ema = ModelEmaV3(model, decay=cfg.ema.decay, use_warmup=cfg.ema.warmup) if cfg.ema.enabled else None
    amp_dtype = _AMP[cfg.amp.dtype]
    scaler = torch.amp.GradScaler(dist.device.type) if amp_dtype is torch.float16 else None

    start_epoch, num_updates, history = 0, 0, []
    resume_from, loaded = _find_resume(cfg, ckpt_dir, dist)
    if resume_from is not None:
        start_epoch, num_updates, history = _restore(cfg_dict, resume_from, loaded, global_batch, model, optimizer,
                                                     scheduler, scaler, ema, dist.is_main)

    raw_model = model
    mode = compile_mode(cfg.model.compile, dist.device.type)
    if mode is not None:
        model = torch.compile(model, mode=None if mode == "default" else mode)
    if dist.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)

    reporter = Reporter(cfg_dict, run_dir, dist.is_main, cfg.logger.wandb, cfg.logger.project,
                        cfg.logger.name, history)
    progress = Progress(cfg.logger.progress, dist.is_main)
    ctx = StepContext(raw_model, optimizer, scheduler, build_loss(cfg, loaders.mixup), accum, amp_dtype, scaler,
                      cfg.optim.clip_grad, ema, loaders.mixup, dist, cfg.logger.log_interval,
                      distiller, cfg.max_nonfinite_steps)
    if dist.is_main:
        n_params = sum(p.numel() for p in raw_model.parameters()) / 1e6
        print(f"[metazoo.train] {cfg.model.name} ({n_params:.2f}M params, {loaders.num_classes} classes) on "
              f"{dist.world_size} x {dist.device.type}; data {loaders.root}; global batch {global_batch} "
              f"({cfg.data.batch_size} x {dist.world_size} ranks x {accum} accum), lr {lr:.3g}; "
              f"epochs {start_epoch}->{num_epochs}; compile {mode or 'off'}; run dir {run_dir}", flush=True)
    t_start = time.perf_counter()
    for epoch in range(start_epoch, num_epochs):
        seed_all(epoch_seed(cfg.seed, epoch, dist.rank))
        loaders.sampler.set_epoch(epoch)
        progress.start_epoch(epoch, num_epochs, len(loaders.train) - len(loaders.train) % accum)
        stats, num_updates = train_one_epoch(model, loaders.train, ctx, epoch, num_updates, progress)
        if scheduler is not None:
            scheduler.step(epoch + 1)
        val = evaluate(model, loaders.val, dist, amp_dtype, loaders.num_classes)
        record = dict(stats, num_updates=num_updates, val_loss=val["loss"], val_top1=val["top1"],
                      val_top5=val["top5"], ema_top1=None)
        if distiller is not None:
            record.update(distiller.epoch_stats(dist))
        if ema is not None and cfg.ema.eval:
            record["ema_top1"] = evaluate(ema.module, loaders.val, dist, amp_dtype, loaders.num_classes)["top1"]
        reporter.log_epoch(record)
        progress.end_epoch(f"epoch {epoch + 1}/{num_epochs}: train loss {stats['train_loss']:.4f}, "
                           f"val top-1 {val['top1']:.2f}%, {stats['img_per_s']:.1f} img/s")
        if dist.is_main and ((epoch + 1) % cfg.ckpt.interval == 0 or epoch + 1 == num_epochs):
            weights = raw_model.state_dict()
            bad = _nonfinite_weights(weights)
            if bad:
                raise RunError(f"training diverged: non-finite weights after epoch {epoch + 1} ({', '.join(bad[:5])}"
                               f"{' ...' if len(bad) > 5 else ''}); no checkpoint written. Lower config key 'optim.lr'")
            state = {"epoch": epoch, "num_updates": num_updates, "history": reporter.history,
                     "global_batch": global_batch,
                     "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict() if scheduler is not None else None,
                     "scaler": scaler.state_dict() if scaler is not None else None,
                     "rng": rng_state(), "config": cfg_dict}
            meta = {"model": cfg.model.name, "num_classes": loaders.num_classes, "classes": loaders.classes, "model_kwargs": cfg_dict["model"]["kwargs"],
                    "data_config": {"input_size": [3, cfg.data.img_size, cfg.data.img_size],
                                    "interpolation": cfg.data.interpolation, "mean": list(cfg.data.mean),
                                    "std": list(cfg.data.std), "crop_pct": cfg.data.crop_pct}}
            save_checkpoint(ckpt_dir, epoch, weights, state, meta,
                            ema.module.state_dict() if ema is not None else None, cfg.ckpt.keep_last)
        dist.barrier()
    summary = reporter.finish()
    summary["wall_time_s"] = time.perf_counter() - t_start
    if dist.is_main:
        print(f"[metazoo.train] done: {summary['epochs']} epochs, final top-1 {summary['final_top1']:.2f}% "
              f"(best {summary['best_top1']:.2f}% at epoch {summary['best_epoch'] + 1}), top-5 "
              f"{summary['final_top5']:.2f}%, {summary['train_time_s']:.0f}s training, "
              f"{summary['mean_img_per_s']:.1f} img/s; metrics {run_dir / 'metrics.json'}, "
              f"checkpoints {ckpt_dir}", flush=True)
    return summary


register_configs()


@hydra.main(version_base="1.3", config_path="pkg://metazoo.configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry: returns the final top-1 so sweepers can optimise it."""
    try:
        return train(cfg)["final_top1"]
    except RunError as err:  # config, data, checkpoint, divergence: one clear line, no traceback
        text = str(err).strip()
        if "Original Traceback" in text:  # re-raised from a DataLoader worker: its own message is the last line
            text = text.splitlines()[-1].split(": ", 1)[-1]
        print(f"error: {text}", file=sys.stderr)
        sys.exit(2)
