"""Pre-training objectives: each owns its time / noise-level distribution and its weighting.

An objective is a callable ``objective(model, batch, generator=None) -> loss [B]`` where
``model`` is a :class:`tiltflow.Denoiser`, ``batch = {"x": Tensor [B, ...], "cond": LongTensor[B]
| None}``, and every random draw (label dropout, times, noise, projections, couplings) uses
``generator``, in that order, so a seeded generator makes a training step reproducible.

Conventions shared by all objectives:

- ``t = 0`` is clean data, ``t = 1`` noise; ``x_t = alpha(t) x + sigma(t) noise`` with the
  model's own schedule. Times are drawn in float64.
- The per-example loss is reduced over the non-batch dimensions by ``reduction="mean"``
  (default: per-dimension losses, as in the reference implementations of DDPM and EDM) or
  ``"sum"``. With ``"mean"`` the ``ddpm`` ELBO weighting therefore gives nats per dimension.
- ``label_dropout=p`` replaces each class label by ``-1`` (the null label of classifier-free
  guidance, Ho & Salimans 2022) with probability ``p`` before the model is called.
- ``config()`` is a JSON-able dict and ``objectives.get(obj.config())`` rebuilds ``obj``.

Objectives (``objectives.available()``):

- ``ddpm`` (:class:`DDPMLoss`): epsilon prediction, Ho et al. 2020 / Kingma et al. 2021.
- ``ncsn`` (:class:`DSMLoss`): annealed denoising score matching, Song & Ermon 2019.
- ``ssm`` (:class:`SSMLoss`): sliced score matching with variance reduction, Song et al. 2019.
- ``edm`` (:class:`EDMLoss`): Karras et al. 2022.
- ``flow_matching`` (:class:`FlowMatchingLoss`): conditional flow matching, Lipman et al. 2023.
- ``rectified_flow`` (:class:`RectifiedFlowLoss`): Liu et al. 2022; Esser et al. 2024 (SD3).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping

import torch

from ..schedules import EDM, VE, RectifiedFlow, VPDiscrete
from . import couplings as _couplings
from . import timesampling as _timesampling

__all__ = [
    "Objective",
    "DDPMLoss",
    "DSMLoss",
    "SSMLoss",
    "EDMLoss",
    "FlowMatchingLoss",
    "RectifiedFlowLoss",
    "drop_labels",
    "get",
    "available",
]


# -- helpers ---------------------------------------------------------------------------------
def _rand(n: int, generator, x: torch.Tensor) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=x.device, dtype=torch.float64)


def _randn(shape, generator, x: torch.Tensor, dtype=None) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=x.device, dtype=dtype or x.dtype)


def drop_labels(cond, p: float, generator: torch.Generator | None = None):
    """Replace each class label by ``-1`` (null label) with probability ``p``, using
    ``generator`` (classifier-free guidance training, Ho & Salimans 2022). ``cond=None`` or
    ``p=0`` returns ``cond`` unchanged (and draws nothing)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"label_dropout must be in [0, 1], got {p}")
    if cond is None or p == 0.0:
        return cond
    if not torch.is_tensor(cond) or cond.is_floating_point() or cond.dtype == torch.bool:
        raise TypeError(
            "label_dropout needs integer class labels (LongTensor[B]) as cond; set label_dropout=0"
        )
    drop = torch.rand(cond.shape[0], generator=generator, device=cond.device) < p
    drop = drop.reshape((-1,) + (1,) * (cond.dim() - 1))
    return torch.where(drop, torch.full_like(cond, -1), cond)


def _check_range(name, lo, hi):
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"{name}: need 0 <= t_min < t_max <= 1, got t_min={lo}, t_max={hi}")


