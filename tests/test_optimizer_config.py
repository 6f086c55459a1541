"""The optimizer section and ZeRO settings that ``build_ds_config`` derives, and a 2-rank check that the
resulting ZeRO-1/2 engines step exactly as a plain ``torch.optim.AdamW``.

Run as a script under the ``deepspeed`` launcher, this file is the 2-rank job itself:

    deepspeed --num_gpus 2 tests/test_optimizer_config.py --out result.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mimscale.train import config as C  # noqa: E402
from mimscale.train.deepspeed_config import build_ds_config, load_ds_config  # noqa: E402


def ds_config(name: str, precision: str = "fp32", world: int = 8, **optim) -> dict:
    user, _ = load_ds_config(name) if isinstance(name, str) else (name, "")
    cfg = C.TrainConfig(optim=C.OptimConfig(**optim))
    return build_ds_config(user, cfg, C.plan_batch(4096, world, 128), precision, 1e-3)


@pytest.mark.parametrize("name", ["zero1.json", "zero2.json", "zero3.json"])
def test_adamw_is_torchs_fused_kernel_on_cpu_too(name):
    params = ds_config(name)["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] is True
    assert ds_config(name, "bf16")["optimizer"]["params"]["fused"] is True
    # With optimizer offload DeepSpeed's own CPU Adam runs (type AdamW -> AdamW mode).
    offload = ds_config("zero3_offload.json")["optimizer"]
    assert offload["type"] == "AdamW" and "torch_adam" not in offload["params"]


def test_grad_norm_is_left_out_exactly_when_nothing_needs_it():
    for name in ("zero1.json", "zero2.json"):
        assert ds_config(name)["zero_optimization"]["compute_grad_norm"] is False
        assert ds_config(name, "bf16")["zero_optimization"]["compute_grad_norm"] is False
        # Clipping needs the norm.
        assert "compute_grad_norm" not in ds_config(name, grad_clip=3.0)["zero_optimization"]
    # Stage 0/3 have no such option; DeepSpeed refuses it with optimizer offload.
    for user in ({"zero_optimization": {"stage": 0}}, {"zero_optimization": {"stage": 3}}):
        assert "compute_grad_norm" not in ds_config(user)["zero_optimization"]
    offload = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    assert "compute_grad_norm" not in ds_config(offload)["zero_optimization"]
    # ZeRO-1's dedicated bf16 optimizer (fp32 gradient accumulation) needs it.
    bf16_z1 = {"zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp32"}}
    assert "compute_grad_norm" not in ds_config(bf16_z1, "bf16")["zero_optimization"]
    assert ds_config(bf16_z1, "fp32")["zero_optimization"]["compute_grad_norm"] is False
    # A file's own choice wins; the shipped file is not modified.
    own = {"zero_optimization": {"stage": 2, "compute_grad_norm": True}}
    assert ds_config(own)["zero_optimization"]["compute_grad_norm"] is True
    assert "compute_grad_norm" not in load_ds_config("zero2.json")[0]["zero_optimization"]


@pytest.mark.distributed
def test_zero1_and_zero2_step_as_torch_adamw_with_group_decay_and_a_frozen_group(tmp_path):
    """2 ranks, different data per rank, the loop's parameter groups (no decay on biases/norms, one group
    frozen by lr 0 for 2 steps), a per-step weight-decay change as iBOT's schedule: after 5 steps each ZeRO-1
    and ZeRO-2 engine (fused AdamW, no grad norm) equals torch's for-loop AdamW on the averaged gradient."""
    pytest.importorskip("deepspeed")
    from distributed_launch import run_deepspeed

    out = tmp_path / "result.json"
    run_deepspeed(Path(__file__), ["--out", str(out)], timeout=300)
    result = json.loads(out.read_text())
    assert result["world_size"] == 2
    for name in ("zero1.json", "zero2.json"):
        r = result[name]
        assert r["optimizer"] == "AdamW fused" and r["compute_grad_norm"] is False, r
        assert r["frozen_unchanged_at_step_2"] and r["frozen_moved_after"], r
        assert r["max_abs_diff"] < 1e-6, r


