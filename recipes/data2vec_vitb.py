"""data2vec ViT-B/16 pretraining, 800 epochs (Baevski et al. 2022; facebookresearch/data2vec_vision
``beit/README.md`` "VIT-B Pretraining" command for ``run_cyclical.py``).

Targets: mean of the top 6 teacher blocks (``--target_layers [6..11]``, ``--layer_results end``), each
LayerNorm-ed, then LayerNorm again (``--post_target_layer_norm``); smooth L1 with beta 2; constant EMA 0.9998
(``--ema_start_at 0``); 120 of 196 patches masked blockwise (min block 16). Backbone: BEiT-style, layer
scale 1e-4, drop path 0.25, attention dropout 0.05. AdamW (0.9, 0.999) (``--opt_betas`` unset), wd 0.05
(constant), lr 2e-3 at batch 2048 (16 x 128; the official script does not rescale it), 10 warmup epochs
from 0, cosine to 1e-5, grad clip 3.0. Augmentation: ColorJitter(0.4, 0.4, 0.4), flip, RandomResizedCrop
(scale 0.08-1, bicubic); mimscale jitters after the crop, the official code before.

    deepspeed recipes/data2vec_vitb.py --ds_config zero2.json --data '/data/in1k/train-{000000..001281}.tar'
"""

from mimscale.train import DataConfig, OptimConfig, TrainConfig, run

JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.0, "p": 1.0}

CONFIG = TrainConfig(
    method="data2vec",
    model=dict(
        model_name="beit_base_patch16_224",
        use_abs_pos_emb=False,
        use_rel_pos_bias=False,
        use_shared_rel_pos_bias=True,
        init_values=1e-4,
        drop_path_rate=0.25,
        attn_drop_rate=0.05,
        top_k=6,
        target_norm="layer",
        loss_beta=2.0,
        num_masked=120,
        min_block=16,
        ema_schedule="constant",
        ema_decay=0.9998,
    ),
    data=DataConfig(views=[{"size": 224, "scale": [0.08, 1.0], "ratio": [3 / 4, 4 / 3], "hflip": 0.5,
                            "color_jitter": JITTER}]),
    optim=OptimConfig(
        blr=2e-3,
        lr_scaling="linear",
        base_batch=2048,
        warmup_start_blr=0.0,
        min_lr=1e-5,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.05,
        warmup_epochs=10,
        epochs=800,
        schedule="cosine",
        grad_clip=3.0,
    ),
    global_batch=2048,
    max_micro_batch=128,
    # the smoke encoder (32 px, patch 4) has an 8x8 grid: the default round(64 * 120 / 196) = 39 masked
    smoke={"model.num_masked": None},
)

if __name__ == "__main__":
    run(CONFIG)
