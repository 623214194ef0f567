"""Trained solvers: parameters fitted for ONE model and ONE NFE by matching a reference solution.

Three kinds, all fitted on a few hundred noises against a tight reference solution of the same
probability-flow ODE (:func:`reference_solve`), by default on the **plain endpoint RMSE**
``sqrt(mean_b ||x_solver(noise_b) - x_ref(noise_b)||^2)``:

- :func:`fit_grid` / :func:`optimize_grid` -- only the time grid of an existing registered
  solver (with its options) is optimised (monotone parameterisation: softmax of the
  increments), by L-BFGS (or Adam) through a differentiable twin of the solver
  (:func:`differentiable_solve`: ddim, deis, dpmpp_2m, dpmpp_3m, euler, heun, ipndm, midpoint,
  unipc, unipc_p), judged on held-out validation noises; ``solver="auto"`` (default) fits the
  bases of :data:`AUTO_GRID_SOLVERS` and keeps the best; or derivative-free
  (``method="nelder_mead"``) for any deterministic registered solver.
- :class:`BespokeSolver` -- Shaul et al. 2023, "Bespoke Solvers for Generative Flow Models"
  (ICLR 2024): a scale-time transformation of the base RK1 (Euler) / RK2 (midpoint) solver.
- :class:`BNSSolver` -- Shaul et al. 2024, "Bespoke Non-Stationary Solvers for Fast Sampling of
  Diffusion and Flow Models" (ICML 2024): every step is a learned linear combination of the start
  state and all previous model outputs.

Loss: BNS (2024) trains on the endpoint error itself, and so do the grids and BNS here
(backpropagation through the whole n-step solve, which at these NFEs is cheap). Bespoke (2023)
trains on an upper bound of the global error built from local truncation errors along the
ground-truth path; :meth:`BespokeSolver.fit` offers both: ``loss="rmse"`` (the endpoint RMSE,
the default: it gives the lower held-out error on our test beds, benchmarks/results/bespoke.md)
and ``loss="bound"`` (the paper's RMSE-bound, :meth:`BespokeSolver.rmse_bound`, along a
:class:`GroundTruthPath` computed once: per-step, parallel over the steps, no backpropagation
through a solve).

A fitted solver is used as a solver in two ways (documented choice, both thin):

- ``fitted.as_solver()`` returns a function with the one solver signature
  ``fn(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None, record=None)``;
- after ``import tiltflow.solvers.bespoke`` the registry has an entry ``"bespoke"`` taking
  ``options={"params": fitted_or_path}``, so ``tiltflow.sample(den, noise, "bespoke", nfe=N,
  options={"params": "fit.safetensors"})`` works. For this entry one "step" is one network
  evaluation; the grid ``sample`` builds only fixes the count (``len(grid) - 1`` must equal the
  fitted NFE) and its end points (start 1, end 0): the interior times are the fitted ones.

Files (``save``/``load``): one ``.safetensors`` file holding the float64 parameters; its header
metadata carries JSON with the kind, NFE, base solver, schedule config, a description of the model
it was fitted on and fit statistics. Written atomically (temp file + fsync + rename); ``load``
validates everything and raises :class:`~tiltflow.errors.UserError` with a one-line fix.
"""

from __future__ import annotations

import abc
import json
import math
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..denoiser import Denoiser
from ..errors import UserError
from ..fileio import atomic_write_bytes
from ..schedules import Schedule, get_schedule
from .registry import Predictor, StepRecord, register
from .registry import get as get_solver

__all__ = [
    "reference_solve",
    "rk4_reference",
    "endpoint_rmse",
    "optimize_grid",
    "fit_grid",
    "FittedGrid",
    "differentiable_solve",
    "GRID_SOLVERS",
    "AUTO_GRID_SOLVERS",
    "BespokeSolver",
    "BoundTerms",
    "GroundTruthPath",
    "ground_truth_path",
    "LOSSES",
    "BNSSolver",
    "load",
    "linear_plan",
]

FORMAT_VERSION = 1
_F64 = torch.float64
_KINDS = ("bespoke", "bns", "grid")


# -- reference solution --------------------------------------------------------------------------

def _rf_coords(schedule: Schedule, t: torch.Tensor):
    """Rectified-flow time ``rho = sigma / (alpha + sigma)`` and scale ``alpha + sigma`` at t."""
    c = schedule(t.to(_F64))
    return c.sigma / (c.alpha + c.sigma), c.alpha + c.sigma


