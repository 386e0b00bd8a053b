"""Typed schema of the training config (Hydra structured configs) and the value checks run before training.

The dataclasses give Hydra the types (a string where a float belongs fails at compose time); the
``check_config`` pass catches values that are well-typed but wrong, naming the offending key.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from .distill import DistillConfig, check_distill


@dataclass
class ModelConfig:
    name: str = MISSING  # any timm-registered model, e.g. mz_poolformerv2_s12
    pretrained: bool = False
    checkpoint: Optional[str] = None  # local weights file to start from (safetensors or weights-only .pth)
    drop_rate: Optional[float] = None  # head dropout; None: the recipe's per_model table, else 0
    drop_path_rate: Optional[float] = None  # None: the recipe's per_model table, else 0
    grad_checkpointing: bool = False
    compile: str = "auto"  # auto | off | default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs (see compile_mode)
    sync_bn: bool = True  # converted only when the model has BatchNorm and runs distributed on GPU
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments


@dataclass
class DataConfig:
    name: str = "shapes"  # shapes | imagefolder
    root: Optional[str] = None  # shapes: cache dir (default ~/.cache/metazoo); imagefolder: dataset root
    train_split: str = "train"
    val_split: str = "val"
    num_classes: Optional[int] = None  # None: counted from the training folder
    img_size: int = 224
    batch_size: int = 128  # per device
    val_batch_size: Optional[int] = None
    workers: int = 4
    pin_memory: bool = True
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    # shapes generator (ignored for imagefolder)
    shapes_train_per_class: int = 500
    shapes_val_per_class: int = 100
    shapes_seed: int = 0
    skip_corrupt: bool = False  # false: an unreadable image stops the run naming the file; true: skipped and counted


@dataclass
class OptimConfig:
    name: str = "adamw"  # any timm optimizer name (adamw, lamb, sgd, lion, ...)
    lr: float = 1e-3  # at global batch lr_base_batch; scaled linearly to the effective global batch
    lr_base_batch: int = 1024
    global_batch: Optional[int] = None  # target global batch: reached with gradient accumulation
    weight_decay: float = 0.05
    momentum: float = 0.9
    betas: Optional[List[float]] = None
    eps: Optional[float] = None
    clip_grad: Optional[float] = None
    layer_decay: Optional[float] = None
    fused: Optional[bool] = None  # true: torch's fused step (adam, adamw, sgd); null: the optimizer's default


@dataclass
class SchedConfig:
    name: str = "cosine"  # timm scheduler name (cosine, step, multistep, poly, constant, wsd, ...)
    warmup_epochs: float = 0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-6
    cooldown_epochs: int = 0
    step_on_epochs: bool = False  # False: lr updated every optimizer step


@dataclass
class AugConfig:
    scale: List[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: List[float] = field(default_factory=lambda: [0.75, 4.0 / 3.0])
    hflip: float = 0.5
    vflip: float = 0.0
    color_jitter: Optional[float] = None
    auto_augment: Optional[str] = None  # e.g. rand-m9-mstd0.5-inc1
    reprob: float = 0.0
    remode: str = "pixel"
    recount: int = 1
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    smoothing: float = 0.0
    bce_loss: bool = False


@dataclass
class EmaConfig:
    enabled: bool = False
    decay: float = 0.9999
    warmup: bool = False
    eval: bool = True  # also evaluate the EMA weights each epoch


@dataclass
class AmpConfig:
    dtype: str = "off"  # off | bf16 | fp16


@dataclass
class LoggerConfig:
    wandb: str = "offline"  # offline | online | disabled
    project: str = "metazoo"
    name: Optional[str] = None
    progress: bool = True
    log_interval: int = 10


@dataclass
class CkptConfig:
    dir: str = "checkpoints"  # relative paths are under the run dir
    interval: int = 1  # epochs between checkpoints
    keep_last: int = 3
    resume: Optional[str] = None  # None | auto | path to a checkpoint dir


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    amp: AmpConfig = field(default_factory=AmpConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    recipe: Optional[str] = None  # name of the published recipe applied (informational)
    per_model: Dict[str, Dict[str, float]] = field(default_factory=dict)  # recipe: name -> {drop_path_rate, drop_rate}
    epochs: int = 10
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: Optional[int] = None  # torch intra-op threads on CPU (None: torch default)
    deterministic: bool = True
    max_nonfinite_steps: int = 0  # optimizer steps with a non-finite loss skipped (AMP overflow) before the run stops


def register_configs() -> None:
    """Register the schema so that ``configs/train.yaml`` can name it in its defaults list."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


_CHOICES = {
    "data.name": ("shapes", "imagefolder"),
    "amp.dtype": ("off", "bf16", "fp16"),
    "logger.wandb": ("offline", "online", "disabled"),
    "device": ("auto", "cpu", "cuda"),
    "aug.mixup_mode": ("batch", "pair", "elem"),
    "data.interpolation": ("bilinear", "bicubic", "nearest", "random"),
}


