"""mimscale.analysis: the definitions pinned on hand-made attention patterns and constructed matrices, the
recomputed attention against timm's unfused path (ViT, BEiT), and `mimscale analyze` end to end on a real
smoke checkpoint (run directory, full export, encoder-only export)."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import REPO, tiny, tiny_method_kwargs

from mimscale.analysis import (
    attention_distance,
    block_outputs,
    effective_rank,
    mean_attention_distance,
    singular_value_spectrum,
)
from mimscale.analysis.attention import check_recomputed
from mimscale.analysis.hooks import visit_blocks
from mimscale.analysis.images import prepare_images, read_images
from mimscale.analysis.reconstruction import denormalise_from_visible, reconstruct
from mimscale.cli import main

BEIT_SHARED = {"use_abs_pos_emb": False, "use_rel_pos_bias": False, "use_shared_rel_pos_bias": True}
BEIT_PER_BLOCK = {"use_abs_pos_emb": True, "use_rel_pos_bias": True, "use_shared_rel_pos_bias": False}


def _timm(name: str, **kw) -> torch.nn.Module:
    return timm.create_model(name, pretrained=False, num_classes=0, **{**tiny(), **kw}).eval()


def _randomise(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Known, far-from-init weights: every tensor (relative position tables and q/v biases included, which
    timm initialises to zero) drawn from a seeded normal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _grid_pairs(gh: int, gw: int) -> list[tuple[int, int]]:
    return [(r, c) for r in range(gh) for c in range(gw)]


# ---- the definition on hand-made probabilities ----------------------------------------------------------


def test_nearest_neighbour_attention_is_one_patch_size_whatever_the_prefix_mass():
    gh, gw, prefix = 4, 5, 2
    cells = _grid_pairs(gh, gw)
    n = prefix + gh * gw
    for direction, expected in (((0, 1), 3.0), ((1, 0), 2.0)):  # patch 2 px high, 3 px wide
        probs = torch.zeros(1, 1, n, n)
        probs[..., :prefix] = 0.4  # mass on the prefix keys: dropped, the row renormalised
        for q, (r, c) in enumerate(cells):
            dr, dc = direction
            nr, nc = (r + dr, c + dc) if r + dr < gh and c + dc < gw else (r - dr, c - dc)
            probs[0, 0, prefix + q, prefix + cells.index((nr, nc))] = 0.2
        got = mean_attention_distance(probs, (gh, gw), (2, 3), prefix)
        assert got.shape == (1, 1)
        assert got.item() == pytest.approx(expected, abs=1e-6)


def test_uniform_attention_gives_the_mean_pairwise_patch_distance():
    # 2x2 grid: from any patch the distances are 0, 1, 1, sqrt(2) patch sizes.
    probs = torch.full((2, 3, 5, 5), 1 / 5)
    got = mean_attention_distance(probs, (2, 2), 16, num_prefix=1)
    assert torch.allclose(got, torch.full((2, 3), 16 * (2 + math.sqrt(2)) / 4))
    # 3x4 grid against a brute-force mean over all ordered pairs of patch centres.
    cells = _grid_pairs(3, 4)
    brute = np.mean([math.hypot(a[0] - b[0], a[1] - b[1]) * 8 for a, b in itertools.product(cells, cells)])
    got = mean_attention_distance(torch.full((1, 1, 13, 13), 1 / 13), (3, 4), 8, num_prefix=1)
    assert got.item() == pytest.approx(brute, rel=1e-6)


def test_attention_to_itself_is_zero():
    probs = torch.eye(1 + 9).expand(2, 4, 10, 10).clone()
    probs[:, :, 1:, 0] = 0.5  # the CLS column does not count
    assert torch.all(mean_attention_distance(probs, (3, 3), 16, num_prefix=1) == 0)


def _force_neighbour_bias(table: torch.nn.Parameter, index: torch.Tensor, grid: tuple[int, int]) -> None:
    """Write +40 into every table entry the module's own index buffer maps a 4-neighbour offset to."""
    cells = _grid_pairs(*grid)
    with torch.no_grad():
        table.zero_()
        for i, a in enumerate(cells):
            for j, b in enumerate(cells):
                if abs(a[0] - b[0]) + abs(a[1] - b[1]) == 1:
                    table[index[1 + i, 1 + j]] = 40.0


