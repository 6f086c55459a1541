"""Faults a long run must survive without losing work (issue 12), injected into real 2-rank DeepSpeed jobs:
broken ``latest``, corrupt and truncated checkpoint files, overrides on resume and with ``--smoke``, weights
that overflow in the step before a checkpoint, a second run on the same directory, the launcher dying,
SIGTERM to the whole process group, and a full disk."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, BackgroundJob, run_deepspeed

from mimscale.export import consolidate
from mimscale.runs import list_tags, read_manifest

pytestmark = pytest.mark.distributed
RECIPE = REPO / "recipes" / "mae_vitb.py"


def smoke(run: Path, *extra: str) -> list[str]:
    return [
        "--smoke",
        "--ds_config",
        "zero2.json",
        "--output_dir",
        str(run),
        "--set",
        "ckpt_interval=5",
        *extra,
    ]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def tags(run: Path) -> list[str]:
    return list_tags(run / "checkpoints")


def flip_a_byte(path: Path, at: int = 4000) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


def test_resume_skips_broken_latest_corrupt_and_truncated_tags_and_lets_overrides_win(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_deepspeed(RECIPE, smoke(run, "--max_steps", "10"))
    assert tags(run) == ["step_00000010", "step_00000005"]
    ckpts = run / "checkpoints"

    # A bit flip in one optimizer shard of the newest tag, and an empty `latest`: resume from step 5, name
    # the file, keep step 10 (set aside, not deleted), and apply the lr given on the command line.
    flip_a_byte(ckpts / "step_00000010" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    (ckpts / "latest").write_text("")
    proc = run_deepspeed(RECIPE, smoke(run, "--max_steps", "12", "--set", "optim.lr=1e-4"))
    out = proc.stdout + proc.stderr
    assert "skipped 1 newer checkpoint(s), resuming from step_00000005" in out, out[-3000:]
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt does not match its sha256" in out
    assert "optim.lr: None -> 0.0001" in out and "resuming at step 5" in out
    assert (ckpts / "step_00000010.corrupt").is_dir()
    lrs = [(m["step"], m["lr"]) for m in metrics(run)]
    first_10 = next(lr for step, lr in lrs if step == 10)
    assert first_10 > 1e-3 and 0 < lrs[-1][1] <= 1e-4  # the first run's peak was 2.4e-3; the override wins
    assert (ckpts / "latest").read_text() == "step_00000012"

    # A truncated file in the newest tag: resume from the one before it.
    states = ckpts / "step_00000012" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])
    done = run_deepspeed(RECIPE, smoke(run, "--max_steps", "14"))
    out = done.stdout + done.stderr
    assert "mp_rank_00_model_states.pt has" in out and "resuming from step_00000010" in out, out[-3000:]
    assert [m["step"] for m in metrics(run)][-1] == 14


def test_weights_that_overflow_in_a_step_are_never_checkpointed(tmp_path: Path) -> None:
    """lr 3.3e38 (inside the float32 range) overflows the LayerNorm weights in the first update while the
    loss read before that update is finite: the state check before the save stops the run (status 3)."""
    run = tmp_path / "run"
    proc = run_deepspeed(
        RECIPE,
        smoke(
            run,
            "--max_steps",
            "4",
            "--set",
            "optim.lr=3.3e38",
            "--set",
            "optim.warmup_epochs=0",
            "--set",
            "ckpt_interval=1",
        ),
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out[-3000:]
    assert "are not finite" in out and "not checkpointing them" in out
    for tag in tags(run):  # whatever was written before is finite
        sd = consolidate(run / "checkpoints", tag)
        assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point()), tag


def _session(sid: int, pattern: str = ".") -> list[str]:
    cmd = ["pgrep", "-s", str(sid), "-f", pattern]
    return subprocess.run(cmd, capture_output=True, text=True).stdout.split()


def _wait_until_gone(sid: int, timeout: float, pattern: str = ".") -> bool:
    deadline = time.time() + timeout
    while _session(sid, pattern) and time.time() < deadline:
        time.sleep(0.5)
    return not _session(sid, pattern)


def _wait_for_step(job: BackgroundJob, run: Path, step: int) -> None:
    job.wait_for(
        lambda: (run / "metrics.jsonl").is_file() and any(m["step"] >= step for m in metrics(run)),
        timeout=300,
        what=f"step {step}",
    )


def test_a_second_run_is_refused_and_sigterm_to_the_process_group_checkpoints(tmp_path: Path) -> None:
    run = tmp_path / "run"
    job = BackgroundJob(
        RECIPE,
        smoke(run, "--set", "optim.epochs=10000", "--set", "ckpt_interval=100000", "--max_steps", "100000"),
        tmp_path / "job.log",
    )
    try:
        _wait_for_step(job, run, 10)
        second = run_deepspeed(RECIPE, smoke(run, "--max_steps", "400"), check=False, timeout=300)
        err = second.stdout + second.stderr
        assert second.returncode == 2 and "is in use by another run" in err, err[-2000:]
        os.killpg(job.proc.pid, signal.SIGTERM)  # launcher, ranks and data workers alike
        job.wait(timeout=120)
        _wait_until_gone(job.proc.pid, timeout=120)  # the `deepspeed` runner exits before its ranks
    finally:
        if job.proc.poll() is None:
            job.kill()
    out = job.output()
    assert "signal 15: checkpointing step" in out and "exit 75" in out, out[-3000:]
    assert "killed by signal" not in out
    step = int(re.search(r"signal 15: checkpointing step (\d+)", out).group(1))
    assert tags(run)[0] == f"step_{step:08d}" and read_manifest(run / "checkpoints" / tags(run)[0])
    assert not (run / ".mimscale.lock").exists()


def test_ranks_stop_when_their_launcher_dies(tmp_path: Path) -> None:
    run = tmp_path / "run"
    job = BackgroundJob(
        RECIPE,
        smoke(run, "--set", "optim.epochs=10000", "--set", "ckpt_interval=3", "--max_steps", "100000"),
        tmp_path / "job.log",
    )
    try:
        _wait_for_step(job, run, 6)
        launcher = _session(job.proc.pid, "deepspeed.launcher.launch")
        assert launcher, job.output()[-2000:]
        os.kill(int(launcher[0]), signal.SIGKILL)
        assert _wait_until_gone(job.proc.pid, 30, "local_rank="), (
            "ranks still run 30 s after their launcher died"
        )
        newest = tags(run)[0] if tags(run) else None
        time.sleep(3)
        assert (tags(run)[0] if tags(run) else None) == newest  # nothing written after
    finally:
        job.kill()
    assert "its launcher" in job.output() and "is gone" in job.output()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="mounting a tmpfs needs root")
def test_a_full_disk_skips_the_save_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], check=True)
    try:
        run = mnt / "run"
        # One smoke checkpoint is ~1.2 MB: the first fits, the second would not (with the margin).
        proc = run_deepspeed(
            RECIPE, smoke(run, "--max_steps", "12", "--set", "log_interval=100"), check=False
        )
        out = proc.stdout + proc.stderr
        assert "not enough free space for checkpoint" in out, out[-3000:]
        assert proc.returncode == 1 and "its checkpoint could not be written" in out
        assert tags(run) and read_manifest(run / "checkpoints" / tags(run)[0]) is not None
        assert "basic_ios" not in out and "unexpected pos" not in out
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
