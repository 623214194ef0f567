"""Benchmark suite ``likelihood``: PF-ODE negative log-likelihood vs the exact log-density.

On the exact 2-D mixtures (``eight_gaussians``, ``anisotropic_2d``) the model *is* the exact
mixture denoiser, so the only error is the ODE discretisation (plus the start-time and prior
approximations, see ``tiltflow.solvers.likelihood``). Metric ``nll_error``: mean over points of
``|log p_model(x) - log p_exact(x)| / D`` (nats per dimension; the issue's goal is <= 0.01).

Peer, in the same run on the same points: flow_matching's ``ODESolver.compute_likelihood``
(Meta's ``flow_matching`` package) on the rectified-flow path, driven by the *same* exact
velocity field: its time ``s = 1 - t`` runs noise (s = 0) -> data (s = 1), so its velocity is
``-v(x, 1 - s)``; its grid must start exactly at the data end s = 1, where the data-predicting
denoiser's velocity is 0/0, so there the field is evaluated at ``t = max(1 - s, t_eps)`` (t_eps
= 1e-3, tiltflow's own start time). Both use RK4 with the same steps (4 evaluations per step;
flow_matching's is torchdiffeq's 3/8-rule RK4) and the N(0, I) prior, exact at t = 1. Timing:
median of repeats, one thread; ratio = tiltflow time / flow_matching time at the same steps and
trace method.

    python benchmarks/likelihood_suite.py [--quick]      # or: tiltflow bench likelihood
"""

from __future__ import annotations

import importlib.util
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from tiltflow import analytic
from tiltflow import schedules as S
from tiltflow.solvers.likelihood import default_t_eps, log_likelihood

