"""Parallel sampling (Picard / ParaDiGMS and parareal / SRDS) against the sequential solver.

The sequential base solver's answer is the fixed point of both iterations, so every check is
against that answer on exact mixture denoisers: convergence to the tolerance, float64-exactness
when run to the fixed point, Picard's and parareal's finite-termination structure (after k
iterations the first k points are exact), and fewer sequential rounds than steps.
"""

import pytest
import torch

import tiltflow as tf
from tiltflow import analytic
from tiltflow import schedules as S
from tiltflow.solvers import grids
from tiltflow.solvers.parallel import parallel_sample

BEDS = {"eight_gaussians": analytic.eight_gaussians, "anisotropic_2d": analytic.anisotropic_2d}
SCHEDULES = [S.RectifiedFlow(), S.VPLinear()]
STEPS = 60
ROUNDOFF = 1e-12  # float64 roundoff after ~100 accumulated steps of O(1..10) states


def _setup(bed, schedule, batch=32, seed=0):
    den = BEDS[bed]().denoiser(schedule)
    noise = torch.randn(batch, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return den, noise


def _sequential(den, noise, base, steps=STEPS, seed=1, record=None):
    grid = grids.uniform(steps)
    x_init = float(den.schedule(grid[:1]).sigma) * noise
    gen = torch.Generator().manual_seed(seed) if base == "ddpm" else None
    return tf.solvers.solve(den, x_init, grid, base, generator=gen, record=record)


def _rms(a, b):
    return float((a - b).pow(2).mean().sqrt())


@pytest.mark.parametrize("bed", list(BEDS))
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.name)
@pytest.mark.parametrize("base", ["ddim", "euler", "ddpm"])
@pytest.mark.parametrize("method", ["picard", "parareal"])
def test_converges_to_the_sequential_answer(bed, schedule, base, method):
    """Run to a tolerance: the answer is near the sequential one, and cheaper in rounds.

    Picard's stopping rule bounds each point's last change by ``tol * sqrt(v_i)``; the
    iteration contracts, so the distance to the fixed point is of the order of that change
    summed over the window's unsettled points, far below 10 * tol * (state scale ~ 5) here.
    Parareal's rule bounds the last change of the coarse points by tol (RMS), and its error
    contracts by the same factor per iteration, so the distance to the fine solution is O(tol).
    """
    den, noise = _setup(bed, schedule)
    tol = 1e-4
    gen = torch.Generator().manual_seed(1)
    x, stats = parallel_sample(den, noise, method, base, steps=STEPS, tol=tol, generator=gen)
    seq = _sequential(den, noise, base)
    assert stats["converged"]
    assert _rms(x, seq) < 10 * tol, stats
    assert stats["nfe"] >= STEPS or method == "parareal"


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.name)
@pytest.mark.parametrize("base", ["ddim", "euler", "ddpm"])
def test_picard_takes_fewer_rounds_than_steps(schedule, base):
    """At tol = 1e-3 Picard needs far fewer sequential rounds than the n steps (ParaDiGMS
    reports 2-4x fewer on real models; smooth exact denoisers converge faster still)."""
    for bed in BEDS:
        den, noise = _setup(bed, schedule)
        _, stats = parallel_sample(den, noise, "picard", base, steps=STEPS, tol=1e-3,
                                   generator=torch.Generator().manual_seed(1))
        assert stats["converged"] and stats["rounds"] < STEPS / 2, (bed, stats)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.name)
@pytest.mark.parametrize("base", ["ddim", "euler"])
def test_parareal_takes_fewer_rounds_than_steps(schedule, base):
    """Pipelined parareal at tol = 1e-2 on eight_gaussians: fewer rounds than steps. (On the
    anisotropic bed a 6-step first-order coarse solver is too crude and parareal needs all its
    iterations, i.e. n rounds; with base "ddpm" a deterministic coarse solver cannot predict the
    pre-drawn noise, so it also needs them all. Both are properties of the method.)"""
    den, noise = _setup("eight_gaussians", schedule)
    _, stats = parallel_sample(den, noise, "parareal", base, steps=STEPS, tol=1e-2)
    assert stats["converged"] and stats["rounds"] < STEPS, stats


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.name)
@pytest.mark.parametrize("base", ["ddim", "euler", "ddpm"])
def test_picard_full_window_to_fixed_point_is_exact(schedule, base):
    """window = all steps, tol = 0: Picard stops only when no point changes any more; it
    terminates within n iterations (the triangular structure) at the sequential answer."""
    den, noise = _setup("anisotropic_2d", schedule)
    x, stats = parallel_sample(den, noise, "picard", base, steps=STEPS, tol=0.0,
                               generator=torch.Generator().manual_seed(1))
    assert stats["converged"] and stats["rounds"] <= STEPS
    assert _rms(x, _sequential(den, noise, base)) < ROUNDOFF


