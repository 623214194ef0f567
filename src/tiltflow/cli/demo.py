"""``tiltflow demo``: train small digit and 2-D models and write an HTML report."""

from __future__ import annotations

from .common import check_output


def add_parser(sub) -> None:
    d = sub.add_parser("demo", help="train small digit and 2-D models and write an HTML report")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--quick", action="store_true", help="tiny budgets (a smoke test)")


def run(args) -> int:
    from ..demo import run_demo

    check_output(args.out, kind="dir")  # before minutes of training; removed again on failure
    path = run_demo(args.out, quick=args.quick)
    print(f"report: {path}")
    return 0
