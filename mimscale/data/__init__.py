"""The data path: shard writing, WebDataset streaming and uint8 augmentations.

shards.py writes tar shards (``mimscale make-shards``), transforms.py turns encoded bytes into
uint8 crops and views, pipeline.py streams shards into batches, demo.py makes a synthetic set.
"""

from mimscale.data.demo import ensure_demo_shards
from mimscale.data.pipeline import Batch, build_train_loader, expand_urls, normalize_on_device
from mimscale.data.shards import add_make_shards_arguments, run_make_shards
from mimscale.data.transforms import (
    ColorJitter,
    GaussianBlur,
    Grayscale,
    RandomChoice,
    RandomResizedCropFlip,
    Solarize,
    View,
    Views,
    build_transform,
)

__all__ = [
    "Batch",
    "ColorJitter",
    "GaussianBlur",
    "Grayscale",
    "RandomChoice",
    "RandomResizedCropFlip",
    "Solarize",
    "View",
    "Views",
    "add_make_shards_arguments",
    "build_transform",
    "build_train_loader",
    "ensure_demo_shards",
    "expand_urls",
    "normalize_on_device",
    "run_make_shards",
]
