"""What every fitted solver shares: the endpoint RMSE it is fitted on, the start states and
reference endpoints, the Adam loop, save / load (one ``.safetensors`` file with a JSON header)
and the registry entry ``"bespoke"`` that samples with any fitted solver.

Files (``save``/``load``): one ``.safetensors`` file holding the float64 parameters; its header
metadata carries JSON with the kind, NFE, base solver, schedule config, a description of the model
it was fitted on and fit statistics. Written atomically (temp file + fsync + rename); ``load``
validates everything and raises :class:`~tiltflow.errors.UserError` with a one-line fix.
"""

from __future__ import annotations

import abc
import json
import math
import sys
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ...errors import UserError
from ...fileio import atomic_write_bytes
from ...metrics import endpoint_rmse
from ...schedules import get_schedule
from ..reference import reference_solve
from ..registry import register

FORMAT_VERSION = 1
F64 = torch.float64
KINDS: dict[str, type] = {}  # "bespoke" / "bns" / "grid" -> class, filled by the subclasses


def start_state(denoiser, noise: torch.Tensor, t_start: float = 1.0) -> torch.Tensor:
    sigma = float(denoiser.schedule(torch.tensor([t_start], dtype=F64)).sigma)
    return sigma * noise


def fit_targets(denoiser, noises, reference, cond):
    check_noises(noises)
    x_init = start_state(denoiser, noises)
    if reference is None:
        reference = reference_solve(denoiser, x_init, cond=cond).to(x_init.dtype)
    if reference.shape != noises.shape:
        raise ValueError(f"reference shape {tuple(reference.shape)} != noises "
                         f"{tuple(noises.shape)}; pass the reference endpoints of these noises")
    return x_init, reference


def select(cond, idx):
    return None if cond is None else cond[idx]


