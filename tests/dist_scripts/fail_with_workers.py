"""A process that fails while its DataLoader workers (which ignore SIGTERM, as in training) are running:
it must end with status 1 and its traceback, not hang in multiprocessing's exit handler. Run by
tests/test_faults.py as ``python fail_with_workers.py SHARD_ROOT``."""

import sys

import numpy as np

from mimscale.data.demo import ensure_demo_shards
from mimscale.data.pipeline import build_train_loader
from mimscale.train.distributed import run_and_exit
from mimscale.train.preemption import workers_ignore_preemption


def blank(data: bytes, rng: np.random.Generator) -> np.ndarray:
    return np.zeros((3, 8, 8), np.uint8)


def main() -> None:
    urls = ensure_demo_shards(sys.argv[1], num_images=16, image_size=16, samples_per_shard=8)
    loader = build_train_loader(urls, blank, 4, seed=0, rank=0, world_size=1, num_workers=2,
                                worker_init_fn=workers_ignore_preemption)
    batches = iter(loader)
    next(batches)
    raise RuntimeError("failing while the data workers run")


run_and_exit(main)
