"""The input side of a plan: images/s and MB/s each node must deliver, and the CPU cores that takes.

The host cost of one image is the measured pipeline time of MAE's single crop plus the extra work of the
recipe's views (:func:`host_ms_per_image`, constants in :mod:`mimscale.planning.presets`). With
``data.decode='device'`` (single-view recipes) the workers only parse headers and draw crop boxes, and the
GPU decodes (nvJPEG); that path's host cost is the sampler rate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mimscale.planning.presets import HOST, HostRates

__all__ = ["COLOUR_OPS", "DataRate", "SINGLE_CROP", "ViewWork", "data_rate", "host_ms_per_image", "view_work"]

# Colour operations the cost model prices separately ("hue": a colour jitter that also shifts hue, which
# costs as much again as the rest of the jitter: an HSV round trip).
COLOUR_OPS = ("color_jitter", "hue", "grayscale", "blur", "solarize")


@dataclass(frozen=True)
class ViewWork:
    """What a transform does per image: how many views, their output pixels, and for each colour operation
    the output pixels it processes (weighted by its probability; a ``one_of`` splits its probability evenly
    over its choices). One view decodes only its crop region; several decode the whole image once."""

    views: int
    pixels: float
    op_pixels: dict[str, float]

    def features(self) -> list[float]:
        """The cost model's regressors: 1 (per image), several views (whole-image decode), output Mpx, and the
        Mpx of each colour operation in :data:`COLOUR_OPS` order."""
        return [1.0, float(self.views > 1), self.pixels / 1e6, *(self.op_pixels[k] / 1e6 for k in COLOUR_OPS)]


def _prob(value: Any) -> float:
    if value is None or value is False:
        return 0.0
    if value is True:
        return 1.0
    if isinstance(value, dict):
        return float(value.get("p", 1.0))
    return float(value)


def _size_px(size: Any) -> float:
    if isinstance(size, (list, tuple)):
        return float(size[0]) * float(size[1])
    return float(size) ** 2


def _add_ops(ops: dict[str, float], entry: dict[str, Any], px: float) -> None:
    for k in ("grayscale", "blur", "solarize"):
        ops[k] += px * _prob(entry.get(k))
    jitter = entry.get("color_jitter")
    if jitter is None or jitter is False:
        return
    # ColorJitter's defaults (mimscale.data.transforms): p 0.8, hue 0.1.
    options = jitter if isinstance(jitter, dict) else {}
    p = float(options.get("p", 0.8)) if jitter is not True or not options else 0.8
    ops["color_jitter"] += px * p
    if options.get("hue", 0.1):
        ops["hue"] += px * p


def view_work(spec: dict[str, Any] | Sequence[dict[str, Any]]) -> ViewWork:
    """The :class:`ViewWork` of a transform spec (one view dict, or a list of them with ``repeat``)."""
    entries = [spec] if isinstance(spec, dict) else list(spec)
    views, pixels = 0, 0.0
    ops = dict.fromkeys(COLOUR_OPS, 0.0)
    for entry in entries:
        repeat = int(entry.get("repeat", 1))
        px = repeat * _size_px(entry.get("size", 224))
        views += repeat
        pixels += px
        _add_ops(ops, entry, px)
        one_of = entry.get("one_of")
        if one_of:
            choices = one_of.get("choices", []) if isinstance(one_of, dict) else one_of
            p = _prob(one_of) if isinstance(one_of, dict) else 1.0
            for choice in choices:
                _add_ops(ops, choice, px * p / len(choices))
    return ViewWork(views, pixels, ops)


SINGLE_CROP = ViewWork(1, 224.0 * 224.0, dict.fromkeys(COLOUR_OPS, 0.0))  # MAE's view


def host_ms_per_image(work: ViewWork, rates: HostRates = HOST) -> float:
    """CPU milliseconds per image of the whole worker pipeline for views doing ``work``: the measured
    pipeline time of MAE's crop plus the modelled transform time of ``work`` beyond that crop's."""

    def transform_ms(w: ViewWork) -> float:
        return sum(c * f for c, f in zip(rates.transform_ms_coefficients, w.features()))

    return 1e3 / rates.single_crop_per_core + max(0.0, transform_ms(work) - transform_ms(SINGLE_CROP))


@dataclass(frozen=True)
class DataRate:
    """What the input must deliver per node, and the cores that takes."""

    images_per_s: float  # whole job
    images_per_s_per_node: float
    mb_per_s_per_node: float  # encoded bytes read (shards), MB/s
    views: int
    host_ms_per_image: float
    cores_per_node_needed: float  # CPU-decode path, all cores at the measured efficiency
    cores_per_node: int | None  # what the node has (None: not given)
    workers_per_rank: int  # the recipe's data.num_workers
    gpu_decode_possible: bool
    gpu_decode_cores_per_node: float | None  # data.decode='device': header parsing only

    @property
    def cpu_bound(self) -> bool | None:
        """Whether the node's cores cannot keep up with the GPUs on the CPU-decode path."""
        return None if self.cores_per_node is None else self.cores_per_node_needed > self.cores_per_node

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "cpu_bound": self.cpu_bound}


def data_rate(
    images_per_s: float,
    nodes: int,
    work: ViewWork,
    mean_jpeg_kb: float,
    cores_per_node: int | None,
    workers_per_rank: int,
    single_view: bool,
    rates: HostRates = HOST,
) -> DataRate:
    """The :class:`DataRate` for a job consuming ``images_per_s`` on ``nodes`` nodes."""
    per_node = images_per_s / nodes
    ms = host_ms_per_image(work, rates)
    cores = per_node * ms / 1e3 / rates.all_cores_efficiency
    gpu_cores = per_node / rates.sampler_per_core / rates.all_cores_efficiency if single_view else None
    return DataRate(
        images_per_s=images_per_s,
        images_per_s_per_node=per_node,
        mb_per_s_per_node=per_node * mean_jpeg_kb / 1e3,
        views=work.views,
        host_ms_per_image=ms,
        cores_per_node_needed=cores,
        cores_per_node=cores_per_node,
        workers_per_rank=workers_per_rank,
        gpu_decode_possible=single_view,
        gpu_decode_cores_per_node=None if gpu_cores is None else math.ceil(gpu_cores * 10) / 10,
    )
