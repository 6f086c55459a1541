"""Recipe configuration: dataclasses that hold a paper's numbers, the command line every recipe shares,
``--set`` overrides with validation, ``--smoke`` shrinking, and the :class:`RunPlan` every number the
trainer derives from them (precision, batch plan, steps, learning rates) for the actual world size.

A recipe is a function returning a :class:`TrainConfig` (``mimscale.recipes``); everything here is data and
the pure functions that transform it, so the trainer reads one resolved config and one plan.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import dataclasses
import inspect
import io
import json
import math
import os
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Precision = Literal["auto", "bf16", "fp16", "fp32"]
FLOAT32_MAX = 3.4028234663852886e38


@dataclass
class DataConfig:
    """Where images come from and how they are augmented (uint8 until the device)."""

    urls: str | None = None  # WebDataset shard URLs with brace expansion ('::' joins lists); None = demo data
    crop_scale: tuple[float, float] = (0.2, 1.0)  # MAE: RandomResizedCrop(224, scale=(0.2, 1.0), bicubic)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    # The augmentation as view dicts (mimscale.data.transforms schema; multi-view methods list one per view),
    # or the name of a preset in mimscale.data.views built for the model's image size. None: a single
    # RandomResizedCrop from crop_scale / crop_ratio / hflip.
    views: list[dict[str, Any]] | str | None = None
    # Where JPEGs are decoded. "workers": the CPU data workers (crop-region libjpeg-turbo decode).
    # "device": the workers only draw crop boxes and ship encoded bytes; the training device
    # decodes (nvJPEG on GPUs), crops and resizes the batch. For hosts whose cores cannot keep up;
    # single-view recipes without colour augmentation only (MAE, SimMIM, BEiT, data2vec).
    decode: Literal["workers", "device"] = "workers"
    num_workers: int = 8
    shuffle_buffer: int = 5000
    epoch_size: int = 1_281_167  # samples per epoch for epoch-defined schedules (ImageNet-1k train)
    demo_images: int = 512  # size of the generated demo set used when urls is None


@dataclass
class OptimConfig:
    """AdamW and the per-step learning-rate schedule (epochs are converted to steps)."""

    blr: float = 1.5e-4  # base lr, scaled by the global batch (see lr_scaling)
    lr: float | None = None  # absolute peak lr; overrides blr scaling when set
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"  # linear: blr*B/base; sqrt: blr*sqrt(B/base)
    base_batch: int = 256
    # Scale blr for this global batch instead of the run's own (None). --smoke sets the recipe's real batch
    # here, so a smoke run keeps the recipe's learning rate and `--set optim.blr=...` still changes it.
    lr_batch: int | None = None
    warmup_start_blr: float = 0.0  # warmup starts here, scaled like blr (SimMIM: 5e-7 per 512)
    min_lr: float = 0.0
    warmup_epochs: float = 40.0
    epochs: float = 800.0
    schedule: Literal["cosine", "multistep"] = "cosine"
    milestones: list[float] = field(default_factory=list)  # epochs, for "multistep"
    gamma: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.05
    weight_decay_end: float | None = None  # cosine weight-decay schedule to this value (iBOT 0.04 -> 0.4)
    grad_clip: float | None = None
    # "global": DeepSpeed clips the norm of all gradients together (MAE, BEiT, SimMIM, data2vec).
    # "per_param": each parameter's gradient is clipped by its own norm (DINO/iBOT utils.clip_gradients).
    clip_mode: Literal["global", "per_param"] = "global"
    # Parameters a method freezes for its first steps (Method.lr_frozen_params): "skip" gives them no gradient
    # (AdamW leaves their moments and step count alone, as the official iBOT sets their grads to None);
    # "zero_lr" only holds their learning rate at 0 (AdamW's moments still see their gradients).
    frozen_groups: Literal["skip", "zero_lr"] = "skip"


@dataclass
class TrainConfig:
    """Everything a run needs besides the DeepSpeed ZeRO config file."""

    method: str = "mae"
    model: dict[str, Any] = field(
        default_factory=dict
    )  # create_method kwargs: model_name, timm and method args
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    global_batch: int = 4096  # kept constant across world sizes through gradient accumulation
    max_micro_batch: int = 64  # per-GPU micro batch cap; the largest divisor of the per-rank batch <= this
    precision: Precision = "auto"  # auto: bf16 on GPUs that have it, else fp16; fp32 on CPU
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile the method (opt-in)
    seed: int = 0
    log_interval: int = 20  # steps between progress lines / scalars
    ckpt_interval: int = 1000  # steps between checkpoints (one is always written at the end)
    keep_checkpoints: int = 2
    max_steps: int | None = None  # stop early (the schedule still follows epochs)
    output_dir: str | None = None  # default runs/<recipe name>
    smoke: dict[str, Any] = field(default_factory=dict)  # recipe-specific extra overrides for --smoke


# ---------------------------------------------------------------------------------------------------
# --set KEY=VALUE


class ConfigError(ValueError):
    """A bad key or value in the configuration, with a message naming both and what is allowed."""


def parse_value(text: str) -> Any:
    """Python/JSON literal if it parses (``1e-4``, ``[0.2, 1.0]``, ``True``, ``null``), else the string."""
    low = text.strip()
    if low in ("null", "None", "none"):
        return None
    if low in ("true", "false"):
        return low == "true"
    try:
        return ast.literal_eval(low)
    except (ValueError, SyntaxError):
        return text


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (coercing int->float, list->tuple)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}={value!r}: expected {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r}: allowed values are {list(args)}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            if abs(value) > FLOAT32_MAX:  # every value ends up in float32 tensors on the device
                raise ConfigError(f"{key}={value!r}: outside the float32 range (|x| <= {FLOAT32_MAX:.4g})")
            return float(value)
        raise ConfigError(f"{key}={value!r}: expected a finite number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r}: expected a string")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list like [a, b]")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}={value!r}: expected {len(args)} values")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, key) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: expected a dict like {{'a': 1}}")
        return value
    return value


def _hints(obj: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(obj))


def set_override(cfg: TrainConfig, key: str, value: Any) -> None:
    """Apply one dotted override in place, validating the key and the value's type."""
    parts = key.split(".")
    target: Any = cfg
    path = []
    for i, part in enumerate(parts):
        path.append(part)
        last = i == len(parts) - 1
        if dataclasses.is_dataclass(target):
            names = [f.name for f in dataclasses.fields(target)]
            if part not in names:
                where = ".".join(path[:-1]) or "the config"
                raise ConfigError(f"unknown key {key!r}: {where} has no field {part!r}; allowed: {names}")
            if last:
                setattr(target, part, _coerce(value, _hints(target)[part], key))
                return
            child = getattr(target, part)
            if child is None or not (dataclasses.is_dataclass(child) or isinstance(child, dict)):
                raise ConfigError(f"unknown key {key!r}: {'.'.join(path)} is a value, not a section")
            target = child
        elif isinstance(target, dict):
            if last:
                target[part] = value
                return
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"unknown key {key!r}: {'.'.join(path)} is a value, not a section")


