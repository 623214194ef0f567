"""Short CPU runs of every few-step method: each improves its student's 1-step samples over
its initialization, resumes bit-identically, and refuses bad input with one clear error."""

from __future__ import annotations

import pytest
import torch

from tiltflow import Denoiser, analytic, fewstep, metrics
from tiltflow.errors import UserError

MIXTURE = analytic.eight_gaussians()
TEACHER = MIXTURE.denoiser("rectified_flow")
DATA = MIXTURE.sample(2048, generator=torch.Generator().manual_seed(0)).float()
REF = MIXTURE.sample(1000, generator=torch.Generator().manual_seed(1))
SMALL = {"batch_size": 128, "num_data": 1024, "lr": 1e-3, "warmup_steps": 10, "log_every": 10,
         "ckpt_every": 1000, "model": {"name": "mlp", "dim": 2, "hidden": 64, "depth": 2}}
STEPS = {"reflow": 150, "progressive_distillation": 100, "consistency_distillation": 100,
         "consistency_training": 150, "shortcut": 150, "meanflow": 150, "mmd": 300,
         "dmd": 150, "vsd": 150, "sid": 150, "easy_consistency_tuning": 150,
         "stable_consistency_tuning": 150, "phased_consistency_distillation": 150,
         "perflow": 150, "scm": 300}
EXTRA = {"progressive_distillation": {"teacher_steps": 4}, "consistency_distillation":
         {"scales": 8}, "consistency_training": {"s0": 4, "s1": 16}, "mmd": {"nfe": 1},
         "phased_consistency_distillation": {"phases": 2, "scales": 8},
         "perflow": {"windows": 2, "window_steps": 2},
         "dmd": {"regression_pairs": 256}}


def _sw2(student, nfe: int | None = None) -> float:
    """At the fewest steps the student supports (1; PCM: its phases)."""
    nfe = nfe or student.nfe[0]
    noise = torch.randn(1000, 2, generator=torch.Generator().manual_seed(2))
    x = fewstep.sample(student, noise, nfe=nfe, generator=torch.Generator().manual_seed(3))
    return metrics.sliced_w2(x.double(), REF, generator=torch.Generator().manual_seed(4))


def _distill(method, steps, **kw):
    cfg = {**SMALL, **EXTRA.get(method, {}), "steps": steps, **kw.pop("config", {})}
    return fewstep.distill(method, TEACHER, data=DATA, config=cfg, **kw)


def test_registry_lists_every_method():
    assert set(STEPS) <= set(fewstep.methods())


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(STEPS))
def test_short_run_improves_one_step_samples(method):
    """The initial students are far from the mixture (a zero output layer: a point mass, or
    the prior itself for a flow map), so a working method must at least halve the distance;
    the sliced-W2 noise floor at 1,000 points is ~0.1, well below both."""
    start = _sw2(_distill(method, 1))  # one warm-up step at lr / 10: the initialization
    trained = _sw2(_distill(method, STEPS[method]))
    assert trained < start / 2, (method, start, trained)


def test_reflow_with_instaflow_one_step_distillation():
    """The one-step stage samples in exactly one step and improves on its start."""
    cfg = {"one_step_steps": 100, "rounds": 1}
    start = _sw2(_distill("reflow", 1, config={**cfg, "one_step_steps": 1}))
    student = _distill("reflow", 100, config=cfg)
    assert student.nfe == (1, 1)
    assert _sw2(student) < start / 2


@pytest.mark.parametrize("method", ["consistency_distillation", "meanflow", "reflow"])
def test_resume_mid_distillation_is_bit_identical(method, tmp_path):
    """10 + 10 steps equal 20 uninterrupted ones (the consistency target's EMA, its step
    counter and the teacher samples or pairs come back from the run directory)."""
    full = _distill(method, 20, out_dir=tmp_path / "full")
    _distill(method, 10, out_dir=tmp_path / "split", config={"ckpt_every": 10})
    resumed = _distill(method, 20, out_dir=tmp_path / "split", resume=True)
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values(),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    loaded = fewstep.load(tmp_path / "split")
    noise = torch.randn(8, 2)
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(fewstep.sample(loaded, noise, 1, generator=g),
                               fewstep.sample(resumed, noise, 1,
                                              generator=torch.Generator().manual_seed(0)))


