"""Process-group setup that works under the `deepspeed` launcher, torchrun, `srun` and plain python.

Under ``srun`` (one task per GPU, no launcher) the ranks come from SLURM's variables; the batch script
exports ``MASTER_ADDR``/``MASTER_PORT`` from the allocation (see launch_scripts/).
"""

from __future__ import annotations

import atexit
import glob
import multiprocessing
import os
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Callable
from typing import NoReturn

import torch.distributed as dist


def map_slurm_env(env: dict[str, str] | None = None) -> None:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK from SLURM_* when no launcher set them (srun one task per GPU)."""
    env = os.environ if env is None else env
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env.setdefault("LOCAL_WORLD_SIZE", env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(slurm_master_port(int(env.get("SLURM_JOB_ID", "0")))))


def slurm_master_port(job_id: int) -> int:
    """The rendezvous port of a SLURM job: derived from the job id so jobs sharing a node never collide, in
    15000-29999 (below Linux's ephemeral range). ``launch_scripts/_env.sh`` computes the same (tested)."""
    return 15000 + job_id % 15000


def init_distributed() -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed (nccl on GPUs, gloo on CPU).

    Returns (rank, world size, local rank)."""
    import deepspeed

    map_slurm_env()
    if "RANK" not in os.environ:  # plain `python recipe.py`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not dist.is_initialized():
        deepspeed.init_distributed()
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unlink_shm_buffers(port: str | int, rank: str | int = "*") -> None:
    """Unlink DeepSpeed's CPU all-reduce buffers of the job on ``port`` (one rank's, or all with ``"*"``).

    On the CPU accelerator DeepSpeed maps one ~66 MB shared-memory file per rank
    (``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``) and never unlinks it, so every CPU run
    (tests, the demo, CPU smoke runs) would leave them behind until /dev/shm fills the RAM. Unlinking
    removes only the name: mappings stay valid until the processes exit. A no-op on GPUs (no such file).
    """
    if not hasattr(os, "getuid"):
        return
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_{rank}"):
        try:
            os.unlink(path)
        except OSError:
            pass


def release_shm_buffers() -> None:
    """Unlink this rank's buffer (:func:`unlink_shm_buffers`). Call after the last collective, once
    every rank has mapped every buffer."""
    if dist.is_initialized():
        unlink_shm_buffers(os.environ.get("MASTER_PORT", "*"), dist.get_rank())


def shutdown_distributed() -> None:
    """Release this rank's /dev/shm buffers and destroy the process group (idempotent).

    Not enough on its own to end a gloo rank safely: see :func:`exit_process`, which the recipes and the
    2-rank check scripts end with (through :func:`run_and_exit`). DeepSpeed does not re-initialise a
    destroyed group in the same process, so call it only as the process ends.
    """
    if not dist.is_initialized():
        return
    release_shm_buffers()
    dist.destroy_process_group()


def exit_process(code: int = 0) -> NoReturn:
    """End the process with ``code`` without Python's interpreter finalization: run the atexit handlers,
    flush stdout/stderr, then ``os._exit(code)``.

    Why: ProcessGroupGloo runs every collective on a worker thread (``pt_gloo_runloop``) that drops its
    reference to a finished work (and so to the work's tensors) only after the caller's ``wait()`` has
    returned. When the Python side of such a tensor is already gone, that last release has to take the
    GIL to free the tensor's PyObject (``c10::TensorImpl::decref_pyobject``). torch checks
    ``Py_IsInitialized()`` before taking it; if the main thread starts finalizing between that check and
    the GIL hand-over (a starved worker, e.g. on a loaded 2-core CI machine), CPython 3.11 makes the worker
    ``pthread_exit()`` inside ``take_gil``, the forced unwind reaches a ``noexcept`` destructor and libstdc++
    calls ``std::terminate``: "terminate called without an active exception", status -6, after all the
    work succeeded. ``destroy_process_group()`` does not stop or join gloo's worker threads (the backend
    objects live on while DeepSpeed's groups and engines reference them), so only not finalizing helps:
    ``os._exit`` ends the process while those threads are still parked. Nothing is lost: the atexit
    handlers run first (the interpreter is fully alive then), the collectives have completed, checkpoints
    and metrics are written with closed files, and the status is passed on unchanged.

    Daemonic children (the DataLoader's workers) are killed first: after an exception the traceback keeps
    the loader's iterator alive, so its workers were never told to stop, and they ignore SIGTERM during
    training (:func:`mimscale.train.preemption.workers_ignore_preemption`); multiprocessing's exit handler
    would SIGTERM and then join them forever, and the failed rank would hang instead of ending (its peers
    then wait in their next collective until gloo's timeout).
    """
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    if workers and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # PyTorch's handler would report these kills as errors
    for child in workers:
        child.kill()
        child.join(timeout=5)
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # a closed or broken stream must not change the exit status
                pass
        os._exit(code)


def exit_code(exc: BaseException | None) -> int:
    """The status Python itself would exit with after ``exc`` (None: success); prints what it would print."""
    if exc is None:
        return 0
    if isinstance(exc, SystemExit):
        if exc.code is None:
            return 0
        if isinstance(exc.code, int):
            return exc.code
        print(exc.code, file=sys.stderr)
        return 1
    traceback.print_exception(exc)
    return 130 if isinstance(exc, KeyboardInterrupt) else 1


def run_and_exit(main: Callable[[], object]) -> NoReturn:
    """Run ``main()`` as a distributed process's whole program: then :func:`shutdown_distributed` and
    :func:`exit_process` with the status Python would have exited with (0; a ``SystemExit``'s code; 1 and
    the traceback for an exception -- failed asserts included)."""
    error: BaseException | None = None
    try:
        main()
    except BaseException as e:  # noqa: BLE001 -- reported and turned into the exit status below
        error = e
    code = exit_code(error)
    try:
        shutdown_distributed()
    except BaseException as e:  # noqa: BLE001
        traceback.print_exception(e)
        code = code or 1
    exit_process(code)
