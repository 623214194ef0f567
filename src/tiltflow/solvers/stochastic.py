"""Stochastic samplers of the reverse-time SDE: Euler–Maruyama, EDM's churn sampler,
DPM-Solver++(2M) SDE, predictor–corrector with a Langevin corrector, and annealed Langevin
dynamics (DDPM's ancestral sampler is in :mod:`.ddim`).

Like every solver, each one computes its step coefficients in float64 from the grid before the
loop; the loop only does tensor arithmetic, network calls and draws noise from ``generator``
(same generator state -> same samples). Pass ``record=[]`` to get one
:class:`~tiltflow.solvers.registry.StepRecord` per recorded move; where the move is a Gaussian
transition of the state it carries ``mean``, ``std`` and ``log_prob``.

Several samplers work in EDM's *scaled* coordinates (Karras et al. 2022, sec. 4 and App. B):
the state ``y = x_t / alpha`` with noise level ``s = sigma / alpha`` follows the same
variance-exploding process for every schedule, so an algorithm written for ``alpha = 1`` carries
over unchanged. At ``alpha = 0`` (t = 1 of rectified flow and cosine) ``s`` is infinite; each
sampler says below how it handles or refuses that point.
"""

from __future__ import annotations

import math

import torch

from .registry import Predictor, plan_numbers, register

__all__ = ["euler_maruyama", "edm_sde", "dpmpp_2m_sde", "pc", "annealed_langevin"]

_ALPHA_MIN = 1e-6  # below this alpha(t) the reverse SDE / scaled state is numerically singular
_PURE_NOISE_LEVEL = 1e8  # noise levels sigma/alpha above this are treated as pure noise


def _randn_like(x, generator):
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _gaussian_step(predict, t, t_next, x, mean, std, pred, generator):
    """``x' = mean + std z`` (``mean`` itself where ``std`` is 0), recorded as a Gaussian
    transition; returns the state to continue from."""
    if not std > 0:
        return predict.end_step(t, t_next, x, mean, pred)
    return predict.end_step(t, t_next, x, mean + std * _randn_like(mean, generator), pred, mean, std)


def _refuse_pure_noise(denoiser, grid, name: str):
    alpha0 = float(denoiser.schedule(grid[:1].to(torch.float64)).alpha)
    if alpha0 < _ALPHA_MIN:
        raise ValueError(
            f"{name}: the reverse SDE of schedule {denoiser.schedule!r} is singular at "
            f"t={float(grid[0])} (alpha = {alpha0:.2g} ~ 0, infinite noise level); start later "
            "(e.g. grid_options={'t_start': 0.99} or an explicit grid) or use solver='ddpm', "
            "'edm_sde' or 'dpmpp_2m_sde', which handle alpha = 0"
        )


@register("euler_maruyama", order=1, stochastic=True)
def euler_maruyama(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None,
                   record=None, hook=None, noise_scale: float = 1.0):
    """Euler–Maruyama on the reverse-time SDE (Song et al. 2021, eq. 6) with adjustable noise:
    ``dx = [v - g~^2/2 * score] dt + g~ dW``, ``g~ = noise_scale * g`` and
    ``g^2 = 2 sigma^2 (sigma'/sigma - alpha'/alpha)`` (the forward SDE's diffusion). Every
    ``noise_scale`` has the same marginals; 0 is the PF-ODE (Euler), 1 the reverse SDE.
    The final step to t = 0 adds no noise (returns the mean, as Song et al.'s code does)."""
    if noise_scale < 0:
        raise ValueError(f"noise_scale must be >= 0, got {noise_scale}")
    c = denoiser.schedule(grid)
    g2 = (2 * c.sigma**2 * (c.d_sigma / c.sigma - c.d_alpha / c.alpha) * noise_scale**2)[:-1]
    if not bool(torch.isfinite(g2).all()) or float(c.alpha[0]) < _ALPHA_MIN:
        raise ValueError(
            f"the reverse SDE of schedule {denoiser.schedule!r} has an infinite diffusion "
            f"coefficient at t={float(grid[0])} (alpha ~ 0 there); start later "
            "(e.g. t_start=0.99) or use solver='ddpm'"
        )
    dts = grid[1:] - grid[:-1]
    std = plan_numbers(torch.where(grid[1:] == 0, torch.zeros_like(g2), (g2 * dts.abs()).sqrt()))
    half_g2 = plan_numbers(0.5 * g2)
    predict = Predictor(denoiser, cond, guidance, record, hook)
    points = denoiser.schedule.points(grid)
    x = x_init
    for i, dt in enumerate(plan_numbers(dts)):
        pred = predict(x, points[i])
        mean = x + dt * (pred.velocity - half_g2[i] * pred.score)
        x = _gaussian_step(predict, points[i], points[i + 1], x, mean, std[i], pred, generator)
    return x


