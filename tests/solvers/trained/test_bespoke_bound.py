"""The RMSE-bound loss of Bespoke solvers (Shaul et al. 2023): the ground-truth path, the bound
itself (a true upper bound when L is a valid Lipschitz constant), its local errors, fitting with
it, and its bad inputs (API and CLI).

The closed-form check uses Gaussian data (tests/gaussian_flow.py), whose PF-ODE velocity is
affine in x with an exactly computable Lipschitz constant and whose flow is exact.
"""

import math

import pytest
import torch
from gaussian_flow import MU, S2, exact_flow, gaussian_denoiser

import tiltflow as tf
from tiltflow import analytic
from tiltflow import schedules as S
from tiltflow.solvers import trained as B

torch.set_num_threads(1)
GMM = analytic.anisotropic_2d()
F64 = torch.float64


def _noise(n, seed):
    return torch.randn(n, 2, dtype=F64, generator=torch.Generator().manual_seed(seed))


def _velocity_lipschitz(schedule) -> float:
    """sup_t of the Lipschitz constant of the Gaussian model's velocity: per dimension it is
    ``u_t(x) = (r'/r) (x - alpha MU) + alpha' MU`` with ``r^2 = alpha^2 S2 + sigma^2``."""
    t = torch.linspace(0, 1, 20001, dtype=F64)[1:]  # VPDiscrete's sigma' is infinite at t = 0
    c = schedule(t)
    a, s, da, ds = (v[:, None] for v in (c.alpha, c.sigma, c.d_alpha, c.d_sigma))
    rate = (a * da * S2 + s * ds) / (a * a * S2 + s * s)
    return float(rate.abs().max()) * 1.01  # margin for the sup between grid points


def _random_transform(schedule, nfe, seed):
    """A random valid scale-time transformation: t decreasing from 1 to 0, t' < 0, s > 0."""
    g = torch.Generator().manual_seed(seed)
    n = nfe + 1
    inc = torch.rand(n - 1, generator=g, dtype=F64) + 0.2
    t = torch.cat([torch.ones(1, dtype=F64), 1 - torch.cumsum(inc / inc.sum(), 0)])
    t[-1] = 0.0
    dt = -(0.5 + 1.5 * torch.rand(n, generator=g, dtype=F64))
    s = torch.exp(0.3 * torch.randn(n, generator=g, dtype=F64))
    s[0] = 1.0
    ds = 0.5 * torch.randn(n, generator=g, dtype=F64)
    return B.BespokeSolver(t, dt, s, ds, base="midpoint", schedule=schedule)


@pytest.mark.parametrize("schedule", [S.RectifiedFlow(), S.VPLinear(), S.Cosine()],
                         ids=lambda s: s.name)
def test_bound_upper_bounds_the_endpoint_error_on_a_gaussian(schedule):
    den = gaussian_denoiser(schedule)
    noise = _noise(64, 0)
    x_init = B.start_state(den, noise)
    path = B.ground_truth_path(den, noise, knots=128)
    # the GT path is the exact flow (interpolated at any time)
    times = torch.tensor([0.97, 0.6, 0.31, 0.05], dtype=F64)
    exact = torch.stack([exact_flow(schedule, x_init, 1.0, float(v)) for v in times])
    torch.testing.assert_close(path.at(times), exact, rtol=0, atol=1e-6)
    torch.testing.assert_close(path.end, exact_flow(schedule, x_init, 1.0), rtol=0, atol=1e-7)
    lip = _velocity_lipschitz(schedule)
    solvers = [B.BespokeSolver.identity(schedule, 6, "midpoint"),
               B.BespokeSolver.identity(schedule, 4, "euler"),
               B.BespokeSolver.identity(schedule, 6, "midpoint", init="rectified_flow"),
               *(_random_transform(schedule, nfe, seed) for nfe, seed in ((4, 1), (6, 2), (8, 3)))]
    truth = exact_flow(schedule, x_init, 1.0)
    for sol in solvers:
        terms = sol.rmse_bound(den, path, lipschitz=lip)
        err = (sol.solve(den, x_init) - truth).norm(dim=1)
        assert bool((err <= terms.bound + 1e-6).all()), (sol, float((err / terms.bound).max()))
        # hence the paper's L_RMSE (mean endpoint error) and tiltflow's endpoint RMSE
        assert float(err.mean()) <= float(terms.loss) + 1e-6
        assert float(err.pow(2).mean().sqrt()) <= float(terms.bound.pow(2).mean().sqrt()) + 1e-6
        assert terms.local_errors.shape == (sol.steps, 64) and terms.weights[-1] == 1
    # not vacuous: for the base midpoint solver it is within a small factor of the error
    ident = solvers[0]
    err = (ident.solve(den, x_init) - truth).norm(dim=1)
    assert float(ident.rmse_bound(den, path, lipschitz=lip).loss) < 3 * float(err.mean())


