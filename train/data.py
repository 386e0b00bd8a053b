"""Datasets and loaders for training: timm's ImageFolder dataset and transforms, one global sample order.

Every rank draws from the same seeded permutation (a ``DistributedSampler`` even on one process),
so N ranks with batch B see exactly the samples one process with batch N*B sees.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np
from PIL import Image
from timm.data import Mixup, create_transform
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ..datasets.shapes import write_shapes_imagefolder
from .config import RunError, config_error
from .distributed import DistEnv
from .preflight import check_classes, scan_split

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    sampler: DistributedSampler
    num_classes: int
    root: str
    mixup: Mixup | None
    classes: list[str]  # class folder names in label order (saved with checkpoints for validation)


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB of any PIL mode: 16-bit (and 32-bit integer holding 16-bit) grey scaled by 1/257,
    float grey scaled from [0, 1] (or clipped when already 0-255); PIL's own conversion otherwise
    (its ``I;16`` -> RGB clips every value above 255 to white)."""
    if img.mode in _SIXTEEN_BIT or img.mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = a.max(initial=0.0)
        scale = 255.0 / 65535.0 if img.mode in _SIXTEEN_BIT or top > 255 else (255.0 if img.mode == "F" and top <= 1 else 1.0)
        img = Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


class ImageFiles(Dataset):
    """(image, label) from a scanned file list. An unreadable file is an error naming it, or, with
    ``skip_corrupt``, replaced by the next readable one and counted in a printed line."""

    def __init__(self, samples: list[tuple[str, int]], transform, skip_corrupt: bool = False):
        self.samples, self.transform, self.skip_corrupt = samples, transform, skip_corrupt
        self.skipped: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, path: str) -> Image.Image | None:
        try:
            with Image.open(path) as img:
                return to_rgb(img)
        except (OSError, ValueError, SyntaxError) as err:  # PIL's errors for truncated / non-image files
            if not self.skip_corrupt:
                raise RunError(f"cannot read image {path} ({err}); set config key 'data.skip_corrupt=true' "
                               f"to skip unreadable files") from err
            if path not in self.skipped:
                self.skipped.add(path)
                print(f"[metazoo.train] skipped unreadable image {path} ({err}); {len(self.skipped)} skipped "
                      f"so far in this process", file=sys.stderr, flush=True)
            return None

    def __getitem__(self, index: int):
        for i in range(len(self.samples)):
            path, label = self.samples[(index + i) % len(self.samples)]
            img = self._read(path)
            if img is not None:
                return (self.transform(img) if self.transform is not None else img), label
        raise RunError(f"no readable image among the {len(self.samples)} files of this split")


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
    train_files = scan_split(root, cfg.data.train_split, "data.train_split")
    class_to_idx = {c: i for i, c in enumerate(train_files.classes)}
    val_files = scan_split(root, cfg.data.val_split, "data.val_split", class_to_idx)  # one class map for both
    num_classes = check_classes(train_files, val_files, cfg.data.num_classes, dist.is_main)
    train_set = ImageFiles(train_files.samples, t_train, cfg.data.skip_corrupt)
    val_set = ImageFiles(val_files.samples, t_val, cfg.data.skip_corrupt)
    if len(train_set) < cfg.data.batch_size * dist.world_size:
        raise config_error("data.batch_size", f"{cfg.data.batch_size} x {dist.world_size} ranks "
                                            f"exceeds the {len(train_set)} training images in {root}")
    sampler = DistributedSampler(train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                 seed=seed, drop_last=True)
    pin = cfg.data.pin_memory and dist.device.type == "cuda"
    train = DataLoader(train_set, batch_size=cfg.data.batch_size, sampler=sampler, drop_last=True,
                       num_workers=cfg.data.workers, pin_memory=pin, persistent_workers=False)
    val_shard = Subset(val_set, range(dist.rank, len(val_set), dist.world_size))  # no padding: exact counts
    val = DataLoader(val_shard, batch_size=cfg.data.val_batch_size or cfg.data.batch_size,
                     num_workers=cfg.data.workers, pin_memory=pin)
    return Loaders(train, val, sampler, num_classes, root, build_mixup(cfg.aug, num_classes), train_files.classes)

