"""Real, throw-away SLURM clusters for the launch-script tests: one node, or several nodes on this machine.

A cluster lives in one temporary directory: its own munge key and socket, a ``slurm.conf`` on
ports picked at start, state and spool directories, and log files. The daemons (``munged`` as
the munge user, ``slurmctld`` and one ``slurmd`` per node as root) run in the foreground as
children of the test process, with stdin/stdout/stderr redirected and every other inherited
file descriptor closed, so they never hold the caller's pipes open. They are stopped by PID
when the session ends. The Debian packages are installed with apt-get when they are missing.

* ``slurm_cluster``: one node, ``localhost``, on loopback. Nothing outside the temporary
  directory is configured or started.
* ``slurm_multinode_cluster``: two nodes, ``node1`` and ``node2``, each a host of its own: a
  network namespace with its own address (:class:`NamespaceNetwork`), its own hostname (a UTS
  namespace) and an ``/etc/hosts`` naming the cluster (bind-mounted in a private mount
  namespace), so a job's processes on ``node1`` see what they would see on a real node. munged
  and slurmctld stay in the root namespace, reached through the links' addresses. The
  namespaces and links are removed at the end (and stale ones of dead test runs at the start).

Use the session fixtures, or run this file directly to get a cluster for manual experiments
(``python tests/slurm_cluster.py [--nodes 2]``; Ctrl-C stops it).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge", "iproute2")
BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo", "munged")
NETNS_BINARIES = ("ip", "nsenter", "unshare", "mount")
ROOT = Path(__file__).resolve().parents[1]  # the mimscale checkout: jobs are submitted from it
NODE = "localhost"  # the single-node cluster's node: resolves to 127.0.0.1 everywhere
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


def missing_binaries(names: Iterable[str] = BINARIES) -> list[str]:
    return [b for b in names if shutil.which(b) is None and not Path("/usr/sbin", b).exists()
            and not Path("/sbin", b).exists()]


def ensure_installed(names: Iterable[str] = BINARIES) -> None:
    """Install the Debian SLURM, munge and iproute2 packages when a binary is missing (root, apt-get)."""
    names = tuple(names)
    missing = missing_binaries(names)
    if not missing:
        return
    if os.geteuid() != 0:
        unavailable(f"{', '.join(missing)} not installed and not running as root")
    if shutil.which("apt-get") is None:
        unavailable(f"{', '.join(missing)} not installed and no apt-get on this machine")
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
    if missing_binaries(names):
        unavailable(f"still missing after apt-get install: {', '.join(missing_binaries(names))}")


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


@dataclass(frozen=True)
class Node:
    name: str
    addr: str  # NodeAddr: where slurmctld and the other nodes reach its slurmd (and its jobs)
    netns: str | None = None  # the network namespace its slurmd and jobs run in; None: the machine's own


NETNS_PREFIX = "mimscale-"
TEST_NET = ipaddress.ip_network("198.18.0.0/15")  # RFC 2544: reserved for network tests, never routed


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class NamespaceNetwork:
    """``count`` hosts on this machine, ``node1``..: a network namespace per node (``mimscale-<pid>-node<i>``)
    with one address, linked point-to-point (veth pairs, /32 routes) to the root namespace, where slurmctld
    listens on ``controller_addr``, and to every other node. No bridge and no forwarding: the machine's
    firewall (FORWARD policy, br_netfilter) plays no part, and nothing changes but the new devices. The
    addresses are a /24 of 198.18.0.0/15 that no interface of this machine uses."""

    def __init__(self, count: int = 2):
        self.tag = str(os.getpid())
        net = self._free_subnet()
        hosts = [str(h) for h in net.hosts()]
        self.controller_addr = hosts[0]
        self.nodes = [Node(f"node{i}", hosts[i], f"{NETNS_PREFIX}{self.tag}-node{i}")
                      for i in range(1, count + 1)]
        self._root_links: list[str] = []

    def _free_subnet(self) -> ipaddress.IPv4Network:
        used = []
        lines = _ip("-4", "-o", "addr", "show").stdout.splitlines() + _ip("-4", "route").stdout.splitlines()
        for line in lines:
            for word in line.split():
                try:
                    used.append(ipaddress.ip_network(word, strict=False))
                except ValueError:
                    continue
        subnets = list(TEST_NET.subnets(new_prefix=24))
        start = os.getpid() % len(subnets)
        for net in subnets[start:] + subnets[:start]:
            if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
                return net
        raise RuntimeError(f"no free /24 in {TEST_NET} for the test cluster's nodes")

    def hosts_file(self) -> str:
        """The nodes' /etc/hosts: every node name resolves to its address (so gloo binds to it)."""
        lines = ["127.0.0.1\tlocalhost", f"{self.controller_addr}\tslurmctld"]
        lines += [f"{n.addr}\t{n.name}" for n in self.nodes]
        return "\n".join(lines) + "\n"

    def up(self) -> None:
        self.remove_stale()
        try:
            self._up()
        except BaseException:
            self.down()
            raise

    def _up(self) -> None:
        ctl = self.controller_addr
        for i, node in enumerate(self.nodes, 1):
            ns = node.netns
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            host_end, node_end = f"ms{self.tag}h{i}", f"ms{self.tag}n{i}"
            _ip("link", "add", host_end, "type", "veth", "peer", "name", node_end)
            self._root_links.append(host_end)
            _ip("link", "set", node_end, "netns", ns)
            _ip("addr", "add", f"{ctl}/32", "dev", host_end)
            _ip("link", "set", host_end, "up")
            _ip("route", "add", f"{node.addr}/32", "dev", host_end, "src", ctl)
            _ip("-n", ns, "addr", "add", f"{node.addr}/32", "dev", node_end)
            _ip("-n", ns, "link", "set", node_end, "up")
            _ip("-n", ns, "route", "add", f"{ctl}/32", "dev", node_end, "src", node.addr)
        for i, a in enumerate(self.nodes, 1):
            for j, b in enumerate(self.nodes, 1):
                if j <= i:
                    continue
                end_a, end_b = f"ms{self.tag}p{i}x{j}", f"ms{self.tag}p{j}x{i}"
                _ip("link", "add", end_a, "type", "veth", "peer", "name", end_b)
                self._root_links.append(end_a)
                for end, node, peer in ((end_a, a, b), (end_b, b, a)):
                    _ip("link", "set", end, "netns", node.netns)
                    _ip("-n", node.netns, "addr", "add", f"{node.addr}/32", "dev", end)
                    _ip("-n", node.netns, "link", "set", end, "up")
                    _ip("-n", node.netns, "route", "add", f"{peer.addr}/32", "dev", end, "src", node.addr)

    @staticmethod
    def _remove(netns: str) -> None:
        """Kill what runs in a namespace, then delete it (its veth ends, and their peers, go with it)."""
        for sig in (signal.SIGKILL, signal.SIGKILL):
            pids = [int(p) for p in _ip("netns", "pids", netns, check=False).stdout.split()]
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            if not pids:
                break
            time.sleep(0.5)
        _ip("netns", "del", netns, check=False)

    def down(self) -> None:
        for node in self.nodes:
            if node.netns in self.namespaces():
                self._remove(node.netns)
        for link in self._root_links:  # normally gone with their namespace already
            if _ip("link", "show", link, check=False).returncode == 0:
                _ip("link", "del", link, check=False)

    @staticmethod
    def namespaces() -> list[str]:
        lines = _ip("netns", "list", check=False).stdout.splitlines()
        return [line.split()[0] for line in lines if line.strip()]

    @classmethod
    def remove_stale(cls) -> None:
        """Remove the namespaces that test runs which died without cleaning up left behind."""
        for ns in cls.namespaces():
            m = re.fullmatch(rf"{NETNS_PREFIX}(\d+)-node\d+", ns)
            if m and not _pid_alive(int(m.group(1))):
                cls._remove(ns)


