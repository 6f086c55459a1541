"""Tests of SimMIM and data2vec (vision).

The losses and targets are checked against independent transcriptions of the official code written here in
plain torch (microsoft/SimMIM ``models/simmim.py``; facebookresearch/data2vec_vision
``beit/engine_for_cyclical.py`` and ``modeling_cyclical.py``), on tiny models with fixed inputs and masks.
One 2-rank ZeRO-3 DeepSpeed launch (``tests/dist_scripts/simmim_data2vec_check.py``) checks losses,
gradients and the EMA teacher against single-process references and trains both recipes with ``--smoke``;
the test then exports the encoders (``mimscale export --encoder-only``), loads them into timm strictly, and
relaunches the data2vec recipe to check that it resumes with its teacher.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import rank_states, tiny
from torch import nn

from mimscale import create_method
from mimscale.ema import consolidate_state_dicts
from mimscale.methods.data2vec import Data2Vec, data2vec_targets, default_num_masked
from mimscale.methods.simmim import SimMIM, pixel_mask, simmim_loss
from mimscale.models.heads import PixelShuffleHead

REPO = Path(__file__).resolve().parents[1]
TINY = tiny(depth=3)
# The data2vec recipe runs of the 2-rank test: a fast linear EMA ramp, so the teacher moves visibly and the
# momentum depends on the step (a resumed run that lost its EMA state would log a different one).
D2V_EMA = ["model.ema_schedule=linear", "model.ema_decay=0.9", "model.ema_end_decay=0.99"]


def _simmim(**kw) -> SimMIM:
    torch.manual_seed(0)
    return create_method("simmim", mask_patch_size=8, **{**TINY, **kw})


def _data2vec(**kw) -> Data2Vec:
    torch.manual_seed(0)
    return create_method("data2vec", top_k=2, **{**TINY, **kw})


def _batch(method, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 3, 32, 32, generator=g)
    return x, method.masker(3, generator=g)


# ---------------------------------------------------------------------------------------------- references
def reference_block_outputs(
    backbone: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None,
    mask_token: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The official BEiT-style forward (``VisionTransformerForSimMIM.forward`` /
    ``VisionTransformerForCyclicalTraining.forward_features``) on timm's modules, step by step: patch
    embedding, mask token where masked, CLS, shared relative position bias, blocks, final norm. Returns
    (final-normed tokens, every block's output)."""
    t = backbone.patch_embed(x)
    b, n, _ = t.shape
    if mask is not None:
        w = mask.flatten(1).unsqueeze(-1).type_as(t)
        t = t * (1 - w) + mask_token.expand(b, n, -1) * w
    t = torch.cat((backbone.cls_token.expand(b, -1, -1), t), dim=1)
    rel = backbone.rel_pos_bias()
    outs = []
    for blk in backbone.blocks:
        t = blk(t, shared_rel_pos_bias=rel)
        outs.append(t)
    return backbone.norm(t), outs