def _t_from_rho(schedule: Schedule, rho: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        lam = 2 * (torch.log1p(-rho) - torch.log(rho))
        return schedule.t_from_logsnr(lam).clamp(0.0, 1.0)


def reference_solve(denoiser, x_init: torch.Tensor, *, cond=None) -> torch.Tensor:
    """The reference endpoints (t = 1 to 0) that fitting matches: ``tiltflow.solvers.rk.
    reference_solve`` (adaptive Dormand-Prince at rtol = atol = 1e-10, float64) when that module
    is present, else :func:`rk4_reference`. The two agree to ~5e-9 on the mixture test beds."""
    try:
        from .rk import reference_solve as adaptive
    except ImportError:  # pragma: no cover - rk.py absent
        return rk4_reference(denoiser, x_init, cond=cond)
    return adaptive(denoiser, x_init, 1.0, 0.0, cond=cond).to(x_init.dtype)


@torch.no_grad()
def rk4_reference(denoiser, x_init: torch.Tensor, t_start: float = 1.0, t_end: float = 0.0, *,
                  steps: int = 256, cond=None) -> torch.Tensor:
    """Tight fixed-step reference: classical RK4 (Kutta 1901) on the probability-flow ODE in
    rectified-flow coordinates ``z = x_t / (alpha + sigma)``, ``rho = sigma / (alpha + sigma)``,
    where ``dz/drho = eps_hat - x_hat`` is smooth on every schedule (the same ODE: a scale-time
    change, Shaul et al. 2023, sec. 2), with ``steps`` uniform steps in rho, in float64.

    Where t = ``t_end`` is clean (``sigma = 0``) ``eps_hat`` is 0/0, so RK4 stops at
    ``rho = 1e-7`` and the last sliver is one DDIM step (``z = x_hat``), whose error is
    O(1e-14). The result's own error is checked in the tests by halving ``steps``.
    """
    sched = denoiser.schedule
    ends = torch.tensor([t_start, t_end], dtype=_F64)
    rho_ends, scale_ends = _rf_coords(sched, ends)
    rho0, rho1 = float(rho_ends[0]), float(rho_ends[1])
    clean_end = float(sched(ends[1:]).sigma) == 0.0
    rho_stop = max(rho1, 1e-7) if clean_end else rho1
    h, stages = _rho_stages(sched, t_start, rho0, rho_stop, steps)
    vel = _rf_velocity(denoiser, stages, x_init.shape[0], cond)
    z = _rk4_in_rho(vel, x_init.to(_F64) / float(scale_ends[0]), h, steps)
    if clean_end:
        ts = stages[0]
        x_t = z * float(_rf_coords(sched, torch.tensor([ts[-1]], dtype=_F64))[1])
        z = denoiser(x_t, torch.full((z.shape[0],), ts[-1], dtype=_F64), cond).data.to(_F64)
    return (z * float(scale_ends[1])).to(x_init.dtype)


def _rho_stages(sched, t_start: float, rho0: float, rho_end: float, steps: int,
                min_rho: float = 0.0):
    """``h`` and the RK4 stage abscissae (start, midpoint, end of each of ``steps`` uniform
    steps in rho from ``rho0`` to ``rho_end``, none below ``min_rho``) as consistent python-float
    lists ``(ts, rhos, scales)`` after the inversion rho -> t."""
    h = (rho_end - rho0) / steps
    stage_rho = torch.tensor([rho0 + h * (i + f) for i in range(steps) for f in (0.0, 0.5, 1.0)],
                             dtype=_F64)
    if min_rho:
        stage_rho = stage_rho.clamp_min(min_rho)
    stage_t = _t_from_rho(sched, stage_rho.clamp(1e-300, 1.0))
    stage_t[0] = t_start
    stage_rho, stage_scale = _rf_coords(sched, stage_t)  # consistent pairs after the inversion
    return h, (stage_t.tolist(), stage_rho.tolist(), stage_scale.tolist())


def _rf_velocity(denoiser, stages, batch: int, cond):
    """``vel(z, k)``: ``dz/drho = eps_hat - x_hat = (z - x_hat) / rho`` at stage ``k`` (as
    ``z = (1 - rho) x_hat + rho eps_hat``), in float64."""
    ts, rhos, scales = stages

    def vel(z, k):
        x_t = z * scales[k]
        x_hat = denoiser(x_t, torch.full((batch,), ts[k], dtype=_F64), cond).data.to(_F64)
        return (z - x_hat) / rhos[k]

    return vel


def _rk4_in_rho(vel, z, h: float, steps: int, every: int = 0, keep: list | None = None):
    """Classical RK4 (Kutta 1901) on ``dz/drho = vel`` over the stages of :func:`_rho_stages`;
    with ``keep``, appends ``(z, dz/drho)`` at the start of every ``every``-th step."""
    for i in range(steps):
        k = 3 * i
        k1 = vel(z, k)
        if keep is not None and i % every == 0:
            keep.append((z, k1))
        k2 = vel(z + 0.5 * h * k1, k + 1)
        k3 = vel(z + 0.5 * h * k2, k + 1)
        k4 = vel(z + h * k3, k + 2)
        z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return z


def endpoint_rmse(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``sqrt(mean_b ||x_b - ref_b||^2)``: the RMS endpoint distance of BENCHMARKS.md."""
    return (x - ref).flatten(1).pow(2).sum(1).mean().sqrt()


def _start(denoiser, noise: torch.Tensor, t_start: float = 1.0) -> torch.Tensor:
    sigma = float(denoiser.schedule(torch.tensor([t_start], dtype=_F64)).sigma)
    return sigma * noise


def _targets(denoiser, noises, reference, cond):
    if not torch.is_tensor(noises) or not noises.is_floating_point() or noises.dim() < 2:
        raise ValueError("noises must be a float tensor [B, ...] of standard-normal draws")
    x_init = _start(denoiser, noises)
    if reference is None:
        reference = reference_solve(denoiser, x_init, cond=cond)
    if reference.shape != noises.shape:
        raise ValueError(f"reference shape {tuple(reference.shape)} != noises "
                         f"{tuple(noises.shape)}; pass the reference endpoints of these noises")
    return x_init, reference


def _take(cond, idx):
    return None if cond is None else cond[idx]


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


# -- the common base: description, schedule check, save/load ------------------------------------

def _same_schedule(a: dict, b: dict) -> bool:
    if a.get("name") != b.get("name") or set(a) != set(b):
        return False
    for k in a:
        va, vb = a[k], b[k]
        if isinstance(va, (int, float)) and isinstance(vb, (int, float)):
            if not math.isclose(va, vb, rel_tol=1e-9, abs_tol=1e-12):
                return False
        elif isinstance(va, list) and isinstance(vb, list):
            if len(va) != len(vb) or not torch.allclose(
                    torch.tensor(va, dtype=_F64), torch.tensor(vb, dtype=_F64), rtol=1e-9):
                return False
        elif va != vb:
            return False
    return True


class _Fitted(abc.ABC):
    """Shared machinery of fitted solvers. Subclasses set ``kind`` and implement
    ``_tensors()``, ``_from_tensors()`` and ``solve()``."""

    kind = ""

    def __init__(self, *, nfe: int, base: str, schedule, model: dict | None = None,
                 fit: dict | None = None, t_start: float = 1.0):
        self.nfe = int(nfe)
        self.base = str(base)
        self.schedule = get_schedule(schedule)
        self.model = dict(model or {})
        self.fit_info = dict(fit or {})
        self.t_start = float(t_start)

    # description -------------------------------------------------------------------------------
    def config(self) -> dict:
        return {"format": FORMAT_VERSION, "kind": self.kind, "nfe": self.nfe, "base": self.base,
                "t_start": self.t_start, "schedule": self.schedule.config(),
                "model": self.model, "fit": self.fit_info}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(nfe={self.nfe}, base={self.base!r}, "
                f"schedule={self.schedule!r})")

    def check_denoiser(self, denoiser) -> None:
        sched = getattr(denoiser, "schedule", None)
        if sched is None or not _same_schedule(sched.config(), self.schedule.config()):
            got = getattr(sched, "name", type(denoiser).__name__)
            raise ValueError(f"this {self.kind} solver was fitted under schedule "
                             f"{self.schedule.name!r} but the denoiser uses {got!r}; refit it for "
                             "this model (tiltflow fit-solver) or wrap the denoiser with "
                             ".with_schedule(...)")

    # use as a solver ---------------------------------------------------------------------------
    def _check_grid(self, grid) -> None:
        if grid is None:
            return
        grid = torch.as_tensor(grid, dtype=_F64).flatten()
        if len(grid) not in (2, self.nfe + 1):
            raise ValueError(f"this fitted solver spends exactly nfe={self.nfe} evaluations; "
                             f"got a grid of {len(grid) - 1} steps (pass nfe={self.nfe})")
        if abs(float(grid[0]) - self.t_start) > 1e-12 or float(grid[-1]) != 0.0:
            raise ValueError(f"a fitted solver integrates from t={self.t_start} to t=0; got a "
                             f"grid from {float(grid[0])} to {float(grid[-1])}")

    def as_solver(self):
        """A function with the one solver signature; ``grid`` must run from ``t_start`` to 0
        with 1 or ``nfe`` steps (its interior times are ignored: the fitted ones are used)."""

        def fitted_solver(denoiser, x_init, grid=None, *, cond=None, guidance=None,
                          generator=None, record=None):
            self._check_grid(grid)
            with torch.no_grad():
                return self.solve(denoiser, x_init, cond=cond, guidance=guidance, record=record)

        fitted_solver.__doc__ = f"fitted {self.kind} solver, nfe={self.nfe}, base={self.base}"
        return fitted_solver

    def sample(self, denoiser, noise: torch.Tensor, *, cond=None, guidance=None, record=None):
        """Integrate standard-normal ``noise`` (scaled by sigma(t_start)) to t = 0."""
        with torch.no_grad():
            return self.solve(denoiser, _start(denoiser, noise, self.t_start), cond=cond,
                              guidance=guidance, record=record)

    @abc.abstractmethod
    def solve(self, denoiser, x_init, *, cond=None, guidance=None, record=None):
        """Integrate ``x_init`` from ``t_start`` to t = 0 with the fitted parameters."""

    # files -------------------------------------------------------------------------------------
    @abc.abstractmethod
    def _tensors(self) -> dict[str, torch.Tensor]:
        """The fitted parameters as named tensors, as stored by :meth:`save`."""

    def save(self, path) -> Path:
        """Write one ``.safetensors`` file atomically (temp file, fsync, rename)."""
        tensors = {k: v.detach().to("cpu", _F64).contiguous() for k, v in self._tensors().items()}
        meta = {"tiltflow": "fitted_solver",
                "config": json.dumps(self.config(), allow_nan=False)}
        return atomic_write_bytes(path, st_save(tensors, metadata=meta))

    @classmethod
    def load(cls, path):
        """Load and validate a fitted solver; a kind mismatch or a damaged file raises
        :class:`UserError`."""
        obj = load(path)
        if cls is not _Fitted and not isinstance(obj, cls):
            raise UserError(f"{str(path)!r} holds a {obj.kind!r} solver, not {cls.kind!r}; "
                            f"load it with tiltflow.solvers.bespoke.load")
        return obj


def _bad(path, what: str):
    return UserError(f"fitted-solver file {str(path)!r} is invalid ({what}); refit it with "
                     "`tiltflow fit-solver`")


def load(path) -> _Fitted:
    """Load any fitted solver (bespoke, bns or grid) written by ``save``, validating it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"fitted-solver file {str(path)!r} does not exist; write one with "
                        "`tiltflow fit-solver RUN --nfe N --out FILE`")
    data = path.read_bytes()
    try:
        tensors = st_load(data)
        from safetensors import safe_open  # header metadata

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise _bad(path, f"not a safetensors file: {str(e).splitlines()[0][:80]}") from None
    if meta.get("tiltflow") != "fitted_solver":
        raise _bad(path, "not a tiltflow fitted-solver file")
    try:
        cfg = json.loads(meta["config"])
        if not isinstance(cfg, dict):
            raise ValueError("config is not an object")
    except (KeyError, ValueError) as e:
        raise _bad(path, f"unreadable config: {e}") from None
    if cfg.get("format") != FORMAT_VERSION:
        raise _bad(path, f"format {cfg.get('format')!r}, this tiltflow reads {FORMAT_VERSION}")
    kind = cfg.get("kind")
    classes = {"bespoke": BespokeSolver, "bns": BNSSolver, "grid": FittedGrid}
    if kind not in classes:
        raise _bad(path, f"unknown kind {kind!r}; expected one of {list(_KINDS)}")
    nfe = cfg.get("nfe")
    if not isinstance(nfe, int) or nfe < 1:
        raise _bad(path, f"nfe must be a positive integer, got {nfe!r}")
    try:
        schedule = get_schedule(cfg.get("schedule"))
    except (ValueError, TypeError) as e:
        raise _bad(path, f"schedule: {e}") from None
    for k, v in tensors.items():
        if v.dtype != _F64 or not bool(torch.isfinite(v).all()):
            raise _bad(path, f"tensor {k!r} must be finite float64")
    common = dict(nfe=nfe, base=str(cfg.get("base")), schedule=schedule, model=cfg.get("model"),
                  fit=cfg.get("fit"), t_start=float(cfg.get("t_start", 1.0)))
    try:
        return classes[kind]._from_tensors(tensors, **common)
    except (KeyError, ValueError) as e:
        raise _bad(path, str(e)) from None


# -- differentiable twins of registered solvers (gradient-based grid fitting) ------------------
#
# The registered solvers turn the grid into python-float coefficients before their loop (fast,
# but not differentiable in the grid). A twin below runs the SAME update rules with every
# coefficient a float64 tensor function of the grid times, evaluating the schedule and the model
# at time tensors that carry gradients, so the endpoint RMSE can be differentiated with respect
# to the grid. Each twin reproduces its registered solver (any options) to float64 rounding
# (tests/test_grid_fit.py checks 1e-10). Branches that depend on the grid (singular steps at an
# infinite log-SNR, warm-up orders) are decided from the current float values, as the
# registered solver does.

class _Times:
    """Schedule coefficients at each grid point as 0-d float64 tensors. The fixed end points
    (``grid[0]``, ``grid[-1]``) are evaluated on detached values, so their infinities (log-SNR at
    alpha = 0 or sigma = 0, VP's ``sigma'`` at t = 0) never enter a gradient."""

    def __init__(self, schedule, grid: torch.Tensor):
        self.schedule = schedule
        self.grid = grid
        self.n = len(grid) - 1
        self.f = grid.detach().tolist()
        ends = schedule(grid.detach()[[0, self.n]])
        inner = schedule(grid[1:-1]) if self.n > 1 else None
        cols = []
        for name in ("alpha", "sigma", "d_alpha", "d_sigma"):
            e = getattr(ends, name).to(_F64)
            mid = [getattr(inner, name).to(_F64)] if inner is not None else []
            cols.append(list(torch.cat([e[:1], *mid, e[1:]]).unbind()))
        self.alpha, self.sigma, self.d_alpha, self.d_sigma = cols
        c = schedule(grid.detach())
        self.alpha_f, self.sigma_f = c.alpha.tolist(), c.sigma.tolist()

    def t(self, i: int) -> torch.Tensor:
        return self.grid[i] if 0 < i < self.n else self.grid[i].detach()

    def lam(self, i: int) -> torch.Tensor:
        """Half log-SNR ``log(alpha / sigma)`` at grid point ``i`` (finite points only)."""
        return torch.log(self.alpha[i]) - torch.log(self.sigma[i])


def _predict_at(denoiser, x, t, cond):
    """The model's prediction at a time tensor ``t`` (0-d, may require grad): the schedule's
    coefficients are computed from ``t`` inside the denoiser, so they are differentiable."""
    return denoiser(x, t.reshape(1).expand(x.shape[0]).to(x.dtype), cond)


def _twin_euler(den, x, tm: _Times, cond):
    for i in range(tm.n):
        v = _predict_at(den, x, tm.t(i), cond).velocity
        x = x + (tm.t(i + 1) - tm.t(i)) * v
    return x


def _twin_ddim(den, x, tm: _Times, cond):
    for i in range(tm.n):
        pred = _predict_at(den, x, tm.t(i), cond)
        x = tm.alpha[i + 1] * pred.data + tm.sigma[i + 1] * pred.noise
    return x


def _twin_heun(den, x, tm: _Times, cond):
    for i in range(tm.n):
        dt = tm.t(i + 1) - tm.t(i)
        v = _predict_at(den, x, tm.t(i), cond).velocity
        x_next = x + dt * v
        if tm.f[i + 1] > 0:
            x_next = x + 0.5 * dt * (v + _predict_at(den, x_next, tm.t(i + 1), cond).velocity)
        x = x_next
    return x


def _twin_midpoint(den, x, tm: _Times, cond):
    for i in range(tm.n):
        h = tm.t(i + 1) - tm.t(i)
        k1 = _predict_at(den, x, tm.t(i), cond).velocity
        k2 = _predict_at(den, x + 0.5 * h * k1, (tm.t(i) + tm.t(i + 1)) / 2, cond).velocity
        x = x + h * k2
    return x


def _twin_dpmpp(den, x, tm: _Times, cond, *, order: int = 2, lower_order_final: bool = True):
    """DPM-Solver++(2M) / (3M), as :func:`tiltflow.solvers.dpm.dpmpp_2m` / ``dpmpp_3m``
    (Lu et al. 2022b): ``x' = (sigma_t/sigma_s) x - alpha_t (e^{-h} - 1) x_hat_s`` plus the
    divided-difference terms of ``x_hat`` in lambda, in the registered solver's algebra."""
    from .dpm import LAMBDA_LIMIT, _singular

    lam_f = (0.5 * tm.schedule.logsnr(tm.grid.detach())).tolist()
    n = tm.n
    first_finite = next((i for i, v in enumerate(lam_f) if v >= -LAMBDA_LIMIT), n)
    hist: list[torch.Tensor] = []  # earlier data predictions, newest first
    for i in range(n):
        m = _predict_at(den, x, tm.t(i), cond).data
        a_s, s_s, a_t, s_t = tm.alpha[i], tm.sigma[i], tm.alpha[i + 1], tm.sigma[i + 1]
        if _singular(lam_f[i], lam_f[i + 1]):  # DDIM limit (e^{-h} = 0)
            x_next = (s_t / s_s) * x + (a_t - s_t * a_s / s_s) * m
        else:
            p = min(order, i - first_finite + 1)
            if lower_order_final and n < 15:
                p = min(p, n - i)
            h = tm.lam(i + 1) - tm.lam(i)
            phi1 = torch.expm1(-h)
            b = -a_t * phi1
            x_next = (s_t / s_s) * x + b * m
            if p == 2:
                r0 = (tm.lam(i) - tm.lam(i - 1)) / h
                x_next = x_next + (b / (2 * r0)) * (m - hist[0])
            elif p == 3:
                r0, r1 = (tm.lam(i) - tm.lam(i - 1)) / h, (tm.lam(i - 1) - tm.lam(i - 2)) / h
                phi2 = phi1 / h + 1
                phi3 = phi2 / h - 0.5
                d10, d11 = (m - hist[0]) / r0, (hist[0] - hist[1]) / r1
                d1 = d10 + r0 / (r0 + r1) * (d10 - d11)
                d2 = (d10 - d11) / (r0 + r1)
                x_next = x_next + a_t * phi2 * d1 - 2 * a_t * phi3 * d2
        hist = [m, *hist][:2]
        x = x_next
    return x


def _unipc_weights(tm: _Times, i: int, p: int, variant: str):
    """One UniPC step's tensors (Zhao et al. 2023, data prediction; as
    :func:`tiltflow.solvers.multistep._unipc_step_plan`): ``c_x``, the weight ``base`` of the
    newest output, ``-alpha_t B(h)``, the ratios ``r_k`` and the order-condition system
    ``R a = g / B(h)`` as ``(R, g)``."""
    a_t = tm.alpha[i + 1]
    lam_s = tm.lam(i)
    h = tm.lam(i + 1) - lam_s
    hh = -h
    h_phi_1 = torch.expm1(hh)
    b_h = hh if variant == "bh1" else h_phi_1
    rks = [(tm.lam(i - k) - lam_s) / h for k in range(1, p)] + [torch.ones((), dtype=_F64)]
    gs, h_phi_k, fact = [], h_phi_1 / hh - 1.0, 1.0
    for j in range(p):
        gs.append(h_phi_k * fact / b_h)
        fact *= j + 2
        h_phi_k = h_phi_k / hh - 1.0 / fact
    R = torch.stack([torch.stack([r**j for r in rks]) for j in range(p)])
    return tm.sigma[i + 1] / tm.sigma[i], -a_t * h_phi_1, -a_t * b_h, rks, R, torch.stack(gs)


def _twin_unipc(den, x, tm: _Times, cond, *, order: int = 2, variant: str = "bh2",
                lower_order_final: bool = True, use_corrector: bool = True):
    """UniPC / UniP (``use_corrector=False``), as :func:`tiltflow.solvers.multistep.unipc` /
    ``unipc_p``: order p = 1-3, ``variant`` bh1 (B(h) = h) or bh2 (B(h) = e^h - 1)."""
    from .multistep import _check_order, _pure_noise

    order = _check_order("unipc", order, 1, 3)
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"unipc: variant must be 'bh1' or 'bh2', got {variant!r}")
    n = tm.n
    noise_only = [_pure_noise(a, s) for a, s in zip(tm.alpha_f, tm.sigma_f, strict=True)]
    half = torch.full((), 0.5, dtype=_F64)
    hist: list[torch.Tensor] = []
    pending = None  # the corrector's model output at the current x, reused by the next step
    for i in range(n):
        if pending is None:
            pending = _predict_at(den, x, tm.t(i), cond).data
        hist = [pending, *hist][:order]
        pending = None
        a_t, s_t, s_s = tm.alpha[i + 1], tm.sigma[i + 1], tm.sigma[i]
        if tm.sigma_f[i + 1] == 0.0:  # step to sigma = 0: x' = alpha_t x_hat
            x = a_t * hist[0]
            continue
        corrector = use_corrector and i < n - 1
        if noise_only[i]:  # out of pure noise: bh2's limit (see _unipc_step_plan)
            x_pred = (s_t / s_s) * x + a_t * hist[0]
            if corrector:
                pending = _predict_at(den, x_pred, tm.t(i + 1), cond).data
                x = (s_t / s_s) * x + 0.5 * a_t * hist[0] + 0.5 * a_t * pending
            else:
                x = x_pred
            continue
        p = 1
        while p < min(order, i + 1) and not noise_only[i - p]:
            p += 1
        if lower_order_final and n < 10:
            p = min(p, n - i)
        c_x, base, w, rks, R, g = _unipc_weights(tm, i, p, variant)
        x_pred = c_x * x + base * hist[0]
        if p >= 2:  # UniP-p: a = 1/2 for p = 2
            rhos_p = [half] if p == 2 else list(torch.linalg.solve(R[:p - 1, :p - 1],
                                                                   g[:p - 1]).unbind())
            for k in range(1, p):
                x_pred = x_pred + (w * rhos_p[k - 1] / rks[k - 1]) * (hist[k] - hist[0])
        if not corrector:
            x = x_pred
            continue
        pending = _predict_at(den, x_pred, tm.t(i + 1), cond).data
        rhos_c = [half] if p == 1 else list(torch.linalg.solve(R, g).unbind())
        x_next = c_x * x + base * hist[0]
        for k in range(1, p):
            x_next = x_next + (w * rhos_c[k - 1] / rks[k - 1]) * (hist[k] - hist[0])
        x = x_next + (w * rhos_c[-1]) * (pending - hist[0])
    return x


