"""Exact ground truth for Gaussian mixtures: noisy marginals, denoisers, tilts and posteriors.

For data ``x ~ sum_k w_k N(mu_k, S_k)`` and any schedule ``x_t = alpha x + sigma noise``,
everything a diffusion or flow model learns is available in closed form:

- the noisy marginal ``p_t = sum_k w_k N(alpha mu_k, alpha^2 S_k + sigma^2 I)`` and its score;
- the exact denoiser ``E[x | x_t]`` (the minimiser of every denoising / flow-matching loss,
  Vincent 2011; Karras et al. 2022, eq. 3), hence the exact probability-flow ODE;
- the exponential tilt ``p(x) exp(r(x) / beta)`` for linear and quadratic rewards (the target of
  KL-regularised reward fine-tuning, e.g. Uehara et al. 2024; Domingo-Enrich et al. 2025,
  "Adjoint Matching"), again a Gaussian mixture;
- the posterior for linear-Gaussian observations ``y = A x + sigma_y n`` and the exact
  ``p(y | x_t)`` that inverse-problem solvers (DPS, Chung et al. 2023; PiGDM, Song et al. 2023)
  approximate.

Every per-component computation works in the eigenbasis ``S_k = U_k diag(lam_k) U_k^T``
(computed once in float64): ``alpha^2 S_k + sigma^2 I`` then has eigenvalues
``alpha^2 lam_k + sigma^2``, so solves and log-determinants for per-example ``t`` cost O(D^2)
with no per-example factorisation, and stay exact at ``alpha = 0`` and at ``sigma = 0``.

Gaussian-conditioning identities follow Bishop 2006, "Pattern Recognition and Machine
Learning", sec. 2.3.3 (marginal and conditional of a linear-Gaussian model).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .denoiser import Denoiser, as_time
from .rewards import LinearReward, QuadraticReward, Reward
from .schedules import Schedule, get_schedule

__all__ = [
    "GaussianMixture",
    "eight_gaussians",
    "anisotropic_2d",
    "random_16d",
    "testbeds",
    "get_testbed",
]

_F64 = torch.float64
_LOG_2PI = math.log(2 * math.pi)


def _array(value, name: str) -> torch.Tensor:
    t = torch.as_tensor(value).detach()
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be a real array, got dtype {t.dtype}")
    t = t.to(_F64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite (found NaN or inf)")
    return t


def _sym(m: torch.Tensor) -> torch.Tensor:
    return 0.5 * (m + m.transpose(-1, -2))


class GaussianMixture:
    """``p(x) = sum_k weights[k] N(x; means[k], covs[k])``, stored in float64.

    Args:
        weights: ``[K]``, non-negative, summing to 1 within 1e-6 (then renormalised exactly).
            With ``normalize=True`` any non-negative weights with a positive sum are divided by
            their sum.
        means: ``[K, D]``.
        covs: ``[K, D, D]``, symmetric (within 1e-8 relative) and positive definite.
    """

    def __init__(self, weights, means, covs, *, normalize: bool = False):
        w = _array(weights, "weights")
        mu = _array(means, "means")
        S = _array(covs, "covs")
        if w.dim() != 1 or w.numel() == 0:
            raise ValueError(f"weights must have shape [K] with K >= 1, got {tuple(w.shape)}")
        K = w.numel()
        if mu.dim() != 2 or mu.shape[0] != K or mu.shape[1] == 0:
            raise ValueError(f"means must have shape [K, D] with K={K}, got {tuple(mu.shape)}")
        D = mu.shape[1]
        if S.shape != (K, D, D):
            raise ValueError(
                f"covs must have shape [K, D, D]=[{K}, {D}, {D}], got {tuple(S.shape)}"
            )
        if bool((w < 0).any()):
            raise ValueError("weights must be non-negative")
        total = float(w.sum())
        if normalize:
            if total <= 0:
                raise ValueError("weights must have a positive sum to be normalised")
        elif abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"weights sum to {total:.8g}, not 1; pass normalize=True to divide by their sum"
            )
        w = w / w.sum()
        asym = float((S - S.transpose(-1, -2)).abs().amax())
        if asym > 1e-8 * max(1.0, float(S.abs().amax())):
            raise ValueError(f"covs must be symmetric (max |S - S^T| = {asym:.3g})")
        S = _sym(S)
        chol, info = torch.linalg.cholesky_ex(S)
        if bool((info != 0).any()):
            bad = int(torch.nonzero(info)[0])
            raise ValueError(f"covs[{bad}] is not positive definite")
        evals, evecs = torch.linalg.eigh(S)
        if bool((evals <= 0).any()):
            bad = int(torch.nonzero((evals <= 0).any(-1))[0])
            raise ValueError(f"covs[{bad}] is not positive definite (eigenvalue <= 0)")
        self.weights, self.means, self.covs = w, mu, S
        self._chol = chol
        self._evals, self._evecs = evals, evecs
        self._cache: dict = {}

    # -- basic properties ---------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.weights.numel()

    @property
    def mean(self) -> torch.Tensor:
        """Overall mean ``sum_k w_k mu_k`` ``[D]``."""
        return self.weights @ self.means

    @property
    def cov(self) -> torch.Tensor:
        """Overall covariance ``sum_k w_k (S_k + mu_k mu_k^T) - m m^T`` ``[D, D]``."""
        d = self.means - self.mean
        return _sym(torch.einsum("k,kij->ij", self.weights, self.covs) + (self.weights * d.T) @ d)

    def __repr__(self) -> str:
        return f"GaussianMixture(num_components={self.num_components}, dim={self.dim})"

    def _on(self, device) -> tuple[torch.Tensor, ...]:
        """``(log_weights, means, evals, evecs)`` on ``device`` (cached)."""
        key = str(device)
        if key not in self._cache:
            self._cache[key] = tuple(
                v.to(device)
                for v in (torch.log(self.weights), self.means, self._evals, self._evecs)
            )
        return self._cache[key]

    # -- sampling and density ------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None, return_labels: bool = False):
        """Draw ``n`` samples ``[n, D]`` (float64) using ``generator``; reproducible for a seeded
        generator. With ``return_labels=True`` also return the component indices ``[n]``."""
        if int(n) != n or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n}")
        n = int(n)
        if n == 0:
            x = torch.empty(0, self.dim, dtype=_F64)
            return (x, torch.empty(0, dtype=torch.long)) if return_labels else x
        device = generator.device if generator is not None else torch.device("cpu")
        labels = torch.multinomial(
            self.weights.to(device), n, replacement=True, generator=generator
        )
        z = torch.randn(n, self.dim, dtype=_F64, device=device, generator=generator)
        chol, means = self._chol.to(device), self.means.to(device)
        x = means[labels] + (chol[labels] @ z.unsqueeze(-1)).squeeze(-1)
        return (x, labels) if return_labels else x

    def _check_x(self, x: torch.Tensor, name: str = "x") -> torch.Tensor:
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise TypeError(f"{name} must be a float tensor of shape [..., {self.dim}]")
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"{name} must have shape [..., {self.dim}], got {tuple(x.shape)}")
        return x

    def _terms(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor):
        """Per-component quantities of ``p_t`` at ``x [B, D]`` (float64), ``alpha, sigma [B]``.

        Returns ``(log_joint [B, K], z [B, K, D], d [B, K, D])`` with ``z = U_k^T (x - alpha mu_k)``
        and ``d = alpha^2 lam_k + sigma^2`` the eigenvalues of the component covariance.
        """
        logw, mu, lam, U = self._on(x.device)
        a, s = alpha[:, None, None], sigma[:, None, None]
        diff = x[:, None, :] - a * mu[None]
        z = torch.einsum("bkd,kde->bke", diff, U)
        d = a * a * lam[None] + s * s
        log_n = -0.5 * ((z * z / d).sum(-1) + torch.log(d).sum(-1) + self.dim * _LOG_2PI)
        return logw + log_n, z, d

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact ``log p(x)`` for ``x`` of shape ``[..., D]``; returns ``[...]`` in x's dtype."""
        x = self._check_x(x)
        flat = x.reshape(-1, self.dim).to(_F64)
        one = torch.ones(flat.shape[0], dtype=_F64, device=x.device)
        log_joint, _, _ = self._terms(flat, one, torch.zeros_like(one))
        return torch.logsumexp(log_joint, -1).reshape(x.shape[:-1]).to(x.dtype)

    # -- noisy marginals -----------------------------------------------------------------------
    def _coeffs(self, x_t, t, schedule):
        x_t = self._check_x(x_t, "x_t")
        if x_t.dim() != 2:
            raise ValueError(f"x_t must have shape [B, {self.dim}], got {tuple(x_t.shape)}")
        t = as_time(t, x_t)
        c = get_schedule(schedule)(t.to(_F64))
        return x_t.to(_F64), c.alpha.to(_F64), c.sigma.to(_F64)

    def marginal(self, schedule: Schedule, t) -> GaussianMixture:
        """The noisy marginal ``p_t`` at a scalar time ``t``: the mixture with means
        ``alpha mu_k`` and covariances ``alpha^2 S_k + sigma^2 I``."""
        t = torch.as_tensor(t, dtype=_F64)
        if t.numel() != 1:
            raise ValueError(f"marginal takes a scalar t, got shape {tuple(t.shape)}")
        c = get_schedule(schedule)(t.reshape(()))
        a, s = float(c.alpha), float(c.sigma)
        eye = torch.eye(self.dim, dtype=_F64)
        return GaussianMixture(self.weights, a * self.means, a * a * self.covs + s * s * eye)

    def log_prob_t(self, x_t: torch.Tensor, t, schedule: Schedule) -> torch.Tensor:
        """``log p_t(x_t)`` for ``x_t [B, D]`` and per-example ``t [B]`` -> ``[B]``."""
        x, a, s = self._coeffs(x_t, t, schedule)
        log_joint, _, _ = self._terms(x, a, s)
        return torch.logsumexp(log_joint, -1).to(x_t.dtype)

    def score_t(self, x_t: torch.Tensor, t, schedule: Schedule) -> torch.Tensor:
        """``grad log p_t(x_t) = -sum_k r_k (alpha^2 S_k + sigma^2 I)^{-1} (x_t - alpha mu_k)``."""
        x, a, s = self._coeffs(x_t, t, schedule)
        log_joint, z, d = self._terms(x, a, s)
        r = torch.softmax(log_joint, -1)
        U = self._on(x.device)[3]
        per = torch.einsum("kde,bke->bkd", U, z / d)
        return -(r[..., None] * per).sum(1).to(x_t.dtype)

    def _posterior_parts(self, x, a, s):
        """Responsibilities ``r [B, K]``, component posterior means ``m [B, K, D]`` and the
        eigenvalues ``c [B, K, D]`` of the component posterior covariances (eigenvectors U_k).

        Per component, ``x | x_t, k ~ N(mu_k + a S_k (a^2 S_k + s^2 I)^{-1} (x_t - a mu_k),
        S_k - a^2 S_k (a^2 S_k + s^2 I)^{-1} S_k)``; in the eigenbasis the gain is
        ``a lam / (a^2 lam + s^2)`` and the covariance ``lam s^2 / (a^2 lam + s^2)``.
        """
        _, mu, lam, U = self._on(x.device)
        log_joint, z, d = self._terms(x, a, s)
        r = torch.softmax(log_joint, -1)
        gain = a[:, None, None] * lam[None] / d
        m = mu[None] + torch.einsum("kde,bke->bkd", U, gain * z)
        c = lam[None] * (s * s)[:, None, None] / d
        return r, m, c, log_joint

    def posterior_mean(self, x_t: torch.Tensor, t, schedule: Schedule,
                       labels: torch.Tensor | None = None) -> torch.Tensor:
        """Exact ``E[x | x_t]`` ``[B, D]`` for per-example ``t [B]`` (Tweedie / Bayes-optimal
        denoiser), differentiable in ``x_t``; computed in float64, returned in x_t's dtype.
        Equals ``x_t / alpha`` at ``sigma = 0`` and the mixture mean at ``alpha = 0``.

        ``labels`` (``LongTensor[B]``, ``-1`` = none) condition on the component: ``E[x | x_t,
        k]``, the mixture seen as a class-conditional model whose classes are its components."""
        x, a, s = self._coeffs(x_t, t, schedule)
        r, m, _, _ = self._posterior_parts(x, a, s)
        if labels is not None:
            r = self._given(r, labels)
        return (r[..., None] * m).sum(1).to(x_t.dtype)

    def _given(self, r: torch.Tensor, labels) -> torch.Tensor:
        """Responsibilities with the labelled rows replaced by their component's one-hot."""
        if not torch.is_tensor(labels) or labels.is_floating_point() or labels.shape != r.shape[:1]:
            raise ValueError(f"labels must be a LongTensor[{r.shape[0]}] of components (-1: none)")
        if bool(((labels < -1) | (labels >= self.num_components)).any()):
            raise ValueError(f"labels must be in [-1, {self.num_components}), got "
                             f"{labels.min().item()}..{labels.max().item()}")
        labels = labels.to(r.device)
        one_hot = torch.nn.functional.one_hot(labels.clamp(min=0), self.num_components).to(r)
        return torch.where(labels[:, None] >= 0, one_hot, r)

    def posterior_cov(self, x_t: torch.Tensor, t, schedule: Schedule) -> torch.Tensor:
        """Exact ``Cov[x | x_t]`` ``[B, D, D]`` (law of total covariance over components)."""
        x, a, s = self._coeffs(x_t, t, schedule)
        r, m, c, _ = self._posterior_parts(x, a, s)
        U = self._on(x.device)[3]
        comp = torch.einsum("kde,bke,kfe->bkdf", U, c, U)
        mean = (r[..., None] * m).sum(1)
        dm = m - mean[:, None]
        second = comp + dm[..., :, None] * dm[..., None, :]
        return _sym((r[..., None, None] * second).sum(1)).to(x_t.dtype)

    def conditional(self, x_t: torch.Tensor, t, schedule: Schedule) -> GaussianMixture:
        """The posterior ``p(x | x_t)`` for a single state ``x_t [D]`` (or ``[1, D]``) at a scalar
        ``t`` with ``sigma(t) > 0``: the mixture with weights ``r_k(x_t)`` and the per-component
        Gaussian posteriors (see :meth:`posterior_mean`)."""
        x_t = torch.as_tensor(x_t).reshape(1, -1)
        x, a, s = self._coeffs(x_t, torch.as_tensor(t, dtype=_F64).reshape(1), schedule)
        if float(s[0]) <= 0:
            raise ValueError("conditional needs sigma(t) > 0 (at sigma = 0, x = x_t / alpha)")
        r, m, c, _ = self._posterior_parts(x, a, s)
        U = self._evecs
        covs = torch.einsum("kde,ke,kfe->kdf", U, c[0], U)
        return GaussianMixture(r[0], m[0], _sym(covs), normalize=True)

    def denoiser(self, schedule: Schedule, conditional: bool = False) -> Denoiser:
        """The exact denoiser under ``schedule``: ``Denoiser.from_fn(E[x | x_t], schedule,
        prediction="data")``. Unconditional by default (``cond`` is accepted and ignored);
        ``conditional=True`` makes ``cond`` the component label (``-1`` or ``None``: the whole
        mixture), an exact class-conditional model for guidance (``sample(n,
        return_labels=True)`` draws matching labels)."""
        schedule = get_schedule(schedule)

        def exact_posterior_mean(x_t, t, cond=None):
            return self.posterior_mean(x_t, t, schedule, cond if conditional else None)

        den = Denoiser.from_fn(exact_posterior_mean, schedule, prediction="data")
        den.data_shape = (self.dim,)  # what a method drawing samples from it needs to know
        return den

    # -- tilts ---------------------------------------------------------------------------------
    def tilt(self, reward: Reward, beta: float = 1.0) -> GaussianMixture:
        """The normalised tilt ``p(x) exp(r(x) / beta)`` for a :class:`LinearReward` or
        :class:`QuadraticReward` ``r = -1/2 x^T A x + b^T x + c``.

        Per component with ``S = L L^T`` and ``u = L^{-1}(x - mu)``, the tilted density of ``u``
        is ``N(M^{-1} g, M^{-1})`` with ``M = I + L^T A L / beta`` and
        ``g = L^T (b - A mu) / beta``, and the component's mass is multiplied by
        ``Z_k = exp(r0_k - 1/2 log det M + 1/2 g^T M^{-1} g)``, ``r0_k = (-1/2 mu^T A mu +
        b^T mu) / beta`` (Gaussian integral; the optimum of KL-regularised reward maximisation,
        Korbak et al. 2022). Raises ``ValueError`` when ``S_k^{-1} + A / beta`` is not positive
        definite (the tilt does not normalise).
        """
        if not math.isfinite(beta) or beta <= 0:
            raise ValueError(f"beta must be a positive finite number, got {beta}")
        if isinstance(reward, LinearReward):
            A, b = torch.zeros(self.dim, self.dim, dtype=_F64), reward.w
        elif isinstance(reward, QuadraticReward):
            A, b = reward.A, reward.b
        else:
            raise TypeError(
                f"no closed-form tilt for {type(reward).__name__}; "
                "tilt supports LinearReward and QuadraticReward"
            )
        A, b = A.detach().to(_F64).cpu() / beta, b.detach().to(_F64).cpu() / beta
        if b.shape != (self.dim,):
            raise ValueError(f"reward has dimension {b.numel()}, the mixture {self.dim}")
        L, mu = self._chol, self.means
        eye = torch.eye(self.dim, dtype=_F64)
        M = _sym(eye + L.transpose(-1, -2) @ A @ L)
        LM, info = torch.linalg.cholesky_ex(M)
        if bool((info != 0).any()):
            bad = int(torch.nonzero(info)[0])
            raise ValueError(
                f"tilt is not normalisable: S_k^-1 + A/beta is not positive definite for "
                f"component {bad}; increase beta or make A less negative"
            )
        g = (L.transpose(-1, -2) @ (b - mu @ A)[..., None])  # [K, D, 1]
        v = torch.cholesky_solve(g, LM)  # M^{-1} g
        r0 = -0.5 * ((mu @ A) * mu).sum(-1) + mu @ b
        logdet = 2 * torch.log(torch.diagonal(LM, dim1=-2, dim2=-1)).sum(-1)
        log_z = r0 - 0.5 * logdet + 0.5 * (g * v).sum((-1, -2))
        weights = torch.softmax(torch.log(self.weights) + log_z, 0)
        means = mu + (L @ v).squeeze(-1)
        covs = L @ torch.cholesky_solve(L.transpose(-1, -2), LM)
        return GaussianMixture(weights, means, _sym(covs), normalize=True)

    # -- linear-Gaussian observations ------------------------------------------------------------
    def _operator(self, A, noise_std):
        A = _array(A, "A")
        if A.dim() == 1:
            A = A[None]
        if A.dim() != 2 or A.shape[1] != self.dim or A.shape[0] == 0:
            raise ValueError(f"A must have shape [M, D] with D={self.dim}, got {tuple(A.shape)}")
        if not math.isfinite(noise_std) or noise_std <= 0:
            raise ValueError(
                f"noise_std must be positive and finite, got {noise_std} "
                "(for noiseless observations use a small positive value)"
            )
        return A, float(noise_std)

    def posterior(self, A, y, noise_std: float) -> GaussianMixture:
        """``p(x | y)`` for ``y = A x + noise_std n``, ``A [M, D]``, one observation ``y [M]``.

        Per component (Bishop 2006, eqs. 2.113-2.117): ``S_y = A S_k A^T + noise_std^2 I``,
        gain ``G = S_k A^T S_y^{-1}``, mean ``mu_k + G (y - A mu_k)``, covariance in Joseph form
        ``(I - G A) S_k (I - G A)^T + noise_std^2 G G^T`` (positive definite in floating
        point), weight ``propto w_k N(y; A mu_k, S_y)``.
        """
        A, sy = self._operator(A, noise_std)
        y = _array(y, "y").reshape(-1)
        if y.shape != (A.shape[0],):
            raise ValueError(f"y must have shape [M]=[{A.shape[0]}], got {tuple(y.shape)}")
        S, mu = self.covs, self.means
        AS = A @ S  # [K, M, D]
        Sy = _sym(AS @ A.T) + sy * sy * torch.eye(A.shape[0], dtype=_F64)
        Ly = torch.linalg.cholesky(Sy)
        G = torch.cholesky_solve(AS, Ly).transpose(-1, -2)  # [K, D, M]
        resid = y - mu @ A.T  # [K, M]
        means = mu + (G @ resid[..., None]).squeeze(-1)
        IGA = torch.eye(self.dim, dtype=_F64) - G @ A
        covs = IGA @ S @ IGA.transpose(-1, -2) + sy * sy * G @ G.transpose(-1, -2)
        w = torch.linalg.solve_triangular(Ly, resid[..., None], upper=False).squeeze(-1)
        log_n = -0.5 * (
            (w * w).sum(-1)
            + 2 * torch.log(torch.diagonal(Ly, dim1=-2, dim2=-1)).sum(-1)
            + A.shape[0] * _LOG_2PI
        )
        weights = torch.softmax(torch.log(self.weights) + log_n, 0)
        return GaussianMixture(weights, means, _sym(covs), normalize=True)

    def log_likelihood_y_given_xt(
        self, A, y, noise_std: float, x_t: torch.Tensor, t, schedule: Schedule
    ) -> torch.Tensor:
        """Exact ``log p(y | x_t)`` ``[B]`` for ``y = A x + noise_std n`` (independent of x_t
        given x), ``x_t [B, D]``, ``t [B]``, ``y [M]`` or ``[B, M]``.

        ``p(x | x_t) = sum_k r_k N(m_k, C_k)`` (see :meth:`posterior_mean`), so
        ``p(y | x_t) = sum_k r_k(x_t) N(y; A m_k(x_t), A C_k A^T + noise_std^2 I)``: the quantity
        DPS (Chung et al. 2023) and PiGDM (Song et al. 2023) approximate with one Gaussian.
        Differentiable in ``x_t``.
        """
        A, sy = self._operator(A, noise_std)
        x, a, s = self._coeffs(x_t, t, schedule)
        A = A.to(x.device)
        y = torch.as_tensor(y).to(device=x.device, dtype=_F64)
        if y.dim() == 1:
            y = y.expand(x.shape[0], -1)
        if y.shape != (x.shape[0], A.shape[0]):
            raise ValueError(
                f"y must have shape [M]=[{A.shape[0]}] or [B, M]=[{x.shape[0]}, {A.shape[0]}], "
                f"got {tuple(y.shape)}"
            )
        r, m, c, log_joint = self._posterior_parts(x, a, s)
        AU = A @ self._on(x.device)[3]  # [K, M, D]
        Sy = torch.einsum("kme,bke,kne->bkmn", AU, c, AU)
        Sy = _sym(Sy) + sy * sy * torch.eye(A.shape[0], dtype=_F64, device=x.device)
        Ly = torch.linalg.cholesky(Sy)
        resid = y[:, None, :] - m @ A.T  # [B, K, M]
        w = torch.linalg.solve_triangular(Ly, resid[..., None], upper=False).squeeze(-1)
        log_n = -0.5 * (
            (w * w).sum(-1)
            + 2 * torch.log(torch.diagonal(Ly, dim1=-2, dim2=-1)).sum(-1)
            + A.shape[0] * _LOG_2PI
        )
        log_r = torch.log_softmax(log_joint, -1)
        return torch.logsumexp(log_r + log_n, -1).to(x_t.dtype)


