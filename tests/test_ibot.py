"""Tests of iBOT (mimscale.methods.ibot): the CLS and patch losses and the centre updates against an
independent implementation of the official formulas (``iBOTLoss`` in bytedance/ibot ``main_ibot.py``),
multi-crop batching with smaller local crops, masking, the teacher, the frozen last layer, the views,
the centre all-reduce on 2 ranks, and 2-rank ``--smoke`` runs of ``recipes/ibot_vitb.py`` (ZeRO-2 and
ZeRO-3) that are relaunched (resume) and exported to timm."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import rank_states, tiny
from PIL import Image

from mimscale import create_method
from mimscale.data.views import multicrop_views
from mimscale.methods.ibot import IBOT, IBOTLoss, teacher_temperature
from mimscale.models.heads import DINOHead
from mimscale.models.pos_embed import resample_patch_pos_embed

REPO = Path(__file__).resolve().parents[1]
DIST_SCRIPT = REPO / "tests" / "dist_scripts" / "ibot_check.py"
TINY = tiny(out_dim=96, head_hidden_dim=64, head_bottleneck_dim=32, drop_path_rate=0.0)
L = 64  # patches of the tiny model (8 x 8)


def tiny_ibot(seed: int = 0, **kwargs) -> IBOT:
    torch.manual_seed(seed)
    return create_method("ibot", **{**TINY, "num_local_crops": 2, **kwargs})


def crops(b: int = 3, n_local: int = 2, local: int = 12, seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    glob = [torch.randn(b, 3, 32, 32, generator=g) for _ in range(2)]
    return (*glob, *[torch.randn(b, 3, local, local, generator=g) for _ in range(n_local)])


def some_masks(rows: int, seed: int = 2) -> torch.Tensor:
    """Masks with varied counts: an empty row, a full-ish row, random rows."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, L, generator=g) < torch.rand(rows, 1, generator=g) * 0.6
    mask[0] = False
    mask[-1, :40] = True
    return mask


# ---------------------------------------------------------------------------------------------- official
def official_losses(
    student_cls,
    student_patch,
    teacher_cls,
    teacher_patch,
    masks,
    center,
    center2,
    ngcrops,
    temp,
    temp2,
    student_temp=0.1,
    lambda1=1.0,
    lambda2=1.0,
):
    """``iBOTLoss.forward`` of bytedance/ibot, written out: student_cls ``[ncrops * B, K]``, student_patch
    ``[ngcrops * B, L, K]`` (every patch), masks a list of ``ngcrops`` ``[B, L]``."""
    ncrops = student_cls.shape[0] // masks[0].shape[0]
    s_cls = (student_cls / student_temp).chunk(ncrops)
    s_patch = (student_patch / student_temp).chunk(ngcrops)
    t_cls = F.softmax((teacher_cls - center) / temp, dim=-1).chunk(ngcrops)
    t_patch = F.softmax((teacher_patch - center2) / temp2, dim=-1).chunk(ngcrops)
    total1, n1, total2, n2 = 0.0, 0, 0.0, 0
    for q in range(ngcrops):
        for v in range(ncrops):
            if v == q:
                ce = torch.sum(-t_patch[q] * F.log_softmax(s_patch[v], dim=-1), dim=-1)
                m = masks[v].float()
                total2 = total2 + (torch.sum(ce * m, dim=-1) / m.sum(dim=-1).clamp(min=1.0)).mean()
                n2 += 1
            else:
                total1 = total1 + torch.sum(-t_cls[q] * F.log_softmax(s_cls[v], dim=-1), dim=-1).mean()
                n1 += 1
    return total1 / n1 * lambda1, total2 / n2 * lambda2


def official_centers(center, center2, teacher_cls, teacher_patch, m=0.9, m2=0.9):
    """``iBOTLoss.update_center`` in one process (world size 1)."""
    cls_center = torch.sum(teacher_cls, dim=0, keepdim=True) / len(teacher_cls)
    patch_center = torch.sum(teacher_patch.mean(1), dim=0, keepdim=True) / len(teacher_patch)
    return center * m + cls_center * (1 - m), center2 * m2 + patch_center * (1 - m2)


