"""Score distillation into a one-step generator: distribution matching distillation (DMD),
variational score distillation (VSD, as in SwiftBrush) and score identity distillation (SiD).

The generator is a student :class:`~tiltflow.Denoiser` read at ``t_gen`` (``t = 1``): ``x_g =
G(z) = student(sigma(1) z, 1).data``, so it starts from the teacher's weights and samples
with the one-step consistency sampler. Next to it a *fake score* network (a copy of the
teacher; for a teacher without a network, a fresh one warmed up for ``fake_warmup`` steps)
learns the score of the generator's own samples by denoising (``x_t = alpha x_g + sigma eps``,
the squared error of its own prediction kind on ``x_g`` detached), ``fake_steps`` updates per
generator update with its own AdamW (the two time-scale rule of DMD2, Yin et al. 2024b). The
generator is then pushed along the difference of the real (teacher) and fake scores at
``x_t``, ``t ~ U[t_min, t_max]``:

- **DMD** (Yin et al. 2024, "One-step Diffusion with Distribution Matching Distillation",
  eq. 7-8): gradient ``(x_hat_fake - x_hat_real) / mean|x_g - x_hat_real|`` on ``x_g``, plus
  the regression loss ``regression * |G(z_ref) - y_ref|^2`` on the teacher's ODE pairs (the
  paper uses LPIPS on images).
- **VSD / SwiftBrush** (Wang et al. 2023, "ProlificDreamer", eq. 8; Nguyen & Tran 2024,
  "SwiftBrush", eq. 6): gradient ``w(t) (eps_hat_real - eps_hat_fake)`` with ``w = 1``.
- **SiD** (Zhou et al. 2024, "Score identity Distillation", eq. 23 with ``alpha = 1.2``):
  loss ``w [(1 - alpha) |d|^2 + d . (x_hat_fake - x_g)]``, ``d = x_hat_real - x_hat_fake``,
  ``w = 1 / mean|x_g - x_hat_real|``, differentiated through ``x_t`` into both scores.

The fake network and its optimizer are the objective's state (saved in every checkpoint).
"""

from __future__ import annotations

import torch

from ..predictions import from_hub
from .base import fit, make_student, per_example, rand, randn_like, register, trainable
from .reflow import generate_pairs
from .student import Student

__all__ = ["ScoreDistillationLoss"]

KINDS = ("dmd", "vsd", "sid")


