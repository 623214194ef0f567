"""Optimized time grids: only the time steps of a registered deterministic solver are fitted
for one model at one NFE (Shaul et al. 2023, sec. 4, and 2024, sec. 5, learned-timestep
baseline; fitted like LD3, Tong et al. 2024). Every registered fixed-grid solver computes its
step coefficients from the grid with torch operations, so the endpoint RMSE is differentiated
with respect to the grid through the registered solver itself; ``method="nelder_mead"`` also
fits solvers whose coefficients are not differentiable.
"""

from __future__ import annotations

import math
import time

import torch

from ..registry import get as get_solver
from .base import F64, FittedSolver, endpoint_rmse, fit_targets, progress_bar, select

__all__ = ["FittedGrid", "fit_grid", "optimize_grid", "AUTO_GRID_SOLVERS"]


def _solver_options(solver: str, options: dict | None) -> dict:
    """``options`` checked against the registered solver's keyword options."""
    return get_solver(solver).check_options(options)



# -- optimized grid ---------------------------------------------------------------------------

class FittedGrid(FittedSolver):
    """A registered solver, with its keyword ``options``, on an optimised time grid (see
    :func:`fit_grid`). The options travel with the grid: they are saved in the file's fit
    record (``fit["solver_options"]``) and read back from it when ``options`` is not given."""

    kind = "grid"

    def __init__(self, grid, *, options: dict | None = None, **kw):
        super().__init__(**kw)
        if options is None:  # a loaded file keeps them in its fit record
            options = self.fit_info.get("solver_options") or {}
        if not isinstance(options, dict):
            raise ValueError(f"options must be a dict of solver options, got {options!r}")
        self.options = _solver_options(self.base, options)
        self.fit_info["solver_options"] = dict(self.options)
        grid = torch.as_tensor(grid, dtype=F64).detach().flatten().clone()
        if grid.numel() < 2 or not bool((grid[1:] < grid[:-1]).all()) or \
                float(grid[0]) > 1 or float(grid[-1]) != 0.0:
            raise ValueError("grid must be strictly decreasing in [0, 1] and end at 0")
        cost = get_solver(self.base).nfe(grid.numel() - 1, options=self.options)
        if cost != self.nfe:
            raise ValueError(f"a grid of {grid.numel() - 1} steps costs {cost} evaluations "
                             f"with {self.base!r}, not {self.nfe}")
        self.grid = grid
        self.t_start = float(grid[0])

    def __repr__(self) -> str:
        opts = f", options={self.options}" if self.options else ""
        return (f"FittedGrid(nfe={self.nfe}, base={self.base!r}{opts}, "
                f"schedule={self.schedule!r})")

    def _tensors(self):
        return {"grid": self.grid}

    @classmethod
    def _from_tensors(cls, tensors, **kw):
        kw.pop("t_start", None)
        return cls(tensors["grid"], **kw)

    def solve(self, denoiser, x_init, *, cond=None, guidance=None, record=None, hook=None,
              generator=None):
        from .. import solve as run_solver

        self.check_denoiser(denoiser)
        return run_solver(denoiser, x_init, self.grid, self.base, cond=cond, guidance=guidance,
                          generator=generator, record=record, hook=hook, options=self.options)


def _grid_from_theta(theta: torch.Tensor, t_start: float) -> torch.Tensor:
    """``t_start (1 - cumsum(softmax(theta)))`` with the end points exactly ``t_start`` and 0
    (constants, so no gradient reaches them): strictly decreasing by construction."""
    inner = t_start * (1 - torch.cumsum(torch.softmax(theta, 0), 0)[:-1])
    return torch.cat([torch.full((1,), t_start, dtype=F64), inner, torch.zeros(1, dtype=F64)])



#: The bases ``fit_grid(solver="auto")`` tries, as (registered solver, its options): the best
#: optimised-grid bases of 20 registered solver / option pairs on the 2-D test beds
#: (anisotropic_2d under rectified flow and discrete VP, held-out endpoint RMSE at NFE 4-10).
#: UniPC with B(h) = h (Zhao et al. 2023's advice for few unguided steps) wins at NFE 4 and 10,
#: its order-3 form without ``lower_order_final`` at VP NFE 6, iPNDM (order 4) and DEIS-4, whose
#: last step to t = 0 keeps its order, at NFE 8. Which one wins depends on the model and NFE,
#: so ``auto`` fits each and keeps the best on the validation noises.
AUTO_GRID_SOLVERS = (
    ("unipc", {"variant": "bh1"}),
    ("unipc", {"order": 3, "variant": "bh1", "lower_order_final": False}),
    ("ipndm", {}),
    ("deis", {"order": 4}),
)

