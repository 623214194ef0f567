"""Checks of ``tiltflow.analytic`` against independent derivations.

Tolerances:
- Monte-Carlo comparisons use ``Z = 5`` standard errors (SE estimated from the same samples;
  for self-normalised importance sampling the delta-method SE
  ``sqrt(sum_i wbar_i^2 (f_i - fhat)^2)``). All generators are seeded, so runs are
  deterministic; with ~10^2 such checks in the file a false alarm has probability ~1e-4.
- 2-D grid quadrature uses the rectangle rule on a lattice of spacing ``h <= min_std / 4`` over
  a box reaching 10 standard deviations beyond every mean. For Gaussians the lattice-sum
  (aliasing) error is ``~exp(-2 pi^2 std^2 / h^2) < 1e-130`` and the truncated mass is
  ``< 1e-22``, so only float64 round-off over ``N ~ 1e6`` terms remains (``< N eps ~ 2e-10``):
  we use ``1e-8``.
- Identities between closed forms (autograd, Tweedie, schedule changes) hold to float64
  round-off amplified by condition numbers of order 1e2: ``1e-9`` relative. A quantity derived
  from ``x_hat`` by ``(x_t - alpha x_hat) / sigma`` gets that error times ``alpha / sigma``.
- Direct evaluations of one closed form two ways (scipy vs the library, a dense solve vs the
  mixture algebra) involve only a handful of well-conditioned float64 operations: ``1e-12``
  (``~5e3 eps``); where an extra linear solve with condition number ``<~ 1e2`` enters
  (posterior moments) ``1e-11``, and ``1e-10`` for the 16-D conditional mixture and the
  evidence ``p(y)`` (a log-sum-exp over 8-16 components of 16-D Gaussian log-densities).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from tiltflow import analytic, schedules
from tiltflow.analytic import GaussianMixture
from tiltflow.rewards import LinearReward, QuadraticReward, Reward

F64 = torch.float64
Z = 5.0  # standard errors for Monte-Carlo checks
QUAD_TOL = 1e-8
EXACT_RTOL = 1e-9


def all_schedules():
    return schedules.examples()


SCHEDULES = all_schedules()
# log-SNR range reached by every schedule above (scaled_linear ends at -5.36, VE starts at 9.2).
LAM_LO, LAM_HI = -4.5, 8.5


def gen(seed):
    return torch.Generator().manual_seed(seed)


def interior_t(schedule, n, seed=0):
    lam = LAM_LO + (LAM_HI - LAM_LO) * torch.rand(n, dtype=F64, generator=gen(seed))
    return schedule.t_from_logsnr(lam)


def noisy(gmm, schedule, t, seed=0):
    x = gmm.sample(t.numel(), gen(seed))
    noise = torch.randn(t.numel(), gmm.dim, dtype=F64, generator=gen(seed + 1))
    c = schedule(t)
    return c.alpha[:, None] * x + c.sigma[:, None] * noise


def small_3d():
    g = gen(3)
    a = torch.randn(3, 3, 3, dtype=F64, generator=g)
    covs = a @ a.transpose(-1, -2) / 3 + 0.2 * torch.eye(3, dtype=F64)
    return GaussianMixture(torch.tensor([0.5, 0.3, 0.2], dtype=F64),
                           torch.randn(3, 3, dtype=F64, generator=g), covs)


# -- grid quadrature ------------------------------------------------------------------------------
def lattice(*gmms):
    """Points ``[N, 2]`` and cell area for the rectangle rule (see the module docstring)."""
    min_std = min(float(torch.linalg.eigvalsh(g.covs).min()) ** 0.5 for g in gmms)
    max_std = max(float(torch.linalg.eigvalsh(g.covs).max()) ** 0.5 for g in gmms)
    reach = max(float(g.means.abs().max()) for g in gmms) + 10 * max_std
    h = min_std / 4
    n = math.ceil(reach / h)
    ax = torch.arange(-n, n + 1, dtype=F64) * h
    xx, yy = torch.meshgrid(ax, ax, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], -1), h * h


def quad_moments(log_density, pts, area):
    """Normalised weights, mass, mean and covariance of an unnormalised density on the lattice."""
    shift = log_density.max()
    p = torch.exp(log_density - shift)
    mass = p.sum() * area
    q = p * area / mass
    mean = q @ pts
    d = pts - mean
    cov = (q[:, None] * d).T @ d
    return q, torch.log(mass) + shift, mean, cov


def component_logpdf(gmm, x):
    """``log N(x; mu_k, S_k)`` ``[N, K]`` through scipy (independent of the library's algebra)."""
    cols = [
        stats.multivariate_normal(gmm.means[k].numpy(), gmm.covs[k].numpy()).logpdf(x.numpy())
        for k in range(gmm.num_components)
    ]
    return torch.as_tensor(np.stack(cols, -1), dtype=F64)


# -- construction, properties and test beds -------------------------------------------------------
def test_testbeds_registry():
    assert analytic.testbeds() == ["eight_gaussians", "anisotropic_2d", "random_16d"]
    for name in analytic.testbeds():
        g = analytic.get_testbed(name)
        assert abs(float(g.weights.sum()) - 1) < 1e-12  # K <= 8 float64 additions
    assert analytic.get_testbed("random_16d").dim == 16
    assert torch.equal(analytic.random_16d().means, analytic.random_16d().means)
    assert not torch.equal(analytic.random_16d(seed=1).means, analytic.random_16d().means)
    a = analytic.anisotropic_2d()
    assert a.num_components == 4 and len(set(a.weights.tolist())) == 4
    e = analytic.eight_gaussians()
    assert torch.allclose(e.means.norm(dim=-1), torch.full((8,), 4.0, dtype=F64))
    with pytest.raises(ValueError, match="unknown test bed"):
        analytic.get_testbed("nope")


def test_overall_moments_closed_form():
    g = small_3d()
    m = sum(g.weights[k] * g.means[k] for k in range(3))
    second = sum(g.weights[k] * (g.covs[k] + torch.outer(g.means[k], g.means[k])) for k in range(3))
    assert torch.allclose(g.mean, m, atol=1e-14)
    assert torch.allclose(g.cov, second - torch.outer(m, m), atol=1e-13)


@pytest.mark.parametrize("name", ["eight_gaussians", "anisotropic_2d", "random_16d"])
def test_sample_moments(name):
    g = analytic.get_testbed(name)
    n = 40_000
    x, labels = g.sample(n, gen(0), return_labels=True)
    assert x.shape == (n, g.dim) and x.dtype == F64 and labels.shape == (n,)
    mean_hat = x.mean(0)
    se_mean = x.std(0) / n**0.5
    assert bool(((mean_hat - g.mean).abs() <= Z * se_mean).all())
    xc = x - g.mean  # centred at the exact mean: E[xc xc^T] = cov, SE from the products
    prod = xc[:, :, None] * xc[:, None, :]
    cov_hat, se_cov = prod.mean(0), prod.std(0) / n**0.5
    assert bool(((cov_hat - g.cov).abs() <= Z * se_cov).all())
    freq = torch.bincount(labels, minlength=g.num_components).to(F64) / n
    se_freq = (g.weights * (1 - g.weights) / n).sqrt()
    assert bool(((freq - g.weights).abs() <= Z * se_freq).all())


def test_sample_reproducible():
    g = analytic.anisotropic_2d()
    assert torch.equal(g.sample(100, gen(7)), g.sample(100, gen(7)))
    assert not torch.equal(g.sample(100, gen(7)), g.sample(100, gen(8)))
    assert g.sample(0).shape == (0, 2)


# -- densities ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["eight_gaussians", "anisotropic_2d"])
def test_log_prob_normalises_on_grid(name):
    g = analytic.get_testbed(name)
    pts, area = lattice(g)
    total = float(torch.exp(g.log_prob(pts)).sum() * area)
    assert abs(total - 1) < QUAD_TOL


def test_log_prob_matches_scipy():
    g = small_3d()
    x = torch.randn(50, 3, dtype=F64, generator=gen(1)) * 2
    one = GaussianMixture([1.0], g.means[:1], g.covs[:1])
    ref = stats.multivariate_normal(g.means[0].numpy(), g.covs[0].numpy()).logpdf(x.numpy())
    assert np.allclose(one.log_prob(x).numpy(), ref, rtol=1e-12, atol=1e-12)
    ref_mix = np.log(np.exp(component_logpdf(g, x).numpy()) @ g.weights.numpy())
    assert np.allclose(g.log_prob(x).numpy(), ref_mix, rtol=1e-12, atol=1e-12)
    assert g.log_prob(x.reshape(5, 10, 3)).shape == (5, 10)
    assert g.log_prob(x.float()).dtype == torch.float32


# -- noisy marginals ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "sched_name,t", [("vp_linear", 0.3), ("rectified_flow", 0.6), ("edm", 0.02), ("cosine", 0.9)]
)
def test_marginal_matches_noisy_samples(sched_name, t):
    g, sched = analytic.anisotropic_2d(), SCHEDULES[sched_name]
    n = 20_000
    tt = torch.full((n,), t, dtype=F64)
    x_t = noisy(g, sched, tt, seed=11)
    m = g.marginal(sched, t)
    se = x_t.std(0) / n**0.5
    assert bool(((x_t.mean(0) - m.mean).abs() <= Z * se).all())
    # Kolmogorov-Smirnov on two projections against the exact projected mixture CDF; the
    # significance level 1e-4 is the test's false-alarm rate.
    for u in (torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.6, -0.8], dtype=F64)):
        loc = (m.means @ u).numpy()
        scale = torch.einsum("i,kij,j->k", u, m.covs, u).sqrt().numpy()
        w = m.weights.numpy()

        def cdf(v, loc=loc, scale=scale, w=w):
            return stats.norm.cdf((np.asarray(v)[..., None] - loc) / scale) @ w

        assert stats.kstest((x_t @ u).numpy(), cdf).pvalue > 1e-4
    # the marginal mixture and the per-example log_prob_t agree
    assert torch.allclose(m.log_prob(x_t[:100]), g.log_prob_t(x_t[:100], tt[:100], sched),
                          rtol=1e-12, atol=1e-12)


