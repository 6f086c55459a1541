"""Model FLOPs of a pretraining step: analytic counts for ViT encoders and the MAE decoder, and a
counter that also sees fused attention.

Conventions (those of MFU in the PaLM and Megatron papers): a multiply-add is 2 FLOPs; only matrix
products are counted (linear layers, the patch projection, attention's ``Q K^T`` and ``A V``,
``2 N^2 D`` each per layer); normalisation, softmax, GELU and the loss are left out (well under 1%
for ViTs). Training costs 3x the forward (the backward computes gradients for activations and
weights, two products per forward product), which is what :func:`FlopReport.train` reports; with
activation checkpointing the hardware does a fourth forward, which MFU deliberately does not count.

Two ways to get the number, which tests cross-check:

* :func:`method_flops`: analytic, from what the method says its encoder sees
  (:meth:`~mimscale.methods.base.Method.encoder_passes`: MAE's and LUT's encoders run on the
  ``1 + K`` kept tokens only, ``K = int(L * (1 - mask_ratio))``; the full-token methods on ``1 + L``;
  iBOT also on its local crops; teachers forward only) plus the heads it models
  (:meth:`~mimscale.methods.base.Method.head_flops`: MAE's decoder on ``1 + L``).
* :func:`count_flops`: ``torch.utils.flop_counter.FlopCounterMode`` around a callable. PyTorch's
  counter has formulas for the CUDA fused attention kernels (flash, memory-efficient, cuDNN) but
  not for the CPU flash kernel ``F.scaled_dot_product_attention`` dispatches to on CPU, so on CPU
  it silently counts attention as zero; importing this module registers the missing formulas.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import flop_counter as _fc

__all__ = [
    "EncoderPass",
    "FlopReport",
    "PEAK_BF16_TFLOPS",
    "attention_flops",
    "count_flops",
    "detect_peak_tflops",
    "linear_flops",
    "mae_decoder_flops",
    "method_flops",
    "vit_block_flops",
    "vit_encoder_flops",
]

# Dense bf16 peak (no sparsity) of common accelerators, TFLOP/s, from the vendors' data sheets.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "V100": 125.0,  # fp16 tensor cores (no bf16)
}


def detect_peak_tflops(device_name: str | None = None) -> float | None:
    """bf16 dense peak for a CUDA device name (``torch.cuda.get_device_name()``), None if unknown."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    name = device_name.upper()
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # most specific first
        parts = key.upper().split()
        if all(p in name for p in parts):
            if key == "H100" and "PCIE" in name:
                return PEAK_BF16_TFLOPS["H100 PCIe"]
            return PEAK_BF16_TFLOPS[key]
    return None


# ------------------------------------------------------------------------------------------------
# analytic counts (per image)


def linear_flops(tokens: int, in_features: int, out_features: int) -> int:
    """A Linear applied to ``tokens`` vectors."""
    return 2 * tokens * in_features * out_features


def attention_flops(tokens: int, dim: int) -> int:
    """``Q K^T`` and ``A V`` of one self-attention layer (all heads): ``2 N^2 D`` each."""
    return 2 * 2 * tokens * tokens * dim


def vit_block_flops(tokens: int, dim: int, mlp_ratio: float = 4.0) -> int:
    """One pre-norm transformer block: qkv, attention, projection, 2-layer MLP."""
    hidden = int(dim * mlp_ratio)
    return (
        linear_flops(tokens, dim, 3 * dim)
        + attention_flops(tokens, dim)
        + linear_flops(tokens, dim, dim)
        + linear_flops(tokens, dim, hidden)
        + linear_flops(tokens, hidden, dim)
    )


def vit_encoder_flops(tokens: int, dim: int, depth: int, mlp_ratio: float = 4.0) -> int:
    """``depth`` blocks on ``tokens`` tokens (CLS included), without the patch projection."""
    return depth * vit_block_flops(tokens, dim, mlp_ratio)