class SlurmCluster:
    """One controller and the given nodes (default: one node named ``localhost``), each with ``cpus``
    (virtual) CPUs. With a :class:`NamespaceNetwork`, each node is a host of its own (see the module doc)."""

    def __init__(self, root: Path, cpus: int = 8, mem_mb: int | None = None,
                 network: NamespaceNetwork | None = None):
        self.root = Path(root)
        self.cpus = cpus
        self.network = network
        self.nodes = network.nodes if network else [Node(NODE, "127.0.0.1")]
        self.ctld_addr = network.controller_addr if network else "127.0.0.1"
        total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        self.mem_mb = mem_mb or max(1024, int(total_mb * 0.75) // len(self.nodes))
        self.conf = self.root / "etc" / "slurm.conf"
        self.hosts = self.root / "etc" / "hosts"  # the nodes' /etc/hosts (namespaced nodes only)
        self.torch_extensions = self.root / "torch_extensions"
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
        env["TORCH_EXTENSIONS_DIR"] = str(self.torch_extensions)
        return env

    def _copy_torch_extensions(self) -> None:
        """Give the jobs a private copy of the JIT-built torch extensions (DeepSpeed's CPU comm op).

        Every rank start runs ninja on the op's build directory under a lock. In the shared default
        directory, a process of someone else's with another ninja (another version hashes the command
        differently) makes the next one rebuild the op: minutes on a loaded machine, with every rank of every
        job here queued on that lock. The copy (taken under the same lock) is rebuilt at most once."""
        from filelock import FileLock

        self.torch_extensions.mkdir(parents=True, exist_ok=True)
        try:  # where this torch builds them: $TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions/py311_cu130
            from torch.utils.cpp_extension import _get_build_directory

            src = Path(_get_build_directory("", verbose=False))
        except Exception:  # noqa: BLE001 -- a private function; without it the first rank builds them
            return
        for build in src.glob("*/") if src.is_dir() else []:
            dst = self.torch_extensions / build.name
            try:
                with FileLock(str(build / "lock"), timeout=30):
                    shutil.copytree(build, dst, ignore=shutil.ignore_patterns("lock"), symlinks=True)
            except (OSError, TimeoutError):
                shutil.rmtree(dst, ignore_errors=True)  # built by the first rank instead

    def _write_config(self) -> None:
        for sub in ("etc", "log", "state", "run", *(f"spool/slurmd-{n.name}" for n in self.nodes)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        ctld_port, slurmd_port = free_port(), free_port()
        while slurmd_port == ctld_port:
            slurmd_port = free_port()
        r = self.root
        nodes = "\n".join(f"NodeName={n.name} NodeAddr={n.addr} NodeHostname={n.name} CPUs={self.cpus} "
                          f"RealMemory={self.mem_mb} State=UNKNOWN" for n in self.nodes)
        self.conf.write_text(
            f"""# generated by tests/slurm_cluster.py
ClusterName=mimscale-test
SlurmctldHost=localhost({self.ctld_addr})
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
SlurmdLogFile={self.log_dir}/slurmd-%n.log
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
# time between SIGTERM and SIGKILL when a job ends (scontrol requeue, cancel, time limit): the ranks
# checkpoint in it
KillWait=60
InactiveLimit=0
Waittime=0
SlurmdTimeout=60
SlurmdParameters=config_overrides
DefMemPerCPU={self.mem_mb // self.cpus}
{nodes}
PartitionName={PARTITION} Nodes={",".join(n.name for n in self.nodes)} Default=YES MaxTime=INFINITE State=UP \
OverSubscribe=NO
"""
        )
        if self.network:
            self.hosts.write_text(self.network.hosts_file())
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

    def _slurmd_argv(self, node: Node) -> list[str]:
        slurmd = ["slurmd", "-D", "-N", node.name, "-f", str(self.conf)]
        if node.netns is None:
            return slurmd
        # Its own network namespace, hostname (UTS namespace) and /etc/hosts (a bind mount in a private mount
        # namespace); slurmstepd and the jobs inherit all three from slurmd. nsenter, not `ip netns exec`,
        # which would mount a new /sys and so hide the cgroup filesystem slurmd needs.
        script = 'hostname "$1" && mount --bind "$2" /etc/hosts && shift 2 && exec "$@"'
        return ["nsenter", f"--net=/run/netns/{node.netns}", "unshare", "--uts", "--mount", "--propagation",
                "private", "sh", "-c", script, "sh", node.name, str(self.hosts), *slurmd]

    def start(self, timeout: float = 60.0) -> None:
        self.root.chmod(0o755)  # munged, running as munge, must reach its directory
        if self.network:
            self.network.up()
        self._write_config()
        self._copy_torch_extensions()
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
        for node in self.nodes:
            self._spawn(f"slurmd-{node.name}", self._slurmd_argv(node))
        self._wait_for(lambda: set(self.node_states().values()) == {"idle"}, timeout, "nodes to become idle")

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
            deadline = time.monotonic() + 75  # KillWait
            while time.monotonic() < deadline and self.run(
                ["squeue", "-h", "-o", "%i"], check=False
            ).stdout.strip():
                time.sleep(0.5)
        for name in (*(f"slurmd-{n.name}" for n in self.nodes), "slurmctld", "munged"):
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
        if self.network:
            self.network.down()

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

    def node_states(self) -> dict[str, str]:
        proc = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False)
        states = dict(line.split() for line in proc.stdout.splitlines() if len(line.split()) == 2)
        return {n.name: states.get(n.name, "unknown").rstrip("*~#!%$@^-") for n in self.nodes}

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
        names = ["slurmctld.log", "munged.log", "slurmctld.stdout"]
        for n in self.nodes:
            names += [f"slurmd-{n.name}.log", f"slurmd-{n.name}.stdout"]
        for name in names:
            path = self.log_dir / name
            if path.exists():
                parts.append(f"----- {path} -----\n{tail(path, lines)}")
        return "\n".join(parts)


# ---------------------------------------------------------------------------------------------- driving jobs
JOB_TIMEOUT = 600  # per job; generous because the machine may be shared
START_LINE = re.compile(r"\] start (\d+): ")  # the batch script's line at each start of a job
TRAINING_FROM = re.compile(r"resuming at step (\d+)|fresh start")  # the trainer's, once it is set up
CHECKPOINTED = re.compile(r"signal (.+?): checkpointing step (\d+)")  # the trainer's, on a signal


# The test node has no GPUs: override the scripts' GPU defaults, one CPU per task.
NO_GPU = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=20"]
SMOKE = ["--smoke", "--ds_config", "zero2.json"]
# Long enough (200 tiny steps, >= 10 s) that a signal sent at the first logged step lands mid-run.
STEPS = 200
LONG_SMOKE = [*SMOKE, "--set", "optim.epochs=100", "--set", "ckpt_interval=1000", "--max_steps", str(STEPS)]
LOG_EVERY = 5  # the smoke runs' log_interval: metrics.jsonl has steps 5, 10, ..., 200


def scripts_env() -> dict[str, str]:
    env = {"MIMSCALE_ROOT": str(ROOT)}
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        env["MIMSCALE_PYTHON"] = sys.executable  # not the project's .venv: use the tests' interpreter
    return env


def metrics_steps(run_dir: Path) -> list[int]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError):
            pass  # a line being written right now
    return steps


