"""Benchmark suite ``parallel``: sequential rounds and NFE that Picard (ParaDiGMS) and parareal
(SRDS) need to reach the sequential solver's answer, vs the sequential solver itself.

For each exact mixture bed, schedule, base solver (ddim, euler, ddpm with pre-drawn noise) and
step count n, the sequential solver makes n rounds of one evaluation. Each parallel method is
run with the largest tolerance from a decreasing list whose endpoint lands within the target
(RMS over samples and dimensions, float64) of the sequential endpoint from the same noise, for
targets 1e-2 and 1e-3; the row reports that run's rounds (batched network calls), total NFE per
sample, the error reached, and the wall time as a ratio to the sequential solver measured in
the same run. Wall time is on CPU with the exact mixture denoiser, whose cost grows with the
batch: the ratio is honest for this machine, not a GPU prediction (there a batch of the window's
size costs about one call while the device is not saturated, so rounds predict wall time).

    python benchmarks/parallel_suite.py [--quick]      # or: tiltflow bench parallel
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

from tiltflow import analytic
from tiltflow import schedules as S
from tiltflow.solvers import grids, solve
from tiltflow.solvers.parallel import parallel_sample

# benchmarks/ is not a package (``tiltflow bench`` loads suites by file path): load the shared
# helpers in common.py by path too
_spec = importlib.util.spec_from_file_location("tiltflow_bench_common",
                                               Path(__file__).with_name("common.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

TARGETS = (1e-2, 1e-3)
BASES = ("ddim", "euler", "ddpm")


def _methods(steps: int):
    return [
        ("picard", "picard (window = all)", {"window": steps}),
        ("picard", f"picard (window = {steps // 10})", {"window": steps // 10}),
        ("parareal", "parareal pipelined", {"pipelined": True}),
        ("parareal", "parareal textbook", {"pipelined": False}),
    ]


def _timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def run(quick: bool = False) -> dict:
    """Measure and write ``benchmarks/results/parallel.{json,md}``; returns the result dict."""
    t_start = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core machines
    step_counts = (100,) if quick else (100, 1000)
    batch = 32 if quick else 64
    beds = ("eight_gaussians", "anisotropic_2d")
    schedules = (S.RectifiedFlow(), S.VPLinear())
    rows = []
    try:
        for bed in beds:
            gmm = analytic.get_testbed(bed)
            noise = torch.randn(batch, 2, dtype=torch.float64,
                                generator=torch.Generator().manual_seed(0))
            for sched in schedules:
                den = gmm.denoiser(sched)
                for steps in step_counts:
                    grid = grids.uniform(steps)
                    x_init = float(sched(grid[:1]).sigma) * noise
                    for base in BASES:
                        def seq_run(base=base, grid=grid, x_init=x_init, den=den):
                            gen = torch.Generator().manual_seed(1)
                            return solve(den, x_init, grid, base, generator=gen)

                        ref, t_seq = _timed(seq_run, 3)
                        common = {"bed": bed, "schedule": sched.name, "base": base,
                                  "steps": steps, "batch": batch}
                        rows.append({"bed": bed, "method": f"sequential {base}",
                                     "role": "baseline", "nfe": steps, "metric": "rounds",
                                     "value": steps, "floor": None,
                                     "extra": {**common, "target": None, "tol": None,
                                               "error": 0.0, "seconds": round(t_seq, 4),
                                               "wall_ratio": 1.0}})
                        for method, label, opts in _methods(steps):
                            for target in TARGETS:
                                rows.append(_search(den, noise, ref, method, label, opts, base,
                                                    steps, target, t_seq, common))
    finally:
        torch.set_num_threads(threads)
    result = bench.result("parallel", t_start, quick, rows)
    bench.write_results(result, _markdown(result))
    return result


def _search(den, noise, ref, method, label, opts, base, steps, target, t_seq, common):
    """The largest tolerance in ``target * 10^{1..-3}`` (then 0, the exact fixed point) whose
    endpoint is within ``target`` of the sequential answer; its rounds, NFE and wall time."""
    for tol in [target * 10.0**e for e in (1, 0, -1, -2, -3)] + [0.0]:
        def par(tol=tol):
            return parallel_sample(den, noise, method, base, steps=steps, tol=tol,
                                   generator=torch.Generator().manual_seed(1), **opts)

        (x, stats), t_par = _timed(par, 1)
        err = float((x - ref).pow(2).mean().sqrt())
        if err <= target:
            break
    extra = {**common, "target": target, "tol": tol, "error": err, "nfe_total": stats["nfe"],
             "iterations": stats["iterations"], "converged": stats["converged"],
             "seconds": round(t_par, 4), "wall_ratio": round(t_par / t_seq, 3)}
    if method == "parareal":
        extra["coarse"] = stats["coarse"]
    return {"bed": common["bed"], "method": label, "role": "ours", "nfe": stats["nfe"],
            "metric": "rounds", "value": stats["rounds"], "floor": None, "extra": extra}


def _markdown(res: dict) -> str:
    lines = [
        "# parallel suite",
        "",
        f"{bench.header(res)}.",
        "",
        "Rounds = sequential batched network calls; NFE = evaluations per sample summed over "
        "all batches; error = RMS distance (float64) to the sequential solver's endpoint from "
        "the same noise (and, for ddpm, the same pre-drawn noise); tol = the largest tolerance "
        "tried (target x 10, 1, 0.1, ...) that reached the target. Wall ratio = parallel / "
        "sequential wall time on this CPU with the exact mixture denoiser (batched evaluation "
        "is not free here; on an unsaturated GPU, rounds are the cost). "
        "Batch of samples: " + str(res["rows"][0]["extra"]["batch"]) + ".",
        "",
        "| bed | schedule | base | steps | method | target | tol | rounds | rounds / steps "
        "| NFE | error | wall ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in res["rows"]:
        e = r["extra"]
        target = "—" if e["target"] is None else f"{e['target']:g}"
        tol = "—" if e["tol"] is None else f"{e['tol']:g}"
        lines.append(
            f"| {e['bed']} | {e['schedule']} | {e['base']} | {e['steps']} | {r['method']} | "
            f"{target} | {tol} | {r['value']} | {r['value'] / e['steps']:.2f} | {r['nfe']} | "
            f"{e['error']:.1e} | {e['wall_ratio']:.2f} |")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    return bench.cli(__doc__, run, _markdown, "100 steps only, smaller batch", argv)


if __name__ == "__main__":
    sys.exit(main())
