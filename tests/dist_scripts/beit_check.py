"""Two-rank end-to-end check of BEiT's two stages through the real training loop; launched by
``tests/test_beit.py``.

    deepspeed --num_gpus 2 tests/dist_scripts/beit_check.py --work DIR --out result.json

One launch (process start-up dominates on a CPU) runs the recipes' ``--smoke`` configs in-process:

1. ``recipes/beit_tokenizer.py`` under ZeRO-2 for 6 steps, then resumed to 10: the codebook-usage window
   (a per-rank extra state) resumes; ``codebook_usage`` and ``perplexity`` are logged.
2. ``mimscale export`` of the full stage-1 checkpoint; :func:`load_tokenizer` reads it back.
3. ``recipes/beit_vitb.py`` under ZeRO-3 with ``model.tokenizer_path`` = that file, 6 steps then resumed
   to 10; the stage-2 checkpoint's tokenizer tensors equal the exported tokenizer bit for bit (frozen and
   partitioned like any parameter, never updated); the encoder exports to a timm BEiT that loads strict.

Every rank checks what it can; rank 0 writes a JSON summary with all ranks' failures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch.distributed as dist  # noqa: E402

from mimscale.recipes import load_recipe  # noqa: E402
from mimscale.runs import read_rank_states  # noqa: E402
from mimscale.train import config as C  # noqa: E402
from mimscale.train.checkpoint import Checkpointer  # noqa: E402
from mimscale.train.distributed import run_and_exit  # noqa: E402
from mimscale.train.trainer import train  # noqa: E402


def run_recipe(name: str, ds_config: str, argv: list[str]) -> int:
    cfg = C.resolve_config(load_recipe(name), C.build_parser(prog=name).parse_args(argv), name)
    return train(cfg, ds_config, name)


def logged(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=None)
    args = p.parse_args()
    work = Path(args.work)
    failures: list[str] = []
    result: dict[str, Any] = {}

    def check(ok: bool, what: str) -> None:
        if not ok:
            failures.append(f"rank {dist.get_rank() if dist.is_initialized() else 0}: {what}")

    # ---- stage 1: tokenizer, ZeRO-2, stopped at 6 and resumed to 10
    tok_dir = work / "tokenizer"
    common = ["--smoke", "--output_dir", str(tok_dir)]
    check(run_recipe("beit_tokenizer", "zero2.json", [*common, "--max_steps", "6"]) == 0, "stage 1 exit code")
    check(Checkpointer(tok_dir, 0).latest() == "step_00000006", "stage 1 checkpoint at step 6")
    check(run_recipe("beit_tokenizer", "zero2.json", [*common, "--max_steps", "10"]) == 0, "stage 1 resume")
    rank = dist.get_rank()
    state = read_rank_states(tok_dir / "checkpoints" / "step_00000010")[rank]
    # 10 optimizer steps of one micro-batch each: the window counted all 10 batches across the resume
    check(state["codebook"]["batches"] == 10, f"codebook window batches {state}")

    tok_file = work / "tokenizer.safetensors"
    if rank == 0:
        from mimscale.export import export_checkpoint

        rows = logged(tok_dir)
        check(bool(rows) and all("codebook_usage" in r and "perplexity" in r for r in rows),
              f"stage 1 metrics lack codebook_usage/perplexity: {rows[:1]}")
        # logs at 5 and at the stop (6), then the resumed run continues from 6: 10 (a restart would log 5)
        check([r["step"] for r in rows] == [5, 6, 10], f"stage 1 logged steps {[r['step'] for r in rows]}")
        meta = export_checkpoint(tok_dir, tok_file)
        check(meta["timm.model_name"] == "mimscale.dvae", f"stage 1 export names {meta['timm.model_name']}")
        result["stage1"] = {"steps": int(meta["step"]), "usage": rows[-1].get("codebook_usage"),
                            "perplexity": rows[-1].get("perplexity")}
    dist.barrier()

    from mimscale.models.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_file)
    check(tok.config.vocab_size == 64 and tok.config.grid == (8, 8), f"loaded tokenizer {tok.config}")

    # ---- stage 2: BEiT with that tokenizer, ZeRO-3, stopped at 6 and resumed to 10
    beit_dir = work / "beit"
    common = ["--smoke", "--output_dir", str(beit_dir), "--set", f"model.tokenizer_path={tok_file}"]
    check(run_recipe("beit_vitb", "zero3.json", [*common, "--max_steps", "6"]) == 0, "stage 2 exit code")
    check(Checkpointer(beit_dir, 0).latest() == "step_00000006", "stage 2 checkpoint at step 6")
    check(run_recipe("beit_vitb", "zero3.json", [*common, "--max_steps", "10"]) == 0, "stage 2 resume")
    latest = Checkpointer(beit_dir, 0).latest()
    check(latest == "step_00000010", f"stage 2 final checkpoint {latest}")

    if rank == 0:
        import timm
        from safetensors.torch import load_file

        from mimscale.export import export_checkpoint, load_timm_encoder

        rows = logged(beit_dir)
        check(all("loss_mim" in r and "mlm_acc" in r for r in rows), "stage 2 metrics lack loss_mim/mlm_acc")
        steps = [r["step"] for r in rows]
        full = work / "beit_full.safetensors"
        export_checkpoint(beit_dir, full)
        sd = load_file(str(full))
        tok_sd = {k.removeprefix("encoder."): v for k, v in load_file(str(tok_file)).items()
                  if k.startswith("encoder.")}
        frozen = {k.removeprefix("tokenizer.encoder."): v for k, v in sd.items()
                  if k.startswith("tokenizer.encoder.")}
        check(frozen.keys() == tok_sd.keys(), "stage 2 checkpoint lacks tokenizer tensors")
        check(all(torch.equal(frozen[k], tok_sd[k]) for k in tok_sd if k in frozen),
              "tokenizer weights changed during stage 2")
        enc = work / "beit_encoder.safetensors"
        meta = export_checkpoint(beit_dir, enc, encoder_only=True)
        model = load_timm_encoder(enc)
        check(isinstance(model, timm.models.beit.Beit) and meta["timm.model_name"] == "beit_base_patch16_224",
              f"encoder export is {type(model).__name__} / {meta['timm.model_name']}")
        with torch.no_grad():
            feats = model.forward_features(torch.randn(2, 3, 32, 32))
        check(tuple(feats.shape) == (2, 65, 64), f"timm BEiT features {tuple(feats.shape)}")
        check(steps == [5, 6, 10], f"stage 2 logged steps {steps}")
        result["stage2"] = {"resumed_at": 6 if steps == [5, 6, 10] else None, "final_step": max(steps),
                            "loss": rows[-1]["loss_mim"], "mlm_acc": rows[-1]["mlm_acc"]}

    gathered: list[list[str]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, failures)
    if rank == 0:
        all_failures = [f for fs in gathered for f in fs]
        result.update(ok=not all_failures, failures=all_failures, world_size=dist.get_world_size())
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2), flush=True)


if __name__ == "__main__":
    run_and_exit(main)  # then release /dev/shm, destroy the process group, exit without finalization