def validate_model_kwargs(cfg: TrainConfig) -> None:
    """Reject model keys neither the method nor its timm encoder accepts, before anything is built."""
    from mimscale.methods.base import get_method_class, method_kwarg_names

    cls = get_method_class(cfg.method)
    allowed = method_kwarg_names(cfg.method) | timm_kwarg_names(
        cfg.model.get("model_name", _default_model_name(cls))
    )
    allowed.discard("timm_kwargs")
    for k in cfg.model:
        if k not in allowed:
            raise ConfigError(
                f"unknown key 'model.{k}' for method {cfg.method!r}; allowed: {sorted(allowed)}"
            )


def _default_model_name(cls: type) -> str:
    sig = inspect.signature(cls.__init__)
    p = sig.parameters.get("model_name")
    return p.default if p is not None and p.default is not inspect.Parameter.empty else cls.default_model_name


def timm_kwarg_names(model_name: str) -> set[str]:
    import timm
    from timm.models.beit import Beit
    from timm.models.vision_transformer import VisionTransformer

    if not timm.is_model(model_name):
        raise ConfigError(
            f"model.model_name={model_name!r} is not a timm model name "
            "(e.g. vit_base_patch16_224, vit_large_patch16_224, beit_base_patch16_224)"
        )
    klass = Beit if model_name.startswith("beit") else VisionTransformer
    return {p for p in inspect.signature(klass.__init__).parameters if p != "self"}


