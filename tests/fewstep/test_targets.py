"""Each few-step objective's target is right on the exact mixture: computed from the exact
teacher (or the exact flow map, by tight integration) it equals what the method's paper says
it should, to the accuracy of the teacher's solver step or of the integration."""

from __future__ import annotations

import torch

from tiltflow import Denoiser, analytic, fewstep, solvers
from tiltflow.fewstep.consistency import ConsistencyLoss, lognormal_index_probs, pseudo_huber
from tiltflow.fewstep.flowmaps import MeanFlowLoss, ShortcutLoss
from tiltflow.fewstep.progressive import ProgressiveLoss
from tiltflow.fewstep.reflow import ReflowLoss, generate_pairs

F64 = torch.float64  # the checks run in float64, so round-off stays far below every error
MIXTURE = analytic.anisotropic_2d()


def _exact_map(teacher, x, t, s):
    """The PF-ODE map from ``x`` at per-example times ``t`` to ``s`` (tight dopri5)."""
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        out[i:i + 1] = solvers.reference_solve(teacher, x[i:i + 1], float(t[i]), float(s[i]),
                                               rtol=1e-9, atol=1e-9)
    return out


class ExactFlowMap(fewstep.FlowMap):
    """The exact average velocity ``(Phi_{t->s}(x) - x) / (s - t)`` of a mixture's PF-ODE; at
    ``s = t`` the exact instantaneous velocity."""

    def __init__(self, teacher):
        super().__init__(lambda x, t, cond=None: x, teacher.schedule)
        self.teacher = teacher

    def average_velocity(self, x_t, t, s, cond=None):
        t = torch.as_tensor(t, dtype=torch.float64).expand(x_t.shape[0])
        s = torch.as_tensor(s, dtype=torch.float64).expand(x_t.shape[0])
        same = (t - s).abs() < 1e-12
        v = self.teacher(x_t, t).velocity
        gap = (s - t).clamp(max=-1e-12).reshape(-1, 1)
        moved = (_exact_map(self.teacher, x_t, t, torch.where(same, t - 1e-3, s)) - x_t) / gap
        return torch.where(same.reshape(-1, 1), v, moved)


def test_consistency_distillation_target_of_the_exact_consistency_function():
    """With the exact consistency function f(x, t) = Phi_{t->0}(x) as both student and target,
    the distillation loss is the teacher step's local error only: it falls ~8x (Heun: local
    error O(h^3)) when the time grid is refined 2x."""
    teacher = MIXTURE.denoiser("rectified_flow")

    def exact_f(x_t, t, cond=None):
        return _exact_map(teacher, x_t, t, torch.zeros_like(t))

    exact = Denoiser.from_fn(exact_f, "rectified_flow", "data")
    x = MIXTURE.sample(16, generator=torch.Generator().manual_seed(0))
    losses = []
    for scales in (8, 16):
        loss = ConsistencyLoss(None, teacher=teacher, solver="heun", scales=scales)  # mu = 0
        losses.append(float(loss(exact, {"x": x}, torch.Generator().manual_seed(1)).mean()))
    # squared local errors: 2x finer steps make them 64x smaller (Heun, O(h^3)) and 16x on the
    # last interval (Heun's Euler step into t = 0): ask for 16x
    assert losses[1] < losses[0] / 16, losses


def test_progressive_target_makes_one_ddim_step_land_on_two_teacher_steps():
    """Salimans & Ho's x~: one DDIM step from z_t with x_hat = x~ reaches z_t'' exactly."""
    teacher = MIXTURE.denoiser("vp_linear")
    loss = ProgressiveLoss(teacher, student_steps=4)
    x = MIXTURE.sample(64, generator=torch.Generator().manual_seed(2))
    z_t, i, x_tilde = loss.target(teacher, x, None, torch.Generator().manual_seed(3))
    t, t2 = loss.grids[i, 0], loss.grids[i, 2]
    c, c2 = teacher.schedule(t).expand(x), teacher.schedule(t2).expand(x)
    eps = (z_t - c.alpha * x_tilde) / c.sigma
    one_step = c2.alpha * x_tilde + c2.sigma * eps
    two_steps = torch.stack([solvers.solve(teacher, z_t[b:b + 1], loss.grids[i[b]], "ddim")[0]
                             for b in range(64)])
    torch.testing.assert_close(one_step, two_steps, rtol=0, atol=1e-10)


