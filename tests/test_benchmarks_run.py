"""The two benchmark scripts run end to end and print the ratios their README reports.

Smoke runs at tiny sizes (no timing is checked: speed claims live in benchmarks/README.md), so that a
change to the pipeline or the training step cannot silently break the commands users and reviewers run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], timeout: int) -> str:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def test_data_pipeline_benchmark_prints_its_ratios(tmp_path: Path) -> None:
    out = _run(
        [
            "benchmarks/data_pipeline.py",
            "--num-images", "24", "--batch-size", "8", "--core-rounds", "1", "--core-chunk", "1",
            "--rounds", "1", "--workers", "1", "--work-dir", str(tmp_path),
        ],
        timeout=300,
    )  # fmt: skip
    assert "(32, 3, 224, 224)" not in out and "(8, 3, 224, 224) torch.uint8 channels_last" in out
    assert len(re.findall(r"c/b = \d+\.\d+", out)) == 2 and len(re.findall(r"c/a = \d+\.\d+", out)) == 2
    assert "GPU decode: skipped" in out or "(d)" in out


def test_train_step_benchmark_prints_ratios_flops_and_mfu_line() -> None:
    out = _run(
        ["benchmarks/train_step.py", "--model", "vit_tiny_patch16_224", "--steps", "1", "--warmup", "1",
         "--batch", "2"],
        timeout=600,
    )  # fmt: skip
    assert re.search(r"FlopCounterMode forward: [\d.]+ GFLOPs", out)
    assert re.search(r"mimscale / HF ViTMAEForPreTraining, both in the same DeepSpeed engine .*: [\d.]+", out)
    assert re.search(r"SimMIM / MAE step time on vit_tiny_patch16_224: \d+\.\d+", out)
    assert "MFU" in out