COMPILE_MODES = ("auto", "off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_COMPILE_ALIASES = {"false": "off", "true": "default"}  # model.compile=true/false, as before it took a mode


def compile_mode(value: Any, device_type: str) -> Optional[str]:
    """``torch.compile`` mode for config key ``model.compile`` on ``device_type`` (None: eager). ``auto`` is
    CUDA graphs over the compiled step (``reduce-overhead``) on CUDA, the fastest training mode measured
    (bench/NOTES.md: poolformer_s12 8362 img/s vs 3311 compiled default and 3000 eager, H100), and eager on
    CPU, where inductor's compile time outweighs short runs."""
    mode = _COMPILE_ALIASES.get(str(value).strip().lower(), str(value).strip().lower())
    if mode not in COMPILE_MODES:
        raise config_error("model.compile", f"got {value!r}, accepted values: {', '.join(COMPILE_MODES)} (or true/false)")
    if mode == "auto":
        mode = "reduce-overhead" if device_type == "cuda" else "off"
    return None if mode == "off" else mode


SCHEDULERS = ("cosine", "tanh", "step", "multistep", "poly", "wsd", "rsqrt", "constant")
FUSED_OPTIMIZERS = ("adam", "adamw", "sgd")  # timm names that build torch optimizers with a fused step


def _optimizers() -> list[str]:
    from timm.optim import list_optimizers

    return list_optimizers()


class RunError(ValueError):
    """A problem with the run's inputs or saved state that the user can fix: one line, exit status 2."""


def config_error(key: str, msg: str) -> RunError:
    """The error for a bad value: names the config key (and, by convention, the accepted values)."""
    return RunError(f"config key '{key}': {msg}")


SHAPES_SPLITS = ("train", "val")


def _floats(cfg: Any, prefix: str = ""):
    """(dotted key, value) of every float in the config, lists included (NaN/inf pass ``> 0`` checks)."""
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if hasattr(value, "items"):
            yield from _floats(value, f"{name}.")
        elif isinstance(value, float):
            yield name, value
        elif hasattr(value, "__iter__") and not isinstance(value, str):
            yield from ((f"{name}[{i}]", v) for i, v in enumerate(value) if isinstance(v, float))


def unknown_keys(cfg: Any, schema: type = TrainConfig, prefix: str = "") -> list[str]:
    """Dotted keys of ``cfg`` the schema does not declare (Hydra's ``+key=value`` adds them unchecked);
    free-form ``Dict`` fields (``model.kwargs``, ``per_model``) are not descended into."""
    out = []
    declared = {f.name: f for f in fields(schema)}
    for key in cfg:
        f = declared.get(key)
        if f is None:
            out.append(f"{prefix}{key}")
        elif callable(f.default_factory) and is_dataclass(sub := f.default_factory()):
            out += unknown_keys(cfg[key], type(sub), f"{prefix}{key}.")
    return out


def check_model_name(name: str, key: str = "model.name") -> None:
    """Unknown model or pretrained tag (``mz_caformer_s18.nosuch``): a ``ValueError`` naming ``key``."""
    import timm
    from timm.models import get_arch_pretrained_cfgs

    import metazoo  # noqa: F401  (registers the mz_* models)

    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[-1]}*")[:8]
        raise config_error(key, f"unknown model {name!r}; registered names look like {close or 'mz_poolformerv2_s12'}")
    tags = sorted(k.split(".", 1)[1] for k in get_arch_pretrained_cfgs(arch))
    if tag and tag not in tags:
        raise config_error(key, f"unknown pretrained tag {tag!r} for {arch}; accepted tags: {', '.join(tags) or '(none)'}")


