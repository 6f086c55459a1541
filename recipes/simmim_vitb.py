"""SimMIM ViT-B/16 pretraining, 800 epochs (Xie et al. 2022; microsoft/SimMIM
``configs/vit_base__800ep/simmim_pretrain__vit_base__img224__800ep.yaml`` + ``config.py`` defaults).

BEiT-style backbone (shared relative position bias, layer scale 0.1, no absolute position embedding),
32-px mask cells at 60 %, AdamW (0.9, 0.999), wd 0.05, ``lr = 1e-4 * batch / 512`` after 10 warmup
epochs from ``5e-7 * batch / 512``, x0.1 at epoch 700, drop path 0.1, grad clip 5.0, batch 2048.
The official RandomResizedCrop interpolates bilinearly; mimscale's uint8 crop is bicubic.

    deepspeed recipes/simmim_vitb.py --ds_config zero2.json --data '/data/in1k/train-{000000..001281}.tar'
"""

from mimscale.train import DataConfig, OptimConfig, TrainConfig, run

CONFIG = TrainConfig(
    method="simmim",
    model=dict(
        model_name="beit_base_patch16_224",
        use_abs_pos_emb=False,
        use_rel_pos_bias=False,
        use_shared_rel_pos_bias=True,
        init_values=0.1,
        drop_path_rate=0.1,
        mask_patch_size=32,
        mask_ratio=0.6,
    ),
    data=DataConfig(crop_scale=(0.67, 1.0), crop_ratio=(3 / 4, 4 / 3), hflip=0.5),
    optim=OptimConfig(
        blr=1e-4,
        lr_scaling="linear",
        base_batch=512,
        warmup_start_blr=5e-7,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.05,
        warmup_epochs=10,
        epochs=800,
        schedule="multistep",
        milestones=[700],
        gamma=0.1,
        grad_clip=5.0,
    ),
    global_batch=2048,
    max_micro_batch=128,
)

if __name__ == "__main__":
    run(CONFIG)
