"""WebDataset streaming for training: shard lists, resampling, shuffling, safe decoding, batching.

All WebDataset logic lives in this one module (the way open_clip keeps it in ``data.py``) so the
trainer only sees ``build_train_loader(...) -> iterable of Batch`` and ``normalize_on_device``.

One batch's path::

    shard URLs --(ResampledShards, seeded per rank and worker | split by rank, then worker)-->
    tar members, only jpg/jpeg/png/webp/cls read as raw bytes --> shuffle buffer -->
    transform(bytes, rng) -> uint8 CHW (bad sample: skipped, counted, rate-limited warning) -->
    np.stack -> torch.from_numpy --> Batch(images uint8, labels int64, skipped) --> trainer -->
    normalize_on_device (float + ImageNet mean/std on the GPU)

Safety: WebDataset's default decoders are never used. Members other than the image and ``cls``
keys are not even read out of the tar stream, so a ``.pyd``/``.pickle`` member in an untrusted
shard is never unpickled.

Determinism and resume: every random choice in a worker (which shard next, the shuffle buffer, the
augmentations) derives from ``(seed, rank, worker id)``. The training loop passes a seed derived
from the step it resumes at, so a resumed run does not replay the samples it already consumed,
and two runs with the same seed and world size see the same stream.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import braceexpand
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_KEYS",
    "Batch",
    "build_train_loader",
    "expand_urls",
    "normalize_on_device",
]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_READ_KEYS = frozenset((*IMAGE_KEYS, "cls"))
# Consecutive failures (unreadable shards or samples, no good sample between them) after which the
# stream gives up: isolated bad samples never stop training, a wrong URL or a dead mount must.
MAX_CONSECUTIVE_FAILURES = 10_000
WARN_INTERVAL_S = 30.0

Transform = Callable[[bytes, np.random.Generator], Any]


def expand_urls(spec: str) -> list[str]:
    """Expand a shard spec into a list of URLs.

    ``spec`` may join several specs with ``::`` (e.g. two data sets), each with brace ranges
    (``/data/train-{000000..000127}.tar``); local paths and ``pipe:`` commands are both fine
    (``pipe:aws s3 cp s3://b/train-{0..9}.tar -``). Environment variables are not substituted:
    a URL means what it says.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"shard spec must be a non-empty string, got {spec!r}")
    urls: list[str] = []
    for part in spec.split("::"):
        part = part.strip()
        if not part:
            raise ValueError(f"empty entry in shard spec {spec!r} (check for a stray '::')")
        urls.extend(braceexpand.braceexpand(part))
    return urls


@dataclass
class Batch:
    """One training batch as it leaves a worker.

    images: uint8 [B, 3, H, W], or a tuple of such tensors (one per view) for a ``Views`` transform.
    labels: int64 [B], -1 where the sample has no ``cls``.
    skipped: samples this worker dropped as unreadable since its previous batch; the loop sums
        them across batches (and ranks) to report the data set's health.
    """

    images: torch.Tensor | tuple[torch.Tensor, ...]
    labels: torch.Tensor
    skipped: int = 0

    def pin_memory(self) -> Batch:
        """Called by DataLoader's pin-memory thread (``pin_memory=True``)."""
        images = (
            tuple(t.pin_memory() for t in self.images)
            if isinstance(self.images, tuple)
            else self.images.pin_memory()
        )
        return Batch(images, self.labels.pin_memory(), self.skipped)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _read_member(fname: str) -> bool:
    """tar member filter: read only image and cls members (same key/extension split as WebDataset)."""
    base = fname.rsplit("/", 1)[-1]
    _, dot, ext = base.partition(".")
    return bool(dot) and ext.lower() in _READ_KEYS


