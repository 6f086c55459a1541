"""Two-rank check of iBOT's teacher centres; launched by ``tests/test_ibot.py``.

    deepspeed --num_gpus 2 tests/dist_scripts/ibot_check.py --out result.json

Every rank feeds *different* images. The centres must end up identical on both ranks and equal to
``m * old + (1 - m) * mean``, the mean taken over the union of both ranks' teacher outputs (gathered here
independently of the method). Checked twice:

1. a plain module with *unequal* batch sizes per rank (the row count is all-reduced with the sums);
2. inside a ZeRO-3 DeepSpeed engine, through the training loop's calls (``engine(images)``,
   ``engine.backward``, ``engine.step``, ``after_optimizer_step``), with gradient accumulation over two
   micro-batches per optimizer step (one centre update per optimizer step, from both micro-batches).

Rank 0 writes a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]

import deepspeed  # noqa: E402
import deepspeed.comm as dist  # noqa: E402
from conftest import tiny, zero3_engine  # noqa: E402

from mimscale import create_method  # noqa: E402
from mimscale.train.distributed import run_and_exit  # noqa: E402

TINY = tiny(out_dim=96, head_hidden_dim=64, head_bottleneck_dim=32, num_local_crops=1, drop_path_rate=0.0)
ATOL = 1e-5


def crops(batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 3, 32, 32, generator=g),
        torch.randn(batch, 3, 32, 32, generator=g),
        torch.randn(batch, 3, 16, 16, generator=g),
    )


@torch.no_grad()
def teacher_stats(method: torch.nn.Module, images: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """[sum of CLS logits | sum of per-image mean patch logits | rows] of this rank's teacher outputs."""
    glob = torch.cat(images[:2])
    out = method.teacher.head(method.teacher.encoder(glob)[0]).float()
    return torch.cat([out[:, 0].sum(0), out[:, 1:].mean(1).sum(0), torch.tensor([float(glob.shape[0])])])


def union_mean(stats: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather every rank's statistics and average over the union (not an all-reduce: an independent path)."""
    parts = [torch.zeros_like(stats) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, stats)
    total = torch.stack(parts).sum(0)
    return total[:k] / total[-1], total[k : 2 * k] / total[-1]


def same_on_all_ranks(t: torch.Tensor) -> float:
    parts = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return max(float((p - parts[0]).abs().max()) for p in parts)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)  # added by the DeepSpeed launcher
    args = parser.parse_args()

    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    k = TINY["out_dim"]
    checks: dict[str, float] = {}
    failures: list[str] = []

    # 1. plain module, unequal batches: rank r has 3 + 2 r images.
    torch.manual_seed(0)
    method = create_method("ibot", **TINY).train()
    loss_fn = method.loss_fn
    for step in range(2):
        images = crops(3 + 2 * rank, seed=100 * step + rank)
        old_c, old_c2 = loss_fn.center.clone(), loss_fn.center2.clone()
        want_c, want_c2 = union_mean(teacher_stats(method, images), k)
        method(images)
        method.loss_fn.update_center()
        checks[f"plain_center_err_{step}"] = float(
            (loss_fn.center - (0.9 * old_c + 0.1 * want_c)).abs().max()
        )
        checks[f"plain_center2_err_{step}"] = float(
            (loss_fn.center2 - (0.9 * old_c2 + 0.1 * want_c2)).abs().max()
        )
        checks[f"plain_rank_spread_{step}"] = max(
            same_on_all_ranks(loss_fn.center), same_on_all_ranks(loss_fn.center2)
        )
    # The union differs from this rank's own batch, so the check above can tell the two apart.
    own = teacher_stats(method, crops(3 + 2 * rank, seed=rank))
    checks["own_vs_union_gap"] = float((own[:k] / own[-1] - union_mean(own, k)[0]).abs().max())

    # 2. ZeRO-3 engine, 2 micro-batches per optimizer step.
    torch.manual_seed(0)
    method = create_method("ibot", **TINY)
    engine = zero3_engine(method, micro_batch=4, accumulation=2)
    module = engine.module
    for step in range(1, 3):
        old_c, old_c2 = module.loss_fn.center.clone(), module.loss_fn.center2.clone()
        stats = torch.zeros(2 * k + 1)
        for micro in range(2):
            images = crops(4, seed=1000 * step + 10 * micro + rank)
            stats += teacher_stats(module, images)
            out = engine(images)
            engine.backward(out.loss)
            engine.step()
        want_c, want_c2 = union_mean(stats, k)
        module.after_optimizer_step(step, 10, engine)
        c, c2 = module.loss_fn.center, module.loss_fn.center2
        checks[f"zero3_center_err_{step}"] = float((c - (0.9 * old_c + 0.1 * want_c)).abs().max())
        checks[f"zero3_center2_err_{step}"] = float((c2 - (0.9 * old_c2 + 0.1 * want_c2)).abs().max())
        checks[f"zero3_rank_spread_{step}"] = max(same_on_all_ranks(c), same_on_all_ranks(c2))
    checks["zero3_center_dtype_fp32"] = float(module.loss_fn.center.dtype == torch.float32)

    for name, value in checks.items():
        if name == "own_vs_union_gap":
            if value < 1e-3:
                failures.append(f"{name}={value}: the ranks' data are too alike to test the all-reduce")
        elif name.endswith("dtype_fp32"):
            if value != 1.0:
                failures.append(f"{name}: the centre is not float32")
        elif value > ATOL:
            failures.append(f"{name}={value} > {ATOL}")
    if rank == 0:
        Path(args.out).write_text(
            json.dumps(
                {"ok": not failures, "failures": failures, "checks": checks, "world_size": world}, indent=2
            )
        )
    dist.barrier()


if __name__ == "__main__":
    run_and_exit(main)  # then release /dev/shm, destroy the process group, exit without finalization
