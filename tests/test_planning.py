"""``mimscale plan``: every recipe at 1, 8, 64 and 512 GPUs gives sane, monotonic numbers; the model-state
arithmetic agrees with DeepSpeed's own estimators; the activation tracker and its depth extrapolation hold;
shard findings say what to change; bad input is one line and status 2 before anything is measured.

Measured against real 2-rank runs in ``tests/test_planning_measured.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mimscale.cli import main
from mimscale.data.demo import CLASSES, ensure_demo_shards, synth_image
from mimscale.planning import activations as A
from mimscale.planning.data import SINGLE_CROP, host_ms_per_image, view_work
from mimscale.planning.memory import ParamCounts, ZeroSettings, deepspeed_estimate, model_states
from mimscale.planning.presets import GPU_PRESETS, HOST, gpu_preset
from mimscale.planning.recipe import load_config
from mimscale.planning.report import Cluster, make_plan, render
from mimscale.recipes import list_recipes

GPUS = (1, 8, 64, 512)


@pytest.fixture(scope="module", autouse=True)
def activation_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """One activation measurement per recipe for this module (a fresh cache: nothing from earlier runs)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MIMSCALE_CACHE", str(tmp_path_factory.mktemp("plan_cache")))
    A._MEMO.clear()
    yield
    mp.undo()
    A._MEMO.clear()


