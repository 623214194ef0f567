"""The solvers' low-overhead path equals the general one.

With scalar coefficients a raw network output of any kind is read as ``p * raw + q * x_t``
(two tensor operations, maps precomputed per grid time) and a whole update as one
:meth:`Prediction.combine`; a guided (hub-based) prediction goes through the general
``(x_hat, eps_hat)`` formulas instead. Both must give the same samples. On CUDA the solvers
must also stay free of host-device syncs.
"""

from __future__ import annotations

import pytest
import torch

import tiltflow as tf
from tiltflow import Prediction, schedules
from tiltflow.predictions import KINDS, scale

F64 = torch.float64

# every solver in ode.py, sde.py, dpm.py, multistep.py, stochastic.py and the fixed-step rk.py
SOLVERS = ["euler", "heun", "ddim", "dpm_solver_1", "dpm_solver_2", "dpm_solver_3", "dpmpp_2s",
           "dpmpp_2m", "dpmpp_3m", "unipc", "unipc_p", "deis", "ipndm", "ddpm", "euler_maruyama",
           "edm_sde", "dpmpp_2m_sde", "pc", "annealed_langevin", "midpoint", "rk4", "rk4_38"]


_W = {}  # the stand-in's weights per (device, dtype), made on first use (outside a sync check)


def _net(x_t, t, cond=None):
    """A smooth nonlinear stand-in for a network (any output kind)."""
    key = (x_t.device, x_t.dtype)
    if key not in _W:
        _W[key] = torch.tensor([[0.7, -0.3], [0.2, 0.9]], dtype=x_t.dtype, device=x_t.device)
    y = torch.tanh(x_t @ _W[key]) * (1 + t[:, None])
    y = y + 0.3 * x_t * torch.cos(3 * t[:, None])
    return y if cond is None else y + 0.25 * (cond[:, None].to(x_t.dtype) + 1)


class _HubOnly:
    """A guidance that changes nothing but returns the prediction as a hub pair, so solvers
    take the general path."""

    def __call__(self, denoiser, x_t, t, cond, coeffs=None, time=None):
        pred = denoiser(x_t, t, cond, coeffs=coeffs)
        return Prediction.from_hub(*pred.hub, x_t, pred.coeffs)


@pytest.mark.parametrize("kind", KINDS)
def test_combine_fast_path_equals_hub_path(kind):
    sched = schedules.Cosine()
    g = torch.Generator().manual_seed(0)
    x_t, raw, plus = (torch.randn(6, 3, dtype=F64, generator=g) for _ in range(3))
    c = sched.scalars([0.37])[0]
    fast = Prediction(raw, kind, x_t, c)
    slow = Prediction.from_hub(*Prediction(raw, kind, x_t, c).hub, x_t, c)
    weights = {"data": 0.3, "noise": -1.2, "velocity": 0.05, "v": 0.0, "score": 0.7}
    for k in KINDS:
        torch.testing.assert_close(fast.as_kind(k), slow.as_kind(k), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.combine(x_t=0.8, plus=plus, **weights),
                               slow.combine(x_t=0.8, plus=plus, **weights), rtol=1e-12, atol=1e-12)
    assert fast.combine(**{kind: 1.0}) is not raw  # always a fresh tensor (solvers add into it)


def test_combine_leaves_out_zero_weights():
    """A kind with weight 0 is not read: at alpha = 0 a noise-predicting model's data reading is
    infinite, which must not turn a pure-noise combination into nan."""
    c = schedules.RectifiedFlow().scalars([1.0])[0]
    x_t, raw = torch.ones(2, 2), torch.full((2, 2), 0.5)
    out = Prediction(raw, "noise", x_t, c).combine(noise=2.0, data=0.0)
    assert torch.equal(out, 2 * raw)


@pytest.mark.parametrize("name", ["vp_discrete_linear", "edm", "cosine"])
def test_preconditioning_with_scalar_coefficients_equals_tensor_form(name):
    """Solvers pass scalar float64 coefficients; the EDM-preconditioned denoiser then uses cached
    float weights instead of evaluating the schedule, with the same result."""
    sched = schedules.examples()[name]
    den = tf.Denoiser.from_fn(_net, sched, "data", precondition=True, sigma_data=0.7)
    x_t = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(6))
    for time in (0.9, 0.5, 0.03):
        t = torch.full((4,), time, dtype=F64)
        general = den(x_t, t)
        fast = den(x_t, t, coeffs=sched.scalars([time])[0])
        assert fast.coeffs.is_scalar and not general.coeffs.is_scalar
        torch.testing.assert_close(fast.data, general.data, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64])
def test_scale_is_exactly_a_multiply(dtype):
    x = torch.randn(1000, dtype=F64, generator=torch.Generator().manual_seed(1)).to(dtype)
    for a in (0.3, -1e-7, 12345.678, 0.0, 1.0):
        assert torch.equal(scale(x, a), x * a)
    y = torch.randn(3, dtype=F64, requires_grad=True)
    scale(y, 0.5).sum().backward()
    assert torch.equal(y.grad, torch.full((3,), 0.5, dtype=F64))


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("kind", ["noise", "data", "velocity"])
def test_solver_fast_path_equals_general_path(solver, kind):
    den = tf.Denoiser.from_fn(_net, schedules.VPLinear(), kind)
    grid = tf.solvers.grids.uniform(7)
    x = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    out = {}
    for name, guidance in (("fast", None), ("general", _HubOnly())):
        record = []
        out[name] = tf.solvers.solve(den, x, grid, solver, guidance=guidance, record=record,
                                     generator=torch.Generator().manual_seed(3))
        out[name + "_record"] = torch.stack([r.x_next for r in record])
    scale_ = out["fast"].abs().max()
    torch.testing.assert_close(out["fast"], out["general"], rtol=1e-9, atol=1e-9 * scale_)
    torch.testing.assert_close(out["fast_record"], out["general_record"], rtol=1e-9,
                               atol=1e-9 * out["fast_record"].abs().max())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("solver", SOLVERS)
def test_solvers_are_sync_free_on_cuda(solver):
    """No host-device sync inside sampling, guided or recorded, and the same samples as on CPU."""
    den = tf.Denoiser.from_fn(_net, schedules.VPLinear(), "noise")
    noise = torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(4))
    cond = torch.arange(8) % 3 - 1
    runs = {}
    for device in ("cpu", "cuda"):
        for mode in ("plain", "guided", "record"):
            kw = {"guidance": 1.5, "cond": cond.to(device)} if mode == "guided" else {}
            if mode == "record":
                kw["record"] = []
            x = noise.to(device)  # copies to the device stay outside the checked call

            def go(device=device, kw=kw, x=x):
                gen = torch.Generator(device=device).manual_seed(5)
                return tf.sample(den, x, solver, steps=5, generator=gen, **kw)

            if device == "cuda":
                go()  # warm-up: allocations, caches
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    runs[device, mode] = go()
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            else:
                runs[device, mode] = go()
    if tf.solvers.get(solver).stochastic:
        return  # CPU and CUDA generators draw different noise
    for mode in ("plain", "guided", "record"):
        torch.testing.assert_close(runs["cuda", mode].cpu(), runs["cpu", mode], rtol=1e-10,
                                   atol=1e-10)