def _numpy_sum(v: torch.Tensor) -> torch.Tensor:
    """Sum of a 1-D tensor in numpy's pairwise order (8 running sums, combined as a tree), so the
    twin's DEIS weights equal the registered solver's to the last bit: on clustered grids its
    Lagrange extrapolation amplifies rounding differences a million-fold."""
    n = v.shape[0]
    if n < 8:
        return v.sum()
    m = n - n % 8
    r = v[:m].reshape(-1, 8).unbind(0)
    acc = list(r[0].unbind())
    for row in r[1:]:
        acc = [a + b for a, b in zip(acc, row.unbind(), strict=True)]
    out = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
    for k in range(m, n):
        out = out + v[k]
    return out


def _twin_deis(den, x, tm: _Times, cond, *, order: int = 3, lower_order_final: bool = False):
    """DEIS tAB (Zhang & Chen 2023, eq. 14), as :func:`tiltflow.solvers.multistep.deis`:
    ``x' = alpha_t x_hat + sigma_t eps + sum_j D_j eps_{i-j}``, the ``D_j`` the exponential
    integrator's Lagrange weights by the same quadrature, here on time tensors."""
    from .multistep import _check_order, _deis_nodes

    order = _check_order("deis", order, 1, 4)
    w_theta, ramp = (torch.from_numpy(v) for v in _deis_nodes())
    n = tm.n
    ts = [tm.t(i) for i in range(n + 1)]
    eps_hist: list[torch.Tensor] = []
    for i in range(n):
        pred = _predict_at(den, x, ts[i], cond)
        eps_hist = [pred.noise, *eps_hist][:order]
        p = min(order, i + 1)
        if lower_order_final and n < 10:
            p = min(p, n - i)
        coefs = [torch.zeros((), dtype=_F64)]
        if p > 1:  # p = 1 is DDIM (also the step out of alpha = 0)
            tau = ts[i + 1] + (ts[i] - ts[i + 1]) * ramp
            c = tm.schedule(tau)
            a, s, da, ds = (v.to(_F64) for v in (c.alpha, c.sigma, c.d_alpha, c.d_sigma))
            drho = (a * ds - s * da) / (a * a)  # d(sigma/alpha)/dtau at the nodes
            pts = ts[i - p + 1:i + 1][::-1]
            coefs = []
            for j in range(p):
                lag = torch.ones_like(tau)
                for k in range(p):
                    if k != j:
                        lag = lag * ((tau - pts[k]) / (pts[j] - pts[k]))
                basis = lag - (1.0 if j == 0 else 0.0)
                integral = -(ts[i] - ts[i + 1]) * _numpy_sum(w_theta * drho * basis)
                coefs.append(tm.alpha[i + 1] * integral)
        # the registered solver's grouping: alpha_t x_hat + (sigma_t + D_0) eps + older terms
        x_next = tm.alpha[i + 1] * pred.data + (tm.sigma[i + 1] + coefs[0]) * pred.noise
        for cj, eps in zip(coefs[1:], eps_hist[1:], strict=False):
            x_next = x_next + cj * eps
        x = x_next
    return x


