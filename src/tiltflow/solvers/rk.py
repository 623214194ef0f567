"""Runge–Kutta solvers for the probability-flow ODE, and the float64 reference solution.

- ``midpoint`` (explicit midpoint, order 2, 2 evaluations a step), ``rk4`` (classic
  Runge–Kutta, order 4, 4 evaluations a step) and ``rk4_38`` (Kutta's 3/8 rule, the fixed-grid
  ``rk4`` of torchdiffeq / flow_matching) integrate ``dx_t/dt = alpha' x_hat + sigma' eps_hat``
  in the schedule's own time t, as flow_matching's ``ODESolver`` does.
- ``dopri5``: adaptive Dormand–Prince 5(4) with error control, and :func:`reference_solve`, the
  same integrator in float64 at tight tolerances (the "tight adaptive reference solution" of the
  ``solvers`` benchmark). Both integrate in the angle variable described below.

The clean end (sigma = 0)
-------------------------
At a time where ``sigma = 0`` no network evaluation can give the velocity: a data prediction
gives ``eps_hat = (x_t - alpha x_hat) / sigma = 0/0``, and on VP schedules ``sigma ~ sqrt(t)`` so
``sigma'`` is infinite. What *is* known there without the network is the Bayes-optimal pair
``x_hat = x_t / alpha`` and ``eps_hat = E[noise | x_t = alpha x] = E[noise] = 0`` (the state
carries no information about the noise); for data with a smooth density it is also the limit,
since ``eps_hat = -sigma grad log p_t -> 0``. The solvers use this and never call the network at
sigma = 0:

- ``midpoint`` never evaluates at the end of a step, so it needs nothing special.
- ``rk4`` / ``rk4_38`` on a final step that ends at t = 0: where ``sigma'`` is finite there (rectified flow,
  cosine, EDM) the last stage is the exact velocity ``(alpha'/alpha) x`` (``-x`` for rectified
  flow, 0 for cosine and EDM), so the step is the full RK4 step at the price of three
  evaluations. On VP schedules the limit ``-(sigma^2)'/2 * grad log p_0(x)`` needs the data score,
  which no evaluation at or near t = 0 gives stably; there (and on VE, whose t = 0 is not clean,
  to keep one NFE rule) the final step is Ralston's third-order method (nodes 0, 1/2, 3/4). A
  single step with an O(h^4) local error leaves the global order at 4 (as Heun's final Euler
  step does in EDM). Either way a grid ending at t = 0 costs ``4 * steps - 1`` evaluations.
- ``dopri5`` / :func:`reference_solve` integrate in ``phi = atan(sigma / alpha)`` (see below),
  where the field at sigma = 0 is exactly 0.

The angle variable
------------------
Two schedules with the same log-SNR give the same state up to the scale ``sqrt(alpha^2 +
sigma^2)`` (Kingma et al. 2021, "Variational Diffusion Models", sec. 5; Karras et al. 2022,
sec. 4 / eq. 4). With ``phi = atan(sigma / alpha) in [0, pi/2]`` and the normalised state
``z = x_t / sqrt(alpha^2 + sigma^2) = cos(phi) x_hat + sin(phi) eps_hat`` every schedule's PF-ODE
becomes the one ODE of the trigonometric (cosine) path (the "TrigFlow" of Lu & Song 2024)::

    dz/dphi = cos(phi) eps_hat - sin(phi) x_hat.

Its coefficients are bounded by 1 on the whole closed interval, both ends included, on every
schedule (in t, VP schedules have ``sigma' -> inf`` at t = 0; in log-SNR both ends are
infinitely far away), its right-hand side at ``phi = 0`` is exactly ``eps_hat = 0``, and for data
with a smooth density the solution is smooth in ``phi`` (``p_t`` is smooth in ``sigma^2`` and
``eps_hat = -sigma grad log p_t``), so the embedded error estimate is valid right up to both ends.
This avoids both stopping at a small t and finishing with a denoising step (which is
``O(sigma_min^2)`` off the ODE's endpoint) and any evaluation at 0/0. Piecewise-linear schedules
(``VPDiscrete``) have kinks in t but none in ``phi``.
"""

from __future__ import annotations

import math

import torch

from .registry import Predictor, StepRecord, register

__all__ = ["midpoint", "rk4", "rk4_38", "dopri5", "reference_solve"]

_F64 = torch.float64


