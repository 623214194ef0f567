"""Contracts every registered solver keeps, with the list taken from the registry: a new solver
is covered here without editing this file.

Ground truth is Gaussian data, whose PF-ODE flow is exact (``gaussian_flow.py``).
"""

import math

import pytest
import torch
from gaussian_flow import exact_flow, gaussian_denoiser

import tiltflow as tf
from tiltflow import schedules as S
from tiltflow.solvers.dpm_v3 import EMS

F64 = torch.float64
SCHED = S.VPLinear()
# solvers that need an argument to run at all
REQUIRED = {"dpm_solver_v3": {"ems": EMS.constant()}}
SKIP = {"bespoke"}  # samples with fitted parameters: tests/solvers/trained/


def _solvers(pred=lambda info: True):
    return [n for n in tf.solvers.available()
            if n not in SKIP and not tf.solvers.get(n).adaptive and pred(tf.solvers.get(n))]


def _noise(n=16, seed=0):
    return torch.randn(n, 2, dtype=F64, generator=torch.Generator().manual_seed(seed))


def _run(solver, steps, counter=None, **kw):
    den = gaussian_denoiser(SCHED, calls=counter)
    return tf.sample(den, _noise(), solver, steps=steps, grid="logsnr",
                     options=REQUIRED.get(solver), generator=torch.Generator().manual_seed(1),
                     **kw)


@pytest.mark.parametrize("solver", _solvers())
def test_nfe_is_exact(solver):
    """``nfe=N`` makes exactly N network calls (on a grid ending at t = 0)."""
    info = tf.solvers.get(solver)
    for steps in (3, 5):
        nfe = info.nfe(steps, options=REQUIRED.get(solver))
        calls = []
        den = gaussian_denoiser(SCHED, calls=calls)
        x = tf.sample(den, _noise(), solver, nfe=nfe, grid="logsnr",
                      options=REQUIRED.get(solver), generator=torch.Generator().manual_seed(1))
        assert len(calls) == nfe and torch.isfinite(x).all()


@pytest.mark.parametrize("solver", _solvers(lambda info: not info.stochastic))
def test_deterministic_solvers_converge_to_the_exact_flow(solver):
    """4x the steps cuts the endpoint error at least by half of a first-order method's factor
    4 (every registered method has order >= 1; the order-specific slopes are tested per
    family)."""
    x_init = float(SCHED(torch.ones((), dtype=F64)).sigma) * _noise()
    exact = exact_flow(SCHED, x_init, 1.0)
    errors = [float((_run(solver, steps) - exact).pow(2).sum(1).mean().sqrt()) for steps in (8, 32)]
    assert errors[1] < errors[0] / 2, errors


@pytest.mark.parametrize("solver", _solvers(lambda info: info.name != "dpm_solver_v3"))
def test_hook_sees_every_step_and_may_replace_the_state(solver):
    """The hook gets each step's record (the same objects ``record`` collects) and a tensor it
    returns is the state the solver continues from."""
    seen, record = [], []

    def shift_last(step):
        seen.append(step)
        return step.x_next + 1.0 if step.t_next == 0.0 else None

    plain = _run(solver, 4)
    shifted = _run(solver, 4, hook=shift_last, record=record)
    assert [id(s) for s in seen] == [id(s) for s in record] and len(seen) >= 4
    assert seen[0].t == 1.0 and seen[-1].t_next == 0.0
    assert all(a.t_next == b.t for a, b in zip(seen[:-1], seen[1:], strict=True))
    torch.testing.assert_close(shifted, plain + 1.0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("solver", _solvers(lambda info: info.name != "dpm_solver_v3"))
def test_a_hook_returning_a_wrong_shape_is_an_error(solver):
    with pytest.raises(ValueError, match="step hook must return None or a tensor"):
        _run(solver, 2, hook=lambda step: step.x_next[:1])


def test_solvers_that_cannot_take_a_hook_say_so():
    den = gaussian_denoiser(SCHED)
    with pytest.raises(ValueError, match="dpm_solver_v3 corrects each step"):
        tf.sample(den, _noise(), "dpm_solver_v3", steps=3, options=REQUIRED["dpm_solver_v3"],
                  hook=lambda step: None)
    with pytest.raises(ValueError, match="dopri5 chooses its own steps"):
        tf.sample(den, _noise(), "dopri5", steps=1, hook=lambda step: None)


@pytest.mark.parametrize("solver", _solvers(lambda info: info.stochastic))
def test_stochastic_records_carry_gaussian_log_probs(solver):
    """A recorded Gaussian move carries ``log N(x_next; mean, std^2)``, recomputed here. EDM's
    churn sampler adds its noise before the network call, so its steps are not Gaussian
    transitions and carry none."""
    record = []
    _run(solver, 4, record=record)
    moves = [r for r in record if r.std is not None]
    assert (not moves) if solver == "edm_sde" else moves
    for r in moves:
        z = (r.x_next - r.mean) / r.std
        expected = (-0.5 * z**2 - torch.log(r.std) - 0.5 * math.log(2 * math.pi)).sum(1)
        torch.testing.assert_close(r.log_prob, expected, rtol=1e-12, atol=1e-12)


def test_steps_and_an_explicit_grid_of_another_length_is_an_error():
    den = gaussian_denoiser(SCHED)
    with pytest.raises(ValueError, match="steps=3 but the given grid has 5 steps"):
        tf.sample(den, _noise(), "euler", steps=3, grid=tf.solvers.grids.uniform(5))
    x = tf.sample(den, _noise(), "euler", steps=5, grid=tf.solvers.grids.uniform(5))
    torch.testing.assert_close(x, tf.sample(den, _noise(), "euler", grid=tf.solvers.grids.uniform(5),
                                            nfe=5))


@pytest.mark.parametrize("solver", ["rk4", "rk4_38"])
@pytest.mark.parametrize("steps", [1, 3])
def test_the_final_vp_step_of_rk4_is_ralstons(solver, steps):
    """On VP the velocity is singular at t = 0, so the last step of rk4 / rk4_38 is Ralston's
    third-order step (k2 at h/2, k3 at 3h/4 from k2, weights 2/9, 1/3, 4/9), written out here
    from the exact Gaussian denoiser; a one-step grid is that step alone."""
    den = gaussian_denoiser(SCHED)
    grid = tf.solvers.grids.uniform(steps)
    x_init = float(SCHED(grid[:1]).sigma) * _noise()
    x = tf.solvers.solve(den, x_init, grid[:-1], solver) if steps > 1 else x_init
    t, h = float(grid[-2]), float(grid[-1] - grid[-2])

    def v(y, time):
        return den(y, torch.full((y.shape[0],), time, dtype=F64)).velocity

    k1 = v(x, t)
    k2 = v(x + h / 2 * k1, t + h / 2)
    k3 = v(x + 3 * h / 4 * k2, t + 3 * h / 4)
    ralston = x + h * (2 * k1 + 3 * k2 + 4 * k3) / 9
    torch.testing.assert_close(tf.solvers.solve(den, x_init, grid, solver), ralston,
                               rtol=1e-12, atol=1e-12)
