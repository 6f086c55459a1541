"""Input pipeline throughput: mimscale's shard pipeline vs the official MAE path vs plain decoding.

Usage (from the repository root)::

    python benchmarks/data_pipeline.py                      # 300 images; ~2 minutes on 2 cores
    python benchmarks/data_pipeline.py --core-rounds 60 --rounds 9 --workers 16 --num-images 600

It writes ``--num-images`` ImageNet-like JPEGs (real photographs, see ``benchmarks/_images.py``)
as an ImageFolder tree and as WebDataset shards, then measures in one process, per core (in the
main process, one thread: ``torch.set_num_threads(1)``, no workers) and with all cores (one
DataLoader worker per core):

  (a)  JPEG decode only, full size, ``simplejpeg.decode_jpeg(data)`` (libjpeg-turbo, the fastest
       common decoder): the floor. Printed for reference: (a') PIL
       ``Image.open(...).convert("RGB")``, and (a+) simplejpeg decoding into one reused output
       buffer (no allocation per image).
  (b)  the official MAE path: torchvision ``ImageFolder`` + ``Compose([RandomResizedCrop(224,
       scale=(0.2, 1.0), BICUBIC), RandomHorizontalFlip(), ToTensor(), Normalize(...)])`` and
       torch's default collate, as in facebookresearch/mae ``main_pretrain.py``.
  (c)  mimscale: ``build_train_loader`` over the shards with the MAE view
       (``build_transform({"size": 224, "scale": [0.2, 1.0]})``), producing exactly the
       ``Batch`` the training loop consumes (uint8 [B, 3, 224, 224] in channels-last memory
       format; normalisation and the switch to NCHW happen on the device, inside the training
       step). Each JPEG is decoded only inside its crop box
       (libjpeg-turbo through the ``mimscale.data._jpeg_region`` extension; the header line says
       whether it is built). (c*) is the same with ``fast_decode=True``.
  (d)  with CUDA only: the GPU decode option (``JpegCropSampler`` workers + ``GpuJpegDecoder``),
       timed to the finished uint8 batch on the device.

The machine may be shared, so the variants are interleaved: every round times each variant on the
same number of images, in turn, and the tables report medians over rounds. Per core, the clock is
this process's CPU time (``time.process_time``; everything runs in this one thread), which other
processes' load disturbs much less than wall time; all cores use wall time (worker processes), with
each variant's workers started and stopped inside its turn. It prints images/s and the ratios c/b
and c/a.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import simplejpeg
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _images import imagenet_like_jpegs, mean_size  # noqa: E402

from mimscale.data.pipeline import IMAGENET_MEAN, IMAGENET_STD, build_train_loader  # noqa: E402
from mimscale.data.shards import list_image_folder, write_shards  # noqa: E402
from mimscale.data.transforms import REGION_DECODE, build_transform  # noqa: E402

SIZE = 224
SCALE = (0.2, 1.0)


def prepare(root: Path, num_images: int, seed: int) -> tuple[Path, str, list[bytes]]:
    """ImageFolder tree (one class per source photo) + shards of the same files."""
    folder = root / "train"
    jpegs: list[bytes] = []
    for i, (name, data) in enumerate(imagenet_like_jpegs(num_images, seed=seed)):
        path = folder / name / f"{i:06d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        jpegs.append(data)
    records, classes = list_image_folder(folder)
    summary = write_shards(
        records,
        str(root / "shards" / "train-%06d.tar"),
        classes=classes,
        samples_per_shard=max(1, num_images // 8),
        shuffle_seed=seed,
    )
    return folder, str(root / "shards" / summary["urls"]), jpegs


# ------------------------------------------------------------------------------------------------
# the variants: each yields batches forever; `count` says how many images a batch holds


class _DecodeOnly(Dataset):
    """(a) for the all-cores run: decode in the workers, return only the shape (no pixel IPC)."""

    def __init__(self, jpegs: list[bytes], pil: bool) -> None:
        self.jpegs, self.pil = jpegs, pil

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, i: int) -> int:
        data = self.jpegs[i]
        if self.pil:
            img = Image.open(io.BytesIO(data)).convert("RGB")
            return img.width
        return simplejpeg.decode_jpeg(data).shape[1]


def _infinite_sampler(n: int, seed: int) -> RandomSampler:
    return RandomSampler(
        range(n), replacement=True, num_samples=10**9, generator=torch.Generator().manual_seed(seed)
    )


def decode_stream(
    jpegs: list[bytes], batch: int, workers: int, pil: bool, seed: int, reuse: bool = False
) -> Iterator[int]:
    if workers == 0:
        rng = np.random.default_rng(seed)
        buf = np.empty(64 << 20, dtype=np.uint8) if reuse else None
        while True:
            for i in rng.integers(0, len(jpegs), batch):
                data = jpegs[i]
                if pil:
                    Image.open(io.BytesIO(data)).convert("RGB")
                else:
                    simplejpeg.decode_jpeg(data, buffer=buf)
            yield batch
    loader = DataLoader(
        _DecodeOnly(jpegs, pil),
        batch_size=batch,
        sampler=_infinite_sampler(len(jpegs), seed),
        num_workers=workers,
        collate_fn=len,
    )
    yield from loader


def torchvision_stream(folder: Path, batch: int, workers: int, seed: int) -> Iterator[int]:
    import torchvision.datasets as datasets
    import torchvision.transforms as transforms

    transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(
                SIZE, scale=SCALE, interpolation=transforms.InterpolationMode.BICUBIC
            ),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ]
    )
    dataset = datasets.ImageFolder(str(folder), transform=transform)
    loader = DataLoader(
        dataset,
        batch_size=batch,
        sampler=_infinite_sampler(len(dataset), seed),
        num_workers=workers,
        drop_last=True,
    )
    for images, _ in loader:
        yield int(images.shape[0])


def mimscale_stream(
    spec: str, batch: int, workers: int, seed: int, check: list[str], fast_decode: bool = False
) -> Iterator[int]:
    transform = build_transform({"size": SIZE, "scale": list(SCALE), "fast_decode": fast_decode})
    loader = build_train_loader(
        spec,
        transform,
        batch,
        seed=seed,
        rank=0,
        world_size=1,
        num_workers=workers,
        shuffle_buffer=1000,
        resampled=True,
    )
    for b in loader:
        if not check:
            layout = "channels_last" if b.images.is_contiguous(memory_format=torch.channels_last) else "other"
            check.append(f"{tuple(b.images.shape)} {b.images.dtype} {layout}")
        yield len(b)


def gpu_stream(spec: str, batch: int, workers: int, seed: int) -> Iterator[int]:
    from mimscale.data.gpu_decode import GpuJpegDecoder, JpegCropSampler

    decoder = GpuJpegDecoder("cuda")
    loader = build_train_loader(
        spec,
        JpegCropSampler(SIZE, scale=SCALE),
        batch,
        seed=seed,
        rank=0,
        world_size=1,
        num_workers=workers,
        shuffle_buffer=1000,
        resampled=True,
        pin_memory=True,
    )
    for b in loader:
        out = decoder(b.images)
        torch.cuda.synchronize()
        yield int(out.shape[0])


# ------------------------------------------------------------------------------------------------


def time_images(stream: Iterator[int], n: int, clock: Callable[[], float]) -> float:
    """Pull at least ``n`` images; returns images per second of ``clock``."""
    t0 = clock()
    done = 0
    while done < n:
        done += next(stream)
    return done / (clock() - t0)


def run_rounds(
    makers: dict[str, Callable[[], Iterator[int]]],
    n: int,
    rounds: int,
    persistent: bool,
    warmup_batches: int,
    clock: Callable[[], float] = time.perf_counter,
    verbose: bool = True,
) -> dict[str, list[float]]:
    """Interleaved rounds. persistent: keep each stream alive across rounds (in-process streams);
    otherwise build it per round, so no worker pool runs while another variant is timed."""
    streams: dict[str, Iterator[int]] = {}
    results: dict[str, list[float]] = {k: [] for k in makers}
    for r in range(rounds):
        for name, make in makers.items():
            if name not in streams:
                streams[name] = make()
                for _ in range(warmup_batches):
                    next(streams[name])
            results[name].append(time_images(streams[name], n, clock))
            if not persistent:
                del streams[name]  # shuts the workers down before the next variant runs
        if verbose or r + 1 == rounds:
            print(
                f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in results.items()),
                flush=True,
            )
    return results


def report(title: str, results: dict[str, list[float]]) -> None:
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"\n{title}")
    labels = {
        "a": "(a)  decode only, simplejpeg (floor)",
        "a'": "(a') decode only, PIL",
        "a+": "(a+) decode only, simplejpeg into one reused output buffer",
        "b": "(b)  official MAE: torchvision ImageFolder + transforms",
        "c": "(c)  mimscale: shards -> uint8 Batch",
        "c*": "(c*) mimscale, fast_decode=True (approximate IDCT/upsampling)",
        "d": "(d)  mimscale GPU decode: shards -> nvJPEG -> uint8 on device",
    }
    for k, v in med.items():
        spread = f"(min {min(results[k]):.0f}, max {max(results[k]):.0f})"
        print(f"  {labels[k]:<62s} {v:8.0f} img/s  {spread}")
    print(f"  c/b = {med['c'] / med['b']:.2f}   (target >= 2.0)")
    print(f"  c/a = {med['c'] / med['a']:.2f}   (target >= 0.67)")
    if "a+" in med:
        print(f"  c/a+ = {med['c'] / med['a+']:.2f}  (against the reused-buffer decode loop)")
    if "c*" in med:
        print(
            f"  c*/b = {med['c*'] / med['b']:.2f}, c*/a = {med['c*'] / med['a']:.2f}   (opt-in fast_decode)"
        )
    if "d" in med:
        print(f"  d/b = {med['d'] / med['b']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-images", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the all-cores run")
    parser.add_argument("--core-rounds", type=int, default=30, help="interleaved rounds of the per-core run")
    parser.add_argument("--core-chunk", type=int, default=2, help="batches per variant and per-core round")
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="DataLoader workers for the all-cores run (default: all cores)",
    )
    parser.add_argument(
        "--images-per-round",
        type=int,
        default=0,
        help="images timed per variant and round (default: --num-images)",
    )
    parser.add_argument("--skip-all-cores", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default=None, help="where to write the images (default: a temp dir)")
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="mimscale-bench-") if args.work_dir is None else None
    root = Path(args.work_dir or tmp.name)  # type: ignore[union-attr]
    folder, spec, jpegs = prepare(root, args.num_images, args.seed)
    w, h = mean_size(jpegs)
    n = args.images_per_round or args.num_images
    print(
        f"{len(jpegs)} JPEGs (q90, 4:2:0), mean {w:.0f}x{h:.0f}, "
        f"mean {np.mean([len(j) for j in jpegs]) / 1e3:.0f} kB; "
        f"output {SIZE}x{SIZE}, scale {SCALE}; batch {args.batch_size}; {n} images per variant and round"
    )
    print(
        f"torch {torch.__version__}, Pillow {Image.__version__}, simplejpeg {simplejpeg.__version__}, "
        f"cpus {os.cpu_count()}"
    )
    print(
        f"(c) crop-region decode: {REGION_DECODE}"
        if REGION_DECODE
        else "(c) crop-region decode: NOT BUILT (install libjpeg-turbo headers, then reinstall mimscale);"
        " (c) decodes whole images"
    )
    has_cuda = torch.cuda.is_available()
    if not has_cuda:
        print("(d) GPU decode: skipped, no CUDA device (nvJPEG via torchvision.io.decode_jpeg needs one)")

    torch.set_num_threads(1)
    bs = args.batch_size
    check: list[str] = []
    per_core: dict[str, Callable[[], Iterator[int]]] = {
        "a": lambda: decode_stream(jpegs, bs, 0, False, args.seed),
        "a'": lambda: decode_stream(jpegs, bs, 0, True, args.seed),
        "a+": lambda: decode_stream(jpegs, bs, 0, False, args.seed, reuse=True),
        "b": lambda: torchvision_stream(folder, bs, 0, args.seed),
        "c": lambda: mimscale_stream(spec, bs, 0, args.seed, check),
        "c*": lambda: mimscale_stream(spec, bs, 0, args.seed, [], fast_decode=True),
    }
    if has_cuda:
        per_core["d"] = lambda: gpu_stream(spec, bs, 0, args.seed)
    print(
        f"\nper core: main process, 1 thread, no workers; {args.core_rounds} rounds of "
        f"{bs * args.core_chunk} images per variant, timed in CPU seconds of this process"
    )
    res = run_rounds(
        per_core,
        bs * args.core_chunk,
        args.core_rounds,
        persistent=True,
        warmup_batches=2,
        clock=time.process_time,
        verbose=False,
    )
    print(f"  (c) batches: {check[0] if check else '?'}")
    report("per core (1 process, 1 thread; images per CPU-second)", res)

    if not args.skip_all_cores:
        wk = args.workers
        all_cores: dict[str, Callable[[], Iterator[int]]] = {
            "a": lambda: decode_stream(jpegs, bs, wk, False, args.seed),
            "a'": lambda: decode_stream(jpegs, bs, wk, True, args.seed),
            "b": lambda: torchvision_stream(folder, bs, wk, args.seed),
            "c": lambda: mimscale_stream(spec, bs, wk, args.seed, check),
        }
        if has_cuda:
            all_cores["d"] = lambda: gpu_stream(spec, bs, wk, args.seed)
        print(f"\nall cores: {wk} DataLoader workers")
        res = run_rounds(all_cores, max(n, 2 * wk * bs), args.rounds, persistent=False, warmup_batches=2 * wk)
        report(f"all cores ({wk} workers)", res)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
