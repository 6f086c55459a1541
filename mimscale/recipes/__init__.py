"""The papers' recipes: one module per method, one function per size returning a
:class:`~mimscale.train.config.TrainConfig`, registered by name (torchtitan's config registry: a size is its
base recipe plus the deltas, :func:`~mimscale.train.config.derive`).

    load_recipe("mae_vitl")          # the config
    run_recipe("mae_vitl")           # its command line (what recipes/mae_vitl.py and
                                     #   `python -m mimscale.recipes mae_vitl` run)

Every module of this package is imported on first use, so a new recipe module registers itself.
"""

from __future__ import annotations

import copy
import importlib
import pkgutil
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from mimscale.train.config import TrainConfig

__all__ = ["list_recipes", "load_recipe", "recipe_doc", "register_recipe", "run_recipe"]

RecipeFn = Callable[[], "TrainConfig"]
_RECIPES: dict[str, RecipeFn] = {}
_IMPORTED = False


def register_recipe(fn: RecipeFn) -> RecipeFn:
    """Decorator: register ``fn`` under its function name (``mae_vitl``)."""
    if fn.__name__ in _RECIPES and _RECIPES[fn.__name__] is not fn:
        raise ValueError(f"recipe {fn.__name__!r} is registered twice")
    _RECIPES[fn.__name__] = fn
    return fn


def _import_all() -> None:
    global _IMPORTED
    if not _IMPORTED:
        for module in pkgutil.iter_modules(__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"{__name__}.{module.name}")
        _IMPORTED = True


def list_recipes() -> list[str]:
    _import_all()
    return sorted(_RECIPES)


def _get(name: str) -> RecipeFn:
    _import_all()
    if name not in _RECIPES:
        raise KeyError(f"unknown recipe {name!r}; known recipes: {sorted(_RECIPES)}")
    return _RECIPES[name]


def load_recipe(name: str) -> TrainConfig:
    """A fresh copy of recipe ``name``'s config (callers may change it freely)."""
    return copy.deepcopy(_get(name)())


def recipe_doc(name: str) -> str:
    """The recipe's docstring: the paper, the official file and the numbers it follows."""
    return (_get(name).__doc__ or "").strip()


def run_recipe(name: str, argv: list[str] | None = None) -> NoReturn:
    """Run recipe ``name`` with the shared recipe command line (``--ds_config``, ``--data``, ``--set``)."""
    from mimscale.train.launch import run

    run(load_recipe(name), argv, recipe_name=name)
