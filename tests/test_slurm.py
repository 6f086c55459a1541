"""The launch scripts, submitted to a real single-node SLURM cluster (see slurm_cluster.py).

Every job is submitted at once by the ``jobs`` fixture so they share the cluster's (virtual)
CPUs; each test then waits for its own job. The jobs run the real recipes in ``--smoke`` mode and
the real ``mimscale make-shards``/``mimscale export``; nothing is faked. Preemption is simulated
the way Slurm's ``--signal=B:USR1@T`` delivers it: USR1 to the batch shell only
(``scancel --batch --signal=USR1``), sent as soon as the run has logged its first step.

    pytest -m slurm tests/test_slurm.py          # about 3-5 minutes on 2 idle cores
    MIMSCALE_KEEP_SLURM_DIR=1 pytest -m slurm ... keeps the cluster's logs and configs
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401 (the fixture)

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "launch_scripts"
# The test node has no GPUs: override the scripts' GPU defaults, one CPU per task.
NO_GPU = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=20"]
SMOKE = ["--smoke", "--ds_config", "zero2.json"]
# Long enough (300 tiny steps, >= 10 s) that a signal sent at the first logged step lands mid-run.
LONG_SMOKE = [*SMOKE, "--set", "optim.epochs=100", "--set", "ckpt_interval=1000", "--max_steps", "300"]
JOB_TIMEOUT = 600  # per job; generous because the machine may be shared


@dataclass
class Submitted:
    cluster: SlurmCluster
    work: Path
    ids: dict[str, str] = field(default_factory=dict)
    run_dirs: dict[str, Path] = field(default_factory=dict)
    signalled: dict[str, dict] = field(default_factory=dict)  # name -> {"step": first step seen, "t": time}
    results: dict[str, dict] = field(default_factory=dict)
    watcher: threading.Thread | None = None

    def wait(self, name: str, timeout: float = JOB_TIMEOUT) -> dict[str, dict[str, str]]:
        if name not in self.results:
            try:
                self.results[name] = self.cluster.wait(self.ids[name], timeout)
            except TimeoutError as exc:
                pytest.fail(f"{exc}\n{self.explain(name)}", pytrace=False)
        return self.results[name]

    def log(self, rec: dict[str, str]) -> str:
        path = Path(rec.get("StdOut", ""))
        return path.read_text(errors="replace") if path.is_file() else f"<no job output at {path}>"

    def explain(self, name: str) -> str:
        recs = self.cluster.jobs(self.ids[name])
        files = [Path(r["StdOut"]) for r in recs.values() if r.get("StdOut")]
        states = ", ".join(f"{k}: {r.get('JobState')} exit {r.get('ExitCode')} restarts {r.get('Restarts')}"
                           for k, r in recs.items())
        return f"job {name} ({states})\n" + self.cluster.diagnostics(files, lines=80)


def _images(folder: Path, per_class: int = 12) -> None:
    from PIL import Image

    for c, color in enumerate(((200, 30, 30), (30, 30, 200))):
        (folder / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (16 + i, 16), (color[0], color[1] + 9 * i, color[2])).save(
                folder / f"class{c}" / f"{i:03d}.png")


def _metrics_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError):
            pass  # a line being written right now
    return steps


def _signal_when_running(sub: Submitted, names: list[str], timeout: float = JOB_TIMEOUT) -> None:
    """Send USR1 to each job's batch shell once its run has logged a step (as --signal=B:USR1 would)."""
    deadline = time.monotonic() + timeout
    todo = list(names)
    while todo and time.monotonic() < deadline:
        for name in list(todo):
            steps = _metrics_steps(sub.run_dirs[name])
            if steps:
                sub.cluster.run(["scancel", "--batch", "--signal=USR1", sub.ids[name]], check=False)
                sub.signalled[name] = {"step": max(steps), "t": time.monotonic()}
                todo.remove(name)
        time.sleep(0.2)


