"""A tiny synthetic image data set in WebDataset shards, for smoke runs, tests and tutorials.

Why synthetic and structured: smoke runs must work without downloading anything, and a masked
autoencoder needs images whose hidden patches are predictable from visible ones. Flat colours
are solved instantly and pure noise never, so a falling loss on either proves nothing. These
images are smooth colour gradients with coloured ellipses, rectangles and stripes; each of the
four classes favours one kind of shape, so a linear probe on the features has something to find.

The images go through the same writer as ``mimscale make-shards`` (they are written as JPEG
files into class folders first), so the demo exercises the real path end to end.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mimscale.data.shards import brace_spec, list_image_folder, write_shards

__all__ = ["CLASSES", "ensure_demo_shards", "synth_image"]

# Sorted names, so the writer's sorted-folder labels equal the index here.
CLASSES = ("0_ellipses", "1_rectangles", "2_stripes", "3_mixed")
_PATTERN = "train-%06d.tar"


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, size=3))  # type: ignore[return-value]


def synth_image(index: int, size: int = 64, seed: int = 0) -> tuple[Image.Image, int]:
    """Image ``index`` of the demo set and its label; a pure function of (index, size, seed)."""
    rng = np.random.default_rng([seed, index])
    label = index % len(CLASSES)
    # Background: linear gradient between two colours along a random direction.
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    t = np.clip(0.5 + (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle), 0.0, 1.0)[..., None]
    c0, c1 = np.array(_colour(rng), np.float32), np.array(_colour(rng), np.float32)
    img = Image.fromarray((c0 * (1 - t) + c1 * t).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    kinds = (
        [("ellipse", "rectangle", "stripes")[label]] * 4
        if label < 3
        else ["ellipse", "rectangle", "stripes"] * 2
    )
    for kind in kinds:
        colour = _colour(rng)
        if kind == "stripes":
            width = int(rng.integers(2, max(3, size // 8)))
            period = width * int(rng.integers(2, 4))
            offset = int(rng.integers(0, period))
            vertical = bool(rng.integers(0, 2))
            lo, hi = sorted(int(v) for v in rng.integers(0, size, size=2))
            for k in range(offset - period, size, period):
                box = (k, lo, k + width - 1, hi) if vertical else (lo, k, hi, k + width - 1)
                draw.rectangle(box, fill=colour)
            continue
        w, h = (int(v) for v in rng.integers(max(2, size // 8), max(3, size // 2), size=2))
        x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
        if kind == "ellipse":
            draw.ellipse((x0, y0, x0 + w, y0 + h), fill=colour, outline=_colour(rng))
        else:
            draw.rectangle((x0, y0, x0 + w, y0 + h), fill=colour)
    return img, label


def ensure_demo_shards(
    root: str | Path,
    num_images: int = 256,
    image_size: int = 64,
    samples_per_shard: int = 64,
) -> str:
    """Create the demo shards under ``root`` unless they already exist; return their brace URL spec.

    The set lives in ``root/demo-<num>-<size>px-<per-shard>/`` so different sizes never clash.
    It is built in a private temporary folder and renamed into place in one step, so concurrent
    ranks or processes may all call this: the first rename wins, the others discard their copy.
    """
    if num_images < 1 or image_size < 8 or samples_per_shard < 1:
        raise ValueError(
            f"need num_images >= 1, image_size >= 8, samples_per_shard >= 1; got {num_images}, "
            f"{image_size}, {samples_per_shard}"
        )
    root = Path(root).absolute()
    final = root / f"demo-{num_images}-{image_size}px-{samples_per_shard}"
    num_shards = -(-num_images // samples_per_shard)
    spec = brace_spec(str(final / _PATTERN), num_shards)
    if (final / "dataset.json").is_file():
        return spec
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    try:
        images = tmp / "images"
        for name in CLASSES:
            (images / name).mkdir(parents=True)
        for i in range(num_images):
            img, label = synth_image(i, image_size)
            img.save(images / CLASSES[label] / f"{i:06d}.jpg", format="JPEG", quality=90)
        records, classes = list_image_folder(images)
        write_shards(
            records, str(tmp / _PATTERN), classes=classes, samples_per_shard=samples_per_shard, shuffle_seed=0
        )
        shutil.rmtree(images)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "dataset.json").is_file():
                raise
            # Another process finished first; its copy is identical.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return spec
