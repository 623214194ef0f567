"""On CUDA the solvers stay free of host-device syncs and give the CPU's samples."""

from __future__ import annotations

import pytest
import torch

import tiltflow as tf
from tiltflow import schedules

F64 = torch.float64
SOLVERS = [s for s in tf.solvers.available()
           if not tf.solvers.get(s).adaptive and s not in ("bespoke", "dpm_solver_v3")]

_W = {}  # the stand-in's weights per (device, dtype), made on first use (outside a sync check)


def _net(x_t, t, cond=None):
    """A smooth nonlinear stand-in for a network (any output kind)."""
    key = (x_t.device, x_t.dtype)
    if key not in _W:
        _W[key] = torch.tensor([[0.7, -0.3], [0.2, 0.9]], dtype=x_t.dtype, device=x_t.device)
    y = torch.tanh(x_t @ _W[key]) * (1 + t[:, None])
    y = y + 0.3 * x_t * torch.cos(3 * t[:, None])
    return y if cond is None else y + 0.25 * (cond[:, None].to(x_t.dtype) + 1)


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
    # float64 tanh / cos differ between the CPU and CUDA math libraries by a few ulps (~1e-15
    # relative); 5 steps, amplified at most by 1/alpha(1) = 150 of the first, keep that <~ 1e-12
    for mode in ("plain", "guided", "record"):
        torch.testing.assert_close(runs["cuda", mode].cpu(), runs["cpu", mode], rtol=1e-10,
                                   atol=1e-10)
