"""Checks run before any work starts (no data generated, no epoch spent): data folders and class maps,
image size against the model's stride, writable output folders. Each failure names the config key.

``check_config`` (in ``config``) covers the values alone; these checks look at the model, the file
system and the dataset.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from .config import config_error

WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin")
SHAPES_MIN_IMG_SIZE = 16  # the shapes generator needs room for a shape of radius 0.25-0.45 x side


@dataclass
class SplitFiles:
    """The image files of one split and their labels under the run's class map."""

    folder: str
    samples: list[tuple[str, int]]
    classes: list[str]


def model_stride(name: str, kwargs: dict) -> int:
    """Total stride of the model's last stage (built on the meta device: no memory, no init)."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(name.split(".")[0], **kwargs)
    info = getattr(model, "feature_info", None)
    return int(info[-1]["reduction"]) if info else 32


def check_img_size(cfg) -> None:
    """``data.img_size`` must cover the model's total stride (and the shapes set's minimum)."""
    from omegaconf import OmegaConf

    stride = model_stride(cfg.model.name, OmegaConf.to_container(cfg.model.kwargs, resolve=True))
    need = max(stride, SHAPES_MIN_IMG_SIZE if cfg.data.name == "shapes" else 1)
    if cfg.data.img_size < need:
        raise config_error("data.img_size", f"{cfg.data.img_size} is below {need}, the total stride of "
                                            f"{cfg.model.name}; accepted: >= {need}")


def probe_writable(path: str | os.PathLike, key: str) -> None:
    """Create ``path`` and write then remove a small file in it: a read-only or full folder fails now,
    not after the first epoch."""
    path = Path(path)
    probe = path / f".write-probe-{socket.gethostname()}-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"probe")
        probe.unlink()
    except OSError as err:
        raise config_error(key, f"folder {path} is not writable ({err.strerror or err})") from err


def scan_split(root: str, split: str, key: str, class_to_idx: dict[str, int] | None = None) -> SplitFiles:
    """The images of ``root/split`` (class = sub-folder name); the split folder must exist (no fallback to
    ``root``). With ``class_to_idx`` (the training split's map), a class outside the map is an error."""
    from timm.data.readers.reader_image_folder import find_images_and_targets

    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        present = sorted(p.name for p in Path(root).iterdir() if p.is_dir())
        raise config_error(key, f"no folder {split!r} in {root}; folders present: {', '.join(present) or '(none)'}")
    found, names = find_images_and_targets(folder)
    if not found:
        raise config_error(key, f"{folder} holds no images (expected one sub-folder of images per class)")
    if "" in names:
        raise config_error(key, f"{folder} holds images outside class folders; expected one sub-folder per class")
    if class_to_idx is None:
        return SplitFiles(folder, found, list(names))
    extra = sorted(set(names) - set(class_to_idx))
    if extra:
        raise config_error(key, f"{folder} has classes the training split lacks: {', '.join(extra[:10])}"
                                f"{' ...' if len(extra) > 10 else ''}; the class sets must agree")
    name_of = {i: c for c, i in names.items()}
    samples = [(f, class_to_idx[name_of[t]]) for f, t in found]  # relabelled with the training map
    return SplitFiles(folder, samples, sorted(names, key=class_to_idx.get))


def check_classes(train: SplitFiles, val: SplitFiles, num_classes: int | None, report: bool = True) -> int:
    """Number of classes the model predicts: at least 2, and no fewer than the training folders
    (``report``: print a note when validation lacks some classes)."""
    found = len(train.classes)
    if found < 2:
        raise config_error("data.root", f"{train.folder} has {found} class folder; training needs at least 2")
    if num_classes is not None and num_classes < found:
        raise config_error("data.num_classes", f"{num_classes} is fewer than the {found} class folders in "
                                               f"{train.folder}; accepted: null (counted) or >= {found}")
    missing = sorted(set(train.classes) - set(val.classes))
    if missing and report:
        print(f"[metazoo.train] note: {val.folder} has no images of {len(missing)} class(es) "
              f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}); labels follow the training "
              f"split's class map", flush=True)
    return num_classes or found


def check_added_keys(overrides: list[str], open_prefixes: tuple[str, ...]) -> None:
    """Refuse Hydra ``+key=value`` overrides that add a key outside the free-form sections (a typo of an
    existing key would otherwise be accepted and ignored); ``++`` (add-or-set) is treated the same."""
    for item in overrides:
        if item.startswith("+"):
            key = item.lstrip("+").split("=", 1)[0]
            if not key.startswith(open_prefixes):
                raise config_error(key, f"not a key of this config ({item!r} adds it); new keys are accepted only "
                                        f"under {', '.join(open_prefixes)}")


def check_dense_paths(cfg) -> None:
    """Dense apps: weight files given exist (``backbone.checkpoint`` may also be a pretrained tag of
    ``backbone.model_name``), and the work dir is writable, before any data or model is built."""
    from .config import check_model_name

    load_from, backbone_ckpt = cfg.get("load_from"), cfg.backbone.get("checkpoint")
    if load_from and not os.path.isfile(os.path.expanduser(str(load_from))):
        raise config_error("load_from", f"file not found: {load_from}")
    if backbone_ckpt and not os.path.isfile(os.path.expanduser(str(backbone_ckpt))):
        if os.sep in str(backbone_ckpt) or str(backbone_ckpt).endswith(WEIGHT_SUFFIXES):
            raise config_error("backbone.checkpoint", f"file not found: {backbone_ckpt}")
        check_model_name(f"{cfg.backbone.model_name}.{backbone_ckpt}", "backbone.checkpoint")
    probe_writable(cfg.work_dir, "work_dir")