def _twin_ipndm(den, x, tm: _Times, cond, *, order: int = 4):
    """iPNDM (Zhang & Chen 2023, appendix), as :func:`tiltflow.solvers.multistep.ipndm`:
    equal-step Adams-Bashforth weights on ``d(x/alpha) = eps d(sigma/alpha)``."""
    from .multistep import _AB, _check_order

    order = _check_order("ipndm", order, 1, 4)
    eps_hist: list[torch.Tensor] = []
    for i in range(tm.n):
        pred = _predict_at(den, x, tm.t(i), cond)
        eps_hist = [pred.noise, *eps_hist][:order]
        p = min(order, i + 1)
        x_next = tm.alpha[i + 1] * pred.data + tm.sigma[i + 1] * pred.noise
        if p > 1:
            d_rho = tm.sigma[i + 1] / tm.alpha[i + 1] - tm.sigma[i] / tm.alpha[i]
            for j, w in enumerate(_AB[p - 1]):
                x_next = x_next + (tm.alpha[i + 1] * d_rho * (w - (j == 0))) * eps_hist[j]
        x = x_next
    return x


def _twin_dpmpp_2m(den, x, tm: _Times, cond, **options):
    return _twin_dpmpp(den, x, tm, cond, order=2, **options)


def _twin_dpmpp_3m(den, x, tm: _Times, cond, **options):
    return _twin_dpmpp(den, x, tm, cond, order=3, **options)


def _twin_unipc_p(den, x, tm: _Times, cond, **options):
    return _twin_unipc(den, x, tm, cond, use_corrector=False, **options)


_TWINS = {"euler": _twin_euler, "ddim": _twin_ddim, "heun": _twin_heun,
          "midpoint": _twin_midpoint, "dpmpp_2m": _twin_dpmpp_2m, "dpmpp_3m": _twin_dpmpp_3m,
          "unipc": _twin_unipc, "unipc_p": _twin_unipc_p, "deis": _twin_deis,
          "ipndm": _twin_ipndm}


def _solver_options(solver: str, options: dict | None) -> dict:
    """``options`` checked against the registered solver's keyword options."""
    from . import _check_options

    return _check_options(get_solver(solver), options)


def differentiable_solve(denoiser, x_init: torch.Tensor, grid: torch.Tensor,
                         solver: str = "ddim", *, cond=None, options: dict | None = None
                         ) -> torch.Tensor:
    """Run ``solver`` (one of :data:`GRID_SOLVERS`: ddim, deis, dpmpp_2m, dpmpp_3m, euler,
    heun, ipndm, midpoint, unipc, unipc_p) with its keyword ``options`` (e.g. ``{"order": 3,
    "variant": "bh1"}`` for unipc) on ``grid`` differentiably in the grid times: the same
    result as ``tiltflow.solvers.solve(denoiser, x_init, grid, solver, options=options)`` (to
    float64 rounding), and gradients flow to the interior grid times (the end points are held
    fixed)."""
    from .registry import ALIASES

    solver = ALIASES.get(solver, solver)
    if solver not in _TWINS:
        raise ValueError(f"no differentiable version of solver {solver!r}; use one of "
                         f"{sorted(_TWINS)} or method='nelder_mead'")
    options = _solver_options(solver, options)
    grid = grid.to(_F64)
    if grid.dim() != 1 or len(grid) < 2:
        raise ValueError("grid must be a 1-D tensor of at least 2 times")
    return _TWINS[solver](denoiser, x_init, _Times(denoiser.schedule, grid), cond, **options)


# -- optimized grid ---------------------------------------------------------------------------

class FittedGrid(_Fitted):
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
        grid = torch.as_tensor(grid, dtype=_F64).detach().flatten().clone()
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

    def solve(self, denoiser, x_init, *, cond=None, guidance=None, record=None, generator=None):
        from . import solve as run_solver

        self.check_denoiser(denoiser)
        return run_solver(denoiser, x_init, self.grid, self.base, cond=cond, guidance=guidance,
                          generator=generator, record=record, options=self.options)


def _grid_from_logits(theta: torch.Tensor, t_start: float) -> torch.Tensor:
    inc = torch.softmax(theta.clamp(-30, 30), 0)
    grid = t_start * (1 - torch.cat([torch.zeros(1, dtype=_F64), torch.cumsum(inc, 0)]))
    grid[-1] = 0.0
    return grid


def _grid_from_theta(theta: torch.Tensor, t_start: float) -> torch.Tensor:
    """``t_start (1 - cumsum(softmax(theta)))`` with the end points exactly ``t_start`` and 0
    (constants, so no gradient reaches them): strictly decreasing by construction."""
    inner = t_start * (1 - torch.cumsum(torch.softmax(theta, 0), 0)[:-1])
    return torch.cat([torch.full((1,), t_start, dtype=_F64), inner, torch.zeros(1, dtype=_F64)])


GRID_SOLVERS = tuple(sorted(_TWINS))

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
        from . import solve as run_solver

        idx = self.train if idx is None else idx
        try:
            with torch.no_grad():
                x = run_solver(self.denoiser, self.x_init[idx], grid, solver,
                               cond=_take(self.cond, idx), options=options)
        except (RuntimeError, ValueError, ArithmeticError):  # e.g. a singular order system
            return 1e30
        v = float(endpoint_rmse(x.to(_F64), self.ref[idx]))
        return v if math.isfinite(v) else 1e30

    def loss(self, theta, solver: str, options: dict, idx) -> torch.Tensor | None:
        """Differentiable endpoint RMSE through the twin (``None`` where the solve fails)."""
        try:
            x = differentiable_solve(self.denoiser, self.x_init[idx], _grid_from_theta(theta, 1.0),
                                     solver, cond=_take(self.cond, idx), options=options)
        except (RuntimeError, ValueError, ArithmeticError):
            return None
        loss = endpoint_rmse(x.to(_F64), self.ref[idx])
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
        if method != "nelder_mead" and name not in _TWINS:
            raise ValueError(f"method={method!r} needs a differentiable solver, one of "
                             f"{list(GRID_SOLVERS)}; got {name!r} (or use method='nelder_mead')")
        opts = _solver_options(name, opts)
        out.append((name, opts, info.steps_for_nfe(int(nfe), opts)))
    return out


def _grid_starts(prob: _GridProblem, solver, options, n, init, restarts, schedule):
    """The start grids ``[(name, grid, training RMSE)]``, best first: the given grid, one named
    grid, or (``init="auto"``) the ``restarts`` best of the named grids."""
    from . import grids as grids_mod

    if isinstance(init, str):
        if init != "auto" and init not in grids_mod.available():
            raise ValueError(f"init must be 'auto', a grid tensor or one of "
                             f"{grids_mod.available()}, got {init!r}")
        names = grids_mod.available() if init == "auto" else [init]
        cands = [(name, grids_mod.get_grid(name, n, schedule)) for name in names]
    else:
        cands = [("given", torch.as_tensor(init, dtype=_F64).flatten())]
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
            the training noises through the solver's differentiable twin
            (:func:`differentiable_solve`), run to convergence or ``steps`` (default 100)
            iterations (a few seconds per start on the 2-D beds: the grid has only nfe - 1
            free numbers, and it matched 100+ random restarts of Nelder-Mead there).
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
    x_init, ref = _targets(denoiser, noises, reference, cond)
    prob = _GridProblem(denoiser, x_init, ref.to(_F64), cond, val_fraction, seed, split=True)
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
    bar = _progress(steps, desc, progress)
    evals = [0, math.inf]

    def closure():
        opt.zero_grad(set_to_none=False)
        evals[0] += 1
        loss = prob.loss(theta, solver, options, prob.train)
        if loss is None:  # a failed solve: a huge loss makes the line search back off
            theta.grad = torch.zeros_like(theta)
            return torch.tensor(1e30, dtype=_F64)
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
        "optimizer": "lbfgs", "solver_twin": solver,
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
    bar = _progress(steps, desc, progress)
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
        "optimizer": "adam", "solver_twin": solver, "iterations": it,
        "max_iterations": int(steps), "lr": lr, "batch_size": batch_size}


def _fit_grid_nelder_mead(prob: _GridProblem, solver, options, theta0, steps, *, desc,
                          progress):
    from scipy.optimize import minimize

    bar = _progress(steps, desc, progress)
    best = [math.inf, theta0.clone()]

    def objective(th):
        theta = torch.as_tensor(th, dtype=_F64)
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


# -- Adam loop shared by bespoke and BNS --------------------------------------------------------

