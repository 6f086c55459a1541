"""Start real multi-rank DeepSpeed jobs from tests (the `deepspeed` launcher, CPU accelerator, gloo)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from mimscale.train.distributed import unlink_shm_buffers

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def deepspeed_cmd(script: str | Path, args: list[str], num_ranks: int = 2) -> list[str]:
    return [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(num_ranks),
        "--master_port",
        str(free_port()),
        str(script),
        *args,
    ]


def release_shm(cmd: list[str]) -> None:
    """Remove the /dev/shm all-reduce buffers DeepSpeed's CPU backend left for the job launched by ``cmd``.

    The training loop and the check scripts unlink their own, but a killed job does not; without this
    every such 2-rank job leaves ~130 MB of RAM in /dev/shm.
    """
    unlink_shm_buffers(cmd[cmd.index("--master_port") + 1])


def run_deepspeed(
    script: str | Path, args: list[str], timeout: float = 600, num_ranks: int = 2, check: bool = True
) -> subprocess.CompletedProcess:
    """Run to completion; on failure the assertion message carries the job's output."""
    cmd = deepspeed_cmd(script, args, num_ranks)
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=test_env())
    finally:
        release_shm(cmd)
    if check and proc.returncode != 0:
        raise AssertionError(f"deepspeed job failed ({proc.returncode}):\n{tail(proc.stdout + proc.stderr)}")
    return proc


def test_env() -> dict[str, str]:
    env = dict(os.environ)
    # One ninja for every launch (the venv's), or DeepSpeed's JIT comm op is rebuilt whenever processes with
    # and without the venv on PATH alternate (two ninja versions record builds differently).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def tail(text: str, n: int = 120) -> str:
    return "\n".join(text.splitlines()[-n:])


class BackgroundJob:
    """A deepspeed job whose output is streamed to a file, so a test can act on it mid-run."""

    def __init__(self, script: str | Path, args: list[str], log: Path, num_ranks: int = 2) -> None:
        self.log = log
        self._fh = open(log, "w")
        self.cmd = deepspeed_cmd(script, args, num_ranks)
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=REPO,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            env=test_env(),
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, predicate, timeout: float = 600, what: str = "") -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if predicate():
                return
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"job ended ({self.proc.returncode}) before {what}:\n{tail(self.output())}"
                )
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}:\n{tail(self.output())}")

    def signal_ranks(self, sig: int) -> None:
        """Send ``sig`` to the rank processes (children of the launcher), as srun would."""
        out = subprocess.run(
            ["pgrep", "-s", str(self.proc.pid), "-f", "local_rank="], capture_output=True, text=True
        ).stdout.split()
        for pid in out:
            os.kill(int(pid), sig)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._fh.close()
        release_shm(self.cmd)

    def wait(self, timeout: float = 600) -> int:
        code = self.proc.wait(timeout=timeout)
        self._fh.close()
        release_shm(self.cmd)
        return code