def check_config(cfg: Any) -> None:
    """Raise ``ValueError`` naming the key for any value that would fail later; cheap, runs before training."""
    extra = unknown_keys(cfg)
    if extra:
        raise config_error(extra[0], f"not a key of the training config (unknown: {', '.join(extra)}); "
                             f"see metazoo.train.config.TrainConfig for the accepted keys")
    for key, accepted in _CHOICES.items():
        value = cfg
        for part in key.split("."):
            value = value[part]
        if value not in accepted:
            raise config_error(key, f"got {value!r}, accepted values: {', '.join(accepted)}")
    check_model_name(cfg.model.name)
    compile_mode(cfg.model.compile, "cpu")
    if cfg.model.checkpoint is not None and not os.path.isfile(os.path.expanduser(cfg.model.checkpoint)):
        raise config_error("model.checkpoint", f"file not found: {cfg.model.checkpoint}")
    if cfg.data.name == "imagefolder":
        if cfg.data.root is None:
            raise config_error("data.root", "must be set to an ImageFolder root (with train/ and val/ folders) for data=imagefolder")
        if not os.path.isdir(os.path.expanduser(cfg.data.root)):
            raise config_error("data.root", f"directory not found: {cfg.data.root}")
    else:
        for key in ("train_split", "val_split"):
            if cfg.data[key] not in SHAPES_SPLITS:
                raise config_error(f"data.{key}", f"got {cfg.data[key]!r}; the shapes set has the splits "
                                          f"{', '.join(SHAPES_SPLITS)}")
    for key, value in _floats(cfg):
        if not math.isfinite(value):
            raise config_error(key, f"must be a finite number, got {value}")
    positive = {
        "optim.lr": cfg.optim.lr, "optim.lr_base_batch": cfg.optim.lr_base_batch,
        "data.batch_size": cfg.data.batch_size, "data.img_size": cfg.data.img_size,
        "epochs": cfg.epochs, "ckpt.interval": cfg.ckpt.interval, "ckpt.keep_last": cfg.ckpt.keep_last,
        "logger.log_interval": cfg.logger.log_interval, "data.crop_pct": cfg.data.crop_pct,
    }
    if cfg.max_nonfinite_steps < 0:
        raise config_error("max_nonfinite_steps", f"must be >= 0, got {cfg.max_nonfinite_steps}")
    for key, value in positive.items():
        if not value > 0:
            raise config_error(key, f"must be > 0, got {value}")
    non_negative = {
        "optim.weight_decay": cfg.optim.weight_decay, "sched.warmup_epochs": cfg.sched.warmup_epochs,
        "sched.min_lr": cfg.sched.min_lr, "sched.warmup_lr": cfg.sched.warmup_lr,
        "data.workers": cfg.data.workers, "aug.mixup": cfg.aug.mixup, "aug.cutmix": cfg.aug.cutmix,
        "sched.cooldown_epochs": cfg.sched.cooldown_epochs,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise config_error(key, f"must be >= 0, got {value}")
    unit = {"aug.hflip": cfg.aug.hflip, "aug.vflip": cfg.aug.vflip, "aug.reprob": cfg.aug.reprob,
            "aug.smoothing": cfg.aug.smoothing, "aug.mixup_prob": cfg.aug.mixup_prob, "ema.decay": cfg.ema.decay}
    for key in ("drop_rate", "drop_path_rate"):
        if cfg.model[key] is not None:
            unit[f"model.{key}"] = cfg.model[key]
    for key, value in unit.items():
        if not 0.0 <= value <= 1.0:
            raise config_error(key, f"must be in [0, 1], got {value}")
    if cfg.optim.global_batch is not None and cfg.optim.global_batch <= 0:
        raise config_error("optim.global_batch", f"must be > 0 or null, got {cfg.optim.global_batch}")
    if cfg.data.num_classes is not None and cfg.data.num_classes <= 0:
        raise config_error("data.num_classes", f"must be > 0 or null, got {cfg.data.num_classes}")
    if cfg.ckpt.resume not in (None, "auto") and not os.path.isdir(os.path.expanduser(cfg.ckpt.resume)):
        raise config_error("ckpt.resume", f"expected null, 'auto' or a checkpoint directory, got {cfg.ckpt.resume!r}")
    if cfg.per_model and cfg.model.drop_path_rate is None and cfg.model.name not in cfg.per_model:
        raise config_error("model.drop_path_rate", f"recipe {cfg.recipe!r} has no drop path for {cfg.model.name!r} "
                   f"(it covers {', '.join(cfg.per_model)}); set model.drop_path_rate")
    for name, entry in cfg.per_model.items():
        unknown = set(entry) - {"drop_rate", "drop_path_rate"}
        if unknown:
            raise config_error(f"per_model.{name}", f"unknown keys {sorted(unknown)}; accepted: drop_rate, drop_path_rate")
    if cfg.optim.name not in _optimizers():
        raise config_error("optim.name", f"unknown optimizer {cfg.optim.name!r}; timm offers e.g. adamw, lamb, sgd, lion")
    if cfg.optim.fused is not None and cfg.optim.name not in FUSED_OPTIMIZERS:
        raise config_error("optim.fused", f"optimizer {cfg.optim.name!r} has no fused step; set it only with "
                                  f"{', '.join(FUSED_OPTIMIZERS)}, or leave it null")
    if cfg.sched.name not in SCHEDULERS:
        raise config_error("sched.name", f"got {cfg.sched.name!r}, accepted values: {', '.join(SCHEDULERS)}")
    if (cfg.aug.mixup > 0 or cfg.aug.cutmix > 0) and cfg.data.batch_size % 2:
        raise config_error("data.batch_size", f"mixup/cutmix need an even per-device batch, got {cfg.data.batch_size}")
    if len(cfg.aug.scale) != 2 or len(cfg.aug.ratio) != 2:
        raise config_error("aug.scale" if len(cfg.aug.scale) != 2 else "aug.ratio", "must be a [low, high] pair")
    if len(cfg.data.mean) != 3 or len(cfg.data.std) != 3:
        raise config_error("data.mean" if len(cfg.data.mean) != 3 else "data.std", "must hold 3 values")
    check_distill(cfg.distill)
