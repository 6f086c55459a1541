"""Two-rank check of mimscale.train.grad_rules against the official update rule; launched by
``tests/test_grad_rules.py``.

    deepspeed --num_gpus 2 tests/dist_scripts/grad_rules_check.py --out result.json

A small MLP with its last layer in a group of its own, frozen for the first optimizer step, trained two
steps under ZeRO-1, 2 and 3 with torch AdamW on each rank's own batch. The reference is one process in plain
PyTorch doing what DINO/iBOT's ``main_ibot.py`` does: the gradient of the mean loss over both ranks' batches,
``utils.clip_gradients`` (each parameter clipped by its own norm, ``clip / (norm + 1e-6)``), the frozen
layer's gradients set to None in the first step, ``optimizer.step()``. Also checked: the global-norm
alternative (DeepSpeed's ``gradient_clipping``) against ``torch.nn.utils.clip_grad_norm_``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[2])]

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402

from mimscale.train.distributed import run_and_exit  # noqa: E402
from mimscale.train.grad_rules import GradientRules  # noqa: E402

CLIP, LR = 0.05, 0.1


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 5))


def groups(m: torch.nn.Module) -> list[dict]:
    head = list(m[2].parameters())
    body = [p for p in m.parameters() if all(p is not q for q in head)]
    return [{"params": body, "weight_decay": 0.05}, {"params": head, "weight_decay": 0.05, "frozen_steps": 1}]


def batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(100 * step + rank)) * 3


def loss_of(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return (m(x) ** 2).mean() * 50  # large gradients: every parameter is clipped


def reference(per_param: bool, steps: int = 2) -> dict[str, torch.Tensor]:
    m = model()
    opt = torch.optim.AdamW(groups(m), lr=LR, betas=(0.9, 0.999), eps=1e-8)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = (loss_of(m, batch(0, step)) + loss_of(m, batch(1, step))) / 2  # the all-reduced mean
        loss.backward()
        if per_param:
            for p in m.parameters():  # DINO/iBOT utils.clip_gradients
                norm = p.grad.norm(2)
                coef = CLIP / (norm + 1e-6)
                if coef < 1:
                    p.grad.mul_(coef)
            if step < 1:  # utils.cancel_gradients_last_layer
                for p in m[2].parameters():
                    p.grad = None
        else:
            torch.nn.utils.clip_grad_norm_(m.parameters(), CLIP)
        opt.step()
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def engine_run(stage: int, per_param: bool, steps: int = 2) -> dict[str, torch.Tensor]:
    m = model()
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0 if per_param else CLIP,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.999], "eps": 1e-8,
                                                  "weight_decay": 0.05, "torch_adam": True}},
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=m, model_parameters=groups(m), config=config)
    rules = GradientRules(engine, CLIP if per_param else None, skip_frozen=per_param)
    for step in range(steps):
        rules.step = step
        loss = loss_of(engine, batch(dist.get_rank(), step))
        engine.backward(loss)
        engine.step()
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    errors: dict[str, float] = {}
    for per_param in (True, False):
        want = reference(per_param)
        init = {k: v.clone() for k, v in model().state_dict().items()}
        for stage in (1, 2, 3):
            got = engine_run(stage, per_param)
            name = f"zero{stage}_{'per_param' if per_param else 'global'}"
            errors[name] = max(float((got[k] - want[k]).abs().max()) for k in want)
            if per_param:  # the frozen layer moved only in the second step: one AdamW step of size ~lr
                moved = float((want["2.weight"] - init["2.weight"]).abs().max())
                errors[name + "_head_moved"] = moved
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(errors))


if __name__ == "__main__":
    run_and_exit(main)
