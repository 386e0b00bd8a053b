"""Top-1 / top-5 of a model on an ImageFolder, with the model's own preprocessing (``python -m metazoo.validate``).

The model comes from a pretrained tag (``mz_caformer_s18.sail_in1k``), a training checkpoint written by
``metazoo.train`` (its safetensors header names the model, classes and preprocessing), or any weights
file timm can load for a named model.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from .checkpoint import EMA_FILE, MODEL_FILE, read_metadata
from .config import RunError
from .data import ImageFiles
from .distributed import DistEnv
from .engine import evaluate
from .preflight import SplitFiles, scan_split

_AMP = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_model(model: str | None, checkpoint: str | None, pretrained: bool, num_classes: int | None,
               use_ema: bool = False) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, preprocessing overrides); a training checkpoint needs no model name."""
    import timm

    import metazoo  # noqa: F401
    from metazoo.backbones._common import create_with_weights, read_tensors

    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if path.is_dir():
            path = path / (EMA_FILE if use_ema else MODEL_FILE)
        if not path.is_file():
            raise ValueError(f"checkpoint: file not found: {path}")
        meta = read_metadata(path) if path.suffix == ".safetensors" else {}
        if "model" in meta:  # written by metazoo.train: rebuild exactly the trained network
            if model is not None and model.split(".")[0] != meta["model"]:
                raise ValueError(f"model: {model!r} does not match the checkpoint's {meta['model']!r}")
            net = timm.create_model(meta["model"], num_classes=meta["num_classes"], **meta.get("model_kwargs", {}))
            try:
                net.load_state_dict(read_tensors(str(path)))
            except RuntimeError as err:
                raise ValueError(f"checkpoint {path} does not fit {meta['model']}: {err}") from err
            return net.eval(), dict(meta.get("data_config", {}), classes=meta.get("classes"))
        if model is None:
            raise ValueError("model: required when the checkpoint carries no metazoo metadata")
        net = create_with_weights(model, path, num_classes, head_may_differ=False)
        return net.eval(), {}
    if model is None:
        raise ValueError("model: give a model name (optionally with a pretrained tag) or a checkpoint")
    if not timm.is_model(model.split(".")[0]):
        raise ValueError(f"model: unknown model {model!r}")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    return timm.create_model(model, pretrained=pretrained, **kwargs).eval(), {}


def _holds_folders(path: str) -> bool:
    return os.path.isdir(path) and any(e.is_dir() for e in os.scandir(path))


def eval_files(root: str, split: str, classes: list[str] | None) -> SplitFiles:
    """The images to evaluate: ``root/split`` if it exists, else ``root`` itself when it is a class-folder
    ImageFolder (never a root holding other splits). ``classes`` (saved by ``metazoo.train``) fixes the labels."""
    class_to_idx = {c: i for i, c in enumerate(classes)} if classes else None
    if not os.path.isdir(os.path.join(root, split)):
        splits = sorted(p for p in os.listdir(root) if _holds_folders(os.path.join(root, p)))
        if splits:
            raise ValueError(f"split: no folder {split!r} in {root}; its split folders are {', '.join(splits)}")
        root, split = os.path.split(os.path.normpath(root))  # root itself holds the class folders
    try:
        return scan_split(root, split, "split", class_to_idx)
    except RunError as err:
        raise ValueError(str(err).replace("config key 'split'", "split")) from err


def validate(data_dir: str, model: str | None = None, checkpoint: str | None = None, pretrained: bool = False,
             split: str = "val", batch_size: int = 64, workers: int = 2, device: str = "auto",
             amp: str = "off", num_classes: int | None = None, use_ema: bool = False,
             img_size: int | None = None) -> dict:
    """Evaluate on ``data_dir`` (an ImageFolder, or a root holding a ``split`` ImageFolder)."""
    from timm.data import create_transform, resolve_data_config

    if not os.path.isdir(os.path.expanduser(data_dir)):
        raise ValueError(f"data_dir: directory not found: {data_dir}")
    if amp not in _AMP:
        raise ValueError(f"amp: expected one of {', '.join(_AMP)}, got {amp!r}")
    dev = torch.device("cuda" if (device == "auto" and torch.cuda.is_available()) else
                       ("cpu" if device == "auto" else device))
    net, overrides = load_model(model, checkpoint, pretrained, num_classes, use_ema)
    classes = overrides.pop("classes", None)
    if img_size is not None:
        overrides = dict(overrides, input_size=[3, img_size, img_size])
    data_config = resolve_data_config(args=overrides, model=net)
    files = eval_files(os.path.expanduser(data_dir), split, classes)
    dataset = ImageFiles(files.samples, create_transform(**data_config, is_training=False))
    n_model = net.num_classes
    n_data = len(files.classes)
    if n_data > n_model:
        raise ValueError(f"data_dir: {n_data} class folders but the model predicts {n_model} classes")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    metrics = evaluate(net.to(dev), loader, DistEnv(0, 0, 1, dev), _AMP[amp], n_model)
    return dict(metrics, model=getattr(net, "default_cfg", {}).get("architecture", model),
                data_config={k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()})


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m metazoo.validate", description=__doc__.splitlines()[0])
    p.add_argument("data_dir", help="ImageFolder root (or a root holding <split>/)")
    p.add_argument("--model", help="model name, optionally with a pretrained tag (mz_caformer_s18.sail_in1k)")
    p.add_argument("--checkpoint", help="metazoo.train checkpoint folder or weights file")
    p.add_argument("--pretrained", action="store_true", help="load the tag's pretrained weights")
    p.add_argument("--split", default="val")
    p.add_argument("--ema", action="store_true", help="use the EMA weights of a checkpoint folder")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="off", choices=list(_AMP))
    p.add_argument("--num-classes", type=int)
    p.add_argument("--img-size", type=int)
    p.add_argument("--json", help="also write the result to this file")
    args = p.parse_args(argv)
    try:
        result = validate(args.data_dir, args.model, args.checkpoint, args.pretrained, args.split, args.batch_size,
                          args.workers, args.device, args.amp, args.num_classes, args.ema, args.img_size)
    except (ValueError, OSError) as err:  # bad arguments, unreadable files: one line naming them
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return result
