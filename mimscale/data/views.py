"""The augmentations the papers pretrain with, as named presets of view dicts (the schema of
:func:`mimscale.data.transforms.build_transform`).

A single-crop recipe (MAE, SimMIM) needs no preset: without ``views`` the trainer builds one
RandomResizedCrop from ``DataConfig.crop_scale`` / ``crop_ratio`` / ``hflip`` (a plain tensor per batch, the
fastest path). A preset is a function of the model's image size (and patch size, to which smaller crops are
snapped), so the same preset serves a 224 px recipe and its 32 px ``--smoke`` copy. Recipes call these
functions (configuration, not code); ``--set data.views=NAME`` picks one by name, built for the recipe's
image size:

* ``random_resized_crop``: MAE (``main_pretrain.py``), RandomResizedCrop(0.2-1, bicubic) + flip;
* ``simmim``: SimMIM (``data/data_simmim.py``), RandomResizedCrop(0.67-1) + flip;
* ``colour_jitter_crop``: BEiT (``DataAugmentationForBEiT``) and data2vec vision, ColorJitter(0.4, 0.4,
  0.4) + flip + RandomResizedCrop(0.08-1);
* ``ibot_multicrop``: iBOT (``DataAugmentationiBOT``), 2 global crops (0.25-1) and 10 local crops of
  96/224 of the image size (0.05-0.25), with DINO's colour operations;
* ``lut_two_views``: LUT (``main_lut.py``), two crops; view 2 with colour jitter and one of grayscale,
  solarize and blur.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = [
    "VIEW_PRESETS",
    "colour_jitter_crop",
    "ibot_multicrop",
    "list_view_presets",
    "lut_two_views",
    "multicrop_views",
    "random_resized_crop",
    "simmim_crop",
    "view_preset",
]

ViewList = list[dict[str, Any]]

# DINO/iBOT's colour augmentation (``DataAugmentationiBOT``): flip, colour jitter with p 0.8, grayscale 0.2.
_DINO_COLOUR: dict[str, Any] = {
    "hflip": 0.5,
    "color_jitter": {"brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1, "p": 0.8},
    "grayscale": 0.2,
}


def random_resized_crop(
    size: int = 224, scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
) -> ViewList:
    """MAE's augmentation (``main_pretrain.py``): ``RandomResizedCrop(size, scale=(0.2, 1.0), bicubic)``
    and a horizontal flip."""
    return [{"size": size, "scale": list(scale), "ratio": list(ratio), "hflip": hflip}]


def simmim_crop(size: int = 224) -> ViewList:
    """SimMIM's (``data/data_simmim.py``): ``RandomResizedCrop(size, scale=(0.67, 1.0), ratio=(3/4, 4/3))``
    and a flip."""
    return random_resized_crop(size, scale=(0.67, 1.0))


def colour_jitter_crop(
    size: int = 224, scale: tuple[float, float] = (0.08, 1.0), jitter: float = 0.4
) -> ViewList:
    """BEiT's ``DataAugmentationForBEiT`` and data2vec vision's: ``ColorJitter(0.4, 0.4, 0.4)``, flip,
    ``RandomResizedCrop(size, scale=(0.08, 1.0), bicubic)``. (The official code jitters the whole image
    before the crop; here the jitter follows the crop.)"""
    return [{
        "size": size, "scale": list(scale), "ratio": [3 / 4, 4 / 3], "hflip": 0.5,
        "color_jitter": {
            "brightness": jitter, "contrast": jitter, "saturation": jitter, "hue": 0.0, "p": 1.0
        },
    }]


def multicrop_views(
    global_size: int = 224,
    local_size: int = 96,
    num_local: int = 10,
    global_scale: tuple[float, float] = (0.25, 1.0),
    local_scale: tuple[float, float] = (0.05, 0.25),
    num_global: int = 2,
) -> ViewList:
    """iBOT's multi-crop augmentation, in the order the method expects: global crop 1 (blur p 1.0), the other
    global crops (blur p 0.1, solarize p 0.2), then the local crops (blur p 0.5). Crops are bicubic
    RandomResizedCrops, as in the official loader.

    The defaults are the paper's ViT runs (``--global_crops_scale 0.25 1 --local_crops_scale 0.05 0.25
    --local_crops_number 10``); the official script's own defaults (0.14-1, 0.05-0.4, no local crops) are
    for runs without multi-crop.
    """
    if num_global < 1 or num_local < 0:
        raise ValueError(f"num_global={num_global}, num_local={num_local}: expected >= 1 and >= 0")
    views: ViewList = [{"size": global_size, "scale": list(global_scale), **_DINO_COLOUR, "blur": 1.0}]
    if num_global > 1:
        views.append({"size": global_size, "scale": list(global_scale), **_DINO_COLOUR, "blur": 0.1,
                      "solarize": 0.2, "repeat": num_global - 1})
    views.append({"size": local_size, "scale": list(local_scale), **_DINO_COLOUR, "blur": 0.5,
                  "repeat": num_local})
    return views


def _snap(value: float, patch_size: int) -> int:
    return max(patch_size, int(round(value / patch_size)) * patch_size)


def ibot_multicrop(size: int = 224, patch_size: int = 16, num_local: int = 10) -> ViewList:
    """:func:`multicrop_views` for a model of ``size`` px: local crops at the paper's 96/224 of it, snapped to
    the patch size (96 px at 224/16, 12 px at the 32/4 smoke size)."""
    return multicrop_views(size, _snap(size * 96 / 224, patch_size), num_local=num_local)


def lut_two_views(size: int = 224, scale: tuple[float, float] = (0.2, 1.0)) -> ViewList:
    """LUT's ``TwoGlobalViewAugmentation`` (``main_lut.py``): two crops + flips of the same image; view 2 adds
    ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8, then exactly one of grayscale, solarize (128) and Gaussian
    blur (sigma U(0.1, 2)). The crop is MAE's RandomResizedCrop(0.2-1, bicubic); the official one is DeiT
    III's "simple random crop", which the view schema does not have yet."""
    crop = {"size": size, "scale": list(scale), "ratio": [3 / 4, 4 / 3], "hflip": 0.5}
    view2 = {
        **crop,
        "color_jitter": {"brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1, "p": 0.8},
        "one_of": [{"grayscale": 1.0}, {"solarize": {"p": 1.0, "threshold": 128}},
                   {"blur": {"p": 1.0, "sigma": [0.1, 2.0]}}],
    }
    return [dict(crop), view2]


# name -> function(size, patch_size) building the preset for a model of that image and patch size
VIEW_PRESETS: dict[str, Callable[[int, int], ViewList]] = {
    "random_resized_crop": lambda size, patch: random_resized_crop(size),
    "simmim": lambda size, patch: simmim_crop(size),
    "colour_jitter_crop": lambda size, patch: colour_jitter_crop(size),
    "ibot_multicrop": lambda size, patch: ibot_multicrop(size, patch),
    "lut_two_views": lambda size, patch: lut_two_views(size),
}


def list_view_presets() -> list[str]:
    return sorted(VIEW_PRESETS)


def view_preset(name: str, size: int = 224, patch_size: int = 16) -> ViewList:
    """The preset ``name`` for a model of ``size`` px with ``patch_size`` patches."""
    if name not in VIEW_PRESETS:
        raise ValueError(f"data.views={name!r}: not a view preset; allowed: {list_view_presets()} "
                         "or a list of view dicts")
    return VIEW_PRESETS[name](size, patch_size)
