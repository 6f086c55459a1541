"""Two-rank measurement of what DeepSpeed allocates per rank, for ``tests/test_planning_measured.py``:

    deepspeed --num_gpus 2 tests/dist_scripts/plan_memory_check.py --out result.json --work DIR

For each recipe (``--smoke`` size, bf16) and ZeRO stage 1, 2, 3 (the settings of ``zero_config`` below, which
the test hands to the plan too): builds the engine with the trainer's ``build_engine``, runs two optimizer
steps of two micro batches each, and records on every rank the bytes of the tensor storages it holds, by kind:

* ``params``: module parameters (ZeRO-3: partitions ``ds_tensor`` and whole persistent parameters) and
  buffers;
* ``optimizer``: the fp32 master partitions and Adam's moments;
* ``ema``: the EMA teacher's fp32 shadow;
* ``gradients``: every other floating tensor the optimizer object holds between the last backward of a step
  and the step (gradient partitions; ZeRO-3's reduction bucket);
* ``buckets``: the largest total of ZeRO-1/2 reduction buckets seen during a backward;

then writes a checkpoint with the trainer's ``Checkpointer`` and records each rank's file sizes. Rank 0
writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed  # noqa: E402
import deepspeed.comm as dist  # noqa: E402

from mimscale.planning.recipe import views_spec  # noqa: E402
from mimscale.runs import RunMeta  # noqa: E402
from mimscale.train.checkpoint import Checkpointer  # noqa: E402
from mimscale.train.config import apply_smoke, plan_run, to_dict  # noqa: E402
from mimscale.train.distributed import run_and_exit  # noqa: E402
from mimscale.train.optim import build_engine  # noqa: E402

RECIPES = ("mae_vitb", "data2vec_vitb")
SETS = {"max_micro_batch": 4, "precision": "bf16"}  # global 16 on 2 ranks: micro 4 x accumulation 2


def zero_config(stage: int) -> dict[str, Any]:
    """Small buckets (the tiny model is ~0.1M parameters) and, under ZeRO-3, a persistence threshold that
    partitions the weights and keeps biases and norms whole."""
    zero: dict[str, Any] = {
        "stage": stage,
        "reduce_bucket_size": 20000,
        "allgather_bucket_size": 20000,
        "overlap_comm": stage == 2,
    }
    if stage == 3:
        zero.update(stage3_param_persistence_threshold=1000, stage3_prefetch_bucket_size=20000)
    return {"zero_optimization": zero}


def storages(
    obj: Any, out: dict[int, tuple[int, torch.Tensor]], depth: int = 0, seen: set[int] | None = None
) -> None:
    """Every CPU tensor storage reachable from ``obj`` through DeepSpeed/torch.optim objects, lists, dicts."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 6:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "cpu" and obj.numel():
            st = obj.untyped_storage()
            out.setdefault(st._cdata, (st.nbytes(), obj))
        return
    if isinstance(obj, dict):
        items = list(obj.values()) + [k for k in obj if isinstance(k, torch.Tensor)]
    elif isinstance(obj, (list, tuple, set)):
        items = list(obj)
    elif (
        depth < 3
        and hasattr(obj, "__dict__")
        and not isinstance(obj, (torch.nn.Module, type))
        and type(obj).__module__.startswith(("deepspeed", "torch.optim"))
    ):
        items = list(vars(obj).values())
    else:
        return
    for item in items:
        storages(item, out, depth + 1, seen)


def keys_of(tensors: Any) -> dict[int, int]:
    found: dict[int, tuple[int, torch.Tensor]] = {}
    storages(tensors, found)
    return {k: v[0] for k, v in found.items()}


