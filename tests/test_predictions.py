"""Checks of ``tiltflow.predictions`` and ``tiltflow.Denoiser``.

Each prediction kind is a linear function of ``(x, noise)`` given ``x_t``; the reference values
below are the definitions (module docstring of ``predictions``), written out independently.
Tolerance: float64 round-off amplified by ``1/alpha`` or ``1/sigma`` at interior times
(``<= ~1e2``): ``1e-10``.
"""

from __future__ import annotations

import pytest
import torch

from tiltflow import Denoiser, Prediction, schedules
from tiltflow.predictions import KINDS, check_kind, convert, from_hub, to_hub

F64 = torch.float64
TOL = 1e-10

ALL = schedules.examples()


def setup(schedule, seed=0, shape=(16, 3, 4)):
    g = torch.Generator().manual_seed(seed)
    lam = -4.5 + 13 * torch.rand(shape[0], dtype=F64, generator=g)  # interior for every schedule
    t = schedule.t_from_logsnr(lam)
    x = torch.randn(*shape, dtype=F64, generator=g)
    noise = torch.randn(*shape, dtype=F64, generator=g)
    c = schedule(t).expand(x)
    x_t = c.alpha * x + c.sigma * noise
    return t, x, noise, x_t, c


def definitions(x, noise, c):
    """Each kind from its definition."""
    a, s, da, ds = c.as_tuple()
    return {
        "noise": noise,
        "data": x,
        "velocity": da * x + ds * noise,
        "v": a * noise - s * x,
        "score": -noise / s,
    }


@pytest.mark.parametrize("name", list(ALL))
def test_hub_round_trip_every_kind(name):
    t, x, noise, x_t, c = setup(ALL[name])
    ref = definitions(x, noise, c)
    for kind in KINDS:
        out = from_hub(kind, x, noise, c)
        assert torch.allclose(out, ref[kind], rtol=TOL, atol=TOL * ref[kind].abs().max())
        x_hat, eps_hat = to_hub(kind, out, x_t, c)
        assert torch.allclose(x_hat, x, rtol=TOL, atol=TOL), kind
        assert torch.allclose(eps_hat, noise, rtol=TOL, atol=TOL), kind


@pytest.mark.parametrize("name", list(ALL))
def test_convert_every_pair(name):
    t, x, noise, x_t, c = setup(ALL[name], seed=1)
    ref = definitions(x, noise, c)
    for src in KINDS:
        for dst in KINDS:
            got = convert(ref[src], src, dst, x_t, c)
            scale = ref[dst].abs().max()
            assert torch.allclose(got, ref[dst], rtol=TOL, atol=TOL * scale), (src, dst)


def test_prediction_properties():
    sched = schedules.Cosine()
    t, x, noise, x_t, c = setup(sched, seed=2)
    ref = definitions(x, noise, c)
    for kind in KINDS:
        p = Prediction(ref[kind], kind, x_t, c)
        assert p.as_kind(kind) is ref[kind]
        for other in KINDS:
            got = getattr(p, other)
            assert torch.allclose(got, ref[other], rtol=TOL, atol=TOL * ref[other].abs().max())
        assert kind in repr(p)
    p = Prediction.from_hub(x, noise, x_t, c)
    assert p.kind == "data" and p.hub[1] is noise
    assert torch.allclose(p.velocity, ref["velocity"])
    with pytest.raises(ValueError, match="unknown prediction kind"):
        Prediction(x, "eps", x_t, c)
    with pytest.raises(ValueError, match="unknown prediction kind"):
        convert(x, "data", "x0", x_t, c)
    assert check_kind("v") == "v"


def test_denoiser_from_fn_without_cond():
    sched = schedules.RectifiedFlow()
    t, x, noise, x_t, c = setup(sched, seed=3, shape=(5, 2))
    seen = {}

    def predict_data(x_t, t):
        seen["t"] = t
        return torch.zeros_like(x_t)

    den = Denoiser.from_fn(predict_data, sched, prediction="data")
    out = den(x_t, t)
    assert torch.equal(out.data, torch.zeros_like(x_t))
    assert torch.allclose(out.noise, x_t / c.sigma)
    assert seen["t"].shape == (5,) and den.schedule is sched and den.prediction == "data"
    assert den(x_t, 0.5).data.shape == x_t.shape  # a scalar t is broadcast to [B]
    with pytest.raises(ValueError, match="takes no `cond`"):
        den(x_t, t, cond=torch.zeros(5, dtype=torch.long))


