"""Decoders that turn encoder tokens back into per-patch predictions."""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from mimscale.models.pos_embed import sincos_pos_embed_2d


class MAEDecoder(nn.Module):
    """MAE's lightweight decoder (He et al. 2022, Sec. 3 "MAE decoder").

    Linear to ``decoder_embed_dim``, one shared mask token appended for every dropped patch, tokens put back
    in image order (``ids_restore``), fixed sin-cos position table added, transformer blocks, LayerNorm,
    Linear to ``p*p*C`` pixels per patch. The CLS output is dropped.
    """

    def __init__(
        self,
        grid: tuple[int, int],
        embed_dim: int,
        patch_size: int,
        in_chans: int = 3,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if decoder_embed_dim % decoder_num_heads:
            raise ValueError(
                f"decoder_embed_dim={decoder_embed_dim} is not divisible by "
                f"decoder_num_heads={decoder_num_heads}"
            )
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer(
            "decoder_pos_embed", sincos_pos_embed_2d(decoder_embed_dim, grid, cls_token=True)
        )
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = norm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size * patch_size * in_chans, bias=True)
        self.grad_checkpointing = False

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent ``[B, 1 + K, D_enc]`` (CLS first), ids_restore ``[B, L]`` -> ``[B, L, p*p*C]``."""
        x = self.decoder_embed(latent)
        b, length = ids_restore.shape
        n_mask = length - (x.shape[1] - 1)
        patches = torch.cat([x[:, 1:], self.mask_token.to(x.dtype).expand(b, n_mask, -1)], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed.to(x.dtype)
        for blk in self.decoder_blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]
