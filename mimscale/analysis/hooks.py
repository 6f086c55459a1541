"""The one hook-based path every analysis shares: run a timm ViT/BEiT encoder and hand each requested
block's tokens (and, when asked, exactly what its attention module received) to a callback while the
forward pass is still going.

Why hooks and a callback instead of returning every layer: the analyses reduce each layer at once (an
attention matrix of ViT-H/14 is ``B x 16 x 257 x 257`` per block), so only one block's attention exists at a
time; and the forward stops after the last requested block, so asking for block 3 of 32 costs 4 blocks.
Why the attention module's own input: the block is left to compute its pre-norm, layer scale and residual
as it does, and the analysis reads the tensor ``attn`` really saw, with its keyword arguments (BEiT's
shared relative position bias arrives that way).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "BlockCapture",
    "block_outputs",
    "check_encoder",
    "encoder_blocks",
    "num_prefix_tokens",
    "patch_grid",
    "patch_size",
    "resolve_layers",
    "visit_blocks",
]

LayerSpec = int | str | Sequence[int | str] | None


@dataclass
class BlockCapture:
    """What one block saw and produced during a :func:`visit_blocks` pass.

    ``output``: the tokens after the block (residual stream, before the model's final norm), ``[B, N, D]``
    with the prefix (CLS, register) tokens first. With ``attention=True`` also ``attn_input``, the tensor
    the block's ``attn`` module was called with (after the block's pre-norm), its keyword arguments
    (``shared_rel_pos_bias`` for BEiT) and ``attn_output``, what the module returned.
    """

    index: int
    block: nn.Module
    output: torch.Tensor
    attn_input: torch.Tensor | None = None
    attn_kwargs: dict[str, Any] = field(default_factory=dict)
    attn_output: torch.Tensor | None = None


def check_encoder(model: nn.Module) -> None:
    """Raise ``ValueError`` unless ``model`` is a timm VisionTransformer or Beit (or a subclass)."""
    from timm.models.beit import Beit
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, (VisionTransformer, Beit)):
        raise ValueError(
            f"{type(model).__name__} is not a timm VisionTransformer or Beit: the analyses read a ViT's "
            "blocks, patch grid and prefix tokens"
        )


def encoder_blocks(model: nn.Module) -> nn.ModuleList | nn.Sequential:
    check_encoder(model)
    return model.blocks  # type: ignore[return-value]


def num_prefix_tokens(model: nn.Module) -> int:
    """Tokens before the patch tokens: CLS, register and distillation tokens (timm's own count)."""
    return int(getattr(model, "num_prefix_tokens", 1))


def patch_size(model: nn.Module) -> tuple[int, int]:
    p = model.patch_embed.patch_size
    return (int(p[0]), int(p[1])) if isinstance(p, (tuple, list)) else (int(p), int(p))


def patch_grid(model: nn.Module, images: torch.Tensor) -> tuple[int, int]:
    """The patch grid ``(rows, columns)`` the model lays over ``images`` ``[B, C, H, W]``."""
    ph, pw = patch_size(model)
    h, w = images.shape[-2:]
    if h % ph or w % pw:
        raise ValueError(f"images of {h}x{w} px are not a multiple of the patch size {ph}x{pw}")
    return h // ph, w // pw


def resolve_layers(layers: LayerSpec, depth: int) -> list[int]:
    """Block indices, 0-based and sorted, from ``"all"``, ``"last"``, an int (negative counts from the end,
    as Python indexing) or a list of those; None means ``"last"``."""
    if layers is None:
        layers = "last"
    items: Iterable[int | str] = [layers] if isinstance(layers, (int, str)) else layers
    out: set[int] = set()
    for item in items:
        if item == "all":
            out.update(range(depth))
            continue
        if item == "last":
            out.add(depth - 1)
            continue
        try:
            i = int(item)
        except (TypeError, ValueError):
            raise ValueError(
                f"layer {item!r}: expected 'all', 'last' or a block index (0-based, negative from the end)"
            ) from None
        if not -depth <= i < depth:
            raise ValueError(f"layer {i}: the encoder has {depth} blocks, allowed indices are "
                             f"0..{depth - 1} (or -{depth}..-1)")
        out.add(i % depth)
    return sorted(out)


class _StopForward(Exception):
    """Raised from the last requested block's hook: the blocks after it are not needed."""


@torch.no_grad()
def visit_blocks(
    model: nn.Module,
    images: torch.Tensor,
    layers: LayerSpec,
    visit: Callable[[BlockCapture], None],
    *,
    attention: bool = False,
) -> None:
    """Run ``model`` (eval mode, no grad) on ``images`` and call ``visit`` once per requested block, in block
    order, right after that block ran. The capture is released after the call, and the forward stops after
    the last requested block. The model's training mode is restored afterwards."""
    blocks = encoder_blocks(model)
    wanted = resolve_layers(layers, len(blocks))
    if not wanted:
        return
    last = wanted[-1]
    pending: dict[int, BlockCapture] = {}
    handles = []

    def pre_attn(i: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["x"]
            rest = {k: v for k, v in kwargs.items() if k != "x"}
            pending[i] = BlockCapture(i, blocks[i], output=x, attn_input=x, attn_kwargs=rest)

        return hook

    def post_attn(i: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            pending[i].attn_output = output

        return hook

    def post_block(i: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            capture = pending.pop(i, None) or BlockCapture(i, module, output)
            capture.output = output
            visit(capture)
            if i == last:
                raise _StopForward

        return hook

    for i in wanted:
        blk = blocks[i]
        if attention:
            attn = getattr(blk, "attn", None)
            if not isinstance(attn, nn.Module):
                raise ValueError(f"block {i} ({type(blk).__name__}) has no 'attn' module to read")
            handles.append(attn.register_forward_pre_hook(pre_attn(i), with_kwargs=True))
            handles.append(attn.register_forward_hook(post_attn(i)))
        handles.append(blk.register_forward_hook(post_block(i)))
    was_training = model.training
    model.eval()
    try:
        model.forward_features(images)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def block_outputs(
    model: nn.Module, images: torch.Tensor, layers: LayerSpec = "all"
) -> dict[int, torch.Tensor]:
    """The token features after each requested block: ``{block index: [B, N, D]}``, all tokens (prefix
    tokens first; ``tokens[:, num_prefix_tokens(model):]`` are the patches), the residual stream before the
    model's final norm. ``layers``: ``"all"``, ``"last"``, an index or a list (see :func:`resolve_layers`).

    This is the hook path (:func:`visit_blocks`) the attention and spectrum analyses run on; for many images
    call it per chunk and reduce, as :func:`mimscale.analysis.measure.measure_encoder` does.
    """
    out: dict[int, torch.Tensor] = {}

    def keep(c: BlockCapture) -> None:
        out[c.index] = c.output.detach()

    visit_blocks(model, images, layers, keep)
    return out
