"""iBOT ViT-L/16 pretraining (Zhou et al. 2022; bytedance/ibot): 250 epochs (the 1000 "effective" epochs
of the paper's ViT-L/16 row with multi-crop), batch 1024, 2 global 224 px + 10 local 96 px crops.

    deepspeed recipes/ibot_vitl.py --ds_config zero3.json --data '/data/in1k/train-{000000..001281}.tar'

Everything else as recipes/ibot_vitb.py. The released ViT-L run's own ``args.txt`` is not reachable from
here: the drop-path rate 0.3 (larger models need more stochastic depth; 0.1 is the ViT-B value) and the
unchanged learning rate and temperature warmup are this recipe's choices, to check against that file.
"""

from mimscale.methods.ibot import multicrop_views
from mimscale.train import DataConfig, OptimConfig, TrainConfig, run

CONFIG = TrainConfig(
    method="ibot",
    model=dict(
        model_name="vit_large_patch16_224",
        drop_path_rate=0.3,
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
        epochs=250,
        min_lr=2e-6,
        betas=(0.9, 0.999),
        weight_decay=0.04,
        weight_decay_end=0.4,
        grad_clip=3.0,
    ),
    global_batch=1024,
    max_micro_batch=32,
    smoke={"model.num_local_crops": 2, "data.views": multicrop_views(32, 12, num_local=2)},
)

if __name__ == "__main__":
    run(CONFIG)
