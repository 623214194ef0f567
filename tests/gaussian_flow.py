"""Closed-form ground truth for solver tests: Gaussian data ``N(MU, diag(S2))``.

Its denoiser is linear and its probability-flow ODE has an exact flow,
``x_t1 = alpha_1 MU + r_1 (x_t0 - alpha_0 MU) / r_0`` with ``r = sqrt(alpha^2 S2 + sigma^2)``
per dimension, so a solver's endpoint error is measured against ground truth directly.
"""

import torch

import tiltflow as tf

MU = torch.tensor([1.0, -2.0], dtype=torch.float64)
S2 = torch.tensor([0.25, 2.0], dtype=torch.float64)


def gaussian_denoiser(schedule, mu=MU, s2=S2, calls=None):
    """The exact ``E[x | x_t]`` as a data-predicting Denoiser; ``calls`` (a list) records the
    time of every network evaluation."""

    def fn(x_t, t, cond=None):
        if calls is not None:
            calls.append(float(t[0]))
        c = schedule(t.double()).expand(x_t)
        a, s = c.alpha, c.sigma
        return (mu + a * s2 / (a * a * s2 + s * s) * (x_t - a * mu)).to(x_t.dtype)

    return tf.Denoiser.from_fn(fn, schedule, "data")


def exact_flow(schedule, x_start, t_start, t_end=0.0):
    """The PF-ODE state at ``t_end`` from ``x_start`` at ``t_start`` (float64)."""
    c0 = schedule(torch.tensor(t_start, dtype=torch.float64))
    c1 = schedule(torch.tensor(t_end, dtype=torch.float64))
    r0 = torch.sqrt(c0.alpha**2 * S2 + c0.sigma**2)
    r1 = torch.sqrt(c1.alpha**2 * S2 + c1.sigma**2)
    return c1.alpha * MU + r1 * (x_start - c0.alpha * MU) / r0