def test_losses_and_centres_match_the_official_formulas() -> None:
    g = torch.Generator().manual_seed(0)
    ng, nl, b, k = 2, 3, 4, 32
    loss_fn = IBOTLoss(k, lambda1=0.7, lambda2=1.3).train()
    center, center2 = torch.zeros(1, k), torch.zeros(1, k)
    for step, (temp, temp2) in enumerate([(0.04, 0.05), (0.07, 0.06), (0.05, 0.07)]):
        s_cls = torch.randn((ng + nl) * b, k, generator=g)
        s_patch = torch.randn(ng * b, L, k, generator=g)
        t_cls = torch.randn(ng * b, k, generator=g) + 0.5 * step
        t_patch = torch.randn(ng * b, L, k, generator=g) - 0.3 * step
        mask = some_masks(ng * b, seed=step)
        got = loss_fn(s_cls, s_patch[mask], t_cls, t_patch, mask, ng, temp, temp2)
        want1, want2 = official_losses(
            s_cls,
            s_patch,
            t_cls,
            t_patch,
            list(mask.chunk(ng)),
            center,
            center2,
            ng,
            temp,
            temp2,
            lambda1=0.7,
            lambda2=1.3,
        )
        torch.testing.assert_close(got["cls"], want1, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["patch"], want2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["loss"], want1 + want2, rtol=1e-5, atol=1e-5)
        loss_fn.update_center()
        center, center2 = official_centers(center, center2, t_cls, t_patch)
        torch.testing.assert_close(loss_fn.center, center, rtol=0, atol=1e-6)
        torch.testing.assert_close(loss_fn.center2, center2, rtol=0, atol=1e-6)
    assert loss_fn.center.abs().max() > 0.05 and loss_fn.center2.abs().max() > 0.05  # really moved


def test_patch_loss_counts_images_without_masked_patches_in_the_mean() -> None:
    k = 8
    loss_fn = IBOTLoss(k).eval()
    mask = torch.zeros(4, L, dtype=torch.bool)
    mask[1, :5] = True  # one of 2 x 2 images has masked patches: the mean is over all four
    s_patch = torch.randn(4, L, k)
    t_patch = torch.randn(4, L, k)
    got = loss_fn(torch.randn(8, k), s_patch[mask], torch.randn(4, k), t_patch, mask, 2, 0.04, 0.04)
    ce = -(F.softmax(t_patch[1, :5] / 0.04, -1) * F.log_softmax(s_patch[1, :5] / 0.1, -1)).sum(-1)
    torch.testing.assert_close(got["patch"], ce.mean() / 4, rtol=1e-5, atol=1e-6)
    all_empty = loss_fn(
        torch.randn(8, k),
        torch.zeros(0, k),
        torch.randn(4, k),
        t_patch,
        torch.zeros(4, L, dtype=torch.bool),
        2,
        0.04,
        0.04,
    )
    assert all_empty["patch"].item() == 0.0
    assert loss_fn._pending is None  # eval mode: no centre statistics


def test_method_loss_equals_the_official_formula_on_full_student_outputs() -> None:
    """End to end: the method (head only on CLS and masked tokens) equals the official loss computed from
    the head applied to every token, for a given mask, with 2 local crops of 12 px, at epoch 3."""
    method = tiny_ibot().train()
    method.set_epoch_progress(35, 10)
    images = crops(b=3)
    mask = some_masks(6)
    out = method(images, mask=mask)
    temp = 0.04 + 0.03 * 3 / 29
    assert out.metrics["teacher_temp"].item() == pytest.approx(temp)
    with torch.no_grad():
        glob = torch.cat(images[:2])
        t = method.teacher.head(method.teacher.encoder(glob)[0])
        s = method.head(method.encoder(glob, mask=mask, mask_token=method.mask_token)[0])
        s_local = method.head(method.encoder(torch.cat(images[2:]))[0][:, 0])
        want1, want2 = official_losses(
            torch.cat([s[:, 0], s_local]),
            s[:, 1:],
            t[:, 0],
            t[:, 1:],
            list(mask.chunk(2)),
            torch.zeros(1, 96),
            torch.zeros(1, 96),
            2,
            temp,
            temp,
        )
    torch.testing.assert_close(out.metrics["loss_cls"], want1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.metrics["loss_patch"], want2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss.detach(), want1 + want2, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.mask, mask) and out.metrics["mask_ratio"].item() == pytest.approx(
        mask.float().mean()
    )


