"""Few-step models trained from data as flow maps: shortcut models and MeanFlow.

Both learn the average velocity ``u(x_t, t, s)`` of a :class:`~.student.FlowMap` (``x_s = x_t +
(s - t) u``) together with the flow-matching velocity at step size 0, and sample by jumping
along ``u`` (the ``flow_map`` sampler). Time runs from ``t = 1`` (noise) to 0 (data); the
conditional velocity is ``alpha'(t) x + sigma'(t) z`` (``z - x`` for rectified flow).

- **Shortcut models** (Frans et al. 2024, "One Step Diffusion via Shortcut Models", sec. 3):
  a fraction ``1 - bootstrap`` of each batch gets the flow-matching loss at ``d = 0``; the rest
  gets the self-consistency target ``u(x_t, t, t - 2d) = (u(x_t, t, t - d) + u(x', t - d,
  t - 2d)) / 2``, ``x' = x_t - d u(x_t, t, t - d)``, without gradient, for ``d = 2^-m`` down to
  ``1 / max_steps`` and start times on multiples of ``d``. With ``guidance = w > 0`` the
  self-consistency targets are formed from the classifier-free guided velocity
  ``u_c + w (u_c - u_u)`` (the paper's way to fix guidance at training time; labels are
  dropped with ``label_dropout`` so the unconditional branch is learned).
- **MeanFlow** (Geng et al. 2025, "Mean Flows for One-step Generative Modeling", eq. 10):
  the identity ``u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t)`` gives the target
  ``u_tgt = v - (t - r)(v . grad_z u + d_t u)``, one Jacobian-vector product with tangent
  ``(v, 0, 1)`` (``torch.func.jvp``; a central finite difference where forward-mode AD is not
  supported), stop-gradient; ``t, r`` logit-normal, ``r = t`` for a fraction
  ``1 - ratio`` of the batch; adaptive weight ``1 / (|Delta|^2 + c)^p`` (their sec. 4.3).
"""

from __future__ import annotations

import logging
import math

import torch

from ..objectives import drop_labels, timesampling
from .base import fit, make_student, noisy, per_example, rand, randn_like, register
from .student import Student

__all__ = ["ShortcutLoss", "MeanFlowLoss"]

log = logging.getLogger("tiltflow.fewstep")


def _velocity_target(c, x, z):
    return c.d_alpha * x + c.d_sigma * z


class ShortcutLoss:
    """Shortcut models' flow-matching + self-consistency objective (module docstring)."""

    def __init__(self, max_steps: int = 128, bootstrap: float = 0.25, guidance: float = 0.0,
                 label_dropout: float = 0.0):
        if max_steps < 2 or max_steps & (max_steps - 1):
            raise ValueError(f"max_steps must be a power of two >= 2, got {max_steps}")
        if not 0.0 <= bootstrap < 1.0:
            raise ValueError(f"bootstrap must be in [0, 1), got {bootstrap}")
        self.levels = int(math.log2(max_steps))
        self.bootstrap, self.guidance = float(bootstrap), float(guidance)
        self.label_dropout = float(label_dropout)

    def _guided(self, model, x, t, s, cond):
        u = model.average_velocity(x, t, s, cond)
        if self.guidance == 0 or cond is None:
            return u
        uncond = model.average_velocity(x, t, s, torch.full_like(cond, -1))
        return u + self.guidance * (u - uncond)

    def bootstrap_target(self, model, x_t, t, d, cond) -> torch.Tensor:
        """``(u(x_t, t, t - d) + u(x', t - d, t - 2d)) / 2`` with ``x' = x_t - d u(x_t, t,
        t - d)``, without gradient: the average velocity of two half steps."""
        with torch.no_grad():
            u1 = self._guided(model, x_t, t, t - d, cond)
            mid = x_t - d.to(x_t.dtype).reshape((-1,) + (1,) * (x_t.dim() - 1)) * u1
            u2 = self._guided(model, mid, t - d, t - 2 * d, cond)
        return (u1 + u2) / 2

    def __call__(self, model, batch, generator=None) -> torch.Tensor:
        x, cond = batch["x"], batch.get("cond")
        n = x.shape[0]
        k = int(round(self.bootstrap * n))
        dev = x.device
        # step sizes d = 2^-m (m = 1 .. levels) and start times t = 2d + q d on the d-grid
        m = 1 + (rand(k, generator, dev) * self.levels).long().clamp(max=self.levels - 1)
        d = 2.0 ** (-m.double())
        q = (rand(k, generator, dev) * (1 / d - 1)).floor()
        t_sc = 2 * d + q * d
        t_fm = rand(n - k, generator, dev)
        t = torch.cat([t_fm, t_sc])
        z = randn_like(x, generator)
        x_t, c = noisy(model, x, z, t)
        fm_cond = drop_labels(cond, self.label_dropout, generator)
        target = torch.empty_like(x)
        target[: n - k] = _velocity_target(c, x, z)[: n - k]
        s = t.clone()
        if k:
            cb = cond[n - k:] if cond is not None else None
            target[n - k:] = self.bootstrap_target(model, x_t[n - k:], t_sc, d, cb)
            s[n - k:] = t_sc - 2 * d
        u_cond = fm_cond if cond is None else torch.cat([fm_cond[: n - k], cond[n - k:]])
        u = model.average_velocity(x_t, t, s, u_cond)
        return per_example((u - target) ** 2)

    def config(self) -> dict:
        return {"name": "shortcut", "max_steps": 2**self.levels, "bootstrap": self.bootstrap,
                "guidance": self.guidance, "label_dropout": self.label_dropout}


