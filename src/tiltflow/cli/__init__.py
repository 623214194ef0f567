"""``tiltflow`` command line: train | sample | fit-solver | likelihood | invert | bench | demo.

One module per subcommand, each with ``add_parser(subparsers)`` and ``run(args) -> int``,
listed in :data:`COMMANDS`. Every user mistake (missing file, bad config key, unknown solver ...)
prints one line ``tiltflow: error: ...`` and exits with code 2; nothing is half-written.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..errors import UserError

#: subcommand -> its module in this package
COMMANDS = {"train": "train", "sample": "sample", "fit-solver": "fit_solver",
            "likelihood": "likelihood", "invert": "invert", "bench": "bench", "demo": "demo"}

EXAMPLES = """examples:
  tiltflow train configs/eight_gaussians.yaml train.steps=2000 train.out_dir=runs/8g
  tiltflow train configs/digits.yaml --resume
  tiltflow sample runs/8g --solver heun --nfe 9 --num 2000 --out runs/8g/samples
  tiltflow sample runs/digits --label 3 --guidance 1.5 --num 64 --out three
  tiltflow fit-solver runs/8g --nfe 6 --kind bespoke --out runs/8g/bespoke6.safetensors
  tiltflow sample runs/8g --solver bespoke --nfe 6 --option params=runs/8g/bespoke6.safetensors
  tiltflow likelihood runs/8g --num 512 --steps 32
  tiltflow invert runs/8g --solver heun --nfe 19 --out runs/8g/noise
  tiltflow sample runs/8g --solver ddim --nfe 100 --parallel picard
  tiltflow bench train
  tiltflow demo --out runs/demo
"""


def _module(command: str):
    return importlib.import_module(f".{COMMANDS[command]}", __name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tiltflow", description="Train diffusion / flow models, then sample them fast.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        _module(command).add_parser(sub)
    return p


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return _module(args.command).run(args)
    except (UserError, ValueError, TypeError, FileNotFoundError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"tiltflow: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tiltflow: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
