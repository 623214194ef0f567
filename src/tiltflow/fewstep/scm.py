"""Continuous-time consistency distillation in TrigFlow (sCM; Lu & Song 2024, "Simplifying,
Stabilizing and Scaling Continuous-Time Consistency Models", sec. 3-4, Algorithm 1).

TrigFlow is the cosine schedule for data of standard deviation ``sigma_d``: ``x_s = cos(s) x +
sin(s) z``, ``z ~ N(0, sigma_d^2)``, ``s = pi t / 2`` (:class:`~tiltflow.schedules.Cosine` with
``sigma_data``). The student is a velocity :class:`~tiltflow.Denoiser` under it; its data
prediction is exactly the TrigFlow consistency model ``f(x_s, s) = cos(s) x_s - sin(s) sigma_d
F(x_s, s)`` with ``sigma_d F = dx_s/ds`` (``= 2/pi`` times the velocity in t), and ``f(x, 0) = x``.

Each step draws ``s = arctan(exp(u) / 0.5)``, ``u ~ N(P_mean, P_std)`` (the paper's
``arctan(sigma / sigma_d)`` for its data of std 0.5: ``tan s`` is the noise-to-signal ratio, so
the time distribution does not depend on the data's scale), noises the data,
reads the teacher's PF-ODE direction ``dx/ds`` there (any teacher, seen under TrigFlow by a
change of schedule), and regresses ``F`` onto ``F^- + g`` (``F^-``: the student without
gradient) with the tangent

    g = -cos^2(s) (sigma_d F^- - dx/ds) - r cos(s) sin(s) (x_s + sigma_d dF^-/ds),

``dF^-/ds`` one ``torch.func.jvp`` along ``(dx/ds, 1)`` (taken as ``cos sin dF/ds`` with the
scaled tangent, as the paper does). Stabilizers: tangent warm-up ``r`` from 0 to 1 over
``tangent_warmup`` steps, tangent normalization ``g / (|g| + c)`` with ``c = 0.1``, and the
adaptive weighting ``exp(-w(s)) |F - F^- - g|^2 / D + w(s)`` with a small network ``w``
trained alongside (the objective's own state, with its own AdamW).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..nets.embeddings import sinusoidal_embedding
from ..schedules import Cosine
from .base import fit, make_student, per_example, randn_like, register
from .student import Student

__all__ = ["SCMLoss", "AdaptiveWeight"]


class AdaptiveWeight(nn.Module):
    """``w(s)``: Fourier features of ``log(sigma_d tan s) / 4`` and a linear layer (the
    paper's adaptive weighting network), zero at the start."""

    def __init__(self, features: int = 64):
        super().__init__()
        self.features = features
        self.out = nn.Linear(features, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        emb = sinusoidal_embedding(c_noise.float(), self.features, time_scale=1.0)
        return self.out(emb).squeeze(1)


class SCMLoss:
    """sCM's continuous-time distillation objective (module docstring)."""

    def __init__(self, teacher, sigma_d: float, *, p_mean: float = -1.0, p_std: float = 1.4,
                 tangent_warmup: int = 1000, tangent_c: float = 0.1, weight_lr: float = 1e-3):
        self.teacher = teacher.with_schedule(Cosine(sigma_d))
        self.sigma_d, self.p_mean, self.p_std = float(sigma_d), float(p_mean), float(p_std)
        self.warmup, self.c = int(tangent_warmup), float(tangent_c)
        self.weight, self.weight_lr = AdaptiveWeight(), float(weight_lr)
        self._opt, self._pending, self.step = None, None, 0

    def F(self, model, x, s, cond):  # noqa: N802 (the paper's name)
        """The TrigFlow network output ``F = (dx/ds) / sigma_d`` of a velocity model in t."""
        return model(x, 2 * s / math.pi, cond).velocity * (2 / math.pi) / self.sigma_d

    def _optimizer(self, device):
        if self._opt is None:
            self.weight.to(device)
            self._opt = torch.optim.AdamW(self.weight.parameters(), lr=self.weight_lr)
            if self._pending is not None:
                self.weight.load_state_dict(self._pending["weight"])
                self._opt.load_state_dict(self._pending["optimizer"])
                self.step, self._pending = int(self._pending["step"]), None
        return self._opt

    def tangent(self, model, x_s, s, cond, dxds):
        """``(F^-, g)`` before normalization (module docstring)."""
        shape = (-1,) + (1,) * (x_s.dim() - 1)
        cos, sin = (torch.cos(s).to(x_s.dtype).reshape(shape),
                    torch.sin(s).to(x_s.dtype).reshape(shape))
        r = min(1.0, self.step / self.warmup) if self.warmup > 0 else 1.0
        with torch.no_grad():
            def F_of(x_, s_):  # noqa: N802
                return self.F(model, x_, s_, cond)

            cs = (torch.cos(s) * torch.sin(s))
            f_minus, cs_dfds = torch.func.jvp(F_of, (x_s, s), (cos * sin * dxds, cs))
        g = -cos**2 * (self.sigma_d * f_minus - dxds) - r * (cos * sin * x_s
                                                              + self.sigma_d * cs_dfds)
        return f_minus, g

    def __call__(self, model, batch, generator=None) -> torch.Tensor:
        x, cond = batch["x"], batch.get("cond")
        opt = self._optimizer(x.device)
        u = self.p_mean + self.p_std * torch.randn(x.shape[0], generator=generator,
                                                   device=x.device, dtype=torch.float64)
        s = torch.atan(torch.exp(u) / 0.5)  # noise-to-signal ratio e^u / 0.5 (docstring)
        shape = (-1,) + (1,) * (x.dim() - 1)
        z = randn_like(x, generator)
        x_s = torch.cos(s).to(x.dtype).reshape(shape) * x \
            + self.sigma_d * torch.sin(s).to(x.dtype).reshape(shape) * z
        with torch.no_grad():
            dxds = self.teacher(x_s, 2 * s / math.pi, cond).velocity * (2 / math.pi)
        f_minus, g = self.tangent(model, x_s, s, cond, dxds)
        norm = g.reshape(g.shape[0], -1).norm(dim=1).reshape(shape)
        g = g / (norm + self.c)
        sq = per_example((self.F(model, x_s, s, cond) - f_minus - g) ** 2)
        w = self.weight(torch.log(self.sigma_d * torch.tan(s)) / 4)
        # the weighting network learns from the detached error, the student from the weight
        opt.zero_grad(set_to_none=True)
        (torch.exp(-w) * sq.detach() + w).mean().backward()
        opt.step()
        self.step += 1
        return torch.exp(-w.detach()) * sq + w.detach()

    def config(self) -> dict:
        return {"name": "scm", "sigma_d": self.sigma_d, "p_mean": self.p_mean,
                "p_std": self.p_std, "tangent_warmup": self.warmup, "tangent_c": self.c}

    def state_dict(self) -> dict:
        if self._opt is None and self._pending is not None:
            return self._pending
        opt = self._optimizer(next(self.weight.parameters()).device)
        return {"weight": self.weight.state_dict(), "optimizer": opt.state_dict(),
                "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self._opt, self._pending = None, state


@register("scm", defaults={"sigma_d": None, "p_mean": -1.0, "p_std": 1.4,
                           "tangent_warmup": None, "max_nfe": 8, "sample_times": None,
                           "lr": 1e-4})
def scm(job) -> Student:
    """sCM: continuous-time consistency distillation in TrigFlow, with its stabilizers."""
    cfg = job.config
    data = job.teacher_data()
    sigma_d = cfg["sigma_d"] or float(data["x"].std())
    model = make_student(job, prediction="velocity", precondition=False,
                         schedule=Cosine(sigma_d))
    warmup = cfg["tangent_warmup"] if cfg["tangent_warmup"] is not None else cfg["steps"] // 10
    loss = SCMLoss(job.teacher, sigma_d, p_mean=cfg["p_mean"], p_std=cfg["p_std"],
                   tangent_warmup=warmup)
    # the student's top time: u three P_std above P_mean (arctan of it, nearly pi / 2)
    s_max = math.atan(math.exp(cfg["p_mean"] + 3 * cfg["p_std"]) / 0.5)
    student = Student(model, "scm", "consistency", (1, cfg["max_nfe"]),
                      {"times": cfg["sample_times"], "t_max": 2 * s_max / math.pi})
    return fit(job, student, loss, data)
