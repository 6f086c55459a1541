"""MAE ViT-H/14 pretraining: the numbers and their sources are in ``mimscale/recipes/mae.py``.

    deepspeed recipes/mae_vith.py --ds_config zero2.json --data '/data/in1k/train-{000000..001281}.tar'
"""

from mimscale.recipes import load_recipe, run_recipe

CONFIG = load_recipe("mae_vith")

if __name__ == "__main__":
    run_recipe("mae_vith")
