"""``mimscale plan``: size a run before renting the cluster (memory per ZeRO stage, time, input rate,
checkpoints, shard layout). Registered in :mod:`mimscale.cli` by :func:`add_parser`."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import replace

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``plan`` subcommand to ``mimscale``'s subparsers."""
    from mimscale.planning.presets import GPU_PRESETS

    p = subparsers.add_parser(
        "plan",
        help="plan a run: memory per ZeRO stage, time, input rate, checkpoints, shard layout",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("recipe", help="registered recipe name (mae_vith) or recipe file (recipes/mae_vith.py)")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs (ranks)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument(
        "--gpu",
        default=None,
        help=f"GPU preset: {', '.join(GPU_PRESETS)} (default h100-80gb unless --gpu-memory and "
        "--gpu-peak describe another)",
    )
    p.add_argument(
        "--gpu-memory", type=float, default=None, help="device memory in GiB (overrides the preset)"
    )
    p.add_argument(
        "--gpu-peak",
        type=float,
        default=None,
        help="dense bf16 (or fp16) peak in TFLOP/s (overrides the preset)",
    )
    p.add_argument(
        "--ds_config",
        "--ds-config",
        dest="ds_config",
        default="zero2.json",
        help="DeepSpeed config the run will use: zero1.json, zero2.json, zero3.json, zero3_offload.json "
        "or a path (default zero2.json, as the recipes)",
    )
    p.add_argument("--cores-per-node", type=int, default=None, help="CPU cores per node for data workers")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--data", default=None, help="the run's shard spec (reads dataset.json beside it)")
    source.add_argument(
        "--images", type=int, default=None, help="images in the data set (default ImageNet-1k)"
    )
    p.add_argument(
        "--mean-jpeg-kb", type=float, default=None, help="mean encoded image size in kB (default 110)"
    )
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation to assume (default 0.4)")
    p.add_argument(
        "--margin",
        type=float,
        default=0.1,
        help="fraction of device memory kept free for the CUDA context, NCCL, fragmentation (0.1)",
    )
    p.add_argument(
        "--write-gbs",
        type=float,
        default=None,
        help="aggregate checkpoint write bandwidth in GB/s (default 5)",
    )
    p.add_argument(
        "--net-gbs",
        type=float,
        default=None,
        help="network bandwidth between nodes per GPU, GB/s per direction (default 50: 400 Gb/s)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field as the recipe's own --set does (e.g. max_micro_batch=32)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of the table")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Handler of ``mimscale plan``: 0 after printing the plan, 2 (one line on stderr) on bad input."""
    from mimscale.planning.presets import HOST, NET_GBS_PER_GPU, GpuPreset, gpu_preset
    from mimscale.planning.report import Cluster, make_plan, render
    from mimscale.train.config import ConfigError

    try:
        if args.gpu is None and args.gpu_memory is not None and args.gpu_peak is not None:
            gpu = GpuPreset("custom", args.gpu_memory, args.gpu_peak)
        else:
            gpu = gpu_preset(args.gpu or "h100-80gb")
            if args.gpu_memory is not None:
                gpu = replace(gpu, name=gpu.name + "*", memory_gib=args.gpu_memory)
            if args.gpu_peak is not None:
                gpu = replace(gpu, name=gpu.name.rstrip("*") + "*", peak_tflops=args.gpu_peak)
        cluster = Cluster(
            args.gpus,
            args.gpus_per_node,
            gpu,
            args.cores_per_node,
            args.mfu,
            args.margin,
            HOST.checkpoint_write_gbs if args.write_gbs is None else args.write_gbs,
            NET_GBS_PER_GPU if args.net_gbs is None else args.net_gbs,
        )
        # Libraries' chatter (DeepSpeed's accelerator line, timm) goes to stderr: stdout is the plan alone.
        with contextlib.redirect_stdout(sys.stderr):
            plan = make_plan(
                args.recipe,
                cluster,
                ds_config=args.ds_config,
                overrides=args.overrides,
                data=args.data,
                images=args.images,
                mean_jpeg_kb=args.mean_jpeg_kb,
            )
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"mimscale plan: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_dict(), indent=1) if args.json else render(plan))
    return 0
