"""Demo report section on fast sampling, and the exact-mixture helpers the ``solvers``
benchmark suite shares with it.

:func:`solvers_part` samples the eight-Gaussians mixture with its *exact* denoiser (no training)
by several solvers at a low NFE, next to exact samples, and plots each solver's endpoint error
against the exact probability-flow ODE solution versus NFE.

Helpers (used by ``benchmarks/solvers_suite.py`` too):

- :func:`deterministic_solvers`: every registered non-stochastic solver (importing all solver
  modules first, so whatever is in ``tiltflow/solvers/`` is measured).
- :func:`reference`: the PF-ODE's exact map of a start state, in float64:
  ``tiltflow.solvers.reference_solve`` (adaptive Dormand–Prince at tight tolerance).
- :func:`reference_rk4`: an independent check: classic RK4 (Kutta 1901) in the rectified-flow
  variable. Any schedule's state maps to rectified flow's at the same log-SNR
  (``x_rf = x_t / (alpha + sigma)`` at ``tau = sigma / (alpha + sigma)``; Karras et al. 2022,
  sec. 4), where the velocity ``(x_rf - x_hat) / tau`` is bounded on [0, 1] (``-x_rf`` at
  tau = 0), so uniform steps in tau converge at order 4 up to both ends.
- :func:`endpoint_rmse`, :func:`measure_solver`: RMS endpoint distance of a solver run with an
  exact count of network evaluations.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from . import analytic, metrics, solvers
from .denoiser import Denoiser
from .report import Report, save_figure
from .schedules import RectifiedFlow, Schedule, VPDiscrete
from .solvers import grids

__all__ = ["solvers_part", "deterministic_solvers", "reference", "reference_rk4",
           "endpoint_rmse", "counting_denoiser", "measure_solver", "spendable_nfe"]

_F64 = torch.float64


# -- helpers shared with benchmarks/solvers_suite.py ---------------------------------------
# need parameters fitted (bespoke) or statistics computed (DPM-Solver-v3) per model first
FITTED = ("bespoke", "dpm_solver_v3")


def deterministic_solvers(training_free: bool = True) -> list[str]:
    """Registered deterministic (ODE) solvers; with ``training_free`` those in :data:`FITTED`
    (which need per-model parameters or statistics) are left out."""
    return [n for n in solvers.available() if not solvers.get(n).stochastic
            and not (training_free and n in FITTED)]


def spendable_nfe(name: str, nfe: int) -> tuple[int, int] | None:
    """``(nfe_spent, steps)``: ``nfe`` if the solver can spend it exactly on a grid ending at
    t = 0, else ``nfe - 1`` (e.g. Heun's ``2n - 1``), else None."""
    info = solvers.get(name)
    for n in (nfe, nfe - 1):
        try:
            return n, info.steps_for_nfe(n)
        except (ValueError, ZeroDivisionError, TypeError, AttributeError):
            continue
    return None


def reference_rk4(gmm: analytic.GaussianMixture, schedule: Schedule, x_init: torch.Tensor,
                  t_start: float = 1.0, t_end: float = 0.0, steps: int = 500) -> torch.Tensor:
    """PF-ODE solution by RK4 with ``steps`` uniform steps in rectified-flow time (see module
    docstring); float64. Independent of tiltflow's solvers."""
    rf = RectifiedFlow()
    c = schedule(torch.tensor([t_start, t_end], dtype=_F64))
    (a0, a1), (s0, s1) = c.alpha.tolist(), c.sigma.tolist()
    taus = torch.linspace(s0 / (a0 + s0), s1 / (a1 + s1), steps + 1, dtype=_F64).tolist()

    def vel(y, tau):
        if tau == 0.0:
            return -y
        return (y - gmm.posterior_mean(y, torch.full((y.shape[0],), tau, dtype=_F64), rf)) / tau

    y = x_init.to(_F64) / (a0 + s0)
    for a, b in zip(taus[:-1], taus[1:], strict=True):
        h = b - a
        k1 = vel(y, a)
        k2 = vel(y + 0.5 * h * k1, a + 0.5 * h)
        k3 = vel(y + 0.5 * h * k2, a + 0.5 * h)
        k4 = vel(y + h * k3, b)
        y = y + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
    return y * (a1 + s1)


def reference(gmm: analytic.GaussianMixture, schedule: Schedule, x_init: torch.Tensor,
              t_start: float = 1.0, t_end: float = 0.0) -> tuple[torch.Tensor, str]:
    """``(x_end, how)``: the exact PF-ODE map of ``x_init`` from ``t_start`` to ``t_end``."""
    from .solvers import reference_solve

    den = gmm.denoiser(schedule)
    return (reference_solve(den, x_init.to(_F64), t_start, t_end),
            "tiltflow.solvers.reference_solve (dopri5, rtol=atol=1e-10)")


def endpoint_rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    """RMS over examples of the Euclidean distance ``|x - ref|`` (float64); inf if non-finite."""
    d = (x.to(_F64) - ref.to(_F64)).flatten(1).pow(2).sum(1).mean().sqrt()
    return float(d) if bool(torch.isfinite(d)) else math.inf


def counting_denoiser(gmm: analytic.GaussianMixture, schedule: Schedule) -> Denoiser:
    """The exact denoiser (data prediction) with a call counter ``den.net.calls``."""

    class _Exact:
        def __init__(self):
            self.calls = 0

        def __call__(self, x_t, t, cond=None):
            self.calls += 1
            return gmm.posterior_mean(x_t, t, schedule)

    return Denoiser.from_fn(_Exact(), schedule, prediction="data")


def measure_solver(name: str, gmm, schedule: Schedule, x_init: torch.Tensor, steps: int,
                   grid: str = "uniform") -> tuple[torch.Tensor, int]:
    """Run solver ``name`` with ``steps`` steps on the named grid from ``x_init`` at t = 1;
    returns ``(x_end, network calls)``."""
    den = counting_denoiser(gmm, schedule)
    t_grid = grids.get_grid(grid, steps, schedule)
    if float(t_grid[0]) != 1.0:
        raise ValueError(f"grid {grid!r} does not start at t = 1")
    with torch.no_grad():
        x = solvers.solve(den, x_init, t_grid, name)
    return x, den.net.calls


# -- the demo section ----------------------------------------------------------------------
_SHOWN = ("euler", "ddim", "heun", "dpmpp_2m", "unipc", "ipndm", "deis", "dpmpp_3m")
_PLOTTED = ("euler", "ddim", "heun", "midpoint", "rk4", "dpmpp_2m", "dpmpp_3m", "unipc", "deis",
            "ipndm")


def _error_curves(gmm, schedule, x_init, ref, names, nfes):
    curves = {}
    for name in names:
        pts = []
        for nfe in nfes:
            spent = spendable_nfe(name, nfe)
            if spent is None or spent[0] < 1:
                continue
            x, calls = measure_solver(name, gmm, schedule, x_init, spent[1])
            err = endpoint_rmse(x, ref)
            if math.isfinite(err) and calls == spent[0]:
                pts.append((calls, err))
        if pts:
            curves[name] = sorted(set(pts))
    return curves


def solvers_part(out: Path, report: Report, quick: bool) -> None:
    """Report section: low-NFE samples of several solvers on eight Gaussians (exact denoiser,
    diffusers' linear-beta VP schedule) next to exact samples, and endpoint error vs NFE."""
    import matplotlib
    import matplotlib.pyplot as plt

    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gmm = analytic.eight_gaussians()
    schedule = VPDiscrete.linear()
    n = 400 if quick else 1500
    nfe_shown = 4
    noise = torch.randn(n, 2, dtype=_F64, generator=torch.Generator().manual_seed(1))
    x_init = float(schedule(torch.tensor(1.0, dtype=_F64)).sigma) * noise
    ref, how = reference(gmm, schedule, x_init)
    exact = gmm.sample(n, generator=torch.Generator().manual_seed(2))

    names = deterministic_solvers()
    shown = [s for s in _SHOWN if s in names][:6]
    panels = [("exact samples", exact), ("exact PF-ODE map of the noise", ref)]
    rows = []
    floor = metrics.noise_floor("sw2", lambda m, g: gmm.sample(m, generator=g), n, repeats=3)
    for name in shown:
        spent = spendable_nfe(name, nfe_shown)
        if spent is None:
            continue
        x, calls = measure_solver(name, gmm, schedule, x_init, spent[1])
        panels.append((f"{name}, {calls} NFE", x))
        ok = bool(torch.isfinite(x).all())
        rows.append([name, calls, endpoint_rmse(x, ref),
                     metrics.sliced_w2(x, exact) if ok else math.inf, floor.mean])

    cols = 4
    nrow = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrow, cols, figsize=(3.1 * cols, 3.1 * nrow), sharex=True,
                             sharey=True, squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for ax, (title, pts) in zip(axes.flat, panels, strict=False):
        ax.set_visible(True)
        pts = pts[torch.isfinite(pts).all(1)]
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.4, color="tab:blue")
        ax.set_title(title, fontsize=9)
        ax.set_xlim(-6.5, 6.5)
        ax.set_ylim(-6.5, 6.5)
        ax.set_aspect("equal")
    fig.suptitle(f"eight Gaussians, exact denoiser, linear-beta VP: solvers at ~{nfe_shown} NFE")
    save_figure(fig, out / "solvers_samples.png")

    nfes = (2, 4, 6, 8, 10, 16) if quick else (2, 4, 6, 8, 10, 16, 32)
    plotted = [s for s in _PLOTTED if s in names]
    curves = _error_curves(gmm, schedule, x_init[: min(n, 300)], ref[: min(n, 300)], plotted,
                           nfes)
    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    cmap, markers = plt.get_cmap("tab10"), "os^vD<>ph*"
    for i, name in enumerate(plotted):
        if name not in curves:
            continue
        xs, ys = zip(*curves[name], strict=True)
        ax.plot(xs, ys, marker=markers[i % 10], ms=4, lw=1.5, color=cmap(i % 10), label=name)
    ax.set(xscale="log", yscale="log", xlabel="NFE (network evaluations)",
           ylabel="RMS endpoint error vs exact ODE",
           title="eight Gaussians, linear-beta VP, uniform (trailing) grid")
    ax.set_xticks([1, 2, 4, 8, 16, 32] if not quick else [1, 2, 4, 8, 16])
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    save_figure(fig, out / "solvers_error_vs_nfe.png")

    sec = report.section(
        "Fast sampling: solvers on an exact mixture",
        f"Every deterministic solver in the registry ({len(names)}: {', '.join(names)}) driven by "
        "the exact eight-Gaussians denoiser under diffusers' linear-beta VP schedule (1000 "
        f"steps), all from the same {n} start states at t = 1. The endpoint error is the RMS "
        "distance to the exact solution of the same probability-flow ODE from the same start "
        f"({how}); sliced W2 compares the samples with exact samples, next to its noise floor "
        "(two exact sample sets of the same size). Solvers that cannot spend exactly "
        f"{nfe_shown} evaluations are shown at {nfe_shown - 1}. The full comparison with "
        "diffusers and flow_matching is `tiltflow bench solvers`."
        f"\n\nThis section took {time.perf_counter() - start:.0f} s.")
    sec.tables.append((["solver", "NFE", "endpoint RMSE", "sliced W2 vs exact", "SW2 noise floor"],
                       rows))
    sec.images += [("solvers_samples.png", f"samples at ~{nfe_shown} NFE next to exact samples"),
                   ("solvers_error_vs_nfe.png", "endpoint error vs NFE (log-log)")]
