"""Two guards that keep a run from training unsupervised or twice on one output directory.

* :class:`ParentWatchdog`: a rank started by a launcher (``deepspeed``, ``torchrun``, ``srun``) stops
  within seconds when that launcher dies, instead of training on (and writing checkpoints) with nobody to
  supervise it or to stop it; a relaunch would otherwise put two jobs on one output directory. It ends the
  process at once: a save it interrupts is left without its manifest, which is never resumed from.
* :class:`RunLock`: rank 0 holds ``<output_dir>/.mimscale.lock`` (host, pid, SLURM job id, a heartbeat
  renewed every few seconds) for the whole run; a second run on the same directory is refused. A lock is
  stale, and taken over, when its process is gone (same host), its heartbeat stopped (another host), or it
  belongs to the same SLURM job (a requeued job resuming itself).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["LOCK_FILE", "ParentWatchdog", "RunLock", "RunLockedError"]

LOCK_FILE = ".mimscale.lock"
HEARTBEAT_S = 5.0  # how often the holder renews its lock
STALE_AFTER_S = 60.0  # a lock of another host whose heartbeat is this old is abandoned
EXIT_ORPHANED = 1


class RunLockedError(RuntimeError):
    """Another live run holds the output directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """The output directory's lock, held by rank 0 (see the module doc)."""

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self.me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "started": time.time(),
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _stale_reason(self, other: dict[str, Any]) -> str | None:
        """Why ``other``'s lock may be taken over, or None when it belongs to a live run."""
        if other.get("slurm_job_id") and other.get("slurm_job_id") == self.me["slurm_job_id"]:
            return f"it belongs to this SLURM job ({other['slurm_job_id']}), requeued"
        if other.get("host") == self.me["host"]:
            pid = int(other.get("pid", -1))
            return None if _alive(pid) and pid != self.me["pid"] else f"process {pid} is gone"
        try:
            age = time.time() - self.path.stat().st_mtime
        except OSError:
            return "it vanished"
        return f"its heartbeat stopped {age:.0f} s ago" if age > STALE_AFTER_S else None

    def acquire(self) -> str | None:
        """Take the lock or raise :class:`RunLockedError`; returns a note when a stale lock was taken over."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        note = None
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = self.holder()
                if other is None:  # being written this instant, or garbage: look again
                    time.sleep(0.2)
                    other = self.holder() or {}
                reason = self._stale_reason(other)
                if reason is None:
                    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(other.get("started", 0)))
                    raise RunLockedError(
                        f"{self.path.parent} is in use by another run (host {other.get('host')}, pid "
                        f"{other.get('pid')}, since {since}); stop it first, or use another --output_dir "
                        f"(delete {self.path} only if that run is certainly dead)"
                    ) from None
                note = f"took over a stale lock of {other.get('host')}:{other.get('pid')} ({reason})"
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
            self._thread = threading.Thread(target=self._heartbeat, name="mimscale-lock", daemon=True)
            self._thread.start()
            return note
        raise RunLockedError(f"could not take {self.path} (another run keeps creating it)")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        holder = self.holder()
        if holder and holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
            self.path.unlink(missing_ok=True)


class ParentWatchdog:
    """Ends this process when its parent (the launcher that started the rank) dies (see the module doc)."""

    def __init__(self, rank: int, interval_s: float = 1.0) -> None:
        self.rank = rank
        self.parent = os.getppid()
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="mimscale-parent-watchdog", daemon=True)

    def start(self) -> ParentWatchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def check(self) -> None:
        """End the process now if the launcher is gone (also called right before a checkpoint is written,
        so none is written after the launcher died)."""
        if os.getppid() != self.parent:
            print(f"[mimscale] rank {self.rank}: its launcher (pid {self.parent}) is gone; stopping now, "
                  "without a checkpoint (relaunch the same command to resume from the last one)",
                  file=sys.stderr, flush=True)
            os._exit(EXIT_ORPHANED)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check()