class Objective(abc.ABC):
    """Base class: validates the batch, applies label dropout, calls :meth:`loss`.

    Subclasses implement ``loss(model, x, cond, generator) -> [B]`` and ``_params()``.
    """

    name = "objective"
    # what a run trains with this objective unless its config says otherwise
    default_schedule = "rectified_flow"
    default_prediction = "velocity"
    default_precondition = False

    def __init__(self, *, label_dropout: float = 0.0, reduction: str = "mean"):
        label_dropout = float(label_dropout)
        if not 0.0 <= label_dropout <= 1.0:
            raise ValueError(f"label_dropout must be in [0, 1], got {label_dropout}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.label_dropout = label_dropout
        self.reduction = reduction

    # -- public --------------------------------------------------------------------------------
    def __call__(
        self, model, batch: Mapping, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        if not hasattr(model, "schedule") or not callable(model):
            raise TypeError(f"model must be a tiltflow.Denoiser, got {type(model).__name__}")
        if not isinstance(batch, Mapping) or "x" not in batch:
            raise TypeError(
                'batch must be a dict {"x": Tensor [B, ...], "cond": LongTensor[B] | None}'
            )
        x, cond = batch["x"], batch.get("cond")
        if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() < 2:
            raise TypeError(
                'batch["x"] must be a float tensor of shape [B, ...] with at least 2 dims'
            )
        if cond is not None and (not torch.is_tensor(cond) or cond.shape[:1] != x.shape[:1]):
            raise ValueError(
                f'batch["cond"] must be None or a tensor with leading dim B={x.shape[0]}'
            )
        self._check_model(model)
        cond = drop_labels(cond, self.label_dropout, generator)
        return self.loss(model, x, cond, generator)

    @abc.abstractmethod
    def loss(self, model, x, cond, generator) -> torch.Tensor:
        """Per-example loss ``[B]`` of ``model`` on clean data ``x`` (labels already dropped)."""

    def config(self) -> dict:
        return {
            "name": self.name,
            **self._params(),
            "label_dropout": self.label_dropout,
            "reduction": self.reduction,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"

    # -- for subclasses ------------------------------------------------------------------------
    def _params(self) -> dict:
        return {}

    def _check_model(self, model) -> None:  # noqa: B027 - optional hook, not abstract
        pass

    def _reduce(self, per_element: torch.Tensor) -> torch.Tensor:
        flat = per_element.reshape(per_element.shape[0], -1)
        return flat.mean(1) if self.reduction == "mean" else flat.sum(1)

    @staticmethod
    def _noisy(model, x, t, noise):
        c = model.schedule(t).expand(x)
        return c, c.alpha * x + c.sigma * noise


# -- DDPM --------------------------------------------------------------------------------------
class DDPMLoss(Objective):
    """Epsilon-prediction loss on the model's schedule.

    ``weighting="simple"``: Ho et al. 2020, "Denoising Diffusion Probabilistic Models",
    ``L_simple = ||eps - eps_hat(x_t, t)||^2`` with ``t ~ U[t_min, t_max]``.

    ``weighting="elbo"``: the continuous-time diffusion term of the variational bound, Kingma et
    al. 2021, "Variational Diffusion Models", eq. 17 with ``gamma = -lambda``:
    ``(t_max - t_min) * (-1/2 dlambda/dt) ||eps - eps_hat||^2`` with ``lambda = logSNR`` and
    ``-1/2 dlambda/dt = sigma'/sigma - alpha'/alpha``; its mean is the bound's diffusion term on
    ``[t_min, t_max]`` (in nats per dimension with ``reduction="mean"``, nats with ``"sum"``).
    ``t_min > 0`` is required there: for schedules with ``sigma(0) = 0`` the term diverges
    logarithmically at t = 0 (it is balanced by the decoder term, not modelled here).

    Discrete :class:`~tiltflow.schedules.VPDiscrete` schedules ignore ``t_min``/``t_max`` and draw
    ``t`` on the knots ``(k + 1) / N``: ``simple`` with ``k ~ U{0, ..., N-1}`` (Ho et al.'s
    Algorithm 1); ``elbo`` with ``k ~ U{1, ..., N-1}`` and the discrete-time weight of Kingma et
    al. eq. 13, ``(N - 1)/2 (SNR(t_{k-1}) / SNR(t_k) - 1)``, so its mean is the sum of the KL terms
    ``L_1 .. L_{N-1}`` (the step-0 term is the decoder's and is left out).
    """

    name = "ddpm"
    default_prediction = "noise"

    def __init__(
        self, weighting: str = "simple", t_min: float = 1e-4, t_max: float = 1 - 1e-4, **base
    ):
        super().__init__(**base)
        if weighting not in ("simple", "elbo"):
            raise ValueError(f"ddpm weighting must be 'simple' or 'elbo', got {weighting!r}")
        t_min, t_max = float(t_min), float(t_max)
        _check_range("ddpm", t_min, t_max)
        if weighting == "elbo" and t_min <= 0:
            raise ValueError("ddpm weighting='elbo' needs t_min > 0 (the bound diverges at t = 0)")
        self.weighting, self.t_min, self.t_max = weighting, t_min, t_max

    def _params(self):
        return {"weighting": self.weighting, "t_min": self.t_min, "t_max": self.t_max}

    def sample_time(self, schedule, n, generator, x):
        """``(t, weight)``, both float64 ``[n]``."""
        if isinstance(schedule, VPDiscrete):
            num = schedule.num_steps
            lo = 0 if self.weighting == "simple" else 1
            k = torch.randint(lo, num, (n,), generator=generator, device=x.device)
            t = (k + 1).to(torch.float64) / num
            if self.weighting == "simple":
                return t, torch.ones_like(t)
            ac = schedule.alphas_cumprod.to(x.device)
            snr = ac / (1 - ac)
            return t, (num - 1) / 2 * (snr[k - 1] / snr[k] - 1)
        t = self.t_min + (self.t_max - self.t_min) * _rand(n, generator, x)
        if self.weighting == "simple":
            return t, torch.ones_like(t)
        c = schedule(t)
        return t, (self.t_max - self.t_min) * (c.d_sigma / c.sigma - c.d_alpha / c.alpha)

    def loss(self, model, x, cond, generator):
        t, weight = self.sample_time(model.schedule, x.shape[0], generator, x)
        noise = _randn(x.shape, generator, x)
        _, x_t = self._noisy(model, x, t, noise)
        eps_hat = model(x_t, t, cond).noise
        return weight.to(x.dtype) * self._reduce((eps_hat - noise) ** 2)


# -- NCSN / denoising score matching -----------------------------------------------------------
class DSMLoss(Objective):
    """Denoising score matching with annealed noise levels, Song & Ermon 2019, "Generative
    Modeling by Estimating Gradients of the Data Distribution" (NCSN), eqs. 5-6:
    ``1/2 lambda(sigma) ||s_theta(x~, sigma) + (x~ - x) / sigma^2||^2`` with
    ``x~ = x + sigma noise``,
    ``lambda(sigma) = sigma^2`` (so the loss equals ``1/2 ||sigma s_theta + noise||^2``).

    Needs a variance-exploding schedule (``alpha = 1``): :class:`~tiltflow.schedules.VE` or
    :class:`~tiltflow.schedules.EDM`. Levels: ``num_levels=L`` gives the paper's geometric ladder
    ``sigma_i = sigma_max (sigma_min / sigma_max)^(i / (L - 1))``, ``i ~ U{0..L-1}``;
    ``num_levels=None`` draws ``log sigma ~ U[log sigma_min, log sigma_max]`` (the continuous
    limit, as in NCSN++ / Song et al. 2021). The model is called at
    ``t = schedule.t_from_logsnr(-2 log sigma)``, so ``sigma(t)`` hits the levels exactly.
    ``sigma_min``/``sigma_max`` default to the schedule's range (``sigma_min = 0.002`` for EDM,
    whose ``sigma(0) = 0``), and must lie inside it.
    """

    name = "ncsn"
    default_schedule = "ve"
    default_prediction = "score"

    def __init__(
        self,
        num_levels: int | None = 10,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        **base,
    ):
        super().__init__(**base)
        if num_levels is not None and (int(num_levels) != num_levels or num_levels < 2):
            raise ValueError(
                f"ncsn num_levels must be an integer >= 2 (or None: continuous), got {num_levels}"
            )
        self.num_levels = None if num_levels is None else int(num_levels)
        if sigma_min is not None and sigma_max is not None and not 0 < sigma_min < sigma_max:
            raise ValueError(f"ncsn needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min = None if sigma_min is None else float(sigma_min)
        self.sigma_max = None if sigma_max is None else float(sigma_max)

    def _params(self):
        return {
            "num_levels": self.num_levels,
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
        }

    def _check_model(self, model):
        if not isinstance(model.schedule, (VE, EDM)):
            raise TypeError(
                f"ncsn needs a variance-exploding schedule (schedules.VE() or EDM()), got "
                f"{type(model.schedule).__name__}; use 'ddpm' or 'flow_matching' otherwise"
            )

    def levels(self, schedule) -> tuple[float, float]:
        """``(sigma_min, sigma_max)`` for ``schedule``, checked against its range."""
        one = torch.ones((), dtype=torch.float64)
        s0, s1 = float(schedule.sigma(0 * one)), float(schedule.sigma(one))
        lo = self.sigma_min if self.sigma_min is not None else (s0 if s0 > 0 else 0.002)
        hi = self.sigma_max if self.sigma_max is not None else s1
        if not (s0 * (1 - 1e-9) <= lo < hi <= s1 * (1 + 1e-9)):
            raise ValueError(
                f"ncsn noise levels [{lo}, {hi}] must lie inside the schedule's range [{s0}, {s1}]"
            )
        return lo, hi

    def sample_sigma(self, schedule, n, generator, x) -> torch.Tensor:
        lo, hi = self.levels(schedule)
        if self.num_levels is None:
            frac = _rand(n, generator, x)
        else:
            i = torch.randint(0, self.num_levels, (n,), generator=generator, device=x.device)
            frac = i.to(torch.float64) / (self.num_levels - 1)
        return hi * (lo / hi) ** frac

    def loss(self, model, x, cond, generator):
        sigma = self.sample_sigma(model.schedule, x.shape[0], generator, x)
        t = model.schedule.t_from_logsnr(-2 * torch.log(sigma)).clamp(0, 1)
        noise = _randn(x.shape, generator, x)
        c, x_t = self._noisy(model, x, t, noise)
        score = model(x_t, t, cond).score
        # lambda(sigma) ||s + (x_t - x)/sigma^2||^2 = ||sigma s + noise||^2
        return 0.5 * self._reduce((c.sigma * score + noise) ** 2)


# -- sliced score matching ---------------------------------------------------------------------
class SSMLoss(Objective):
    """Sliced score matching with variance reduction (SSM-VR), Song, Garg, Shi & Ermon 2019,
    "Sliced Score Matching: A Scalable Approach to Density and Score Estimation", eq. 8:
    ``1/2 ||s_theta(x_t)||^2 + v^T grad_x (v^T s_theta(x_t))``, ``E[v v^T] = I``,
    averaged over ``num_projections`` directions ``v`` (``projection="gaussian"`` or
    ``"rademacher"``). Applied to the noise-conditional score at ``x_t`` with ``t ~ U[t_min,
    t_max]`` and weight ``lambda(t) = sigma(t)^2`` (Song et al. 2021). ``v^T J v`` uses autograd
    with ``create_graph=True`` so the loss can be back-propagated; the network must treat the
    batch rows independently (no batch norm). At the exact score the expected value is
    ``-1/2 sigma^2 E||grad log p_t||^2`` (score matching's objective minus half the Fisher
    information), not zero.
    """

    name = "ssm"
    default_prediction = "score"

    def __init__(
        self,
        num_projections: int = 1,
        projection: str = "gaussian",
        t_min: float = 1e-4,
        t_max: float = 1 - 1e-4,
        **base,
    ):
        super().__init__(**base)
        if int(num_projections) != num_projections or num_projections < 1:
            raise ValueError(
                f"ssm num_projections must be a positive integer, got {num_projections}"
            )
        if projection not in ("gaussian", "rademacher"):
            raise ValueError(
                f"ssm projection must be 'gaussian' or 'rademacher', got {projection!r}"
            )
        t_min, t_max = float(t_min), float(t_max)
        _check_range("ssm", t_min, t_max)
        self.num_projections, self.projection = int(num_projections), projection
        self.t_min, self.t_max = t_min, t_max

    def _params(self):
        return {
            "num_projections": self.num_projections,
            "projection": self.projection,
            "t_min": self.t_min,
            "t_max": self.t_max,
        }

    def loss(self, model, x, cond, generator):
        t = self.t_min + (self.t_max - self.t_min) * _rand(x.shape[0], generator, x)
        noise = _randn(x.shape, generator, x)
        c, x_t = self._noisy(model, x, t, noise)
        x_t = x_t.detach().requires_grad_(True)
        with torch.enable_grad():
            score = model(x_t, t, cond).score
            trace = torch.zeros_like(score)
            for _ in range(self.num_projections):
                v = _randn(x.shape, generator, x)
                if self.projection == "rademacher":
                    v = torch.sign(v)
                (jv,) = torch.autograd.grad((v * score).sum(), x_t, create_graph=True)
                trace = trace + v * jv
            per_element = 0.5 * score**2 + trace / self.num_projections
        return c.sigma.reshape(-1) ** 2 * self._reduce(per_element)


# -- EDM ---------------------------------------------------------------------------------------
class EDMLoss(Objective):
    """Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
    sec. 5 / Table 1: ``ln sigma ~ N(P_mean, P_std^2)``, ``lambda(sigma) = (sigma^2 + sigma_d^2)
    / (sigma sigma_d)^2``, loss ``lambda(sigma) ||D(x + sigma n; sigma) - x||^2`` on the data
    prediction.

    Any schedule works: ``sigma`` is the scale-free noise level ``sigma(t) / alpha(t)``; the model
    is called at ``t = schedule.t_from_logsnr(-2 ln sigma)`` on ``x_t = alpha (x + sigma n)``
    (same log-SNR, same denoising problem; Karras et al. sec. 4). Levels beyond the schedule's
    range are clamped to ``t in [0, 1]`` and weighted by the level actually used (e.g. VE's
    ``sigma_min``). ``sigma_data=None`` uses ``model.sigma_data`` (the value its EDM
    preconditioning uses, ``Denoiser(..., precondition=True)``), else 0.5.
    """

    name = "edm"
    default_schedule = "edm"
    default_prediction = "data"
    default_precondition = True  # EDM's preconditioned network (Karras et al. 2022, Table 1)

    def __init__(
        self, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float | None = None, **base
    ):
        super().__init__(**base)
        if not (math.isfinite(p_mean) and p_std > 0 and math.isfinite(p_std)):
            raise ValueError(f"edm needs finite p_mean and p_std > 0, got {p_mean}, {p_std}")
        if sigma_data is not None and not sigma_data > 0:
            raise ValueError(f"edm sigma_data must be positive, got {sigma_data}")
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.sigma_data = None if sigma_data is None else float(sigma_data)

    def _params(self):
        return {"p_mean": self.p_mean, "p_std": self.p_std, "sigma_data": self.sigma_data}

    def loss(self, model, x, cond, generator):
        sd = (
            self.sigma_data
            if self.sigma_data is not None
            else float(getattr(model, "sigma_data", 0.5))
        )
        z = torch.randn(x.shape[0], generator=generator, device=x.device, dtype=torch.float64)
        log_sigma = self.p_mean + self.p_std * z
        t = model.schedule.t_from_logsnr(-2 * log_sigma).clamp(0, 1)
        noise = _randn(x.shape, generator, x)
        _, x_t = self._noisy(model, x, t, noise)
        c64 = model.schedule(t)
        sigma = c64.sigma / c64.alpha  # the level actually used (differs only where clamped)
        weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
        x_hat = model(x_t, t, cond).data
        return weight.to(x.dtype) * self._reduce((x_hat - x) ** 2)


# -- flow matching -----------------------------------------------------------------------------
class FlowMatchingLoss(Objective):
    """Conditional flow matching, Lipman et al. 2023, "Flow Matching for Generative Modeling":
    ``||v_hat(x_t, t) - (alpha'(t) x + sigma'(t) noise)||^2`` for any schedule, ``t`` from
    ``time_sampling`` (default ``U[0, 1]``; see :mod:`.timesampling`) clamped to
    ``[t_eps, 1 - t_eps]`` where prediction conversions are singular (``sigma = 0`` or
    ``alpha = 0``). ``coupling`` pairs data and noise first (:mod:`.couplings`; e.g.
    ``"minibatch_ot"``, Tong et al. 2023, Pooladian et al. 2023); only noise rows move, so
    ``cond`` stays with its ``x``. A custom coupling callable must keep ``x``'s row order.
    """

    name = "flow_matching"

    def __init__(
        self, time_sampling="uniform", coupling="independent", t_eps: float = 1e-5, **base
    ):
        super().__init__(**base)
        self.time_sampler = _timesampling.get(time_sampling)
        if isinstance(coupling, (str, dict, _couplings.Coupling)):
            coupling = _couplings.get(coupling)
        elif not callable(coupling):
            raise TypeError(
                f"coupling must be a name, a dict or a callable, got {type(coupling).__name__}"
            )
        self.coupling: Callable = coupling
        if not 0.0 <= t_eps < 0.5:
            raise ValueError(f"t_eps must be in [0, 0.5), got {t_eps}")
        self.t_eps = float(t_eps)

    def _params(self):
        if not hasattr(self.coupling, "config"):
            raise TypeError(
                "this objective's coupling is a plain callable and has no config(); "
                "use a coupling from tiltflow.objectives.couplings.get"
            )
        return {
            "time_sampling": self.time_sampler.config(),
            "coupling": self.coupling.config(),
            "t_eps": self.t_eps,
        }

    def sample_time(self, n, generator, x) -> torch.Tensor:
        t = self.time_sampler(n, generator=generator, device=x.device)
        return t.clamp(self.t_eps, 1 - self.t_eps)

    def target(self, c, x, noise):
        return c.d_alpha * x + c.d_sigma * noise

    def loss(self, model, x, cond, generator):
        t = self.sample_time(x.shape[0], generator, x)
        noise = _randn(x.shape, generator, x)
        x, noise = self.coupling(x, noise, generator)
        c, x_t = self._noisy(model, x, t, noise)
        v_hat = model(x_t, t, cond).velocity
        return self._reduce((v_hat - self.target(c, x, noise)) ** 2)


class RectifiedFlowLoss(FlowMatchingLoss):
    """Rectified flow, Liu, Gong & Liu 2022, "Flow Straight and Fast": on the linear path
    ``x_t = (1 - t) x + t noise`` regress the velocity onto ``noise - x``; time sampling
    ``"uniform"`` (Liu et al.), ``{"name": "logit_normal", "m": 0, "s": 1}`` or
    ``{"name": "mode", "s": 1.29}`` (Esser et al. 2024, SD3, sec. 3.1). Needs the
    :class:`~tiltflow.schedules.RectifiedFlow` schedule; supports ``coupling`` like
    :class:`FlowMatchingLoss`.
    """

    name = "rectified_flow"

    def _check_model(self, model):
        if not isinstance(model.schedule, RectifiedFlow):
            raise TypeError(
                f"rectified_flow needs the schedules.RectifiedFlow() schedule, got "
                f"{type(model.schedule).__name__}; use 'flow_matching' for other schedules"
            )

    def target(self, c, x, noise):
        return noise - x


# -- registry ----------------------------------------------------------------------------------
_OBJECTIVES = {
    cls.name: cls
    for cls in (DDPMLoss, DSMLoss, SSMLoss, EDMLoss, FlowMatchingLoss, RectifiedFlowLoss)
}
_ALIASES = {"dsm": "ncsn"}


def available() -> list[str]:
    return sorted(_OBJECTIVES)


def get(spec, **kwargs) -> Objective:
    """Build an objective from a name or a ``{"name": ..., **params}`` dict (see ``config()``);
    ``kwargs`` override the dict's entries. An :class:`Objective` is returned as is."""
    if isinstance(spec, Objective):
        if kwargs:
            raise TypeError(
                "objectives.get(objective, ...) takes no keyword arguments; pass a name or dict"
            )
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping):
        raise TypeError(f"objective must be a name or a dict, got {type(spec).__name__}")
    params = {**spec, **kwargs}
    name = params.pop("name", None)
    name = _ALIASES.get(name, name)
    if name not in _OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {available()}")
    try:
        return _OBJECTIVES[name](**params)
    except TypeError as err:
        if "unexpected keyword" in str(err):
            raise TypeError(f"objective {name!r}: {err}") from None
        raise