def _nondecreasing(values: list[float], slack: float = 0.0) -> bool:
    return all(b >= a * (1 - slack) for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("recipe", list_recipes())
def test_every_recipe_plans_sanely_at_1_8_64_512_gpus(recipe: str) -> None:
    plans = [make_plan(recipe, Cluster(g, 8, gpu_preset("h100-80gb"), cores_per_node=96)) for g in GPUS]
    first = plans[0]
    assert first.counts.trainable > 1e6
    a = first.activations
    assert 0 < a.per_image_checkpointed <= a.per_image < 4 * 2**30, a
    for p in plans:
        assert p.activations == a  # measured once, independent of the cluster
        assert p.time.train_flops_per_image == first.time.train_flops_per_image
        assert p.batch.micro_batch * p.batch.accumulation * p.batch.world_size == p.cfg.global_batch
        assert p.time.days > 0 and p.data.images_per_s > 0 and p.checkpoint.total_bytes > 0
        assert p.data.images_per_s_per_node * p.cluster.nodes == pytest.approx(p.data.images_per_s)
        assert p.checkpoint.total_bytes >= p.checkpoint.rank0_bytes
        for m in p.memory.values():
            s = m.states
            assert min(s.params, s.gradients, s.optimizer, s.ema_shadow, s.backward_transient) >= 0
            assert m.peak >= s.resident + m.activations or m.peak == s.resident + s.step_transient
            assert m.fits == (m.micro_batch <= m.max_micro_batch)
        text = render(p)
        assert p.recipe in text and "ZeRO" in text
        assert p.to_dict()["memory"]  # JSON-able summary
    # More GPUs: less (or equal) model state per rank, room for a larger micro batch, less compute per step,
    # never fewer images/s (within 5%: communication grows by (N - 1) / N), never longer.
    for key in first.memory:
        assert _nondecreasing([-p.memory[key].states.resident for p in plans])
        assert _nondecreasing([p.memory[key].max_micro_batch for p in plans])
    assert _nondecreasing([-p.time.compute_s for p in plans])
    assert _nondecreasing([p.time.images_per_s for p in plans], slack=0.05)
    assert all(b.time.days <= a.time.days * 1.05 for a, b in zip(plans, plans[1:]))
    # ZeRO-3 shards everything, ZeRO-1/2 only the optimizer: at 512 ranks ZeRO-3 holds the least.
    last = plans[-1].memory
    assert last[(3, False)].states.resident < last[(2, False)].states.resident
    assert last[(2, False)].states.optimizer == last[(1, False)].states.optimizer
    # The analytic FLOPs (method_flops) leave out heads they do not model, never more than they count.
    if first.time.flops_source == "method_flops":
        assert first.activations.counted_train_flops >= 0.95 * first.time.train_flops_per_image


def test_mae_vith_on_256_h100_is_the_worked_example() -> None:
    """docs/planning.md's first example: ZeRO-2 fits micro batch 16 with room to spare, the step is
    communication-bound, and the numbers are the documented ones."""
    p = make_plan("recipes/mae_vith.py", Cluster(256, 8, gpu_preset("h100-80gb"), cores_per_node=96))
    assert p.recipe == "mae_vith" and p.chosen_stage == 2 and p.batch.micro_batch == 16
    assert p.chosen.fits and p.chosen.max_micro_batch > 64
    assert p.time.comm_bound
    assert p.counts.trainable == pytest.approx(656.6e6, rel=1e-3)
    assert p.time.train_flops_per_image == pytest.approx(291.4e9, rel=1e-2)


def test_model_states_are_deepspeeds_estimate_plus_what_mimscale_adds() -> None:
    """Trainable parameters only, no buckets: the breakdown sums to DeepSpeed's own estimator (ZeRO-1/2:
    2 + 18 / N bytes per parameter) except for the boundary parameters' gradients DeepSpeed keeps whole."""
    t, largest = 300_000_000, 4_000_000
    counts = ParamCounts(t, 0, 0, 0, 0, largest, largest, ((largest, True),) * (t // largest))
    zero = ZeroSettings(2, 5 * 10**8, True, False, 5 * 10**7, 10**5, 10**9, False, False)
    for world in (1, 8, 64):
        s = model_states(counts, zero, world, min(world, 8), param_bytes=2)
        ds_gpu, _ = deepspeed_estimate(counts, 2, world, min(world, 8))
        extra = 2 * min(t - t // world, largest)
        assert s.resident + s.step_transient - extra == pytest.approx(ds_gpu, abs=32)
        assert s.backward_transient == 0  # contiguous_gradients off: no buckets
    # EMA teachers: a whole fp32 shadow per rank under ZeRO-2, a partition under ZeRO-3; frozen 16-bit copies.
    with_teacher = ParamCounts(t, t, t, 0, 0, largest, largest, counts.sizes * 2)
    z2 = model_states(with_teacher, zero, 64, 8, 2)
    z3 = model_states(
        with_teacher, ZeroSettings(3, 5 * 10**7, True, True, 5 * 10**7, 10**5, 10**9, False, False), 64, 8, 2
    )
    assert z2.ema_shadow == 4 * t and z3.ema_shadow == 4 * t // 64
    assert z2.params == 2 * 2 * t
    assert z2.optimizer == model_states(counts, zero, 64, 8, 2).optimizer  # frozen: no optimizer state


def test_peak_tracker_counts_live_storages_and_their_peak() -> None:
    x = torch.randn(1000, requires_grad=True)
    tracker = A.PeakTracker([x])
    with tracker:
        y = x * 2  # 4000 bytes
        z = y.exp()  # 4000 more, y saved for nothing but alive
        del y
        w = z.sum()
    assert tracker.peak == 8000
    assert tracker.live == 4000 + 4  # z and w
    del z, w


def test_depth_extrapolation_matches_a_full_depth_run() -> None:
    """The plan measures one and two blocks and extrapolates; a four-block model measured whole agrees."""
    cfg, _ = load_config("mae_vitb", ["model.img_size=64", "model.depth=4"])
    method = A._build(cfg, None, torch.bfloat16)
    assert len(method.encoder.blocks) == 4
    from mimscale.planning.recipe import views_spec

    full = A._run(method, A._inputs(views_spec(cfg, method), 2, torch.bfloat16, 1))
    profile = A._measure_cfg(cfg, torch.bfloat16, 2, method, views_spec(cfg, method))
    assert profile.depth == 4
    direct = max(full.forward_peak, full.backward_peak) / 2
    assert profile.per_image == pytest.approx(direct, rel=0.05)
    assert profile.counted_train_flops == pytest.approx(full.flops / 2, rel=0.01)


def test_view_work_and_host_cost_follow_the_views() -> None:
    ibot, _ = load_config("ibot_vitb")
    work = view_work(ibot.data.views)
    assert work.views == 12
    assert work.pixels == pytest.approx(2 * 224**2 + 10 * 96**2)
    assert host_ms_per_image(SINGLE_CROP) == pytest.approx(1e3 / HOST.single_crop_per_core)
    # iBOT's 12 colour-augmented crops cost about 15x MAE's crop (view_rates.py measured 14.4 / 0.76 ms).
    assert 10 < host_ms_per_image(work) / host_ms_per_image(SINGLE_CROP) < 20
    beit, _ = load_config("beit_vitb")
    assert 1.2 < host_ms_per_image(view_work(beit.data.views)) / host_ms_per_image(SINGLE_CROP) < 2.5


def test_gpu_presets() -> None:
    assert gpu_preset("H100-80GB") is GPU_PRESETS["h100-80gb"]
    for name in ("h100-80gb", "h200", "a100-80gb", "l40s"):
        p = GPU_PRESETS[name]
        assert p.memory_gib > 40 and p.peak_tflops > 300 and p.link_gbs > 0
    assert GPU_PRESETS["h200"].memory_gib > GPU_PRESETS["h100-80gb"].memory_gib
    with pytest.raises(ValueError, match="h100-80gb, h100-pcie, h200"):
        gpu_preset("tpu-v5")


def test_shard_findings_say_what_to_change(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Shards written by ``mimscale make-shards`` (64 images in 4 class folders, 16 per shard, folder order,
    dataset.json) planned for 64 GPUs: too few shards for the readers, an epoch that is not the data's,
    classes in shard order."""
    for i in range(64):
        image, label = synth_image(i, size=32)
        folder = tmp_path / "images" / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:03d}.jpg", quality=90)
    pattern = str(tmp_path / "shards" / "train-%04d.tar")
    assert (
        main(
            [
                "make-shards",
                "--input",
                str(tmp_path / "images"),
                "--output",
                pattern,
                "--samples-per-shard",
                "16",
            ]
        )
        == 0
    )
    spec = str(tmp_path / "shards" / "train-{0000..0003}.tar")
    capsys.readouterr()
    assert main(["plan", "mae_vitb", "--gpus", "64", "--data", spec, "--cores-per-node", "64"]) == 0
    out = capsys.readouterr().out
    assert "4 shards for 512 readers" in out
    assert "mimscale make-shards --samples-per-shard" in out
    assert "--set data.epoch_size=64" in out
    assert "class-folder order" in out and "--shuffle-seed 0" in out
    p = make_plan("mae_vitb", Cluster(64), data=spec)
    assert p.dataset.images == 64 and p.dataset.shards == 4 and p.dataset.samples_per_shard == 16
    assert p.dataset.shuffled is False and p.dataset.num_classes == 4
    shard_bytes = sum(f.stat().st_size for f in (tmp_path / "shards").glob("*.tar"))
    assert p.dataset.mean_jpeg_kb == pytest.approx(shard_bytes / 64 / 1e3)
    # Shuffled shards, enough of them, the right epoch: nothing to change in the layout.
    shuffled = ensure_demo_shards(tmp_path / "demo", num_images=256, image_size=32, samples_per_shard=32)
    p = make_plan(
        "mae_vitb",
        Cluster(8),
        data=shuffled,
        overrides=["data.epoch_size=256", "data.num_workers=1", "global_batch=64"],
    )
    layout = [f for f in p.findings if "shard" in f.what or "epoch" in f.what]
    assert layout and all(f.level == "ok" for f in layout), layout


def test_json_output(capsys: pytest.CaptureFixture) -> None:
    import json

    assert main(["plan", "mae_vitb", "--gpus", "8", "--json", "--gpu", "a100-40gb"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["cluster"]["gpu"] == "a100-40gb" and d["batch"]["micro_batch"] == 256
    assert {m["zero_stage"] for m in d["memory"]} == {1, 2, 3}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["mae_vitb", "--gpus", "8", "--gpu", "tpu-v5"], "--gpu 'tpu-v5': unknown GPU; presets: h100-80gb"),
        (["mae_vitb", "--gpus", "0"], "--gpus 0: expected >= 1"),
        (["mae_vitb", "--gpus", "12", "--gpus-per-node", "8"], "a multiple of --gpus-per-node 8"),
        (
            ["mae_vitb", "--gpus", "3", "--gpus-per-node", "3"],
            "global_batch=4096 is not divisible by the world size 3",
        ),
        (["mae_vitz", "--gpus", "8"], "recipe 'mae_vitz': not a recipe file"),
        (["recipes/nope.py", "--gpus", "8"], "recipe 'recipes/nope.py': no such file"),
        (["mae_vitb", "--gpus", "8", "--set", "optim.bogus=1"], "unknown key 'optim.bogus'"),
        (["mae_vitb", "--gpus", "8", "--mfu", "1.5"], "--mfu 1.5: expected in (0, 1]"),
        (["mae_vitb", "--gpus", "8", "--ds_config", "zero9.json"], "--ds_config 'zero9.json': not a file"),
        (["mae_vitb", "--gpus", "8", "--images", "0"], "--images 0: expected >= 1"),
        (["mae_vitb", "--gpus", "8", "--gpu-memory", "-1"], "--gpu-memory -1.0: expected > 0 GiB"),
    ],
)
def test_bad_input_is_one_line_and_status_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def measured(*args: object) -> None:
        raise AssertionError("bad input must be refused before the activation measurement")

    monkeypatch.setattr(A, "_measure_cfg", measured)
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mimscale plan: error: ") and message in err, err
    assert len(err.splitlines()) == 1


def test_view_rates_benchmark_runs_and_fits_its_model() -> None:
    """benchmarks/view_rates.py (the source of HostRates.transform_ms_coefficients) runs end to end."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "benchmarks/view_rates.py", "--num-images", "12", "--rounds", "1"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fit (HostRates.transform_ms_coefficients)" in proc.stdout
    assert "ibot_vitb" in proc.stdout and "sampler (decode=device)" in proc.stdout