def reference_simmim_loss(method: SimMIM, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``SimMIM.forward`` of the official code: encoder, reshape to [B, C, H, W], 1x1 conv + PixelShuffle,
    pixel mask by repeat_interleave, masked L1 divided by (mask sum + 1e-5) and the channel count."""
    p = method.encoder.patch_size
    z, _ = reference_block_outputs(method.encoder.backbone, x, mask, method.mask_token)
    z = z[:, 1:]
    b, n, c = z.shape
    h = w = int(n**0.5)
    z = z.permute(0, 2, 1).reshape(b, c, h, w)
    conv = method.head.proj
    x_rec = F.pixel_shuffle(F.conv2d(z, conv.weight, conv.bias), p)
    m = mask.reshape(b, h, w).repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1).contiguous()
    loss_recon = F.l1_loss(x, x_rec, reduction="none")
    return (loss_recon * m).sum() / (m.sum() + 1e-5) / 3


def reference_d2v_targets(layers: list[torch.Tensor], instance: bool = False) -> torch.Tensor:
    """``engine_for_cyclical.train_one_epoch`` with ``target_layer_norm_last`` and ``post_target_layer_norm``
    (``instance``: data2vec 2.0's instance norm over tokens instead of the per-layer layer norm)."""
    fsz = layers[0].size(-1)
    if instance:
        vals = [F.instance_norm(v.permute(0, 2, 1).float()).permute(0, 2, 1) for v in layers]
    else:
        vals = [F.layer_norm(v.float(), (fsz,)) for v in layers]
    return F.layer_norm(sum(vals) / len(layers), (fsz,))


# ---------------------------------------------------------------------------------------------- SimMIM
def test_simmim_loss_matches_the_official_formula() -> None:
    method = _simmim()
    x, mask = _batch(method)
    out = method(x, mask=mask)
    ref = reference_simmim_loss(method, x, mask)
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=1e-6)
    assert out.metrics["loss_simmim"] == out.loss.detach()
    assert out.pred.shape == out.target.shape == (3, 64, 4 * 4 * 3) and torch.equal(out.mask, mask)


def test_simmim_loss_formula_on_fixed_tensors() -> None:
    g = torch.Generator().manual_seed(0)
    x, x_rec = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    mask = torch.tensor([[True, False, False, True], [False, False, False, True]])  # 2x2 grid of 4 px
    m = pixel_mask(mask, (2, 2), 4)
    assert m.shape == (2, 1, 8, 8) and m[0, 0, :4, :4].eq(1).all() and m[0, 0, :4, 4:].eq(0).all()
    # by hand: mean |x - x_rec| over the masked pixels and channels (3 of 8 patches, 16 px each)
    diff = (x - x_rec).abs()
    masked_sum = diff[0, :, :4, :4].sum() + diff[0, :, 4:, 4:].sum() + diff[1, :, 4:, 4:].sum()
    by_hand = masked_sum / (48 + 1e-5) / 3
    torch.testing.assert_close(simmim_loss(x, x_rec, m), by_hand, rtol=1e-6, atol=0)


def test_simmim_loss_covers_exactly_the_masked_pixels() -> None:
    method = _simmim()
    x, mask = _batch(method)
    kept = {}

    def keep_output(module, inputs, output):
        output.retain_grad()
        kept["x_rec"] = output

    handle = method.head.register_forward_hook(keep_output)
    out = method(x, mask=mask)
    handle.remove()
    out.loss.backward()
    grad = kept["x_rec"].grad
    m = pixel_mask(mask, method.encoder.grid, method.encoder.patch_size).expand_as(grad).bool()
    assert grad[~m].abs().max() == 0
    assert (grad[m] != 0).all()
    # Every encoder parameter and the mask token learn.
    assert method.mask_token.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in method.parameters())


def test_simmim_reconstruct_pastes_predictions_into_masked_patches() -> None:
    method = _simmim()
    x, mask = _batch(method)
    with torch.no_grad():
        out = method(x, mask=mask)
    rows = method.reconstruct(x, out)
    assert set(rows) == {"original", "masked", "reconstruction"}
    m = pixel_mask(mask, method.encoder.grid, method.encoder.patch_size).expand_as(x).bool()
    assert torch.equal(rows["reconstruction"][~m], x[~m]) and rows["masked"][m].eq(0).all()
    from mimscale.models.patches import unpatchify

    pred_img = unpatchify(out.pred, method.encoder.patch_size, method.encoder.grid)
    assert torch.equal(rows["reconstruction"][m], pred_img[m])