class ScoreDistillationLoss:
    """The generator's loss of one of :data:`KINDS` (module docstring); trains the fake score
    on each call."""

    def __init__(self, kind: str, teacher, fake, *, fake_lr: float = 1e-4, fake_steps: int = 5,
                 fake_warmup: int = 0,
                 t_min: float = 0.02, t_max: float = 0.98, t_gen: float = 1.0,
                 regression: float = 0.0, pairs: dict | None = None, sid_alpha: float = 1.2):
        if kind not in KINDS:
            raise ValueError(f"score distillation kind must be one of {KINDS}, got {kind!r}")
        if not 0.0 <= t_min < t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got {t_min}, {t_max}")
        self.kind, self.teacher, self.fake = kind, teacher, fake
        self.fake_lr, self.fake_steps = float(fake_lr), int(fake_steps)
        self.fake_warmup, self.calls = int(fake_warmup), 0
        self.t_min, self.t_max, self.t_gen = float(t_min), float(t_max), float(t_gen)
        self.regression, self.pairs, self.sid_alpha = float(regression), pairs, float(sid_alpha)
        self._opt, self._pending = None, None

    # -- pieces --------------------------------------------------------------------------------
    def generate(self, model, z, cond):
        """``G(z)``: the student's data prediction at ``t_gen`` from ``sigma(t_gen) z``."""
        t = torch.full((z.shape[0],), self.t_gen, dtype=torch.float64, device=z.device)
        sigma = model.schedule(t).expand(z).sigma
        return model(sigma * z, t, cond).data

    def _times(self, n, generator, device):
        return self.t_min + (self.t_max - self.t_min) * rand(n, generator, device)

    def _optimizer(self, device):
        if self._opt is None:
            self.fake.to(device).train().requires_grad_(True)
            self._opt = torch.optim.AdamW(self.fake.net.parameters(), lr=self.fake_lr,
                                          weight_decay=0.0)
            if self._pending is not None:
                self.fake.net.load_state_dict(self._pending["fake"])
                self._opt.load_state_dict(self._pending["optimizer"])
                self._pending = None
        return self._opt

    def train_fake(self, x_g, cond, generator) -> None:
        """``fake_steps`` denoising updates of the fake score on the generator's samples
        (``fake_warmup`` more before the first generator update)."""
        opt = self._optimizer(x_g.device)
        for _ in range(self.fake_steps + (self.fake_warmup if self.calls == 0 else 0)):
            t = self._times(x_g.shape[0], generator, x_g.device)
            eps = randn_like(x_g, generator)
            c = self.fake.schedule(t).expand(x_g)
            pred = self.fake(c.alpha * x_g + c.sigma * eps, t, cond)
            loss = per_example((pred.raw - from_hub(pred.kind, x_g, eps, c)) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def generator_loss(self, x_g, cond, generator) -> torch.Tensor:
        t = self._times(x_g.shape[0], generator, x_g.device)
        eps = randn_like(x_g, generator)
        c = self.teacher.schedule(t).expand(x_g)
        x_t = c.alpha * x_g + c.sigma * eps
        self.fake.requires_grad_(False)
        try:
            if self.kind == "sid":  # through x_t into both scores
                real, fake = self.teacher(x_t, t, cond), self.fake(x_t, t, cond)
                d = real.data - fake.data
                w = 1 / _mean_abs(x_g - real.data).detach().clamp(min=1e-8)
                value = (1 - self.sid_alpha) * (d * d) + d * (fake.data - x_g)
                return w * value.reshape(x_g.shape[0], -1).sum(dim=1)
            with torch.no_grad():
                x_t = x_t.detach()
                real, fake = self.teacher(x_t, t, cond), self.fake(x_t, t, cond)
                if self.kind == "dmd":
                    grad = (fake.data - real.data) / _mean_abs(x_g - real.data).clamp(min=1e-8)
                else:
                    grad = real.noise - fake.noise
            # 0.5 |x_g - sg(x_g - grad)|^2 has gradient `grad` with respect to x_g
            return 0.5 * ((x_g - (x_g - grad).detach()) ** 2).reshape(x_g.shape[0], -1).sum(1)
        finally:
            self.fake.requires_grad_(True)

    def __call__(self, model, batch, generator=None) -> torch.Tensor:
        x, cond = batch["x"], batch.get("cond")
        x_g = self.generate(model, randn_like(x, generator), cond)
        self.train_fake(x_g.detach(), cond, generator)
        self.calls += 1
        loss = self.generator_loss(x_g, cond, generator)
        if self.regression > 0 and self.pairs is not None:
            idx = (rand(x.shape[0], generator, "cpu") * len(self.pairs["x"])).long()
            z_ref, y_ref = (p.to(x) for p in self.pairs["x"][idx].unbind(1))
            c_ref = self.pairs["cond"][idx].to(x.device) if self.pairs["cond"] is not None \
                else None
            loss = loss + self.regression * per_example(
                (self.generate(model, z_ref, c_ref) - y_ref) ** 2)
        return loss

    def config(self) -> dict:
        return {"name": f"score_distillation_{self.kind}", "fake_lr": self.fake_lr,
                "fake_steps": self.fake_steps, "t_min": self.t_min, "t_max": self.t_max,
                "regression": self.regression}

    def state_dict(self) -> dict:
        if self._opt is None and self._pending is not None:
            return self._pending
        opt = self._optimizer(next(self.fake.net.parameters()).device)
        return {"fake": self.fake.net.state_dict(), "optimizer": opt.state_dict(),
                "calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self._opt, self._pending, self.calls = None, state, int(state["calls"])


def _mean_abs(a: torch.Tensor) -> torch.Tensor:
    return a.abs().reshape(a.shape[0], -1).mean(dim=1).reshape((-1,) + (1,) * (a.dim() - 1))


# fake_lr None: the generator's lr. fake_warmup: denoising steps of the fake score before the
# first generator step, where the fake cannot start as a copy of the teacher (no network).
_SHARED = {"fake_lr": None, "fake_steps": 5, "fake_warmup": None, "t_min": 0.02, "t_max": 0.98,
           "lr": 1e-4}


def _run(job, kind: str, regression: float = 0.0) -> Student:
    cfg = job.config
    model = make_student(job)
    copied = isinstance(job.teacher.net, torch.nn.Module)
    fake = trainable(job.teacher) if copied else trainable(make_student(job))
    warmup = cfg["fake_warmup"] if cfg["fake_warmup"] is not None else (0 if copied else 200)
    pairs = None
    if regression > 0:
        pairs = generate_pairs(job.teacher, job.shape, cfg["regression_pairs"], cfg,
                               job.out_dir / "pairs", job.num_classes)
    loss = ScoreDistillationLoss(kind, job.teacher, fake, fake_lr=cfg["fake_lr"] or cfg["lr"],
                                 fake_steps=cfg["fake_steps"], fake_warmup=warmup,
                                 t_min=cfg["t_min"],
                                 t_max=cfg["t_max"], regression=regression, pairs=pairs)
    student = Student(model, job.method.name, "consistency", (1, 1), {"t_max": 1.0})
    return fit(job, student, loss, job.teacher_data())


@register("dmd", defaults={**_SHARED, "regression": 0.25, "regression_pairs": 2048})
def dmd(job) -> Student:
    """Distribution matching distillation: fake-score gradient + regression on ODE pairs."""
    return _run(job, "dmd", job.config["regression"])


@register("vsd", defaults=dict(_SHARED))
def vsd(job) -> Student:
    """Variational score distillation (SwiftBrush): teacher minus fake noise prediction."""
    return _run(job, "vsd")


@register("sid", defaults=dict(_SHARED))
def sid(job) -> Student:
    """Score identity distillation (alpha = 1.2), through both scores."""
    return _run(job, "sid")
