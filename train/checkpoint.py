"""Training checkpoints: safetensors weights + a weights-only-loadable state file, written atomically.

A checkpoint is a folder ``epoch_NNNN/`` holding ``model.safetensors``, optionally ``ema.safetensors``,
and ``state.pt`` (optimizer, scheduler, scaler, epoch/step, RNG states, config as plain data). It is
built under a hidden temp name and renamed into place, so a save killed half-way never shadows or
replaces the previous checkpoint; ``latest_checkpoint`` only ever sees complete folders.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import socket
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

_NAME = re.compile(r"^epoch_(\d{4,})$")
MODEL_FILE, EMA_FILE, STATE_FILE = "model.safetensors", "ema.safetensors", "state.pt"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _process_tag() -> str:
    """Host and PID: temp names no other process, on this host or another, can share."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _plain_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous, CPU, unshared copies: what safetensors accepts."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop touches, as plain data (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": np_state[0], "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4]), "keys": torch.from_numpy(np_state[1].astype(np.int64))},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["key"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(ckpt_dir: str | os.PathLike, epoch: int, model_state: dict[str, torch.Tensor],
                    state: dict[str, Any], metadata: dict[str, Any] | None = None,
                    ema_state: dict[str, torch.Tensor] | None = None, keep_last: int = 3) -> Path:
    """Write ``<ckpt_dir>/epoch_<epoch>`` atomically, then delete all but the newest ``keep_last``.

    ``metadata`` (model name, classes, preprocessing) is stored as JSON strings in the safetensors
    header so ``metazoo.validate`` can rebuild the model from the weights file alone.
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"epoch_{epoch:04d}"
    tmp = ckpt_dir / f".tmp-{final.name}-{_process_tag()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    target = tmp / MODEL_FILE
    try:
        save_file(_plain_tensors(model_state), target, metadata=meta)
        if ema_state is not None:
            target = tmp / EMA_FILE
            save_file(_plain_tensors(ema_state), target, metadata=meta)
        target = tmp / STATE_FILE
        torch.save(state, target)
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)
    except (OSError, RuntimeError) as err:  # torch.save on a full disk says only "basic_ios::clear"
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"saving checkpoint {final} failed while writing {target} ({err}); the previous "
                      f"checkpoints in {ckpt_dir} are intact") from err
    if final.exists():  # re-saving an epoch: move the old folder aside first (rename is atomic)
        old = ckpt_dir / f".old-{final.name}-{_process_tag()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(ckpt_dir)
    for stale in list_checkpoints(ckpt_dir)[:-keep_last]:
        shutil.rmtree(stale)
    return final


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders, oldest first (temp folders of interrupted saves are ignored)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def remove_interrupted(ckpt_dir: str | os.PathLike) -> None:
    """Delete temp folders left by saves that were killed before their rename."""
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True)


def load_training_state(path: str | os.PathLike) -> tuple[dict, dict | None, dict]:
    """(model weights, EMA weights or None, state) from a checkpoint folder; never unpickles code.
    Any read error names the file (``ValueError``; a refused pickle stays an ``UnpicklingError``)."""
    from metazoo.backbones._common import read_tensors

    path = Path(path)
    for name in (MODEL_FILE, STATE_FILE):
        if not (path / name).is_file():
            raise ValueError(f"checkpoint {path} is incomplete: {name} is missing")
    model = read_tensors(str(path / MODEL_FILE))
    ema = read_tensors(str(path / EMA_FILE)) if (path / EMA_FILE).exists() else None
    state = read_tensors(str(path / STATE_FILE))
    return model, ema, state


def load_latest_intact(ckpt_dir: str | os.PathLike, report=print) -> tuple[Path, tuple] | None:
    """(folder, ``load_training_state`` result) of the newest checkpoint that reads back, or None if there
    is none; every unreadable newer one is reported and passed over, never deleted."""
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            return path, load_training_state(path)
        except (ValueError, pickle.UnpicklingError) as err:
            report(f"[metazoo.train] resume: {path.name} is unreadable ({err}); trying the previous checkpoint")
    return None


def read_metadata(weights_file: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata stored in a safetensors header by ``save_checkpoint``."""
    from safetensors import safe_open

    with safe_open(str(weights_file), framework="pt") as f:
        raw = f.metadata() or {}
    return {k: json.loads(v) for k, v in raw.items()}