def test_simmim_backbone_masker_and_official_init() -> None:
    method = _simmim(depth=2)
    b = method.encoder.backbone
    kw = method.encoder.timm_kwargs
    assert kw["use_shared_rel_pos_bias"] and not kw["use_abs_pos_emb"] and not kw["use_rel_pos_bias"]
    assert kw["init_values"] == 0.1 and b.pos_embed is None and isinstance(b.norm, nn.LayerNorm)
    assert torch.allclose(b.blocks[0].gamma_1, torch.full((64,), 0.1))
    # 32 px cells at 60 %: here 8 px cells on 32 px, 16 cells of which ceil(9.6) = 10 masked = 40 patches
    assert method.masker.num_masked == 40
    assert method(torch.randn(2, 3, 32, 32)).mask.sum(1).tolist() == [40, 40]
    # trunc_normal(std=.02, a=-.02, b=.02): bounded by one std, empirical std ~0.54 * 0.02
    for t in (method.mask_token, b.cls_token, b.patch_embed.proj.weight, b.blocks[0].attn.qkv.weight):
        assert t.abs().max() <= 0.02
    qkv = b.blocks[0].attn.qkv.weight.detach()
    assert 0.0095 < float(qkv.std()) < 0.0122
    fc2 = b.blocks[1].mlp.fc2.weight.detach()
    assert float(fc2.abs().max()) <= 0.02 / math.sqrt(4) + 1e-9  # fix_init_weight: / sqrt(2 * depth_i)
    assert float(method.head.proj.weight.detach().abs().max()) > 0.02  # the head keeps PyTorch's default init
    assert method.no_weight_decay() == {"encoder.backbone.cls_token"}
    assert isinstance(method.head, PixelShuffleHead) and method.head.stride == 4


def test_simmim_paper_defaults() -> None:
    assert SimMIM.__init__.__kwdefaults__["mask_patch_size"] == 32
    assert SimMIM.__init__.__kwdefaults__["mask_ratio"] == 0.6
    method = create_method("simmim", embed_dim=64, depth=1, num_heads=4)  # 224 px, patch 16
    assert method.masker.num_masked_cells == 30 and method.masker.num_masked == 120  # ceil(49 * 0.6)
    with pytest.raises(ValueError, match="global_pool"):
        create_method("simmim", global_pool="avg", **TINY)


# ---------------------------------------------------------------------------------------------- data2vec
def test_data2vec_targets_match_an_independent_construction() -> None:
    method = _data2vec()
    x, _ = _batch(method)
    with torch.no_grad():
        _, outs = reference_block_outputs(method.teacher.backbone, x)
        layers = [outs[i][:, 1:] for i in (1, 2)]  # top 2 of 3 blocks, CLS dropped, before the final norm
        for instance, norm in ((False, "layer"), (True, "instance")):
            expected = reference_d2v_targets(layers, instance)
            torch.testing.assert_close(data2vec_targets(layers, norm), expected, rtol=0, atol=1e-6)
        method.target_norm = "layer"
        torch.testing.assert_close(method.targets(x), reference_d2v_targets(layers), rtol=0, atol=1e-5)
    assert method.target_layers == [1, 2]


def test_data2vec_loss_matches_the_official_formula() -> None:
    method = _data2vec()
    x, mask = _batch(method)
    out = method(x, mask=mask)
    with torch.no_grad():
        _, outs = reference_block_outputs(method.teacher.backbone, x)
        targets = reference_d2v_targets([outs[i][:, 1:] for i in (1, 2)])
        fsz = targets.size(-1)
        targets = targets.reshape(-1, fsz)[mask.flatten().bool()]
    z, _ = reference_block_outputs(method.encoder.backbone, x, mask, method.mask_token)
    outputs = method.lm_head(z[:, 1:].reshape(-1, fsz)[mask.flatten().bool()])
    ref = F.smooth_l1_loss(outputs.float(), targets, beta=2.0)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-7)
    assert out.pred.shape == out.target.shape == (3, 64, 64) and torch.equal(out.mask, mask)
    assert set(out.metrics) == {"loss_data2vec", "ema_momentum", "target_var", "pred_var"}
    # fairseq compute_var: per-channel std over the masked tokens, averaged
    torch.testing.assert_close(out.metrics["target_var"], torch.sqrt(targets.var(0) + 1e-6).mean(), rtol=1e-5,
                               atol=0)
    assert float(out.metrics["ema_momentum"]) == pytest.approx(0.9998)


