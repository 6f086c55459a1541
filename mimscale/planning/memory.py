"""Per-rank memory of the model states under each ZeRO stage, and whether a micro batch fits.

DeepSpeed's own estimators (``estimate_zero2_model_states_mem_needs`` for ZeRO-1/2,
``estimate_zero3_model_states_mem_needs`` for ZeRO-3) count trainable parameters only: 16-bit weights, and
per partition 16-bit + fp32 gradients, fp32 master weights and Adam's two moments (18 bytes). The plan breaks
the same bytes into parameters / gradients / optimizer states (so that its total equals DeepSpeed's for a
model of trainable parameters only) and adds what a mimscale method holds besides:

* frozen parameters (EMA teachers, BEiT's tokenizer) as 16-bit module copies with no gradient or optimizer
  state, partitioned like the rest under ZeRO-3;
* the EMA teacher's fp32 shadow (:mod:`mimscale.ema`): the full teacher on every rank under ZeRO-0/1/2,
  this rank's partition under ZeRO-3;
* module buffers in the training dtype;
* DeepSpeed's gradient buckets, which its estimators leave out: under ZeRO-1/2 (with contiguous gradients)
  one or, with ``overlap_comm``, two ``reduce_bucket_size``-element buffers allocated for every backward at
  full size whatever the model's size; under ZeRO-3 one such buffer for the run, plus the parameters gathered
  around the running layer (the largest layer, its gradient, and the ``stage3_prefetch_bucket_size`` ahead);
* ZeRO-3's persistent parameters (fewer than ``stage3_param_persistence_threshold`` elements), kept whole on
  every rank.

In this DeepSpeed (0.19) ZeRO-1 reduces gradients into partitions during the backward exactly as ZeRO-2
does, so their peaks are the same (measured: ``tests/test_planning_measured.py``); ZeRO-1's difference
is in communication. The step adds a transient fp32 copy of the gradient partition (4 bytes per trainable
parameter / N), which DeepSpeed's estimators count as resident.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = [
    "MemoryPlan",
    "ModelStates",
    "ParamCounts",
    "ZeroSettings",
    "count_params",
    "deepspeed_estimate",
    "fit_micro_batch",
    "model_states",
    "zero_settings",
]

GIB = 1024**3


@dataclass(frozen=True)
class ParamCounts:
    """Parameter and buffer sizes of a method (built on the meta device: sizes only)."""

    trainable: int
    frozen: int  # requires_grad=False: EMA teachers, BEiT's tokenizer
    ema: int  # parameters (and float buffers) with an fp32 EMA shadow: the teacher's
    buffer_elements: int  # float buffers, cast to the training dtype
    other_buffer_bytes: int  # integer buffers (counters), kept as they are
    largest_layer: int  # most parameters held directly by one module (DeepSpeed's ``model_to_params``)
    largest_param: int  # the largest single parameter tensor
    sizes: tuple[
        tuple[int, bool], ...
    ]  # (numel, trainable) per parameter, for ZeRO-3's persistence threshold

    @property
    def total(self) -> int:
        return self.trainable + self.frozen

    def persistent(self, threshold: int) -> tuple[int, int]:
        """(trainable, frozen) elements of parameters ZeRO-3 keeps whole on every rank."""
        t = sum(n for n, trainable in self.sizes if n < threshold and trainable)
        f = sum(n for n, trainable in self.sizes if n < threshold and not trainable)
        return t, f


def count_params(method: torch.nn.Module) -> ParamCounts:
    """The :class:`ParamCounts` of ``method``: works on a meta-device method (numel only, no data)."""
    trainable = frozen = 0
    sizes = []
    for _, p in method.named_parameters():
        n = p.numel()
        sizes.append((n, bool(p.requires_grad)))
        if p.requires_grad:
            trainable += n
        else:
            frozen += n
    teacher = getattr(method, "teacher", None)
    ema = 0
    if teacher is not None and "_ema" in method.__dict__:
        ema = sum(p.numel() for p in teacher.parameters())
        ema += sum(b.numel() for b in teacher.buffers() if b.is_floating_point())
    float_buffers = sum(b.numel() for b in method.buffers() if b.is_floating_point())
    other = sum(b.numel() * b.element_size() for b in method.buffers() if not b.is_floating_point())
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in method.modules()), default=0)
    largest_param = max((n for n, _ in sizes), default=0)
    return ParamCounts(trainable, frozen, ema, float_buffers, other, largest, largest_param, tuple(sizes))


@dataclass(frozen=True)
class ZeroSettings:
    """The ZeRO options that change memory, with DeepSpeed's own defaults for the keys a file leaves out."""

    stage: int
    reduce_bucket_size: int
    overlap_comm: bool
    contiguous_gradients: bool
    prefetch_bucket_size: int
    param_persistence_threshold: int
    max_live_parameters: int
    offload_optimizer: bool
    offload_param: bool


