"""The training loop: one batch flows shards -> uint8 loader -> device -> method -> DeepSpeed step.

Components (config, DeepSpeed config, schedule, checkpointer, progress, preemption) live in their own
modules; this file wires them in the order a reader follows one batch.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mimscale.train import config as C
from mimscale.train.checkpoint import Checkpointer
from mimscale.train.cpu_ranks import configure_cpu_rank
from mimscale.train.deepspeed_config import build_ds_config, load_ds_config, resolve_precision, zero_stage
from mimscale.train.distributed import (
    barrier,
    exit_process,
    init_distributed,
    release_shm_buffers,
    shutdown_distributed,
)
from mimscale.train.preemption import EXIT_RESUMABLE, PreemptionHandler
from mimscale.train.progress import ProgressLogger
from mimscale.train.schedule import build_multiplier

SIGNAL_CHECK_EVERY = 5  # steps between collective checks for a preemption signal
EXIT_DIVERGED = 3  # the loss became non-finite; not resumable as is (75 means "resume me")


def param_groups(
    model: torch.nn.Module,
    weight_decay: float,
    extra_no_decay: set[str],
    frozen: dict[str, int] | None = None,
) -> list[dict[str, Any]]:
    """AdamW groups: no decay on biases, 1-D tensors (norms) and names the method lists; frozen tensors
    (fixed position tables are buffers; EMA teachers have requires_grad=False) never reach the optimizer.

    Parameters under a prefix of ``frozen`` get their own groups, tagged ``frozen_steps``, whose lr the
    schedule holds at 0 for that many steps. Each group carries ``decay`` so a weight-decay schedule knows
    which groups to touch.
    """
    frozen = frozen or {}
    buckets: dict[tuple[bool, int], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim <= 1 or name.endswith(".bias") or name in extra_no_decay)
        steps = max((n for prefix, n in frozen.items() if name.startswith(prefix)), default=0)
        buckets.setdefault((decay, steps), []).append(p)
    return [
        {"params": ps, "weight_decay": weight_decay if decay else 0.0, "decay": decay, "frozen_steps": steps}
        for (decay, steps), ps in sorted(buckets.items(), key=lambda kv: (kv[0][1], not kv[0][0]))
    ]


class FrozenFor:
    """lr multiplier that is 0 for the first ``steps`` steps, then follows ``base`` (picklable)."""

    def __init__(self, base: Any, steps: int) -> None:
        self.base, self.steps = base, steps

    def __call__(self, step: int) -> float:
        return 0.0 if step < self.steps else self.base(step)


def weight_decay_at(o: C.OptimConfig, step: int, total: int) -> float:
    """Constant ``weight_decay``, or a cosine from it to ``weight_decay_end`` over the run (iBOT/DINO)."""
    if o.weight_decay_end is None:
        return o.weight_decay
    progress = min(1.0, step / max(1, total))
    return o.weight_decay_end + 0.5 * (o.weight_decay - o.weight_decay_end) * (
        1 + math.cos(math.pi * progress)
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def demo_data_spec(img_size: int, num_images: int) -> str:
    """The generated demo shards (built once per machine, shared by runs), sized for the crop."""
    from mimscale.data.demo import ensure_demo_shards

    image_size = max(64, int(math.ceil(img_size * 8 / 7 / 16)) * 16)
    cache = Path(os.environ.get("MIMSCALE_CACHE", Path.home() / ".cache" / "mimscale"))
    return ensure_demo_shards(
        cache / f"demo_{image_size}px_{num_images}", num_images=num_images, image_size=image_size
    )


def build_transform_spec(cfg: C.TrainConfig, img_size: int) -> dict[str, Any] | list[dict[str, Any]]:
    if cfg.data.views:
        return cfg.data.views
    return {
        "size": img_size,
        "scale": list(cfg.data.crop_scale),
        "ratio": list(cfg.data.crop_ratio),
        "hflip": cfg.data.hflip,
    }


def train(cfg: C.TrainConfig, ds_config_spec: str, recipe_name: str) -> int:
    """Run (or resume) the recipe; returns the process exit code (0 done, 75 checkpointed on a signal)."""
    import deepspeed

    from mimscale.data.pipeline import build_train_loader, normalize_on_device
    from mimscale.data.transforms import build_transform
    from mimscale.methods.base import create_method

    user_ds, ds_source = load_ds_config(ds_config_spec)  # fail on a bad path before starting anything
    # From the first moment: a SIGUSR1/SIGTERM during start-up is acted on at the first step boundary, and
    # the loader's forked workers inherit the handler instead of dying from the signal mid-batch.
    preempt = PreemptionHandler()
    rank, world, local_rank = init_distributed()
    accel = deepspeed.get_accelerator()
    on_gpu = accel.device_name() == "cuda"
    if on_gpu:
        accel.set_device(local_rank)
    device = torch.device(accel.current_device_name() if on_gpu else "cpu")
    cpu_setup = None if on_gpu else configure_cpu_rank()  # threads per rank, no per-step page faults
    out_dir = Path(cfg.output_dir or "runs/default")
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)

    precision = resolve_precision(cfg.precision, on_gpu, on_gpu and accel.is_bf16_supported())
    plan = C.plan_batch(cfg.global_batch, world, cfg.max_micro_batch)
    spe, total = C.steps_per_epoch(cfg), C.total_steps(cfg)
    stop_step = min(total, cfg.max_steps) if cfg.max_steps else total
    peak = C.peak_lr(cfg.optim, cfg.global_batch)

    seed_everything(cfg.seed + rank)
    try:
        method = create_method(cfg.method, **cfg.model)
    except (TypeError, ValueError) as e:
        raise C.ConfigError(f"model config {cfg.model}: {e}") from e
    if cfg.grad_checkpointing:
        method.set_grad_checkpointing(True)
    img_size = method.encoder.grid[0] * method.encoder.patch_size
    groups = param_groups(
        method, weight_decay_at(cfg.optim, 0, 1), method.no_weight_decay(), method.lr_frozen_params(spe)
    )
    ds_cfg = build_ds_config(user_ds, cfg, plan, precision, peak)
    multiplier = build_multiplier(cfg.optim, peak, C.warmup_start_lr(cfg.optim, cfg.global_batch), total, spe)

    def lr_scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        lambdas = [
            FrozenFor(multiplier, g.get("frozen_steps", 0)) if g.get("frozen_steps") else multiplier
            for g in optimizer.param_groups
        ]
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)

    if precision in ("bf16", "fp16"):
        # Cast buffers too (ZeRO-3 casts only parameters): BatchNorm statistics, position tables and
        # centres must match the activations' dtype. EMA teachers keep fp32 shadows of their own.
        method.to(torch.bfloat16 if precision == "bf16" else torch.float16)
    engine, _, _, scheduler = deepspeed.initialize(
        model=method, model_parameters=groups, config=ds_cfg, lr_scheduler=lr_scheduler
    )
    module = engine.module
    if cfg.compile:
        engine.compile()
    dtype = (
        torch.bfloat16
        if engine.bfloat16_enabled()
        else torch.float16
        if engine.fp16_enabled()
        else torch.float32
    )

    ckpt = Checkpointer(out_dir, rank, cfg.keep_checkpoints)
    ckpt.clean_partial()
    barrier()
    start_step = ckpt.load(engine, module)
    timm_name, timm_kwargs, encoder_prefix = module.export_spec()
    meta = {
        "method": cfg.method,
        "recipe": recipe_name,
        "timm.model_name": timm_name,
        "timm.kwargs": timm_kwargs,
        "encoder_prefix": encoder_prefix,
        "zero_stage": zero_stage(ds_cfg),
        "world_size": world,
        "config": C.to_dict(cfg),
    }
    if rank == 0:
        (out_dir / "config.json").write_text(C.dumps(cfg))
        (out_dir / "ds_config.json").write_text(json.dumps(ds_cfg, indent=2))

    urls = cfg.data.urls
    if urls is None:
        if rank == 0:
            demo_data_spec(img_size, cfg.data.demo_images)
        barrier()
        urls = demo_data_spec(img_size, cfg.data.demo_images)
    spec = build_transform_spec(cfg, img_size)
    decode_on_device = None
    if cfg.data.decode == "device":  # workers ship JPEG bytes + crop boxes; the device decodes
        from mimscale.data.gpu_decode import GpuJpegDecoder, build_gpu_decode_transform

        transform = build_gpu_decode_transform(spec[0] if isinstance(spec, list) else spec)
        decode_on_device = GpuJpegDecoder(device)
    else:
        transform = build_transform(spec)
    # Reseed the stream from the step: a resumed run draws new shards/crops instead of replaying.
    loader = build_train_loader(
        urls,
        transform,
        plan.micro_batch,
        seed=cfg.seed * 1_000_003 + start_step,
        rank=rank,
        world_size=world,
        num_workers=cfg.data.num_workers,
        shuffle_buffer=cfg.data.shuffle_buffer,
        pin_memory=on_gpu,
    )
    batches = iter(loader)

    n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in module.parameters())
    progress = ProgressLogger(out_dir, rank == 0, total, cfg.global_batch, start_step, stop_step)
    progress.message(
        f"{recipe_name}: method {cfg.method}, {n_params / 1e6:.1f}M params, "
        f"world {world}, micro batch {plan.micro_batch} x accumulation {plan.accumulation} x {world} ranks = "
        f"{plan.global_batch}, {precision}, ZeRO-{zero_stage(ds_cfg)} ({ds_source}), peak lr {peak:.3e}, "
        f"{total} steps ({spe}/epoch), "
        + (f"resuming at step {start_step}" if start_step else "fresh start")
        + f", data {'demo' if cfg.data.urls is None else cfg.data.urls}"
        + (f", JPEG decode on {device}" if decode_on_device is not None else "")
        + (f"; {cpu_setup}" if cpu_setup else "")
    )

    step = start_step
    sums: dict[str, torch.Tensor] = {}
    count = 0
    skipped = 0
    last_batch = None
    exit_code = 0
    # Any non-finite loss since the last check, kept on the device (no host sync per step). Like the
    # official MAE loop, a non-finite loss stops the run; checked before every checkpoint too, so a
    # diverged state never replaces the last good checkpoint.
    nonfinite = torch.zeros((), dtype=torch.int32, device=device)

    def diverged() -> bool:
        flag = nonfinite.clone()
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    progress.restart_clock(step)
    try:
        while step < stop_step:
            module.set_epoch_progress(step, spe)
            if cfg.optim.weight_decay_end is not None:
                wd = weight_decay_at(cfg.optim, step, total)
                for g in scheduler.optimizer.param_groups:
                    if g.get("decay", True):
                        g["weight_decay"] = wd
            for _ in range(plan.accumulation):
                batch = next(batches)
                skipped += batch.skipped
                raw = batch.images if decode_on_device is None else decode_on_device(batch.images)
                images = normalize_on_device(raw, device, dtype)
                out = engine(images)
                engine.backward(out.loss)
                engine.step()
                # Sum on the device; read back only when logging (no host sync per step).
                for k, v in {"loss": out.loss.detach(), **out.metrics}.items():
                    v = v.detach().float()
                    sums[k] = sums[k] + v if k in sums else v
                nonfinite |= ~torch.isfinite(out.loss.detach())
                count += 1
                last_batch = (images, out)
            step += 1
            module.after_optimizer_step(step, total, engine)
            if step % cfg.log_interval == 0 or step == stop_step:
                scalars = {k: (v / count).item() for k, v in sums.items()}
                if not all(math.isfinite(v) for v in scalars.values()):
                    progress.message(f"non-finite metrics at step {step}: {scalars}")
                scalars["lr"] = max(scheduler.get_last_lr())
                if cfg.optim.weight_decay_end is not None:
                    scalars["weight_decay"] = weight_decay_at(cfg.optim, step, total)
                scalars["skipped_samples"] = float(skipped)
                progress.log(step, scalars)
                sums, count = {}, 0
            checking = step % cfg.log_interval == 0 or step % cfg.ckpt_interval == 0 or step == stop_step
            if checking and diverged():
                progress.message(
                    f"non-finite loss by step {step}: stopping without a checkpoint; the last good one is "
                    f"{ckpt.latest() or 'none'} (lower the lr, raise warm-up, or clip gradients)"
                )
                exit_code = EXIT_DIVERGED
                break
            if step % cfg.ckpt_interval == 0 and step < stop_step:
                ckpt.save(engine, module, step, meta)
                progress.restart_clock(step)
            if step % SIGNAL_CHECK_EVERY == 0 and step < stop_step and preempt.should_stop(device):
                if diverged():
                    progress.message(f"non-finite loss by step {step}: not checkpointing it")
                    exit_code = EXIT_DIVERGED
                    break
                progress.message(f"signal {preempt.received or 'on another rank'}: checkpointing step {step}")
                ckpt.save(engine, module, step, meta)
                progress.message(f"checkpoint written; exiting with {EXIT_RESUMABLE} to be resumed")
                exit_code = EXIT_RESUMABLE
                break
        else:
            if ckpt.latest() != f"step_{step:08d}":
                ckpt.save(engine, module, step, meta)
            progress.message(f"done: step {step}, checkpoint in {ckpt.root}")
    finally:
        progress.close()

    if rank == 0 and last_batch is not None:
        _write_pictures(module, last_batch, out_dir, progress)
    barrier()
    release_shm_buffers()  # CPU runs: DeepSpeed leaves its all-reduce buffers in /dev/shm otherwise
    preempt.restore()
    return exit_code


def _write_pictures(
    module: Any, last_batch: tuple[Any, Any], out_dir: Path, progress: ProgressLogger
) -> None:
    from mimscale.train.visualize import plot_metrics, save_reconstruction_grid

    images, out = last_batch
    reconstruct = getattr(module, "reconstruct", None)
    if reconstruct is not None:  # multi-view methods pick the view they reconstruct
        rows = reconstruct(images, out)
        path = save_reconstruction_grid(rows, out_dir / "reconstructions.png")
        print(f"[mimscale] reconstructions: {path}", flush=True)
    if (out_dir / "metrics.jsonl").is_file():
        path = plot_metrics(out_dir / "metrics.jsonl", out_dir / "loss.png")
        if path:
            print(f"[mimscale] loss curve: {path}", flush=True)


def run(base: C.TrainConfig, argv: list[str] | None = None, recipe_name: str | None = None) -> None:
    """Entry point of every recipe: parse the shared CLI, resolve the config, train, exit with its code."""
    import __main__

    name = recipe_name or Path(getattr(__main__, "__file__", "recipe")).stem
    args = C.build_parser(prog=name).parse_args(argv)
    try:
        cfg = C.resolve_config(base, args, name)
        if args.print_config:
            print(C.dumps(cfg))
            return
        load_ds_config(args.ds_config)
    except C.ConfigError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    t0 = time.time()
    try:
        code = train(cfg, args.ds_config, name)
    except C.ConfigError as e:  # may come after the process group exists: end like a finished run
        print(f"{name}: error: {e}", file=sys.stderr)
        code = 2
    else:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"[mimscale] exit {code} after {time.time() - t0:.0f}s", flush=True)
    shutdown_distributed()
    exit_process(code)  # not sys.exit: a gloo rank can abort in interpreter finalization (see exit_process)