def test_marginal_at_clean_end_is_data():
    g = analytic.anisotropic_2d()
    m = g.marginal(schedules.RectifiedFlow(), 0.0)
    assert torch.allclose(m.means, g.means) and torch.allclose(m.covs, g.covs)
    pure = g.marginal(schedules.RectifiedFlow(), 1.0)
    assert torch.allclose(pure.covs, torch.eye(2, dtype=F64).expand(4, 2, 2), atol=1e-15)
    with pytest.raises(ValueError, match="scalar"):
        g.marginal(schedules.RectifiedFlow(), torch.tensor([0.1, 0.2]))


@pytest.mark.parametrize("sched_name", list(SCHEDULES))
def test_score_is_autograd_of_log_prob(sched_name):
    sched = SCHEDULES[sched_name]
    for g in (analytic.anisotropic_2d(), analytic.random_16d()):
        t = interior_t(sched, 16, seed=2)
        x_t = noisy(g, sched, t, seed=3).requires_grad_(True)
        (grad,) = torch.autograd.grad(g.log_prob_t(x_t, t, sched).sum(), x_t)
        score = g.score_t(x_t.detach(), t, sched)
        assert torch.allclose(score, grad, rtol=EXACT_RTOL, atol=EXACT_RTOL * grad.abs().max())


