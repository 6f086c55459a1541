"""BEiT stage 1: the visual tokenizer, a DALL-E discrete VAE trained with the Gumbel-softmax relaxation
(Ramesh et al. 2021, Sec. 2.1 and App. A.2; see docs/beit_tokenizer.md for the choice and its argument).

It maps a crop to a 14x14 grid of ids over 8192 codes: the 224 px crop BEiT's ViT sees is tokenised at
112 px with stride 8 (BEiT v1's second view), so this recipe trains on 112 px crops. DALL-E's numbers:
AdamW (0.9, 0.999), eps 1e-8, weight decay 1e-4, lr 1e-4 cosine-annealed to 1.25e-6, batch 512, KL weight
0 -> 6.6 over the first 5000 updates, temperature 1 -> 1/16 over the first 150k updates. DALL-E ran 3M
updates on 250M images; on ImageNet-1k this recipe runs 100 epochs (250k updates at batch 512), enough for
the temperature schedule to finish. Watch ``codebook_usage`` / ``perplexity`` in the log: a
``WARNING codebook collapse`` line means most codes went unused.

    deepspeed recipes/beit_tokenizer.py --ds_config zero2.json --data '/data/in1k/train-{000000..001281}.tar'
    mimscale export --checkpoint runs/beit_tokenizer --output beit_tokenizer.safetensors
    deepspeed recipes/beit_vitb.py --set model.tokenizer_path=beit_tokenizer.safetensors ...

``--smoke`` trains a tiny tokenizer (vocabulary 64, 8x8 grid from 16 px crops) that the stage-2 smoke run
accepts as ``--set model.tokenizer_path=...``.
"""

from mimscale.train import DataConfig, OptimConfig, TrainConfig, run

CONFIG = TrainConfig(
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

if __name__ == "__main__":
    run(CONFIG)
