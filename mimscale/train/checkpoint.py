"""Checkpoints that survive being killed at any moment, and the policy of when to write them.

DeepSpeed writes each rank's shards into ``checkpoints/<tag>/``; mimscale adds per-rank extras (RNG
states, the method's per-rank state such as EMA shadows) and the tag's :class:`~mimscale.runs.RunMeta`
(``mimscale.json``). A tag is **complete** only when its ``manifest.json`` exists: written last, by rank 0,
after every rank has finished writing and hashed (and fsynced) the files it wrote, listing every file with
its size and sha256. ``checkpoints/latest`` then moves to it (temp file, fsync, rename).

On start every rank takes part in choosing where to resume: the newest tag whose manifest verifies (each
rank re-hashes its share of the files); newer tags that do not are skipped with the reason, loudly. A run
never starts fresh while a verified checkpoint exists. Directories are deleted only by the retention
policy (the ``keep`` newest complete tags stay) or when provably incomplete (no manifest) and older than a
complete one, and a save that failed is removed (nothing in it was ever usable). Tags written before
manifests existed are accepted when ``latest`` names them. The layout itself is :mod:`mimscale.runs`.
"""

from __future__ import annotations

import errno
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mimscale.dist import barrier, from_rank0, gather_objects, get_rank, get_world_size
from mimscale.runs import (
    LATEST,
    RunMeta,
    atomic_torch_save,
    atomic_write_text,
    check_files,
    extra_file,
    file_digest,
    list_tags,
    manifest_bytes,
    rank_owns,
    read_latest,
    read_manifest,
    tag_for,
    tag_step,
    write_manifest,
)

__all__ = ["CheckpointError", "Checkpointer", "rng_state", "set_rng_state"]