# -- posterior mean / covariance ------------------------------------------------------------------
@pytest.mark.parametrize("sched_name", list(SCHEDULES))
def test_tweedie_identity(sched_name):
    """E[x | x_t] = (x_t + sigma^2 grad log p_t(x_t)) / alpha (Efron 2011; Robbins 1956)."""
    sched = SCHEDULES[sched_name]
    for g in (analytic.eight_gaussians(), analytic.random_16d()):
        t = interior_t(sched, 32, seed=4)
        x_t = noisy(g, sched, t, seed=5)
        c = sched(t)
        tweedie = (x_t + c.sigma[:, None] ** 2 * g.score_t(x_t, t, sched)) / c.alpha[:, None]
        pm = g.posterior_mean(x_t, t, sched)
        assert torch.allclose(pm, tweedie, rtol=EXACT_RTOL, atol=EXACT_RTOL * pm.abs().max())


def test_posterior_single_gaussian_closed_form():
    """K = 1: the joint (x, x_t) is Gaussian; condition with a dense solve (Bishop 2006, 2.81)."""
    g = small_3d()
    one = GaussianMixture([1.0], g.means[:1], g.covs[:1])
    mu, S = g.means[0], g.covs[0]
    sched = schedules.Cosine()
    t = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
    x_t = torch.randn(3, 3, dtype=F64, generator=gen(9))
    c = sched(t)
    pm, pc = one.posterior_mean(x_t, t, sched), one.posterior_cov(x_t, t, sched)
    for i in range(3):
        a, s = c.alpha[i], c.sigma[i]
        cyy = a * a * S + s * s * torch.eye(3, dtype=F64)
        mean = mu + a * S @ torch.linalg.solve(cyy, x_t[i] - a * mu)
        cov = S - a * a * S @ torch.linalg.solve(cyy, S)
        assert torch.allclose(pm[i], mean, rtol=1e-11, atol=1e-11)
        assert torch.allclose(pc[i], cov, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize(
    "name,sched_name,t", [("eight_gaussians", "rectified_flow", 0.5),
                          ("anisotropic_2d", "cosine", 0.6), ("anisotropic_2d", "edm", 0.01)]
)
def test_posterior_moments_vs_self_normalised_mc(name, sched_name, t):
    """E[f(x) | x_t] ~ sum_i f(x_i) N(x_t; alpha x_i, sigma^2 I) / sum_i N(...), x_i ~ p."""
    g, sched = analytic.get_testbed(name), SCHEDULES[sched_name]
    tt = torch.full((4,), t, dtype=F64)
    x_t = noisy(g, sched, tt, seed=21)
    xs = g.sample(200_000, gen(22))
    c = sched(tt)
    a, s = float(c.alpha[0]), float(c.sigma[0])
    logw = -((x_t[:, None, :] - a * xs[None]) ** 2).sum(-1) / (2 * s * s)
    wbar = torch.softmax(logw, -1)  # [4, N]
    assert float((1 / (wbar**2).sum(-1)).min()) > 1000  # enough effective samples for the SE
    pm, pc = g.posterior_mean(x_t, tt, sched), g.posterior_cov(x_t, tt, sched)
    mc = wbar @ xs
    se = ((wbar[..., None] ** 2) * (xs[None] - mc[:, None]) ** 2).sum(1).sqrt()
    assert bool(((mc - pm).abs() <= Z * se).all())
    d = xs[None] - pm[:, None]  # second moment about the exact mean = exact covariance
    prod = d[..., :, None] * d[..., None, :]
    mc_cov = torch.einsum("bn,bnij->bij", wbar, prod)
    se_cov = torch.einsum("bn,bnij->bij", wbar**2, (prod - mc_cov[:, None]) ** 2).sqrt()
    assert bool(((mc_cov - pc).abs() <= Z * se_cov).all())


def test_posterior_mean_endpoints():
    g, rf = analytic.anisotropic_2d(), schedules.RectifiedFlow()
    x_t = torch.randn(5, 2, dtype=F64, generator=gen(1)) * 3
    at_data = g.posterior_mean(x_t, torch.zeros(5, dtype=F64), rf)  # sigma = 0
    assert torch.allclose(at_data, x_t, rtol=1e-14, atol=1e-14)
    at_noise = g.posterior_mean(x_t, torch.ones(5, dtype=F64), rf)  # alpha = 0
    assert torch.allclose(at_noise, g.mean.expand(5, 2), rtol=1e-14, atol=1e-14)
    mixed = g.posterior_mean(x_t, torch.tensor([0.0, 1.0, 0.5, 0.0, 1.0], dtype=F64), rf)
    assert torch.allclose(mixed[0], x_t[0]) and torch.allclose(mixed[1], g.mean)
    assert bool(torch.isfinite(g.posterior_cov(x_t, torch.ones(5, dtype=F64), rf)).all())


def test_conditional_mixture_matches_moments():
    g, sched = analytic.random_16d(), schedules.VPLinear()
    t = torch.tensor([0.4], dtype=F64)
    x_t = noisy(g, sched, t, seed=31)
    cond = g.conditional(x_t[0], 0.4, sched)
    assert torch.allclose(cond.mean, g.posterior_mean(x_t, t, sched)[0], rtol=1e-10, atol=1e-10)
    assert torch.allclose(cond.cov, g.posterior_cov(x_t, t, sched)[0], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="sigma"):
        g.conditional(x_t[0], 0.0, schedules.RectifiedFlow())


def test_denoiser_dtypes_and_gradients():
    g, sched = analytic.anisotropic_2d(), schedules.VPLinear()
    den = g.denoiser(sched)
    t = interior_t(sched, 8, seed=1)
    x_t = noisy(g, sched, t, seed=2)
    out64 = den(x_t, t).data
    assert out64.dtype == F64
    assert torch.allclose(out64, g.posterior_mean(x_t, t, sched))
    out32 = den(x_t.float(), t.float()).data
    assert out32.dtype == torch.float32
    # float32 inputs (x_t and t rounded to 2^-24 relative) move the answer by ~1e-6 relative
    # times the local Lipschitz constant (<~ 1e2 on these thin components)
    assert torch.allclose(out32.double(), out64, rtol=1e-3, atol=1e-3)
    assert den(x_t, t, cond=None).data.shape == x_t.shape
    x_req = x_t[:3].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: g.posterior_mean(x, t[:3], sched), (x_req,))