def _adam_fit(params: list[torch.Tensor], run, ref, *, steps: int, lr: float, desc: str,
              progress: bool, batch_size: int | None = None, seed: int = 0):
    """Minimise ``endpoint_rmse(run(idx), ref[idx])`` with Adam (see :func:`_adam_loop`).

    ``run(idx)`` integrates the noises ``idx`` (``None``: all). Returns (best_loss, seconds)."""
    ref = ref.to(_F64)

    def loss_of(idx):
        return endpoint_rmse(run(idx).to(_F64), ref if idx is None else ref[idx])

    return _adam_loop(params, loss_of, ref.shape[0], steps=steps, lr=lr, desc=desc,
                      progress=progress, batch_size=batch_size, seed=seed)


def _adam_loop(params: list[torch.Tensor], loss_of, pool: int, *, steps: int, lr: float,
               desc: str, progress: bool, batch_size: int | None = None, seed: int = 0,
               postfix: str = "rmse"):
    """Minimise the scalar ``loss_of(idx)`` over the pool of ``pool`` noises with Adam
    (cosine-decayed lr, gradient norm clipped at 1).

    ``loss_of(idx)`` is the loss on the noises ``idx`` (``None``: the whole pool). With
    ``batch_size`` smaller than the pool each iteration uses a random minibatch (the endpoint
    error of a mixture is dominated by the rare noises near a mode boundary, so a large pool seen
    in minibatches generalises better than a small full batch); the pool's full loss is checked
    every 25 iterations and the best parameters by that loss are kept. Returns
    (best_loss, seconds)."""
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps), eta_min=lr / 20)
    minibatch = batch_size is not None and batch_size < pool
    gen = torch.Generator().manual_seed(seed)
    bar = _progress(steps, desc, progress)
    t0 = time.perf_counter()

    def full_loss() -> float:
        with torch.no_grad():
            return float(loss_of(None))

    best = full_loss()
    best_state = [p.detach().clone() for p in params]
    for it in range(steps):
        idx = torch.randperm(pool, generator=gen)[:batch_size] if minibatch else None
        opt.zero_grad(set_to_none=True)
        loss = loss_of(idx)
        lv = float(loss.detach())
        if not minibatch and math.isfinite(lv) and lv < best:  # loss of the current params
            best, best_state = lv, [p.detach().clone() for p in params]
        if math.isfinite(lv):
            loss.backward()
            for p in params:
                if p.grad is not None:
                    torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        else:  # a step went astray: restart from the best parameters, smaller lr
            with torch.no_grad():
                for p, b in zip(params, best_state, strict=True):
                    p.copy_(b)
            for g in opt.param_groups:
                g["lr"] *= 0.5
        sched.step()
        if (minibatch and (it + 1) % 25 == 0) or it + 1 == steps:
            cur = full_loss()
            if math.isfinite(cur) and cur < best:
                best = cur
                best_state = [p.detach().clone() for p in params]
        if bar is not None:
            bar.update(1)
            bar.set_postfix({postfix: f"{best:.4g}"})
    if bar is not None:
        bar.close()
    with torch.no_grad():
        for p, b in zip(params, best_state, strict=True):
            p.copy_(b)
    return best, time.perf_counter() - t0


# -- Bespoke (scale-time) solver ----------------------------------------------------------------

_BASES = {"euler": 1, "rk1": 1, "midpoint": 2, "rk2": 2}


def _base_name(base: str) -> str:
    if base not in _BASES:
        raise ValueError(f"bespoke base solver must be one of {sorted(_BASES)}, got {base!r}")
    return "euler" if _BASES[base] == 1 else "midpoint"


def _limit_slopes(y, m, monotone: bool):
    """Fritsch & Carlson (1980) limiter: slopes of a C^1 cubic Hermite interpolant clipped so
    it stays monotone (``monotone=True``: zero where the neighbouring secants change sign or
    point the other way, at most 3x the smaller secant) or at most 3x the larger neighbouring
    secant (a bound on overshoot)."""
    d = 1.0 / (len(y) - 1)
    sec = (y[1:] - y[:-1]) / d
    left = torch.cat([sec[:1], sec])
    right = torch.cat([sec, sec[-1:]])
    if monotone:
        same = (left * right > 0) & (m * left > 0)
        cap = 3 * torch.minimum(left.abs(), right.abs())
        return torch.where(same, m.sign() * torch.minimum(m.abs(), cap), torch.zeros_like(m))
    cap = 3 * torch.maximum(left.abs(), right.abs())
    return m.clamp(-cap, cap)


def _hermite(y, m, r_new):
    """Cubic Hermite interpolation of node values ``y`` with slopes ``m`` on the uniform nodes
    ``linspace(0, 1, len(y))``; returns value and derivative at ``r_new``."""
    n_int = len(y) - 1
    d = 1.0 / n_int
    k = torch.clamp((r_new / d).floor().long(), 0, n_int - 1)
    u = (r_new - k * d) / d
    h00, h10, h01, h11 = 2 * u**3 - 3 * u**2 + 1, u**3 - 2 * u**2 + u, -2 * u**3 + 3 * u**2, \
        u**3 - u**2
    g00, g10, g01, g11 = 6 * u**2 - 6 * u, 3 * u**2 - 4 * u + 1, -6 * u**2 + 6 * u, 3 * u**2 - 2 * u
    val = h00 * y[k] + h10 * d * m[k] + h01 * y[k + 1] + h11 * d * m[k + 1]
    der = (g00 * y[k] + g10 * d * m[k] + g01 * y[k + 1] + g11 * d * m[k + 1]) / d
    return val, der


