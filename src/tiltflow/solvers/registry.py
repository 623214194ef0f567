"""The solver registry and the pieces every solver shares.

A solver is a stateless function with one signature::

    solve(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None, record=None,
          **its_own_keyword_options) -> x

``grid`` is a float64 tensor of decreasing times (see :mod:`.grids`); ``x_init`` is the state
at ``grid[0]``. Each entry declares how many network evaluations a grid of n steps costs, so
``tiltflow.sample(..., nfe=N)`` can pick the number of steps that spends exactly N.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..predictions import Prediction, linear_maps

__all__ = ["SolverInfo", "register", "get", "available", "StepRecord", "Predictor"]


@dataclass(frozen=True)
class SolverInfo:
    name: str
    fn: Callable
    order: int  # convergence order of the ODE solvers; 1 for weak order of SDE solvers
    stochastic: bool
    # network evaluations per step (before savings below); a callable takes the solver's
    # options dict, for solvers whose cost depends on them (e.g. corrector steps)
    evals_per_step: int | Callable[[dict], int]
    skips_last_eval: bool = False  # the final step to sigma = 0 needs one evaluation less
    description: str = ""
    adaptive: bool = False  # step size chosen by error control: no fixed evaluation count

    def _no_fixed_nfe(self):
        raise ValueError(
            f"solver {self.name!r} is adaptive and spends as many evaluations as its tolerance "
            "needs: call it with steps=1 and options={'rtol': ..., 'atol': ..., 'max_nfe': N}"
        )

    def evals(self, options: dict | None = None) -> int:
        e = self.evals_per_step
        return int(e(options or {})) if callable(e) else e

    def nfe(self, steps: int, ends_clean: bool = True, options: dict | None = None) -> int:
        if self.adaptive:
            self._no_fixed_nfe()
        return self.evals(options) * steps - (1 if self.skips_last_eval and ends_clean else 0)

    def steps_for_nfe(self, nfe: int, options: dict | None = None) -> int:
        """Steps that spend exactly ``nfe`` evaluations on a grid ending at t = 0."""
        if self.adaptive:
            self._no_fixed_nfe()
        extra = 1 if self.skips_last_eval else 0
        per_step = self.evals(options)
        steps, rem = divmod(nfe + extra, per_step)
        if nfe < 1 or rem or steps < 1:
            valid = [self.nfe(s, options=options) for s in range(1, 6)]
            raise ValueError(
                f"solver {self.name!r} cannot spend exactly nfe={nfe} evaluations "
                f"({per_step} per step{', one less on the last' if extra else ''}); "
                f"valid values start {valid}"
            )
        return steps

    def options(self) -> list[str]:
        params = inspect.signature(self.fn).parameters
        fixed = {"denoiser", "x_init", "grid", "cond", "guidance", "generator", "record"}
        return [p for p in params if p not in fixed]


_REGISTRY: dict[str, SolverInfo] = {}


def register(name, *, order, stochastic=False, evals_per_step=1, skips_last_eval=False,
             adaptive=False):
    """Decorator adding a solver function to the registry under ``name``."""

    def deco(fn):
        doc = (fn.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = SolverInfo(
            name, fn, order, stochastic, evals_per_step, skips_last_eval, doc[0] if doc else "",
            adaptive,
        )
        return fn

    return deco


#: Other spellings users bring from papers and other libraries.
ALIASES = {"dpm++2m": "dpmpp_2m", "dpm++3m": "dpmpp_3m", "dpm++2s": "dpmpp_2s",
           "dpm++2m_sde": "dpmpp_2m_sde", "dpm-solver-v3": "dpm_solver_v3", "dopri": "dopri5",
           "rk45": "dopri5"}


def get(name: str) -> SolverInfo:
    name = ALIASES.get(name, name)
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown solver {name!r}{hint}; available: {available()}")
    return _REGISTRY[name]


def available() -> list[str]:
    return sorted(_REGISTRY)


@dataclass
class StepRecord:
    """One solver step, appended to ``record`` when a list is passed. For stochastic steps
    ``mean``/``std`` describe the Gaussian transition ``x_next ~ N(mean, std^2 I)`` and
    ``log_prob`` is its log-density at ``x_next`` (summed over dimensions) — what policy-
    gradient fine-tuning needs."""

    t: float
    t_next: float
    x: torch.Tensor
    x_next: torch.Tensor
    data: torch.Tensor
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    log_prob: torch.Tensor | None = None


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, diag(std^2)) summed over all but the batch dimension; ``std`` broadcasts
    against ``x``."""
    std = std.expand_as(x)
    z = (x - mean) / std
    lp = -0.5 * z**2 - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).sum(1)


class Predictor:
    """Evaluates the (possibly guided) denoiser at ``(x, t)`` and counts evaluations.

    ``t`` is a python float (a grid time) or a ``[B]``/0-d tensor. For float times the schedule
    coefficients and the ``[B]`` time tensor are made once per distinct time and reused, so a
    step costs the network call plus a few tensor operations; pass ``times=grid`` to compute
    all grid coefficients in one float64 call before the loop, and ``reads=("data", ...)``
    (the prediction kinds the solver reads) to also precompute, in one vectorized pass, the
    scalar maps from the network's output kind to those.
    """

    def __init__(self, denoiser, cond=None, guidance=None, times=None, reads=()):
        from .guidance import as_guidance

        self.denoiser = denoiser
        self.cond = cond
        self.guidance = as_guidance(guidance)
        self.calls = 0
        self._cache: dict[float, tuple] = {}
        if times is not None:
            times = torch.as_tensor(times, dtype=torch.float64).flatten().tolist()
            coeffs = denoiser.schedule.scalars(times)
            self._cache.update(zip(times, ((None, c) for c in coeffs), strict=True))
            kind = getattr(denoiser, "prediction", None)
            if reads and kind is not None and self.guidance is None:
                linear_maps(kind, reads, coeffs)

    def _time(self, t: float, x: torch.Tensor):
        entry = self._cache.get(t)
        if entry is None or entry[0] is None or entry[0].shape[0] != x.shape[0] \
                or entry[0].device != x.device:
            if entry is not None and entry[0] is None and x.is_cpu:
                self._cpu_times(x)
                return self._cache[t]
            coeffs = entry[1] if entry is not None else self.denoiser.schedule.scalars([t])[0]
            entry = (torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device), coeffs)
            self._cache[t] = entry
        return entry

    def _cpu_times(self, x: torch.Tensor):
        """The ``[B]`` time tensors of all precomputed times not made yet, as rows of one CPU
        tensor: one allocation instead of one per time (on an accelerator this would be a
        host-to-device copy, so there each time gets its own fill)."""
        times, coeffs = zip(*((v, c) for v, (t_vec, c) in self._cache.items() if t_vec is None),
                            strict=True)
        rows = torch.tensor(times, dtype=x.dtype)[:, None].expand(-1, x.shape[0]).contiguous()
        self._cache.update(zip(times, zip(rows.unbind(0), coeffs, strict=True), strict=True))

    def __call__(self, x: torch.Tensor, t) -> Prediction:
        self.calls += 1
        if isinstance(t, float):
            t_vec, coeffs = self._time(t, x)
            if self.guidance is None:
                return self.denoiser(x, t_vec, self.cond, coeffs=coeffs)
            return self.guidance(self.denoiser, x, t_vec, self.cond, coeffs=coeffs, time=t)
        t = t.expand(x.shape[0])
        if self.guidance is None:
            return self.denoiser(x, t, self.cond)
        return self.guidance(self.denoiser, x, t, self.cond, coeffs=None, time=None)
