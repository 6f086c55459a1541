"""BEiT recipes (Bao et al. 2022; microsoft/unilm ``beit``): stage 1, the visual tokenizer, and stage 2.

Stage 2 needs a frozen tokenizer; the run fails at start-up naming ``model.tokenizer_path`` without one:

    deepspeed recipes/beit_tokenizer.py --ds_config zero2.json --data '/data/in1k/train-{000000..001281}.tar'
    mimscale export --checkpoint runs/beit_tokenizer --output beit_tokenizer.safetensors
    deepspeed recipes/beit_vitb.py --ds_config zero2.json --data '/data/in1k/train-{000000..001281}.tar' \\
        --set model.tokenizer_path=beit_tokenizer.safetensors     # or DALL-E's encoder.pkl

``--smoke`` stage 2 without a tokenizer path uses a randomly initialised frozen tokenizer and prints a
WARNING (the method's smoke default ``tokenizer_path="random"``: the code path is exercised, the targets mean
nothing; ``--set model.tokenizer_path=...`` overrides it). For a meaningful smoke pipeline, train one first
(``recipes/beit_tokenizer.py --smoke --output_dir /tmp/tok``, export it, pass it to stage 2).
"""

from mimscale.data.views import colour_jitter_crop
from mimscale.recipes import register_recipe
from mimscale.train.config import DataConfig, OptimConfig, TrainConfig, derive


@register_recipe
def beit_tokenizer() -> TrainConfig:
    """BEiT stage 1: a DALL-E discrete VAE trained with the Gumbel-softmax relaxation (Ramesh et al. 2021,
    Sec. 2.1 and App. A.2; docs/beit_tokenizer.md argues the choice). It maps a crop to a 14x14 grid of ids
    over 8192 codes: the 224 px crop BEiT's ViT sees is tokenised at 112 px with stride 8 (BEiT v1's second
    view). DALL-E's numbers: AdamW (0.9, 0.999), eps 1e-8, weight decay 1e-4, lr 1e-4 cosine-annealed to
    1.25e-6, batch 512, KL weight 0 -> 6.6 over the first 5000 updates, temperature 1 -> 1/16 over the first
    150k updates. DALL-E ran 3M updates on 250M images; on ImageNet-1k this recipe runs 100 epochs (250k
    updates at batch 512), enough for the temperature schedule to finish. Watch ``codebook_usage`` /
    ``perplexity``: a ``WARNING codebook collapse`` line means most codes went unused. ``--smoke`` trains a
    tiny tokenizer (vocabulary 64, 8x8 grid) that the stage-2 smoke run accepts."""
    return TrainConfig(
        method="beit_tokenizer",
        model=dict(img_size=224, patch_size=16,  # the stage-2 ViT served: a 14x14 grid
                   vocab_size=8192, n_hid=256, n_blk_per_group=2, channel_mult=(1, 2, 4, 8), n_init=128,
                   temperature_start=1.0, temperature_end=1 / 16, temperature_anneal_steps=150_000,
                   kl_weight=6.6, kl_warmup_steps=5000, usage_window=100, collapse_threshold=0.1),
        data=DataConfig(crop_scale=(0.08, 1.0)),  # BEiT's crop distribution (RandomResizedCrop 0.08-1, flip)
        optim=OptimConfig(blr=1e-4, lr_scaling="none", min_lr=1.25e-6, warmup_epochs=0, epochs=100,
                          betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4),
        global_batch=512,
        max_micro_batch=64,
    )


@register_recipe
def beit_vitb() -> TrainConfig:
    """BEiT ViT-B/16 on ImageNet-1k (microsoft/unilm beit README): 800 epochs, batch 2048, lr 1.5e-3
    (absolute, as the official script: no batch scaling), 10 warm-up epochs from 0 then cosine to 1e-5,
    AdamW (0.9, 0.999) eps 1e-8, weight decay 0.05, gradient clipping 3.0, drop path 0.1, layer scale 0.1,
    blockwise masking of 75 of 196 patches (the method's default on 14x14; ``round(0.4 * L)`` on the smoke
    grid). Augmentation (``DataAugmentationForBEiT``): colour jitter 0.4 / 0.4 / 0.4, flip,
    RandomResizedCrop(224, scale 0.08-1); the tokenizer sees the same crop."""
    return TrainConfig(
        method="beit",
        model=dict(model_name="beit_base_patch16_224", tokenizer_path=None, init_values=0.1,
                   drop_path_rate=0.1, use_fc_norm=False, min_block=16, min_aspect=0.3, mask_exact=False),
        data=DataConfig(views=colour_jitter_crop(224)),
        optim=OptimConfig(blr=1.5e-3, lr_scaling="none", warmup_start_blr=0.0, min_lr=1e-5, warmup_epochs=10,
                          epochs=800, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05, grad_clip=3.0),
        global_batch=2048,
        max_micro_batch=128,
    )


@register_recipe
def beit_vitl() -> TrainConfig:
    """BEiT ViT-L/16 (pre-training hyperparameter table): the ViT-B recipe with the large-model values,
    layer scale 1e-5 (the official ``--layer_scale_init_value`` help: "0.1 for base, 1e-5 for large") and
    gradient clipping 1.0."""
    return derive(beit_vitb(), {"model.model_name": "beit_large_patch16_224", "model.init_values": 1e-5,
                                "optim.grad_clip": 1.0, "max_micro_batch": 64})