@pytest.mark.parametrize("layout", ["shared", "per_block"])
def test_beit_relative_bias_forcing_nearest_neighbours_gives_one_patch_size(layout):
    """q.k = 0 everywhere, the relative position bias alone sends each query to its 4-neighbours: the
    distance is exactly one patch (4 px) in every block and head, which it is only if the bias is read."""
    model = _timm("beit_base_patch16_224", **(BEIT_SHARED if layout == "shared" else BEIT_PER_BLOCK))
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight[: 2 * 64].zero_()  # q and k projections
            blk.attn.q_bias.zero_()
            if layout == "per_block":
                _force_neighbour_bias(blk.attn.relative_position_bias_table, blk.attn.relative_position_index,
                                      (8, 8))
    if layout == "shared":
        rpb = model.rel_pos_bias
        _force_neighbour_bias(rpb.relative_position_bias_table, rpb.relative_position_index, (8, 8))
    d = attention_distance(model, torch.randn(3, 3, 32, 32), batch_size=2)
    assert d.shape == (2, 4)
    assert torch.allclose(d, torch.full_like(d, 4.0), atol=1e-4)


def test_vit_with_zero_queries_and_keys_attends_uniformly():
    model = _timm("vit_base_patch16_224", reg_tokens=2)  # 3 prefix tokens
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight[: 2 * 64].zero_()
            blk.attn.qkv.bias[: 2 * 64].zero_()
    cells = _grid_pairs(8, 8)
    expected = np.mean([math.hypot(a[0] - b[0], a[1] - b[1]) * 4 for a, b in itertools.product(cells, cells)])
    d = attention_distance(model, torch.randn(2, 3, 32, 32))
    assert torch.allclose(d, torch.full_like(d, float(expected)), rtol=1e-5)


# ---- against an independent, unfused computation -------------------------------------------------------


def _unfused_distance(model: torch.nn.Module, images: torch.Tensor, prefix: int) -> np.ndarray:
    """timm's own unfused attention (fused_attn off): the probabilities are what enters attn_drop. The
    distance is then computed with explicit loops, sharing no code with mimscale.analysis."""
    seen: list[torch.Tensor] = []
    hooks = []
    for blk in model.blocks:
        blk.attn.fused_attn = False
        hooks.append(blk.attn.attn_drop.register_forward_hook(lambda m, a, o: seen.append(a[0].detach())))
    try:
        with torch.no_grad():
            model.forward_features(images)
    finally:
        for h in hooks:
            h.remove()
        for blk in model.blocks:
            blk.attn.fused_attn = True
    gh, gw = model.patch_embed.grid_size
    ph, pw = model.patch_embed.patch_size
    cells = _grid_pairs(gh, gw)
    out = np.zeros((len(seen), seen[0].shape[1]))
    for layer, probs in enumerate(seen):
        p = probs.double().numpy()
        for h in range(p.shape[1]):
            total = 0.0
            for b in range(p.shape[0]):
                for qi, (qr, qc) in enumerate(cells):
                    row = p[b, h, prefix + qi, prefix:]
                    row = row / row.sum()
                    total += sum(row[ki] * math.hypot((qr - kr) * ph, (qc - kc) * pw)
                                 for ki, (kr, kc) in enumerate(cells))
            out[layer, h] = total / (p.shape[0] * len(cells))
    return out


