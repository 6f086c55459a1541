"""iBOT: masked image modeling with an online tokenizer (Zhou et al. 2022; bytedance/ibot).

A student and an EMA teacher share one architecture: the encoder plus one projection head (:class:`DINOHead`)
used for the CLS token and for every patch token (``shared_head=True``). Each image arrives as a tuple
of crops: ``num_global_crops`` global crops (224 px) then ``num_local_crops`` local crops (96 px).

* The teacher sees the unmasked global crops. Its outputs are centred (a running mean of the teacher's
  own outputs, one centre for CLS and one for patch tokens) and sharpened by a temperature that warms
  up from 0.04 to 0.07 over the first 30 epochs.
* The student sees the global crops with a blockwise mask (iBOT's per-image ratio: 0 with probability
  1/2, else U(0.1, 0.5)) filled with a learnable mask token, and the local crops unmasked; its outputs
  are divided by the student temperature 0.1.
* ``loss = lambda1 * L_cls + lambda2 * L_patch``. ``L_cls`` is the cross-entropy between the teacher's CLS
  distribution of global crop ``q`` and the student's of crop ``v``, averaged over the batch, then over all
  pairs with ``v != q`` (``v`` ranging over every crop). ``L_patch`` is the cross-entropy between teacher
  and student patch distributions of the *same* global crop at its masked patches, averaged per image
  over its masked patches (denominator clamped to 1), then over the images of all global crops.
  (``iBOTLoss.forward`` in the official ``main_ibot.py``.)

Differences from the official code that do not change the maths: the student's head runs only on the
tokens a loss reads (CLS tokens and masked patch tokens), and the centres are updated once per optimizer
step from the statistics of all its micro-batches (with no gradient accumulation this is the official
update after each forward). The optimisation rules of the official loop (each parameter's gradient
clipped to norm 3.0 on its own, the frozen last layer given no gradient so AdamW skips it) are the
trainer's (``optim.clip_mode="per_param"``, ``optim.frozen_groups="skip"`` in the recipes; see
``mimscale.train.grad_rules``); this method declares which parameters are frozen (``lr_frozen_params``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mimscale.dist import all_reduce_sum
from mimscale.ema import MomentumSchedule
from mimscale.flops import EncoderPass
from mimscale.masking import IBOTMasker
from mimscale.methods.base import Method, MethodOutput, register_method
from mimscale.methods.teacher import EMATeacherMixin
from mimscale.models.encoder import MaskedEncoder
from mimscale.models.heads import DINOHead

# The paper's local crops are 96 px beside 224 px global crops (--local_crops_size 96); used to size them
# for FLOP counts (the augmentation itself is mimscale.data.views.multicrop_views).
LOCAL_TO_GLOBAL = 96 / 224

def teacher_temperature(
    epoch: int, warmup_temp: float, temp: float, warmup_epochs: int, start_epoch: int = 0
) -> float:
    """The teacher temperature of (0-based) ``epoch``: the official ``teacher_temp_schedule``.

    ``np.linspace(warmup_temp, temp, warmup_epochs)`` then ``temp``: linear over epochs
    ``0 .. warmup_epochs - 1`` with both ends included, so ``temp`` is first reached at epoch
    ``warmup_epochs - 1``. ``start_epoch`` (the patch temperature when masked modeling starts late,
    ``pred_start_epoch``) holds ``warmup_temp`` for that many epochs first.
    """
    e = epoch - start_epoch
    if e < 0:
        return warmup_temp
    if e >= warmup_epochs:
        return temp
    if warmup_epochs == 1:
        return warmup_temp
    return warmup_temp + (temp - warmup_temp) * e / (warmup_epochs - 1)


class IBOTLoss(nn.Module):
    """iBOT's two self-distillation losses and the teacher centres (``iBOTLoss`` in ``main_ibot.py``).

    Buffers ``center`` ``[1, K]`` (CLS) and ``center2`` ``[1, K]`` (patch tokens) are saved with the model and
    stay float32 under ``.half()``/``.bfloat16()`` (a bf16 centre would drift by its rounding every step).
    :meth:`forward` uses the current centres and, in training mode, adds the teacher's batch statistics
    to a pending sum; :meth:`update_center` all-reduces that sum over ranks and applies
    ``center = m * center + (1 - m) * mean`` once (call it after each optimizer step).
    """

    _FP32_BUFFERS = ("center", "center2")

    def __init__(
        self,
        out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        center_momentum2: float = 0.9,
        lambda1: float = 1.0,
        lambda2: float = 1.0,
    ) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.center_momentum2 = center_momentum2
        self.lambda1 = lambda1
        self.lambda2 = lambda2
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center2", torch.zeros(1, out_dim))
        self._pending: torch.Tensor | None = None  # [sum of CLS rows | sum of per-image patch means | rows]

    def _apply(self, fn: Any, recurse: bool = True) -> IBOTLoss:
        saved = {n: self._buffers[n] for n in self._FP32_BUFFERS}
        super()._apply(fn, recurse)
        for name, old in saved.items():
            new = self._buffers[name]
            if new is not None and new.dtype != torch.float32:
                self._buffers[name] = old.to(device=new.device, dtype=torch.float32)
        return self

    def forward(
        self,
        student_cls: torch.Tensor,
        student_patch: torch.Tensor,
        teacher_cls: torch.Tensor,
        teacher_patch: torch.Tensor,
        mask: torch.Tensor,
        num_global: int,
        teacher_temp: float,
        teacher_patch_temp: float,
    ) -> dict[str, torch.Tensor]:
        """The losses of one batch of ``B`` images.

        Args:
            student_cls: ``[V * B, K]`` logits of every crop's CLS token, crop-major (global crops first).
            student_patch: ``[N, K]`` logits of the masked patch tokens of the global crops, in the order
                of ``tokens[mask]`` (row-major over ``mask``).
            teacher_cls: ``[G * B, K]`` logits of the global crops' CLS tokens, crop-major.
            teacher_patch: ``[G * B, L, K]`` logits of every patch token of the global crops.
            mask: ``[G * B, L]`` bool, True = masked in the student's input.
            num_global: ``G``.
            teacher_temp, teacher_patch_temp: this epoch's teacher temperatures.

        Returns ``{"cls", "patch", "loss"}`` (``loss = lambda1 * cls + lambda2 * patch``).
        """
        g = num_global
        rows = teacher_cls.shape[0]
        if rows % g or mask.shape[0] != rows or teacher_patch.shape[0] != rows:
            raise ValueError(
                f"teacher_cls {tuple(teacher_cls.shape)}, teacher_patch {tuple(teacher_patch.shape)} and "
                f"mask {tuple(mask.shape)} must all have num_global={g} * batch rows"
            )
        b = rows // g
        if student_cls.shape[0] % b or student_cls.shape[0] < rows:
            raise ValueError(f"student_cls has {student_cls.shape[0]} rows: expected (crops >= {g}) * {b}")
        views = student_cls.shape[0] // b
        if views < 2:
            raise ValueError("the CLS loss needs at least two crops (pairs v != q)")
        teacher_cls = teacher_cls.float()

        # CLS: cross-entropy of every (teacher global q, student crop v != q) pair, batch-averaged.
        t_cls = F.softmax((teacher_cls - self.center) / teacher_temp, dim=-1).view(g, b, -1)
        s_cls = F.log_softmax(student_cls.float() / self.student_temp, dim=-1).view(views, b, -1)
        pair_loss = -torch.einsum("qbk,vbk->qv", t_cls, s_cls) / b  # [G, V]
        keep = torch.ones_like(pair_loss)
        keep[torch.arange(g), torch.arange(g)] = 0.0
        loss_cls = (pair_loss * keep).sum() / keep.sum()

        # Patches: cross-entropy at the masked tokens of the same crop, mean per image, then over images.
        t_patch = F.softmax((teacher_patch[mask].float() - self.center2) / teacher_patch_temp, dim=-1)
        s_patch = F.log_softmax(student_patch.float() / self.student_temp, dim=-1)
        token_loss = -(t_patch * s_patch).sum(-1)
        image = mask.nonzero()[:, 0]
        per_image = torch.zeros(rows, dtype=token_loss.dtype, device=token_loss.device)
        per_image = per_image.index_add(0, image, token_loss) / mask.sum(1).clamp(min=1)
        loss_patch = per_image.mean()  # = mean over crops of each crop's batch mean

        if self.training:
            self._accumulate(teacher_cls.detach(), teacher_patch.detach())
        loss_cls, loss_patch = loss_cls * self.lambda1, loss_patch * self.lambda2
        return {"cls": loss_cls, "patch": loss_patch, "loss": loss_cls + loss_patch}

    @torch.no_grad()
    def _accumulate(self, teacher_cls: torch.Tensor, teacher_patch: torch.Tensor) -> None:
        stats = torch.cat(
            [
                teacher_cls.sum(0),
                teacher_patch.mean(1, dtype=torch.float32).sum(0),
                torch.tensor([teacher_cls.shape[0]], dtype=torch.float32, device=teacher_cls.device),
            ]
        )
        self._pending = stats if self._pending is None else self._pending + stats

    @torch.no_grad()
    def update_center(self) -> None:
        """Apply the pending teacher statistics: the official ``update_center``, with the sums and the
        row count all-reduced over ranks so the centre is the mean over the union of every rank's batch.
        Collective when distributed: call on every rank. A no-op without pending statistics."""
        stats, self._pending = self._pending, None
        if stats is None:
            return
        all_reduce_sum(stats)
        k = self.out_dim
        mean_cls, mean_patch = stats[:k] / stats[-1], stats[k : 2 * k] / stats[-1]
        m, m2 = self.center_momentum, self.center_momentum2
        self.center.mul_(m).add_(mean_cls.to(self.center.device).view_as(self.center), alpha=1 - m)
        self.center2.mul_(m2).add_(mean_patch.to(self.center2.device).view_as(self.center2), alpha=1 - m2)


@register_method
class IBOT(EMATeacherMixin, Method):
    """iBOT on the shared encoder (ViT), with an EMA teacher and multi-crop.

    ``forward(images)`` takes the tuple of crops ``(global_1, .., global_G, local_1, .., local_N)`` (``G`` =
    ``num_global_crops``, ``N`` = ``num_local_crops``, so ``len(images) == method.views``); all crops of one
    position share a size, local crops may be smaller than the model's image size. ``mask`` (optional,
    for tests) is the global crops' mask, ``[G * B, L]`` crop-major or a sequence of ``G`` masks ``[B, L]``.

    Args:
        model_name: timm ViT of the encoder; ``timm_kwargs`` go to it (``drop_path_rate`` defaults to 0.1,
            the official ``--drop_path``).
        out_dim: prototypes of the shared head (8192; the patch head shares them, ``shared_head=True``).
        head_hidden_dim, head_bottleneck_dim: the head's MLP (2048, 256).
        norm_last_layer: fix the weight norm of the head's last layer to 1 (True for ViT-B/L).
        num_global_crops, num_local_crops: crops per image (2, 10).
        pred_ratio, pred_ratio_var: iBOT's per-image mask ratio, ``(0, 0.3) +- (0, 0.2)``.
        pred_aspect_min: blockwise mask aspect range ``[0.3, 1/0.3]``.
        pred_start_epoch: epochs without masking (and with the warmup patch temperature) first (0).
        student_temp: 0.1.
        warmup_teacher_temp, teacher_temp: CLS teacher temperature 0.04 -> 0.07.
        warmup_teacher_patch_temp, teacher_patch_temp: patch teacher temperature 0.04 -> 0.07.
        warmup_teacher_temp_epochs: 30.
        center_momentum, center_momentum2: CLS and patch centre momentum (0.9, 0.9).
        lambda1, lambda2: weights of the CLS and patch losses (1, 1).
        momentum_teacher: EMA momentum at step 0, raised to 1 by a per-step cosine (0.996).
        freeze_last_layer: epochs during which the head's last layer is not trained (1).
        export_teacher: export the teacher's encoder instead of the student's (iBOT releases the teacher;
            under bf16 the checkpoint holds the teacher in bf16, the student has fp32 master weights).
    """

    name = "ibot"
    evaluates_teacher = True  # the paper's "backbone (t)": iBOT evaluates and releases the teacher
    smoke_kwargs = {"out_dim": 256, "head_hidden_dim": 64, "head_bottleneck_dim": 32}

    def __init__(
        self,
        model_name: str = "vit_base_patch16_224",
        *,
        out_dim: int = 8192,
        head_hidden_dim: int = 2048,
        head_bottleneck_dim: int = 256,
        norm_last_layer: bool = True,
        num_global_crops: int = 2,
        num_local_crops: int = 10,
        pred_ratio: float | Sequence[float] = (0.0, 0.3),
        pred_ratio_var: float | Sequence[float] = (0.0, 0.2),
        pred_aspect_min: float = 0.3,
        pred_start_epoch: int = 0,
        student_temp: float = 0.1,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.07,
        warmup_teacher_patch_temp: float = 0.04,
        teacher_patch_temp: float = 0.07,
        warmup_teacher_temp_epochs: int = 30,
        center_momentum: float = 0.9,
        center_momentum2: float = 0.9,
        lambda1: float = 1.0,
        lambda2: float = 1.0,
        momentum_teacher: float = 0.996,
        freeze_last_layer: int = 1,
        export_teacher: bool = False,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        if num_global_crops < 1 or num_local_crops < 0 or num_global_crops + num_local_crops < 2:
            raise ValueError(
                f"num_global_crops={num_global_crops}, num_local_crops={num_local_crops}: need at least one "
                "global crop and two crops in all (the CLS loss pairs different crops)"
            )
        timm_kwargs.setdefault("drop_path_rate", 0.1)
        self.encoder = MaskedEncoder(model_name, **timm_kwargs)  # local crops: the table is resampled
        d = self.encoder.embed_dim
        self.head = DINOHead(
            d,
            out_dim,
            hidden_dim=head_hidden_dim,
            bottleneck_dim=head_bottleneck_dim,
            norm_last_layer=norm_last_layer,
        )
        # Official ViT: zeros(1, D) mask embedding; CLS token trunc_normal(0.02) where timm uses 1e-6.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        nn.init.trunc_normal_(self.encoder.backbone.cls_token, std=0.02)
        self.masker = IBOTMasker(self.encoder.grid, pred_ratio, pred_ratio_var, min_aspect=pred_aspect_min)
        self.loss_fn = IBOTLoss(out_dim, student_temp, center_momentum, center_momentum2, lambda1, lambda2)

        # The teacher copies the encoder and head (not the mask token, as the official EMA pairs only the
        # parameters both networks have): the mask token is declared to the encoder after the copy.
        self.init_teacher(nn.ModuleDict({"encoder": self.encoder, "head": self.head}),
                          MomentumSchedule("cosine", momentum_teacher, 1.0))
        self.encoder.use_external(self.mask_token)

        self.num_global_crops = num_global_crops
        self.num_local_crops = num_local_crops
        self.pred_start_epoch = pred_start_epoch
        self.temps = (warmup_teacher_temp, teacher_temp, warmup_teacher_patch_temp, teacher_patch_temp)
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.freeze_last_layer = freeze_last_layer
        self.export_teacher = export_teacher
        self.epoch = 0

    # ---- hooks -----------------------------------------------------------------------------------
    @property
    def views(self) -> int:  # type: ignore[override]
        """Crops per image the data pipeline must deliver: ``num_global_crops + num_local_crops``."""
        return self.num_global_crops + self.num_local_crops

    def set_epoch_progress(self, step: int, steps_per_epoch: int) -> None:
        self.epoch = step // max(1, steps_per_epoch)  # the official schedules are indexed by whole epochs

    def teacher_temps(self) -> tuple[float, float]:
        """This epoch's (CLS, patch) teacher temperatures."""
        warm, final, warm2, final2 = self.temps
        n = self.warmup_teacher_temp_epochs
        return (
            teacher_temperature(self.epoch, warm, final, n),
            teacher_temperature(self.epoch, warm2, final2, n, start_epoch=self.pred_start_epoch),
        )

    def after_optimizer_step(self, step: int, total_steps: int, engine: Any = None) -> None:
        """The centres take the step's teacher statistics, then the EMA updates the teacher."""
        self.loss_fn.update_center()
        super().after_optimizer_step(step, total_steps, engine)

    def lr_frozen_params(self, steps_per_epoch: int) -> dict[str, int]:
        """The head's last layer is not trained for ``freeze_last_layer`` epochs (the official
        ``cancel_gradients_last_layer``): its learning rate is 0 for that many steps."""
        if self.freeze_last_layer <= 0:
            return {}
        return {"head.last_layer.": self.freeze_last_layer * steps_per_epoch}

    def encoder_passes(self) -> list[EncoderPass]:
        """Student: the (masked) global crops at full token count and the local crops at theirs; teacher:
        the global crops, forward only. Local crops are sized from the model's image size and the recipe's
        96/224 ratio (the method does not know the pipeline's crop size)."""
        n = self.encoder.num_patches
        g, local = self.num_global_crops, self.num_local_crops
        passes = [EncoderPass(n, 1 + n, repeats=g), EncoderPass(n, 1 + n, repeats=g, trained=False)]
        if local:
            side = max(1, round(self.encoder.grid[0] * LOCAL_TO_GLOBAL))
            passes.insert(1, EncoderPass(side * side, 1 + side * side, repeats=local))
        return passes

    def export_spec(self) -> tuple[str, dict[str, Any], str]:
        prefix = "teacher.encoder.backbone." if self.export_teacher else "encoder.backbone."
        return self.encoder.timm_name, dict(self.encoder.timm_kwargs), prefix

    # ---- forward ---------------------------------------------------------------------------------
    def draw_masks(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """``[batch_size, L]`` masks for global crops (all False before ``pred_start_epoch``)."""
        if self.epoch < self.pred_start_epoch:
            return torch.zeros(batch_size, self.encoder.num_patches, dtype=torch.bool, device=device)
        return self.masker(batch_size, device=device)

    def _crops(self, images: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if isinstance(images, torch.Tensor) or len(images) != self.views:
            got = "one tensor" if isinstance(images, torch.Tensor) else f"{len(images)} crops"
            raise ValueError(
                f"iBOT expects a tuple of {self.views} crops ({self.num_global_crops} global + "
                f"{self.num_local_crops} local), got {got}: make the recipe's data.views deliver "
                "num_global_crops + num_local_crops views, or set model.num_local_crops to match"
            )
        crops = list(images)
        b, size = crops[0].shape[0], tuple(crops[0].shape[-2:])
        if size != (
            self.encoder.grid[0] * self.encoder.patch_size,
            self.encoder.grid[1] * self.encoder.patch_size,
        ):
            raise ValueError(f"global crops are {size} px: expected the model's image size")
        for i, c in enumerate(crops):
            if c.shape[0] != b or (i < self.num_global_crops and tuple(c.shape[-2:]) != size):
                raise ValueError(
                    f"crop {i} has shape {tuple(c.shape)}: crops must share the batch size, and "
                    f"global crops the size {size}"
                )
        return crops

    def _global_mask(
        self, mask: torch.Tensor | Sequence[torch.Tensor], rows: int, device: torch.device
    ) -> torch.Tensor:
        if not isinstance(mask, torch.Tensor):
            mask = torch.cat(list(mask))
        mask = mask.reshape(-1, mask.shape[-1]).to(device=device, dtype=torch.bool)
        if mask.shape != (rows, self.encoder.num_patches):
            raise ValueError(
                f"mask shape {tuple(mask.shape)}: expected (num_global_crops * batch, num_patches) "
                f"= {(rows, self.encoder.num_patches)}"
            )
        return mask

    def _encode_locals(self, crops: list[torch.Tensor]) -> list[torch.Tensor]:
        """CLS tokens of the (unmasked) local crops, one encoder call per run of equal-size crops."""
        out, i = [], 0
        while i < len(crops):
            j = i
            while j < len(crops) and crops[j].shape[-2:] == crops[i].shape[-2:]:
                j += 1
            tokens, _ = self.encoder(torch.cat(crops[i:j]))
            out.append(tokens[:, 0])
            i = j
        return out

    def forward(
        self,
        images: torch.Tensor | Sequence[torch.Tensor],
        mask: torch.Tensor | Sequence[torch.Tensor] | None = None,
    ) -> MethodOutput:
        crops = self._crops(images)
        g = self.num_global_crops
        glob = torch.cat(crops[:g])
        rows = glob.shape[0]
        mask = (
            self.draw_masks(rows, glob.device) if mask is None else self._global_mask(mask, rows, glob.device)
        )

        with torch.no_grad():
            t_tokens, _ = self.teacher.encoder(glob)
            t_out = self.teacher.head(t_tokens)  # [G*B, 1+L, K]

        s_tokens, _ = self.encoder(glob, mask=mask, mask_token=self.mask_token)
        # The head runs once, on exactly the tokens the losses read: every crop's CLS, masked patches.
        inputs = [s_tokens[:, 0], *self._encode_locals(crops[g:]), s_tokens[:, 1:][mask]]
        s_out = self.head(torch.cat(inputs))
        n_cls = len(crops) * crops[0].shape[0]

        temp, temp2 = self.teacher_temps()
        losses = self.loss_fn(s_out[:n_cls], s_out[n_cls:], t_out[:, 0], t_out[:, 1:], mask, g, temp, temp2)
        metrics = {
            "loss_cls": losses["cls"].detach(),
            "loss_patch": losses["patch"].detach(),
            "mask_ratio": mask.float().mean(),
            "teacher_temp": torch.tensor(temp, device=glob.device),
            "teacher_patch_temp": torch.tensor(temp2, device=glob.device),
            # The CLS centre tracks the mean teacher logit: a collapse monitor, and a check that resume
            # restored it.
            "center_norm": self.loss_fn.center.norm(),
            "ema_momentum": self.momentum_metric(glob.device),
        }
        return MethodOutput(loss=losses["loss"], metrics=metrics, mask=mask)
