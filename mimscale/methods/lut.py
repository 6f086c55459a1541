"""LUT: learning with unmasked tokens (Kim et al. 2024, "Learning with Unmasked Tokens Drives Stronger
Vision Learners", ECCV; naver-ai/lut).

MAE plus a BYOL-style "broader context" objective on a second augmented view of the same image:

* One uniform noise draw per sample ranks the patches. View 1 keeps ranks ``[0, k)``, view 2 keeps
  ranks ``[k, 2k)``, ``k = int(L * (1 - r))`` (official ``random_masking``), so the two views' visible
  sets are disjoint and ``r >= 0.5``. The MAE decoder and pixel loss see view 1 only.
* Student: ``predictor(head(mean of the visible patch tokens after the final norm))`` per view, CLS
  excluded (official ``forward``). Teacher: an EMA of the student encoder and projector head, eval mode,
  no predictor, on the full *unmasked* views: ``head(mean of all patch tokens)``.
* ``loss = w_mae * L_mae + w_bc * (d(s1, t2) + d(s2, t1)) / 2`` with ``d = batch mean of 2 - 2 cos``
  (``engine_lut.py`` ``loss_ftn`` over the pairs with different views); ``w_bc = 0.25`` (docs/PRETRAIN.md).
* Projector and predictor: ``Linear -> BatchNorm -> ReLU -> Linear`` (no biases), hidden 4096, output the
  embedding width, BatchNorm synchronised across ranks (the official script converts the whole model to
  ``SyncBatchNorm``).
* Teacher momentum: per optimizer step, cosine from 0.996 to 1 (``cosine_scheduler(ema_decay, 1, ...)``),
  averaging every state-dict entry, BatchNorm running statistics included (``ModelEma_sched.update``).
  The teacher's BatchNorm runs in eval mode, i.e. on those averaged running statistics.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mimscale.ema import MomentumSchedule
from mimscale.flops import EncoderPass
from mimscale.methods.base import MethodOutput, register_method
from mimscale.methods.mae import MAE, init_mae_weights, keep_indices, masked_mse
from mimscale.methods.teacher import EMATeacherMixin
from mimscale.models.heads import BYOLProjectionMLP

MaskArg = torch.Tensor | tuple[torch.Tensor, torch.Tensor] | list[torch.Tensor] | None


def disjoint_view_masks(ids_shuffle: torch.Tensor, num_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two views' masks from one noise ranking (official ``random_masking``).

    ``ids_shuffle`` ``[B, L]`` lists each sample's patch indices by ascending noise. View 1 keeps ranks
    ``[0, num_keep)``, view 2 ranks ``[num_keep, 2 * num_keep)``. Returns ``(mask1, mask2)``, bool
    ``[B, L]``, True = masked.
    """
    length = ids_shuffle.shape[1]
    if not 0 < 2 * num_keep <= length:
        raise ValueError(f"num_keep={num_keep}: two disjoint views of {length} patches need "
                         f"0 < 2 * num_keep <= {length}")
    rank = torch.argsort(ids_shuffle, dim=1)  # rank of each patch index in the noise order
    mask1 = rank >= num_keep
    mask2 = (rank < num_keep) | (rank >= 2 * num_keep)
    return mask1, mask2


