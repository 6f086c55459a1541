"""The training loop as a small :class:`Trainer` over components (torchtitan's shape at this project's
size): one batch flows shards -> uint8 loader -> ``to_device`` -> method -> DeepSpeed step.

``Trainer.__init__`` builds the components in the order a batch meets them (run plan, method, engine,
checkpointer, inputs, progress); :meth:`Trainer.step` is one optimizer step with gradient accumulation;
:meth:`Trainer.run` holds the policy: logging, the divergence stop, checkpoints and preemption.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mimscale.dist import all_reduce_max, barrier, from_rank0
from mimscale.runs import RunMeta
from mimscale.train import config as C
from mimscale.train.checkpoint import Checkpointer
from mimscale.train.cpu_ranks import configure_cpu_rank
from mimscale.train.deepspeed_config import load_ds_config, zero_stage
from mimscale.train.distributed import init_distributed, release_shm_buffers
from mimscale.train.inputs import build_inputs
from mimscale.train.optim import build_engine
from mimscale.train.preemption import EXIT_RESUMABLE, PreemptionHandler
from mimscale.train.progress import ProgressLogger
from mimscale.train.supervision import ParentWatchdog, RunLock, RunLockedError

__all__ = ["EXIT_DIVERGED", "EXIT_NOT_SAVED", "SIGNAL_CHECK_EVERY", "Trainer", "train"]

SIGNAL_CHECK_EVERY = 5  # steps between collective checks for a preemption signal
EXIT_NOT_SAVED = 1  # the run finished but its final checkpoint could not be written
EXIT_DIVERGED = 3  # the loss or the weights became non-finite; not resumable as is (75 means "resume me")


class Diverged(Exception):
    """The weights about to be checkpointed are not finite: the run stops without saving them."""


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("model", "smoke"):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, dict):
            out.update({f"{prefix}{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[f"{prefix}{k}"] = v
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RunningMeans:
    """Sums of a step's scalars kept on the device (no host sync per step), read back when logging."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, scalars: dict[str, torch.Tensor]) -> None:
        for k, v in scalars.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.count += 1

    def pop(self) -> dict[str, float]:
        """The means since the last call (a host sync), and a fresh start."""
        means = {k: (v / max(1, self.count)).item() for k, v in self.sums.items()}
        self.sums, self.count = {}, 0
        return means


