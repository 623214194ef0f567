"""``tiltflow bench SUITE``: run a benchmark suite from ``benchmarks/`` (writes
``benchmarks/results/``)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from ..errors import UserError
from .common import check_output


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="run a benchmark suite (writes benchmarks/results/)")
    b.add_argument("suite", help="suite name (e.g. train) or 'all'")
    b.add_argument("--quick", action="store_true", help="a fast smoke run (numbers not for the record)")


def _roots() -> list[Path]:
    """The working directory's ``benchmarks/`` first, then the checkout's (editable install)."""
    return [Path.cwd() / "benchmarks", Path(__file__).resolve().parents[3] / "benchmarks"]


def _suite_names() -> list[str]:
    return sorted({p.name[:-9] for r in _roots() if r.is_dir() for p in r.glob("*_suite.py")})


def _find_suite(name: str) -> Path:
    for root in _roots():
        path = root / f"{name}_suite.py"
        if path.is_file():
            return path
    avail = _suite_names()
    raise UserError(f"unknown benchmark suite {name!r}; available: {avail or 'none found'} "
                    "(run from the repository root)")


def run(args) -> int:
    names = [args.suite]
    if args.suite == "all":
        names = _suite_names()
        import torch

        if not torch.cuda.is_available() and "gpu" in names:
            print("bench all: skipping the gpu suite (no CUDA device here)")
            names.remove("gpu")
    paths = [_find_suite(name) for name in names]
    for path in set(paths):  # every suite writes <its folder>/results/: checked before any runs
        check_output(path.parent / "results", kind="dir", what="the benchmark results folder")
    for name, path in zip(names, paths, strict=True):
        spec = importlib.util.spec_from_file_location(f"tiltflow_bench_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # registered first: dataclasses look their module up
        spec.loader.exec_module(module)
        result = module.run(quick=args.quick)
        print(json.dumps({k: result[k] for k in ("suite", "seconds") if k in result}))
    return 0
