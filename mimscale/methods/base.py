"""The method interface every pretraining objective implements, and the registry behind ``create_method``.

A method is an ``nn.Module`` that owns its encoder, heads, masker and (if any) EMA teacher, and maps a
batch of normalised images to a :class:`MethodOutput`. The training loop knows nothing else about it,
so adding a method never touches the loop.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from mimscale.flops import EncoderPass


@dataclass
class MethodOutput:
    """What one forward pass of a method returns.

    ``loss`` is the scalar to backprop; ``metrics`` are detached scalars for logging (e.g. ``loss_mae``);
    ``pred``/``target`` are what the loss compares, per patch ``[B, L, ...]``; ``mask`` ``[B, L]`` bool
    marks the positions the loss covers.
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    pred: torch.Tensor | None = None
    target: torch.Tensor | None = None
    mask: torch.Tensor | None = None


class Method(nn.Module):
    """Base class: subclasses set ``name``, build ``self.encoder`` and implement ``forward``.

    The whole contract between a method and the trainer (which calls nothing else; every hook has a default):

    * ``views``: how many augmented views the data pipeline must deliver (1 = a plain tensor). The trainer
      checks it against the recipe's transform before anything starts.
    * ``after_optimizer_step(step, total_steps, engine)``: after each optimizer step, e.g. EMA updates.
    * ``set_epoch_progress(step, steps_per_epoch)``: for schedules defined per epoch (temperatures).
    * ``no_weight_decay()``: parameter names that must not be decayed, beyond biases and 1-D tensors.
    * ``lr_frozen_params(steps_per_epoch)``: parameters whose learning rate is held at 0 for a while.
    * ``set_grad_checkpointing(enable)``: activation checkpointing, as timm's switch of the same name.
    * ``sharded_state_dict()`` / ``load_sharded_state_dict(state)``: per-rank state DeepSpeed does not save.
    * ``export_spec()``: the timm architecture and the state-dict prefix of the encoder to export.
    * ``reconstruct(images, out)``: picture rows for the run's ``reconstructions.png`` (None: no picture).
    * ``encoder_passes()`` / ``head_flops()``: what the encoder sees and the heads cost, for FLOPs and MFU.
    * ``smoke_kwargs``: constructor overrides that shrink the method's own modules for ``--smoke`` runs.

    Methods with an EMA teacher mix in :class:`mimscale.methods.teacher.EMATeacherMixin`.
    """

    name: ClassVar[str] = ""
    # Which network the paper evaluates and releases when the method has an EMA teacher: iBOT (and DINO)
    # the teacher, data2vec and LUT the student. Evaluation and export default to it.
    evaluates_teacher: ClassVar[bool] = False
    default_model_name: ClassVar[str] = "vit_base_patch16_224"
    smoke_kwargs: ClassVar[dict[str, Any]] = {}
    views: ClassVar[int] = 1

    encoder: nn.Module

    def forward(
        self, images: torch.Tensor | list[torch.Tensor], mask: torch.Tensor | None = None
    ) -> MethodOutput:
        raise NotImplementedError

    def after_optimizer_step(self, step: int, total_steps: int, engine: Any = None) -> None:
        """Called once per optimizer step with the 1-based number of completed steps."""

    def set_epoch_progress(self, step: int, steps_per_epoch: int) -> None:
        """Called before each forward with the 0-based optimizer step, for per-epoch schedules."""

    def no_weight_decay(self) -> set[str]:
        return set()

    def lr_frozen_params(self, steps_per_epoch: int) -> dict[str, int]:
        """Parameter-name prefixes whose learning rate is held at 0 for the first N optimizer steps
        (e.g. iBOT/DINO freeze the last head layer during the first epoch)."""
        return {}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in backward to trade compute for memory (the encoder's blocks by default;
        methods with a large head or decoder switch it too)."""
        self.encoder.set_grad_checkpointing(enable)

    def sharded_state_dict(self) -> dict[str, Any]:
        """Per-rank state DeepSpeed does not save (e.g. EMA fp32 shadows); written beside each checkpoint."""
        return {}

    def load_sharded_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`sharded_state_dict` returned on this rank."""

    def export_spec(self) -> tuple[str, dict[str, Any], str]:
        """(timm model name, timm kwargs, state-dict prefix of the encoder's timm module in this method)."""
        return self.encoder.timm_name, dict(self.encoder.timm_kwargs), "encoder.backbone."

    def reconstruct(self, images: Any, out: MethodOutput) -> dict[str, torch.Tensor] | None:
        """Rows of normalised-space images (``original``, ``masked``, ``reconstruction``) for the picture the
        trainer writes after a run, from a batch and its output; None for methods without pixel outputs."""
        return None

    def encoder_passes(self) -> list[EncoderPass]:
        """The encoder runs one image costs: by default one full-token pass over the model's grid."""
        num_patches = self.encoder.num_patches
        return [EncoderPass(patches=num_patches, tokens=1 + num_patches)]

    def head_flops(self) -> dict[str, int]:
        """Forward FLOPs per image of the heads the FLOP count models (MAE's decoder); none by default."""
        return {}


_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` reachable as ``create_method(cls.name, ...)``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _METHODS[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    _import_all()
    return sorted(_METHODS)


def get_method_class(name: str) -> type[Method]:
    _import_all()
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}: expected one of {sorted(_METHODS)}")
    return _METHODS[name]


def method_kwarg_names(name: str) -> set[str]:
    """The keyword arguments a method's constructor accepts itself (the rest go to the timm encoder)."""
    cls = get_method_class(name)
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass in (Method, nn.Module, object):
            break
        sig = inspect.signature(klass.__init__)
        names |= {
            p
            for p, v in sig.parameters.items()
            if p != "self" and v.kind is v.KEYWORD_ONLY or (p != "self" and v.kind is v.POSITIONAL_OR_KEYWORD)
        }
    return names


def create_method(name: str, **kwargs: Any) -> Method:
    """Build a pretraining method by name, like ``timm.create_model``.

    ``kwargs`` mixes the method's own arguments (``mask_ratio``, ``decoder_*``, ...) and the encoder's
    timm arguments (``img_size``, ``patch_size``, ``embed_dim``, ...); ``model_name`` picks the timm
    architecture. The paper's values are the defaults.
    """
    return get_method_class(name)(**kwargs)


def _import_all() -> None:
    # The package imports every method module (as timm's models/__init__.py does); importing it runs their
    # @register_method decorators. A no-op once imported, which it always is when this module is.
    import mimscale.methods  # noqa: F401


MethodFactory = Callable[..., Method]
