"""The data set's size and shard layout, and what to change in it for a given job.

Where the numbers come from, most reliable first: ``--images`` / ``--mean-jpeg-kb``; the ``dataset.json``
that ``mimscale make-shards`` writes beside the shards (sample and shard counts, samples per shard, whether
the samples were shuffled); the ``--data`` shard list itself (shard count; local shards' sizes); ImageNet-1k
otherwise.

The checks, against how :mod:`mimscale.data.pipeline` reads shards in training (every DataLoader worker of
every rank draws shards with replacement, reads one at a time, and mixes samples in a buffer of
``data.shuffle_buffer``):

* shards vs readers (ranks x workers): with fewer shards than readers, several workers stream the same shard
  at the same moment, so one global batch holds copies of the same images (nothing hangs: shards are drawn
  with replacement; a non-resampled reader would need at least one shard per reader);
* samples per shard: tiny shards cost a file open per few images; huge ones make the buffer mix only
  neighbours;
* order: shards written in folder order (no ``--shuffle-seed``) hold one or two classes each, and a
  worker's buffer spans only ``shuffle_buffer / samples per shard`` consecutive shards;
* the epoch the schedule counts (``data.epoch_size``) against the data's real size;
* host memory of the shuffle buffers (encoded bytes held by every worker on a node).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mimscale.planning.presets import IMAGENET_1K

__all__ = ["DataSetInfo", "Finding", "dataset_info", "shard_findings"]


@dataclass(frozen=True)
class Finding:
    """One check: ``level`` is "ok", "warn" or "error"; ``fix`` says what to change."""

    level: str
    what: str
    fix: str = ""


@dataclass
class DataSetInfo:
    images: int
    mean_jpeg_kb: float
    shards: int | None = None
    samples_per_shard: int | None = None
    shuffled: bool | None = None  # samples written in a seeded random order (make-shards --shuffle-seed)
    num_classes: int | None = None
    sources: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _local_path(url: str) -> Path | None:
    if url.startswith("pipe:") or "://" in url and not url.startswith("file://"):
        return None
    return Path(url.removeprefix("file://"))


def dataset_info(data: str | None, images: int | None, mean_jpeg_kb: float | None) -> DataSetInfo:
    """What is known about the data set; ValueError for a ``--data`` spec that does not expand."""
    info = DataSetInfo(IMAGENET_1K.images, IMAGENET_1K.mean_jpeg_kb)
    known_images = known_kb = False
    if data is not None:
        from mimscale.data.pipeline import expand_urls

        urls = expand_urls(data)
        info.shards = len(urls)
        info.sources.append(f"--data: {len(urls)} shards")
        first = _local_path(urls[0])
        if first is not None:
            meta_file = first.parent / "dataset.json"
            if meta_file.is_file():
                meta = json.loads(meta_file.read_text())
                info.images = int(meta.get("num_samples", info.images))
                info.samples_per_shard = meta.get("samples_per_shard")
                info.shuffled = meta.get("shuffle_seed") is not None
                info.num_classes = meta.get("num_classes")
                known_images = "num_samples" in meta
                info.sources.append(f"{meta_file}")
            local = [p for p in (_local_path(u) for u in urls) if p is not None and p.is_file()]
            if local:
                total = sum(os.path.getsize(p) for p in local)
                if known_images and len(local) == len(urls):
                    info.mean_jpeg_kb = total / info.images / 1e3
                    known_kb = True
                    info.sources.append(f"shard sizes: {total / 1e9:.1f} GB")
                elif info.samples_per_shard:
                    info.mean_jpeg_kb = total / (len(local) * info.samples_per_shard) / 1e3
                    known_kb = True
                    info.sources.append(f"shard sizes of {len(local)} local shards")
    if images is not None:
        info.images, known_images = images, True
        info.sources.append("--images")
    if mean_jpeg_kb is not None:
        info.mean_jpeg_kb, known_kb = mean_jpeg_kb, True
        info.sources.append("--mean-jpeg-kb")
    if info.shards and info.samples_per_shard is None and known_images:
        info.samples_per_shard = math.ceil(info.images / info.shards)
    if not known_images:
        info.sources.append(f"images: ImageNet-1k's {IMAGENET_1K.images} assumed")
    if not known_kb:
        info.sources.append(f"mean JPEG: ImageNet-1k's {IMAGENET_1K.mean_jpeg_kb:.0f} kB assumed")
    return info


def shard_findings(
    info: DataSetInfo,
    *,
    world: int,
    gpus_per_node: int,
    num_workers: int,
    shuffle_buffer: int,
    epoch_size: int,
    global_batch: int,
) -> list[Finding]:
    """The shard-layout checks for a job of ``world`` ranks (module docstring)."""
    out: list[Finding] = []
    readers = world * max(1, num_workers)
    if info.shards is not None:
        if info.shards < readers:
            spp = max(1, info.images // (4 * readers))
            out.append(
                Finding(
                    "warn",
                    f"{info.shards} shards for {readers} readers ({world} ranks x {max(1, num_workers)} "
                    "workers): "
                    f"about {readers / info.shards:.1f} workers stream each shard at once, so global batches "
                    "repeat images",
                    f"re-shard to >= {readers} shards (4 per reader is comfortable): mimscale make-shards "
                    f"--samples-per-shard {spp} --shuffle-seed 0",
                )
            )
        else:
            out.append(
                Finding(
                    "ok",
                    f"{info.shards} shards for {readers} readers ({info.shards / readers:.1f} per reader)",
                )
            )
    if info.samples_per_shard is not None:
        spp = info.samples_per_shard
        if spp < 100 and info.images >= 100 * readers:
            out.append(
                Finding(
                    "warn",
                    f"{spp} samples per shard: a file open every few images",
                    f"write {min(10_000, max(1000, info.images // (4 * readers)))} samples per shard "
                    "(mimscale make-shards --samples-per-shard)",
                )
            )
        elif shuffle_buffer < spp and info.shuffled is False:
            out.append(
                Finding(
                    "warn",
                    f"{spp} samples per shard in folder order and data.shuffle_buffer="
                    f"{shuffle_buffer}: a worker's batches come from one shard's few classes",
                    f"re-shard with --shuffle-seed 0, or --set data.shuffle_buffer={4 * spp}",
                )
            )
        else:
            out.append(Finding("ok", f"{spp} samples per shard"))
    if (
        info.shuffled is False
        and (info.num_classes or 0) > 1
        and shuffle_buffer >= (info.samples_per_shard or 0)
    ):
        out.append(
            Finding(
                "warn",
                "shards hold samples in class-folder order (no --shuffle-seed): each "
                f"worker's buffer of {shuffle_buffer} spans a handful of classes",
                "re-shard with mimscale make-shards --shuffle-seed 0",
            )
        )
    if info.images < global_batch:
        out.append(
            Finding(
                "warn",
                f"the data has {info.images} images, fewer than one global batch of {global_batch}",
                f"--set global_batch=N with N <= {info.images}",
            )
        )
    if abs(info.images - epoch_size) > 0.01 * info.images:
        out.append(
            Finding(
                "warn",
                f"the schedule counts epochs of data.epoch_size={epoch_size} samples but the "
                f"data has {info.images}",
                f"--set data.epoch_size={info.images}",
            )
        )
    else:
        out.append(
            Finding(
                "ok",
                f"epoch of {epoch_size} samples = {max(1, epoch_size // global_batch)} steps "
                f"of {global_batch}",
            )
        )
    buffer_gb = gpus_per_node * max(1, num_workers) * shuffle_buffer * info.mean_jpeg_kb / 1e6
    level = "warn" if buffer_gb > 64 else "ok"
    out.append(
        Finding(
            level,
            f"shuffle buffers hold {buffer_gb:.1f} GB of JPEGs per node ({gpus_per_node} ranks x "
            f"{max(1, num_workers)} workers x {shuffle_buffer} samples)",
            "" if level == "ok" else "--set data.shuffle_buffer=N with a smaller N",
        )
    )
    return out
