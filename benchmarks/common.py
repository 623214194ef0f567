"""Helpers shared by the benchmark suites: commit, machine, the result dict and its files, the
command line, and loading a sibling module of ``benchmarks/``.

``benchmarks/`` is not a package (``tiltflow bench`` loads ``<name>_suite.py`` by file path), so
a suite loads this file by path as well::

    _spec = importlib.util.spec_from_file_location("tiltflow_bench_common",
                                                   Path(__file__).with_name("common.py"))
    bench = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(bench)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).parent
RESULTS = HERE / "results"


def commit() -> str:
    """The git commit (``HEAD``) of the benchmarks' checkout, or ``"unknown"``; a copy of the
    tree without ``.git`` (e.g. on a lent GPU machine) can pass it as ``TILTFLOW_COMMIT``."""
    if os.environ.get("TILTFLOW_COMMIT"):
        return os.environ["TILTFLOW_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=HERE, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> str:
    """E.g. ``"2-core CPU (x86_64, torch 2.13.0)"``."""
    return f"{os.cpu_count()}-core CPU ({platform.machine()}, torch {torch.__version__})"


def result(suite: str, t_start: float, quick: bool, rows: list, **fields) -> dict:
    """The result object of BENCHMARKS.md: suite, commit, machine, seconds since ``t_start``
    (``time.time()``), quick, then ``fields`` in their order, then rows."""
    return {"suite": suite, "commit": commit(), "machine": machine(),
            "seconds": round(time.time() - t_start, 1), "quick": quick, **fields, "rows": rows}


def header(res: dict) -> str:
    """The Markdown line ``Machine: ...; commit `...`; ran N s[ (quick)]`` (no final period)."""
    return (f"Machine: {res['machine']}; commit `{res['commit'][:12]}`; ran {res['seconds']} s"
            f"{' (quick)' if res.get('quick') else ''}")


def write_results(res: dict, markdown: str) -> Path:
    """Write ``results/<suite>.json`` and ``results/<suite>.md``; returns the results folder."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{res['suite']}.json").write_text(json.dumps(res, indent=1) + "\n")
    (RESULTS / f"{res['suite']}.md").write_text(markdown)
    return RESULTS


def load_sibling(name: str):
    """``benchmarks/<name>.py`` as a module, loaded once by file path."""
    key = f"tiltflow_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[key] = module
    return sys.modules[key]


def cli(doc: str, run: Callable[..., dict], markdown: Callable[[dict], str], quick_help: str,
        argv=None) -> int:
    """A suite's ``main``: ``[--quick]``, run, print the Markdown table."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=quick_help)
    args = ap.parse_args(argv)
    print(markdown(run(quick=args.quick)))
    return 0