# -- fixed-step Runge–Kutta in t -------------------------------------------------------------
def _clean_limits(schedule, grid: torch.Tensor) -> tuple[list, list]:
    """Per grid point: ``(clean, g)``; ``clean`` when sigma = 0 there, and then ``g`` is the float
    with velocity ``= g * x_t`` (``alpha'/alpha``, exact since ``eps_hat = 0``) when ``sigma'`` is
    finite, or ``None`` when it is not (VP schedules)."""
    c = schedule(grid.to(_F64))
    clean = (c.sigma == 0).tolist()
    ok = (torch.isfinite(c.d_sigma) & torch.isfinite(c.d_alpha) & (c.alpha > 0)).tolist()
    ratio = (c.d_alpha / c.alpha).tolist()
    return clean, [r if cl and k else None for cl, k, r in zip(clean, ok, ratio, strict=True)]


class _Velocity:
    """The PF-ODE velocity at a grid point or a stage time (python floats, coefficients
    precomputed for all of them before the loop); at a clean grid point with a finite limit it
    is ``g * x`` with no network call."""

    def __init__(self, denoiser, cond, guidance, grid, stage_times):
        self.ts = grid.tolist()
        self.predict = Predictor(denoiser, cond, guidance, times=self.ts + stage_times,
                                 reads=("velocity", "data"))
        clean, self.limit = _clean_limits(denoiser.schedule, grid)
        self.inv_alpha = [1.0 / a if a > 0 else math.inf
                          for a in denoiser.schedule(grid.to(_F64)).alpha.tolist()]
        for i, (cl, g) in enumerate(zip(clean[:-1], self.limit[:-1], strict=True)):
            if cl and g is None:
                raise ValueError(
                    f"the grid starts a step at t={self.ts[i]:g}, where sigma = 0 and this "
                    f"schedule's velocity is singular (sigma' = inf); start at a small t > 0 "
                    "(noise level ~1e-3), as inversion and likelihood do"
                )

    def at_node(self, x, i, data: bool = False):
        """Velocity and, with ``data=True`` (for ``record``; else ``None``, which saves its two
        tensor operations), the data prediction at grid point ``i``."""
        g = self.limit[i]
        if g is not None:
            return g * x, x * self.inv_alpha[i] if data else None
        pred = self.predict(x, self.ts[i])
        return pred.velocity, pred.data if data else None

    def at(self, x, t: float):
        return self.predict(x, t).velocity

    # A stage whose velocity enters one combination only is that combination, read straight
    # from the network output (velocity is linear in it and x): two tensor operations instead
    # of two to form the velocity and one to add it.
    def euler_at_node(self, x, i, dt: float, data: bool = False, base=None):
        """``base + dt * v(x, t_i)`` (``base`` defaults to ``x``) at grid point ``i``, and the
        data prediction as in :meth:`at_node`."""
        if self.limit[i] is not None:
            v, x_hat = self.at_node(x, i, data)
            return torch.add(x if base is None else base, v, alpha=dt), x_hat
        pred = self.predict(x, self.ts[i])
        out = pred.combine(x_t=1.0, velocity=dt) if base is None else \
            pred.combine(velocity=dt, plus=base)
        return out, pred.data if data else None

    def euler_at(self, x, t: float, dt: float, base):
        """``base + dt * v(x, t)``."""
        return self.predict(x, t).combine(velocity=dt, plus=base)


def _record(record, grid, i, x, x_next, data):
    if record is not None:
        record.append(StepRecord(float(grid[i]), float(grid[i + 1]), x, x_next, data))


@register("midpoint", order=2, evals_per_step=2)
def midpoint(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None, record=None):
    """Explicit midpoint rule (Runge 1895; Hairer, Nørsett & Wanner, "Solving ODEs I", 2nd ed.
    1993, sec. II.1: ``k1 = v(t, x)``, ``k2 = v(t + h/2, x + h/2 k1)``, ``x' = x + h k2``) on
    the PF-ODE velocity in the schedule's time t. Its stages never fall on the end of a step,
    so it never evaluates at t = 0 (sigma = 0). 2 evaluations a step."""
    half = ((grid[:-1] + grid[1:]) / 2).tolist()
    vel = _Velocity(denoiser, cond, guidance, grid, half)
    dts = (grid[1:] - grid[:-1]).tolist()
    x = x_init
    for i, h in enumerate(dts):
        x_half, data = vel.euler_at_node(x, i, 0.5 * h, record is not None)  # x + h/2 k1
        x_next = vel.euler_at(x_half, half[i], h, base=x)  # x + h k2, k2 = v(t + h/2, x_half)
        _record(record, grid, i, x, x_next, data)
        x = x_next
    return x


