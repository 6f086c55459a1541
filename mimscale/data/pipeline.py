"""WebDataset streaming for training: shard lists, resampling, shuffling, safe decoding, batching.

All WebDataset logic lives in this one module (the way open_clip keeps it in ``data.py``) so the
trainer only sees ``build_train_loader(...) -> iterable of Batch`` and ``normalize_on_device``.

One batch's path::

    shard URLs --(ResampledShards, seeded per rank and worker | split by rank, then worker)-->
    tar members (iter_tar_members), only jpg/jpeg/png/webp/cls read as raw bytes --> shuffle buffer -->
    transform(bytes, rng) -> uint8 [3, H, W] (bad sample: skipped, counted, rate-limited warning) -->
    stack_uint8 (one copy, into shared memory in a worker) --> Batch(images uint8 channels-last,
    labels int64, skipped) --> trainer --> normalize_on_device (float + ImageNet mean/std on the GPU,
    contiguous NCHW)

GPU decoding (:mod:`mimscale.data.gpu_decode`): with a ``JpegCropSampler`` transform the workers
only read JPEG headers and draw crop boxes and flips; the batch carries the encoded bytes
(``EncodedBatch``) and ``GpuJpegDecoder`` decodes, crops and resizes them on the device.

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
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mimscale.data.transforms import is_channels_last

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_KEYS",
    "Batch",
    "build_train_loader",
    "empty_uint8_batch",
    "expand_urls",
    "normalize_on_device",
]

log = logging.getLogger(__name__)

# The normalisation every method and the official code use, as timm defines it.
IMAGENET_MEAN = IMAGENET_DEFAULT_MEAN
IMAGENET_STD = IMAGENET_DEFAULT_STD
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

    images: uint8 [B, 3, H, W] (``torch.channels_last`` memory format when the transform returns
        interleaved pixels, as mimscale's do; see :func:`stack_uint8`), or a tuple of such tensors
        (one per view) for a ``Views`` transform,
        or an :class:`~mimscale.data.gpu_decode.EncodedBatch` (JPEG bytes + crop boxes, decoded on
        the GPU by :class:`~mimscale.data.gpu_decode.GpuJpegDecoder`).
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


# ------------------------------------------------------------------------------------------------
# tar reading
#
# WebDataset's tar expansion goes through Python's ``tarfile`` module, which parses each 512-byte
# header field by field in Python: about 75 us per sample, 6% of the whole per-image budget of the
# MAE pipeline on one core. Shards are plain ustar/pax archives, so the members are read here with
# a direct header parser (about 8 us per sample) that understands what writers produce: ustar
# prefix+name, pax extended headers ('x': path, size; 'g' ignored) and GNU long names ('L'; long
# link names 'K' are skipped).


class TarFormatError(ValueError):
    """A shard is not a readable tar stream (bad checksum, truncated member)."""


_ZERO_BLOCK = bytes(512)
_REGULAR = (b"0", b"\0", b"7")


def _read_exact(stream: Any, n: int) -> bytes:
    data = stream.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = stream.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _skip(stream: Any, n: int) -> None:
    while n > 0:
        chunk = stream.read(min(n, 1 << 20))
        if not chunk:
            raise TarFormatError("truncated member data")
        n -= len(chunk)


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    field = field.split(b"\0", 1)[0].strip()
    return int(field, 8) if field else 0


def _pax_records(data: bytes) -> dict[str, str]:
    """Parse the ``<len> key=value`` records (one per line) of a pax extended header."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def iter_tar_members(stream: Any, select: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of the regular files in a tar stream whose name passes ``select``.

    Members that are not selected are skipped without building Python objects for them; anything
    that is not a regular file (directories, links, devices) is skipped. Raises
    :class:`TarFormatError` on a corrupt header or a truncated member.
    """
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = _read_exact(stream, 512)
        if len(header) < 512 or header == _ZERO_BLOCK:
            if header and len(header) < 512:
                raise TarFormatError("truncated tar header")
            return
        stored = _octal(header[148:156])
        if stored != sum(header) - sum(header[148:156]) + 256:  # the checksum field counts as spaces
            signed = sum(b - 256 if b > 127 else b for b in header[:148] + header[156:]) + 256
            if stored != signed:  # some old writers sum signed bytes (tarfile accepts both too)
                raise TarFormatError("tar header checksum mismatch")
        size = _octal(header[124:136])
        kind = header[156:157]
        padded = size + (-size) % 512
        if kind in (b"x", b"g", b"L", b"K"):  # extended headers: they describe the next member
            data = _read_exact(stream, padded)
            if len(data) < padded:
                raise TarFormatError("truncated tar extended header")
            if kind == b"x":
                pax = _pax_records(data[:size])
            elif kind == b"L":
                long_name = data[:size].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        name = long_name or pax.get("path")
        if name is None:
            name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if header[257:262] == b"ustar":
                prefix = header[345:500].split(b"\0", 1)[0]
                if prefix:
                    name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        if "size" in pax:
            size = int(pax["size"])
            padded = size + (-size) % 512
        long_name, pax = None, {}
        if kind in _REGULAR and select(name):
            data = _read_exact(stream, size)
            if len(data) < size:
                raise TarFormatError(f"truncated data of tar member {name!r}")
            _skip(stream, padded - size)
            yield name, data
        else:
            _skip(stream, padded)


def tar_samples(
    urls: Iterator[dict], select: Callable[[str], bool], on_error: Callable[[str, BaseException], None]
) -> Iterator[dict[str, Any]]:
    """WebDataset samples (``__key__``, ``__url__`` and one entry per lower-cased extension) from
    shard dicts ``{"url": ...}``; members of one sample are consecutive and share the key (the path
    up to the first dot of the file name). A shard that cannot be opened or read is reported to
    ``on_error(url, exc)`` and the stream goes on with the next shard (its complete samples before
    the error are kept)."""
    for shard in urls:
        url = shard["url"]
        current: dict[str, Any] | None = None
        try:
            with wds.gopen(url, "rb") as stream:
                for name, data in iter_tar_members(stream, select):
                    slash = name.rfind("/") + 1
                    dot = name.find(".", slash)
                    if dot < 0:
                        continue
                    key, ext = name[:dot], name[dot + 1 :].lower()
                    if current is None or current["__key__"] != key:
                        if current is not None:
                            yield current
                        current = {"__key__": key, "__url__": url}
                    current[ext] = data
        except Exception as exc:  # a broken shard or an unreachable URL: report it, keep streaming
            on_error(url, exc)
            current = None  # its last sample may be cut short
        if current is not None:
            yield current


def empty_uint8_batch(shape: Sequence[int], channels_last: bool) -> torch.Tensor:
    """An uninitialised uint8 ``[B, C, H, W]`` batch; in ``torch.channels_last`` memory format if asked.

    In a DataLoader worker it lives in shared memory (as torch's ``default_collate`` builds its
    batches), so handing it to the main process does not copy it a second time.
    """
    b, c, h, w = (int(v) for v in shape)
    alloc_shape = (b, h, w, c) if channels_last else (b, c, h, w)
    if get_worker_info() is not None:
        storage = torch.empty(0, dtype=torch.uint8)._typed_storage()._new_shared(b * c * h * w)
        out = torch.empty(0, dtype=torch.uint8).new(storage).view(alloc_shape)
    else:
        out = torch.empty(alloc_shape, dtype=torch.uint8)
    return out.permute(0, 3, 1, 2) if channels_last else out


def stack_uint8(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """Stack same-shape uint8 ``[C, H, W]`` arrays into one tensor with a single copy.

    Arrays with channels-last strides (what :mod:`mimscale.data.transforms` returns) give a batch in
    ``torch.channels_last`` memory format: interleaved pixels are copied as they are, and
    :func:`normalize_on_device` makes the float batch contiguous on the device. Any other layout
    gives a contiguous batch. The batch is in shared memory in a worker (:func:`empty_uint8_batch`).
    """
    first = arrays[0]
    channels_last = is_channels_last(first)
    out = empty_uint8_batch((len(arrays), *first.shape), channels_last)
    if channels_last:  # copy in memory order: numpy's strided stack into a permuted view is 3x slower
        np.stack([a.transpose(1, 2, 0) for a in arrays], out=out.permute(0, 2, 3, 1).numpy())
    else:
        np.stack(arrays, out=out.numpy())
    return out


def collate(samples: Sequence[tuple[Any, int]], skipped: int = 0) -> Batch:
    """Stack (uint8 array or tuple of arrays, label) pairs into a :class:`Batch` without float copies.

    Samples from :class:`mimscale.data.gpu_decode.JpegCropSampler` (encoded JPEG + crop box) are
    packed into an :class:`~mimscale.data.gpu_decode.EncodedBatch` for decoding on the GPU.
    """
    first = samples[0][0]
    images: Any
    if isinstance(first, tuple):
        images = tuple(stack_uint8([s[0][v] for s in samples]) for v in range(len(first)))
    elif isinstance(first, np.ndarray):
        images = stack_uint8([s[0] for s in samples])
    else:
        from mimscale.data.gpu_decode import EncodedBatch, EncodedSample

        if not isinstance(first, EncodedSample):
            raise TypeError(f"transform returned {type(first).__name__}; expected a uint8 array, a tuple "
                            "of them, or an EncodedSample")
        images = EncodedBatch.collate([s[0] for s in samples])
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

        def on_tar_error(url: str, exc: BaseException) -> None:
            health.fail(f"shard data ({url})", exc)

        samples: Iterator[dict] = tar_samples(self._shards(worker, num_workers, shard_seed), _read_member,
                                              on_tar_error)
        if self.shuffle_buffer > 1:
            samples = wds.filters.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=shuffle_rng)(samples)

        # Single-crop transforms (RandomResizedCropFlip) write each image straight into its slot of a
        # preallocated channels-last batch; the others return arrays that collate() stacks.
        write = getattr(self.transform, "write", None)
        shape = getattr(self.transform, "output_shape", None) if write is not None else None
        slots = None if shape is None else empty_uint8_batch((self.batch_size, *shape), channels_last=True)
        pending: list[tuple[Any, int]] = []
        labels: list[int] = []
        for sample in samples:
            key = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
            try:
                data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
                if data is None:
                    raise ValueError(f"no image member (expected one of {', '.join(IMAGE_KEYS)})")
                label = int(sample["cls"]) if "cls" in sample else -1
                if slots is not None:
                    write(data, aug_rng, slots[len(labels)])  # a failed write's slot is simply reused
                else:
                    out = self.transform(data, aug_rng)
            except Exception as exc:  # any decode/label error means "skip this sample"
                health.fail(f"sample {key}", exc)
                continue
            health.ok()
            if slots is not None:
                labels.append(label)
                if len(labels) == self.batch_size:
                    yield Batch(slots, torch.tensor(labels, dtype=torch.int64), health.take())
                    slots = empty_uint8_batch((self.batch_size, *shape), channels_last=True)
                    labels = []
                continue
            pending.append((out, label))
            if len(pending) == self.batch_size:
                yield collate(pending, health.take())
                pending = []
        if not self.drop_last:
            if slots is not None and labels:
                yield Batch(slots[: len(labels)], torch.tensor(labels, dtype=torch.int64), health.take())
            elif pending:
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
    worker_init_fn: Callable[[int], None] | None = None,
) -> DataLoader:
    """Build this rank's training loader; iterate it to get :class:`Batch` objects.

    urls: a spec for :func:`expand_urls` or a list of URLs.
    transform: ``transform(bytes, numpy Generator)`` -> uint8 [3, H, W] array, or a tuple of them (see
        :mod:`mimscale.data.transforms`), or an ``EncodedSample`` for GPU decoding (see
        :mod:`mimscale.data.gpu_decode`). A transform that also has ``output_shape`` (C, H, W) and
        ``write(bytes, rng, out)`` (as :class:`~mimscale.data.transforms.RandomResizedCropFlip`)
        fills preallocated channels-last batches in place instead.
    batch_size: per-rank batch size; every worker builds whole batches.
    seed: base seed; combined with ``rank`` and the worker id for shard choice, shuffle and
        augmentation. Pass a value derived from the resume step so a resumed run sees fresh data.
    resampled: True (training): each worker draws shards with replacement forever, so every rank
        can take any number of steps and no rank runs dry before the others. False: one pass, the
        shard list split by rank then by worker (needs at least ``world_size * num_workers``
        shards, otherwise some workers would have nothing to read).
    shuffle_buffer: samples held per worker for shuffling (raw bytes; 0 or 1 disables it).
    drop_last: drop a worker's final partial batch (only reachable with ``resampled=False``).
    worker_init_fn: run in each worker process after PyTorch's own set-up (e.g. the trainer makes its
        workers ignore preemption signals, which the rank process handles).
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
        worker_init_fn=worker_init_fn,
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
    The result is contiguous NCHW whatever the input's memory format (the loader's batches are
    channels-last, see :func:`stack_uint8`); the layout change rides on the normalising kernel.
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
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    return torch.addcmul(shift, x.float(), scale, out=out).to(dtype)
