"""The recipe registry: every registered recipe resolves (and builds) with ``--smoke``, each documented
``recipes/<name>.py`` entry point is the registered config, sizes are their base recipe plus deltas, and
bad values are caught before anything starts (status 2), also by ``--print_config``."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest
from conftest import REPO, list_recipes, load_recipe

from mimscale.data.views import list_view_presets, view_preset
from mimscale.recipes import recipe_doc
from mimscale.train import config as C
from mimscale.train.deepspeed_config import (
    build_ds_config,
    check_with_deepspeed,
    deepspeed_knows_zero_key,
    load_ds_config,
)
from mimscale.train.distributed import slurm_master_port


def resolve(name: str, *argv: str, world_size: int = 2) -> C.TrainConfig:
    args = C.build_parser(prog=name).parse_args(list(argv))
    cfg = C.resolve_config(load_recipe(name), args, name)
    C.plan_run(cfg, world_size)
    return cfg


def recipe_cli(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, f"recipes/{name}.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("name", list_recipes())
def test_every_recipe_resolves_and_builds_with_smoke(name: str) -> None:
    cfg = resolve(name, "--smoke", "--ds_config", "zero3.json")
    assert cfg.model["img_size"] == C.SMOKE_ENCODER["img_size"]
    assert recipe_doc(name), "a recipe states its paper and numbers in its docstring"


@pytest.mark.parametrize("name", list_recipes())
def test_every_recipe_builds_at_full_size_on_any_world(name: str) -> None:
    """The real model (on the meta device), its transform and DeepSpeed config, at 1 and 64 ranks."""
    for world in (1, 64):
        cfg = load_recipe(name)
        if cfg.method == "beit":  # stage 2 refuses to start without a tokenizer (tested in test_beit.py)
            cfg.model["tokenizer_path"] = "random"
        C.validate(cfg, "zero2.json", world)
        plan = C.plan_run(cfg, world)
        assert plan.batch.global_batch == cfg.global_batch


@pytest.mark.parametrize("name", list_recipes())
def test_entry_point_file_is_the_registered_recipe(name: str) -> None:
    path = REPO / "recipes" / f"{name}.py"
    assert path.is_file(), f"recipes/{name}.py is the documented way to run {name}"
    text = path.read_text()
    assert f'load_recipe("{name}")' in text and f'run_recipe("{name}")' in text
    code = [line for line in text.split('"""')[-1].splitlines() if line.strip()]
    assert len(code) <= 4, "entry points are configuration-free"


def _diff(a: C.TrainConfig, b: C.TrainConfig) -> dict[str, tuple]:
    flat_a, flat_b = _flatten(dataclasses.asdict(a)), _flatten(dataclasses.asdict(b))
    return {
        k: (flat_a.get(k), flat_b.get(k))
        for k in flat_a.keys() | flat_b.keys()
        if flat_a.get(k) != flat_b.get(k)
    }


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "smoke":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.parametrize(
    "large, base, keys",
    [
        ("mae_vitl", "mae_vitb", {"model.model_name", "max_micro_batch"}),
        ("mae_vith", "mae_vitb", {"model.model_name", "max_micro_batch"}),
        (
            "beit_vitl",
            "beit_vitb",
            {"model.model_name", "model.init_values", "optim.grad_clip", "max_micro_batch"},
        ),
        (
            "ibot_vitl",
            "ibot_vitb",
            {"model.model_name", "model.drop_path_rate", "optim.epochs", "max_micro_batch"},
        ),
        ("lut_vitl", "lut_vitb", {"model.model_name", "max_micro_batch"}),
    ],
)
def test_larger_sizes_are_their_base_recipe_plus_deltas(large: str, base: str, keys: set[str]) -> None:
    assert set(_diff(load_recipe(large), load_recipe(base))) == keys


def test_recipe_copies_are_independent() -> None:
    a = load_recipe("ibot_vitb")
    a.data.views[0]["size"] = 1
    a.model["out_dim"] = 1
    b = load_recipe("ibot_vitb")
    assert b.data.views[0]["size"] == 224 and b.model["out_dim"] == 8192


