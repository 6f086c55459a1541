"""MAE ViT-H/14 pretraining (He et al. 2022, Table 8 / App. A.1): 800 epochs, batch 4096.

deepspeed recipes/mae_vith.py --ds_config zero2.json --data '/data/in1k/train-{000000..001281}.tar'
"""

from mimscale.train import DataConfig, OptimConfig, TrainConfig, run

CONFIG = TrainConfig(
    method="mae",
    model=dict(
        model_name="vit_huge_patch14_224",
        mask_ratio=0.75,
        norm_pix_loss=True,
        decoder_embed_dim=512,
        decoder_depth=8,
        decoder_num_heads=16,
    ),
    data=DataConfig(crop_scale=(0.2, 1.0)),
    optim=OptimConfig(
        blr=1.5e-4,
        lr_scaling="linear",
        base_batch=256,
        betas=(0.9, 0.95),
        weight_decay=0.05,
        warmup_epochs=40,
        epochs=800,
    ),
    global_batch=4096,
    max_micro_batch=64,
)

if __name__ == "__main__":
    run(CONFIG)