def starts(log: str) -> list[str]:
    """The log of each start of a (requeued) job, in order."""
    cut = [m.start() for m in START_LINE.finditer(log)]
    return [log[a:b] for a, b in zip(cut, [*cut[1:], len(log)])]


def rank_processes(cluster: SlurmCluster, job_id: str) -> dict[int, dict]:
    """The rank processes of a running job: RANK -> {"pid", "node"}. A rank is a process whose environment
    has the job's id and a RANK, unlike its parent's (a DataLoader worker inherits its rank's); its node is
    the one whose network namespace it runs in (compared by inode: /run/netns/<name> is a plain file, while
    slurmd's /proc/<pid>/ns link may be unreadable where root lacks CAP_SYS_PTRACE)."""
    def environ(pid: int | str) -> list[bytes]:
        try:
            return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return []

    def inode(path: str) -> int | None:
        try:
            return os.stat(path).st_ino
        except OSError:
            return None

    node_of = {inode(f"/run/netns/{n.netns}"): n.name for n in cluster.nodes if n.netns}
    job = f"SLURM_JOB_ID={job_id}".encode()
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        env = environ(entry.name)
        rank = [e for e in env if e.startswith(b"RANK=")]
        if job not in env or not rank:
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if rank[0] in environ(ppid):
            continue
        found = {"pid": int(entry.name), "node": cluster.nodes[0].name}
        if node_of:
            try:
                found["node"] = node_of.get(os.stat(f"/proc/{entry.name}/ns/net").st_ino)
            except OSError as exc:  # recorded: the test says why it could not tell the node
                found.update(node=None, why=str(exc))
        ranks[int(rank[0][5:])] = found
    return ranks


