"""Inversion: map data to the noise that a deterministic sampler maps back to it.

Running the probability-flow ODE forward in time (data -> noise) inverts the sampler: DDIM
inversion (Song et al. 2021, "Denoising Diffusion Implicit Models", sec. 4.3 and eq. 13: the
DDIM update read as an Euler step of an ODE can be run from ``x_0`` to ``x_T``; Dhariwal &
Nichol 2021, App. F; Mokady et al. 2023, "Null-text inversion", sec. 3) and, for any other ODE
solver, the same solver run on an *increasing* time grid (Song et al. 2021, "Score-based
generative modeling through SDEs", sec. 4.3: the PF-ODE gives a unique encoding).

Registered ODE solvers are called directly on an increasing grid ``t_eps -> t_end``;
``euler``, ``heun`` and ``ddim`` (``eta = 0``: ``x' = alpha' x_hat + sigma' eps_hat``) need no
change for that, because their step formulas only use differences of grid values (heun's
corrector is skipped only on a step that *ends* at t = 0, which an increasing grid never has, so
it costs ``2 * steps`` evaluations). ``tiltflow.solvers.solve`` rejects increasing grids, so this
module bypasses its grid check (and checks the result is finite instead).

Start time: at t = 0 a data- or noise-predicting model cannot give the velocity (sigma = 0), so
inversion starts at ``t_eps`` (noise level ``sigma/alpha = 1e-3`` by default, see
:func:`~tiltflow.solvers.likelihood.default_t_eps`) from the state ``alpha(t_eps) x``, which
differs from the true ``x_{t_eps}`` of the ODE through ``x`` by O(level^2) (relative to the data
scale): ``x_{t_eps} / alpha = x + O(s^2 grad log p)`` for noise level ``s``.
"""

from __future__ import annotations

import torch

from .likelihood import default_t_eps, time_grid
from .registry import get

__all__ = ["invert", "round_trip", "round_trip_error"]


def _plan(denoiser, solver, nfe, t_end, t_eps, grid, options, x):
    if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError("x must be a float tensor of shape [B, ...] (batch first)")
    info = get(solver)
    if info.stochastic:
        raise ValueError(f"solver {solver!r} is stochastic; inversion needs a deterministic ODE "
                         "solver (e.g. 'ddim', 'euler', 'heun')")
    options = dict(options or {})
    unknown = set(options) - set(info.options())
    if unknown:
        raise ValueError(f"solver {solver!r} has no option(s) {sorted(unknown)}; its options: "
                         f"{info.options()}")
    if float(options.get("eta", 0.0)) != 0.0:
        raise ValueError("DDIM inversion needs eta=0 (the deterministic sampler)")
    schedule = denoiser.schedule
    t_start = default_t_eps(schedule) if t_eps is None else float(t_eps)
    if torch.is_tensor(grid) or isinstance(grid, (list, tuple)):
        g = time_grid(schedule, 1, t_start, float(t_end), grid)
        if nfe is not None and info.nfe(len(g) - 1, False) != nfe:
            raise ValueError(f"the given grid costs {info.nfe(len(g) - 1, False)} evaluations "
                             f"with {solver!r}, not nfe={nfe}")
    else:
        if not isinstance(nfe, int) or isinstance(nfe, bool):
            raise ValueError(f"nfe must be an int, got {nfe!r}")
        steps, rem = divmod(nfe, info.evals_per_step)
        if nfe < 1 or rem or steps < 1:
            raise ValueError(f"solver {solver!r} cannot spend exactly nfe={nfe} evaluations on an "
                             f"inversion grid ({info.evals_per_step} per step, none saved: the grid "
                             f"does not end at t = 0); use a multiple of {info.evals_per_step}")
        g = time_grid(schedule, steps, t_start, float(t_end), grid)
    alpha_start = float(schedule(g[:1]).alpha)
    return info, options, g, alpha_start


def _run(info, denoiser, x_init, g, cond, guidance, options, grad):
    if cond is not None and (not torch.is_tensor(cond) or cond.shape[:1] != x_init.shape[:1]):
        raise ValueError(f"cond must be a tensor with leading dim {x_init.shape[0]} (the batch)")
    with torch.set_grad_enabled(grad):
        out = info.fn(denoiser, x_init, g, cond=cond, guidance=guidance, generator=None,
                      record=None, **options)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"solver {info.name!r} produced non-finite values on the grid "
                         f"{g[0].item():.3g} -> {g[-1].item():.3g}; it may not support this "
                         "direction or endpoint (try 'ddim', 'euler' or 'heun')")
    return out


def invert(
    denoiser,
    x: torch.Tensor,
    *,
    solver: str = "ddim",
    nfe: int | None = 50,
    cond=None,
    guidance=None,
    t_end: float = 1.0,
    t_eps: float | None = None,
    grid="auto",
    options: dict | None = None,
    grad: bool = False,
    return_state: bool = False,
) -> torch.Tensor:
    """Invert data ``x`` ``[B, ...]`` to noise: run the deterministic ``solver`` with exactly
    ``nfe`` network evaluations on an increasing grid (``"auto"``, ``"uniform"`` in t, ``"logsnr"``, or an
    explicit increasing tensor) from ``alpha(t_eps) x`` at ``t_eps`` to ``t_end``.

    Returns the standardised noise ``x_{t_end} / sigma(t_end)``, the argument
    ``tiltflow.sample`` takes (it multiplies by ``sigma(t_start)``), or with ``return_state=True``
    the raw state ``x_{t_end}``.
    """
    info, options, g, a0 = _plan(denoiser, solver, nfe, t_end, t_eps, grid, options, x)
    state = _run(info, denoiser, a0 * x, g, cond, guidance, options, grad)
    if return_state:
        return state
    return state / float(denoiser.schedule(g[-1:]).sigma)


def round_trip(
    denoiser,
    x: torch.Tensor,
    *,
    solver: str = "ddim",
    nfe: int | None = 50,
    cond=None,
    guidance=None,
    t_end: float = 1.0,
    t_eps: float | None = None,
    grid="auto",
    options: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert ``x`` and sample back with the same solver on the reversed grid (same ``nfe``
    each way). Returns ``(noise, x_back)``; ``noise`` as :func:`invert` returns it."""
    info, options, g, a0 = _plan(denoiser, solver, nfe, t_end, t_eps, grid, options, x)
    state = _run(info, denoiser, a0 * x, g, cond, guidance, options, False)
    back = _run(info, denoiser, state, g.flip(0), cond, guidance, options, False)
    return state / float(denoiser.schedule(g[-1:]).sigma), back / a0


def round_trip_error(denoiser, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """Per-example Euclidean error ``||x_back - x||`` ``[B]`` of :func:`round_trip` (same keyword
    arguments). For a solver of order p it shrinks like ``h^p``; for even p the leading local
    errors of the forward and backward passes cancel (``C h^(p+1) + C (-h)^(p+1) = 0``) and it
    shrinks like ``h^(p+1)`` (Hairer, Lubich & Wanner, "Geometric Numerical Integration",
    sec. II.3, adjoint methods)."""
    _, back = round_trip(denoiser, x, **kwargs)
    return (back - x).flatten(1).norm(dim=1)
