"""LUT recipes (Kim et al. 2024, "Learning with Unmasked Tokens Drives Stronger Vision Learners"; naver-ai/lut
``docs/PRETRAIN.md``, "recommended default settings")."""

from mimscale.data.views import lut_two_views
from mimscale.recipes import register_recipe
from mimscale.recipes.mae import mae_vitb
from mimscale.train.config import TrainConfig, derive


@register_recipe
def lut_vitb() -> TrainConfig:
    """LUT ViT-B/16: 1600 epochs, batch 4096 (128 per GPU x 4 accumulation x 8 GPUs), blr 1.5e-4 with
    ``lr = blr * sqrt(batch) / 4`` (``main_lut.py``; here ``lr_scaling="sqrt"`` with ``base_batch`` 16), 40
    warm-up epochs, AdamW (0.9, 0.95), weight decay 0.05, norm-pix loss, w_bc 0.25, heads of width 4096 with
    (synchronised) BatchNorm, teacher momentum 0.996 -> 1. Views (``TwoGlobalViewAugmentation``): two crops
    + flips; view 2 adds ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8, then one of grayscale, solarize (128),
    Gaussian blur (sigma U(0.1, 2)). Everything else is MAE's ViT-B recipe (the paper builds on it). The
    official crop is DeiT III's "simple random crop" (Resize(224,
    bicubic) + RandomCrop(224, padding=4, reflect)), which the view schema cannot express yet; both views use
    MAE's RandomResizedCrop(224, scale=(0.2, 1.0), bicubic) instead. Export and evaluation default to the
    student (LUT evaluates the student encoder, as MAE; the teacher only makes the broader-context
    targets)."""
    return derive(mae_vitb(), {
        "method": "lut", "model.w_mae": 1.0, "model.w_bc": 0.25, "model.head_hidden_dim": 4096,
        "model.sync_bn": True, "model.ema_momentum": 0.996, "model.ema_momentum_final": 1.0,
        "data.views": lut_two_views(224),
        # blr * sqrt(B / 16) = blr * sqrt(B) / 4, the official rule
        "optim.lr_scaling": "sqrt", "optim.base_batch": 16, "optim.epochs": 1600,
        "max_micro_batch": 128,
    })


@register_recipe
def lut_vitl() -> TrainConfig:
    """LUT ViT-L/16: the ViT-B recipe on ``vit_large_patch16_224`` (``lut_vit_large_patch16``: decoder 512
    wide, 8 blocks, 16 heads). The released code documents only the ViT-B command; this takes its epochs
    and batch."""
    return derive(lut_vitb(), {"model.model_name": "vit_large_patch16_224", "max_micro_batch": 64})