@pytest.fixture(scope="module")
def jobs(slurm_cluster, tmp_path_factory):  # noqa: F811 (the fixture imported above)
    work = tmp_path_factory.mktemp("slurm-jobs")
    (work / "logs").mkdir()
    sub = Submitted(slurm_cluster, work)
    env = {"MIMSCALE_ROOT": str(ROOT), "MIMSCALE_SWEEP_DIR": str(work / "sweeps")}
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        env["MIMSCALE_PYTHON"] = sys.executable  # not the project's .venv: use the tests' interpreter
    log = f"--output={work}/logs/%x-%j.out"
    array_log = f"--output={work}/logs/%x-%A_%a.out"

    def submit(name: str, *args: str, extra_env: dict[str, str] | None = None) -> None:
        sub.ids[name] = slurm_cluster.sbatch(f"--job-name={name}", *args, cwd=ROOT,
                                             env={**env, **(extra_env or {})})

    # 1. a two-task srun job (2 DeepSpeed ranks) through the multi-node script, preempted mid-run
    sub.run_dirs["train2"] = work / "train2"
    submit("train2", "--nodes=1", "--ntasks-per-node=2", *NO_GPU, log, str(SCRIPTS / "train.sbatch"),
           "recipes/mae_vitb.py", *LONG_SMOKE, "--output_dir", str(sub.run_dirs["train2"]))
    # 2. a preempted job that may not requeue
    sub.run_dirs["limit"] = work / "limit"
    submit("limit", "--ntasks-per-node=1", *NO_GPU, log, str(SCRIPTS / "train.sbatch"), "mae_vitb",
           *LONG_SMOKE, "--output_dir", str(sub.run_dirs["limit"]), extra_env={"MIMSCALE_MAX_REQUEUES": "0"})
    # 3. an array sweep of two smoke recipes
    sweep = work / "smoke_sweep.txt"
    # comments and blank lines are skipped; quotes are shell quotes
    sweep.write_text("# two smoke runs\nmae_vitb --set optim.blr=1e-4\n\n"
                     "  mae_vitl --set 'model.mask_ratio=0.6'\n")
    submit("sweep", "--array=0-1", "--ntasks-per-node=1", *NO_GPU, array_log,
           str(SCRIPTS / "sweep_array.sbatch"), str(sweep), *SMOKE, "--max_steps", "10")
    # 4. a shard-writing array
    _images(work / "images")
    submit("shards", "--array=0-1", "--cpus-per-task=1", "--time=10", array_log,
           str(SCRIPTS / "make_shards_array.sbatch"), "--input", str(work / "images"),
           "--output", str(work / "shards" / "train-%06d.tar"), "--samples-per-shard", "5")

    sub.watcher = threading.Thread(target=_signal_when_running, args=(sub, ["train2", "limit"]), daemon=True)
    sub.watcher.start()
    yield sub
    sub.watcher.join(timeout=1)


def test_sweep_array(jobs):
    recs = jobs.wait("sweep")
    assert len(recs) == 2, jobs.explain("sweep")
    for rec in recs.values():
        assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", jobs.explain("sweep")
    out = jobs.work / "sweeps" / "smoke_sweep"
    assert sorted(p.name for p in out.iterdir()) == ["0-mae_vitb", "1-mae_vitl"], jobs.explain("sweep")
    for d in out.iterdir():
        assert (d / "checkpoints" / "latest").read_text().strip() == "step_00000010", jobs.explain("sweep")
        assert _metrics_steps(d)[-1] == 10
    config = {d.name: json.loads((d / "config.json").read_text()) for d in out.iterdir()}
    assert config["0-mae_vitb"]["optim"]["blr"] == 1e-4
    assert config["1-mae_vitl"]["model"]["mask_ratio"] == 0.6


def test_export_array(jobs):
    """Export every run of the sweep with the checkpoint-list array script."""
    jobs.wait("sweep")
    runs = sorted((jobs.work / "sweeps" / "smoke_sweep").iterdir())
    ckpts = jobs.work / "ckpts.txt"
    ckpts.write_text("".join(f"{r}\n" for r in runs))
    jobs.ids["export"] = jobs.cluster.sbatch(
        "--job-name=export", "--array=0-1", "--cpus-per-task=1", "--time=10",
        f"--output={jobs.work}/logs/%x-%A_%a.out", str(SCRIPTS / "export_array.sbatch"), str(ckpts),
        cwd=ROOT, env={"MIMSCALE_ROOT": str(ROOT)})
    recs = jobs.wait("export")
    assert all(r["JobState"] == "COMPLETED" for r in recs.values()), jobs.explain("export")
    from safetensors import safe_open

    for r in runs:
        with safe_open(str(r / "export" / "encoder.safetensors"), "pt") as f:
            assert len(list(f.keys())) > 0
            assert f.metadata()