def test_teacher_temperature_follows_the_official_schedule() -> None:
    def official(warm, final, warm_epochs, nepochs, mim_start=0):
        if mim_start == 0:
            return np.concatenate(
                (np.linspace(warm, final, warm_epochs), np.ones(nepochs - warm_epochs) * final)
            )
        return np.concatenate(
            (
                np.ones(mim_start) * warm,
                np.linspace(warm, final, warm_epochs),
                np.ones(nepochs - warm_epochs - mim_start) * final,
            )
        )

    for warm_epochs, start in ((30, 0), (1, 0), (2, 0), (30, 50)):
        schedule = official(0.04, 0.07, warm_epochs, 400, start)
        got = [teacher_temperature(e, 0.04, 0.07, warm_epochs, start) for e in range(400)]
        np.testing.assert_allclose(got, schedule, rtol=0, atol=1e-12)
    assert teacher_temperature(29, 0.04, 0.07, 30) == pytest.approx(0.07)  # linspace includes its end
    assert teacher_temperature(10**6, 0.04, 0.07, 30) == 0.07


# ---------------------------------------------------------------------------------------------- multi-crop
def test_local_crops_of_another_size_batch_and_train() -> None:
    method = tiny_ibot(num_local_crops=3).train()
    assert method.views == 5
    images = (*crops(b=2, n_local=2, local=12), torch.randn(2, 3, 16, 16))  # two local sizes
    mask = torch.zeros(4, L, dtype=torch.bool)
    mask[:, ::3] = True
    out = method(images, mask=mask)
    assert math.isfinite(out.loss.item())
    out.loss.backward()
    named = dict(method.named_parameters())
    for name in (
        "mask_token",
        "encoder.backbone.pos_embed",
        "encoder.backbone.cls_token",
        "encoder.backbone.blocks.0.attn.qkv.weight",
        "head.mlp.0.weight",
        "head.last_layer.weight_v",
    ):
        assert named[name].grad is not None and named[name].grad.abs().sum() > 0, name
    assert named["head.last_layer.weight_g"].grad is None  # norm_last_layer: fixed at 1
    assert all(p.grad is None for p in method.teacher.parameters())
    # No local crops at all: the CLS loss pairs the two global crops only.
    method0 = tiny_ibot(num_local_crops=0)
    assert method0.views == 2 and math.isfinite(method0(crops(b=2, n_local=0)).loss.item())


def test_wrong_crop_counts_and_sizes_are_rejected_clearly() -> None:
    method = tiny_ibot()
    with pytest.raises(ValueError, match="4 crops .*got 3 crops.*num_local_crops"):
        method(crops(n_local=1))
    with pytest.raises(ValueError, match="got one tensor"):
        method(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="global crops"):
        method((torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16), *crops(b=2)[2:]))
    with pytest.raises(ValueError, match="mask shape"):
        method(crops(), mask=torch.zeros(3, L, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one global crop"):
        tiny_ibot(num_global_crops=1, num_local_crops=0)


def test_local_crops_use_the_official_position_interpolation() -> None:
    """DINO/iBOT's ``interpolate_pos_encoding``, written out, on the model's table; and the encoder's output
    for a 12 px crop equals blocks(CLS + its position, patches + the resampled table)."""
    method = tiny_ibot()
    enc = method.encoder
    pos = enc.backbone.pos_embed.detach()
    n, dim = pos.shape[1] - 1, pos.shape[-1]
    w0 = h0 = 12 // 4 + 0.1
    official = F.interpolate(
        pos[:, 1:].reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)),
        mode="bicubic",
    )
    official = official.permute(0, 2, 3, 1).reshape(1, -1, dim)
    got = resample_patch_pos_embed(pos[:, 1:], (8, 8), (3, 3))
    torch.testing.assert_close(got, official, rtol=0, atol=1e-6)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        tokens = enc.backbone.patch_embed.proj(x).flatten(2).transpose(1, 2) + official
        cls = (enc.backbone.cls_token + pos[:, :1]).expand(2, -1, -1)
        want = enc.backbone.norm(enc.backbone.blocks(torch.cat([cls, tokens], 1)))
        torch.testing.assert_close(enc(x)[0], want, rtol=1e-5, atol=1e-5)
        # Global crops take the parent's path: timm's own forward_features.
        y = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(enc(y)[0], enc.backbone.forward_features(y), rtol=1e-5, atol=1e-5)


