"""Few-step students: a model, the sampler its method trained it for, and the NFEs it supports.

Three samplers cover every method of this package:

- ``"solver"``: a registered tiltflow solver on its own grid (reflow students are sampled with
  Euler, progressively distilled ones with DDIM at the step count they were distilled to).
- ``"consistency"``: multistep consistency sampling (Song et al. 2023, Algorithm 1): the model's
  data prediction is the consistency function ``f(x_t, t)``; each further step re-noises it to
  the next time and maps it back.
- ``"flow_map"``: a :class:`FlowMap` jumps from ``t`` to ``s`` along its average velocity
  (shortcut models, Frans et al. 2024; MeanFlow, Geng et al. 2025).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..denoiser import Denoiser, as_time
from ..errors import UserError

__all__ = ["FlowMap", "GuidanceEmbedded", "Student", "sample", "SAMPLERS"]


class FlowMap(Denoiser):
    """A velocity model of two times: ``u(x_t, t, s)``, the average velocity of the PF-ODE from
    ``t`` to ``s``, so that ``x_s = x_t + (s - t) u`` (MeanFlow's ``u(z_t, r, t)``, Geng et al.
    2025; a shortcut model's ``s(x_t, t, d)``, Frans et al. 2024).

    The network takes the times ``[t, t - s]`` (start time and step size, the conditioning both
    papers recommend) as ``t`` of shape ``[B, 2]``: build it with ``num_times=2``. At step size
    0 the average velocity is the instantaneous one, so a flow map called as an ordinary
    :class:`~tiltflow.Denoiser` (``flow_map(x_t, t)``) is a velocity model that every solver and
    method can use.
    """

    def __init__(self, net, schedule="rectified_flow"):
        super().__init__(net, schedule, "velocity")

    def _call_net(self, x, t, cond):
        if t.dim() == 1:  # an ordinary denoiser call: step size 0
            t = torch.stack([t, torch.zeros_like(t)], dim=1)
        return super()._call_net(x, t, cond)

    def average_velocity(self, x_t: torch.Tensor, t, s, cond=None) -> torch.Tensor:
        """``u(x_t, t, s)`` for ``[B]`` (or scalar) times ``t`` and ``s``."""
        t, s = as_time(t, x_t), as_time(s, x_t)
        times = torch.stack([t, t - s], dim=1).to(x_t.dtype)
        out = super()._call_net(x_t, times, cond)
        if out.shape != x_t.shape:
            raise ValueError(f"network output shape {tuple(out.shape)} != input {tuple(x_t.shape)}")
        return out

    def jump(self, x_t: torch.Tensor, t, s, cond=None) -> torch.Tensor:
        """``x_s = x_t + (s - t) u(x_t, t, s)``."""
        t, s = as_time(t, x_t), as_time(s, x_t)
        step = (s - t).to(x_t.dtype).reshape((-1,) + (1,) * (x_t.dim() - 1))
        return x_t + step * self.average_velocity(x_t, t, s, cond)


class GuidanceEmbedded(Denoiser):
    """A denoiser whose network also takes a classifier-free guidance scale ``w`` as a second
    input (``num_times=2``): the w-conditioned student of latent consistency distillation
    (Luo et al. 2023, sec. 4.2), which learns the guided teacher for a whole range of ``w``.
    ``guidance`` is the scale used when it is called: a float, or a ``[B]`` tensor while
    training (:meth:`at`)."""

    def __init__(self, net, schedule, prediction="noise", *, guidance=0.0, **kwargs):
        super().__init__(net, schedule, prediction, **kwargs)
        self.guidance = guidance

    def _call_net(self, x, t, cond):
        w = torch.as_tensor(self.guidance, dtype=t.dtype, device=t.device).expand(t.shape)
        return super()._call_net(x, torch.stack([t, w], dim=1), cond)

    def at(self, w) -> GuidanceEmbedded:
        """Set the guidance scale (float or ``[B]``); returns ``self``."""
        self.guidance = w
        return self


def model_class(model) -> str:
    return ("flow_map" if isinstance(model, FlowMap) else
            "guidance_embedded" if isinstance(model, GuidanceEmbedded) else "denoiser")


@dataclass
class Student:
    """What :func:`tiltflow.fewstep.distill` returns. ``nfe = (lo, hi)``: the network-evaluation
    counts the sampler supports (``hi = None``: no upper bound). ``options`` hold the sampler's
    settings (a solver name, consistency times)."""

    model: Denoiser
    method: str
    sampler: str
    nfe: tuple[int, int | None]
    options: dict = field(default_factory=dict)
    run_dir: str | None = None

    def check_nfe(self, nfe) -> int:
        lo, hi = self.nfe
        if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < lo or (hi and nfe > hi):
            allowed = f"{lo}" if lo == hi else f"{lo}..{hi}" if hi else f">= {lo}"
            raise UserError(f"a {self.method} student samples with nfe {allowed}, got {nfe!r}")
        return nfe

    def describe(self) -> dict:
        """The JSON-able part, stored in the run directory so :func:`load` can rebuild it."""
        return {"method": self.method, "sampler": self.sampler, "nfe": list(self.nfe),
                "options": self.options, "model": model_class(self.model)}


# -- samplers ----------------------------------------------------------------------------------

def _solver_sampler(student, noise, nfe, cond, generator):
    from ..solvers import sample as solver_sample

    opts = student.options
    return solver_sample(student.model, noise, opts.get("solver", "euler"), nfe=nfe,
                         grid=opts.get("grid", "uniform"), cond=cond, generator=generator,
                         options=opts.get("solver_options"))


def consistency_times(nfe: int, times=None, t_max: float = 1.0) -> torch.Tensor:
    """The ``nfe`` times multistep consistency sampling visits: ``times`` when given
    (decreasing in (0, 1]), else equally spaced from the model's top time ``t_max``:
    ``t_max (1, 1 - 1/nfe, ...)``."""
    if times is None:
        return torch.linspace(t_max, 0.0, nfe + 1, dtype=torch.float64)[:-1]
    times = torch.as_tensor(times, dtype=torch.float64).flatten()
    if len(times) < nfe:
        raise UserError(f"consistency sampling with nfe={nfe} needs {nfe} times, got {len(times)}")
    return times[:nfe]


def _consistency_sampler(student, noise, nfe, cond, generator):
    model = student.model
    times = consistency_times(nfe, student.options.get("times"), student.options.get("t_max", 1.0))
    points = model.schedule.points(times)
    x_hat = model(points[0].coeffs.sigma.to(noise) * noise, points[0], cond).data
    for point in points[1:]:
        a, s = (c.to(noise) for c in point.coeffs[:2])
        z = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
        x_hat = model(a * x_hat + s * z, point, cond).data
    return x_hat


def _flow_map_sampler(student, noise, nfe, cond, generator):
    model = student.model
    grid = torch.linspace(1.0, 0.0, nfe + 1, dtype=torch.float64)
    x = float(model.schedule.sigma(grid[0])) * noise
    for t, s in zip(grid[:-1].tolist(), grid[1:].tolist(), strict=True):
        x = model.jump(x, t, s, cond)
    return x


SAMPLERS = {"solver": _solver_sampler, "consistency": _consistency_sampler,
            "flow_map": _flow_map_sampler}


def sample(student: Student, noise: torch.Tensor, nfe: int, cond=None,
           generator: torch.Generator | None = None, guidance: float | None = None
           ) -> torch.Tensor:
    """Samples of ``student`` from standard-normal ``noise`` in exactly ``nfe`` network
    evaluations, with the sampler its method trained it for (no gradient). ``guidance``: the
    CFG scale of a w-conditioned student (latent consistency distillation; default: the
    scale it was distilled for), an error for the others."""
    if not isinstance(student, Student):
        raise TypeError(f"student must be a tiltflow.fewstep.Student, got {type(student).__name__}")
    if not torch.is_tensor(noise) or not noise.is_floating_point() or noise.dim() < 2:
        raise ValueError("noise must be a float tensor of shape [B, ...] (batch first)")
    nfe = student.check_nfe(nfe)
    if isinstance(student.model, GuidanceEmbedded):
        student.model.at(float(student.options.get("guidance", 0.0) if guidance is None
                               else guidance))
    elif guidance is not None:
        raise UserError(f"a {student.method} student has no guidance input; guidance is fixed "
                        "at training time for it")
    student.model.eval()
    with torch.no_grad():
        return SAMPLERS[student.sampler](student, noise, nfe, cond, generator)