def test_shortcut_bootstrap_target_is_the_exact_double_step():
    """For the exact flow map the self-consistency target (u(t, t-d) + u(t-d, t-2d)) / 2 equals
    u(t, t-2d) (the flow's semigroup property), to the integration tolerance."""
    exact = ExactFlowMap(MIXTURE.denoiser("rectified_flow"))
    x_t = 2 * torch.randn(8, 2, generator=torch.Generator().manual_seed(4))
    t = torch.full((8,), 0.75, dtype=F64)
    d = torch.full((8,), 0.25, dtype=F64)
    target = ShortcutLoss().bootstrap_target(exact, x_t, t, d, None)
    torch.testing.assert_close(target, exact.average_velocity(x_t, t, t - 2 * d), rtol=0,
                               atol=1e-6)


def test_meanflow_identity_holds_for_the_exact_average_velocity():
    """u = v - (t - r)(v . grad u + d_t u) for the exact average velocity u and the exact
    (marginal) velocity v. The derivative is taken by central differences of the tightly
    integrated map, so the identity holds up to their O(h^2) error: halving h must cut the
    residual ~4x (ask for 3x; the integration tolerance / h stays far below)."""
    teacher = MIXTURE.denoiser("rectified_flow")
    exact = ExactFlowMap(teacher)
    z_t = 2 * torch.randn(6, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    t, r = torch.full((6,), 0.8, dtype=F64), torch.full((6,), 0.3, dtype=F64)
    v = teacher(z_t, t).velocity
    residuals = []
    for h in (2e-3, 1e-3):
        u, target = MeanFlowLoss(jvp="finite_difference", fd_step=h).target(exact, z_t, t, r, v,
                                                                            None)
        residuals.append(float((target - u).abs().max()))
    assert residuals[1] < residuals[0] / 3 and residuals[1] < 1e-3, residuals


def test_meanflow_jvp_equals_the_reverse_mode_directional_derivative():
    """torch.func.jvp with tangent (v, dt = 1) through a real flow-map network equals the same
    directional derivative by reverse-mode autograd (torch.autograd.functional.jvp), so the
    forward-mode wiring of both times (t and the step size t - r) is right."""
    from tiltflow import nets

    torch.manual_seed(0)
    net = nets.MLP(2, hidden=32, depth=2, num_times=2).double()
    for p in net.parameters():  # a non-zero output layer
        torch.nn.init.normal_(p, std=0.3)
    model = fewstep.FlowMap(net)
    z = torch.randn(5, 2, dtype=F64)
    t, r = torch.full((5,), 0.7, dtype=F64), torch.full((5,), 0.2, dtype=F64)
    v = torch.randn(5, 2, dtype=F64)
    u, target = MeanFlowLoss(jvp="func").target(model, z, t, r, v, None)

    def u_of(z_, t_):
        return model.average_velocity(z_, t_, r)

    _, dudt = torch.autograd.functional.jvp(u_of, (z, t), (v, torch.ones_like(t)))
    torch.testing.assert_close(target, v - 0.5 * dudt, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(u, u_of(z, t))


def test_reflow_pairs_are_the_teachers_ode_solutions_and_resume(tmp_path):
    teacher = MIXTURE.denoiser("rectified_flow")
    cfg = {**fewstep.COMMON, "teacher_solver": "heun", "teacher_nfe": 63}
    pairs = generate_pairs(teacher, (2,), 10, cfg, tmp_path, chunk=4)
    assert pairs["x"].shape == (10, 2, 2) and len(list(tmp_path.glob("chunk_*.pt"))) == 3
    z, x = pairs["x"][:, 0], pairs["x"][:, 1]
    ref = solvers.reference_solve(teacher, z.double())
    # Heun with 32 steps: global error O(h^2) ~ 1e-3 on this mixture
    assert float((x - ref).abs().max()) < 5e-3
    (tmp_path / "chunk_00001.pt").unlink()  # an interrupted run: the missing chunk is redrawn
    again = generate_pairs(teacher, (2,), 10, cfg, tmp_path, chunk=4)
    torch.testing.assert_close(again["x"], pairs["x"], rtol=0, atol=0)


def test_reflow_loss_is_zero_for_the_coupling_it_was_built_from():
    """On a deterministic straight coupling (x = z shifted) the exact velocity of the pairs is
    the constant z - x, which a model predicting it attains with zero loss."""
    shift = torch.tensor([1.0, -2.0], dtype=F64)

    def velocity(x_t, t, cond=None):
        return torch.zeros_like(x_t) - shift  # z - x = -shift for every pair

    model = Denoiser.from_fn(velocity, "rectified_flow", "velocity")
    z = torch.randn(32, 2, generator=torch.Generator().manual_seed(6), dtype=F64)
    pairs = torch.stack([z, z + shift], dim=1)
    assert float(ReflowLoss()(model, {"x": pairs}).max()) < 1e-28


def test_pseudo_huber_and_lognormal_probabilities():
    a, b = torch.zeros(3, 4, dtype=F64), torch.full((3, 4), 0.5, dtype=F64)
    torch.testing.assert_close(pseudo_huber(a, b, c=0.0), torch.full((3,), 1.0, dtype=F64))
    small = pseudo_huber(a, a + 1e-4, c=1.0)  # |d|^2 / (2c) - |d|^4 / (8c^3) for |d| << c
    torch.testing.assert_close(small, torch.full((3,), 4e-8 / 2, dtype=F64), rtol=1e-7, atol=0)
    levels = torch.tensor([80.0, 10.0, 1.0, 0.1, 0.0], dtype=F64)
    p = lognormal_index_probs(levels, -1.1, 2.0)
    assert abs(float(p.sum()) - 1) < 1e-12 and bool((p > 0).all())
    # each interval's mass under the lognormal, given s < 80: P(0.1 < s < 1) / P(s < 80)
    phi = torch.distributions.Normal(torch.tensor(-1.1, dtype=F64), 2.0).cdf
    log = torch.log(torch.tensor([1.0, 0.1, 80.0], dtype=F64))
    expect = (phi(log[0]) - phi(log[1])) / phi(log[2])
    torch.testing.assert_close(p[2], expect, rtol=1e-10, atol=0)


def test_score_distillation_gradient_vanishes_when_the_fake_score_is_the_real_one():
    """DMD's and VSD's generator gradient is the difference of the real and fake scores: zero
    when the fake network is the teacher itself (the generator already matches)."""
    from tiltflow.fewstep.score import ScoreDistillationLoss

    teacher = MIXTURE.denoiser("rectified_flow")
    x_g = MIXTURE.sample(32, generator=torch.Generator().manual_seed(7)).requires_grad_(True)
    for kind in ("dmd", "vsd"):
        loss = ScoreDistillationLoss(kind, teacher, teacher)
        value = loss.generator_loss(x_g, None, torch.Generator().manual_seed(8)).sum()
        (grad,) = torch.autograd.grad(value, x_g)
        assert float(grad.abs().max()) == 0.0, kind


def test_batch_posterior_mean_is_the_exact_one_of_the_empirical_distribution():
    """For a batch holding the mixture's component means, with an x_t close to one of them at
    a small noise level, the estimate picks that mean; at a huge noise level it is the batch
    mean (all weights equal)."""
    from tiltflow.fewstep.consistency import batch_posterior_mean
    from tiltflow.schedules import Coeffs

    x = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]], dtype=F64)
    one = torch.ones(3, 1, dtype=F64)
    x_t = torch.tensor([[3.9, 0.1], [0.1, 3.9], [0.0, 0.1]], dtype=F64)
    sharp = batch_posterior_mean(x_t, Coeffs(one, 0.1 * one, one, one), x)
    torch.testing.assert_close(sharp, x[[1, 2, 0]], rtol=0, atol=1e-12)
    flat = batch_posterior_mean(x_t, Coeffs(1e-6 * one, 1e3 * one, one, one), x)
    torch.testing.assert_close(flat, x.mean(0).expand(3, 2), rtol=0, atol=1e-9)
    labelled = batch_posterior_mean(x_t, Coeffs(one, 1e3 * one, one, one), x,
                                    cond=torch.tensor([0, 1, 1]))
    torch.testing.assert_close(labelled[0], x[0])  # alone in its class