_GRID_METHODS = ("lbfgs", "adam", "nelder_mead")


class _GridProblem:
    """What every grid fit shares: the start states, reference endpoints, condition and the
    seeded train / validation split of the noises."""

    def __init__(self, denoiser, x_init, ref, cond, val_fraction: float, seed: int, split: bool):
        self.denoiser, self.x_init, self.ref, self.cond = denoiser, x_init, ref, cond
        pool = ref.shape[0]
        self.val = None
        self.train = torch.arange(pool)
        if split and pool >= 8 and val_fraction > 0:
            perm = torch.randperm(pool, generator=torch.Generator().manual_seed(seed))
            n_val = min(pool - 4, max(1, round(pool * val_fraction)))
            self.val, self.train = perm[:n_val], perm[n_val:]

    @property
    def check(self) -> torch.Tensor:
        """The noises that judge a grid: validation when there is a split, else training."""
        return self.val if self.val is not None else self.train

    def rmse(self, grid, solver: str, options: dict, idx=None) -> float:
        """Endpoint RMSE of the REGISTERED solver on ``grid`` (1e30 where it fails)."""
        from .. import solve as run_solver

        idx = self.train if idx is None else idx
        try:
            with torch.no_grad():
                x = run_solver(self.denoiser, self.x_init[idx], grid, solver,
                               cond=select(self.cond, idx), options=options)
        except (RuntimeError, ValueError, ArithmeticError):  # e.g. a singular order system
            return 1e30
        v = float(endpoint_rmse(x.to(F64), self.ref[idx]))
        return v if math.isfinite(v) else 1e30

    def loss(self, theta, solver: str, options: dict, idx) -> torch.Tensor | None:
        """The registered solver's endpoint RMSE, differentiable in ``theta`` (``None`` where
        the solve fails)."""
        from .. import solve as run_solver

        try:
            with torch.enable_grad():
                x = run_solver(self.denoiser, self.x_init[idx], _grid_from_theta(theta, 1.0),
                               solver, cond=select(self.cond, idx), options=options)
        except (RuntimeError, ValueError, ArithmeticError):
            return None
        loss = endpoint_rmse(x.to(F64), self.ref[idx])
        return loss if torch.isfinite(loss) else None


def _theta_of(grid: torch.Tensor) -> torch.Tensor:
    inc = (grid[:-1] - grid[1:]).clamp_min(1e-12)
    return torch.log(inc / inc.sum())


def _grid_candidates(solver: str, options: dict | None, method: str, nfe: int):
    """``[(solver, options, steps)]`` to fit, with clear errors for impossible requests."""
    if solver == "auto":
        if options:
            raise ValueError("options go with one solver; solver='auto' tries its own "
                             f"candidates {list(AUTO_GRID_SOLVERS)}")
        if method == "nelder_mead":
            raise ValueError("solver='auto' fits by gradient; use method='lbfgs' or 'adam'")
        pairs = list(AUTO_GRID_SOLVERS)
    else:
        pairs = [(solver, options or {})]
    out = []
    for name, opts in pairs:
        info = get_solver(name)
        name = info.name
        if info.stochastic:
            raise ValueError(f"{name!r} is stochastic; optimise the grid of a deterministic "
                             "solver")
        if info.adaptive:
            raise ValueError(f"{name!r} is adaptive: it has no fixed grid to optimise")
        if method != "nelder_mead" and not info.differentiable:
            raise ValueError(f"{name!r} is not differentiable in its grid, which "
                             f"method={method!r} needs; use method='nelder_mead'")
        opts = _solver_options(name, opts)
        out.append((name, opts, info.steps_for_nfe(int(nfe), opts)))
    return out


