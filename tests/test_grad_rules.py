"""Per-parameter gradient clipping and frozen groups without gradients (mimscale.train.grad_rules) against
the official DINO/iBOT update rule, under ZeRO-1, 2 and 3 on two real ranks; and the global-norm
alternative against ``torch.nn.utils.clip_grad_norm_``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, run_deepspeed

from mimscale.recipes import load_recipe
from mimscale.train import config as C
from mimscale.train.deepspeed_config import build_ds_config, load_ds_config


@pytest.mark.distributed
def test_zero_steps_equal_the_official_per_parameter_rule(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    run_deepspeed(REPO / "tests" / "dist_scripts" / "grad_rules_check.py", ["--out", str(out)], timeout=600)
    errors = json.loads(out.read_text())
    for stage in (1, 2, 3):
        for mode in ("per_param", "global"):
            assert errors[f"zero{stage}_{mode}"] < 1e-6, errors
        assert errors[f"zero{stage}_per_param_head_moved"] > 1e-3, errors  # trained after the frozen step


def test_ibot_recipes_clip_per_parameter_and_deepspeed_does_not_clip_again() -> None:
    for name in ("ibot_vitb", "ibot_vitl"):
        cfg = load_recipe(name)
        assert cfg.optim.clip_mode == "per_param" and cfg.optim.grad_clip == 3.0
        assert cfg.optim.frozen_groups == "skip"
        plan = C.plan_run(cfg, 8)
        ds = build_ds_config(load_ds_config("zero2.json")[0], cfg, plan.batch, "bf16", plan.peak_lr)
        assert ds["gradient_clipping"] == 0.0
    mae = load_recipe("beit_vitb")
    assert mae.optim.clip_mode == "global"
    ds = build_ds_config(load_ds_config("zero2.json")[0], mae, C.plan_run(mae, 8).batch, "bf16", 1e-3)
    assert ds["gradient_clipping"] == 3.0
