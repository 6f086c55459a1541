"""Pictures of a run: reconstructions (original / masked / reconstruction) and the loss curve as PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

IMAGENET_MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)


def denormalize(images: torch.Tensor) -> np.ndarray:
    """Normalised float [B, 3, H, W] -> uint8 [B, H, W, 3]."""
    x = images.detach().float().cpu() * IMAGENET_STD + IMAGENET_MEAN
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_reconstruction_grid(
    rows: dict[str, torch.Tensor], path: str | Path, max_images: int = 8, scale: int = 4
) -> Path:
    """One row per entry (``original``, ``masked``, ``reconstruction``), one column per image."""
    from PIL import Image, ImageDraw

    names = list(rows)
    arrays = [denormalize(rows[n][:max_images]) for n in names]
    n, h, w, _ = arrays[0].shape
    label_w, pad = 110, 2
    h_s, w_s = h * scale, w * scale
    canvas = Image.new("RGB", (label_w + n * (w_s + pad), len(names) * (h_s + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (name, arr) in enumerate(zip(names, arrays)):
        y = r * (h_s + pad)
        draw.text((4, y + h_s // 2 - 6), name, fill="black")
        for c in range(n):
            tile = Image.fromarray(arr[c]).resize((w_s, h_s), Image.NEAREST)
            canvas.paste(tile, (label_w + c * (w_s + pad), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def plot_metrics(jsonl: str | Path, path: str | Path, keys: tuple[str, ...] = ("loss", "lr")) -> Path | None:
    """Plot the logged curves (one panel per key) from metrics.jsonl; None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]
    if not records:
        return None
    keys = tuple(k for k in keys if any(k in r for r in records))
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = sorted((r["step"], r[key]) for r in records if key in r)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".")
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