FREE_SPACE_MARGIN = 1.2  # a save needs this many times the last checkpoint's size free on its filesystem


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file and what to do. ``exit_code``:
    2 for a checkpoint this run cannot use as given (bad input), 1 for a failed write."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


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
    :meth:`should_save`); ``keep``: how many complete tags the retention keeps. ``log``: where messages go
    (rank 0 prints them).
    """

    def __init__(self, output_dir: str | Path, rank: int, keep: int = 2, interval: int = 1000,
                 log: Any = None) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.rank = rank
        self.keep = keep
        self.interval = interval
        self._log = log
        self.resumed_from: str | None = None

    def say(self, text: str) -> None:
        if self.rank == 0:
            (self._log or (lambda t: print(f"[mimscale] {t}", flush=True)))(text)

    def latest(self) -> str | None:
        return read_latest(self.root)

    def should_save(self, step: int, stop_step: int) -> bool:
        """The save policy: every ``interval`` steps, and at the stop step unless ``latest`` already is it."""
        if step >= stop_step:
            return self.latest() != tag_for(step)
        return step % self.interval == 0

    # ---- choosing where to resume (collective) -----------------------------------------------------
    def verified_tag(self) -> str | None:
        """The newest tag every rank verified against its manifest (collective). Skipped tags are reported
        with their reasons; tags older than the chosen one are left alone."""
        tags = from_rank0(list_tags(self.root) if self.rank == 0 else None)
        latest = from_rank0(self.latest() if self.rank == 0 else None)
        skipped: list[str] = []
        chosen = None
        for tag in tags:
            tag_dir = self.root / tag
            manifest = from_rank0(read_manifest(tag_dir) if self.rank == 0 else None)
            if manifest is None:
                if tag == latest and (tag_dir / "mimscale.json").is_file():
                    self.say(f"checkpoint {tag} predates manifests; resuming from it as `latest` names it")
                    chosen = tag
                    break
                skipped.append(f"{tag}: no {tag_dir / 'manifest.json'} (its save never finished)")
                continue
            names = sorted(manifest["files"])
            mine = check_files(tag_dir, manifest, names[get_rank() :: get_world_size()])
            problems = [p for rank_problems in gather_objects(mine) for p in rank_problems]
            if problems:
                # Corrupt, not unfinished: set aside (kept for inspection, out of the retention's count).
                aside = self.root / f"{tag}.corrupt"
                if self.rank == 0 and not aside.exists():
                    tag_dir.rename(aside)
                skipped.append(f"{tag}: " + "; ".join(problems) + f" (moved to {aside.name})")
                continue
            chosen = tag
            break
        if skipped:
            where = f"resuming from {chosen}" if chosen else "no complete checkpoint is left"
            self.say(f"WARNING skipped {len(skipped)} newer checkpoint(s), {where}:\n  "
                     + "\n  ".join(skipped))
        if chosen and chosen != latest and self.rank == 0:
            atomic_write_text(self.root / LATEST, chosen)  # `latest` named a skipped tag, or nothing
        barrier()
        return chosen

    def clean_partial(self, keep_tag: str | None) -> None:
        """Remove tags without a manifest that are older than the complete ``keep_tag`` (rank 0): provably
        incomplete, and a newer complete checkpoint exists. Newer incomplete tags are left alone (a new save
        of the same step replaces one)."""
        if self.rank != 0 or keep_tag is None:
            return
        keep_step = tag_step(keep_tag) or 0
        for tag in list_tags(self.root):
            if (tag_step(tag) or 0) < keep_step and read_manifest(self.root / tag) is None:
                shutil.rmtree(self.root / tag, ignore_errors=True)

    # ---- save (collective) -------------------------------------------------------------------------
    def has_room(self, step: int) -> bool:
        """Whether the filesystem has room for another checkpoint like the last one (collective: rank 0
        decides and says why not)."""
        ok = True
        if self.rank == 0:
            last = self.latest()
            manifest = read_manifest(self.root / last) if last else None
            if manifest is not None:
                need = int(manifest_bytes(manifest) * FREE_SPACE_MARGIN)
                free = shutil.disk_usage(self.root).free
                if free < need:
                    ok = False
                    self.say(f"WARNING not enough free space for checkpoint {tag_for(step)} in {self.root}: "
                             f"{free / 2**30:.2f} GiB free, the last checkpoint took "
                             f"{manifest_bytes(manifest) / 2**30:.2f} GiB; skipping this save ({last} stays)")
        return bool(from_rank0(ok))

    def save(self, engine: Any, method: Any, step: int, meta: RunMeta) -> bool:
        """Collective: every rank must call it. Writes tag ``step`` and its manifest, then moves ``latest``.
        Returns False when skipped for lack of space; raises :class:`CheckpointError` when writing failed."""
        tag = tag_for(step)
        tag_dir = self.root / tag
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
        barrier()
        if not self.has_room(step):
            return False
        if self.rank == 0 and tag_dir.exists():  # an unfinished earlier save of this step: never usable
            shutil.rmtree(tag_dir, ignore_errors=True)
        barrier()
        failure = ""
        try:
            engine.save_checkpoint(str(self.root), tag=tag, client_state={"step": step}, save_latest=False)
            extra = {"rng": rng_state(), "method": method.sharded_state_dict()}
            atomic_torch_save(extra, extra_file(tag_dir, self.rank))
            if self.rank == 0:
                meta.step = step
                meta.write(tag_dir)
        except (OSError, RuntimeError) as e:
            failure = self._describe_write_error(e, tag_dir)
        failures = [f for f in gather_objects(failure) if f]
        if failures:
            if self.rank == 0:
                shutil.rmtree(tag_dir, ignore_errors=True)  # a failed save holds nothing usable
            barrier()
            previous = self.latest() or "none"
            raise CheckpointError(f"{failures[0]}; the previous checkpoint ({previous}) is intact")
        # Every rank's files are on disk: hash (and fsync) them, rank 0 the shared ones, then the manifest.
        names = sorted(p.name for p in tag_dir.iterdir() if p.is_file() and not p.name.startswith("."))
        mine = {n: file_digest(tag_dir / n, sync=True) for n in names if rank_owns(n, self.rank)}
        files: dict[str, dict[str, Any]] = {}
        for part in gather_objects(mine):
            files.update(part)
        if self.rank == 0:
            for n in names:
                if n not in files:
                    files[n] = file_digest(tag_dir / n, sync=True)
            write_manifest(tag_dir, files, step, get_world_size())
            atomic_write_text(self.root / LATEST, tag)
            self._prune(keep_tag=tag)
        barrier()
        return True

    def _describe_write_error(self, e: BaseException, tag_dir: Path) -> str:
        free = shutil.disk_usage(self.root).free if self.root.exists() else 0
        if getattr(e, "errno", None) == errno.ENOSPC or free < (1 << 20):
            return (f"rank {self.rank}: no space left on device (ENOSPC) writing checkpoint {tag_dir} "
                    f"({free / 2**20:.1f} MiB free): free space or move --output_dir, then relaunch")
        return f"rank {self.rank}: writing checkpoint {tag_dir} failed: {type(e).__name__}: {e}"

    # ---- load --------------------------------------------------------------------------------------
    def load(self, engine: Any, method: Any) -> int:
        """Resume from the newest verified tag if there is one (collective); returns the step to continue
        from (0 = fresh run). The learning-rate scheduler's state is not loaded: the schedule is a function of
        the step and the current config, which the trainer restores (an override on resume wins)."""
        tag = self.verified_tag()
        self.resumed_from = tag
        if tag is None:
            return 0
        self.clean_partial(tag)
        tag_dir = self.root / tag
        meta = RunMeta.read(tag_dir)
        if meta.world_size != get_world_size():
            raise CheckpointError(
                f"checkpoint {tag_dir} was written by {meta.world_size} ranks and this run has "
                f"{get_world_size()}: relaunch on {meta.world_size} ranks (or export it and start a new run)",
                exit_code=2)
        extra_path = extra_file(tag_dir, self.rank)
        if not extra_path.is_file():
            raise CheckpointError(f"{extra_path} is missing from checkpoint {tag_dir} (rank {self.rank}'s "
                                  "RNG and method state); resume from an earlier checkpoint", exit_code=2)
        path, client = engine.load_checkpoint(
            str(self.root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {tag_dir}")
        # RNG states and EMA shadows are tensors and plain containers we wrote ourselves.
        extra = torch.load(extra_path, map_location="cpu", weights_only=False)
        set_rng_state(extra["rng"])
        method.load_sharded_state_dict(extra["method"])
        return int(client["step"])

    def _prune(self, keep_tag: str) -> None:
        """Retention: keep the ``keep`` newest complete tags (``keep_tag`` always); older complete ones go,
        and so do incomplete tags older than ``keep_tag``."""
        complete = [t for t in list_tags(self.root) if read_manifest(self.root / t) is not None]
        for old in complete[self.keep :]:
            if old != keep_tag:
                shutil.rmtree(self.root / old, ignore_errors=True)
        self.clean_partial(keep_tag)
