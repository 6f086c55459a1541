"""Activation memory per image, measured from the method's own forward and backward on this machine's CPU.

Counting formulas (Korthikanti et al. 2022's ``34 s b h`` bytes per layer) miss what a method adds around
its encoder: iBOT's 8192-way heads on every patch token of two global crops, MAE's decoder on all tokens,
BEiT's tokenizer, the losses' fp32 upcasts. So the plan runs the recipe's real method, in its training dtype,
on two images' views (batch-independent bytes, such as a weight's gradient before DeepSpeed takes it, are
counted per image, a small overestimate; LUT's batch norm needs two), with the encoder cut to one and then
two blocks, and records the peak of the bytes allocated during forward + backward (:class:`PeakTracker`:
a dispatch mode that sees every tensor an operator returns and a weak reference that sees its storage
freed). Weight gradients are
dropped as soon as they are accumulated, as DeepSpeed's hooks move them into its buckets (counted with the
model states). The encoder's blocks are identical, so the peak at full depth ``D`` is the one-block peak plus
``D - 1`` times what the second block keeps for the backward. With activation checkpointing each further
block keeps only its input, so the checkpointed peak is the one-block peak plus ``D - 1`` block inputs.

CPU kernels save what CUDA's do for these models (fused attention saves q, k, v, the output and the log-sum-
exp on both), so the bytes carry over to GPUs; docs/planning.md lists what does not. A ViT-H measurement takes
a few seconds (two models of one and two blocks); results are cached per process and on disk.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import hashlib
import io
import json
import os
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mimscale.flops import count_flops

__all__ = ["ActivationProfile", "PeakTracker", "measure_activations"]


class PeakTracker(TorchDispatchMode):
    """Bytes of tensor storages allocated while active and still alive (``live``), and their peak (storages
    that existed before are not counted). :meth:`mark` closes a phase: it records the phase's peak and the
    bytes alive at its end, and starts the next phase's peak from there."""

    def __init__(self, existing: list[torch.Tensor] = ()) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.phases: list[tuple[int, int]] = []  # (peak during the phase, live at its end)
        self._known: set[int] = {t.untyped_storage()._cdata for t in existing}
        self._refs: dict[int, weakref.ref] = {}

    def _freed(self, key: int, nbytes: int, _ref: Any) -> None:
        self.live -= nbytes
        self._refs.pop(key, None)

    def mark(self) -> None:
        self.phases.append((self.peak, self.live))
        self.peak = self.live

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self._known or key in self._refs:
                continue
            nbytes = storage.nbytes()
            self._refs[key] = weakref.ref(storage, functools.partial(self._freed, key, nbytes))
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        return out


@dataclass(frozen=True)
class ActivationProfile:
    """Per-image activation bytes at full depth, with and without activation checkpointing, in ``dtype``;
    and the FLOPs one image's forward + backward counted (FlopCounterMode, extrapolated the same way)."""

    per_image: int
    per_image_checkpointed: int
    counted_train_flops: int
    depth: int
    dtype: str
    batch: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class _Run:
    forward_peak: int  # peak during the forward (a no-grad teacher or tokenizer may make it)
    saved: int  # alive at the end of the forward: what the backward needs, and the outputs
    backward_peak: int
    flops: int


def _inputs(spec: Any, batch: int, dtype: torch.dtype, views: int) -> Any:
    entries = spec if isinstance(spec, list) else [spec]
    crops = []
    for entry in entries:
        size = entry.get("size", 224)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        crops += [torch.randn(batch, 3, h, w, dtype=dtype) for _ in range(int(entry.get("repeat", 1)))]
    return crops[0] if views == 1 and len(crops) == 1 else crops


def _run(method: torch.nn.Module, images: Any) -> _Run:
    """One forward + backward of ``method`` on ``images``, tracked (and its FLOPs counted)."""
    hooks = [
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        for p in method.parameters()
        if p.requires_grad
    ]
    existing = [*method.parameters(), *method.buffers(), *(images if isinstance(images, list) else [images])]
    tracker = PeakTracker(existing)

    def step() -> None:
        out = method(images)
        tracker.mark()
        out.loss.backward()
        del out
        tracker.mark()

    gc.collect()  # garbage of an earlier run must not be freed inside this one
    try:
        with tracker:
            flops, _ = count_flops(step)
    finally:
        for h in hooks:
            h.remove()
    (forward_peak, saved), (backward_peak, _) = tracker.phases
    return _Run(forward_peak, saved, backward_peak, flops)


# Method arguments that must not exceed the encoder's depth when the plan builds it with one or two blocks.
_DEPTH_BOUND_ARGS = ("top_k",)  # data2vec: the teacher averages the top-K blocks
# Attention dropout: CUDA's fused attention kernels apply it inside the kernel, saving no probability matrix;
# on CPU it sends attention to the math kernel, which saves one [heads, N, N] per layer. Measured without it.
_CUDA_FUSED_ARGS = ("attn_drop_rate",)


