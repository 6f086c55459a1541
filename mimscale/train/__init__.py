"""The DeepSpeed trainer (kept apart from the model library: ``mimscale.methods`` never imports it)."""

from mimscale.train.config import DataConfig, OptimConfig, TrainConfig
from mimscale.train.loop import run, train

__all__ = ["DataConfig", "OptimConfig", "TrainConfig", "run", "train"]