def check_noises(noises) -> None:
    if not torch.is_tensor(noises) or not noises.is_floating_point() or noises.dim() < 2:
        raise ValueError("noises must be a float tensor [B, ...] of standard-normal draws")


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar on a terminal (as training's); none in a log file, where its redraws would
    bury the messages, e.g. a one-line error after the fit."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)



# -- the common base: description, schedule check, save/load ------------------------------------

def _same_schedule(a: dict, b: dict) -> bool:
    if a.get("name") != b.get("name") or set(a) != set(b):
        return False
    for k in a:
        va, vb = a[k], b[k]
        if isinstance(va, (int, float)) and isinstance(vb, (int, float)):
            if not math.isclose(va, vb, rel_tol=1e-9, abs_tol=1e-12):
                return False
        elif isinstance(va, list) and isinstance(vb, list):
            if len(va) != len(vb) or not torch.allclose(
                    torch.tensor(va, dtype=F64), torch.tensor(vb, dtype=F64), rtol=1e-9):
                return False
        elif va != vb:
            return False
    return True


class FittedSolver(abc.ABC):
    """Shared machinery of fitted solvers. Subclasses set ``kind`` and implement
    ``_tensors()``, ``_from_tensors()`` and ``solve()``."""

    kind = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        KINDS[cls.kind] = cls  # what load() builds from a file's "kind"

    def __init__(self, *, nfe: int, base: str, schedule, model: dict | None = None,
                 fit: dict | None = None, t_start: float = 1.0):
        self.nfe = int(nfe)
        self.base = str(base)
        self.schedule = get_schedule(schedule)
        self.model = dict(model or {})
        self.fit_info = dict(fit or {})
        self.t_start = float(t_start)

    # description -------------------------------------------------------------------------------
    def config(self) -> dict:
        return {"format": FORMAT_VERSION, "kind": self.kind, "nfe": self.nfe, "base": self.base,
                "t_start": self.t_start, "schedule": self.schedule.config(),
                "model": self.model, "fit": self.fit_info}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(nfe={self.nfe}, base={self.base!r}, "
                f"schedule={self.schedule!r})")

    def check_denoiser(self, denoiser) -> None:
        sched = getattr(denoiser, "schedule", None)
        if sched is None or not _same_schedule(sched.config(), self.schedule.config()):
            got = getattr(sched, "name", type(denoiser).__name__)
            raise ValueError(f"this {self.kind} solver was fitted under schedule "
                             f"{self.schedule.name!r} but the denoiser uses {got!r}; refit it for "
                             "this model (tiltflow fit-solver) or wrap the denoiser with "
                             ".with_schedule(...)")

    # use as a solver ---------------------------------------------------------------------------
    def _check_grid(self, grid) -> None:
        if grid is None:
            return
        grid = torch.as_tensor(grid, dtype=F64).flatten()
        if len(grid) not in (2, self.nfe + 1):
            raise ValueError(f"this fitted solver spends exactly nfe={self.nfe} evaluations; "
                             f"got a grid of {len(grid) - 1} steps (pass nfe={self.nfe})")
        if abs(float(grid[0]) - self.t_start) > 1e-12 or float(grid[-1]) != 0.0:
            raise ValueError(f"a fitted solver integrates from t={self.t_start} to t=0; got a "
                             f"grid from {float(grid[0])} to {float(grid[-1])}")

    def as_solver(self):
        """A function with the one solver signature; ``grid`` must run from ``t_start`` to 0
        with 1 or ``nfe`` steps (its interior times are ignored: the fitted ones are used)."""

        def fitted_solver(denoiser, x_init, grid=None, *, cond=None, guidance=None,
                          generator=None, record=None, hook=None):
            self._check_grid(grid)
            with torch.no_grad():
                return self.solve(denoiser, x_init, cond=cond, guidance=guidance, record=record,
                                  hook=hook, generator=generator)

        fitted_solver.__doc__ = f"fitted {self.kind} solver, nfe={self.nfe}, base={self.base}"
        return fitted_solver

    def sample(self, denoiser, noise: torch.Tensor, *, cond=None, guidance=None, record=None):
        """Integrate standard-normal ``noise`` (scaled by sigma(t_start)) to t = 0."""
        with torch.no_grad():
            return self.solve(denoiser, start_state(denoiser, noise, self.t_start), cond=cond,
                              guidance=guidance, record=record)

    @abc.abstractmethod
    def solve(self, denoiser, x_init, *, cond=None, guidance=None, record=None, hook=None,
              generator=None):
        """Integrate ``x_init`` from ``t_start`` to t = 0 with the fitted parameters."""

    # files -------------------------------------------------------------------------------------
    @abc.abstractmethod
    def _tensors(self) -> dict[str, torch.Tensor]:
        """The fitted parameters as named tensors, as stored by :meth:`save`."""

    def save(self, path) -> Path:
        """Write one ``.safetensors`` file atomically (temp file, fsync, rename)."""
        tensors = {k: v.detach().to("cpu", F64).contiguous() for k, v in self._tensors().items()}
        meta = {"tiltflow": "fitted_solver",
                "config": json.dumps(self.config(), allow_nan=False)}
        return atomic_write_bytes(path, st_save(tensors, metadata=meta))

    @classmethod
    def load(cls, path):
        """Load and validate a fitted solver; a kind mismatch or a damaged file raises
        :class:`UserError`."""
        obj = load(path)
        if cls is not FittedSolver and not isinstance(obj, cls):
            raise UserError(f"{str(path)!r} holds a {obj.kind!r} solver, not {cls.kind!r}; "
                            f"load it with tiltflow.solvers.trained.load")
        return obj


def _bad(path, what: str):
    return UserError(f"fitted-solver file {str(path)!r} is invalid ({what}); refit it with "
                     "`tiltflow fit-solver`")


def load(path) -> FittedSolver:
    """Load any fitted solver (bespoke, bns or grid) written by ``save``, validating it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"fitted-solver file {str(path)!r} does not exist; write one with "
                        "`tiltflow fit-solver RUN --nfe N --out FILE`")
    data = path.read_bytes()
    try:
        tensors = st_load(data)
        from safetensors import safe_open  # header metadata

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise _bad(path, f"not a safetensors file: {str(e).splitlines()[0][:80]}") from None
    if meta.get("tiltflow") != "fitted_solver":
        raise _bad(path, "not a tiltflow fitted-solver file")
    try:
        cfg = json.loads(meta["config"])
        if not isinstance(cfg, dict):
            raise ValueError("config is not an object")
    except (KeyError, ValueError) as e:
        raise _bad(path, f"unreadable config: {e}") from None
    if cfg.get("format") != FORMAT_VERSION:
        raise _bad(path, f"format {cfg.get('format')!r}, this tiltflow reads {FORMAT_VERSION}")
    kind = cfg.get("kind")
    if kind not in KINDS:
        raise _bad(path, f"unknown kind {kind!r}; expected one of {sorted(KINDS)}")
    nfe = cfg.get("nfe")
    if not isinstance(nfe, int) or nfe < 1:
        raise _bad(path, f"nfe must be a positive integer, got {nfe!r}")
    try:
        schedule = get_schedule(cfg.get("schedule"))
    except (ValueError, TypeError) as e:
        raise _bad(path, f"schedule: {e}") from None
    for k, v in tensors.items():
        if v.dtype != F64 or not bool(torch.isfinite(v).all()):
            raise _bad(path, f"tensor {k!r} must be finite float64")
    common = dict(nfe=nfe, base=str(cfg.get("base")), schedule=schedule, model=cfg.get("model"),
                  fit=cfg.get("fit"), t_start=float(cfg.get("t_start", 1.0)))
    try:
        return KINDS[kind]._from_tensors(tensors, **common)
    except (KeyError, ValueError) as e:
        raise _bad(path, str(e)) from None



# -- Adam loop shared by bespoke and BNS --------------------------------------------------------

def adam_fit(params: list[torch.Tensor], run, ref, *, steps: int, lr: float, desc: str,
              progress: bool, batch_size: int | None = None, seed: int = 0):
    """Minimise ``endpoint_rmse(run(idx), ref[idx])`` with Adam (see :func:`_adam_loop`).

    ``run(idx)`` integrates the noises ``idx`` (``None``: all). Returns (best_loss, seconds)."""
    ref = ref.to(F64)

    def loss_of(idx):
        return endpoint_rmse(run(idx).to(F64), ref if idx is None else ref[idx])

    return adam_loop(params, loss_of, ref.shape[0], steps=steps, lr=lr, desc=desc,
                      progress=progress, batch_size=batch_size, seed=seed)


def adam_loop(params: list[torch.Tensor], loss_of, pool: int, *, steps: int, lr: float,
               desc: str, progress: bool, batch_size: int | None = None, seed: int = 0,
               postfix: str = "rmse"):
    """Minimise the scalar ``loss_of(idx)`` over the pool of ``pool`` noises with Adam
    (cosine-decayed lr, gradient norm clipped at 1).

    ``loss_of(idx)`` is the loss on the noises ``idx`` (``None``: the whole pool). With
    ``batch_size`` smaller than the pool each iteration uses a random minibatch (the endpoint
    error of a mixture is dominated by the rare noises near a mode boundary, so a large pool seen
    in minibatches generalises better than a small full batch); the pool's full loss is checked
    every 25 iterations and the best parameters by that loss are kept. Returns
    (best_loss, seconds)."""
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps), eta_min=lr / 20)
    minibatch = batch_size is not None and batch_size < pool
    gen = torch.Generator().manual_seed(seed)
    bar = progress_bar(steps, desc, progress)
    t0 = time.perf_counter()

    def full_loss() -> float:
        with torch.no_grad():
            return float(loss_of(None))

    best = full_loss()
    best_state = [p.detach().clone() for p in params]
    for it in range(steps):
        idx = torch.randperm(pool, generator=gen)[:batch_size] if minibatch else None
        opt.zero_grad(set_to_none=True)
        loss = loss_of(idx)
        lv = float(loss.detach())
        if not minibatch and math.isfinite(lv) and lv < best:  # loss of the current params
            best, best_state = lv, [p.detach().clone() for p in params]
        if math.isfinite(lv):
            loss.backward()
            for p in params:
                if p.grad is not None:
                    torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        else:  # a step went astray: restart from the best parameters, smaller lr
            with torch.no_grad():
                for p, b in zip(params, best_state, strict=True):
                    p.copy_(b)
            for g in opt.param_groups:
                g["lr"] *= 0.5
        sched.step()
        if (minibatch and (it + 1) % 25 == 0) or it + 1 == steps:
            cur = full_loss()
            if math.isfinite(cur) and cur < best:
                best = cur
                best_state = [p.detach().clone() for p in params]
        if bar is not None:
            bar.update(1)
            bar.set_postfix({postfix: f"{best:.4g}"})
    if bar is not None:
        bar.close()
    with torch.no_grad():
        for p, b in zip(params, best_state, strict=True):
            p.copy_(b)
    return best, time.perf_counter() - t0



# -- registry entry -----------------------------------------------------------------------------

_CACHE: dict[tuple[str, int, int], FittedSolver] = {}


def _as_fitted(params) -> FittedSolver:
    if isinstance(params, FittedSolver):
        return params
    if isinstance(params, (str, Path)):
        p = Path(params)
        st = p.stat() if p.is_file() else None
        key = (str(p.resolve()), st.st_mtime_ns if st else 0, st.st_size if st else 0)
        if key not in _CACHE:
            _CACHE.clear()
            _CACHE[key] = load(p)
        return _CACHE[key]
    raise ValueError('solver "bespoke" needs options={"params": FILE or a fitted solver} '
                     "(write one with `tiltflow fit-solver`)")


@register("bespoke", order=1, differentiable=False)
def bespoke(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None, record=None,
            hook=None, params=None):
    """A fitted solver (bespoke / BNS / optimized grid) from options={"params": FILE}."""
    fitted = _as_fitted(params)
    fitted._check_grid(grid)
    return fitted.solve(denoiser, x_init, cond=cond, guidance=guidance, record=record, hook=hook,
                        generator=generator)