def test_phased_consistency_target_of_the_exact_phase_maps():
    """PCM's consistency function is the DDIM jump to the phase's lower edge s. A model whose
    data prediction makes that jump the exact ODE map to s, x_hat = (Phi_{t->s} - r x_t) /
    (alpha_s - r alpha_t) with r = sigma_s / sigma_t, gives a loss that is the teacher step's
    error only. On a 2x finer grid the squared local errors fall 64x (Heun, O(h^3)) and 16x on
    the last interval, where Heun ends with an Euler step into t = 0 (EDM's rule): ask for 16x,
    averaged over 64 random intervals."""
    teacher = MIXTURE.denoiser("rectified_flow")
    x = MIXTURE.sample(64, generator=torch.Generator().manual_seed(9))
    losses = []
    for scales in (8, 16):
        loss = ConsistencyLoss(None, teacher=teacher, solver="heun", scales=scales, phases=2)
        edges = loss.edges(teacher.schedule)
        assert len(edges) == 3 and float(edges[-1]) == 0.0

        def exact_phase_map(x_t, t, cond=None, edges=edges):
            t = t.double()
            s = torch.stack([edges[edges < ti].max() for ti in t])  # the phase's lower edge
            phi = _exact_map(teacher, x_t, t, s)
            c_t, c_s = teacher.schedule(t).expand(x_t), teacher.schedule(s).expand(x_t)
            r = c_s.sigma / c_t.sigma
            return (phi - r * x_t) / (c_s.alpha - r * c_t.alpha)

        model = Denoiser.from_fn(exact_phase_map, "rectified_flow", "data")
        losses.append(float(loss(model, {"x": x}, torch.Generator().manual_seed(10)).mean()))
    assert losses[1] < losses[0] / 16, losses


