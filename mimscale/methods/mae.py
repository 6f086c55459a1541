"""MAE: masked autoencoders (He et al. 2022; facebookresearch/mae).

The encoder sees only the ``int(L * (1 - r))`` kept patches of each image; a light decoder reconstructs
the pixels of the dropped ones; the loss is the per-patch MSE over masked patches only, normalised over
the whole batch (``sum(loss * mask) / sum(mask)``), against per-patch normalised pixels by default.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mimscale.flops import EncoderPass, mae_decoder_flops, mlp_ratio_of
from mimscale.masking import RandomMasker
from mimscale.methods.base import Method, MethodOutput, register_method
from mimscale.models.decoders import MAEDecoder
from mimscale.models.encoder import MaskedEncoder
from mimscale.models.patches import patchify, unpatchify

NORM_PIX_EPS = 1e-6


def norm_pix_target(target: torch.Tensor) -> torch.Tensor:
    """Per-patch normalisation of MAE's target: ``(t - mean) / sqrt(var + 1e-6)``, *unbiased* variance
    (``Tensor.var`` default, as in the official ``forward_loss``)."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True, unbiased=True)
    return (target - mean) / (var + NORM_PIX_EPS) ** 0.5


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each patch's values, then the mean over masked patches of the whole batch."""
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    m = mask.to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum()


def keep_indices(mask: torch.Tensor, num_keep: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """From a bool mask with the same kept count per row: (ids_keep ``[B, K]``, ids_restore ``[B, L]``).

    Kept patches are ordered by index; ``ids_restore`` puts ``[kept, masked]`` back in image order. Pass
    ``num_keep`` when the mask comes from the method's own masker: then nothing is read back to the host
    (checking a caller's mask needs a device-to-host sync).
    """
    if num_keep is None:
        kept = (~mask).sum(dim=1)
        if kept.numel() and not bool((kept == kept[0]).all()):
            raise ValueError(f"MAE needs the same kept count in every sample, got {kept.tolist()}")
        num_keep = int(kept[0]) if kept.numel() else 0
    ids_shuffle = torch.argsort(mask.to(torch.int8), dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return ids_shuffle[:, :num_keep], ids_restore


def init_mae_weights(module: nn.Module) -> None:
    """MAE's ``initialize_weights``: xavier_uniform for every Linear (zero bias), LayerNorm (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@register_method
class MAE(Method):
    """Masked autoencoder on the shared encoder.

    Args:
        model_name: timm architecture of the encoder (a ViT).
        mask_ratio: fraction of patches dropped (0.75).
        decoder_embed_dim, decoder_depth, decoder_num_heads, decoder_mlp_ratio: the decoder (512, 8, 16, 4).
        norm_pix_loss: regress per-patch normalised pixels (the paper's default, on in the recipes).
        timm_kwargs: the encoder's timm arguments (``img_size``, ``patch_size``, ``embed_dim`` ...).
    """

    name = "mae"
    smoke_kwargs = {"decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 4}

    def __init__(
        self,
        model_name: str = "vit_base_patch16_224",
        *,
        mask_ratio: float = 0.75,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        decoder_mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        self.encoder = MaskedEncoder(model_name, fixed_pos_embed=True, **timm_kwargs)
        self.masker = RandomMasker(self.encoder.grid, mask_ratio)
        self.decoder = MAEDecoder(
            self.encoder.grid,
            self.encoder.embed_dim,
            self.encoder.patch_size,
            self.encoder.in_chans,
            decoder_embed_dim,
            decoder_depth,
            decoder_num_heads,
            mlp_ratio=decoder_mlp_ratio,
        )
        self.norm_pix_loss = norm_pix_loss
        self._init_weights()

    def _init_weights(self) -> None:
        proj = self.encoder.backbone.patch_embed.proj.weight
        nn.init.xavier_uniform_(proj.data.view(proj.shape[0], -1))  # the patch projection as a Linear
        nn.init.normal_(self.encoder.backbone.cls_token, std=0.02)
        nn.init.normal_(self.decoder.mask_token, std=0.02)
        init_mae_weights(self)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        self.decoder.grad_checkpointing = enable

    def encoder_passes(self) -> list[EncoderPass]:
        """Every patch is embedded; only the ``1 + K`` kept tokens run through the blocks."""
        return [EncoderPass(patches=self.encoder.num_patches, tokens=1 + self.masker.num_keep)]

    def head_flops(self) -> dict[str, int]:
        dec = self.decoder
        dec_dim = dec.decoder_embed.out_features
        mlp = mlp_ratio_of(dec.decoder_blocks[0], dec_dim) if len(dec.decoder_blocks) else 4.0
        flops = mae_decoder_flops(self.masker.num_keep, self.encoder.num_patches, self.encoder.embed_dim,
                                  dec_dim, len(dec.decoder_blocks), dec.decoder_pred.out_features, mlp)
        return {"decoder": flops}

    def target(self, images: torch.Tensor) -> torch.Tensor:
        t = patchify(images.float(), self.encoder.patch_size)
        return norm_pix_target(t) if self.norm_pix_loss else t

    def forward(
        self, images: torch.Tensor | list[torch.Tensor], mask: torch.Tensor | None = None
    ) -> MethodOutput:
        if isinstance(images, (list, tuple)):
            images = images[0]
        num_keep = None  # a caller's mask is checked; our masker's keeps masker.num_keep by construction
        if mask is None:
            mask = self.masker(images.shape[0], device=images.device)
            num_keep = self.masker.num_keep
        if mask.shape != (images.shape[0], self.encoder.num_patches):
            raise ValueError(
                f"mask shape {tuple(mask.shape)} != (batch, num_patches) = "
                f"{(images.shape[0], self.encoder.num_patches)}"
            )
        ids_keep, ids_restore = keep_indices(mask, num_keep)
        latent, _ = self.encoder(images, ids_keep=ids_keep)
        pred = self.decoder(latent, ids_restore)
        target = self.target(images)
        loss = masked_mse(pred, target, mask)
        return MethodOutput(
            loss=loss, metrics={"loss_mae": loss.detach()}, pred=pred, target=target, mask=mask
        )

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, out: MethodOutput) -> dict[str, torch.Tensor]:
        """Normalised-space images for a picture: original, masked input, and reconstruction pasted into
        the visible patches. With norm-pix the prediction is mapped back with each patch's own statistics."""
        p, grid, c = self.encoder.patch_size, self.encoder.grid, self.encoder.in_chans
        assert out.pred is not None and out.mask is not None
        pred = out.pred.float()
        if self.norm_pix_loss:
            t = patchify(images.float(), p)
            pred = pred * (t.var(-1, keepdim=True) + NORM_PIX_EPS) ** 0.5 + t.mean(-1, keepdim=True)
        m = out.mask.unsqueeze(-1).float()
        patches = patchify(images.float(), p)
        return {
            "original": images.float(),
            "masked": unpatchify(patches * (1 - m), p, grid, c),
            "reconstruction": unpatchify(patches * (1 - m) + pred * m, p, grid, c),
        }