# ---------------------------------------------------------------------------------------------------
# --smoke

SMOKE_ENCODER = {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 4}


def apply_smoke(cfg: TrainConfig) -> None:
    """Shrink to a tiny model on 32x32 images with a short schedule; same method, same code paths."""
    from mimscale.methods.base import get_method_class

    cls = get_method_class(cfg.method)
    orig_img = int(cfg.model.get("img_size", 224))
    cfg.model.update(SMOKE_ENCODER)
    cfg.model.update(copy.deepcopy(cls.smoke_kwargs))
    if isinstance(cfg.data.views, list):  # a preset name is built for the smoke size later
        # Keep each view's size relative to the full crop, snapped to the smoke patch size.
        p = SMOKE_ENCODER["patch_size"]
        for v in cfg.data.views:
            if "size" in v:
                v["size"] = max(p, int(round(v["size"] * SMOKE_ENCODER["img_size"] / orig_img / p)) * p)
    o = cfg.optim
    if o.lr_batch is None:  # keep the recipe's lr at its real batch, so a smoke run learns visibly
        o.lr_batch = cfg.global_batch
    scale = 4.0 / o.epochs if o.epochs else 1.0
    o.milestones = [m * scale for m in o.milestones]
    o.epochs, o.warmup_epochs = 4.0, 1.0
    cfg.global_batch, cfg.max_micro_batch = 16, 8
    cfg.data.epoch_size = 160  # 10 steps per "epoch": a 40-step schedule
    cfg.data.num_workers = 1
    cfg.data.shuffle_buffer = 64
    cfg.data.demo_images = 256
    cfg.log_interval, cfg.ckpt_interval = 5, 10
    cfg.precision = "fp32" if cfg.precision == "auto" else cfg.precision
    for k, v in cfg.smoke.items():
        set_override(cfg, k, copy.deepcopy(v))


# ---------------------------------------------------------------------------------------------------
# derived quantities


@dataclass
class BatchPlan:
    global_batch: int
    world_size: int
    micro_batch: int
    accumulation: int


