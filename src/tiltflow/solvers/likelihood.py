"""Exact log-likelihood of a diffusion / flow model through its probability-flow ODE.

The PF-ODE ``dx_t/dt = v(x_t, t)`` (Song et al. 2021, "Score-based generative modeling through
SDEs", eq. 13) transports the data density ``p_0`` to ``p_T`` deterministically, so by the
instantaneous change of variables (Chen et al. 2018, "Neural ODEs", Thm. 1; Song et al. 2021,
sec. 4.3 and App. D.2, eq. 39)

    log p_0(x_0) = log p_T(x_T) + int_0^T div v(x_t, t) dt,

integrated jointly with the state from data (t ~ 0) to noise (t = T). The divergence is the
trace of the velocity's Jacobian: computed exactly with ``D`` backward passes for small ``D``,
or estimated without bias with Hutchinson's trace estimator ``E_z[z^T (dv/dx) z]`` for
Rademacher or Gaussian probes ``z`` (Hutchinson 1989; Grathwohl et al. 2019, "FFJORD", sec. 3.1),
with the probes drawn once and kept fixed along the trajectory (FFJORD: this keeps the
integrand smooth in t for the ODE solver).

Start time. At ``t = 0`` (``sigma = 0``) a data- or noise-predicting model cannot give the
velocity (``eps_hat = (x_t - alpha x_hat) / sigma`` is 0/0; for VP schedules ``d sigma/dt``
even diverges like ``1/sqrt(t)``), so the ODE starts at ``t_eps > 0`` where the noise level
``sigma/alpha`` equals ``level`` (default 1e-3, i.e. ``t_eps = 1e-3`` for rectified flow,
``~1e-5`` for linear VP). Instead of pretending ``x`` is ``x_{t_eps}`` (an O(t_eps) error for
rectified flow: the state is off by the factor alpha), we start from ``alpha(t_eps) x`` and
add the log-Jacobian ``D log alpha(t_eps)`` of that scaling. Then ``x / 1`` is compared with
``x + s n`` (``s = sigma/alpha``) and the remaining error is
``log p_s(x) - log p_0(x) = s^2/2 (Delta log p + |grad log p|^2) + O(s^4)``,
i.e. ``~ 1e-6 / (2 std^2)`` nats per dimension for a data scale ``std``: below 1e-4 for data
structure down to std 0.1. (Song et al. 2021 use t_eps = 1e-5 without the rescaling.)

Prior at the end time. The exact marginal is ``p_T = p_0 * N(alpha_T x, sigma_T^2 I)``; we use
the moment-matched ``N(0, (alpha_T^2 v + sigma_T^2) I)`` with ``v`` the per-dimension data
variance (``prior`` = v, default 1 for normalised data), ``N(alpha_T m, alpha_T^2 C +
sigma_T^2 I)`` from the data mean and covariance (``prior=(m, C)``), or any callable
``prior(x_T)``. For
rectified flow and cosine at T = 1 (alpha = 0) this is exactly ``N(0, I)``. For linear VP at
T = 1, ``alpha_T ~ 0.0066`` and the data term ``alpha_T^2 v`` (~4e-4 for v = 8) is not
negligible: on the anisotropic 2-D bed (correlated, mean -0.2) the isotropic prior
leaves a 7.6e-4 nats/dim mean error (2.9e-3 max) that the full ``(m, C)`` prior removes
(3e-6); what remains is the non-Gaussianity of ``p_T``, O(alpha_T^4). For VE/EDM (alpha = 1, sigma_T =
50 / 80) the data variance enters as ``v / sigma_T^2``.

Bits per dimension: see :func:`bits_per_dim`.
"""

from __future__ import annotations

import math

import torch

from ..schedules import Schedule
from .registry import Predictor
from .rk import TABLEAUX

__all__ = ["log_likelihood", "bits_per_dim", "default_t_eps", "time_grid", "gaussian_prior_log_prob",
           "TABLEAUX"]

_TRACES = ("auto", "exact", "hutchinson")
_PROBES = ("rademacher", "gaussian")
_EXACT_MAX_DIM = 64  # trace="auto": exact up to this many dimensions, Hutchinson above


