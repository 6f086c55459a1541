"""Load a pretrained encoder from whatever a user has: the one door the evaluation and analysis tools use.

``W`` (``--weights``) may be

* an exported ``.safetensors`` (``mimscale export``, encoder-only or the full method),
* a pretraining run directory, its ``checkpoints/`` directory or one ``step_*`` tag, of any ZeRO stage
  (consolidated to fp32 on the fly),
* a timm model folder (``config.json`` + ``model.safetensors``, as ``timm.create_model("local-dir:...")``
  reads it).

The result is a plain timm model (``num_classes=0``, eval mode) plus where it came from and a content hash,
so an evaluation's JSON can say exactly which weights it measured. For methods with an EMA teacher the
caller picks the ``student`` or the ``teacher``; ``auto`` follows the paper's evaluation (iBOT evaluates the
teacher, data2vec and LUT the student). A teacher is read from its fp32 EMA shadow when the checkpoint has
one (under bf16 the module copy of the teacher is bf16).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["LoadedEncoder", "WEIGHT_CHOICES", "encoder_state", "load_encoder", "state_dict_sha256"]

WEIGHT_CHOICES = ("auto", "student", "teacher")


@dataclass
class LoadedEncoder:
    """A timm encoder and its provenance."""

    model: nn.Module
    model_name: str  # timm architecture
    model_kwargs: dict[str, Any]  # timm kwargs that rebuild it (with num_classes=0)
    source: str  # the path given
    format: str  # "safetensors", "checkpoint" or "timm-folder"
    which: str  # "student", "teacher" or "encoder" (a file that holds one encoder)
    sha256: str  # of the encoder's state dict (names, dtypes, shapes and bytes)
    method: str | None = None  # the pretraining method, when known
    step: int | None = None
    pretrain_config: dict[str, Any] = field(default_factory=dict)

    @property
    def img_size(self) -> int:
        return int(self.model.patch_embed.img_size[0])

    @property
    def patch_size(self) -> int:
        return int(self.model.patch_embed.patch_size[0])

    def describe(self) -> dict[str, Any]:
        """What an evaluation records about the weights it measured."""
        return {
            "path": self.source,
            "format": self.format,
            "which": self.which,
            "sha256": self.sha256,
            "method": self.method,
            "step": self.step,
            "timm_model": self.model_name,
            "timm_kwargs": self.model_kwargs,
            "img_size": self.img_size,
        }


def state_dict_sha256(sd: dict[str, torch.Tensor]) -> str:
    """A content hash of a state dict, independent of file format and key order."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        # reshape: a 0-d tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes of another size
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _strip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _teacher_prefixes(student_prefix: str, recorded: str | None) -> list[str]:
    """Where the teacher's encoder may sit: the recorded prefix, else the two layouts mimscale writes
    (a teacher of encoder + head, or of the encoder alone)."""
    if recorded:
        return [recorded]
    return ["teacher." + student_prefix, "teacher." + student_prefix.removeprefix("encoder.")]


def _pick(which: str, evaluates_teacher: bool, has_teacher: bool, what: str) -> str:
    if which not in WEIGHT_CHOICES:
        raise ValueError(f"--which {which!r}: allowed values are {list(WEIGHT_CHOICES)}")
    if which == "auto":
        return "teacher" if evaluates_teacher and has_teacher else "student"
    if which == "teacher" and not has_teacher:
        raise ValueError(f"{what} holds no EMA teacher (only iBOT, data2vec and LUT have one); use student")
    return which


def teacher_shadow(tag_dir: str | Path) -> dict[str, torch.Tensor] | None:
    """The EMA teacher's fp32 shadow in a checkpoint (every rank's partitions merged), keyed by the teacher
    module's own names, or None when the checkpoint has none. Under bf16 the teacher module itself is bf16;
    this is the precise copy the EMA keeps."""
    from mimscale.ema import consolidate_state_dicts
    from mimscale.runs import read_rank_states

    try:
        states = [s["ema"] for s in read_rank_states(tag_dir) if "ema" in s]
    except FileNotFoundError:
        return None
    if not states:
        return None
    full = consolidate_state_dicts(states)
    return {**full["params"], **full["buffers"]}


def _from_checkpoint(path: Path, which: str) -> tuple[str, dict, dict[str, torch.Tensor], dict[str, Any]]:
    from mimscale.export import consolidate
    from mimscale.runs import RunMeta, resolve_checkpoint

    root, tag = resolve_checkpoint(path)
    meta = RunMeta.read(root / tag)
    sd = consolidate(root, tag)
    teacher_prefix = next(
        (
            p
            for p in _teacher_prefixes(meta.encoder_prefix, meta.teacher_prefix)
            if any(k.startswith(p) for k in sd)
        ),
        None,
    )
    which = _pick(which, meta.evaluates_teacher, teacher_prefix is not None, f"checkpoint {root / tag}")
    if which == "teacher":
        enc = _strip(sd, teacher_prefix)
        shadow = _strip(teacher_shadow(root / tag) or {}, teacher_prefix.removeprefix("teacher."))
        if shadow:  # fp32 EMA values for every float tensor the shadow holds
            enc.update({k: v.float() for k, v in shadow.items() if k in enc})
    else:
        enc = _strip(sd, meta.encoder_prefix)
    info = {
        "format": "checkpoint",
        "which": which,
        "method": meta.method,
        "step": meta.step,
        "pretrain_config": meta.config,
    }
    return meta.timm_model_name, dict(meta.timm_kwargs), enc, info


