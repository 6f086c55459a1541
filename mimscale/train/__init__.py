"""The DeepSpeed trainer (kept apart from the model library: ``mimscale.methods`` never imports it).

``config`` (recipe config, CLI, ``RunPlan``), ``optim`` (parameter groups, schedules, the engine), ``inputs``
(loader and ``to_device``), ``checkpoint`` (save/resume and its policy), ``trainer`` (the ``Trainer``),
``launch`` (a recipe's command line and exit protocol).
"""

from mimscale.train.config import DataConfig, OptimConfig, RunPlan, TrainConfig
from mimscale.train.launch import run
from mimscale.train.trainer import Trainer, train

__all__ = ["DataConfig", "OptimConfig", "RunPlan", "TrainConfig", "Trainer", "run", "train"]