@pytest.mark.parametrize("dst_name", list(SCHEDULES))
def test_denoiser_schedule_change_all_pairs(dst_name):
    """``gmm.denoiser(A).with_schedule(B)`` equals ``gmm.denoiser(B)`` for every pair."""
    dst = SCHEDULES[dst_name]
    g = analytic.anisotropic_2d()
    t = interior_t(dst, 12, seed=41)
    x_t = noisy(g, dst, t, seed=42)
    ref = g.denoiser(dst)(x_t, t)
    c = dst(t)
    # noise = (x_t - alpha x_hat) / sigma: an error in x_hat is amplified by alpha / sigma
    amplify = float((c.alpha / c.sigma).max())
    for src in SCHEDULES.values():
        moved = g.denoiser(src).with_schedule(dst)(x_t, t)
        scale = ref.data.abs().max()
        assert torch.allclose(moved.data, ref.data, rtol=EXACT_RTOL, atol=EXACT_RTOL * scale), (
            f"{src.name} -> {dst_name}"
        )
        assert torch.allclose(moved.noise, ref.noise, rtol=EXACT_RTOL,
                              atol=EXACT_RTOL * amplify * scale), f"{src.name} -> {dst_name}"


# -- tilts ----------------------------------------------------------------------------------------
def check_tilt_on_grid(g, reward, beta):
    tilted = g.tilt(reward, beta)
    pts, area = lattice(g, tilted)
    log_comp = component_logpdf(g, pts) + torch.log(g.weights)
    log_t = torch.logsumexp(log_comp, -1) + reward(pts) / beta
    q, log_mass, mean, cov = quad_moments(log_t, pts, area)
    assert torch.allclose(tilted.mean, mean, atol=QUAD_TOL)
    assert torch.allclose(tilted.cov, cov, atol=QUAD_TOL)
    # component k's tilted mass: integral of w_k N_k exp(r / beta), over the total
    comp_mass = torch.exp(log_comp + (reward(pts) / beta)[:, None] - log_mass).sum(0) * area
    assert torch.allclose(tilted.weights, comp_mass, atol=QUAD_TOL)
    keep = log_t - log_mass > -30  # pointwise where the density is representable
    assert torch.allclose(tilted.log_prob(pts[keep]), (log_t - log_mass)[keep],
                          rtol=0, atol=QUAD_TOL)
    return tilted


