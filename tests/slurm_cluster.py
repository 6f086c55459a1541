"""A real, throw-away, single-node SLURM cluster for the launch-script tests.

The cluster lives in one temporary directory: its own munge key and socket, a ``slurm.conf``
on loopback ports picked at start, state and spool directories, and log files. The daemons
(``munged`` as the munge user, ``slurmctld`` and ``slurmd`` as root) run in the foreground as
children of the test process, with stdin/stdout/stderr redirected and every other inherited
file descriptor closed, so they never hold the caller's pipes open. They are stopped by PID
when the session ends. Nothing outside the temporary directory is configured or started;
the Debian packages are installed with apt-get when they are missing.

Use the ``slurm_cluster`` session fixture, or run this file directly to get a cluster for
manual experiments (``python tests/slurm_cluster.py``; Ctrl-C stops it).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import pytest

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo", "munged")
NODE = "localhost"  # resolves to 127.0.0.1 everywhere, so MASTER_ADDR taken from the nodelist works
PARTITION = "debug"
FINISHED_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
    "DEADLINE",
}


def on_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(reason: str):
    """Skip locally, fail on CI: a CI run must never pass without having exercised SLURM."""
    if on_ci():
        pytest.fail(f"SLURM test cluster unavailable on CI: {reason}", pytrace=False)
    print(f"\nSkipping SLURM tests: {reason}")
    pytest.skip(f"SLURM test cluster unavailable: {reason}")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def ensure_installed() -> None:
    """Install the Debian SLURM and munge packages when they are missing (needs root and apt-get)."""
    if not missing_binaries():
        return
    if os.geteuid() != 0:
        unavailable(f"{', '.join(missing_binaries())} not installed and not running as root")
    if shutil.which("apt-get") is None:
        unavailable(f"{', '.join(missing_binaries())} not installed and no apt-get on this machine")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
    ):
        try:
            proc = subprocess.run(
                cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            unavailable(f"`{' '.join(cmd)}` failed: {exc}")
        if proc.returncode != 0:
            unavailable(f"`{' '.join(cmd)}` exited {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}")
    if missing_binaries():
        unavailable(f"still missing after apt-get install: {', '.join(missing_binaries())}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text[-lines:])


class SlurmCluster:
    """One controller and one node named ``localhost`` with ``cpus`` (virtual) CPUs."""

    def __init__(self, root: Path, cpus: int = 8, mem_mb: int | None = None):
        self.root = Path(root)
        self.cpus = cpus
        total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        self.mem_mb = mem_mb or max(1024, int(total_mb * 0.75))
        self.conf = self.root / "etc" / "slurm.conf"
        self.log_dir = self.root / "log"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------ setup
    @property
    def env(self) -> dict[str, str]:
        """Environment for client commands (and, through sbatch's --export=ALL, for the jobs)."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
        for key in list(env):  # a test run inside a SLURM job must not leak that job's identity
            if key.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and key != "SLURM_CONF":
                del env[key]
        return env

    def _write_config(self) -> None:
        for sub in ("etc", "log", "state", f"spool/slurmd-{NODE}", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        ctld_port, slurmd_port = free_port(), free_port()
        while slurmd_port == ctld_port:
            slurmd_port = free_port()
        r = self.root
        self.conf.write_text(
            f"""# generated by tests/slurm_cluster.py
ClusterName=mimscale-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job starts ~10 s after requeue instead of ~2 minutes
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/slurmd-%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={self.log_dir}/slurmctld.log
SlurmdLogFile={self.log_dir}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MinJobAge=3600
MailProg=/bin/true
KillWait=20
InactiveLimit=0
Waittime=0
SlurmdTimeout=60
SlurmdParameters=config_overrides
DefMemPerCPU={self.mem_mb // self.cpus}
NodeName={NODE} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.mem_mb} State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
        )
        (self.root / "etc" / "cgroup.conf").write_text("CgroupPlugin=autodetect\nIgnoreSystemd=yes\n")

    def _write_munge_key(self) -> Path:
        mdir = self.munge_socket.parent
        mdir.mkdir(exist_ok=True)
        mdir.chmod(0o755)  # munged insists that everyone can reach its socket
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        for path in (mdir, key):
            shutil.chown(path, "munge", "munge")
        return key

    def _spawn(self, name: str, argv: list[str], user: str | None = None) -> None:
        log = open(self.log_dir / f"{name}.stdout", "ab")  # noqa: SIM115 (kept open by the child)
        try:
            self.procs[name] = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                close_fds=True,  # no inherited pipes: a CI step must not wait on our daemons
                start_new_session=True,  # keep terminal signals (Ctrl-C) for the test runner
                env=self.env,
                user=user,
                cwd=self.root,
            )
        finally:
            log.close()

    def start(self, timeout: float = 60.0) -> None:
        self.root.chmod(0o755)  # munged, running as munge, must reach its directory
        self._write_config()
        key = self._write_munge_key()
        self._spawn(
            "munged",
            [
                "munged", "--foreground", f"--socket={self.munge_socket}", f"--key-file={key}",
                f"--pid-file={self.munge_socket.parent}/munged.pid",
                f"--seed-file={self.munge_socket.parent}/munged.seed",
                f"--log-file={self.log_dir}/munged.log",
            ],
            user="munge",
        )
        self._wait_for(lambda: self.munge_socket.exists(), timeout, "munged socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait_for(lambda: self.run(["scontrol", "ping"], check=False).returncode == 0,
                       timeout, "slurmctld to answer ping")
        self._spawn("slurmd", ["slurmd", "-D", "-N", NODE, "-f", str(self.conf)])
        self._wait_for(lambda: self.node_state() == "idle", timeout, "node to become idle")

    def _wait_for(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}\n"
                                       + self.diagnostics())
            if predicate():
                return
            time.sleep(0.25)
        raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}\n" + self.diagnostics())

    # ------------------------------------------------------------------ teardown
    def stop(self) -> None:
        if not self.procs:
            return
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            # end the jobs first so no slurmstepd or task outlives the cluster
            self.run(["scancel", "--full", "--partition", PARTITION], check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.run(
                ["squeue", "-h", "-o", "%i"], check=False
            ).stdout.strip():
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self._kill_leftovers()

    def _kill_leftovers(self) -> None:
        """Kill what survived the daemons: slurmstepd and job processes of this cluster only.

        slurmstepd daemonizes, so it is no child of ours; every process of this cluster's jobs
        (and the stepd itself) carries SLURM_CONF=<our slurm.conf> in its environment, which no
        other process on the machine has.
        """
        marker = f"SLURM_CONF={self.conf}".encode()
        me = os.getpid()
        for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGKILL):  # TERM first: ninja cleans up
            found = []
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit() or int(entry.name) == me:
                    continue
                try:
                    if marker in (entry / "environ").read_bytes().split(b"\0"):
                        found.append(int(entry.name))
                except OSError:
                    continue
            if not found:
                return
            for pid in found:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            time.sleep(3 if sig == signal.SIGTERM else 0.5)

    # ------------------------------------------------------------------ clients
    def run(self, argv: list[str], check: bool = True, timeout: float = 60,
            **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(argv, env=kw.pop("env", self.env), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL, **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(argv)}` exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
        return proc

    def sbatch(self, *args: str, cwd: Path | str, env: dict[str, str] | None = None) -> str:
        """Submit; returns the job id (for an array, the array's id)."""
        full_env = self.env
        full_env.update(env or {})
        out = self.run(["sbatch", "--parsable", *args], cwd=cwd, env=full_env).stdout.strip()
        return out.split(";")[0]

    def node_state(self) -> str:
        proc = self.run(["sinfo", "-h", "-N", "-n", NODE, "-o", "%T"], check=False)
        return proc.stdout.strip().rstrip("*~#!%$@^-")

    def jobs(self, job_id: str) -> dict[str, dict[str, str]]:
        """``scontrol show job`` records for a job or all tasks of an array, keyed by JobId."""
        proc = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        records = {}
        for line in proc.stdout.splitlines():
            rec = dict(re.findall(r"(\w+)=(\S*)", line))
            if "JobId" in rec:
                records[rec["JobId"]] = rec
        return records

    def wait(self, job_id: str, timeout: float, poll: float = 1.0) -> dict[str, dict[str, str]]:
        """Wait until every task of the job (or array) has finished; returns the final records."""
        deadline = time.monotonic() + timeout
        while True:
            recs = self.jobs(job_id)  # a not yet started array shows as one PENDING record
            if recs and all(r["JobState"] in FINISHED_STATES for r in recs.values()):
                return recs
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not finished after {timeout:.0f}s: "
                                   + ", ".join(f"{k}={v.get('JobState')}" for k, v in recs.items()))
            time.sleep(poll)

    def diagnostics(self, files: Iterable[Path] = (), lines: int = 40) -> str:
        parts = []
        for f in files:
            parts.append(f"----- {f} -----\n{tail(Path(f), lines)}")
        for name in ("slurmctld.log", "slurmd.log", "munged.log", "slurmctld.stdout", "slurmd.stdout"):
            path = self.log_dir / name
            if path.exists():
                parts.append(f"----- {path} -----\n{tail(path, lines)}")
        return "\n".join(parts)


@pytest.fixture(scope="session")
def slurm_cluster():
    ensure_installed()
    root = Path(tempfile.mkdtemp(prefix="mimscale-slurm-"))
    cluster = SlurmCluster(root)
    try:
        cluster.start()
    except BaseException:
        # installed but not startable is a real failure (locally too), never a skip
        cluster.stop()
        raise
    try:
        yield cluster
    finally:
        cluster.stop()
        if os.environ.get("MIMSCALE_KEEP_SLURM_DIR"):
            print(f"\nSLURM test cluster files kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _main() -> None:
    def leave(signum, frame):
        raise SystemExit(0)

    for s in (signal.SIGINT, signal.SIGTERM):  # SIGINT is ignored when started with `&` by a script
        signal.signal(s, leave)
    ensure_installed()
    c = SlurmCluster(Path(tempfile.mkdtemp(prefix="mimscale-slurm-")))
    try:
        c.start()
        print(f"cluster up (pid {os.getpid()}; kill it to stop): export SLURM_CONF={c.conf}", flush=True)
        while True:
            signal.pause()
    finally:
        c.stop()
        shutil.rmtree(c.root, ignore_errors=True)


if __name__ == "__main__":
    _main()
