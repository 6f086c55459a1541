"""Reconstructions by methods that keep a pixel decoder (MAE, LUT, SimMIM): original, masked input and
prediction, for the pictures of ``mimscale analyze``.

The whole method is rebuilt (encoder + decoder) from a run or checkpoint directory of any ZeRO stage, or from
a full (not ``--encoder-only``) export; encoder-only weights have no decoder to draw with.

Norm-pix predictions (MAE's default target: each patch normalised by its own mean and variance) are not
pixels. Mapping them back with the masked patch's *own* statistics, as is often done, leaks the hidden
patch's mean colour and contrast into the picture, and the reconstruction then looks better than what the
model predicted. Here every masked patch is de-normalised with statistics of the **visible** patches only:
the mean and variance of the visible patches, weighted by ``1 / d^2`` with ``d`` the grid distance to the
masked patch, so that nearby visible patches set its brightness and contrast. No hidden pixel is used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mimscale.methods.base import Method, get_method_class
from mimscale.methods.mae import NORM_PIX_EPS
from mimscale.models.patches import patchify, unpatchify

__all__ = ["DENORM_NOTE", "denormalise_from_visible", "draws_pixels", "load_method", "reconstruct"]

DENORM_NOTE = (
    "norm-pix predictions de-normalised per patch with the visible patches' mean and variance "
    "(weighted by 1/d^2 to the masked patch), never with the hidden patch's own"
)


def draws_pixels(method_name: str | None) -> bool:
    """Whether a method predicts pixels through a decoder whose output can be drawn (its class overrides
    ``Method.reconstruct`` and masks patches with a ``masker``; the BEiT tokenizer is no ViT method)."""
    if not method_name:
        return False
    try:
        cls = get_method_class(method_name)
    except ValueError:
        return False
    return cls.reconstruct is not Method.reconstruct and method_name != "beit_tokenizer"


def load_method(weights: str | Path) -> tuple[Method | None, str]:
    """``(method with its decoder, "")`` rebuilt from ``weights``, or ``(None, why not)``: encoder-only
    weights, or a method without a pixel decoder. The weights must load strictly."""
    path = Path(weights)
    if path.is_file() and path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        name = meta.get("mimscale.method")
        if meta.get("mimscale.encoder_only", "true") == "true":
            return None, "encoder-only export: no decoder (export the full method, or pass the run directory)"
        if not draws_pixels(name):
            return None, f"method {name} has no pixel decoder"
        config = json.loads(meta.get("config", "{}"))
        return _build(name, config, load_file(str(path)), str(path)), ""
    if path.is_dir() and (path / "config.json").is_file() and not (path / "checkpoints").is_dir():
        return None, "timm model folder: encoder only, no decoder"
    from mimscale.export import consolidate
    from mimscale.runs import RunMeta, resolve_checkpoint

    root, tag = resolve_checkpoint(path)
    meta = RunMeta.read(root / tag)
    if not draws_pixels(meta.method):
        return None, f"method {meta.method} has no pixel decoder"
    return _build(meta.method, meta.config, consolidate(root, tag), str(root / tag)), ""


def _build(name: str, config: dict[str, Any], sd: dict[str, torch.Tensor], where: str) -> Method:
    from mimscale.methods import create_method

    model_kwargs = config.get("model")
    if not isinstance(model_kwargs, dict):
        raise ValueError(f"{where}: no recorded model config to rebuild method {name} with its decoder")
    method = create_method(name, **model_kwargs)
    missing, unexpected = method.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{where}: the weights do not fit method {name} {model_kwargs}: missing "
                         f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    return method.eval()


def denormalise_from_visible(pred: torch.Tensor, patches: torch.Tensor, mask: torch.Tensor,
                             grid: tuple[int, int]) -> torch.Tensor:
    """Map norm-pix predictions ``[B, L, P]`` back to (ImageNet-normalised) pixels with the visible patches'
    statistics: for patch ``m``, ``mean_m = sum_v w_mv mean_v / sum_v w_mv`` over visible patches ``v``
    (``mask`` False) with ``w_mv = 1 / d(m, v)^2`` (grid distance), likewise the variance; then
    ``pred * sqrt(var_m + 1e-6) + mean_m`` (the inverse of MAE's target normalisation, unbiased variance)."""
    gh, gw = grid
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten()], dim=-1).double().to(patches.device)
    d2 = torch.cdist(pos, pos).pow(2)
    inv = torch.where(d2 > 0, 1.0 / d2.clamp_min(1e-12), torch.zeros_like(d2))  # [L, L]
    visible = (~mask).double()  # [B, L]
    w = inv.unsqueeze(0) * visible.unsqueeze(1)  # [B, L(query), L(visible)]
    w = w / w.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    mean = patches.double().mean(dim=-1)
    var = patches.double().var(dim=-1, unbiased=True)
    mean_m = (w @ mean.unsqueeze(-1)).squeeze(-1)
    var_m = (w @ var.unsqueeze(-1)).squeeze(-1)
    return (pred.double() * (var_m.unsqueeze(-1) + NORM_PIX_EPS).sqrt() + mean_m.unsqueeze(-1)).to(pred.dtype)


@torch.no_grad()
def reconstruct(method: Method, images: torch.Tensor, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    """Rows ``original``, ``masked``, ``reconstruction`` (ImageNet-normalised ``[B, 3, H, W]``, CPU) of
    ``images`` at the method's own size, with a mask drawn by the method's masker from ``seed``; the
    reconstruction keeps the visible patches and shows the predictions in the masked ones. Also returns
    what was done (mask ratio, whether predictions were de-normalised)."""
    method.eval()
    device = next(method.parameters()).device
    enc = method.encoder
    p, grid, c = enc.patch_size, enc.grid, enc.in_chans
    b = images.shape[0]
    mask = method.masker(b, generator=torch.Generator().manual_seed(seed)).to(device)
    x = images.to(device)
    out = method(x if method.views == 1 else [x] * method.views, mask=mask)
    if out.pred is None or out.mask is None or out.pred.shape[:2] != out.mask.shape:
        raise ValueError(f"method {method.name} returned no per-patch prediction to draw")
    patches = patchify(x.float(), p)
    pred = out.pred.float()
    norm_pix = bool(getattr(method, "norm_pix_loss", False))
    if norm_pix:
        pred = denormalise_from_visible(pred, patches, out.mask, grid)
    m = out.mask.unsqueeze(-1).float()
    rows = {
        "original": x.float(),
        "masked": unpatchify(patches * (1 - m), p, grid, c),
        "reconstruction": unpatchify(patches * (1 - m) + pred * m, p, grid, c),
    }
    info = {
        "mask_ratio": float(out.mask.float().mean()),
        "masker": repr(method.masker),
        "seed": seed,
        "target": "norm-pix" if norm_pix else "pixels",
        "denormalised": DENORM_NOTE if norm_pix else None,
    }
    return {k: v.cpu() for k, v in rows.items()}, info
