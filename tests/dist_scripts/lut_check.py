"""Two-rank check of LUT's synchronised BatchNorm heads; launched by ``tests/test_lut.py``.

    deepspeed --num_gpus 2 tests/dist_scripts/lut_check.py --out result.json

1. A ``BYOLProjectionMLP`` fed *different* data (and batch sizes) on each rank, against torch's own
   ``nn.BatchNorm1d`` head run in one process on the union batch: outputs, running statistics (identical
   on both ranks), input gradients and the rank-summed parameter gradients all match.
2. A tiny LUT under a real ZeRO-3 engine: after one training step the student heads' running statistics
   are identical on both ranks and equal to those of the union of both ranks' head inputs (captured with
   forward hooks, one call per view); the teacher stayed in eval mode, got no gradients, and its BatchNorm
   buffers did not move in the forward but follow the EMA after ``after_optimizer_step``.

Every rank checks; rank 0 writes a JSON summary with all ranks' failures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402
from conftest import zero3_engine  # noqa: E402

from mimscale import create_method  # noqa: E402
from mimscale.models.heads import BYOLProjectionMLP  # noqa: E402
from mimscale.train.distributed import run_and_exit  # noqa: E402

ATOL = 1e-5
TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16,
            decoder_depth=1, decoder_num_heads=2, head_hidden_dim=24)


def close(name: str, got: torch.Tensor, want: torch.Tensor, failures: list[str], checks: dict) -> None:
    err = float((got.double() - want.double()).abs().max())
    checks[name] = max(err, checks.get(name, 0.0))
    if not err <= ATOL:
        failures.append(f"rank {dist.get_rank()}: {name} differs by {err:.3g}")


def same_on_all_ranks(name: str, t: torch.Tensor, failures: list[str]) -> None:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    if not all(torch.equal(parts[0], p) for p in parts):
        failures.append(f"rank {dist.get_rank()}: {name} differs between ranks")


def check_head(failures: list[str], checks: dict) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    head = BYOLProjectionMLP(8, 16, 6)
    with torch.no_grad():  # non-trivial affine parameters
        head[1].weight.uniform_(0.5, 1.5)
        head[1].bias.uniform_(-0.5, 0.5)
    ref = nn.Sequential(nn.Linear(8, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(),
                        nn.Linear(16, 6, bias=False))
    ref.load_state_dict(head.state_dict())

    sizes = [5 + 2 * r for r in range(world)]  # different data and batch sizes per rank
    xs = [torch.randn(n, 8, generator=torch.Generator().manual_seed(100 + r)) * (1 + r) + r
          for r, n in enumerate(sizes)]
    gs = [torch.randn(n, 6, generator=torch.Generator().manual_seed(200 + r)) for r, n in enumerate(sizes)]

    head.train()
    x = xs[rank].clone().requires_grad_()
    y = head(x)
    (y * gs[rank]).sum().backward()  # this rank's loss; the loss of the whole job is the sum over ranks

    ref.train()
    x_all = torch.cat(xs).requires_grad_()
    y_all = ref(x_all)
    (y_all * torch.cat(gs)).sum().backward()
    lo = sum(sizes[:rank])
    close("head_output", y.detach(), y_all.detach()[lo:lo + sizes[rank]], failures, checks)
    close("head_input_grad", x.grad, x_all.grad[lo:lo + sizes[rank]], failures, checks)
    for name in ("running_mean", "running_var"):
        close(f"head_{name}", getattr(head[1], name), getattr(ref[1], name), failures, checks)
        same_on_all_ranks(f"head_{name}", getattr(head[1], name), failures)
    ref_params = dict(ref.named_parameters())
    for name, p in head.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g)
        close(f"head_grad_{name}", g, ref_params[name].grad, failures, checks)


def check_method_zero3(failures: list[str], checks: dict) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    method = create_method("lut", **TINY)
    engine = zero3_engine(method, micro_batch=4)
    module = engine.module

    captured: dict[str, list[torch.Tensor]] = {"head": [], "predictor": []}
    for name in captured:
        bn = getattr(module, name)[1]
        bn.register_forward_hook(
            lambda mod, inp, out, name=name: captured[name].append(inp[0].detach().clone()))
    teacher_bufs = {n: b.clone() for n, b in module.teacher.named_buffers() if b.is_floating_point()}

    gen = torch.Generator().manual_seed(300 + rank)  # different images on every rank
    views = (torch.randn(4, 3, 16, 16, generator=gen), torch.randn(4, 3, 16, 16, generator=gen))
    engine.train()
    out = engine(views)
    engine.backward(out.loss)
    engine.step()

    if module.teacher.training or any(m.training for m in module.teacher.modules()):
        failures.append(f"rank {rank}: the teacher left eval mode")
    if any(p.requires_grad or p.grad is not None for p in module.teacher.parameters()):
        failures.append(f"rank {rank}: teacher parameters require or hold gradients")
    for n, b in module.teacher.named_buffers():
        if n in teacher_bufs and not torch.equal(b, teacher_bufs[n]):
            failures.append(f"rank {rank}: teacher buffer {n} moved in the forward (BatchNorm not in eval)")
    if set(out.metrics) != {"loss_mae", "loss_bc", "ema_momentum"}:
        failures.append(f"rank {rank}: metrics {sorted(out.metrics)}")

    for name, inputs in captured.items():
        if len(inputs) != 2:
            failures.append(f"rank {rank}: {name} BatchNorm ran {len(inputs)} times, expected once per view")
            continue
        mean, var = torch.zeros(inputs[0].shape[1]), torch.ones(inputs[0].shape[1])
        for x in inputs:  # union of the ranks' inputs of this call, then BatchNorm's running update
            parts = [torch.empty_like(x) for _ in range(world)]
            dist.all_gather(parts, x)
            union = torch.cat(parts).double()
            mean = 0.9 * mean.double() + 0.1 * union.mean(0)
            var = 0.9 * var.double() + 0.1 * union.var(0, unbiased=True)
        bn = getattr(module, name)[1]
        close(f"method_{name}_running_mean", bn.running_mean, mean, failures, checks)
        close(f"method_{name}_running_var", bn.running_var, var, failures, checks)
        same_on_all_ranks(f"method_{name}_running_mean", bn.running_mean, failures)
        same_on_all_ranks(f"method_{name}_running_var", bn.running_var, failures)

    module.after_optimizer_step(1, 10)
    m = module.ema.momentum
    checks["momentum"] = m
    student_bufs = dict(module.head.named_buffers())
    for n, b in module.teacher.named_buffers():
        if n.startswith("head.") and b.is_floating_point():
            want = m * teacher_bufs[n].double() + (1 - m) * student_bufs[n[len("head."):]].double()
            close("teacher_bn_buffer_ema", b, want, failures, checks)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    failures: list[str] = []
    checks: dict = {}
    check_head(failures, checks)
    check_method_zero3(failures, checks)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, failures)
    if dist.get_rank() == 0:
        all_failures = [f for fs in everyone for f in fs]
        Path(args.out).write_text(json.dumps({"ok": not all_failures, "failures": all_failures,
                                              "world_size": dist.get_world_size(), "checks": checks}))
    dist.barrier()


if __name__ == "__main__":
    run_and_exit(main)  # then release /dev/shm, destroy the process group, exit without finalization
