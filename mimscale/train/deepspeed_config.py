"""Resolve ``--ds_config`` and write the recipe's batch, precision and optimizer into it.

The ZeRO file says *how* to shard; the recipe says *what* to train. So batch sizes, accumulation,
precision, clipping and the optimizer always come from the recipe (derived for the actual world size);
a value for those in the user's file is replaced, with a warning when it differed.

Per-step cost (measured with ``benchmarks/train_step.py``, see ``benchmarks/README.md``):

* The optimizer is torch's AdamW with its fused kernel on every device. ZeRO-1/2 hand it one flat fp32
  partition per parameter group, and the unfused AdamW (the per-tensor for-loop on CPU) allocates several
  temporaries of that size per step (ViT-B: 0.45 GB each); the fused kernel makes one pass over it instead.
* ZeRO-1/2 without gradient clipping: ``zero_optimization.compute_grad_norm`` defaults to false. The norm
  (an fp64 pass over all gradients plus a host sync per step) is only needed to clip. It was also the only
  check that skipped an fp32 step with a non-finite gradient (bf16/fp16 keep DeepSpeed's separate overflow
  check); fp32 now applies such a step, as plain PyTorch does. A file that sets the key keeps its value.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

from mimscale.train.config import BatchPlan, ConfigError, OptimConfig, TrainConfig, resolve_precision

__all__ = [
    "SHIPPED",
    "build_ds_config",
    "check_with_deepspeed",
    "deepspeed_knows_zero_key",
    "load_ds_config",
    "optimizer_section",
    "resolve_precision",
    "skips_grad_norm",
    "zero_stage",
]

SHIPPED = ("zero1.json", "zero2.json", "zero3.json", "zero3_offload.json")
_RECIPE_OWNED = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "bf16",
    "fp16",
    "gradient_clipping",
    "optimizer",
    "scheduler",
)


def load_ds_config(spec: str) -> tuple[dict[str, Any], str]:
    """A path is used as given; a bare shipped name resolves to the packaged file. Returns (dict, source)."""
    path = Path(spec)
    if path.is_file():
        source = str(path)
        text = path.read_text()
    elif spec in SHIPPED or (spec + ".json") in SHIPPED:
        name = spec if spec.endswith(".json") else spec + ".json"
        source = f"mimscale/ds_configs/{name}"
        text = resources.files("mimscale").joinpath("ds_configs", name).read_text()
    else:
        raise ConfigError(
            f"--ds_config {spec!r}: not a file, and not a shipped config; "
            f"allowed names: {list(SHIPPED)}, or a path to a DeepSpeed JSON file"
        )
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--ds_config {spec!r}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"--ds_config {spec!r}: expected a JSON object")
    return cfg, source


def zero_stage(ds_cfg: dict[str, Any]) -> int:
    return int(ds_cfg.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds_cfg: dict[str, Any]) -> bool:
    off = ds_cfg.get("zero_optimization", {}).get("offload_optimizer", {}) or {}
    return off.get("device", "none") not in ("none", None)


def build_ds_config(
    user_cfg: dict[str, Any], cfg: TrainConfig, plan: BatchPlan, precision: str, lr: float
) -> dict[str, Any]:
    """The DeepSpeed config handed to ``deepspeed.initialize`` (the same on GPUs and CPUs)."""
    ds = copy.deepcopy(user_cfg)
    ours: dict[str, Any] = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.accumulation,
        "bf16": {"enabled": precision == "bf16"},
        # DeepSpeed's dynamic loss scaling for fp16 (initial 2^16, as torch.amp's GradScaler).
        "fp16": {
            "enabled": precision == "fp16",
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        # per-parameter clipping happens inside the optimizer step (mimscale.train.grad_rules), not here
        "gradient_clipping": float(cfg.optim.grad_clip or 0.0) if cfg.optim.clip_mode == "global" else 0.0,
        "optimizer": optimizer_section(cfg.optim, lr, offload=offloads_optimizer(ds)),
    }
    for key in _RECIPE_OWNED:
        if key in ds and key in ours and ds[key] != ours[key]:
            warnings.warn(
                f"DeepSpeed config sets {key}={ds[key]!r}; the recipe owns it and uses {ours[key]!r}",
                stacklevel=2,
            )
        ds.pop(key, None)
    ds.update(ours)
    ds.setdefault("steps_per_print", 10**9)
    # ``compute_grad_norm`` exists from DeepSpeed 0.19.7; older releases' config model forbids unknown keys,
    # so it is written only where the installed DeepSpeed knows it (older ones compute the norm, as before).
    if skips_grad_norm(ds, precision) and deepspeed_knows_zero_key("compute_grad_norm"):
        ds["zero_optimization"].setdefault("compute_grad_norm", False)
    return ds


def deepspeed_knows_zero_key(key: str) -> bool:
    """Whether the installed DeepSpeed's ``zero_optimization`` section accepts ``key``."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    return key in DeepSpeedZeroConfig.model_fields


