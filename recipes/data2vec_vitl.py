"""data2vec ViT-L/16 pretraining, 800 epochs (Baevski et al. 2022; facebookresearch/data2vec_vision
``beit/README.md`` "VIT-L Pretraining" command for ``run_cyclical.py``).

As ViT-B except: top 6 of 24 blocks (``--target_layers [18..23]``), layer scale 1e-5, drop path 0.2,
attention dropout 0.15, lr 1e-3 at batch 4096 (64 x 64), 80 warmup epochs. The paper's 1600-epoch ViT-L
continues this run for 800 more epochs (EMA 0.9999, 40 warmup epochs) starting from its weights
(``--seed_model``); that needs initialising a run from an export, which the loop does not offer yet.

    deepspeed recipes/data2vec_vitl.py --ds_config zero3.json --data '/data/in1k/train-{000000..001281}.tar'
"""

from mimscale.train import DataConfig, OptimConfig, TrainConfig, run

JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.0, "p": 1.0}

CONFIG = TrainConfig(
    method="data2vec",
    model=dict(
        model_name="beit_large_patch16_224",
        use_abs_pos_emb=False,
        use_rel_pos_bias=False,
        use_shared_rel_pos_bias=True,
        init_values=1e-5,
        drop_path_rate=0.2,
        attn_drop_rate=0.15,
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
        blr=1e-3,
        lr_scaling="linear",
        base_batch=4096,
        warmup_start_blr=0.0,
        min_lr=1e-5,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.05,
        warmup_epochs=80,
        epochs=800,
        schedule="cosine",
        grad_clip=3.0,
    ),
    global_batch=4096,
    max_micro_batch=64,
    smoke={"model.num_masked": None},
)

if __name__ == "__main__":
    run(CONFIG)