@pytest.mark.parametrize("base", ["euler", "midpoint"])
@pytest.mark.parametrize("schedule", [S.RectifiedFlow(), S.VPDiscrete.linear()],
                         ids=lambda s: s.name)
def test_identity_local_errors_are_the_base_solvers_local_errors(base, schedule):
    """With the identity transformation d_i = ||x(t_{i+1}) - base step from x(t_i)|| on the
    uniform grid, L_i is the textbook Lipschitz bound of the step, M_i the product of the later
    L_j."""
    den = GMM.denoiser(schedule)
    noise = _noise(32, 4)
    path = B.ground_truth_path(den, noise, knots=32)
    nfe, L = 6, 2.5
    sol = B.BespokeSolver.identity(schedule, nfe, base)
    terms = sol.rmse_bound(den, path, lipschitz=L)
    n = sol.steps
    grid = torch.linspace(1, 0, n + 1, dtype=F64)
    gt = torch.cat([B.start_state(den, noise)[None], path.at(grid[1:-1]), path.end[None]])
    for i in range(n):
        step = tf.solvers.solve(den, gt[i], grid[i:i + 2], base)
        torch.testing.assert_close(terms.local_errors[i], (gt[i + 1] - step).norm(dim=1),
                                   rtol=0, atol=1e-12)
    h = 1 / n
    step_lip = 1 + h * L if base == "euler" else 1 + h * L * (1 + h * L / 2)
    torch.testing.assert_close(terms.step_lipschitz, torch.full((n,), step_lip, dtype=F64))
    torch.testing.assert_close(terms.weights,
                               step_lip ** torch.arange(n - 1, -1, -1, dtype=F64))
    torch.testing.assert_close(terms.bound, (terms.weights[:, None] * terms.local_errors).sum(0))


def test_ground_truth_path_matches_the_reference():
    den = GMM.denoiser(S.VPDiscrete.linear())
    noise = _noise(64, 5)
    path = B.ground_truth_path(den, noise)
    x_init = B.start_state(den, noise)
    assert float(B.endpoint_rmse(path.end, tf.solvers.reference_solve(den, x_init))) < 1e-6
    for t in (0.7, 0.2, 0.01):
        mid = tf.solvers.reference_solve(den, x_init, 1.0, t)
        assert float(B.endpoint_rmse(path.at(torch.tensor([t], dtype=F64))[0], mid)) < 1e-5
    torch.testing.assert_close(path.at(torch.tensor([1.0], dtype=F64))[0], x_init)


@pytest.mark.parametrize("schedule", [S.RectifiedFlow(), S.VPDiscrete.linear()],
                         ids=lambda s: s.name)
def test_fitting_the_bound_lowers_the_held_out_rmse(schedule, tmp_path):
    den = GMM.denoiser(schedule)
    train, test = _noise(256, 0), _noise(512, 1)
    ref_test = tf.solvers.reference_solve(den, B.start_state(den, test))
    fitted = B.BespokeSolver.fit(den, 4, "midpoint", noises=train, steps=100, loss="bound")
    start = B.BespokeSolver.identity(schedule, 4, "midpoint", init=fitted.fit_info["init"])
    identity = B.BespokeSolver.identity(schedule, 4, "midpoint")
    held_out = float(B.endpoint_rmse(fitted.sample(den, test), ref_test))
    for before in (start, identity):
        assert held_out < 0.75 * float(B.endpoint_rmse(before.sample(den, test), ref_test))
    info = fitted.fit_info
    assert info["loss"] == "rmse_bound" and info["lipschitz"] == 1.0
    assert info["train_bound"] < info["init_bound"] and info["train_rmse"] < info["init_rmse"]
    g = B.load(fitted.save(tmp_path / "bound.safetensors"))
    assert g.fit_info == info and torch.equal(g.sample(den, test), fitted.sample(den, test))


def test_bad_inputs_raise_clear_errors():
    den = GMM.denoiser(S.RectifiedFlow())
    noise = _noise(16, 0)
    with pytest.raises(ValueError, match="loss must be 'rmse'"):
        B.BespokeSolver.fit(den, 4, noises=noise, loss="rmse_bound", steps=1)
    for bad in (0.0, -1.0, math.nan, math.inf, "one"):
        with pytest.raises(ValueError, match="lipschitz"):
            B.BespokeSolver.fit(den, 4, noises=noise, loss="bound", lipschitz=bad, steps=1)
    path = B.ground_truth_path(den, noise, knots=4)
    sol = B.BespokeSolver.identity(den.schedule, 4)
    with pytest.raises(ValueError, match="lipschitz"):
        sol.rmse_bound(den, path, lipschitz=0)
    with pytest.raises(ValueError, match="GroundTruthPath of these noises"):
        B.BespokeSolver.fit(den, 4, noises=_noise(16, 1), loss="bound", path=path, steps=1)
    with pytest.raises(ValueError, match="noises must be"):
        B.ground_truth_path(den, torch.zeros(3))
    with pytest.raises(ValueError, match="knots"):
        B.ground_truth_path(den, noise, knots=0)