def _grid_starts(prob: _GridProblem, solver, options, n, init, restarts, schedule):
    """The start grids ``[(name, grid, training RMSE)]``, best first: the given grid, one named
    grid, or (``init="auto"``) the ``restarts`` best of the named grids."""
    from .. import grids as grids_mod

    if isinstance(init, str):
        if init != "auto" and init not in grids_mod.available():
            raise ValueError(f"init must be 'auto', a grid tensor or one of "
                             f"{grids_mod.available()}, got {init!r}")
        names = grids_mod.available() if init == "auto" else [init]
        cands = [(name, grids_mod.get_grid(name, n, schedule)) for name in names]
    else:
        cands = [("given", torch.as_tensor(init, dtype=F64).flatten())]
    cands = [(k, g) for k, g in cands if len(g) == n + 1 and float(g[0]) == 1.0
             and float(g[-1]) == 0.0 and bool((g[1:] < g[:-1]).all())]
    if not cands:
        raise ValueError(f"init must give a strictly decreasing grid of {n} steps from t=1 to 0 "
                         f"for {solver!r}")
    scored = sorted(((prob.rmse(g, solver, options), k, g) for k, g in cands),
                    key=lambda s: s[0])
    return [(k, g, v) for v, k, g in scored[:max(1, int(restarts))]]


def fit_grid(denoiser, nfe: int, solver: str = "auto", *, noises: torch.Tensor,
             reference: torch.Tensor | None = None, options: dict | None = None,
             init: str | torch.Tensor | list = "auto", steps: int | None = None,
             method: str = "lbfgs", restarts: int = 3, lr: float = 0.02,
             batch_size: int | None = 256, val_fraction: float = 0.25, patience: int = 30,
             seed: int = 0, cond=None, model: dict | None = None,
             progress: bool = False) -> FittedGrid:
    """The "optimized grid" of issue 3: only the time steps of a registered deterministic
    solver are optimised for ``denoiser`` at exactly ``nfe`` evaluations -- no coefficient is
    learned. It is the learned-timestep baseline of Shaul et al. 2023 (sec. 4) and 2024
    (sec. 5), fitted like LD3 (Tong et al. 2024, "Learning to Discretize Denoising Diffusion
    ODEs") by backpropagating the endpoint error to the time steps, here with the plain
    endpoint RMSE to ``reference`` (default :func:`reference_solve`) on ``noises``. (LD3's
    relaxed "soft teacher" loss trades endpoint error for sample quality, so it is not used;
    cf. Sabour et al. 2024, "Align Your Steps", and Xue et al. 2024, "Accelerating Diffusion
    Sampling with Optimized Time Steps", for model-agnostic surrogate objectives.)

    The grid from t = 1 to 0 is ``1 - cumsum(softmax(theta))`` (strictly decreasing, exact end
    points). ``noises`` are split (seeded) into a training part and a validation part of
    ``val_fraction``; the validation RMSE of the registered solver picks the result, the start
    grids included, so the result is never worse on the validation noises than any start.

    Args:
        solver: a registered solver name (with keyword ``options``, e.g. ``"unipc",
            options={"variant": "bh1"}``), or ``"auto"`` (default): fit every base in
            :data:`AUTO_GRID_SOLVERS` and keep the best on the validation noises (the result's
            ``base`` and ``options`` say which; ``fit_info["candidates"]`` lists them all).
        method: ``"lbfgs"`` (default): full-batch L-BFGS with a strong-Wolfe line search on
            the training noises through the registered solver (differentiable in its grid),
            run to convergence or ``steps`` (default 100) iterations (a few seconds per start
            on the 2-D beds: the grid has only nfe - 1 free numbers, and it matched 100+
            random restarts of Nelder-Mead there).
            ``"adam"``: Adam (``lr``, cosine decay, minibatches of ``batch_size``, at most
            ``steps``, default 800, iterations; validation checked every 10, stop after
            ``patience`` checks without improvement). ``"nelder_mead"``: derivative-free, for
            any deterministic registered solver and non-differentiable models (``steps``
            solver runs, default 1500).
        restarts: with ``init="auto"``, how many of the best named start grids are fitted.
        init: a grid name, ``"auto"`` (the ``restarts`` best of uniform / logsnr / karras /
            shifted on the training noises, each fitted), or a grid tensor from 1 to 0.
    """
    if method not in _GRID_METHODS:
        raise ValueError(f"method must be one of {list(_GRID_METHODS)}, got {method!r}")
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be a positive int, got {restarts!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                              or steps < 1):
        raise ValueError(f"steps must be a positive int or None, got {steps!r}")
    cands = _grid_candidates(solver, options, method, nfe)
    x_init, ref = fit_targets(denoiser, noises, reference, cond)
    prob = _GridProblem(denoiser, x_init, ref.to(F64), cond, val_fraction, seed, split=True)
    t0 = time.perf_counter()
    fits = [_fit_base(prob, name, opts, n, nfe=int(nfe), init=init, restarts=restarts,
                      method=method, steps=steps, lr=lr, batch_size=batch_size,
                      patience=patience, seed=seed, progress=progress)
            for name, opts, n in cands]
    grid, fit = min(fits, key=lambda gf: gf[1]["check_rmse"])
    if solver == "auto":
        fit["candidates"] = [{"solver": f["solver"], "options": f["solver_options"],
                              "val_rmse": f["check_rmse"], "seconds": f["seconds"]}
                             for _, f in fits]
    fit.update(loss="endpoint_rmse", num_noises=int(ref.shape[0]),
               seconds=round(time.perf_counter() - t0, 3))
    return FittedGrid(grid, options=fit["solver_options"], nfe=int(nfe), base=fit["solver"],
                      schedule=denoiser.schedule, model=model, fit=fit)