def test_data2vec_teacher_is_not_trained_by_backprop_and_follows_the_ema() -> None:
    method = _data2vec(ema_decay=0.5)
    method.train()
    assert not any(m.training for m in method.teacher.modules()) and method.encoder.training
    teacher0 = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-2)
    x, mask = _batch(method)
    method(x, mask=mask).loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in method.teacher.parameters())
    assert method.mask_token.grad is not None and method.lm_head.weight.grad is not None
    opt.step()
    for k, v in method.teacher.state_dict().items():
        assert torch.equal(v, teacher0[k]), k  # the optimizer step did not touch the teacher
    method.after_optimizer_step(1, 10)
    student = method.encoder.state_dict()
    for k, v in method.teacher.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.5 * teacher0[k] + 0.5 * student[k], rtol=0, atol=1e-7)
    assert method.current_momentum() == 0.5

    state = method.sharded_state_dict()
    saved = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    method.after_optimizer_step(2, 10)
    method.load_sharded_state_dict(state)
    for k, v in method.teacher.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_data2vec_masking_schedule_and_validation() -> None:
    assert default_num_masked(196) == 120 and default_num_masked(64) == 39
    method = create_method("data2vec", embed_dim=64, depth=2, num_heads=4, top_k=2)  # 224 px, 14x14
    mk = method.masker
    assert (mk.num_masked, mk.min_block, mk.max_block, mk.min_aspect, mk.exact) == (120, 16, None, 0.3, False)
    assert method.encoder.timm_kwargs["init_values"] == 1e-4  # the official ViT-B command
    assert method.ema.schedule.kind == "constant" and method.ema.schedule.base == 0.9998
    lin = _data2vec(ema_schedule="linear", ema_decay=0.999, ema_end_decay=0.9999, ema_anneal_steps=100)
    assert lin.ema.schedule(50, 1000) == pytest.approx(0.99945)
    names = {n for n, _ in method.named_parameters()}
    assert not any(n.startswith("teacher.") and p.requires_grad for n, p in method.named_parameters())
    assert "mask_token" in names and method.no_weight_decay() == {"encoder.backbone.cls_token"}
    with pytest.raises(ValueError, match="top_k"):
        create_method("data2vec", top_k=4, **TINY)
    with pytest.raises(ValueError, match="target_norm"):
        create_method("data2vec", top_k=2, target_norm="batch", **TINY)
    with pytest.raises(ValueError, match="ema_schedule"):
        create_method("data2vec", top_k=2, ema_schedule="cosine", **TINY)


# ---------------------------------------------------------------------------------------------- 2 ranks
def _rebuild(run_dir: Path):
    """The method (student, heads, teacher) rebuilt from a checkpoint's consolidated fp32 state."""
    from mimscale.export import consolidate, read_meta
    from mimscale.runs import resolve_checkpoint

    root, tag = resolve_checkpoint(run_dir)
    meta = read_meta(root, tag)
    method = create_method(meta.method, **meta.config["model"])
    method.load_state_dict(consolidate(root, tag), strict=True)
    return method.eval(), meta


def _ema_state(tag_dir: Path) -> dict:
    states = rank_states(tag_dir, "ema")
    assert len(states) == 2
    return consolidate_state_dicts(states)


