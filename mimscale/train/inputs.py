"""The trainer's input side: this rank's loader of uint8 batches and the one ``to_device`` callable that
turns a batch into what the method takes (decoded on the device if the recipe asks, then normalised).

So the trainer's step is ``method(inputs.to_device(next(batches)))`` whatever the data path.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mimscale.dist import barrier
from mimscale.train.config import TrainConfig, build_data_transform
from mimscale.train.preemption import workers_ignore_preemption

__all__ = ["Inputs", "build_inputs", "demo_data_spec"]


def demo_data_spec(img_size: int, num_images: int) -> str:
    """The generated demo shards (built once per machine, shared by runs), sized for the crop."""
    from mimscale.data.demo import ensure_demo_shards

    image_size = max(64, int(math.ceil(img_size * 8 / 7 / 16)) * 16)
    cache = Path(os.environ.get("MIMSCALE_CACHE", Path.home() / ".cache" / "mimscale"))
    return ensure_demo_shards(
        cache / f"demo_{image_size}px_{num_images}", num_images=num_images, image_size=image_size
    )


@dataclass
class Inputs:
    """This rank's batches and how they reach the device."""

    loader: torch.utils.data.DataLoader
    to_device: Callable[[Any], torch.Tensor | tuple[torch.Tensor, ...]]
    source: str  # what the banner says about the data ("demo" or the shard spec)
    decode_device: torch.device | None  # where JPEGs are decoded when not in the workers


def build_inputs(
    cfg: TrainConfig,
    img_size: int,
    patch_size: int,
    micro_batch: int,
    *,
    rank: int,
    world_size: int,
    device: torch.device,
    dtype: torch.dtype,
    start_step: int,
) -> Inputs:
    """The loader over the recipe's shards (the demo set when none are given; rank 0 writes it once) with
    the recipe's transform, reseeded from ``start_step`` so a resumed run draws new shards and crops
    instead of replaying what it saw."""
    from mimscale.data.pipeline import build_train_loader, normalize_on_device

    urls = cfg.data.urls
    if urls is None:
        if rank == 0:
            demo_data_spec(img_size, cfg.data.demo_images)
        barrier()
        urls = demo_data_spec(img_size, cfg.data.demo_images)
    transform = build_data_transform(cfg, img_size, patch_size)
    decode: Callable[[Any], Any] | None = None
    if cfg.data.decode == "device":  # workers ship JPEG bytes + crop boxes; the device decodes
        from mimscale.data.gpu_decode import GpuJpegDecoder

        decode = GpuJpegDecoder(device)
    loader = build_train_loader(
        urls,
        transform,
        micro_batch,
        seed=cfg.seed * 1_000_003 + start_step,
        rank=rank,
        world_size=world_size,
        num_workers=cfg.data.num_workers,
        shuffle_buffer=cfg.data.shuffle_buffer,
        pin_memory=device.type == "cuda",
        worker_init_fn=workers_ignore_preemption,
    )

    def to_device(images: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        return normalize_on_device(images if decode is None else decode(images), device, dtype)

    return Inputs(
        loader,
        to_device,
        "demo" if cfg.data.urls is None else cfg.data.urls,
        device if decode is not None else None,
    )
