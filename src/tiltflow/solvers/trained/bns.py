"""Bespoke Non-Stationary solvers (Shaul et al. 2024, "Bespoke Non-Stationary Solvers for Fast
Sampling of Diffusion and Flow Models", ICML 2024): every step a learned linear combination of
the start state and all previous model outputs, fitted on the endpoint RMSE.
"""

from __future__ import annotations

import torch

from ...denoiser import Denoiser
from ...schedules import get_schedule
from ..registry import Predictor, linear_combination
from ..registry import get as get_solver
from .base import F64, FittedSolver, adam_fit, endpoint_rmse, fit_targets, select

__all__ = ["BNSSolver", "linear_plan"]


# -- BNS (non-stationary) solver ----------------------------------------------------------------

def linear_plan(solver: str, schedule, grid: torch.Tensor):
    """Express a registered *linear* solver on ``grid`` as a non-stationary solver: returns
    ``(times [n], a [n], b [n, n])`` with evaluation ``j`` at ``times[j]`` on the state
    ``x_j = a[j-1] x_init + sum_{k<j} b[j-1, k] x_hat_k`` (``x_0 = x_init``) and output
    ``x_n``. Found by running the solver on a probe denoiser whose k-th data prediction is the
    (k+1)-th unit vector, so the state carries its coefficients (valid for any solver that is
    linear in the state and the predictions: Euler, DDIM, Heun, DPM-Solver++, UniPC, ...)."""
    from .. import solve as run_solver

    schedule = get_schedule(schedule)
    info = get_solver(solver)
    grid = torch.as_tensor(grid, dtype=F64)
    nfe = info.nfe(len(grid) - 1, bool(grid[-1] == 0))
    width = nfe + 1
    seen: list[tuple[float, torch.Tensor]] = []

    def probe(x_t, t, cond=None):
        k = len(seen)
        if k >= nfe:
            raise ValueError(f"solver {solver!r} called the model more than nfe={nfe} times")
        seen.append((float(t[0]), x_t[0].detach().clone()))
        out = torch.zeros_like(x_t)
        out[:, k + 1] = 1.0
        return out

    den = Denoiser.from_fn(probe, schedule, "data")
    x0 = torch.zeros(1, width, dtype=F64)
    x0[0, 0] = 1.0
    with torch.no_grad():
        out = run_solver(den, x0, grid, solver)[0]
    if len(seen) != nfe:
        raise ValueError(f"solver {solver!r} made {len(seen)} calls, expected {nfe}")
    states = [st for _, st in seen[1:]] + [out]
    times = torch.tensor([tt for tt, _ in seen], dtype=F64)
    a = torch.stack([st[0] for st in states])
    b = torch.stack([st[1:] for st in states])
    if not bool(torch.isfinite(a).all() & torch.isfinite(b).all()):
        raise ValueError(f"solver {solver!r} on this grid has non-finite coefficients")
    return times, a, b


