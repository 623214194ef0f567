"""Consistency models (Song et al. 2023, "Consistency Models", Algorithms 2 and 3) and improved
consistency training (Song & Dhariwal 2023, "Improved Techniques for Training Consistency
Models").

A consistency model ``f(x_t, t)`` maps every point of a PF-ODE trajectory to the trajectory's
clean end. Here it is a student :class:`~tiltflow.Denoiser` whose data prediction is ``f``; the
boundary condition ``f(x, 0) = x`` holds exactly because every parameterization used (noise,
velocity, v, or EDM-preconditioned data: ``c_skip(0) = 1``) turns into ``x_hat = x_t`` at
``sigma = 0``.

Both methods discretize time with EDM's grid ``t_N = 1 > ... > t_0 = 0`` (Karras et al. 2022,
eq. 5, mapped through the model's schedule) and minimize
``lambda(t_i) d(f_theta(x_{t_{i+1}}, t_{i+1}), f_target(x_{t_i}, t_i))``:

- **Consistency distillation** (``consistency_distillation``): ``x_{t_i}`` is one step of any
  registered tiltflow solver on the teacher from ``x_{t_{i+1}} = alpha x + sigma z``; the target
  network is an EMA of the student with decay ``target_ema`` (mu); ``N`` fixed, ``i`` uniform.
- **Consistency training** (``consistency_training``, the improved recipe): ``x_{t_i}`` uses the
  same noise ``z`` (an unbiased one-sample estimate of the teacher's step); the target is the
  student itself without gradient (mu = 0); the pseudo-Huber distance
  ``sqrt(|a - b|^2 + c^2) - c`` with ``c = 0.00054 sqrt(dim)``; lognormal index sampling
  ``p(i) ~ erf((log s_{i+1} - P_mean) / (sqrt 2 P_std)) - erf((log s_i - ...)...)`` over the
  noise levels ``s = sigma / alpha``; weight ``1 / (s_{i+1} - s_i)``; and the step-count
  curriculum ``N(k) = min(s0 2^floor(k / K'), s1)``, ``K' = floor(K / (log2(s1 / s0) + 1))``.

- **Latent consistency distillation** (``latent_consistency_distillation``, Luo et al. 2023,
  "Latent Consistency Models", Algorithm 1 on tiltflow's data space): consistency distillation
  whose teacher step is the classifier-free guided one, ``(1 + w) Psi(x, c) - w Psi(x, null)``
  with ``w ~ U[w_min, w_max]`` per example, and a student that takes ``w`` as an input
  (:class:`~.student.GuidanceEmbedded`), so one student samples at any guidance scale.
- **Phased consistency distillation** (``phased_consistency_distillation``, Wang et al. 2024,
  "Phased Consistency Models", Algorithm 1 without its optional adversarial term): the time
  axis splits into ``phases`` sub-trajectories at edge times ``s_m``; within a phase the
  consistency function is the DDIM jump ``alpha_s x_hat + sigma_s eps_hat`` to its lower
  edge (the identity at the edge), trained as consistency distillation; the student samples
  with DDIM on the edges (``nfe = phases``, deterministic).
- **Easy consistency tuning** (``easy_consistency_tuning``, Geng et al. 2024, "Consistency
  Models Made Easy"): consistency training started from the teacher's weights, with
  continuous pairs ``(t, r)`` whose gap shrinks in stages towards ``dt -> 0``
  (:meth:`ConsistencyLoss._ect_pairs`).
- **Stable consistency tuning** (``stable_consistency_tuning``, Wang et al. 2024): ECT whose
  one-sample target is replaced by the variance-reduced estimate from the whole batch
  (:func:`batch_posterior_mean`, the self-normalized importance-weighted score identity).

Students sample with multistep consistency sampling (:mod:`.student`).
"""

from __future__ import annotations

import math

import torch

from ..errors import UserError
from ..solvers.grids import _level, karras
from ..train import ema_update
from .base import fit, frozen, make_student, noisy, rand, randn_like, register, teacher_steps
from .student import Student

__all__ = ["ConsistencyLoss", "pseudo_huber", "ict_scales", "lognormal_index_probs"]

def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """``sqrt(|a - b|^2 + c^2) - c`` per example; ``c = 0.00054 sqrt(dim)`` by default (Song &
    Dhariwal 2023, sec. 3.3)."""
    diff = (a - b).reshape(a.shape[0], -1)
    c = 0.00054 * math.sqrt(diff.shape[1]) if c is None else c
    return torch.sqrt((diff**2).sum(dim=1) + c * c) - c