def plan_batch(global_batch: int, world_size: int, max_micro_batch: int) -> BatchPlan:
    """Split the recipe's global batch over ``world_size`` ranks.

    Per-rank batch = global / world; micro batch = its largest divisor <= ``max_micro_batch``; the rest is
    gradient accumulation, so the global batch is the same on 1 GPU or 512."""
    if global_batch < 1 or world_size < 1 or max_micro_batch < 1:
        raise ConfigError(
            f"global_batch={global_batch}, world_size={world_size}, "
            f"max_micro_batch={max_micro_batch}: all must be >= 1"
        )
    if global_batch % world_size:
        raise ConfigError(
            f"global_batch={global_batch} is not divisible by the world size {world_size}; "
            "choose a global batch that is a multiple of the number of GPUs "
            "(--set global_batch=N)"
        )
    per_rank = global_batch // world_size
    micro = max(d for d in range(1, min(per_rank, max_micro_batch) + 1) if per_rank % d == 0)
    return BatchPlan(global_batch, world_size, micro, per_rank // micro)


def resolve_precision(requested: str, on_gpu: bool, bf16_supported: bool) -> str:
    """auto -> bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU. fp16 on CPU is refused."""
    if requested == "auto":
        return ("bf16" if bf16_supported else "fp16") if on_gpu else "fp32"
    if requested == "fp16" and not on_gpu:
        raise ConfigError("precision='fp16' needs a GPU; allowed on CPU: 'fp32', 'bf16', 'auto'")
    return requested


@dataclass(frozen=True)
class RunPlan:
    """Every number the trainer derives from the config for one run on ``batch.world_size`` ranks, resolved
    once (:func:`plan_run`) and read by the optimizer, the schedule, the loader and the progress line."""

    precision: str  # "bf16", "fp16" or "fp32" (``auto`` resolved for the device)
    batch: BatchPlan
    steps_per_epoch: int
    total_steps: int  # the schedule's length (epochs x steps per epoch)
    stop_step: int  # where this run stops: total_steps, or max_steps if smaller
    peak_lr: float
    warmup_start_lr: float

    @property
    def world_size(self) -> int:
        return self.batch.world_size


def plan_run(
    cfg: TrainConfig, world_size: int, on_gpu: bool = False, bf16_supported: bool = False
) -> RunPlan:
    """The :class:`RunPlan` of ``cfg`` on ``world_size`` ranks (ConfigError naming what is impossible)."""
    total = total_steps(cfg)
    return RunPlan(
        precision=resolve_precision(cfg.precision, on_gpu, bf16_supported),
        batch=plan_batch(cfg.global_batch, world_size, cfg.max_micro_batch),
        steps_per_epoch=steps_per_epoch(cfg),
        total_steps=total,
        stop_step=min(total, cfg.max_steps) if cfg.max_steps else total,
        peak_lr=peak_lr(cfg.optim, cfg.global_batch),
        warmup_start_lr=warmup_start_lr(cfg.optim, cfg.global_batch),
    )


def peak_lr(o: OptimConfig, global_batch: int) -> float:
    """The peak learning rate: ``lr`` if given, else ``blr`` scaled by the global batch."""
    if o.lr is not None:
        return o.lr
    return o.blr * _lr_factor(o, global_batch)


def _lr_factor(o: OptimConfig, global_batch: int) -> float:
    global_batch = o.lr_batch or global_batch
    if o.lr_scaling == "linear":
        return global_batch / o.base_batch
    if o.lr_scaling == "sqrt":
        return math.sqrt(global_batch / o.base_batch)
    return 1.0


def warmup_start_lr(o: OptimConfig, global_batch: int) -> float:
    return o.warmup_start_blr * _lr_factor(o, global_batch)


def steps_per_epoch(cfg: TrainConfig) -> int:
    return max(1, cfg.data.epoch_size // cfg.global_batch)


def total_steps(cfg: TrainConfig) -> int:
    return max(1, int(round(cfg.optim.epochs * steps_per_epoch(cfg))))


def derive(base: TrainConfig, changes: dict[str, Any]) -> TrainConfig:
    """A copy of ``base`` with dotted-key ``changes`` applied and checked as ``--set`` checks them: how a
    recipe states a size or variant as its base recipe plus the deltas (``{"model.model_name": ...}``)."""
    cfg = copy.deepcopy(base)
    for key, value in changes.items():
        set_override(cfg, key, copy.deepcopy(value))
    return cfg


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(d: dict[str, Any]) -> TrainConfig:
    """Rebuild a config saved by :func:`to_dict` (checkpoints, exports)."""
    d = copy.deepcopy(d)
    data = DataConfig(
        **{k: tuple(v) if k in ("crop_scale", "crop_ratio") else v for k, v in d.pop("data").items()}
    )
    optim = OptimConfig(**{k: tuple(v) if k == "betas" else v for k, v in d.pop("optim").items()})
    return TrainConfig(data=data, optim=optim, **d)


# ---------------------------------------------------------------------------------------------------
# the command line every recipe shares


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="mimscale pretraining recipe (run under `deepspeed`, "
        "`torchrun`, `srun` or plain python for one process)",
    )
    p.add_argument(
        "--ds_config",
        default="zero2.json",
        help="DeepSpeed config: a shipped name (zero1.json, zero2.json, zero3.json, "
        "zero3_offload.json) or a path (default: zero2.json)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="WebDataset shard URLs, brace expansion allowed "
        "(e.g. '/data/in1k/train-{000000..001023}.tar' or 'pipe:aws s3 cp ...'); omitted: demo data",
    )
    p.add_argument("--output_dir", default=None, help="run directory; one holding a checkpoint is resumed")
    p.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument(
        "--smoke", action="store_true", help="same method on a tiny ViT, 32x32 images, short schedule"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, dotted for nesting (e.g. optim.blr=1e-4, model.mask_ratio=0.8)",
    )
    p.add_argument("--print_config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def launch_world_size(env: dict[str, str] | None = None) -> int:
    """The world size the launcher (deepspeed, torchrun, srun) announces before the process group exists."""
    env = os.environ if env is None else env
    return int(env.get("WORLD_SIZE") or env.get("SLURM_NTASKS") or 1)


def resolve_config(base: TrainConfig, args: argparse.Namespace, recipe_name: str) -> TrainConfig:
    """Base recipe + --smoke + --set + --data/--output_dir/--max_steps, validated with everything pure built
    (:func:`validate`, with the ``--ds_config`` and the launcher's world size)."""
    from mimscale.methods.base import list_methods

    cfg = copy.deepcopy(base)
    if cfg.method not in list_methods():
        raise ConfigError(f"method={cfg.method!r}: allowed values are {list_methods()}")
    if args.smoke:
        apply_smoke(cfg)
    for item in args.overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set optim.blr=1e-4")
        key, _, raw = item.partition("=")
        set_override(cfg, key.strip(), parse_value(raw))
    if args.data is not None:
        cfg.data.urls = args.data
    if args.output_dir is not None:
        cfg.output_dir = args.output_dir
    if args.max_steps is not None:
        cfg.max_steps = args.max_steps
    if cfg.output_dir is None:
        cfg.output_dir = str(Path("runs") / (recipe_name + ("_smoke" if args.smoke else "")))
    validate(cfg, getattr(args, "ds_config", None), launch_world_size())
    return cfg


def validate(cfg: TrainConfig, ds_config: str | None = None, world_size: int | None = None) -> None:
    """Everything that can be checked before a process group or an engine exists, so that a bad value ends
    with one line and status 2 instead of a traceback minutes into a job: range checks types cannot
    express, then building every pure piece: the method (on the meta device: shapes and arguments, no
    memory), the data transform and its number of views against the method's, and, given ``ds_config``
    and ``world_size``, the batch plan and the DeepSpeed config as DeepSpeed itself parses it."""
    check_ranges(cfg)
    validate_model_kwargs(cfg)
    method = build_method_on_meta(cfg)
    img_size, patch_size = method_geometry(method)
    check_transform(cfg, method, img_size, patch_size)
    if ds_config is not None:
        from mimscale.train.deepspeed_config import build_ds_config, check_with_deepspeed, load_ds_config

        user, source = load_ds_config(ds_config)
        plan = plan_run(cfg, world_size or 1)
        check_with_deepspeed(build_ds_config(user, cfg, plan.batch, "fp32", plan.peak_lr), source)


def build_method_on_meta(cfg: TrainConfig) -> Any:
    """The recipe's method built on the meta device (no memory, no init cost), quietly: a bad model value is
    a ConfigError naming the config."""
    import torch

    from mimscale.methods.base import create_method

    try:
        with torch.device("meta"), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            return create_method(cfg.method, **cfg.model)
    except (TypeError, ValueError, FileNotFoundError, KeyError) as e:
        raise ConfigError(f"model config {cfg.model}: {e}") from e


def method_geometry(method: Any) -> tuple[int, int]:
    """(image size, patch size) the method's encoder is built for."""
    enc = method.encoder
    return int(enc.grid[0] * enc.patch_size), int(enc.patch_size)


def resolve_views(cfg: TrainConfig, img_size: int, patch_size: int) -> dict[str, Any] | list[dict[str, Any]]:
    """The transform spec of the run: the recipe's view dicts, a named preset built for the model's image
    size, or (no views) one RandomResizedCrop from ``crop_scale`` / ``crop_ratio`` / ``hflip``."""
    from mimscale.data.views import view_preset

    views = cfg.data.views
    if isinstance(views, str):
        try:
            return view_preset(views, img_size, patch_size)
        except ValueError as e:
            raise ConfigError(str(e)) from e
    if views:
        return views
    return {"size": img_size, "scale": list(cfg.data.crop_scale), "ratio": list(cfg.data.crop_ratio),
            "hflip": cfg.data.hflip}


def build_data_transform(cfg: TrainConfig, img_size: int, patch_size: int) -> Any:
    """The per-sample transform the loader's workers run: uint8 crops and views, or, with
    ``data.decode='device'``, JPEG bytes with crop boxes for the device to decode."""
    spec = resolve_views(cfg, img_size, patch_size)
    try:
        if cfg.data.decode == "device":
            from mimscale.data.gpu_decode import build_gpu_decode_transform

            return build_gpu_decode_transform(spec[0] if isinstance(spec, list) else spec)
        from mimscale.data.transforms import build_transform

        return build_transform(spec)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"data.views: {e}") from e


def transform_views(transform: Any) -> int:
    """How many views a built transform delivers per image (a :class:`Views` holds several)."""
    from mimscale.data.transforms import Views

    return len(transform) if isinstance(transform, Views) else 1


def check_transform(cfg: TrainConfig, method: Any, img_size: int, patch_size: int) -> None:
    transform = build_data_transform(cfg, img_size, patch_size)
    delivered, wanted = transform_views(transform), int(method.views)
    if delivered != wanted:
        raise ConfigError(
            f"data.views delivers {delivered} view(s) per image but method {cfg.method!r} takes {wanted}; "
            "make the recipe's data.views list that many (count each 'repeat'), or change the method's "
            "view count (e.g. model.num_local_crops for iBOT)"
        )


def check_ranges(cfg: TrainConfig) -> None:
    """Range checks that types alone cannot express."""
    checks = [
        ("global_batch", cfg.global_batch, cfg.global_batch >= 1, ">= 1"),
        ("max_micro_batch", cfg.max_micro_batch, cfg.max_micro_batch >= 1, ">= 1"),
        ("log_interval", cfg.log_interval, cfg.log_interval >= 1, ">= 1"),
        ("ckpt_interval", cfg.ckpt_interval, cfg.ckpt_interval >= 1, ">= 1"),
        ("keep_checkpoints", cfg.keep_checkpoints, cfg.keep_checkpoints >= 1, ">= 1"),
        ("max_steps", cfg.max_steps, cfg.max_steps is None or cfg.max_steps >= 1, ">= 1 or null"),
        ("optim.epochs", cfg.optim.epochs, cfg.optim.epochs > 0, "> 0"),
        (
            "optim.warmup_epochs",
            cfg.optim.warmup_epochs,
            0 <= cfg.optim.warmup_epochs <= cfg.optim.epochs,
            "between 0 and optim.epochs",
        ),
        ("optim.blr", cfg.optim.blr, cfg.optim.blr > 0, "> 0"),
        ("optim.lr_batch", cfg.optim.lr_batch, cfg.optim.lr_batch is None or cfg.optim.lr_batch >= 1,
         ">= 1 or null"),
        ("optim.weight_decay", cfg.optim.weight_decay, cfg.optim.weight_decay >= 0, ">= 0"),
        (
            "optim.grad_clip",
            cfg.optim.grad_clip,
            cfg.optim.grad_clip is None or cfg.optim.grad_clip > 0,
            "> 0 or null",
        ),
        (
            "data.crop_scale",
            cfg.data.crop_scale,
            0 < cfg.data.crop_scale[0] <= cfg.data.crop_scale[1] <= 1,
            "0 < min <= max <= 1",
        ),
        ("data.hflip", cfg.data.hflip, 0 <= cfg.data.hflip <= 1, "a probability in [0, 1]"),
        ("data.num_workers", cfg.data.num_workers, cfg.data.num_workers >= 0, ">= 0"),
        ("data.epoch_size", cfg.data.epoch_size, cfg.data.epoch_size >= 1, ">= 1"),
    ]
    for key, value, ok, allowed in checks:
        if not ok:
            raise ConfigError(f"{key}={value!r}: expected {allowed}")
    if cfg.data.decode == "device" and cfg.data.views is not None and len(cfg.data.views) != 1:
        raise ConfigError(
            f"data.decode='device' with {len(cfg.data.views)} data.views: decoding on the device takes one "
            "view; allowed: data.decode='workers' for multi-view methods"
        )
    if cfg.optim.lr is not None and cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr={cfg.optim.lr!r}: expected > 0 or null")
    for f in dataclasses.fields(cfg.optim):  # recipes build these directly, not through --set
        value = getattr(cfg.optim, f.name)
        if isinstance(value, float) and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
            raise ConfigError(f"optim.{f.name}={value!r}: expected a finite number in the float32 range")
    for name, value in (("peak lr", peak_lr(cfg.optim, cfg.global_batch)),
                        ("warm-up start lr", warmup_start_lr(cfg.optim, cfg.global_batch))):
        if not (math.isfinite(value) and value <= FLOAT32_MAX):
            raise ConfigError(f"optim: the {name} {value!r} (optim.blr scaled by the batch) is outside the "
                              "float32 range; lower optim.blr or set optim.lr")


def dumps(cfg: TrainConfig) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=False)