class Trainer:
    """One pretraining run (or its resumption) of a resolved recipe config on this process's rank."""

    def __init__(self, cfg: C.TrainConfig, ds_config_spec: str, recipe_name: str) -> None:
        import deepspeed

        from mimscale.methods.base import create_method

        user_ds, ds_source = load_ds_config(ds_config_spec)  # fail on a bad path before starting anything
        # From the first moment: a SIGUSR1/SIGTERM during start-up is acted on at the first step boundary, and
        # the loader's forked workers inherit the handler instead of dying from the signal mid-batch.
        self.preempt = PreemptionHandler()
        self.cfg = cfg
        launched = "RANK" in os.environ or "SLURM_PROCID" in os.environ  # by a launcher, not plain python
        self.rank, world, local_rank = init_distributed()
        self.watchdog = ParentWatchdog(self.rank).start() if launched else None
        self.out_dir = Path(cfg.output_dir or "runs/default")
        self.lock = self._lock_output_dir()
        accel = deepspeed.get_accelerator()
        on_gpu = accel.device_name() == "cuda"
        if on_gpu:
            accel.set_device(local_rank)
        self.device = torch.device(accel.current_device_name() if on_gpu else "cpu")
        cpu_setup = None if on_gpu else configure_cpu_rank()  # threads per rank, no per-step page faults
        self.plan = plan = C.plan_run(cfg, world, on_gpu, on_gpu and accel.is_bf16_supported())

        seed_everything(cfg.seed + self.rank)
        try:
            method = create_method(cfg.method, **cfg.model)
        except (TypeError, ValueError) as e:
            raise C.ConfigError(f"model config {cfg.model}: {e}") from e
        if cfg.grad_checkpointing:
            method.set_grad_checkpointing(True)
        img_size, patch_size = C.method_geometry(method)
        self.engine = build_engine(method, cfg, plan, user_ds)
        self.module = self.engine.module

        self.ckpt = Checkpointer(self.out_dir, self.rank, cfg.keep_checkpoints, cfg.ckpt_interval)
        self.global_step = start_step = self.ckpt.load(self.engine.engine, self.module)
        ds_cfg = self.engine.ds_config
        self.meta = RunMeta.from_method(self.module, recipe_name, C.to_dict(cfg), zero_stage(ds_cfg), world)
        if start_step:
            self.engine.restore_schedule(cfg, plan, start_step)  # the current config's lr and optimizer
        if self.rank == 0:
            (self.out_dir / "config.json").write_text(C.dumps(cfg))
            (self.out_dir / "ds_config.json").write_text(json.dumps(ds_cfg, indent=2))

        self.inputs = build_inputs(
            cfg,
            img_size,
            patch_size,
            plan.batch.micro_batch,
            rank=self.rank,
            world_size=world,
            device=self.device,
            dtype=self.engine.dtype,
            start_step=start_step,
        )
        self.batches = iter(self.inputs.loader)
        self.progress = ProgressLogger(
            self.out_dir, self.rank == 0, plan.total_steps, cfg.global_batch, start_step, plan.stop_step
        )
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in self.module.parameters())
        b = plan.batch
        self.progress.message(
            f"{recipe_name}: method {cfg.method}, {n_params / 1e6:.1f}M params, world {world}, micro batch "
            f"{b.micro_batch} x accumulation {b.accumulation} x {world} ranks = {b.global_batch}, "
            f"{plan.precision}, ZeRO-{zero_stage(ds_cfg)} ({ds_source}), peak lr {plan.peak_lr:.3e}, "
            f"{plan.total_steps} steps ({plan.steps_per_epoch}/epoch), "
            + (f"resuming at step {start_step}" if start_step else "fresh start")
            + f", data {self.inputs.source}"
            + (f", JPEG decode on {self.inputs.decode_device}" if self.inputs.decode_device else "")
            + (f"; {cpu_setup}" if cpu_setup else "")
        )

        if start_step:
            self._report_config_changes()
        self.means = RunningMeans()
        self.skipped = 0
        self.last_batch: tuple[Any, Any] | None = None
        # Any non-finite loss since the last check, kept on the device (no host sync per step). Like the
        # official MAE loop, a non-finite loss stops the run; checked before every checkpoint too, so a
        # diverged state never replaces the last good checkpoint.
        self.nonfinite = torch.zeros((), dtype=torch.int32, device=self.device)

    # ---- one optimizer step ------------------------------------------------------------------------
    def step(self) -> None:
        """One optimizer step: ``accumulation`` micro-batches through forward, backward and DeepSpeed's step,
        then the method's after-step hook (EMA teachers, centres)."""
        engine, plan = self.engine.engine, self.plan
        self.module.set_epoch_progress(self.global_step, plan.steps_per_epoch)
        self.engine.begin_step(self.global_step)
        for _ in range(plan.batch.accumulation):
            batch = next(self.batches)
            self.skipped += batch.skipped
            images = self.inputs.to_device(batch.images)
            out = engine(images)
            engine.backward(out.loss)
            engine.step()
            self.means.add({"loss": out.loss, **out.metrics})
            self.nonfinite |= ~torch.isfinite(out.loss.detach())
            self.last_batch = (images, out)
        self.global_step += 1
        self.module.after_optimizer_step(self.global_step, plan.total_steps, engine)

    def diverged(self) -> bool:
        """Whether any rank saw a non-finite loss (collective)."""
        return bool(all_reduce_max(self.nonfinite.clone()).item())

    def log(self) -> None:
        scalars = self.means.pop()
        if not all(math.isfinite(v) for v in scalars.values()):
            self.progress.message(f"non-finite metrics at step {self.global_step}: {scalars}")
        scalars["lr"] = max(self.engine.scheduler.get_last_lr())
        if self.engine.weight_decay.scheduled:
            scalars["weight_decay"] = self.engine.weight_decay(self.global_step)
        scalars["skipped_samples"] = float(self.skipped)
        self.progress.log(self.global_step, scalars)

    def save(self) -> bool:
        """Checkpoint this step unless its weights are not finite; False when nothing was written."""
        if self.watchdog is not None:
            self.watchdog.check()
        if not self.engine.state_is_finite():
            self.progress.message(
                f"the weights after step {self.global_step} are not finite (the step overflowed): not "
                f"checkpointing them; the last good checkpoint is {self.ckpt.latest() or 'none'} (lower "
                "the lr, raise warm-up, or clip gradients)")
            raise Diverged()
        written = self.ckpt.save(self.engine.engine, self.module, self.global_step, self.meta)
        self.progress.restart_clock(self.global_step)
        return written

    def _lock_output_dir(self) -> RunLock | None:
        """Rank 0 takes the output directory's lock; every rank refuses to start if another run holds it."""
        lock, error = None, None
        if self.rank == 0:
            lock = RunLock(self.out_dir)
            try:
                note = lock.acquire()
                if note:
                    print(f"[mimscale] {self.out_dir}: {note}", flush=True)
            except RunLockedError as e:
                lock, error = None, str(e)
        error = from_rank0(error)
        if error:
            raise C.ConfigError(error)
        return lock

    def _report_config_changes(self) -> None:
        """On resume, say which config values differ from the checkpoint's (the current ones apply)."""
        if self.rank != 0 or self.ckpt.resumed_from is None:
            return
        before = _flatten(RunMeta.read(self.ckpt.root / self.ckpt.resumed_from).config)
        now = _flatten(json.loads(json.dumps(C.to_dict(self.cfg))))  # as saved: tuples become lists
        ignore = {"max_steps", "output_dir"}
        changed = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(before.keys() | now.keys())
                   if k not in ignore and before.get(k) != now.get(k)]
        if changed:
            self.progress.message(f"resuming {self.ckpt.resumed_from} with config changes (the new values "
                                  "apply): " + "; ".join(changed))

    # ---- the policy ---------------------------------------------------------------------------------
    def run(self) -> int:
        """Train to the stop step; returns the exit code (0 done, 1 finished without its final checkpoint,
        3 diverged, 75 checkpointed on a signal). The policy itself is :meth:`_train_until`."""
        cfg, stop, code = self.cfg, self.plan.stop_step, 0
        self.progress.restart_clock(self.global_step)
        try:
            code = self._train_until(cfg, stop)
        except Diverged:
            code = EXIT_DIVERGED
        finally:
            self.progress.close()
        self.finish()
        return code

    def _train_until(self, cfg: C.TrainConfig, stop: int) -> int:
        while self.global_step < stop:
            self.step()
            step = self.global_step
            if step % cfg.log_interval == 0 or step == stop:
                self.log()
            checking = step % cfg.log_interval == 0 or step % cfg.ckpt_interval == 0 or step == stop
            if checking and self.diverged():
                self.progress.message(
                    f"non-finite loss by step {step}: stopping without a checkpoint; the last good one is "
                    f"{self.ckpt.latest() or 'none'} (lower the lr, raise warm-up, or clip gradients)")
                return EXIT_DIVERGED
            if self.ckpt.should_save(step, stop) and not self.save() and step == stop:
                self.progress.message(f"done at step {step}, but its checkpoint could not be written (see "
                                      f"above); the last one is {self.ckpt.latest() or 'none'}")
                return EXIT_NOT_SAVED
            if step % SIGNAL_CHECK_EVERY == 0 and step < stop and self.preempt.should_stop(self.device):
                if self.diverged():
                    self.progress.message(f"non-finite loss by step {step}: not checkpointing it")
                    return EXIT_DIVERGED
                self.progress.message(f"signal {self.preempt.received or 'on another rank'}: "
                                      f"checkpointing step {step}")
                written = self.save()
                self.progress.message(("checkpoint written" if written else "no new checkpoint (see above)")
                                      + f"; exiting with {EXIT_RESUMABLE} to be resumed")
                return EXIT_RESUMABLE
        self.progress.message(f"done: step {self.global_step}, checkpoint in {self.ckpt.root}")
        return 0

    def finish(self) -> None:
        """Pictures on rank 0, then release what the run holds (collective)."""
        if self.rank == 0 and self.last_batch is not None:
            self._write_pictures()
        barrier()
        release_shm_buffers()  # CPU runs: DeepSpeed leaves its all-reduce buffers in /dev/shm otherwise
        self.preempt.restore()
        if self.lock is not None:
            self.lock.release()
        if self.watchdog is not None:
            self.watchdog.stop()

    def _write_pictures(self) -> None:
        from mimscale.train.visualize import plot_metrics, save_reconstruction_grid

        images, out = self.last_batch
        rows = self.module.reconstruct(images, out)  # multi-view methods pick the view they reconstruct
        if rows is not None:
            path = save_reconstruction_grid(rows, self.out_dir / "reconstructions.png")
            print(f"[mimscale] reconstructions: {path}", flush=True)
        if (self.out_dir / "metrics.jsonl").is_file():
            path = plot_metrics(self.out_dir / "metrics.jsonl", self.out_dir / "loss.png")
            if path:
                print(f"[mimscale] loss curve: {path}", flush=True)


def train(cfg: C.TrainConfig, ds_config_spec: str, recipe_name: str) -> int:
    """Run (or resume) the recipe; returns the process exit code (0 done, 3 diverged, 75 checkpointed on a
    signal)."""
    return Trainer(cfg, ds_config_spec, recipe_name).run()
