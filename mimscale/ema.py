"""EMA teachers (iBOT, data2vec, LUT): momentum schedules and a ZeRO-aware exponential moving average.

The teacher is an ordinary submodule of the method (``method.teacher``), so DeepSpeed treats it like the
student: same dtype, and under ZeRO-3 the same per-parameter partitioning, gathered layer by layer by
ZeRO-3's hooks when it runs. :class:`EMATeacher` is a plain object beside the modules (never registered
as a submodule) that updates the teacher after every optimizer step:

* The recurrence ``shadow = m * shadow + (1 - m) * student`` runs on an fp32 *shadow* of the teacher,
  then the shadow is copied into the teacher in the teacher's dtype. Running it on a bf16 teacher would
  stall: with m = 0.9998, ``(1 - m) * (student - teacher)`` is far below bf16's resolution near 1.
* Only this rank's shards are touched, with no gather of the student: under ZeRO-3 the local partition
  (``param.ds_tensor``), read from the student's fp32 master partition when the ZeRO-3 optimizer exposes
  it; under ZeRO-0/1/2 the full tensors every rank already holds.
* Float buffers (BatchNorm running statistics; LUT averages them too) are averaged the same way; integer
  buffers (``num_batches_tracked``) are copied.

Methods do not use these pieces directly: :class:`mimscale.methods.teacher.EMATeacherMixin` builds the
teacher with :func:`make_teacher`, owns the :class:`EMATeacher`, calls :meth:`EMATeacher.update` after each
optimizer step and puts :meth:`EMATeacher.state_dict` into the method's per-rank checkpoint state, which
the trainer's checkpointer writes beside DeepSpeed's shards (``extra_rank{rank}.pt``) and restores after
``engine.load_checkpoint`` (which may itself overwrite the teacher). Used alone::

    teacher = make_teacher(student)                  # before deepspeed.initialize
    ema = EMATeacher(student, teacher, MomentumSchedule("cosine", 0.996, 1.0))
    ...                                              # after each engine.step(), on every rank:
    ema.update(engine.global_steps, total_steps)
"""

from __future__ import annotations

import copy
import dataclasses
import math
import operator
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mimscale.dist import get_rank

__all__ = ["MomentumSchedule", "EMATeacher", "make_teacher", "consolidate_state_dicts"]

STATE_VERSION = 1
_KINDS = ("cosine", "linear", "constant")


def _as_step(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name}={value!r}: expected an int")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}={value!r}: expected an int") from None
    if value < minimum:
        raise ValueError(f"{name}={value}: expected >= {minimum}")
    return value


@dataclass(frozen=True)
class MomentumSchedule:
    """Teacher momentum ``m`` as a function of the 0-based optimizer step.

    * ``"cosine"`` (BYOL, iBOT, LUT): ``m = final - (final - base) * (cos(pi * t) + 1) / 2`` with
      ``t = step / horizon``, so ``m(0) = base`` and ``m`` reaches ``final`` at ``step = horizon``.
      This is DINO/iBOT's ``cosine_scheduler`` (``np.arange(total)``, no warmup).
    * ``"linear"`` (data2vec's ``ema_anneal_end_step``): ``m = base + (final - base) * t``.
    * ``"constant"``: ``m = base`` (data2vec vision's published runs: 0.9998); ``final`` is ignored.

    ``horizon`` is ``ramp_steps`` when given, else the ``total_steps`` passed to each call; past the
    horizon ``m`` stays at ``final``.
    """

    kind: str = "cosine"
    base: float = 0.996
    final: float = 1.0
    ramp_steps: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"kind={self.kind!r}: expected one of {_KINDS}")
        for name in ("base", "final"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value!r}: a momentum must be a float in [0, 1]")
            object.__setattr__(self, name, float(value))
        if self.ramp_steps is not None:
            if self.kind == "constant":
                raise ValueError("ramp_steps is meaningless for kind='constant'; leave it None")
            object.__setattr__(self, "ramp_steps", _as_step(self.ramp_steps, "ramp_steps", 0))

    def __call__(self, step: int, total_steps: int) -> float:
        """Momentum after the optimizer step with 0-based index ``step`` of a run of ``total_steps``."""
        step = _as_step(step, "step", 0)
        total_steps = _as_step(total_steps, "total_steps", 1)
        if self.kind == "constant":
            return self.base
        horizon = self.ramp_steps if self.ramp_steps is not None else total_steps
        t = 1.0 if horizon == 0 else min(step, horizon) / horizon
        if self.kind == "linear":
            return self.base + (self.final - self.base) * t
        return self.final - (self.final - self.base) * (math.cos(math.pi * t) + 1.0) / 2.0