# Explicit Runge-Kutta tableaux (c, a, b) (Hairer, Norsett & Wanner, "Solving ODEs I",
# Tables II.1.1-2): Euler; explicit midpoint and Heun (2nd order); classical RK4 and Kutta's
# 3/8 rule (Kutta 1901). The fixed-step solvers below and the likelihood ODE use them.
TABLEAUX = {
    "euler": ((0.0,), ((),), (1.0,)),
    "midpoint": ((0.0, 0.5), ((), (0.5,)), (0.0, 1.0)),
    "heun": ((0.0, 1.0), ((), (1.0,)), (0.5, 0.5)),
    "rk4": ((0.0, 0.5, 0.5, 1.0), ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
            (1 / 6, 1 / 3, 1 / 3, 1 / 6)),
    "rk4_38": ((0.0, 1 / 3, 2 / 3, 1.0), ((), (1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)),
               (1 / 8, 3 / 8, 3 / 8, 1 / 8)),
}


def _lin(x, h: float, coefs, ks):
    """``x + h * sum(c * k)`` over the nonzero coefficients."""
    out = x
    for c, k in zip(coefs, ks, strict=True):
        if c != 0.0:
            out = torch.add(out, k, alpha=h * c)
    return out


def _four_stage(tableau, denoiser, x_init, grid, cond, guidance, record):
    """A four-stage fourth-order explicit RK method on the PF-ODE velocity in t, with the clean
    final step of the module docstring (``k4`` exact where ``sigma'`` is finite at t = 0, else
    Ralston's third-order step)."""
    (_, c2, c3, _), (_, *rows), weights = TABLEAUX[tableau]
    steps = grid[:-1], grid[1:] - grid[:-1]
    stage2 = (steps[0] + c2 * steps[1]).tolist()
    stage3 = (steps[0] + c3 * steps[1]).tolist()
    half = (steps[0] + 0.5 * steps[1]).tolist()
    three_q = (steps[0] + 0.75 * steps[1]).tolist()
    vel = _Velocity(denoiser, cond, guidance, grid, stage2 + stage3 + half[-1:] + three_q[-1:])
    ralston_last = float(grid[-1]) == 0.0 and vel.limit[-1] is None
    dts = steps[1].tolist()
    n = len(dts)
    x = x_init
    for i, h in enumerate(dts):
        k1, data = vel.at_node(x, i, record is not None)
        if ralston_last and i == n - 1:
            k2 = vel.at(torch.add(x, k1, alpha=0.5 * h), half[i])
            k3 = vel.at(torch.add(x, k2, alpha=0.75 * h), three_q[i])
            x_next = _lin(x, h, (2 / 9, 1 / 3, 4 / 9), (k1, k2, k3))
        else:
            k2 = vel.at(_lin(x, h, rows[0], (k1,)), stage2[i])
            k3 = vel.at(_lin(x, h, rows[1], (k1, k2)), stage3[i])
            # x' = x + h (b1 k1 + b2 k2 + b3 k3) + h b4 k4, k4 = v(t + h, x4)
            x4, partial = _lin(x, h, rows[2], (k1, k2, k3)), _lin(x, h, weights[:3], (k1, k2, k3))
            x_next, _ = vel.euler_at_node(x4, i + 1, h * weights[3], base=partial)
        _record(record, grid, i, x, x_next, data)
        x = x_next
    return x


@register("rk4", order=4, evals_per_step=4, skips_last_eval=True)
def rk4(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None, record=None):
    """Classic fourth-order Runge–Kutta (Kutta 1901; Hairer, Nørsett & Wanner 1993, sec. II.1)
    on the PF-ODE velocity in the schedule's time t: ``k1 = v(t, x)``, ``k2 = v(t + h/2,
    x + h/2 k1)``, ``k3 = v(t + h/2, x + h/2 k2)``, ``k4 = v(t + h, x + h k3)``,
    ``x' = x + h/6 (k1 + 2 k2 + 2 k3 + k4)``.

    A final step to t = 0 never calls the network at t = 0 (see the module docstring): where
    sigma' is finite there (rectified flow, cosine, EDM) ``k4 = (alpha'/alpha) x`` exactly; on VP
    schedules (and VE) that step is Ralston's third-order method (Ralston 1962, "Runge-Kutta
    methods with minimum error bounds", Math. Comp. 16: ``k2`` at ``h/2``, ``k3 = v(t + 3h/4,
    x + 3h/4 k2)``, ``x' = x + h (2 k1 + 3 k2 + 4 k3) / 9``), whose one O(h^4) local error keeps
    the global order 4. So ``nfe = 4 * steps - 1`` on a grid ending at t = 0, else
    ``4 * steps``."""
    return _four_stage("rk4", denoiser, x_init, grid, cond, guidance, record)


