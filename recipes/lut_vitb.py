"""LUT ViT-B/16 pretraining: the numbers and their sources are in ``mimscale/recipes/lut.py``.

    deepspeed recipes/lut_vitb.py --ds_config zero2.json --data '/data/in1k/train-{000000..001281}.tar'
"""

from mimscale.recipes import load_recipe, run_recipe

CONFIG = load_recipe("lut_vitb")

if __name__ == "__main__":
    run_recipe("lut_vitb")