# benchmarks/ is not a package (``tiltflow bench`` loads suites by file path): load the shared
# helpers in common.py by path too
_spec = importlib.util.spec_from_file_location("tiltflow_bench_common",
                                               Path(__file__).with_name("common.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

BEDS = ("eight_gaussians", "anisotropic_2d")


def _timed(fn, repeats, *args, **kwargs):
    """``fn(*args, **kwargs)`` once untimed (warm-up), then ``repeats`` timed; median seconds."""
    out, times = fn(*args, **kwargs), []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def _peer(den, t_eps):
    """flow_matching's solver over the same exact field, or (None, reason)."""
    try:
        from flow_matching.solver import ODESolver
    except Exception as e:  # pragma: no cover - depends on the environment
        return None, f"flow_matching not importable: {type(e).__name__}: {e}"

    def velocity(x, t):
        s = torch.as_tensor(t, dtype=x.dtype).reshape(()).expand(x.shape[0])
        return -den(x, (1 - s).clamp_min(t_eps)).velocity

    def log_p0(z):
        return -0.5 * (z.square().sum(1) + z.shape[1] * math.log(2 * math.pi))

    solver = ODESolver(velocity_model=velocity)

    def run(x, steps, exact):
        # flow_matching builds its Hutchinson probe as `(randn_like(x) < 0) * 2.0 - 1.0`, which
        # is float32 under the default dtype and fails against float64 points: run it with the
        # default dtype set to x's (recorded in the notes).
        torch.manual_seed(1)  # its probe comes from the global RNG
        before = torch.get_default_dtype()
        torch.set_default_dtype(x.dtype)
        try:
            _, lp = solver.compute_likelihood(
                x, log_p0, step_size=1.0 / steps, method="rk4", exact_divergence=exact,
                time_grid=torch.tensor([1.0, 0.0], dtype=x.dtype))
        finally:
            torch.set_default_dtype(before)
        return lp

    return run, None


def run(quick: bool = False) -> dict:
    """Measure and write ``benchmarks/results/likelihood.{json,md}``; returns the result dict."""
    t_start = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    n_points = 64 if quick else 256
    steps_list = (4, 8, 16, 32) if quick else (4, 8, 16, 32, 64)
    repeats = 1 if quick else 3
    rows = []
    notes = ["flow_matching's Hutchinson probe is float32 under the default dtype; it ran with "
             "torch's default dtype set to float64 (the points' dtype)",
             "flow_matching's grid must start at the data end (t = 0), where the exact field is "
             "0/0: the field is evaluated at max(t, t_eps) there (t_eps = 1e-3)"]
    try:
        import flow_matching  # noqa: F401

        peer_version = getattr(flow_matching, "__version__", "?")
    except Exception as e:  # pragma: no cover
        peer_version = None
        notes.append(f"flow_matching unavailable: {type(e).__name__}: {e}")
    try:
        for bed in BEDS:
            gmm = analytic.get_testbed(bed)
            x = gmm.sample(n_points, generator=torch.Generator().manual_seed(0))
            exact = gmm.log_prob(x)
            dim = gmm.dim
            for sched in (S.RectifiedFlow(), S.VPLinear()):
                den = gmm.denoiser(sched)
                t_eps = default_t_eps(sched)
                peer = None
                if sched.name == "rectified_flow" and peer_version is not None:
                    peer, why = _peer(den, t_eps)
                    if why:
                        notes.append(why)
                for steps in steps_list:
                    for trace in ("exact", "hutchinson"):
                        lp, sec = _timed(log_likelihood, repeats, den, x, steps=steps,
                                         solver="rk4", trace=trace,
                                         generator=torch.Generator().manual_seed(1),
                                         prior=(gmm.mean, gmm.cov))
                        err = float(((lp - exact).abs() / dim).mean())
                        row = {"bed": bed, "method": f"tiltflow rk4 {trace}", "role": "ours",
                               "nfe": 4 * steps, "metric": "nll_error", "value": err,
                               "floor": None,
                               "extra": {"schedule": sched.name, "steps": steps,
                                         "trace": trace, "seconds": sec,
                                         "max_error": float(((lp - exact).abs() / dim).max()),
                                         "signed_error": float(((lp - exact) / dim).mean())}}
                        rows.append(row)
                        if peer is None:
                            continue
                        try:
                            plp, psec = _timed(peer, repeats, x, steps, trace == "exact")
                        except Exception as e:  # pragma: no cover - record why the peer failed
                            notes.append(f"flow_matching compute_likelihood failed: "
                                         f"{type(e).__name__}: {e}")
                            peer = None
                            continue
                        perr = (plp - exact).abs() / dim
                        rows.append({
                            "bed": bed, "method": f"flow_matching rk4 {trace}", "role": "peer",
                            "nfe": 4 * steps, "metric": "nll_error", "value": float(perr.mean()),
                            "floor": None,
                            "extra": {"schedule": sched.name, "steps": steps, "trace": trace,
                                      "seconds": psec, "max_error": float(perr.max()),
                                      "signed_error": float(((plp - exact) / dim).mean()),
                                      "version": peer_version}})
                        row["extra"]["time_ratio_to_peer"] = sec / psec
    finally:
        torch.set_num_threads(threads)
    result = bench.result("likelihood", t_start, quick, rows, points=n_points, repeats=repeats,
                          notes=notes)
    bench.write_results(result, _markdown(result))
    return result


def _markdown(res: dict) -> str:
    lines = [
        "# likelihood suite",
        "",
        f"{bench.header(res)}; {res['points']} points per bed; times are "
        f"medians of {res['repeats']} run(s), one thread.",
        "",
        "`nll_error` = mean over points of |log p_model - log p_exact| / D (nats/dim; goal "
        "<= 0.01); `max` is the worst point; `signed` = mean (log p_model - log p_exact) / D "
        "(a Hutchinson estimate's bias shows here, its probe noise in nll_error). The model is "
        "the exact mixture denoiser, so this is the ODE discretisation error. RK4, NFE = 4 x "
        "steps; Hutchinson uses 1 Rademacher probe. Peer: flow_matching `compute_likelihood` "
        "(rk4, same field, same points) on the rectified-flow path; ratio = tiltflow time / "
        "flow_matching time.",
        "",
        "| bed | schedule | method | role | steps | NFE | nll_error | max | signed | seconds | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in res["rows"]:
        e = r["extra"]
        ratio = e.get("time_ratio_to_peer")
        lines.append(
            f"| {r['bed']} | {e['schedule']} | {r['method']} | {r['role']} | {e['steps']} | "
            f"{r['nfe']} | {r['value']:.2e} | {e['max_error']:.2e} | {e['signed_error']:+.1e} | "
            f"{e['seconds']:.3f} | "
            f"{'' if ratio is None else f'{ratio:.2f}'} |")
    ratios = [r["extra"]["time_ratio_to_peer"] for r in res["rows"]
              if "time_ratio_to_peer" in r["extra"]]
    if ratios:
        lines += ["", f"Time ratio tiltflow / flow_matching (same steps and trace): median "
                  f"{statistics.median(ratios):.2f}, range {min(ratios):.2f}-{max(ratios):.2f}."]
    if res["notes"]:
        lines += ["", "Notes: " + "; ".join(res["notes"])]
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    return bench.cli(__doc__, run, _markdown, "fewer points, steps and repeats", argv)


if __name__ == "__main__":
    sys.exit(main())
