"""Samplers: a registry of stateless solvers and the one entry point :func:`sample`.

>>> x = tiltflow.sample(den, torch.randn(16, 2), solver="heun", nfe=9)
>>> tiltflow.solvers.available()
"""

from __future__ import annotations

import torch

from . import ddim, dpm, dpm_v3, grids, multistep, ode, reference, rk, stochastic, trained  # noqa: F401  (registers the solvers)
from .guidance import ClassifierFree, ClassifierGuidance, TwoModel
from .inversion import invert, round_trip, round_trip_error
from .likelihood import bits_per_dim, log_likelihood
from .parallel import parallel_sample
from .reference import reference_solve
from .registry import Predictor, StepRecord, available, get, register

__all__ = ["sample", "solve", "available", "get", "register", "StepRecord", "Predictor", "ClassifierFree",
           "ClassifierGuidance", "TwoModel", "parallel_sample",
           "log_likelihood", "bits_per_dim", "invert", "round_trip", "round_trip_error",
           "grids", "reference_solve", "trained"]


def _check_grid(grid) -> torch.Tensor:
    """The grid as a float64 CPU tensor. Its end points are held fixed (detached): a fitted
    grid moves only its interior times, and the infinities that schedules have at the ends
    (log-SNR, VP's sigma') never enter a gradient."""
    grid = torch.as_tensor(grid, dtype=torch.float64).flatten().cpu()
    if grid.numel() < 2:
        raise ValueError("a time grid needs at least 2 points (one step)")
    values = grid.detach()
    if not bool(((values >= 0) & (values <= 1)).all()) or not bool((values[1:] < values[:-1]).all()):
        raise ValueError("a time grid must be strictly decreasing within [0, 1]")
    if grid.requires_grad:
        grid = torch.cat([values[:1], grid[1:-1], values[-1:]])
    return grid


def _check_cond(cond, batch: int):
    if cond is not None and (not torch.is_tensor(cond) or cond.shape[:1] != (batch,)):
        shape = tuple(cond.shape) if torch.is_tensor(cond) else type(cond).__name__
        raise ValueError(f"cond must be a tensor with leading dim {batch} (the batch), got {shape}")


def solve(denoiser, x_init, grid, solver: str = "euler", *, cond=None, guidance=None,
          generator=None, record=None, hook=None, options=None):
    """Run a registered solver on an explicit grid from the state ``x_init`` at ``grid[0]``.
    A grid that requires grad gives samples differentiable in its interior times."""
    info = get(solver)
    grid = _check_grid(grid)
    _check_cond(cond, x_init.shape[0])
    return info.fn(denoiser, x_init, grid, cond=cond, guidance=guidance, generator=generator,
                   record=record, hook=hook, **info.check_options(options))


def sample(
    denoiser,
    noise: torch.Tensor,
    solver: str = "euler",
    nfe: int | None = None,
    *,
    steps: int | None = None,
    grid: str | torch.Tensor = "uniform",
    grid_options: dict | None = None,
    cond=None,
    guidance=None,
    generator: torch.Generator | None = None,
    record: list | None = None,
    hook=None,
    options: dict | None = None,
    grad: bool = False,
) -> torch.Tensor:
    """Draw samples: integrate from standard-normal ``noise`` at t = grid[0] down to t = 0.

    Give exactly one of ``nfe`` (the exact number of network evaluations; classifier-free
    guidance batches its two branches into one call) or ``steps``. ``grid`` is a name from
    :func:`grids.available` or an explicit decreasing tensor of times. ``guidance`` is a CFG
    scale ``w`` (``eps_c + w (eps_c - eps_u)``) or a guidance object. Solver-specific settings
    go in ``options`` (e.g. ``{"eta": 0.5}`` for ddim). ``record`` (a list) receives one
    :class:`StepRecord` per step; ``hook(step_record)`` runs after each step and may return a
    tensor to continue from instead (projection, resampling: see :class:`Predictor`). Runs
    under ``torch.no_grad()`` unless ``grad=True``.
    """
    if not torch.is_tensor(noise) or not noise.is_floating_point() or noise.dim() < 2:
        raise ValueError("noise must be a float tensor of shape [B, ...] (batch first)")
    info = get(solver)
    if (nfe is None) == (steps is None):
        raise ValueError("give exactly one of nfe= or steps=")
    if isinstance(grid, str):
        n = info.steps_for_nfe(int(nfe), options) if nfe is not None else int(steps)
        t_grid = grids.get_grid(grid, n, denoiser.schedule, **(grid_options or {}))
    else:
        t_grid = _check_grid(grid)
        if steps is not None and len(t_grid) - 1 != int(steps):
            raise ValueError(f"steps={steps} but the given grid has {len(t_grid) - 1} steps; "
                             "give one of them")
        cost = info.nfe(len(t_grid) - 1, bool(t_grid[-1] == 0), options) if nfe is not None else None
        if nfe is not None and cost != nfe:
            raise ValueError(f"the given grid costs {cost} evaluations with {solver!r}, not nfe={nfe}")
    sigma_start = float(denoiser.schedule(t_grid[:1].detach()).sigma)
    with torch.set_grad_enabled(grad):
        return solve(denoiser, sigma_start * noise, t_grid, solver, cond=cond, guidance=guidance,
                     generator=generator, record=record, hook=hook, options=options)