# -- test beds (BENCHMARKS.md, test bed 1) ------------------------------------------------------
def eight_gaussians(radius: float = 4.0, std: float = 0.5) -> GaussianMixture:
    """Eight equal-weight isotropic Gaussians of std ``std`` on a circle of ``radius`` (the
    standard 2-D toy of Grathwohl et al. 2019, FFJORD; Tong et al. 2024, conditional FM)."""
    if radius < 0 or std <= 0:
        raise ValueError(f"need radius >= 0 and std > 0, got {radius}, {std}")
    angles = torch.arange(8, dtype=_F64) * (2 * math.pi / 8)
    means = radius * torch.stack([torch.cos(angles), torch.sin(angles)], -1)
    covs = (std**2) * torch.eye(2, dtype=_F64).expand(8, 2, 2)
    return GaussianMixture(torch.full((8,), 1 / 8, dtype=_F64), means, covs)


def _rotated(std_major: float, std_minor: float, degrees: float) -> torch.Tensor:
    th = math.radians(degrees)
    R = torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]], dtype=_F64)
    return R @ torch.diag(torch.tensor([std_major**2, std_minor**2], dtype=_F64)) @ R.T


def anisotropic_2d() -> GaussianMixture:
    """A fixed 2-D mixture of four unequal-weight (0.4, 0.3, 0.2, 0.1), anisotropic, correlated
    Gaussians (axis stds from 0.15 to 1.0) at data scale a few units; hard for solvers because
    the density has thin ridges and a light component."""
    weights = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=_F64)
    means = torch.tensor([[-2.0, -1.0], [2.0, 1.5], [0.5, -2.5], [-1.0, 2.5]], dtype=_F64)
    covs = torch.stack([
        _rotated(1.0, 0.3, 30.0),
        _rotated(0.6, 0.2, -45.0),
        _rotated(0.8, 0.5, 80.0),
        _rotated(0.4, 0.15, 10.0),
    ])
    return GaussianMixture(weights, means, covs)


