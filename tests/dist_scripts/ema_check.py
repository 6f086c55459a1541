"""Two-rank DeepSpeed acceptance check for ``mimscale.ema``; launched by ``tests/test_ema.py``.

    deepspeed --num_gpus 2 tests/dist_scripts/ema_check.py --stage 3 --dtypes fp32,bf16 \
        --out result.json --ckpt-dir DIR

Trains a small student (Linear, LayerNorm, BatchNorm1d, Linear) for a few steps with different data per
rank, updating an EMA teacher after every optimizer step, and checks on every rank that the teacher
equals the EMA recurrence applied in float64 to the student's consolidated fp32 weights (from the
initial teacher), through forward passes, a state-dict round trip, consolidation of the per-rank
states, and a DeepSpeed checkpoint save / load into a freshly built engine. Under ZeRO-3 the parameter
persistence threshold is set so that the small tensors stay gathered ("persistent") while the weights
are partitioned, with an odd element count so that partitions are padded. In bf16 the teacher must be
the bf16 rounding of the fp32 recurrence, and under ZeRO-3 the shadow must follow the student's fp32
master weights (averaging the bf16 partitions instead misses by ~1e-4). Rank 0 writes a JSON summary.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed  # noqa: E402
import deepspeed.comm as dist  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402

from mimscale.ema import EMATeacher, MomentumSchedule, consolidate_state_dicts, make_teacher  # noqa: E402
from mimscale.train.distributed import run_and_exit  # noqa: E402

IN_DIM, HIDDEN, OUT_DIM, MICRO_BATCH = 16, 33, 7, 4
ATOL = 1e-6  # fp32 recurrence vs a float64 reference over a handful of steps (observed ~2e-7)
ATOL_FORWARD = {False: 1e-5, True: 0.1}  # teacher forward vs float64 reference, fp32 / bf16 engine
BF16_HALF_ULP = 2.0**-8  # relative rounding bound of fp32 -> bf16 (8 significant bits)


_T0 = time.perf_counter()


def log(msg: str) -> None:
    """Phase timestamps on stderr: the test prints them when a launch fails or runs slowly."""
    print(f"[ema_check {time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def build_student() -> nn.Module:
    return nn.Sequential(nn.Linear(IN_DIM, HIDDEN), nn.LayerNorm(HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(),
                         nn.Linear(HIDDEN, OUT_DIM))


class Pair(nn.Module):
    """What a method looks like to DeepSpeed: student and teacher are both submodules."""

    def __init__(self) -> None:
        super().__init__()
        self.student = build_student()
        self.teacher = make_teacher(self.student)

    def forward(self, x: torch.Tensor, teacher_only: bool = False) -> torch.Tensor:
        with torch.no_grad():
            t = self.teacher(x)
        if teacher_only:
            return t
        s = self.student(x)
        return F.mse_loss(s, t) + 0.1 * s.pow(2).mean()


def ds_config(stage: int, bf16: bool) -> dict:
    zero: dict = {"stage": stage}
    if stage == 3:
        # Biases and norm weights (<= 33 elements) persistent, the two weights (528, 231) partitioned.
        zero.update(stage3_param_persistence_threshold=64, stage3_model_persistence_threshold=10**6)
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.1, "weight_decay": 0.01, "torch_adam": True}},
        "zero_optimization": zero,
        "fp16": {"enabled": False},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def make_engine(stage: int, bf16: bool, seed: int):
    torch.manual_seed(seed)
    model = Pair()
    if bf16:  # ZeRO-3 casts only parameters; BatchNorm needs its running statistics in the same dtype
        model.to(torch.bfloat16)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config(stage, bf16))
    return engine


def gathered(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full parameters of ``module`` as float64 (a collective under ZeRO-3; a no-op gather otherwise)."""
    params = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {n: p.detach().to(torch.float64).clone() for n, p in params.items()}


def student_fp32(module: nn.Module) -> dict[str, torch.Tensor]:
    """The student's consolidated fp32 master weights (collective at every ZeRO stage)."""
    out = {}
    for n, p in module.named_parameters():
        full = safe_get_full_fp32_param(p)
        if full is None:
            raise RuntimeError(f"no fp32 master for {n}")
        out[n] = full.detach().to(torch.float64).reshape(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
    return out


def float_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.detach().to(torch.float64).clone()
            for n, b in module.named_buffers() if b.is_floating_point()}


def max_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[n] - b[n].to(torch.float64)).abs().max()) for n in a)


