"""Shared test fixtures and helpers: tiny encoders derived from the ``--smoke`` encoder, recipe loading, the
2-rank DeepSpeed launcher, and reading a checkpoint's per-rank method state.

Plain helpers are importable (``from conftest import tiny``; ``tests/`` is on the path, also for the
2-rank scripts in ``tests/dist_scripts/``) and also offered as fixtures.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
if str(TESTS) not in sys.path:  # the 2-rank scripts import these helpers too
    sys.path.insert(0, str(TESTS))

from distributed_launch import BackgroundJob, free_port, run_deepspeed  # noqa: E402

from mimscale.recipes import list_recipes, load_recipe  # noqa: E402
from mimscale.runs import read_rank_states  # noqa: E402
from mimscale.train.config import SMOKE_ENCODER  # noqa: E402

__all__ = [
    "REPO",
    "BackgroundJob",
    "free_port",
    "list_recipes",
    "load_recipe",
    "rank_states",
    "run_deepspeed",
    "tiny",
    "tiny_method_kwargs",
]


def tiny(**overrides: Any) -> dict[str, Any]:
    """The ``--smoke`` encoder (32 px images, patch 4, width 64, depth 2, 4 heads) with ``overrides``."""
    return {**SMOKE_ENCODER, **overrides}


def tiny_method_kwargs(method: str, **overrides: Any) -> dict[str, Any]:
    """``create_method`` kwargs of ``method`` as ``--smoke`` builds it (the smoke encoder plus the method's
    own ``smoke_kwargs``), with ``overrides``."""
    from mimscale.methods import get_method_class

    return {**SMOKE_ENCODER, **get_method_class(method).smoke_kwargs, **overrides}


def rank_states(tag_dir: str | Path, key: str | None = None) -> list[Any]:
    """Every rank's method state in a checkpoint tag (rank order), or its ``key`` entry (e.g. ``"ema"``)."""
    states = read_rank_states(tag_dir)
    return states if key is None else [s[key] for s in states]


@pytest.fixture
def two_ranks():
    """Run a script (or recipe file) under ``deepspeed --num_gpus 2`` and return the finished process."""
    return run_deepspeed


@pytest.fixture
def recipe_config():
    """``load_recipe`` as a fixture: a fresh copy of a registered recipe's config."""
    return load_recipe


def zero3_engine(method: Any, micro_batch: int, accumulation: int = 1, **adamw: float) -> Any:
    """A plain ZeRO-3 DeepSpeed engine around ``method`` for the 2-rank checks: torch AdamW (``adamw``:
    ``lr`` 1e-3 unless given, ``weight_decay`` ...), every parameter partitioned (no persistence threshold),
    fp32. The trainer's own engine is ``mimscale.train.optim.build_engine``."""
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, **adamw, "torch_adam": True}},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 10**9,
    }
    params = [p for p in method.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=method, model_parameters=params, config=config)
    return engine
