"""Procedural, deterministic "shapes" images: the embedded default dataset of the training app.

The drawing primitives (``random_background``, ``random_shape``, ``draw_shape``) are public so that
dense-task generators (COCO instances, ADE-style label maps) draw exactly the same shapes; the
classification set is written to disk as a standard ImageFolder so the real loader path runs.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

# Sorted, so that the position in this tuple is the ImageFolder class index.
SHAPE_CLASSES = ("circle", "cross", "ring", "square", "star", "triangle")
SPLITS = ("train", "val")
FORMAT_VERSION = 2
_SUPERSAMPLE = 4  # masks are rasterised at 4x and thresholded, for clean edges at small sizes


@dataclass(frozen=True)
class ShapeSpec:
    """One shape instance: class, centre (x, y) and radius in pixels, rotation, RGB colour."""

    kind: str
    center: tuple[float, float]
    radius: float
    angle: float
    color: tuple[int, int, int]


def _polygon(kind: str, radius: float, angle: float) -> list[tuple[float, float]]:
    """Vertices (unit-centred, pixels) of the polygonal shape classes."""
    if kind == "square":
        radii, count = [radius], 4
    elif kind == "triangle":
        radii, count = [radius], 3
    elif kind == "star":
        radii, count = [radius, 0.42 * radius], 10
    elif kind == "cross":
        w = 0.34 * radius  # arm half-width
        pts = [(w, radius), (w, w), (radius, w), (radius, -w), (w, -w), (w, -radius),
               (-w, -radius), (-w, -w), (-radius, -w), (-radius, w), (-w, w), (-w, radius)]
        a = math.radians(angle)
        return [(x * math.cos(a) - y * math.sin(a), x * math.sin(a) + y * math.cos(a)) for x, y in pts]
    else:
        raise ValueError(f"kind must be one of {SHAPE_CLASSES}, got {kind!r}")
    out = []
    for k in range(count):
        t = math.radians(angle) + 2 * math.pi * k / count - math.pi / 2
        r = radii[k % len(radii)]
        out.append((r * math.cos(t), r * math.sin(t)))
    return out


def shape_mask(spec: ShapeSpec, height: int, width: int) -> np.ndarray:
    """Boolean (height, width) mask of the pixels covered by ``spec``."""
    if spec.kind not in SHAPE_CLASSES:
        raise ValueError(f"kind must be one of {SHAPE_CLASSES}, got {spec.kind!r}")
    s = _SUPERSAMPLE
    img = Image.new("L", (width * s, height * s), 0)
    draw = ImageDraw.Draw(img)
    cx, cy = (spec.center[0] + 0.5) * s, (spec.center[1] + 0.5) * s
    r = spec.radius * s
    if spec.kind in ("circle", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if spec.kind == "ring":
            ri = 0.55 * r
            draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    else:
        draw.polygon([(cx + x, cy + y) for x, y in _polygon(spec.kind, r, spec.angle)], fill=255)
    small = np.asarray(img, dtype=np.float32).reshape(height, s, width, s).mean(axis=(1, 3))
    return small >= 127.5


def draw_shape(canvas: np.ndarray, spec: ShapeSpec) -> np.ndarray:
    """Paint ``spec`` onto an (H, W, 3) uint8 ``canvas`` in place; return its boolean mask."""
    if canvas.ndim != 3 or canvas.shape[2] != 3 or canvas.dtype != np.uint8:
        raise ValueError(f"canvas must be an (H, W, 3) uint8 array, got {canvas.shape} {canvas.dtype}")
    mask = shape_mask(spec, canvas.shape[0], canvas.shape[1])
    canvas[mask] = spec.color
    return mask


def _luma(rgb) -> float:
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b


def random_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Cluttered (H, W, 3) uint8 background: a dark or light colour gradient, faint random lines, noise.

    The background stays in one half of the brightness range, so a shape drawn with a contrasting
    colour (``random_shape(..., background=...)``) is always visible whatever its hue.
    """
    dark = rng.random() < 0.5
    lo, hi = (0, 100) if dark else (155, 255)
    c0, c1 = rng.uniform(lo, hi, size=(2, 3))
    t = np.linspace(0.0, 1.0, width if rng.random() < 0.5 else height, dtype=np.float32)
    ramp = c0 + (c1 - c0) * t[:, None]
    bg = np.broadcast_to(ramp[None] if len(t) == width else ramp[:, None], (height, width, 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    mid = (c0 + c1) / 2
    for _ in range(int(rng.integers(1, 4))):
        x0, x1 = rng.uniform(0, width, size=2)
        y0, y1 = rng.uniform(0, height, size=2)
        color = np.clip(mid + rng.normal(0.0, 35.0, size=3), 0, 255)
        draw.line([(x0, y0), (x1, y1)], fill=tuple(int(v) for v in color), width=1)
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0.0, 5.0, size=(height, width, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def random_shape(rng: np.random.Generator, height: int, width: int, kind: str | None = None,
                 radius_range: tuple[float, float] = (0.25, 0.45),
                 background: np.ndarray | None = None) -> ShapeSpec:
    """Sample a shape lying fully inside the image.

    ``radius_range`` is a fraction of the shorter side. With ``background`` given, the colour is
    resampled until its brightness differs clearly from the mean background under the shape.
    """
    if kind is None:
        kind = SHAPE_CLASSES[int(rng.integers(len(SHAPE_CLASSES)))]
    elif kind not in SHAPE_CLASSES:
        raise ValueError(f"kind must be one of {SHAPE_CLASSES}, got {kind!r}")
    side = min(height, width)
    radius = float(rng.uniform(*radius_range)) * side
    cx = float(rng.uniform(radius, width - 1 - radius))
    cy = float(rng.uniform(radius, height - 1 - radius))
    angle = float(rng.uniform(0.0, 360.0))
    color = tuple(int(v) for v in rng.integers(0, 256, 3))
    if background is not None:
        y0, y1 = int(max(cy - radius, 0)), int(min(cy + radius + 1, height))
        x0, x1 = int(max(cx - radius, 0)), int(min(cx + radius + 1, width))
        ref = background[y0:y1, x0:x1].reshape(-1, 3).mean(axis=0)
        for _ in range(256):
            if abs(_luma(color) - _luma(ref)) >= 90:
                break
            color = tuple(int(v) for v in rng.integers(0, 256, 3))
    return ShapeSpec(kind, (cx, cy), radius, angle, color)


def render_classification_image(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    """One (size, size, 3) uint8 image showing a single ``kind`` shape on clutter."""
    canvas = random_background(rng, size, size)
    draw_shape(canvas, random_shape(rng, size, size, kind=kind, background=canvas))
    return canvas


def publish_dir(final: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp_dir)`` beside ``final`` and rename the result to ``final`` (no-op if it exists):
    concurrent ranks or a killed run never leave a partial dataset behind."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first; its copy is identical
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def dataset_dirname(image_size: int, train_per_class: int, val_per_class: int, seed: int) -> str:
    """Cache folder name: every parameter that changes the images is part of it."""
    return f"shapes-v{FORMAT_VERSION}-{image_size}px-{train_per_class}x{val_per_class}-seed{seed}"


def _write_class(out: Path, kind: str, split_index: int, class_index: int, count: int, image_size: int,
                 seed: int) -> None:
    """Render and save the ``count`` images of one (split, class) folder."""
    out.mkdir(parents=True)
    for i in range(count):
        rng = np.random.default_rng([seed, split_index, class_index, i])
        Image.fromarray(render_classification_image(rng, image_size, kind)).save(out / f"{kind}_{i:05d}.png")


def write_shapes_imagefolder(cache_dir: str | os.PathLike, image_size: int = 64,
                             train_per_class: int = 500, val_per_class: int = 100,
                             seed: int = 0, processes: int = 1) -> Path:
    """Generate (once) the ImageFolder ``<cache_dir>/<dataset_dirname>/{train,val}/<class>/*.png``.

    Image ``i`` of split ``s`` and class ``c`` depends only on (seed, s, c, i), so the set is the
    same on every machine, whatever ``processes`` (folders rendered in parallel) is. The folder appears
    atomically (built in a temp dir, then renamed), so concurrent ranks or a killed run never leave a
    partial dataset behind.
    """
    for name, value, low in (("image_size", image_size, 8), ("train_per_class", train_per_class, 1),
                             ("val_per_class", val_per_class, 1)):
        if int(value) < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    final = Path(cache_dir).expanduser() / dataset_dirname(image_size, train_per_class, val_per_class, seed)

    def build(tmp: Path) -> None:
        counts = {"train": train_per_class, "val": val_per_class}
        jobs = [(tmp / split / kind, kind, s_idx, c_idx, counts[split], image_size, seed)
                for s_idx, split in enumerate(SPLITS) for c_idx, kind in enumerate(SHAPE_CLASSES)]
        if processes > 1:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(min(processes, len(jobs))) as pool:
                list(pool.map(_write_class, *zip(*jobs)))
        else:
            for job in jobs:
                _write_class(*job)

    return publish_dir(final, build)
