"""Resuming under a changed config: a change the saved state cannot follow (model, data, optimizer type,
global batch) is refused; any other is applied and listed, never silently overridden by the saved state."""
from __future__ import annotations

from typing import Any

from .config import config_error

FIXED = ("model.", "data.", "optim.name", "optim.layer_decay")  # the saved weights / optimizer state depend on these
FOLLOWED = ("data.workers", "data.pin_memory", "data.val_batch_size", "data.batch_size", "data.skip_corrupt",
            "model.compile", "model.grad_checkpointing", "model.sync_bn", "model.drop_rate", "model.drop_path_rate")
IGNORED = ("ckpt.resume",)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def config_changes(saved: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """``key -> (saved value, new value)`` for every leaf that differs (missing on one side: None)."""
    a, b = _flatten(saved), _flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k) and k not in IGNORED}


def check_resume(path, saved: dict, new: dict, saved_batch: int | None, new_batch: int) -> list[str]:
    """Lines describing the applied changes; raises naming the first key that cannot be honoured."""
    changes = config_changes(saved, new)
    refused = [k for k in changes if k.startswith(FIXED) and k not in FOLLOWED]
    if saved_batch is not None and saved_batch != new_batch:
        refused.append("optim.global_batch")
        changes["optim.global_batch"] = (saved_batch, new_batch)
    if refused:
        listed = "; ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in refused)
        raise config_error(refused[0], f"resuming {path} with a changed {listed} cannot be honoured by the saved "
                                       f"weights and optimizer state; restore the saved values, or start a fresh run "
                                       f"(ckpt.resume=null or another hydra.run.dir)")
    return [f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items()]