def _fit_base(prob: _GridProblem, solver, options, n, *, nfe, init, restarts, method, steps,
              lr, batch_size, patience, seed, progress):
    """Fit one base solver's grid from each start; returns ``(grid, fit_info)`` of the best on
    the validation noises (a start grid itself when nothing beat it)."""
    t0 = time.perf_counter()
    starts = _grid_starts(prob, solver, options, n, init, restarts, prob.denoiser.schedule)
    desc = f"grid {solver} nfe={nfe}"
    best = None
    init_check = None  # the best training start's RMSE on the judging noises
    for name, start, _ in starts:
        start_check = prob.rmse(start, solver, options, prob.check)
        init_check = start_check if init_check is None else init_check
        extra = {"optimizer": "none"}
        grid, check = start, start_check
        if n > 1:
            theta0 = _theta_of(start)
            if method == "lbfgs":
                grid, extra = _fit_grid_lbfgs(prob, solver, options, theta0, steps=steps or 100,
                                              desc=desc, progress=progress)
            elif method == "adam":
                grid, extra = _fit_grid_adam(prob, solver, options, theta0, steps=steps or 800,
                                             lr=lr, batch_size=batch_size, patience=patience,
                                             seed=seed, desc=desc, progress=progress)
            else:
                grid, extra = _fit_grid_nelder_mead(prob, solver, options, theta0,
                                                    steps or 1500, desc=desc,
                                                    progress=progress)
            check = prob.rmse(grid, solver, options, prob.check)
            if not check < start_check:  # keep the start where fitting did not help
                grid, check = start, start_check
        if best is None or check < best[1]:
            best = (grid, check, name, extra)
    grid, check, name, extra = best
    fit = {"solver": solver, "solver_options": dict(options), "init": starts[0][0],
           "init_rmse": starts[0][2], "init_check_rmse": init_check, "start": name, **extra,
           "train_rmse": prob.rmse(grid, solver, options),
           "num_train": len(prob.train), "num_val": 0 if prob.val is None else len(prob.val),
           "val_rmse": check if prob.val is not None else None, "check_rmse": check,
           "restarts": len(starts), "seconds": round(time.perf_counter() - t0, 3)}
    return grid, fit