def check_with_deepspeed(ds: dict[str, Any], source: str) -> None:
    """Parse ``ds`` with DeepSpeed's own config classes, as ``deepspeed.initialize`` will, and turn a
    rejection into a ConfigError naming the key (``zero_optimization.stage: 9`` is otherwise a pydantic
    traceback after the process group exists). The global batch is the batch plan's business (DeepSpeed
    would check it against a world size it does not know before the process group exists), so it is left
    out and DeepSpeed derives it from the micro batch and accumulation."""
    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError

    unchecked = {k: v for k, v in copy.deepcopy(ds).items() if k != "train_batch_size"}
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            DeepSpeedConfig(unchecked)
    except pydantic.ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "?"
        section = _section_of(ds, where)
        raise ConfigError(f"--ds_config {source}: {section}{where}={first.get('input')!r}: "
                          f"{first.get('msg')}") from None
    except (DeepSpeedConfigError, ValueError, AssertionError, KeyError, TypeError) as e:
        reason = str(e).splitlines()[0] if str(e) else repr(e)
        raise ConfigError(f"--ds_config {source}: DeepSpeed rejects it: {reason}") from None


def _section_of(ds: dict[str, Any], key_path: str) -> str:
    """The top-level section a pydantic location belongs to (DeepSpeed validates sections separately)."""
    head = key_path.split(".")[0]
    if head in ds:
        return ""
    for name, value in ds.items():
        if isinstance(value, dict) and head in value:
            return name + "."
    return ""


def skips_grad_norm(ds: dict[str, Any], precision: str) -> bool:
    """Whether DeepSpeed can leave out the global gradient norm: ZeRO-1/2 without clipping or optimizer
    offload, and not ZeRO-1's dedicated bf16 optimizer (bf16 weights with fp32 gradient accumulation)."""
    stage = zero_stage(ds)
    if stage not in (1, 2) or ds.get("gradient_clipping", 0.0) > 0 or offloads_optimizer(ds):
        return False
    accum = str(ds.get("data_types", {}).get("grad_accum_dtype") or "").lower()
    return not (stage == 1 and precision == "bf16" and accum in ("fp32", "float32", "float", "torch.float32"))


def optimizer_section(o: OptimConfig, lr: float, offload: bool) -> dict[str, Any]:
    """AdamW with decoupled weight decay. Per-group weight decay comes from the parameter groups.

    Without optimizer offload this is torch's AdamW with its fused kernel (CUDA and CPU alike); with offload
    DeepSpeed's CPU Adam.
    """
    params: dict[str, Any] = {"lr": lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}
    if not offload:  # with offload, type AdamW makes DeepSpeed pick its CPU Adam in AdamW mode
        params["torch_adam"] = True
        params["fused"] = True
    return {"type": "AdamW", "params": params}