def module_keys(module: torch.nn.Module) -> dict[int, int]:
    out: dict[int, int] = {}
    for p in module.parameters():
        for t in (p.data, getattr(p, "ds_tensor", None)):
            if t is not None and t.numel():
                out[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
    for b in module.buffers():
        out[b.untyped_storage()._cdata] = b.untyped_storage().nbytes()
    return out


def measure(recipe: str, stage: int, work: Path) -> dict[str, Any]:
    from mimscale.recipes import load_recipe
    from mimscale.train.config import set_override

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_recipe(recipe)
    apply_smoke(cfg)
    for k, v in SETS.items():
        set_override(cfg, k, v)
    plan = plan_run(cfg, world)
    torch.manual_seed(0)
    from mimscale.methods.base import create_method

    method = create_method(cfg.method, **cfg.model)
    spec = views_spec(cfg, method)
    eng = build_engine(method, cfg, plan, zero_config(stage))
    engine, opt, module = eng.engine, eng.engine.optimizer, eng.engine.module
    entries = spec if isinstance(spec, list) else [spec]
    sizes = [e["size"] for e in entries for _ in range(e.get("repeat", 1))]

    bucket_peak = [0]

    def bucket_bytes() -> int:
        total = 0
        for bucket in getattr(opt, "ipg_buckets", {}).values():
            bufs = getattr(bucket, "buffer", None)
            for b in bufs if isinstance(bufs, list) else [bufs]:
                if isinstance(b, torch.Tensor):
                    total += b.untyped_storage().nbytes()
        return total

    def hook(grad: torch.Tensor) -> torch.Tensor:
        bucket_peak[0] = max(bucket_peak[0], bucket_bytes())
        return grad

    handles = [p.register_hook(hook) for p in module.parameters() if p.requires_grad]
    pre_step: dict[int, int] = {}
    for step in range(2):
        for micro in range(plan.batch.accumulation):
            torch.manual_seed(100 * step + 10 * micro + rank)
            views = [torch.randn(plan.batch.micro_batch, 3, s, s, dtype=eng.dtype) for s in sizes]
            out = engine(views[0] if len(views) == 1 else views)
            engine.backward(out.loss)
            if micro == plan.batch.accumulation - 1:
                pre_step = keys_of(opt)
            engine.step()
        module.after_optimizer_step(step + 1, plan.total_steps, engine)
    for h in handles:
        h.remove()

    params = module_keys(module)
    if stage == 3:
        master = keys_of(opt.fp32_partitioned_groups_flat)
    else:
        master = keys_of(opt.single_partition_of_fp32_groups)
    moments = keys_of([list(s.values()) for s in opt.optimizer.state.values()])
    optimizer = {**master, **moments}
    ema_obj = getattr(module, "_ema", None)
    ema = (
        keys_of(list(ema_obj._shadow_params.values()) + list(ema_obj._shadow_buffers.values()))
        if ema_obj
        else {}
    )
    post = keys_of(opt)
    known = {**params, **optimizer, **ema}
    gradients = {k: v for k, v in {**pre_step, **post}.items() if k not in known}

    ckpt = Checkpointer(work / f"{recipe}_z{stage}", rank, keep=1, interval=1)
    meta = RunMeta.from_method(module, recipe, to_dict(cfg), stage, world)
    ckpt.save(engine, module, 2, meta)
    tag_dir = ckpt.root / "step_00000002"
    files = {p.name: p.stat().st_size for p in sorted(tag_dir.iterdir()) if p.is_file()}
    return {
        "recipe": recipe,
        "stage": stage,
        "rank": rank,
        "params": sum(params.values()),
        "optimizer": sum(optimizer.values()),
        "ema": sum(ema.values()),
        "gradients": sum(gradients.values()),
        "buckets": bucket_peak[0],
        "files": files,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", default=None)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    deepspeed.init_distributed()
    t0 = time.perf_counter()
    work = Path(args.work or tempfile.mkdtemp())
    results = []
    for recipe in RECIPES:
        for stage in (1, 2, 3):
            results.append(measure(recipe, stage, work))
    gathered = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        rows = [r for per_rank in gathered for r in per_rank]
        Path(args.out).write_text(
            json.dumps(
                {
                    "rows": rows,
                    "zero": {s: zero_config(s) for s in (1, 2, 3)},
                    "sets": SETS,
                    "seconds": time.perf_counter() - t0,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    run_and_exit(main)
