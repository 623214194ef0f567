"""DPM-Solver-v3 (Zheng, Lu, Chen & Zhu, NeurIPS 2023, "DPM-Solver-v3: Improved Diffusion ODE
Solver with Empirical Model Statistics", arXiv:2310.13268): a multistep exponential integrator
whose parameterization of the model is fitted to the model itself.

Notation: ``lambda = log(alpha / sigma)`` (half log-SNR), ``y = x_t / alpha`` (the state in the
variance-exploding scale), ``eps`` the noise prediction, ``x_hat`` the data prediction. Every
quantity below is per dimension (elementwise); ``l, s, b`` are vectors shaped like one sample.

The method (paper sec. 3)
-------------------------
1. **Rewritten ODE** (paper eqs. 4-5). For any ``l_lambda`` the PF-ODE
   ``dx/dlambda = (d log alpha/dlambda) x - sigma eps`` is
   ``dx/dlambda = (d log alpha/dlambda - l) x - alpha f`` with the *linear-corrected* model
   ``f = (sigma eps - l x) / alpha = e^{-lambda} eps - l y = (1 - l) y - x_hat``,
   so with ``L(lambda) = int l``::

       x_t = alpha_t e^{-(L_t - L_s)} [ x_s / alpha_s - int_{lambda_s}^{lambda_t} e^{L - L_s} f dlambda ].

   ``l = 0`` is DPM-Solver's noise form, ``l = 1`` DPM-Solver++'s data form (``f = -x_hat``).
2. **Scaled and shifted model** (paper eq. 6). With ``S = int s`` and
   ``B_s(lambda) = int_{lambda_s}^{lambda} e^{-(S - S_s)} b``, the solver Taylor-expands
   ``g = e^{-(S - S_s)} f - B_s`` instead of ``f``: ``f = e^{S - S_s} (g + B_s)``, and
   ``g' = e^{-(S - S_s)} (f' - s f - b)`` is small when ``f' ~ s f + b``.
3. **Empirical model statistics** (EMS, paper eqs. 7-8 / Appendix C): ``l`` minimises the
   first-order discretisation error bound ``E || grad_x (sigma eps - l x) ||_F^2``, i.e.
   ``l = sigma E[diag(d eps / d x)]``; ``s, b`` are the per-dimension least-squares regression
   of ``f'`` (the total lambda-derivative of ``f`` along the ODE) on ``f``:
   ``s = Cov(f, f') / Var(f)``, ``b = E f' - s E f``. See :func:`compute_ems`.
4. **Local approximation** (paper eq. 9 / Theorem 3.2): with ``p`` values of ``g`` (at
   ``lambda_s`` and earlier points) the derivatives ``g^(k)(lambda_s)`` are estimated and::

       x_t = A x_s - alpha_t e^{-(L_t - L_s)} [ sum_k g^(k) int e^{(L+S)-(L_s+S_s)} (lambda-lambda_s)^k/k!
                                              + int e^{(L+S)-(L_s+S_s)} B_s dlambda ]

   an order-``p`` update (the Vandermonde solve gives the exact interpolating polynomial; the
   paper's *pseudo-order* variant takes ``g^(k) ~ k!`` times the ``k``-th divided difference on
   the first ``k+1`` points instead, which is only second order but more stable at 5 NFE).
5. **Multistep predictor-corrector** (paper sec. 3.2, Fig. 2b): the predictor uses the last
   ``p <= order`` evaluations; after the model is evaluated at the predicted ``x_t`` (needed
   anyway for the next step) the corrector redoes the step with ``g_t`` among the points
   (same number of points, or one more with ``corrector_pseudo=True``, the paper's
   pseudo-corrector), keeping ``f_t`` as evaluated. No extra evaluation: ``nfe = steps``.

All coefficients are computed in float64 before the loop. ``l, s, b`` are smooth functions of
lambda: C^2 cubic splines through the EMS grid values (not-a-knot ends; constant beyond the
grid, where there is no data), so ``L`` and ``S`` are the splines' exact primitives (piecewise
quartics) and the exponential integrals are composite Gauss-Legendre quadratures of them (8
nodes per panel of width <= 0.5, never across an EMS grid point, where the splines' third
derivative jumps; nested for ``B``), accurate to float64 roundoff. (The paper's code instead
tabulates the integrals on a fine lambda grid with the trapezoid rule.) The identity in 1.
holds for *any* ``l, s, b``, so statistics that fit the model badly change only the error
constant, never consistency: the solver converges for every EMS. Order: 3 at every step size,
because ``g`` is as smooth as the statistics and a C^2 spline keeps its third derivative
bounded (piecewise-linear interpolation would put kinks into ``g`` at the EMS grid points and
make the order 2 once steps are shorter than the EMS spacing). A step across an end of the EMS
grid meets such a kink (the constant extension): keep the sampled lambdas inside the grid.

Endpoints (as :mod:`.dpm`)
--------------------------
A step from ``lambda_s < -LAMBDA_LIMIT`` (``alpha = 0``, e.g. rectified flow and cosine at
t = 1, where ``f`` holds ``y = x/alpha = inf``) or to ``lambda_t > LAMBDA_LIMIT``
(``sigma = 0``, t = 0, where the exponential integrals are infinite) is taken in the limit that
every form here shares, the first-order data-prediction step ``x_t = (sigma_t/sigma_s) x_s +
(alpha_t - sigma_t alpha_s/sigma_s) x_hat_s`` (DDIM). The warm-up counts only evaluations at
finite lambda; such steps are not corrected.

Registered as ``dpm_solver_v3`` (``options={"ems": EMS or path, "order": 3, "use_corrector":
True, ...}``) once this module is imported.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..fileio import atomic_write_bytes
from ..schedules import get_schedule
from .dpm import LAMBDA_LIMIT
from .registry import Predictor, StepRecord, register

__all__ = ["EMS", "compute_ems", "dpm_solver_v3", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_F64 = torch.float64
_EMS_RANGE = 10.0  # default |lambda| range of compute_ems: sigma/alpha from 4.5e-5 to 2.2e4
_GX, _GW = np.polynomial.legendre.leggauss(8)
_MAX_PANEL = 0.5  # widest quadrature panel in lambda


# ----------------------------------------------------------------------------------------------
# The statistics
# ----------------------------------------------------------------------------------------------
@dataclass
class EMS:
    """Empirical model statistics of DPM-Solver-v3 on a grid of half log-SNR values.

    ``lambdas [K]`` strictly increasing; ``l, s, b [K, *shape]`` (``shape`` = one sample's
    shape, or ``()`` for statistics shared by every dimension); all float64 on the CPU.
    ``schedule`` is the config of the schedule they were computed under (provenance only: in
    terms of lambda and ``y = x/alpha`` the statistics do not depend on the schedule, so they
    serve the same model under any schedule); ``info`` a JSON-able description.
    """

    lambdas: torch.Tensor
    l: torch.Tensor  # noqa: E741 - the paper's name
    s: torch.Tensor
    b: torch.Tensor
    schedule: dict | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        lam = torch.as_tensor(self.lambdas).detach().to("cpu", _F64).flatten().contiguous()
        if lam.numel() < 2 or not bool(torch.isfinite(lam).all()) or \
                not bool((lam[1:] > lam[:-1]).all()):
            raise ValueError("EMS lambdas must be >= 2 finite, strictly increasing values")
        vals = []
        for name in ("l", "s", "b"):
            v = torch.as_tensor(getattr(self, name)).detach().to("cpu", _F64).contiguous()
            if v.dim() < 1 or v.shape[0] != lam.numel():
                raise ValueError(f"EMS {name} must have shape [K={lam.numel()}, *shape], "
                                 f"got {tuple(v.shape)}")
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"EMS {name} must be finite")
            vals.append(v)
        if not vals[0].shape == vals[1].shape == vals[2].shape:
            raise ValueError("EMS l, s, b must have the same shape")
        self.lambdas, self.l, self.s, self.b = lam, *vals
        if self.schedule is not None and not isinstance(self.schedule, dict):
            self.schedule = self.schedule.config()
        self.info = dict(self.info or {})

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one sample (``()``: shared by every dimension)."""
        return tuple(self.l.shape[1:])

    @classmethod
    def constant(cls, shape=(), l=1.0, s=0.0, b=0.0,  # noqa: E741
                 lambda_range=(-LAMBDA_LIMIT, LAMBDA_LIMIT)) -> EMS:
        """Statistics constant in lambda. ``l=1, s=b=0`` turns DPM-Solver-v3 into the
        multistep DPM-Solver++ with exact exponential integrals (data prediction), ``l=0,
        s=b=0`` into multistep DPM-Solver (noise prediction)."""
        lam = torch.tensor(lambda_range, dtype=_F64)
        full = [torch.full((2, *shape), float(v), dtype=_F64) for v in (l, s, b)]
        return cls(lam, *full, info={"kind": "constant", "l": l, "s": s, "b": b})

    # files -------------------------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write one ``.safetensors`` file (tensors ``lambdas, l, s, b``; JSON config in its
        header) atomically: temp file, fsync, ``os.replace``, fsync of the directory."""
        from safetensors.torch import save as st_save

        tensors = {"lambdas": self.lambdas, "l": self.l, "s": self.s, "b": self.b}
        cfg = {"format": FORMAT_VERSION, "shape": list(self.shape), "schedule": self.schedule,
               "info": self.info}
        data = st_save({k: v.contiguous() for k, v in tensors.items()},
                       metadata={"tiltflow": "dpm_solver_v3_ems",
                                 "config": json.dumps(cfg, allow_nan=False)})
        return atomic_write_bytes(path, data)

    @classmethod
    def load(cls, path) -> EMS:
        """Read and validate a file written by :meth:`save` (safetensors only, nothing is
        unpickled); a missing or damaged file raises :class:`~tiltflow.errors.UserError`."""
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load as st_load

        path = Path(path)

        def bad(what):
            return UserError(f"EMS file {str(path)!r} is invalid ({what}); recompute it with "
                             "tiltflow.solvers.dpm_v3.compute_ems(denoiser, noises).save(path)")

        if not path.is_file():
            raise UserError(f"EMS file {str(path)!r} does not exist; write one with "
                            "tiltflow.solvers.dpm_v3.compute_ems(denoiser, noises).save(path)")
        try:
            tensors = st_load(path.read_bytes())
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, ValueError, RuntimeError, OSError) as e:
            raise bad(f"not a safetensors file: {str(e).splitlines()[0][:80]}") from None
        if meta.get("tiltflow") != "dpm_solver_v3_ems":
            raise bad("not a tiltflow DPM-Solver-v3 EMS file")
        try:
            cfg = json.loads(meta["config"])
            if not isinstance(cfg, dict):
                raise ValueError("config is not a JSON object")
        except (KeyError, ValueError) as e:
            raise bad(f"unreadable config: {e}") from None
        if cfg.get("format") != FORMAT_VERSION:
            raise bad(f"format {cfg.get('format')!r}, this tiltflow reads {FORMAT_VERSION}")
        missing = {"lambdas", "l", "s", "b"} - set(tensors)
        if missing:
            raise bad(f"missing tensors {sorted(missing)}")
        for k, v in tensors.items():
            if v.dtype != _F64:
                raise bad(f"tensor {k!r} must be float64, got {v.dtype}")
        shape = cfg.get("shape")
        if not isinstance(shape, list) or tuple(tensors["l"].shape[1:]) != tuple(shape):
            raise bad(f"tensor shape {tuple(tensors['l'].shape)} does not match the recorded "
                      f"sample shape {shape}")
        if cfg.get("schedule") is not None:
            try:
                get_schedule(cfg["schedule"])
            except (ValueError, TypeError) as e:
                raise bad(f"schedule: {e}") from None
        try:
            return cls(tensors["lambdas"], tensors["l"], tensors["s"], tensors["b"],
                       schedule=cfg.get("schedule"), info=cfg.get("info") or {})
        except ValueError as e:
            raise bad(str(e)) from None


# ----------------------------------------------------------------------------------------------
# Computing the statistics from the model
# ----------------------------------------------------------------------------------------------
def _trajectory_states(denoiser, x_init, t_grid, cond, guidance):
    """States of the model's own PF-ODE at every time of ``t_grid`` (decreasing, starting at
    t = 1), by DPM-Solver++(3M) on that grid (fine in lambda: local error O(dlambda^4))."""
    from .dpm import dpmpp_3m

    rec: list[StepRecord] = []
    with torch.no_grad():
        x_end = dpmpp_3m(denoiser, x_init, t_grid, cond=cond, guidance=guidance, record=rec,
                         lower_order_final=False)
    return [r.x for r in rec] + [x_end]


def _jacobian_diag(eps: torch.Tensor, x: torch.Tensor, probes: int | None, gen) -> torch.Tensor:
    """``diag(d eps / d x)`` per example ``[N, D]``: exact (one backward pass per dimension)
    when ``probes`` is None, else Hutchinson's diagonal estimator ``E[v * (J^T v)]`` with
    ``probes`` Rademacher vectors per example (Bekas, Kokiopoulou & Saad 2007)."""
    n = x.shape[0]
    flat = eps.reshape(n, -1)
    d = flat.shape[1]
    try:
        if probes is None:
            cols = []
            for j in range(d):
                (g,) = torch.autograd.grad(flat[:, j].sum(), x, retain_graph=True)
                cols.append(g.reshape(n, -1)[:, j])
            return torch.stack(cols, 1).to(_F64)
        acc = torch.zeros(n, d, dtype=_F64, device=x.device)
        for _ in range(probes):
            v = torch.randint(0, 2, x.shape, generator=gen, device="cpu").to(x.device, x.dtype)
            v = 2 * v - 1
            (g,) = torch.autograd.grad((eps * v).sum(), x, retain_graph=True)
            acc += (v * g).reshape(n, -1).to(_F64)
        return acc / probes
    except RuntimeError as e:
        raise ValueError("compute_ems needs a denoiser differentiable in x_t (autograd) to "
                         f"estimate l = sigma E[diag(d eps/d x)]: {str(e).splitlines()[0]}") from None


def compute_ems(denoiser, noises: torch.Tensor, num_lambdas: int = 161, cond=None, *,
                guidance=None, lambda_range: tuple[float, float] | None = None,
                probes: int | None = None, fd_step: float | None = None, smooth: int = 0,
                seed: int = 0) -> EMS:
    """Empirical model statistics ``l, s, b`` of DPM-Solver-v3 (Zheng et al. 2023, sec. 3.1 /
    Appendix C) from the model itself, along its own PF-ODE trajectories.

    - ``noises [N, ...]``: standard-normal start points (a few hundred); the trajectories start
      at ``x_1 = sigma(1) noise`` and are integrated by DPM-Solver++(3M) on the EMS grid, so
      their states at ``lambda`` follow the model's marginal ``p_lambda`` (as the paper's
      perturbed data do, without data).
    - Grid: ``num_lambdas`` points uniform in ``lambda`` over ``lambda_range`` (default
      ``[max(lambda(1), -10), min(lambda(0), 10)]``).
    - ``l = sigma * mean_n diag(d eps/d x)`` (eq. 7: the minimiser of
      ``E||grad_x(sigma eps - l x)||_F^2``); the diagonal is exact by autograd (one backward
      pass per dimension) when ``probes`` is None and a sample has <= 64 dimensions, else
      Hutchinson's estimator with ``probes`` (default 1) Rademacher vectors per sample.
    - ``f = e^{-lambda} eps - l y`` and its total derivative along the ODE
      ``f' = e^{-lambda} ((l - 1) eps + d eps/d lambda) - l' y`` (``y = x/alpha``,
      ``dy/dlambda = -e^{-lambda} eps``), with ``d eps/d lambda`` by a central difference
      along the trajectory (step ``fd_step``, default ``eps_machine^(1/3)``; one-sided at the
      ends of the schedule's range; 2 extra evaluations per point) and ``l'`` the derivative of
      the cubic spline through ``l`` that the solver uses (so ``f'`` is the derivative of the
      solver's ``f``; fourth-order accurate at the grid points for smooth ``l``, ~1.7x the
      noise of a central difference for noisy ``l``), averaged over ``2 smooth + 1`` grid
      points if ``smooth > 0``, as the paper does for its noisy high-dimensional ``l``.
    - ``s = Cov(f, f') / (Var(f) + r)``, ``b = E f' - s E f`` per dimension (eq. 8), with a
      roundoff-level ridge ``r = eps_machine * E[(|e^{-lambda} eps| + |l y|)^2]`` so that a
      dimension whose ``f`` does not vary (e.g. Gaussian data, where ``l`` is exact and ``f`` is
      deterministic) gets ``s = 0``, ``b = E f'``.

    Cost: ``num_lambdas * (3 + D)`` evaluations of batch N (``D`` the backward passes).
    Memory: the ``num_lambdas * N`` trajectory states. Returns an :class:`EMS`.
    """
    if not torch.is_tensor(noises) or not noises.is_floating_point() or noises.dim() < 2:
        raise ValueError("noises must be a float tensor of shape [N, ...] (N >= 2 samples)")
    if noises.shape[0] < 2:
        raise ValueError(f"compute_ems needs at least 2 noises (a few hundred is typical), "
                         f"got {noises.shape[0]}")
    if isinstance(num_lambdas, bool) or not isinstance(num_lambdas, int) or num_lambdas < 3:
        raise ValueError(f"num_lambdas must be an int >= 3, got {num_lambdas!r}")
    if probes is not None and (isinstance(probes, bool) or not isinstance(probes, int)
                               or probes < 1):
        raise ValueError(f"probes must be None or an int >= 1, got {probes!r}")
    if isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 0:
        raise ValueError(f"smooth must be an int >= 0, got {smooth!r}")
    if cond is not None and (not torch.is_tensor(cond) or cond.shape[:1] != noises.shape[:1]):
        raise ValueError(f"cond must be a tensor with leading dim {noises.shape[0]} (the batch)")
    sched = denoiser.schedule
    lam_1, lam_0 = (0.5 * sched.logsnr(torch.tensor([1.0, 0.0], dtype=_F64))).tolist()
    if lambda_range is None:
        lo, hi = max(lam_1, -_EMS_RANGE), min(lam_0, _EMS_RANGE)
    else:
        lo, hi = (float(v) for v in lambda_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"lambda_range must be two finite values lo < hi, got {lambda_range}")
        if lo < lam_1 - 1e-9 or hi > lam_0 + 1e-9:
            raise ValueError(f"lambda_range {lambda_range} leaves this schedule's range "
                             f"[{lam_1:.4g}, {lam_0:.4g}] of lambda = log(alpha/sigma)")
    lams = torch.linspace(lo, hi, num_lambdas, dtype=_F64)
    ts = sched.t_from_logsnr(2 * lams).to(_F64).clamp(0.0, 1.0)
    if lo <= lam_1 + 1e-12:
        ts[0] = 1.0
    if not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError("the EMS lambda grid maps to non-decreasing times under this schedule "
                         "(grid finer than the schedule resolves); use fewer num_lambdas")
    start = ts if float(ts[0]) == 1.0 else torch.cat([torch.ones(1, dtype=_F64), ts])
    sigma_1 = float(sched(torch.ones((), dtype=_F64)).sigma)
    states = _trajectory_states(denoiser, sigma_1 * noises, start, cond, guidance)
    states = states[len(start) - len(ts):]

    dtype = noises.dtype
    machine = torch.finfo(dtype).eps
    delta = float(fd_step) if fd_step is not None else machine ** (1 / 3)
    shape = tuple(noises.shape[1:])
    n_dim = math.prod(shape)
    if probes is None and n_dim > 64:
        probes = 1
    gen = torch.Generator().manual_seed(int(seed))
    predict = Predictor(denoiser, cond, guidance)
    lam_list, t_list = lams.tolist(), ts.tolist()
    coeff = sched(ts)
    alphas, sigmas = coeff.alpha.tolist(), coeff.sigma.tolist()

    # pass 1: l at every grid point (and the eps there)
    l_rows, eps_rows = [], []
    for k, t in enumerate(t_list):
        with torch.enable_grad():
            x = states[k].detach().requires_grad_(True)
            eps = predict(x, t).noise
            diag = _jacobian_diag(eps, x, probes, gen)
        l_rows.append(sigmas[k] * diag.mean(0))
        eps_rows.append(eps.detach())
    l_all = torch.stack(l_rows).cpu().numpy()  # [K, D]
    # l' of the spline the solver interpolates l with (_Spline), so that f' is the derivative
    # of the f the solver integrates
    lp_all = _Spline(lams.numpy(), l_all).fun.derivative()(lams.numpy())
    if smooth > 0:
        kernel = np.ones(2 * smooth + 1)
        num = np.apply_along_axis(lambda c: np.convolve(c, kernel, "same"), 0, lp_all)
        den = np.convolve(np.ones(len(lp_all)), kernel, "same")[:, None]
        lp_all = num / den

    # pass 2: f, its total lambda-derivative, and the regression of f' on f
    def eps_at(y, dy, lam_k, offset):
        t_o = float(sched.t_from_logsnr(torch.tensor(2 * (lam_k + offset), dtype=_F64)))
        a_o = float(sched(torch.tensor(t_o, dtype=_F64)).alpha)
        return predict((a_o * (y + offset * dy)).to(dtype), t_o).noise.detach().to(_F64)

    s_rows, b_rows = [], []
    with torch.no_grad():
        for k, (lam_k, a_k) in enumerate(zip(lam_list, alphas, strict=True)):
            x = states[k].to(_F64).reshape(len(noises), -1)
            eps = eps_rows[k].to(_F64).reshape(len(noises), -1)
            y = x / a_k
            dy = -math.exp(-lam_k) * eps
            y_s, dy_s = y.reshape(states[k].shape), dy.reshape(states[k].shape)
            if lam_k - delta >= lam_1 and lam_k + delta <= lam_0:
                deps = (eps_at(y_s, dy_s, lam_k, delta) - eps_at(y_s, dy_s, lam_k, -delta)) \
                    / (2 * delta)
            else:  # one-sided, second order
                h = delta if lam_k - delta < lam_1 else -delta
                deps = (4 * eps_at(y_s, dy_s, lam_k, h) - eps_at(y_s, dy_s, lam_k, 2 * h)
                        - 3 * eps.reshape(states[k].shape)) / (2 * h)
            deps = deps.reshape(len(noises), -1)
            l_k = torch.from_numpy(l_all[k]).to(x.device)
            lp_k = torch.from_numpy(lp_all[k]).to(x.device)
            e = math.exp(-lam_k)
            f = e * eps - l_k * y
            fp = e * ((l_k - 1) * eps + deps) - lp_k * y
            mf, mfp = f.mean(0), fp.mean(0)
            var = (f - mf).pow(2).mean(0)
            cov = ((f - mf) * (fp - mfp)).mean(0)
            ridge = machine * (e * eps.abs() + y.abs()).pow(2).mean(0)
            s_k = cov / (var + ridge + 1e-300)
            s_rows.append(s_k)
            b_rows.append(mfp - s_k * mf)
    s_all = torch.stack(s_rows).cpu()
    b_all = torch.stack(b_rows).cpu()
    info = {"kind": "computed", "num_samples": int(noises.shape[0]),
            "jacobian": "exact" if probes is None else f"hutchinson({probes})",
            "fd_step": delta, "smooth": smooth, "dtype": str(dtype).replace("torch.", "")}
    return EMS(lams, torch.from_numpy(l_all).reshape(-1, *shape), s_all.reshape(-1, *shape),
               b_all.reshape(-1, *shape), schedule=sched.config(), info=info)


# ----------------------------------------------------------------------------------------------
# Step coefficients
# ----------------------------------------------------------------------------------------------
class _Spline:
    """One statistic as a C^2 cubic spline in lambda through its EMS grid values (not-a-knot
    ends; a line for 2 points, a parabola for 3) with its exact primitive, a piecewise quartic;
    constant beyond the grid, where there is no data. ``table [K, D]``; evaluations ``[M, D]``.

    Why C^2: the solver Taylor-expands ``g`` (paper eq. 9), which is only as smooth as the
    interpolated ``l, s, b``. Piecewise-linear statistics leave kinks in ``g`` at the grid points
    and an O(h^2) local error on every step across one: global order 2 once steps are shorter
    than the EMS spacing. With a C^2 spline the third derivative of ``g`` stays bounded and the
    order-3 update keeps its order at every step size."""

    def __init__(self, lam: np.ndarray, table: np.ndarray):
        from scipy.interpolate import CubicSpline

        self.lo, self.hi = float(lam[0]), float(lam[-1])
        self.first, self.last = table[0], table[-1]
        self.fun = CubicSpline(lam, table, axis=0, bc_type="not-a-knot")
        self.prim_fun = self.fun.antiderivative()  # zero at lam[0]

    def _clip(self, x):
        x = np.asarray(x, dtype=np.float64).ravel()
        return x, np.clip(x, self.lo, self.hi)

    def value(self, x) -> np.ndarray:
        return self.fun(self._clip(x)[1])

    def prim(self, x) -> np.ndarray:
        """``int_{lam[0]}^{x}`` of the extended spline (exact up to roundoff)."""
        x, xc = self._clip(x)
        out = self.prim_fun(xc)
        out_of_grid = x != xc
        if out_of_grid.any():  # rare: only [M, D] work when a node lies beyond the grid
            end = np.where((x[out_of_grid] < self.lo)[:, None], self.first, self.last)
            out[out_of_grid] += (x - xc)[out_of_grid, None] * end
        return out


class _Stats:
    """``l, s, b`` as smooth functions of lambda (:class:`_Spline`), their exact primitives
    ``L, S`` and the exponential integrals of one step, in numpy float64 ``[., D]``."""

    def __init__(self, ems: EMS):
        self.lam = ems.lambdas.numpy()
        k = self.lam.size
        tables = [v.reshape(k, -1).numpy() for v in (ems.l, ems.s, ems.b)]
        self.l, self.s, self.b = (_Spline(self.lam, t) for t in tables)
        self.zero_b = not bool(np.any(tables[2]))

    def _edges(self, a, c):
        inner = self.lam[(self.lam > a) & (self.lam < c)]
        pts = np.concatenate([[a], inner, [c]])
        out = [a]
        for u, v in zip(pts[:-1], pts[1:], strict=True):
            m = max(1, math.ceil((v - u) / _MAX_PANEL))
            out.extend((u + (v - u) * np.arange(1, m + 1) / m).tolist())
        out[-1] = c
        return np.asarray(out)

    def _b_integrand(self, x, S_a):
        """``e^{-(S - S_a)} b`` at ``x [M]`` -> ``[M, D]``."""
        return np.exp(-(self.s.prim(x) - S_a)) * self.b.value(x)

    def b_integral(self, a, y, S_a):
        """``B_a(y) = int_a^y e^{-(S - S_a)} b`` (either side of ``a``)."""
        if y == a or self.zero_b:
            return np.zeros_like(S_a)
        lo, hi = min(a, y), max(a, y)
        e = self._edges(lo, hi)
        u, v = e[:-1, None], e[1:, None]
        nodes = (u + (v - u) * (1 + _GX) / 2).ravel()
        wts = ((v - u) / 2 * _GW).ravel()
        val = (wts[:, None] * self._b_integrand(nodes, S_a)).sum(0)
        return val if y > a else -val

    def step(self, lam_s, lam_t, alpha_s, alpha_t, pts, pseudo):
        """Coefficients ``(A, W, c)`` of ``x_t = A x_s + sum_j W[j] f(pts[j]) + c`` from ``p``
        values of ``f`` at ``pts`` (``pts[0] = lam_s``), each ``[D]`` (paper eq. 9)."""
        p = len(pts)
        z = np.asarray(pts, dtype=np.float64) - lam_s
        M = _derivative_weights(z, pseudo)  # [p-1, p]: g^(k) = sum_j M[k-1, j] g_j
        L_a = self.l.prim([lam_s])[0]
        S_a = self.s.prim([lam_s])[0]
        e = self._edges(lam_s, lam_t)
        u, v = e[:-1], e[1:]
        R = u[:, None] + (v - u)[:, None] * (1 + _GX) / 2  # [P, n]
        WR = ((v - u) / 2)[:, None] * _GW
        P_, n_ = R.shape
        E = np.exp(self.l.prim(R) + self.s.prim(R) - L_a - S_a).reshape(P_, n_, -1)
        powers = [np.ones_like(R)]
        for k in range(1, p):
            powers.append(powers[-1] * (R - lam_s) / k)
        Pk = [(WR[..., None] * E * pk[..., None]).sum((0, 1)) for pk in powers]
        if self.zero_b:
            Q = np.zeros_like(Pk[0])
        else:  # int e^{(L+S)-(L_s+S_s)} B_s: B_s at each node by a nested Gauss rule
            H = self._b_integrand(R.ravel(), S_a).reshape(P_, n_, -1)
            per_panel = (WR[..., None] * H).sum(1)  # [P, D]
            B_edge = np.concatenate([np.zeros_like(per_panel[:1]),
                                     np.cumsum(per_panel, 0)[:-1]])
            Qn = u[:, None, None] + (R - u[:, None])[..., None] * (1 + _GX) / 2  # [P, n, n]
            WQ = ((R - u[:, None]) / 2)[..., None] * _GW
            inner = (WQ[..., None] * self._b_integrand(Qn.ravel(), S_a)
                     .reshape(P_, n_, n_, -1)).sum(2)
            Q = (WR[..., None] * E * (B_edge[:, None, :] + inner)).sum((0, 1))
        L_t = self.l.prim([lam_t])[0] - L_a
        decay = np.exp(-L_t)
        A = alpha_t / alpha_s * decay
        W, const = [], -alpha_t * decay * Q
        for j in range(p):
            cj = (Pk[0] if j == 0 else 0.0) + sum(Pk[k] * M[k - 1, j] for k in range(1, p))
            S_j = self.s.prim([pts[j]])[0] - S_a
            W.append(-alpha_t * decay * cj * np.exp(-S_j))
            if j > 0:
                const = const + alpha_t * decay * cj * self.b_integral(lam_s, pts[j], S_a)
        return A, W, const


def _derivative_weights(z: np.ndarray, pseudo: bool) -> np.ndarray:
    """``M [p-1, p]`` with ``g^(k)(z_0) ~ sum_j M[k-1, j] g(z_j)`` (``z_0 = 0``): from the
    interpolating polynomial (Vandermonde solve), or with ``pseudo`` from ``k!`` times the
    ``k``-th Newton divided difference on ``z_0..z_k`` (paper sec. 3.3, pseudo-order)."""
    p = z.size
    M = np.zeros((max(p - 1, 0), p))
    for k in range(1, p):
        if pseudo:
            for j in range(k + 1):
                M[k - 1, j] = math.factorial(k) / np.prod([z[j] - z[m] for m in range(k + 1)
                                                           if m != j])
    if not pseudo and p > 1:
        V = np.array([[z[j] ** k for k in range(1, p)] for j in range(1, p)])  # [p-1, p-1]
        inv = np.linalg.inv(V)  # rows: Taylor coefficient k, cols: point j (1..p-1)
        for k in range(1, p):
            M[k - 1, 1:] = math.factorial(k) * inv[k - 1]
            M[k - 1, 0] = -M[k - 1, 1:].sum()
    return M


@dataclass
class _Step:
    kind: str  # "ddim" or "v3"
    A: object
    B: object = None  # ddim: weight of x_hat
    pts: tuple = ()
    W: tuple = ()
    c: object = None
    corr: tuple | None = None  # (pts, A, W, c) of the corrector of this step


def _as_ems(ems) -> EMS:
    if ems is None:
        raise ValueError("dpm_solver_v3 needs empirical model statistics: pass options="
                         "{'ems': tiltflow.solvers.dpm_v3.compute_ems(denoiser, noises)} (an EMS "
                         "or the path of one saved with EMS.save)")
    if isinstance(ems, EMS):
        return ems
    if isinstance(ems, (str, os.PathLike)):
        return EMS.load(ems)
    raise TypeError(f"ems must be an EMS or a path to one, got {type(ems).__name__}")


def _singular(lam_s: float, lam_t: float) -> bool:
    return not (lam_s >= -LAMBDA_LIMIT and lam_t <= LAMBDA_LIMIT)


def _plan(ems: EMS, schedule, grid, order, use_corrector, predictor_pseudo, corrector_pseudo,
          lower_order_final):
    """Per step a :class:`_Step` (numpy float64 coefficients) and per evaluated grid point
    ``u_i = (1 - l(lambda_i)) / alpha_i`` (``f_i = u_i x_i - x_hat_i``)."""
    stats = _Stats(ems)
    g = grid.tolist()
    n = len(g) - 1
    c = schedule(grid)
    alpha, sigma, lam = c.alpha.tolist(), c.sigma.tolist(), (0.5 * schedule.logsnr(grid)).tolist()
    first_finite = next((i for i, v in enumerate(lam) if v >= -LAMBDA_LIMIT), n)
    steps, needed = [], set()
    for i in range(n):
        a_s, s_s, l_s = alpha[i], sigma[i], lam[i]
        a_t, s_t, l_t = alpha[i + 1], sigma[i + 1], lam[i + 1]
        if _singular(l_s, l_t):  # DDIM, the limit of every update here
            steps.append(_Step("ddim", s_t / s_s, a_t - s_t * a_s / s_s))
            continue
        p = min(order, i - first_finite + 1)
        if lower_order_final and n < 15:
            p = min(p, n - i)  # last step order 1, the one before at most 2 (as dpm.py)
        pts = tuple(i - j for j in range(p))
        A, W, c = stats.step(l_s, l_t, a_s, a_t, [lam[j] for j in pts], predictor_pseudo)
        corr = None
        q = p + 1 if corrector_pseudo else p
        if use_corrector and i + 1 < n and q > 1:
            cpts = (i, i + 1) + tuple(i - j for j in range(1, q - 1))
            cA, cW, cc = stats.step(l_s, l_t, a_s, a_t, [lam[j] for j in cpts],
                                    corrector_pseudo)
            corr = (cpts, cA, tuple(cW), cc)
            needed.update(cpts)
        needed.update(pts)
        steps.append(_Step("v3", A, None, pts, tuple(W), c, corr))
    u = {i: (1.0 - stats.l.value([lam[i]])[0]) / alpha[i] for i in sorted(needed)}
    return steps, u


def _check_flag(name, v):
    if not isinstance(v, bool):
        raise TypeError(f"dpm_solver_v3: {name} must be a bool, got {v!r}")


@register("dpm_solver_v3", order=3, history=True, differentiable=False)
def dpm_solver_v3(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None,
                  record=None, hook=None, ems=None, order: int = 3, use_corrector: bool = True,
                  predictor_pseudo: bool = False, corrector_pseudo: bool = False,
                  lower_order_final: bool = True):
    """DPM-Solver-v3 (Zheng et al. 2023, NeurIPS; eqs. 4-9, sec. 3.2-3.3): multistep
    predictor of order ``order`` (1-3) in the EMS-fitted parameterization, with the
    model-free corrector (``use_corrector``), one evaluation per step. ``ems`` (required): the
    :class:`EMS` of this model from :func:`compute_ems`, or the path of a saved one.
    ``predictor_pseudo`` / ``corrector_pseudo``: the paper's pseudo-order derivative estimates
    (the pseudo-corrector uses one point more than the predictor); ``lower_order_final``:
    order 1 on the last step and at most 2 on the one before when the grid has fewer than 15
    steps (as :mod:`.dpm` and diffusers; the paper's code applies it always, which caps the
    global order at 2 as steps grow). Steps from alpha = 0 or to
    sigma = 0 take the DDIM limit (module docstring)."""
    stats = _as_ems(ems)
    if hook is not None:
        raise ValueError("dpm_solver_v3 corrects each step after the next evaluation; a step "
                         "hook needs another solver")
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 3:
        raise ValueError(f"dpm_solver_v3: order must be an int in [1, 3], got {order!r}")
    for name, v in (("use_corrector", use_corrector), ("predictor_pseudo", predictor_pseudo),
                    ("corrector_pseudo", corrector_pseudo),
                    ("lower_order_final", lower_order_final)):
        _check_flag(name, v)
    shape = tuple(x_init.shape[1:])
    if stats.shape not in ((), shape):
        raise ValueError(f"the EMS were computed for samples of shape {stats.shape}, but x_init "
                         f"has samples of shape {shape}; compute them for this data")
    plan, u = _plan(stats, denoiser.schedule, grid, order, use_corrector, predictor_pseudo,
                    corrector_pseudo, lower_order_final)
    dev, dt = x_init.device, x_init.dtype
    cshape = stats.shape

    def tens(v):
        return torch.as_tensor(np.asarray(v).reshape(cshape), dtype=dt, device=dev)

    u_t = {i: tens(v) for i, v in u.items()}
    steps = []
    for st in plan:
        if st.kind == "ddim":
            steps.append(st)
            continue
        corr = None
        if st.corr is not None:
            cpts, cA, cW, cc = st.corr
            corr = (cpts, tens(cA), [tens(w) for w in cW], tens(cc))
        steps.append(_Step("v3", tens(st.A), None, st.pts, [tens(w) for w in st.W],
                           tens(st.c), corr))

    g = grid.tolist()
    points = denoiser.schedule.points(grid)
    predict = Predictor(denoiser, cond, guidance)
    fs: dict[int, torch.Tensor] = {}
    x, x_prev = x_init, None
    for i, st in enumerate(steps):
        pred = predict(x, points[i])
        x_hat = pred.data
        if i in u_t:
            fs[i] = torch.addcmul(-x_hat, u_t[i], x)
        prev = steps[i - 1] if i > 0 else None
        if prev is not None and prev.kind == "v3" and prev.corr is not None:
            # corrector of the previous step, with f_i among its points (no new evaluation)
            cpts, cA, cW, cc = prev.corr
            x_new = torch.addcmul(cc, cA, x_prev)
            for w, j in zip(cW, cpts, strict=True):
                x_new = torch.addcmul(x_new, w, fs[j])
            x = x_new
            if record is not None:
                record[-1].x_next = x
        if st.kind == "ddim":  # on the (possibly corrected) x
            x_next = torch.add(x * st.A, x_hat, alpha=st.B)
        else:
            x_next = torch.addcmul(st.c, st.A, x)
            for w, j in zip(st.W, st.pts, strict=True):
                x_next = torch.addcmul(x_next, w, fs[j])
        for j in [j for j in fs if j < i - 3]:
            del fs[j]
        if record is not None:
            record.append(StepRecord(g[i], g[i + 1], x, x_next, x_hat))
        x_prev, x = x, x_next
    return x
