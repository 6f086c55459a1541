"""BEiT stage 1: train the visual tokenizer, a DALL-E discrete VAE (Ramesh et al. 2021, Sec. 2.1 and
App. A; architecture of openai/DALL-E) that BEiT (Bao et al. 2022; microsoft/unilm ``beit``) then uses frozen.

The encoder gives, per position of a ``grid`` (14x14 for a 224/16 ViT), logits over ``vocab_size`` codes
(8192). Training maximises DALL-E's evidence lower bound with the Gumbel-softmax relaxation:

* the decoder sees relaxed one-hot samples ``softmax((logits + g) / tau)`` (noise in the forward and
  backward passes, as the DALL-E authors describe; no straight-through estimator by default);
* reconstruction: logit-Laplace negative log-likelihood of the mapped pixels;
* prior: KL of each position's categorical to the uniform distribution over the vocabulary, weighted by
  ``beta``; the loss is ``(sum of NLL + beta * sum of KL) / (number of pixel values)``, i.e. DALL-E's
  per-image ELB weighting, normalised per value;
* ``tau`` anneals 1 -> 1/16 over the first 150k updates and ``beta`` rises 0 -> 6.6 over the first 5000
  (DALL-E App. A.2), both cosine, as functions of the optimizer step.

Collapse (a few codes carrying every image) is the known failure of discrete bottlenecks. Each forward
counts the argmax codes of the batch, all-reduced over ranks, and logs ``perplexity`` (exp of the entropy of
the batch's code histogram; the vocabulary size when uniform) and ``codebook_usage`` (fraction of codes
used at least once in the last ``usage_window`` batches). Rank 0 prints a ``WARNING codebook collapse``
line when the usage falls below ``collapse_threshold``.

The tokenizer input is the crop at ``grid * stride`` px (112 px for DALL-E's stride 8 and a 14x14 grid,
BEiT's second view): ``method.encoder.grid * method.encoder.patch_size`` tells the loop that crop size.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from mimscale.dist import all_reduce_sum, get_rank
from mimscale.methods.base import Method, MethodOutput, register_method
from mimscale.models.tokenizer import (
    DVAE_ARCH,
    DVAEConfig,
    DVAEDecoder,
    DVAEEncoder,
    logit_laplace_nll,
    map_pixels,
    to_normalized,
    to_tokenizer_input,
    to_unit_range,
    unmap_pixels,
)


def cosine_ramp(step: int, steps: int, start: float, end: float) -> float:
    """``start`` at step 0 to ``end`` at ``steps`` along a half cosine, then ``end``."""
    if steps <= 0 or step >= steps:
        return end
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * step / steps))


def code_perplexity(counts: torch.Tensor) -> torch.Tensor:
    """``exp(H(p))`` of a code histogram: 1 when one code takes everything, ``len(counts)`` when uniform."""
    p = counts.double() / counts.sum().clamp(min=1)
    entropy = -(p * torch.log(p.clamp(min=1e-30))).sum()
    return torch.exp(entropy).float()


@register_method
class BEiTTokenizer(Method):
    """DALL-E dVAE training as a method (stage 1 of BEiT).

    Args:
        img_size, patch_size: the stage-2 ViT the tokenizer serves; its grid ``img_size // patch_size``
            (14x14) is the tokenizer's output grid. The tokenizer's input is ``grid * stride`` px.
        vocab_size, n_hid, n_blk_per_group, channel_mult, n_init, in_chans: the dVAE (DALL-E: 8192, 256, 2,
            (1, 2, 4, 8) -> stride 8, 128, 3). See :class:`~mimscale.models.tokenizer.DVAEConfig`.
        temperature_start, temperature_end, temperature_anneal_steps: Gumbel-softmax temperature schedule
            (1 -> 1/16 over 150k optimizer steps, cosine).
        kl_weight, kl_warmup_steps: beta of the KL to the uniform prior (6.6, reached after 5000 steps).
        straight_through: hard one-hot forward with the relaxed gradient (off in DALL-E).
        usage_window, collapse_threshold: codebook-usage window in batches (micro-batches, all ranks) and
            the usage fraction under which rank 0 prints a collapse warning.
        embed_dim, depth, num_heads: ignored; ``--smoke`` passes its ViT sizes to every method (the smoke
            tokenizer's sizes come from ``smoke_kwargs``).
    """

    name = "beit_tokenizer"
    smoke_kwargs = {"vocab_size": 64, "n_hid": 16, "n_blk_per_group": 1, "channel_mult": (1, 2), "n_init": 16,
                    "temperature_anneal_steps": 30, "kl_warmup_steps": 5, "usage_window": 10}

    def __init__(self, *, img_size: int = 224, patch_size: int = 16, vocab_size: int = 8192, n_hid: int = 256,
                 n_blk_per_group: int = 2, channel_mult: tuple[int, ...] | list[int] = (1, 2, 4, 8),
                 n_init: int = 128, in_chans: int = 3, temperature_start: float = 1.0,
                 temperature_end: float = 1.0 / 16, temperature_anneal_steps: int = 150_000,
                 kl_weight: float = 6.6, kl_warmup_steps: int = 5000, straight_through: bool = False,
                 usage_window: int = 100, collapse_threshold: float = 0.1,
                 embed_dim: int | None = None, depth: int | None = None,
                 num_heads: int | None = None) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not a multiple of patch_size={patch_size}")
        grid = img_size // patch_size
        stride = 2 ** (len(channel_mult) - 1)
        self.config = DVAEConfig(vocab_size=vocab_size, n_hid=n_hid, n_blk_per_group=n_blk_per_group,
                                 channel_mult=tuple(channel_mult), input_channels=in_chans,
                                 input_size=grid * stride, n_init=n_init)
        if not 0 < temperature_end <= temperature_start:
            raise ValueError(f"temperature {temperature_start} -> {temperature_end}: "
                             "expected 0 < end <= start")
        if kl_weight < 0 or usage_window < 1 or not 0 <= collapse_threshold <= 1:
            raise ValueError("expected kl_weight >= 0, usage_window >= 1 and 0 <= collapse_threshold <= 1")
        self.encoder = DVAEEncoder(self.config)
        self.decoder = DVAEDecoder(self.config)
        self.temperature_start, self.temperature_end = float(temperature_start), float(temperature_end)
        self.temperature_anneal_steps = int(temperature_anneal_steps)
        self.kl_weight, self.kl_warmup_steps = float(kl_weight), int(kl_warmup_steps)
        self.straight_through = straight_through
        self.usage_window, self.collapse_threshold = int(usage_window), float(collapse_threshold)
        self._step = 0
        # Codebook-usage window: the batch index at which each code was last the argmax somewhere (any
        # rank). Identical on every rank (built from all-reduced counts); saved per rank with checkpoints.
        self._last_seen: torch.Tensor | None = None
        self._batches = 0

    # ---- schedules (functions of the optimizer step) ------------------------------------------------
    def set_epoch_progress(self, step: int, steps_per_epoch: int) -> None:
        self._step = int(step)

    @property
    def temperature(self) -> float:
        return cosine_ramp(self._step, self.temperature_anneal_steps, self.temperature_start,
                           self.temperature_end)

    @property
    def beta(self) -> float:
        return cosine_ramp(self._step, self.kl_warmup_steps, 0.0, self.kl_weight)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)
        self.decoder.set_grad_checkpointing(enable)

    # ---- forward ------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor | list[torch.Tensor],
                mask: torch.Tensor | None = None) -> MethodOutput:
        """``images``: normalised crops ``[B, C, S, S]`` (resized to the tokenizer input if S differs).
        ``mask`` is unused (no masking in stage 1). ``pred``/``target`` are the reconstruction and the
        input in ``[0, 1]`` at the tokenizer's resolution."""
        if isinstance(images, (list, tuple)):
            images = images[0]
        x01 = to_unit_range(images)
        x = to_tokenizer_input(x01, (self.config.input_size, self.config.input_size))
        x01 = unmap_pixels(x)
        dtype = self.encoder.blocks.input.weight.dtype
        logits = self.encoder(x.to(dtype)).float()  # [B, V, h, w]
        ids = logits.argmax(dim=1)
        if self.training:
            z = F.gumbel_softmax(logits, tau=self.temperature, hard=self.straight_through, dim=1)
        else:  # evaluation decodes what stage 2 predicts: the argmax codes
            z = F.one_hot(ids, self.config.vocab_size).permute(0, 3, 1, 2).float()
        stats = self.decoder(z.to(dtype)).float()
        nll = logit_laplace_nll(x, stats)
        log_q = F.log_softmax(logits, dim=1)
        kl = (log_q.exp() * log_q).sum(dim=1) + math.log(self.config.vocab_size)  # [B, h, w], nats
        beta = self.beta
        loss = (nll.sum() + beta * kl.sum()) / nll.numel()

        with torch.no_grad():
            recon = unmap_pixels(torch.sigmoid(stats[:, : self.config.input_channels]))
            usage, perplexity = self._codebook_stats(ids)
            metrics = {
                "loss_recon": nll.mean().detach(),
                "kl": kl.mean().detach(),
                "mse": (recon - x01).pow(2).mean(),
                "perplexity": perplexity,
                "codebook_usage": usage,
                "temperature": torch.tensor(self.temperature, device=loss.device),
                "kl_weight": torch.tensor(beta, device=loss.device),
            }
        return MethodOutput(loss=loss, metrics=metrics, pred=recon, target=x01)

    @torch.no_grad()
    def _codebook_stats(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(usage over the window, perplexity of this batch), from counts all-reduced over ranks."""
        vocab = self.config.vocab_size
        counts = all_reduce_sum(torch.bincount(ids.flatten(), minlength=vocab).to(torch.long))
        if self._last_seen is None or self._last_seen.device != counts.device:
            last = self._last_seen if self._last_seen is not None else torch.full((vocab,), -(10**9))
            self._last_seen = last.to(device=counts.device, dtype=torch.long)
        self._last_seen[counts > 0] = self._batches
        self._batches += 1
        used = self._last_seen > self._batches - 1 - self.usage_window
        usage = used.float().mean()
        self._maybe_warn(usage)
        return usage, code_perplexity(counts)

    def _maybe_warn(self, usage: torch.Tensor) -> None:
        """Collapse check at the end of every full window (one host sync per window, not per batch);
        rank 0 prints the warning (the usage is the same on every rank)."""
        if not self.training or self._batches % self.usage_window:
            return
        value = float(usage)
        if value < self.collapse_threshold:
            if get_rank() == 0:
                print(f"[mimscale] WARNING codebook collapse: only {value:.1%} of the "
                      f"{self.config.vocab_size} codes were used in the last {self.usage_window} batches "
                      f"(threshold {self.collapse_threshold:.0%}) at step {self._step}; lower kl_weight or "
                      "the learning rate, or restart from an earlier checkpoint", flush=True)

    # ---- checkpoint / export ------------------------------------------------------------------------
    def sharded_state_dict(self) -> dict[str, Any]:
        last = self._last_seen.cpu() if self._last_seen is not None else None
        return {"codebook": {"last_seen": last, "batches": self._batches}}

    def load_sharded_state_dict(self, state: dict[str, Any]) -> None:
        cb = state.get("codebook")
        if cb:
            self._last_seen = cb["last_seen"]
            self._batches = int(cb["batches"])

    def export_spec(self) -> tuple[str, dict[str, Any], str]:
        """Not a timm model: the architecture name ``mimscale.dvae`` and the :class:`DVAEConfig` (what
        :func:`~mimscale.models.tokenizer.load_tokenizer` reads); ``--encoder-only`` keeps ``encoder.*``."""
        return DVAE_ARCH, self.config.to_dict(), "encoder."

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, out: MethodOutput) -> dict[str, torch.Tensor]:
        """Input and (relaxed) reconstruction in normalised space, from ``out`` only (no module call, so
        rank 0 can draw it alone under ZeRO-3)."""
        assert out.pred is not None and out.target is not None
        return {"original": to_normalized(out.target), "reconstruction": to_normalized(out.pred)}


__all__ = ["BEiTTokenizer", "code_perplexity", "cosine_ramp", "map_pixels"]