def _stay_in_eval(module: nn.Module, args: Any) -> None:
    # Forward pre-hook of a teacher: a parent's ``.train()`` flips every descendant to training mode,
    # which would make BatchNorm use (and update) batch statistics and turn dropout on in the teacher.
    if module.training:
        module.eval()


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of ``student`` to register as the method's teacher.

    Deep copy, ``requires_grad`` off (so DeepSpeed gives it no optimizer state and ZeRO-3 reduces no
    gradients for it), eval mode, and a forward pre-hook that puts it back in eval mode if a parent's
    ``.train()`` flipped it. Build it before ``deepspeed.initialize``; a student already partitioned by
    ``deepspeed.zero.Init`` cannot be deep-copied (the copy would alias its partitions): build the teacher
    with the same constructor inside ``zero.Init`` and call :meth:`EMATeacher.reset_from_student` after
    ``deepspeed.initialize``.
    """
    if any(hasattr(p, "ds_id") for p in student.parameters()):
        raise RuntimeError(
            "make_teacher: the student is already ZeRO-3 partitioned (built under deepspeed.zero.Init); "
            "deepcopy would alias its partitions. Build the teacher with the same constructor inside "
            "zero.Init, then call EMATeacher.reset_from_student() after deepspeed.initialize.")
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
        p.grad = None
    teacher.eval()
    # A container (ModuleDict/ModuleList: iBOT's and LUT's encoder + head) is never called itself: hook the
    # modules that are.
    hooked = list(teacher.children()) if isinstance(teacher, (nn.ModuleDict, nn.ModuleList)) else [teacher]
    for m in hooked:
        m.register_forward_pre_hook(_stay_in_eval)
    return teacher


def _is_zero3(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id") and hasattr(p, "ds_tensor")


def _full_shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(p.ds_shape) if _is_zero3(p) else tuple(p.shape)


def _partition_of(p: torch.Tensor) -> tuple[int, int] | None:
    """(rank, world size) of ``p``'s ZeRO-3 partition group, or None for a full tensor."""
    if not _is_zero3(p):
        return None
    rank = getattr(p, "ds_zero_partition_rank", None)
    world = getattr(p, "ds_zero_partition_world_size", None)
    if rank is None or world is None:
        import deepspeed.comm as dist

        rank = dist.get_rank(group=p.ds_process_group)
        world = dist.get_world_size(group=p.ds_process_group)
    return int(rank), int(world)


def _teacher_storage(p: torch.Tensor) -> torch.Tensor:
    """The tensor holding this rank's copy of a teacher parameter: its ZeRO-3 partition, or its data."""
    if not _is_zero3(p):
        return p.data
    part = p.ds_tensor
    if hasattr(part, "ds_quant_scale"):
        raise NotImplementedError("EMATeacher: ZeRO-3 'zero_quantized_nontrainable_weights' stores the "
                                  "frozen teacher quantized; the EMA cannot write into it. Turn it off.")
    if str(getattr(part, "final_location", None)).endswith("nvme"):
        raise NotImplementedError("EMATeacher: teacher partitions offloaded to NVMe are not supported; "
                                  "use offload_param device 'cpu' or 'none'.")
    return part.data


