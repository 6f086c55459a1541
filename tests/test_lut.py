"""Tests of LUT (mimscale.methods.lut): masking, losses against independent implementations of the
official formulas, the MAE part, the EMA teacher, synchronised BatchNorm heads on 2 ranks, and a 2-rank
ZeRO-3 ``--smoke`` run of ``recipes/lut_vitb.py`` that is relaunched (resume) and exported to timm."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import rank_states, tiny
from torch import nn

from mimscale import create_method
from mimscale.masking import RandomMasker
from mimscale.methods.lut import LUT, broader_context_loss, disjoint_view_masks
from mimscale.models.heads import AllReduceBatchNorm1d, BYOLProjectionMLP

REPO = Path(__file__).resolve().parents[1]
DIST_SCRIPT = REPO / "tests" / "dist_scripts" / "lut_check.py"
TINY = tiny(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)
L = 64  # patches of the tiny model (8 x 8)


def tiny_lut(seed: int = 0, **kwargs) -> LUT:
    torch.manual_seed(seed)
    return create_method("lut", **{**TINY, "head_hidden_dim": 48, **kwargs})


def views(b: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 32, 32, generator=g), torch.randn(b, 3, 32, 32, generator=g)


def kept(mask: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(~row).flatten().tolist()) for row in mask]


# ---------------------------------------------------------------------------------------------- masking
def test_two_views_keep_disjoint_ranks_of_one_noise_draw() -> None:
    method = tiny_lut()
    k = int(L * (1 - 0.75))
    ids_shuffle = method.masker.noise_ranks(8, generator=torch.Generator().manual_seed(5))
    m1, m2 = method.view_masks(8, generator=torch.Generator().manual_seed(5))
    for row, a, b in zip(ids_shuffle, kept(m1), kept(m2)):
        assert a == set(row[:k].tolist()) and b == set(row[k:2 * k].tolist())  # official random_masking
        assert len(a) == len(b) == k and not a & b
    # View 1 is exactly MAE's mask for the same draw.
    assert torch.equal(m1, RandomMasker((8, 8), 0.75)(8, generator=torch.Generator().manual_seed(5)))
    # r = 0.5 still fits (k = L / 2): the views partition the image.
    a, b = disjoint_view_masks(ids_shuffle, L // 2)
    assert torch.equal(a, ~b)
    with pytest.raises(ValueError, match="num_keep=33"):
        disjoint_view_masks(ids_shuffle, 33)


def test_a_given_view1_mask_gets_a_disjoint_view2() -> None:
    method = tiny_lut()
    m1 = RandomMasker((8, 8), 0.75)(6, generator=torch.Generator().manual_seed(2))
    got1, got2 = method.view_masks(6, m1)
    assert torch.equal(got1, m1)
    for a, b in zip(kept(got1), kept(got2)):
        assert len(a) == len(b) == 16 and not a & b
    with pytest.raises(ValueError, match="disjoint"):
        method.view_masks(6, (m1, m1))
    other = m1.clone()
    other[0, torch.nonzero(other[0])[0]] = False  # one more kept patch in sample 0
    with pytest.raises(ValueError, match="same number"):
        method.view_masks(6, other)


def test_mask_ratio_below_half_is_rejected_with_its_value() -> None:
    with pytest.raises(ValueError, match=r"mask_ratio=0\.4"):
        tiny_lut(mask_ratio=0.4)
    tiny_lut(mask_ratio=0.5)


def test_a_single_tensor_is_rejected_clearly() -> None:
    method = tiny_lut()
    with pytest.raises(ValueError, match="two augmented views.*single tensor of shape"):
        method(views()[0])
    with pytest.raises(ValueError, match="length 3"):
        method(list(views()) + [views()[0]])


# ---------------------------------------------------------------------------------------------- losses
def official_bc_loss(student_output: torch.Tensor, teacher_output: torch.Tensor) -> torch.Tensor:
    """engine_lut.py, written out: outputs are cat([q1, q2]); pairs (teacher iq, student v) with v != iq."""
    def loss_ftn(o1: torch.Tensor, o2: torch.Tensor) -> torch.Tensor:
        o1 = o1 / o1.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        o2 = o2 / o2.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return 2 - 2 * (o1 * o2).sum(dim=-1)

    student_outs, teacher_outs = student_output.chunk(2), teacher_output.detach().chunk(2)
    total, terms = 0.0, 0
    for iq, q in enumerate(teacher_outs):
        for v in range(len(student_outs)):
            if v == iq:
                continue
            total = total + loss_ftn(student_outs[v], q).mean()
            terms += 1
    return total / terms


def test_broader_context_loss_matches_the_official_formula() -> None:
    g = torch.Generator().manual_seed(0)
    s1, s2, t1, t2 = (torch.randn(6, 10, generator=g, dtype=torch.float64) for _ in range(4))
    got = broader_context_loss((s1, s2), (t1, t2))
    want = official_bc_loss(torch.cat([s1, s2]), torch.cat([t1, t2]))
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
    # Cross-view pairing: swapping the teacher's views changes it; identical embeddings give 0.
    assert not torch.isclose(got.double(), official_bc_loss(torch.cat([s1, s2]), torch.cat([t2, t1])))
    assert float(broader_context_loss((t2, t1), (t1, t2))) == pytest.approx(0.0, abs=1e-6)


def plain_mlp(mlp: nn.Sequential, x: torch.Tensor, train: bool) -> torch.Tensor:
    """Linear -> BatchNorm (batch stats, biased variance, or running stats) -> ReLU -> Linear, by hand."""
    h = x @ mlp[0].weight.T
    bn = mlp[1]
    if train:
        mean, var = h.mean(0), h.var(0, unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    h = (h - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias
    return h.clamp_min(0) @ mlp[3].weight.T


def test_loss_equals_an_independent_forward_with_the_official_formula() -> None:
    method = tiny_lut()
    method.train()
    v1, v2 = views()
    m1, m2 = method.view_masks(4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        # Official forward_encoder: each view through the blocks separately, CLS dropped before the mean.
        ids1 = torch.nonzero(~m1)[:, 1].view(4, -1)
        ids2 = torch.nonzero(~m2)[:, 1].view(4, -1)
        z1 = method.encoder(v1, ids_keep=ids1)[0][:, 1:].mean(1)
        z2 = method.encoder(v2, ids_keep=ids2)[0][:, 1:].mean(1)
        q1 = plain_mlp(method.predictor, plain_mlp(method.head, z1, True), True)
        q2 = plain_mlp(method.predictor, plain_mlp(method.head, z2, True), True)
        t1 = plain_mlp(method.teacher.head, method.teacher.encoder(v1)[0][:, 1:].mean(1), False)
        t2 = plain_mlp(method.teacher.head, method.teacher.encoder(v2)[0][:, 1:].mean(1), False)
        want_bc = official_bc_loss(torch.cat([q1, q2]), torch.cat([t1, t2]))
    out = method((v1, v2), mask=(m1, m2))
    torch.testing.assert_close(out.metrics["loss_bc"], want_bc, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.loss, out.metrics["loss_mae"] + 0.25 * out.metrics["loss_bc"], rtol=0,
                               atol=1e-6)
    assert float(out.metrics["ema_momentum"]) == pytest.approx(0.996)
    assert torch.equal(out.mask, m1)


def test_mae_part_equals_mae_on_view1_with_the_same_mask() -> None:
    method = tiny_lut()
    torch.manual_seed(123)
    mae = create_method("mae", **TINY)
    state = {k: v for k, v in method.state_dict().items() if k.startswith(("encoder.", "decoder."))}
    mae.load_state_dict(state, strict=True)
    v1, v2 = views()
    m1 = RandomMasker((8, 8), 0.75)(4, generator=torch.Generator().manual_seed(4))
    out = method((v1, v2), mask=m1)
    ref = mae(v1, mask=m1)
    torch.testing.assert_close(out.metrics["loss_mae"], ref.loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.pred, ref.pred, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.target, ref.target, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- teacher
def test_teacher_gets_no_grads_and_stays_in_eval() -> None:
    method = tiny_lut(w_mae=0.0)  # only the BYOL loss: it must still reach the student encoder
    method.train()
    assert not method.teacher.training and not any(m.training for m in method.teacher.modules())
    before = {n: b.clone() for n, b in method.teacher.named_buffers()}
    out = method(views())
    out.loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in method.teacher.parameters())
    for n, b in method.teacher.named_buffers():
        assert torch.equal(b, before[n]), f"teacher buffer {n} moved: BatchNorm ran in training mode"
    assert method.encoder.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.predictor.parameters())
    # The heads and teacher are what the official model builds.
    assert [type(m) for m in method.head] == [nn.Linear, AllReduceBatchNorm1d, nn.ReLU, nn.Linear]
    assert method.head[0].bias is None and method.head[3].bias is None
    assert set(dict(method.teacher.named_children())) == {"encoder", "head"}  # no predictor, no decoder


def test_defaults_follow_the_official_recipe() -> None:
    method = create_method("lut", **TINY)
    assert LUT.views == 2 and method.w_mae == 1.0 and method.w_bc == 0.25
    assert method.masker.mask_ratio == 0.75 and method.norm_pix_loss
    assert method.head[0].weight.shape == (4096, 64) and method.predictor[3].weight.shape == (64, 4096)
    s = method.ema.schedule
    assert (s.kind, s.base, s.final) == ("cosine", 0.996, 1.0) and method.ema.include_buffers
    assert method.head[1].sync and method.predictor[1].sync
    assert method.export_spec()[2] == "encoder.backbone."


def test_ema_update_averages_parameters_and_batchnorm_buffers() -> None:
    method = tiny_lut()
    method.train()
    teacher_before = {n: v.clone() for n, v in method.teacher.state_dict().items()}
    with torch.no_grad():
        for p in method.head.parameters():
            p.add_(0.1)
    method(views())  # moves the student's BatchNorm running statistics
    student = {**{f"encoder.{k}": v for k, v in method.encoder.state_dict().items()},
               **{f"head.{k}": v for k, v in method.head.state_dict().items()}}
    method.after_optimizer_step(1, 100)
    m = method.ema.momentum
    assert m == pytest.approx(0.996)
    for n, v in method.teacher.state_dict().items():
        if v.is_floating_point():
            want = m * teacher_before[n] + (1 - m) * student[n]
            torch.testing.assert_close(v, want, rtol=0, atol=1e-6, msg=n)
    assert not torch.equal(method.teacher.head[1].running_mean, teacher_before["head.1.running_mean"])


def test_sharded_state_round_trip_restores_the_teacher() -> None:
    a = tiny_lut()
    a.train()
    a(views())
    with torch.no_grad():
        a.head[0].weight.add_(1.0)
    a.after_optimizer_step(3, 10)
    state = a.sharded_state_dict()
    b = tiny_lut()
    b.load_sharded_state_dict(state)
    for (n, ta), tb in zip(a.teacher.state_dict().items(), b.teacher.state_dict().values()):
        # Integer buffers (num_batches_tracked) are copied from the student, which DeepSpeed restores.
        assert torch.equal(ta, tb) or not ta.is_floating_point(), n
    assert b.ema.step == 3 and b.ema.momentum == a.ema.momentum
    with pytest.raises(KeyError, match="ema"):
        b.load_sharded_state_dict({})


def test_reconstruct_uses_view1() -> None:
    method = tiny_lut()
    v1, v2 = views()
    out = method((v1, v2))
    rows = method.reconstruct((v1, v2), out)
    assert torch.equal(rows["original"], v1) and rows["reconstruction"].shape == v1.shape


# ---------------------------------------------------------------------------------------------- heads
def test_all_reduce_batchnorm_is_batchnorm_in_one_process() -> None:
    torch.manual_seed(0)
    ours = BYOLProjectionMLP(8, 16, 5)
    ref = nn.Sequential(nn.Linear(8, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(),
                        nn.Linear(16, 5, bias=False))
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(9, 8) * 2 + 1
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(9, 5)
    (ours(xa) * g).sum().backward()
    (ref(xb) * g).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=1e-6)
    for (n, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=n)
    for (n, pa), pb in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=0, atol=1e-5, msg=n)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-6)
    # Mixed precision as DeepSpeed leaves it (bf16 weights, fp32 buffers): fp32 arithmetic, bf16 out.
    ours[1].weight.data, ours[1].bias.data = ours[1].weight.data.bfloat16(), ours[1].bias.data.bfloat16()
    assert ours[1](torch.randn(4, 16).bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="more than 1 sample"):
        ours.train()(torch.randn(1, 8))


# ---------------------------------------------------------------------------------------------- 2 ranks
def _deepspeed(args: list[str]) -> str:
    """A 2-rank job through the shared launcher helper (one OpenMP thread per rank); its whole output."""
    from distributed_launch import run_deepspeed

    proc = run_deepspeed(args[0], args[1:], timeout=600)
    return proc.stdout + proc.stderr


@pytest.mark.distributed
def test_heads_are_synchronised_across_two_ranks(tmp_path: Path) -> None:
    """BatchNorm heads with different data per rank equal one BatchNorm on the union batch (outputs,
    running stats identical on both ranks, gradients), standalone and inside LUT under ZeRO-3."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "result.json"
    _deepspeed([str(DIST_SCRIPT), "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["ok"], result["failures"]
    assert result["world_size"] == 2 and result["checks"]["momentum"] == pytest.approx(0.996)


def _ema_states(tag_dir: Path) -> list[dict]:
    return rank_states(tag_dir, "ema")


@pytest.mark.distributed
def test_recipe_smoke_zero3_resumes_with_the_teacher_and_exports_to_timm(tmp_path: Path) -> None:
    """`recipes/lut_vitb.py --smoke` on 2 ranks under ZeRO-3: 20 steps (checkpoints at 10 and 20), then a
    relaunch to 30 that resumes at 20. The step-21 checkpoint proves the teacher was restored: teacher_21
    equals m * teacher_20 + (1 - m) * student_21, buffers (BatchNorm statistics) included. Then export."""
    pytest.importorskip("deepspeed")
    from mimscale.ema import MomentumSchedule, consolidate_state_dicts
    from mimscale.export import consolidate, export_checkpoint, load_timm_encoder

    run = tmp_path / "run"
    base = ["recipes/lut_vitb.py", "--ds_config", "zero3.json", "--smoke", "--output_dir", str(run)]
    log1 = _deepspeed(base + ["--max_steps", "20"])
    ckpts = run / "checkpoints"
    assert "fresh start" in log1
    assert (ckpts / "step_00000010").is_dir() and (ckpts / "step_00000020").is_dir()
    # Relaunch: a checkpoint at 21 as well (kept with 20 and 30) to check the restored teacher.
    log2 = _deepspeed(base + ["--max_steps", "30", "--set", "ckpt_interval=21",
                              "--set", "keep_checkpoints=3"])
    assert "resuming at step 20" in log2

    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [5, 10, 15, 20, 25, 30]
    for m in metrics:
        assert all(math.isfinite(m[k]) for k in ("loss", "loss_mae", "loss_bc", "ema_momentum")), m
    assert metrics[-1]["loss_bc"] < metrics[0]["loss_bc"]
    assert 0.996 <= metrics[0]["ema_momentum"] < metrics[-1]["ema_momentum"] < 1.0

    total = 40  # --smoke: 4 epochs of 10 steps
    m21 = MomentumSchedule("cosine", 0.996, 1.0)(20, total)
    sd20, sd21 = consolidate(ckpts, "step_00000020"), consolidate(ckpts, "step_00000021")
    teacher_keys = [k for k, v in sd21.items() if k.startswith("teacher.") and v.is_floating_point()]
    assert any("head.1.running_var" in k for k in teacher_keys) and len(teacher_keys) > 30
    for k in teacher_keys:
        want = m21 * sd20[k].double() + (1 - m21) * sd21[k[len("teacher."):]].double()
        torch.testing.assert_close(sd21[k].double(), want, rtol=0, atol=1e-6, msg=k)

    sd30 = consolidate(ckpts, "step_00000030")
    for step, sd in ((20, sd20), (30, sd30)):
        states = _ema_states(ckpts / f"step_{step:08d}")
        assert len(states) == 2 and states[0]["step"] == step
        # Synchronised BatchNorm: both ranks' students (different data) kept identical statistics.
        for name, buf in states[0]["buffers"].items():
            assert torch.equal(buf, states[1]["buffers"][name]), name
        shadow = consolidate_state_dicts(states)  # the fp32 shadow is what the teacher holds
        for name, value in shadow["params"].items():
            torch.testing.assert_close(sd[f"teacher.{name}"], value, rtol=0, atol=0, msg=name)

    path = tmp_path / "lut.safetensors"
    export_checkpoint(run, path, encoder_only=True)
    model = load_timm_encoder(path)  # strict
    assert type(model).__name__ == "VisionTransformer" and model.embed_dim == 64
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight,
                               sd30["encoder.backbone.blocks.0.attn.qkv.weight"], rtol=0, atol=0)
    assert model.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 65, 64)


def test_smoke_kwargs_shrink_the_heads() -> None:
    assert LUT.smoke_kwargs["head_hidden_dim"] < 4096
    method = create_method("lut", **{**TINY, **LUT.smoke_kwargs})
    assert method.head[0].weight.shape[0] == LUT.smoke_kwargs["head_hidden_dim"]
