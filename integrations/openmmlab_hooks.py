"""mmengine checkpoints that are never lost: each save is written to a temp file and renamed into
place, and outdated checkpoints are removed only once the new one exists (mmengine's own hook
deletes them first and writes in place, so a run killed mid-save could be left with nothing).
"""
from __future__ import annotations

import os

from mmengine.dist import is_main_process
from mmengine.fileio import LocalBackend
from mmengine.hooks import CheckpointHook
from mmengine.registry import HOOKS

HOOK_NAME = "MetazooCheckpointHook"


def _write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@HOOKS.register_module(name=HOOK_NAME, force=True)
class AtomicCheckpointHook(CheckpointHook):
    """``CheckpointHook`` with atomic saves (same options; remote ``out_dir`` keeps mmengine's path)."""

    def _save_checkpoint_with_step(self, runner, step, meta):
        if not isinstance(self.file_backend, LocalBackend):
            return super()._save_checkpoint_with_step(runner, step, meta)
        evicted = []
        if self.max_keep_ckpts > 0 and not (self.keep_ckpt_ids and self.keep_ckpt_ids[-1] == step):
            while len(self.keep_ckpt_ids) >= self.max_keep_ckpts:
                evicted.append(self.keep_ckpt_ids.popleft())
            self.keep_ckpt_ids.append(step)
            # Recorded before saving, as mmengine does, so that a resumed run prunes the same files.
            runner.message_hub.update_info("keep_ckpt_ids", list(self.keep_ckpt_ids))
        name = self.filename_tmpl.format(step)
        self.last_ckpt = os.path.join(self.out_dir, name)
        runner.message_hub.update_info("last_ckpt", self.last_ckpt)

        tmp_name = f".{name}.tmp"
        runner.save_checkpoint(self.out_dir, tmp_name, self.file_client_args, save_optimizer=self.save_optimizer,
                               save_param_scheduler=self.save_param_scheduler, meta=meta, by_epoch=self.by_epoch,
                               backend_args=self.backend_args, **self.args)
        if not is_main_process():
            return
        os.replace(os.path.join(self.out_dir, tmp_name), self.last_ckpt)
        _write_text_atomic(os.path.join(runner.work_dir, "last_checkpoint"), self.last_ckpt)
        for old in evicted:
            path = os.path.join(self.out_dir, self.filename_tmpl.format(old))
            if os.path.isfile(path):
                os.remove(path)