# ------------------------------------------------------------------------------------------------
# the 2-rank job

STEPS, FROZEN_STEPS, WD = 5, 2, 0.05


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 33), nn.LayerNorm(33), nn.GELU(), nn.Linear(33, 7))


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(4, 16, generator=g), torch.randn(4, 7, generator=g)


def schedule(model: nn.Module, lr: float) -> tuple[list[dict], object]:
    from mimscale.train.optim import FrozenFor, param_groups

    groups = param_groups(model, WD, set(), {"3.": FROZEN_STEPS})

    def lr_scheduler(optimizer):
        lambdas = [
            FrozenFor(lambda step: 1.0, g["frozen_steps"]) if g.get("frozen_steps") else (lambda step: 1.0)
            for g in optimizer.param_groups
        ]
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)

    return groups, lr_scheduler


def set_weight_decay(optimizer, step: int) -> None:
    for g in optimizer.param_groups:
        if g.get("decay", True):
            g["weight_decay"] = WD * (1 + step)


def run_engine(name: str, rank: int, world: int) -> dict:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    model, reference = build_model(), build_model()
    user, _ = load_ds_config(name)
    cfg = C.TrainConfig(optim=C.OptimConfig(weight_decay=WD), global_batch=4 * world, max_micro_batch=4)
    lr = 1e-2
    ds = build_ds_config(user, cfg, C.plan_batch(4 * world, world, 4), "fp32", lr)
    groups, lr_scheduler = schedule(model, lr)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=groups, config=ds, lr_scheduler=lr_scheduler
    )
    opt = engine.optimizer.optimizer
    ref_groups, ref_lr_scheduler = schedule(reference, lr)
    o = cfg.optim
    ref_opt = torch.optim.AdamW(ref_groups, lr=lr, betas=o.betas, eps=o.eps, foreach=False, fused=False)
    ref_scheduler = ref_lr_scheduler(ref_opt)
    frozen = engine.module[3].weight
    frozen_start = safe_get_full_fp32_param(frozen).clone()
    result = {
        "optimizer": f"{type(opt).__name__} {'fused' if opt.defaults.get('fused') else 'unfused'}",
        "compute_grad_norm": engine.optimizer.compute_grad_norm,
    }
    for step in range(STEPS):
        set_weight_decay(scheduler.optimizer, step)
        set_weight_decay(ref_opt, step)
        x, y = batch(rank, step)
        loss = nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        ref_loss = sum(
            nn.functional.mse_loss(reference(xr), yr) for xr, yr in (batch(r, step) for r in range(world))
        )
        (ref_loss / world).backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        ref_scheduler.step()
        if step + 1 == FROZEN_STEPS:
            unchanged = torch.equal(safe_get_full_fp32_param(frozen), frozen_start)
            result["frozen_unchanged_at_step_2"] = bool(unchanged)
    result["frozen_moved_after"] = bool(not torch.equal(safe_get_full_fp32_param(frozen), frozen_start))
    diffs = [
        (safe_get_full_fp32_param(p) - r.detach()).abs().max().item()
        for p, r in zip(engine.module.parameters(), reference.parameters())
    ]
    result["max_abs_diff"] = max(diffs)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)  # the deepspeed launcher passes it
    args = parser.parse_args()
    from mimscale.train.distributed import init_distributed

    rank, world, _ = init_distributed()
    result = {"world_size": world}
    for name in ("zero1.json", "zero2.json"):
        result[name] = run_engine(name, rank, world)
    if rank == 0:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    from mimscale.train.distributed import run_and_exit

    run_and_exit(main)  # then release /dev/shm, destroy the process group, exit without finalization
