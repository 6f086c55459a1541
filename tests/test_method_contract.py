"""The contract every registered method keeps with the trainer (``mimscale.methods.base.Method``), checked on
each method's ``--smoke`` model: a finite output, gradients into the encoder, the declared number of views,
an exportable encoder, activation checkpointing that keeps the loss, per-rank state that round-trips, and
FLOP counts from what the method says its encoder sees. Plus a method with an EMA teacher written in one
file (here: in this test) that gets all the teacher plumbing from the mixin."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import timm
import torch
from conftest import tiny, tiny_method_kwargs
from torch import nn

from mimscale.ema import MomentumSchedule
from mimscale.flops import count_flops, method_flops
from mimscale.methods import (
    EMATeacherMixin,
    Method,
    MethodOutput,
    MissingTeacherStateError,
    create_method,
    list_methods,
    register_method,
)
from mimscale.methods.base import _METHODS
from mimscale.models.encoder import MaskedEncoder
from mimscale.models.tokenizer import DVAE_ARCH


def build(name: str) -> Method:
    torch.manual_seed(0)
    return create_method(name, **tiny_method_kwargs(name))


def images_for(method: Method, batch: int = 2) -> torch.Tensor | list[torch.Tensor]:
    """``method.views`` views of a batch: the model's size, and half of it for a multi-crop method's local
    crops (views beyond the first two)."""
    enc = method.encoder
    size = enc.grid[0] * enc.patch_size
    g = torch.Generator().manual_seed(1)
    if method.views == 1:
        return torch.randn(batch, 3, size, size, generator=g)
    sizes = [size if i < 2 else size // 2 for i in range(method.views)]
    return [torch.randn(batch, 3, s, s, generator=g) for s in sizes]


def seeded_forward(method: Method, images: Any) -> MethodOutput:
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    return method(images)


def teacher_step(method: Method) -> None:
    """One simulated optimizer step: perturb the student, then the after-step hook (EMA, centres)."""
    with torch.no_grad():
        for p in method.parameters():
            if p.requires_grad:
                p.add_(0.01)
    method.after_optimizer_step(1, 10)


def assert_same_state(a: Any, b: Any, where: str = "state") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("name", list_methods())
def test_forward_is_finite_and_trains_the_encoder(name: str) -> None:
    method = build(name).train()
    out = seeded_forward(method, images_for(method))
    assert isinstance(out, MethodOutput) and out.loss.ndim == 0 and torch.isfinite(out.loss)
    for k, v in out.metrics.items():
        assert isinstance(v, torch.Tensor) and v.numel() == 1 and not v.requires_grad, k
        assert torch.isfinite(v), k
    out.loss.backward()
    grads = [p.grad for p in method.encoder.parameters() if p.requires_grad and p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    assert all(p.grad is None for n, p in method.named_parameters() if n.startswith("teacher."))


@pytest.mark.parametrize("name", list_methods())
def test_takes_exactly_its_declared_views(name: str) -> None:
    method = build(name)
    images = images_for(method)
    assert method.views == (1 if isinstance(images, torch.Tensor) else len(images))
    if method.views > 1:
        with pytest.raises(ValueError):
            method(images[:-1])


@pytest.mark.parametrize("name", list_methods())
def test_export_prefix_holds_an_encoder_timm_loads_strict(name: str) -> None:
    method = build(name)
    timm_name, timm_kwargs, prefix = method.export_spec()
    sd = {k[len(prefix) :]: v for k, v in method.state_dict().items() if k.startswith(prefix)}
    assert sd, f"no state-dict keys under {prefix!r}"
    if timm_name == DVAE_ARCH:  # BEiT's stage 1 exports its dVAE encoder, read by load_tokenizer
        return
    model = timm.create_model(timm_name, pretrained=False, num_classes=0, **timm_kwargs)
    model.load_state_dict(sd, strict=True)


@pytest.mark.parametrize("name", list_methods())
def test_grad_checkpointing_keeps_the_loss(name: str) -> None:
    method = build(name).train()
    images = images_for(method)
    plain = seeded_forward(method, images).loss
    method.set_grad_checkpointing(True)
    checkpointed = seeded_forward(method, images).loss
    torch.testing.assert_close(checkpointed, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list_methods())
def test_per_rank_state_round_trips(name: str) -> None:
    method = build(name).train()
    seeded_forward(method, images_for(method)).loss.backward()
    teacher_step(method)
    state = method.sharded_state_dict()
    fresh = build(name)
    fresh.load_sharded_state_dict(state)
    assert_same_state(fresh.sharded_state_dict(), state)
    if isinstance(method, EMATeacherMixin):
        assert "ema" in state and fresh.current_momentum() == method.current_momentum()
        # Float entries come from the EMA state; integer buffers (BatchNorm's num_batches_tracked) follow
        # the student, which DeepSpeed restores itself on a real resume.
        floats = {k for k, v in method.teacher.state_dict().items() if v.is_floating_point()}
        got, want = fresh.teacher.state_dict(), method.teacher.state_dict()
        torch.testing.assert_close({k: got[k] for k in floats}, {k: want[k] for k in floats})
        with pytest.raises(MissingTeacherStateError, match="'ema'"):
            build(name).load_sharded_state_dict({})


@pytest.mark.parametrize("name", [n for n in list_methods() if n != "beit_tokenizer"])
def test_flops_follow_what_the_encoder_sees(name: str) -> None:
    method = build(name).eval()
    report = method_flops(method)
    passes = method.encoder_passes()
    assert report.forward == sum(report.parts.values()) and report.train >= report.forward
    assert report.forward_only == report.parts.get("teacher", 0)
    assert any(p.trained for p in passes)
    kept = getattr(getattr(method, "masker", None), "num_keep", None)
    if name in ("mae", "lut"):  # the encoder runs on the kept tokens only
        assert all(p.tokens == 1 + kept for p in passes if p.trained)
    else:
        assert passes[0].tokens == 1 + method.encoder.num_patches
    if name in ("data2vec", "lut", "ibot"):  # the EMA teacher's forward is counted, without a backward
        assert report.parts["teacher"] > 0
        assert report.train == 3 * (report.forward - report.forward_only) + report.forward_only
    if name in ("mae", "simmim", "data2vec"):  # modelled parts agree with a counted forward
        counted, _ = count_flops(lambda: seeded_forward(method, images_for(method, batch=1)))
        assert report.forward <= counted <= 1.05 * report.forward + 2e6


# ------------------------------------------------------------------------- a new method, one file
class _TinyBYOL(EMATeacherMixin, Method):
    """A minimal EMA-teacher method as a user would add one: encoder, head, teacher from the mixin."""

    name = "_test_byol"

    def __init__(self, model_name: str = "vit_base_patch16_224", **timm_kwargs: Any) -> None:
        super().__init__()
        self.encoder = MaskedEncoder(model_name, **timm_kwargs)
        self.head = nn.Linear(self.encoder.embed_dim, 16)
        self.init_teacher(
            nn.ModuleDict({"encoder": self.encoder, "head": self.head}), MomentumSchedule("cosine", 0.9, 1.0)
        )

    def forward(self, images: Any, mask: torch.Tensor | None = None) -> MethodOutput:
        student = self.head(self.encoder(images)[0][:, 0])
        with torch.no_grad():
            target = self.teacher.head(self.teacher.encoder(images)[0][:, 0])
        loss = (2 - 2 * torch.cosine_similarity(student, target, dim=-1)).mean()
        return MethodOutput(loss, {"ema_momentum": self.momentum_metric(loss.device)})


def test_a_teacher_method_gets_eval_mode_ema_and_strict_state_from_the_mixin() -> None:
    register_method(_TinyBYOL)
    try:
        torch.manual_seed(0)
        m = create_method("_test_byol", **tiny(drop_path_rate=0.1))
        m.train()
        assert m.training and not any(mod.training for mod in m.teacher.modules())
        assert "teacher.encoder.backbone.cls_token" in dict(m.named_parameters())
        assert not any(p.requires_grad for p in m.teacher.parameters())
        x = torch.randn(2, 3, 32, 32)
        m(x).loss.backward()
        before = {k: v.clone() for k, v in m.teacher.state_dict().items()}
        teacher_step(m)
        assert m.ema.step == 1 and m.current_momentum() == pytest.approx(0.9)
        w_t = m.teacher.state_dict()["head.weight"]
        want = 0.9 * before["head.weight"] + 0.1 * m.head.weight.detach()
        torch.testing.assert_close(w_t, want)
        with pytest.raises(MissingTeacherStateError):
            create_method("_test_byol", **tiny()).load_sharded_state_dict({})
    finally:
        _METHODS.pop("_test_byol", None)