def test_multicrop_views_build_the_official_augmentation() -> None:
    from mimscale.data.transforms import build_transform

    views = multicrop_views()
    assert [v.get("repeat", 1) for v in views] == [1, 1, 10]
    assert [v["blur"] for v in views] == [1.0, 0.1, 0.5] and views[1]["solarize"] == 0.2
    assert "solarize" not in views[0] and "solarize" not in views[2]
    assert views[0]["scale"] == [0.25, 1.0] and views[2]["scale"] == [0.05, 0.25]
    for v in views:
        assert v["color_jitter"] == {
            "brightness": 0.4,
            "contrast": 0.4,
            "saturation": 0.2,
            "hue": 0.1,
            "p": 0.8,
        }
        assert v["grayscale"] == 0.2 and v["hflip"] == 0.5
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 150, 3), dtype=np.uint8)).save(
        buf, "JPEG"
    )
    out = build_transform(multicrop_views(64, 32, num_local=3))(buf.getvalue(), np.random.default_rng(0))
    assert [a.shape for a in out] == [(3, 64, 64)] * 2 + [(3, 32, 32)] * 3
    assert all(a.dtype == np.uint8 for a in out)
    assert len(multicrop_views(num_local=0)) == 3 and multicrop_views(num_global=1)[-1]["repeat"] == 10


# ---------------------------------------------------------------------------------------------- masking
def test_masks_follow_ibots_per_image_ratio_distribution() -> None:
    method = create_method("ibot", **{**TINY, "img_size": 224, "patch_size": 16})  # the paper's 14 x 14 grid
    torch.manual_seed(0)
    b = 2000
    mask = method.draw_masks(2 * b)  # one row per global crop: drawn independently
    assert mask.shape == (2 * b, 196) and mask.dtype == torch.bool
    frac = mask.float().mean(1)
    assert abs((frac == 0).float().mean().item() - 0.5) < 0.03  # ratio 0 with probability 1/2
    nonzero = frac[frac > 0]
    assert nonzero.max() <= 0.5 + 1e-9  # U(0.1, 0.5) and no top-up: never above the target
    assert 0.25 < nonzero.mean().item() < 0.33  # a blockwise fill lands a little under U(0.1, 0.5)'s 0.3
    both_zero = ((frac[:b] == 0) & (frac[b:] == 0)).float().mean().item()
    assert abs(both_zero - 0.25) < 0.04  # the two crops of an image draw their ratios separately
    method.pred_start_epoch = 2
    method.set_epoch_progress(15, 10)  # epoch 1 < pred_start_epoch: no masking yet
    assert not method.draw_masks(8).any()
    assert method.teacher_temps()[1] == 0.04  # and the patch temperature waits for masking to start


# ---------------------------------------------------------------------------------------------- teacher
def test_teacher_is_frozen_in_eval_and_follows_the_ema() -> None:
    method = tiny_ibot().train()
    assert not method.teacher.training and not any(m.training for m in method.teacher.modules())
    assert all(not p.requires_grad for p in method.teacher.parameters())
    assert "mask_token" not in dict(method.teacher.named_parameters())  # as the official EMA pairing
    with torch.no_grad():
        for p in method.head.parameters():
            p.add_(0.1)
    before = {n: p.clone() for n, p in method.teacher.named_parameters()}
    method.after_optimizer_step(1, 100)  # momentum 0.996 at the first step
    for name, p in method.teacher.named_parameters():
        want = 0.996 * before[name] + 0.004 * dict(method.named_parameters())[name]
        torch.testing.assert_close(p, want, rtol=0, atol=1e-6, msg=name)
    state = method.sharded_state_dict()
    fresh = tiny_ibot(seed=5)
    fresh.load_sharded_state_dict(state)
    for (name, p), q in zip(method.teacher.named_parameters(), fresh.teacher.parameters()):
        assert torch.equal(p, q), name


def test_centres_are_float32_buffers_that_a_state_dict_carries() -> None:
    method = tiny_ibot().train()
    method(crops())
    method.after_optimizer_step(1, 10)
    centre = method.loss_fn.center.clone()
    method.bfloat16()
    assert method.loss_fn.center.dtype == method.loss_fn.center2.dtype == torch.float32
    assert torch.equal(method.loss_fn.center, centre)  # no bf16 round trip
    assert method.head.mlp[0].weight.dtype == torch.bfloat16
    sd = method.state_dict()
    assert torch.equal(sd["loss_fn.center"], centre) and "loss_fn.center2" in sd