def test_tilt_linear_on_grid():
    g = analytic.anisotropic_2d()
    tilted = check_tilt_on_grid(g, LinearReward([0.8, -0.5], b=3.0), beta=0.7)
    assert torch.allclose(tilted.covs, g.covs)  # a linear tilt only moves the means


def test_tilt_quadratic_on_grid():
    g = analytic.eight_gaussians()
    # indefinite A, still normalisable: S^{-1} + A / beta = [[1, 0.6], [0.6, 8]] is positive
    # definite (S = 0.25 I, beta = 0.5).
    reward = QuadraticReward([[-1.5, 0.3], [0.3, 2.0]], b=[1.0, 0.5], c=-2.0)
    check_tilt_on_grid(g, reward, beta=0.5)
    check_tilt_on_grid(analytic.anisotropic_2d(), QuadraticReward(torch.eye(2), b=[2.0, 0.0]), 1.0)


@pytest.mark.parametrize("kind", ["linear", "quadratic"])
def test_tilt_16d_importance_weights(kind):
    """Self-normalised importance sampling with weights exp(r(x_i) / beta), x_i ~ p."""
    g = analytic.random_16d()
    rg = gen(51)
    if kind == "linear":
        reward = LinearReward(0.3 * torch.randn(16, dtype=F64, generator=rg))
    else:
        a = torch.randn(16, 16, dtype=F64, generator=rg) / 16
        reward = QuadraticReward(a @ a.T * 0.5, b=0.2 * torch.randn(16, dtype=F64, generator=rg))
    beta = 1.0
    tilted = g.tilt(reward, beta)
    x, labels = g.sample(100_000, gen(52), return_labels=True)
    wbar = torch.softmax(reward(x) / beta, 0)
    assert float(1 / (wbar**2).sum()) > 1000
    mc = wbar @ x
    se = ((wbar[:, None] ** 2) * (x - mc) ** 2).sum(0).sqrt()
    assert bool(((mc - tilted.mean).abs() <= Z * se).all())
    onehot = torch.nn.functional.one_hot(labels, g.num_components).to(F64)
    mc_w = wbar @ onehot
    se_w = ((wbar[:, None] ** 2) * (onehot - mc_w) ** 2).sum(0).sqrt()
    assert bool(((mc_w - tilted.weights).abs() <= Z * se_w).all())


