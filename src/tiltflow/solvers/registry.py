"""The solver registry and the pieces every solver shares.

A solver is a stateless function with one signature::

    solve(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None, record=None,
          hook=None, **its_own_keyword_options) -> x

``grid`` is a float64 CPU tensor of decreasing times (see :mod:`.grids`); ``x_init`` is the
state at ``grid[0]``. A solver computes its step coefficients from ``grid`` with torch
operations before its loop, so they are differentiable when the grid requires grad (fitting a
grid, :mod:`.trained`) and a step needs no device sync. Each entry declares how many network
evaluations a grid of n steps costs, so ``tiltflow.sample(..., nfe=N)`` can pick the number of
steps that spends exactly N.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..predictions import Prediction

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
    history: bool = False  # reuses model outputs of earlier steps (multistep)
    differentiable: bool = True  # its samples are differentiable in the grid's times

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

    def check_options(self, options: dict | None) -> dict:
        """``options`` as a dict, refusing keywords this solver does not take."""
        options = dict(options or {})
        unknown = set(options) - set(self.options())
        if unknown:
            raise ValueError(f"solver {self.name!r} has no option(s) {sorted(unknown)}; "
                             f"its options: {self.options()}")
        return options

    def options(self) -> list[str]:
        params = inspect.signature(self.fn).parameters
        fixed = {"denoiser", "x_init", "grid", "cond", "guidance", "generator", "record", "hook"}
        return [p for p in params if p not in fixed]


_REGISTRY: dict[str, SolverInfo] = {}


def register(name, *, order, stochastic=False, evals_per_step=1, skips_last_eval=False,
             adaptive=False, history=False, differentiable=True):
    """Decorator adding a solver function to the registry under ``name``."""

    def deco(fn):
        doc = (fn.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = SolverInfo(
            name, fn, order, stochastic, evals_per_step, skips_last_eval, doc[0] if doc else "",
            adaptive, history, differentiable,
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
    """What a solver loop shares: evaluate the (possibly guided) denoiser, count the
    evaluations, and end each step.

    ``predict(x, t)`` takes a :class:`~tiltflow.schedules.GridPoint` (the solver makes them for
    its grid before the loop, :meth:`Schedule.points`) or a ``[B]`` time tensor.
    ``predict.end_step(...)`` appends the step's :class:`StepRecord` to ``record`` and hands it
    to ``hook``, which may return a tensor to continue from instead of ``x_next`` (a
    projection, a resampled set of particles, ...); it returns the state to continue from.
    Solvers that reuse earlier model outputs (``SolverInfo.history``) keep them as they were,
    so a hook that reorders the batch belongs with single-step solvers.
    """

    def __init__(self, denoiser, cond=None, guidance=None, record=None, hook=None):
        from .guidance import as_guidance

        self.denoiser, self.cond, self.guidance = denoiser, cond, as_guidance(guidance)
        self.record, self.hook = record, hook
        self.calls = 0

    def __call__(self, x: torch.Tensor, t) -> Prediction:
        self.calls += 1
        if self.guidance is None:
            return self.denoiser(x, t, self.cond)
        return self.guidance(self.denoiser, x, t, self.cond)

    def end_step(self, t, t_next, x, x_next, pred: Prediction, mean=None, std=None):
        """Record step ``t -> t_next`` (``mean``/``std``: its Gaussian transition, for
        stochastic steps with noise) and run the hook; returns the state to continue from."""
        if self.record is None and self.hook is None:
            return x_next
        log_prob = None
        if std is not None:
            std = x.new_empty(()).fill_(std)  # a fill, not a host-to-device copy
            log_prob = gaussian_log_prob(x_next, mean, std)
        step = StepRecord(float(t), float(t_next), x, x_next, pred.data, mean, std, log_prob)
        if self.record is not None:
            self.record.append(step)
        if self.hook is None:
            return x_next
        out = self.hook(step)
        if out is None:
            return x_next
        if not torch.is_tensor(out) or out.shape != x_next.shape:
            raise ValueError(f"a step hook must return None or a tensor of shape "
                             f"{tuple(x_next.shape)}, got {getattr(out, 'shape', type(out))}")
        return out


def plan_numbers(v: torch.Tensor) -> list:
    """A solver plan's per-step values: python floats, or 0-d tensors when ``v`` requires grad
    (a grid being fitted). The same formulas run on both; on floats a plan costs a few
    microseconds a step instead of tens (a 0-d tensor operation costs ~2 us)."""
    return list(v.unbind()) if v.requires_grad else v.tolist()


def expm1(v):
    """``exp(v) - 1`` of a python float or a tensor (see :func:`plan_numbers`)."""
    return torch.expm1(v) if torch.is_tensor(v) else math.expm1(v)


def linear_combination(weights, tensors) -> torch.Tensor:
    """``sum_k weights[k] * tensors[k]`` over the shorter of the two (a multistep update's
    history term); 0.0 when every weight is a python-float zero."""
    # (a python-float weight 0, as in Runge-Kutta tableaux, is left out)
    terms = [w * v for w, v in zip(weights, tensors)  # noqa: B905 - history may be longer
             if not (isinstance(w, float) and w == 0.0)]
    return sum(terms[1:], terms[0]) if terms else 0.0
