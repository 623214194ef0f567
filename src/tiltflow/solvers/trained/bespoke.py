"""Bespoke solvers (Shaul et al. 2023, "Bespoke Solvers for Generative Flow Models", ICLR 2024):
a scale-time transformation of the base RK1 (Euler) / RK2 (midpoint) solver, fitted for one
model at one NFE, on the endpoint RMSE or on the paper's RMSE bound along a ground-truth path.
"""

from __future__ import annotations

import math
import time

import torch

from ...schedules import Schedule, get_schedule
from ..reference import reference_path
from ..registry import Predictor
from ..rk import clean_limit
from .base import (
    F64,
    FittedSolver,
    adam_fit,
    adam_loop,
    check_noises,
    endpoint_rmse,
    fit_targets,
    select,
    start_state,
)

__all__ = ["BespokeSolver", "GroundTruthPath", "ground_truth_path", "BoundTerms", "LOSSES"]


# -- rectified-flow coordinates -------------------------------------------------------------------

def _rf_coords(schedule: Schedule, t: torch.Tensor):
    """Rectified-flow time ``rho = sigma / (alpha + sigma)`` and scale ``alpha + sigma`` at t."""
    c = schedule(t.to(F64))
    return c.sigma / (c.alpha + c.sigma), c.alpha + c.sigma