def default_t_eps(schedule: Schedule, level: float = 1e-3) -> float:
    """The time where the noise level ``sigma/alpha`` equals ``level`` (0 when t = 0 is
    already at least that noisy, e.g. VE with ``sigma_min >= level``)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    lam = torch.tensor(-2 * math.log(level), dtype=torch.float64)
    if float(schedule.logsnr(torch.zeros((), dtype=torch.float64))) <= float(lam):
        return 0.0
    return float(schedule.t_from_logsnr(lam).clamp(0.0, 1.0))


def time_grid(schedule: Schedule, steps: int, t_start: float, t_end: float,
              spacing="uniform") -> torch.Tensor:
    """An *increasing* float64 grid of ``steps + 1`` times from ``t_start`` to ``t_end``:
    ``"uniform"`` in t, ``"logsnr"`` uniform in log-SNR (capped at noise level 1e4 where the
    log-SNR is -inf, as :mod:`.grids` does), ``"auto"`` (log-SNR for variance-exploding
    schedules, alpha(1) = 1, whose noise level spans 5 decades: EDM's sigma is linear in t, and
    uniform-in-t steps lose the small-noise end; uniform in t otherwise), or an explicit
    increasing tensor."""
    if torch.is_tensor(spacing) or isinstance(spacing, (list, tuple)):
        g = torch.as_tensor(spacing, dtype=torch.float64).flatten().cpu()
        if g.numel() < 2 or not bool(((g >= 0) & (g <= 1)).all()) or not bool((g[1:] > g[:-1]).all()):
            raise ValueError("an explicit grid here must be strictly increasing within [0, 1] "
                             "(data -> noise), with at least 2 points")
        return g
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not 0.0 <= t_start < t_end <= 1.0:
        raise ValueError(f"need 0 <= t_start < t_end <= 1, got t_start={t_start}, t_end={t_end}")
    if spacing == "auto":
        exploding = float(schedule(torch.ones((), dtype=torch.float64)).alpha) > 0.5
        spacing = "logsnr" if exploding else "uniform"
    if spacing == "uniform":
        return torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)
    if spacing == "logsnr":
        lam = schedule.logsnr(torch.tensor([t_start, t_end], dtype=torch.float64))
        lam = lam.clamp(-2 * math.log(1e4), 2 * math.log(1e8))
        g = schedule.t_from_logsnr(torch.linspace(float(lam[0]), float(lam[1]), steps + 1,
                                                  dtype=torch.float64)).clamp(0.0, 1.0)
        g[0], g[-1] = t_start, t_end
        if not bool((g[1:] > g[:-1]).all()):
            raise ValueError("the log-SNR grid is not strictly increasing; use fewer steps or "
                             "spacing='uniform'")
        return g
    raise ValueError(f"unknown grid spacing {spacing!r}; use 'auto', 'uniform', 'logsnr' or an increasing "
                     "tensor of times")


def gaussian_prior_log_prob(x_t: torch.Tensor, schedule: Schedule, t: float, data_var=1.0,
                            data_mean=None) -> torch.Tensor:
    """Moment-matched approximation of the marginal ``p_t`` -> ``[B]``:
    ``log N(x_t; alpha_t m, alpha_t^2 C + sigma_t^2 I)`` for data with mean ``m`` (default 0)
    and covariance ``C``: ``data_var`` is a float (``C = data_var I``) or a ``[D, D]`` matrix
    (flattened dims). Exact at alpha_t = 0 (rectified flow, cosine at t = 1)."""
    c = schedule(torch.tensor(float(t), dtype=torch.float64))
    a, s = float(c.alpha), float(c.sigma)
    flat = x_t.flatten(1)
    dim = flat.shape[1]
    if data_mean is not None:
        m = torch.as_tensor(data_mean, dtype=flat.dtype, device=flat.device).reshape(-1)
        if m.numel() != dim:
            raise ValueError(f"the prior's data mean must have {dim} entries, got {m.numel()}")
        flat = flat - a * m
    if not torch.is_tensor(data_var) or data_var.numel() == 1:
        var = a * a * float(data_var) + s * s
        return -0.5 * (flat.square().sum(1) / var + dim * math.log(2 * math.pi * var))
    C = data_var.to(device=flat.device, dtype=torch.float64)
    if C.shape != (dim, dim):
        raise ValueError(f"the prior's data covariance must be [D, D]=[{dim}, {dim}], "
                         f"got {tuple(C.shape)}")
    L = torch.linalg.cholesky(a * a * C + s * s * torch.eye(dim, dtype=torch.float64, device=C.device))
    z = torch.linalg.solve_triangular(L, flat.to(torch.float64).T, upper=False)
    logdet = 2 * torch.log(torch.diagonal(L)).sum()
    return (-0.5 * (z.square().sum(0) + logdet + dim * math.log(2 * math.pi))).to(flat.dtype)


def _probes(x, num_probes, kind, generator):
    shape = (num_probes, *x.shape)
    if kind == "rademacher":
        z = torch.randint(0, 2, shape, generator=generator, device=x.device)
        return (2 * z - 1).to(x.dtype)
    return torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)


def _velocity_and_divergence(predict, x, t, probes):
    """``v(x, t)`` and ``div_x v`` per example ``[B]``: exact (``probes is None``: one backward
    pass per dimension) or Hutchinson's ``mean_k z_k^T (dv/dx) z_k`` (one per probe). Assumes
    examples do not interact inside the network (no batch statistics)."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        v = predict(xg, t).velocity
        div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        if not v.requires_grad:  # velocity independent of x
            return v.detach(), div
        if probes is None:
            flat = v.flatten(1)
            n = flat.shape[1]
            for i in range(n):
                (g,) = torch.autograd.grad(flat[:, i].sum(), xg, retain_graph=i < n - 1,
                                           allow_unused=True)
                if g is not None:
                    div = div + g.flatten(1)[:, i]
        else:
            k = probes.shape[0]
            for j in range(k):
                (g,) = torch.autograd.grad((v * probes[j]).sum(), xg, retain_graph=j < k - 1,
                                           allow_unused=True)
                if g is not None:
                    div = div + (g * probes[j]).flatten(1).sum(1)
            div = div / k
    return v.detach(), div.detach()


