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


def resample_patch_pos_embed(
    patch_pos: torch.Tensor, grid_from: tuple[int, int], grid_to: tuple[int, int]
) -> torch.Tensor:
    """Resample a patch position table ``[1, h*w, D]`` (no CLS row) to another grid, as DINO/iBOT's
    ``interpolate_pos_encoding`` (``vision_transformer.py``): bicubic, driven by the scale factor
    ``(grid_to + 0.1) / grid_from`` (the 0.1 guards the output size against float error; the sampling
    positions follow that factor, not the integer size), no antialiasing. Computed in float32, returned
    in the table's dtype.
    """
    d = patch_pos.shape[-1]
    x = patch_pos.float().reshape(1, grid_from[0], grid_from[1], d).permute(0, 3, 1, 2)
    scale = ((grid_to[0] + 0.1) / grid_from[0], (grid_to[1] + 0.1) / grid_from[1])
    x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="bicubic")
    if tuple(x.shape[-2:]) != tuple(grid_to):
        raise RuntimeError(f"position table resampled to {tuple(x.shape[-2:])}, expected {grid_to}")
    return x.permute(0, 2, 3, 1).reshape(1, grid_to[0] * grid_to[1], d).to(patch_pos.dtype)
