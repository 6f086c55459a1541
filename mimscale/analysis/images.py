"""The analysed images: the first N samples of a shard spec in shard order, prepared as an evaluation
transform prepares them (shorter side resized to the model's image size with bicubic filtering, centre
crop, ImageNet normalisation), so every checkpoint sees the same pictures, each at its own resolution.

The tar reading is the training pipeline's own (:func:`mimscale.data.pipeline.tar_samples`), without
shuffling, resampling or rank splitting.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mimscale.data.pipeline import IMAGE_KEYS, IMAGENET_MEAN, IMAGENET_STD, expand_urls, tar_samples

__all__ = ["ImageSet", "check_local_shards", "prepare_images", "read_images"]


@dataclass
class ImageSet:
    """Decoded RGB images and where they came from (``url:key``); ``errors``: unreadable shards/samples."""

    images: list[Image.Image]
    keys: list[str]
    errors: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)


def check_local_shards(spec: str) -> list[str]:
    """Expand ``spec`` and fail (``FileNotFoundError``) on local shard paths that do not exist, before any
    model is loaded; remote and ``pipe:`` URLs are left to the reader."""
    urls = expand_urls(spec)
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).is_file()]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise FileNotFoundError(f"--data {spec!r}: shard {missing[0]!r} does not exist"
                                + (f"; missing: {missing[:3]}{more}" if len(missing) > 1 else ""))
    return urls


def _is_image_member(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    _, dot, ext = base.partition(".")
    return bool(dot) and ext.lower() in IMAGE_KEYS


def read_images(spec: str, num_images: int) -> ImageSet:
    """The first ``num_images`` readable images of the shards of ``spec`` in shard order (fewer when the
    shards hold fewer). Unreadable shards and samples are skipped and listed in ``errors``."""
    if num_images < 1:
        raise ValueError(f"--num-images {num_images}: expected >= 1")
    urls = check_local_shards(spec)
    out = ImageSet([], [])

    def on_error(url: str, exc: BaseException) -> None:
        out.errors.append(f"{url}: {type(exc).__name__}: {exc}")

    samples = tar_samples(({"url": u} for u in urls), _is_image_member, on_error)
    for sample in samples:
        data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        key = f"{sample['__url__']}:{sample['__key__']}"
        if data is None:
            continue
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except Exception as exc:  # a corrupt sample: skip it, as training does
            out.errors.append(f"{key}: {type(exc).__name__}: {exc}")
            continue
        out.images.append(img.convert("RGB"))
        out.keys.append(key)
        if len(out.images) == num_images:
            break
    samples.close()  # closes the open shard now rather than at garbage collection
    return out


def _resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (bicubic), then the centre ``size x size`` crop: torchvision's
    ``Resize(size)`` + ``CenterCrop(size)`` arithmetic (longer side truncated, crop offset rounded)."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BICUBIC)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def prepare_images(images: list[Image.Image], size: int) -> torch.Tensor:
    """``[N, 3, size, size]`` float32, ImageNet-normalised."""
    arr = np.stack([np.asarray(_resize_center_crop(im, size), dtype=np.uint8) for im in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()