def _fit_grid_lbfgs(prob: _GridProblem, solver, options, theta0, *, steps, desc, progress):
    """Full-batch L-BFGS (Liu & Nocedal 1989; strong-Wolfe line search) on the training noises
    for at most ``steps`` iterations, run to convergence: the validation noises judge only the
    result (the per-sample errors are heavy-tailed -- a few noises near a mode boundary carry
    most of the squared error -- so choosing among many iterates by a small validation set
    mostly fits its noise)."""
    theta = theta0.clone().requires_grad_()
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=int(steps), history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-9,
                            tolerance_change=1e-12)
    bar = progress_bar(steps, desc, progress)
    evals = [0, math.inf]

    def closure():
        opt.zero_grad(set_to_none=False)
        evals[0] += 1
        loss = prob.loss(theta, solver, options, prob.train)
        if loss is None:  # a failed solve: a huge loss makes the line search back off
            theta.grad = torch.zeros_like(theta)
            return torch.tensor(1e30, dtype=F64)
        loss.backward()
        torch.nan_to_num_(theta.grad, nan=0.0, posinf=0.0, neginf=0.0)
        evals[1] = min(evals[1], float(loss.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(train_rmse=f"{evals[1]:.4g}")
        return loss.detach()

    opt.step(closure)
    if bar is not None:
        bar.close()
    return _grid_from_theta(theta.detach(), 1.0), {
        "optimizer": "lbfgs",
        "iterations": int(opt.state[theta].get("n_iter", 0)), "function_evals": evals[0],
        "max_iterations": int(steps)}


def _fit_grid_adam(prob: _GridProblem, solver, options, theta0, *, steps, lr, batch_size,
                   patience, seed, desc, progress):
    theta = theta0.clone().requires_grad_()
    opt = torch.optim.Adam([theta], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps), eta_min=lr / 20)
    gen = torch.Generator().manual_seed(seed + 1)
    tr_idx = prob.train
    best = prob.rmse(_grid_from_theta(theta0, 1.0), solver, options, prob.check)
    best_theta, bad, it = theta0.clone(), 0, 0
    bar = progress_bar(steps, desc, progress)
    for it in range(1, steps + 1):
        idx = tr_idx
        if batch_size is not None and batch_size < len(tr_idx):
            idx = tr_idx[torch.randperm(len(tr_idx), generator=gen)[:batch_size]]
        opt.zero_grad(set_to_none=True)
        loss = prob.loss(theta, solver, options, idx)
        if loss is not None:
            loss.backward()
            torch.nan_to_num_(theta.grad, nan=0.0, posinf=0.0, neginf=0.0)
            opt.step()
        sched.step()
        if it % 10 == 0 or it == steps:
            v = prob.rmse(_grid_from_theta(theta.detach(), 1.0), solver, options, prob.check)
            if v < best * (1 - 1e-4):
                best, best_theta, bad = v, theta.detach().clone(), 0
            else:
                bad += 1
            if bar is not None:
                bar.set_postfix(val_rmse=f"{best:.4g}")
            if bad >= patience:
                break
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return _grid_from_theta(best_theta, 1.0).detach(), {
        "optimizer": "adam", "iterations": it,
        "max_iterations": int(steps), "lr": lr, "batch_size": batch_size}


def _fit_grid_nelder_mead(prob: _GridProblem, solver, options, theta0, steps, *, desc,
                          progress):
    from scipy.optimize import minimize

    bar = progress_bar(steps, desc, progress)
    best = [math.inf, theta0.clone()]

    def objective(th):
        theta = torch.as_tensor(th, dtype=F64)
        v = prob.rmse(_grid_from_theta(theta, 1.0), solver, options)
        if v < best[0]:
            best[0], best[1] = v, theta.clone()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(rmse=f"{best[0]:.4g}")
        return v

    minimize(objective, theta0.numpy(), method="Nelder-Mead",
             options={"maxfev": int(steps), "xatol": 1e-6, "fatol": 1e-9, "adaptive": True})
    if bar is not None:
        bar.close()
    return _grid_from_theta(best[1], 1.0), {"optimizer": "nelder-mead",
                                            "evaluations": int(steps)}


def optimize_grid(denoiser, nfe: int, solver: str = "unipc", *, noises: torch.Tensor,
                  reference: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """:func:`fit_grid`'s float64 grid for one named ``solver``, usable as
    ``tiltflow.sample(den, noise, solver, nfe=nfe, grid=grid)`` (pass the same ``options`` to
    both). For ``solver="auto"`` use :func:`fit_grid`, whose result also says which solver."""
    if solver == "auto":
        raise ValueError("optimize_grid returns only the grid; with solver='auto' use fit_grid, "
                         "whose FittedGrid also carries the chosen solver and options")
    return fit_grid(denoiser, nfe, solver, noises=noises, reference=reference, **kwargs).grid

