"""Measuring solvers against the exact probability-flow map of a Gaussian mixture: what the
demo's solver section and the ``solvers`` benchmark share.

- :func:`deterministic_solvers`: every registered non-stochastic solver (all solver modules
  are imported first, so whatever is in ``tiltflow/solvers/`` is measured).
- :func:`reference`: the PF-ODE's exact map of a start state, in float64
  (:func:`~tiltflow.solvers.reference.reference_solve`, adaptive Dormand–Prince at tight
  tolerance).
- :func:`endpoint_rmse`, :func:`measure_solver`: the RMS endpoint distance of a solver run with
  an exact count of network evaluations (:func:`counting_denoiser`).
"""

from __future__ import annotations

import math

import torch

from .. import analytic, metrics
from ..denoiser import Denoiser
from ..schedules import Schedule
from . import grids, solve
from .registry import available, get

__all__ = ["deterministic_solvers", "spendable_nfe", "reference", "endpoint_rmse",
           "counting_denoiser", "measure_solver", "FITTED"]

_F64 = torch.float64

# need parameters fitted (bespoke) or statistics computed (DPM-Solver-v3) per model first
FITTED = ("bespoke", "dpm_solver_v3")


def deterministic_solvers(training_free: bool = True) -> list[str]:
    """Registered deterministic (ODE) solvers; with ``training_free`` those in :data:`FITTED`
    (which need per-model parameters or statistics) are left out."""
    return [n for n in available() if not get(n).stochastic
            and not (training_free and n in FITTED)]


def spendable_nfe(name: str, nfe: int) -> tuple[int, int] | None:
    """``(nfe_spent, steps)``: ``nfe`` if the solver can spend it exactly on a grid ending at
    t = 0, else ``nfe - 1`` (e.g. Heun's ``2n - 1``), else None."""
    info = get(name)
    for n in (nfe, nfe - 1):
        try:
            return n, info.steps_for_nfe(n)
        except (ValueError, ZeroDivisionError, TypeError, AttributeError):
            continue
    return None


def reference(gmm: analytic.GaussianMixture, schedule: Schedule, x_init: torch.Tensor,
              t_start: float = 1.0, t_end: float = 0.0) -> tuple[torch.Tensor, str]:
    """``(x_end, how)``: the exact PF-ODE map of ``x_init`` from ``t_start`` to ``t_end``."""
    from .reference import reference_solve

    den = gmm.denoiser(schedule)
    return (reference_solve(den, x_init.to(_F64), t_start, t_end),
            "tiltflow.solvers.reference_solve (dopri5, rtol=atol=1e-10)")


def endpoint_rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    """:func:`tiltflow.metrics.endpoint_rmse` in float64, as a float; inf if non-finite."""
    d = metrics.endpoint_rmse(x.to(_F64), ref.to(_F64))
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
        x = solve(den, x_init, t_grid, name)
    return x, den.net.calls
