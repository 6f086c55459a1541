"""The shared encoder: a timm ViT (or timm BEiT) with the masked forward paths MIM methods need.

The timm model is built by ``timm.create_model`` and kept whole as ``self.backbone``, so its state dict
is timm's own: exporting the encoder is ``backbone.state_dict()`` and loads into
``timm.create_model(timm_name, num_classes=0, **timm_kwargs)`` with no key surgery.

Two masked paths:

* :meth:`MaskedEncoder.forward_visible` (MAE, LUT): position embeddings are added to every patch, then only
  the kept patches are gathered and run through the blocks; the encoder never sees masked tokens.
* :meth:`MaskedEncoder.forward_masked` (SimMIM, BEiT, iBOT, data2vec): masked patch embeddings are replaced
  by a learnable mask token (``x * (1 - w) + token * w``) *before* CLS and position embeddings, and every
  position goes through the encoder.

Both paths take images of any multiple of the patch size on a ViT backbone (iBOT's 96 px local crops): the
absolute position table is resampled to the input's grid (:func:`resample_patch_pos_embed`). A BEiT
backbone's relative position bias exists for the model's own grid only.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from timm.models.beit import Beit
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from mimscale.models.pos_embed import resample_patch_pos_embed, sincos_pos_embed_2d


class MaskedEncoder(nn.Module):
    """timm ViT/BEiT encoder with masked forwards.

    Args:
        model_name: a timm model name (``vit_base_patch16_224``, ``beit_base_patch16_224`` ...); its
            defaults are overridden by ``timm_kwargs`` (``img_size``, ``patch_size``, ``embed_dim`` ...).
        fixed_pos_embed: replace the learnable absolute position table by MAE's fixed 2-D sin-cos table,
            registered as a buffer under timm's key ``pos_embed`` (not trained, still exported).
        timm_kwargs: forwarded to ``timm.create_model`` and recorded for export.
    """

    def __init__(
        self, model_name: str = "vit_base_patch16_224", fixed_pos_embed: bool = False, **timm_kwargs: Any
    ) -> None:
        super().__init__()
        timm_kwargs.pop("num_classes", None)
        self.timm_name = model_name
        self.timm_kwargs = dict(timm_kwargs)
        self.backbone = timm.create_model(model_name, pretrained=False, num_classes=0, **timm_kwargs)
        b = self.backbone
        self.is_beit = isinstance(b, Beit)
        if not (self.is_beit or isinstance(b, VisionTransformer)):
            raise ValueError(
                f"model_name={model_name!r} builds {type(b).__name__}: mimscale needs a timm "
                "VisionTransformer or Beit"
            )
        if not self.is_beit and (getattr(b, "num_reg_tokens", 0) or b.no_embed_class or b.cls_token is None):
            raise ValueError(
                f"model_name={model_name!r}: masked forwards need one CLS token, no register "
                "tokens and position embeddings on the CLS token (timm defaults)"
            )
        if getattr(b.patch_embed, "dynamic_img_size", False):
            raise ValueError("dynamic_img_size=True is not supported for masked pretraining")
        # timm's PatchEmbed asserts the model's image size unless told otherwise; the convolution works on
        # any multiple of the patch size, and the position table is resampled below (_patch_positions).
        b.patch_embed.strict_img_size = False
        self.fixed_pos_embed = fixed_pos_embed
        if fixed_pos_embed:
            if getattr(b, "pos_embed", None) is None:
                raise ValueError(f"fixed_pos_embed=True but {model_name!r} has no absolute position table")
            table = sincos_pos_embed_2d(self.embed_dim, self.grid, cls_token=True)
            del b.pos_embed  # the Parameter; the buffer keeps timm's key so exports load into timm
            b.register_buffer("pos_embed", table, persistent=True)
        self.grad_checkpointing = False
        _register_direct_params(self, self.backbone)

    # ---- geometry -------------------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.backbone.patch_embed.grid_size)  # type: ignore[return-value]

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def patch_size(self) -> int:
        return int(self.backbone.patch_embed.patch_size[0])

    @property
    def embed_dim(self) -> int:
        return int(self.backbone.embed_dim)

    @property
    def in_chans(self) -> int:
        return int(self.backbone.patch_embed.proj.in_channels)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.backbone.blocks  # type: ignore[return-value]

    def use_external(self, param: nn.Parameter) -> None:
        """Declare a parameter owned elsewhere (e.g. the method's mask token) that this encoder's forward
        uses, so ZeRO-3 gathers it in the encoder's forward and again in its backward, where the
        mask-token product needs it (the method's own output is not hooked for backward)."""
        register_external_parameter(self, param)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward (activation checkpointing) to trade compute for memory."""
        self.grad_checkpointing = enable

    # ---- pieces ---------------------------------------------------------------------------------
    def _pos_embed(self) -> torch.Tensor | None:
        return getattr(self.backbone, "pos_embed", None)

    def _rel_pos_bias(self) -> torch.Tensor | None:
        rpb = getattr(self.backbone, "rel_pos_bias", None)
        return rpb() if rpb is not None else None

    def _grid_of(self, images: torch.Tensor) -> tuple[int, int]:
        p = self.patch_size
        if images.shape[-2] % p or images.shape[-1] % p:
            raise ValueError(
                f"images of {tuple(images.shape[-2:])} px: expected multiples of the patch size {p}"
            )
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        if grid != self.grid and self.is_beit:
            raise ValueError(
                f"crops of {tuple(images.shape[-2:])} px need a ViT backbone: {self.timm_name} has a "
                f"relative position bias for a {self.grid} grid only"
            )
        return grid

    def _add_patch_positions(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Add the absolute position table (if any) to patch embeddings ``[B, L, D]`` on ``grid``: the model's
        own table on its grid, else the table resampled as DINO/iBOT do."""
        pos = self._pos_embed()
        if pos is None:
            return x
        if grid == self.grid:
            return x + pos[:, 1:]
        return x + resample_patch_pos_embed(pos[:, 1:], self.grid, grid).to(x.dtype)

    def _prepend_cls(self, x: torch.Tensor) -> torch.Tensor:
        cls = self.backbone.cls_token
        pos = self._pos_embed()
        if pos is not None:
            cls = cls + pos[:, :1]
        return torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)

    def run_blocks(
        self, x: torch.Tensor, collect: list[int] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Blocks then the final norm. ``collect`` lists block indices whose outputs (after the residual,
        before the final norm) are returned too, as data2vec's targets need."""
        b = self.backbone
        if not self.is_beit:
            x = b.norm_pre(x)
        rel = self._rel_pos_bias() if self.is_beit else None
        outs: list[torch.Tensor] = []
        wanted = set(collect or ())
        for i, blk in enumerate(b.blocks):
            kwargs = {"shared_rel_pos_bias": rel} if self.is_beit else {}
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False, **kwargs)
            else:
                x = blk(x, **kwargs)
            if i in wanted:
                outs.append(x)
        return b.norm(x), outs

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, L, D] patch embeddings, no position."""
        return self.backbone.patch_embed(images)

    # ---- forwards -------------------------------------------------------------------------------
    def forward(
        self,
        images: torch.Tensor,
        *,
        ids_keep: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
        collect: list[int] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The single entry methods call (``self.encoder(...)``), so ZeRO-3's module hooks gather the
        backbone's own tensors (CLS token, position table) for every path.

        ``ids_keep`` given: :meth:`forward_visible`; otherwise :meth:`forward_masked` (``mask=None`` for
        the unmasked image). Returns (final-normed tokens with CLS first, collected block outputs).
        """
        if ids_keep is not None:
            return self.forward_visible(images, ids_keep), []
        return self.forward_masked(images, mask, mask_token, collect)

    def forward_visible(self, images: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """MAE encoder: tokens ``[B, 1 + K, D]`` (CLS first, final-normed) of the kept patches only.

        Position embeddings are added before the masked tokens are dropped and CLS (with its position) is
        prepended after, as in MAE's ``forward_encoder``. ``ids_keep`` is ``[B, K]`` patch indices.
        """
        if self.is_beit:
            raise ValueError(
                "forward_visible needs absolute position embeddings (a ViT backbone); "
                "BEiT-style backbones use forward_masked"
            )
        grid = self._grid_of(images)
        x = self._add_patch_positions(self.embed_patches(images), grid)
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = self.backbone.pos_drop(self._prepend_cls(x))
        return self.run_blocks(x)[0]

    def forward_masked(
        self,
        images: torch.Tensor,
        mask: torch.Tensor | None,
        mask_token: torch.Tensor | None,
        collect: list[int] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Full-token encoder with mask tokens: ``([B, 1 + L, D] final-normed tokens, collected blocks)``.

        ``mask`` ``[B, L]`` bool (True = masked) or None for the unmasked image; ``mask_token`` ``[1, 1, D]``.
        ``L`` is the input's grid, which may differ from the model's on a ViT backbone.
        """
        grid = self._grid_of(images)
        x = self.embed_patches(images)
        if mask is not None:
            if mask_token is None:
                raise ValueError("forward_masked got a mask but no mask_token")
            w = mask.unsqueeze(-1).to(x.dtype)
            x = x * (1 - w) + mask_token.to(x.dtype) * w
        x = self._add_patch_positions(x, grid)
        x = self.backbone.pos_drop(self._prepend_cls(x))
        return self.run_blocks(x, collect)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """All tokens of the unmasked image, final-normed: equals timm's ``forward_features``."""
        return self(images)[0]


def register_external_parameter(module: nn.Module, param: nn.Parameter) -> None:
    """Tell ZeRO-3 that ``module``'s forward uses ``param``, which another module owns (the backbone's CLS
    token and position table, a method's mask token passed into the encoder): ZeRO-3 gathers a parameter
    only inside its owner's forward, and that forward never runs for these. A no-op without DeepSpeed."""
    try:
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter as register
    except ImportError:  # the model library works without DeepSpeed installed
        return
    register(module, param)


def rekey_external_params(module: nn.Module) -> None:
    """After ``copy.deepcopy`` of a module tree: DeepSpeed keys each module's external parameters by
    ``id(param)``, and a deep copy keeps the original's ids as keys while the values become the copies.
    ZeRO-3 looks parameters up by those keys, so re-key every module of the copy by its own tensors."""
    for m in module.modules():
        ext = getattr(m, "_external_params", None)
        if ext:
            m._external_params = {id(p): p for p in ext.values()}


def _register_direct_params(owner: nn.Module, backbone: nn.Module) -> None:
    """The backbone's own ``forward`` never runs, so its direct parameters are used by ``owner``'s."""
    for p in backbone.parameters(recurse=False):
        register_external_parameter(owner, p)
