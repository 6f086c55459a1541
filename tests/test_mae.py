"""MAE on the shared encoder, checked against an independent transcription of the paper's formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
from conftest import tiny_method_kwargs

from mimscale import create_method
from mimscale.methods.base import MethodOutput
from mimscale.methods.mae import keep_indices
from mimscale.models.patches import patchify, unpatchify
from mimscale.models.pos_embed import sincos_pos_embed_2d

TINY = tiny_method_kwargs("mae")


def tiny_mae(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_method("mae", **{**TINY, **kw})


def reference_patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """Loop version of MAE's layout: per patch, rows then columns then channels (channel fastest)."""
    b, c, h, w = imgs.shape
    out = []
    for i in range(h // p):
        for j in range(w // p):
            patch = imgs[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p]  # b c p p
            out.append(patch.permute(0, 2, 3, 1).reshape(b, -1))
    return torch.stack(out, 1)


def reference_mae_loss(
    imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, p: int, norm_pix: bool
) -> torch.Tensor:
    target = reference_patchify(imgs, p).double()
    if norm_pix:
        mean = target.mean(-1, keepdim=True)
        n = target.shape[-1]
        var = ((target - mean) ** 2).sum(-1, keepdim=True) / (n - 1)  # unbiased
        target = (target - mean) / torch.sqrt(var + 1e-6)
    per_patch = ((pred.double() - target) ** 2).mean(-1)
    m = mask.double()
    return (per_patch * m).sum() / m.sum()


def test_patchify_layout_is_row_col_channel_and_unpatchify_inverts():
    x = torch.randn(2, 3, 8, 12)
    assert torch.equal(patchify(x, 4), reference_patchify(x, 4))
    assert torch.equal(unpatchify(patchify(x, 4), 4, (2, 3)), x)


def test_sincos_table_is_column_first_with_zero_cls_row():
    d, grid = 16, (3, 5)
    table = sincos_pos_embed_2d(d, grid)[0].numpy()
    assert np.all(table[0] == 0)
    w = 1.0 / 10000 ** (np.arange(d // 4) / (d / 4))
    for idx in range(grid[0] * grid[1]):
        y, x = divmod(idx, grid[1])
        expect = np.concatenate([np.sin(x * w), np.cos(x * w), np.sin(y * w), np.cos(y * w)])
        np.testing.assert_allclose(table[1 + idx], expect, atol=1e-6)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss_matches_reference_formula(norm_pix):
    model = tiny_mae(norm_pix_loss=norm_pix)
    imgs = torch.randn(4, 3, 32, 32)
    mask = model.masker(4, generator=torch.Generator().manual_seed(1))
    out = model(imgs, mask=mask)
    assert isinstance(out, MethodOutput)
    ref = reference_mae_loss(imgs, out.pred, mask, 4, norm_pix)
    assert torch.allclose(out.loss.double(), ref, rtol=1e-5, atol=1e-6)
    assert out.pred.shape == (4, 64, 4 * 4 * 3) and out.target.shape == out.pred.shape
    assert torch.equal(out.mask, mask)
    assert torch.allclose(out.metrics["loss_mae"], out.loss.detach())


def test_loss_only_covers_masked_patches():
    model = tiny_mae()
    imgs = torch.randn(2, 3, 32, 32)
    mask = model.masker(2, generator=torch.Generator().manual_seed(3))
    out = model(imgs, mask=mask)
    pred = out.pred.detach().requires_grad_(True)
    from mimscale.methods.mae import masked_mse

    masked_mse(pred, out.target, mask).backward()
    per_patch_grad = pred.grad.abs().sum(-1)
    assert torch.all(per_patch_grad[~mask] == 0) and torch.all(per_patch_grad[mask] > 0)


def test_masking_keeps_int_truncation_and_draws_per_sample():
    model = create_method("mae", **tiny_method_kwargs("mae", img_size=(40, 80), depth=1, mask_ratio=0.8))
    assert model.encoder.num_patches == 200
    mask = model.masker(8)
    assert torch.all((~mask).sum(1) == 39)  # int(200 * 0.2) == 39 with Python truncation
    assert len({tuple(m.tolist()) for m in mask}) == 8


def test_encoder_never_sees_masked_patches():
    model = tiny_mae().eval()
    imgs = torch.randn(2, 3, 32, 32)
    mask = model.masker(2, generator=torch.Generator().manual_seed(0))
    ids_keep, ids_restore = keep_indices(mask)
    latent = model.encoder(imgs, ids_keep=ids_keep)[0]
    assert latent.shape == (2, 1 + 16, 64)  # CLS + int(64 * 0.25) visible tokens
    # Change only masked patches of the input: encoder output and prediction do not move.
    pix_mask = unpatchify(mask.float().unsqueeze(-1).expand(-1, -1, 48), 4, (8, 8))
    corrupted = imgs + 10 * pix_mask * torch.randn_like(imgs)
    assert torch.allclose(model.encoder(corrupted, ids_keep=ids_keep)[0], latent, atol=1e-5)
    assert torch.allclose(model(corrupted, mask=mask).pred, model(imgs, mask=mask).pred, atol=1e-5)


def test_visible_path_with_nothing_masked_equals_timm_forward_features():
    model = tiny_mae().eval()
    imgs = torch.randn(2, 3, 32, 32)
    ids_keep = torch.arange(64).expand(2, -1)
    ours = model.encoder(imgs, ids_keep=ids_keep)[0]
    assert torch.allclose(ours, model.encoder.backbone.forward_features(imgs), atol=1e-5)


def test_pos_embed_is_a_fixed_buffer_under_timms_key():
    model = tiny_mae()
    names = dict(model.named_parameters())
    assert "encoder.backbone.pos_embed" not in names
    sd = model.encoder.backbone.state_dict()
    assert torch.equal(sd["pos_embed"], sincos_pos_embed_2d(64, (8, 8)))
    model(torch.randn(2, 3, 32, 32)).loss.backward()
    assert model.encoder.backbone.pos_embed.grad is None


def test_mae_init_xavier_linears_normal_tokens_and_ln_eps():
    model = create_method("mae", img_size=64, patch_size=8, embed_dim=128, depth=2, num_heads=4)
    w = model.encoder.backbone.blocks[0].mlp.fc1.weight
    bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert torch.all(model.encoder.backbone.blocks[0].mlp.fc1.bias == 0)
    proj = model.encoder.backbone.patch_embed.proj.weight
    fan_in, fan_out = proj[0].numel(), proj.shape[0]
    assert proj.abs().max() <= math.sqrt(6 / (fan_in + fan_out))
    for tok in (model.encoder.backbone.cls_token, model.decoder.mask_token):
        assert 0.01 < tok.std().item() < 0.03
    lns = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert lns and all(m.eps == 1e-6 for m in lns)
    assert len(model.decoder.decoder_blocks) == 8 and model.decoder.decoder_embed.out_features == 512
    assert model.decoder.decoder_blocks[0].attn.num_heads == 16


@pytest.mark.parametrize(
    "name,timm_name,millions",
    [
        ("vit_base_patch16_224", "vit_base_patch16_224", 85.8),
        ("vit_large_patch16_224", "vit_large_patch16_224", 303.3),
        ("vit_huge_patch14_224", "vit_huge_patch14_224", 630.8),
    ],
)
def test_encoder_keys_shapes_and_size_equal_timm(name, timm_name, millions):
    with torch.device("meta"):
        enc = create_method("mae", model_name=name, decoder_depth=1).encoder
        ref = timm.create_model(timm_name, pretrained=False, num_classes=0)
    ours = {k: tuple(v.shape) for k, v in enc.backbone.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours == theirs
    assert round(sum(v.numel() for v in enc.backbone.state_dict().values()) / 1e6, 1) == millions


def test_bad_mask_shape_and_ratio_are_clear_errors():
    model = tiny_mae()
    with pytest.raises(ValueError, match="mask shape"):
        model(torch.randn(2, 3, 32, 32), mask=torch.zeros(2, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask_ratio=1.5"):
        tiny_mae(mask_ratio=1.5)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    imgs = torch.randn(2, 3, 32, 32)
    mask = tiny_mae().masker(2, generator=torch.Generator().manual_seed(5))
    grads = []
    for ckpt in (False, True):
        model = tiny_mae().train()
        model.set_grad_checkpointing(ckpt)
        out = model(imgs, mask=mask)
        out.loss.backward()
        grads.append((out.loss.detach(), model.encoder.backbone.blocks[0].attn.qkv.weight.grad.clone()))
    assert torch.allclose(grads[0][0], grads[1][0]) and torch.allclose(grads[0][1], grads[1][1], atol=1e-6)