def test_tilt_errors():
    g = analytic.eight_gaussians()  # S^{-1} = 4 I
    with pytest.raises(ValueError, match="not normalisable"):
        g.tilt(QuadraticReward(-10 * torch.eye(2)), beta=1.0)
    g.tilt(QuadraticReward(-10 * torch.eye(2)), beta=4.0)  # 4 - 2.5 > 0: fine
    with pytest.raises(ValueError, match="beta"):
        g.tilt(LinearReward([1.0, 0.0]), beta=0.0)
    with pytest.raises(ValueError, match="dimension"):
        g.tilt(LinearReward([1.0, 0.0, 0.0]))

    class Black(Reward):
        def forward(self, x, cond=None):
            return x.sum(-1)

    with pytest.raises(TypeError, match="no closed-form tilt"):
        g.tilt(Black())


# -- linear-Gaussian observations -----------------------------------------------------------------
@pytest.mark.parametrize("operator", ["row", "square"])
def test_posterior_on_grid(operator):
    g = analytic.anisotropic_2d()
    if operator == "row":
        A, y = torch.tensor([[1.0, 0.5]], dtype=F64), torch.tensor([0.7], dtype=F64)
    else:
        A = torch.tensor([[1.0, 0.0], [0.4, -0.7]], dtype=F64)
        y = torch.tensor([-1.0, 0.4], dtype=F64)
    noise_std = 0.6
    post = g.posterior(A, y, noise_std)
    pts, area = lattice(g, post)
    log_comp = component_logpdf(g, pts) + torch.log(g.weights)
    log_lik = stats.multivariate_normal(y.numpy(), noise_std**2 * np.eye(len(y))).logpdf(
        (pts @ A.T).numpy())
    log_lik = torch.as_tensor(log_lik, dtype=F64).reshape(-1)
    log_u = torch.logsumexp(log_comp, -1) + log_lik
    q, log_mass, mean, cov = quad_moments(log_u, pts, area)
    assert torch.allclose(post.mean, mean, atol=QUAD_TOL)
    assert torch.allclose(post.cov, cov, atol=QUAD_TOL)
    comp_mass = torch.exp(log_comp + log_lik[:, None] - log_mass).sum(0) * area
    assert torch.allclose(post.weights, comp_mass, atol=QUAD_TOL)
    keep = log_u - log_mass > -30
    assert torch.allclose(post.log_prob(pts[keep]), (log_u - log_mass)[keep], rtol=0,
                          atol=QUAD_TOL)


def log_evidence(g, A, y, noise_std):
    """log p(y) = log sum_k w_k N(y; A mu_k, A S_k A^T + s^2 I), through scipy."""
    vals = [
        stats.multivariate_normal((A @ g.means[k]).numpy(),
                                  (A @ g.covs[k] @ A.T + noise_std**2 * torch.eye(len(y),
                                   dtype=F64)).numpy()).logpdf(y.numpy())
        for k in range(g.num_components)
    ]
    return float(torch.logsumexp(torch.tensor(vals, dtype=F64) + torch.log(g.weights), 0))


