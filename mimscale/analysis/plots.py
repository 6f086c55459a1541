"""The figures of ``mimscale analyze``: one PNG per analysis, one colour per checkpoint.

Every function takes plain per-model records (label, numbers, images) and writes one file, so the figures
can be redrawn from ``analysis.json`` and the layout stays out of the measurement code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mimscale.data.pipeline import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "ModelCurves",
    "plot_attention_distance",
    "plot_attention_maps",
    "plot_reconstructions",
    "plot_singular_values",
    "to_uint8",
]

BASELINE_COLOUR = "0.45"


@dataclass
class ModelCurves:
    """One model's line in the figures: ``baseline`` draws it grey and dashed (random initialisation)."""

    label: str
    attention_distance: np.ndarray  # [depth, heads], px
    spectra: dict[int, np.ndarray]  # block -> normalised singular values
    effective_rank: dict[int, float]
    baseline: bool = False


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colours(models: list[ModelCurves]) -> list[str]:
    palette = [f"C{i}" for i in range(10)]
    out, k = [], 0
    for m in models:
        if m.baseline:
            out.append(BASELINE_COLOUR)
        else:
            out.append(palette[k % len(palette)])
            k += 1
    return out


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """ImageNet-normalised ``[B, 3, H, W]`` -> uint8 ``[B, H, W, 3]``."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = images.detach().float().cpu() * std + mean
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def plot_attention_distance(models: list[ModelCurves], path: Path) -> Path:
    """Mean attention distance per block: each head a dot, the mean over heads a line, one colour per
    model (offset sideways so that models do not cover each other)."""
    plt = _pyplot()
    depth = max(m.attention_distance.shape[0] for m in models)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * depth + 3.0), 4.2))
    width = 0.7
    for k, (m, colour) in enumerate(zip(models, _colours(models))):
        d = m.attention_distance
        offset = (k - (len(models) - 1) / 2) * width / max(len(models), 1)
        xs = np.arange(d.shape[0]) + offset
        for h in range(d.shape[1]):
            ax.scatter(xs, d[:, h], s=14, color=colour, alpha=0.65, linewidths=0)
        ax.plot(xs, d.mean(axis=1), color=colour, lw=1.6, ls="--" if m.baseline else "-", marker="_",
                label=f"{m.label} (mean of {d.shape[1]} heads)")
    ax.set_xticks(range(depth))
    ax.set_xlabel("block (0 = first)")
    ax.set_ylabel("mean attention distance (px)")
    ax.set_title("Mean attention distance per head (patch tokens; dots: heads)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_singular_values(models: list[ModelCurves], path: Path) -> Path:
    """One panel per block: normalised singular values on a log scale, effective rank in the legend."""
    plt = _pyplot()
    layers = sorted({i for m in models for i in m.spectra})
    cols = min(len(layers), 4)
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    colours = _colours(models)
    for ax, layer in zip(axes.flat, layers):
        for m, colour in zip(models, colours):
            if layer not in m.spectra:
                continue
            s = m.spectra[layer]
            ax.semilogy(np.arange(1, len(s) + 1), np.clip(s, 1e-12, None), color=colour,
                        ls="--" if m.baseline else "-", lw=1.5,
                        label=f"{m.label}: effective rank {m.effective_rank[layer]:.1f}")
        ax.set_title(f"block {layer}: patch-token features")
        ax.set_xlabel("singular value index")
        ax.set_ylabel("σ_i / σ_1 (mean over images)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_attention_maps(entries: list[tuple[str, torch.Tensor, torch.Tensor, int]], path: Path) -> Path:
    """``entries``: ``(label, images [n, 3, H, W], cls maps [n, heads, gh, gw], block)``. One row per image
    and model: the image, the head-averaged map, then every head (each map coloured from 0 to its own
    maximum, so a uniform map is flat)."""
    plt = _pyplot()
    heads = max(e[2].shape[1] for e in entries)
    cols = 2 + heads
    rows = sum(e[2].shape[0] for e in entries)
    fig, axes = plt.subplots(rows, cols, figsize=(1.25 * cols, 1.3 * rows + 0.6), squeeze=False)
    r = 0
    for label, images, maps, _block in entries:
        pics = to_uint8(images)
        for i in range(maps.shape[0]):
            row = axes[r]
            row[0].imshow(pics[i])
            row[0].set_ylabel(f"{label}\nimage {i}", fontsize=7)
            shown = [maps[i].mean(dim=0)] + [maps[i, h] for h in range(maps.shape[1])]
            for c, a in enumerate(shown):
                row[1 + c].imshow(a.numpy(), cmap="inferno", interpolation="nearest", vmin=0.0,
                                  vmax=max(float(a.max()), 1e-12))
            if r == 0:
                for c, title in enumerate(["image", "mean"] + [f"head {h}" for h in range(heads)]):
                    row[c].set_title(title, fontsize=8)
            r += 1
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        if not ax.images:
            ax.axis("off")
    blocks = sorted({e[3] for e in entries})
    fig.suptitle(f"CLS attention over the patches, last block ({', '.join(map(str, blocks))}); "
                 "colour from 0 to each map's own maximum", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_reconstructions(entries: list[tuple[str, dict[str, torch.Tensor]]], title: str, path: Path) -> Path:
    """``entries``: ``(label, {"original", "masked", "reconstruction": [n, 3, H, W]})``, one column per image.
    When every model saw the same images under the same masks (same size and masker), the original and
    masked rows are drawn once, then one reconstruction row per model; otherwise three rows per model."""
    import textwrap

    plt = _pyplot()
    first = entries[0][1]
    shared = all(rows["original"].shape == first["original"].shape
                 and torch.equal(rows["original"], first["original"])
                 and torch.equal(rows["masked"], first["masked"]) for _, rows in entries)
    if shared:
        lines = [("original", first["original"]), ("masked", first["masked"])]
        lines += [(f"{label}\nreconstruction", rows["reconstruction"]) for label, rows in entries]
    else:
        lines = [(f"{label}\n{name}", rows[name]) for label, rows in entries
                 for name in ("original", "masked", "reconstruction")]
    n = max(images.shape[0] for _, images in lines)
    width = 1.35 * n + 0.8
    fig, axes = plt.subplots(len(lines), n, figsize=(width, 1.35 * len(lines) + 0.9), squeeze=False)
    for r, (name, images) in enumerate(lines):
        pics = to_uint8(images)
        for c in range(n):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(pics):
                ax.imshow(pics[c], interpolation="nearest")
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(name, fontsize=7)
    wrapped = "\n".join(textwrap.fill(part, width=max(40, int(width * 11))) for part in title.split("\n"))
    fig.suptitle(wrapped, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