@contextlib.contextmanager
def _parameters_on_meta() -> Any:
    """Every parameter a module registers goes to the meta device (buffers stay real), so that building a
    method skips its weight initialisation (BEiT's truncated normals take seconds), as accelerate's
    ``init_empty_weights(include_buffers=False)`` does."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _materialize(method: torch.nn.Module, dtype: torch.dtype) -> None:
    """Give every meta parameter real storage in ``dtype`` (normal, std 0.02: the values do not change what is
    allocated), keeping parameters that are shared between modules shared."""
    made: dict[int, torch.nn.Parameter] = {}
    for module in method.modules():
        for name, p in list(module._parameters.items()):
            if p is None or p.device.type != "meta":
                continue
            if id(p) not in made:
                data = torch.empty(p.shape, dtype=dtype).normal_(0.0, 0.02)
                made[id(p)] = torch.nn.Parameter(data, requires_grad=p.requires_grad)
            module._parameters[name] = made[id(p)]


def _build(cfg: Any, depth: int | None, dtype: torch.dtype) -> torch.nn.Module:
    from mimscale.planning.recipe import build_method

    model = dict(cfg.model)
    for key in _CUDA_FUSED_ARGS:
        if key in model:
            model[key] = 0.0
    if depth is not None:
        model["depth"] = depth
        for key in _DEPTH_BOUND_ARGS:
            if key in model:
                model[key] = min(model[key], depth)
    cfg = copy.deepcopy(cfg)
    cfg.model = model
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _parameters_on_meta():
        warnings.simplefilter("ignore")
        method = build_method(cfg, device="cpu")
    _materialize(method, dtype)
    return method.to(dtype).train()


def _block_input_bytes(method: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes per image one more checkpointed encoder block keeps: its input, ``[tokens, dim]`` for every
    trained encoder pass (non-reentrant checkpointing saves nothing else of the block)."""
    dim = int(method.encoder.embed_dim)
    tokens = sum(p.repeats * p.tokens for p in method.encoder_passes() if p.trained)
    return tokens * dim * torch.empty((), dtype=dtype).element_size()


def _measure_cfg(
    cfg: Any, dtype: torch.dtype, batch: int, full: torch.nn.Module, spec: Any
) -> ActivationProfile:
    from mimscale.models.encoder import MaskedEncoder

    views = int(full.views)
    # A ViT (MaskedEncoder) is measured with one and with two blocks; anything else (BEiT's dVAE) whole.
    depth = len(full.encoder.blocks) if isinstance(full.encoder, MaskedEncoder) else 0
    torch.manual_seed(0)
    runs: dict[int | None, _Run] = {}
    for d in (1, 2) if depth >= 2 else (None,):
        method = _build(cfg, d, dtype)
        runs[d] = _run(method, _inputs(spec, batch, dtype, views))
        del method
    if depth < 2:
        r = runs[None]
        plain = ck = max(r.forward_peak, r.backward_peak)
        flops = r.flops
    else:
        # Blocks are identical: each further one keeps what the second kept beyond the first (read at the end
        # of the forward, where a teacher's or tokenizer's no-grad transient cannot hide it); the backward's
        # peak comes when all of it is alive. Checkpointed, a further block keeps only its input, and one
        # block at a time is recomputed (the one-block run's backward); heads and decoders are taken as
        # measured without checkpointing (an upper bound for MAE, whose decoder blocks are checkpointed too).
        one, two = runs[1], runs[2]
        per_block = max(0, two.saved - one.saved)
        plain = max(one.forward_peak, one.backward_peak + (depth - 1) * per_block)
        ck = max(one.forward_peak, one.backward_peak + (depth - 1) * batch * _block_input_bytes(full, dtype))
        flops = one.flops + (depth - 1) * (two.flops - one.flops)
    return ActivationProfile(
        per_image=-(-plain // batch),
        per_image_checkpointed=-(-min(ck, plain) // batch),
        counted_train_flops=flops // batch,
        depth=depth,
        dtype=str(dtype).replace("torch.", ""),
        batch=batch,
    )


CACHE_VERSION = 2  # bump when the measurement changes what it returns


def _cache_file() -> Path:
    return (
        Path(os.environ.get("MIMSCALE_CACHE", Path.home() / ".cache" / "mimscale")) / "plan_activations.json"
    )


def _read_cache() -> dict[str, Any]:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, profile: ActivationProfile) -> None:
    """Best effort: a read-only or shared home only costs the next plan a new measurement."""
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _read_cache()
        entries[key] = profile.to_dict()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass


_MEMO: dict[str, ActivationProfile] = {}


def measure_activations(
    cfg: Any, dtype: torch.dtype, batch: int = 2, method: Any = None
) -> ActivationProfile:
    """The :class:`ActivationProfile` of recipe config ``cfg`` in ``dtype`` (``method``: the config's method
    on the meta device, if the caller has built it already).

    Cached per process and on disk (``$MIMSCALE_CACHE/plan_activations.json``, by default under
    ``~/.cache/mimscale``), keyed by what the bytes depend on: method, model arguments, the views the
    workers deliver, dtype, batch and the torch version."""
    from mimscale.planning.recipe import build_method, views_spec

    method = build_method(cfg, device="meta") if method is None else method
    spec = views_spec(cfg, method)
    ident = {
        "version": CACHE_VERSION,
        "torch": torch.__version__,
        "method": cfg.method,
        "model": cfg.model,
        "views": spec,
        "dtype": str(dtype),
        "batch": batch,
    }
    key = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:24]
    if key in _MEMO:
        return _MEMO[key]
    cached = _read_cache().get(key)
    try:
        profile = ActivationProfile(**cached) if cached else None
    except TypeError:
        profile = None
    if profile is None:
        profile = _measure_cfg(cfg, dtype, batch, method, spec)
        _write_cache(key, profile)
    _MEMO[key] = profile
    return profile