@pytest.mark.parametrize(
    "name,kwargs,prefix",
    [
        ("vit_base_patch16_224", {}, 1),
        ("vit_base_patch16_224", {"qk_norm": True, "reg_tokens": 2}, 3),
        ("beit_base_patch16_224", BEIT_SHARED, 1),
        ("beit_base_patch16_224", BEIT_PER_BLOCK, 1),
    ],
    ids=["vit", "vit-qknorm-registers", "beit-shared-bias", "beit-per-block-bias"],
)
def test_attention_distance_matches_timms_unfused_attention(name, kwargs, prefix):
    model = _randomise(_timm(name, **kwargs, img_size=24))  # a 6x6 grid keeps the loops short
    if kwargs.get("qk_norm"):  # normalised q and k: sharpen the logits so the heads differ
        with torch.no_grad():
            for blk in model.blocks:
                blk.attn.q_norm.weight.mul_(10)
                blk.attn.k_norm.weight.mul_(10)
    assert all(blk.attn.fused_attn for blk in model.blocks)  # timm's default path is the fused one
    images = torch.randn(3, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    ours = attention_distance(model, images, batch_size=2).double().numpy()
    ref = _unfused_distance(model, images, prefix)
    assert ours.shape == ref.shape == (2, 4)
    np.testing.assert_allclose(ours, ref, rtol=1e-4)
    assert ref.std() > 0.1  # random weights: heads differ, so the comparison has teeth


def test_recomputation_check_rejects_an_output_it_cannot_reproduce():
    model = _randomise(_timm("vit_base_patch16_224"))
    captured = []
    visit_blocks(model, torch.randn(2, 3, 32, 32), [0], captured.append, attention=True)
    c = captured[0]
    check_recomputed(c.block.attn, c.attn_input, c.attn_output)  # the real output passes
    with pytest.raises(RuntimeError, match="does not reproduce"):
        check_recomputed(c.block.attn, c.attn_input, c.attn_output * 1.01)


def test_block_outputs_are_the_residual_stream_and_stop_after_the_last_requested_block():
    model = _randomise(_timm("vit_base_patch16_224", depth=3))
    x = torch.randn(2, 3, 32, 32)
    outs = block_outputs(model, x, "all")
    assert sorted(outs) == [0, 1, 2]
    with torch.no_grad():
        assert torch.allclose(model.norm(outs[2]), model.forward_features(x), atol=1e-5)
    ran = []
    handle = model.blocks[2].register_forward_pre_hook(lambda *a: ran.append(True))
    assert sorted(block_outputs(model, x, [0, -2])) == [0, 1]
    handle.remove()
    assert not ran
    with pytest.raises(ValueError, match="allowed indices are 0..2"):
        block_outputs(model, x, [3])


# ---- spectrum and effective rank --------------------------------------------------------------------------


def _with_singular_values(s: list[float], t: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(t, t, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    k = len(s)
    return (u[:, :k] * torch.tensor(s, dtype=torch.float64)) @ v[:, :k].T


def test_spectrum_is_per_image_normalised_then_averaged():
    tokens = torch.stack([_with_singular_values([4.0, 2.0, 1.0], 6, 5, 0),
                          _with_singular_values([10.0, 10.0, 0.0], 6, 5, 1)]).float()
    spec = singular_value_spectrum(tokens)
    assert spec.shape == (5,)
    assert torch.allclose(spec, torch.tensor([1.0, 0.75, 0.125, 0.0, 0.0]), atol=1e-5)


@pytest.mark.parametrize("t,d", [(12, 7), (7, 12)])
def test_singular_values_agree_with_an_svd_down_to_small_ratios(t, d):
    from mimscale.analysis.spectrum import singular_values

    s = [10.0 ** -k for k in range(min(t, d))][:6]  # 1 .. 1e-5
    tokens = torch.stack([_with_singular_values(s, t, d, seed) for seed in range(3)])
    ours = singular_values(tokens)
    ref = torch.linalg.svdvals(tokens)
    assert ours.shape == ref.shape == (3, min(t, d))
    np.testing.assert_allclose(ours[:, :6].numpy(), ref[:, :6].numpy(), rtol=1e-6)
    assert float(ours[:, 6:].max()) < 1e-6


def test_spectrum_is_not_centred():
    """Every token the same non-zero vector: rank one un-centred (centred it would be the zero matrix)."""
    tokens = torch.randn(1, 1, 8).expand(3, 10, 8)
    spec = singular_value_spectrum(tokens)
    assert spec[0] == pytest.approx(1.0) and float(spec[1:].abs().max()) < 1e-5
    assert effective_rank(spec) == pytest.approx(1.0, abs=1e-4)


def test_effective_rank_definition():
    assert effective_rank(torch.ones(7)) == pytest.approx(7.0)
    assert effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    # p = (1/4, 1/4, 1/2): H = 1.5 ln 2, exp(H) = 2^1.5
    assert effective_rank(torch.tensor([1.0, 1.0, 2.0])) == pytest.approx(2 ** 1.5)
    with pytest.raises(ValueError):
        effective_rank(torch.tensor([1.0, -1.0]))


# ---- images, reconstructions --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_spec() -> str:
    from mimscale.train.inputs import demo_data_spec

    return demo_data_spec(32, 256)  # the demo shards the smoke runs train on (built once per machine)


def test_images_are_the_first_samples_in_shard_order_with_the_eval_transform(demo_spec):
    import tarfile

    from torchvision import transforms

    from mimscale.data.pipeline import expand_urls

    got = read_images(demo_spec, 70)  # crosses the first shard (64 samples)
    first = expand_urls(demo_spec)[:2]
    names = [m.name for u in first for m in tarfile.open(u) if m.name.endswith(".jpg")]
    assert [k.split(":", 1)[1] for k in got.keys] == [n.rsplit(".", 1)[0] for n in names][:70]
    x = prepare_images(got.images[:3], 40)
    ref = transforms.Compose([transforms.Resize(40, interpolation=transforms.InterpolationMode.BICUBIC),
                              transforms.CenterCrop(40), transforms.ToTensor(),
                              transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    assert torch.allclose(x, torch.stack([ref(im) for im in got.images[:3]]), atol=1e-5)
    assert len(read_images(demo_spec, 10_000)) == 256


def test_denormalisation_uses_only_visible_patches():
    g = torch.Generator().manual_seed(0)
    patches = torch.randn(1, 9, 12, generator=g) * 3 + 1
    mask = torch.zeros(1, 9, dtype=torch.bool)
    mask[0, 4] = True  # the centre of a 3x3 grid: 4 neighbours at d=1, 4 corners at d^2=2
    pred = torch.randn(1, 9, 12, generator=g)
    out = denormalise_from_visible(pred, patches, mask, (3, 3))
    w = torch.tensor([0.5, 1, 0.5, 1, 0, 1, 0.5, 1, 0.5])
    mean = (patches[0].mean(-1) * w).sum() / w.sum()
    var = (patches[0].var(-1) * w).sum() / w.sum()
    assert torch.allclose(out[0, 4], pred[0, 4] * (var + 1e-6).sqrt() + mean, atol=1e-5)
    leaked = patches.clone()
    leaked[0, 4] += 100.0  # the hidden patch's own pixels must not matter
    assert torch.equal(denormalise_from_visible(pred, leaked, mask, (3, 3))[0, 4], out[0, 4])


@pytest.mark.parametrize("name", ["lut", "simmim"])
def test_reconstruct_runs_every_pixel_method(name):
    from mimscale.methods import create_method

    torch.manual_seed(0)
    method = create_method(name, **tiny_method_kwargs(name))
    x = torch.randn(3, 3, 32, 32)
    rows, info = reconstruct(method, x, seed=0)
    assert set(rows) == {"original", "masked", "reconstruction"}
    assert all(r.shape == x.shape for r in rows.values())
    assert (info["denormalised"] is not None) == (name == "lut")
    again, _ = reconstruct(method, x, seed=0)
    assert torch.equal(again["masked"], rows["masked"])  # the mask comes from the seed


# ---- the command end to end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> dict[str, Path]:
    """One real 5-step MAE smoke run (single process, ZeRO-2), its full and its encoder-only export."""
    root = tmp_path_factory.mktemp("analysis_run")
    run = root / "mae"
    cmd = [sys.executable, str(REPO / "recipes" / "mae_vitb.py"), "--smoke", "--max_steps", "5",
           "--output_dir", str(run)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    full, enc = root / "full.safetensors", root / "encoder.safetensors"
    assert main(["export", "--checkpoint", str(run), "--output", str(full)]) == 0
    assert main(["export", "--checkpoint", str(run), "--output", str(enc), "--encoder-only"]) == 0
    return {"run": run, "full": full, "encoder": enc, "root": root}


def test_analyze_command_end_to_end(smoke_run, demo_spec, tmp_path):
    out = tmp_path / "analysis"
    cmd = [sys.executable, "-m", "mimscale.cli", "analyze", "--weights", str(smoke_run["run"]),
           str(smoke_run["full"]), str(smoke_run["encoder"]), "--labels", "run", "full", "encoder",
           "--data", demo_spec, "--output", str(out), "--num-images", "300", "--layers", "all",
           "--compare-to-random", "--figure-images", "3", "--batch-size", "100"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "img/s" in proc.stdout and "ETA" in proc.stdout
    report = json.loads((out / "analysis.json").read_text())
    assert report["num_images"] == 256 and report["num_images_requested"] == 300
    assert any("256" in n for n in report["notes"])
    assert set(report["figures"]) == {"attention_distance", "singular_values", "attention_maps",
                                      "reconstructions"}
    for name in report["figures"].values():
        assert (out / name).stat().st_size > 5000
    models = {m["label"]: m for m in report["models"]}
    assert set(models) == {"run", "full", "encoder", "random init"}
    run, full, enc, rnd = (models[k] for k in ("run", "full", "encoder", "random init"))
    assert run["img_size"] == 32 and run["depth"] == 2 and run["heads"] == 4
    assert run["method"] == "mae" and run["format"] == "checkpoint" and enc["format"] == "safetensors"
    # the same encoder through three formats: the same numbers
    for other in (full, enc):
        np.testing.assert_allclose(other["attention_distance_px"]["per_head"],
                                   run["attention_distance_px"]["per_head"], rtol=1e-5)
        assert other["effective_rank"] == pytest.approx(run["effective_rank"], rel=1e-5)
    assert set(run["effective_rank"]) == {"0", "1"} and len(run["singular_values"]["1"]) == 64
    assert rnd["kind"] == "random-init"
    assert rnd["attention_distance_px"]["per_head"] != run["attention_distance_px"]["per_head"]
    assert run["reconstruction"]["target"] == "norm-pix"
    assert "visible" in run["reconstruction"]["denormalised"]
    assert full["reconstruction"]["target"] == "norm-pix"
    assert "encoder-only" in enc["reconstruction"]["skipped"]
    assert "reconstruction" not in rnd


def _last_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "expected an error line"
    return err[-1]


def test_analyze_rejects_bad_input_with_one_line(smoke_run, demo_spec, tmp_path, capsys):
    from safetensors.torch import save_file

    from mimscale.methods import create_method
    from mimscale.models.tokenizer import DVAE_ARCH

    enc = str(smoke_run["encoder"])
    base = ["analyze", "--data", demo_spec, "--output", str(tmp_path / "o"), "--num-images", "4"]
    assert main([*base, "--weights", enc, enc, "--labels", "a"]) == 2
    assert "--labels" in _last_error_line(capsys)
    assert main([*base, "--weights", enc, "--layers", "5"]) == 2
    assert "layer 5" in _last_error_line(capsys)
    assert main(["analyze", "--weights", enc, "--data", str(tmp_path / "missing-{0..1}.tar"),
                 "--output", str(tmp_path / "o")]) == 2
    assert "does not exist" in _last_error_line(capsys)
    # The BEiT tokenizer's dVAE export: not a ViT
    tok = create_method("beit_tokenizer", **tiny_method_kwargs("beit_tokenizer"))
    name, kwargs, prefix = tok.export_spec()
    dvae = tmp_path / "dvae.safetensors"
    save_file({k[len(prefix):]: v.contiguous() for k, v in tok.state_dict().items() if k.startswith(prefix)},
              str(dvae), metadata={"timm.model_name": name, "timm.kwargs": json.dumps(kwargs),
                                   "mimscale.method": "beit_tokenizer", "mimscale.encoder_only": "true"})
    assert name == DVAE_ARCH
    assert main([*base, "--weights", str(dvae)]) == 2
    line = _last_error_line(capsys)
    assert "mimscale.dvae" in line and "ViT" in line
    # a timm model folder of a CNN
    folder = tmp_path / "resnet"
    folder.mkdir()
    cnn = timm.create_model("resnet18", pretrained=False, num_classes=0)
    save_file(cnn.state_dict(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architecture": "resnet18", "model_args": {}}))
    assert main([*base, "--weights", str(folder)]) == 2
    assert "not a timm VisionTransformer or Beit" in _last_error_line(capsys)
    assert not (tmp_path / "o").exists()  # nothing written before the inputs were checked
