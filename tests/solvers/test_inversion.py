"""Inversion (data -> noise) against the closed-form PF-ODE flow and by round trip."""

import math

import pytest
import torch

import tiltflow as tf
from tiltflow import analytic
from tiltflow import schedules as S
from tiltflow.solvers.inversion import invert, round_trip, round_trip_error
from tiltflow.solvers.likelihood import default_t_eps

F64 = torch.float64
MU = torch.tensor([1.0, -2.0], dtype=F64)
S2 = torch.tensor([0.25, 2.0], dtype=F64)
GAUSS = analytic.GaussianMixture(torch.ones(1, dtype=F64), MU[None], torch.diag(S2)[None])


def exact_inverse(sched, x, t_start, t_end=1.0):
    """Closed-form PF-ODE flow of N(MU, diag(S2)) from x_{t_start} to t_end (linear ODE):
    x_t = alpha_t MU + r_t (x_s - alpha_s MU) / r_s, r_t = sqrt(alpha_t^2 S2 + sigma_t^2)."""
    c0, c1 = sched(torch.tensor(t_start, dtype=F64)), sched(torch.tensor(t_end, dtype=F64))
    r0, r1 = (c0.alpha**2 * S2 + c0.sigma**2).sqrt(), (c1.alpha**2 * S2 + c1.sigma**2).sqrt()
    return c1.alpha * MU + r1 * (x - c0.alpha * MU) / r0


def rms(a, b):
    return (a - b).pow(2).sum(1).mean().sqrt().item()


@pytest.mark.parametrize("sched", [S.RectifiedFlow(), S.VPLinear()], ids=lambda s: s.name)
@pytest.mark.parametrize("solver,order", [("ddim", 1), ("heun", 2)])
def test_inverted_noise_matches_closed_form_inverse_flow(sched, solver, order):
    """Against the exact flow from alpha(t_eps) x at t_eps: the error shrinks at the solver's
    order (slope within 0.3 over 4x the NFE); and the start-time error (the exact flow from x at
    t = 0 instead) is O(level^2), below the solver error. To first order in the noise level
    ``l = sigma/alpha`` at t_eps, starting at ``alpha x`` instead of the exact ``x_{t_eps}``
    misplaces the state by ``alpha (x - mu) l^2 / (2 s2)``; the linear flow carries that to
    t = 1 by ``r_1 / r_eps ~ sigma_1 / (alpha sqrt(s2))``: ``(x - mu) / sqrt(s2) * l^2 / (2 s2)``
    after dividing by sigma_1 (next terms: relative O(l^2 / s2) and O(alpha_1^2 s2) < 1e-4)."""
    x = GAUSS.sample(64, generator=torch.Generator().manual_seed(0))
    den = GAUSS.denoiser(sched)
    te = default_t_eps(sched)
    a0 = float(sched(torch.tensor(te, dtype=F64)).alpha)
    sigma_end = float(sched(torch.tensor(1.0, dtype=F64)).sigma)
    ref = exact_inverse(sched, a0 * x, te) / sigma_end
    nfes = (16, 64)
    errs = [rms(invert(den, x, solver=solver, nfe=n), ref) for n in nfes]
    slope = -math.log(errs[1] / errs[0]) / math.log(nfes[1] / nfes[0])
    assert abs(slope - order) < 0.3, (errs, slope)
    from_zero = exact_inverse(sched, x, 0.0) / sigma_end
    level = float(sched(torch.tensor(te, dtype=F64)).sigma) / a0
    first_order = (x - MU) / S2.sqrt() * level**2 / (2 * S2)
    start_err = rms(ref, from_zero)
    assert start_err == pytest.approx(first_order.pow(2).sum(1).mean().sqrt().item(), rel=1e-3)
    assert start_err < errs[1]
    # the returned noise is what tiltflow.sample starts from; return_state gives x_{t_end}
    state = invert(den, x, solver=solver, nfe=nfes[0], return_state=True)
    torch.testing.assert_close(state / sigma_end, invert(den, x, solver=solver, nfe=nfes[0]))


