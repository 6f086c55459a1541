"""BEiT ViT-B/16 pretraining (stage 2): the numbers and sources are in
``mimscale/recipes/beit.py``; it needs ``--set model.tokenizer_path=...``.

    deepspeed recipes/beit_vitb.py --ds_config zero2.json --data '/data/in1k/train-{000000..001281}.tar'
"""

from mimscale.recipes import load_recipe, run_recipe

CONFIG = load_recipe("beit_vitb")

if __name__ == "__main__":
    run_recipe("beit_vitb")
