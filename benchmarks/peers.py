"""Peer samplers for the ``solvers`` suite, driven by any exact model through one adapter each.

Each peer integrates the *same* probability-flow ODE from the *same* start state ``x_1`` as
tiltflow's solvers do, so its endpoint is compared with the reference solution of that ODE:

- **diffusers** schedulers (DDIM, DPM-Solver++ 2M/3M, UniPC, DEIS, Euler, Heun) configured as
  DDPM's linear-beta VP (``beta_start=1e-4, beta_end=0.02``, 1000 training steps),
  ``timestep_spacing="trailing"``, ``clip_sample=False``, ``prediction_type="epsilon"``. A
  diffusers timestep ``k`` is tiltflow's ``VPDiscrete`` time ``t = (k + 1) / 1000`` (the one
  mapping, ``tiltflow.integrations.diffusers.TimeMap.vp_discrete``), so the model is fed
  ``eps(x_t, (k + 1) / 1000)``. The VP schedulers take the VP
  state itself (``init_noise_sigma = 1``: the sample *is* ``x_1``); Euler and Heun work on the
  scaled state ``x_t / alpha_t`` with ``sigma = sqrt((1 - alphabar) / alphabar)``, so they start
  from ``x_1 / alpha_1`` (equal to ``init_noise_sigma * noise`` for ``x_1 = sigma_1 * noise``)
  and ``scale_model_input`` turns their state back into ``x_t``.
  Final steps: DDIM (``set_alpha_to_one=True``), DPM-Solver++, UniPC (``final_sigmas_type=
  "zero"``), Euler and Heun end at clean data (t = 0); **DEIS ends at timestep 0, i.e.
  t = 1/1000** (its ``sigmas`` end at ``sigma(alphabar_0)``), so its reference is the ODE
  solution at that time (``END_T``). Heun spends ``2 n - 1`` evaluations on ``n`` steps (the last
  step to sigma = 0 is an Euler step).
- **flow_matching**'s ``ODESolver`` (torchdiffeq fixed-grid ``euler``/``midpoint``/``rk4``) on the
  rectified-flow path. flow_matching integrates from ``t_fm = 0`` (noise) to 1 (data), so its
  velocity at ``t_fm`` is ``-v(x, t = 1 - t_fm)`` with ``v`` tiltflow's ``dx_t/dt``. The time grid
  is passed explicitly (``step_size=None``), uniform in t.

Every call of the model is counted, so NFE is measured, not assumed.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable

import torch

from tiltflow.integrations.diffusers import TimeMap

NUM_TRAIN = 1000
VP_TIME = TimeMap.vp_discrete(NUM_TRAIN)  # diffusers timestep k <-> VPDiscrete t = (k + 1) / N

# name -> (class name, extra config, evaluations per step, evaluations saved on the last step)
DIFFUSERS = {
    "diffusers DDIM": ("DDIMScheduler", {"set_alpha_to_one": True}, 1, 0),
    "diffusers DPM++2M": ("DPMSolverMultistepScheduler",
                          {"solver_order": 2, "algorithm_type": "dpmsolver++"}, 1, 0),
    "diffusers DPM++3M": ("DPMSolverMultistepScheduler",
                          {"solver_order": 3, "algorithm_type": "dpmsolver++"}, 1, 0),
    "diffusers UniPC": ("UniPCMultistepScheduler", {}, 1, 0),
    "diffusers DEIS": ("DEISMultistepScheduler", {}, 1, 0),
    "diffusers Euler": ("EulerDiscreteScheduler", {}, 1, 0),
    "diffusers Heun": ("HeunDiscreteScheduler", {}, 2, 1),
}
# where each sampler's output lives in tiltflow's time (VPDiscrete: timestep k is (k + 1) / N)
END_T = {name: 0.0 for name in DIFFUSERS}
END_T["diffusers DEIS"] = VP_TIME.time(0.0)  # = 1 / NUM_TRAIN
SIGMA_SPACE = {"diffusers Euler", "diffusers Heun"}  # state is x_t / alpha_t

FLOW_MATCHING = {"flow_matching euler": ("euler", 1), "flow_matching midpoint": ("midpoint", 2),
                 "flow_matching rk4": ("rk4", 4)}


def have_diffusers() -> bool:
    return importlib.util.find_spec("diffusers") is not None


def have_flow_matching() -> bool:
    return importlib.util.find_spec("flow_matching") is not None


def available(schedule_name: str) -> list[str]:
    """Peers that run on this schedule (and whose library is installed)."""
    if schedule_name == "vp_discrete_linear":
        return list(DIFFUSERS) if have_diffusers() else []
    if schedule_name == "rectified_flow":
        return list(FLOW_MATCHING) if have_flow_matching() else []
    return []


def steps_for_nfe(name: str, nfe: int) -> int | None:
    """Steps that spend exactly ``nfe`` evaluations, or None if impossible."""
    per, saved = (DIFFUSERS[name][2:] if name in DIFFUSERS else (FLOW_MATCHING[name][1], 0))
    steps, rem = divmod(nfe + saved, per)
    return steps if rem == 0 and steps >= 1 else None


def end_time(name: str) -> float:
    return END_T.get(name, 0.0)


def make_scheduler(name: str):
    import diffusers

    cls_name, extra, _, _ = DIFFUSERS[name]
    cls = getattr(diffusers, cls_name)
    params = inspect.signature(cls.__init__).parameters
    config = dict(num_train_timesteps=NUM_TRAIN, beta_start=1e-4, beta_end=0.02,
                  beta_schedule="linear", timestep_spacing="trailing", prediction_type="epsilon")
    for flag in ("clip_sample", "thresholding"):
        if flag in params:
            config[flag] = False
    return cls(**config, **extra)


def diffusers_sample(name: str, eps_fn: Callable, x_init: torch.Tensor, steps: int,
                     scheduler=None) -> tuple[torch.Tensor, int]:
    """Run diffusers' ``name`` scheduler for ``steps`` steps from the VP state ``x_init`` at
    t = 1 (diffusers timestep 999). ``eps_fn(x_t, t: float)`` is the noise prediction at
    tiltflow's VPDiscrete time t. Returns ``(x_end [VP state at END_T[name]], calls)``."""
    sched = scheduler if scheduler is not None else make_scheduler(name)
    sched.set_timesteps(steps)
    calls = 0
    if name in SIGMA_SPACE:
        ac_last = float(sched.alphas_cumprod[-1])
        sample = x_init / ac_last**0.5  # x_t / alpha_t at t = 1
    else:
        sample = x_init
    for k in sched.timesteps:
        model_in = sched.scale_model_input(sample, k)
        eps = eps_fn(model_in, VP_TIME.time(float(k)))
        calls += 1
        sample = sched.step(eps, k, sample).prev_sample
    # Euler/Heun end at sigma = 0, where x_t / alpha_t is x_0 itself.
    return sample, calls


class _Velocity(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn, self.calls = fn, 0

    def forward(self, x, t, **extras):
        self.calls += 1
        return self.fn(x, t)


def flow_matching_sample(name: str, velocity_fn: Callable, x_init: torch.Tensor, steps: int
                         ) -> tuple[torch.Tensor, int]:
    """flow_matching's ODESolver with ``FLOW_MATCHING[name]``'s method on a uniform grid of
    ``steps`` steps from ``x_init`` (noise end) to data. ``velocity_fn(x, t: float)`` is
    tiltflow's ``dx_t/dt`` at tiltflow time t. Returns ``(x_end, calls)``."""
    from flow_matching.solver import ODESolver

    method = FLOW_MATCHING[name][0]
    model = _Velocity(lambda x, t_fm: -velocity_fn(x, 1.0 - float(t_fm)))
    grid = torch.linspace(0.0, 1.0, steps + 1, dtype=x_init.dtype)
    x = ODESolver(velocity_model=model).sample(x_init=x_init, step_size=None, method=method,
                                               time_grid=grid)
    return x, model.calls
