"""Sampling is differentiable: in the network's parameters (reward backprop, alignment) and in
the grid's times (fitted grids), for every deterministic registered solver.

Each gradient is checked against central differences of the same float64 computation: with step
``eps = 1e-6`` the truncation error is O(eps^2 |f'''|) ~ 1e-12 and the rounding error
O(1e-16 |f| / eps) ~ 1e-10, so the two agree to ~1e-7 relative; the bounds below leave a
factor of ~10 on that.
"""

import pytest
import torch

import tiltflow as tf
from tiltflow import schedules as S
from tiltflow.predictions import KINDS

F64 = torch.float64
EPS = 1e-6


def _deterministic():
    out = []
    for name in tf.solvers.available():
        info = tf.solvers.get(name)
        if not (info.stochastic or info.adaptive or name in ("bespoke", "dpm_solver_v3")):
            out.append(name)
    return out


class _Net(torch.nn.Module):
    """A small smooth network ``tanh(x W + t b) + 0.3 x``: any prediction kind."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(0.5 * torch.randn(2, 2, dtype=F64, generator=g))
        self.b = torch.nn.Parameter(0.5 * torch.randn(2, dtype=F64, generator=g))

    def forward(self, x_t, t, cond=None):
        return torch.tanh(x_t @ self.w + t[:, None] * self.b) + 0.3 * x_t


def _central_difference(f, param):
    grads = torch.zeros_like(param)
    with torch.no_grad():
        for i in range(param.numel()):
            old = param.view(-1)[i].item()
            param.view(-1)[i] = old + EPS
            up = f()
            param.view(-1)[i] = old - EPS
            down = f()
            param.view(-1)[i] = old
            grads.view(-1)[i] = (up - down) / (2 * EPS)
    return grads


@pytest.mark.parametrize("solver", _deterministic())
@pytest.mark.parametrize("kind", KINDS)
def test_parameter_gradients_of_sampling(solver, kind):
    """``d/dW sum(sample(..., grad=True)^2)`` equals central differences of the same sample."""
    net = _Net()
    den = tf.Denoiser(net, S.VPLinear(), kind)
    noise = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(1))

    def loss(grad):
        x = tf.sample(den, noise, solver, steps=3, grid="logsnr", grad=grad)
        return (x**2).sum()

    loss(True).backward()
    for param in (net.w, net.b):
        fd = _central_difference(lambda: float(loss(False)), param)
        torch.testing.assert_close(param.grad, fd, rtol=1e-6, atol=1e-8)


def _grid_from_theta(theta):
    """``1 - cumsum(softmax(theta))`` from 1 to 0: strictly decreasing interior times."""
    inner = 1 - torch.cumsum(torch.softmax(theta, 0), 0)[:-1]
    return torch.cat([torch.ones(1, dtype=F64), inner, torch.zeros(1, dtype=F64)])


@pytest.mark.parametrize("solver", _deterministic())
def test_grid_gradients_of_sampling(solver):
    """The endpoint is differentiable in the interior grid times through the registered solver
    (what ``fit_grid`` uses), on a schedule with alpha = 0 at t = 1 (a velocity model, as flow
    matching trains: a noise model has no x_hat there) and one with VP's singular sigma' at
    t = 0 (a noise model)."""
    for sched, kind in ((S.RectifiedFlow(), "velocity"), (S.VPDiscrete.linear(), "noise")):
        den = tf.Denoiser(_Net(), sched, kind)
        noise = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
        x_init = float(sched(torch.ones(1, dtype=F64)).sigma) * noise
        theta = torch.tensor([0.3, -0.2, 0.1, 0.4], dtype=F64, requires_grad=True)

        def loss(th, den=den, x_init=x_init):
            return (tf.solvers.solve(den, x_init, _grid_from_theta(th), solver) ** 2).sum()

        with torch.enable_grad():
            (grad,) = torch.autograd.grad(loss(theta), theta)
        fd = _central_difference(lambda th=theta, f=loss: float(f(th)), theta)
        assert torch.isfinite(grad).all(), (solver, sched)
        torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-8)