def log_likelihood(
    denoiser,
    x: torch.Tensor,
    *,
    cond=None,
    steps: int = 64,
    solver: str = "rk4",
    trace: str = "auto",
    num_probes: int = 1,
    probe: str = "rademacher",
    generator: torch.Generator | None = None,
    t_end: float = 1.0,
    t_eps: float | None = None,
    grid="auto",
    prior=None,
    guidance=None,
    return_noise: bool = False,
):
    """``log p(x)`` ``[B]`` (nats, summed over dimensions) under the model's PF-ODE.

    Integrates ``(x_t, int div v dt)`` from ``t_eps`` to ``t_end`` with the explicit Runge-Kutta
    method ``solver`` (``"euler"``, ``"midpoint"``, ``"heun"``, ``"rk4"``, ``"rk4_38"``; ``steps`` steps on an
    increasing ``grid``: ``"auto"``, ``"uniform"``, ``"logsnr"`` or a tensor, see
    :func:`time_grid`) and returns
    ``log prior(x_T) + int div v dt + D log alpha(t_eps)`` (see the module docstring for the
    start time and the prior). The network is called ``steps * stages`` times; each call costs
    ``D`` extra backward passes with ``trace="exact"`` and ``num_probes`` with
    ``trace="hutchinson"`` (``"auto"``: exact for ``D <= 64``).

    Args:
        x: data ``[B, ...]``; examples must not interact in the network.
        num_probes / probe / generator: Hutchinson probes (``"rademacher"`` or ``"gaussian"``),
            drawn once and fixed along the trajectory, so the estimate is unbiased for the
            discretised exact-trace result.
        t_eps: start time; default :func:`default_t_eps` (noise level 1e-3).
        prior: ``None`` (data variance 1), a float (per-dimension data variance ``v``: prior
            ``N(0, (alpha^2 v + sigma^2) I)`` at ``t_end``), a pair ``(data_mean, data_cov)``
            (moment-matched ``N(alpha m, alpha^2 C + sigma^2 I)``, ``C`` a ``[D, D]`` matrix or a
            float) or a callable ``prior(x_T) -> [B]`` (e.g. an exact marginal).
        return_noise: also return the state ``x_T`` at ``t_end``.
    """
    if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError("x must be a float tensor of shape [B, ...] (batch first)")
    if solver not in TABLEAUX:
        raise ValueError(f"unknown likelihood solver {solver!r}; choose one of {sorted(TABLEAUX)}")
    if trace not in _TRACES:
        raise ValueError(f"unknown trace {trace!r}; choose one of {list(_TRACES)}")
    if probe not in _PROBES:
        raise ValueError(f"unknown probe {probe!r}; choose one of {list(_PROBES)}")
    if not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"num_probes must be an int >= 1, got {num_probes!r}")
    if cond is not None and (not torch.is_tensor(cond) or cond.shape[:1] != x.shape[:1]):
        raise ValueError(f"cond must be a tensor with leading dim {x.shape[0]} (the batch)")
    schedule = denoiser.schedule
    t_start = default_t_eps(schedule) if t_eps is None else float(t_eps)
    grid_t = time_grid(schedule, steps, t_start, float(t_end), grid)
    t_start, t_end = float(grid_t[0]), float(grid_t[-1])
    dim = x[0].numel()
    exact = trace == "exact" or (trace == "auto" and dim <= _EXACT_MAX_DIM)
    probes = None if exact else _probes(x, num_probes, probe, generator)

    # every coefficient before the loop: step sizes, stage times (float64, then on x's device)
    c, a, b = TABLEAUX[solver]
    hs = (grid_t[1:] - grid_t[:-1]).tolist()
    stage_t = (grid_t[:-1, None] + (grid_t[1:] - grid_t[:-1])[:, None] * torch.tensor(c, dtype=torch.float64))
    stage_t = stage_t.to(x.device)
    alpha_start = float(schedule(grid_t[:1]).alpha)
    if alpha_start <= 0:
        raise ValueError("the start time has alpha = 0 (pure noise); choose t_eps nearer 0")

    predict = Predictor(denoiser, cond, guidance)
    with torch.no_grad():
        state = alpha_start * x
        delta = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for i, h in enumerate(hs):
            ks, ds = [], []
            for j in range(len(c)):
                xs = state
                for aj, kv in zip(a[j], ks, strict=True):
                    if aj != 0.0:
                        xs = xs + (h * aj) * kv
                v, div = _velocity_and_divergence(predict, xs, stage_t[i, j], probes)
                ks.append(v)
                ds.append(div)
            for bj, kv, dv in zip(b, ks, ds, strict=True):
                if bj != 0.0:
                    state = state + (h * bj) * kv
                    delta = delta + (h * bj) * dv
        if callable(prior):
            lp = prior(state)
            if not torch.is_tensor(lp) or lp.shape != (x.shape[0],):
                raise ValueError(f"prior(x_T) must return a tensor of shape [B]=[{x.shape[0]}]")
        elif isinstance(prior, (tuple, list)) and len(prior) == 2:
            mean, cov = prior
            cov = torch.as_tensor(cov, dtype=torch.float64)
            lp = gaussian_prior_log_prob(state, schedule, t_end, cov if cov.dim() == 2 else float(cov),
                                         mean)
        else:
            data_var = 1.0 if prior is None else float(prior)
            if not data_var > 0:
                raise ValueError(f"prior as a number is the data variance; must be > 0, got {prior}")
            lp = gaussian_prior_log_prob(state, schedule, t_end, data_var)
        log_p = lp.to(x.dtype) + delta + dim * math.log(alpha_start)
    return (log_p, state) if return_noise else log_p


def bits_per_dim(log_p: torch.Tensor, num_dims: int, data_scale: float = 127.5) -> torch.Tensor:
    """Bits per dimension of 8-bit data from a continuous ``log p`` (nats) of data in [-1, 1].

    Pixels ``k in {0..255}`` are mapped to ``x = k / data_scale - 1``; a density on that scale
    becomes one on the 0..255 pixel scale by the change of variables ``log p_pixel = log p -
    D log(data_scale)``, and ``bpd = -log p_pixel / (D ln 2) = -log p / (D ln 2) +
    log2(data_scale)``. With uniform dequantisation this is the usual upper bound on the
    discrete NLL (Theis et al. 2016; Ho et al. 2020 map pixels by ``k / 127.5 - 1``, the
    default here; Song et al. 2021's code adds 7 = log2(128) bits, i.e. ``data_scale=128``).
    """
    if num_dims < 1:
        raise ValueError(f"num_dims must be >= 1, got {num_dims}")
    if not data_scale > 0:
        raise ValueError(f"data_scale must be > 0, got {data_scale}")
    return -log_p / (num_dims * math.log(2)) + math.log2(data_scale)