@pytest.mark.parametrize("name", ["anisotropic_2d", "random_16d"])
def test_log_likelihood_y_given_xt_vs_mc(name):
    """p(y | x_t) = E[N(y; A x, s^2 I) | x_t], with x drawn from the exact p(x | x_t)."""
    g = analytic.get_testbed(name)
    sched = schedules.RectifiedFlow()
    rg = gen(61)
    m = 1 if g.dim == 2 else 4
    A = torch.randn(m, g.dim, dtype=F64, generator=rg) / g.dim**0.5
    noise_std = 0.5
    x_true = g.sample(1, gen(62))
    y = (x_true @ A.T)[0] + noise_std * torch.randn(m, dtype=F64, generator=rg)
    t = torch.tensor([0.2, 0.5, 0.8], dtype=F64)
    x_t = noisy(g, sched, t, seed=63)
    exact = g.log_likelihood_y_given_xt(A, y, noise_std, x_t, t, sched)
    lik = stats.multivariate_normal(y.numpy(), noise_std**2 * np.eye(m))
    for i in range(3):
        xs = g.conditional(x_t[i], float(t[i]), sched).sample(50_000, gen(64 + i))
        vals = torch.as_tensor(np.exp(lik.logpdf((xs @ A.T).numpy())), dtype=F64).reshape(-1)
        est, se = vals.mean(), vals.std() / vals.numel() ** 0.5
        assert abs(float(est) - math.exp(float(exact[i]))) <= Z * float(se)
    # y of shape [B, M] and the pure-noise end, where p(y | x_t) = p(y)
    both = g.log_likelihood_y_given_xt(A, y.expand(3, m), noise_std, x_t, t, sched)
    assert torch.allclose(both, exact)
    ones = torch.ones(3, dtype=F64)
    at_noise = g.log_likelihood_y_given_xt(A, y, noise_std, x_t, ones, sched)
    assert torch.allclose(at_noise, torch.full((3,), log_evidence(g, A, y, noise_std),
                                                dtype=F64), rtol=1e-10, atol=1e-10)
    # the posterior's normaliser is the same p(y): posterior weights * p(y) = w_k N(y; A mu_k,
    # A S_k A^T + s^2 I), each side through scipy
    log_py = log_evidence(g, A, y, noise_std)
    log_wk = torch.tensor([
        stats.multivariate_normal((A @ g.means[k]).numpy(),
                                  (A @ g.covs[k] @ A.T + noise_std**2 * torch.eye(m, dtype=F64))
                                  .numpy()).logpdf(y.numpy())
        for k in range(g.num_components)], dtype=F64) + torch.log(g.weights)
    post_w = g.posterior(A, y, noise_std).weights
    assert torch.allclose(post_w, torch.exp(log_wk - log_py), rtol=1e-10, atol=1e-12)


def test_log_likelihood_y_given_xt_vs_prior_importance_sampling():
    """Independent of the posterior formulas: p(y | x_t) = E_p[N(y; Ax) N(x_t; a x, s^2)] /
    E_p[N(x_t; a x, s^2)] estimated by a ratio of sample means (delta-method SE)."""
    g, sched = analytic.eight_gaussians(), schedules.Cosine()
    A, y, noise_std = torch.tensor([[0.6, 0.8]], dtype=F64), torch.tensor([2.0], dtype=F64), 0.5
    t = torch.tensor([0.5, 0.7], dtype=F64)
    x_t = noisy(g, sched, t, seed=71)
    exact = torch.exp(g.log_likelihood_y_given_xt(A, y, noise_std, x_t, t, sched))
    xs = g.sample(200_000, gen(72))
    c = sched(t)
    lik = torch.exp(-((xs @ A.T - y) ** 2).sum(-1) / (2 * noise_std**2)) / (
        (2 * math.pi) ** 0.5 * noise_std)
    for i in range(2):
        a, s = c.alpha[i], c.sigma[i]
        wbar = torch.softmax(-((x_t[i] - a * xs) ** 2).sum(-1) / (2 * s * s), 0)
        est = wbar @ lik
        se = ((wbar**2) * (lik - est) ** 2).sum().sqrt()
        assert abs(float(est - exact[i])) <= Z * float(se)