def test_train_sbatch_runs_two_ranks(jobs):
    """srun starts one process per task; they find each other through MASTER_ADDR/MASTER_PORT."""
    (rec,) = jobs.wait("train2").values()
    log = jobs.log(rec)
    why = jobs.explain("train2")
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", why
    first_start = log.split("got SIGUSR1")[0]
    assert "nodes=1 tasks=2 (localhost)" in first_start, why
    assert f"master=localhost:{15000 + int(rec['JobId']) % 15000}" in first_start, why
    assert "world 2, micro batch 8 x accumulation 1 x 2 ranks = 16" in first_start, why
    run = jobs.run_dirs["train2"]
    assert json.loads((run / "ds_config.json").read_text())["train_batch_size"] == 16
    final = run / "checkpoints" / "step_00000300"
    assert len(list(final.rglob("*optim_states*"))) == 2, sorted(p.name for p in final.rglob("*"))


def test_make_shards_array(jobs, tmp_path):
    recs = jobs.wait("shards")
    assert len(recs) == 2 and all(r["JobState"] == "COMPLETED" for r in recs.values()), jobs.explain("shards")
    logs = "".join(jobs.log(r) for r in recs.values())
    assert "task 0/2" in logs and "task 1/2" in logs, jobs.explain("shards")
    # the union of the two tasks' shards is byte-identical to a single-process run
    single = tmp_path / "single"
    subprocess.run([sys.executable, "-m", "mimscale.cli", "make-shards", "--input", str(jobs.work / "images"),
                    "--output", str(single / "train-%06d.tar"), "--samples-per-shard", "5",
                    "--shard-index", "0", "--num-shards", "1"], check=True, cwd=ROOT,
                   env={k: v for k, v in os.environ.items() if not k.startswith("SLURM_")})
    parallel = {p.name: p.read_bytes() for p in (jobs.work / "shards").glob("train-*.tar")}
    expected = {p.name: p.read_bytes() for p in single.glob("train-*.tar")}
    assert sorted(parallel) == [f"train-{i:06d}.tar" for i in range(5)]
    assert parallel == expected


def test_preemption_checkpoints_requeues_and_resumes(jobs):
    (rec,) = jobs.wait("train2").values()
    log = jobs.log(rec)
    why = jobs.explain("train2")
    run = jobs.run_dirs["train2"]
    assert "train2" in jobs.signalled, "the run never logged a step, so it was never signalled\n" + why
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", why
    assert rec["Restarts"] == "1", why
    assert "got SIGUSR1" in log and "training stopped with status 75 after SIGUSR1" in log, why
    assert "requeueing job" in log, why
    # the first start wrote a mid-run checkpoint, the second resumed from it and finished
    resumed = [ln for ln in log.splitlines() if "start 2: resuming from step_" in ln]
    assert resumed, why
    tag = resumed[0].split("resuming from ")[1].split()[0]
    ckpt_step = int(tag.split("_")[1])
    assert jobs.signalled["train2"]["step"] <= ckpt_step < 300, why
    assert f"resuming at step {ckpt_step}" in log, why
    tag_dir = run / "checkpoints" / tag
    if tag_dir.is_dir():  # both ranks wrote their part (unless pruned since)
        assert len(list(tag_dir.rglob("*optim_states*"))) == 2, sorted(p.name for p in tag_dir.rglob("*"))
    steps = _metrics_steps(run)
    assert steps == sorted(set(steps)) and steps[-1] == 300, f"steps replayed or missing: {steps}\n{why}"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000300"


def test_requeue_limit_stops_and_says_why(jobs):
    (rec,) = jobs.wait("limit").values()
    log = jobs.log(rec)
    why = jobs.explain("limit")
    assert "limit" in jobs.signalled, "the run never logged a step, so it was never signalled\n" + why
    assert rec["Restarts"] == "0" and rec["JobState"] == "FAILED" and rec["ExitCode"] == "75:0", why
    assert "NOT requeueing: job already requeued 0 times (MIMSCALE_MAX_REQUEUES=0)" in log, why
    tag = (jobs.run_dirs["limit"] / "checkpoints" / "latest").read_text().strip()
    assert f"Checkpoint: {tag}" in log and tag != "step_00000300", why
