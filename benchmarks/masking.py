"""Mask generation cost: batched maskers vs the official per-sample loops, in one process.

Usage (from the repository root)::

    python benchmarks/masking.py                      # 4096 masks of 14x14, 5 repeats
    python benchmarks/masking.py --batch-size 1024 --repeats 10 --threads 1

For each masker it draws ``--batch-size`` masks ``--repeats`` times and prints the median and best
wall time in ms, then the speed-up of the batched masker over a per-sample loop written the way the
official code draws one mask per image in its data loader (Python ``random`` + a numpy array for BEiT,
microsoft/unilm ``beit*/masking_generator.py``; ``np.random.permutation`` for SimMIM,
microsoft/SimMIM ``data/data_simmim.py``). Both run here, on the same CPU threads, so the ratio is
comparable across machines even when the absolute numbers are not. On a CPU shared with other jobs,
torch's intra-op threads wait on each other for cores and the batched times balloon; compare with
``--threads 1`` there.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mimscale.masking import BlockwiseMasker, IBOTMasker, SimMIMMasker  # noqa: E402


def per_sample_blockwise(
    grid: tuple[int, int], num_masked: int, min_block: float, min_aspect: float, exact: bool
) -> np.ndarray:
    """One BEiT mask the official way: block proposals in Python, a numpy array for the mask."""
    height, width = grid
    mask = np.zeros(grid, dtype=np.int32)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    count = 0
    while count < num_masked:
        cap = num_masked - count
        delta = 0
        for _ in range(10):
            area = random.uniform(min_block, cap)
            aspect = math.exp(random.uniform(*log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if h < height and w < width:
                top = random.randint(0, height - h)
                left = random.randint(0, width - w)
                new = h * w - mask[top : top + h, left : left + w].sum()
                if 0 < new <= cap:
                    mask[top : top + h, left : left + w] = 1
                    delta = int(new)
                    break
        if delta == 0:
            break
        count += delta
    if exact and count < num_masked:
        free = np.flatnonzero(mask == 0)
        mask.flat[np.random.choice(free, num_masked - count, replace=False)] = 1
    return mask


def per_sample_simmim(cells_side: int, scale: int, mask_ratio: float) -> np.ndarray:
    """One SimMIM mask the official way: a permutation of the coarse cells, then np.repeat."""
    cells = cells_side**2
    mask = np.zeros(cells, dtype=np.int32)
    mask[np.random.permutation(cells)[: int(np.ceil(cells * mask_ratio))]] = 1
    mask = mask.reshape(cells_side, cells_side)
    return mask.repeat(scale, axis=0).repeat(scale, axis=1)


def time_ms(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median and best wall time of ``fn`` in ms, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    batch, repeats = args.batch_size, args.repeats
    random.seed(0)
    np.random.seed(0)
    gen = torch.Generator().manual_seed(0)
    grid = (14, 14)

    rows: list[tuple[str, Callable[[], object], Callable[[], object] | None]] = [
        (
            "blockwise v1 (75/196, exact=False)",
            lambda: BlockwiseMasker(grid, 75, 16, exact=False)(batch, generator=gen),
            lambda: [per_sample_blockwise(grid, 75, 16, 0.3, False) for _ in range(batch)],
        ),
        (
            "blockwise v2 (75/196, exact=True)",
            lambda: BlockwiseMasker(grid, 75, 16, exact=True)(batch, generator=gen),
            lambda: [per_sample_blockwise(grid, 75, 16, 0.3, True) for _ in range(batch)],
        ),
        (
            "blockwise data2vec (120/196, exact=True)",
            lambda: BlockwiseMasker(grid, 120, 16, exact=True)(batch, generator=gen),
            lambda: [per_sample_blockwise(grid, 120, 16, 0.3, True) for _ in range(batch)],
        ),
        ("ibot (ratio 0 or U(0.1, 0.5))", lambda: IBOTMasker(grid)(batch, generator=gen), None),
        (
            "simmim (224 px, 32 -> 16, 0.6)",
            lambda: SimMIMMasker(224, 32, 16, 0.6)(batch, generator=gen),
            lambda: [per_sample_simmim(7, 2, 0.6) for _ in range(batch)],
        ),
    ]
    print(f"{batch} masks of {grid[0]}x{grid[1]}, {repeats} repeats, torch threads {torch.get_num_threads()}")
    print(f"{'masker':42s} {'batched ms':>16s} {'per-sample ms':>16s} {'speed-up':>9s}")
    for name, batched, baseline in rows:
        med, best = time_ms(batched, repeats)
        line = f"{name:42s} {med:9.1f} ({best:4.1f})"
        if baseline is not None:
            base_med, base_best = time_ms(baseline, repeats)
            line += f" {base_med:9.1f} ({base_best:4.0f}) {base_med / med:8.1f}x"
        print(line)
    if torch.cuda.is_available():
        masker = BlockwiseMasker(grid, 75, 16, exact=True)

        def on_gpu() -> None:
            masker(batch, device="cuda")
            torch.cuda.synchronize()

        med, best = time_ms(on_gpu, repeats)
        print(f"{'blockwise v2 drawn on cuda (no generator)':42s} {med:9.1f} ({best:4.1f})")
    print("times: median (best)")


if __name__ == "__main__":
    main()
