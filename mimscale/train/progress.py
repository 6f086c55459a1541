"""What a person watching a run sees: a periodic line on rank 0 (step, loss, lr, images/s, ETA), TensorBoard
scalars, and a JSON-lines file of the same numbers that plots and tests read back."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return (f"{d}d" if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


class ProgressLogger:
    """Rank 0 only (other ranks get a no-op instance). Throughput is measured between log calls."""

    def __init__(
        self,
        output_dir: str | Path,
        enabled: bool,
        total_steps: int,
        global_batch: int,
        start_step: int,
        stop_step: int,
    ) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.stop_step = stop_step
        self.global_batch = global_batch
        self._last_step = start_step
        self._last_time = time.perf_counter()
        self._tb = None
        self._jsonl = None
        if enabled:
            out = Path(output_dir)
            out.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(out / "metrics.jsonl", "a", buffering=1)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1)
            except ImportError:  # tensorboard is in requirements.txt; keep training if a site lacks it
                print(
                    "[mimscale] tensorboard not installed: scalars go to metrics.jsonl only", file=sys.stderr
                )

    def restart_clock(self, step: int) -> None:
        """Exclude start-up and checkpoint time from the throughput of the next interval."""
        self._last_step = step
        self._last_time = time.perf_counter()

    def log(self, step: int, scalars: dict[str, float]) -> dict[str, Any]:
        now = time.perf_counter()
        steps = max(1, step - self._last_step)
        dt = max(1e-9, now - self._last_time)
        img_s = steps * self.global_batch / dt
        eta = (self.stop_step - step) * dt / steps
        self._last_step, self._last_time = step, now
        record = {"step": step, **scalars, "images_per_s": img_s, "eta_s": eta, "time": time.time()}
        if self.enabled:
            extras = "  ".join(f"{k} {v:.4g}" for k, v in scalars.items() if k not in ("loss", "lr"))
            print(
                f"[mimscale] step {step}/{self.stop_step}  loss {scalars.get('loss', float('nan')):.4f}  "
                f"lr {scalars.get('lr', 0.0):.3e}  {img_s:.1f} img/s  ETA {format_eta(eta)}"
                + (f"  {extras}" if extras else ""),
                flush=True,
            )
            assert self._jsonl is not None
            self._jsonl.write(json.dumps(record) + "\n")
            if self._tb is not None:
                for k, v in record.items():
                    if k not in ("step", "time"):
                        self._tb.add_scalar(f"train/{k}", v, step)
        return record

    def message(self, text: str) -> None:
        if self.enabled:
            print(f"[mimscale] {text}", flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