@dataclass
class Action:
    """Done to a job once one of its starts has trained a few steps (see :class:`Jobs`)."""

    what: str
    do: Callable[[Jobs, str], dict]  # (jobs, job name) -> what to record about it


def scancel(*flags: str) -> Action:
    def do(jobs: Jobs, name: str) -> dict:
        jobs.cluster.run(["scancel", *flags, jobs.ids[name]], check=False)
        return {}

    return Action(f"scancel {' '.join(flags)}", do)


def scontrol_requeue() -> Action:
    """What an admin's ``scontrol requeue`` (or a preemption without GraceTime) does: SIGTERM to every process
    of every step, batch step included, then SIGKILL KillWait seconds later."""
    def do(jobs: Jobs, name: str) -> dict:
        jobs.cluster.run(["scontrol", "requeue", jobs.ids[name]], check=False)
        return {}

    return Action("scontrol requeue", do)


def kill_rank(rank: int) -> Action:
    """SIGKILL one rank process (on whichever node it runs)."""
    def do(jobs: Jobs, name: str) -> dict:
        found = rank_processes(jobs.cluster, jobs.ids[name])
        if rank not in found:
            return {"error": f"no process of rank {rank} found (found {found})"}
        os.kill(found[rank]["pid"], signal.SIGKILL)
        return {"killed": found[rank]}

    return Action(f"kill -9 rank {rank}", do)