@register("rk4_38", order=4, evals_per_step=4, skips_last_eval=True)
def rk4_38(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None, record=None):
    """Kutta's 3/8 rule (Kutta 1901; Hairer, Nørsett & Wanner 1993, Table II.1.2), the other
    classical fourth-order method: ``k2 = v(t + h/3, x + h/3 k1)``, ``k3 = v(t + 2h/3,
    x + h (-k1/3 + k2))``, ``k4 = v(t + h, x + h (k1 - k2 + k3))``, ``x' = x + h/8 (k1 + 3 k2 +
    3 k3 + k4)``. Its error constants are smaller than the classic rule's; it is the method
    torchdiffeq's (and so flow_matching's) fixed-grid ``rk4`` uses. Same clean final step and
    NFE rule as :func:`rk4`."""
    return _four_stage("rk4_38", denoiser, x_init, grid, cond, guidance, record)


# -- adaptive Dormand–Prince 5(4) in the angle variable ----------------------------------------
# Dormand & Prince 1980, Table 2 (RK5(4)7M); Hairer, Nørsett & Wanner 1993, Table II.5.2.
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),  # = b (5th order), FSAL
)
# e = b - b_hat (b_hat the embedded 4th-order weights)
_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)

_SAFETY, _FAC_MIN, _FAC_MAX = 0.9, 0.2, 10.0  # HNW sec. II.4 step-size controller constants

def _norm(e: torch.Tensor) -> float:
    """Per-example RMS (Hairer's scaled norm), maximised over the batch: each trajectory of the
    batch meets the tolerance on its own."""
    return float(e.pow(2).flatten(1).mean(1).sqrt().max())


class _AngleField:
    """``dz/dphi = cos(phi) eps_hat - sin(phi) x_hat`` with the denoiser evaluated at
    ``(r z, t(phi))``, ``r = sqrt(alpha^2 + sigma^2)``; at ``phi = 0`` (sigma = 0) the field is
    exactly 0 and the network is not called."""

    def __init__(self, predict, schedule, t_lo: float, t_hi: float, device):
        self.predict, self.schedule = predict, schedule
        self.t_lo, self.t_hi, self.device = t_lo, t_hi, device

    def angles(self, ts: list[float]) -> tuple[list[float], list[float]]:
        """``phi`` and the scale ``r`` at the given times."""
        c = self.schedule(torch.tensor(ts, dtype=_F64))
        phi = torch.atan2(c.sigma.abs(), c.alpha)
        return phi.tolist(), torch.sqrt(c.alpha**2 + c.sigma**2).tolist()

    def times(self, phis: list[float]) -> tuple[list[float], list[float]]:
        """``t`` and ``r`` at the given angles (``logsnr = -2 log tan phi``)."""
        lam = -2 * torch.log(torch.tan(torch.tensor(phis, dtype=_F64)))
        t = self.schedule.t_from_logsnr(lam).to(_F64).clamp(self.t_lo, self.t_hi)
        c = self.schedule(t)
        return t.tolist(), torch.sqrt(c.alpha**2 + c.sigma**2).tolist()

    def __call__(self, z, phi: float, t: float, r: float):
        if phi == 0.0:
            return torch.zeros_like(z), z
        pred = self.predict(r * z, torch.tensor(t, dtype=_F64, device=self.device))
        x_hat = pred.data
        return math.cos(phi) * pred.noise - math.sin(phi) * x_hat, x_hat


def _check_tolerances(rtol, atol, max_nfe, dtype):
    for name, v in (("rtol", rtol), ("atol", atol)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"{name} must be a positive number, got {v!r}")
    floor = 10 * torch.finfo(dtype).eps
    if rtol < floor:
        raise ValueError(f"rtol={rtol:g} is below what {dtype} resolves (>= {floor:.1e}); "
                         "pass a float64 state or a looser rtol")
    if isinstance(max_nfe, bool) or not isinstance(max_nfe, int) or max_nfe < 2:
        raise ValueError(f"max_nfe must be an int >= 2, got {max_nfe!r}")


