"""diffusers models as tiltflow denoisers, and diffusers' time steps as tiltflow grids.

A diffusers pipeline splits sampling into a denoiser network (``unet`` or ``transformer``) and
a scheduler, which both *defines the noise schedule* the network was trained under and *steps
the sampler*. tiltflow keeps those apart: :func:`scheduler_spec` reads the schedule, the
prediction kind and the network's timestep convention out of a scheduler (or its config);
:func:`wrap` makes the network a :class:`~tiltflow.Denoiser`, so every tiltflow solver, guidance
and adaptation method runs on it; :func:`time_grid` turns the steps a configured scheduler
would take into a tiltflow time grid, so a tiltflow solver retraces diffusers' own sampler
(``tests/integrations/test_diffusers.py`` checks DDIM, Euler, DPM-Solver++ 2M, UniPC and
flow-matching Euler against diffusers' schedulers to 1e-5).

The mapping, diffusers -> tiltflow:

- DDPM-family schedulers (``beta_schedule``, ``trained_betas``, ...):
  :class:`~tiltflow.schedules.VPDiscrete` on the scheduler's own ``alphas_cumprod`` table.
  Timestep ``k`` is ``t = (k + 1) / N`` (:meth:`TimeMap.vp_discrete`): integer timesteps sit
  on the table's knots, between them log alpha is linear in t. ``prediction_type``
  ``"epsilon"`` -> ``"noise"``, ``"v_prediction"`` -> ``"v"`` (both ``alpha eps - sigma x``,
  Salimans & Ho 2022), ``"sample"`` -> ``"data"``.
- Flow matching (``FlowMatch*`` schedulers, or ``use_flow_sigmas`` with ``"flow_prediction"``
  in the multistep ones): :class:`~tiltflow.schedules.RectifiedFlow` with ``t = sigma`` and
  prediction ``"velocity"`` (diffusers' target ``noise - x`` is ``dx_t/dt``). The timestep is
  ``sigma * N`` (:meth:`TimeMap.flow`); Flux transformers take ``sigma`` and scale it inside.
  ``shift`` (SD3; Esser et al. 2024, sec. 5.3.2) and dynamic shifting (Flux) move the *time
  grid*, not the schedule: the network always sees ``x_t = (1 - sigma) x + sigma noise`` at
  timestep ``sigma * N``. Sample with ``grid="shifted"`` or the grid :func:`time_grid` gives.

diffusers is imported only by the functions that build diffusers objects
(:func:`load_pipeline`, a scheduler rebuilt from a config dict), so this module imports without
it (``benchmarks/peers.py`` uses its time map).
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..denoiser import Denoiser
from ..errors import UserError
from ..schedules import EDM, RectifiedFlow, Schedule, VPDiscrete

__all__ = ["TimeMap", "SchedulerSpec", "scheduler_spec", "wrap", "DiffusersNet", "time_grid",
           "with_cond", "SigmaSpace", "sigma_space", "LoadedPipeline", "load_pipeline", "PREDICTION_KINDS"]

#: diffusers' ``prediction_type`` -> tiltflow prediction kind (DDPM-family schedulers)
PREDICTION_KINDS = {"epsilon": "noise", "v_prediction": "v", "sample": "data"}

# transformers whose timestep argument is sigma in [0, 1] (their pipelines pass timestep / 1000)
_SIGMA_TIMESTEP_MODELS = ("FluxTransformer2DModel",)

_INSTALL = "pip install 'tiltflow[diffusers]'"


class TimeMap(NamedTuple):
    """A network's timestep argument as an affine function of tiltflow's time ``t``:
    ``timestep = scale * t + offset``."""

    scale: float
    offset: float

    @classmethod
    def vp_discrete(cls, num_train_timesteps: int) -> TimeMap:
        """DDPM-family: timestep ``k`` (0-based index into ``alphas_cumprod``) is ``t = (k + 1)
        / N``, where :class:`~tiltflow.schedules.VPDiscrete` puts that table entry."""
        return cls(float(num_train_timesteps), -1.0)

    @classmethod
    def flow(cls, num_train_timesteps: int) -> TimeMap:
        """Flow matching: ``timestep = sigma * N`` with ``sigma = t``
        (FlowMatchEulerDiscreteScheduler's ``timesteps = sigmas * num_train_timesteps``)."""
        return cls(float(num_train_timesteps), 0.0)

    def timestep(self, t):
        """The network's timestep at tiltflow time ``t`` (float or tensor)."""
        return t * self.scale + self.offset

    def time(self, timestep):
        """tiltflow's time at the network's ``timestep`` (inverse of :meth:`timestep`)."""
        return (timestep - self.offset) / self.scale


class SchedulerSpec(NamedTuple):
    """What a diffusers scheduler says about its network: the schedule it was trained under,
    the tiltflow prediction kind of its output, and its timestep convention."""

    schedule: Schedule
    prediction: str
    time_map: TimeMap


def _diffusers():
    try:
        import diffusers
    except ImportError as e:
        raise UserError(f"this needs diffusers, which is not installed: {_INSTALL}") from e
    return diffusers


def _read_config(scheduler_or_config) -> tuple[dict, str]:
    """``(config dict, scheduler class name)`` of a scheduler object or a config mapping."""
    if isinstance(scheduler_or_config, Mapping):
        config = dict(scheduler_or_config)
        return config, str(config.get("_class_name", ""))
    config = getattr(scheduler_or_config, "config", None)
    if not isinstance(config, Mapping):
        raise UserError(f"expected a diffusers scheduler or its config dict, got "
                        f"{type(scheduler_or_config).__name__}")
    return dict(config), type(scheduler_or_config).__name__


def _is_flow(name: str, config: dict) -> bool:
    """Whether the config describes a flow-matching model (module docstring)."""
    flow = name.startswith("FlowMatch") or bool(config.get("use_flow_sigmas"))
    kind = config.get("prediction_type")
    if flow and kind not in (None, "flow_prediction"):
        raise UserError(f"scheduler {name or 'config'} uses flow sigmas but prediction_type="
                        f"{kind!r}; flow matching needs prediction_type='flow_prediction'")
    if kind == "flow_prediction" and not flow:
        raise UserError(f"scheduler {name or 'config'} has prediction_type='flow_prediction' "
                        "without use_flow_sigmas=True; set it so the schedule is flow matching")
    if flow and config.get("invert_sigmas"):
        raise UserError("invert_sigmas=True (sampling from data to noise) is not supported; "
                        "wrap the model with a config that has invert_sigmas=False")
    return flow


def _prediction_kind(prediction_type) -> str:
    if prediction_type not in PREDICTION_KINDS:
        raise UserError(f"unsupported prediction_type {prediction_type!r}; tiltflow maps "
                        f"{sorted(PREDICTION_KINDS)} and flow matching ('flow_prediction')")
    return PREDICTION_KINDS[prediction_type]


def _alphas_cumprod(scheduler_or_config, name: str, config: dict) -> torch.Tensor:
    """The scheduler's ``alphas_cumprod`` table, from the object itself or rebuilt by
    diffusers from the config (its own beta schedules, not a copy of them)."""
    table = getattr(scheduler_or_config, "alphas_cumprod", None)
    if table is None:
        diffusers = _diffusers()
        cls = getattr(diffusers, name, None) if name else None
        if cls is None or not hasattr(cls, "from_config"):
            cls = diffusers.DDPMScheduler
        try:
            table = cls.from_config(config).alphas_cumprod
        except (NotImplementedError, ValueError, TypeError) as e:
            raise UserError(f"cannot build the noise schedule of scheduler {name or 'config'}: "
                            f"{_first_line(e)}") from e
        if table is None:
            raise UserError(f"scheduler {name or 'config'} has no alphas_cumprod table")
    return torch.as_tensor(table).detach().to(torch.float64).cpu()


def scheduler_spec(scheduler_or_config) -> SchedulerSpec:
    """The :class:`SchedulerSpec` of a diffusers scheduler or its config (a dict, e.g.
    ``scheduler.config`` or a loaded ``scheduler_config.json`` with ``_class_name``).

    Raises :class:`~tiltflow.errors.UserError` for a prediction type tiltflow does not map
    and for tables ``VPDiscrete`` cannot represent."""
    config, name = _read_config(scheduler_or_config)
    if config.get("timestep_type", "discrete") != "discrete":
        raise UserError(f"scheduler {name or 'config'} has timestep_type="
                        f"{config['timestep_type']!r}; tiltflow maps discrete timesteps only")
    n = int(config.get("num_train_timesteps") or 1000)
    if _is_flow(name, config):
        return SchedulerSpec(RectifiedFlow(), "velocity", TimeMap.flow(n))
    kind = _prediction_kind(config.get("prediction_type", "epsilon"))
    table = _alphas_cumprod(scheduler_or_config, name, config)
    try:
        schedule = VPDiscrete(table)
    except ValueError as e:
        raise UserError(f"scheduler {name or 'config'}: its alphas_cumprod {e}") from e
    return SchedulerSpec(schedule, kind, TimeMap.vp_discrete(schedule.num_steps))


def _model_dtype(model) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next(iter(model.parameters())).dtype


def _keywords(model) -> tuple[frozenset, bool]:
    """The conditioning keywords ``model.forward`` takes (all but its first argument, the
    timestep and ``return_dict``), and whether it takes any keyword (``**kwargs``)."""
    params = inspect.signature(model.forward).parameters.values()
    named = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    open_ = any(p.kind == p.VAR_KEYWORD for p in params)
    return frozenset(named[1:]) - {"timestep", "return_dict"}, open_


def _drop_learned_variance(out: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """Models with a learned variance (improved DDPM, DiT, IF) output ``2 C`` channels:
    ``[prediction, variance]``; deterministic sampling uses the first ``C``, as diffusers'
    pipelines do (``noise_pred.split(C, dim=1)``)."""
    if (out.shape != x_t.shape and out.dim() == x_t.dim() >= 2
            and out.shape[1] == 2 * x_t.shape[1] and out.shape[2:] == x_t.shape[2:]):
        return out[:, : x_t.shape[1]]
    return out


class DiffusersNet(nn.Module):
    """``net(x_t, t, cond)`` for :class:`~tiltflow.Denoiser`: calls the diffusers ``model``
    at timestep ``time_map.timestep(t)`` and returns its prediction in ``x_t``'s dtype.

    ``cond`` is ``None``, a tensor, or a dict of the model's own keyword arguments:

    - a tensor goes to ``encoder_hidden_states`` when the model takes it (UNet2DConditionModel,
      SD3 / Flux transformers: text embeddings), else to ``class_labels`` (UNet2DModel);
    - a dict passes its entries by name, e.g. ``{"encoder_hidden_states": e,
      "pooled_projections": p}`` for SD3; a key the model's ``forward`` does not take raises
      :class:`~tiltflow.errors.UserError` (no pass-through that swallows typos).

    Class labels ``-1`` (tiltflow's "no label", what classifier-free guidance sends) become
    ``null_class`` when it is given (DiT's null class is ``num_classes``). Floating-point
    inputs are cast to the model's dtype; the timestep is passed as float32, as pipelines do.
    """

    def __init__(self, model: nn.Module, time_map: TimeMap, *, null_class: int | None = None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise UserError(f"expected a diffusers model (an nn.Module), got {type(model).__name__}")
        self.model, self.time_map, self.null_class = model, TimeMap(*time_map), null_class
        self.keywords, self.open_keywords = _keywords(model)
        self.primary = next((k for k in ("encoder_hidden_states", "class_labels")
                             if k in self.keywords), None)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        dtype = _model_dtype(self.model)
        wide = t if t.device.type == "mps" else t.to(torch.float64)  # MPS has no float64
        timestep = self.time_map.timestep(wide).to(torch.float32)
        out = self.model(x_t.to(dtype), timestep=timestep, **self._cond_kwargs(cond, dtype),
                         return_dict=False)[0]
        return _drop_learned_variance(out, x_t).to(x_t.dtype)

    def _cond_kwargs(self, cond, dtype) -> dict[str, Any]:
        if cond is None:
            return {}
        name = type(self.model).__name__
        if torch.is_tensor(cond):
            if self.primary is None:
                raise UserError(f"{name} takes no conditioning tensor; call it with cond=None")
            cond = {self.primary: cond}
        if not isinstance(cond, Mapping):
            raise UserError(f"cond must be None, a tensor or a dict of {name}'s keyword "
                            f"arguments, got {type(cond).__name__}")
        unknown = sorted(set(cond) - self.keywords) if not self.open_keywords else []
        if unknown:
            raise UserError(f"{name} takes no argument(s) {unknown}; its conditioning "
                            f"arguments: {sorted(self.keywords)}")
        return {k: self._prepare(k, v, dtype) for k, v in cond.items()}

    def _prepare(self, key: str, value, dtype):
        if not torch.is_tensor(value):
            return value
        if key == "class_labels" and self.null_class is not None:
            return torch.where(value < 0, torch.full_like(value, self.null_class), value)
        return value.to(dtype) if value.is_floating_point() else value


def _model_time_map(model, spec: SchedulerSpec) -> TimeMap:
    if type(model).__name__ in _SIGMA_TIMESTEP_MODELS:
        return TimeMap(1.0, 0.0)
    return spec.time_map


def wrap(model: nn.Module, scheduler_or_config, *, null_class: int | None = None,
         time_map: TimeMap | None = None) -> Denoiser:
    """A diffusers denoiser ``model`` (UNet2DModel, UNet2DConditionModel, SD3 / Flux
    transformers, ...) trained under ``scheduler_or_config``, as a tiltflow
    :class:`~tiltflow.Denoiser`.

    The schedule and prediction kind come from :func:`scheduler_spec`; ``cond`` and
    ``null_class`` work as in :class:`DiffusersNet`; ``time_map`` overrides the model's
    timestep convention (default: the scheduler's, :class:`TimeMap`). The model is a submodule
    of the returned denoiser, so its parameters train with it.

    >>> den = wrap(pipe.unet, pipe.scheduler)
    >>> x = tiltflow.sample(den, torch.randn(1, 4, 64, 64), solver="dpmpp_2m", nfe=20,
    ...                     cond=text_embeddings)
    """
    spec = scheduler_spec(scheduler_or_config)
    net = DiffusersNet(model, time_map or _model_time_map(model, spec), null_class=null_class)
    return Denoiser.from_fn(net, spec.schedule, spec.prediction)


class _FixedCond(nn.Module):
    """``net(x_t, t)``: ``denoiser`` at ``(x_t, t)`` with conditioning ``cond`` fixed."""

    def __init__(self, denoiser: Denoiser, cond):
        super().__init__()
        self.denoiser, self.cond = denoiser, cond
        self.kind = "data" if denoiser.precondition else denoiser.prediction

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.denoiser(x_t, t, self.cond).as_kind(self.kind)


def with_cond(denoiser: Denoiser, cond) -> Denoiser:
    """``denoiser`` with its conditioning fixed to ``cond`` (called with ``cond=None``).

    ``tiltflow.sample`` / ``solve`` pass ``cond`` only as one tensor with the batch as its
    leading dim; conditioning made of several tensors (SD3 / Flux: ``{"encoder_hidden_states":
    ..., "pooled_projections": ...}``) goes in here instead, for a batch of the same size."""
    inner = _FixedCond(denoiser, cond)
    return Denoiser.from_fn(inner, denoiser.schedule, inner.kind)


# -- time grids -------------------------------------------------------------------------------
def _as_float64(values) -> torch.Tensor:
    return torch.as_tensor(values).detach().cpu().to(torch.float64).flatten()


def _times_at_levels(spec: SchedulerSpec, levels: torch.Tensor) -> torch.Tensor:
    """tiltflow times of diffusers ``sigmas``: flow matching's ``sigma`` is ``t``; a VP
    scheduler's ``sigma = sigma_t / alpha_t`` has log-SNR ``-2 log sigma`` (0 is t = 0)."""
    if isinstance(spec.schedule, RectifiedFlow):
        return levels
    t = spec.schedule.t_from_logsnr(-2 * torch.log(levels))
    return torch.where(levels == 0, torch.zeros_like(t), t)


def _posterior_end_time(scheduler, spec: SchedulerSpec, timesteps: torch.Tensor) -> float:
    """End time of a scheduler stepping ``k -> k - N // steps`` (DDIM, DDPM): the steps must
    chain (each ends at the next timestep) to form one grid; past timestep 0 the scheduler uses
    ``final_alpha_cumprod`` (1 with DDIM's ``set_alpha_to_one=True``, i.e. t = 0)."""
    n, steps = int(scheduler.config.num_train_timesteps), int(scheduler.num_inference_steps)
    stride = n // steps
    ends = timesteps.round().to(torch.int64) - stride
    if not torch.equal(ends[:-1], timesteps[1:].round().to(torch.int64)):
        raise UserError(f"{type(scheduler).__name__} steps each timestep k to k - {stride}, which "
                        f"is not its next timestep with {steps} steps: these steps form no single "
                        f"time grid; use a step count dividing num_train_timesteps={n} or "
                        "timestep_spacing='leading'")
    if int(ends[-1]) >= 0:
        return float(spec.time_map.time(float(ends[-1])))
    final = float(getattr(scheduler, "final_alpha_cumprod", 1.0))
    if final >= 1.0:
        return 0.0
    return float(spec.schedule.t_from_logsnr(torch.tensor(math.log(final / (1 - final)),
                                                          dtype=torch.float64)))


def _warn_off_grid(scheduler, spec: SchedulerSpec, times: torch.Tensor, sigmas: torch.Tensor):
    """Warn when the scheduler's step sizes (its ``sigmas``) are not the schedule's noise levels
    at the timesteps its model sees: e.g. Karras sigmas with rounded timesteps, or
    ``interpolation_type="linear"`` (sigma linear in the timestep) at fractional timesteps,
    where VPDiscrete interpolates log alpha. The grid follows the timesteps."""
    if isinstance(spec.schedule, RectifiedFlow):
        level = times
    else:
        c = spec.schedule(times)
        level = c.sigma / c.alpha
    off = float(((level - sigmas[:-1]).abs() / sigmas[:-1].abs().clamp_min(1e-12)).max())
    if off > 1e-4:
        warnings.warn(f"{type(scheduler).__name__}'s sigmas differ from the schedule at its "
                      f"timesteps by up to {off:.1e} (relative): this grid follows the timesteps "
                      "its model sees, so its steps differ from diffusers' (or use "
                      "follow='sigmas': diffusers' steps, with the model at those times)",
                      stacklevel=3)


def time_grid(scheduler, spec: SchedulerSpec | None = None, *, follow: str = "timesteps"
              ) -> torch.Tensor:
    """The float64 tiltflow time grid of the steps ``scheduler`` takes (call its
    ``set_timesteps`` first), ending where its last step ends (``sigmas[-1]``: 0 for
    ``final_sigmas_type="zero"``; ``final_alpha_cumprod`` for DDIM).

    ``follow="timesteps"`` (default) places the grid at the timesteps where the scheduler
    evaluates the model, so a tiltflow solver on it calls the model at the very timesteps
    diffusers does. ``follow="sigmas"`` places it at the scheduler's ``sigmas`` (its step
    sizes) instead; the two differ where diffusers rounds or truncates timesteps (Karras
    sigmas; ``use_flow_sigmas`` in the multistep schedulers, whose int64 timesteps truncate
    ``sigma * N``), and :func:`time_grid` warns then (:func:`_warn_off_grid`). Pass the grid as
    ``tiltflow.solvers.solve(den, x, grid, ...)`` or ``tiltflow.sample(..., grid=grid)``."""
    if follow not in ("timesteps", "sigmas"):
        raise ValueError(f"follow must be 'timesteps' or 'sigmas', got {follow!r}")
    spec = spec or scheduler_spec(scheduler)
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise UserError(f"{type(scheduler).__name__} has no timesteps yet: call "
                        "scheduler.set_timesteps(steps) first")
    timesteps = _as_float64(scheduler.timesteps)
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is None and follow == "sigmas":
        raise UserError(f"{type(scheduler).__name__} has no sigmas; use follow='timesteps'")
    if sigmas is None:
        end = torch.tensor([_posterior_end_time(scheduler, spec, timesteps)], dtype=torch.float64)
        grid = torch.cat([spec.time_map.time(timesteps), end])
    else:
        at_levels = _times_at_levels(spec, _as_float64(sigmas))
        if follow == "timesteps":
            times = spec.time_map.time(timesteps)
            _warn_off_grid(scheduler, spec, times, _as_float64(sigmas))
            grid = torch.cat([times, at_levels[-1:]])
        else:
            grid = at_levels
    if not bool((grid[1:] < grid[:-1]).all()) or not 0 <= float(grid[-1]) <= float(grid[0]) <= 1:
        raise UserError(f"{type(scheduler).__name__}'s timesteps give no decreasing grid in [0, 1]")
    return grid


class SigmaSpace(NamedTuple):
    """A denoiser seen in diffusers' "sigma space" (:func:`sigma_space`)."""

    denoiser: Denoiser
    grid: torch.Tensor  # float64 times of the EDM schedule: level / level[0]
    scale: torch.Tensor  # 1 / alpha at each point of the original grid: x_edm = scale * x


def sigma_space(denoiser: Denoiser, grid: torch.Tensor) -> SigmaSpace:
    """``denoiser`` and ``grid`` in the variables of diffusers' Euler-type schedulers
    (EulerDiscrete, Heun, LMS: Karras et al. 2022, sec. 4): state ``x_t / alpha_t``, noise
    level ``sigma_t / alpha_t``. That is tiltflow's :class:`~tiltflow.schedules.EDM` schedule
    (``alpha = 1``, ``sigma = sigma_max t``) with ``sigma_max`` the level at ``grid[0]``, reached
    with :meth:`Denoiser.with_schedule` (same log-SNR, rescaled state). Start from
    ``scale[0] * x`` (diffusers' ``init_noise_sigma * noise`` at the first step)."""
    c = denoiser.schedule(grid)
    level = c.sigma / c.alpha
    edm = EDM(sigma_max=float(level[0]))
    return SigmaSpace(denoiser.with_schedule(edm), level / level[0], 1 / c.alpha)


# -- loading ----------------------------------------------------------------------------------
class LoadedPipeline(NamedTuple):
    pipeline: Any  # the diffusers DiffusionPipeline
    denoiser: Denoiser  # its unet / transformer with its scheduler, wrapped


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _pipeline_denoiser(pipe, path: Path) -> nn.Module:
    for name in ("transformer", "unet"):
        model = getattr(pipe, name, None)
        if isinstance(model, nn.Module):
            return model
    raise UserError(f"{path}: the pipeline has neither a 'unet' nor a 'transformer' component")


def _dtype_option(diffusers, dtype: torch.dtype | None) -> dict:
    """``from_pretrained``'s dtype keyword: ``dtype`` where diffusers has it (newer releases
    deprecate ``torch_dtype``; their loader resolves both in ``_resolve_dtype``), else
    ``torch_dtype``."""
    if dtype is None:
        return {}
    from diffusers.pipelines import pipeline_utils

    return {"dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype": dtype}


def load_pipeline(directory, *, dtype: torch.dtype | None = None,
                  null_class: int | None = None) -> LoadedPipeline:
    """Load a diffusers pipeline saved in a local ``directory`` (``save_pretrained``; never
    the hub: ``local_files_only=True``) in ``dtype`` (default: diffusers', float32), and wrap its
    denoiser with its scheduler (:func:`wrap`).

    Raises :class:`~tiltflow.errors.UserError` with a one-line message when ``directory`` is
    not a pipeline, fails to load, or uses a prediction type tiltflow does not map."""
    path = Path(directory)
    if not path.is_dir():
        raise UserError(f"{path}: no such directory (a diffusers pipeline is a directory "
                        "with model_index.json)")
    if not (path / "model_index.json").is_file():
        raise UserError(f"{path} is not a diffusers pipeline: it has no model_index.json "
                        "(save one with pipeline.save_pretrained(directory))")
    diffusers = _diffusers()
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(path, local_files_only=True,
                                                           **_dtype_option(diffusers, dtype))
    except (OSError, ValueError, TypeError, KeyError, ImportError, AttributeError) as e:
        raise UserError(f"{path}: cannot load the diffusers pipeline: {_first_line(e)}") from e
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None:
        raise UserError(f"{path}: the pipeline has no scheduler, so its noise schedule is unknown")
    return LoadedPipeline(pipe, wrap(_pipeline_denoiser(pipe, path), scheduler,
                                     null_class=null_class))