@dataclass
class Jobs:
    """Jobs submitted together to one cluster, and a thread that acts on them while they run.

    ``plans[name][k]`` is done once start k+1 of the job has logged a training step after the one it started
    from (so it lands mid-run, after the trainer's signal handlers exist); ``acted[name][k]`` records the step
    seen then, the time, the ranks' nodes and the action's own record. ``then[name]`` submits a follow-up job
    as soon as the job has finished (a relaunch by hand)."""

    cluster: SlurmCluster
    work: Path
    env: dict[str, str] = field(default_factory=dict)
    ids: dict[str, str] = field(default_factory=dict)
    run_dirs: dict[str, Path] = field(default_factory=dict)
    plans: dict[str, list[Action]] = field(default_factory=dict)
    acted: dict[str, list[dict]] = field(default_factory=dict)
    then: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    finished_at: dict[str, float] = field(default_factory=dict)
    results: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def submit(self, name: str, *args: str, env: dict[str, str] | None = None, plan: list[Action] = (),
               run_dir: Path | None = None) -> None:
        self.ids[name] = self.cluster.sbatch(f"--job-name={name}", f"--output={self.work}/logs/%x-%j.out",
                                             *args, cwd=ROOT, env={**self.env, **(env or {})})
        self.plans[name], self.acted[name] = list(plan), []
        if run_dir is not None:
            self.run_dirs[name] = run_dir

    def log(self, name: str) -> str:
        """The output of a job (not an array) submitted by :meth:`submit`."""
        path = self.work / "logs" / f"{name}-{self.ids[name]}.out"
        return path.read_text(errors="replace") if path.is_file() else ""

    @staticmethod
    def output(rec: dict[str, str]) -> str:
        """The output of one job record (an array task's, for example)."""
        path = Path(rec.get("StdOut", ""))
        return path.read_text(errors="replace") if path.is_file() else f"<no job output at {path}>"

    def wait(self, name: str, timeout: float = JOB_TIMEOUT) -> dict[str, dict[str, str]]:
        if name not in self.results:
            deadline = time.monotonic() + timeout
            while name not in self.ids and time.monotonic() < deadline:  # a follow-up not submitted yet
                time.sleep(0.5)
            if name not in self.ids:
                pytest.fail(f"job {name} was never submitted", pytrace=False)
            try:
                self.results[name] = self.cluster.wait(self.ids[name], max(1.0, deadline - time.monotonic()))
            except TimeoutError as exc:
                pytest.fail(f"{exc}\n{self.explain(name)}", pytrace=False)
        return self.results[name]

    def explain(self, name: str) -> str:
        if name not in self.ids:
            return f"job {name} was never submitted"
        recs = self.cluster.jobs(self.ids[name])
        files = [Path(r["StdOut"]) for r in recs.values() if r.get("StdOut")]
        states = ", ".join(f"{k}: {r.get('JobState')} exit {r.get('ExitCode')} restarts {r.get('Restarts')}"
                           for k, r in recs.items())
        return (f"job {name} ({states}); actions done: {self.acted.get(name)}\n"
                + self.cluster.diagnostics(files, lines=80))

    # ---- the thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="slurm-jobs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _due(self, name: str) -> bool:
        k = len(self.acted[name])
        if k >= len(self.plans[name]):
            return False
        segments = starts(self.log(name))
        if len(segments) > k + 1:  # start k+1 ended before it could be acted on
            self.acted[name].append({"start": k + 1, "error": "it ended before anything was done to it"})
            return False
        if len(segments) < k + 1:
            return False
        m = TRAINING_FROM.search(segments[k])
        steps = metrics_steps(self.run_dirs[name]) if m else []
        return bool(steps) and max(steps) > int(m.group(1) or 0)

    def _act(self, name: str) -> None:
        k = len(self.acted[name])
        action = self.plans[name][k]
        record = {"start": k + 1, "what": action.what, "step": max(metrics_steps(self.run_dirs[name])),
                  "t": time.monotonic(),
                  "ranks": {r: v["node"] for r, v in rank_processes(self.cluster, self.ids[name]).items()}}
        if None in record["ranks"].values():  # say why
            record["lookup"] = rank_processes(self.cluster, self.ids[name])
        record.update(action.do(self, name))
        self.acted[name].append(record)

    def _watch(self) -> None:
        last_poll = 0.0
        while not self._stop.wait(0.3):
            for name in list(self.plans):
                try:
                    if self._due(name):
                        self._act(name)
                except Exception as exc:  # noqa: BLE001 -- recorded; the test then fails saying so
                    self.acted[name].append({"error": repr(exc)})
            if time.monotonic() - last_poll < 2:
                continue
            last_poll = time.monotonic()
            for name in [n for n in self.ids if n not in self.finished_at]:
                recs = self.cluster.jobs(self.ids[name])
                if recs and all(r["JobState"] in FINISHED_STATES for r in recs.values()):
                    self.finished_at[name] = time.monotonic()
                    if name in self.then:
                        follow, args = self.then.pop(name)
                        try:
                            self.submit(follow, *args, run_dir=self.run_dirs.get(name))
                        except Exception as exc:  # noqa: BLE001 -- the follow-up's test reports it missing
                            self.acted[name].append({"error": f"resubmitting as {follow}: {exc!r}"})


