"""Two-rank ZeRO-3 acceptance checks for SimMIM and data2vec; launched by ``tests/test_simmim_data2vec.py``.

    deepspeed --num_gpus 2 tests/dist_scripts/simmim_data2vec_check.py --out result.json --workdir DIR

1. For each method, a tiny model built twice from one seed: a single-process reference and a copy wrapped by
   ZeRO-3 with *no* persistent parameters (so the mask token, CLS token and every small tensor are
   partitioned and must be gathered by the hooks). On one fixed batch and mask (the same on both ranks):
   the loss and every consolidated gradient equal the reference's; the data2vec teacher gets no gradient,
   is unchanged by ``engine.step()`` and then follows the EMA recurrence on the consolidated fp32 student;
   the gathered encoder's ``forward_features`` equals a timm model loaded (strict) with its weights.
2. The recipes ``simmim_vitb`` (2 steps) and ``data2vec_vitb`` (4 steps, checkpoints every 2, plus the
   ``--d2v-set`` overrides the test passes) run through the training loop with ``--smoke --ds_config
   zero3.json`` into ``DIR/simmim`` and ``DIR/data2vec``; the test then exports, reloads and resumes them.

Rank 0 writes a JSON summary.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import deepspeed  # noqa: E402
import deepspeed.comm as dist  # noqa: E402
import timm  # noqa: E402
from conftest import tiny  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad  # noqa: E402

from mimscale import create_method  # noqa: E402
from mimscale.recipes import load_recipe  # noqa: E402
from mimscale.train import config as C  # noqa: E402
from mimscale.train.distributed import run_and_exit  # noqa: E402
from mimscale.train.trainer import train  # noqa: E402

TINY = tiny(depth=3, drop_path_rate=0.0)
METHODS = {
    "simmim": dict(mask_patch_size=8),
    # A low decay so one EMA step moves the teacher far beyond the tolerance.
    "data2vec": dict(top_k=2, ema_decay=0.5, init_values=0.1),
}
ATOL = 1e-5


def ds_config() -> dict:
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.05, "torch_adam": True}},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 10**9,
    }


def gathered(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    params = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {n: p.detach().double().clone() for n, p in params.items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(set(a) ^ set(b)))
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def check_method(name: str) -> dict[str, float | bool]:
    checks: dict[str, float | bool] = {}
    torch.manual_seed(0)
    ref = create_method(name, **TINY, **METHODS[name])
    model = copy.deepcopy(ref)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config())
    module = engine.module
    checks["mask_token_partitioned"] = module.mask_token.ds_tensor.numel() < module.mask_token.ds_numel

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    mask = ref.masker(2, generator=gen)

    ref.train()
    ref_out = ref(x, mask=mask)
    ref_out.loss.backward()
    engine.train()
    out = engine(x, mask=mask)
    checks["err_loss"] = abs(out.loss.item() - ref_out.loss.item())
    engine.backward(out.loss)
    ref_grads = {n: p.grad.double() for n, p in ref.named_parameters() if p.requires_grad}
    grads = {}
    for n, p in module.named_parameters():
        if p.requires_grad:
            g = safe_get_full_grad(p)
            g = torch.zeros(p.ds_shape) if g is None else g
            grads[n] = g.double().reshape(p.ds_shape)
    checks["err_grads"] = max_diff(ref_grads, grads)
    checks["mask_token_grad"] = float(grads["mask_token"].abs().max())

    if name == "data2vec":
        teacher_before = gathered(module.teacher)
        checks["teacher_frozen"] = all(not p.requires_grad and p.grad is None
                                       for p in module.teacher.parameters())
        engine.step()
        checks["teacher_moved_by_step"] = max_diff(teacher_before, gathered(module.teacher))
        checks["teacher_eval"] = not any(m.training for m in module.teacher.modules())
        student = {n: safe_get_full_fp32_param(p).double() for n, p in module.encoder.named_parameters()}
        module.after_optimizer_step(1, 10)
        m = module.ema.momentum
        expected = {n: m * teacher_before[n] + (1 - m) * student[n] for n in student}
        checks["err_ema"] = max_diff(expected, gathered(module.teacher))
        checks["teacher_vs_student"] = max_diff(student, gathered(module.teacher))
    else:
        engine.step()

    module.eval()
    with torch.no_grad():
        feats = module.encoder.forward_features(x).double()
    enc = module.encoder
    plain = timm.create_model(enc.timm_name, pretrained=False, num_classes=0, **enc.timm_kwargs).eval()
    params = dict(enc.backbone.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        state = {k: v.detach().clone() for k, v in enc.backbone.state_dict().items()}
        state.update({k: v.detach().clone() for k, v in params.items()})
    plain.load_state_dict(state, strict=True)
    with torch.no_grad():
        checks["err_features_vs_timm"] = float((plain.forward_features(x).double() - feats).abs().max())
    return checks


def run_recipe(recipe: str, out_dir: Path, extra: list[str]) -> None:
    argv = ["--smoke", "--ds_config", "zero3.json", "--output_dir", str(out_dir), *extra]
    cfg = C.resolve_config(load_recipe(recipe), C.build_parser(recipe).parse_args(argv), recipe)
    code = train(cfg, "zero3.json", recipe)
    if code != 0:
        raise SystemExit(f"{recipe} exited with {code}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--d2v-set", action="append", default=[], help="extra --set for the data2vec run")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()

    results = {name: check_method(name) for name in METHODS}
    work = Path(args.workdir)
    run_recipe("simmim_vitb", work / "simmim", ["--max_steps", "2"])
    run_recipe("data2vec_vitb", work / "data2vec",
               ["--max_steps", "4", "--set", "ckpt_interval=2", "--set", "log_interval=1",
                *[a for kv in args.d2v_set for a in ("--set", kv)]])

    everything = [None] * world
    dist.all_gather_object(everything, results)
    failures = []
    for r, res in enumerate(everything):
        for name, checks in res.items():
            for key, value in checks.items():
                if key.startswith("err_") and not value <= ATOL:
                    failures.append(f"rank {r} {name}: {key}={value:.3g} > {ATOL}")
            if not checks["mask_token_partitioned"] or not checks["mask_token_grad"] > 0:
                failures.append(f"rank {r} {name}: mask token not partitioned or without gradient: {checks}")
            if name == "data2vec" and not (checks["teacher_frozen"] and checks["teacher_eval"]
                                           and checks["teacher_moved_by_step"] == 0
                                           and checks["teacher_vs_student"] > 1e-3):
                failures.append(f"rank {r} data2vec: teacher checks failed: {checks}")
    if rank == 0:
        Path(args.out).write_text(json.dumps({"world_size": world, "ok": not failures, "failures": failures,
                                              "checks": everything}, indent=1))
    dist.barrier()
    if failures:
        raise SystemExit("\n".join(failures))


if __name__ == "__main__":
    run_and_exit(main)  # then release /dev/shm, destroy the process group, exit without finalization