# ------------------------------------------------------------------------------------------
# EDM stochastic sampler
# ------------------------------------------------------------------------------------------
@register("edm_sde", order=1, stochastic=True, evals_per_step=2, skips_last_eval=True)
def edm_sde(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None, record=None, hook=None,
            s_churn: float = 40.0, s_tmin: float = 0.05, s_tmax: float = 50.0,
            s_noise: float = 1.0):
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2), any schedule.

    In the scaled state ``y = x_t / alpha`` at noise level ``s = sigma / alpha`` (EDM sec. 4),
    each step first "churns": with ``gamma = min(s_churn / N, sqrt(2) - 1)`` when
    ``s_tmin <= s_i <= s_tmax`` (else 0; N = number of steps) it raises the level to
    ``s_hat = (1 + gamma) s_i`` by adding noise ``sqrt(s_hat^2 - s_i^2) * s_noise * z``
    (Algorithm 2, lines 4–6), then takes a Heun step of ``dy/ds = (y - D(y; s)) / s`` from
    ``s_hat`` to ``s_{i+1}`` (lines 7–11). The corrector is skipped on a final step to t = 0,
    so NFE = 2 N - 1 as in the paper. ``s_churn = 0`` gives the deterministic Heun sampler
    (Algorithm 1 in these coordinates); the paper's ImageNet settings are the defaults except
    ``s_noise`` (1.003 there, to offset a trained network's over-denoising; 1 is exact).

    ``s_hat`` is capped at the schedule's largest level (t = 1), so churn never leaves the
    schedule's time range. A step that starts at (numerically) pure noise — ``alpha = 0`` at
    t = 1 of rectified flow / cosine, where ``s`` is infinite — adds no churn and takes its
    Heun step in the equivalent coordinates ``z = x_t / sigma``, ``r = alpha / sigma``
    (``dz/dr = D``), which are finite there. Steps are not Gaussian transitions (the noise
    enters before the network), so records carry no log-probability.
    """
    if s_churn < 0 or s_noise < 0:
        raise ValueError(f"s_churn and s_noise must be >= 0, got {s_churn}, {s_noise}")
    if not 0 <= s_tmin <= s_tmax:
        raise ValueError(f"need 0 <= s_tmin <= s_tmax, got s_tmin={s_tmin}, s_tmax={s_tmax}")
    sched = denoiser.schedule
    g64 = grid.to(torch.float64)
    c = sched(g64)
    a, sg = c.alpha, c.sigma
    level = torch.where(a > 0, sg / a, torch.full_like(a, math.inf))
    s_cap = _level_at(sched, 1.0)
    steps = len(grid) - 1
    gamma = min(s_churn / steps, math.sqrt(2) - 1)

    ts, a, sg, level = g64.tolist(), a.tolist(), sg.tolist(), level.tolist()
    # churned levels s_hat = (1 + gamma) s_i (line 4) and their times, in one float64 call
    s_hats = {}
    for i in range(steps):
        if gamma > 0 and level[i] < _PURE_NOISE_LEVEL and s_tmin <= level[i] <= s_tmax:
            s_hat = min(level[i] * (1 + gamma), s_cap)
            if s_hat > level[i]:
                s_hats[i] = s_hat
    churned = {}
    if s_hats:
        lam = torch.tensor([-2 * math.log(v) for v in s_hats.values()], dtype=torch.float64)
        t_hat = [min(max(t, ts[i]), 1.0)
                 for i, t in zip(s_hats, sched.t_from_logsnr(lam).tolist(), strict=True)]
        ch = sched(torch.tensor(t_hat, dtype=torch.float64))
        churned = {i: (t, a_, s_) for i, t, a_, s_ in
                   zip(s_hats, t_hat, ch.alpha.tolist(), ch.sigma.tolist(), strict=True)}

    plan = []  # per step: t_hat, churn scale, churn std, r-form?, correct?, coefficients
    for i in range(steps):
        t_hat, a_hat, sg_hat, scale_x, churn_std = ts[i], a[i], sg[i], 1.0, 0.0
        if i in churned:
            t_hat, a_hat, sg_hat = churned[i]
            scale_x = a_hat / a[i]
            churn_std = a_hat * math.sqrt(max((sg_hat / a_hat) ** 2 - level[i] ** 2, 0.0)) * s_noise
        a_n, sg_n = a[i + 1], sg[i + 1]
        s_hat = sg_hat / a_hat if a_hat > 0 else math.inf
        r_form = not (s_hat < _PURE_NOISE_LEVEL)
        # Heun: s-form  a' D + sigma' (e + e')/2 + a' s_hat (e - e')/2
        #       r-form  sigma' e + a' (D + D')/2 + sigma' r_hat (D - D')/2
        half_gap = 0.5 * (sg_n * a_hat / sg_hat if r_form else a_n * s_hat)
        plan.append((t_hat, scale_x, churn_std, r_form, ts[i + 1] > 0, a_n, sg_n, half_gap))

    points = sched.points(torch.tensor([p[0] for p in plan] + ts, dtype=torch.float64))
    hats, points = points[:steps], points[steps:]
    predict = Predictor(denoiser, cond, guidance, record, hook)
    x = x_init
    for i, (_, scale_x, churn_std, r_form, correct, a_n, sg_n, half_gap) in enumerate(plan):
        x_hat = x
        if churn_std > 0:  # lines 5-6: raise the noise level to s_hat
            x_hat = scale_x * x + churn_std * _randn_like(x, generator)
        pred = predict(x_hat, hats[i])
        x_next = a_n * pred.data + sg_n * pred.noise  # line 8: Euler step (= DDIM in x_t)
        if correct:  # lines 9-11: the second-order correction
            pred2 = predict(x_next, points[i + 1])
            if r_form:  # sigma' e + a'/2 (D + D') + half_gap (D - D')
                x_next = (sg_n * pred.noise + 0.5 * a_n * (pred.data + pred2.data)
                          + half_gap * (pred.data - pred2.data))
            else:  # a' D + sigma'/2 (e + e') + half_gap (e - e')
                x_next = (a_n * pred.data + 0.5 * sg_n * (pred.noise + pred2.noise)
                          + half_gap * (pred.noise - pred2.noise))
        x = predict.end_step(points[i], points[i + 1], x, x_next, pred)
    return x


def _level_at(schedule, t: float) -> float:
    c = schedule(torch.tensor(t, dtype=torch.float64))
    return float(c.sigma / c.alpha) if float(c.alpha) > 0 else math.inf


# ------------------------------------------------------------------------------------------
# DPM-Solver++(2M) SDE
# ------------------------------------------------------------------------------------------
@register("dpmpp_2m_sde", order=1, stochastic=True)
def dpmpp_2m_sde(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None,
                 record=None, hook=None, solver_type: str = "midpoint", eta: float = 1.0,
                 s_noise: float = 1.0):
    """DPM-Solver++(2M) SDE (Lu et al. 2022b, "DPM-Solver++", sec. 5 / App. B; the SDE form of
    k-diffusion and diffusers' ``sde-dpmsolver++``), one evaluation per step.

    With ``lambda = log(alpha / sigma)``, ``h = lambda_{i+1} - lambda_i`` and the data
    prediction ``D_i``, the exact solution of the reverse SDE for a data prediction linear in
    lambda gives::

        x' = (sigma'/sigma) e^{-eta h} x + alpha' (1 - e^{-(1+eta) h}) D_i
             + c2 (D_i - D_{i-1}) h / h_{i-1} + s_noise sigma' sqrt(1 - e^{-2 eta h}) z

    with ``c2 = alpha' (1 - e^{-(1+eta)h}) / 2`` (``solver_type="midpoint"``) or
    ``alpha' (1 - (1 - e^{-(1+eta)h}) / ((1+eta) h))`` (``"heun"``). ``eta = 1`` is the reverse
    SDE (Song et al. 2021), ``eta = 0`` the deterministic DPM-Solver++(2M); every eta keeps the
    marginals. The first step, a step from pure noise (``alpha = 0``: ``h`` infinite), the step
    after it, and a final step to ``sigma = 0`` are first order (as k-diffusion's final step).
    Each step is the Gaussian transition ``N(mean, std^2)`` given the trajectory so far;
    records carry its mean, std and log-probability.
    """
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    if eta < 0 or s_noise < 0:
        raise ValueError(f"eta and s_noise must be >= 0, got eta={eta}, s_noise={s_noise}")
    c = denoiser.schedule(grid.to(torch.float64))
    a, sg = c.alpha, c.sigma
    lam = torch.log(a) - torch.log(sg)  # -inf at alpha = 0, +inf at sigma = 0
    h = lam[1:] - lam[:-1]
    a_n, sg_n, sg_c = a[1:], sg[1:], sg[:-1]
    finite = torch.isfinite(h)
    h_f = torch.where(finite, h, torch.ones_like(h))
    decay = torch.exp(-eta * h_f) if eta > 0 else torch.ones_like(h)
    decay = torch.where(finite | (eta == 0), decay, torch.zeros_like(h))
    c_x = torch.where(sg_n > 0, sg_n / sg_c * decay, torch.zeros_like(h))
    one_minus = torch.where(finite, -torch.expm1(-(1 + eta) * h_f), torch.ones_like(h))
    c_d0 = a_n * one_minus
    if solver_type == "midpoint":
        c_d1 = 0.5 * a_n * one_minus
    else:
        c_d1 = a_n * (1 - one_minus / ((1 + eta) * h_f))
    # D1 = (D_i - D_{i-1}) h / h_{i-1}; first order where either step is infinite or at i = 0
    second = torch.zeros_like(h)
    second[1:] = torch.where(finite[1:] & finite[:-1], c_d1[1:] * h_f[1:] / h_f[:-1],
                             torch.zeros_like(h[1:]))
    noise_frac = torch.where(finite, -torch.expm1(-2 * eta * h_f), torch.ones_like(h))
    noise_frac = noise_frac if eta > 0 else torch.zeros_like(h)
    std = s_noise * sg_n * noise_frac.clamp_min(0).sqrt()
    c_x, c_d0, second, std = (plan_numbers(v) for v in (c_x, c_d0, second, std))
    predict = Predictor(denoiser, cond, guidance, record, hook)
    points = denoiser.schedule.points(grid)
    x, data_prev = x_init, None
    for i in range(len(c_x)):
        pred = predict(x, points[i])
        data = pred.data
        mean = c_x[i] * x + c_d0[i] * data
        if second[i] != 0:
            mean = mean + second[i] * (data - data_prev)
        x = _gaussian_step(predict, points[i], points[i + 1], x, mean, std[i], pred, generator)
        data_prev = data
    return x


# ------------------------------------------------------------------------------------------
# Predictor-corrector
# ------------------------------------------------------------------------------------------
@register("pc", order=1, stochastic=True,
          evals_per_step=lambda options: 1 + int(options.get("corrector_steps", 1)))
def pc(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None, record=None, hook=None,
       predictor: str = "reverse_diffusion", corrector_steps: int = 1, snr: float = 0.16):
    """Predictor–corrector sampling (Song et al. 2021, "Score-Based Generative Modeling through
    SDEs", sec. 4.2, Algorithms 2–3, App. G), any schedule.

    Each step runs ``corrector_steps`` Langevin moves at ``t_i`` (Algorithm 2/3 corrector:
    ``g = score``, ``eps = 2 a_i (snr ||z|| / ||g||)^2``, ``x <- x + eps g + sqrt(2 eps) z``,
    with ``a_i = (alpha_i / alpha_{i+1})^2``, the ``1 - beta_i`` of the VP case and 1 for VE)
    then one predictor step to ``t_{i+1}``: ``"reverse_diffusion"`` (eq. 46: with the forward
    transition ``x_i = r x_{i+1} + G z``, ``r = alpha_i / alpha_{i+1}``,
    ``G^2 = sigma_i^2 - r^2 sigma_{i+1}^2``: ``x' = (2 - r) x + G^2 score + G z``) or
    ``"euler_maruyama"`` on the reverse SDE (eq. 6). Corrector-then-predictor is the order of
    Song et al.'s released code, so NFE = steps * (1 + corrector_steps) with no special last
    step; the final predictor step to t = 0 returns its mean (their ``denoise=True``). As in
    their code, ``||z||`` and ``||g||`` are averaged over the batch, so all samples of a batch
    share one step size (per-sample norms are unstable in low dimension, where ``||g||`` of a
    sample near a mode can vanish).

    Records: one per move; predictor moves are Gaussian (mean, std, log_prob), corrector moves
    are not (their step size depends on the drawn noise) and carry ``t == t_next``. The
    reverse SDE is singular where ``alpha = 0`` (t = 1 of rectified flow / cosine): a grid
    starting there raises. ``tiltflow.sample(nfe=N)`` assumes the default ``corrector_steps=1``.
    """
    if predictor not in ("reverse_diffusion", "euler_maruyama"):
        raise ValueError(f"predictor must be 'reverse_diffusion' or 'euler_maruyama', got "
                         f"{predictor!r}")
    if isinstance(corrector_steps, bool) or not isinstance(corrector_steps, int) or corrector_steps < 0:
        raise ValueError(f"corrector_steps must be an int >= 0, got {corrector_steps!r}")
    if not snr >= 0:
        raise ValueError(f"snr must be >= 0, got {snr}")
    _refuse_pure_noise(denoiser, grid, "pc")
    g64 = grid.to(torch.float64)
    c = denoiser.schedule(g64)
    a, sg = c.alpha, c.sigma
    ratio = a[:-1] / a[1:]
    lang = 2 * snr**2 * ratio**2  # eps = lang * ||z||^2 / ||g||^2
    if predictor == "reverse_diffusion":
        g2 = (sg[:-1] ** 2 - ratio**2 * sg[1:] ** 2).clamp_min(0)
        c_x, c_score, c_v = 2 - ratio, g2, None
        std = g2.sqrt()
    else:
        g2 = 2 * sg**2 * (c.d_sigma / sg - c.d_alpha / a)
        dt = g64[1:] - g64[:-1]
        c_x, c_v, c_score = torch.ones_like(dt), dt, -0.5 * dt * g2[:-1]
        std = (g2[:-1] * dt.abs()).sqrt()
    std[g64[1:] == 0] = 0.0
    if not bool(torch.isfinite(std).all()):
        raise ValueError(f"pc: non-finite noise for schedule {denoiser.schedule!r} on this grid")
    lang, c_x, c_score, std = (plan_numbers(v) for v in (lang, c_x, c_score, std))
    c_v = plan_numbers(c_v) if c_v is not None else None
    predict = Predictor(denoiser, cond, guidance, record, hook)
    points = denoiser.schedule.points(g64)
    x = x_init
    for i in range(len(std)):
        for _ in range(corrector_steps):  # Langevin corrector at t_i
            pred = predict(x, points[i])
            g = pred.score
            z = _randn_like(x, generator)
            z_norm, g_norm = (torch.linalg.vector_norm(v.flatten(1), dim=1).mean() for v in (z, g))
            step = lang[i] * (z_norm / g_norm.clamp_min(torch.finfo(x.dtype).tiny)) ** 2
            x = predict.end_step(points[i], points[i], x, x + step * g + (2 * step).sqrt() * z, pred)
        pred = predict(x, points[i])  # predictor to t_{i+1}
        mean = c_x[i] * x + c_score[i] * pred.score
        if c_v is not None:
            mean = mean + c_v[i] * pred.velocity
        x = _gaussian_step(predict, points[i], points[i + 1], x, mean, std[i], pred, generator)
    return x


# ------------------------------------------------------------------------------------------
# Annealed Langevin dynamics
# ------------------------------------------------------------------------------------------
@register("annealed_langevin", order=1, stochastic=True,
          evals_per_step=lambda options: int(options.get("steps_per_level", 1)))
def annealed_langevin(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None,
                      record=None, hook=None, steps_per_level: int = 1, eps: float | None = None):
    """Annealed Langevin dynamics (Song & Ermon 2019, "Generative Modeling by Estimating
    Gradients of the Data Distribution", Algorithm 1), any schedule.

    The noise levels are the grid's times ``t_0 .. t_{n-1}`` (scaled levels
    ``s_i = sigma_i / alpha_i``, EDM sec. 4, so the VE algorithm applies to every schedule).
    At each level ``steps_per_level`` (T) Langevin moves ``y <- y + a_i/2 grad log p(y; s_i)
    + sqrt(a_i) z`` on the scaled state ``y = x_t / alpha`` with step
    ``a_i = eps * s_i^2 / s_L^2`` (``s_L`` the last level); then the state passes unchanged to
    the next level. The last evaluation, at level ``t_{n-1}``, is used to leave the chain:
    ``x = alpha_n (D + s_n eps_hat)``, which for a clean ``t_n = 0`` is Tweedie's denoising
    step of Song & Ermon 2020 ("Improved Techniques", sec. 4) and otherwise a DDIM step to the
    output level. So NFE = n * T (``tiltflow.sample(nfe=N)`` assumes the default T = 1).
    ``eps=None`` uses ``eps = 2 s_L^2``: every level's relative step ``a_i / s_i^2`` is 2, half
    the stability limit 4 of the Langevin step (``-hess log p(y; s) <= I / s^2``).

    Every Langevin move is a Gaussian transition; records (one per evaluation, ``t == t_next``
    within a level) carry mean, std and log-probability. Needs ``alpha > 0`` at every level:
    a grid starting at alpha = 0 raises.
    """
    if isinstance(steps_per_level, bool) or not isinstance(steps_per_level, int) or steps_per_level < 1:
        raise ValueError(f"steps_per_level must be an int >= 1, got {steps_per_level!r}")
    if eps is not None and not eps > 0:
        raise ValueError(f"eps must be > 0 (or None for the default), got {eps}")
    _refuse_pure_noise(denoiser, grid, "annealed_langevin")
    g64 = grid.to(torch.float64)
    c = denoiser.schedule(g64)
    a, sg = c.alpha, c.sigma
    levels = sg[:-1] / a[:-1]
    s_last = float(levels[-1])
    if not s_last > 0:
        raise ValueError("annealed_langevin needs noise levels > 0 at grid[:-1]")
    if eps is None:
        eps = 2.0 * s_last**2
    # in x_t: x <- x - (eps sigma_i / (2 s_L^2)) eps_hat + (sqrt(eps) sigma_i / s_L) z
    drift = eps * sg[:-1] / (2 * s_last**2)
    noise = math.sqrt(eps) * sg[:-1] / s_last
    move = a[1:] / a[:-1]  # passing y unchanged to the next level rescales x_t
    n = len(drift)
    drift, noise, move = plan_numbers(drift), plan_numbers(noise), plan_numbers(move)
    predict = Predictor(denoiser, cond, guidance, record, hook)
    points = denoiser.schedule.points(g64)
    x = x_init
    for i in range(n):
        for k in range(steps_per_level):
            pred = predict(x, points[i])
            last_move = k == steps_per_level - 1
            if i == n - 1 and last_move:  # leave the chain: denoise / DDIM
                x_out = a[-1] * pred.data + sg[-1] * pred.noise
                x = predict.end_step(points[i], points[i + 1], x, x_out, pred)
                break
            r = move[i] if last_move else 1.0
            t_next = points[i + 1] if last_move else points[i]
            x = _gaussian_step(predict, points[i], t_next, x, r * (x - drift[i] * pred.noise),
                               r * noise[i], pred, generator)
    return x