def ict_scales(step: int, total: int, s0: int = 10, s1: int = 1280) -> int:
    """The improved-CT curriculum: steps of the time grid at training step ``step`` of
    ``total``: ``min(s0 * 2^floor(step / K'), s1)``."""
    k_prime = max(total // (int(math.log2(s1 / s0)) + 1), 1)
    return min(s0 * 2 ** (step // k_prime), s1)


def lognormal_index_probs(levels: torch.Tensor, p_mean: float, p_std: float) -> torch.Tensor:
    """Probabilities of the intervals ``(levels[i], levels[i + 1])`` (decreasing noise levels)
    under a lognormal noise-level density (Song & Dhariwal 2023, sec. 3.5)."""
    log_levels = torch.log(levels.clamp(min=1e-30))
    cdf = torch.erf((log_levels - p_mean) / (math.sqrt(2) * p_std))
    probs = cdf[:-1] - cdf[1:]
    return probs / probs.sum()


class ConsistencyLoss:
    """The consistency objective of both methods (module docstring). ``teacher=None`` is
    consistency training. Keeps its step counter and EMA target between steps
    (``state_dict``), so a resumed run continues the curriculum and the target exactly."""

    def __init__(self, target, *, teacher=None, solver: str = "heun", scales: int = 18,
                 curriculum: tuple[int, int] | None = None, total_steps: int = 1,
                 target_ema: float = 0.0, distance: str = "l2", huber_c: float | None = None,
                 index_sampling: str = "uniform", weighting: str = "uniform",
                 p_mean: float = -1.1, p_std: float = 2.0, level_min: float = 2e-3,
                 level_max: float = 80.0, pairs: str = "grid", estimate: str = "sample",
                 phases: int = 1, guidance: tuple[float, float] | None = None):
        if distance not in ("l2", "pseudo_huber"):
            raise ValueError(f"distance must be 'l2' or 'pseudo_huber', got {distance!r}")
        if index_sampling not in ("uniform", "lognormal"):
            raise ValueError(f"index_sampling must be 'uniform' or 'lognormal', got "
                             f"{index_sampling!r}")
        if weighting not in ("uniform", "inverse_gap"):
            raise ValueError(f"weighting must be 'uniform' or 'inverse_gap', got {weighting!r}")
        if pairs not in ("grid", "ect"):
            raise ValueError(f"pairs must be 'grid' or 'ect', got {pairs!r}")
        if estimate not in ("sample", "batch"):
            raise ValueError(f"estimate must be 'sample' or 'batch', got {estimate!r}")
        if not 0.0 <= target_ema < 1.0:
            raise ValueError(f"target_ema must be in [0, 1), got {target_ema}")
        self.target, self.teacher, self.solver = target, teacher, solver
        self.scales, self.curriculum, self.total = int(scales), curriculum, int(total_steps)
        self.mu, self.distance, self.huber_c = float(target_ema), distance, huber_c
        self.index_sampling, self.weighting = index_sampling, weighting
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.level_min, self.level_max = float(level_min), float(level_max)
        self.pairs, self.estimate, self.phases = pairs, estimate, int(phases)
        self.guidance = guidance
        if self.phases > 1 and (self.scales % self.phases or pairs != "grid" or curriculum):
            raise ValueError(f"phased consistency needs a fixed grid whose steps ({scales}) "
                             f"are a multiple of the phases ({phases})")
        self.step = 0

    def grid(self, schedule) -> torch.Tensor:
        """This step's time grid (float64): EDM's noise levels from ``level_max`` (EDM's
        ``sigma_max = 80``, or the schedule's own top level if lower) down to ``level_min``,
        then t = 0."""
        n = ict_scales(self.step, self.total, *self.curriculum) if self.curriculum else self.scales
        if self.phases > 1:  # PCM: uniform steps, so that the phase edges fall on the grid
            return torch.linspace(top_time(schedule, self.level_max), 0.0, n + 1,
                                  dtype=torch.float64)
        return karras(n, schedule, level_min=self.level_min,
                      level_max=min(self.level_max, _level(schedule, 1.0)))

    def edges(self, schedule) -> torch.Tensor:
        """The phase edges ``s_M > ... > s_0 = 0`` (every ``scales / phases``-th grid time)."""
        return self.grid(schedule)[:: self.scales // self.phases]

    def _indices(self, levels: torch.Tensor, n: int, generator) -> torch.Tensor:
        if self.index_sampling == "uniform":
            return torch.randint(0, len(levels) - 1, (n,), generator=_cpu(generator))
        probs = lognormal_index_probs(levels, self.p_mean, self.p_std)
        return torch.multinomial(probs, n, replacement=True, generator=_cpu(generator))

    def _grid_pairs(self, schedule, n: int, generator):
        """Adjacent times ``(t_{i+1}, t_i)`` of this step's grid, their level gaps, and ``i``
        with the grid (for the teacher's step)."""
        grid = self.grid(schedule)
        c_grid = schedule(grid)
        levels = c_grid.sigma / c_grid.alpha
        i = self._indices(levels, n, generator)
        return grid[i], grid[i + 1], levels[i] - levels[i + 1], (i, grid)

    def _ect_pairs(self, schedule, n: int, generator):
        """ECT's continuous pairs (Geng et al. 2024, sec. 3.2): noise level ``s_t`` lognormal
        in ``[level_min, level_max]``, ``s_r = s_t (1 - n(s_t) / q^a)`` with ``n(s) = 1 + 8
        sigmoid(-s)``, ``q = 2`` and ``a`` growing by one every eighth of the run, so the pair
        shrinks towards the continuous-time limit; ``s_r`` below ``level_min`` becomes t = 0."""
        z = torch.randn(n, generator=_cpu(generator), dtype=torch.float64)
        hi = min(self.level_max, _level(schedule, 1.0))
        s_t = torch.exp(self.p_mean + self.p_std * z).clamp(self.level_min, hi)
        stage = self.step // max(self.total // 8, 1)
        s_r = s_t * (1 - (1 + 8 * torch.sigmoid(-s_t)) / 2.0**stage).clamp(min=0)
        t_of = schedule.t_from_logsnr
        t_hi = t_of(-2 * torch.log(s_t)).clamp(0, 1)
        t_lo = torch.where(s_r < self.level_min, torch.zeros_like(s_r),
                           t_of(-2 * torch.log(s_r.clamp(min=1e-30))).clamp(0, 1))
        s_r = torch.where(s_r < self.level_min, torch.zeros_like(s_r), s_r)
        return t_hi, t_lo, s_t - s_r, None

    def __call__(self, model, batch, generator=None) -> torch.Tensor:
        x, cond = batch["x"], batch.get("cond")
        if self.mu > 0:  # theta^- <- mu theta^- + (1 - mu) theta, with theta after the last update
            self.target.to(x.device)
            ema_update(list(self.target.net.parameters()), list(model.net.parameters()), self.mu)
        make_pairs = self._grid_pairs if self.pairs == "grid" else self._ect_pairs
        t_hi, t_lo, gap, where = make_pairs(model.schedule, x.shape[0], generator)
        self.step += 1
        t_hi, t_lo = t_hi.to(x.device), t_lo.to(x.device)
        z = randn_like(x, generator)
        x_hi, c_hi = noisy(model, x, z, t_hi)
        if self.teacher is not None and self.guidance is not None:
            x_lo = self._guided_teacher_step(model, x_hi, where, cond, generator)
        elif self.teacher is not None:
            i, grid = where
            x_lo = teacher_steps(self.teacher, x_hi, i, torch.stack([grid[:-1], grid[1:]], 1),
                                 self.solver, cond)
        elif self.estimate == "batch":
            c_lo = model.schedule(t_lo).expand(x)
            x_hat = batch_posterior_mean(x_hi, c_hi, x, cond)
            x_lo = c_lo.alpha * x_hat + c_lo.sigma * (x_hi - c_hi.alpha * x_hat) / c_hi.sigma
        else:
            x_lo, _ = noisy(model, x, z, t_lo)
        s = torch.zeros_like(t_lo)
        if self.phases > 1:  # the lower edge of each pair's phase
            i, grid = where
            per_phase = self.scales // self.phases
            s = grid[(i // per_phase + 1) * per_phase].to(x.device)
            online = _consistency_fn(model, x_hi, t_hi, cond, s)
        else:
            online = model(x_hi, t_hi, cond).data
        with torch.no_grad():
            target = _consistency_fn(self.target if self.mu > 0 else model, x_lo, t_lo, cond, s)
        if self.distance == "l2":
            loss = ((online - target) ** 2).reshape(x.shape[0], -1).mean(dim=1)
        else:
            loss = pseudo_huber(online, target, self.huber_c)
        if self.weighting == "inverse_gap":
            loss = loss / gap.to(loss)
        return loss

    def _guided_teacher_step(self, model, x_hi, where, cond, generator):
        """LCM's CFG-augmented teacher step ``(1 + w) Psi(c) - w Psi(null)`` with ``w ~
        U[w_min, w_max]`` per example; the student and its target read the same ``w``."""
        if cond is None:
            raise ValueError("latent consistency distillation needs labelled data (cond) and a "
                             "class-conditional teacher")
        i, grid = where
        steps = torch.stack([grid[:-1], grid[1:]], 1)
        lo, hi = self.guidance
        w = lo + (hi - lo) * rand(x_hi.shape[0], generator, x_hi.device)
        model.at(w)
        if self.mu > 0:
            self.target.at(w)
        with_c = teacher_steps(self.teacher, x_hi, i, steps, self.solver, cond)
        without = teacher_steps(self.teacher, x_hi, i, steps, self.solver, torch.full_like(cond, -1))
        w = w.to(x_hi.dtype).reshape((-1,) + (1,) * (x_hi.dim() - 1))
        return (1 + w) * with_c - w * without

    def config(self) -> dict:
        return {"name": "consistency", "distillation": self.teacher is not None,
                "solver": self.solver, "scales": self.scales, "curriculum": self.curriculum,
                "target_ema": self.mu, "distance": self.distance,
                "index_sampling": self.index_sampling, "weighting": self.weighting}

    def state_dict(self) -> dict:
        state = {"step": torch.tensor(self.step)}
        if self.mu > 0:
            state.update({f"target.{k}": v for k, v in self.target.net.state_dict().items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        if self.mu > 0:
            self.target.net.load_state_dict(
                {k[len("target."):]: v for k, v in state.items() if k.startswith("target.")})


def batch_posterior_mean(x_t, c, x, cond=None) -> torch.Tensor:
    """``E[x | x_t]`` under the empirical distribution of the batch ``x`` (of the same class when
    labelled): self-normalized weights ``N(x_t; alpha x_j, sigma^2)``, the variance-reduced
    score estimate of stable consistency tuning (Wang et al. 2024, "Stable Consistency
    Tuning", sec. 4.2)."""
    diff = x_t.flatten(1)[:, None, :] - c.alpha.reshape(-1, 1, 1) * x.flatten(1)[None]
    logits = -(diff**2).sum(-1) / (2 * c.sigma.reshape(-1, 1) ** 2)
    if cond is not None:
        logits = logits.masked_fill(cond[:, None] != cond[None, :], float("-inf"))
    weights = torch.softmax(logits, dim=1)
    return (weights @ x.flatten(1)).reshape(x.shape)


def _consistency_fn(model, x_t, t, cond, s=None):
    """``f(x_t, t)``: the model's data prediction, and the boundary value ``x_t`` itself at
    t = 0. With phase edges ``s`` (PCM) the DDIM jump to ``s``: ``alpha_s x_hat + sigma_s
    eps_hat``, and ``x_t`` where ``t = s``. The whole batch is evaluated (rows at their
    boundary at a harmless time, EDM preconditioning's ``log sigma`` being undefined at t = 0)
    so per-example inputs such as LCM's guidance scale stay aligned."""
    s = torch.zeros_like(t) if s is None else s
    inside = t > s
    pred = model(x_t, torch.where(inside, t, torch.full_like(t, 0.5)), cond)
    if bool((s > 0).any()):
        c_s = model.schedule(s).expand(x_t)
        value = c_s.alpha * pred.x_hat + c_s.sigma * pred.eps_hat
    else:
        value = pred.data
    return torch.where(inside.reshape((-1,) + (1,) * (x_t.dim() - 1)), value, x_t)


def top_time(schedule, level_max: float) -> float:
    """The time at noise level ``min(level_max, the schedule's top level)``."""
    level = min(level_max, _level(schedule, 1.0))
    return float(schedule.t_from_logsnr(torch.tensor(-2 * math.log(level))).clamp(max=1.0))


def _cpu(generator):
    # Indices are drawn on the CPU (they index the CPU grid); a device generator's draws
    # would need a copy back.
    return generator if generator is None or generator.device.type == "cpu" else None


def consistency_student(job, guided: bool = False) -> torch.nn.Module:
    """The student: the teacher's parameterization when it satisfies the boundary condition,
    else EDM-preconditioned data prediction (whose ``c_skip(0) = 1`` does). ``guided``: with a
    guidance-scale input (LCM)."""
    t = job.teacher
    if t.prediction == "data" and not t.precondition:
        return make_student(job, prediction="data", precondition=True, guided=guided)
    return make_student(job, guided=guided)


def _student(job, model) -> Student:
    cfg = job.config
    t_max = top_time(model.schedule, cfg["level_max"])
    return Student(model, job.method.name, "consistency", (1, cfg["max_nfe"]),
                   {"times": cfg["sample_times"], "t_max": t_max})


def _distillation_loss(job, model, **extra) -> ConsistencyLoss:
    """The consistency-distillation objective of CD, PCM and LCM from the job's config, with an
    EMA target starting as the student."""
    cfg = job.config
    return ConsistencyLoss(frozen(model), teacher=job.teacher, solver=cfg["solver"],
                           scales=cfg["scales"], target_ema=cfg["target_ema"],
                           distance=cfg["distance"], huber_c=cfg["huber_c"],
                           level_min=cfg["level_min"], level_max=cfg["level_max"],
                           total_steps=cfg["steps"], **extra)


_SHARED = {"max_nfe": 8, "sample_times": None, "level_min": 2e-3, "level_max": 80.0,
           "huber_c": None}


@register("consistency_distillation", defaults={
    **_SHARED, "scales": 18, "solver": "heun", "target_ema": 0.95, "distance": "l2",
    "lr": 1e-4})
def consistency_distillation(job) -> Student:
    """Consistency distillation: any tiltflow solver as the teacher's step, an EMA target."""
    model = consistency_student(job)
    return fit(job, _student(job, model), _distillation_loss(job, model), job.teacher_data())


@register("consistency_training", needs_data=True, defaults={
    **_SHARED, "s0": 10, "s1": 1280, "p_mean": -1.1, "p_std": 2.0, "init": "fresh",
    "lr": 1e-4})
def consistency_training(job) -> Student:
    """Improved consistency training: pseudo-Huber, lognormal times, step-count curriculum."""
    cfg = job.config
    model = consistency_student(job)
    loss = ConsistencyLoss(None, curriculum=(cfg["s0"], cfg["s1"]), total_steps=cfg["steps"],
                           distance="pseudo_huber", huber_c=cfg["huber_c"],
                           index_sampling="lognormal", weighting="inverse_gap",
                           p_mean=cfg["p_mean"], p_std=cfg["p_std"], level_min=cfg["level_min"],
                           level_max=cfg["level_max"])
    return fit(job, _student(job, model), loss, job.teacher_data())


def _tuning(job, estimate: str) -> Student:
    cfg = job.config
    model = consistency_student(job)
    loss = ConsistencyLoss(None, total_steps=cfg["steps"], distance="pseudo_huber",
                           huber_c=cfg["huber_c"], weighting="inverse_gap", pairs="ect",
                           estimate=estimate, p_mean=cfg["p_mean"], p_std=cfg["p_std"],
                           level_min=cfg["level_min"], level_max=cfg["level_max"])
    return fit(job, _student(job, model), loss, job.teacher_data())


_TUNING = {**_SHARED, "p_mean": -1.1, "p_std": 2.0, "lr": 1e-4}


@register("easy_consistency_tuning", needs_data=True, defaults=dict(_TUNING))
def easy_consistency_tuning(job) -> Student:
    """Easy consistency tuning: CT from the teacher's weights, pairs shrinking to dt -> 0."""
    return _tuning(job, "sample")


@register("stable_consistency_tuning", needs_data=True, defaults=dict(_TUNING))
def stable_consistency_tuning(job) -> Student:
    """Stable consistency tuning: ECT with the batch's variance-reduced score target."""
    return _tuning(job, "batch")


@register("phased_consistency_distillation", defaults={
    **_SHARED, "phases": 4, "scales": 48, "solver": "heun", "target_ema": 0.95,
    "distance": "l2", "lr": 1e-4})
def phased_consistency_distillation(job) -> Student:
    """Phased consistency distillation (PCM): one consistency map per phase, DDIM across."""
    cfg = job.config
    model = consistency_student(job)
    loss = _distillation_loss(job, model, phases=cfg["phases"])
    edges = loss.edges(model.schedule).tolist()
    student = Student(model, job.method.name, "solver", (cfg["phases"], cfg["phases"]),
                      {"solver": "ddim", "grid": edges})
    return fit(job, student, loss, job.teacher_data())


@register("latent_consistency_distillation", defaults={
    **_SHARED, "scales": 18, "solver": "ddim", "target_ema": 0.95, "distance": "l2",
    "w_min": 0.0, "w_max": 4.0, "guidance": 2.0, "lr": 1e-4})
def latent_consistency_distillation(job) -> Student:
    """Latent-consistency-style guided distillation: CFG teacher ODE, w-conditioned student."""
    cfg = job.config
    if not job.num_classes:
        raise UserError("latent_consistency_distillation needs a class-conditional teacher and "
                        "labels (give data with cond, or config num_classes)")
    model = consistency_student(job, guided=True)
    loss = _distillation_loss(job, model, guidance=(cfg["w_min"], cfg["w_max"]))
    student = _student(job, model)
    student.options["guidance"] = cfg["guidance"]
    return fit(job, student, loss, job.teacher_data())