def test_perflow_target_is_the_straight_line_to_the_teachers_solution():
    """On an exactly straight teacher flow (all mass at one point: x_t = (1 - t) m + t z, the
    ODE solution from any x_t is m) the piecewise target is the teacher's own velocity, so the
    exact teacher has zero loss up to its window solver's error on a straight path (none)."""
    from tiltflow.fewstep.reflow import PiecewiseReflowLoss

    m = torch.tensor([[1.5, -0.5]], dtype=F64)
    point = analytic.GaussianMixture([1.0], m, 1e-12 * torch.eye(2, dtype=F64)[None])
    teacher = point.denoiser("rectified_flow")
    x = m.expand(16, 2)
    loss = PiecewiseReflowLoss(teacher, windows=3, window_steps=2)
    assert float(loss(teacher, {"x": x}, torch.Generator().manual_seed(11)).max()) < 1e-18


def test_lcm_teacher_step_is_the_guided_solver_step():
    """For DDIM (linear in the model output) LCM's (1 + w) Psi(c) - w Psi(null) is exactly one
    DDIM step of the classifier-free guided teacher (tiltflow's guidance=w)."""
    from tiltflow.fewstep.student import GuidanceEmbedded

    mixture = analytic.eight_gaussians()
    teacher = mixture.denoiser("rectified_flow", conditional=True)
    model = GuidanceEmbedded(lambda x, t, cond=None: x, "rectified_flow", "data")
    loss = ConsistencyLoss(None, teacher=teacher, solver="ddim", scales=6, guidance=(1.5, 1.5))
    grid = loss.grid(teacher.schedule)
    i = torch.tensor([0, 2, 3, 5])
    x_hi = 3 * torch.randn(4, 2, generator=torch.Generator().manual_seed(12), dtype=F64)
    cond = torch.tensor([0, 3, 5, 7])
    got = loss._guided_teacher_step(model, x_hi, (i, grid), cond, None)
    expect = torch.cat([solvers.solve(teacher, x_hi[b:b + 1], grid[i[b]:i[b] + 2], "ddim",
                                      cond=cond[b:b + 1], guidance=1.5) for b in range(4)])
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-12)
    assert float(model.guidance.min()) == 1.5  # the student reads the same w


def test_scm_tangent_is_cos_times_the_consistency_functions_derivative():
    """sCM's g (before normalization, r = 1) is cos(s) d/ds f(x_s, s) along the ODE direction
    dx/ds, f the TrigFlow consistency function: checked by central differences (O(h^2) = 1e-8
    with h = 1e-4; the network's float32 time features, 1000 t rounded to ~6e-5, leave ~1e-3
    of the difference quotient)."""
    from tiltflow import nets, schedules
    from tiltflow.fewstep.scm import SCMLoss

    torch.manual_seed(0)
    net = nets.MLP(2, hidden=32, depth=2).double()
    torch.nn.init.normal_(net.out.weight, std=0.3)  # default init otherwise: a smooth function
    sd = 0.7
    model = Denoiser(net, schedules.Cosine(sd), "velocity")
    loss = SCMLoss(MIXTURE.denoiser("rectified_flow"), sd, tangent_warmup=0)
    x = torch.randn(6, 2, dtype=F64)
    s = torch.linspace(0.2, 1.3, 6, dtype=F64)
    dxds = torch.randn(6, 2, dtype=F64)
    _, g = loss.tangent(model, x, s, None, dxds)

    def f(x_, s_):
        return model(x_, 2 * s_ / torch.pi).data

    h = 1e-4
    dfds = (f(x + h * dxds, s + h) - f(x - h * dxds, s - h)) / (2 * h)
    torch.testing.assert_close(g, torch.cos(s)[:, None] * dfds, rtol=1e-3, atol=1e-3)
