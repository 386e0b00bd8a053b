"""Shared driver of the dense-task Hydra apps: Hydra config -> mmengine ``Config`` -> ``Runner``.

A preset names mmdet/mmseg base config files (``mm_base``, e.g. ``mmdet::_base_/models/...``),
and ``mm`` holds the mmengine dicts merged on top (``_delete_`` works as in mmengine configs).
The backbone dict, the channel counts marked ``auto``, the embedded shapes data, the work dir and
the wandb backend are filled in here; training itself is mmengine's ``Runner``.
"""
from __future__ import annotations

import copyreg
import os
import uuid
from pathlib import Path
from typing import Any

import timm
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer
from mmengine.runner import Runner
from omegaconf import DictConfig, OmegaConf

from metazoo.datasets.shapes import SHAPE_CLASSES
from metazoo.datasets.shapes_dense import ADE_CLASSES, write_shapes_ade, write_shapes_coco
from metazoo.integrations.openmmlab import ADAPTER_NAME, MetazooBackbone, register
from metazoo.integrations.openmmlab_hooks import HOOK_NAME as ATOMIC_CHECKPOINT_HOOK
from metazoo.train.preflight import check_added_keys, check_dense_paths
from metazoo.train.runlock import RunLock

TASKS = ("detect", "segment")
BASE_ORDER = ("model", "data", "schedule", "runtime")
WANDB_MODES = ("offline", "online", "disabled")


def mmengine_safe_globals() -> list:
    """Exactly the non-tensor types an mmengine Runner checkpoint pickles (message-hub history
    buffers of numpy arrays, a numpy float scalar); everything else stays refused by weights-only load."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
    return [HistoryBuffer, core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype,
            type(np.dtype(np.float64)), type(np.dtype(np.int64))]


def _reduce_history_buffer(buf: HistoryBuffer):
    """Pickle a HistoryBuffer without its statistics functions (reached through ``getattr``, which
    a weights-only load must never allow); they are class-level and restored on load anyway."""
    state = {k: v for k, v in vars(buf).items() if k != "statistics_methods"}
    return copyreg.__newobj__, (HistoryBuffer,), state


def allow_mmengine_checkpoints() -> None:
    """Let ``torch.load``'s default weights-only mode read mmengine checkpoints (resume, load_from):
    history buffers are saved without function references, and the types above are allow-listed."""
    copyreg.pickle(HistoryBuffer, _reduce_history_buffer)
    torch.serialization.add_safe_globals(mmengine_safe_globals())


def cache_dir() -> Path:
    """Where generated data sets live: ``$METAZOO_CACHE/data`` (default ``~/.cache/metazoo/data``)."""
    return Path(os.environ.get("METAZOO_CACHE", "~/.cache/metazoo")).expanduser() / "data"


def _prepare_data(cfg: DictConfig, task: str) -> None:
    """Generate the embedded shapes set when ``data.root`` is null; else check the given tree."""
    data = cfg.data
    if OmegaConf.is_missing(data, "root"):
        raise ValueError(f"data.root is required for this preset: pass data.root=/path/to/{data.name}")
    if data.root is None:
        if data.name != "shapes":
            raise ValueError(f"data.root=null means the embedded set; accepted only with data.name=shapes, "
                             f"got data.name={data.name!r}")
        write = write_shapes_coco if task == "detect" else write_shapes_ade
        root = write(cache_dir(), image_size=tuple(data.image_size), train_images=data.train_images,
                     val_images=data.val_images, max_instances=data.max_instances, seed=data.seed)
        data.root = str(root)
        data.classes = list(SHAPE_CLASSES if task == "detect" else ADE_CLASSES)
    root = Path(str(data.root)).expanduser()
    missing = [p for p in data.required if not (root / p).exists()]
    if not root.is_dir() or missing:
        raise ValueError(f"data.root={str(data.root)!r} is not a {data.name} tree "
                         f"(missing: {', '.join(missing) or 'the folder itself'}); accepted: a folder "
                         f"holding {', '.join(data.required)}")


def _plain(node):
    """A config node as plain Python (lists, dicts, scalars, None)."""
    return OmegaConf.to_object(node) if OmegaConf.is_config(node) else node


def _check_backbone(bb: DictConfig) -> MetazooBackbone:
    """Validate ``backbone.*`` by building the adapter on the meta device (no memory, no init)."""
    try:
        if not timm.is_model(bb.model_name):
            raise ValueError(f"backbone.model_name={bb.model_name!r} is unknown; accepted: "
                             f"{', '.join(timm.list_models('mz_*'))}")
        with torch.device("meta"):
            return MetazooBackbone(bb.model_name, out_indices=_plain(bb.out_indices),
                                   frozen_stages=bb.frozen_stages, out_norm=bb.out_norm,
                                   model_kwargs=_plain(bb.model_kwargs))
    except ValueError as e:
        raise ValueError(f"backbone: {e}") from e


def _fill_channels(node: Any, channels: list[int]) -> None:
    """Replace ``in_channels: auto`` by the backbone's channels (per ``in_index`` for heads)."""
    if isinstance(node, dict):
        if node.get("in_channels") == "auto":
            index = node.get("in_index")
            if index is None:
                node["in_channels"] = list(channels)
            elif isinstance(index, int):
                node["in_channels"] = channels[index]
            else:
                node["in_channels"] = [channels[i] for i in index]
        for v in node.values():
            _fill_channels(v, channels)
    elif isinstance(node, list):
        for v in node:
            _fill_channels(v, channels)


