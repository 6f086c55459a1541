"""data2vec ViT-L/16 pretraining: the numbers and their sources are in ``mimscale/recipes/data2vec.py``.

    deepspeed recipes/data2vec_vitl.py --ds_config zero3.json --data '/data/in1k/train-{000000..001281}.tar'
"""

from mimscale.recipes import load_recipe, run_recipe

CONFIG = load_recipe("data2vec_vitl")

if __name__ == "__main__":
    run_recipe("data2vec_vitl")
