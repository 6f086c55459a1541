"""LUT ViT-B/16 pretraining (Kim et al. 2024; naver-ai/lut docs/PRETRAIN.md, "recommended default
settings"): 1600 epochs, batch 4096 (128 per GPU x 4 accumulation x 8 GPUs), blr 1.5e-4 with
``lr = blr * sqrt(batch) / 4`` (``main_lut.py``), 40 warmup epochs, AdamW (0.9, 0.95), weight decay 0.05,
norm-pix loss, w_bc 0.25, heads of width 4096 with (synchronised) BatchNorm, teacher momentum 0.996 -> 1.

    deepspeed recipes/lut_vitb.py --ds_config zero2.json --data '/data/in1k/train-{000000..001281}.tar'

Views (``main_lut.py`` ``TwoGlobalViewAugmentation``): two independent crops + flips of the same image;
view 2 adds ColorJitter(0.4, 0.4, 0.2, 0.1) with p = 0.8, then exactly one of grayscale, solarize (128),
Gaussian blur (radius U(0.1, 2)). The official crop is DeiT III's "simple random crop" (Resize(224,
bicubic) + RandomCrop(224, padding=4, reflect)), which mimscale's view schema cannot express yet; both
views use MAE's RandomResizedCrop(224, scale=(0.2, 1.0), bicubic) instead, as METHODS.md specifies.
"""

from mimscale.train import DataConfig, OptimConfig, TrainConfig, run

CROP = dict(size=224, scale=[0.2, 1.0], ratio=[3 / 4, 4 / 3], hflip=0.5)
VIEW1 = dict(CROP)
VIEW2 = dict(
    CROP,
    color_jitter=dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, p=0.8),
    one_of=[{"grayscale": 1.0}, {"solarize": {"p": 1.0, "threshold": 128}},
            {"blur": {"p": 1.0, "sigma": [0.1, 2.0]}}],
)

CONFIG = TrainConfig(
    method="lut",
    model=dict(model_name="vit_base_patch16_224", mask_ratio=0.75, norm_pix_loss=True,
               decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
               w_mae=1.0, w_bc=0.25, head_hidden_dim=4096, sync_bn=True,
               ema_momentum=0.996, ema_momentum_final=1.0),
    data=DataConfig(views=[VIEW1, VIEW2]),
    # lr_scaling "sqrt" with base_batch 16: blr * sqrt(B / 16) = blr * sqrt(B) / 4, the official rule.
    optim=OptimConfig(blr=1.5e-4, lr_scaling="sqrt", base_batch=16, betas=(0.9, 0.95), weight_decay=0.05,
                      warmup_epochs=40, epochs=1600),
    global_batch=4096,
    max_micro_batch=128,
)

if __name__ == "__main__":
    run(CONFIG)
