"""Recipe configuration, the shared CLI, DeepSpeed config resolution, schedules and checkpoint pointers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import load_recipe, tiny_method_kwargs
from distributed_launch import REPO

from mimscale.runs import atomic_write_text, read_latest, resolve_checkpoint
from mimscale.train import config as C
from mimscale.train.checkpoint import Checkpointer
from mimscale.train.deepspeed_config import build_ds_config, load_ds_config, resolve_precision
from mimscale.train.optim import param_groups, weight_decay_at
from mimscale.train.schedule import LRMultiplier


def recipe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "recipes/mae_vitl.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("world,micro,accum", [(1, 128, 32), (8, 128, 4), (64, 64, 1), (512, 8, 1)])
def test_global_batch_is_constant_across_world_sizes(world, micro, accum):
    plan = C.plan_batch(4096, world, 128)
    assert (plan.micro_batch, plan.accumulation) == (micro, accum)
    assert plan.micro_batch * plan.accumulation * world == 4096


def test_indivisible_global_batch_names_the_values():
    with pytest.raises(C.ConfigError, match="global_batch=4096 is not divisible by the world size 3"):
        C.plan_batch(4096, 3, 64)


def test_mae_recipe_holds_the_papers_numbers():
    cfg = load_recipe("mae_vitl")
    assert cfg.global_batch == 4096 and cfg.optim.betas == (0.9, 0.95) and cfg.optim.weight_decay == 0.05
    assert C.peak_lr(cfg.optim, cfg.global_batch) == pytest.approx(1.5e-4 * 4096 / 256)
    assert cfg.optim.warmup_epochs == 40 and cfg.data.crop_scale == (0.2, 1.0)
    assert cfg.model["model_name"] == "vit_large_patch16_224" and cfg.model["mask_ratio"] == 0.75


def test_set_overrides_validate_keys_and_types():
    cfg = C.TrainConfig()
    C.set_override(cfg, "optim.blr", C.parse_value("1e-3"))
    C.set_override(cfg, "data.crop_scale", C.parse_value("[0.3, 1]"))
    C.set_override(cfg, "model.mask_ratio", C.parse_value("0.8"))
    assert cfg.optim.blr == 1e-3 and cfg.data.crop_scale == (0.3, 1.0) and cfg.model["mask_ratio"] == 0.8
    with pytest.raises(C.ConfigError, match=r"optim\.blr='abc': expected a finite number"):
        C.set_override(cfg, "optim.blr", C.parse_value("abc"))
    with pytest.raises(C.ConfigError, match="unknown key 'optim.lrr'.*allowed"):
        C.set_override(cfg, "optim.lrr", 1.0)
    with pytest.raises(C.ConfigError, match=r"precision='fp8': allowed values are"):
        C.set_override(cfg, "precision", "fp8")


def test_cli_errors_exit_nonzero_naming_key_value_and_allowed():
    bad = recipe("--set", "optim.warmup_epochs=-1", "--print_config")
    assert bad.returncode == 2 and "optim.warmup_epochs=-1" in bad.stderr and "between 0" in bad.stderr
    bad = recipe("--set", "model.nope=1", "--print_config")
    assert bad.returncode == 2 and "model.nope" in bad.stderr and "allowed" in bad.stderr
    bad = recipe("--ds_config", "zero9.json", "--smoke")
    assert bad.returncode == 2 and "zero9.json" in bad.stderr and "zero3_offload.json" in bad.stderr
    bad = recipe("--set", "global_batch")
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr


def test_print_config_shows_smoke_shrunk_and_overrides():
    out = recipe("--smoke", "--set", "optim.epochs=8", "--max_steps", "7", "--print_config")
    assert out.returncode == 0, out.stderr
    cfg = json.loads(out.stdout)
    assert cfg["model"]["img_size"] == 32 and cfg["model"]["patch_size"] == 4
    assert cfg["model"]["embed_dim"] <= 96 and cfg["model"]["depth"] <= 4
    assert cfg["optim"]["epochs"] == 8 and cfg["max_steps"] == 7 and cfg["method"] == "mae"


def test_ds_config_names_resolve_to_shipped_files_and_paths_are_used_as_given(tmp_path):
    for name, stage in [("zero1.json", 1), ("zero2.json", 2), ("zero3.json", 3), ("zero3_offload.json", 3)]:
        cfg, _ = load_ds_config(name)
        assert cfg["zero_optimization"]["stage"] == stage
    own = tmp_path / "mine.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 1}, "train_batch_size": 3}))
    cfg, source = load_ds_config(str(own))
    assert source == str(own)
    plan = C.plan_batch(4096, 8, 128)
    with pytest.warns(UserWarning, match="train_batch_size"):
        ds = build_ds_config(cfg, C.TrainConfig(), plan, "bf16", 1e-3)
    assert ds["train_batch_size"] == 4096 and ds["gradient_accumulation_steps"] == 4
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["optimizer"]["params"]["fused"] is True


def test_precision_auto_picks_bf16_fp16_fp32():
    assert resolve_precision("auto", True, True) == "bf16"
    assert resolve_precision("auto", True, False) == "fp16"
    assert resolve_precision("auto", False, False) == "fp32"
    with pytest.raises(C.ConfigError, match="fp16"):
        resolve_precision("fp16", False, False)


def test_lr_schedule_warmup_then_half_cycle_cosine_and_multistep():
    s = LRMultiplier(peak_lr=1.0, total_steps=100, warmup_steps=10, min_lr=0.1)
    assert s.lr(0) == 0 and s.lr(5) == pytest.approx(0.5) and s.lr(10) == pytest.approx(1.0)
    assert s.lr(55) == pytest.approx(0.1 + 0.9 * 0.5) and s.lr(100) == pytest.approx(0.1)
    m = LRMultiplier(1.0, 100, 10, start_lr=0.01, schedule="multistep", milestones=(70,), gamma=0.1)
    assert m.lr(0) == pytest.approx(0.01) and m.lr(69) == 1.0 and m.lr(70) == pytest.approx(0.1)


def test_weight_decay_groups_and_cosine_schedule():
    from mimscale import create_method

    model = create_method("mae", **tiny_method_kwargs("mae", depth=1))
    groups = param_groups(model, 0.05, set(), {"decoder.decoder_pred": 7})
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            assert g["decay"] == (p.ndim > 1 and not n.endswith(".bias"))
            assert g["frozen_steps"] == (7 if n.startswith("decoder.decoder_pred") else 0)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert all("pos_embed" not in names[id(p)] for g in groups for p in g["params"])
    o = C.OptimConfig(weight_decay=0.04, weight_decay_end=0.4)
    assert weight_decay_at(o, 0, 100) == pytest.approx(0.04) and weight_decay_at(
        o, 100, 100
    ) == pytest.approx(0.4)


def test_latest_pointer_and_partial_tags(tmp_path):
    """Incomplete tags (no manifest) are removed only when older than a complete one; a newer incomplete one
    (a save killed before its manifest) stays until a save of that step replaces it (issue 12)."""
    root = tmp_path / "run" / "checkpoints"
    (root / "step_00000010").mkdir(parents=True)
    (root / "step_00000010" / "mimscale.json").write_text("{}")
    atomic_write_text(root / "latest", "step_00000010")
    (root / "step_00000020").mkdir()  # a save killed before the pointer moved
    (root / "step_00000005").mkdir()  # an older one killed the same way
    assert read_latest(root) == "step_00000010"
    Checkpointer(tmp_path / "run", rank=0).clean_partial(keep_tag="step_00000010")
    assert (root / "step_00000020").exists() and (root / "step_00000010").exists()
    assert not (root / "step_00000005").exists()
    assert resolve_checkpoint(tmp_path / "run") == (root, "step_00000010")
    assert resolve_checkpoint(root / "step_00000010") == (root, "step_00000010")
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        resolve_checkpoint(tmp_path)


def test_slurm_variables_map_to_torch_distributed():
    from mimscale.train.distributed import map_slurm_env

    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "1234"}
    map_slurm_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "16", "1")
    launched = {"RANK": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "16"}
    map_slurm_env(launched)
    assert launched["RANK"] == "0"


def test_export_rejects_bad_output_name(tmp_path):
    from mimscale.export import export_checkpoint

    with pytest.raises(ValueError, match="safetensors"):
        export_checkpoint(tmp_path, tmp_path / "x.bin")
    assert torch.__version__
