"""Turn SIGUSR1 (SLURM's ``--signal=B:USR1@T`` warning, forwarded by the batch script) and SIGTERM
(preemption, time limit) into a checkpoint at the next step boundary that every rank agrees on."""

from __future__ import annotations

import signal
from types import FrameType

import torch

from mimscale.dist import all_reduce_max

EXIT_RESUMABLE = 75  # EX_TEMPFAIL: checkpointed on a signal, relaunch the same command to resume
PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def workers_ignore_preemption(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: data workers ignore SIGTERM/SIGUSR1, which the rank handles.

    A preemption signal goes to every process of the job (SLURM ``scancel --signal=TERM --full``, a kill of
    the process group, DeepSpeed's launcher terminating each rank's process tree). PyTorch's workers install
    their own SIGTERM handler, which dies unless the sender is the rank itself, and the rank then fails
    ("DataLoader worker ... is killed by signal: Terminated") before it can checkpoint. Ignored here, the
    workers live until the rank has checkpointed and exits; they follow it out (PyTorch's workers watch
    their parent).
    """
    for s in PREEMPTION_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class PreemptionHandler:
    """Records a signal; :meth:`should_stop` reduces the flag across ranks so all stop at the same step."""

    def __init__(self, signals: tuple[int, ...] = PREEMPTION_SIGNALS) -> None:
        self.received: int | None = None
        self._previous = {}
        for s in signals:
            try:
                self._previous[s] = signal.signal(s, self._on_signal)
            except ValueError:  # not the main thread (e.g. under a test runner thread)
                pass

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def should_stop(self, device: torch.device) -> bool:
        """Collective when distributed: every rank must call it at the same step."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        return bool(all_reduce_max(flag).item() > 0)

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
