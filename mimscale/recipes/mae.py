"""MAE recipes (He et al. 2022, Table 8 / App. A.1; facebookresearch/mae ``PRETRAIN.md``)."""

from mimscale.recipes import register_recipe
from mimscale.train.config import DataConfig, OptimConfig, TrainConfig, derive


@register_recipe
def mae_vitb() -> TrainConfig:
    """MAE ViT-B/16: 800 epochs, batch 4096, ``lr = 1.5e-4 * batch / 256``, 40 warm-up epochs then cosine,
    AdamW (0.9, 0.95), weight decay 0.05, mask ratio 0.75, norm-pix loss, decoder 512 wide x 8 blocks x 16
    heads, RandomResizedCrop(224, scale 0.2-1, bicubic) + flip."""
    return TrainConfig(
        method="mae",
        model=dict(model_name="vit_base_patch16_224", mask_ratio=0.75, norm_pix_loss=True,
                   decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
        data=DataConfig(crop_scale=(0.2, 1.0)),
        optim=OptimConfig(blr=1.5e-4, lr_scaling="linear", base_batch=256, betas=(0.9, 0.95),
                          weight_decay=0.05, warmup_epochs=40, epochs=800),
        global_batch=4096,
        max_micro_batch=256,
    )

@register_recipe
def mae_vitl() -> TrainConfig:
    """MAE ViT-L/16: the ViT-B recipe on ``vit_large_patch16_224`` (303.3M encoder parameters)."""
    return derive(mae_vitb(), {"model.model_name": "vit_large_patch16_224", "max_micro_batch": 128})


@register_recipe
def mae_vith() -> TrainConfig:
    """MAE ViT-H/14: the ViT-B recipe on ``vit_huge_patch14_224`` (630.8M encoder parameters)."""
    return derive(mae_vitb(), {"model.model_name": "vit_huge_patch14_224", "max_micro_batch": 64})
