"""Host cost of each recipe's augmentation per image, relative to MAE's single crop: the numbers behind
``mimscale plan``'s data-rate model (``mimscale/planning/presets.py``).

Usage (from the repository root)::

    python benchmarks/view_rates.py                  # 200 images, 12 interleaved rounds; ~1 minute on 2 cores

``benchmarks/data_pipeline.py`` measures the whole shard pipeline for MAE's view (variant (c)); this script
measures only the per-sample transform of every recipe's views on the same ImageNet-like JPEGs
(``benchmarks/_images.py``), in one thread, interleaved round by round, and prints per image:

* the transform's CPU time (``time.process_time``) and its difference to MAE's single crop: the extra host
  work a recipe's views cost on top of what ``data_pipeline.py`` measured for MAE;
* the same for ``data.decode='device'``'s worker side (:class:`~mimscale.data.gpu_decode.JpegCropSampler`:
  header, crop box and flip, no pixels), which is what a rank's workers do when the GPU decodes;
* the fitted per-view model the plan uses for views it has no measurement of (least squares over the
  measured recipes: a per-image decode cost plus, per view, a resize cost proportional to output pixels
  and a colour-operation cost proportional to output pixels).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _images import imagenet_like_jpegs, mean_size  # noqa: E402

from mimscale.data.gpu_decode import JpegCropSampler  # noqa: E402
from mimscale.data.transforms import build_transform  # noqa: E402
from mimscale.planning.data import COLOUR_OPS, view_work  # noqa: E402
from mimscale.planning.recipe import build_method, views_spec  # noqa: E402
from mimscale.recipes import list_recipes, load_recipe  # noqa: E402


def recipe_specs() -> dict[str, object]:
    """One transform spec per distinct augmentation among the registered recipes (first recipe's name)."""
    specs: dict[str, object] = {}
    seen: set[str] = set()
    for name in list_recipes():
        cfg = load_recipe(name)
        spec = views_spec(cfg, build_method(cfg, "meta"))
        if repr(spec) not in seen:
            seen.add(repr(spec))
            specs[name] = spec
    return specs


def probe_specs() -> dict[str, object]:
    """Single-factor variants that separate the model's coefficients: views without colour operations, and
    each colour operation alone (probability 1) on MAE's crop."""
    crop = {"size": 224, "scale": [0.2, 1.0]}
    local = {"size": 96, "scale": [0.05, 0.25]}
    specs: dict[str, object] = {
        "probe: 2 crops": [dict(crop), dict(crop)],
        "probe: 2 + 10 crops": [{**crop, "repeat": 2}, {**local, "repeat": 10}],
        "probe: jitter": {
            **crop,
            "color_jitter": {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.0, "p": 1.0},
        },
        "probe: jitter + hue": {
            **crop,
            "color_jitter": {"brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1, "p": 1.0},
        },
        "probe: grayscale": {**crop, "grayscale": 1.0},
        "probe: blur": {**crop, "blur": 1.0},
        "probe: solarize": {**crop, "solarize": 1.0},
    }
    return specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    jpegs = [data for _, data in imagenet_like_jpegs(args.num_images, seed=args.seed)]
    w, h = mean_size(jpegs)
    print(
        f"{len(jpegs)} JPEGs, mean {w:.0f}x{h:.0f}, mean {np.mean([len(j) for j in jpegs]) / 1e3:.1f} kB; "
        f"{args.rounds} interleaved rounds, medians"
    )

    specs = {**recipe_specs(), **probe_specs()}
    transforms: dict[str, object] = {name: build_transform(spec) for name, spec in specs.items()}
    transforms["sampler (decode=device)"] = JpegCropSampler(224, scale=(0.2, 1.0))
    per_image: dict[str, list[float]] = {name: [] for name in transforms}
    rng = np.random.default_rng(args.seed)
    for _ in range(args.rounds):
        for name, tf in transforms.items():
            t0 = time.process_time()
            for data in jpegs:
                tf(data, rng)
            per_image[name].append((time.process_time() - t0) / len(jpegs) * 1e3)

    ms = {name: statistics.median(times) for name, times in per_image.items()}
    base = ms["mae_vitb"]
    print(f"\n{'transform':26s} {'ms/img':>8s} {'- MAE crop':>10s}  views  Mpx out")
    for name, value in ms.items():
        work = view_work(specs[name]) if name in specs else None
        extra = f"{work.views:5d}  {work.pixels / 1e6:7.3f}" if work else ""
        print(f"{name:26s} {value:8.3f} {value - base:+10.3f}  {extra}")

    # Least squares of the relative error over every measured transform: ms = c . ViewWork.features().
    names = list(specs)
    a = np.array([view_work(specs[n]).features() for n in names])
    b = np.array([ms[n] for n in names])
    coef, *_ = np.linalg.lstsq(a / b[:, None], np.ones_like(b), rcond=None)
    labels = ["per image", "several views", "per Mpx out", *(f"per Mpx {op}" for op in COLOUR_OPS)]
    print(
        "\nfit (HostRates.transform_ms_coefficients): "
        + ", ".join(f"{lab} {c:.3f}" for lab, c in zip(labels, coef))
    )
    print(f"  = ({', '.join(f'{c:.3f}' for c in coef)})")
    for n, pred in zip(names, a @ coef):
        print(f"  {n:26s} measured {ms[n]:7.3f} ms, model {pred:7.3f} ms ({pred / ms[n] - 1:+.0%})")
    print(
        f"sampler (decode=device): {1e3 / ms['sampler (decode=device)']:.0f} img per CPU-s (transform only)"
    )


if __name__ == "__main__":
    main()