def test_denoiser_passes_cond():
    got = {}

    def fn(x_t, t, cond=None):
        got["cond"] = cond
        return x_t

    den = Denoiser.from_fn(fn, "vp_linear", prediction="noise")
    labels = torch.tensor([0, -1, 3])
    den(torch.zeros(3, 2), torch.full((3,), 0.5), labels)
    assert got["cond"] is labels
    assert den.schedule.name == "vp_linear"


def test_denoiser_errors():
    sched = schedules.Cosine()
    den = Denoiser.from_fn(lambda x_t, t, cond=None: x_t, sched, "noise")
    x_t = torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"t must have shape \[B\]"):
        den(x_t, torch.full((3,), 0.5))
    with pytest.raises(ValueError, match=r"t must have shape \[B\]"):
        den(x_t, torch.full((4, 1), 0.5))
    with pytest.raises(TypeError, match="float"):
        den(x_t, torch.ones(4, dtype=torch.long))
    bad = Denoiser.from_fn(lambda x_t, t, cond=None: x_t[:, :1], sched, "noise")
    with pytest.raises(ValueError, match="output shape"):
        bad(x_t, torch.full((4,), 0.5))
    with pytest.raises(TypeError, match="callable"):
        Denoiser(3, sched)
    with pytest.raises(ValueError, match="unknown prediction kind"):
        Denoiser.from_fn(lambda x_t, t: x_t, sched, "eps")
    with pytest.raises(ValueError, match="precondition"):
        Denoiser.from_fn(lambda x_t, t: x_t, sched, "noise", precondition=True)


@pytest.mark.parametrize("name", ["edm", "vp_linear", "rectified_flow"])
def test_edm_preconditioning_skip_goes_to_one(name):
    """With F = 0 the preconditioned output is c_skip x_t / alpha, c_skip = sd^2/(s^2 + sd^2)
    (Karras et al. 2022, Table 1), which tends to 1 as the noise level s = sigma/alpha -> 0."""
    sched = ALL[name]
    sd = 0.5
    den = Denoiser.from_fn(lambda x, t, cond=None: torch.zeros_like(x), sched, "data",
                           precondition=True, sigma_data=sd)
    t = torch.tensor([0.5, 1e-2, 1e-4, 1e-6, 1e-8], dtype=F64)
    x_t = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    c = sched(t)
    s = (c.sigma / c.alpha)[:, None]
    c_skip = sd**2 / (s**2 + sd**2)
    out = den(x_t, t).data
    # the same few float64 operations in another order: round-off only
    assert torch.allclose(out, c_skip * x_t / c.alpha[:, None], rtol=1e-12, atol=1e-12)
    ratio = (out / (x_t / c.alpha[:, None]))[:, 0]
    # 1 - c_skip = s^2 / (s^2 + sd^2) <= (s / sd)^2; at t = 1e-8 every schedule here has
    # s <= 3.2e-5 (vp_linear: s ~ sqrt(beta_min t)), so 1 - c_skip <= 4e-9 < 1e-8
    assert float(s[-1, 0]) <= 3.2e-5
    assert bool((ratio.diff() >= 0).all()) and abs(float(ratio[-1]) - 1) < 1e-8
    # the network sees c_in-scaled input and c_noise = log(s) / 4
    seen = {}

    def spy(x, t, cond=None):
        seen["x"], seen["t"] = x, t
        return torch.zeros_like(x)

    Denoiser.from_fn(spy, sched, "data", precondition=True, sigma_data=sd)(x_t, t)
    assert torch.allclose(seen["t"], torch.log(s[:, 0]) / 4)
    assert torch.allclose(seen["x"], x_t / c.alpha[:, None] / torch.sqrt(s**2 + sd**2))


def test_noise_side_maps_stay_finite_at_the_pure_noise_end():
    """At alpha = 0 (rectified flow at t = 1) a score or noise prediction still defines the
    noise and score kinds (only x_hat is undefined): a solver's grid point there must give
    ``noise = -sigma * score``, not 0 * inf = NaN."""
    c = schedules.RectifiedFlow().points(torch.ones(1, dtype=F64))[0].coeffs
    assert float(c.alpha) == 0.0 and float(c.sigma) == 1.0
    g = torch.Generator().manual_seed(3)
    x_t, score = (torch.randn(4, 2, dtype=F64, generator=g) for _ in range(2))
    torch.testing.assert_close(Prediction(score, "score", x_t, c).noise, -score, rtol=0, atol=0)
    torch.testing.assert_close(Prediction(-score, "noise", x_t, c).score, score, rtol=0, atol=0)
