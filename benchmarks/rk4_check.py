"""An independent check of the reference solution, for the benchmark suites: classic RK4
(Kutta 1901) in the rectified-flow variable, written from the mixture's posterior mean alone (no
tiltflow solver). Any schedule's state maps to rectified flow's at the same log-SNR
(``x_rf = x_t / (alpha + sigma)`` at ``tau = sigma / (alpha + sigma)``; Karras et al. 2022,
sec. 4), where the velocity ``(x_rf - x_hat) / tau`` is bounded on [0, 1] (``-x_rf`` at
tau = 0), so uniform steps in tau converge at order 4 up to both ends. Suites load it with
``bench.load_sibling("rk4_check")``.
"""

from __future__ import annotations

import torch

from tiltflow import analytic
from tiltflow.schedules import RectifiedFlow, Schedule

_F64 = torch.float64


def reference_rk4(gmm: analytic.GaussianMixture, schedule: Schedule, x_init: torch.Tensor,
                  t_start: float = 1.0, t_end: float = 0.0, steps: int = 500) -> torch.Tensor:
    """PF-ODE solution by RK4 with ``steps`` uniform steps in rectified-flow time (see module
    docstring); float64. Independent of tiltflow's solvers."""
    rf = RectifiedFlow()
    c = schedule(torch.tensor([t_start, t_end], dtype=_F64))
    (a0, a1), (s0, s1) = c.alpha.tolist(), c.sigma.tolist()
    taus = torch.linspace(s0 / (a0 + s0), s1 / (a1 + s1), steps + 1, dtype=_F64).tolist()

    def vel(y, tau):
        if tau == 0.0:
            return -y
        return (y - gmm.posterior_mean(y, torch.full((y.shape[0],), tau, dtype=_F64), rf)) / tau

    y = x_init.to(_F64) / (a0 + s0)
    for a, b in zip(taus[:-1], taus[1:], strict=True):
        h = b - a
        k1 = vel(y, a)
        k2 = vel(y + 0.5 * h * k1, a + 0.5 * h)
        k3 = vel(y + 0.5 * h * k2, a + 0.5 * h)
        k4 = vel(y + h * k3, b)
        y = y + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
    return y * (a1 + s1)
