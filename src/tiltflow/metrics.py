"""Distances between sample sets, each meant to be reported next to its noise floor.

Two-sample distances take ``x [N, ...]`` and ``y [M, ...]`` (tensors or arrays; anything past
the first axis is flattened, a 1-D input is N scalar points) and return a Python float,
computed in float64:

=========  ===========================  ==================================================
name       function                     what
=========  ===========================  ==================================================
``sw2``    :func:`sliced_w2`            sliced Wasserstein-2 (random directions)
``w2``     :func:`w2`                   exact Wasserstein-2 via POT (<= 2,000 points/side)
``mmd``    :func:`mmd`                  unbiased MMD^2, mixture of RBF kernels
``energy`` :func:`energy_distance`      energy distance (unbiased U-statistics)
``nll``    :func:`nll`                  mean exact negative log-likelihood under a density
=========  ===========================  ==================================================

A distance between finite sample sets is never exactly zero even when both sets come from the
same distribution. :func:`noise_floor` measures that floor (the same distance between two
independent exact sample sets of the same size) and :func:`compare` returns
``{metric: {"value": v, "floor": f, "floor_std": s}}`` so every number is read against it.

FD-digits (see ``BENCHMARKS.md``): the Frechet distance (Heusel et al. 2017, "GANs trained by a
two time-scale update rule converge to a local Nash equilibrium") in the penultimate-layer
feature space of a small CNN that tiltflow trains deterministically on the digits training
split and caches as safetensors under ``$TILTFLOW_CACHE`` (default ``~/.cache/tiltflow``).
Its floor, :func:`fd_digits_floor`, is FD(test split, train split).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from .fileio import atomic_write_bytes

__all__ = [
    "endpoint_rmse",
    "sliced_w2",
    "w2",
    "mmd",
    "median_bandwidths",
    "energy_distance",
    "nll",
    "Floor",
    "noise_floor",
    "compare",
    "available",
    "get_metric",
    "METRICS",
    "W2_MAX_POINTS",
    "frechet_distance",
    "digits_classifier",
    "train_digits_classifier",
    "digits_features",
    "digits_classifier_accuracy",
    "fd_digits",
    "fd_digits_floor",
    "digits_cache_path",
]

W2_MAX_POINTS = 2000  # exact OT is O(N^3) time and O(N^2) memory; beyond this use sliced_w2
_BLOCK = 1024  # rows per block in pairwise sums (bounds memory at _BLOCK * M doubles)


# ------------------------------------------------------------------------------------------
# input checks
# ------------------------------------------------------------------------------------------
def _as_points(x, name: str) -> torch.Tensor:
    """``x`` as a float64 ``[N, D]`` tensor, refusing NaN/inf and empty sets."""
    if not torch.is_tensor(x):
        try:
            x = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name} must be a tensor or array of points, got {type(x)}") from e
    x = x.detach().to("cpu", torch.float64)
    if x.dim() == 0:
        raise ValueError(f"{name} must have shape [N, ...], got a scalar")
    x = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(-1, 1)
    if x.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 points, got {x.shape[0]}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has zero features per point (shape {tuple(x.shape)})")
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        raise ValueError(f"{name} contains NaN or inf in {bad} of {x.shape[0]} points; "
                         "remove or fix them before measuring a distance")
    return x


def _as_pair(x, y) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _as_points(x, "x"), _as_points(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same number of features per point, got "
                         f"{x.shape[1]} and {y.shape[1]}; flatten or reshape them alike")
    # A shared shift changes no distance but reduces cancellation in |a|^2 + |b|^2 - 2 a.b.
    center = torch.cat([x, y]).mean(dim=0)
    return x - center, y - center


def _default_generator(generator: torch.Generator | None) -> torch.Generator:
    return torch.Generator().manual_seed(0) if generator is None else generator


# ------------------------------------------------------------------------------------------
# pairwise sums
# ------------------------------------------------------------------------------------------
def _pairwise_sum(x: torch.Tensor, y: torch.Tensor | None, fn: Callable) -> float:
    """``sum_{i,j} fn(|x_i - y_j|^2)``; with ``y=None`` the within-set sum over ``i != j``."""
    same = y is None
    y = x if same else y
    y_sq = (y * y).sum(dim=1)
    total = 0.0
    for start in range(0, x.shape[0], _BLOCK):
        xb = x[start:start + _BLOCK]
        d2 = ((xb * xb).sum(dim=1, keepdim=True) + y_sq - 2.0 * xb @ y.T).clamp_min_(0.0)
        vals = fn(d2)
        if same:  # drop the diagonal i == j
            rows = torch.arange(xb.shape[0])
            vals[rows, rows + start] = 0.0
        total += float(vals.sum())
    return total


# ------------------------------------------------------------------------------------------
# Wasserstein distances
# ------------------------------------------------------------------------------------------
def _w2_1d_squared(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Exact squared W2 between 1-D empirical measures, one per column of the sorted inputs.

    ``xs [N, P]`` and ``ys [M, P]`` are sorted along dim 0. In 1-D the optimal plan matches
    quantiles, ``W2^2 = int_0^1 (F^-1(u) - G^-1(u))^2 du``; both quantile functions are step
    functions, constant between consecutive breakpoints of ``{i/N} U {j/M}``, so the integral
    is a finite sum (for N = M it is the mean squared difference of the sorted values).
    """
    n, m = xs.shape[0], ys.shape[0]
    if n == m:
        return ((xs - ys) ** 2).mean(dim=0)
    # Breakpoints in units of 1/(n m): integers, so coincident ones merge exactly.
    u = torch.unique(torch.cat([torch.arange(1, n + 1) * m, torch.arange(1, m + 1) * n]))
    lower = torch.cat([torch.zeros(1, dtype=u.dtype), u[:-1]])
    widths = (u - lower).to(torch.float64) / (n * m)
    ix, iy = lower // m, lower // n  # the quantile step each interval lies on
    return (widths[:, None] * (xs[ix] - ys[iy]) ** 2).sum(dim=0)


