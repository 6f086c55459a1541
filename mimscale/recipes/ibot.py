"""iBOT recipes (Zhou et al. 2022; bytedance/ibot README and ``main_ibot.py``)."""

from mimscale.data.views import multicrop_views
from mimscale.recipes import register_recipe
from mimscale.train.config import DataConfig, OptimConfig, TrainConfig, derive


@register_recipe
def ibot_vitb() -> TrainConfig:
    """iBOT ViT-B/16: 400 epochs (1600 "effective" epochs with multi-crop), batch 1024, 2 global 224 px + 10
    local 96 px crops. Schedules as the official code: lr ``5e-4 * batch / 256`` after 10 linear warm-up
    epochs, cosine to 2e-6; weight decay cosine 0.04 -> 0.4 (biases and 1-D tensors excluded); teacher
    momentum cosine 0.996 -> 1 per step; teacher temperatures 0.04 -> 0.07 over 30 epochs; last head layer
    frozen for the first epoch with no gradient at all (AdamW skips it, as ``cancel_gradients_last_layer``);
    each parameter's gradient clipped to norm 3.0 on its own (``utils.clip_gradients``; the global-norm
    alternative is ``--set optim.clip_mode=global``). Export and evaluation default to the teacher (the paper
    reports and releases "backbone (t)"), from its fp32 EMA shadow; ``--which student`` for the student.
    ``--smoke``: 32 px global and 12 px local crops, two
    local crops."""
    return TrainConfig(
        method="ibot",
        model=dict(model_name="vit_base_patch16_224", drop_path_rate=0.1, out_dim=8192, norm_last_layer=True,
                   num_global_crops=2, num_local_crops=10, pred_ratio=[0.0, 0.3], pred_ratio_var=[0.0, 0.2],
                   momentum_teacher=0.996, warmup_teacher_temp=0.04, teacher_temp=0.07,
                   warmup_teacher_patch_temp=0.04, teacher_patch_temp=0.07, warmup_teacher_temp_epochs=30,
                   freeze_last_layer=1),
        data=DataConfig(views=multicrop_views(224, 96, num_local=10, global_scale=(0.25, 1.0),
                                              local_scale=(0.05, 0.25))),
        optim=OptimConfig(blr=5e-4, lr_scaling="linear", base_batch=256, warmup_epochs=10, epochs=400,
                          min_lr=2e-6, betas=(0.9, 0.999), weight_decay=0.04, weight_decay_end=0.4,
                          grad_clip=3.0, clip_mode="per_param", frozen_groups="skip"),
        global_batch=1024,
        max_micro_batch=64,
        smoke={"model.num_local_crops": 2, "data.views": multicrop_views(32, 12, num_local=2)},
    )


@register_recipe
def ibot_vitl() -> TrainConfig:
    """iBOT ViT-L/16: 250 epochs (the 1000 "effective" epochs of the paper's ViT-L/16 row), otherwise the
    ViT-B recipe. The released ViT-L run's own ``args.txt`` is not reachable from here: drop path 0.3 (larger
    models need more stochastic depth; 0.1 is the ViT-B value) and the unchanged lr and temperature warm-up
    are this recipe's choices, to check against that file."""
    return derive(ibot_vitb(), {"model.model_name": "vit_large_patch16_224", "model.drop_path_rate": 0.3,
                                "optim.epochs": 250, "max_micro_batch": 32})