TUPLE_KEYS = ("scale", "img_scale", "crop_size", "size", "ratio_range")


def _tuples(node: Any) -> Any:
    """YAML gives lists; mmcv transforms want tuples for sizes and scales."""
    if isinstance(node, dict):
        return {k: tuple(v) if k in TUPLE_KEYS and isinstance(v, list) else _tuples(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_tuples(v) for v in node]
    return node


def _visualizer(cfg: DictConfig, scope: str, name: str) -> dict:
    """Local metrics files, plus wandb unless ``wandb.mode=disabled`` (offline by default)."""
    if cfg.wandb.mode not in WANDB_MODES:
        raise ValueError(f"wandb.mode={cfg.wandb.mode!r} is not supported; accepted values: {WANDB_MODES}")
    backends = [dict(type="LocalVisBackend")]
    if cfg.wandb.mode != "disabled":
        backends.append(dict(type="WandbVisBackend", init_kwargs=dict(
            project=cfg.wandb.project, mode=cfg.wandb.mode, name=cfg.wandb.get("name"),
            dir=str(cfg.work_dir))))
    kind = "DetLocalVisualizer" if scope == "mmdet" else "SegLocalVisualizer"
    return dict(type=kind, vis_backends=backends, name=name)


def compose(cfg: DictConfig, task: str):
    """Build the mmengine ``Config`` a Hydra config describes (validates boundary keys first)."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not supported; accepted values: {TASKS}")
    register()
    allow_mmengine_checkpoints()
    check_dense_paths(cfg)
    probe = _check_backbone(cfg.backbone)
    _prepare_data(cfg, task)
    scope = "mmdet" if task == "detect" else "mmseg"
    bases = [cfg.mm_base[k] for k in BASE_ORDER if cfg.mm_base.get(k)]
    Path(cfg.work_dir).mkdir(parents=True, exist_ok=True)
    # The Runner later dumps the full config under this same name.
    base_file = Path(cfg.work_dir) / f"{task}_config.py"
    base_file.write_text(f"_base_ = {bases!r}\n")  # mmengine resolves the 'mmdet::' / 'mmseg::' paths
    try:
        mm = Config.fromfile(str(base_file))
    finally:
        base_file.unlink()
    overrides = _tuples(OmegaConf.to_container(cfg.mm, resolve=True))
    bb = cfg.backbone
    backbone = dict(type=ADAPTER_NAME, model_name=bb.model_name, out_indices=list(probe.out_indices),
                    frozen_stages=bb.frozen_stages, norm_eval=bb.norm_eval,
                    drop_path_rate=bb.drop_path_rate, out_norm=bb.out_norm,
                    model_kwargs=_plain(bb.model_kwargs))
    if bb.checkpoint:
        backbone["init_cfg"] = dict(type="Pretrained", checkpoint=str(bb.checkpoint))
    overrides.setdefault("model", {})["backbone"] = dict(backbone, _delete_=True)
    # mmengine's logger, message hub and visualizer are process-wide singletons looked up by name
    # (the bases fix the visualizer's; the others default to config name + timestamp to the
    # second): one unique name keeps a second run in this process out of the first's work dir.
    run_name = f"{task}_{uuid.uuid4().hex[:8]}"
    overrides.update(experiment_name=run_name,
                     default_scope=scope, work_dir=str(cfg.work_dir), resume=bool(cfg.resume),
                     load_from=cfg.load_from, randomness=dict(seed=cfg.seed),
                     visualizer=_visualizer(cfg, scope, run_name),
                     # the dumped config rebuilds the model in plain mmdet/mmseg tools too
                     custom_imports=dict(imports=["metazoo.integrations.openmmlab",
                                                  "metazoo.integrations.openmmlab_hooks"],
                                         allow_failed_imports=False))
    mm.merge_from_dict(overrides)
    hooks = mm.get("default_hooks") or {}
    if hooks.get("checkpoint", {}).get("type") == "CheckpointHook":
        hooks["checkpoint"]["type"] = ATOMIC_CHECKPOINT_HOOK  # same options, atomic saves
    _fill_channels(mm.model, probe.out_channels)  # after the merge: `in_index` comes from the base
    # A base model's `pretrained=` (e.g. mmseg's ResNet URL) belongs to the backbone we replaced.
    mm.model.pop("pretrained", None)
    return mm


class _KeepMetrics(Hook):
    """Runner hook remembering the metrics of the last validation."""

    def __init__(self):
        self.metrics: dict = {}

    def after_val_epoch(self, runner, metrics=None):
        self.metrics = {k: float(v) for k, v in (metrics or {}).items()}  # numpy scalars -> JSON


def train(cfg: DictConfig, task: str) -> dict:
    """Train and validate with mmengine's Runner (one run per work dir at a time); return the final
    validation metrics."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        check_added_keys(list(HydraConfig.get().overrides.task), ("mm.", "mm_base."))
    with RunLock(cfg.work_dir, key="work_dir"):
        runner = Runner.from_cfg(compose(cfg, task))
        keep = _KeepMetrics()
        runner.register_hook(keep, priority="VERY_LOW")
        runner.train()
    return keep.metrics