def endpoint_rmse(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``sqrt(mean_b ||x_b - ref_b||^2)``: the RMS endpoint distance of a solver's samples to
    the reference solution from the same start states (BENCHMARKS.md); differentiable."""
    return (x - ref).flatten(1).pow(2).sum(1).mean().sqrt()


def sliced_w2(x, y, num_projections: int = 256, generator: torch.Generator | None = None
              ) -> float:
    """Sliced Wasserstein-2 distance (Rabin et al. 2011, "Wasserstein barycenter and its
    application to texture mixing"; Bonneel et al. 2015, "Sliced and Radon Wasserstein
    barycenters of measures").

    ``SW2(x, y) = sqrt(E_theta W2^2(theta.x, theta.y))`` with ``theta`` uniform on the unit
    sphere, estimated with ``num_projections`` random directions. Each 1-D W2 is exact (quantile
    matching; for unequal set sizes the two empirical quantile functions are integrated exactly,
    see :func:`_w2_1d_squared`). For fixed directions this is a metric on sample sets.

    ``generator`` draws the directions; ``None`` uses a fixed seed (0), so the value is a
    deterministic function of the inputs and a value and its floor use the same directions.
    Closed form for reference: ``SW2(N(0, I_D), N(m, I_D)) = |m| / sqrt(D)``.
    """
    x, y = _as_pair(x, y)
    if not isinstance(num_projections, int) or num_projections < 1:
        raise ValueError(f"num_projections must be a positive int, got {num_projections!r}")
    gen = _default_generator(generator)
    theta = torch.randn(num_projections, x.shape[1], generator=gen, dtype=torch.float64)
    theta = theta / theta.norm(dim=1, keepdim=True)
    xs = torch.sort(x @ theta.T, dim=0).values
    ys = torch.sort(y @ theta.T, dim=0).values
    return math.sqrt(float(_w2_1d_squared(xs, ys).mean()))


def w2(x, y) -> float:
    """Exact Wasserstein-2 distance between two empirical measures with uniform weights.

    Solves the optimal-transport linear program with squared-Euclidean cost through POT's
    network simplex ``ot.emd2`` (Bonneel et al. 2011, "Displacement interpolation using
    Lagrangian mass transport"; Flamary et al. 2021, "POT: Python Optimal Transport") and
    returns ``sqrt`` of the optimal cost. Limited to ``W2_MAX_POINTS`` (2,000) points per side;
    use :func:`sliced_w2` for larger sets.
    """
    x, y = _as_pair(x, y)
    too_many = max(x.shape[0], y.shape[0])
    if too_many > W2_MAX_POINTS:
        raise ValueError(f"w2 solves an exact OT problem and accepts at most {W2_MAX_POINTS} "
                         f"points per side, got {too_many}; subsample or use sliced_w2")
    import ot

    cost = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist").pow_(2).numpy()
    a = np.full(x.shape[0], 1.0 / x.shape[0])
    b = np.full(y.shape[0], 1.0 / y.shape[0])
    value = float(ot.emd2(a, b, cost, numItermax=10_000_000))
    return math.sqrt(max(value, 0.0))


# ------------------------------------------------------------------------------------------
# kernel and energy distances
# ------------------------------------------------------------------------------------------
def median_bandwidths(x, y=None, scales: Sequence[float] = (0.5, 1.0, 2.0),
                      max_points: int = 1000) -> tuple[float, ...]:
    """RBF bandwidths ``scales * median pairwise distance`` (the median heuristic; Gretton et
    al. 2012, "A kernel two-sample test", sec. 8) over the pooled points of ``x`` and ``y``.

    At most ``max_points`` evenly spaced points enter the median (it is a robust statistic).
    """
    z = _as_points(x, "x") if y is None else torch.cat(_as_pair(x, y))
    if z.shape[0] > max_points:
        z = z[torch.linspace(0, z.shape[0] - 1, max_points).round().long()]
    i, j = torch.triu_indices(z.shape[0], z.shape[0], offset=1)
    dist = torch.cdist(z, z, compute_mode="donot_use_mm_for_euclid_dist")[i, j]
    med = float(dist.median())
    if not med > 0:
        raise ValueError("median pairwise distance is 0 (most points coincide); "
                         "pass explicit bandwidths to mmd")
    return tuple(float(s) * med for s in scales)


def mmd(x, y, bandwidths: Sequence[float] | None = None) -> float:
    """Unbiased squared maximum mean discrepancy (Gretton et al. 2012, "A kernel two-sample
    test", eq. 3 / Lemma 6, written for unequal set sizes).

    ``MMD^2 = E k(X,X') + E k(Y,Y') - 2 E k(X,Y)`` with within-set terms as U-statistics
    (``i != j``) and the cross term over all pairs, so the estimate is unbiased and therefore
    **can be slightly negative** when the two distributions are equal. The kernel is the
    *average* of RBF kernels ``exp(-|a-b|^2 / (2 h^2))`` over ``bandwidths`` (each in [0, 1],
    so MMD^2 <= 2). Default bandwidths: :func:`median_bandwidths` of the pooled points, i.e.
    the median pairwise distance times {0.5, 1, 2}. Pass fixed ``bandwidths`` to compare values
    across calls (``compare`` fixes them from the reference set).
    """
    x, y = _as_pair(x, y)
    hs = median_bandwidths(x, y) if bandwidths is None else tuple(float(h) for h in bandwidths)
    if len(hs) == 0 or not all(h > 0 and math.isfinite(h) for h in hs):
        raise ValueError(f"bandwidths must be positive finite numbers, got {bandwidths!r}")

    def kernel(d2: torch.Tensor) -> torch.Tensor:
        return sum(torch.exp(d2 / (-2.0 * h * h)) for h in hs) / len(hs)

    n, m = x.shape[0], y.shape[0]
    kxx = _pairwise_sum(x, None, kernel) / (n * (n - 1))
    kyy = _pairwise_sum(y, None, kernel) / (m * (m - 1))
    kxy = _pairwise_sum(x, y, kernel) / (n * m)
    return kxx + kyy - 2.0 * kxy


def energy_distance(x, y) -> float:
    """Energy distance ``2 E|X-Y| - E|X-X'| - E|Y-Y'|`` (Szekely & Rizzo 2013, "Energy
    statistics: a class of statistics based on distances").

    Euclidean norms; the within-set expectations are unbiased U-statistics (``i != j``) and the
    cross term averages all pairs, so the estimate is unbiased (it can be slightly negative for
    equal distributions). Its population value is 0 iff the distributions are equal.
    """
    x, y = _as_pair(x, y)
    n, m = x.shape[0], y.shape[0]
    exx = _pairwise_sum(x, None, torch.sqrt) / (n * (n - 1))
    eyy = _pairwise_sum(y, None, torch.sqrt) / (m * (m - 1))
    exy = _pairwise_sum(x, y, torch.sqrt) / (n * m)
    return 2.0 * exy - exx - eyy


# ------------------------------------------------------------------------------------------
# likelihood
# ------------------------------------------------------------------------------------------
def nll(samples, density) -> float:
    """Mean negative exact log-likelihood ``-mean_i log p(x_i)`` of ``samples`` under
    ``density``, any object with ``log_prob(x) -> [N]`` (e.g. ``tiltflow.analytic``'s
    ``GaussianMixture``). For exact samples its expectation is the entropy of ``p``; a value
    below the floor means samples concentrate on high-density regions (e.g. mode collapse or a
    low sampling temperature), above means mass where ``p`` has little.
    """
    log_prob = getattr(density, "log_prob", None)
    if not callable(log_prob):
        raise TypeError(f"density must have a log_prob(x) method, got {type(density).__name__}")
    if not torch.is_tensor(samples):
        samples = torch.as_tensor(np.asarray(samples))
    if samples.dim() == 0 or samples.shape[0] == 0:
        raise ValueError(f"samples must have shape [N, ...] with N >= 1, "
                         f"got {tuple(samples.shape)}")
    if not torch.isfinite(samples).all():
        raise ValueError("samples contain NaN or inf; fix them before computing the likelihood")
    with torch.no_grad():
        lp = torch.as_tensor(log_prob(samples))
    if lp.shape != (samples.shape[0],):
        raise ValueError(f"density.log_prob returned shape {tuple(lp.shape)}, expected "
                         f"[{samples.shape[0]}] (one log-density per sample)")
    if not torch.isfinite(lp).all():
        raise ValueError("density.log_prob returned non-finite values for some samples; "
                         "they lie outside the density's support or the density underflows")
    return -float(lp.to(torch.float64).mean())


# ------------------------------------------------------------------------------------------
# registry, noise floor, comparison
# ------------------------------------------------------------------------------------------
METRICS: dict[str, Callable] = {
    "sw2": sliced_w2,
    "w2": w2,
    "mmd": mmd,
    "energy": energy_distance,
    "nll": nll,
}


def available() -> list[str]:
    """Names accepted by :func:`get_metric`, :func:`noise_floor` and :func:`compare`."""
    return list(METRICS)


def get_metric(name: str | Callable) -> Callable:
    """The metric function for a registry name (a callable passes through)."""
    if callable(name):
        return name
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; available: {', '.join(METRICS)}")
    return METRICS[name]


class Floor(NamedTuple):
    """A noise floor: mean and standard deviation over repeats, and the raw values."""

    mean: float
    std: float
    values: tuple[float, ...]


def _draw(sampler: Callable, n: int, generator: torch.Generator) -> torch.Tensor:
    out = sampler(n, generator)
    if not torch.is_tensor(out) or out.dim() == 0 or out.shape[0] != n:
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ValueError(f"sampler(n, generator) must return a tensor with n={n} rows, "
                         f"got {shape}")
    return out


def noise_floor(metric: str | Callable, sampler: Callable, n: int, repeats: int = 3,
                generator: torch.Generator | None = None, metric_kwargs: dict | None = None
                ) -> Floor:
    """The metric between two independent exact sample sets of size ``n``, drawn by
    ``sampler(n, generator) -> Tensor[n, ...]``, averaged over ``repeats`` pairs.

    This is the smallest value a perfect model can expect with ``n`` samples (for unbiased
    estimators such as ``mmd``/``energy`` it fluctuates around 0 and ``std`` is the scale to
    read values against). For ``"nll"`` (``metric_kwargs={"density": p}``) the floor is the NLL
    of one exact set, an estimate of the entropy. ``generator=None`` uses a fixed seed (0).
    """
    fn = get_metric(metric)
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an int >= 2, got {n!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    kwargs = dict(metric_kwargs or {})
    gen = _default_generator(generator)
    values = []
    for _ in range(repeats):
        a = _draw(sampler, n, gen)
        if fn is nll:
            values.append(float(nll(a, **kwargs)))
        else:
            values.append(float(fn(a, _draw(sampler, n, gen), **kwargs)))
    std = float(np.std(values, ddof=1)) if repeats > 1 else 0.0
    return Floor(float(np.mean(values)), std, tuple(values))


def compare(samples, sampler: Callable, metrics: Sequence[str] = ("sw2", "mmd", "energy"), *,
            repeats: int = 3, generator: torch.Generator | None = None, density=None
            ) -> dict[str, dict[str, float]]:
    """Each metric between ``samples`` and a fresh exact set of the same size, with its floor.

    Returns ``{name: {"value": v, "floor": f, "floor_std": s}}`` where the floor is
    :func:`noise_floor` at ``n = len(samples)``. ``"nll"`` needs ``density`` (an object with
    ``log_prob``) and is measured on ``samples`` alone. For ``"mmd"`` the bandwidths are fixed
    once from the reference set (median heuristic) and shared by the value and its floor;
    ``"sw2"`` uses the same fixed directions for both.
    """
    if isinstance(metrics, str):
        metrics = (metrics,)
    for name in metrics:
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; available: {', '.join(METRICS)}")
    if "nll" in metrics and density is None:
        raise ValueError("metric 'nll' needs density=<object with log_prob>")
    n = len(samples)
    gen = _default_generator(generator)
    reference = _draw(sampler, n, gen)
    out = {}
    for name in metrics:
        fn = METRICS[name]
        kwargs: dict = {}
        if name == "mmd":
            kwargs["bandwidths"] = median_bandwidths(reference)
        if name == "nll":
            kwargs["density"] = density
            value = nll(samples, density)
        else:
            value = float(fn(samples, reference, **kwargs))
        floor = noise_floor(name, sampler, n, repeats=repeats, generator=gen,
                            metric_kwargs=kwargs)
        out[name] = {"value": value, "floor": floor.mean, "floor_std": floor.std}
    return out


# ------------------------------------------------------------------------------------------
# Frechet distance and FD-digits
# ------------------------------------------------------------------------------------------
def frechet_distance(mu1, cov1, mu2, cov2, eps: float = 1e-6) -> float:
    """Frechet (W2^2) distance between ``N(mu1, cov1)`` and ``N(mu2, cov2)`` (Dowson & Landau
    1982; used as FID by Heusel et al. 2017, "GANs trained by a two time-scale update rule
    converge to a local Nash equilibrium"):

    ``|mu1 - mu2|^2 + tr(cov1) + tr(cov2) - 2 tr((cov1 cov2)^{1/2})``.

    The matrix root is ``scipy.linalg.sqrtm``; as in the FID reference code, when it fails
    (singular product: non-finite or inaccurate root) ``eps * I`` is added to both covariances,
    and an imaginary part from round-off is dropped (a large one raises). Returns a float >= 0.
    """
    from scipy import linalg

    mu1 = np.atleast_1d(np.asarray(_to_numpy(mu1), dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(_to_numpy(mu2), dtype=np.float64))
    cov1 = np.atleast_2d(np.asarray(_to_numpy(cov1), dtype=np.float64))
    cov2 = np.atleast_2d(np.asarray(_to_numpy(cov2), dtype=np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(f"frechet_distance needs mu [d] and cov [d, d] of one d, got "
                         f"{mu1.shape}, {cov1.shape}, {mu2.shape}, {cov2.shape}")
    for arr in (mu1, mu2, cov1, cov2):
        if not np.isfinite(arr).all():
            raise ValueError("frechet_distance got NaN or inf in a mean or covariance")

    def root(a: np.ndarray) -> np.ndarray | None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = linalg.sqrtm(a)
        if not np.isfinite(r).all():
            return None
        scale = max(np.linalg.norm(a), 1e-300)
        return r if np.linalg.norm(r @ r - a) <= 1e-5 * scale else None

    covmean = root(cov1 @ cov2)
    if covmean is None:
        offset = eps * np.eye(d)
        covmean = root((cov1 + offset) @ (cov2 + offset))
        if covmean is None:
            raise ValueError("frechet_distance: matrix square root failed even with eps added "
                             "to the covariances; increase eps")
    if np.iscomplexobj(covmean):
        scale = max(np.abs(covmean).max(), 1.0)
        if np.abs(covmean.imag).max() > 1e-3 * scale:
            raise ValueError(f"frechet_distance: sqrtm has a large imaginary part "
                             f"({np.abs(covmean.imag).max():.3g}); covariances are not PSD?")
        covmean = covmean.real
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean)
    return max(float(fd), 0.0)


def _to_numpy(a):
    return a.detach().cpu().numpy() if torch.is_tensor(a) else a


class _DigitsNet(nn.Module):
    """Tiny CNN for ``[N, 1, 8, 8]`` digits: two 3x3 convs, a 2x2 max-pool, a 64-unit hidden
    layer (the FD feature space) and a 10-way linear head."""

    feature_dim = 64

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, self.feature_dim)
        self.fc2 = nn.Linear(self.feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.max_pool2d(torch.relu(self.conv2(h)), 2)
        return torch.relu(self.fc1(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))


_CLASSIFIER_FILE = "digits_classifier_v1.safetensors"
_TRAIN_SEED = 0
_TRAIN_EPOCHS = 20
_TRAIN_BATCH = 64
_TRAIN_LR = 2e-3
_MODELS: dict[str, _DigitsNet] = {}  # in-process cache, keyed by cache file path
_REF_STATS: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}


def digits_cache_path() -> Path:
    """``$TILTFLOW_CACHE/digits_classifier_v1.safetensors`` (default ``~/.cache/tiltflow``)."""
    root = os.environ.get("TILTFLOW_CACHE") or os.path.join("~", ".cache", "tiltflow")
    return Path(root).expanduser() / _CLASSIFIER_FILE


@contextlib.contextmanager
def _deterministic_cpu():
    """One CPU thread and deterministic algorithms, restored afterwards: results then do not
    depend on the caller's thread count (reduction order is fixed)."""
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        torch.set_num_threads(threads)


def _shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translations by -1, 0 or +1 pixel per axis (zero padding = background -1)."""
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), value=-1.0)
    crops = torch.stack([padded[:, :, dy:dy + 8, dx:dx + 8] for dy in range(3) for dx in range(3)])
    choice = torch.randint(0, 9, (x.shape[0],), generator=gen)
    return crops[choice, torch.arange(x.shape[0])]


def train_digits_classifier(seed: int = _TRAIN_SEED) -> _DigitsNet:
    """Train the FD-digits classifier from scratch, deterministically (fixed seed, one thread,
    ``torch.use_deterministic_algorithms``), on ``tiltflow.data.digits_arrays("train")``.

    Adam with a cosine learning-rate decay, 20 epochs of batch 64 with random +-1 pixel
    shifts: about 4 s of CPU time on one core, 98.3 % accuracy on the test split.
    Does not read or write the cache (see :func:`digits_classifier`). The global RNG is untouched.
    """
    from .data import digits_arrays

    x, y = digits_arrays("train")
    gen = torch.Generator().manual_seed(seed)
    with _deterministic_cpu(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _DigitsNet()
        opt = torch.optim.Adam(net.parameters(), lr=_TRAIN_LR)
        steps = _TRAIN_EPOCHS * math.ceil(x.shape[0] / _TRAIN_BATCH)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        net.train()
        for _ in range(_TRAIN_EPOCHS):
            perm = torch.randperm(x.shape[0], generator=gen)
            for start in range(0, x.shape[0], _TRAIN_BATCH):
                idx = perm[start:start + _TRAIN_BATCH]
                loss = nn.functional.cross_entropy(net(_shift(x[idx], gen)), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return net.eval().requires_grad_(False)


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].contiguous().numpy().tobytes())
    return h.hexdigest()


def _save_atomic(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path):
    from safetensors.torch import save

    atomic_write_bytes(path, save(tensors, metadata=metadata))


def _load_cached(path: Path) -> _DigitsNet:
    """Load weights with safetensors (never pickle); raise on any mismatch or corruption."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("sha256") != _digest(tensors):
        raise ValueError("checksum mismatch")
    net = _DigitsNet()
    net.load_state_dict(tensors, strict=True)
    return net.eval().requires_grad_(False)


def digits_classifier(retrain: bool = False) -> _DigitsNet:
    """The FD-digits classifier: from memory, else from the safetensors cache
    (:func:`digits_cache_path`), else trained by :func:`train_digits_classifier` and cached
    atomically (temp file + fsync + ``os.replace``). A missing, unreadable or corrupt cache
    file (checksum stored in its metadata) is retrained and overwritten.
    """
    path = digits_cache_path()
    key = str(path)
    if not retrain and key in _MODELS:
        return _MODELS[key]
    net = None
    if not retrain and path.exists():
        try:
            net = _load_cached(path)
        except Exception as e:  # noqa: BLE001 - any failure to read means "rebuild it"
            warnings.warn(f"digits classifier cache {path} is unreadable ({e}); retraining")
    if net is None:
        start = time.perf_counter()
        net = train_digits_classifier()
        seconds = time.perf_counter() - start
        tensors = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
        meta = {"format": "tiltflow digits classifier v1", "sha256": _digest(tensors),
                "seed": str(_TRAIN_SEED), "train_seconds": f"{seconds:.2f}"}
        _save_atomic(tensors, meta, path)
    _MODELS[key] = net
    for k in [k for k in _REF_STATS if k[0] == key]:
        del _REF_STATS[k]
    return net


def _as_digits(samples) -> torch.Tensor:
    if not torch.is_tensor(samples):
        samples = torch.as_tensor(np.asarray(samples))
    if samples.dim() < 1 or samples.shape[0] < 1 or samples[0].numel() != 64:
        raise ValueError(f"digits samples must have shape [N, 1, 8, 8] (or [N, 8, 8], [N, 64]), "
                         f"got {tuple(samples.shape)}")
    x = samples.detach().to("cpu", torch.float32).reshape(-1, 1, 8, 8)
    if not torch.isfinite(x).all():
        raise ValueError("digits samples contain NaN or inf")
    return x


def digits_features(x) -> torch.Tensor:
    """Penultimate-layer (64-d, post-ReLU) features ``[N, 64]`` of the digits classifier for
    images ``[N, 1, 8, 8]`` in [-1, 1] (the scale of ``tiltflow.data.digits_arrays``)."""
    x = _as_digits(x)
    net = digits_classifier()
    with torch.no_grad():
        return torch.cat([net.features(x[i:i + 2048]) for i in range(0, x.shape[0], 2048)])


def digits_classifier_accuracy(samples, labels) -> float:
    """Fraction of ``samples`` the digits classifier assigns to ``labels`` (``LongTensor[N]``):
    the class accuracy of class-conditional samples (test split: see the report)."""
    x = _as_digits(samples)
    labels = torch.as_tensor(labels)
    if labels.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape [{x.shape[0]}], got {tuple(labels.shape)}")
    net = digits_classifier()
    with torch.no_grad():
        pred = net(x).argmax(dim=1)
    return float((pred == labels.to(pred.device)).double().mean())


def _stats(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    f = features.to(torch.float64).numpy()
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _reference_stats(reference: str) -> tuple[np.ndarray, np.ndarray]:
    from .data import digits_arrays

    digits_classifier()  # (re)loads the model and drops stale statistics
    key = (str(digits_cache_path()), reference)
    if key not in _REF_STATS:
        _REF_STATS[key] = _stats(digits_features(digits_arrays(reference)[0]))
    return _REF_STATS[key]


def fd_digits(samples, reference: str = "train") -> float:
    """FD-digits: Frechet distance (Heusel et al. 2017) between the classifier features of
    ``samples [N, 1, 8, 8]`` and those of a digits split (default the training split).

    FD is biased upward for small N; compare against :func:`fd_digits_floor` (N = 360, the test
    split) using a similar number of samples.
    """
    if reference not in ("train", "test", "all"):
        raise ValueError(f"reference must be 'train', 'test' or 'all', got {reference!r}")
    feats = digits_features(samples)
    if feats.shape[0] < 2:
        raise ValueError("fd_digits needs at least 2 samples")
    mu, cov = _stats(feats)
    mu_ref, cov_ref = _reference_stats(reference)
    return frechet_distance(mu, cov, mu_ref, cov_ref)


def fd_digits_floor() -> float:
    """The FD-digits noise floor: FD between the test split (360 real images the classifier
    never saw) and the training split, i.e. ``fd_digits(digits_arrays("test")[0])``."""
    from .data import digits_arrays

    return fd_digits(digits_arrays("test")[0], reference="train")
