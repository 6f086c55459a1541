"""SimMIM recipes (Xie et al. 2022; microsoft/SimMIM)."""

from mimscale.recipes import register_recipe
from mimscale.train.config import DataConfig, OptimConfig, TrainConfig


@register_recipe
def simmim_vitb() -> TrainConfig:
    """SimMIM ViT-B/16, 800 epochs (``configs/vit_base__800ep/simmim_pretrain__vit_base__img224__800ep.yaml``
    + ``config.py`` defaults): the BEiT-style backbone (shared relative position bias, layer scale 0.1, no
    absolute position embedding: the method's defaults for ``beit_*``), 32-px mask cells at 60 %, AdamW
    (0.9, 0.999), wd 0.05, ``lr = 1e-4 * batch / 512`` after 10 warm-up epochs from ``5e-7 * batch / 512``,
    x0.1 at epoch 700, drop path 0.1, grad clip 5.0, batch 2048, RandomResizedCrop(0.67-1) + flip. The
    official crop interpolates bilinearly; mimscale's uint8 crop is bicubic."""
    return TrainConfig(
        method="simmim",
        model=dict(model_name="beit_base_patch16_224", init_values=0.1, drop_path_rate=0.1,
                   mask_patch_size=32, mask_ratio=0.6),
        data=DataConfig(crop_scale=(0.67, 1.0), crop_ratio=(3 / 4, 4 / 3), hflip=0.5),
        optim=OptimConfig(blr=1e-4, lr_scaling="linear", base_batch=512, warmup_start_blr=5e-7,
                          betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05, warmup_epochs=10, epochs=800,
                          schedule="multistep", milestones=[700], gamma=0.1, grad_clip=5.0),
        global_batch=2048,
        max_micro_batch=128,
    )