def test_sampler_uses_exactly_nfe_evaluations():
    calls = []

    def zero(x, t, cond=None):
        calls.append(1)
        return torch.zeros_like(x)

    for sampler, model in (("consistency", Denoiser.from_fn(zero, "rectified_flow", "velocity")),
                           ("flow_map", fewstep.FlowMap(zero)),
                           ("solver", Denoiser.from_fn(zero, "rectified_flow", "velocity"))):
        student = fewstep.Student(model, "test", sampler, (1, 8))
        for nfe in (1, 2, 4):
            calls.clear()
            fewstep.sample(student, torch.randn(3, 2), nfe)
            assert len(calls) == nfe, (sampler, nfe)


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="unknown few-step method"):
        fewstep.distill("nope", TEACHER)
    with pytest.raises(UserError, match="unknown config key.*valid keys"):
        fewstep.distill("reflow", TEACHER, config={"stepz": 3})
    with pytest.raises(UserError, match="positive integer"):
        fewstep.distill("reflow", TEACHER, config={"steps": 0})
    with pytest.raises(UserError, match="data shape"):
        fewstep.distill("reflow", Denoiser.from_fn(lambda x, t: x, "rectified_flow", "data"))
    with pytest.raises(UserError, match="teacher must be a tiltflow.Denoiser"):
        fewstep.distill("reflow", lambda x, t: x)
    student = fewstep.Student(TEACHER, "progressive_distillation", "solver", (2, 2))
    with pytest.raises(UserError, match="samples with nfe 2, got 3"):
        fewstep.sample(student, torch.randn(4, 2), nfe=3)
    with pytest.raises(UserError, match="powers of two"):
        fewstep.distill("progressive_distillation", TEACHER, data=DATA,
                        config={"teacher_steps": 6})
    with pytest.raises(UserError, match="not a few-step student|no checkpoint|does not exist"):
        fewstep.load(tmp_path)


def test_latent_consistency_distillation_learns_the_conditional_at_w_0():
    """Distilled from the exact class-conditional mixture (classes = components) with w in
    [0, 2], the student at w = 0 samples the class's Gaussian: 1-step sliced W2 to exact
    samples of the class must halve from the start."""
    teacher = MIXTURE.denoiser("rectified_flow", conditional=True)
    x, labels = MIXTURE.sample(2048, generator=torch.Generator().manual_seed(5),
                               return_labels=True)
    cfg = {**SMALL, "scales": 8, "w_min": 0.0, "w_max": 2.0}
    data = {"x": x.float(), "cond": labels}
    cond = torch.full((500,), 2)
    exact = MIXTURE.sample(20000, generator=torch.Generator().manual_seed(6),
                           return_labels=True)
    ref = exact[0][exact[1] == 2][:500]

    def sw2(student):
        noise = torch.randn(500, 2, generator=torch.Generator().manual_seed(7))
        out = fewstep.sample(student, noise, 1, cond=cond, guidance=0.0)
        return metrics.sliced_w2(out.double(), ref, generator=torch.Generator().manual_seed(8))

    start = sw2(fewstep.distill("latent_consistency_distillation", teacher, data=data,
                                config={**cfg, "steps": 1}))
    trained = sw2(fewstep.distill("latent_consistency_distillation", teacher, data=data,
                                  config={**cfg, "steps": 200}))
    assert trained < start / 2, (start, trained)
    with pytest.raises(UserError, match="no guidance input"):
        fewstep.sample(_distill("reflow", 1), torch.randn(2, 2), 1, guidance=1.0)
