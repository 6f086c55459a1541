"""SimMIM: a simple framework for masked image modeling (Xie et al. 2022; microsoft/SimMIM).

Random 32-px cells (60 %) of the image are masked; the masked patch embeddings are replaced by a learnable
mask token before CLS and position embeddings, so the encoder sees every position; a single 1x1 conv +
PixelShuffle head regresses the raw (normalised) pixels; the loss is the L1 error over the masked pixels
only: ``sum(|x - x_rec| * m) / (sum(m) + 1e-5) / in_chans`` (official ``SimMIM.forward``).

The paper's ViT runs use a BEiT-style backbone (shared relative position bias, layer scale 0.1, no
absolute position embedding, final LayerNorm on the tokens): timm's ``Beit`` with
:data:`mimscale.models.backbones.BEIT_STYLE` plus :data:`SIMMIM_BEIT`, the defaults for ``beit_*`` names.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mimscale.masking import SimMIMMasker
from mimscale.methods.base import Method, MethodOutput, register_method
from mimscale.models.backbones import beit_style_kwargs, check_final_norm
from mimscale.models.encoder import MaskedEncoder
from mimscale.models.heads import PixelShuffleHead, init_beit_style_, trunc_normal_within_std_
from mimscale.models.patches import patchify, unpatchify

LOSS_EPS = 1e-5  # official: (loss_recon * mask).sum() / (mask.sum() + 1e-5) / in_chans

# configs/vit_base__800ep/simmim_pretrain__vit_base__img224__800ep.yaml + config.py defaults:
# USE_APE False, USE_RPB False, USE_SHARED_RPB True (BEIT_STYLE), INIT_VALUES 0.1, QKV_BIAS True,
# USE_MEAN_POOLING False (so the final LayerNorm is applied to the tokens: timm's global_pool="token" keeps
# ``norm`` a LayerNorm).
SIMMIM_BEIT: dict[str, Any] = {"init_values": 0.1, "global_pool": "token"}


def pixel_mask(mask: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Patch mask ``[B, L]`` -> pixel mask ``[B, 1, H, W]`` (float), each patch repeated ``patch_size``
    times along both axes (official: ``mask.repeat_interleave(p, 1).repeat_interleave(p, 2)``)."""
    m = mask.reshape(mask.shape[0], grid[0], grid[1])
    m = m.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)
    return m.unsqueeze(1).float()


def simmim_loss(images: torch.Tensor, x_rec: torch.Tensor, mask_px: torch.Tensor) -> torch.Tensor:
    """``sum(|x - x_rec| * m) / (sum(m) + 1e-5) / C`` in float32: the mean L1 error per masked pixel value.

    ``mask_px`` is the ``[B, 1, H, W]`` pixel mask; it broadcasts over channels, hence the ``/ C``.
    """
    l1 = (images.float() - x_rec.float()).abs()
    return (l1 * mask_px).sum() / (mask_px.sum() + LOSS_EPS) / images.shape[1]


@register_method
class SimMIM(Method):
    """SimMIM on the shared encoder.

    Args:
        model_name: timm architecture (``beit_base_patch16_224`` as in the paper's ViT runs, or a ViT).
        mask_patch_size: side of the masked cells in pixels (32).
        mask_ratio: fraction of cells masked, ``ceil(cells * r)`` per image (0.6).
        init_std: std of the official init (truncated at one std), see :func:`init_beit_style_` (0.02).
        timm_kwargs: the encoder's timm arguments; for ``beit_*`` names the BEiT-style layout and
            :data:`SIMMIM_BEIT` fill in what is not given (``drop_path_rate`` 0.1 is set by the recipe).
    """

    name = "simmim"
    default_model_name = "beit_base_patch16_224"
    # --smoke: 32 px images with 4 px patches; 8 px cells give a 4x4 coarse grid (10 of 16 masked).
    smoke_kwargs = {"mask_patch_size": 8}

    def __init__(self, model_name: str = "beit_base_patch16_224", *, mask_patch_size: int = 32,
                 mask_ratio: float = 0.6, init_std: float = 0.02, **timm_kwargs: Any) -> None:
        super().__init__()
        self.encoder = MaskedEncoder(model_name, **beit_style_kwargs(model_name, SIMMIM_BEIT, timm_kwargs))
        check_final_norm(self.encoder)
        enc = self.encoder
        self.masker = SimMIMMasker(img_size=(enc.grid[0] * enc.patch_size, enc.grid[1] * enc.patch_size),
                                   mask_patch_size=mask_patch_size, model_patch_size=enc.patch_size,
                                   mask_ratio=mask_ratio)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, enc.embed_dim))
        self.head = PixelShuffleHead(enc.embed_dim, stride=enc.patch_size, out_chans=enc.in_chans)
        init_beit_style_(enc.backbone, init_std)
        trunc_normal_within_std_(self.mask_token, init_std)
        self.encoder.use_external(self.mask_token)

    def no_weight_decay(self) -> set[str]:
        """As the official ViT branch: the encoder's ``{pos_embed, cls_token}`` only (biases and 1-D tensors
        are skipped by the loop). The mask token (3-D) *is* decayed there: ``VisionTransformerForSimMIM``
        does not list it (only the Swin branch does)."""
        names = {n for n, _ in self.named_parameters()}
        return {n for n in ("encoder.backbone.cls_token", "encoder.backbone.pos_embed") if n in names}

    def forward(self, images: torch.Tensor | list[torch.Tensor],
                mask: torch.Tensor | None = None) -> MethodOutput:
        if isinstance(images, (list, tuple)):
            images = images[0]
        enc = self.encoder
        if mask is None:
            mask = self.masker(images.shape[0], device=images.device)
        if mask.shape != (images.shape[0], enc.num_patches):
            raise ValueError(f"mask shape {tuple(mask.shape)} != (batch, num_patches) = "
                             f"{(images.shape[0], enc.num_patches)}")
        tokens, _ = enc(images, mask=mask, mask_token=self.mask_token)
        x_rec = self.head(tokens[:, 1:], enc.grid)
        loss = simmim_loss(images, x_rec, pixel_mask(mask, enc.grid, enc.patch_size))
        p = enc.patch_size
        return MethodOutput(loss=loss, metrics={"loss_simmim": loss.detach()},
                            pred=patchify(x_rec, p), target=patchify(images, p), mask=mask)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, out: MethodOutput) -> dict[str, torch.Tensor]:
        """Normalised-space images for a picture: original, masked input (masked patches zeroed), and the
        prediction pasted into the masked patches."""
        p, grid, c = self.encoder.patch_size, self.encoder.grid, self.encoder.in_chans
        assert out.pred is not None and out.mask is not None
        m = out.mask.unsqueeze(-1).float()
        patches = patchify(images.float(), p)
        return {
            "original": images.float(),
            "masked": unpatchify(patches * (1 - m), p, grid, c),
            "reconstruction": unpatchify(patches * (1 - m) + out.pred.float() * m, p, grid, c),
        }