@pytest.mark.parametrize("k", [1, 3, 7])
def test_picard_first_k_points_exact_after_k_iterations(k):
    """Picard's finite termination: after k sweeps of the full window, x_1..x_k are the
    sequential states (each sweep fixes one more point exactly)."""
    den, noise = _setup("eight_gaussians", S.VPLinear())
    record = []
    _sequential(den, noise, "ddim", record=record)
    seq = torch.stack([noise * float(den.schedule(torch.tensor(1.0, dtype=torch.float64)).sigma)]
                      + [r.x_next for r in record])
    _, stats = parallel_sample(den, noise, "picard", "ddim", steps=STEPS, tol=0.0, max_iters=k,
                               trajectory=True)
    traj = stats["trajectory"]
    assert stats["iterations"] == k and not stats["converged"]
    assert _rms(traj[: k + 1], seq[: k + 1]) < ROUNDOFF


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.name)
@pytest.mark.parametrize("pipelined", [True, False])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_parareal_exact_on_first_k_intervals(schedule, pipelined, k):
    """Parareal's exactness property: after k iterations the first k coarse points equal the
    fine sequential solution (to roundoff), whatever the coarse solver."""
    den, noise = _setup("anisotropic_2d", schedule)
    steps, coarse = 60, 6
    record = []
    _sequential(den, noise, "ddim", steps=steps, record=record)
    fine = [r.x_next for r in record]
    _, stats = parallel_sample(den, noise, "parareal", "ddim", steps=steps, coarse=coarse,
                               tol=0.0, max_iters=k, pipelined=pipelined, trajectory=True)
    traj, M = stats["trajectory"], steps // coarse
    assert stats["iterations"] == k and stats["fine_per_coarse"] == M
    for j in range(1, k + 1):
        assert _rms(traj[j], fine[j * M - 1]) < ROUNDOFF, j


@pytest.mark.parametrize("pipelined", [True, False])
def test_parareal_to_fixed_point_is_exact_and_counts(pipelined):
    """tol = 0 runs all N iterations: the fine sequential answer; the textbook schedule costs
    N (initial coarse sweep) + sum_p (M - 1 + N - p) rounds, the pipelined one no more than the
    sequential n (its critical path is the fine chain)."""
    den, noise = _setup("eight_gaussians", S.RectifiedFlow())
    steps, N = 60, 6
    M = steps // N
    x, stats = parallel_sample(den, noise, "parareal", "euler", steps=steps, coarse=N, tol=0.0,
                               pipelined=pipelined)
    assert stats["converged"] and stats["iterations"] == N
    assert _rms(x, _sequential(den, noise, "euler", steps=steps)) < ROUNDOFF
    textbook = N + sum(M - 1 + N - p for p in range(1, N + 1))
    assert stats["rounds"] == (steps if pipelined else textbook), stats
    # every coarse point is evaluated once per level it changes in; fine solves not repeated
    assert stats["nfe"] <= N + sum((N - p + 1) * (M - 1) + (N - p) for p in range(1, N + 1)) + N


def test_nfe_counts_every_batched_evaluation():
    """stats['nfe'] and stats['rounds'] equal the calls a counting denoiser sees."""
    gmm = analytic.eight_gaussians()
    sched = S.RectifiedFlow()
    calls = {"n": 0, "rows": 0}

    def fn(x_t, t, cond=None):
        calls["n"] += 1
        calls["rows"] += x_t.shape[0]
        return gmm.posterior_mean(x_t, t, sched)

    den = tf.Denoiser.from_fn(fn, sched, "data")
    noise = torch.randn(8, 2, dtype=torch.float64)
    for method in ("picard", "parareal"):
        calls.update(n=0, rows=0)
        _, stats = parallel_sample(den, noise, method, "ddim", nfe=40, tol=1e-3, window=10)
        assert calls["n"] == stats["rounds"] and calls["rows"] == 8 * stats["nfe"]


def test_picard_window_one_is_the_sequential_solver():
    den, noise = _setup("eight_gaussians", S.VPLinear())
    x, stats = parallel_sample(den, noise, "picard", "ddim", steps=20, window=1, tol=0.5)
    assert stats["rounds"] == 20 and stats["nfe"] == 20
    assert _rms(x, _sequential(den, noise, "ddim", steps=20)) < ROUNDOFF


def test_reference_and_cond_and_float32():
    """reference=True reports the error vs the sequential solver; cond is tiled per window."""
    den, noise = _setup("anisotropic_2d", S.RectifiedFlow(), batch=4)
    cond = torch.arange(4)
    x, stats = parallel_sample(den, noise.float(), "picard", "ddpm", steps=30, tol=1e-3,
                               cond=cond, generator=torch.Generator().manual_seed(3),
                               reference=True)
    # the O(tol) fixed-point distance of test_converges_to_the_sequential_answer (10 * tol);
    # float32 round-off (~1e-7 per step over 30 steps) is far below it
    assert x.dtype == torch.float32 and stats["error"] < 10 * 1e-3


def test_bad_arguments():
    den, noise = _setup("eight_gaussians", S.RectifiedFlow(), batch=2)
    with pytest.raises(ValueError, match="unknown parallel method"):
        parallel_sample(den, noise, "jacobi", steps=10)
    with pytest.raises(ValueError, match="base solver"):
        parallel_sample(den, noise, "picard", "heun", steps=10)
    with pytest.raises(ValueError, match="exactly one"):
        parallel_sample(den, noise, "picard", steps=10, nfe=10)
    with pytest.raises(ValueError, match="must divide"):
        parallel_sample(den, noise, "parareal", steps=10, coarse=3)
    with pytest.raises(ValueError, match="window"):
        parallel_sample(den, noise, "picard", steps=10, window=0)
    with pytest.raises(ValueError, match="tol"):
        parallel_sample(den, noise, "picard", steps=10, tol=-1)
    with pytest.raises(ValueError, match="interval"):
        parallel_sample(den, noise, "picard", steps=10, cond=torch.zeros(2, dtype=torch.long),
                        guidance=tf.solvers.ClassifierFree(1.0, interval=(0.2, 0.8)))
