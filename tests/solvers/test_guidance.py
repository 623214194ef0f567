"""Guidance against exact targets: classifier guidance with the exact likelihood p(y | x_t) of a
Gaussian-mixture prior turns the prior's denoiser into the exact posterior's denoiser."""

import pytest
import torch

import tiltflow as tf
from tiltflow import analytic
from tiltflow import schedules as S
from tiltflow.solvers import ClassifierFree, ClassifierGuidance, TwoModel


@pytest.mark.parametrize("sched", [S.RectifiedFlow(), S.VPLinear(), S.EDM()], ids=lambda s: s.name)
def test_classifier_guidance_with_exact_likelihood_is_the_exact_posterior(sched):
    gmm = analytic.anisotropic_2d()
    A = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    y = torch.tensor([0.7], dtype=torch.float64)
    noise_std = 0.3
    post = gmm.posterior(A, y, noise_std)

    def log_lik(x_t, t, cond):
        return gmm.log_likelihood_y_given_xt(A, y, noise_std, x_t, t, sched)

    guide = ClassifierGuidance(1.0, log_prob=log_lik)
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(64, 2, dtype=torch.float64, generator=g) * 2
    for tt in (0.2, 0.5, 0.8):
        t = torch.full((64,), tt, dtype=torch.float64)
        guided = guide(gmm.denoiser(sched), x_t, t, None)
        exact = post.denoiser(sched)(x_t, t)
        # two closed forms of one denoiser: float64 round-off (2e-16) amplified by the mixture's
        # condition numbers (<~ 1e2) and by the weight sigma^2 / alpha <= 4.1e3 (EDM, t = 0.8) of
        # the autograd log-likelihood gradient: <~ 1e-10, so 1e-9
        torch.testing.assert_close(guided.data, exact.data, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(guided.noise, exact.noise, rtol=1e-9, atol=1e-9)


def test_guided_sampling_reaches_the_exact_posterior():
    """Sampling with the guided exact denoiser gives samples of the exact posterior (sliced W2
    within 2x the noise floor of 2,000 exact posterior samples: an acceptance criterion, not a
    significance level -- errors add about in quadrature, so it allows a discretisation bias of
    up to sqrt(3) floors)."""
    sched = S.RectifiedFlow()
    gmm = analytic.eight_gaussians()
    A = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([2.5], dtype=torch.float64)
    post = gmm.posterior(A, y, 0.5)

    def log_lik(x_t, t, cond):
        return gmm.log_likelihood_y_given_xt(A, y, 0.5, x_t, t, sched)

    noise = torch.randn(2000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = tf.sample(gmm.denoiser(sched), noise, "heun", nfe=49,
                  guidance=ClassifierGuidance(1.0, log_prob=log_lik))
    scores = tf.metrics.compare(x, lambda n, g: post.sample(n, generator=g), metrics=("sw2",),
                                repeats=5, generator=torch.Generator().manual_seed(2))
    assert scores["sw2"]["value"] <= 2 * scores["sw2"]["floor"], scores


def test_two_model_guidance():
    sched = S.RectifiedFlow()
    pos = analytic.eight_gaussians().denoiser(sched)
    neg = analytic.anisotropic_2d().denoiser(S.VPLinear())  # another schedule: rescheduled
    x_t = torch.randn(8, 2, dtype=torch.float64)
    t = torch.full((8,), 0.4, dtype=torch.float64)
    torch.testing.assert_close(TwoModel(pos, 3.0)(pos, x_t, t, None).data, pos(x_t, t).data)
    torch.testing.assert_close(TwoModel(neg, 0.0)(pos, x_t, t, None).data, pos(x_t, t).data)
    w = 1.5
    n = neg.with_schedule(sched)(x_t, t)
    expected = (w + 1) * pos(x_t, t).noise - w * n.noise
    torch.testing.assert_close(TwoModel(neg, w)(pos, x_t, t, None).noise, expected)


def test_classifier_free_interval_and_errors():
    sched = S.RectifiedFlow()

    def fn(x_t, t, cond):
        return x_t * 0.5 + (cond[:, None] >= 0).to(x_t.dtype)

    den = tf.Denoiser.from_fn(fn, sched, "data")
    x_t = torch.randn(4, 2, dtype=torch.float64)
    cond = torch.zeros(4, dtype=torch.long)
    t_out = torch.full((4,), 0.9, dtype=torch.float64)
    cfg = ClassifierFree(5.0, interval=(0.1, 0.5))
    torch.testing.assert_close(cfg(den, x_t, t_out, cond).data, den(x_t, t_out, cond).data)
    with pytest.raises(ValueError, match="interval"):
        ClassifierFree(1.0, interval=(0.6, 0.2))
    with pytest.raises(ValueError, match="needs `cond`"):
        ClassifierFree(1.0)(den, x_t, t_out, None)
    with pytest.raises(ValueError, match="exactly one"):
        ClassifierGuidance(1.0)


def test_guidance_interval_uses_the_grid_time_and_plain_callables_still_work():
    """Solvers hand the grid time to the guidance (no device read); a plain 4-argument
    guidance callable keeps working."""
    sched = S.RectifiedFlow()
    seen = []

    def fn(x_t, t, cond):
        seen.append(x_t.shape[0])
        return x_t * 0.5

    den = tf.Denoiser.from_fn(fn, sched, "data")
    noise = torch.randn(3, 2, dtype=torch.float64)
    cond = torch.zeros(3, dtype=torch.long)
    tf.sample(den, noise, "euler", nfe=4, cond=cond,
              guidance=ClassifierFree(2.0, interval=(0.3, 0.8)))
    assert seen == [3, 6, 6, 3]  # grid 1, .75, .5, .25: guided (batch 2B) only inside [.3, .8]

    def plain(denoiser, x_t, t, cond):
        return denoiser(x_t, t, cond)

    torch.testing.assert_close(tf.sample(den, noise, "euler", nfe=4, cond=cond, guidance=plain),
                               tf.sample(den, noise, "euler", nfe=4, cond=cond))