def test_unknown_recipe_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="mae_vitb"):
        load_recipe("mae_vitz")
    proc = subprocess.run(
        [sys.executable, "-m", "mimscale.recipes", "mae_vitz"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "unknown recipe 'mae_vitz'" in proc.stderr and "mae_vitl" in proc.stderr


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--set", "model.mask_ratio=1.5"], "mask_ratio"),
        (["--ds_config", "zero5.json"], "zero5.json"),
        (["--set", "data.views=[{'size': 32, 'scael': [0.2, 1]}]"], "unknown key 'scael'"),
        (["--set", "data.views=no_such_preset"], "lut_two_views"),
        (["--set", "global_batch=4095"], "global_batch=4095 is not divisible by the world size 2"),
    ],
)
def test_print_config_validates_like_a_run_and_exits_2(args: list[str], expected: str) -> None:
    proc = subprocess.run(
        [sys.executable, "recipes/mae_vitb.py", "--smoke", *args, "--print_config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**_env(), "WORLD_SIZE": "2"},
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert expected in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def test_a_deepspeed_config_deepspeed_rejects_is_a_one_line_error(tmp_path) -> None:
    bad = tmp_path / "zero9.json"
    bad.write_text('{"zero_optimization": {"stage": 9}}')
    proc = recipe_cli("mae_vitb", "--smoke", "--ds_config", str(bad), "--print_config")
    assert proc.returncode == 2 and "zero_optimization.stage=9" in proc.stderr, proc.stderr


def test_views_must_match_the_methods_view_count() -> None:
    with pytest.raises(C.ConfigError, match="delivers 12 view.*takes 5"):
        resolve("ibot_vitb", "--set", "model.num_local_crops=3")


def test_view_presets_by_name_build_for_the_model_size() -> None:
    cfg = resolve(
        "ibot_vitb", "--smoke", "--set", "data.views=ibot_multicrop", "--set", "model.num_local_crops=10"
    )
    assert cfg.data.views == "ibot_multicrop"
    views = view_preset("ibot_multicrop", 32, 4)
    assert [v["size"] for v in views] == [32, 32, 12] and views[-1]["repeat"] == 10
    assert view_preset("ibot_multicrop", 224, 16)[-1]["size"] == 96
    for name in list_view_presets():
        assert view_preset(name, 224, 16)


def test_compute_grad_norm_is_written_only_where_deepspeed_knows_it(monkeypatch) -> None:
    from mimscale.train import deepspeed_config as D

    cfg = C.TrainConfig()
    plan = C.plan_run(cfg, 2)
    user, source = load_ds_config("zero2.json")
    ds = build_ds_config(user, cfg, plan.batch, "fp32", plan.peak_lr)
    assert ds["zero_optimization"]["compute_grad_norm"] is False and deepspeed_knows_zero_key(
        "compute_grad_norm"
    )
    check_with_deepspeed(ds, source)  # the installed DeepSpeed accepts what we write
    monkeypatch.setattr(D, "deepspeed_knows_zero_key", lambda key: False)  # DeepSpeed 0.19.0-0.19.6
    old = build_ds_config(user, cfg, plan.batch, "fp32", plan.peak_lr)
    assert "compute_grad_norm" not in old["zero_optimization"]


def test_launch_scripts_derive_the_rendezvous_port_like_python() -> None:
    text = (REPO / "launch_scripts" / "_env.sh").read_text()
    base, mod = map(int, re.search(r"\$\(\((\d+) \+ SLURM_JOB_ID % (\d+)\)\)", text).groups())
    for job in (0, 1, 14999, 15000, 123456789):
        assert base + job % mod == slurm_master_port(job)


def test_smoke_keeps_blr_overridable_and_floats_stay_in_float32() -> None:
    def peak(*overrides: str) -> float:
        args = C.build_parser().parse_args(["--smoke", *[a for o in overrides for a in ("--set", o)]])
        cfg = C.resolve_config(load_recipe("mae_vitb"), args, "mae_vitb")
        return C.plan_run(cfg, 1).peak_lr

    assert peak() == pytest.approx(1.5e-4 * 4096 / 256)  # the recipe's lr at its real batch
    assert peak("optim.blr=3e-4") == pytest.approx(2 * peak())
    assert peak("optim.lr=1e-3") == 1e-3
    with pytest.raises(C.ConfigError, match="float32 range"):
        C.set_override(C.TrainConfig(), "optim.blr", 1e39)
    with pytest.raises(C.ConfigError, match="peak lr .* outside the float32 range"):
        peak("optim.blr=1e38")