def collate(samples: Sequence[tuple[Any, int]], skipped: int = 0) -> Batch:
    """Stack (uint8 array or tuple of arrays, label) pairs into a :class:`Batch` without float copies."""
    first = samples[0][0]
    if isinstance(first, tuple):
        images: torch.Tensor | tuple[torch.Tensor, ...] = tuple(
            torch.from_numpy(np.stack([s[0][v] for s in samples])) for v in range(len(first))
        )
    else:
        images = torch.from_numpy(np.stack([s[0] for s in samples]))
    labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
    return Batch(images, labels, skipped)


class _Health:
    """Per-worker skip counter with a rate-limited warning (one line per WARN_INTERVAL_S)."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.pending = 0  # skipped since the last batch
        self.since_warning = 0
        self.consecutive = 0
        self.last_warning = -float("inf")

    def fail(self, what: str, exc: BaseException) -> None:
        self.pending += 1
        self.since_warning += 1
        self.consecutive += 1
        now = time.monotonic()
        if now - self.last_warning >= WARN_INTERVAL_S:
            log.warning(
                "%s: skipped %s: %s: %s (%d skipped since the last warning)",
                self.where,
                what,
                type(exc).__name__,
                exc,
                self.since_warning,
            )
            self.last_warning, self.since_warning = now, 0
        if self.consecutive >= MAX_CONSECUTIVE_FAILURES:
            raise RuntimeError(
                f"{self.where}: {self.consecutive} consecutive unreadable shards/samples, last {what}: "
                f"{exc!r}; check the shard URLs"
            ) from exc

    def ok(self) -> None:
        self.consecutive = 0

    def take(self) -> int:
        n, self.pending = self.pending, 0
        return n


class _ShardStream(IterableDataset):
    """IterableDataset yielding whole :class:`Batch` objects; one instance per rank."""

    def __init__(
        self,
        urls: list[str],
        transform: Transform,
        batch_size: int,
        *,
        seed: int,
        rank: int,
        world_size: int,
        shuffle_buffer: int,
        resampled: bool,
        drop_last: bool,
    ) -> None:
        super().__init__()
        self.urls = urls
        self.transform = transform
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = shuffle_buffer
        self.resampled = resampled
        self.drop_last = drop_last

    def _shards(self, worker: int, num_workers: int, shard_seed: int) -> Iterator[dict]:
        if self.resampled:
            # deterministic=True: the shard sequence is a function of the seed we give it (not of
            # pid/time), which already differs per rank and per worker.
            yield from wds.ResampledShards(
                self.urls, seed=shard_seed, worker_seed=lambda: 0, deterministic=True
            )
            return
        urls = list(self.urls)
        # Same permutation on every rank (base seed only), so the rank/worker split stays disjoint.
        random.Random(self.seed).shuffle(urls)
        mine = islice(islice(urls, self.rank, None, self.world_size), worker, None, num_workers)
        for url in mine:
            yield {"url": url}

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        seeds = np.random.SeedSequence([self.seed & (2**63 - 1), self.rank, worker]).spawn(3)
        shard_seed = int(seeds[0].generate_state(1)[0])
        shuffle_rng = random.Random(int(seeds[1].generate_state(1)[0]))
        aug_rng = np.random.default_rng(seeds[2])
        health = _Health(f"data rank {self.rank} worker {worker}")

        def on_tar_error(exc: BaseException) -> bool:
            health.fail(f"shard data ({exc.args[-1] if exc.args else '?'})", exc)
            return True  # keep going with the next member/shard

        samples: Iterator[dict] = wds.tarfile_to_samples(handler=on_tar_error, select_files=_read_member)(
            self._shards(worker, num_workers, shard_seed)
        )
        if self.shuffle_buffer > 1:
            samples = wds.filters.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=shuffle_rng)(samples)

        pending: list[tuple[Any, int]] = []
        for sample in samples:
            key = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
            try:
                data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
                if data is None:
                    raise ValueError(f"no image member (expected one of {', '.join(IMAGE_KEYS)})")
                label = int(sample["cls"]) if "cls" in sample else -1
                out = self.transform(data, aug_rng)
            except Exception as exc:  # any decode/label error means "skip this sample"
                health.fail(f"sample {key}", exc)
                continue
            health.ok()
            pending.append((out, label))
            if len(pending) == self.batch_size:
                yield collate(pending, health.take())
                pending = []
        if pending and not self.drop_last:
            yield collate(pending, health.take())


def _identity(batch: Batch) -> Batch:
    return batch


def build_train_loader(
    urls: str | Sequence[str],
    transform: Transform,
    batch_size: int,
    *,
    seed: int,
    rank: int,
    world_size: int,
    num_workers: int = 4,
    shuffle_buffer: int = 1000,
    resampled: bool = True,
    pin_memory: bool = False,
    drop_last: bool = True,
    prefetch_factor: int = 2,
) -> DataLoader:
    """Build this rank's training loader; iterate it to get :class:`Batch` objects.

    urls: a spec for :func:`expand_urls` or a list of URLs.
    transform: ``transform(bytes, numpy Generator)`` -> uint8 CHW array, or a tuple of them (see
        :mod:`mimscale.data.transforms`).
    batch_size: per-rank batch size; every worker builds whole batches.
    seed: base seed; combined with ``rank`` and the worker id for shard choice, shuffle and
        augmentation. Pass a value derived from the resume step so a resumed run sees fresh data.
    resampled: True (training): each worker draws shards with replacement forever, so every rank
        can take any number of steps and no rank runs dry before the others. False: one pass, the
        shard list split by rank then by worker (needs at least ``world_size * num_workers``
        shards, otherwise some workers would have nothing to read).
    shuffle_buffer: samples held per worker for shuffling (raw bytes; 0 or 1 disables it).
    drop_last: drop a worker's final partial batch (only reachable with ``resampled=False``).
    """
    url_list = expand_urls(urls) if isinstance(urls, str) else [str(u) for u in urls]
    if not url_list:
        raise ValueError("no shard URLs given")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
    readers = world_size * max(num_workers, 1)
    if not resampled and len(url_list) < readers:
        raise ValueError(
            f"resampled=False needs at least world_size * num_workers = {readers} shards, got "
            f"{len(url_list)}; use resampled=True or fewer workers"
        )
    dataset = _ShardStream(
        url_list,
        transform,
        batch_size,
        seed=int(seed),
        rank=rank,
        world_size=world_size,
        shuffle_buffer=shuffle_buffer,
        resampled=resampled,
        drop_last=drop_last,
    )
    return DataLoader(
        dataset,
        batch_size=None,  # the dataset yields whole batches
        collate_fn=_identity,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
    )


_NORM_CACHE: dict[tuple[str, int | None], tuple[torch.Tensor, torch.Tensor]] = {}


def _norm_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) so that x_uint8 * scale + shift == (x / 255 - mean) / std, cached per device."""
    key = (device.type, device.index)
    if key not in _NORM_CACHE:
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32)
        scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1).to(device)
        shift = (-mean / std).view(1, 3, 1, 1).to(device)
        _NORM_CACHE[key] = (scale, shift)
    return _NORM_CACHE[key]


def normalize_on_device(
    images: torch.Tensor | Sequence[torch.Tensor],
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Move uint8 images to ``device`` (non_blocking) and normalise there with ImageNet mean/std.

    Shipping uint8 and normalising on the accelerator moves 4x fewer bytes than float32 and keeps
    the workers free of float work. The arithmetic is float32 and cast to ``dtype`` at the end.
    A tuple/list of views returns a tuple of normalised tensors.
    """
    if isinstance(images, list | tuple):
        return tuple(normalize_on_device(x, device, dtype) for x in images)
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize_on_device expects uint8 images, got {images.dtype}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
    device = torch.device(device)
    x = images.to(device, non_blocking=True)
    scale, shift = _norm_constants(x.device)
    return torch.addcmul(shift, x.float(), scale).to(dtype)
