"""data2vec (vision): predict the teacher's contextualised representations of masked patches
(Baevski et al. 2022; facebookresearch/data2vec_vision ``beit/run_cyclical.py``, ``engine_for_cyclical.py``,
``modeling_cyclical.py``).

* Teacher: an EMA of the student encoder (constant momentum 0.9998 in the published runs, i.e.
  ``--ema_start_at 0``; a linear ramp is the option), in eval mode, on the **unmasked** image.
* Targets (``--layer_results end --post_target_layer_norm``, ``target_layer_norm_last`` on by default):
  the outputs of the top K = 6 teacher blocks (after the block's residual, before the final norm, CLS
  dropped), each through a parameter-free LayerNorm over channels, averaged, then LayerNorm again.
  The final norm of the teacher is *not* applied. data2vec 2.0 (fairseq ``data2vec2`` image configs:
  ``instance_norm_target_layer: true, layer_norm_targets: true``) instead instance-normalises each layer
  over tokens before the average: ``target_norm="instance"``.
* Student: BEiT-style encoder with a mask token at masked positions, final-normed outputs, a Linear head
  (``lm_head``); loss ``smooth_l1(pred, target, beta=2)`` (``--l1_beta 2``) averaged over every masked
  token of the batch and every channel.
* Masking: BEiT v1 blockwise masking of 120 of 196 patches (``--num_mask_patches 120
  --max_mask_patches_per_block 196 --min_mask_patches_per_block 16``), which may stop a few short.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mimscale.ema import MomentumSchedule
from mimscale.flops import EncoderPass
from mimscale.masking import BlockwiseMasker
from mimscale.methods.base import Method, MethodOutput, register_method
from mimscale.methods.teacher import EMATeacherMixin
from mimscale.models.backbones import beit_style_kwargs, check_final_norm
from mimscale.models.encoder import MaskedEncoder
from mimscale.models.heads import init_beit_style_, trunc_normal_within_std_

# Official ViT-B command (data2vec_vision beit/README.md): --layer_scale_init_value 1e-4 (the run_cyclical.py
# default 0.1 is overridden), the BEiT-style relative position layout (rel_pos_bias shared by default, no
# absolute position embedding), --attn_drop_rate 0.05, --drop_path 0.25. The ViT-L recipe overrides values.
DATA2VEC_BEIT: dict[str, Any] = {"init_values": 1e-4, "global_pool": "token"}

OFFICIAL_MASKED = 120  # of 196 patches (14x14) at 224 px
OFFICIAL_PATCHES = 196
VAR_EPS = 1e-6  # fairseq data2vec compute_var: sqrt(var + 1e-6)


def default_num_masked(num_patches: int) -> int:
    """The official 120 of 196 scaled to another grid: ``round(L * 120 / 196)`` (120 at 14x14)."""
    return max(1, round(num_patches * OFFICIAL_MASKED / OFFICIAL_PATCHES))


def data2vec_targets(layers: list[torch.Tensor], target_norm: str = "layer") -> torch.Tensor:
    """The regression target from the teacher's top-K block outputs ``[B, L, D]`` (CLS already dropped).

    ``"layer"`` (data2vec vision): ``LN(mean_k LN(y_k))``, parameter-free LayerNorms over channels.
    ``"instance"`` (data2vec 2.0): ``LN(mean_k IN(y_k))``, each layer instance-normalised over tokens
    (``F.instance_norm`` on ``[B, D, L]``). Computed in float32.
    """
    if not layers:
        raise ValueError("data2vec_targets needs at least one layer")
    d = layers[0].shape[-1]
    if target_norm == "layer":
        normed = [F.layer_norm(y.float(), (d,)) for y in layers]
    elif target_norm == "instance":
        normed = [F.instance_norm(y.float().transpose(1, 2)).transpose(1, 2) for y in layers]
    else:
        raise ValueError(f"target_norm={target_norm!r}: expected 'layer' (data2vec) or 'instance' "
                         "(data2vec 2.0)")
    return F.layer_norm(sum(normed) / len(normed), (d,))


def masked_smooth_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                     beta: float) -> torch.Tensor:
    """``smooth_l1(pred[mask], target[mask], beta)`` with mean reduction: over every masked token of the
    batch and every channel (official: ``F.smooth_l1_loss`` on the ``[N_masked, D]`` rows). Written with a
    multiply instead of boolean indexing so it needs no host sync; 0 when nothing is masked."""
    per_elem = F.smooth_l1_loss(pred.float(), target.float(), reduction="none", beta=beta)
    m = mask.to(per_elem.dtype).unsqueeze(-1)
    return (per_elem * m).sum() / (m.sum() * pred.shape[-1]).clamp(min=1.0)


def token_std(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """fairseq data2vec's ``compute_var`` over the masked rows (this rank only): the per-channel std over
    tokens, ``sqrt(var + 1e-6)`` with the unbiased variance, averaged over channels. Near 0 means every
    token gets the same target/prediction: collapse. Masked statistics, no boolean indexing (no host sync)."""
    x = x.detach().float()
    m = mask.to(x.dtype).unsqueeze(-1)
    n = m.sum()
    mean = (x * m).sum(dim=(0, 1)) / n.clamp(min=1.0)
    var = ((x - mean).pow(2) * m).sum(dim=(0, 1)) / (n - 1).clamp(min=1.0)
    return torch.sqrt(var + VAR_EPS).mean()


@register_method
class Data2Vec(EMATeacherMixin, Method):
    """data2vec (vision) on the shared encoder, with an EMA teacher of the encoder.

    Args:
        model_name: timm architecture (``beit_base_patch16_224`` / ``beit_large_patch16_224`` as the
            official runs, or a ViT).
        top_k: number of top teacher blocks averaged into the target (6).
        target_norm: ``"layer"`` (data2vec, default) or ``"instance"`` (data2vec 2.0), see
            :func:`data2vec_targets`.
        loss_beta: smooth-L1 beta (2.0, ``--l1_beta 2``).
        num_masked: patches masked per image; None scales the official 120/196 to the grid.
        min_block, max_block, min_aspect: blockwise masking (16, None = the remainder, 0.3).
        exact_mask_count: top masks up to ``num_masked`` (BEiT v2); False (official) may stop short.
        ema_schedule: ``"constant"`` (published runs) or ``"linear"`` from ``ema_decay`` to ``ema_end_decay``
            over ``ema_anneal_steps`` optimizer steps (None = the whole run).
        ema_decay, ema_end_decay, ema_anneal_steps: see ``ema_schedule`` (0.9998, 0.9999, None).
        init_std: std of the official init, truncated at one std (0.02).
        teacher_precision: ``"fp32"`` (official: ``engine_for_cyclical.py`` computes the targets outside
            autocast) runs the teacher on its fp32 EMA shadow under any training precision (ZeRO-0/1/2);
            ``"train"`` in the training dtype (measured on a random-init ViT-B: bf16 targets differ by 0.3%
            relative, up to 0.019 absolute on unit-variance targets).
        timm_kwargs: the encoder's timm arguments; for ``beit_*`` names the BEiT-style layout and
            :data:`DATA2VEC_BEIT` fill in what is not given (the recipes set ``drop_path_rate`` and
            ``attn_drop_rate``).
    """

    name = "data2vec"
    default_model_name = "beit_base_patch16_224"
    smoke_kwargs = {"top_k": 2}  # the smoke encoder has 2 blocks

    def __init__(self, model_name: str = "beit_base_patch16_224", *, top_k: int = 6,
                 target_norm: str = "layer", loss_beta: float = 2.0, num_masked: int | None = None,
                 min_block: int = 16, max_block: int | None = None, min_aspect: float = 0.3,
                 exact_mask_count: bool = False,
                 ema_schedule: str = "constant", ema_decay: float = 0.9998, ema_end_decay: float = 0.9999,
                 ema_anneal_steps: int | None = None, init_std: float = 0.02, teacher_precision: str = "fp32",
                 **timm_kwargs: Any) -> None:
        super().__init__()
        self.encoder = MaskedEncoder(model_name, **beit_style_kwargs(model_name, DATA2VEC_BEIT, timm_kwargs))
        check_final_norm(self.encoder)
        enc = self.encoder
        depth = len(enc.blocks)
        if not 1 <= top_k <= depth:
            raise ValueError(f"top_k={top_k}: expected 1 <= top_k <= depth={depth}")
        if target_norm not in ("layer", "instance"):
            raise ValueError(f"target_norm={target_norm!r}: expected 'layer' or 'instance'")
        if not loss_beta > 0:
            raise ValueError(f"loss_beta={loss_beta!r}: expected > 0")
        self.top_k, self.target_norm, self.loss_beta = top_k, target_norm, float(loss_beta)
        self.target_layers = list(range(depth - top_k, depth))

        n = default_num_masked(enc.num_patches) if num_masked is None else num_masked
        self.masker = BlockwiseMasker(enc.grid, num_masked=n, min_block=min(min_block, n),
                                      max_block=max_block, min_aspect=min_aspect, exact=exact_mask_count)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, enc.embed_dim))
        self.lm_head = nn.Linear(enc.embed_dim, enc.embed_dim)
        # modeling_cyclical.py: trunc_normal(+-std) on cls/mask tokens, Linear/Conv weights (lm_head too).
        init_beit_style_(enc.backbone, init_std)
        init_beit_style_(self.lm_head, init_std)
        trunc_normal_within_std_(self.mask_token, init_std)

        if teacher_precision not in ("fp32", "train"):
            raise ValueError(f"teacher_precision={teacher_precision!r}: expected 'fp32' or 'train'")
        self.teacher_precision = teacher_precision
        if ema_schedule == "constant":
            schedule = MomentumSchedule("constant", base=ema_decay)
        elif ema_schedule == "linear":
            schedule = MomentumSchedule("linear", base=ema_decay, final=ema_end_decay,
                                        ramp_steps=ema_anneal_steps)
        else:
            raise ValueError(f"ema_schedule={ema_schedule!r}: expected 'constant' or 'linear'")
        # After the init, so the teacher starts equal to the student; the teacher mirrors the encoder.
        self.init_teacher(self.encoder, schedule)
        # After the copy: the teacher must not carry a copy of the (unused) mask token.
        self.encoder.use_external(self.mask_token)

    def no_weight_decay(self) -> set[str]:
        """As the official optimizer: the encoder's ``{pos_embed, cls_token}`` (biases and 1-D tensors are
        skipped by the loop); the mask token, relative position table and ``lm_head.weight`` are decayed."""
        names = {n for n, _ in self.named_parameters()}
        return {n for n in ("encoder.backbone.cls_token", "encoder.backbone.pos_embed") if n in names}

    def encoder_passes(self) -> list[EncoderPass]:
        """The student on every (masked) position, the teacher forward-only on the unmasked image."""
        n = self.encoder.num_patches
        return [EncoderPass(n, 1 + n), EncoderPass(n, 1 + n, trained=False)]

    @torch.no_grad()
    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """Teacher targets ``[B, L, D]`` (float32) for every patch of the unmasked images."""
        _, layers = self.run_teacher(self.teacher, images, collect=self.target_layers)
        return data2vec_targets([y[:, 1:] for y in layers], self.target_norm)

    def forward(self, images: torch.Tensor | list[torch.Tensor],
                mask: torch.Tensor | None = None) -> MethodOutput:
        if isinstance(images, (list, tuple)):
            images = images[0]
        enc = self.encoder
        if mask is None:
            # Drawn on the CPU (about 1 ms for 128 masks) and copied: on a GPU the blockwise loop would
            # sync the host once per block round and stall the queue of the previous step.
            mask = self.masker(images.shape[0]).to(images.device, non_blocking=True)
        if mask.shape != (images.shape[0], enc.num_patches):
            raise ValueError(f"mask shape {tuple(mask.shape)} != (batch, num_patches) = "
                             f"{(images.shape[0], enc.num_patches)}")
        target = self.targets(images)
        tokens, _ = enc(images, mask=mask, mask_token=self.mask_token)
        # The head runs on every patch so pred is [B, L, D] like target; only masked rows reach the loss
        # (the official head sees only the masked rows: same gradients, well under 1 % more FLOPs).
        pred = self.lm_head(tokens[:, 1:])
        loss = masked_smooth_l1(pred, target, mask, self.loss_beta)
        metrics = {
            "loss_data2vec": loss.detach(),
            "ema_momentum": self.momentum_metric(loss.device),
            "target_var": token_std(target, mask),
            "pred_var": token_std(pred, mask),
        }
        return MethodOutput(loss=loss, metrics=metrics, pred=pred, target=target, mask=mask)
