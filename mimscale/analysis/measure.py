"""All measurements of one encoder in one pass per chunk of images: attention distance of every block,
singular-value spectra of the requested blocks, and the last block's CLS attention maps.

Memory stays bounded for ViT-L/H: images go to the device ``batch_size`` at a time, each block's attention
is recomputed, reduced to per-head sums and dropped before the next block runs (:func:`visit_blocks`), and
only running sums leave the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mimscale.analysis.attention import (
    attention_probs,
    check_recomputed,
    cls_attention,
    mean_attention_distance,
)
from mimscale.analysis.hooks import (
    BlockCapture,
    check_encoder,
    encoder_blocks,
    num_prefix_tokens,
    patch_grid,
    patch_size,
    resolve_layers,
    visit_blocks,
)
from mimscale.analysis.spectrum import normalised_singular_values

__all__ = ["EncoderMeasurements", "measure_encoder"]


@dataclass
class EncoderMeasurements:
    """What :func:`measure_encoder` found.

    ``attention_distance`` ``[depth, heads]`` px; ``spectra`` ``{block: [min(T, D)]}`` (mean over images of
    the per-image normalised singular values of the patch tokens after that block); ``cls_maps``
    ``[n, heads, gh, gw]``, the last block's CLS attention over the patches of the first ``n`` images (None
    when not asked or the model has no CLS token).
    """

    attention_distance: torch.Tensor
    spectra: dict[int, torch.Tensor]
    cls_maps: torch.Tensor | None
    num_images: int
    grid: tuple[int, int]
    patch_size: tuple[int, int]
    num_prefix_tokens: int


def has_cls_token(model: nn.Module) -> bool:
    return getattr(model, "cls_token", None) is not None and num_prefix_tokens(model) >= 1


@torch.no_grad()
def measure_encoder(
    model: nn.Module,
    images: torch.Tensor,
    *,
    spectrum_layers: int | str | Sequence[int | str] | None = "last",
    batch_size: int = 32,
    map_images: int = 0,
    progress: Callable[[int], None] | None = None,
) -> EncoderMeasurements:
    """Measure a timm ViT/BEiT ``model`` on normalised ``images`` ``[N, 3, H, W]`` (kept where they are;
    each chunk is copied to the model's device). ``spectrum_layers``: blocks whose patch-token spectrum is
    measured (:func:`~mimscale.analysis.hooks.resolve_layers`; empty for none). ``progress(done)`` is called
    after each chunk with the number of images measured so far."""
    check_encoder(model)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images of shape {tuple(images.shape)}: expected a non-empty [N, 3, H, W] batch")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    depth = len(encoder_blocks(model))
    no_spectra = isinstance(spectrum_layers, (list, tuple)) and not spectrum_layers
    spec_layers = set() if no_spectra else set(resolve_layers(spectrum_layers, depth))
    device = next(model.parameters()).device
    prefix, ps, grid = num_prefix_tokens(model), patch_size(model), patch_grid(model, images)
    want_maps = min(map_images, images.shape[0]) if has_cls_token(model) else 0

    dist_sums: dict[int, torch.Tensor] = {}
    spec_sums: dict[int, torch.Tensor] = {}
    maps: list[torch.Tensor] = []
    n = images.shape[0]
    for start in range(0, n, batch_size):
        chunk = images[start : start + batch_size].to(device, non_blocking=True)
        first = start == 0

        def visit(c: BlockCapture, first: bool = first, start: int = start) -> None:
            attn = c.block.attn
            if first:  # once per model: the recomputation must reproduce what the block computed
                probs = check_recomputed(attn, c.attn_input, c.attn_output, f" of block {c.index}",
                                         **c.attn_kwargs)
            else:
                probs = attention_probs(attn, c.attn_input, **c.attn_kwargs)
            d = mean_attention_distance(probs, grid, ps, prefix).sum(dim=0).double()
            dist_sums[c.index] = dist_sums[c.index] + d if c.index in dist_sums else d
            if c.index == depth - 1 and start < want_maps:
                maps.append(cls_attention(probs[: want_maps - start], grid, prefix).cpu())
            del probs
            if c.index in spec_layers:
                s = normalised_singular_values(c.output[:, prefix:]).sum(dim=0).double()
                spec_sums[c.index] = spec_sums[c.index] + s if c.index in spec_sums else s
        visit_blocks(model, chunk, "all", visit, attention=True)
        if progress is not None:
            progress(min(start + batch_size, n))
    distance = torch.stack([dist_sums[i] for i in range(depth)]) / n
    return EncoderMeasurements(
        attention_distance=distance.float().cpu(),
        spectra={i: (spec_sums[i] / n).float().cpu() for i in sorted(spec_sums)},
        cls_maps=torch.cat(maps) if maps else None,
        num_images=n,
        grid=grid,
        patch_size=ps,
        num_prefix_tokens=prefix,
    )