def test_frozen_last_layer_and_weight_decay_groups() -> None:
    from mimscale.train.optim import param_groups

    method = tiny_ibot()
    frozen = method.lr_frozen_params(steps_per_epoch=37)
    assert frozen == {"head.last_layer.": 37}
    groups = param_groups(method, 0.04, method.no_weight_decay(), frozen)
    frozen_params = [p for g in groups if g["frozen_steps"] == 37 for p in g["params"]]
    assert len(frozen_params) == 1 and frozen_params[0] is method.head.last_layer.weight_v
    # As the official get_params_groups: biases and 1-D tensors undecayed; cls/pos/mask token decayed.
    decayed = {id(p) for g in groups if g["decay"] for p in g["params"]}
    assert id(method.mask_token) in decayed and id(method.encoder.backbone.pos_embed) in decayed
    assert id(method.head.mlp[0].bias) not in decayed
    assert tiny_ibot(freeze_last_layer=0).lr_frozen_params(37) == {}
    trainable_last = [
        n
        for n, p in tiny_ibot(norm_last_layer=False).named_parameters()
        if n.startswith("head.last_layer.") and p.requires_grad
    ]
    assert trainable_last == ["head.last_layer.weight_v", "head.last_layer.weight_g"]


def test_head_matches_torch_weight_norm_and_official_shapes() -> None:
    torch.manual_seed(0)
    head = DINOHead(64, out_dim=100, hidden_dim=48, bottleneck_dim=16)
    assert [m.out_features for m in head.mlp if isinstance(m, torch.nn.Linear)] == [48, 48, 16]
    ref = torch.nn.Linear(16, 100, bias=False)
    ref = torch.nn.utils.parametrizations.weight_norm(ref)
    with torch.no_grad():
        ref.parametrizations.weight.original0.copy_(head.last_layer.weight_g)
        ref.parametrizations.weight.original1.copy_(head.last_layer.weight_v)
    x = torch.randn(5, 7, 64)
    z = F.normalize(head.mlp(x), dim=-1)
    torch.testing.assert_close(head(x), ref(z), rtol=1e-5, atol=1e-6)
    # weight_g = 1: every logit is a cosine similarity, so |logit| <= 1.
    assert head(x).abs().max() <= 1 + 1e-5


def test_defaults_and_export_spec() -> None:
    method = create_method("ibot", img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4)
    assert method.views == 12 and method.head.last_layer.weight_v.shape == (8192, 256)
    assert method.head.mlp[0].out_features == 2048 and method.temps == (0.04, 0.07, 0.04, 0.07)
    assert method.encoder.timm_kwargs["drop_path_rate"] == 0.1
    assert method.masker.pred_ratio == (0.0, 0.3) and method.masker.pred_ratio_var == (0.0, 0.2)
    assert method.export_spec()[2] == "encoder.backbone."
    teacher_spec = tiny_ibot(export_teacher=True).export_spec()
    assert teacher_spec[2] == "teacher.encoder.backbone."
    keys = [k for k in tiny_ibot().state_dict() if k.startswith(teacher_spec[2])]
    assert "teacher.encoder.backbone.pos_embed" in keys
    small = create_method("ibot", **{**TINY, **IBOT.smoke_kwargs})
    assert small.head.last_layer.weight_v.shape[0] == IBOT.smoke_kwargs["out_dim"] < 8192


# ---------------------------------------------------------------------------------------------- 2 ranks
def _deepspeed(args: list[str]) -> str:
    """A 2-rank job through the shared launcher helper (one OpenMP thread per rank); its whole output."""
    from distributed_launch import run_deepspeed

    proc = run_deepspeed(args[0], args[1:], timeout=600)
    return proc.stdout + proc.stderr


