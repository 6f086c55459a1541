"""Consolidate a DeepSpeed checkpoint of any ZeRO stage to fp32 and write safetensors that timm loads.

Metadata (all strings, as safetensors requires): ``mimscale.method``, ``timm.model_name``, ``timm.kwargs``
(JSON: everything needed to rebuild the encoder), ``step`` and the recipe ``config`` (JSON). With
``encoder_only`` the keys are exactly timm's, so::

    meta = safe_open(path, "pt").metadata()
    model = timm.create_model(meta["timm.model_name"], num_classes=0, **json.loads(meta["timm.kwargs"]))
    model.load_state_dict(safetensors.torch.load_file(path), strict=True)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import torch

from mimscale.runs import RunMeta, resolve_checkpoint


def consolidate(root: str | Path, tag: str) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of the method (student, heads, teacher, buffers), on CPU, in one process."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = Path(root) / tag
    module_file = tag_dir / "mp_rank_00_model_states.pt"  # ZeRO-0/1/2 (ZeRO-3 writes one per rank)
    sd = {}
    if module_file.is_file():
        sd = torch.load(module_file, map_location="cpu", weights_only=False)["module"]
    if any(tag_dir.glob("*optim_states.pt")):
        # zero_to_fp32 narrates every step on stdout and draws progress bars on stderr
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            merged = get_fp32_state_dict_from_zero_checkpoint(
                str(root), tag=tag, exclude_frozen_parameters=False
            )
        # zero_to_fp32 rebuilds frozen parameters (EMA teachers, BEiT's tokenizer) only from ZeRO-2/3's
        # frozen-parameter records; under ZeRO-1 they are in the module states file whole, so take them
        # from there.
        for k, v in sd.items():
            if k not in merged and v.numel() > 0:
                merged[k] = v
        sd = merged
    return {
        k: v.detach().float().contiguous().clone() if v.is_floating_point() else v.contiguous().clone()
        for k, v in sd.items()
    }


def read_meta(root: str | Path, tag: str) -> RunMeta:
    """The :class:`~mimscale.runs.RunMeta` of checkpoint ``tag`` under ``root``."""
    return RunMeta.read(Path(root) / tag)


def export_checkpoint(
    checkpoint: str | Path, output: str | Path, encoder_only: bool = False, which: str = "auto"
) -> dict[str, str]:
    """Write ``output`` (.safetensors) from a run dir / checkpoints dir / tag dir; returns the metadata.

    ``encoder_only``: the encoder with timm's keys, the ``student`` or the ``teacher`` (methods with an EMA
    teacher); ``auto`` follows the paper (iBOT releases the teacher, data2vec and LUT the student). A teacher
    comes from the fp32 EMA shadow, not the (under bf16: bf16) module copy. Without ``encoder_only``, the
    whole method, its teacher's tensors also taken from the fp32 shadow.
    """
    from safetensors.torch import save_file

    from mimscale.weights import encoder_state, teacher_shadow

    output = Path(output)
    if output.suffix != ".safetensors":
        raise ValueError(f"--output {str(output)!r}: expected a file name ending in .safetensors")
    root, tag = resolve_checkpoint(checkpoint)
    meta = read_meta(root, tag)
    if encoder_only:
        _, _, sd, info = encoder_state(root / tag, which)
        chosen = info["which"]
        if not sd:
            raise RuntimeError(f"no {chosen} encoder weights in {root / tag}")
    else:
        sd = consolidate(root, tag)
        for name, value in (teacher_shadow(root / tag) or {}).items():
            if f"teacher.{name}" in sd and value.is_floating_point():
                sd[f"teacher.{name}"] = value.float().contiguous()
        chosen = "teacher" if meta.evaluates_teacher and meta.teacher_prefix else "student"
    metadata = {
        "format": "pt",
        "mimscale.method": meta.method,
        "mimscale.encoder_only": str(bool(encoder_only)).lower(),
        "mimscale.encoder_prefix": "" if encoder_only else meta.encoder_prefix,
        "mimscale.teacher_prefix": "" if encoder_only else (meta.teacher_prefix or ""),
        "mimscale.which": chosen,
        "timm.model_name": meta.timm_model_name,
        "timm.kwargs": json.dumps(meta.timm_kwargs, sort_keys=True),
        "step": str(meta.step),
        "config": json.dumps(meta.config, sort_keys=True),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp.{os.getpid()}")
    save_file(sd, str(tmp), metadata=metadata)
    os.replace(tmp, output)  # never leave a half-written file under the final name
    return metadata


def load_timm_encoder(path: str | Path, which: str = "auto") -> torch.nn.Module:
    """Rebuild the exported encoder as a plain timm model (strict load), for fine-tuning or features
    (:func:`mimscale.weights.load_encoder` for any other weights and their provenance)."""
    from mimscale.weights import load_encoder

    return load_encoder(path, which).model
