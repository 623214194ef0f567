"""``tiltflow bench SUITE``: run a benchmark suite from ``benchmarks/`` (writes
``benchmarks/results/``)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from ..errors import UserError


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="run a benchmark suite (writes benchmarks/results/)")
    b.add_argument("suite", help="suite name (e.g. train) or 'all'")
    b.add_argument("--quick", action="store_true", help="a fast smoke run (numbers not for the record)")


def _find_suite(name: str) -> Path:
    roots = [Path.cwd() / "benchmarks", Path(__file__).resolve().parents[3] / "benchmarks"]
    for root in roots:
        path = root / f"{name}_suite.py"
        if path.is_file():
            return path
    avail = sorted({p.name[:-9] for r in roots if r.is_dir() for p in r.glob("*_suite.py")})
    raise UserError(f"unknown benchmark suite {name!r}; available: {avail or 'none found'} "
                    "(run from the repository root)")


def run(args) -> int:
    names = [args.suite]
    if args.suite == "all":
        roots = [Path.cwd() / "benchmarks", Path(__file__).resolve().parents[3] / "benchmarks"]
        names = sorted({p.name[:-9] for r in roots if r.is_dir() for p in r.glob("*_suite.py")})
        import torch

        if not torch.cuda.is_available() and "gpu" in names:
            print("bench all: skipping the gpu suite (no CUDA device here)")
            names.remove("gpu")
    for name in names:
        path = _find_suite(name)
        spec = importlib.util.spec_from_file_location(f"tiltflow_bench_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        result = module.run(quick=args.quick)
        print(json.dumps({k: result[k] for k in ("suite", "seconds") if k in result}))
    return 0
