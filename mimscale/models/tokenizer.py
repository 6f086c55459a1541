"""Discrete visual tokenizers for BEiT: the DALL-E discrete VAE (Ramesh et al. 2021; openai/DALL-E).

BEiT (Bao et al. 2022) predicts, at masked positions, the ids a frozen image tokenizer gives the unmasked
image. BEiT v1 used OpenAI's DALL-E dVAE encoder: 8192 ids on a 14x14 grid, computed from a 112 px copy of
the same crop (``--second_input_size 112``, stride 8). This module holds that architecture, configurable in
depth, stride, width and vocabulary, so one class serves three uses:

* stage 1 (``mimscale.methods.beit_tokenizer``) trains :class:`DVAEEncoder` + :class:`DVAEDecoder` with the
  Gumbel-softmax relaxation, DALL-E's recipe;
* stage 2 (``mimscale.methods.beit``) loads a frozen :class:`VisualTokenizer` with :func:`load_tokenizer`;
* users holding the published DALL-E ``encoder.pkl`` load it with the same function: the module names here
  are the official ones (``blocks.group_1.block_1.res_path.conv_1`` ...), only the official ``Conv2d``'s
  parameter names ``w``/``b`` become ``weight``/``bias`` (:func:`dalle_checkpoint_filter`), and the pickle is
  read without the ``dall_e`` package (:func:`load_dalle_pickle`).

Geometry: ``channel_mult`` has one entry per group of residual blocks, a 2x2 max-pool between groups, so the
stride is ``2 ** (len(channel_mult) - 1)``; DALL-E's ``(1, 2, 4, 8)`` gives stride 8 and 112 px -> 14x14.
Pixels enter through DALL-E's ``map_pixels`` (``[0, 1] -> [0.1, 0.9]``, the support of its logit-Laplace
likelihood); a tokenizer input is ``[0, 1]`` RGB, resized here to ``grid * stride``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import pickle
import re
import types
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torch.utils.checkpoint import checkpoint

LOGIT_LAPLACE_EPS = 0.1  # dall_e/utils.py logit_laplace_eps
DVAE_ARCH = "mimscale.dvae"  # the architecture name stage-1 exports record (not a timm model)
DALLE_INPUT_SIZE = 112  # BEiT v1 --second_input_size: the DALL-E encoder sees 112 px for a 14x14 grid

__all__ = [
    "DVAEConfig",
    "DVAEEncoder",
    "DVAEDecoder",
    "VisualTokenizer",
    "map_pixels",
    "unmap_pixels",
    "to_normalized",
    "to_unit_range",
    "logit_laplace_nll",
    "dalle_checkpoint_filter",
    "infer_dvae_config",
    "load_dalle_pickle",
    "load_tokenizer",
]


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """DALL-E's ``map_pixels``: ``[0, 1] -> [eps, 1 - eps]`` with eps = 0.1, where logit(x) stays finite."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`map_pixels`, clamped to ``[0, 1]`` (DALL-E's ``unmap_pixels``)."""
    return ((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS)).clamp(0, 1)


def logit_laplace_nll(x: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """Per-value negative log-likelihood of DALL-E's logit-Laplace distribution (DALL-E paper, Sec. 2.1).

    ``x`` ``[B, C, H, W]`` are mapped pixels in ``(0, 1)``; ``stats`` ``[B, 2C, H, W]`` are the decoder's
    outputs: the location ``mu`` (logit space) then ``log b``. The density of ``x`` is
    ``exp(-|logit(x) - mu| / b) / (2 b x (1 - x))``. Computed in float32.
    """
    x = x.float()
    mu, log_b = stats.float().chunk(2, dim=1)
    logit = torch.log(x) - torch.log1p(-x)
    return math.log(2.0) + log_b + torch.log(x) + torch.log1p(-x) + (logit - mu).abs() * torch.exp(-log_b)


# ---------------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class DVAEConfig:
    """Shape of a DALL-E-style dVAE. The defaults are DALL-E's published encoder/decoder (``n_hid`` 256,
    2 blocks per group, 4 groups, vocabulary 8192, decoder ``n_init`` 128) at BEiT's 112 px input."""

    vocab_size: int = 8192
    n_hid: int = 256
    n_blk_per_group: int = 2
    channel_mult: tuple[int, ...] = (1, 2, 4, 8)
    input_channels: int = 3
    input_size: int = DALLE_INPUT_SIZE  # the resolution the tokenizer was trained for (informational)
    n_init: int = 128  # decoder: width after its 1x1 input conv over the vocabulary

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        for name in ("vocab_size", "n_hid", "n_blk_per_group", "input_channels", "input_size", "n_init"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive int")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size={self.vocab_size}: expected >= 2")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult={self.channel_mult!r}: expected one positive int per group")
        for m in self.channel_mult:
            if (self.n_hid * m) % 4:
                # DALL-E's blocks use a bottleneck of n_out // 4 channels and require n_out % 4 == 0.
                raise ValueError(f"n_hid={self.n_hid} * channel_mult {m} is not a multiple of 4")
        if self.input_size % self.stride:
            raise ValueError(f"input_size={self.input_size} is not a multiple of the stride {self.stride}")

    @property
    def group_count(self) -> int:
        return len(self.channel_mult)

    @property
    def stride(self) -> int:
        """Total downsampling: one 2x2 max-pool between consecutive groups."""
        return 2 ** (self.group_count - 1)

    @property
    def grid(self) -> tuple[int, int]:
        g = self.input_size // self.stride
        return (g, g)

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.n_hid * m for m in self.channel_mult)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DVAEConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown dVAE config keys {sorted(unknown)}; allowed: {sorted(names)}")
        return cls(**{k: tuple(v) if k == "channel_mult" else v for k, v in d.items()})


