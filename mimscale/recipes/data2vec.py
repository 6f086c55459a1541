"""data2vec (vision) recipes (Baevski et al. 2022; facebookresearch/data2vec_vision ``beit/README.md``)."""

from mimscale.data.views import colour_jitter_crop
from mimscale.recipes import register_recipe
from mimscale.train.config import DataConfig, OptimConfig, TrainConfig, derive


@register_recipe
def data2vec_vitb() -> TrainConfig:
    """data2vec ViT-B/16, 800 epochs (the README's "VIT-B Pretraining" command for ``run_cyclical.py``).

    Targets: mean of the top 6 teacher blocks (``--target_layers [6..11]``, ``--layer_results end``), each
    LayerNorm-ed, then LayerNorm again (``--post_target_layer_norm``); smooth L1 with beta 2; constant EMA
    0.9998 (``--ema_start_at 0``); 120 of 196 patches masked blockwise (min block 16). Backbone: BEiT-style,
    layer scale 1e-4, drop path 0.25, attention dropout 0.05. AdamW (0.9, 0.999) (``--opt_betas`` unset),
    wd 0.05 (constant), lr 2e-3 at batch 2048 (16 x 128; the official script does not rescale it), 10 warm-up
    epochs from 0, cosine to 1e-5, grad clip 3.0. Augmentation: ColorJitter(0.4, 0.4, 0.4), flip,
    RandomResizedCrop (scale 0.08-1, bicubic); mimscale jitters after the crop, the official code before.
    The smoke encoder (8x8 grid) masks the default ``round(64 * 120 / 196)`` = 39. Export and evaluation
    default to the student (data2vec fine-tunes the student encoder; the EMA teacher only makes targets).
    The targets come from the teacher in fp32 (its EMA shadow) whatever the training precision, as the
    official code computes them outside autocast (``model.teacher_precision``; ZeRO-0/1/2)."""
    return TrainConfig(
        method="data2vec",
        model=dict(model_name="beit_base_patch16_224", init_values=1e-4, drop_path_rate=0.25,
                   attn_drop_rate=0.05, top_k=6, target_norm="layer", loss_beta=2.0, num_masked=120,
                   min_block=16, ema_schedule="constant", ema_decay=0.9998),
        data=DataConfig(views=colour_jitter_crop(224)),
        optim=OptimConfig(blr=2e-3, lr_scaling="linear", base_batch=2048, warmup_start_blr=0.0, min_lr=1e-5,
                          betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05, warmup_epochs=10, epochs=800,
                          schedule="cosine", grad_clip=3.0),
        global_batch=2048,
        max_micro_batch=128,
        smoke={"model.num_masked": None},
    )


@register_recipe
def data2vec_vitl() -> TrainConfig:
    """data2vec ViT-L/16, 800 epochs (the README's "VIT-L Pretraining" command): as ViT-B except top 6 of 24
    blocks (``--target_layers [18..23]``), layer scale 1e-5, drop path 0.2, attention dropout 0.15, lr 1e-3
    at batch 4096 (64 x 64), 80 warm-up epochs. The paper's 1600-epoch ViT-L continues this run for 800
    more epochs (EMA 0.9999, 40 warm-up epochs) from its weights (``--seed_model``), which needs
    initialising a run from an export: not offered yet."""
    return derive(data2vec_vitb(), {
        "model.model_name": "beit_large_patch16_224", "model.init_values": 1e-5, "model.drop_path_rate": 0.2,
        "model.attn_drop_rate": 0.15, "optim.blr": 1e-3, "optim.base_batch": 4096, "optim.warmup_epochs": 80,
        "global_batch": 4096, "max_micro_batch": 64,
    })
