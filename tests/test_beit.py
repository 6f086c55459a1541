"""Tests of BEiT: the DALL-E-layout tokenizer loader, the stage-1 dVAE objective and codebook monitoring,
the stage-2 loss (independent formulas on fixed inputs), and one real 2-rank DeepSpeed job that trains a
tokenizer (ZeRO-2), exports it, and trains / resumes / exports stage 2 with it (ZeRO-3)."""

from __future__ import annotations

import io
import json
import math
import pickle
import sys
import types
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny
from safetensors.torch import save_file
from torch import nn

from mimscale import create_method
from mimscale.methods.beit import default_num_masked, mim_cross_entropy
from mimscale.methods.beit_tokenizer import code_perplexity, cosine_ramp
from mimscale.models.tokenizer import (
    DVAEConfig,
    DVAEEncoder,
    VisualTokenizer,
    load_dalle_pickle,
    load_tokenizer,
)
from mimscale.train.optim import param_groups

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
TINY_VIT = tiny(embed_dim=32, num_heads=2)


# ------------------------------------------------------------------------- the official DALL-E layout
# An independent transcription of openai/DALL-E dall_e/utils.py (Conv2d with tensors ``w`` and ``b``) and
# dall_e/encoder.py (EncoderBlock, Encoder), plain torch, so the loader is checked against the published
# module tree and forward, not against mimscale's own classes.
class RefConv2d(nn.Module):
    def __init__(self, n_in: int, n_out: int, kw: int) -> None:
        super().__init__()
        self.kw = kw
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / math.sqrt(n_in * kw * kw))
        self.b = nn.Parameter(torch.randn(n_out) * 0.1)  # non-zero, so a bias mix-up shows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)


class RefEncoderBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, n_layers: int) -> None:
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = RefConv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", RefConv2d(n_in, n_hid, 3)),
            ("relu_2", nn.ReLU()), ("conv_2", RefConv2d(n_hid, n_hid, 3)),
            ("relu_3", nn.ReLU()), ("conv_3", RefConv2d(n_hid, n_hid, 3)),
            ("relu_4", nn.ReLU()), ("conv_4", RefConv2d(n_hid, n_out, 1))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class RefEncoder(nn.Module):
    def __init__(self, n_hid: int = 256, n_blk_per_group: int = 2, input_channels: int = 3,
                 vocab_size: int = 8192) -> None:
        super().__init__()
        group_count = 4
        n_layers = group_count * n_blk_per_group
        self.vocab_size = vocab_size
        blk = range(n_blk_per_group)
        self.blocks = nn.Sequential(OrderedDict([
            ("input", RefConv2d(input_channels, 1 * n_hid, 7)),
            ("group_1", nn.Sequential(OrderedDict([
                *[(f"block_{i + 1}", RefEncoderBlock(1 * n_hid, 1 * n_hid, n_layers)) for i in blk],
                ("pool", nn.MaxPool2d(kernel_size=2))]))),
            ("group_2", nn.Sequential(OrderedDict([
                *[(f"block_{i + 1}", RefEncoderBlock(1 * n_hid if i == 0 else 2 * n_hid, 2 * n_hid, n_layers))
                  for i in blk],
                ("pool", nn.MaxPool2d(kernel_size=2))]))),
            ("group_3", nn.Sequential(OrderedDict([
                *[(f"block_{i + 1}", RefEncoderBlock(2 * n_hid if i == 0 else 4 * n_hid, 4 * n_hid, n_layers))
                  for i in blk],
                ("pool", nn.MaxPool2d(kernel_size=2))]))),
            ("group_4", nn.Sequential(OrderedDict([
                *[(f"block_{i + 1}", RefEncoderBlock(4 * n_hid if i == 0 else 8 * n_hid, 8 * n_hid, n_layers))
                  for i in blk]]))),
            ("output", nn.Sequential(OrderedDict([
                ("relu", nn.ReLU()), ("conv", RefConv2d(8 * n_hid, vocab_size, 1))]))),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def ref_map_pixels(x: torch.Tensor) -> torch.Tensor:
    return (1 - 2 * 0.1) * x + 0.1  # dall_e.utils.map_pixels, logit_laplace_eps = 0.1


def published_encoder_shapes() -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the published encoder.pkl, written out from dall_e/encoder.py's constructor
    (n_hid 256, 2 blocks per group, 4 groups, vocab 8192): 2 tensors per conv, id_path convs where the
    width changes (first block of groups 2-4)."""
    shapes: dict[str, tuple[int, ...]] = {"blocks.input.w": (256, 3, 7, 7), "blocks.input.b": (256,)}
    widths = {1: 256, 2: 512, 3: 1024, 4: 2048}
    for g in range(1, 5):
        for i in (1, 2):
            n_in = widths[max(g - 1, 1)] if i == 1 else widths[g]
            n_out = widths[g]
            p = f"blocks.group_{g}.block_{i}."
            if n_in != n_out:
                shapes[p + "id_path.w"], shapes[p + "id_path.b"] = (n_out, n_in, 1, 1), (n_out,)
            for c, (a, b, k) in enumerate([(n_in, n_out // 4, 3), (n_out // 4, n_out // 4, 3),
                                           (n_out // 4, n_out // 4, 3), (n_out // 4, n_out, 1)], start=1):
                shapes[p + f"res_path.conv_{c}.w"], shapes[p + f"res_path.conv_{c}.b"] = (b, a, k, k), (b,)
    shapes["blocks.output.conv.w"], shapes["blocks.output.conv.b"] = (8192, 2048, 1, 1), (8192,)
    return shapes


def test_published_dalle_encoder_layout_loads_and_tokenizes_identically(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = RefEncoder().eval()  # the published size: 53.8M parameters, random weights
    sd = {k: v.detach() for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in sd.items()} == published_encoder_shapes()
    path = tmp_path / "dalle_encoder.safetensors"
    save_file(sd, str(path))

    tok = load_tokenizer(path)
    assert isinstance(tok, VisualTokenizer)
    assert tok.config == DVAEConfig()  # DALL-E's: vocab 8192, n_hid 256, 2 blocks, (1, 2, 4, 8), 112 px
    assert tok.stride == 8 and tok.config.grid == (14, 14)
    assert not tok.training and not any(p.requires_grad for p in tok.parameters())

    images = torch.rand(2, 3, 32, 32)  # a 4x4 grid keeps the 54M-parameter forward cheap on a CPU
    with torch.no_grad():
        want_logits = ref(ref_map_pixels(images))
        got_logits = tok.encoder(ref_map_pixels(images))
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    ids = tok(images, grid=(4, 4))
    assert torch.equal(ids, want_logits.argmax(1).flatten(1))  # BEiT's get_codebook_indices


def _fake_dalle_package() -> dict[str, types.ModuleType]:
    """``dall_e``, ``dall_e.encoder`` and ``dall_e.utils`` holding the reference classes under the official
    names, so a pickle written here refers to them exactly as the published encoder.pkl does."""
    pkg, enc, utils = (types.ModuleType(n) for n in ("dall_e", "dall_e.encoder", "dall_e.utils"))
    for cls, mod, name in ((RefConv2d, utils, "Conv2d"), (RefEncoderBlock, enc, "EncoderBlock"),
                           (RefEncoder, enc, "Encoder")):
        fake = type(name, (cls,), {"__module__": mod.__name__, "__qualname__": name})
        setattr(mod, name, fake)
    pkg.encoder, pkg.utils = enc, utils
    return {"dall_e": pkg, "dall_e.encoder": enc, "dall_e.utils": utils}


def test_dalle_pickle_loads_without_the_dall_e_package(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    mods = _fake_dalle_package()
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    torch.manual_seed(1)
    model = RefEncoder(n_hid=16, n_blk_per_group=1, vocab_size=64).eval()
    official = {RefConv2d: mods["dall_e.utils"].Conv2d, RefEncoderBlock: mods["dall_e.encoder"].EncoderBlock,
                RefEncoder: mods["dall_e.encoder"].Encoder}
    for module in model.modules():  # every instance pickles under its official class name
        module.__class__ = official.get(type(module), type(module))
    path = tmp_path / "encoder.pkl"
    torch.save(model, path)  # what `torch.save(encoder)` wrote for OpenAI: the whole module, pickled
    for name in mods:
        monkeypatch.delitem(sys.modules, name)

    sd = load_dalle_pickle(path)
    assert sd.keys() == model.state_dict().keys() and "blocks.input.w" in sd
    tok = load_tokenizer(path)
    assert tok.config.vocab_size == 64 and tok.config.n_hid == 16 and tok.config.n_blk_per_group == 1
    images = torch.rand(3, 3, 48, 48)
    with torch.no_grad():
        want = model(ref_map_pixels(F.interpolate(images, size=(48, 48)))).argmax(1).flatten(1)
    assert torch.equal(tok(images, grid=(6, 6)), want)


def test_dalle_pickle_refuses_foreign_globals(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("echo pwned",))

    buf = io.BytesIO()
    torch.save({"x": Evil()}, buf)
    buf.seek(0)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_dalle_pickle(buf)


def test_loader_rejects_files_without_an_encoder(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"head.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ValueError, match="no dVAE encoder"):
        load_tokenizer(path)


# ------------------------------------------------------------------------------------------ stage 1
SMOKE_TOK = dict(img_size=32, patch_size=4, vocab_size=64, n_hid=16, n_blk_per_group=1, channel_mult=(1, 2),
                 n_init=16)


def test_tokenizer_geometry_follows_the_vit_grid() -> None:
    full = create_method("beit_tokenizer")
    assert full.encoder.grid == (14, 14) and full.encoder.patch_size == 8  # 112 px crops for 224/16
    assert full.config.input_size == 112 and full.config.vocab_size == 8192
    smoke = create_method("beit_tokenizer", **SMOKE_TOK)
    assert smoke.encoder.grid == (8, 8) and smoke.encoder.grid[0] * smoke.encoder.patch_size == 16
    name, kwargs, prefix = smoke.export_spec()
    assert name == "mimscale.dvae" and DVAEConfig.from_dict(kwargs) == smoke.config and prefix == "encoder."


def test_tokenizer_loss_is_dalle_elb_per_value() -> None:
    """Eval mode decodes the argmax codes; the loss must equal (sum logit-Laplace NLL + beta * sum KL to
    the uniform prior) / number of pixel values, written here from the densities themselves."""
    torch.manual_seed(0)
    m = create_method("beit_tokenizer", **SMOKE_TOK, kl_warmup_steps=10).eval()
    m.set_epoch_progress(5, 10)  # half-way through the KL warm-up: beta = 3.3
    assert m.beta == pytest.approx(3.3)
    images = torch.randn(2, 3, 16, 16)
    out = m(images)

    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = ref_map_pixels((images * std + mean).clamp(0, 1))
    with torch.no_grad():
        logits = m.encoder(x)
        z = F.one_hot(logits.argmax(1), 64).permute(0, 3, 1, 2).float()
        stats = m.decoder(z)
    mu, b = stats[:, :3], stats[:, 3:].exp()
    density = torch.exp(-(torch.log(x / (1 - x)) - mu).abs() / b) / (2 * b * x * (1 - x))
    nll = -torch.log(density)
    q = logits.softmax(1)
    kl = (q * torch.log(q * 64)).sum(1)
    want = (nll.sum() + 3.3 * kl.sum()) / x.numel()
    torch.testing.assert_close(out.loss, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.metrics["kl"], kl.mean(), rtol=1e-4, atol=1e-6)


def test_schedules_and_codebook_statistics() -> None:
    assert cosine_ramp(0, 100, 1.0, 1 / 16) == 1.0 and cosine_ramp(100, 100, 1.0, 1 / 16) == 1 / 16
    assert cosine_ramp(50, 100, 0.0, 6.6) == pytest.approx(3.3)
    assert float(code_perplexity(torch.ones(64))) == pytest.approx(64.0, rel=1e-5)
    assert float(code_perplexity(torch.tensor([10, 0, 0, 0]))) == pytest.approx(1.0)
    m = create_method("beit_tokenizer", **SMOKE_TOK, temperature_anneal_steps=100)
    m.set_epoch_progress(100, 10)
    assert m.temperature == pytest.approx(1 / 16)
    m.set_epoch_progress(0, 10)
    out = m(torch.randn(2, 3, 16, 16))
    assert 0 < float(out.metrics["codebook_usage"]) <= 1
    assert 1 <= float(out.metrics["perplexity"]) <= 64
    out.loss.backward()
    assert all(p.grad is not None for p in m.parameters())


def test_collapse_is_detected_and_reported(capsys: pytest.CaptureFixture[str]) -> None:
    m = create_method("beit_tokenizer", **SMOKE_TOK, usage_window=3, collapse_threshold=0.5)
    with torch.no_grad():
        m.encoder.blocks.output.conv.bias[7] = 1e4  # every position picks code 7: a collapsed codebook
    for _ in range(3):
        out = m(torch.randn(2, 3, 16, 16))
    assert float(out.metrics["codebook_usage"]) == pytest.approx(1 / 64)
    assert float(out.metrics["perplexity"]) == pytest.approx(1.0)
    assert "WARNING codebook collapse" in capsys.readouterr().out
    state = m.sharded_state_dict()  # the window survives a resume
    fresh = create_method("beit_tokenizer", **SMOKE_TOK, usage_window=3, collapse_threshold=0.5)
    fresh.load_sharded_state_dict(state)
    assert fresh._batches == 3 and torch.equal(fresh._last_seen, m._last_seen.cpu())


# ------------------------------------------------------------------------------------------ stage 2
@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(3)
    enc = DVAEEncoder(DVAEConfig(vocab_size=64, n_hid=16, n_blk_per_group=1, channel_mult=(1, 2),
                                 input_size=16))
    path = tmp_path_factory.mktemp("tok") / "tok.safetensors"
    save_file({f"encoder.{k}": v for k, v in enc.state_dict().items()}, str(path),
              metadata={"mimscale.encoder_prefix": "encoder.", "timm.model_name": "mimscale.dvae",
                        "timm.kwargs": json.dumps(enc.config.to_dict())})  # as `mimscale export` writes
    return path


def tiny_beit(tokenizer_file: Path, **kw) -> nn.Module:
    return create_method("beit", tokenizer_path=str(tokenizer_file), drop_path_rate=0.0, **TINY_VIT, **kw)


def test_beit_defaults_follow_the_official_pretraining_model(tokenizer_file: Path) -> None:
    m = tiny_beit(tokenizer_file)
    b = m.encoder.backbone
    assert b.pos_embed is None and b.rel_pos_bias is not None  # one shared relative bias, no abs table
    assert b.blocks[0].attn.relative_position_bias_table is None
    assert b.blocks[0].gamma_1.detach()[0].item() == pytest.approx(0.1)  # layer scale 0.1
    assert isinstance(b.norm, nn.LayerNorm)  # final norm on all tokens (use_fc_norm=False)
    assert m.head.out_features == 64 == m.tokenizer.vocab_size
    assert m.masker.num_masked == default_num_masked(64) == 26 and default_num_masked(196) == 75
    assert m.masker.min_block == 16 and not m.masker.exact
    # official init: truncated at +-std, cls/mask tokens and the classifier included
    for t in (m.mask_token, b.cls_token, m.head.weight, b.patch_embed.proj.weight,
              b.blocks[0].mlp.fc1.weight):
        assert t.detach().abs().max().item() <= 0.02 + 1e-7
    rescaled = b.blocks[1].mlp.fc2.weight.detach()  # layer 2: divided by sqrt(2 * 2)
    assert rescaled.abs().max().item() <= 0.02 / math.sqrt(4) + 1e-7
    assert m.no_weight_decay() == {"encoder.backbone.cls_token"}
    with pytest.raises(ValueError, match="model.tokenizer_path"):
        create_method("beit", **TINY_VIT)


def test_tokenizer_is_frozen_and_out_of_the_optimizer(tokenizer_file: Path) -> None:
    m = tiny_beit(tokenizer_file)
    m.train()
    assert not m.tokenizer.training and m.encoder.training
    names = {id(p) for g in param_groups(m, 0.05, m.no_weight_decay()) for p in g["params"]}
    assert not any(id(p) in names for p in m.tokenizer.parameters())
    before = {k: v.clone() for k, v in m.tokenizer.state_dict().items()}
    out = m(torch.randn(2, 3, 32, 32))
    out.loss.backward()
    assert all(p.grad is None for p in m.tokenizer.parameters())
    assert all(torch.equal(before[k], v) for k, v in m.tokenizer.state_dict().items())


def test_loss_covers_exactly_the_masked_positions(tokenizer_file: Path) -> None:
    torch.manual_seed(0)
    m = tiny_beit(tokenizer_file, logits_on_all_tokens=True).eval()  # eval: no drop path, same forward twice
    images = torch.randn(3, 3, 32, 32)
    mask = m.masker(3, generator=torch.Generator().manual_seed(5))
    out = m(images, mask=mask)
    logits = out.pred
    assert logits.shape == (3, 64, 64) and torch.equal(out.mask, mask)
    logits.retain_grad()
    out.loss.backward()
    grad_norm = logits.grad.abs().sum(-1)
    assert torch.all(grad_norm[~mask] == 0) and torch.all(grad_norm[mask] > 0)

    # targets: the tokenizer's ids of the *unmasked* image
    ids = m.tokenizer(m_unit(images), (8, 8))
    assert torch.equal(out.target, ids)
    # an independent cross-entropy over the masked positions, averaged over all of them in the batch
    logp = torch.log_softmax(logits.detach().double(), dim=-1)
    picked = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    want = -(picked * mask).sum() / mask.sum()
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mim_cross_entropy(logits.detach(), ids, mask).double(), want, rtol=1e-5,
                               atol=1e-6)

    # the default path (classifier on masked positions only, as the official return_all_tokens=False)
    m.logits_on_all_tokens = False
    out2 = m(images, mask=mask)
    assert out2.pred.shape == (int(mask.sum()), 64)
    torch.testing.assert_close(out2.loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out2.pred, logits.detach()[mask], rtol=1e-5, atol=1e-6)


def m_unit(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)


def test_random_tokenizer_is_loud_and_smoke_only(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        m = create_method("beit", tokenizer_path="random", **TINY_VIT)
    assert "WARNING model.tokenizer_path=random" in capsys.readouterr().out
    assert m.tokenizer.stride == 2 and m.tokenizer.vocab_size == 8192


# ----------------------------------------------------------------------------------- 2 ranks, end to end
@pytest.mark.distributed
def test_two_stage_pipeline_on_two_ranks(tmp_path: Path) -> None:
    """One `deepspeed --num_gpus 2` job (tests/dist_scripts/beit_check.py): tokenizer smoke run under
    ZeRO-2 -> full export -> load_tokenizer; stage 2 under ZeRO-3 with that tokenizer, stopped and resumed
    from its checkpoint; the tokenizer weights stay bit-identical; the encoder exports to a timm BEiT."""
    pytest.importorskip("deepspeed")
    from distributed_launch import run_deepspeed

    out = tmp_path / "result.json"
    script = REPO / "tests" / "dist_scripts" / "beit_check.py"
    run_deepspeed(script, ["--work", str(tmp_path), "--out", str(out)], timeout=900)
    result = json.loads(out.read_text())
    assert result["ok"], result["failures"]
    assert result["stage1"]["steps"] == 10 and result["stage2"]["resumed_at"] == 6
    assert result["stage2"]["final_step"] == 10
