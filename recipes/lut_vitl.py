"""LUT ViT-L/16 pretraining (Kim et al. 2024; naver-ai/lut): the ViT-B recipe (``lut_vitb.py``: same
optimiser, lr rule, views, heads and teacher) on ``vit_large_patch16_224`` (``lut_vit_large_patch16``:
decoder 512 wide, 8 blocks, 16 heads), 1600 epochs at batch 4096.

    deepspeed recipes/lut_vitl.py --ds_config zero3.json --data '/data/in1k/train-{000000..001281}.tar'

The released code documents only the ViT-B command; the ViT-L schedule here takes its epochs and batch.
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
    model=dict(model_name="vit_large_patch16_224", mask_ratio=0.75, norm_pix_loss=True,
               decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
               w_mae=1.0, w_bc=0.25, head_hidden_dim=4096, sync_bn=True,
               ema_momentum=0.996, ema_momentum_final=1.0),
    data=DataConfig(views=[VIEW1, VIEW2]),
    optim=OptimConfig(blr=1.5e-4, lr_scaling="sqrt", base_batch=16, betas=(0.9, 0.95), weight_decay=0.05,
                      warmup_epochs=40, epochs=1600),
    global_batch=4096,
    max_micro_batch=64,
)

if __name__ == "__main__":
    run(CONFIG)
