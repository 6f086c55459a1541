"""Checkpoints that survive being killed at any moment, and the policy of when to write them.

DeepSpeed writes each rank's shards into ``checkpoints/<tag>/``; mimscale adds per-rank extras (RNG
states, the method's per-rank state such as EMA shadows) and the tag's :class:`~mimscale.runs.RunMeta`
(``mimscale.json``). Only after every rank has finished does rank 0 replace ``checkpoints/latest`` (write a
temp file, fsync, rename), so a run killed mid-save resumes from the previous good checkpoint. Partial tags
newer than ``latest`` are removed on start-up; old tags beyond ``keep`` are pruned. The layout itself is
:mod:`mimscale.runs`.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mimscale.dist import barrier
from mimscale.runs import (
    LATEST,
    RunMeta,
    atomic_torch_save,
    atomic_write_text,
    extra_file,
    read_latest,
    tag_for,
    tag_step,
)

__all__ = ["Checkpointer", "rng_state", "set_rng_state"]


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    """Save/resume around a DeepSpeed engine, and when to save; one instance per run directory.

    ``interval``: a checkpoint every that many optimizer steps and one at the run's stop step (see
    :meth:`should_save`); ``keep``: how many tags the retention keeps.
    """

    def __init__(self, output_dir: str | Path, rank: int, keep: int = 2, interval: int = 1000) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.rank = rank
        self.keep = keep
        self.interval = interval

    def latest(self) -> str | None:
        return read_latest(self.root)

    def should_save(self, step: int, stop_step: int) -> bool:
        """The save policy: every ``interval`` steps, and at the stop step unless ``latest`` already is it."""
        if step >= stop_step:
            return self.latest() != tag_for(step)
        return step % self.interval == 0

    def clean_partial(self) -> None:
        """Remove tag directories newer than ``latest``: leftovers of a save that was killed."""
        if self.rank != 0 or not self.root.is_dir():
            return
        latest = self.latest()
        latest_step = tag_step(latest) if latest else None
        for d in self.root.iterdir():
            step = tag_step(d.name)
            if d.is_dir() and step is not None and step > (-1 if latest_step is None else latest_step):
                shutil.rmtree(d, ignore_errors=True)

    def save(self, engine: Any, method: Any, step: int, meta: RunMeta) -> str:
        """Collective: every rank must call it. Returns the tag."""
        tag = tag_for(step)
        self.root.mkdir(parents=True, exist_ok=True)
        engine.save_checkpoint(str(self.root), tag=tag, client_state={"step": step}, save_latest=False)
        extra = {"rng": rng_state(), "method": method.sharded_state_dict()}
        atomic_torch_save(extra, extra_file(self.root / tag, self.rank))
        if self.rank == 0:
            meta.step = step
            meta.write(self.root / tag)
        barrier()  # every rank's shards are on disk before the pointer moves
        if self.rank == 0:
            atomic_write_text(self.root / LATEST, tag)
            self._prune(keep_tag=tag)
        barrier()
        return tag

    def load(self, engine: Any, method: Any) -> int:
        """Resume from ``latest`` if there is one; returns the step to continue from (0 = fresh run)."""
        tag = self.latest()
        if tag is None:
            return 0
        path, client = engine.load_checkpoint(
            str(self.root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.root / tag}")
        extra_path = extra_file(self.root / tag, self.rank)
        if not extra_path.is_file():
            raise RuntimeError(
                f"{extra_path} is missing: checkpoints resume only with the world size that "
                "wrote them (or export them with `mimscale export` and start fresh)"
            )
        # RNG states and EMA shadows are tensors and plain containers we wrote ourselves.
        extra = torch.load(extra_path, map_location="cpu", weights_only=False)
        set_rng_state(extra["rng"])
        method.load_sharded_state_dict(extra["method"])
        return int(client["step"])

    def _prune(self, keep_tag: str) -> None:
        tags = sorted(d.name for d in self.root.iterdir() if d.is_dir() and tag_step(d.name) is not None)
        for old in tags[: max(0, len(tags) - self.keep)]:
            if old != keep_tag:
                shutil.rmtree(self.root / old, ignore_errors=True)