def _t_from_rho(schedule: Schedule, rho: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        lam = 2 * (torch.log1p(-rho) - torch.log(rho))
        return schedule.t_from_logsnr(lam).clamp(0.0, 1.0)



def _grid_from_logits(theta: torch.Tensor, t_start: float) -> torch.Tensor:
    inc = torch.softmax(theta.clamp(-30, 30), 0)
    grid = t_start * (1 - torch.cat([torch.zeros(1, dtype=F64), torch.cumsum(inc, 0)]))
    grid[-1] = 0.0
    return grid


def _base_name(base: str) -> str:
    if base not in BespokeSolver.BASES:
        raise ValueError(f"bespoke base solver must be one of {sorted(BespokeSolver.BASES)}, got {base!r}")
    return "euler" if BespokeSolver.BASES[base] == 1 else "midpoint"


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


class BespokeSolver(FittedSolver):
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
    BASES = {"euler": 1, "rk1": 1, "midpoint": 2, "rk2": 2}  # base solver -> stages

    def __init__(self, t, dt, s, ds, *, base: str = "midpoint", **kw):
        base = _base_name(base)
        t, dt, s, ds = (torch.as_tensor(v, dtype=F64).detach().flatten().clone()
                         for v in (t, dt, s, ds))
        order = BespokeSolver.BASES[base]
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
        order = BespokeSolver.BASES[base]
        if nfe < order or nfe % order:
            raise ValueError(f"a bespoke {base} solver needs nfe a positive multiple of {order}, "
                             f"got nfe={nfe}")
        nodes = nfe + 1  # euler: n + 1 nodes; midpoint: 2n + 1 = nfe + 1
        r = torch.linspace(0, 1, nodes, dtype=F64)
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
        check_noises(noises)
        if loss == "bound":
            if path is None:
                path = ground_truth_path(denoiser, noises, cond=cond, knots=gt_knots)
            elif path.x_init.shape != noises.shape or \
                    not torch.equal(path.x_init, start_state(denoiser, noises).to(F64)):
                raise ValueError("path must be the GroundTruthPath of these noises "
                                 "(tiltflow.solvers.bespoke.ground_truth_path(den, noises))")
            if reference is None:
                reference = path.end.to(noises.dtype)
        x_init, ref = fit_targets(denoiser, noises, reference, cond)
        inits = ["identity", "rectified_flow"] if init == "auto" else [init]
        cands = [cls.identity(denoiser.schedule, nfe, base, init=i, model=model) for i in inits]

        def err(c):
            with torch.no_grad():
                return float(endpoint_rmse(c.solve(denoiser, x_init, cond=cond).to(F64),
                                           ref.to(F64)))

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
        zero = torch.zeros(1, dtype=F64)

        def nodes():
            t = _grid_from_logits(logits, start.t_start)
            t = torch.cat([t[:-1], zero])  # keep the graph; exact 0 at the end
            return t, -torch.exp(log_mdt), torch.exp(torch.cat([zero, log_s])), ds

        params = [logits, log_mdt, log_s, ds]
        desc = f"bespoke {start.base} nfe={nfe} ({loss})"
        if loss == "rmse":
            def run(idx):
                x0, c = (x_init, cond) if idx is None else (x_init[idx], select(cond, idx))
                return _bespoke_steps(denoiser, x0, *nodes(), start.base, c, None, None)

            best, secs = adam_fit(params, run, ref, steps=steps, lr=lr, desc=desc,
                                   progress=progress, batch_size=batch_size)
        else:
            def bound_loss(idx):
                return _bound_terms(denoiser, path, idx, *nodes(), start.base, lip, cond).loss

            init_bound = bound_of(start)
            best, secs = adam_loop(params, bound_loss, x_init.shape[0], steps=steps, lr=lr,
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
        r = torch.linspace(0, 1, nodes, dtype=F64)
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
    def solve(self, denoiser, x_init, *, cond=None, guidance=None, record=None, hook=None,
              generator=None):
        """Integrate ``x_init`` (the state at t_start) to t = 0 with exactly ``nfe`` calls."""
        self.check_denoiser(denoiser)
        return _bespoke_steps(denoiser, x_init, self.t, self.dt, self.s, self.ds, self.base, cond,
                              guidance, record, hook)

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
    rho_start, scale_start = (float(v) for v in _rf_coords(schedule, torch.ones(1, dtype=F64)))

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


def _bespoke_steps(denoiser, x_init, t, dt, s, ds, base, cond, guidance, record, hook=None):
    """The Bespoke RK1/RK2 loop (see :class:`BespokeSolver`) on float64 tensors ``t, dt, s, ds``
    (differentiable when fitting)."""
    predict = Predictor(denoiser, cond, guidance, record, hook)
    points = denoiser.schedule.points(t)
    order = BespokeSolver.BASES[base]
    steps = (len(t) - 1) // order
    h = 1.0 / steps
    x = x_init
    for i in range(steps):
        j, m, e = order * i, order * i + 1, order * i + order
        pred = predict(x, points[j])
        if order == 1:  # x' = ((s + h s') x + h t' s u) / s_next
            x_next = (s[j] + h * ds[j]) / s[e] * x + h * dt[j] * s[j] / s[e] * pred.velocity
        else:  # the transformed midpoint rule
            x_mid = ((s[j] + 0.5 * h * ds[j]) / s[m] * x
                     + 0.5 * h * dt[j] * s[j] / s[m] * pred.velocity)
            x_next = (s[j] / s[e] * x + h * ds[m] / s[e] * x_mid
                      + h * s[m] * dt[m] / s[e] * predict(x_mid, points[m]).velocity)
        x = predict.end_step(points[j], points[e], x, x_next, pred)
    return x


# -- the RMSE-bound loss (Shaul et al. 2023, sec. 2) ---------------------------------------------

LOSSES = ("rmse", "bound")


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

    The states come from :func:`~tiltflow.solvers.reference.reference_path` (the one reference
    solver) at ``knots + 1`` times uniform in the rectified-flow time ``rho = sigma / (alpha +
    sigma)``; in the coordinates ``z = x_t / (alpha + sigma)`` the PF-ODE is ``dz/drho =
    eps_hat - x_hat``, smooth on every schedule (a scale-time change, Shaul et al. 2023,
    sec. 2), so :meth:`at` evaluates the C^1 cubic Hermite interpolant of ``z`` and ``dz/drho``
    at the knots, ``x(t) = (alpha(t) + sigma(t)) z(rho(t))``. Its derivative in ``t`` is the
    interpolant's, i.e. the PF-ODE velocity ``u_t(x(t))`` to interpolation accuracy: the paper
    gets the same gradient with ``x_aux = x(sg t) + u_t(x(sg t)) (t - sg t)`` (Algorithm 3).

    Memory: ``2 (knots + 1)`` float64 copies of the pool (``x_init``).
    """

    def __init__(self, denoiser, x_init: torch.Tensor, *, cond=None, knots: int = 64,
                 t_start: float = 1.0):
        if int(knots) != knots or knots < 1:
            raise ValueError(f"knots must be a positive integer, got {knots}")
        self.schedule = sched = denoiser.schedule
        self.knots, self.t_start = int(knots), float(t_start)
        t0 = time.perf_counter()
        ends = torch.tensor([self.t_start, 0.0], dtype=F64)
        rho_ends, _ = _rf_coords(sched, ends)
        self.rho0, self.rho1 = float(rho_ends[0]), float(rho_ends[1])
        rho = torch.linspace(self.rho0, self.rho1, self.knots + 1, dtype=F64)
        times = _t_from_rho(sched, rho.clamp(1e-300, 1.0))
        times[0], times[-1] = self.t_start, 0.0
        states = reference_path(denoiser, x_init, times, cond=cond)  # [knots + 1, B, ...]
        _, scales = _rf_coords(sched, times)
        shape = (-1,) + (1,) * (states.dim() - 1)
        self.z = states / scales.reshape(shape)
        self.dz = torch.stack([self._dz_drho(denoiser, x, p, cond)
                               for x, p in zip(states, sched.points(times), strict=True)])
        self.dz = self.dz * ((self.rho1 - self.rho0) / self.knots)  # d z / d knot
        self.x_init = x_init.to(F64)
        self.end = states[-1]  # x(0)
        self.seconds = time.perf_counter() - t0

    @staticmethod
    def _dz_drho(denoiser, x_t, point, cond):
        """``dz/drho = eps_hat - x_hat``; at sigma = 0 the exact limit ``eps_hat = 0`` (no
        network call there)."""
        with torch.no_grad():
            pred = clean_limit(x_t, point) if float(point.coeffs.sigma) == 0 else \
                denoiser(x_t, point, cond)
            return (pred.noise - pred.data).to(F64)

    def __len__(self) -> int:
        return self.z.shape[1]

    def at(self, t: torch.Tensor, idx=None) -> torch.Tensor:
        """``x(t)`` for every time in ``t`` (float64 ``[m]``, may require grad) and the pool
        members ``idx`` (``None``: all): shape ``[m, B, ...]``."""
        t = torch.as_tensor(t, dtype=F64).reshape(-1)
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


def ground_truth_path(denoiser, noises: torch.Tensor, *, cond=None, knots: int = 64
                      ) -> GroundTruthPath:
    """The :class:`GroundTruthPath` of standard-normal ``noises`` (scaled by ``sigma(1)``)."""
    check_noises(noises)
    return GroundTruthPath(denoiser, start_state(denoiser, noises), cond=cond, knots=knots)


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
    order = BespokeSolver.BASES[base]
    n = (len(t) - 1) // order
    h = 1.0 / n
    x0 = path.x_init if idx is None else path.x_init[idx]
    b = x0.shape[0]
    bounds = t[::order]  # t at the step boundaries r_i = i h
    inner = [path.at(bounds[1:-1], idx)] if n > 1 else []
    end = path.end if idx is None else path.end[idx]
    gt = torch.cat([x0[None], *inner, end[None]])  # x(t_i), i = 0..n: [n + 1, B, ...]
    start = gt[:-1].reshape(n * b, *x0.shape[1:])
    c = cond if idx is None else select(cond, idx)
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

