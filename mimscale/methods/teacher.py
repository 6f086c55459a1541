"""One mixin for every method with an EMA teacher (iBOT, data2vec, LUT), as lightly's momentum mixin is for
its self-supervised models: the plumbing lives here once, the arithmetic stays in :mod:`mimscale.ema`.

What the mixin owns:

* building the teacher as a frozen deep copy of the student modules it mirrors, registered as the method's
  ``teacher`` submodule (so DeepSpeed casts and ZeRO-3 partitions it like the student), with DeepSpeed's
  external-parameter declarations re-keyed for the copies (ZeRO-3 looks them up by ``id``);
* the :class:`~mimscale.ema.EMATeacher`, kept off the module tree so nothing is registered or checkpointed
  twice;
* eval mode: ``method.train()`` never puts the teacher in training mode (no dropout, drop path or BatchNorm
  batch statistics in the teacher), whatever its container;
* :meth:`after_optimizer_step`, chainable: a method that has more to do after a step (iBOT's centres)
  does it and calls ``super()``;
* the per-rank teacher state in checkpoints, strict: a checkpoint without it raises
  :class:`MissingTeacherStateError` instead of resuming with a fresh teacher;
* the ``ema_momentum`` metric.

A method with an EMA teacher::

    @register_method
    class MyMethod(EMATeacherMixin, Method):
        def __init__(self, ...):
            super().__init__()
            self.encoder = MaskedEncoder(...)
            self.head = ...
            self.init_teacher(nn.ModuleDict({"encoder": self.encoder, "head": self.head}),
                              MomentumSchedule("cosine", 0.996, 1.0))
            self.encoder.use_external(self.mask_token)   # after init_teacher: the teacher needs no mask token

        def forward(self, images, mask=None):
            with torch.no_grad():
                target = self.teacher.head(self.teacher.encoder(images)[0])
            ...
            metrics = {..., "ema_momentum": self.momentum_metric(loss.device)}
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from mimscale.ema import EMATeacher, MomentumSchedule, make_teacher
from mimscale.models.encoder import rekey_external_params

__all__ = ["EMATeacherMixin", "MissingTeacherStateError"]

STATE_KEY = "ema"


class MissingTeacherStateError(KeyError):
    """A checkpoint's per-rank method state has no EMA teacher state: resuming would restart the teacher."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class EMATeacherMixin:
    """Mix into a :class:`~mimscale.methods.base.Method` (before it in the bases) and call
    :meth:`init_teacher` in ``__init__`` after the student modules exist and are initialised."""

    teacher: nn.Module

    def init_teacher(
        self, student: nn.Module, schedule: MomentumSchedule, *, include_buffers: bool = True
    ) -> None:
        """Build ``self.teacher`` as a frozen copy of ``student`` and the EMA that keeps it averaged.

        ``student`` is the module the teacher mirrors, or an ``nn.ModuleDict`` view of several of the
        method's modules (its entries stay registered where they are; the view is not registered). Call it
        after the student's init, so the teacher starts equal to the student (timm's ``ModelEmaV2``
        deep-copies
        the freshly built model too), and before declaring parameters the teacher must not share (mask
        tokens), since the copy would duplicate them.
        """
        teacher = make_teacher(student)
        rekey_external_params(teacher)
        self.teacher = teacher
        object.__setattr__(
            self, "_ema", EMATeacher(student, teacher, schedule, include_buffers=include_buffers)
        )

    @property
    def ema(self) -> EMATeacher:
        ema = self.__dict__.get("_ema")
        if ema is None:
            raise AttributeError(f"{type(self).__name__}: init_teacher() was not called in __init__")
        return ema

    def train(self, mode: bool = True) -> Any:
        super().train(mode)  # type: ignore[misc]
        self.teacher.eval()
        return self

    def after_optimizer_step(self, step: int, total_steps: int, engine: Any = None) -> None:
        """The EMA update after optimizer step ``step`` (1-based); collective under ZeRO-3."""
        super().after_optimizer_step(step, total_steps, engine)  # type: ignore[misc]
        self.ema.update(step, total_steps)

    def sharded_state_dict(self) -> dict[str, Any]:
        return {**super().sharded_state_dict(), STATE_KEY: self.ema.state_dict()}  # type: ignore[misc]

    def load_sharded_state_dict(self, state: dict[str, Any]) -> None:
        if STATE_KEY not in state:
            name = getattr(self, "name", type(self).__name__)
            raise MissingTeacherStateError(
                f"{name}: the checkpoint's per-rank method state has no {STATE_KEY!r} entry (the EMA "
                f"teacher's fp32 shadow); resuming would restart the teacher from the student. Resume from "
                f"a checkpoint written by this method, or export the weights and start a new run"
            )
        self.ema.load_state_dict(state[STATE_KEY])
        super().load_sharded_state_dict(state)  # type: ignore[misc]

    def teacher_export_prefix(self) -> str:
        """The state-dict prefix of the teacher's timm encoder inside the method
        (``teacher.encoder.backbone.`` when the teacher mirrors an encoder and a head,
        ``teacher.backbone.`` when it mirrors the encoder alone)."""
        from mimscale.models.encoder import MaskedEncoder

        for name, module in self.teacher.named_modules():
            if isinstance(module, MaskedEncoder):
                return f"teacher.{name}.backbone." if name else "teacher.backbone."
        raise AttributeError(f"{type(self).__name__}: the teacher holds no MaskedEncoder")

    teacher_precision: str = "train"

    def run_teacher(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """Call ``module`` (the teacher or one of its submodules) in the teacher's precision.

        ``teacher_precision="train"``: as built, in the training dtype (bf16 under bf16). ``"fp32"``: with the
        fp32 EMA shadow as weights and fp32 inputs, outside autocast, as the official data2vec computes its
        targets. Under ZeRO-3 each rank holds only partitions of the shadow, so the teacher then runs in the
        training dtype (said once).
        """
        if self.teacher_precision != "fp32":
            return module(*args, **kwargs)
        shadow = self.ema.full_shadow()
        if shadow is None:
            if not getattr(self, "_warned_precision", False):
                object.__setattr__(self, "_warned_precision", True)
                warnings.warn("teacher_precision='fp32': the EMA shadow is ZeRO-3 partitioned, so the "
                              "teacher runs in the training dtype", stacklevel=2)
            return module(*args, **kwargs)
        prefix = next(name for name, m in self.teacher.named_modules() if m is module)
        prefix = f"{prefix}." if prefix else ""
        params = {k[len(prefix):]: v for k, v in shadow.items() if k.startswith(prefix)}
        args = tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
        device = next(iter(params.values())).device.type if params else "cpu"
        with torch.autocast(device_type=device, enabled=False):
            return torch.func.functional_call(module, params, args, kwargs, strict=False)

    def current_momentum(self) -> float:
        """The momentum of the latest teacher update (restored on resume); the schedule's start before any."""
        m = self.ema.momentum
        return self.ema.schedule.base if m is None else float(m)

    def momentum_metric(self, device: torch.device | str) -> torch.Tensor:
        return torch.tensor(self.current_momentum(), device=device)