class EMATeacher:
    """Keeps ``teacher`` an exponential moving average of ``student`` under any ZeRO stage.

    Not an ``nn.Module``: it holds references to two modules the method already owns, so nothing is
    registered (or checkpointed by DeepSpeed) twice. Parameters and buffers are paired by name; the
    structures must match exactly. The fp32 shadow is created lazily, at the first :meth:`update`,
    :meth:`state_dict`, :meth:`load_state_dict` or :meth:`reset_from_student`, i.e. after
    ``deepspeed.initialize`` has cast and partitioned the modules.

    Under ZeRO-3, :meth:`update`, :meth:`load_state_dict` and :meth:`reset_from_student` are collective
    (teacher parameters ZeRO-3 keeps gathered, the small "persistent" ones, are re-gathered after their
    partition changes, as DeepSpeed does for the student after ``step``): call them on every rank.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, schedule: MomentumSchedule,
                 include_buffers: bool = True) -> None:
        if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
            raise TypeError("EMATeacher(student, teacher, ...): both must be nn.Module instances")
        if student is teacher:
            raise ValueError("EMATeacher: student and teacher are the same module")
        if not isinstance(schedule, MomentumSchedule):
            raise TypeError(f"schedule={schedule!r}: expected a MomentumSchedule")
        trainable = [n for n, p in teacher.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(f"EMATeacher: teacher parameters require grad ({trainable[:5]}); the optimizer "
                             "would train them. Build the teacher with make_teacher() or "
                             "requires_grad_(False).")
        self._modules: list[nn.Module] = [student, teacher]  # a list: never registered as submodules
        self.schedule = schedule
        self.include_buffers = bool(include_buffers)
        self._param_names, self._buffer_names = self._pair_names()
        self._shadow_params: dict[str, torch.Tensor] | None = None
        self._shadow_buffers: dict[str, torch.Tensor] | None = None
        self._step: int | None = None
        self._momentum: float | None = None
        self._warned_fallback = False

    # ------------------------------------------------------------------ accessors
    @property
    def student(self) -> nn.Module:
        return self._modules[0]

    @property
    def teacher(self) -> nn.Module:
        return self._modules[1]

    @property
    def momentum(self) -> float | None:
        """The momentum of the last update (None before the first): log it."""
        return self._momentum

    @property
    def step(self) -> int | None:
        """The optimizer step count passed to the last update (None before the first)."""
        return self._step

    # ------------------------------------------------------------------ pairing and lazy init
    def _pair_names(self) -> tuple[list[str], list[str]]:
        s_params = dict(self.student.named_parameters())
        t_params = dict(self.teacher.named_parameters())
        _check_same_names("parameters", s_params, t_params)
        for name, sp in s_params.items():
            tp = t_params[name]
            if sp is tp:
                raise ValueError(f"EMATeacher: parameter {name!r} is shared by student and teacher")
            if _full_shape(sp) != _full_shape(tp):
                raise ValueError(f"EMATeacher: parameter {name!r} has shape {_full_shape(sp)} in the student "
                                 f"but {_full_shape(tp)} in the teacher")
        buffer_names: list[str] = []
        if self.include_buffers:
            s_bufs = dict(self.student.named_buffers())
            t_bufs = dict(self.teacher.named_buffers())
            _check_same_names("buffers", s_bufs, t_bufs)
            for name, sb in s_bufs.items():
                if sb.shape != t_bufs[name].shape:
                    raise ValueError(f"EMATeacher: buffer {name!r} has shape {tuple(sb.shape)} in the "
                                     f"student but {tuple(t_bufs[name].shape)} in the teacher")
            buffer_names = list(s_bufs)
        return list(s_params), buffer_names

    def _resolve(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        # Looked up by name every time: `.to()`/`.bfloat16()` (DeepSpeed does both) replace buffer objects.
        s_params = dict(self.student.named_parameters())
        t_params = dict(self.teacher.named_parameters())
        s_bufs = dict(self.student.named_buffers()) if self.include_buffers else {}
        t_bufs = dict(self.teacher.named_buffers()) if self.include_buffers else {}
        for name in self._param_names:
            sp, tp = s_params.get(name), t_params.get(name)
            if sp is None or tp is None:
                raise RuntimeError(f"EMATeacher: parameter {name!r} disappeared from the student or teacher")
            if _is_zero3(sp) != _is_zero3(tp):
                raise RuntimeError(f"EMATeacher: parameter {name!r} is ZeRO-3 partitioned in only one of "
                                   "student and teacher; both must live in the module DeepSpeed wraps")
            if _is_zero3(sp) and sp.ds_tensor.numel() != tp.ds_tensor.numel():
                raise RuntimeError(f"EMATeacher: parameter {name!r} is partitioned differently in student "
                                   f"({sp.ds_tensor.numel()}) and teacher ({tp.ds_tensor.numel()})")
        return s_params, t_params, s_bufs, t_bufs

    def _ensure_init(self) -> None:
        if self._shadow_params is not None:
            return
        _, t_params, _, t_bufs = self._resolve()
        self._shadow_params = {
            name: _teacher_storage(t_params[name]).detach().to(torch.float32, copy=True)
            for name in self._param_names}
        self._shadow_buffers = {
            name: t_bufs[name].detach().to(torch.float32, copy=True)
            for name in self._buffer_names if t_bufs[name].is_floating_point()}

    def _check_layout(self, t_params: dict[str, torch.Tensor]) -> None:
        for name, shadow in self._shadow_params.items():
            storage = _teacher_storage(t_params[name])
            if shadow.numel() != storage.numel():
                raise RuntimeError(
                    f"EMATeacher: the shadow of {name!r} has {shadow.numel()} elements but the teacher's "
                    f"local storage {storage.numel()}: the shadow was created before deepspeed.initialize "
                    "partitioned the model. Create/use the EMATeacher only after deepspeed.initialize.")

    # ------------------------------------------------------------------ student side
    def _student_source(self, name: str, sp: torch.Tensor) -> torch.Tensor:
        """This rank's view of a student parameter in the best precision available without communication."""
        if not _is_zero3(sp):
            return sp.detach()
        opt = getattr(sp, "_z3_optimizer", None)
        # NVMe-swapped optimizer states would be read from disk once per parameter: use the partition.
        if opt is not None and sp.requires_grad and not getattr(opt, "swap_optimizer", False):
            from deepspeed.utils import safe_get_local_fp32_param

            master = safe_get_local_fp32_param(sp)
            if master is not None and master.numel() == sp.ds_tensor.numel():
                return master.view(-1)
            if not self._warned_fallback:
                self._warned_fallback = True
                warnings.warn(f"EMATeacher: the fp32 master partition of {name!r} does not match its ZeRO-3 "
                              "partition; averaging the low-precision partitions instead", stacklevel=3)
        return sp.ds_tensor.detach()

    # ------------------------------------------------------------------ teacher side
    def _write_teacher(self, t_params: dict[str, torch.Tensor], s_bufs: dict[str, torch.Tensor],
                       t_bufs: dict[str, torch.Tensor]) -> None:
        z3 = [t_params[n] for n in self._param_names if _is_zero3(t_params[n])]
        gathered = []
        if z3:
            from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

            if any(p.ds_status == ZeroParamStatus.INFLIGHT for p in z3):
                raise RuntimeError("EMATeacher: a teacher parameter is being gathered; update the teacher "
                                   "between forward passes, after engine.step()")
            # Gathered (persistent) teacher parameters would keep serving stale full copies: release them
            # now and gather them again below, once their partitions hold the new values.
            gathered = [p for p in z3 if p.ds_status == ZeroParamStatus.AVAILABLE]
            if gathered:
                gathered[0].partition(param_list=gathered)
        for name in self._param_names:
            tp = t_params[name]
            storage = _teacher_storage(tp)
            storage.copy_(self._shadow_params[name].view_as(storage))
            if getattr(tp, "ds_secondary_tensor", None) is not None:
                tp.ds_secondary_tensor = None  # ZeRO++ hpZ copy is stale; rebuilt from the primary
        if gathered:
            gathered[0].all_gather(param_list=gathered)
        for name in self._buffer_names:
            target = t_bufs[name]
            source = self._shadow_buffers.get(name)
            target.copy_(s_bufs[name] if source is None else source)

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def update(self, step: int, total_steps: int) -> float:
        """One EMA step after optimizer step number ``step`` (1-based count of completed steps, as
        ``engine.global_steps`` after ``engine.step()``), of ``total_steps``.

        Uses the momentum ``schedule(step - 1, total_steps)``, so the first update uses ``base`` as in
        iBOT/DINO (whose schedule is indexed by the 0-based iteration). Returns the momentum.
        """
        step = _as_step(step, "step", 1)
        m = self.schedule(step - 1, total_steps)
        self._ensure_init()
        s_params, t_params, s_bufs, t_bufs = self._resolve()
        self._check_layout(t_params)
        shadows, sources = [], []
        for name in self._param_names:
            shadow = self._shadow_params[name]
            shadows.append(shadow)
            sources.append(self._student_source(name, s_params[name]).to(shadow.device).view_as(shadow))
        for name, shadow in self._shadow_buffers.items():
            shadows.append(shadow)
            sources.append(s_bufs[name].detach().to(shadow.device))
        if shadows:
            torch._foreach_mul_(shadows, m)
            torch._foreach_add_(shadows, sources, alpha=1.0 - m)
        self._write_teacher(t_params, s_bufs, t_bufs)
        self._step, self._momentum = step, m
        return m

    def full_shadow(self) -> dict[str, torch.Tensor] | None:
        """The fp32 shadow as whole tensors by name (parameters and float buffers), to run the teacher in
        fp32; None under ZeRO-3, where each rank holds only its partitions."""
        self._ensure_init()
        _, t_params, _, _ = self._resolve()
        if any(_is_zero3(t_params[n]) for n in self._param_names):
            return None
        return {**self._shadow_params, **self._shadow_buffers}

    @torch.no_grad()
    def reset_from_student(self) -> None:
        """Set the teacher (and shadow) to the student, shard by shard: for teachers not built by deepcopy
        (e.g. under ``zero.Init``); call after ``deepspeed.initialize``, before the first step."""
        self._ensure_init()
        s_params, t_params, s_bufs, t_bufs = self._resolve()
        self._check_layout(t_params)
        for name, shadow in self._shadow_params.items():
            shadow.copy_(self._student_source(name, s_params[name]).view_as(shadow))
        for name, shadow in self._shadow_buffers.items():
            shadow.copy_(s_bufs[name])
        self._write_teacher(t_params, s_bufs, t_bufs)

    def state_dict(self) -> dict[str, Any]:
        """This rank's shadow (fp32, on CPU) with the last step and momentum.

        Under ZeRO-3 the tensors are this rank's flat partitions; save one file per rank (the trainer's
        checkpointer writes it into ``extra_rank{rank}.pt`` of the checkpoint's tag directory). ``layout``
        records each parameter's full shape and partition so :func:`consolidate_state_dicts` can merge them.
        """
        self._ensure_init()
        _, t_params, _, _ = self._resolve()
        return {
            "version": STATE_VERSION,
            "rank": get_rank(),
            "step": self._step,
            "momentum": self._momentum,
            "schedule": dataclasses.asdict(self.schedule),
            "params": {n: t.detach().to("cpu", copy=True) for n, t in self._shadow_params.items()},
            "buffers": {n: t.detach().to("cpu", copy=True) for n, t in self._shadow_buffers.items()},
            "layout": {n: {"shape": list(_full_shape(t_params[n])), "partition": _partition_of(t_params[n])}
                       for n in self._param_names},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the shadow and copy it into the teacher; call after ``engine.load_checkpoint`` (which
        may itself overwrite the teacher). Accepts this rank's own state, or a full (unpartitioned) state
        such as :func:`consolidate_state_dicts` returns, whatever the ZeRO stage and world size now."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"EMATeacher state version {state.get('version')!r}: expected {STATE_VERSION}")
        self._ensure_init()
        _, t_params, s_bufs, t_bufs = self._resolve()
        self._check_layout(t_params)
        _check_same_names("parameters", self._shadow_params, state["params"], ("teacher", "EMA state"))
        _check_same_names("float buffers", self._shadow_buffers, state["buffers"], ("teacher", "EMA state"))
        for name, shadow in self._shadow_params.items():
            saved = state["params"][name]
            saved_layout = state["layout"][name]
            here = _partition_of(t_params[name])
            saved_part = None if saved_layout["partition"] is None else tuple(saved_layout["partition"])
            if list(saved_layout["shape"]) != list(_full_shape(t_params[name])):
                raise ValueError(f"EMA state: {name!r} has shape {saved_layout['shape']}, the teacher "
                                 f"{list(_full_shape(t_params[name]))}")
            if saved_part == here:
                value = saved
            elif saved_part is None:  # a full tensor: cut out this rank's partition
                rank, world = here
                flat = saved.reshape(-1)
                size = shadow.numel()
                value = torch.zeros(size, dtype=flat.dtype)
                piece = flat[rank * size:(rank + 1) * size]
                value[:piece.numel()] = piece
            else:
                raise ValueError(f"EMA state: {name!r} is the ZeRO-3 partition {saved_part} (rank, world "
                                 f"size) but this rank needs {here}; merge all ranks' states with "
                                 "consolidate_state_dicts() and load the result")
            if value.numel() != shadow.numel():
                raise ValueError(f"EMA state: {name!r} has {value.numel()} elements, "
                                 f"expected {shadow.numel()}")
            shadow.copy_(value.reshape(shadow.shape))
        for name, shadow in self._shadow_buffers.items():
            shadow.copy_(state["buffers"][name].reshape(shadow.shape))
        self._step, self._momentum = state["step"], state["momentum"]
        self._write_teacher(t_params, s_bufs, t_bufs)


def consolidate_state_dicts(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Merge every rank's :meth:`EMATeacher.state_dict` into one unpartitioned state.

    The result loads into an :class:`EMATeacher` of any ZeRO stage and world size (resuming elsewhere),
    and ``{**result["params"], **result["buffers"]}`` is the fp32 teacher's state dict (to export the
    teacher, as iBOT releases it). Buffers are taken from the lowest rank.
    """
    if not states:
        raise ValueError("consolidate_state_dicts: no states given")
    states = sorted(states, key=lambda s: s.get("rank", 0))
    first = states[0]
    merged_params: dict[str, torch.Tensor] = {}
    layout: dict[str, dict[str, Any]] = {}
    for name, info in first["layout"].items():
        shape = tuple(info["shape"])
        if info["partition"] is None:
            merged_params[name] = first["params"][name].reshape(shape).clone()
        else:
            world = info["partition"][1]
            shards: dict[int, torch.Tensor] = {}
            for s in states:
                part = s["layout"][name]["partition"]
                if part is None or part[1] != world:
                    raise ValueError(f"consolidate_state_dicts: {name!r} is partitioned inconsistently "
                                     "across states")
                shards[part[0]] = s["params"][name].reshape(-1)
            if sorted(shards) != list(range(world)):
                raise ValueError(f"consolidate_state_dicts: {name!r} needs partitions 0..{world - 1}, "
                                 f"got {sorted(shards)}")
            flat = torch.cat([shards[r] for r in range(world)])
            merged_params[name] = flat[:math.prod(shape)].reshape(shape).clone()
        layout[name] = {"shape": list(shape), "partition": None}
    return {
        "version": STATE_VERSION,
        "rank": first.get("rank", 0),
        "step": first["step"],
        "momentum": first["momentum"],
        "schedule": first.get("schedule"),
        "params": merged_params,
        "buffers": {n: t.clone() for n, t in first["buffers"].items()},
        "layout": layout,
    }


def _check_same_names(what: str, ours: dict[str, Any], theirs: dict[str, Any],
                      labels: tuple[str, str] = ("student", "teacher")) -> None:
    if ours.keys() == theirs.keys():
        return
    only_ours = sorted(set(ours) - set(theirs))
    only_theirs = sorted(set(theirs) - set(ours))
    raise ValueError(f"EMATeacher: {what} differ: only in the {labels[0]} {only_ours[:8]}, "
                     f"only in the {labels[1]} {only_theirs[:8]}")
