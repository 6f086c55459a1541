"""Checkpoint size per rank and in total, and how long writing one takes.

What a checkpoint tag holds (``mimscale.train.checkpoint.Checkpointer``; sizes measured by
``tests/test_planning_measured.py``):

* every rank: DeepSpeed's ``*_optim_states.pt``, its fp32 master partition and Adam's two moments
  (12 bytes per trainable parameter / N);
* ZeRO-1/2, rank 0 only: ``mp_rank_00_model_states.pt``, the whole module in the training dtype (trainable
  and frozen parameters, buffers);
* ZeRO-3, every rank: ``zero_pp_rank_*_model_states.pt`` with this rank's fragments of the frozen parameters
  (16-bit; the trainable ones live in the optimizer file as fp32);
* every rank: mimscale's ``extra_rank*.pt``, RNG states and the EMA teacher's fp32 shadow, which is the whole
  teacher under ZeRO-1/2 (so N copies of it per checkpoint) and this rank's partition under ZeRO-3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mimscale.planning.memory import ParamCounts

__all__ = ["CheckpointPlan", "checkpoint_plan"]


@dataclass(frozen=True)
class CheckpointPlan:
    rank0_bytes: int
    other_rank_bytes: int
    world_size: int
    write_gbs: float  # aggregate file-system write bandwidth, GB/s
    interval_steps: int
    saves: int  # checkpoints over the run (every interval and one at the end)
    ema_copies_bytes: int  # of the total, the replicated EMA shadows (ZeRO-1/2)

    @property
    def total_bytes(self) -> int:
        return self.rank0_bytes + (self.world_size - 1) * self.other_rank_bytes

    @property
    def write_s(self) -> float:
        return self.total_bytes / (self.write_gbs * 1e9)

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "total_bytes": self.total_bytes, "write_s": self.write_s}


def checkpoint_plan(
    counts: ParamCounts,
    stage: int,
    world: int,
    param_bytes: int,
    write_gbs: float,
    interval_steps: int,
    total_steps: int,
) -> CheckpointPlan:
    """The :class:`CheckpointPlan` for ``stage`` on ``world`` ranks (weights of ``param_bytes`` bytes)."""
    n = world if stage >= 1 else 1
    optim = 12 * math.ceil(counts.trainable / n)
    buffers = counts.buffer_elements * param_bytes + counts.other_buffer_bytes
    if stage == 3:
        ema = 4 * math.ceil(counts.ema / n)
        model = param_bytes * math.ceil(counts.frozen / n)
        rank0 = other = optim + model + ema
        replicated = 0
    else:
        ema = 4 * counts.ema
        other = optim + ema
        rank0 = other + param_bytes * counts.total + buffers
        replicated = (world - 1) * ema
    saves = max(1, total_steps // max(1, interval_steps)) + (1 if total_steps % max(1, interval_steps) else 0)
    return CheckpointPlan(rank0, other, world, write_gbs, interval_steps, saves, replicated)
