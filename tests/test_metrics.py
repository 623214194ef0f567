"""tiltflow.metrics against closed forms.

Tolerances come from the math: exact identities (translation, triangle inequality, 1-D
quantile matching) are checked to round-off; Monte-Carlo estimates to 4-5 standard errors,
with the standard error derived in each test (projection variance on the sphere, Hoeffding
projection of a U-statistic, variance of a Gaussian log-density).
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import norm

from tiltflow import metrics as M
from tiltflow.data import digits_arrays


def gauss(n, d, seed, mean=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x if mean is None else x + torch.as_tensor(mean, dtype=torch.float64)


def std_normal_sampler(d):
    return lambda n, gen: torch.randn(n, d, generator=gen, dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# sliced and exact W2
# --------------------------------------------------------------------------------------------
def sw2_projection_sd(m_norm, d, p):
    """sd of mean_theta (theta.m)^2 over p uniform unit directions in R^d.

    E[(theta.m)^2] = |m|^2/d, E[(theta.m)^4] = 3|m|^4/(d(d+2)), so
    Var = |m|^4 * 2(d-1) / (d^2 (d+2)).
    """
    return m_norm**2 * math.sqrt(2 * (d - 1) / (d * d * (d + 2)) / p)


def test_sliced_w2_translation_closed_form():
    # For a translated copy every 1-D projection is shifted by theta.m, so
    # SW2^2 = mean_theta (theta.m)^2, whose expectation is |m|^2 / d.
    d, p = 4, 4000
    m = torch.tensor([2.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    x = gauss(500, d, 0)
    sw = M.sliced_w2(x, x + m, num_projections=p)
    tol = 4 * sw2_projection_sd(2.0, d, p)
    assert abs(sw**2 - 4.0 / d) <= tol


def test_sliced_w2_independent_gaussians():
    # Closed form SW2(N(0,I), N(m,I)) = |m|/sqrt(d). With the same directions SW2 is a metric,
    # so |SW2(x, y) - SW2(x, x+m)| <= SW2(x+m, y) exactly (the floor-sized term).
    d, p, n = 3, 1000, 1000
    m = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)  # |m| = 3
    x, y = gauss(n, d, 1), gauss(n, d, 2, m)
    sw_xy = M.sliced_w2(x, y, num_projections=p)
    sw_shift = M.sliced_w2(x, x + m, num_projections=p)
    floor = M.sliced_w2(x + m, y, num_projections=p)
    assert abs(sw_xy - sw_shift) <= floor + 1e-10
    # x + m and y are two independent n-samples of N(m, I): their SW2 is one draw of the noise
    # floor, within 5 standard deviations of its mean over independent repeats
    ref = M.noise_floor("sw2", std_normal_sampler(d), n, repeats=5,
                        metric_kwargs={"num_projections": p})
    assert floor <= ref.mean + 5 * ref.std, (floor, ref)
    # sw_shift^2 is within 4 projection-sd of |m|^2/d; then add the floor (triangle inequality)
    tol_sq = 4 * sw2_projection_sd(3.0, d, p)
    lo, hi = math.sqrt(3.0 - tol_sq) - floor, math.sqrt(3.0 + tol_sq) + floor
    assert lo <= sw_xy <= hi


def test_sliced_w2_unequal_sizes_matches_exact_1d():
    # In 1-D every direction is +-1 and quantile integration is exact OT, so SW2 == W2.
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(30, 1, generator=g), torch.randn(47, 1, generator=g) * 2 + 0.5
    assert M.sliced_w2(x, y, num_projections=3) == pytest.approx(M.w2(x, y), rel=1e-9)
    assert M.sliced_w2(x, x.flip(0)) == pytest.approx(0.0, abs=1e-12)
    # duplicating every point leaves the empirical measure, hence the distance, unchanged
    assert M.sliced_w2(x, torch.cat([y, y])) == pytest.approx(M.sliced_w2(x, y), rel=1e-9)


def test_sliced_w2_generator_and_default_seed():
    x, y = gauss(200, 5, 4), gauss(300, 5, 5, 0.3)
    assert M.sliced_w2(x, y) == M.sliced_w2(x, y)  # default: fixed seed
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert M.sliced_w2(x, y, generator=g1) == M.sliced_w2(x, y, generator=g2)


def test_w2_identities():
    x = gauss(300, 3, 6)
    m = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    # the identity matching costs 0 up to round-off ~eps * E|x|^2 ~ 1e-15; W2 is its sqrt (~3e-8)
    assert M.w2(x, x[torch.randperm(300)]) == pytest.approx(0.0, abs=1e-7)
    # W2(mu, mu shifted by m) = |m| exactly (the identity coupling is optimal).
    assert M.w2(x, x + m) == pytest.approx(float(m.norm()), rel=1e-9)


def test_w2_independent_gaussians():
    # Triangle inequality around the exact translate, plus the mean/covariance split
    # W2^2(x, y) = |mean_x - mean_y|^2 + W2^2(centered x, centered y) >= |mean_x - mean_y|^2.
    n, d = 500, 2
    m = torch.tensor([3.0, 4.0], dtype=torch.float64)
    x, y = gauss(n, d, 8), gauss(n, d, 9, m)
    w_xy, floor = M.w2(x, y), M.w2(x + m, y)
    assert abs(w_xy - 5.0) <= floor + 1e-9
    assert w_xy**2 >= float((x.mean(0) - y.mean(0)).pow(2).sum()) - 1e-9
    # x + m and y: two independent n-samples of N(m, I); their W2 is one draw of the noise floor
    ref = M.noise_floor("w2", std_normal_sampler(d), n, repeats=5)
    assert floor <= ref.mean + 5 * ref.std, (floor, ref)


def test_w2_refuses_large_sets():
    x = torch.zeros(M.W2_MAX_POINTS + 1, 2)
    with pytest.raises(ValueError, match="sliced_w2"):
        M.w2(x, torch.ones(10, 2))


# --------------------------------------------------------------------------------------------
# MMD and energy distance
# --------------------------------------------------------------------------------------------
def rbf(a, b, h):
    return torch.exp(-torch.cdist(a, b).pow(2) / (2 * h * h))


def test_mmd_closed_form_fixed_bandwidth():
    # X ~ N(0, s^2 I_d), Y ~ N(delta, s^2 I_d), k = exp(-|a-b|^2/(2h^2)):
    # E k(X,Y) = c exp(-|delta|^2 / (2(h^2 + 2 s^2))), E k(X,X') = c, c = (h^2/(h^2+2s^2))^(d/2)
    # => MMD^2 = 2c (1 - exp(-|delta|^2 / (2(h^2 + 2 s^2)))). The estimator is unbiased.
    n, d, h = 1000, 2, 1.0
    delta = torch.tensor([1.0, 0.0], dtype=torch.float64)
    x, y = gauss(n, d, 10), gauss(n, d, 11, delta)
    c = (h * h / (h * h + 2)) ** (d / 2)
    exact = 2 * c * (1 - math.exp(-1.0 / (2 * (h * h + 2))))
    value = M.mmd(x, y, bandwidths=[h])
    # standard error from the Hoeffding projection of the two-sample U-statistic:
    # psi_x(x) = 2(E k(x,X') - E k(x,Y)), Var ~ Var psi_x / n + Var psi_y / n.
    kxx, kyy, kxy = rbf(x, x, h), rbf(y, y, h), rbf(x, y, h)
    psi_x = 2 * ((kxx.sum(1) - 1) / (n - 1) - kxy.mean(1))
    psi_y = 2 * ((kyy.sum(1) - 1) / (n - 1) - kxy.mean(0))
    se = math.sqrt(float(psi_x.var() / n + psi_y.var() / n))
    assert abs(value - exact) <= 5 * se


def test_mmd_null_and_shift_default_bandwidths():
    # Under equal distributions the U-statistic is degenerate: with the averaged kernel in
    # [0, 1] its kernel h(z, z') lies in [-2, 2] and Var <= 2 E h^2 / (n(n-1)) <= 8/(n(n-1)).
    n = 1000
    x, y = gauss(n, 2, 12), gauss(n, 2, 13)
    bound = 5 * math.sqrt(8 / (n * (n - 1)))
    null = M.mmd(x, y)
    assert abs(null) <= bound
    shifted = M.mmd(x, y + torch.tensor([2.0, 0.0], dtype=torch.float64))
    assert shifted > 10 * bound


def test_median_bandwidths():
    x = gauss(400, 2, 14)
    z = torch.arange(400, dtype=torch.float64)[:, None]  # 0..399 on a line
    hs = M.median_bandwidths(z)
    # pairwise distances |i - j| over i<j of 0..399: the median is 117
    d = (torch.arange(400)[:, None] - torch.arange(400)[None]).abs()
    med = float(d[torch.triu(torch.ones(400, 400, dtype=torch.bool), 1)].double().median())
    assert hs == pytest.approx((0.5 * med, med, 2 * med))
    assert len(M.median_bandwidths(x, x + 1)) == 3


def expected_abs_normal(mu, s):
    """E|Z| for Z ~ N(mu, s^2) (folded normal mean)."""
    return s * math.sqrt(2 / math.pi) * math.exp(-mu * mu / (2 * s * s)) + mu * (
        1 - 2 * norm.cdf(-mu / s))


def test_energy_distance_closed_form_1d():
    # X ~ N(0,1), Y ~ N(m,1): X - Y ~ N(-m, 2), X - X' ~ N(0, 2), so
    # ED = 2 E|N(m, 2)| - 2 E|N(0, 2)| with E|N(0, 2)| = 2/sqrt(pi).
    n, m = 1500, 1.0
    x, y = gauss(n, 1, 15), gauss(n, 1, 16, [m])
    exact = 2 * expected_abs_normal(m, math.sqrt(2)) - 2 * (2 / math.sqrt(math.pi))
    assert 2 * expected_abs_normal(0.0, math.sqrt(2)) == pytest.approx(4 / math.sqrt(math.pi))
    value = M.energy_distance(x, y)
    dxx, dyy, dxy = torch.cdist(x, x), torch.cdist(y, y), torch.cdist(x, y)
    psi_x = 2 * dxy.mean(1) - 2 * dxx.sum(1) / (n - 1)
    psi_y = 2 * dxy.mean(0) - 2 * dyy.sum(1) / (n - 1)
    se = math.sqrt(float(psi_x.var() / n + psi_y.var() / n))
    assert abs(value - exact) <= 5 * se


def test_energy_and_mmd_unbiased_under_null():
    # Both estimators are unbiased, so under equal distributions the mean over repeats is
    # within a few standard errors of 0 (t-statistic over 8 repeats).
    for name in ("energy", "mmd"):
        fl = M.noise_floor(name, std_normal_sampler(3), 200, repeats=8,
                           metric_kwargs={"bandwidths": [1.0, 2.0]} if name == "mmd" else None)
        assert abs(fl.mean) <= 5 * fl.std / math.sqrt(8)
    x, y = gauss(200, 3, 17), gauss(200, 3, 18, [1.5, 0, 0])
    assert M.energy_distance(x, y) > 20 * fl.std


# --------------------------------------------------------------------------------------------
# noise floor, compare, nll
# --------------------------------------------------------------------------------------------
def test_noise_floor_decreases_with_n():
    s = std_normal_sampler(2)
    small = M.noise_floor("sw2", s, 100, repeats=3)
    large = M.noise_floor("sw2", s, 1600, repeats=3)
    assert small.mean > 0 and large.mean > 0 and len(large.values) == 3
    # SW2 between two empirical sets shrinks like ~n^(-1/2) (up to log factors): 16x the
    # points gives about 1/4 of the floor; demand at least a factor 2.
    assert large.mean < small.mean / 2
    w_small = M.noise_floor("w2", s, 50, repeats=3)
    w_large = M.noise_floor("w2", s, 400, repeats=3)
    # 2-D exact W2 decays like sqrt(log n / n): a factor ~2.3 from 50 to 400 points
    assert w_large.mean < w_small.mean / 1.5


def test_noise_floor_reproducible_with_generator():
    s = std_normal_sampler(2)
    a = M.noise_floor("energy", s, 200, generator=torch.Generator().manual_seed(3))
    b = M.noise_floor("energy", s, 200, generator=torch.Generator().manual_seed(3))
    assert a == b


class StdNormal:
    def __init__(self, d):
        self.d = d

    def log_prob(self, x):
        return -0.5 * (x**2).sum(-1) - 0.5 * self.d * math.log(2 * math.pi)


def test_nll_entropy_closed_form():
    # For x ~ N(0, I_d): -log p(x) = d/2 log(2 pi) + |x|^2/2, mean = d/2 log(2 pi e)
    # (the entropy), variance = Var(|x|^2)/4 = 2d/4.
    n, d = 4000, 3
    value = M.nll(gauss(n, d, 19), StdNormal(d))
    entropy = 0.5 * d * math.log(2 * math.pi * math.e)
    assert abs(value - entropy) <= 5 * math.sqrt(d / 2 / n)


def test_compare_structure_and_separation():
    d = 2
    sampler = std_normal_sampler(d)
    n = 300
    good = gauss(n, d, 20)
    bad = gauss(n, d, 21, [1.0, 0.0])
    res_good = M.compare(good, sampler, metrics=("sw2", "w2", "mmd", "energy", "nll"),
                         density=StdNormal(d))
    res_bad = M.compare(bad, sampler, metrics=("sw2", "w2", "mmd", "energy", "nll"),
                        density=StdNormal(d))
    for res in (res_good, res_bad):
        assert set(res) == {"sw2", "w2", "mmd", "energy", "nll"}
        for v in res.values():
            assert set(v) == {"value", "floor", "floor_std"}
            assert all(math.isfinite(t) for t in v.values())
    for name in ("sw2", "w2", "mmd", "energy", "nll"):
        assert res_bad[name]["value"] > res_good[name]["value"]
    # a unit mean shift is detected: far more than 5 floor standard deviations above the floor
    assert res_bad["sw2"]["value"] > res_bad["sw2"]["floor"] + 5 * res_bad["sw2"]["floor_std"]
    assert res_bad["mmd"]["value"] > res_bad["mmd"]["floor"] + 10 * res_bad["mmd"]["floor_std"]
    # nll floor: mean of 3 exact-set NLLs, sd sqrt(d/2/(3n)) around the entropy
    entropy = 0.5 * d * math.log(2 * math.pi * math.e)
    assert abs(res_good["nll"]["floor"] - entropy) <= 5 * math.sqrt(d / 2 / (3 * n))


def test_registry():
    assert M.available() == ["sw2", "w2", "mmd", "energy", "nll"]
    assert M.get_metric("sw2") is M.sliced_w2
    with pytest.raises(ValueError, match="available"):
        M.get_metric("fid")
    with pytest.raises(ValueError, match="unknown metric"):
        M.compare(gauss(10, 2, 0), std_normal_sampler(2), metrics=("sw3",))
    with pytest.raises(ValueError, match="density"):
        M.compare(gauss(10, 2, 0), std_normal_sampler(2), metrics=("nll",))


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sw2", "w2", "mmd", "energy"])
def test_bad_inputs(name):
    fn = M.get_metric(name)
    with pytest.raises(ValueError, match="same number of features"):
        fn(torch.zeros(5, 2), torch.zeros(5, 3))
    bad = torch.randn(5, 2)
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fn(bad, torch.randn(5, 2))
    with pytest.raises(ValueError, match="at least 2"):
        fn(torch.randn(1, 2), torch.randn(5, 2))
    # images are flattened: [N, 1, 2, 2] vs [N, 4] gives the value of the flat [N, 4] sets
    img, flat = torch.randn(6, 1, 2, 2), torch.randn(7, 4) + 1
    assert fn(img, flat) == pytest.approx(fn(img.reshape(6, 4), flat), rel=1e-12, abs=1e-12)


def test_bad_inputs_misc():
    with pytest.raises(TypeError, match="log_prob"):
        M.nll(torch.zeros(3, 2), object())
    with pytest.raises(ValueError, match="NaN"):
        M.nll(torch.tensor([[float("nan"), 0.0]]), StdNormal(2))
    with pytest.raises(ValueError, match="n=4 rows"):
        M.noise_floor("sw2", lambda n, g: torch.zeros(n + 1, 2), 4)
    with pytest.raises(ValueError, match="num_projections"):
        M.sliced_w2(torch.zeros(3, 2), torch.ones(3, 2), num_projections=0)
    with pytest.raises(ValueError, match="bandwidths"):
        M.mmd(torch.zeros(3, 2), torch.ones(3, 2), bandwidths=[0.0])
    with pytest.raises(ValueError, match="mu"):
        M.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# --------------------------------------------------------------------------------------------
# Frechet distance
# --------------------------------------------------------------------------------------------
def random_spd(d, seed, rank=None):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / (rank or d) + (0 if rank else 0.1 * np.eye(d))


def test_frechet_closed_forms():
    d = 6
    cov = random_spd(d, 0)
    mu = np.arange(d, dtype=float)
    assert M.frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-8)
    m = np.array([1.0, -2.0, 0.5, 0, 0, 3.0])
    eye = np.eye(d)
    assert M.frechet_distance(np.zeros(d), eye, m, eye) == pytest.approx(float(m @ m), rel=1e-10)
    # diagonal covariances: sum (sqrt(a) - sqrt(b))^2 + |dmu|^2
    a, b = np.linspace(0.5, 3, d), np.linspace(2, 0.1, d)
    exact = float(m @ m + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert M.frechet_distance(np.zeros(d), np.diag(a), m, np.diag(b)) == pytest.approx(exact)
    # full covariances: tr (C1 C2)^{1/2} = sum sqrt(eig(C1^{1/2} C2 C1^{1/2})) (symmetric form)
    c1, c2 = random_spd(d, 1), random_spd(d, 2)
    w, v = np.linalg.eigh(c1)
    r1 = v @ np.diag(np.sqrt(w)) @ v.T
    tr_root = np.sqrt(np.linalg.eigvalsh(r1 @ c2 @ r1)).sum()
    exact = float(m @ m + np.trace(c1) + np.trace(c2) - 2 * tr_root)
    assert M.frechet_distance(np.zeros(d), c1, m, c2) == pytest.approx(exact, rel=1e-8)
    # torch inputs work too
    assert M.frechet_distance(torch.zeros(d), torch.eye(d), torch.tensor(m), torch.eye(d)) == (
        pytest.approx(float(m @ m)))


def test_frechet_singular_covariances():
    # rank-2 covariances in 8-D: the product is singular. If the eps fallback is taken, the
    # result is FD(N(., c1 + eps I), N(., c2 + eps I)) - 2 d eps (the traces are the unperturbed
    # ones), an exact FD (>= |dmu|^2) shifted by at most 2 d eps; otherwise sqrtm of a singular
    # product is accurate to ~sqrt(eps_machine) |C| per direction. Either way the answer is
    # within ``slack`` of an exact FD.
    d, eps = 8, 1e-6  # eps: frechet_distance's default
    c = random_spd(d, 3, rank=2)
    c2 = random_spd(d, 4, rank=2)
    scale = max(np.linalg.norm(c), np.linalg.norm(c2))
    slack = 2 * d * eps + d * math.sqrt(np.finfo(float).eps) * scale
    fd = M.frechet_distance(np.zeros(d), c, np.zeros(d), c)
    assert math.isfinite(fd) and fd <= slack  # FD(p, p) = 0
    fd2 = M.frechet_distance(np.zeros(d), c, np.ones(d), c2)
    assert math.isfinite(fd2) and fd2 >= d - slack  # >= |dmu|^2 since the cov term is >= 0


# --------------------------------------------------------------------------------------------
# FD-digits
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    """A fresh cache directory: the classifier is trained once for this module."""
    root = tmp_path_factory.mktemp("tiltflow_cache")
    old = os.environ.get("TILTFLOW_CACHE")
    os.environ["TILTFLOW_CACHE"] = str(root)
    try:
        net = M.digits_classifier()
        yield root, {k: v.clone() for k, v in net.state_dict().items()}
    finally:
        if old is None:
            os.environ.pop("TILTFLOW_CACHE", None)
        else:
            os.environ["TILTFLOW_CACHE"] = old


def test_digits_classifier_cached_and_accurate(digits_cache):
    root, _ = digits_cache
    path = root / "digits_classifier_v1.safetensors"
    assert M.digits_cache_path() == path and path.exists()
    assert not list(root.glob("*.tmp"))  # the atomic write left no temp file behind
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert "sha256" in f.metadata()
    xt, yt = digits_arrays("test")
    acc = M.digits_classifier_accuracy(xt, yt)
    assert acc > 0.97
    assert M.digits_features(xt).shape == (360, 64)


def test_digits_classifier_reproducible_and_corrupt_cache_retrains(digits_cache, tmp_path,
                                                                   monkeypatch):
    root, weights = digits_cache
    data = bytearray((root / "digits_classifier_v1.safetensors").read_bytes())
    # A valid copy loads with no training and gives the same weights.
    good = tmp_path / "good"
    good.mkdir()
    (good / "digits_classifier_v1.safetensors").write_bytes(bytes(data))
    monkeypatch.setenv("TILTFLOW_CACHE", str(good))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = M.digits_classifier()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in weights.items())
    # Flip bytes in the tensor payload (the header still parses): the checksum catches it,
    # the classifier is retrained -- a second, independent training -- and the file rewritten.
    bad = tmp_path / "bad"
    bad.mkdir()
    data[-100:-90] = bytes(10)
    (bad / "digits_classifier_v1.safetensors").write_bytes(bytes(data))
    monkeypatch.setenv("TILTFLOW_CACHE", str(bad))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # training pins one thread internally; the caller's count is moot
    try:
        with pytest.warns(UserWarning, match="retraining"):
            retrained = M.digits_classifier()
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(retrained.state_dict()[k], v) for k, v in weights.items())
    from safetensors.torch import load_file

    rewritten = load_file(str(bad / "digits_classifier_v1.safetensors"))
    assert all(torch.equal(rewritten[k], v) for k, v in weights.items())


def test_fd_digits_floor_and_separation(digits_cache):
    xt, yt = digits_arrays("test")
    xtr, ytr = digits_arrays("train")
    floor = M.fd_digits_floor()
    assert floor > 0
    assert M.fd_digits(xt) == pytest.approx(floor, rel=1e-9)  # the floor's definition
    # real-looking sets of the same size sit near the floor ...
    g = torch.Generator().manual_seed(0)
    noisy = (xt + 0.05 * torch.randn(xt.shape, generator=g)).clamp(-1, 1)
    sub = xtr[torch.randperm(len(xtr), generator=g)[:360]]
    for real in (noisy, sub):
        assert M.fd_digits(real) < 2 * floor
    # ... and non-digits or one-class sets are far above it
    assert M.fd_digits(torch.rand(360, 1, 8, 8, generator=g) * 2 - 1) > 20 * floor
    assert M.fd_digits(xtr[ytr == 0]) > 20 * floor
    # [N, 64] and [N, 8, 8] layouts are accepted
    assert M.fd_digits(xt.reshape(360, 64)) == pytest.approx(floor, rel=1e-9)
    with pytest.raises(ValueError, match="shape"):
        M.fd_digits(torch.zeros(10, 3, 8, 8))
    with pytest.raises(ValueError, match="labels"):
        M.digits_classifier_accuracy(xt, yt[:5])