def mae_decoder_flops(
    kept: int,
    num_patches: int,
    enc_dim: int,
    dec_dim: int,
    depth: int,
    patch_dim: int,
    mlp_ratio: float = 4.0,
) -> int:
    """MAE decoder: embed the ``1 + kept`` encoder tokens, blocks on ``1 + L``, predict on ``1 + L``."""
    tokens = 1 + num_patches
    return (
        linear_flops(1 + kept, enc_dim, dec_dim)
        + vit_encoder_flops(tokens, dec_dim, depth, mlp_ratio)
        + linear_flops(tokens, dec_dim, patch_dim)
    )


@dataclass(frozen=True)
class EncoderPass:
    """One run of the method's encoder per image: ``patches`` embedded by the patch projection, ``tokens``
    (CLS included) through the blocks, ``repeats`` times per image (views, crops), ``trained`` False for a
    forward-only teacher pass (no backward)."""

    patches: int
    tokens: int
    repeats: int = 1
    trained: bool = True


@dataclass
class FlopReport:
    """Forward FLOPs per image, by part. ``train`` counts a trained part three times (forward + backward)
    and a forward-only part (``teacher``) once."""

    forward: int
    parts: dict[str, int] = field(default_factory=dict)
    forward_only: int = 0  # the part of ``forward`` that has no backward (EMA teachers)

    @property
    def train(self) -> int:
        return 3 * (self.forward - self.forward_only) + self.forward_only

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in self.parts.items())
        return f"{self.forward / 1e9:.2f} GFLOPs/image forward ({parts}), {self.train / 1e9:.2f} train"


def mlp_ratio_of(block: Any, dim: int) -> float:
    """A timm block's MLP expansion (``fc1`` width over the embedding width); 4 when it has none."""
    fc1 = getattr(getattr(block, "mlp", None), "fc1", None)
    return fc1.out_features / dim if fc1 is not None else 4.0


def method_flops(method: torch.nn.Module) -> FlopReport:
    """Analytic forward FLOPs per image of a mimscale method: every encoder pass it declares
    (:meth:`~mimscale.methods.base.Method.encoder_passes`) and the heads it models
    (:meth:`~mimscale.methods.base.Method.head_flops`, e.g. MAE's decoder).

    Heads a method does not model (SimMIM's 1x1 conv, iBOT's projection head, ...) are left out; use
    :func:`count_flops` for the exact total of any method.
    """
    enc = method.encoder
    dim, p, c = enc.embed_dim, enc.patch_size, enc.in_chans
    depth = len(enc.blocks)
    mlp = mlp_ratio_of(enc.blocks[0], dim)
    parts = {"patch_embed": 0, "encoder": 0}
    teacher = 0
    for ps in method.encoder_passes():
        embed = ps.repeats * linear_flops(ps.patches, p * p * c, dim)
        blocks = ps.repeats * vit_encoder_flops(ps.tokens, dim, depth, mlp)
        if ps.trained:
            parts["patch_embed"] += embed
            parts["encoder"] += blocks
        else:
            teacher += embed + blocks
    parts.update(method.head_flops())
    if teacher:
        parts["teacher"] = teacher
    return FlopReport(sum(parts.values()), parts, forward_only=teacher)


# ------------------------------------------------------------------------------------------------
# counting


def _register_cpu_attention_formulas() -> None:
    """Teach FlopCounterMode the CPU flash-attention kernels (absent from PyTorch's registry)."""
    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd not in _fc.flop_registry:

        @_fc.register_flop_formula(fwd)
        def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return _fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    if bwd is not None and bwd not in _fc.flop_registry:

        @_fc.register_flop_formula(bwd)
        def _cpu_sdpa_backward(
            grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
        ) -> int:
            return _fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_register_cpu_attention_formulas()


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, Any]:
    """Run ``fn(*args, **kwargs)`` under FlopCounterMode; returns (total FLOPs, fn's result).

    Fused attention is counted on CUDA and (thanks to this module) on CPU. Divide by the batch
    size for per-image numbers; wrap forward + backward to count a training step.
    """
    with _fc.FlopCounterMode(display=False) as counter:
        out = fn(*args, **kwargs)
    return int(counter.get_total_flops()), out
