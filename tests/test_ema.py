"""Tests of mimscale.ema: momentum schedules, single-process EMA numerics, and real 2-rank DeepSpeed runs
(ZeRO-1/2/3) checking the teacher against the EMA recurrence on the student's consolidated weights."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port
from torch import nn

from mimscale.ema import EMATeacher, MomentumSchedule, consolidate_state_dicts, make_teacher

REPO = Path(__file__).resolve().parents[1]
DIST_SCRIPT = REPO / "tests" / "dist_scripts" / "ema_check.py"


# ---------------------------------------------------------------------------------------------- schedules
def test_cosine_schedule_endpoints_and_midpoint() -> None:
    s = MomentumSchedule("cosine", base=0.996, final=1.0)
    assert s(0, 100) == pytest.approx(0.996, abs=1e-15)
    assert s(50, 100) == pytest.approx(0.998, abs=1e-12)
    assert s(100, 100) == pytest.approx(1.0, abs=1e-15)
    assert s(1000, 100) == pytest.approx(1.0, abs=1e-15)  # past the end: stays at final


def test_cosine_schedule_matches_ibot_cosine_scheduler() -> None:
    # iBOT/DINO: final + 0.5 * (base - final) * (1 + cos(pi * i / len(iters))), i in arange(total).
    base, final, total = 0.996, 1.0, 37
    s = MomentumSchedule("cosine", base, final)
    for i in range(total):
        expected = final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / total))
        assert s(i, total) == pytest.approx(expected, abs=1e-15)


def test_linear_schedule_ramps_then_holds() -> None:
    s = MomentumSchedule("linear", base=0.999, final=0.9999, ramp_steps=1000)
    assert s(0, 10**6) == pytest.approx(0.999)
    assert s(500, 10**6) == pytest.approx((0.999 + 0.9999) / 2)
    assert s(1000, 10**6) == pytest.approx(0.9999)
    assert s(5000, 10**6) == pytest.approx(0.9999)
    assert MomentumSchedule("linear", 0.9, 1.0)(5, 10) == pytest.approx(0.95)  # horizon = total_steps
    assert MomentumSchedule("linear", 0.9, 1.0, ramp_steps=0)(0, 10) == 1.0


def test_cosine_ramp_steps_sets_the_horizon() -> None:
    s = MomentumSchedule("cosine", 0.99, 1.0, ramp_steps=10)
    assert s(5, 1000) == pytest.approx(0.995)
    assert s(10, 1000) == s(999, 1000) == pytest.approx(1.0)


def test_constant_schedule() -> None:
    s = MomentumSchedule("constant", base=0.9998)
    assert {s(i, 50) for i in range(60)} == {0.9998}


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_schedules_are_monotonic(kind: str) -> None:
    s = MomentumSchedule(kind, base=0.99, final=1.0)
    values = [s(i, 200) for i in range(260)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[0] == 0.99 and values[-1] == 1.0


@pytest.mark.parametrize("kwargs, error", [
    (dict(kind="exp"), "kind"),
    (dict(base=1.5), "base"),
    (dict(base=-0.1), "base"),
    (dict(final=2), "final"),
    (dict(base=True), "base"),
    (dict(kind="constant", ramp_steps=10), "ramp_steps"),
    (dict(ramp_steps=-1), "ramp_steps"),
])
def test_schedule_rejects_bad_arguments(kwargs: dict, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        MomentumSchedule(**kwargs)


def test_schedule_rejects_bad_steps() -> None:
    s = MomentumSchedule()
    with pytest.raises(ValueError, match="step"):
        s(-1, 10)
    with pytest.raises(ValueError, match="total_steps"):
        s(0, 0)
    with pytest.raises(TypeError, match="step"):
        s(1.5, 10)
    with pytest.raises(TypeError, match="ramp_steps"):
        MomentumSchedule(ramp_steps=2.5)


# ---------------------------------------------------------------------------------------------- teacher
def _student() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.BatchNorm1d(6), nn.Linear(6, 3))


class _Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.student = _student()
        self.teacher = make_teacher(self.student)


def test_make_teacher_is_a_frozen_copy_that_stays_in_eval() -> None:
    holder = _Holder()
    s, t = holder.student, holder.teacher
    for (n, ps), (_, pt) in zip(s.named_parameters(), t.named_parameters()):
        assert ps is not pt and torch.equal(ps, pt), n
        assert not pt.requires_grad and pt.grad is None
    assert not t.training
    holder.train()
    assert t.training  # nn.Module.train() recurses; the teacher's pre-hook undoes it at its next forward
    with torch.no_grad():
        t(torch.randn(5, 4))
    assert not any(m.training for m in t.modules())
    assert torch.equal(t[2].running_mean, s[2].running_mean)  # eval-mode BatchNorm did not update


def test_make_teacher_refuses_partitioned_students() -> None:
    student = nn.Linear(2, 2)
    student.weight.ds_id = 0
    with pytest.raises(RuntimeError, match="zero.Init"):
        make_teacher(student)


def _perturb(module: nn.Module, scale: float = 0.1) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


def test_update_follows_the_recurrence_on_parameters_and_buffers() -> None:
    holder = _Holder()
    s, t = holder.student, holder.teacher
    schedule = MomentumSchedule("cosine", base=0.8, final=1.0)
    ema = EMATeacher(s, t, schedule)
    ref = {n: v.detach().double().clone() for n, v in t.state_dict().items() if v.is_floating_point()}
    total = 5
    for step in range(1, total + 1):
        _perturb(s)
        s.train()
        s(torch.randn(8, 4))  # moves the BatchNorm running statistics and its integer counter
        m = ema.update(step, total)
        assert m == schedule(step - 1, total) == ema.momentum and ema.step == step
        for n, v in s.state_dict().items():
            if v.is_floating_point():
                ref[n] = m * ref[n] + (1 - m) * v.double()
    got = t.state_dict()
    for n, v in ref.items():
        torch.testing.assert_close(got[n].double(), v, rtol=0, atol=1e-6, msg=n)
    assert int(got["2.num_batches_tracked"]) == int(s[2].num_batches_tracked) == total
    assert not (got["0.weight"] - s[0].weight).abs().max() < 1e-3  # really an average, not a copy


def test_include_buffers_false_leaves_buffers_alone() -> None:
    holder = _Holder()
    s, t = holder.student, holder.teacher
    s.train()
    s(torch.randn(8, 4))
    EMATeacher(s, t, MomentumSchedule("constant", base=0.5), include_buffers=False).update(1, 1)
    assert torch.equal(t[2].running_mean, torch.zeros(6)) and int(t[2].num_batches_tracked) == 0


def test_fp32_shadow_keeps_a_bf16_teacher_moving() -> None:
    # With m = 0.9998, (1 - m) * (student - teacher) = 1e-4 is below bf16's resolution at 1 (2^-7):
    # an in-place bf16 EMA never moves; the fp32 shadow accumulates and the teacher follows.
    student = nn.Linear(1, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        student.weight.fill_(1.5)
    teacher = make_teacher(student)
    with torch.no_grad():
        teacher.weight.fill_(1.0)
    naive = teacher.weight.detach().clone()
    ema = EMATeacher(student, teacher, MomentumSchedule("constant", base=0.9998))
    for step in range(1, 1001):
        naive.mul_(0.9998).add_(student.weight.detach(), alpha=1 - 0.9998)
        ema.update(step, 1000)
    assert float(naive) == 1.0
    expected = 1.5 - 0.5 * 0.9998**1000
    assert teacher.weight.dtype == torch.bfloat16
    assert abs(float(teacher.weight) - expected) <= 2**-8 * expected
    assert ema.state_dict()["params"]["weight"].dtype == torch.float32


def test_mismatched_structures_are_named() -> None:
    student = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    with pytest.raises(ValueError, match=r"only in the student \['1.bias', '1.weight'\]"):
        EMATeacher(student, make_teacher(nn.Sequential(nn.Linear(2, 3))), MomentumSchedule())
    with pytest.raises(ValueError, match="'1.weight' has shape"):
        EMATeacher(student, make_teacher(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))), MomentumSchedule())
    with pytest.raises(ValueError, match="require grad"):
        EMATeacher(student, nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1)), MomentumSchedule())
    with pytest.raises(ValueError, match="same module"):
        EMATeacher(student, student, MomentumSchedule())
    with pytest.raises(ValueError, match="step"):
        EMATeacher(student, make_teacher(student), MomentumSchedule()).update(0, 10)


def test_ema_is_not_registered_as_a_submodule() -> None:
    holder = _Holder()
    holder.ema = EMATeacher(holder.student, holder.teacher, MomentumSchedule())
    names = [n for n, _ in holder.named_modules()]
    assert "ema" not in names and not any(n.startswith("ema.") for n in names)
    assert set(holder.state_dict()) == set(_Holder().state_dict())


def test_state_dict_round_trip_restores_shadow_and_teacher() -> None:
    holder = _Holder()
    ema = EMATeacher(holder.student, holder.teacher, MomentumSchedule("cosine", 0.5, 1.0))
    for step in (1, 2):
        _perturb(holder.student)
        ema.update(step, 4)
    state = ema.state_dict()
    saved_teacher = {n: v.clone() for n, v in holder.teacher.state_dict().items()}
    _perturb(holder.student)
    ema.update(3, 4)
    assert not torch.equal(holder.teacher[0].weight, saved_teacher["0.weight"])

    fresh = _Holder()  # a new process: different modules, shadow not yet created
    _perturb(fresh.teacher)
    ema2 = EMATeacher(fresh.student, fresh.teacher, MomentumSchedule("cosine", 0.5, 1.0))
    ema2.load_state_dict(state)
    for n, v in fresh.teacher.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, saved_teacher[n], rtol=0, atol=0, msg=n)
    assert ema2.step == 2 and ema2.momentum == state["momentum"]
    # The state is a copy: later updates do not change what was saved.
    torch.testing.assert_close(state["params"]["0.weight"], saved_teacher["0.weight"], rtol=0, atol=0)

    bad = dict(state, params={k: v for k, v in state["params"].items() if k != "0.bias"})
    with pytest.raises(ValueError, match="0.bias"):
        ema2.load_state_dict(bad)
    with pytest.raises(ValueError, match="version"):
        ema2.load_state_dict(dict(state, version=99))


def test_consolidate_merges_zero3_shards_and_loads_anywhere() -> None:
    full = torch.arange(7, dtype=torch.float32).reshape(7, 1)  # 7 elements over 2 ranks: padded to 8
    shards = [full.flatten()[:4], torch.cat([full.flatten()[4:], torch.zeros(1)])]
    states = [{
        "version": 1, "rank": r, "step": 3, "momentum": 0.99, "schedule": None,
        "params": {"weight": shards[r]}, "buffers": {},
        "layout": {"weight": {"shape": [7, 1], "partition": [r, 2]}},
    } for r in (1, 0)]
    merged = consolidate_state_dicts(states)
    assert torch.equal(merged["params"]["weight"], full) and merged["layout"]["weight"]["partition"] is None
    # A full state loads into an unpartitioned teacher.
    student = nn.Linear(1, 7, bias=False)
    ema = EMATeacher(student, make_teacher(student), MomentumSchedule())
    ema.load_state_dict(merged)
    assert torch.equal(ema.teacher.weight, full) and ema.step == 3
    # A shard cannot, and an incomplete set of shards cannot be merged.
    with pytest.raises(ValueError, match="consolidate_state_dicts"):
        ema.load_state_dict(states[0])
    with pytest.raises(ValueError, match="partitions 0..1"):
        consolidate_state_dicts(states[:1])


def test_reset_from_student_copies_the_student() -> None:
    student = _student()
    teacher = make_teacher(_student())
    _perturb(teacher)
    ema = EMATeacher(student, teacher, MomentumSchedule())
    ema.reset_from_student()
    for (n, ps), (_, pt) in zip(student.named_parameters(), teacher.named_parameters()):
        assert torch.equal(ps, pt), n


# ---------------------------------------------------------------------------------------------- 2 ranks
@pytest.mark.distributed
@pytest.mark.parametrize("stage, dtypes", [(1, "fp32"), (2, "fp32"), (3, "fp32,bf16")],
                         ids=["zero1", "zero2", "zero3"])
def test_teacher_matches_ema_of_consolidated_student_on_two_ranks(tmp_path: Path, stage: int,
                                                                  dtypes: str) -> None:
    """A real `deepspeed --num_gpus 2` run: after k steps (and a checkpoint save/load into a fresh engine)
    the teacher equals the EMA recurrence applied to the student's consolidated weights on every rank.
    ZeRO-3 also runs in bf16, where only the fp32 master partition as the EMA's source passes."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
           "--master_port", str(free_port()), str(DIST_SCRIPT), "--stage", str(stage), "--dtypes", dtypes,
           "--out", str(out), "--ckpt-dir", str(tmp_path / "ckpt")]
    try:
        # ~25 s on an idle 2-core machine; the limit leaves room for a machine shared with other jobs.
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"timed out after {exc.timeout}s:\n{exc.stdout or ''}\n{exc.stderr or ''}")
    log = f"$ {' '.join(cmd)}\n--- stdout ---\n{proc.stdout[-20000:]}\n--- stderr ---\n{proc.stderr[-20000:]}"
    if proc.returncode != 0 or not out.exists():
        print(log)
        pytest.fail(f"ema_check.py failed with exit code {proc.returncode} (output above)")
    result = json.loads(out.read_text())
    assert result["ok"], result["failures"]
    assert result["world_size"] == 2 and result["stage"] == stage
    assert [c["bf16"] for c in result["cases"]] == [d == "bf16" for d in dtypes.split(",")]
    assert all(len(c["momenta"]) == 4 for c in result["cases"])