class BespokeSolver(_Fitted):
    """Bespoke scale-time solver (Shaul et al. 2023, "Bespoke Solvers for Generative Flow
    Models", ICLR 2024, sec. 2: scale-time transformations and the Bespoke RK1/RK2 steps).

    The path is reparameterised as ``xbar(r) = s(r) x(t(r))`` for r in [0, 1] with
    ``t(0) = 1`` (noise), ``t(1) = 0`` (data), ``s(0) = 1``; it solves
    ``dxbar/dr = (s'/s) xbar + t' s u(xbar / s, t)`` with ``u`` the PF-ODE velocity
    ``dx_t/dt`` of the denoiser, and the base solver (Euler = RK1 or midpoint = RK2) takes
    ``n`` uniform steps ``h = 1/n`` in r. The learnable parameters are the values
    ``t_j, t'_j, s_j, s'_j`` at the nodes ``r_j`` the base solver visits (n + 1 nodes for
    Euler, 2n + 1 for midpoint, whose midpoints are nodes). In the original coordinates:

    - RK1: ``x_{i+1} = ((s_i + h s'_i) x_i + h t'_i s_i u(x_i, t_i)) / s_{i+1}``;
    - RK2: ``x_m = ((s_i + h/2 s'_i) x_i + h/2 t'_i s_i u(x_i, t_i)) / s_m``,
      ``x_{i+1} = (s_i x_i + h (s'_m x_m + s_m t'_m u(x_m, t_m))) / s_{i+1}``.

    Parameterisation during fitting (keeps the transformation valid, as in the paper's sec. 2.3):
    ``t`` = 1 - cumsum(softmax(logits)) (strictly decreasing, exact end points),
    ``t' = -exp(.)`` (< 0: time runs from noise to data), ``s = exp(.)`` with ``s_0 = 1``,
    ``s'`` free. Identity parameters (``t = 1 - r``, ``t' = -1``, ``s = 1``, ``s' = 0``) give
    exactly the base solver on the uniform grid.

    Consistency (the paper's consistency theorem): for any valid transformation the transformed
    ODE has the same end point, so the base solver applied to it converges at its order as n
    grows. :meth:`refine` makes that concrete for a fitted solver: the node values and slopes
    define a C^1 piecewise-cubic Hermite transformation ``t(r), log s(r)`` (slopes passed
    through the Fritsch-Carlson limiter, so ``t(r)`` stays monotone in [0, 1]); refining by an
    integer factor evaluates it on a finer r-grid (the original node values stay node values;
    ``refine(1)`` is the fitted solver itself), and the error then falls at the base solver's
    order.

    Fitting (:meth:`fit`): ``loss="rmse"`` minimises the endpoint RMSE to the reference;
    ``loss="bound"`` the paper's RMSE-bound (:meth:`rmse_bound`; the paper's training loss,
    ``L_RMSE-bound``, and its training algorithm). The loss used is recorded in ``fit_info["loss"]``
    (``"endpoint_rmse"`` / ``"rmse_bound"``, with ``"lipschitz"``), saved with the file.
    """

    kind = "bespoke"

    def __init__(self, t, dt, s, ds, *, base: str = "midpoint", **kw):
        base = _base_name(base)
        t, dt, s, ds = (torch.as_tensor(v, dtype=_F64).detach().flatten().clone()
                         for v in (t, dt, s, ds))
        order = _BASES[base]
        nodes = t.numel()
        if nodes < 2 or (nodes - 1) % order or any(v.numel() != nodes for v in (dt, s, ds)):
            raise ValueError(f"t, dt, s, ds must have the same length (steps * {order} + 1)")
        steps = (nodes - 1) // order
        kw.setdefault("nfe", steps * order)
        super().__init__(base=base, **kw)
        if self.nfe != steps * order:
            raise ValueError(f"nfe={self.nfe} does not match {nodes} nodes of {base}")
        if abs(float(t[0]) - self.t_start) > 1e-12 or float(t[-1]) != 0.0:
            raise ValueError(f"t must start at t_start={self.t_start} and end at 0")
        if not bool(((t >= 0) & (t <= 1)).all()):
            raise ValueError("t must lie in [0, 1]")
        if not bool((s > 0).all()):
            raise ValueError("the scales s must be positive")
        self.t, self.dt, self.s, self.ds = t, dt, s, ds
        self.steps = steps

    # construction ------------------------------------------------------------------------------
    @classmethod
    def identity(cls, schedule, nfe: int, base: str = "midpoint", *, init: str = "identity",
                 model: dict | None = None) -> BespokeSolver:
        """Initial parameters: ``init="identity"`` (the base solver on a uniform grid in t) or
        ``"rectified_flow"`` (the transformation to the rectified-flow path ``x_t /
        (alpha + sigma)`` uniform in ``rho = sigma / (alpha + sigma)``: RK1 is then DDIM)."""
        schedule = get_schedule(schedule)
        base = _base_name(base)
        order = _BASES[base]
        if nfe < order or nfe % order:
            raise ValueError(f"a bespoke {base} solver needs nfe a positive multiple of {order}, "
                             f"got nfe={nfe}")
        nodes = nfe + 1  # euler: n + 1 nodes; midpoint: 2n + 1 = nfe + 1
        r = torch.linspace(0, 1, nodes, dtype=_F64)
        if init == "identity":
            t, dt = 1 - r, -torch.ones_like(r)
            s, ds = torch.ones_like(r), torch.zeros_like(r)
        elif init == "rectified_flow":
            t, dt, s, ds = _rf_transform(schedule, r)
        else:
            raise ValueError(f"init must be 'identity' or 'rectified_flow', got {init!r}")
        return cls(t, dt, s, ds, base=base, nfe=nfe, schedule=schedule, model=model)

    @classmethod
    def fit(cls, denoiser, nfe: int, base: str = "midpoint", *, noises: torch.Tensor,
            reference: torch.Tensor | None = None, init: str = "auto", steps: int = 400,
            lr: float = 0.02, batch_size: int | None = 256, cond=None,
            model: dict | None = None, progress: bool = False, loss: str = "rmse",
            lipschitz: float = 1.0, path: GroundTruthPath | None = None,
            gt_knots: int = 64) -> BespokeSolver:
        """Fit to ``denoiser`` at ``nfe`` evaluations with Adam (``steps`` iterations on
        minibatches of ``batch_size`` of the ``noises``) on one of two losses:

        - ``loss="rmse"`` (default): the endpoint RMSE to ``reference`` (backpropagation through
          the whole n-step solve);
        - ``loss="bound"``: the paper's RMSE-bound ``mean_b sum_i M_i d_i`` (Shaul et al. 2023,
          the RMSE-bound loss; see :meth:`rmse_bound`) with the velocity's Lipschitz constant
          taken as ``lipschitz`` (the paper's hyper-parameter ``L_tau``; default 1). Its local
          errors ``d_i`` are taken along ``path``, a :class:`GroundTruthPath` of the same ``noises``
          (computed here with ``gt_knots`` knots when not given); the n steps run in parallel
          and no gradient passes through a solve.

        ``init="auto"`` starts from whichever of identity / rectified_flow has the lower
        training loss. The fit statistics (``fit_info``) record the loss (``"endpoint_rmse"``
        or ``"rmse_bound"``), L, and the start and final endpoint RMSE on the pool."""
        lip = _check_loss(loss, lipschitz)
        _check_noises(noises)
        if loss == "bound":
            if path is None:
                path = ground_truth_path(denoiser, noises, cond=cond, knots=gt_knots)
            elif path.x_init.shape != noises.shape or \
                    not torch.equal(path.x_init, _start(denoiser, noises).to(_F64)):
                raise ValueError("path must be the GroundTruthPath of these noises "
                                 "(tiltflow.solvers.bespoke.ground_truth_path(den, noises))")
            if reference is None:
                reference = path.end.to(noises.dtype)
        x_init, ref = _targets(denoiser, noises, reference, cond)
        inits = ["identity", "rectified_flow"] if init == "auto" else [init]
        cands = [cls.identity(denoiser.schedule, nfe, base, init=i, model=model) for i in inits]

        def err(c):
            with torch.no_grad():
                return float(endpoint_rmse(c.solve(denoiser, x_init, cond=cond).to(_F64),
                                           ref.to(_F64)))

        def bound_of(c):
            with torch.no_grad():
                return float(_bound_terms(denoiser, path, None, c.t, c.dt, c.s, c.ds, c.base,
                                          lip, cond).loss)

        start = min(cands, key=err if loss == "rmse" else bound_of)
        init_rmse = err(start)
        # raw parameters
        inc = (start.t[:-1] - start.t[1:]).clamp_min(1e-12)
        logits = torch.log(inc / inc.sum()).requires_grad_()
        log_mdt = torch.log((-start.dt).clamp_min(1e-12)).requires_grad_()
        log_s = torch.log(start.s[1:]).requires_grad_()
        ds = start.ds.clone().requires_grad_()
        zero = torch.zeros(1, dtype=_F64)

        def nodes():
            t = _grid_from_logits(logits, start.t_start)
            t = torch.cat([t[:-1], zero])  # keep the graph; exact 0 at the end
            return t, -torch.exp(log_mdt), torch.exp(torch.cat([zero, log_s])), ds

        params = [logits, log_mdt, log_s, ds]
        desc = f"bespoke {start.base} nfe={nfe} ({loss})"
        if loss == "rmse":
            def run(idx):
                x0, c = (x_init, cond) if idx is None else (x_init[idx], _take(cond, idx))
                return _bespoke_steps(denoiser, x0, *nodes(), start.base, c, None, None)

            best, secs = _adam_fit(params, run, ref, steps=steps, lr=lr, desc=desc,
                                   progress=progress, batch_size=batch_size)
        else:
            def bound_loss(idx):
                return _bound_terms(denoiser, path, idx, *nodes(), start.base, lip, cond).loss

            init_bound = bound_of(start)
            best, secs = _adam_loop(params, bound_loss, x_init.shape[0], steps=steps, lr=lr,
                                    desc=desc, progress=progress, batch_size=batch_size,
                                    postfix="bound")
        with torch.no_grad():
            t, dt, s, dsv = nodes()
        fitted = cls(t, dt, s, dsv, base=start.base, nfe=nfe, schedule=denoiser.schedule,
                     model=model)
        fit = {"loss": "endpoint_rmse" if loss == "rmse" else "rmse_bound",
               "optimizer": "adam", "iterations": int(steps), "lr": lr,
               "init": inits[cands.index(start)], "num_noises": int(ref.shape[0]),
               "batch_size": batch_size, "init_rmse": init_rmse}
        if loss == "rmse":
            fit.update(train_rmse=best, seconds=round(secs, 3))
        else:
            fit.update(lipschitz=lip, gt_knots=path.knots, init_bound=init_bound,
                       train_bound=best, train_rmse=err(fitted), seconds=round(secs, 3),
                       path_seconds=round(path.seconds, 3))
        fitted.fit_info = fit
        return fitted

    def rmse_bound(self, denoiser, path: GroundTruthPath, *, lipschitz: float = 1.0,
                   cond=None) -> BoundTerms:
        """The RMSE-bound of this solver along the GT ``path``: Shaul et al. 2023
        (arXiv:2310.19075), the RMSE upper-bound theorem and its loss ``L_RMSE-bound`` with the
        local errors ``d_i`` and weights ``M_i``, trained as in its training algorithm; the
        Lipschitz constants of the Bespoke RK1 / RK2 steps as derived in its appendix.

        With the steps ``x_{i+1} = step_i(x_i)`` of :meth:`solve` (in the original coordinates:
        the scale ``s_r`` is inside the step, see the class doc) and the GT states ``x(t_i)``
        at the step boundaries ``t_i = t(r_i)``, ``r_i = i h``:

        - local truncation error ``d_i = || x(t_{i+1}) - step_i(x(t_i)) ||`` (Euclidean, per
          noise; the n steps are independent, so they are evaluated in one parallel batch);
        - the Lipschitz constant of the transformed velocity ``ubar_r(x) = (s'/s) x + t' s
          u_t(x / s)`` at node j is ``lambda_j = |s'_j| / s_j + |t'_j| L`` with L the Lipschitz
          constant of ``u_t`` (a constant hyper-parameter, ``lipschitz``), so step i is
          ``L_i``-Lipschitz in x with
          RK1 ``L_i = (s_i / s_{i+1}) (1 + h lambda_i)``,
          RK2 ``L_i = (s_i / s_{i+1}) (1 + h lambda_{i+1/2} (1 + h/2 lambda_i))``;
        - ``M_i = prod_{j > i} L_j`` (``M_{n-1} = 1``) and, since ``e_{i+1} <= L_i e_i + d_i``
          for the global error ``e_i = ||x(t_i) - x_i||`` (``e_0 = 0``), the bound
          ``||x(0) - x_n|| <= sum_i M_i d_i`` holds for every noise whenever L really bounds the
          velocity's Lipschitz constant; its mean over the noises is ``L_RMSE-bound``.

        ``cond`` must be the conditioning the ``path`` was computed with. Returns
        :class:`BoundTerms` (per-noise ``bound``, ``local_errors``, ``step_lipschitz``,
        ``weights``)."""
        lip = _check_loss("bound", lipschitz)
        self.check_denoiser(denoiser)
        with torch.no_grad():
            return _bound_terms(denoiser, path, None, self.t, self.dt, self.s, self.ds,
                                self.base, lip, cond)

    def refine(self, factor: int) -> BespokeSolver:
        """The same transformation solved with ``factor`` times more steps (see class doc)."""
        if int(factor) != factor or factor < 1:
            raise ValueError(f"factor must be a positive integer, got {factor}")
        factor = int(factor)
        if factor == 1:
            return self
        nodes = (self.t.numel() - 1) * factor + 1
        r = torch.linspace(0, 1, nodes, dtype=_F64)
        t, dt = _hermite(self.t, _limit_slopes(self.t, self.dt, True), r)
        out = (t < 0) | (t > 1)
        t, dt = t.clamp(0, 1), torch.where(out, torch.zeros_like(dt), dt)
        t[0], t[-1] = self.t_start, 0.0
        log_s = torch.log(self.s)
        ls, dls = _hermite(log_s, _limit_slopes(log_s, self.ds / self.s, False), r)
        s = torch.exp(ls)
        return BespokeSolver(t, dt, s, s * dls, base=self.base, nfe=self.nfe * factor,
                             schedule=self.schedule, model=self.model,
                             fit={**self.fit_info, "refined": factor}, t_start=self.t_start)

    # running -----------------------------------------------------------------------------------
    def solve(self, denoiser, x_init, *, cond=None, guidance=None, record=None):
        """Integrate ``x_init`` (the state at t_start) to t = 0 with exactly ``nfe`` calls."""
        self.check_denoiser(denoiser)
        return _bespoke_steps(denoiser, x_init, self.t.tolist(), self.dt.tolist(),
                              self.s.tolist(), self.ds.tolist(), self.base, cond, guidance, record)

    # files -------------------------------------------------------------------------------------
    def _tensors(self):
        return {"t": self.t, "dt": self.dt, "s": self.s, "ds": self.ds}

    @classmethod
    def _from_tensors(cls, tensors, **kw):
        missing = {"t", "dt", "s", "ds"} - set(tensors)
        if missing:
            raise ValueError(f"missing tensors {sorted(missing)}")
        return cls(tensors["t"], tensors["dt"], tensors["s"], tensors["ds"], **kw)


