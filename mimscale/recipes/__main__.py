"""``python -m mimscale.recipes NAME [recipe arguments]``: run a registered recipe by name (as the SLURM
scripts do), or list them without a name."""

import sys

from mimscale.recipes import list_recipes, run_recipe

if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
    print(
        "usage: python -m mimscale.recipes NAME [--ds_config ...] [--set KEY=VALUE ...]\nrecipes: "
        + " ".join(list_recipes()),
        file=sys.stderr,
    )
    sys.exit(2)
name = sys.argv[1]
if name not in list_recipes():
    print(
        f"mimscale.recipes: error: unknown recipe {name!r}; known: {' '.join(list_recipes())}",
        file=sys.stderr,
    )
    sys.exit(2)
run_recipe(name, sys.argv[2:])
