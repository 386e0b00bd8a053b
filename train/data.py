"""Datasets and loaders for training: timm's ImageFolder dataset and transforms, one global sample order.

Every rank draws from the same seeded permutation (a ``DistributedSampler`` even on one process),
so N ranks with batch B see exactly the samples one process with batch N*B sees.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from timm.data import Mixup, create_dataset, create_transform
from torch.utils.data import DataLoader, DistributedSampler, Subset

from .distributed import DistEnv
from ..datasets.shapes import write_shapes_imagefolder


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    sampler: DistributedSampler
    num_classes: int
    root: str
    mixup: Mixup | None


def dataset_root(data_cfg, dist: DistEnv) -> str:
    """Resolve the ImageFolder root, generating the shapes set on first use (atomic, race-free)."""
    if data_cfg.name == "imagefolder":
        return os.path.expanduser(data_cfg.root)
    cache = data_cfg.root or os.path.join(os.environ.get("METAZOO_CACHE", "~/.cache/metazoo"), "shapes")
    root = None
    if dist.is_main:
        root = write_shapes_imagefolder(cache, data_cfg.img_size, data_cfg.shapes_train_per_class,
                                        data_cfg.shapes_val_per_class, data_cfg.shapes_seed,
                                        processes=max(1, data_cfg.workers))
    dist.barrier()
    if root is None:  # other ranks: rank 0 has finished writing; this call only resolves the path
        root = write_shapes_imagefolder(cache, data_cfg.img_size, data_cfg.shapes_train_per_class,
                                        data_cfg.shapes_val_per_class, data_cfg.shapes_seed)
    return str(root)


def build_transforms(data_cfg, aug_cfg):
    """(train, eval) transforms from timm's factory, configured by the ``data`` and ``aug`` groups."""
    common = dict(input_size=data_cfg.img_size, interpolation=data_cfg.interpolation,
                  mean=tuple(data_cfg.mean), std=tuple(data_cfg.std))
    train = create_transform(
        is_training=True, scale=tuple(aug_cfg.scale), ratio=tuple(aug_cfg.ratio), hflip=aug_cfg.hflip,
        vflip=aug_cfg.vflip, color_jitter=aug_cfg.color_jitter or 0.0, auto_augment=aug_cfg.auto_augment,
        re_prob=aug_cfg.reprob, re_mode=aug_cfg.remode, re_count=aug_cfg.recount, **common)
    val = create_transform(is_training=False, crop_pct=data_cfg.crop_pct, **common)
    return train, val


def build_mixup(aug_cfg, num_classes: int) -> Mixup | None:
    """timm ``Mixup`` (mixup / cutmix with label smoothing) or None when both alphas are 0."""
    if aug_cfg.mixup <= 0 and aug_cfg.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=aug_cfg.mixup, cutmix_alpha=aug_cfg.cutmix, prob=aug_cfg.mixup_prob,
                 switch_prob=aug_cfg.mixup_switch_prob, mode=aug_cfg.mixup_mode,
                 label_smoothing=aug_cfg.smoothing, num_classes=num_classes)


def build_loaders(cfg, dist: DistEnv, seed: int) -> Loaders:
    """Train/val loaders; the train sampler is seeded with ``seed`` and reshuffled by ``set_epoch``."""
    root = dataset_root(cfg.data, dist)
    t_train, t_val = build_transforms(cfg.data, cfg.aug)
    train_set = create_dataset("", root=root, split=cfg.data.train_split, is_training=True, transform=t_train)
    val_set = create_dataset("", root=root, split=cfg.data.val_split, is_training=False, transform=t_val)
    num_classes = cfg.data.num_classes or len(train_set.reader.class_to_idx)
    if len(train_set) < cfg.data.batch_size * dist.world_size:
        raise ValueError(f"config key 'data.batch_size': {cfg.data.batch_size} x {dist.world_size} ranks "
                         f"exceeds the {len(train_set)} training images in {root}")
    sampler = DistributedSampler(train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                 seed=seed, drop_last=True)
    pin = cfg.data.pin_memory and dist.device.type == "cuda"
    train = DataLoader(train_set, batch_size=cfg.data.batch_size, sampler=sampler, drop_last=True,
                       num_workers=cfg.data.workers, pin_memory=pin, persistent_workers=False)
    val_shard = Subset(val_set, range(dist.rank, len(val_set), dist.world_size))  # no padding: exact counts
    val = DataLoader(val_shard, batch_size=cfg.data.val_batch_size or cfg.data.batch_size,
                     num_workers=cfg.data.workers, pin_memory=pin)
    return Loaders(train, val, sampler, num_classes, root, build_mixup(cfg.aug, num_classes))

