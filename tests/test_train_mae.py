"""The spine end to end with real 2-rank DeepSpeed: shards written by `mimscale make-shards`, MAE under
ZeRO-2 and ZeRO-3, preemption by SIGUSR1, a hard kill and resume, and export into timm (strict)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_launch import REPO, BackgroundJob, run_deepspeed
from PIL import Image

pytestmark = pytest.mark.distributed
RECIPE = REPO / "recipes" / "mae_vitl.py"
MIMSCALE = [sys.executable, "-m", "mimscale.cli"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """JPEG photos-like images (smooth fields + shapes + noise) in two class folders -> shards."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(123)
    for i in range(48):
        h, w = rng.integers(40, 90, size=2)
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack(
            [
                (np.sin(xx / rng.uniform(3, 12) + c) * 0.5 + 0.5) * rng.uniform(60, 255)
                + (yy / h) * rng.uniform(0, 80)
                for c in range(3)
            ],
            -1,
        )
        img += rng.normal(0, 8, img.shape)
        cls = root / f"class_{i % 2}"
        cls.mkdir(exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(cls / f"img_{i:03d}.jpg", quality=90)
    out = tmp_path_factory.mktemp("shards")
    proc = subprocess.run(
        [
            *MIMSCALE,
            "make-shards",
            "--input",
            str(root),
            "--output",
            str(out / "train-%04d.tar"),
            "--samples-per-shard",
            "16",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    tars = sorted(out.glob("train-*.tar"))
    assert len(tars) == 3
    return str(out / "train-{0000..0002}.tar")


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def latest(run: Path) -> str | None:
    f = run / "checkpoints" / "latest"
    return f.read_text().strip() if f.is_file() else None


def export_and_check_timm(run: Path, tmp: Path) -> None:
    """Encoder-only export loads into timm strict and gives the training encoder's features."""
    import timm
    from safetensors import safe_open
    from safetensors.torch import load_file

    from mimscale import create_method

    enc_file, full_file = tmp / "enc.safetensors", tmp / "full.safetensors"
    for extra, f in (["--encoder-only"], enc_file), ([], full_file):
        p = subprocess.run(
            [*MIMSCALE, "export", "--checkpoint", str(run), "--output", str(f), *extra],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert p.returncode == 0, p.stderr
    with safe_open(str(enc_file), "pt") as fh:
        meta = fh.metadata()
    assert meta["mimscale.method"] == "mae" and meta["timm.model_name"] == "vit_large_patch16_224"
    assert int(meta["step"]) > 0 and json.loads(meta["config"])["method"] == "mae"
    kwargs = json.loads(meta["timm.kwargs"])
    assert kwargs == {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 4}
    model = timm.create_model(meta["timm.model_name"], num_classes=0, **kwargs)
    model.load_state_dict(load_file(str(enc_file)), strict=True)
    # The training encoder, rebuilt from the full export (every tensor of the method).
    cfg = json.loads(meta["config"])
    method = create_method("mae", **cfg["model"])
    method.load_state_dict(load_file(str(full_file)), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(
            model.eval().forward_features(x), method.eval().encoder.forward_features(x), atol=1e-5
        )


def test_zero2_run_on_shards_checkpoints_pictures_and_timm_export(shards, tmp_path):
    run = tmp_path / "z2"
    proc = run_deepspeed(
        RECIPE,
        [
            "--ds_config",
            "zero2.json",
            "--smoke",
            "--data",
            shards,
            "--output_dir",
            str(run),
            "--max_steps",
            "20",
        ],
    )
    out = proc.stdout + proc.stderr
    assert "world 2" in out and "ZeRO-2" in out and "img/s" in out and "ETA" in out
    recs = metrics(run)
    assert [r["step"] for r in recs] == [5, 10, 15, 20]
    assert all(np.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in recs)
    assert recs[-1]["loss"] < recs[0]["loss"]  # it learns
    assert latest(run) == "step_00000020"
    assert (run / "reconstructions.png").stat().st_size > 0 and (run / "loss.png").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 8
    export_and_check_timm(run, tmp_path)


def test_zero3_survives_sigusr1_and_a_hard_kill_and_resumes(shards, tmp_path):
    run = tmp_path / "z3"
    args = [
        "--ds_config",
        "zero3.json",
        "--smoke",
        "--data",
        shards,
        "--output_dir",
        str(run),
        "--max_steps",
        "30",
        "--set",
        "log_interval=1",
    ]
    # 1. SIGUSR1 (SLURM's warning): checkpoint at the next agreed step boundary, exit 75.
    job = BackgroundJob(RECIPE, args, tmp_path / "a.log")
    job.wait_for(lambda: "step 6/30" in job.output(), what="step 6")
    job.signal_ranks(signal.SIGUSR1)
    assert job.wait() == 75, job.output()[-3000:]
    assert "checkpoint written" in job.output()
    stopped = int(latest(run).split("_")[1])
    assert 6 <= stopped < 30 and stopped % 5 == 0
    # 2. Relaunch: resumes there; then a hard kill (no chance to save) after the step-20 checkpoint.
    job = BackgroundJob(RECIPE, args, tmp_path / "b.log")
    job.wait_for(lambda: f"resuming at step {stopped}" in job.output(), what="resume message")
    job.wait_for(lambda: latest(run) == "step_00000020" and "step 22/30" in job.output(), what="step 22")
    job.kill()
    # 3. Relaunch: resumes from 20 and finishes at 30, the loss curve continuing.
    proc = run_deepspeed(RECIPE, args)
    assert "resuming at step 20" in proc.stdout + proc.stderr
    recs = metrics(run)
    final = [r for r in recs if r["step"] > 20]
    assert [r["step"] for r in final][-10:] == list(range(21, 31))
    before = np.mean([r["loss"] for r in recs if 16 <= r["step"] <= 20])
    after = np.mean([r["loss"] for r in final[:5]])
    first = np.mean([r["loss"] for r in recs if r["step"] <= 3])
    assert after < first and abs(after - before) < 0.5 * (first - before) + 0.1  # continues, no jump back up
    assert latest(run) == "step_00000030"
    export_and_check_timm(run, tmp_path)


@pytest.mark.distributed
def test_non_finite_loss_stops_without_checkpointing_the_diverged_state(tmp_path: Path) -> None:
    """An absurd lr makes the loss non-finite after the first update: the run stops with status 3 at the
    next check, says why, and ``latest`` still points at the last checkpoint taken while it was finite."""
    run_dir = tmp_path / "run"
    proc = run_deepspeed(
        REPO / "recipes" / "mae_vitb.py",
        ["--smoke", "--ds_config", "zero2.json", "--output_dir", str(run_dir), "--max_steps", "6",
         "--set", "optim.lr=1e30", "--set", "optim.warmup_epochs=0", "--set", "ckpt_interval=1",
         "--set", "log_interval=1"],
        timeout=600,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out[-3000:]
    assert "non-finite loss by step" in out
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    good = int(latest.split("_")[1])
    assert good >= 1 and all(np.isfinite(losses[:good]))
    assert not (run_dir / "checkpoints" / f"step_{good + 1:08d}").exists()