# ---------------------------------------------------------------------------------------------------
# modules (layout of openai/DALL-E dall_e/encoder.py and decoder.py)


def _conv(n_in: int, n_out: int, kw: int) -> nn.Conv2d:
    """DALL-E's ``Conv2d``: 'same' padding, weights ~ N(0, 1 / (n_in * kw^2)), zero bias."""
    conv = nn.Conv2d(n_in, n_out, kw, padding=(kw - 1) // 2)
    nn.init.normal_(conv.weight, std=1.0 / math.sqrt(n_in * kw * kw))
    nn.init.zeros_(conv.bias)
    return conv


class _ResBlock(nn.Module):
    """``id_path(x) + post_gain * res_path(x)``: four ReLU-conv pairs through an ``n_out // 4`` bottleneck,
    ``post_gain = 1 / n_layers ** 2`` (DALL-E's small-residual initialisation, Sec. A.1)."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]) -> None:
        super().__init__()
        hid = n_out // 4
        self.post_gain = 1.0 / n_layers**2
        self.id_path: nn.Module = _conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        chans = [(n_in, hid), (hid, hid), (hid, hid), (hid, n_out)]
        layers: list[tuple[str, nn.Module]] = []
        for i, ((a, b), k) in enumerate(zip(chans, kernels), start=1):
            layers += [(f"relu_{i}", nn.ReLU()), (f"conv_{i}", _conv(a, b, k))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class _GroupedNet(nn.Module):
    """``blocks`` = input conv, groups of residual blocks, output ReLU + 1x1 conv; optional activation
    checkpointing per group (the same switch as the ViT encoders)."""

    blocks: nn.Sequential

    def __init__(self) -> None:
        super().__init__()
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name, module in self.blocks.named_children():
            grouped = name.startswith("group_")
            if self.grad_checkpointing and grouped and self.training and torch.is_grad_enabled():
                x = checkpoint(module, x, use_reentrant=False)
            else:
                x = module(x)
        return x


class DVAEEncoder(_GroupedNet):
    """DALL-E's dVAE encoder: mapped pixels ``[B, C, S, S]`` -> logits ``[B, vocab, S / stride, S / stride]``.

    Group ``g`` has ``n_blk_per_group`` blocks of width ``n_hid * channel_mult[g]`` (3x3, 3x3, 3x3, 1x1
    convs), followed by a 2x2 max-pool except after the last group; a 7x7 input conv and a ReLU + 1x1 output
    conv to the vocabulary. ``grid`` and ``patch_size`` (= stride) describe the geometry at
    ``config.input_size``, the same names as :class:`~mimscale.models.encoder.MaskedEncoder`, so the training
    loop reads the crop size from them.
    """

    def __init__(self, config: DVAEConfig) -> None:
        super().__init__()
        self.config = config
        widths = config.widths
        n_layers = config.group_count * config.n_blk_per_group
        layers: list[tuple[str, nn.Module]] = [("input", _conv(config.input_channels, widths[0], 7))]
        prev = widths[0]
        for g, w in enumerate(widths, start=1):
            group: list[tuple[str, nn.Module]] = [
                (f"block_{i + 1}", _ResBlock(prev if i == 0 else w, w, n_layers, (3, 3, 3, 1)))
                for i in range(config.n_blk_per_group)
            ]
            if g < len(widths):
                group.append(("pool", nn.MaxPool2d(kernel_size=2)))
            layers.append((f"group_{g}", nn.Sequential(OrderedDict(group))))
            prev = w
        layers.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()), ("conv", _conv(widths[-1], config.vocab_size, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(layers))

    @property
    def grid(self) -> tuple[int, int]:
        return self.config.grid

    @property
    def patch_size(self) -> int:
        return self.config.stride

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size


class DVAEDecoder(_GroupedNet):
    """DALL-E's dVAE decoder: (relaxed) one-hot codes ``[B, vocab, h, w]`` -> logit-Laplace statistics
    ``[B, 2C, h * stride, w * stride]``. A 1x1 input conv to ``n_init``, groups of blocks (1x1, 3x3, 3x3, 3x3
    convs) in the encoder's widths reversed with 2x nearest upsampling between groups, ReLU + 1x1 output."""

    def __init__(self, config: DVAEConfig) -> None:
        super().__init__()
        self.config = config
        widths = config.widths[::-1]
        n_layers = config.group_count * config.n_blk_per_group
        layers: list[tuple[str, nn.Module]] = [("input", _conv(config.vocab_size, config.n_init, 1))]
        prev = config.n_init
        for g, w in enumerate(widths, start=1):
            group: list[tuple[str, nn.Module]] = [
                (f"block_{i + 1}", _ResBlock(prev if i == 0 else w, w, n_layers, (1, 3, 3, 3)))
                for i in range(config.n_blk_per_group)
            ]
            if g < len(widths):
                group.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
            layers.append((f"group_{g}", nn.Sequential(OrderedDict(group))))
            prev = w
        layers.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()), ("conv", _conv(widths[-1], 2 * config.input_channels, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(layers))


def _imagenet_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    return mean, std


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Undo the trainer's ImageNet normalisation: float32 RGB in ``[0, 1]`` (what a tokenizer reads)."""
    mean, std = _imagenet_stats(images.device)
    return (images.float() * std + mean).clamp(0, 1)


def to_normalized(images01: torch.Tensor) -> torch.Tensor:
    """``[0, 1]`` RGB back to ImageNet-normalised float32 (for pictures drawn like the trainer's inputs)."""
    mean, std = _imagenet_stats(images01.device)
    return (images01.float() - mean) / std


def to_tokenizer_input(images01: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[0, 1]`` RGB at any size -> mapped pixels at ``size``, float32.

    BEiT v1 feeds the tokenizer a second rendering of the *same* crop (``RandomResizedCropAndInterpolation
    WithTwoPic``: one crop box, resized to 224 bicubic for the ViT and to 112 Lanczos for the dVAE). Resizing
    the ViT's crop here with antialiased bicubic gives that view up to the resampling filter, without a
    second decode in the data workers.
    """
    x = images01.float()
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    return map_pixels(x)


class VisualTokenizer(nn.Module):
    """A frozen image tokenizer: ``[0, 1]`` RGB images -> ids ``[B, h * w]`` (row-major), the argmax of
    the dVAE encoder's logits (as BEiT's ``get_codebook_indices`` and DALL-E's transformer targets).

    Never trained: parameters have ``requires_grad=False`` and the module stays in eval mode whatever
    ``train()`` is called with, so a method can hold it as a submodule (DeepSpeed then places, casts and,
    under ZeRO-3, partitions it like the rest) without it reaching the optimizer.
    """

    def __init__(self, encoder: DVAEEncoder, source: str = "") -> None:
        super().__init__()
        self.encoder = encoder
        self.source = source
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.train(False)

    @property
    def config(self) -> DVAEConfig:
        return self.encoder.config

    @property
    def vocab_size(self) -> int:
        return self.encoder.vocab_size

    @property
    def stride(self) -> int:
        return self.encoder.config.stride

    def train(self, mode: bool = True) -> VisualTokenizer:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images01: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Ids ``[B, grid[0] * grid[1]]`` of ``images01`` resized to ``grid * stride`` (default: the grid at
        the tokenizer's trained input size)."""
        grid = tuple(grid) if grid is not None else self.config.grid
        size = (grid[0] * self.stride, grid[1] * self.stride)
        x = to_tokenizer_input(images01, size)
        dtype = self.encoder.blocks.input.weight.dtype  # the placeholder keeps the dtype under ZeRO-3
        logits = self.encoder(x.to(dtype))
        return logits.argmax(dim=1).flatten(1)


# ---------------------------------------------------------------------------------------------------
# checkpoints: DALL-E layout adapter, pickle reader, loader


_DALLE_SUFFIX = {".w": ".weight", ".b": ".bias"}


def is_dalle_layout(state_dict: Mapping[str, Any]) -> bool:
    """True for a state dict with the official DALL-E parameter names (``blocks.input.w`` ...)."""
    return "blocks.input.w" in state_dict


def dalle_checkpoint_filter(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an official DALL-E encoder (or decoder) state dict onto :class:`DVAEEncoder`'s keys.

    The module tree is the same; the official ``dall_e.utils.Conv2d`` names its tensors ``w`` and ``b``
    where ``nn.Conv2d`` has ``weight`` and ``bias``. Shapes are identical (``[out, in, k, k]``, ``[out]``).
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        for old, new in _DALLE_SUFFIX.items():
            if k.endswith(old):
                out[k[: -len(old)] + new] = v
                break
        else:
            raise ValueError(f"unexpected key {k!r} in a DALL-E state dict: expected names ending in .w/.b")
    return out


_GROUP_RE = re.compile(r"^blocks\.group_(\d+)\.block_(\d+)\.")


def infer_dvae_config(state_dict: Mapping[str, torch.Tensor], input_size: int | None = None,
                      n_init: int | None = None) -> DVAEConfig:
    """Rebuild the :class:`DVAEConfig` of an encoder state dict (mimscale key names) from its shapes.

    The architecture depends only on the products ``n_hid * channel_mult[g]``; the input conv's width is
    taken as ``n_hid`` so the first multiplier is 1, as in DALL-E. ``input_size`` (not visible in weights)
    defaults to BEiT's 112 px scaled to the stride (a 14x14 grid).
    """
    if "blocks.input.weight" not in state_dict or "blocks.output.conv.weight" not in state_dict:
        raise ValueError("not a dVAE encoder state dict: expected blocks.input.weight and "
                         "blocks.output.conv.weight (DALL-E layout: blocks.input.w)")
    first = state_dict["blocks.input.weight"]
    n_hid, in_chans = int(first.shape[0]), int(first.shape[1])
    groups: dict[int, int] = {}
    for k in state_dict:
        m = _GROUP_RE.match(k)
        if m:
            g, b = int(m.group(1)), int(m.group(2))
            groups[g] = max(groups.get(g, 0), b)
    if not groups or sorted(groups) != list(range(1, len(groups) + 1)):
        raise ValueError(f"dVAE encoder groups {sorted(groups)}: expected group_1 .. group_N")
    n_blk = groups[1]
    if any(n != n_blk for n in groups.values()):
        raise ValueError(f"dVAE encoder has different block counts per group: {groups}")
    mult = []
    for g in range(1, len(groups) + 1):
        width = int(state_dict[f"blocks.group_{g}.block_1.res_path.conv_4.weight"].shape[0])
        if width % n_hid:
            raise ValueError(f"group_{g} width {width} is not a multiple of the input width {n_hid}")
        mult.append(width // n_hid)
    vocab = int(state_dict["blocks.output.conv.weight"].shape[0])
    stride = 2 ** (len(mult) - 1)
    size = input_size if input_size is not None else (DALLE_INPUT_SIZE // 8) * stride
    return DVAEConfig(vocab_size=vocab, n_hid=n_hid, n_blk_per_group=n_blk, channel_mult=tuple(mult),
                      input_channels=in_chans, input_size=size, n_init=n_init or DVAEConfig.n_init)


class _PickledDalleModule(nn.Module):
    """Stand-in for the ``dall_e`` classes while unpickling: ``nn.Module.__setstate__`` restores the
    parameters and submodules, which is all :func:`load_dalle_pickle` reads."""


class _DalleUnpickler(pickle.Unpickler):
    """Unpickler for DALL-E's ``encoder.pkl`` (a pickled ``dall_e.encoder.Encoder`` module) that needs no
    ``dall_e`` package and resolves only what such a file holds: torch tensor/parameter rebuilders,
    ``torch.nn`` modules, ``torch.device``, containers. Anything else is refused, so a tampered file cannot
    run arbitrary code through ``find_class``."""

    _ALLOWED = {
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_parameter_with_state"),
        ("torch", "device"),
        ("torch", "Size"),
        ("copyreg", "_reconstructor"),
        ("builtins", "object"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("__builtin__", "object"),
        ("__builtin__", "set"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if module == "dall_e" or module.startswith("dall_e."):
            return _PickledDalleModule
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and name.endswith("Storage"):
            return super().find_class(module, name)
        if module.startswith("torch.nn.modules."):
            cls = super().find_class(module, name)
            if isinstance(cls, type) and issubclass(cls, nn.Module):
                return cls
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a DALL-E pickle")


def _dalle_pickle_module() -> types.ModuleType:
    mod = types.ModuleType("mimscale_dalle_pickle")
    mod.Unpickler = _DalleUnpickler  # type: ignore[attr-defined]
    mod.load = lambda f, **kw: _DalleUnpickler(f, **kw).load()  # type: ignore[attr-defined]
    mod.__dict__["UnpicklingError"] = pickle.UnpicklingError
    return mod


def load_dalle_pickle(path: str | Path | io.BytesIO) -> dict[str, torch.Tensor]:
    """The state dict (official key names) of a pickled DALL-E module, e.g. ``encoder.pkl`` from
    ``https://cdn.openai.com/dall-e/encoder.pkl``, read on CPU without the ``dall_e`` package.

    A file holding a plain state dict is returned as is.
    """
    obj = torch.load(path, map_location="cpu", pickle_module=_dalle_pickle_module(), weights_only=False)
    if isinstance(obj, nn.Module):
        return {k: v.detach() for k, v in obj.state_dict().items()}
    if isinstance(obj, Mapping):
        return dict(obj)
    raise ValueError(f"{path}: expected a pickled DALL-E module or a state dict, got {type(obj).__name__}")


def _read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
        return load_file(str(path)), meta
    if path.suffix == ".pkl":
        return load_dalle_pickle(path), {}
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module", "weights"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return dict(obj), {}


def _encoder_keys(sd: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """The encoder's tensors with mimscale names, whatever wrapper prefix the file uses."""
    candidates = [meta.get("mimscale.encoder_prefix", ""), "", "encoder.", "tokenizer.encoder.", "module."]
    for prefix in candidates:
        for leaf in ("blocks.input.weight", "blocks.input.w"):
            if prefix + leaf in sd:
                sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix + "blocks.")}
                return dalle_checkpoint_filter(sub) if is_dalle_layout(sub) else sub
    raise ValueError("no dVAE encoder found: expected keys like 'blocks.input.weight' (mimscale) or "
                     "'blocks.input.w' (DALL-E), optionally under 'encoder.' or 'tokenizer.encoder.'")


def load_tokenizer(path: str | Path, input_size: int | None = None) -> VisualTokenizer:
    """A frozen :class:`VisualTokenizer` from a file:

    * a ``mimscale export`` of a ``beit_tokenizer`` run (full, or ``--encoder-only``): safetensors whose
      metadata ``timm.model_name`` is ``mimscale.dvae`` and ``timm.kwargs`` the :class:`DVAEConfig`;
    * the DALL-E encoder: ``encoder.pkl`` as published, or its state dict (keys ``blocks.input.w`` ...) as
      ``.safetensors`` / ``.pt``.

    The architecture is rebuilt from the tensors' shapes (so a mismatch cannot load silently) and the
    weights load strictly. ``input_size`` overrides the recorded training resolution (informational: the
    tokenizer resizes its input to the caller's grid times its stride).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist")
    sd, meta = _read_state_dict(path)
    enc_sd = _encoder_keys(sd, meta)
    recorded: DVAEConfig | None = None
    if meta.get("timm.model_name") == DVAE_ARCH and meta.get("timm.kwargs"):
        recorded = DVAEConfig.from_dict(json.loads(meta["timm.kwargs"]))
    size = input_size if input_size is not None else (recorded.input_size if recorded else None)
    config = infer_dvae_config(enc_sd, input_size=size, n_init=recorded.n_init if recorded else None)
    if recorded is not None and dataclasses.replace(recorded, input_size=config.input_size) != config:
        warnings.warn(f"{path}: recorded tokenizer config {recorded} differs from its weights' shapes "
                      f"{config}; using the shapes", stacklevel=2)
    encoder = DVAEEncoder(config)
    encoder.load_state_dict(enc_sd, strict=True)
    return VisualTokenizer(encoder, source=str(path))


def random_tokenizer(grid: tuple[int, int], stride: int, vocab_size: int = 8192, n_hid: int = 64,
                     seed: int = 0) -> VisualTokenizer:
    """A randomly initialised frozen tokenizer (for smoke runs only: its ids carry no meaning).

    Narrow (``n_hid`` 64, one block per group) so a CPU smoke run stays fast; ``stride`` must be a power of
    two. The weights come from a private generator so every rank builds the same tokenizer.
    """
    if stride < 1 or stride & (stride - 1):
        raise ValueError(f"stride={stride}: expected a power of two")
    groups = int(math.log2(stride)) + 1
    config = DVAEConfig(vocab_size=vocab_size, n_hid=n_hid, n_blk_per_group=1,
                        channel_mult=tuple(2**i for i in range(groups)), input_size=grid[0] * stride)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        encoder = DVAEEncoder(config)
    finally:
        torch.random.set_rng_state(state)
    return VisualTokenizer(encoder, source="random")