def check_preempted(jobs: Jobs, name: str, start: int, delivered: str,
                    requeued: str = "requeueing job") -> int:
    """Start ``start`` of job ``name`` got its signal (``delivered``: the log line saying how it reached the
    ranks) mid-run, checkpointed at or after the step seen when it was sent, exited 75 and was requeued; the
    next start resumed exactly there. Returns the checkpoint's step."""
    why = jobs.explain(name)
    acted = jobs.acted[name]
    assert len(acted) >= start and "error" not in acted[start - 1], f"start {start} was not signalled\n{why}"
    segments = starts(jobs.log(name))
    assert len(segments) > start, f"no start {start + 1} after the signal\n{why}"
    this, following = segments[start - 1], segments[start]
    assert delivered in this, f"start {start}: no '{delivered}'\n{why}"
    m = CHECKPOINTED.search(this)
    assert m, f"start {start}: the trainer did not checkpoint on the signal\n{why}"
    step = int(m.group(2))
    assert acted[start - 1]["step"] <= step < STEPS, why
    assert "checkpoint written; exiting with 75" in this, why
    assert "training stopped with status 75" in this, why
    assert requeued in this, why
    assert f"start {start + 1}: resuming from step_{step:08d}" in following, why
    assert f"resuming at step {step}" in following, why
    return step


