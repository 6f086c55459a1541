"""ImageNet-like benchmark JPEGs cut from real photographs that installed packages ship.

Decode and resize cost depend on image size and on content (entropy-coded coefficients, edges), so
flat or synthetic images flatter every pipeline. This module cuts random crops from the colour
photographs scikit-image ships (astronaut, coffee, chelsea, rocket, motorcycle, retina, ...) and
from matplotlib's ``grace_hopper.jpg`` (always present: matplotlib is a runtime dependency), sizes
them like ImageNet's training set (mostly 500 px on the long side, 4:3 / 3:2 / square / portrait,
some larger; about 500x375 on average) and re-encodes them as ImageNet JPEGs are: baseline,
quality 90, 4:2:0 chroma subsampling.

Crops are resampled by at most ~1.3x up, so the images keep real-photo detail instead of
turning into smooth upscales that decode faster than real data.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

# Colour photographs shipped inside the scikit-image wheel (skimage/data/); grey or synthetic
# images (camera, text, chessboard, ...) are left out.
SKIMAGE_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "rocket.jpg",
    "hubble_deep_field.jpg",
    "ihc.png",
    "retina.jpg",
)

# (width, height) shapes with ImageNet-like frequencies: 500x375 and 500x333 dominate, portraits
# about a fifth, a tail of larger and squarer images.
_SHAPES = (
    ((500, 375), 0.40),
    ((500, 333), 0.17),
    ((375, 500), 0.08),
    ((333, 500), 0.03),
    ((500, 500), 0.04),
    ((400, 300), 0.07),
    ((640, 480), 0.07),
    ((480, 640), 0.02),
    ((800, 600), 0.02),
    ((500, 281), 0.06),
    ((300, 400), 0.04),
)


def source_photos() -> list[tuple[str, Image.Image]]:
    """The real photographs available here, as (name, RGB image); at least grace_hopper."""
    found: list[tuple[str, Path]] = []
    try:
        import matplotlib

        found.append(("grace_hopper", Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"))
    except ImportError:
        pass
    try:
        import skimage

        root = Path(skimage.__file__).parent / "data"
        found += [(name.split(".")[0], root / name) for name in SKIMAGE_PHOTOS]
    except ImportError:
        pass
    photos = []
    for name, path in found:
        if path.is_file():
            with Image.open(path) as img:
                photos.append((name, img.convert("RGB")))
    if not photos:
        raise RuntimeError(
            "no sample photographs found: install matplotlib and scikit-image (requirements-dev.txt)"
        )
    return photos


def _sample_shape(rng: np.random.Generator) -> tuple[int, int]:
    shapes, weights = zip(*_SHAPES)
    w, h = shapes[rng.choice(len(shapes), p=np.asarray(weights) / sum(weights))]
    jitter = rng.uniform(0.9, 1.1)  # not every image is exactly 500 px
    return max(64, int(round(w * jitter))), max(64, int(round(h * jitter)))


def imagenet_like_jpegs(count: int, seed: int = 0, quality: int = 90) -> Iterator[tuple[str, bytes]]:
    """Yield ``count`` (source name, JPEG bytes) pairs, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    photos = source_photos()
    for i in range(count):
        name, src = photos[i % len(photos)]
        out_w, out_h = _sample_shape(rng)
        aspect = out_w / out_h
        # Largest crop of the source with the target aspect, then a random fraction of it, no
        # smaller than the output / 1.3 (limits upsampling) where the source allows.
        max_w = min(src.width, src.height * aspect)
        min_w = min(max_w, out_w / 1.3)
        crop_w = rng.uniform(min_w, max_w) if max_w > min_w else max_w
        crop_h = min(crop_w / aspect, src.height)
        left = rng.uniform(0, max(0.0, src.width - crop_w))
        top = rng.uniform(0, max(0.0, src.height - crop_h))
        box = (left, top, left + crop_w, top + crop_h)
        img = src.resize((out_w, out_h), Image.Resampling.LANCZOS, box=box)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality, subsampling="4:2:0", optimize=False)
        yield name, buf.getvalue()


def mean_size(jpegs: list[bytes]) -> tuple[float, float]:
    """Mean (width, height) of encoded images, read from their headers."""
    sizes = [Image.open(io.BytesIO(b)).size for b in jpegs]
    return (
        float(np.mean([s[0] for s in sizes])),
        float(np.mean([s[1] for s in sizes])),
    )


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))
