"""Shared by the command-line tests: run ``tiltflow.cli.main`` and capture its output."""

from tiltflow.cli import main


def run(args, capsys):
    """``(exit code, stdout, stderr)`` of ``tiltflow ARGS`` run in this process."""
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err