@pytest.mark.distributed
def test_zero3_two_ranks_export_to_timm_and_resume(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    from distributed_launch import run_deepspeed, tail, test_env

    from mimscale.export import consolidate, load_timm_encoder

    out = tmp_path / "result.json"
    d2v_sets = [a for kv in D2V_EMA for a in ("--d2v-set", kv)]
    run_deepspeed(REPO / "tests" / "dist_scripts" / "simmim_data2vec_check.py",
                  ["--out", str(out), "--workdir", str(tmp_path), *d2v_sets], timeout=1200)
    result = json.loads(out.read_text())
    assert result["ok"], result["failures"]

    # Export each recipe's encoder with the CLI; it loads into timm strictly and gives the features of the
    # method rebuilt from the same checkpoint.
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    for run in ("simmim", "data2vec"):
        path = tmp_path / f"{run}_encoder.safetensors"
        cmd = [sys.executable, "-m", "mimscale.cli", "export", "--checkpoint", str(tmp_path / run),
               "--output", str(path), "--encoder-only"]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=test_env(), timeout=300)
        assert proc.returncode == 0, tail(proc.stdout + proc.stderr)
        model = load_timm_encoder(path)  # strict
        assert type(model).__name__ == "Beit" and model.rel_pos_bias is not None and model.pos_embed is None
        method, meta = _rebuild(tmp_path / run)
        assert meta.step == (2 if run == "simmim" else 4)
        with torch.no_grad():
            torch.testing.assert_close(model.forward_features(x), method.encoder.forward_features(x),
                                       rtol=0, atol=1e-6)

    # Resume. The step-4 checkpoint's teacher equals its EMA shadow. Relaunched to step 6, the run resumes at
    # 4, logs the momentum of the last update before resuming (only a restored EMA state knows it: a fresh
    # one reports the schedule's start) and its first update starts from the saved teacher.
    def momentum(step: int) -> float:  # the recipe run's linear ramp 0.9 -> 0.99 over the 40 smoke steps
        return 0.9 + 0.09 * step / 40

    run_dir = tmp_path / "data2vec"
    root = run_dir / "checkpoints"
    state4 = consolidate(root, "step_00000004")
    shadow4 = _ema_state(root / "step_00000004")
    assert shadow4["step"] == 4 and shadow4["momentum"] == pytest.approx(momentum(3))
    for name, value in shadow4["params"].items():
        torch.testing.assert_close(state4[f"teacher.{name}"], value, rtol=0, atol=0)
    proc = run_deepspeed(REPO / "recipes" / "data2vec_vitb.py",
                         ["--smoke", "--ds_config", "zero3.json", "--output_dir", str(run_dir),
                          "--max_steps", "6", "--set", "ckpt_interval=1", "--set", "log_interval=1",
                          "--set", "keep_checkpoints=10", *[a for kv in D2V_EMA for a in ("--set", kv)]],
                         timeout=900)
    assert "resuming at step 4" in proc.stdout + proc.stderr
    state5 = consolidate(root, "step_00000005")
    m, moved = momentum(4), 0.0
    for name, value in shadow4["params"].items():
        expected = m * value + (1 - m) * state5[f"encoder.{name}"]
        torch.testing.assert_close(state5[f"teacher.{name}"], expected, rtol=0, atol=1e-6)
        moved = max(moved, float((state5[f"teacher.{name}"] - value).abs().max()))
    assert moved > 1e-4
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    logged = [r["ema_momentum"] for r in rows]
    assert logged == pytest.approx([0.9] + [momentum(k - 2) for k in range(2, 7)], abs=1e-6)
    assert all(math.isfinite(r["loss_data2vec"]) for r in rows)
    assert _ema_state(root / "step_00000006")["step"] == 6


def test_data2vec_teacher_runs_on_its_fp32_shadow_under_bf16() -> None:
    """teacher_precision='fp32' (the default, as the official targets): in an fp32 run the targets are those
    of the teacher module exactly; under bf16 they are the fp32 teacher's whose weights are the EMA shadow."""
    torch.manual_seed(0)
    m = create_method("data2vec", **TINY, top_k=2)
    x = torch.randn(2, 3, 32, 32)
    fp32_path = m.targets(x)
    m.teacher_precision = "train"
    assert torch.equal(fp32_path, m.targets(x))
    m.teacher_precision = "fp32"
    shadow = m.ema.full_shadow()  # taken while fp32, then the module is cast as DeepSpeed casts it
    m.to(torch.bfloat16)
    ref = create_method("data2vec", **TINY, top_k=2)
    ref.teacher.load_state_dict({**ref.teacher.state_dict(), **shadow}, strict=False)  # + k_bias
    x16 = x.to(torch.bfloat16)
    torch.testing.assert_close(m.targets(x16), ref.targets(x16.float()), rtol=0, atol=0)
    m.teacher_precision = "train"
    assert (m.targets(x16) - ref.targets(x16.float())).abs().max() > 1e-3  # what bf16 would cost
