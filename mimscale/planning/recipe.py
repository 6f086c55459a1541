"""Which run a plan is for: the recipe (registered name or recipe file), its ``--set`` overrides, and the
method built from it without spending memory (meta device) or, for the activation measurement, on CPU.

BEiT's recipes leave ``model.tokenizer_path`` unset (it names a file the user trains or downloads); the plan
then assumes DALL-E's tokenizer (the default :class:`~mimscale.models.tokenizer.DVAEConfig`: 8192 codes,
``n_hid`` 256, 2 blocks per group, stride 8), which is what BEiT's papers use, and says so.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import warnings
from pathlib import Path
from typing import Any

import torch

from mimscale.train.config import (
    ConfigError,
    TrainConfig,
    build_method_on_meta,
    method_geometry,
    parse_value,
    resolve_views,
    set_override,
    validate,
)

__all__ = [
    "build_method",
    "load_config",
    "planning_notes",
    "validate_config",
    "views_spec",
]


def load_config(recipe: str, overrides: list[str] = ()) -> tuple[TrainConfig, str]:
    """(config, recipe name) of a registered recipe name (``mae_vith``) or a recipe file exposing ``CONFIG``
    (``recipes/mae_vith.py``), with ``--set KEY=VALUE`` overrides applied (keys and value types checked)."""
    from mimscale.recipes import list_recipes, load_recipe

    path = Path(recipe)
    if recipe.endswith(".py"):
        if not path.is_file():
            raise ConfigError(f"recipe {recipe!r}: no such file")
        spec = importlib.util.spec_from_file_location(f"_plan_recipe_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"recipe {recipe!r}: cannot import it")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        cfg = getattr(module, "CONFIG", None)
        if not isinstance(cfg, TrainConfig):
            raise ConfigError(f"recipe {recipe!r} has no CONFIG (a TrainConfig); recipe files in recipes/ do")
        import copy

        cfg, name = copy.deepcopy(cfg), path.stem
    else:
        if recipe not in list_recipes():
            raise ConfigError(
                f"recipe {recipe!r}: not a recipe file (.py) or registered recipe; registered: "
                f"{', '.join(list_recipes())}"
            )
        cfg, name = load_recipe(recipe), recipe
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set max_micro_batch=32")
        key, _, raw = item.partition("=")
        set_override(cfg, key.strip(), parse_value(raw))
    return cfg, name


def validate_config(cfg: TrainConfig, ds_config: str, world_size: int) -> None:
    """The trainer's own start-up validation (:func:`mimscale.train.config.validate`: ranges, model arguments,
    the method on the meta device, the transform against the method's views, the batch plan and the DeepSpeed
    config as DeepSpeed parses it), with an unset BEiT tokenizer standing in as planned."""
    import copy

    if _assumes_dalle_tokenizer(cfg):
        cfg = copy.deepcopy(cfg)
        cfg.model["tokenizer_path"] = "random"
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        validate(cfg, ds_config, world_size)


def _assumes_dalle_tokenizer(cfg: TrainConfig) -> bool:
    return cfg.method == "beit" and not cfg.model.get("tokenizer_path")


def planning_notes(cfg: TrainConfig) -> list[str]:
    """What the plan assumes that the config leaves open."""
    notes = []
    if _assumes_dalle_tokenizer(cfg):
        notes.append("model.tokenizer_path is unset: planned with DALL-E's tokenizer (8192 codes, n_hid 256)")
    return notes


def _dalle_tokenizer(grid: tuple[int, int]) -> torch.nn.Module:
    from mimscale.models.tokenizer import DVAEConfig, DVAEEncoder, VisualTokenizer

    stride = DVAEConfig().stride
    return VisualTokenizer(DVAEEncoder(DVAEConfig(input_size=grid[0] * stride)), source="planned: DALL-E")


def build_method(cfg: TrainConfig, device: str = "meta") -> Any:
    """The recipe's method on ``device``: ``"meta"`` as :func:`~mimscale.train.config.build_method_on_meta`
    builds it (sizes only), ``"cpu"`` for real (the activation measurement builds small copies)."""
    from mimscale.methods.base import create_method

    dalle = _assumes_dalle_tokenizer(cfg)
    if dalle:
        import copy

        cfg = copy.deepcopy(cfg)
        cfg.model["tokenizer_path"] = "random"
    if device == "meta":
        method = build_method_on_meta(cfg)
    else:
        try:
            with torch.device(device), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                method = create_method(cfg.method, **cfg.model)
        except (TypeError, ValueError, FileNotFoundError, KeyError) as e:
            raise ConfigError(f"model config {cfg.model}: {e}") from e
    if dalle:
        with torch.device(device):
            method.tokenizer = _dalle_tokenizer(method.encoder.grid)
    return method


def views_spec(cfg: TrainConfig, method: Any) -> Any:
    """The transform spec the run's workers apply (view dicts), as the trainer resolves it."""
    img, patch = method_geometry(method)
    return resolve_views(cfg, img, patch)
