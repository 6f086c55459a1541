"""iBOT ViT-B/16 pretraining (Zhou et al. 2022; bytedance/ibot README and ``main_ibot.py``): 400 epochs
(1600 "effective" epochs with multi-crop), batch 1024, 2 global 224 px + 10 local 96 px crops.

    deepspeed recipes/ibot_vitb.py --ds_config zero2.json --data '/data/in1k/train-{000000..001281}.tar'

Schedules as the official code: lr ``5e-4 * batch / 256`` after 10 linear warmup epochs, cosine to 2e-6;
weight decay cosine 0.04 -> 0.4 (biases and 1-D tensors excluded); teacher momentum cosine 0.996 -> 1 per
step; teacher temperatures 0.04 -> 0.07 over 30 epochs; last head layer frozen for the first epoch.
Gradient clipping: the official 3.0 is per parameter; DeepSpeed clips the global norm at 3.0.
"""

from mimscale.methods.ibot import multicrop_views
from mimscale.train import DataConfig, OptimConfig, TrainConfig, run

CONFIG = TrainConfig(
    method="ibot",
    model=dict(
        model_name="vit_base_patch16_224",
        drop_path_rate=0.1,
        out_dim=8192,
        norm_last_layer=True,
        num_global_crops=2,
        num_local_crops=10,
        pred_ratio=[0.0, 0.3],
        pred_ratio_var=[0.0, 0.2],
        momentum_teacher=0.996,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        warmup_teacher_patch_temp=0.04,
        teacher_patch_temp=0.07,
        warmup_teacher_temp_epochs=30,
        freeze_last_layer=1,
    ),
    data=DataConfig(
        views=multicrop_views(224, 96, num_local=10, global_scale=(0.25, 1.0), local_scale=(0.05, 0.25))
    ),
    optim=OptimConfig(
        blr=5e-4,
        lr_scaling="linear",
        base_batch=256,
        warmup_epochs=10,
        epochs=400,
        min_lr=2e-6,
        betas=(0.9, 0.999),
        weight_decay=0.04,
        weight_decay_end=0.4,
        grad_clip=3.0,
    ),
    global_batch=1024,
    max_micro_batch=64,
    # --smoke: the tiny encoder sees 32 px global and 12 px local crops; two local crops keep it quick.
    smoke={"model.num_local_crops": 2, "data.views": multicrop_views(32, 12, num_local=2)},
)

if __name__ == "__main__":
    run(CONFIG)