class BNSSolver(FittedSolver):
    """Bespoke Non-Stationary solver (Shaul et al. 2024, "Bespoke Non-Stationary Solvers for
    Fast Sampling of Diffusion and Flow Models", ICML 2024, sec. 3: the non-stationary solver
    family and its BNS optimisation).

    With ``n = nfe`` evaluations at learned times ``t_0 = 1 > ...`` (``t_j`` free in (0, 1)),
    step j is ``x_{j+1} = a_j x_0 + sum_{k<=j} b_{jk} x_hat_k`` where ``x_hat_k`` is the model's
    data prediction at ``(x_k, t_k)``: a learned, step-dependent combination of the start and
    all previous outputs. The paper writes it with velocities ``u_k``; since each ``u_k`` is a
    fixed linear combination of ``x_k`` and ``x_hat_k``, and every ``x_k`` of ``x_0`` and
    ``x_hat_{<k}``, both spans are the same family (it contains every linear multistep and
    Runge-Kutta solver, the paper's "subsumes" result). The data form is finite at t = 1 and at
    t = 0 on every schedule. Initialised from any linear registered solver on any grid (see
    :func:`linear_plan`), e.g. DDIM on an optimised grid; fitted on the endpoint RMSE.
    """

    kind = "bns"

    def __init__(self, times, a, b, *, base: str = "ddim", **kw):
        times = torch.as_tensor(times, dtype=F64).detach().flatten().clone()
        a = torch.as_tensor(a, dtype=F64).detach().flatten().clone()
        b = torch.as_tensor(b, dtype=F64).detach().clone()
        n = times.numel()
        kw.setdefault("nfe", n)
        super().__init__(base=base, **kw)
        if n != self.nfe or a.shape != (n,) or b.shape != (n, n):
            raise ValueError(f"need times [{self.nfe}], a [{self.nfe}], b [{self.nfe}, "
                             f"{self.nfe}]; got {tuple(times.shape)}, {tuple(a.shape)}, "
                             f"{tuple(b.shape)}")
        if abs(float(times[0]) - self.t_start) > 1e-12 or \
                not bool(((times > 0) & (times <= 1)).all()):
            raise ValueError("times must start at t_start and lie in (0, 1]")
        if bool(torch.triu(b, 1).ne(0).any()):
            raise ValueError("b must be lower-triangular (a step uses only earlier outputs)")
        self.times, self.a, self.b = times, a, b

    @classmethod
    def from_solver(cls, schedule, solver: str = "ddim", grid: torch.Tensor | str = "uniform",
                    nfe: int | None = None, model: dict | None = None) -> BNSSolver:
        """A registered linear solver on a grid (a name, with ``nfe``, or a tensor) written as
        a BNS solver: it reproduces that solver up to float64 rounding."""
        from .. import grids as grids_mod

        schedule = get_schedule(schedule)
        if isinstance(grid, str):
            if nfe is None:
                raise ValueError("give nfe= with a named grid")
            grid = grids_mod.get_grid(grid, get_solver(solver).steps_for_nfe(nfe), schedule)
        times, a, b = linear_plan(solver, schedule, grid)
        return cls(times, a, b, base=solver, schedule=schedule, model=model)

    @classmethod
    def fit(cls, denoiser, nfe: int, base: str = "ddim", *, noises: torch.Tensor,
            reference: torch.Tensor | None = None, grid: torch.Tensor | str = "uniform",
            steps: int = 600, lr: float = 0.005, batch_size: int | None = 256, cond=None,
            model: dict | None = None, progress: bool = False) -> BNSSolver:
        """Fit to ``denoiser`` at ``nfe`` evaluations, starting from ``base`` on ``grid`` (a
        grid name or tensor, e.g. an :func:`optimize_grid` result), by Adam on the endpoint
        RMSE to ``reference`` on ``noises``."""
        x_init, ref = fit_targets(denoiser, noises, reference, cond)
        start = cls.from_solver(denoiser.schedule, base, grid, nfe=nfe, model=model)
        if start.nfe != nfe:
            raise ValueError(f"{base!r} on the given grid spends {start.nfe} evaluations, "
                             f"not nfe={nfe}")
        with torch.no_grad():
            init_rmse = float(endpoint_rmse(start.solve(denoiser, x_init, cond=cond).to(F64),
                                            ref.to(F64)))
        eps = 1e-6
        tt = start.times[1:].clamp(eps, 1 - eps)
        logit_t = torch.log(tt / (1 - tt)).requires_grad_()
        a = start.a.clone().requires_grad_()
        mask = torch.tril(torch.ones(nfe, nfe, dtype=F64))
        b = start.b.clone().requires_grad_()
        first = torch.full((1,), start.t_start, dtype=F64)

        def times():
            return torch.cat([first, torch.sigmoid(logit_t)])

        def run(idx):
            x0, c = (x_init, cond) if idx is None else (x_init[idx], select(cond, idx))
            return _bns_steps(denoiser, x0, times(), a, b * mask, c, None, None)

        best, secs = adam_fit([logit_t, a, b], run, ref, steps=steps, lr=lr,
                               desc=f"bns nfe={nfe}", progress=progress, batch_size=batch_size)
        fit = {"loss": "endpoint_rmse", "optimizer": "adam", "iterations": int(steps), "lr": lr,
               "init": base, "num_noises": int(ref.shape[0]), "batch_size": batch_size,
               "init_rmse": init_rmse,
               "train_rmse": best, "seconds": round(secs, 3)}
        with torch.no_grad():
            return cls(times(), a, b * mask, base=base, nfe=nfe, schedule=denoiser.schedule,
                       model=model, fit=fit)

    def solve(self, denoiser, x_init, *, cond=None, guidance=None, record=None, hook=None,
              generator=None):
        """Integrate ``x_init`` (the state at t_start) to t = 0 with exactly ``nfe`` calls."""
        self.check_denoiser(denoiser)
        return _bns_steps(denoiser, x_init, self.times, self.a, self.b, cond, guidance, record,
                          hook)

    def _tensors(self):
        return {"times": self.times, "a": self.a, "b": self.b}

    @classmethod
    def _from_tensors(cls, tensors, **kw):
        missing = {"times", "a", "b"} - set(tensors)
        if missing:
            raise ValueError(f"missing tensors {sorted(missing)}")
        return cls(tensors["times"], tensors["a"], tensors["b"], **kw)


def _bns_steps(denoiser, x_init, times, a, b, cond, guidance, record, hook=None):
    """Step ``j`` of a non-stationary solver: ``x_{j+1} = a_j x_init + sum_{k <= j} b_jk
    x_hat_k`` (Shaul et al. 2024, eq. 8 in data-prediction form)."""
    predict = Predictor(denoiser, cond, guidance, record, hook)
    points = denoiser.schedule.points(torch.cat([times, times.new_zeros(1)]))
    preds: list[torch.Tensor] = []
    x = x_init
    for j in range(len(times)):
        pred = predict(x, points[j])
        preds.append(pred.data)
        x_next = a[j] * x_init + linear_combination(b[j].unbind(), preds)
        x = predict.end_step(points[j], points[j + 1], x, x_next, pred)
    return x
