"""DPM-Solver-v3 rows for the ``solvers`` suite: endpoint error vs NFE with empirical model
statistics (EMS) computed from the exact mixture denoiser on held-out noises.

``run_rows(quick)`` returns rows in the BENCHMARKS.md format (``metric="endpoint_rmse"``, role
``ours``), measured exactly as ``solvers_suite.endpoint_errors`` measures its solvers: the same
start states ``x_1 = sigma(1) noise`` (seed 0), the same float64 reference
(``reference_solve``), the same ``floor`` (its RMS difference to an independent RK4 on 100
states) and the same ``extra`` keys (``schedule``, ``grid``, ``nfe_target``, ``n_points``), plus
``extra.ems`` (how the statistics were computed, seconds included). The EMS noises (seed 777)
are disjoint from the evaluation noises. The suite can add them with
``rows += bench.load_sibling("dpm_v3_rows").run_rows(quick)`` (``benchmarks/common.py``).

    python benchmarks/dpm_v3_rows.py [--quick]    # prints a table next to dpmpp_3m and unipc
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import time
from pathlib import Path

import torch

from tiltflow import analytic, schedules, solvers
from tiltflow.solvers import dpm_v3, grids
from tiltflow.solvers.compare import (
    counting_denoiser,
    endpoint_rmse,
    reference,
)

# benchmarks/ is not a package: load common.py by path, and the RK4 check through it
_spec = importlib.util.spec_from_file_location("tiltflow_bench_common",
                                               Path(__file__).with_name("common.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

_F64 = torch.float64
SCHEDULES = ("vp_discrete_linear", "rectified_flow")
NFES = (4, 6, 8, 10)
EMS_SEED = 777


def _start(gmm, schedule, n, seed):
    noise = torch.randn(n, gmm.dim, dtype=_F64, generator=torch.Generator().manual_seed(seed))
    return float(schedule(torch.tensor(1.0, dtype=_F64)).sigma) * noise


def _run(name, gmm, schedule, x_init, steps, grid, options):
    den = counting_denoiser(gmm, schedule)
    t_grid = grids.get_grid(grid, steps, schedule)
    with torch.no_grad():
        x = solvers.solve(den, x_init, t_grid, name, options=options)
    return x, den.net.calls


def run_rows(quick: bool = False, beds=None, schedule_names=SCHEDULES, grid_names=None,
             nfes=NFES, variants=None, baselines=(), seed: int = 0) -> list[dict]:
    """Endpoint-error rows of ``dpm_solver_v3`` (and of ``baselines``, registered solver names,
    for comparison) on each bed / schedule / grid / NFE.

    ``variants``: ``{label: options}`` of dpm_solver_v3 (default: the registered defaults,
    labelled ``dpm_solver_v3``); the ``ems`` option is filled in per bed and schedule.
    quick: anisotropic_2d, 200 start states, uniform and logsnr grids, 256 EMS noises on 81
    lambdas; full: every bed, 1000 states, every grid, 512 EMS noises on 161 lambdas.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    if quick:
        beds = beds or ("anisotropic_2d",)
        grid_names, n_points, n_ems, n_lam = grid_names or ("uniform", "logsnr"), 200, 256, 81
    else:
        beds = beds or ("eight_gaussians", "anisotropic_2d", "random_16d")
        grid_names, n_points, n_ems, n_lam = grid_names or tuple(grids.available()), 1000, 512, 161
    variants = variants or {"dpm_solver_v3": {}}
    rows = []
    try:
        for bed in beds:
            gmm = analytic.get_testbed(bed)
            for sname in schedule_names:
                schedule = schedules.get_schedule(sname)
                x_init = _start(gmm, schedule, n_points, seed)
                ref, _ = reference(gmm, schedule, x_init)
                k = min(100, n_points)
                check = bench.load_sibling("rk4_check").reference_rk4(gmm, schedule, x_init[:k])
                floor = endpoint_rmse(ref[:k], check)
                t0 = time.perf_counter()
                ems_noise = torch.randn(n_ems, gmm.dim, dtype=_F64,
                                        generator=torch.Generator().manual_seed(EMS_SEED))
                ems = dpm_v3.compute_ems(gmm.denoiser(schedule), ems_noise, n_lam)
                ems_info = {**ems.info, "num_lambdas": n_lam,
                            "lambda_range": [float(ems.lambdas[0]), float(ems.lambdas[-1])],
                            "seconds": round(time.perf_counter() - t0, 2), "seed": EMS_SEED}
                runs = [(label, "ours", {**{k: v for k, v in opts.items() if k != "_constant"},
                                         "ems": dpm_v3.EMS.constant() if opts.get("_constant")
                                         else ems}) for label, opts in variants.items()]
                runs += [(name, "baseline", {}) for name in baselines]
                for label, role, opts in runs:
                    name = "dpm_solver_v3" if role == "ours" else label
                    for grid in grid_names:
                        for target in nfes:
                            steps = solvers.get(name).steps_for_nfe(target)
                            try:
                                x, calls = _run(name, gmm, schedule, x_init, steps, grid, opts)
                            except Exception as e:  # noqa: BLE001 - recorded, others go on
                                print(f"[dpm_v3] {label} {grid} {target}: {e}")
                                continue
                            err = endpoint_rmse(x, ref)
                            extra = {"schedule": sname, "grid": grid, "nfe_target": target,
                                     "n_points": n_points}
                            if role == "ours":
                                extra["ems"] = ems_info
                                extra["options"] = {k: v for k, v in opts.items() if k != "ems"}
                            rows.append({"bed": bed, "method": label, "role": role,
                                         "nfe": calls, "metric": "endpoint_rmse",
                                         "value": err if math.isfinite(err) else None,
                                         "floor": floor, "extra": extra})
    finally:
        torch.set_num_threads(threads)
    return rows


def table(rows) -> str:
    """Markdown: one line per (bed, schedule, grid, method), columns NFE."""
    nfes = sorted({r["extra"]["nfe_target"] for r in rows})
    keys = list(dict.fromkeys((r["bed"], r["extra"]["schedule"], r["extra"]["grid"], r["method"])
                              for r in rows))
    val = {(r["bed"], r["extra"]["schedule"], r["extra"]["grid"], r["method"],
            r["extra"]["nfe_target"]): r["value"] for r in rows}
    out = ["| bed | schedule | grid | method | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
           "|---" * (4 + len(nfes)) + "|"]
    for k in keys:
        cells = [val.get((*k, n)) for n in nfes]
        out.append("| " + " | ".join(k) + " | " +
                   " | ".join("nan" if c is None else f"{c:.4f}" for c in cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--variants", action="store_true", help="also corrector/pseudo variants")
    args = ap.parse_args(argv)
    variants = None
    if args.variants:
        variants = {"dpm_solver_v3": {},
                    "v3 no corrector": {"use_corrector": False},
                    "v3 pseudo corrector": {"corrector_pseudo": True},
                    "v3 pseudo pred+corr": {"predictor_pseudo": True, "corrector_pseudo": True},
                    "v3 l=1,s=b=0": {"_constant": True}}
    t0 = time.perf_counter()
    rows = run_rows(args.quick, beds=("anisotropic_2d",), variants=variants,
                    baselines=("dpmpp_3m", "unipc"))
    print(table(rows))
    print(f"\n{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
