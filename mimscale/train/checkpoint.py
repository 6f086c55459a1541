"""Checkpoints that survive being killed at any moment.

DeepSpeed writes each rank's shards into ``checkpoints/<tag>/``; mimscale adds per-rank extras (RNG
states, EMA shadows) and a ``mimscale.json`` (method, timm architecture, step, recipe config). Only after
every rank has finished does rank 0 replace ``checkpoints/latest`` (write a temp file, fsync, rename), so
a run killed mid-save resumes from the previous good checkpoint. Partial tags newer than ``latest`` are
removed on start-up; old tags beyond ``keep`` are pruned.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mimscale.train.distributed import barrier

LATEST = "latest"
TAG_RE = re.compile(r"^step_(\d{8,})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_latest(root: Path) -> str | None:
    """The tag in ``root/latest`` if it names an existing directory, else None."""
    f = Path(root) / LATEST
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    return tag if tag and (Path(root) / tag).is_dir() else None


def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """Accept a run dir, its ``checkpoints/`` dir, or a tag dir; return (checkpoints root, tag)."""
    p = Path(path)
    for root in (p / "checkpoints", p):
        tag = read_latest(root)
        if tag is not None:
            return root, tag
    if p.is_dir() and (p / "mimscale.json").is_file():
        return p.parent, p.name
    raise FileNotFoundError(
        f"--checkpoint {str(path)!r}: no checkpoint found (expected a run directory with "
        "checkpoints/latest, a checkpoints directory, or a step_* tag directory)"
    )


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
    """Save/resume around a DeepSpeed engine; one instance per run directory."""

    def __init__(self, output_dir: str | Path, rank: int, keep: int = 2) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.rank = rank
        self.keep = keep

    def latest(self) -> str | None:
        return read_latest(self.root)

    def clean_partial(self) -> None:
        """Remove tag directories newer than ``latest``: leftovers of a save that was killed."""
        if self.rank != 0 or not self.root.is_dir():
            return
        latest = self.latest()
        latest_step = int(TAG_RE.match(latest).group(1)) if latest and TAG_RE.match(latest) else -1
        for d in self.root.iterdir():
            m = TAG_RE.match(d.name)
            if d.is_dir() and m and int(m.group(1)) > latest_step:
                shutil.rmtree(d, ignore_errors=True)

    def save(self, engine: Any, method: Any, step: int, meta: dict[str, Any]) -> str:
        """Collective: every rank must call it. Returns the tag."""
        tag = tag_for(step)
        self.root.mkdir(parents=True, exist_ok=True)
        engine.save_checkpoint(str(self.root), tag=tag, client_state={"step": step}, save_latest=False)
        extra = {"rng": rng_state(), "method": method.sharded_state_dict()}
        atomic_torch_save(extra, self.root / tag / f"extra_rank{self.rank:05d}.pt")
        if self.rank == 0:
            atomic_write_text(self.root / tag / "mimscale.json", json.dumps({**meta, "step": step}, indent=2))
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
        extra_file = self.root / tag / f"extra_rank{self.rank:05d}.pt"
        if not extra_file.is_file():
            raise RuntimeError(
                f"{extra_file} is missing: checkpoints resume only with the world size that "
                "wrote them (or export them with `mimscale export` and start fresh)"
            )
        # RNG states and EMA shadows are tensors and plain containers we wrote ourselves.
        extra = torch.load(extra_file, map_location="cpu", weights_only=False)
        set_rng_state(extra["rng"])
        method.load_sharded_state_dict(extra["method"])
        return int(client["step"])

    def _prune(self, keep_tag: str) -> None:
        tags = sorted(d.name for d in self.root.iterdir() if d.is_dir() and TAG_RE.match(d.name))
        for old in tags[: max(0, len(tags) - self.keep)]:
            if old != keep_tag:
                shutil.rmtree(self.root / old, ignore_errors=True)
