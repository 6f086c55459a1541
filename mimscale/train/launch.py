"""The command line of every recipe: parse, resolve and validate the config (exit 2 on a bad value, before
anything expensive), train, and end through the one exit protocol whatever happened."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import NoReturn

from mimscale.train import config as C
from mimscale.train.checkpoint import CheckpointError
from mimscale.train.distributed import run_and_exit

__all__ = ["run"]


def run(base: C.TrainConfig, argv: list[str] | None = None, recipe_name: str | None = None) -> NoReturn:
    """Entry point of every recipe: parse the shared CLI, resolve the config, train, exit with its code.

    Every outcome (done, checkpointed on a signal, diverged, a bad value, any exception) ends through
    :func:`~mimscale.train.distributed.run_and_exit`: the process group is shut down and the process exits
    without interpreter finalization, which a gloo rank may not survive (see ``exit_process``).
    """
    import __main__

    name = recipe_name or Path(getattr(__main__, "__file__", "recipe")).stem

    def main() -> None:
        from mimscale.train.trainer import train

        args = C.build_parser(prog=name).parse_args(argv)
        try:
            cfg = C.resolve_config(base, args, name)  # validated, the method and DeepSpeed config built
        except C.ConfigError as e:
            print(f"{name}: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        if args.print_config:
            print(C.dumps(cfg))
            return
        t0 = time.time()
        try:
            code = train(cfg, args.ds_config, name)
        except C.ConfigError as e:  # may come after the process group exists: ends like a finished run
            print(f"{name}: error: {e}", file=sys.stderr)
            code = 2
        except CheckpointError as e:
            print(f"{name}: error: {e}", file=sys.stderr)
            code = e.exit_code
        else:
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"[mimscale] exit {code} after {time.time() - t0:.0f}s", flush=True)
        raise SystemExit(code)

    run_and_exit(main)
