"""Singular-value spectra of token features and their effective rank.

The LUT paper argues that its representations use more directions of the feature space than MAE's: the
singular values of a layer's patch-token matrix decay more slowly. The spectrum here is per image (the
``T x D`` matrix of one image's patch tokens, not centred, so the mean token is one of its directions and
usually the leading one), scaled by that image's largest singular value so that images and models
of different feature norms compare, then averaged over images. The effective rank (Roy & Vetterli 2007)
condenses it into one number: ``exp`` of the Shannon entropy of the singular values normalised to sum to 1,
which is ``k`` for ``k`` equal singular values and 1 for a rank-one matrix.
"""

from __future__ import annotations

import torch

__all__ = ["effective_rank", "normalised_singular_values", "singular_value_spectrum", "singular_values"]


def normalised_singular_values(tokens: torch.Tensor) -> torch.Tensor:
    """Per image, the singular values of the un-centred ``T x D`` token matrix divided by that image's
    largest: ``[B, min(T, D)]`` (float32, descending; an all-zero matrix gives zeros)."""
    if tokens.ndim != 3:
        raise ValueError(f"tokens of shape {tuple(tokens.shape)}: expected [B, T, D]")
    s = singular_values(tokens)
    return (s / s[:, :1].clamp_min(torch.finfo(s.dtype).tiny)).float()


def singular_values(tokens: torch.Tensor) -> torch.Tensor:
    """``[B, min(T, D)]`` singular values (descending, float64) of each ``T x D`` matrix, as the square roots
    of the eigenvalues of its float64 Gram matrix (the smaller of ``X X^T`` and ``X^T X``): 10-25x faster
    than a batched SVD on CPU (ViT-B's 196 x 768 tokens), and in float64 accurate to about 1e-7 of the
    largest singular value, far below what a log-scale plot or the effective rank resolves."""
    x = tokens.double()
    gram = x @ x.transpose(1, 2) if x.shape[1] <= x.shape[2] else x.transpose(1, 2) @ x
    return torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0).sqrt()


def singular_value_spectrum(tokens: torch.Tensor) -> torch.Tensor:
    """``Tensor[min(T, D)]``: for ``tokens`` of shape ``[B, T, D]``, per image the singular values of the
    un-centred ``T x D`` token matrix divided by that image's largest, then averaged over the images."""
    return normalised_singular_values(tokens).mean(dim=0)


def effective_rank(spectrum: torch.Tensor) -> float:
    """Effective rank (Roy & Vetterli 2007): ``exp(H(p))`` with ``p = s / sum(s)`` the singular values
    normalised to sum to 1 and ``H(p) = -sum p log p`` (``0 log 0 = 0``)."""
    s = spectrum.double().flatten()
    if s.numel() == 0 or bool((s < 0).any()) or not bool(torch.isfinite(s).all()):
        raise ValueError("effective_rank needs a non-empty spectrum of finite non-negative values")
    total = s.sum()
    if total <= 0:
        raise ValueError("effective_rank of an all-zero spectrum is undefined")
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))
