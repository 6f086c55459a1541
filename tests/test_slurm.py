"""The launch scripts, submitted to real SLURM clusters (see slurm_cluster.py): one node, and two nodes
on this machine (each a network namespace with its own hostname and address, its own slurmd).

Every job is submitted at once, to both clusters, by the ``mjobs`` and ``jobs`` fixtures, so they share
the machine's CPUs and each other's idle time; each test then waits for its own job. The jobs run the real
recipes in ``--smoke`` mode and the real ``mimscale make-shards``/``mimscale export``; nothing is faked.
Preemption comes as Slurm delivers it, once a run has logged a step (so mid-run): ``--signal=B:USR1@T``
is ``scancel --batch --signal=USR1`` (the batch shell only); ``scancel --full`` signals the batch
script's process group; a plain ``scancel --signal`` reaches the job steps only, as the GraceTime
SIGTERM of a preemption does; ``scontrol requeue`` is the sequence of a time limit, a cancel or a
preemption without GraceTime (SIGTERM to every process, SIGKILL KillWait seconds later).

On two nodes (``--nodes=2 --ntasks-per-node=1``, srun starting one rank per node, gloo between the
namespaces' addresses), the job ``nodes`` gets SIGUSR1 to the batch shell, then SIGTERM to the batch
script's process group (each a checkpoint, exit 75, requeue and resume), then rank 1's process on node2
is SIGKILLed: the job ends as FAILED within MIMSCALE_SRUN_WAIT (low here) instead of hanging, and the
same command submitted again resumes from the last checkpoint.

    CI=true pytest -m slurm tests/test_slurm.py   # root; about 4-7 minutes on 2 shared cores
    MIMSCALE_KEEP_SLURM_DIR=1 pytest -m slurm ... keeps the clusters' logs and configs
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from slurm_cluster import (  # noqa: F401 (slurm_cluster, slurm_multinode_cluster: the fixtures)
    LOG_EVERY,
    LONG_SMOKE,
    NO_GPU,
    ROOT,
    SMOKE,
    STEPS,
    Jobs,
    check_nothing_lost,
    check_preempted,
    kill_rank,
    metrics_steps,
    scancel,
    scontrol_requeue,
    scripts_env,
    slurm_cluster,
    slurm_multinode_cluster,
    starts,
)

pytestmark = pytest.mark.slurm

SCRIPTS = ROOT / "launch_scripts"
RECIPE = "recipes/mae_vitb.py"  # a path: no start spends seconds importing mimscale to check a name
SRUN_WAIT = 15  # MIMSCALE_SRUN_WAIT of the two-node jobs: how long a rank may outlive a killed peer


def _images(folder: Path, per_class: int = 12) -> None:
    from PIL import Image

    for c, color in enumerate(((200, 30, 30), (30, 30, 200))):
        (folder / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (16 + i, 16), (color[0], color[1] + 9 * i, color[2])).save(
                folder / f"class{c}" / f"{i:03d}.png")


@pytest.fixture(scope="module")
def mjobs(slurm_multinode_cluster, tmp_path_factory):  # noqa: F811 (the fixture imported above)
    """The two-node jobs (submitted first: they take longest)."""
    work = tmp_path_factory.mktemp("slurm-2nodes")
    (work / "logs").mkdir()
    sub = Jobs(slurm_multinode_cluster, work, env={**scripts_env(), "MIMSCALE_SRUN_WAIT": str(SRUN_WAIT)})

    def args(name: str) -> list[str]:
        return ["--nodes=2", "--ntasks-per-node=1", *NO_GPU, str(SCRIPTS / "train.sbatch"), RECIPE,
                *LONG_SMOKE, "--output_dir", str(work / name)]

    sub.submit("nodes", *args("nodes"), run_dir=work / "nodes",
               plan=[scancel("--batch", "--signal=USR1"), scancel("--full", "--signal=TERM"), kill_rank(1)])
    sub.then["nodes"] = ("nodes_relaunch", args("nodes"))  # the same command, by hand, once it failed
    sub.start()
    yield sub
    sub.stop()


@pytest.fixture(scope="module")
def jobs(slurm_cluster, tmp_path_factory, request):  # noqa: F811 (the fixture imported above)
    """The one-node jobs; the two-node ones are started first, to run alongside (if their cluster cannot
    start, the two-node tests report why, and these run on)."""
    try:
        request.getfixturevalue("mjobs")
    except (Exception, pytest.skip.Exception, pytest.fail.Exception):
        pass  # pytest keeps the error and raises it again in the two-node tests
    work = tmp_path_factory.mktemp("slurm-jobs")
    (work / "logs").mkdir()
    sub = Jobs(slurm_cluster, work, env={**scripts_env(), "MIMSCALE_SWEEP_DIR": str(work / "sweeps")})
    array_log = f"--output={work}/logs/%x-%A_%a.out"

    def train(name: str, *sbatch_args: str, plan=(), recipe: str = RECIPE, env=None) -> None:
        sub.submit(name, *sbatch_args, *NO_GPU, str(SCRIPTS / "train.sbatch"), recipe, *LONG_SMOKE,
                   "--output_dir", str(work / name), env=env, plan=list(plan), run_dir=work / name)

    # 1. a two-rank job (2 DeepSpeed ranks) preempted mid-run as --signal=B:USR1@T does it, then by SIGTERM
    #    to the job steps only (a preemption's GraceTime signal), which reaches the ranks through the relay
    train("train2", "--nodes=1", "--ntasks-per-node=2",
          plan=[scancel("--batch", "--signal=USR1"), scancel("--signal=TERM")])
    # 2. a preempted job that may not requeue (its recipe given by name)
    train("limit", "--ntasks-per-node=1", plan=[scancel("--batch", "--signal=USR1")], recipe="mae_vitb",
          env={"MIMSCALE_MAX_REQUEUES": "0"})
    # 3. SIGTERM to the batch script's process group, then Slurm's own ending of the job (scontrol requeue:
    #    SIGTERM to every process, SIGKILL after KillWait)
    train("term", "--nodes=1", "--ntasks-per-node=2",
          plan=[scancel("--full", "--signal=TERM"), scontrol_requeue()])
    # 4. one rank fails at once, the other hangs (as in a collective with a dead peer): the job must end
    #    MIMSCALE_SRUN_WAIT seconds later with the failed rank's status, not requeued
    crash = work / "crash.py"
    crash.write_text("import os, signal, sys, time\n"
                     "signal.signal(signal.SIGUSR1, signal.SIG_IGN)\n"
                     "print('rank', os.environ['RANK'], 'of', os.environ['WORLD_SIZE'], flush=True)\n"
                     "sys.exit(3) if os.environ['RANK'] == '1' else time.sleep(600)\n")
    train("crash", "--nodes=1", "--ntasks-per-node=2", recipe=str(crash), env={"MIMSCALE_SRUN_WAIT": "5"})
    # 5. an array sweep of two smoke recipes
    sweep = work / "smoke_sweep.txt"
    # comments and blank lines are skipped; quotes are shell quotes
    sweep.write_text("# two smoke runs\nmae_vitb --set optim.blr=1e-4\n\n"
                     "  mae_vitl --set 'model.mask_ratio=0.6'\n")
    sub.submit("sweep", "--array=0-1", "--ntasks-per-node=1", *NO_GPU, array_log,
               str(SCRIPTS / "sweep_array.sbatch"), str(sweep), *SMOKE, "--max_steps", "10")
    # 6. a shard-writing array
    _images(work / "images")
    sub.submit("shards", "--array=0-1", "--cpus-per-task=1", "--time=10", array_log,
               str(SCRIPTS / "make_shards_array.sbatch"), "--input", str(work / "images"),
               "--output", str(work / "shards" / "train-%06d.tar"), "--samples-per-shard", "5")
    sub.start()
    yield sub
    sub.stop()


def test_sweep_array(jobs):
    recs = jobs.wait("sweep")
    assert len(recs) == 2, jobs.explain("sweep")
    for rec in recs.values():
        assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", jobs.explain("sweep")
    out = jobs.work / "sweeps" / "smoke_sweep"
    assert sorted(p.name for p in out.iterdir()) == ["0-mae_vitb", "1-mae_vitl"], jobs.explain("sweep")
    for d in out.iterdir():
        assert (d / "checkpoints" / "latest").read_text().strip() == "step_00000010", jobs.explain("sweep")
        assert metrics_steps(d)[-1] == 10
    config = {d.name: json.loads((d / "config.json").read_text()) for d in out.iterdir()}
    assert config["0-mae_vitb"]["optim"]["blr"] == 1e-4
    assert config["1-mae_vitl"]["model"]["mask_ratio"] == 0.6


def test_export_array(jobs):
    """Export every run of the sweep with the checkpoint-list array script."""
    jobs.wait("sweep")
    runs = sorted((jobs.work / "sweeps" / "smoke_sweep").iterdir())
    ckpts = jobs.work / "ckpts.txt"
    ckpts.write_text("".join(f"{r}\n" for r in runs))
    jobs.submit("export", "--array=0-1", "--cpus-per-task=1", "--time=10",
                f"--output={jobs.work}/logs/%x-%A_%a.out", str(SCRIPTS / "export_array.sbatch"), str(ckpts))
    recs = jobs.wait("export")
    assert all(r["JobState"] == "COMPLETED" for r in recs.values()), jobs.explain("export")
    from safetensors import safe_open

    for r in runs:
        with safe_open(str(r / "export" / "encoder.safetensors"), "pt") as f:
            assert len(list(f.keys())) > 0
            assert f.metadata()


def test_train_sbatch_runs_two_ranks(jobs):
    """On one node the batch script starts one process per task; they find each other through
    MASTER_ADDR (the node's NodeAddr) and MASTER_PORT."""
    (rec,) = jobs.wait("train2").values()
    log = jobs.log("train2")
    why = jobs.explain("train2")
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", why
    first_start = starts(log)[0]
    assert "nodes=1 tasks=2 (localhost)" in first_start, why
    assert f"master=127.0.0.1:{15000 + int(rec['JobId']) % 15000} launcher=local" in first_start, why
    assert "world 2, micro batch 8 x accumulation 1 x 2 ranks = 16" in first_start, why
    assert jobs.acted["train2"][0]["ranks"] == {0: "localhost", 1: "localhost"}, why
    run = jobs.run_dirs["train2"]
    assert json.loads((run / "ds_config.json").read_text())["train_batch_size"] == 16
    final = run / "checkpoints" / f"step_{STEPS:08d}"
    assert len(list(final.rglob("*optim_states*"))) == 2, sorted(p.name for p in final.rglob("*"))


def test_make_shards_array(jobs, tmp_path):
    recs = jobs.wait("shards")
    assert len(recs) == 2 and all(r["JobState"] == "COMPLETED" for r in recs.values()), jobs.explain("shards")
    logs = "".join(jobs.output(r) for r in recs.values())
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
    """--signal=B:USR1@T: the batch shell passes SIGUSR1 on; checkpoint, exit 75, requeue, resume."""
    jobs.wait("train2")
    step = check_preempted(jobs, "train2", 1, "got SIGUSR1: sending SIGUSR1 to the 2 ranks")
    tag_dir = jobs.run_dirs["train2"] / "checkpoints" / f"step_{step:08d}"
    if tag_dir.is_dir():  # both ranks wrote their part (unless pruned since)
        assert len(list(tag_dir.rglob("*optim_states*"))) == 2, sorted(p.name for p in tag_dir.rglob("*"))
    check_nothing_lost(jobs, "train2", restarts=2)


def test_sigterm_to_the_batch_process_group(jobs):
    """scancel --full --signal=TERM: the ranks get SIGTERM directly (they are the batch step's processes)
    and the batch shell passes it on as SIGUSR1; under srun, srun would have SIGKILLed them."""
    jobs.wait("term")
    check_preempted(jobs, "term", 1, "got SIGTERM: sending SIGUSR1 to the 2 ranks")


def test_sigterm_to_the_job_steps_reaches_the_ranks_through_the_relay(jobs):
    """scancel --signal=TERM (job steps only, like a preemption's GraceTime SIGTERM): the relay step passes
    it on."""
    jobs.wait("train2")
    check_preempted(jobs, "train2", 2, "signal relay: SIGTERM sent to the job steps, passing it to the batch")


def test_slurm_ending_the_job_leaves_killwait_to_checkpoint(jobs):
    """scontrol requeue (like a time limit without warning or a preemption without GraceTime): SIGTERM to
    every process, SIGKILL after KillWait. The ranks checkpoint within KillWait; Slurm's requeue resumes."""
    jobs.wait("term")
    check_preempted(jobs, "term", 2, "got SIGTERM: sending SIGUSR1 to the 2 ranks",
                    requeued="Slurm itself is requeueing the job")
    check_nothing_lost(jobs, "term", restarts=2)


def test_failed_rank_ends_the_job_after_srun_wait(jobs):
    """The batch script's own launcher (one node) behaves as srun --wait: the surviving rank is killed
    MIMSCALE_SRUN_WAIT seconds after the first one ended, and the job fails with that rank's status."""
    (rec,) = jobs.wait("crash").values()
    log = jobs.log("crash")
    why = jobs.explain("crash")
    assert "rank 0 of 2" in log and "rank 1 of 2" in log, why
    assert rec["JobState"] == "FAILED" and rec["ExitCode"] == "3:0" and rec["Restarts"] == "0", why
    assert "rank 1 (pid" in log and "ended with status 3" in log, why
    assert "ranks 0 still running 5 s after the first rank ended (MIMSCALE_SRUN_WAIT=5): killing" in log, why
    assert "training FAILED with status 3 (not requeued)" in log, why


def test_requeue_limit_stops_and_says_why(jobs):
    (rec,) = jobs.wait("limit").values()
    log = jobs.log("limit")
    why = jobs.explain("limit")
    assert jobs.acted["limit"] and "error" not in jobs.acted["limit"][0], "never signalled\n" + why
    assert rec["Restarts"] == "0" and rec["JobState"] == "FAILED" and rec["ExitCode"] == "75:0", why
    assert "NOT requeueing: job already requeued 0 times (MIMSCALE_MAX_REQUEUES=0)" in log, why
    tag = (jobs.run_dirs["limit"] / "checkpoints" / "latest").read_text().strip()
    assert f"Checkpoint: {tag}" in log and tag != f"step_{STEPS:08d}", why


# ------------------------------------------------------------------------------------------ two nodes
def test_one_rank_per_node_over_the_namespaces_addresses(mjobs):
    (rec,) = mjobs.wait("nodes").values()
    why = mjobs.explain("nodes")
    first = starts(mjobs.log("nodes"))[0]
    master = mjobs.cluster.nodes[0].addr  # node1's NodeAddr, not its name
    assert "nodes=2 tasks=2 (node[1-2])" in first, why
    assert f"master={master}:{15000 + int(rec['JobId']) % 15000} launcher=srun" in first, why
    assert "world 2, micro batch 8 x accumulation 1 x 2 ranks = 16" in first, why
    # each rank ran in its own node's network namespace (the ranks and their nodes seen at each action, where
    # /proc told them: the first lookup of a run has been seen to find no namespace for a rank)
    seen = [a["ranks"] for a in mjobs.acted["nodes"] if a.get("ranks") and None not in a["ranks"].values()]
    assert seen and all(r == {0: "node1", 1: "node2"} for r in seen), why


def test_usr1_preemption_across_nodes(mjobs):
    """--signal=B:USR1@T: the batch shell passes SIGUSR1 to srun, which delivers it on both nodes."""
    mjobs.wait("nodes")
    check_preempted(mjobs, "nodes", 1, "got SIGUSR1: sending SIGUSR1 to srun")


def test_sigterm_to_the_batch_process_group_across_nodes(mjobs):
    """scancel --full --signal=TERM: srun runs in its own process group, so it never sees the SIGTERM (it
    would SIGKILL the tasks); the batch shell passes it on as SIGUSR1."""
    mjobs.wait("nodes")
    check_preempted(mjobs, "nodes", 2, "got SIGTERM: sending SIGUSR1 to srun")
    assert "forcing job termination" not in mjobs.log("nodes"), mjobs.explain("nodes")


def test_killed_rank_ends_the_job_and_the_relaunch_resumes(mjobs):
    """Rank 1's process on node2 SIGKILLed: the job ends as FAILED, not requeued, within MIMSCALE_SRUN_WAIT
    instead of hanging; the same command submitted again resumes from the last checkpoint and finishes."""
    (rec,) = mjobs.wait("nodes").values()
    why = mjobs.explain("nodes")
    ckpt = check_preempted(mjobs, "nodes", 2, "got SIGTERM: sending SIGUSR1 to srun")
    kill = mjobs.acted["nodes"][2]
    assert kill.get("killed", {}).get("node") == "node2", why
    # within MIMSCALE_SRUN_WAIT of the kill (plus Slurm's own latency on a loaded machine)
    assert rec["JobState"] == "FAILED" and rec["Restarts"] == "2", why
    assert mjobs.finished_at["nodes"] - kill["t"] < SRUN_WAIT + 45, why
    assert "training FAILED with status" in starts(mjobs.log("nodes"))[2], why

    (again,) = mjobs.wait("nodes_relaunch").values()
    log = mjobs.log("nodes_relaunch")
    why = mjobs.explain("nodes_relaunch")
    assert again["JobState"] == "COMPLETED" and again["ExitCode"] == "0:0", why
    assert f"start 1: resuming from step_{ckpt:08d}" in log and f"resuming at step {ckpt}" in log, why
    assert "took over a stale lock" in log, why  # the killed run's lock (its rank 0 is gone)
    # metrics.jsonl: every step once up to the kill (the preemptions lost nothing), then the relaunch's from
    # the checkpoint on, to the end
    steps = metrics_steps(Path(mjobs.run_dirs["nodes"]))
    cut = next((i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]), None)
    assert cut is not None, f"no steps replayed after the kill: {steps}"
    assert steps[:cut] == list(range(LOG_EVERY, steps[cut - 1] + 1, LOG_EVERY)), steps
    assert steps[cut:] == list(range(ckpt + LOG_EVERY, STEPS + 1, LOG_EVERY)), steps
    assert kill["step"] <= steps[cut - 1], steps
    final = mjobs.run_dirs["nodes"] / "checkpoints" / f"step_{STEPS:08d}"
    assert len(list(final.rglob("*optim_states*"))) == 2, sorted(p.name for p in final.rglob("*"))
