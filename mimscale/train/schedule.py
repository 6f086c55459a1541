"""Per-step learning-rate schedules, expressed as a multiplier of the peak lr for ``LambdaLR``."""

from __future__ import annotations

import math

from mimscale.train.config import OptimConfig


class LRMultiplier:
    """Linear warmup from ``start_lr`` to the peak over ``warmup_steps``, then either MAE's half-cycle cosine
    to ``min_lr`` or SimMIM's step decay (``gamma`` at each milestone). Picklable so DeepSpeed can save the
    scheduler with the checkpoint."""

    def __init__(
        self,
        peak_lr: float,
        total_steps: int,
        warmup_steps: int,
        start_lr: float = 0.0,
        min_lr: float = 0.0,
        schedule: str = "cosine",
        milestones: tuple[int, ...] = (),
        gamma: float = 0.1,
    ) -> None:
        self.peak_lr, self.total_steps, self.warmup_steps = peak_lr, total_steps, warmup_steps
        self.start_lr, self.min_lr, self.schedule = start_lr, min_lr, schedule
        self.milestones, self.gamma = tuple(milestones), gamma

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start_lr + (self.peak_lr - self.start_lr) * step / self.warmup_steps
        if self.schedule == "multistep":
            return self.peak_lr * self.gamma ** sum(step >= m for m in self.milestones)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def __call__(self, step: int) -> float:
        return self.lr(step) / self.peak_lr if self.peak_lr > 0 else 0.0


def build_multiplier(
    o: OptimConfig, peak: float, start: float, total_steps: int, steps_per_epoch: int
) -> LRMultiplier:
    return LRMultiplier(
        peak_lr=peak,
        total_steps=total_steps,
        warmup_steps=int(round(o.warmup_epochs * steps_per_epoch)),
        start_lr=start,
        min_lr=o.min_lr,
        schedule=o.schedule,
        milestones=tuple(int(round(m * steps_per_epoch)) for m in o.milestones),
        gamma=o.gamma,
    )