def test_log_likelihood_is_differentiable_in_xt():
    g, sched = analytic.anisotropic_2d(), schedules.VPLinear()
    A, y = torch.tensor([[1.0, -0.5]], dtype=F64), torch.tensor([0.3], dtype=F64)
    t = torch.tensor([0.3, 0.6], dtype=F64)
    x_t = noisy(g, sched, t, seed=81).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: g.log_likelihood_y_given_xt(A, y, 0.4, x, t, sched), (x_t,))


# -- bad inputs -----------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    eye = torch.eye(2, dtype=F64)
    ok_means, ok_covs = torch.zeros(2, 2), eye.expand(2, 2, 2)
    cases = [
        (([[0.5, 0.5]], ok_means, ok_covs), "weights must have shape"),
        (([0.5, 0.5], torch.zeros(3, 2), ok_covs), "means must have shape"),
        (([0.5, 0.5], ok_means, eye), "covs must have shape"),
        (([1.5, -0.5], ok_means, ok_covs), "non-negative"),
        (([0.5, 0.6], ok_means, ok_covs), "normalize=True"),
        (([0.5, 0.5], ok_means, torch.stack([eye, torch.tensor([[1.0, 2.0], [0.0, 1.0]])])),
         "symmetric"),
        (([0.5, 0.5], ok_means, torch.stack([eye, torch.tensor([[1.0, 2.0], [2.0, 1.0]])])),
         r"covs\[1\] is not positive definite"),
        (([0.5, 0.5], torch.tensor([[0.0, float("nan")], [0.0, 0.0]]), ok_covs), "finite"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            GaussianMixture(*args)
    g = GaussianMixture([2.0, 6.0], ok_means, ok_covs, normalize=True)
    assert torch.allclose(g.weights, torch.tensor([0.25, 0.75], dtype=F64))
    sched = schedules.RectifiedFlow()
    with pytest.raises(ValueError, match=r"shape \[\.\.\., 2\]"):
        g.log_prob(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="x_t must have shape"):
        g.posterior_mean(torch.zeros(4, 3), torch.zeros(4), sched)
    with pytest.raises(ValueError, match="t must have shape"):
        g.posterior_mean(torch.zeros(4, 2), torch.zeros(3), sched)
    with pytest.raises(ValueError, match="A must have shape"):
        g.posterior(torch.zeros(1, 3), [0.0], 0.1)
    with pytest.raises(ValueError, match="y must have shape"):
        g.posterior(torch.zeros(1, 2), [0.0, 1.0], 0.1)
    with pytest.raises(ValueError, match="noise_std"):
        g.posterior(torch.zeros(1, 2), [0.0], 0.0)
    with pytest.raises(ValueError, match="y must have shape"):
        g.log_likelihood_y_given_xt(torch.zeros(1, 2), torch.zeros(3, 1), 0.1,
                                    torch.zeros(4, 2), torch.full((4,), 0.5), sched)


def test_rewards_values_and_errors():
    x = torch.randn(6, 3, dtype=F64, generator=gen(0))
    w = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    assert torch.allclose(LinearReward(w, b=1.5)(x), x @ w + 1.5)
    A = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]], dtype=F64)
    b = torch.tensor([0.1, 0.2, 0.3], dtype=F64)
    r = QuadraticReward(A, b, c=-1.0)
    ref = torch.stack([-0.5 * xi @ A @ xi + b @ xi - 1.0 for xi in x])
    assert torch.allclose(r(x), ref)
    assert r.differentiable and LinearReward(w).differentiable
    assert r(x.float()).dtype == torch.float32
    xr = x.clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(r(xr).sum(), xr)
    assert torch.allclose(gr, -x @ (0.5 * (A + A.T)) + b)
    with pytest.raises(ValueError, match=r"shape \[B, 3\]"):
        LinearReward(w)(torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"shape \[D\]"):
        LinearReward(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="square"):
        QuadraticReward(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="b must have shape"):
        QuadraticReward(torch.eye(2), b=[1.0, 2.0, 3.0])
