"""BEiT stage 1, the visual tokenizer (a DALL-E dVAE): the numbers and sources are in
``mimscale/recipes/beit.py``.

    deepspeed recipes/beit_tokenizer.py --ds_config zero2.json --data '/data/in1k/train-{000000..001281}.tar'
"""

from mimscale.recipes import load_recipe, run_recipe

CONFIG = load_recipe("beit_tokenizer")

if __name__ == "__main__":
    run_recipe("beit_tokenizer")
