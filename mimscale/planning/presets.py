"""Every number ``mimscale plan`` assumes rather than derives, in one place, each with where it comes from.

Derived quantities (parameter counts, FLOPs, activation bytes, the batch plan) come from the recipe itself;
what is here describes hardware and the host-side data path:

* :data:`GPU_PRESETS`: device memory, bf16 dense peak and intra-node link bandwidth per accelerator (peaks
  from :data:`mimscale.flops.PEAK_BF16_TFLOPS`, the vendors' data sheets; memory as ``torch.cuda`` reports
  it); :data:`NET_GBS_PER_GPU`, the network between nodes.
* :data:`HOST`: the input pipeline's measured per-core cost (``benchmarks/README.md`` and
  ``benchmarks/view_rates.py``) and the default checkpoint bandwidth.
* :data:`IMAGENET_1K`: the default data set when neither ``--data`` nor ``--images`` says otherwise.

To plan for hardware that is not listed, pass ``--gpu-memory`` and ``--gpu-peak``; to plan for a host whose
cores are faster or slower than the one measured, scale ``--cores-per-node`` (docs/planning.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from mimscale.flops import PEAK_BF16_TFLOPS

__all__ = ["GPU_PRESETS", "HOST", "IMAGENET_1K", "NET_GBS_PER_GPU", "GpuPreset", "HostRates", "gpu_preset"]


@dataclass(frozen=True)
class GpuPreset:
    """One accelerator: memory the framework can allocate from (GiB, ``total_memory`` as ``torch.cuda``
    reports it, before the CUDA context) and the dense peak the plan's MFU refers to (TFLOP/s)."""

    name: str
    memory_gib: float
    peak_tflops: float
    link_gbs: float = 25.0  # GPU-to-GPU bandwidth inside a node, GB/s per direction (NVLink, else PCIe)
    bf16: bool = True  # False: fp16 mixed precision (V100), the same bytes per element
    note: str = ""


def _preset(
    name: str, memory_gib: float, peak_key: str, link_gbs: float, note: str, bf16: bool = True
) -> GpuPreset:
    return GpuPreset(name, memory_gib, PEAK_BF16_TFLOPS[peak_key], link_gbs, bf16, note)


# Intra-node bandwidth per direction from the vendors' data sheets: NVLink 4 900 GB/s total (H100 SXM,
# H200), NVLink 3 600 (A100 SXM), NVLink 2 300 (V100 SXM2); PCIe Gen5 x16 ~64 GB/s (H100 PCIe without an
# NVLink bridge), Gen4 x16 ~32 (L40S has no NVLink).
GPU_PRESETS: dict[str, GpuPreset] = {
    p.name: p
    for p in (
        _preset("h100-80gb", 79.1, "H100 SXM", 450.0, "H100 SXM5 80 GB HBM3"),
        _preset("h100-pcie", 79.1, "H100 PCIe", 64.0, "H100 PCIe 80 GB"),
        _preset("h200", 139.8, "H200", 450.0, "H200 SXM 141 GB HBM3e"),
        _preset("a100-80gb", 79.2, "A100", 300.0, "A100 SXM 80 GB"),
        _preset("a100-40gb", 39.4, "A100", 300.0, "A100 SXM 40 GB"),
        _preset("l40s", 44.4, "L40S", 32.0, "L40S 48 GB GDDR6"),
        _preset("v100-32gb", 31.7, "V100", 150.0, "V100 SXM2 32 GB, fp16 tensor cores (no bf16)", bf16=False),
        _preset("v100-16gb", 15.8, "V100", 150.0, "V100 SXM2 16 GB, fp16 tensor cores (no bf16)", bf16=False),
    )
}

# Between nodes: GB/s per GPU per direction. 50 = one 400 Gb/s NDR InfiniBand (or RoCE) port per GPU, the
# DGX/HGX H100 and H200 layout; A100 clusters typically have 200 Gb/s per GPU (25), V100 DGX-1 nodes 4 x
# 100 Gb/s for 8 GPUs (6.25). An assumption, not a measurement: pass --net-gbs for the real fabric.
NET_GBS_PER_GPU = 50.0


def gpu_preset(name: str) -> GpuPreset:
    """The preset called ``name`` (case-insensitive); ValueError listing the presets otherwise."""
    key = name.strip().lower()
    if key not in GPU_PRESETS:
        raise ValueError(
            f"--gpu {name!r}: unknown GPU; presets: {', '.join(GPU_PRESETS)} "
            "(or give --gpu-memory GIB and --gpu-peak TFLOPS for another)"
        )
    return GPU_PRESETS[key]


@dataclass(frozen=True)
class HostRates:
    """The host side of a step, measured on the 2-core Xeon of ``benchmarks/README.md`` (one core = one
    DataLoader worker), on ImageNet-like JPEGs of about 480x380 px (``benchmarks/_images.py``).

    ``single_crop_per_core``: images per CPU-second of the whole shard pipeline (tar reading, shuffling,
    crop-region JPEG decode, resize into the batch) for MAE's RandomResizedCrop(224): variant (c) of
    ``benchmarks/data_pipeline.py``, 1037 img/CPU-s (0.96 ms per image).

    ``transform_ms_coefficients``: the transform's CPU ms per image as ``c . ViewWork.features()`` (per image,
    several views, per Mpx of output, per Mpx through colour jitter, hue jitter, grayscale, blur, solarize),
    a relative least-squares fit by ``benchmarks/view_rates.py`` over every recipe's transform and six
    single-factor probes (2026-12-06, 10 interleaved rounds; every transform within 17% of its measurement:
    MAE's crop 0.76 ms, BEiT's jittered crop 1.47, LUT's two views 3.69, iBOT's 2 + 10 crops 14.4). The plan
    adds the modelled difference to MAE's crop to the pipeline time above.

    ``all_cores_efficiency``: workers on every core reach this fraction of cores x the per-core rate (0.8
    measured with 2 workers on 2 cores; the main process shares the cores).

    ``sampler_per_core``: images per CPU-second of the worker side of ``data.decode='device'``
    (:class:`~mimscale.data.gpu_decode.JpegCropSampler`: header, crop box, flip, 0.010 ms by
    ``view_rates.py``) plus the pipeline's own 0.20 ms (tar reading, shuffling, batching: variant (c)'s
    0.96 ms less its transform's 0.76): 4700 img/CPU-s. The decode then costs GPU time, which is not
    modelled (no GPU was at hand to measure nvJPEG).
    """

    single_crop_per_core: float = 1037.0
    transform_ms_coefficients: tuple[float, ...] = (0.609, 0.039, 5.558, 11.101, 34.956, 1.243, 39.062, 2.397)
    all_cores_efficiency: float = 0.8
    sampler_per_core: float = 4700.0
    checkpoint_write_gbs: float = 5.0  # default aggregate file-system write bandwidth, GB/s (--write-gbs)


HOST = HostRates()


@dataclass(frozen=True)
class DataSet:
    images: int
    mean_jpeg_kb: float


# ImageNet-1k train: 1,281,167 images in about 140 GB of JPEGs (110 kB each on average).
IMAGENET_1K = DataSet(images=1_281_167, mean_jpeg_kb=110.0)