def _dopri5_run(denoiser, x_init, grid, cond, guidance, record, rtol, atol, max_nfe, stats):
    """Integrate from ``grid[0]`` to ``grid[-1]`` (either direction), landing on every grid
    point; returns the state at ``grid[-1]``."""
    if stats is not None and not isinstance(stats, dict):
        raise TypeError(f"stats must be None or a dict to fill, got {type(stats).__name__}")
    _check_tolerances(rtol, atol, max_nfe, x_init.dtype)
    predict = Predictor(denoiser, cond, guidance)
    t_stops = grid.to(_F64).tolist()
    field = _AngleField(predict, denoiser.schedule, min(t_stops), max(t_stops), x_init.device)
    phi_stops, r_stops = field.angles(t_stops)
    if any(b == a for a, b in zip(phi_stops[:-1], phi_stops[1:], strict=True)):
        raise ValueError("two grid times have the same noise level under this schedule")
    sign = 1.0 if phi_stops[-1] > phi_stops[0] else -1.0

    phi, t, r = phi_stops[0], t_stops[0], r_stops[0]
    z = x_init / r
    k1, data = field(z, phi, t, r)
    if not bool(torch.isfinite(k1).all()):
        raise ValueError(f"the denoiser gave non-finite predictions at t={t:g} (a noise-"
                         "predicting model cannot give x_hat where alpha = 0; start at t < 1)")

    # Starting step size: Hairer, Nørsett & Wanner 1993, sec. II.4 ("Starting Step Size"), p = 5.
    span = abs(phi_stops[-1] - phi)
    sc = atol + rtol * z.abs()
    d0, d1 = _norm(z / sc), _norm(k1 / sc)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    h0 = min(h0, abs(phi_stops[1] - phi))
    phi_probe = phi + sign * h0
    (t_probe,), (r_probe,) = field.times([phi_probe])
    k_probe, _ = field(z + (sign * h0) * k1, phi_probe, t_probe, r_probe)
    d2 = _norm((k_probe - k1) / sc) / h0
    m = max(d1, d2)
    h1 = max(1e-6, h0 * 1e-3) if m <= 1e-15 else (0.01 / m) ** 0.2
    h = min(100 * h0, h1, span)

    accepted = rejected = 0
    stop = 1
    fac_max = _FAC_MAX
    while True:
        target = phi_stops[stop]
        remaining = abs(target - phi)
        land = h * 1.0001 >= remaining
        h_step = remaining if land else h
        hs = sign * h_step
        stage_phis = [phi + c * hs for c in _C[1:5]]
        phi_new = target if land else phi + hs
        ts, rs = field.times(stage_phis + ([] if land else [phi_new]))
        t_new, r_new = (t_stops[stop], r_stops[stop]) if land else (ts[4], rs[4])
        stage = list(zip(stage_phis, ts[:4], rs[:4], strict=True)) + [(phi_new, t_new, r_new)]

        ks = [k1]
        for s in range(1, 6):
            ks.append(field(_lin(z, hs, _A[s], ks), *stage[s - 1])[0])
        z_new = _lin(z, hs, _A[6], ks)
        k7, data_new = field(z_new, phi_new, t_new, r_new)
        ks.append(k7)
        err = _lin(torch.zeros_like(z), hs, _E, ks)
        scale = atol + rtol * torch.maximum(z.abs(), z_new.abs())
        err_norm = _norm(err / scale)

        if err_norm <= 1.0:  # accept (err_norm is False-y for NaN: rejected below)
            accepted += 1
            if record is not None:
                record.append(StepRecord(t, t_new, r * z, r_new * z_new, data))
            z, phi, t, r, k1, data = z_new, phi_new, t_new, r_new, k7, data_new
            fac = fac_max if err_norm == 0 else min(fac_max, max(_FAC_MIN, _SAFETY * err_norm**-0.2))
            h = h_step * fac
            fac_max = _FAC_MAX
            if land:
                stop += 1
                if stop == len(phi_stops):
                    break
        else:
            rejected += 1
            fac = _FAC_MIN if not math.isfinite(err_norm) else max(_FAC_MIN, _SAFETY * err_norm**-0.2)
            h = h_step * min(1.0, fac)
            fac_max = 1.0  # no growth right after a rejection (HNW sec. II.4)
        if predict.calls > max_nfe:
            raise RuntimeError(
                f"dopri5 spent {predict.calls} evaluations (max_nfe={max_nfe}) and reached "
                f"t={t:.3g} of {t_stops[-1]:g}; loosen rtol/atol or raise max_nfe"
            )
        if h < 1e-13 * max(1.0, abs(phi)):
            raise RuntimeError(f"dopri5 step size underflow at t={t:.3g} (non-finite or "
                               "non-smooth denoiser output?)")
    if stats is not None:
        stats.update(nfe=predict.calls, steps=accepted, rejected=rejected)
    return r * z