def _rf_transform(schedule: Schedule, r: torch.Tensor):
    """Nodes of the transformation to the rectified-flow path, uniform in rho, with the
    derivatives by central differences (float64)."""
    rho_start, scale_start = (float(v) for v in _rf_coords(schedule, torch.ones(1, dtype=_F64)))

    def ts(rr):
        rho = (rho_start * (1 - rr)).clamp(1e-300, 1.0)
        t = _t_from_rho(schedule, rho)
        t = torch.where(rr <= 0, torch.ones_like(t), torch.where(rr >= 1, torch.zeros_like(t), t))
        c = schedule(t)
        return t, scale_start / (c.alpha + c.sigma)

    eps = 1e-6
    t, s = ts(r)
    tp, sp = ts((r + eps).clamp(max=1.0))
    tm, sm = ts((r - eps).clamp(min=0.0))
    width = (r + eps).clamp(max=1.0) - (r - eps).clamp(min=0.0)
    dt = -((tp - tm) / width).abs().clamp_min(1e-9)
    ds = (sp - sm) / width
    s[0] = 1.0
    return t, dt, s, ds


def _bespoke_steps(denoiser, x_init, t, dt, s, ds, base, cond, guidance, record):
    """The Bespoke RK1/RK2 loop (see :class:`BespokeSolver`). ``t, dt, s, ds`` are python float
    lists (sampling: every coefficient computed before the loop) or float64 tensors (fitting:
    differentiable)."""
    predict = Predictor(denoiser, cond, guidance)
    order = _BASES[base]
    steps = (len(t) - 1) // order
    h = 1.0 / steps
    tensor_times = torch.is_tensor(t)

    def tm(j):
        if tensor_times:
            return t[j].reshape(1).to(x_init.device)
        return float(t[j])

    def vel(x, j):
        return predict(x, tm(j)).velocity

    x = x_init
    if order == 1:
        coefs = [((s[i] + h * ds[i]) / s[i + 1], h * dt[i] * s[i] / s[i + 1]) for i in range(steps)]
        for i, (a, b) in enumerate(coefs):
            pred = predict(x, tm(i))
            x_next = a * x + b * pred.velocity
            if record is not None:
                record.append(StepRecord(float(t[i]), float(t[i + 1]), x, x_next, pred.data))
            x = x_next
        return x
    coefs = []
    for i in range(steps):
        j, m, e = 2 * i, 2 * i + 1, 2 * i + 2
        coefs.append(((s[j] + 0.5 * h * ds[j]) / s[m], 0.5 * h * dt[j] * s[j] / s[m],
                      s[j] / s[e], h * ds[m] / s[e], h * s[m] * dt[m] / s[e]))
    for i, (a, b, c, d, e) in enumerate(coefs):
        pred = predict(x, tm(2 * i))
        x_mid = a * x + b * pred.velocity
        x_next = c * x + d * x_mid + e * vel(x_mid, 2 * i + 1)
        if record is not None:
            record.append(StepRecord(float(t[2 * i]), float(t[2 * i + 2]), x, x_next, pred.data))
        x = x_next
    return x


# -- the RMSE-bound loss (Shaul et al. 2023, sec. 2) ---------------------------------------------

LOSSES = ("rmse", "bound")
_MIN_RHO = 1e-7  # where t = 0 is clean, the GT path's velocity is evaluated no closer than this


def _check_loss(loss: str, lipschitz) -> float:
    if loss not in LOSSES:
        raise ValueError(f"loss must be 'rmse' (endpoint RMSE) or 'bound' (the RMSE-bound of "
                         f"Shaul et al. 2023), got {loss!r}")
    try:
        lip = float(lipschitz)
    except (TypeError, ValueError):
        raise ValueError(f"lipschitz must be a positive number, got {lipschitz!r}") from None
    if not (math.isfinite(lip) and lip > 0):
        raise ValueError(f"lipschitz (the velocity's Lipschitz constant L of the RMSE-bound) must "
                         f"be a finite number > 0, got {lipschitz!r}")
    return lip


class GroundTruthPath:
    """Ground-truth PF-ODE trajectories ``x(t)`` of a pool of start states, computed ONCE and
    then evaluated at any times, differentiably in ``t``: what the RMSE-bound loss needs
    (Shaul et al. 2023, sec. 2 and Algorithm 3: "GT path" ``x(t_i)`` at the solver's times).

    Computed like :func:`rk4_reference` (classical RK4 in the rectified-flow coordinates
    ``z = x_t / (alpha + sigma)``, ``rho = sigma / (alpha + sigma)``, where ``dz/drho =
    eps_hat - x_hat`` is smooth on every schedule) with ``knots * substeps`` uniform steps in
    rho; ``z`` and ``dz/drho`` are stored at ``knots + 1`` uniform knots and :meth:`at`
    evaluates the C^1 cubic Hermite interpolant there, ``x(t) = (alpha(t) + sigma(t))
    z(rho(t))``. Its derivative in ``t`` is the interpolant's, i.e. the PF-ODE velocity
    ``u_t(x(t))`` to interpolation accuracy: the paper gets the same gradient with
    ``x_aux = x(sg t) + u_t(x(sg t)) (t - sg t)`` (Algorithm 3).

    Memory: ``2 (knots + 1)`` float64 copies of the pool (``x_init``).
    """

    def __init__(self, denoiser, x_init: torch.Tensor, *, cond=None, knots: int = 64,
                 substeps: int = 4, t_start: float = 1.0):
        if int(knots) != knots or knots < 1 or int(substeps) != substeps or substeps < 1:
            raise ValueError(f"knots and substeps must be positive integers, got {knots}, "
                             f"{substeps}")
        self.schedule = denoiser.schedule
        self.knots, self.t_start = int(knots), float(t_start)
        t0 = time.perf_counter()
        sched = self.schedule
        ends = torch.tensor([self.t_start, 0.0], dtype=_F64)
        rho_ends, scale_ends = _rf_coords(sched, ends)
        self.rho0, self.rho1 = float(rho_ends[0]), float(rho_ends[1])
        clean_end = float(sched(ends[1:]).sigma) == 0.0
        steps = self.knots * int(substeps)
        h, stages = _rho_stages(sched, self.t_start, self.rho0, self.rho1, steps,
                                _MIN_RHO if clean_end else 0.0)
        vel = _rf_velocity(denoiser, stages, x_init.shape[0], cond)
        kept: list = []
        with torch.no_grad():
            z = _rk4_in_rho(vel, x_init.to(_F64) / float(scale_ends[0]), h, steps,
                            every=int(substeps), keep=kept)
            kept.append((z, vel(z, 3 * steps - 1)))
        zs, dzs = zip(*kept, strict=True)
        self.z = torch.stack(zs)  # [knots + 1, B, ...]
        self.dz = torch.stack(dzs) * ((self.rho1 - self.rho0) / self.knots)  # d z / d knot
        self.x_init = x_init.to(_F64)
        self.end = (self.z[-1] * float(scale_ends[1])).to(_F64)  # x(0)
        self.seconds = time.perf_counter() - t0

    def __len__(self) -> int:
        return self.z.shape[1]

    def at(self, t: torch.Tensor, idx=None) -> torch.Tensor:
        """``x(t)`` for every time in ``t`` (float64 ``[m]``, may require grad) and the pool
        members ``idx`` (``None``: all): shape ``[m, B, ...]``."""
        t = torch.as_tensor(t, dtype=_F64).reshape(-1)
        z, dz = (self.z, self.dz) if idx is None else (self.z[:, idx], self.dz[:, idx])
        c = self.schedule(t)
        rho, scale = c.sigma / (c.alpha + c.sigma), c.alpha + c.sigma
        q = (rho - self.rho0) / (self.rho1 - self.rho0) * self.knots
        k = q.detach().floor().long().clamp(0, self.knots - 1)
        u = q - k
        shape = (-1,) + (1,) * (z.dim() - 1)
        u, scale = u.reshape(shape), scale.reshape(shape)
        h00, h10 = 2 * u**3 - 3 * u**2 + 1, u**3 - 2 * u**2 + u
        h01, h11 = -2 * u**3 + 3 * u**2, u**3 - u**2
        val = h00 * z[k] + h10 * dz[k] + h01 * z[k + 1] + h11 * dz[k + 1]
        return scale * val


def ground_truth_path(denoiser, noises: torch.Tensor, *, cond=None, knots: int = 64,
                      substeps: int = 4) -> GroundTruthPath:
    """The :class:`GroundTruthPath` of standard-normal ``noises`` (scaled by ``sigma(1)``)."""
    _check_noises(noises)
    return GroundTruthPath(denoiser, _start(denoiser, noises), cond=cond, knots=knots,
                           substeps=substeps)


def _check_noises(noises) -> None:
    if not torch.is_tensor(noises) or not noises.is_floating_point() or noises.dim() < 2:
        raise ValueError("noises must be a float tensor [B, ...] of standard-normal draws")


class BoundTerms:
    """The terms of the RMSE-bound for a pool of noises (see :meth:`BespokeSolver.rmse_bound`):
    ``bound [B]`` (per noise, ``sum_i M_i d_i``), ``local_errors [n, B]`` (``d_i``),
    ``step_lipschitz [n]`` (``L_i``), ``weights [n]`` (``M_i``); ``loss`` is the paper's
    ``L_RMSE-bound``, the mean of ``bound``."""

    def __init__(self, bound, local_errors, step_lipschitz, weights):
        self.bound, self.local_errors = bound, local_errors
        self.step_lipschitz, self.weights = step_lipschitz, weights

    @property
    def loss(self) -> torch.Tensor:
        return self.bound.mean()

    def __repr__(self) -> str:
        return (f"BoundTerms(loss={float(self.loss):.4g}, steps={self.local_errors.shape[0]}, "
                f"noises={self.local_errors.shape[1]})")