@pytest.mark.parametrize("bed", ["anisotropic_2d", "eight_gaussians"])
@pytest.mark.parametrize("sched", [S.RectifiedFlow(), S.VPLinear()], ids=lambda s: s.name)
@pytest.mark.parametrize("solver,order", [("ddim", 1), ("heun", 2)])
def test_round_trip_error_shrinks_at_the_solvers_order(bed, sched, solver, order):
    """Invert then sample back with the exact mixture denoiser. The round trip's order is the
    solver's order p for odd p, and p + 1 for even p: the forward and backward local errors
    C h^(p+1) and C (-h)^(p+1) cancel at leading order (adjoint-method argument). Slope over 4x
    the NFE within 0.3 of that, in the asymptotic range (below NFE ~100 a few DDIM round trips
    on the anisotropic bed still cross to another component, which inflates the RMS)."""
    gmm = analytic.get_testbed(bed)
    x = gmm.sample(64, generator=torch.Generator().manual_seed(1))
    den = gmm.denoiser(sched)
    expected = order + (1 if order % 2 == 0 else 0)
    nfes = (128, 512) if solver == "ddim" else (64, 256)
    errs = [round_trip_error(den, x, solver=solver, nfe=n).pow(2).mean().sqrt().item()
            for n in nfes]
    slope = -math.log(errs[1] / errs[0]) / math.log(4)
    assert abs(slope - expected) < 0.3, (errs, slope)
    assert errs[1] < (0.05 if solver == "ddim" else 1e-3)


def test_round_trip_through_sample_and_nfe_is_exact():
    """``tiltflow.sample`` from the inverted noise on the reversed grid is round_trip's way back
    (the same steps on the same grid, so equal to float64 round-off: ~64 steps of O(1) states
    through a flow that stretches by at most 1/sqrt(min s2) = 2), and each direction calls the
    network exactly nfe times."""
    sched = S.RectifiedFlow()
    calls = []
    base = GAUSS.denoiser(sched)

    def fn(x_t, t, cond=None):
        calls.append(1)
        return base(x_t, t).data

    den = tf.Denoiser.from_fn(fn, sched, "data")
    x = GAUSS.sample(16, generator=torch.Generator().manual_seed(2))
    for solver, nfe in [("ddim", 7), ("heun", 12), ("euler", 5)]:
        calls.clear()
        noise = invert(den, x, solver=solver, nfe=nfe)
        assert len(calls) == nfe
        calls.clear()
        noise2, back = round_trip(den, x, solver=solver, nfe=nfe)
        assert len(calls) == 2 * nfe
        torch.testing.assert_close(noise, noise2)
    te = default_t_eps(sched)
    grid = torch.linspace(1.0, te, 65, dtype=F64)
    noise, back = round_trip(den, x, solver="heun", nfe=128)
    again = tf.sample(den, noise, "heun", nfe=128, grid=grid) / (1 - te)
    torch.testing.assert_close(again, back, rtol=1e-12, atol=1e-12)


def test_bad_arguments():
    den = GAUSS.denoiser(S.RectifiedFlow())
    x = torch.zeros(4, 2, dtype=F64)
    with pytest.raises(ValueError, match="stochastic"):
        invert(den, x, solver="ddpm", nfe=4)
    with pytest.raises(ValueError, match="eta=0"):
        invert(den, x, solver="ddim", nfe=4, options={"eta": 0.5})
    with pytest.raises(ValueError, match="nfe=5"):
        invert(den, x, solver="heun", nfe=5)
    with pytest.raises(ValueError, match="unknown solver"):
        invert(den, x, solver="nope", nfe=4)
    with pytest.raises(ValueError, match="no option"):
        invert(den, x, solver="euler", nfe=4, options={"eta": 0.0})
    with pytest.raises(ValueError, match="batch first"):
        invert(den, torch.zeros(2), nfe=4)
    with pytest.raises(ValueError, match="strictly increasing"):
        invert(den, x, nfe=None, grid=torch.tensor([0.9, 0.1]))