def dopri5(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None, record=None,
           rtol: float = 1e-5, atol: float = 1e-5, max_nfe: int = 10_000,
           stats: dict | None = None):
    """Adaptive Dormand–Prince 5(4) (Dormand & Prince 1980, "A family of embedded Runge-Kutta
    formulae", J. Comput. Appl. Math. 6, Table 2) with FSAL, local extrapolation, error control
    ``err = ||h sum (b - b_hat) k / (atol + rtol max(|z|, |z'|))|| <= 1`` and the step-size
    controller and starting step of Hairer, Nørsett & Wanner 1993, sec. II.4.

    Integrates the PF-ODE in the angle ``phi = atan(sigma/alpha)`` with the normalised state
    ``z = x_t / sqrt(alpha^2 + sigma^2)`` (module docstring): correct up to both ends on every
    schedule, with no evaluation at sigma = 0. ``rtol``/``atol`` apply to ``z`` (unit scale at
    every noise level, so a tolerance means the same on every schedule); the norm is the RMS
    per example, maximised over the batch. From ``grid[0]`` to ``grid[-1]``; interior grid
    points are output times: steps are shortened to land on them and ``record`` gets one
    :class:`StepRecord` per accepted step. ``max_nfe`` is a budget: exceeding it raises
    ``RuntimeError``. Pass ``stats={}`` to receive ``nfe``, ``steps``, ``rejected``.

    Its NFE is not fixed, so ``sample(..., nfe=N)`` raises; use ``steps=1`` and ``options``.
    Each attempted step reads its error norm (one device sync), by the nature of the method.
    """
    return _dopri5_run(denoiser, x_init, grid, cond, guidance, record, rtol, atol, max_nfe, stats)


register("dopri5", order=5, evals_per_step=6, adaptive=True)(dopri5)


def reference_solve(denoiser, x_init: torch.Tensor, t_start: float = 1.0, t_end: float = 0.0,
                    rtol: float = 1e-10, atol: float = 1e-10, *, cond=None, guidance=None,
                    max_nfe: int = 200_000, stats: dict | None = None) -> torch.Tensor:
    """The PF-ODE's exact map from ``x_init`` at ``t_start`` to ``t_end``, to tolerance, in
    float64: :func:`dopri5` at tight tolerances on the angle variable (the solver benchmark's
    "tight adaptive reference solution"). Either direction (``t_start < t_end`` inverts).

    Accurate at the singular ends: in ``phi = atan(sigma/alpha)`` the field
    ``cos(phi) eps_hat - sin(phi) x_hat`` is bounded on the closed interval and smooth for
    data with a smooth density, and at sigma = 0 it is exactly 0 (``eps_hat = E[noise] = 0``), so
    neither an infinite ``sigma'`` (VP at t = 0) nor 0/0 or a stop at a small t (which would leave
    an O(sigma_min^2) error) enters. The denoiser must accept float64 input. Returns float64.
    """
    if not torch.is_tensor(x_init) or not x_init.is_floating_point() or x_init.dim() < 2:
        raise ValueError("x_init must be a float tensor of shape [B, ...] (batch first)")
    t_start, t_end = float(t_start), float(t_end)
    if not (0.0 <= t_start <= 1.0 and 0.0 <= t_end <= 1.0) or t_start == t_end:
        raise ValueError(f"need two different times in [0, 1], got t_start={t_start}, "
                         f"t_end={t_end}")
    if cond is not None and (not torch.is_tensor(cond) or cond.shape[:1] != x_init.shape[:1]):
        raise ValueError(f"cond must be a tensor with leading dim {x_init.shape[0]} (the batch)")
    grid = torch.tensor([t_start, t_end], dtype=_F64)
    with torch.no_grad():
        return _dopri5_run(denoiser, x_init.to(_F64), grid, cond, guidance, None, rtol, atol,
                           max_nfe, stats)