@pytest.mark.distributed
def test_centres_are_all_reduced_over_two_ranks(tmp_path: Path) -> None:
    """Different data per rank -> identical centres on both ranks, equal to the EMA of the mean over the
    union (unequal batches in a plain module; ZeRO-3 with gradient accumulation through the engine)."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "result.json"
    _deepspeed([str(DIST_SCRIPT), "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["ok"], result["failures"]
    assert result["world_size"] == 2


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_recipe_smoke_resumes_with_teacher_and_centres_and_exports_to_timm(
    tmp_path: Path, stage: int
) -> None:
    """`recipes/ibot_vitb.py --smoke` on 2 ranks: 20 steps (checkpoints at 10 and 20), then a relaunch to 30
    that resumes at 20, logging every step and checkpointing at 21. Restored state, exactly:
    the centre used at step 21 is the step-20 checkpoint's (logged ``center_norm``), and the step-21
    teacher is ``m * teacher_20 + (1 - m) * student_21``. Then the encoder exports to timm (strict)."""
    pytest.importorskip("deepspeed")
    from mimscale.ema import MomentumSchedule, consolidate_state_dicts
    from mimscale.export import consolidate, export_checkpoint, load_timm_encoder

    run = tmp_path / "run"
    base = ["recipes/ibot_vitb.py", "--ds_config", f"zero{stage}.json", "--smoke", "--output_dir", str(run)]
    log1 = _deepspeed(base + ["--max_steps", "20"])
    assert "fresh start" in log1
    ckpts = run / "checkpoints"
    log2 = _deepspeed(
        base
        + [
            "--max_steps",
            "30",
            "--set",
            "log_interval=1",
            "--set",
            "ckpt_interval=21",
            "--set",
            "keep_checkpoints=4",
        ]
    )
    assert "resuming at step 20" in log2

    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [5, 10, 15, 20, *range(21, 31)]
    for m in metrics:
        assert all(math.isfinite(m[k]) for k in ("loss", "loss_cls", "loss_patch", "center_norm")), m
        assert 0.0 < m["mask_ratio"] < 0.5
    assert metrics[-1]["teacher_temp"] == pytest.approx(0.04 + 0.03 * 2 / 29, rel=1e-5)  # epoch 2 of 4

    sd10, sd20, sd21 = (consolidate(ckpts, f"step_{s:08d}") for s in (10, 20, 21))
    # The centre: restored, not restarted from zero.
    step21 = next(m for m in metrics if m["step"] == 21)
    assert step21["center_norm"] == pytest.approx(sd20["loss_fn.center"].norm().item(), rel=1e-5)
    assert sd20["loss_fn.center"].norm() > 0.1
    # The teacher: one EMA step from the restored one.
    m21 = MomentumSchedule("cosine", 0.996, 1.0)(20, 40)  # --smoke: 4 epochs of 10 steps
    teacher_keys = [k for k in sd21 if k.startswith("teacher.")]
    assert len(teacher_keys) > 30
    for k in teacher_keys:
        want = m21 * sd20[k].double() + (1 - m21) * sd21[k[len("teacher.") :]].double()
        torch.testing.assert_close(sd21[k].double(), want, rtol=0, atol=1e-6, msg=k)
    states = rank_states(ckpts / "step_00000021", "ema")
    assert len(states) == 2 and states[0]["step"] == 21 and states[0]["momentum"] == pytest.approx(m21)
    for name, value in consolidate_state_dicts(states)["params"].items():
        torch.testing.assert_close(sd21[f"teacher.{name}"], value, rtol=0, atol=0, msg=name)
    # The last head layer was frozen through the first epoch (10 steps), then trained.
    v = "head.last_layer.weight_v"
    torch.testing.assert_close(sd10[f"teacher.{v}"], sd10[v], rtol=0, atol=1e-6)
    assert (sd20[v] - sd10[v]).abs().max() > 1e-4

    # iBOT releases the teacher (the paper's "backbone (t)"): the default export, from the fp32 EMA shadow;
    # the student by choice.
    path = tmp_path / "ibot.safetensors"
    meta = export_checkpoint(run, path, encoder_only=True)
    model = load_timm_encoder(path)  # strict
    assert type(model).__name__ == "VisionTransformer" and model.embed_dim == 64
    sd30 = consolidate(ckpts, "step_00000030")
    assert meta["mimscale.which"] == "teacher"
    torch.testing.assert_close(model.pos_embed, sd30["teacher.encoder.backbone.pos_embed"], rtol=0, atol=0)
    student = tmp_path / "ibot_student.safetensors"
    assert export_checkpoint(run, student, encoder_only=True, which="student")["mimscale.which"] == "student"
    torch.testing.assert_close(load_timm_encoder(student).pos_embed, sd30["encoder.backbone.pos_embed"],
                               rtol=0, atol=0)
    assert model.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 65, 64)