def stored_err(ref: dict[str, torch.Tensor], stored: dict[str, torch.Tensor], bf16: bool) -> float:
    """Error of a teacher's stored tensors against the float64 reference: in bf16, what exceeds rounding
    the (fp32) shadow to bf16 once."""
    if not bf16:
        return max_err(ref, stored)
    return max(float(((ref[n] - stored[n].to(torch.float64)).abs() - BF16_HALF_ULP * ref[n].abs()).max())
               for n in ref)


def reference_forward(x: torch.Tensor, params: dict, buffers: dict) -> torch.Tensor:
    """The teacher's forward, in float64, from the reference weights (eval-mode BatchNorm)."""
    ref = build_student().to(torch.float64).eval()
    ref.load_state_dict({**params, **buffers, "2.num_batches_tracked": torch.tensor(0)})
    return ref(x.to(torch.float64))


def run_case(stage: int, bf16: bool, steps: int, ckpt_dir: str) -> tuple[list[str], dict]:
    """One full check at one ZeRO stage and precision; returns (failures, summary), equal on all ranks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = torch.bfloat16 if bf16 else torch.float32
    total = steps + 1  # one more step after the checkpoint round trip
    # Cosine from 0.9 so the teacher moves far more than the tolerance in a few steps.
    schedule = MomentumSchedule("cosine", base=0.9, final=1.0)
    checks: dict[str, float | bool] = {}

    engine = make_engine(stage, bf16, seed=0)
    log(f"stage {stage} {dtype}: engine built")
    student, teacher = engine.module.student, engine.module.teacher
    ema = EMATeacher(student, teacher, schedule)

    ref = gathered(teacher)
    initial = {n: t.clone() for n, t in ref.items()}
    ref_bufs = float_buffers(teacher)
    data = torch.Generator().manual_seed(1000 + rank)  # different data on every rank
    probe = torch.randn(MICRO_BATCH, IN_DIM, generator=torch.Generator().manual_seed(7)).to(dtype)
    momenta = []

    def train_step(eng) -> None:
        eng.train()  # flips every submodule to training mode: the teacher must go back to eval by itself
        x = torch.randn(MICRO_BATCH, IN_DIM, generator=data).to(dtype)
        loss = eng(x)
        eng.backward(loss)
        eng.step()
        t_mod = eng.module.teacher
        assert not t_mod.training and not any(m.training for m in t_mod.modules()), "teacher left eval"
        assert all(not p.requires_grad and p.grad is None for p in t_mod.parameters()), "teacher has grads"

    def advance_reference(eng, m: float) -> None:
        # The EMA's source: ZeRO-3 reads the fp32 master partition; ZeRO-1/2 the module's parameters
        # (the same values in an fp32 run, the bf16-rounded ones in a bf16 run).
        s_full = student_fp32(eng.module.student) if stage == 3 else gathered(eng.module.student)
        for n in ref:
            ref[n] = m * ref[n] + (1 - m) * s_full[n]
        for n, b in float_buffers(eng.module.student).items():
            ref_bufs[n] = m * ref_bufs[n] + (1 - m) * b

    for _ in range(steps):
        train_step(engine)
        m = ema.update(engine.global_steps, total)
        assert m == schedule(engine.global_steps - 1, total) and ema.momentum == m
        momenta.append(m)
        advance_reference(engine, m)

    # The forward first: GatheredParameters (below) releases ZeRO-3's persistent parameters on exit, so
    # only a forward before any gather sees what the EMA left in the gathered copies.
    with torch.no_grad():
        out = engine(probe, teacher_only=True)
        expected = reference_forward(probe, ref, ref_bufs)
    checks["err_forward"] = float((out.double() - expected).abs().max())
    checks["err_teacher"] = stored_err(ref, gathered(teacher), bf16)
    checks["err_buffers"] = stored_err(ref_bufs, float_buffers(teacher), bf16)
    checks["teacher_moved"] = max_err(initial, gathered(teacher))
    checks["teacher_vs_student"] = max_err(student_fp32(student), gathered(teacher))

    if stage == 3:
        pairs = list(zip(student.parameters(), teacher.parameters()))
        assert all(s.ds_tensor.shape == t.ds_tensor.shape for s, t in pairs), "partitions differ"
        checks["z3_partitioned"] = any(t.ds_tensor.numel() < t.ds_numel for _, t in pairs)
        checks["z3_persistent"] = any(getattr(t, "ds_persist", False) for _, t in pairs)
        checks["z3_master_source"] = all(hasattr(s, "_z3_optimizer") for s, _ in pairs)

    # State-dict round trip: save, move the teacher with an update, load, the teacher is restored.
    state = ema.state_dict()
    ema.update(1, total)
    checks["perturbed"] = max_err(ref, gathered(teacher))
    ema.load_state_dict(state)
    checks["err_roundtrip"] = stored_err(ref, gathered(teacher), bf16)
    assert ema.step == steps and ema.momentum == momenta[-1]

    # Every rank's state merged into one full fp32 state, then loaded back (cut into this rank's shards).
    states = [None] * world
    dist.all_gather_object(states, state)
    merged = consolidate_state_dicts(states)
    checks["err_consolidated"] = max_err(ref, merged["params"])
    ema.load_state_dict(merged)
    checks["err_load_merged"] = stored_err(ref, gathered(teacher), bf16)
    ema.load_state_dict(state)

    # DeepSpeed checkpoint + the per-rank EMA file the training loop writes beside it.
    tag = f"step{engine.global_steps}"
    engine.save_checkpoint(ckpt_dir, tag=tag)
    ema_file = os.path.join(ckpt_dir, tag, f"ema_rank{rank}.pt")
    torch.save(ema.state_dict(), ema_file)
    student_before = student_fp32(student)
    dist.barrier()
    del engine, ema, student, teacher
    gc.collect()

    # Different initial weights: everything must come from the checkpoint.
    engine = make_engine(stage, bf16, seed=1)
    engine.load_checkpoint(ckpt_dir, tag=tag)
    log(f"stage {stage} {dtype}: checkpoint saved and loaded into a new engine")
    ema = EMATeacher(engine.module.student, engine.module.teacher, schedule)
    ema.load_state_dict(torch.load(ema_file, map_location="cpu"))
    checks["err_student_resumed"] = max_err(student_before, student_fp32(engine.module.student))
    checks["err_teacher_resumed"] = stored_err(ref, gathered(engine.module.teacher), bf16)
    assert ema.step == steps and engine.global_steps == steps

    train_step(engine)
    m = ema.update(engine.global_steps, total)
    advance_reference(engine, m)
    momenta.append(m)
    checks["err_after_resume_step"] = stored_err(ref, gathered(engine.module.teacher), bf16)
    checks["err_buffers_after_resume"] = stored_err(ref_bufs, float_buffers(engine.module.teacher), bf16)
    shadow_now = [None] * world
    dist.all_gather_object(shadow_now, ema.state_dict())
    checks["err_shadow_after_resume_step"] = max_err(ref, consolidate_state_dicts(shadow_now)["params"])
    del engine, ema
    gc.collect()

    all_checks = [None] * world
    dist.all_gather_object(all_checks, checks)
    failures = []
    for r, c in enumerate(all_checks):
        for key, value in c.items():
            tol = ATOL_FORWARD[bf16] if key == "err_forward" else ATOL
            if key.startswith("err_") and not value <= tol:
                failures.append(f"stage {stage} {dtype} rank {r}: {key}={value:.3g} > {tol}")
        if not c["teacher_moved"] > 1e-2 or not c["teacher_vs_student"] > 1e-2 or not c["perturbed"] > 1e-3:
            failures.append(f"stage {stage} {dtype} rank {r}: teacher did not move as expected: {c}")
        if stage == 3 and not (c["z3_partitioned"] and c["z3_persistent"] and c["z3_master_source"]):
            failures.append(f"stage {stage} {dtype} rank {r}: ZeRO-3 paths not exercised: {c}")
    log(f"stage {stage} {dtype}: {'FAILED' if failures else 'ok'}")
    return failures, {"stage": stage, "bf16": bf16, "momenta": momenta, "checks": all_checks}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, required=True, choices=[1, 2, 3])
    parser.add_argument("--out", required=True)
    parser.add_argument("--ckpt-dir", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtypes", default="fp32", help="comma-separated: fp32, bf16 (run in this order)")
    parser.add_argument("--local_rank", type=int, default=0)  # added by the DeepSpeed launcher
    args = parser.parse_args()
    dtypes = args.dtypes.split(",")
    if not set(dtypes) <= {"fp32", "bf16"}:
        parser.error(f"--dtypes {args.dtypes!r}: expected fp32 and/or bf16")

    log("imports done")
    deepspeed.init_distributed()
    failures, cases = [], []
    for name in dtypes:
        case_failures, summary = run_case(args.stage, name == "bf16", args.steps,
                                          os.path.join(args.ckpt_dir, name))
        failures += case_failures
        cases.append(summary)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps({"stage": args.stage, "world_size": dist.get_world_size(),
                                              "ok": not failures, "failures": failures, "cases": cases},
                                             indent=1))
    dist.barrier()
    if failures:
        raise SystemExit("\n".join(failures))


if __name__ == "__main__":
    run_and_exit(main)  # then release /dev/shm, destroy the process group, exit without finalization
