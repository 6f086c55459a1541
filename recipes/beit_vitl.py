"""BEiT ViT-L/16 pretraining on ImageNet-1k (Bao et al. 2022, pre-training hyperparameter table;
microsoft/unilm beit): as ViT-B (800 epochs, batch 2048, lr 1.5e-3 absolute, 10 warmup epochs from 0 then
cosine to 1e-5, AdamW (0.9, 0.999) eps 1e-8, weight decay 0.05, drop path 0.1, 75 of 196 patches masked
blockwise, colour jitter 0.4 + flip + RandomResizedCrop(224, 0.08-1)) with the large-model values: layer
scale 1e-5 (the official ``--layer_scale_init_value`` help: "0.1 for base, 1e-5 for large") and gradient
clipping 1.0.

A frozen tokenizer is required; the run fails at start-up naming ``model.tokenizer_path`` without one:

    deepspeed recipes/beit_vitl.py --ds_config zero2.json --data '/data/in1k/train-{000000..001281}.tar' \\
        --set model.tokenizer_path=beit_tokenizer.safetensors     # or DALL-E's encoder.pkl

``--smoke`` without a tokenizer path uses a randomly initialised frozen tokenizer and prints a WARNING
(the method's smoke default ``tokenizer_path="random"``: the code path is exercised, the targets mean
nothing; ``--set model.tokenizer_path=...`` overrides it). For a meaningful smoke pipeline, train one first:

    deepspeed recipes/beit_tokenizer.py --smoke --output_dir /tmp/tok
    mimscale export --checkpoint /tmp/tok --output /tmp/tok.safetensors
    deepspeed recipes/beit_vitl.py --smoke --set model.tokenizer_path=/tmp/tok.safetensors
"""

from mimscale.train import DataConfig, OptimConfig, TrainConfig, run

CONFIG = TrainConfig(
    method="beit",
    # num_masked is left to the method: 75 on the 14x14 grid (round(0.4 * L) on the smoke grid).
    model=dict(model_name="beit_large_patch16_224", tokenizer_path=None,
               use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True, init_values=1e-5,
               drop_path_rate=0.1, use_fc_norm=False, min_block=16, min_aspect=0.3, mask_exact=False),
    data=DataConfig(views=[{
        "size": 224, "scale": [0.08, 1.0], "ratio": [3 / 4, 4 / 3], "hflip": 0.5,
        "color_jitter": {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.0, "p": 1.0},
    }]),
    optim=OptimConfig(blr=1.5e-3, lr_scaling="none", warmup_start_blr=0.0, min_lr=1e-5, warmup_epochs=10,
                      epochs=800, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05, grad_clip=1.0),
    global_batch=2048,
    max_micro_batch=64,
)

if __name__ == "__main__":
    run(CONFIG)
