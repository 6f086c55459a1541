"""Fixed 2-D sin-cos position tables (MAE, LUT; METHODS.md "Shared conventions")."""

from __future__ import annotations

import torch


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[N] positions -> [N, dim]: ``[sin(p w_i), cos(p w_i)]`` with ``w_i = 10000^(-i / (dim/2))``."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(embed_dim: int, grid: tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """The table ``[1, (1 +) H*W, D]``, float32, patches row-major.

    Column coordinate first, as the MAE code builds it (``meshgrid(w, h)`` then the first half of the
    channels from the column index): ``[sin(x w), cos(x w), sin(y w), cos(y w)]`` with
    ``w_i = 10000^(-i/(D/4))``. The CLS row is zero.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"embed_dim={embed_dim}: a 2-D sin-cos table needs a multiple of 4")
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    emb = torch.cat(
        [_sincos_1d(embed_dim // 2, xs.reshape(-1)), _sincos_1d(embed_dim // 2, ys.reshape(-1))], 1
    )
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float().unsqueeze(0)
