"""Attention as a block really computes it, and the mean attention distance of its heads.

timm's attention runs through fused ``scaled_dot_product_attention``, which never materialises the
probabilities. They are recomputed here from the same block's ``q`` and ``k``: the block's own projection
(timm's ``Attention``: ``qkv`` plus ``q_norm``/``k_norm``; BEiT's: ``qkv`` with the separate q/v biases), its
scale, and every additive bias the block applies (BEiT's per-block relative position bias and the shared one
passed to it). :func:`check_recomputed` multiplies the recomputed probabilities back through ``v`` and the
output projection and compares with what the module returned, so a variant this file does not know fails
loudly instead of giving plausible numbers.

Mean attention distance (Dosovitskiy et al. 2021, Fig. 7; used by the LUT paper to show MAE's locality):
for each head, the attention-weighted Euclidean distance in pixels between a query patch and the patches it
attends to, averaged over queries and images. Prefix tokens (CLS, registers) are not patches and have no
position: their rows and columns are dropped and each query's row is renormalised over the patch keys.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = [
    "attention_distance",
    "attention_probs",
    "check_recomputed",
    "cls_attention",
    "mean_attention_distance",
    "patch_distances",
]


def _kinds() -> tuple[type, type]:
    from timm.layers.attention import Attention as TimmAttention
    from timm.models.beit import Attention as BeitAttention

    return TimmAttention, BeitAttention


def _qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q, k, v`` ``[B, heads, N, head_dim]`` exactly as the module's forward builds them."""
    timm_attention, beit_attention = _kinds()
    b, n, _ = x.shape
    if isinstance(attn, beit_attention):
        if attn.q_bias is None:
            qkv = attn.qkv(x)
        else:  # timm beit.py Attention.forward: the k bias is a zero buffer between the q and v biases
            qkv = attn.qkv(x) + torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        q, k, v = qkv.reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v
    if isinstance(attn, timm_attention):
        qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return attn.q_norm(q), attn.k_norm(k), v
    raise ValueError(
        f"attention module {type(attn).__name__} is not supported: the analyses recompute timm's "
        "Attention (ViT) and BEiT's Attention"
    )


def _logit_bias(attn: nn.Module, kwargs: dict[str, Any], n: int) -> torch.Tensor | None:
    """The additive bias the module puts on the logits (broadcastable to ``[B, heads, N, N]``)."""
    _, beit_attention = _kinds()
    if isinstance(attn, beit_attention):
        bias = attn._get_rel_pos_bias() if attn.relative_position_bias_table is not None else None
        shared = kwargs.get("shared_rel_pos_bias")
        if shared is not None:
            bias = shared if bias is None else bias + shared
        return bias
    if kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
        raise ValueError("attention with an attn_mask or is_causal is not supported by the analyses")
    return None


@torch.no_grad()
def attention_probs(attn: nn.Module, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """The probabilities ``softmax(q k^T * scale + bias)`` ``[B, heads, N, N]`` (float32) that the timm
    attention module ``attn`` uses when called as ``attn(x, **kwargs)``; rows are queries, columns keys."""
    q, k, _ = _qkv(attn, x)
    return _probs(attn, q, k, kwargs)


def _probs(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    logits = (q.float() * attn.scale) @ k.float().transpose(-2, -1)
    bias = _logit_bias(attn, kwargs, q.shape[-2])
    if bias is not None:
        logits = logits + bias.float()
    return logits.softmax(dim=-1)


@torch.no_grad()
def check_recomputed(attn: nn.Module, x: torch.Tensor, output: torch.Tensor, where: str = "",
                     rtol: float = 1e-3, **kwargs: Any) -> torch.Tensor:
    """Recompute the probabilities and verify that ``probs @ v`` through the module's output path gives
    ``output``, what the module returned for ``attn(x, **kwargs)``; returns the probabilities.

    Raises ``RuntimeError`` when the relative error exceeds ``rtol``: the module computes something the
    recomputation does not (an unknown variant), so its probabilities would be wrong.
    """
    q, k, v = _qkv(attn, x)
    probs = _probs(attn, q, k, kwargs)
    b, _, n, _ = q.shape
    y = (probs @ v.float()).transpose(1, 2).reshape(b, n, -1).to(x.dtype)
    y = getattr(attn, "norm", nn.Identity())(y)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        y = y * gate(x).sigmoid()
    y = attn.proj(y)
    err = float((y.float() - output.float()).norm() / output.float().norm().clamp_min(1e-12))
    if not err <= rtol:
        raise RuntimeError(
            f"recomputed attention{where} does not reproduce the module's output (relative error {err:.2e}): "
            f"{type(attn).__name__} computes something the analysis does not model"
        )
    return probs


def patch_distances(grid: tuple[int, int], patch_size: tuple[int, int] | int,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """``[L, L]`` Euclidean distances in pixels between patch centres of a row-major ``grid``: grid
    distance times patch size (``(dy * patch_h)^2 + (dx * patch_w)^2`` under the root)."""
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    gh, gw = grid
    rows, cols = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                                indexing="ij")
    pos = torch.stack([rows.flatten() * ph, cols.flatten() * pw], dim=-1)
    return torch.cdist(pos, pos).to(device=device, dtype=torch.float32)


def mean_attention_distance(probs: torch.Tensor, grid: tuple[int, int], patch_size: tuple[int, int] | int,
                            num_prefix: int) -> torch.Tensor:
    """Mean attention distance per image and head, ``[B, heads]``, in pixels, from probabilities
    ``[B, heads, N, N]`` whose first ``num_prefix`` tokens are not patches.

    Definition: keep the patch-to-patch block of the attention (drop the prefix rows and columns),
    renormalise each query's row to sum to 1 over the patch keys, multiply by the distance in pixels between
    the query's and the key's patch centres (:func:`patch_distances`), sum over keys and average over
    queries.
    """
    length = grid[0] * grid[1]
    if probs.shape[-1] != num_prefix + length:
        raise ValueError(f"attention over {probs.shape[-1]} tokens, expected {num_prefix} prefix + "
                         f"{length} patches of a {grid} grid")
    p = probs[..., num_prefix:, num_prefix:].float()
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    dist = patch_distances(grid, patch_size, device=p.device)
    return (p * dist).sum(dim=-1).mean(dim=-1)


def cls_attention(probs: torch.Tensor, grid: tuple[int, int], num_prefix: int) -> torch.Tensor:
    """The first (CLS) token's attention over the patches, renormalised over them: ``[B, heads, gh, gw]``."""
    if num_prefix < 1:
        raise ValueError("the model has no prefix (CLS) token whose attention could be shown")
    p = probs[:, :, 0, num_prefix:].float()
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    return p.reshape(p.shape[0], p.shape[1], *grid)


def attention_distance(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Mean attention distance ``[depth, heads]`` in pixels of a timm ViT/BEiT ``model`` on ``images``
    (normalised ``[B, 3, H, W]``, any device; chunks of ``batch_size`` run on the model's device).

    Definition: for each block, the attention probabilities the block uses (recomputed from its own ``q``
    and ``k``, BEiT's relative position bias included, and checked against the block's output) among
    **patch tokens only**: the CLS row and column and any other prefix tokens are dropped and each row is
    renormalised to sum to 1 over the patch keys; times the Euclidean distance in pixels between the
    query's and the key's patch centres (grid distance x patch size), summed over keys, averaged over
    queries and images.
    """
    from mimscale.analysis.measure import measure_encoder

    return measure_encoder(model, images, spectrum_layers=(), batch_size=batch_size).attention_distance