class MeanFlowLoss:
    """MeanFlow's objective (module docstring). ``jvp``: "func" (``torch.func.jvp``),
    "finite_difference", or "auto" (the first, falling back to the second)."""

    def __init__(self, ratio: float = 0.25, time_sampling=None, p: float = 1.0,
                 c: float = 1e-3, jvp: str = "auto", fd_step: float = 1e-3):
        if jvp not in ("auto", "func", "finite_difference"):
            raise ValueError(f"jvp must be 'auto', 'func' or 'finite_difference', got {jvp!r}")
        self.ratio, self.p, self.c = float(ratio), float(p), float(c)
        self.times = timesampling.get(time_sampling or {"name": "logit_normal", "m": -0.4,
                                                         "s": 1.0})
        self.jvp, self.fd_step = jvp, float(fd_step)

    def target(self, model, z_t, t, r, v, cond):
        """``(u, u_tgt)``: the model's ``u(z_t, t, r)`` (with gradient) and the stop-gradient
        target ``v - (t - r)(v . grad_z u + d_t u)`` for the velocity ``v``."""
        u, dudt = self._u_and_dudt(model, z_t, t, r, v, cond)
        gap = (t - r).to(z_t.dtype).reshape((-1,) + (1,) * (z_t.dim() - 1))
        return u, (v - gap * dudt).detach()

    def _u_and_dudt(self, model, z_t, t, r, v, cond):
        """``u(z_t, t, r)`` (with gradient) and its total derivative along ``(v, dt = 1)``."""
        def u_of(z, t_):
            return model.average_velocity(z, t_, r, cond)

        if self.jvp != "finite_difference":
            try:
                # The tangent needs no gradient: taken without one, the backward pass holds only
                # the plain forward's activations (one JVP + one forward, not a JVP with grad)
                with torch.no_grad():
                    _, dudt = torch.func.jvp(u_of, (z_t, t), (v, torch.ones_like(t)))
                return u_of(z_t, t), dudt
            except (RuntimeError, NotImplementedError):
                if self.jvp == "func":
                    raise
                # a designed fallback, not a stub: this network has no forward-mode rule
                log.warning("note: torch.func.jvp is not supported by this network; MeanFlow "
                            "uses central finite differences from now on")
                self.jvp = "finite_difference"
        h = self.fd_step
        with torch.no_grad():
            dudt = (u_of(z_t + h * v, t + h) - u_of(z_t - h * v, t - h)) / (2 * h)
        return u_of(z_t, t), dudt

    def __call__(self, model, batch, generator=None) -> torch.Tensor:
        x, cond = batch["x"], batch.get("cond")
        n, dev = x.shape[0], x.device
        a, b = self.times(n, generator, device=dev), self.times(n, generator, device=dev)
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        r = torch.where(rand(n, generator, dev) < self.ratio, r, t)
        z = randn_like(x, generator)
        z_t, c = noisy(model, x, z, t)
        v = _velocity_target(c, x, z)
        u, target = self.target(model, z_t, t, r, v, cond)
        sq = ((u - target) ** 2).reshape(n, -1).sum(dim=1)
        weight = 1.0 / (sq.detach() + self.c) ** self.p
        return weight * sq

    def config(self) -> dict:
        return {"name": "meanflow", "ratio": self.ratio, "time_sampling": self.times.config(),
                "p": self.p, "c": self.c, "jvp": self.jvp}


def _flow_map_student(job, method: str) -> Student:
    return Student(make_student(job, flow_map=True), method, "flow_map", (1, None))


@register("shortcut", needs_data=True, defaults={
    "max_steps": 128, "bootstrap": 0.25, "guidance": 0.0, "label_dropout": 0.0, "lr": 1e-3})
def shortcut(job) -> Student:
    """Shortcut models: step-size conditioning with self-consistency targets (Frans et al.)."""
    cfg = job.config
    loss = ShortcutLoss(cfg["max_steps"], cfg["bootstrap"], cfg["guidance"], cfg["label_dropout"])
    return fit(job, _flow_map_student(job, "shortcut"), loss, job.teacher_data())


@register("meanflow", needs_data=True, defaults={
    "ratio": 0.25, "time_sampling": None, "p": 1.0, "c": 1e-3, "jvp": "auto", "lr": 1e-3})
def meanflow(job) -> Student:
    """MeanFlow: the average-velocity identity with a JVP (Geng et al. 2025)."""
    cfg = job.config
    loss = MeanFlowLoss(cfg["ratio"], cfg["time_sampling"], cfg["p"], cfg["c"], cfg["jvp"])
    return fit(job, _flow_map_student(job, "meanflow"), loss, job.teacher_data())
