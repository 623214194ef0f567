"""The reference solution of the probability-flow ODE: adaptive Dormand–Prince 5(4) in the
angle variable, registered as the solver ``dopri5`` and, at tight float64 tolerances, as
:func:`reference_solve` (the "tight adaptive reference solution" every benchmark and fitted
solver is measured against).

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

from .registry import Predictor, StepRecord, linear_combination, register

__all__ = ["dopri5", "reference_solve", "reference_path"]

_F64 = torch.float64


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
            ks.append(field(z + hs * linear_combination(_A[s], ks), *stage[s - 1])[0])
        z_new = z + hs * linear_combination(_A[6], ks)
        k7, data_new = field(z_new, phi_new, t_new, r_new)
        ks.append(k7)
        err = hs * linear_combination(_E, ks)
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
           hook=None, rtol: float = 1e-5, atol: float = 1e-5, max_nfe: int = 10_000,
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
    if hook is not None:
        raise ValueError("dopri5 chooses its own steps; a step hook needs a fixed-grid solver")
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


def reference_path(denoiser, x_init: torch.Tensor, times, rtol: float = 1e-10,
                   atol: float = 1e-10, *, cond=None, max_nfe: int = 200_000) -> torch.Tensor:
    """The PF-ODE's states at each of ``times`` (monotone, ``times[0]`` the time of
    ``x_init``): one :func:`reference_solve` run that lands on every time. Returns float64
    ``[len(times), B, ...]``."""
    grid = torch.as_tensor(times, dtype=_F64).flatten()
    record: list[StepRecord] = []
    with torch.no_grad():
        _dopri5_run(denoiser, x_init.to(_F64), grid, cond, None, record, rtol, atol, max_nfe,
                    None)
    stops = grid.tolist()
    landed = [r.x_next for r in record if r.t_next in set(stops[1:])]
    if len(landed) != len(stops) - 1:
        raise RuntimeError(f"the reference landed on {len(landed)} of {len(stops) - 1} times")
    return torch.stack([x_init.to(_F64), *landed])