def test_cli_fit_solver_loss_bound(tiny_run, tmp_path, capsys):
    from tiltflow.cli import main

    out = tmp_path / "bound.safetensors"
    code = main(["fit-solver", str(tiny_run), "--nfe", "4", "--loss", "bound", "--lipschitz",
                 "2", "--num-noises", "16", "--steps", "3", "--out", str(out)])
    assert code == 0 and "loss bound" in capsys.readouterr().out
    fitted = B.load(out)
    assert fitted.fit_info["loss"] == "rmse_bound" and fitted.fit_info["lipschitz"] == 2.0
    code = main(["fit-solver", str(tiny_run), "--nfe", "4", "--loss", "rmse", "--num-noises",
                 "16", "--steps", "2", "--out", str(out)])
    assert code == 0 and B.load(out).fit_info["loss"] == "endpoint_rmse"


@pytest.mark.parametrize("args,needle", [
    (["--loss", "l2"], "--loss must be bound or rmse, got 'l2'"),
    (["--loss", "bound", "--lipschitz", "0"], "--lipschitz must be a finite number > 0"),
    (["--loss", "bound", "--lipschitz", "nan"], "--lipschitz must be a finite number > 0"),
    (["--lipschitz", "2"], "use it with --loss bound"),
    (["--kind", "bns", "--loss", "bound"], "apply to --kind bespoke only"),
])
def test_cli_fit_solver_bad_loss_arguments(tiny_run, tmp_path, capsys, args, needle):
    from tiltflow.cli import main

    out = tmp_path / "x.safetensors"
    code = main(["fit-solver", str(tiny_run), "--nfe", "4", "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_gaussian_helpers_are_consistent():
    """The Lipschitz constant used above is the velocity's: a finite-difference check."""
    sched = S.RectifiedFlow()
    den = gaussian_denoiser(sched)
    x = torch.stack([MU, MU + 1.0])
    t = torch.full((2,), 0.3, dtype=F64)
    u = den(x, t).velocity
    c = sched(t[:1])
    rate = (c.alpha * c.d_alpha * S2 + c.sigma * c.d_sigma) / (c.alpha**2 * S2 + c.sigma**2)
    torch.testing.assert_close(u[1] - u[0], rate * 1.0)
    assert _velocity_lipschitz(sched) >= float(rate.abs().max())


def test_bound_with_conditioning_matches_per_class_runs():
    """A class-conditional model: the bound of a labelled pool equals the bounds computed class
    by class (the labels follow their noises through the parallel steps and minibatches)."""
    sched = S.RectifiedFlow()
    shift = torch.tensor([[0.0, 0.0], [3.0, -1.0]], dtype=F64)

    def fn(x_t, t, cond=None):
        c = sched(t.double()).expand(x_t)
        mu = MU + shift[cond]
        a, s = c.alpha, c.sigma
        return mu + a * S2 / (a * a * S2 + s * s) * (x_t - a * mu)

    den = tf.Denoiser.from_fn(fn, sched, "data")
    noise, labels = _noise(24, 7), torch.arange(24) % 2
    path = B.ground_truth_path(den, noise, cond=labels, knots=16)
    sol = B.BespokeSolver.identity(sched, 4, "midpoint")
    both = sol.rmse_bound(den, path, cond=labels).bound
    for k in (0, 1):
        sel = labels == k
        own = B.ground_truth_path(den, noise[sel], cond=labels[sel], knots=16)
        torch.testing.assert_close(both[sel], sol.rmse_bound(den, own, cond=labels[sel]).bound)
    fitted = B.BespokeSolver.fit(den, 4, noises=noise, cond=labels, loss="bound", steps=5,
                                 batch_size=8, path=path)
    # the fit's numbers are those of the returned and the start solver on the labelled pool
    # (recomputed here: the same float64 computation, round-off only)
    start = B.BespokeSolver.identity(sched, 4, "midpoint", init=fitted.fit_info["init"])
    for solver, key in ((fitted, "train_bound"), (start, "init_bound")):
        bound = float(solver.rmse_bound(den, path, cond=labels).loss)
        assert bound == pytest.approx(fitted.fit_info[key], rel=1e-12), key