def check_nothing_lost(jobs: Jobs, name: str, restarts: int) -> None:
    """The job finished after ``restarts`` requeues with every step logged exactly once, in order."""
    (rec,) = jobs.wait(name).values()
    why = jobs.explain(name)
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", why
    assert rec["Restarts"] == str(restarts), why
    steps = metrics_steps(jobs.run_dirs[name])
    assert steps == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY)), f"steps replayed or missing: {steps}\n{why}"
    assert (jobs.run_dirs[name] / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}", why


def _running_cluster(network: NamespaceNetwork | None = None, cpus: int = 8):
    root = Path(tempfile.mkdtemp(prefix="mimscale-slurm-"))
    cluster = SlurmCluster(root, cpus=cpus, network=network)
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


@pytest.fixture(scope="session")
def slurm_cluster():
    ensure_installed()
    yield from _running_cluster()


@pytest.fixture(scope="session")
def slurm_multinode_cluster():
    """Two nodes, each in its own network namespace with its own hostname and address (needs root)."""
    ensure_installed((*BINARIES, *NETNS_BINARIES))
    if os.geteuid() != 0:
        unavailable("the two-node cluster needs root for its network namespaces")
    yield from _running_cluster(NamespaceNetwork(2), cpus=4)


def _main() -> None:
    parser = argparse.ArgumentParser(description="Start a throw-away SLURM cluster until killed.")
    parser.add_argument("--nodes", type=int, default=1, help="1: localhost; more: one network namespace each")
    args = parser.parse_args()

    def leave(signum, frame):
        raise SystemExit(0)

    for s in (signal.SIGINT, signal.SIGTERM):  # SIGINT is ignored when started with `&` by a script
        signal.signal(s, leave)
    ensure_installed((*BINARIES, *NETNS_BINARIES) if args.nodes > 1 else BINARIES)
    c = SlurmCluster(Path(tempfile.mkdtemp(prefix="mimscale-slurm-")), cpus=8 if args.nodes == 1 else 4,
                     network=NamespaceNetwork(args.nodes) if args.nodes > 1 else None)
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
