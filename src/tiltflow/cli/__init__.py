"""``tiltflow`` command line: train | sample | fit-solver | likelihood | invert | distill | bench |
demo.

One module per subcommand, each with ``add_parser(subparsers)`` and ``run(args) -> int``,
listed in :data:`COMMANDS`. Every user mistake (missing file, bad config key, unknown solver ...)
prints one line ``tiltflow: error: ...`` and exits with code 2; nothing is half-written.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys

from ..errors import as_user_error, one_line
from .common import remove_outputs_on_failure

#: subcommand -> its module in this package
COMMANDS = {"train": "train", "sample": "sample", "fit-solver": "fit_solver",
            "likelihood": "likelihood", "invert": "invert", "distill": "distill",
            "bench": "bench", "demo": "demo"}

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
  tiltflow distill --method consistency_distillation --teacher runs/8g --out runs/8g_cd
  tiltflow sample runs/8g_cd --nfe 2 --out runs/8g_cd/samples
  tiltflow bench train
  tiltflow demo --out runs/demo
"""


def _module(command: str):
    return importlib.import_module(f".{COMMANDS[command]}", __name__)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="tiltflow", description="Train diffusion / flow models, then sample them fast.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        _module(command).add_parser(sub)
    return p


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line error: ``tiltflow: error: <command>: <problem>``
    (argparse's own prints a usage block first); the exit code stays 2."""

    def error(self, message: str):
        command = self.prog.removeprefix("tiltflow").strip()
        where = f"{command}: " if command else ""
        # "argument --num: must be ..." (the argument types of common.py) -> "--num must be ..."
        message = re.sub(r"^argument (\S+): must be ", r"\1 must be ", message)
        self.exit(2, f"tiltflow: error: {where}{message} (see {self.prog} --help)\n")


def _error(message: str) -> int:
    print(f"tiltflow: error: {one_line(message)}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad argument (2, already printed): a return code
        return e.code if isinstance(e.code, int) else 2
    if not args.command:
        parser.print_help()
        return _error(f"give a command: {', '.join(COMMANDS)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        # the one place where failures become one-line errors: UserError, bad values, OSError
        # on a path, allocation failures (tiltflow.errors.as_user_error); a failed command
        # removes the outputs it created (common.remove_outputs_on_failure)
        with remove_outputs_on_failure():
            return _module(args.command).run(args)
    except KeyboardInterrupt:
        print("tiltflow: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        err = as_user_error(e)
        if err is None:
            raise
        return _error(str(err) or type(e).__name__)


if __name__ == "__main__":
    sys.exit(main())