def _from_safetensors(path: Path, which: str) -> tuple[str, dict, dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "timm.model_name" not in meta:
        raise ValueError(
            f"{path}: a safetensors file without mimscale/timm metadata ('timm.model_name'); "
            "expected a `mimscale export` file or a timm model folder"
        )
    sd = load_file(str(path))
    config = json.loads(meta.get("config", "{}"))
    prefix = meta.get("mimscale.encoder_prefix", "")
    if meta.get("mimscale.encoder_only", "true") == "true" or not prefix:
        if which == "teacher":
            raise ValueError(
                f"{path} is an encoder-only export ({meta.get('mimscale.which', 'student')}); "
                "export the full method to choose the teacher"
            )
        enc, which = sd, meta.get("mimscale.which", "encoder")
    else:
        recorded = meta.get("mimscale.teacher_prefix") or None
        teacher_prefix = next(
            (p for p in _teacher_prefixes(prefix, recorded) if any(k.startswith(p) for k in sd)), None
        )
        from mimscale.methods import get_method_class

        method = meta.get("mimscale.method")
        try:
            evaluates_teacher = get_method_class(method).evaluates_teacher if method else False
        except ValueError:
            evaluates_teacher = False
        which = _pick(which, evaluates_teacher, teacher_prefix is not None, str(path))
        enc = _strip(sd, teacher_prefix if which == "teacher" else prefix)
    step = meta.get("step")
    info = {
        "format": "safetensors",
        "which": which,
        "method": meta.get("mimscale.method"),
        "step": int(step) if step not in (None, "") else None,
        "pretrain_config": config,
    }
    return meta["timm.model_name"], json.loads(meta.get("timm.kwargs", "{}")), enc, info


def _from_timm_folder(path: Path) -> tuple[str, dict, dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors.torch import load_file

    cfg = json.loads((path / "config.json").read_text())
    name = cfg.get("architecture")
    if not name:
        raise ValueError(f"{path / 'config.json'} has no 'architecture': not a timm model folder")
    weights = path / "model.safetensors"
    if weights.is_file():
        sd = load_file(str(weights))
    elif (path / "pytorch_model.bin").is_file():
        sd = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin beside config.json")
    kwargs = {k: v for k, v in cfg.get("model_args", {}).items() if k != "num_classes"}
    info = {
        "format": "timm-folder",
        "which": cfg.get("mimscale", {}).get("which", "encoder"),
        "method": cfg.get("mimscale", {}).get("method"),
        "step": cfg.get("mimscale", {}).get("step"),
        "pretrain_config": {},
    }
    return name, kwargs, sd, info


def encoder_state(
    weights: str | Path, which: str = "auto"
) -> tuple[str, dict, dict[str, torch.Tensor], dict]:
    """``(timm name, timm kwargs, encoder state dict with timm's keys, provenance)``, no model built."""
    path = Path(weights)
    if which not in WEIGHT_CHOICES:
        raise ValueError(f"--which {which!r}: allowed values are {list(WEIGHT_CHOICES)}")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(
                f"--weights {str(path)!r}: unknown format; expected a .safetensors export, a run or "
                "checkpoint directory, or a timm model folder (config.json + model.safetensors)"
            )
        return _from_safetensors(path, which)
    if path.is_dir() and (path / "config.json").is_file() and not (path / "checkpoints").is_dir():
        if which == "teacher":
            raise ValueError(
                f"{path} is a timm model folder holding one encoder; it has no teacher to choose"
            )
        return _from_timm_folder(path)
    if path.exists():
        return _from_checkpoint(path, which)
    raise FileNotFoundError(f"--weights {str(path)!r} does not exist")


def _filter_for_size(name: str, sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapt a checkpoint to a model built for another image size as timm does when loading pretrained
    weights: the absolute position table resampled (ViT), the relative position bias tables resized (BEiT)."""
    import timm.models.beit as beit
    import timm.models.vision_transformer as vit

    return (beit if isinstance(model, beit.Beit) else vit).checkpoint_filter_fn(sd, model)


def load_encoder(weights: str | Path, which: str = "auto", img_size: int | None = None) -> LoadedEncoder:
    """Build the timm encoder of ``weights`` (see the module doc) and load it strictly.

    ``img_size``: build the model for another resolution; the position tables are resampled as timm
    resamples them for pretrained weights (bicubic for ViT's absolute table, BEiT's relative-bias resize).
    """
    import timm

    name, kwargs, sd, info = encoder_state(weights, which)
    if not timm.is_model(name):  # e.g. the BEiT tokenizer's dVAE; timm would only say "Unknown model"
        raise ValueError(
            f"--weights {weights}: holds a {name!r} model ({info.get('method') or 'unknown method'}), "
            "not a timm architecture; expected the weights of a ViT/BEiT encoder"
        )
    if not sd:
        raise ValueError(f"--weights {weights}: no encoder weights found for {which!r}")
    kwargs = {k: v for k, v in kwargs.items() if k != "num_classes"}
    digest = state_dict_sha256(sd)
    if img_size is not None and int(img_size) != int(kwargs.get("img_size", img_size)):
        model = timm.create_model(
            name, pretrained=False, num_classes=0, **{**kwargs, "img_size": int(img_size)}
        )
        sd = _filter_for_size(name, sd, model)
        kwargs = {**kwargs, "img_size": int(img_size)}
    else:
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"--weights {weights}: the weights do not fit {name} {kwargs}: missing "
            f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    return LoadedEncoder(
        model=model.eval(),
        model_name=name,
        model_kwargs=kwargs,
        source=str(weights),
        format=info["format"],
        which=info["which"],
        sha256=digest,
        method=info["method"],
        step=info["step"],
        pretrain_config=info["pretrain_config"],
    )
