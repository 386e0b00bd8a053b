"""An exclusive lock on a run directory: a second run on the same folder fails at once, naming the holder.

The lock is a file created with ``O_EXCL`` holding ``{"pid", "host"}``. A lock left by a process that
no longer exists on this host (a SIGKILLed run) is taken over; one held from another host is never
guessed about, since its PID means nothing here.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from .config import RunError
from .preflight import probe_writable

LOCK_FILE = ".metazoo.lock"


def _alive(pid: int) -> bool:
    """Whether ``pid`` names a process on this host (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class RunLock:
    """Context manager holding ``<run_dir>/.metazoo.lock`` for the life of a run."""

    def __init__(self, run_dir: str | os.PathLike, key: str = "hydra.run.dir"):
        self.path = Path(run_dir) / LOCK_FILE
        self.key = key
        self.me = {"pid": os.getpid(), "host": socket.gethostname()}

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.me, f)
        return True

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        probe_writable(self.path.parent, self.key)
        for _ in range(3):  # a stale lock is removed and the creation raced again
            if self._create():
                return
            holder = self._holder()
            if not holder:  # being written this instant, or emptied: look again
                continue
            same_host = holder.get("host") == self.me["host"]
            if same_host and not _alive(int(holder.get("pid", -1))):
                print(f"[metazoo.train] taking over the stale lock of PID {holder['pid']} (no longer running) "
                      f"in {self.path.parent}", flush=True)
                if self._holder() == holder:  # not already taken over by a third run meanwhile
                    self.path.unlink(missing_ok=True)
                continue
            raise RunError(f"config key '{self.key}': {self.path.parent} is in use by PID {holder.get('pid')} on "
                           f"host {holder.get('host')} (lock {self.path}); use another run dir, or remove the "
                           f"lock if that process is gone")
        raise RunError(f"config key '{self.key}': could not take the lock {self.path}")

    def release(self) -> None:
        if self._holder() == self.me:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
