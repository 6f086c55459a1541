"""Step time and days to finish: compute from the counted model FLOPs at an assumed MFU, and the
communication floor of the ZeRO stage.

Compute: ``global batch x train FLOPs per image / (ranks x peak x MFU)``, with the FLOPs of
:func:`mimscale.flops.method_flops` (every encoder pass the method declares, teachers and multi-crop
included, and the heads it models) and MFU in the same convention (model FLOPs: activation checkpointing's
recomputation is not counted, so a checkpointed run needs ``(train + recompute) / train`` times longer at
the same hardware efficiency). Where the matmuls counted on the measured forward + backward
(:mod:`mimscale.planning.activations`, ``FlopCounterMode``) exceed the analytic count by more than 2%, the
counted FLOPs are used: BEiT's frozen tokenizer (about a third of BEiT ViT-B's work) and iBOT's heads on the
patch tokens are real work at the same efficiency; BEiT's dVAE tokenizer training has no analytic count.

Communication, per rank and optimizer step, ring collectives' bandwidth term ``bytes x (N - 1) / N`` over
the slowest link a ring crosses (the network between nodes, NVLink/PCIe inside one), latency ignored:

* ZeRO-1/2 (DeepSpeed 0.19 reduces each micro batch's gradients into partitions): a reduce-scatter of the
  16-bit gradients per micro batch, an all-gather of the updated 16-bit weights per step;
* ZeRO-3: per micro batch, the weights (frozen ones too, forward only) gathered for the forward and again
  for the backward, and the gradients reduce-scattered; persistent parameters are never gathered;
* ZeRO-0: an all-reduce (2x) of the gradients per micro batch.

With ``overlap_comm`` the step takes ``max(compute, communication)``, without it their sum: a floor, since
real collectives reach 70-90% of link bandwidth and do not overlap perfectly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mimscale.flops import FlopReport
from mimscale.planning.memory import ParamCounts, ZeroSettings

__all__ = ["StepTime", "comm_bytes_per_step", "step_time"]


def comm_bytes_per_step(
    counts: ParamCounts, zero: ZeroSettings, world: int, accumulation: int, param_bytes: int
) -> int:
    """Bytes each rank sends per optimizer step (bandwidth term of ring collectives)."""
    if world <= 1:
        return 0
    share = (world - 1) / world
    t = counts.trainable
    if zero.stage == 3:
        pt, pf = counts.persistent(zero.param_persistence_threshold)
        gathered_t, gathered_f = t - pt, counts.frozen - pf
        per_micro = param_bytes * (2 * gathered_t + gathered_f + t)
        return math.ceil(share * accumulation * per_micro)
    if zero.stage in (1, 2):
        return math.ceil(share * param_bytes * t * (accumulation + 1))
    return math.ceil(share * 2 * param_bytes * t * accumulation)


@dataclass(frozen=True)
class StepTime:
    """The time side of a plan for one batch plan."""

    train_flops_per_image: int  # model FLOPs (forward + backward; teachers forward only)
    recompute_flops_per_image: int  # the extra forward activation checkpointing runs
    peak_tflops: float
    mfu: float
    global_batch: int
    world_size: int
    total_steps: int
    flops_source: str  # "method_flops" or "counted"
    comm_bytes: int  # per rank and step
    link_gbs: float  # the slowest link of the collectives, GB/s per direction
    overlap: bool

    @property
    def compute_s(self) -> float:
        return (
            self.global_batch
            * self.train_flops_per_image
            / (self.world_size * self.peak_tflops * 1e12 * self.mfu)
        )

    @property
    def comm_s(self) -> float:
        return self.comm_bytes / (self.link_gbs * 1e9)

    def _combine(self, compute: float) -> float:
        return max(compute, self.comm_s) if self.overlap else compute + self.comm_s

    @property
    def step_s(self) -> float:
        return self._combine(self.compute_s)

    @property
    def step_s_checkpointed(self) -> float:
        factor = (self.train_flops_per_image + self.recompute_flops_per_image) / self.train_flops_per_image
        return self._combine(self.compute_s * factor)

    @property
    def comm_bound(self) -> bool:
        return self.comm_s > self.compute_s

    @property
    def images_per_s(self) -> float:
        return self.global_batch / self.step_s

    @property
    def days(self) -> float:
        return self.total_steps * self.step_s / 86400

    @property
    def days_checkpointed(self) -> float:
        return self.total_steps * self.step_s_checkpointed / 86400

    def to_dict(self) -> dict[str, Any]:
        derived = (
            "compute_s",
            "comm_s",
            "step_s",
            "step_s_checkpointed",
            "comm_bound",
            "images_per_s",
            "days",
            "days_checkpointed",
        )
        return {**self.__dict__, **{k: getattr(self, k) for k in derived}}


def step_time(
    report: FlopReport | None,
    counted_train_flops: int,
    *,
    global_batch: int,
    world_size: int,
    total_steps: int,
    peak_tflops: float,
    mfu: float,
    comm_bytes: int = 0,
    link_gbs: float = 1.0,
    overlap: bool = True,
) -> StepTime:
    """The :class:`StepTime` from a method's FLOP report (None when the analytic count does not apply)."""
    if report is not None and report.train >= 0.98 * counted_train_flops:
        train, source = report.train, "method_flops"
    else:
        train, source = counted_train_flops, "counted"
    if report is not None:
        recompute = report.forward - report.forward_only
    else:
        recompute = counted_train_flops // 3
    return StepTime(
        train,
        recompute,
        peak_tflops,
        mfu,
        global_batch,
        world_size,
        total_steps,
        source,
        comm_bytes,
        link_gbs,
        overlap,
    )
