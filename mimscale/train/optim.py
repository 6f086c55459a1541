"""The optimizer side of a run, shared by the trainer and ``benchmarks/train_step.py``: AdamW parameter
groups, the learning-rate and weight-decay schedules, and the DeepSpeed engine built around them.

The optimizer itself is DeepSpeed's (written into its config by :mod:`mimscale.train.deepspeed_config`:
torch's fused AdamW, or DeepSpeed's CPU Adam with optimizer offload); this module hands it the parameter
groups and the schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mimscale.dist import all_reduce_max
from mimscale.train.config import OptimConfig, RunPlan, TrainConfig
from mimscale.train.deepspeed_config import build_ds_config
from mimscale.train.grad_rules import GradientRules
from mimscale.train.schedule import build_multiplier

__all__ = [
    "Engine",
    "FrozenFor",
    "WeightDecaySchedule",
    "build_engine",
    "build_lr_scheduler",
    "param_groups",
    "weight_decay_at",
]


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


def weight_decay_at(o: OptimConfig, step: int, total: int) -> float:
    """Constant ``weight_decay``, or a cosine from it to ``weight_decay_end`` over the run (iBOT/DINO)."""
    if o.weight_decay_end is None:
        return o.weight_decay
    progress = min(1.0, step / max(1, total))
    return o.weight_decay_end + 0.5 * (o.weight_decay - o.weight_decay_end) * (
        1 + math.cos(math.pi * progress)
    )


@dataclass(frozen=True)
class WeightDecaySchedule:
    """The weight decay of the decayed groups as a function of the step: constant, or iBOT/DINO's cosine."""

    optim: OptimConfig
    total_steps: int

    @property
    def scheduled(self) -> bool:
        return self.optim.weight_decay_end is not None

    def __call__(self, step: int) -> float:
        return weight_decay_at(self.optim, step, self.total_steps)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Set the decay of every group marked ``decay`` for ``step`` (the constant one too, so a value
        changed on resume wins over the one restored with the optimizer's state)."""
        wd = self(step)
        for g in optimizer.param_groups:
            if g.get("decay", True):
                g["weight_decay"] = wd


def build_lr_scheduler(cfg: TrainConfig, plan: RunPlan) -> Any:
    """The factory DeepSpeed calls with its optimizer: a ``LambdaLR`` with the recipe's per-step multiplier
    on every group, held at 0 first for the groups tagged ``frozen_steps``."""
    multiplier = build_multiplier(
        cfg.optim, plan.peak_lr, plan.warmup_start_lr, plan.total_steps, plan.steps_per_epoch
    )

    def factory(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        lambdas = [
            FrozenFor(multiplier, g["frozen_steps"]) if g.get("frozen_steps") else multiplier
            for g in optimizer.param_groups
        ]
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)

    return factory


@dataclass
class Engine:
    """A DeepSpeed engine with what the trainer reads from it."""

    engine: Any
    scheduler: Any
    ds_config: dict[str, Any]
    dtype: torch.dtype  # the dtype the method's inputs must have (bf16, fp16 or fp32)
    weight_decay: WeightDecaySchedule
    gradient_rules: GradientRules | None = None  # per-parameter clipping, frozen groups without gradients

    def begin_step(self, step: int) -> None:
        """Before optimizer step ``step`` (0-based): the schedules' values for it."""
        self.weight_decay.apply(self.scheduler.optimizer, step)
        if self.gradient_rules is not None:
            self.gradient_rules.step = step

    @property
    def module(self) -> Any:
        return self.engine.module

    def restore_schedule(self, cfg: TrainConfig, plan: RunPlan, step: int) -> None:
        """After resuming at ``step``: the optimizer's hyper-parameters and learning rate as the *current*
        config says, for that step. The lr schedule is a function of the step and the config, not state:
        a checkpointed scheduler (its peak lr, its lambdas) would silently override ``--set optim.lr=...``
        given on resume, so it is not loaded; the AdamW betas/eps and weight decay restored with the
        optimizer's state give way to the config's likewise."""
        scheduler = self.scheduler
        optimizer = scheduler.optimizer
        scheduler.base_lrs = [plan.peak_lr] * len(optimizer.param_groups)
        scheduler.last_epoch = step
        lrs = [base * lam(step) for base, lam in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(optimizer.param_groups, lrs):
            group["initial_lr"], group["lr"] = plan.peak_lr, lr
            group["betas"], group["eps"] = tuple(cfg.optim.betas), cfg.optim.eps
        scheduler._last_lr = lrs
        self.weight_decay.apply(optimizer, step)

    def state_is_finite(self) -> bool:
        """Whether every rank's fp32 master weights (its ZeRO partitions, or the parameters) are finite
        (collective; one pass over this rank's partition on its device): checked before a checkpoint is
        written, since the loss read before a step cannot show that the step itself overflowed."""
        opt = self.engine.optimizer
        flats = (getattr(opt, "single_partition_of_fp32_groups", None)  # ZeRO-1/2
                 or getattr(opt, "fp32_partitioned_groups_flat", None)  # ZeRO-3
                 or getattr(opt, "fp32_groups_flat_partition", None))  # bf16 ZeRO-0/1 optimizer
        tensors = list(flats) if flats else [getattr(p, "ds_tensor", p) for p in self.module.parameters()]
        device = tensors[0].device if tensors else torch.device("cpu")
        bad = torch.zeros((), dtype=torch.int32, device=device)
        for t in tensors:
            if t.numel():
                bad |= (~torch.isfinite(t)).any().to(torch.int32)
        return not bool(all_reduce_max(bad).item())


def build_engine(
    method: torch.nn.Module,
    cfg: TrainConfig,
    plan: RunPlan,
    user_ds_config: dict[str, Any],
    adjust_ds_config: Callable[[dict[str, Any]], None] | None = None,
) -> Engine:
    """``deepspeed.initialize`` for ``method`` as the recipe asks: parameter groups (decay, the method's
    exclusions and lr-frozen groups), the DeepSpeed config for ``plan`` (batch, precision, AdamW), the lr
    schedule; the method cast first for bf16/fp16 (buffers included), compiled if the recipe asks.
    ``adjust_ds_config`` may edit the final DeepSpeed config in place (benchmarks compare variants)."""
    import deepspeed

    wd = WeightDecaySchedule(cfg.optim, plan.total_steps)
    no_decay = method.no_weight_decay() if hasattr(method, "no_weight_decay") else set()
    frozen = method.lr_frozen_params(plan.steps_per_epoch) if hasattr(method, "lr_frozen_params") else {}
    groups = param_groups(method, wd(0), no_decay, frozen)
    ds_cfg = build_ds_config(user_ds_config, cfg, plan.batch, plan.precision, plan.peak_lr)
    if adjust_ds_config is not None:
        adjust_ds_config(ds_cfg)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(plan.precision, torch.float32)
    if dtype != torch.float32:
        # Cast buffers too (ZeRO-3 casts only parameters): BatchNorm statistics, position tables and
        # centres must match the activations' dtype. EMA teachers keep fp32 shadows of their own.
        method.to(dtype)
    engine, _, _, scheduler = deepspeed.initialize(
        model=method, model_parameters=groups, config=ds_cfg, lr_scheduler=build_lr_scheduler(cfg, plan)
    )
    if cfg.compile:
        engine.compile()
    clip = cfg.optim.grad_clip if cfg.optim.clip_mode == "per_param" else None
    skip_frozen = cfg.optim.frozen_groups == "skip" and any(g.get("frozen_steps") for g in groups)
    rules = GradientRules(engine, clip, skip_frozen) if clip or skip_frozen else None
    return Engine(engine, scheduler, ds_cfg, _engine_dtype(engine), wd, rules)


def _engine_dtype(engine: Any) -> torch.dtype:
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32
