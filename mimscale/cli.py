"""The ``mimscale`` command: ``make-shards``, ``export``, ``methods``, ``analyze``, ``plan``.

Training itself is started through a recipe (``deepspeed recipes/mae_vitl.py --ds_config zero2.json``).
"""

from __future__ import annotations

import argparse
import json
import sys


def _export(args: argparse.Namespace) -> int:
    from mimscale.export import export_checkpoint

    meta = export_checkpoint(args.checkpoint, args.output, encoder_only=args.encoder_only, which=args.which)
    print(
        f"wrote {args.output}: method {meta['mimscale.method']}, step {meta['step']}, "
        f"timm {meta['timm.model_name']} {meta['timm.kwargs']}"
        + (f" (encoder only: the {meta['mimscale.which']})" if args.encoder_only else "")
    )
    return 0


def _methods(args: argparse.Namespace) -> int:
    from mimscale.methods.base import list_methods

    print(json.dumps(list_methods()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from mimscale.analysis.cli import add_parser as add_analyze_parser
    from mimscale.data.shards import add_make_shards_arguments, run_make_shards
    from mimscale.planning.cli import add_parser as add_plan_parser

    p = argparse.ArgumentParser(prog="mimscale", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    shards = sub.add_parser(
        "make-shards", help="write WebDataset tar shards from an image folder or file list"
    )
    add_make_shards_arguments(shards)
    shards.set_defaults(func=run_make_shards)
    exp = sub.add_parser("export", help="consolidate a checkpoint (any ZeRO stage) to fp32 safetensors")
    exp.add_argument("--checkpoint", required=True, help="run dir, its checkpoints/ dir, or a step_* tag dir")
    exp.add_argument("--output", required=True, help="FILE.safetensors")
    exp.add_argument("--encoder-only", action="store_true", help="only the encoder, with timm's exact keys")
    exp.add_argument("--which", choices=("auto", "student", "teacher"), default="auto",
                     help="with --encoder-only, for methods with an EMA teacher: which encoder (auto: "
                          "the one the paper evaluates and releases; iBOT the teacher, data2vec and LUT the "
                          "student)")
    exp.set_defaults(func=_export)
    meth = sub.add_parser("methods", help="list the registered pretraining methods")
    meth.set_defaults(func=_methods)
    add_analyze_parser(sub)
    add_plan_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError) as e:
        print(f"mimscale {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