def _bound_terms(denoiser, path: GroundTruthPath, idx, t, dt, s, ds, base: str, lipschitz: float,
                 cond) -> BoundTerms:
    """The RMSE-bound terms of the bespoke ``base`` solver with node values ``t, dt, s, ds``
    (float64 tensors, differentiable), all n steps evaluated in parallel from the GT path."""
    order = _BASES[base]
    n = (len(t) - 1) // order
    h = 1.0 / n
    x0 = path.x_init if idx is None else path.x_init[idx]
    b = x0.shape[0]
    bounds = t[::order]  # t at the step boundaries r_i = i h
    inner = [path.at(bounds[1:-1], idx)] if n > 1 else []
    end = path.end if idx is None else path.end[idx]
    gt = torch.cat([x0[None], *inner, end[None]])  # x(t_i), i = 0..n: [n + 1, B, ...]
    start = gt[:-1].reshape(n * b, *x0.shape[1:])
    c = cond if idx is None else _take(cond, idx)
    if c is not None:
        if not torch.is_tensor(c):
            raise ValueError("loss='bound' needs cond as a tensor [B, ...] (or None)")
        c = torch.cat([c] * n)
    predict = Predictor(denoiser, c, None)
    shape = (n * b,) + (1,) * (x0.dim() - 1)

    def rows(v):  # per-step coefficient [n] -> per-row [n * B, 1, ...]
        return v.repeat_interleave(b).reshape(shape)

    lam = ds.abs() / s + dt.abs() * lipschitz  # Lipschitz constant of the transformed velocity
    if order == 1:
        si, sn = s[:-1], s[1:]
        a_, b_ = (si + h * ds[:-1]) / sn, h * dt[:-1] * si / sn
        u = predict(start, t[:-1].repeat_interleave(b)).velocity
        out = rows(a_) * start + rows(b_) * u
        lip = si / sn * (1 + h * lam[:-1])
    else:
        sj, sm, se = s[0:-1:2], s[1::2], s[2::2]
        a_, b_ = (sj + 0.5 * h * ds[0:-1:2]) / sm, 0.5 * h * dt[0:-1:2] * sj / sm
        c_, d_, e_ = sj / se, h * ds[1::2] / se, h * sm * dt[1::2] / se
        u = predict(start, t[0:-1:2].repeat_interleave(b)).velocity
        mid = rows(a_) * start + rows(b_) * u
        um = predict(mid, t[1::2].repeat_interleave(b)).velocity
        out = rows(c_) * start + rows(d_) * mid + rows(e_) * um
        lip = sj / se * (1 + h * lam[1::2] * (1 + 0.5 * h * lam[0:-1:2]))
    err = (gt[1:] - out.reshape(gt[1:].shape)).reshape(n, b, -1)
    d = torch.linalg.vector_norm(err, dim=2)  # [n, B]
    # M_i = prod_{j > i} L_j (the steps after step i amplify its local error), M_{n-1} = 1
    later = torch.flip(torch.cumprod(torch.flip(lip[1:], [0]), 0), [0])
    weights = torch.cat([later, torch.ones(1, dtype=later.dtype)])
    return BoundTerms((weights[:, None] * d).sum(0), d, lip, weights)


# -- BNS (non-stationary) solver ----------------------------------------------------------------

def linear_plan(solver: str, schedule, grid: torch.Tensor):
    """Express a registered *linear* solver on ``grid`` as a non-stationary solver: returns
    ``(times [n], a [n], b [n, n])`` with evaluation ``j`` at ``times[j]`` on the state
    ``x_j = a[j-1] x_init + sum_{k<j} b[j-1, k] x_hat_k`` (``x_0 = x_init``) and output
    ``x_n``. Found by running the solver on a probe denoiser whose k-th data prediction is the
    (k+1)-th unit vector, so the state carries its coefficients (valid for any solver that is
    linear in the state and the predictions: Euler, DDIM, Heun, DPM-Solver++, UniPC, ...)."""
    from . import solve as run_solver

    schedule = get_schedule(schedule)
    info = get_solver(solver)
    grid = torch.as_tensor(grid, dtype=_F64)
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
    x0 = torch.zeros(1, width, dtype=_F64)
    x0[0, 0] = 1.0
    with torch.no_grad():
        out = run_solver(den, x0, grid, solver)[0]
    if len(seen) != nfe:
        raise ValueError(f"solver {solver!r} made {len(seen)} calls, expected {nfe}")
    states = [st for _, st in seen[1:]] + [out]
    times = torch.tensor([tt for tt, _ in seen], dtype=_F64)
    a = torch.stack([st[0] for st in states])
    b = torch.stack([st[1:] for st in states])
    if not bool(torch.isfinite(a).all() & torch.isfinite(b).all()):
        raise ValueError(f"solver {solver!r} on this grid has non-finite coefficients")
    return times, a, b


class BNSSolver(_Fitted):
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
        times = torch.as_tensor(times, dtype=_F64).detach().flatten().clone()
        a = torch.as_tensor(a, dtype=_F64).detach().flatten().clone()
        b = torch.as_tensor(b, dtype=_F64).detach().clone()
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
        from . import grids as grids_mod

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
        x_init, ref = _targets(denoiser, noises, reference, cond)
        start = cls.from_solver(denoiser.schedule, base, grid, nfe=nfe, model=model)
        if start.nfe != nfe:
            raise ValueError(f"{base!r} on the given grid spends {start.nfe} evaluations, "
                             f"not nfe={nfe}")
        with torch.no_grad():
            init_rmse = float(endpoint_rmse(start.solve(denoiser, x_init, cond=cond).to(_F64),
                                            ref.to(_F64)))
        eps = 1e-6
        tt = start.times[1:].clamp(eps, 1 - eps)
        logit_t = torch.log(tt / (1 - tt)).requires_grad_()
        a = start.a.clone().requires_grad_()
        mask = torch.tril(torch.ones(nfe, nfe, dtype=_F64))
        b = start.b.clone().requires_grad_()
        first = torch.full((1,), start.t_start, dtype=_F64)

        def times():
            return torch.cat([first, torch.sigmoid(logit_t)])

        def run(idx):
            x0, c = (x_init, cond) if idx is None else (x_init[idx], _take(cond, idx))
            return _bns_steps(denoiser, x0, times(), a, b * mask, c, None, None)

        best, secs = _adam_fit([logit_t, a, b], run, ref, steps=steps, lr=lr,
                               desc=f"bns nfe={nfe}", progress=progress, batch_size=batch_size)
        fit = {"loss": "endpoint_rmse", "optimizer": "adam", "iterations": int(steps), "lr": lr,
               "init": base, "num_noises": int(ref.shape[0]), "batch_size": batch_size,
               "init_rmse": init_rmse,
               "train_rmse": best, "seconds": round(secs, 3)}
        with torch.no_grad():
            return cls(times(), a, b * mask, base=base, nfe=nfe, schedule=denoiser.schedule,
                       model=model, fit=fit)

    def solve(self, denoiser, x_init, *, cond=None, guidance=None, record=None):
        """Integrate ``x_init`` (the state at t_start) to t = 0 with exactly ``nfe`` calls."""
        self.check_denoiser(denoiser)
        return _bns_steps(denoiser, x_init, self.times.tolist(), self.a.tolist(),
                          self.b.tolist(), cond, guidance, record)

    def _tensors(self):
        return {"times": self.times, "a": self.a, "b": self.b}

    @classmethod
    def _from_tensors(cls, tensors, **kw):
        missing = {"times", "a", "b"} - set(tensors)
        if missing:
            raise ValueError(f"missing tensors {sorted(missing)}")
        return cls(tensors["times"], tensors["a"], tensors["b"], **kw)


def _bns_steps(denoiser, x_init, times, a, b, cond, guidance, record):
    predict = Predictor(denoiser, cond, guidance)
    tensor_times = torch.is_tensor(times)
    n = len(times)
    preds: list[torch.Tensor] = []
    x = x_init
    for j in range(n):
        tj = times[j].reshape(1).to(x_init.device) if tensor_times else float(times[j])
        pred = predict(x, tj)
        preds.append(pred.data)
        x_next = a[j] * x_init
        for k in range(j + 1):
            x_next = x_next + b[j][k] * preds[k]
        if record is not None:
            t_next = float(times[j + 1]) if j + 1 < n else 0.0
            record.append(StepRecord(float(times[j]), t_next, x, x_next, preds[-1]))
        x = x_next
    return x


# -- registry entry -----------------------------------------------------------------------------

_CACHE: dict[tuple[str, int, int], _Fitted] = {}


def _as_fitted(params) -> _Fitted:
    if isinstance(params, _Fitted):
        return params
    if isinstance(params, (str, Path)):
        p = Path(params)
        st = p.stat() if p.is_file() else None
        key = (str(p.resolve()), st.st_mtime_ns if st else 0, st.st_size if st else 0)
        if key not in _CACHE:
            _CACHE.clear()
            _CACHE[key] = load(p)
        return _CACHE[key]
    raise ValueError('solver "bespoke" needs options={"params": FILE or a fitted solver} '
                     "(write one with `tiltflow fit-solver`)")


@register("bespoke", order=1)
def bespoke(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None, record=None,
            params=None):
    """A fitted solver (bespoke / BNS / optimized grid) from options={"params": FILE}."""
    fitted = _as_fitted(params)
    fitted._check_grid(grid)
    if isinstance(fitted, FittedGrid):
        return fitted.solve(denoiser, x_init, cond=cond, guidance=guidance, record=record,
                            generator=generator)
    return fitted.solve(denoiser, x_init, cond=cond, guidance=guidance, record=record)
