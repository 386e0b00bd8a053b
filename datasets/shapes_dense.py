"""Dense-task versions of the embedded shapes set: a COCO instance set and an ADE20K-layout
semantic set, drawn with the same primitives as the classification set (``train/shapes.py``).

Both writers are deterministic (image ``i`` of a split depends only on seed, split and ``i``) and
publish their folder atomically, so concurrent runs share one cached copy.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from metazoo.datasets.shapes import (SHAPE_CLASSES, SPLITS, draw_shape, publish_dir, random_background,
                                  random_shape)

FORMAT_VERSION = 1
COCO_SPLIT_DIRS = {"train": "train2017", "val": "val2017"}  # the real COCO tree's names
ADE_SPLIT_DIRS = {"train": "training", "val": "validation"}  # the real ADEChallengeData2016 names
# ADE convention: label 0 is "unlabeled" and is dropped by reduce_zero_label; 1 is background.
ADE_CLASSES = ("background",) + SHAPE_CLASSES


def _scene(rng: np.random.Generator, height: int, width: int, max_instances: int):
    """Draw 1..max_instances non-overlapping shapes on clutter: image and [(class, mask)]."""
    canvas = random_background(rng, height, width)
    specs = []
    for _ in range(int(rng.integers(1, max_instances + 1))):
        for _attempt in range(20):
            spec = random_shape(rng, height, width, radius_range=(0.14, 0.3), background=canvas)
            if all(np.hypot(spec.center[0] - o.center[0], spec.center[1] - o.center[1])
                   > 1.05 * (spec.radius + o.radius) for o in specs):
                specs.append(spec)
                break
    return canvas, [(SHAPE_CLASSES.index(s.kind), draw_shape(canvas, s)) for s in specs]


def _check_args(image_size, train_images, val_images, max_instances) -> tuple[int, int]:
    """Validate the writer arguments; return (height, width)."""
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    if len(image_size) != 2 or min(image_size) < 32:
        raise ValueError(f"image_size must be an int or (height, width) with sides >= 32, got {image_size}")
    for name, value in (("train_images", train_images), ("val_images", val_images),
                        ("max_instances", max_instances)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    return int(image_size[0]), int(image_size[1])


def write_shapes_coco(cache_dir: str | os.PathLike, image_size=(128, 160), train_images: int = 800,
                      val_images: int = 100, max_instances: int = 3, seed: int = 0) -> Path:
    """Generate (once) a COCO instance set: ``{train2017,val2017}/*.png`` plus
    ``annotations/instances_{train2017,val2017}.json`` with boxes and RLE masks.

    ``image_size`` is (height, width); the default is not square, like detection images.
    """
    from pycocotools import mask as mask_utils

    h, w = _check_args(image_size, train_images, val_images, max_instances)
    name = f"shapes_coco-v{FORMAT_VERSION}-{h}x{w}-{train_images}x{val_images}-i{max_instances}-seed{seed}"

    def build(tmp: Path) -> None:
        (tmp / "annotations").mkdir()
        counts = {"train": train_images, "val": val_images}
        for s_idx, split in enumerate(SPLITS):
            folder = COCO_SPLIT_DIRS[split]
            (tmp / folder).mkdir()
            images, annotations = [], []
            for i in range(counts[split]):
                rng = np.random.default_rng([seed, 100 + s_idx, i])
                canvas, instances = _scene(rng, h, w, max_instances)
                file_name = f"{i:06d}.png"
                Image.fromarray(canvas).save(tmp / folder / file_name)
                images.append({"id": i + 1, "file_name": file_name, "height": h, "width": w})
                for cls, mask in instances:
                    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                    x, y, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
                    annotations.append({
                        "id": len(annotations) + 1, "image_id": i + 1, "category_id": cls + 1,
                        "bbox": [x, y, bw, bh], "area": float(mask_utils.area(rle)), "iscrowd": 0,
                        "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")}})
            coco = {"images": images, "annotations": annotations,
                    "categories": [{"id": k + 1, "name": c, "supercategory": "shape"}
                                   for k, c in enumerate(SHAPE_CLASSES)]}
            (tmp / "annotations" / f"instances_{folder}.json").write_text(json.dumps(coco))

    return publish_dir(Path(cache_dir).expanduser() / name, build)


def write_shapes_ade(cache_dir: str | os.PathLike, image_size=(128, 128), train_images: int = 800,
                     val_images: int = 100, max_instances: int = 3, seed: int = 0) -> Path:
    """Generate (once) an ADE20K-layout semantic set: ``images/{training,validation}/*.jpg`` and
    ``annotations/{training,validation}/*.png`` label maps (1 = background, 2.. = shape classes,
    0 unused, as ADE's "other" label which ``reduce_zero_label`` drops).
    """
    h, w = _check_args(image_size, train_images, val_images, max_instances)
    name = f"shapes_ade-v{FORMAT_VERSION}-{h}x{w}-{train_images}x{val_images}-i{max_instances}-seed{seed}"

    def build(tmp: Path) -> None:
        counts = {"train": train_images, "val": val_images}
        for s_idx, split in enumerate(SPLITS):
            img_dir = tmp / "images" / ADE_SPLIT_DIRS[split]
            ann_dir = tmp / "annotations" / ADE_SPLIT_DIRS[split]
            img_dir.mkdir(parents=True)
            ann_dir.mkdir(parents=True)
            for i in range(counts[split]):
                rng = np.random.default_rng([seed, 200 + s_idx, i])
                canvas, instances = _scene(rng, h, w, max_instances)
                label = np.ones((h, w), np.uint8)
                for cls, mask in instances:
                    label[mask] = cls + 2
                Image.fromarray(canvas).save(img_dir / f"{i:06d}.jpg", quality=95)
                Image.fromarray(label).save(ann_dir / f"{i:06d}.png")

    return publish_dir(Path(cache_dir).expanduser() / name, build)