def broader_context_loss(student: tuple[torch.Tensor, torch.Tensor],
                         teacher: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """LUT's BYOL loss: the mean over the cross-view pairs (s1, t2), (s2, t1) of the batch mean of
    ``2 - 2 cos(s, t)``, in fp32 (``engine_lut.py``: ``loss_ftn`` for ``v != iq``, divided by the number
    of pairs). The teacher side carries no gradient."""
    def d(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = F.normalize(s.float(), dim=-1)
        t = F.normalize(t.detach().float(), dim=-1)
        return (2 - 2 * (s * t).sum(dim=-1)).mean()

    return (d(student[0], teacher[1]) + d(student[1], teacher[0])) / 2


@register_method
class LUT(EMATeacherMixin, MAE):
    """MAE with a second masked view and an EMA-teacher BYOL loss on the mean of unmasked tokens.

    Args:
        model_name: timm architecture of the encoder (a ViT).
        mask_ratio: fraction of patches each view drops (0.75); must be >= 0.5 so that the two views'
            ``int(L * (1 - r))`` visible patches are disjoint.
        decoder_embed_dim, decoder_depth, decoder_num_heads, decoder_mlp_ratio, norm_pix_loss: MAE's.
        w_mae, w_bc: loss weights (1.0, 0.25: the official recommended ``--w_bc``).
        head_hidden_dim: hidden width of projector and predictor (4096).
        sync_bn: synchronise the heads' BatchNorm statistics across ranks (the official default).
        ema_momentum, ema_momentum_final: teacher momentum, cosine per step from the first to the second
            (0.996 -> 1.0).
        timm_kwargs: the encoder's timm arguments (``img_size``, ``patch_size``, ``embed_dim`` ...).

    ``forward`` takes the two views as a tuple ``(view1, view2)``; view 1 is MAE's input.
    """

    name = "lut"
    views = 2
    smoke_kwargs = {**MAE.smoke_kwargs, "head_hidden_dim": 128}

    def __init__(self, model_name: str = "vit_base_patch16_224", *, mask_ratio: float = 0.75,
                 decoder_embed_dim: int = 512, decoder_depth: int = 8, decoder_num_heads: int = 16,
                 decoder_mlp_ratio: float = 4.0, norm_pix_loss: bool = True, w_mae: float = 1.0,
                 w_bc: float = 0.25, head_hidden_dim: int = 4096, sync_bn: bool = True,
                 ema_momentum: float = 0.996, ema_momentum_final: float = 1.0, **timm_kwargs: Any) -> None:
        if not isinstance(mask_ratio, (int, float)) or not 0.5 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio={mask_ratio!r}: LUT's second view keeps the next int(L * (1 - r)) "
                             "patches of the same noise ranking, disjoint from view 1's; that needs "
                             "0.5 <= mask_ratio < 1")
        super().__init__(model_name, mask_ratio=mask_ratio, decoder_embed_dim=decoder_embed_dim,
                         decoder_depth=decoder_depth, decoder_num_heads=decoder_num_heads,
                         decoder_mlp_ratio=decoder_mlp_ratio, norm_pix_loss=norm_pix_loss, **timm_kwargs)
        self.w_mae, self.w_bc = float(w_mae), float(w_bc)
        dim = self.encoder.embed_dim
        self.head = BYOLProjectionMLP(dim, head_hidden_dim, dim, sync_bn=sync_bn)
        self.predictor = BYOLProjectionMLP(dim, head_hidden_dim, dim, sync_bn=sync_bn)
        init_mae_weights(self.head)  # the official self.apply(_init_weights) covers the heads
        init_mae_weights(self.predictor)

        # The teacher mirrors the encoder and projector head (parameter names encoder.*, head.*), BatchNorm
        # running statistics included.
        self.init_teacher(nn.ModuleDict({"encoder": self.encoder, "head": self.head}),
                          MomentumSchedule("cosine", ema_momentum, ema_momentum_final), include_buffers=True)

    def encoder_passes(self) -> list[EncoderPass]:
        """Both views' kept tokens through the student; the teacher forward-only on both full views."""
        n, kept = self.encoder.num_patches, self.masker.num_keep
        return [EncoderPass(n, 1 + kept, repeats=2), EncoderPass(n, 1 + n, repeats=2, trained=False)]

    # ---- masking ------------------------------------------------------------------------------------
    def view_masks(self, batch_size: int, mask: MaskArg = None, device: torch.device | str | None = None,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mask1, mask2)`` for a batch, True = masked.

        ``mask=None``: one noise draw per sample (:func:`disjoint_view_masks`). A ``[B, L]`` tensor is view
        1's mask; view 2 then keeps as many patches, drawn uniformly from view 1's masked ones (the
        distribution of ranks ``[k, 2k)`` given ranks ``[0, k)``). A pair is checked and used as given.
        """
        length = self.encoder.num_patches
        if mask is None:
            ids_shuffle = self.masker.noise_ranks(batch_size, generator=generator, device=device)
            return disjoint_view_masks(ids_shuffle, self.masker.num_keep)
        if isinstance(mask, (tuple, list)):
            if len(mask) != 2:
                raise ValueError(f"LUT takes one mask per view (2), got {len(mask)}")
            mask1, mask2 = mask
            for i, m in enumerate((mask1, mask2), 1):
                self._check_mask(m, batch_size, f"mask{i}")
            if bool((~mask1 & ~mask2).any()):
                raise ValueError("LUT's two views must keep disjoint patch sets; mask1 and mask2 both keep "
                                 "some patches")
            if not torch.equal((~mask1).sum(1), (~mask2).sum(1)):
                raise ValueError("LUT's two views must keep the same number of patches per sample")
            return mask1, mask2
        self._check_mask(mask, batch_size, "mask")
        num_keep = int((~mask[0]).sum()) if batch_size else 0
        if 2 * num_keep > length:
            raise ValueError(f"mask keeps {num_keep} of {length} patches: view 2 needs as many disjoint ones")
        # View 1's visible patches rank first (noise -1), the masked ones after in uniform random order.
        noise = torch.rand(mask.shape, device=mask.device, generator=generator).masked_fill(~mask, -1.0)
        return disjoint_view_masks(torch.argsort(noise, dim=1), num_keep)

    def _check_mask(self, mask: torch.Tensor, batch_size: int, name: str) -> None:
        shape = (batch_size, self.encoder.num_patches)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != shape:
            got = (f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor)
                   else type(mask).__name__)
            raise ValueError(f"{name}: expected a bool tensor of shape {shape} (batch, num_patches), "
                             f"got {got}")
        kept = (~mask).sum(1)
        if kept.numel() and not bool((kept == kept[0]).all()):
            raise ValueError(f"{name}: every sample must keep the same number of patches, "
                             f"got {kept.tolist()}")

    # ---- forward ------------------------------------------------------------------------------------
    def _split_views(self, images: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(images, torch.Tensor) or not isinstance(images, (list, tuple)) or len(images) != 2:
            got = (f"a single tensor of shape {tuple(images.shape)}" if isinstance(images, torch.Tensor)
                   else f"{type(images).__name__} of length {len(images)}"
                   if isinstance(images, (list, tuple)) else type(images).__name__)
            raise ValueError(f"LUT needs two augmented views of each image, (view1, view2), got {got}; "
                             "a recipe delivers them when DataConfig.views lists two view dicts")
        view1, view2 = images
        if view1.shape != view2.shape:
            raise ValueError(f"LUT's views must have the same shape, got {tuple(view1.shape)} and "
                             f"{tuple(view2.shape)}")
        return view1, view2

    def forward(self, images: torch.Tensor | list[torch.Tensor], mask: MaskArg = None) -> MethodOutput:
        view1, view2 = self._split_views(images)
        b = view1.shape[0]
        mask1, mask2 = self.view_masks(b, mask, device=view1.device)
        k = self.masker.num_keep if mask is None else None  # drawn here: no host-side check needed
        ids1, ids_restore = keep_indices(mask1, k)
        ids2, _ = keep_indices(mask2, k)
        both = torch.cat([view1, view2])

        # Both views' visible tokens in one encoder call (per-sample ops only, so identical to two calls;
        # under ZeRO-3 the encoder's parameters are gathered once instead of twice).
        latent, _ = self.encoder(both, ids_keep=torch.cat([ids1, ids2]))
        pred = self.decoder(latent[:b], ids_restore)
        target = self.target(view1)
        loss_mae = masked_mse(pred, target, mask1)

        # One head call per view, as the official forward: BatchNorm statistics are per view.
        pooled = latent[:, 1:].mean(dim=1)
        s1 = self.predictor(self.head(pooled[:b]))
        s2 = self.predictor(self.head(pooled[b:]))
        with torch.no_grad():
            tokens, _ = self.teacher.encoder(both)  # full, unmasked views
            t = self.teacher.head(tokens[:, 1:].mean(dim=1))  # eval-mode BatchNorm: per sample
        loss_bc = broader_context_loss((s1, s2), (t[:b], t[b:]))

        loss = self.w_mae * loss_mae + self.w_bc * loss_bc
        metrics = {"loss_mae": loss_mae.detach(), "loss_bc": loss_bc.detach(),
                   "ema_momentum": self.momentum_metric(loss.device)}
        return MethodOutput(loss=loss, metrics=metrics, pred=pred, target=target, mask=mask1)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor | list[torch.Tensor],
                    out: MethodOutput) -> dict[str, torch.Tensor]:
        """MAE's picture rows for view 1 (the view the decoder reconstructs)."""
        if isinstance(images, (list, tuple)):
            images = images[0]
        return super().reconstruct(images, out)