def random_16d(num_components: int = 8, seed: int = 0) -> GaussianMixture:
    """A deterministic 16-D mixture: weights uniform in [0.5, 1.5] (normalised), means
    ``N(0, 2^2 I)``, covariances ``Q diag(lam) Q^T`` with a random orthogonal ``Q`` and
    ``lam`` log-uniform in [0.05, 1]."""
    if num_components < 1:
        raise ValueError(f"num_components must be >= 1, got {num_components}")
    dim = 16
    gen = torch.Generator().manual_seed(int(seed))
    weights = 0.5 + torch.rand(num_components, dtype=_F64, generator=gen)
    means = 2.0 * torch.randn(num_components, dim, dtype=_F64, generator=gen)
    q, rr = torch.linalg.qr(torch.randn(num_components, dim, dim, dtype=_F64, generator=gen))
    q = q * torch.sign(torch.diagonal(rr, dim1=-2, dim2=-1))[:, None, :]  # Haar-distributed Q
    u = torch.rand(num_components, dim, dtype=_F64, generator=gen)
    lam = 0.05 * torch.exp(math.log(1 / 0.05) * u)
    covs = _sym(q @ torch.diag_embed(lam) @ q.transpose(-1, -2))
    return GaussianMixture(weights, means, covs, normalize=True)


_TESTBEDS: dict[str, Callable[[], GaussianMixture]] = {
    "eight_gaussians": eight_gaussians,
    "anisotropic_2d": anisotropic_2d,
    "random_16d": random_16d,
}


def testbeds() -> list[str]:
    """Names accepted by :func:`get_testbed`."""
    return list(_TESTBEDS)


def get_testbed(name: str) -> GaussianMixture:
    """The named test bed with its default parameters."""
    if name not in _TESTBEDS:
        raise ValueError(f"unknown test bed {name!r}; choose one of {testbeds()}")
    return _TESTBEDS[name]()