def zero_settings(ds_config: dict[str, Any]) -> ZeroSettings:
    """Parse ``ds_config["zero_optimization"]`` with DeepSpeed's config class (its defaults, its checks)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    section = dict(ds_config.get("zero_optimization") or {})
    with contextlib.redirect_stdout(io.StringIO()):
        z = DeepSpeedZeroConfig(**section)
    stage = int(z.stage)

    def device(off: Any) -> bool:
        return off is not None and str(getattr(off, "device", "none")).split(".")[-1].lower() not in ("none",)

    return ZeroSettings(
        stage=stage,
        reduce_bucket_size=int(z.reduce_bucket_size),
        overlap_comm=bool(z.overlap_comm) if z.overlap_comm is not None else stage == 3,
        contiguous_gradients=bool(z.contiguous_gradients),
        prefetch_bucket_size=int(z.prefetch_bucket_size),
        param_persistence_threshold=int(z.param_persistence_threshold),
        max_live_parameters=int(z.max_live_parameters),
        offload_optimizer=device(z.offload_optimizer),
        offload_param=device(z.offload_param) and stage == 3,
    )


@dataclass(frozen=True)
class ModelStates:
    """Bytes per rank of one ZeRO stage. ``resident``: held through the whole step; ``backward_transient``:
    allocated during the backward (buckets, ZeRO-3's gathered layers); ``step_transient``: the fp32
    gradient partition the optimizer step builds. ``host_per_rank``: what optimizer/parameter offload moves
    to CPU memory."""

    stage: int
    params: int  # 16-bit module weights (trainable + frozen) this rank holds, and module buffers
    ema_shadow: int
    gradients: int  # the gradient partition held from the backward to the step
    optimizer: int  # fp32 master weights + Adam's two moments
    backward_transient: int
    step_transient: int
    host_per_rank: int
    deepspeed_estimate: int  # DeepSpeed's estimator for the trainable parameters (its device figure)

    @property
    def resident(self) -> int:
        return self.params + self.ema_shadow + self.gradients + self.optimizer

    @property
    def peak_without_activations(self) -> int:
        return self.resident + max(self.backward_transient, self.step_transient)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "resident": self.resident}


def deepspeed_estimate(
    counts: ParamCounts,
    stage: int,
    world: int,
    gpus_per_node: int,
    offload: bool = False,
    offload_param: bool = False,
) -> tuple[int, int]:
    """DeepSpeed's own (device, host) estimate for the trainable parameters at ``stage``, through its
    estimator functions (which assume 16-bit weights). Host bytes are per node."""
    nodes = max(1, world // gpus_per_node)
    per_node = min(world, gpus_per_node)
    with contextlib.redirect_stdout(io.StringIO()):
        if stage == 3:
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

            cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
                counts.trainable,
                counts.largest_layer,
                per_node,
                nodes,
                cpu_offload=offload,
                cpu_offload_params=offload_param,
                zero_init=False,
            )
        else:
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

            cpu, gpu = estimate_zero2_model_states_mem_needs(
                counts.trainable, per_node, nodes, cpu_offload=offload
            )
    return int(gpu), int(cpu)


def model_states(
    counts: ParamCounts, zero: ZeroSettings, world: int, gpus_per_node: int, param_bytes: int
) -> ModelStates:
    """Model-state bytes per rank for ``zero`` on ``world`` ranks with weights of ``param_bytes`` bytes
    (2 for bf16/fp16, 4 for fp32); see the module docstring for what is counted."""
    n = world if zero.stage >= 1 else 1
    t, f = counts.trainable, counts.frozen
    part = math.ceil(t / n)  # this rank's share of the trainable parameters
    buffers = counts.buffer_elements * param_bytes + counts.other_buffer_bytes
    optimizer = 12 * part  # fp32 master + exp_avg + exp_avg_sq
    fp32_grads = 4 * part  # built by the step from the gradient partition
    grads = param_bytes * part
    host = 0
    if zero.stage == 3:
        pt, pf = counts.persistent(zero.param_persistence_threshold)
        params = param_bytes * (math.ceil((t + f - pt - pf) / n) + pt + pf) + buffers
        ema = 4 * math.ceil(counts.ema / n)
        bucket = zero.reduce_bucket_size * param_bytes if zero.contiguous_gradients else 0
        gathered = min(zero.max_live_parameters, counts.largest_layer + zero.prefetch_bucket_size, t + f)
        backward = param_bytes * (gathered + counts.largest_layer)
        grads += bucket  # ZeRO-3 keeps its reduction bucket for the whole run
        if zero.offload_param:
            host += param_bytes * math.ceil((t + f) / n)
            params = param_bytes * (pt + pf) + buffers
    else:
        params = param_bytes * (t + f) + buffers
        # The gradients of every parameter that overlaps this rank's partition are kept whole until the step
        # (DeepSpeed's ``get_all_grad_tensors``): the partition plus the parts of the boundary parameters.
        grads = param_bytes * min(t, part + counts.largest_param)
        ema = 4 * counts.ema
        buckets = (2 if zero.overlap_comm else 1) if zero.contiguous_gradients else 0
        backward = buckets * zero.reduce_bucket_size * param_bytes
    if zero.offload_optimizer:
        host += optimizer + fp32_grads
        optimizer, fp32_grads = 0, 0
    gpu_est, _ = deepspeed_estimate(
        counts, max(zero.stage, 2), world, gpus_per_node, zero.offload_optimizer, zero.offload_param
    )
    return ModelStates(zero.stage, params, ema, grads, optimizer, backward, fp32_grads, host, gpu_est)


@dataclass(frozen=True)
class MemoryPlan:
    """One ZeRO stage at one micro batch: the peak per rank and whether it fits the device."""

    states: ModelStates
    activations_per_image: int
    micro_batch: int
    device_bytes: int
    margin: float  # fraction of the device kept free (CUDA context, NCCL, fragmentation)
    max_micro_batch: int  # the largest micro batch whose peak fits (0: not even one image)

    @property
    def activations(self) -> int:
        return self.activations_per_image * self.micro_batch

    @property
    def peak(self) -> int:
        s = self.states
        backward = s.resident + s.backward_transient + self.activations
        step = s.resident + s.step_transient
        return max(backward, step)

    @property
    def usable(self) -> int:
        return int(self.device_bytes * (1 - self.margin))

    @property
    def fits(self) -> bool:
        return self.peak <= self.usable

    def to_dict(self) -> dict[str, Any]:
        return {
            "zero_stage": self.states.stage,
            **{f"{k}_bytes": v for k, v in self.states.to_dict().items() if k != "stage"},
            "activations_bytes": self.activations,
            "activations_per_image_bytes": self.activations_per_image,
            "micro_batch": self.micro_batch,
            "peak_bytes": self.peak,
            "usable_bytes": self.usable,
            "fits": self.fits,
            "max_micro_batch": self.max_micro_batch,
        }


def fit_micro_batch(states: ModelStates, activations_per_image: int, device_bytes: int, margin: float) -> int:
    """The largest micro batch whose peak (:class:`MemoryPlan`) stays within the usable memory."""
    usable = int(device_bytes * (1 - margin))
    if states.resident + states.step_transient > usable:
        return 0
    room = usable - states.resident - states.backward_transient
    if room <= 0 or activations_per_image <= 0:
        return 0 if room <= 0 else 1 << 20
    return room // activations_per_image
