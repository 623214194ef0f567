"""One training loop for every objective (pre-training, distillation, alignment).

    result = tiltflow.train.train(denoiser, objective, dataset, TrainConfig(steps=20_000))

A step: take the next minibatch in a fixed order, ``loss = objective(model, batch,
generator).mean()``, backward, clip the gradient norm, AdamW with linear warm-up, update the EMA.
Every ``log_every`` steps the loop syncs once with the device: it reads all per-step losses and
gradient norms since the last sync, checks them for NaN/inf, logs to TensorBoard and the progress
bar. Every ``ckpt_every`` steps it writes a checkpoint (see :mod:`tiltflow.checkpoint`).

Choices worth knowing:

- **Non-finite check without a per-step sync.** Per-step losses and gradient norms (computed for
  clipping anyway) stay on the device in a list; they are read at log, checkpoint and sample
  steps. A NaN/inf stops the run naming the exact step; because the check runs *before* every
  checkpoint write, no checkpoint ever holds a diverged state (the in-memory model may have taken
  up to ``log_every`` bad updates; it is discarded). Under fp16 loss scaling an inf gradient is
  expected (the scaler skips that step), so only the loss is checked there.
- **Deterministic data order.** Epoch ``e`` is ``randperm(N)`` from a generator seeded by
  ``(seed, e)``; minibatches are consecutive slices of the epochs laid end to end (a batch may
  straddle two epochs, none is dropped). The position ``(epoch, index)`` is checkpointed, so a
  resumed run continues at the exact batch. With P processes, each takes its contiguous
  ``batch_size / P`` slice of the same global batch, and DDP averages the gradients: the update
  equals the single-process one up to reduction order.
- **Randomness of the objective** comes from a ``torch.Generator`` seeded by ``(seed, rank)``
  whose state is checkpointed (per rank), as are the global torch/numpy/python RNGs. A resumed
  run is bit-identical to an uninterrupted one. (Each rank draws its own noise, so a P-process
  run matches the single-process run exactly only for objectives without random draws.)
- **Distribution** goes through HF accelerate: ``accelerate launch`` runs this same code; only
  the main process writes checkpoints, logs and calls callbacks. The network (``model.net``) is
  what ``accelerator.prepare`` wraps, so objectives still receive the ``Denoiser``.
- **SIGINT/SIGTERM** finish the current step, write a checkpoint and raise
  :class:`TrainingInterrupted` (a second signal acts at once). With several processes the stop is
  agreed at the next log step, so all ranks stop at the same step.
- Mixed precision (bf16/fp16 autocast via accelerate) and ``torch.compile`` are GPU-only; on CPU
  they are turned off with a one-line note.
- Only the model's parameters are trained (an objective's own modules, e.g. a teacher, are not).
  An objective that keeps tensors between steps (a consistency model's EMA target) exposes
  ``state_dict()`` / ``load_state_dict()``; they go into every checkpoint and come back on
  resume, so a resumed distillation is bit-identical too.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import (
    capture_rng,
    check_finite,
    clean_temporaries,
    find_latest,
    flatten_state,
    generator_state,
    load_checkpoint,
    load_weights,
    restore_rng,
    save_checkpoint,
    set_generator_state,
)
from .config import TrainConfig
from .errors import UserError

__all__ = [
    "train",
    "TrainResult",
    "TrainingInterrupted",
    "TrainingDiverged",
    "StepInfo",
    "DataOrder",
    "lr_at",
    "ema_decay_at",
    "ema_update",
]

log = logging.getLogger("tiltflow.train")


# -- results and errors ------------------------------------------------------------------------

@dataclass
class TrainResult:
    """What :func:`train` returns. ``losses[i]`` / ``grad_norms[i]`` belong to step
    ``first_step + i`` (this call's steps only; earlier ones are in TensorBoard)."""

    step: int
    losses: list[float]
    grad_norms: list[float]
    first_step: int
    model: nn.Module
    ema: nn.Module
    run_dir: Path
    checkpoint: Path | None
    tensorboard_dir: Path | None
    status: str = "completed"  # or "interrupted"


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped the run after a clean checkpoint; ``.result`` holds the state."""

    def __init__(self, message: str, result: TrainResult):
        super().__init__(message)
        self.result = result


class TrainingDiverged(UserError):
    """A NaN/inf loss or gradient. ``.step`` is the first bad step, ``.last_checkpoint`` the
    newest checkpoint on disk (written before that step, so it is good), or ``None``."""

    def __init__(self, message: str, step: int, last_checkpoint: Path | None):
        super().__init__(message)
        self.step, self.last_checkpoint = step, last_checkpoint


@dataclass
class StepInfo:
    """Passed to callbacks (main process only). Sample from ``ema``: it is what gets shipped."""

    step: int
    model: nn.Module
    ema: nn.Module
    run_dir: Path
    losses: list[float] = field(default_factory=list)
    accelerator: object = None


# -- schedules ---------------------------------------------------------------------------------

def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of update number ``step`` (1-based): linear warm-up from ``lr/warmup`` to
    ``lr`` over ``warmup_steps``, then constant or a cosine down to ``min_lr_ratio * lr``
    (Loshchilov & Hutter 2017) at ``steps``."""
    if step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = min((step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1), 1.0)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def ema_decay_at(step: int, cfg: TrainConfig) -> float:
    """EMA decay used after update ``step`` (1-based): ``min(ema_decay, (1 + n) / (10 + n))``
    with warm-up (the ``num_updates`` rule of TensorFlow's ExponentialMovingAverage)."""
    if cfg.ema_warmup:
        return min(cfg.ema_decay, (1 + step) / (10 + step))
    return cfg.ema_decay


@torch.no_grad()
def ema_update(ema_params: Sequence[torch.Tensor], params: Sequence[torch.Tensor], decay: float):
    """``ema <- decay * ema + (1 - decay) * param``, in float32, as one fused ``lerp``."""
    src = [p.detach() if p.dtype == e.dtype else p.detach().to(e.dtype)
           for e, p in zip(ema_params, params, strict=True)]
    torch._foreach_lerp_(list(ema_params), src, 1.0 - decay)


# -- data order --------------------------------------------------------------------------------

def _derive_seed(*ints: int) -> int:
    """A 64-bit seed from a tuple of ints, well mixed (numpy's SeedSequence)."""
    a, b = np.random.SeedSequence([int(i) for i in ints]).generate_state(2)
    return (int(a) << 32) | int(b)


class DataOrder:
    """Indices of the minibatches: epoch ``e`` is a permutation of ``range(n)`` drawn from a
    generator seeded by ``(seed, e)``; batches are consecutive slices of the epochs laid end to
    end. ``position()`` / the constructor's ``epoch, index`` save and restore the place."""

    def __init__(self, n: int, seed: int, epoch: int = 0, index: int = 0):
        if n < 1:
            raise UserError("the dataset is empty; give it at least one example")
        if not 0 <= index < n:
            raise UserError(f"data position index {index} is outside a dataset of {n} examples")
        self.n, self.seed, self.epoch, self.index = n, int(seed), int(epoch), int(index)
        self._perm = self.permutation(self.epoch)

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_derive_seed(self.seed, epoch, 0xDA7A))
        return torch.randperm(self.n, generator=g)

    def next(self, size: int) -> torch.Tensor:
        if self.index + size < self.n:  # the common case: one slice
            out = self._perm[self.index:self.index + size]
            self.index += size
            return out
        parts = []
        while size > 0:
            take = min(size, self.n - self.index)
            parts.append(self._perm[self.index:self.index + take])
            self.index += take
            size -= take
            if self.index == self.n:
                self.epoch, self.index = self.epoch + 1, 0
                self._perm = self.permutation(self.epoch)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def position(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}


def _dataset_tensors(dataset):
    if torch.is_tensor(dataset):
        x, cond = dataset, None
    elif isinstance(dataset, dict):
        x, cond = dataset.get("x"), dataset.get("cond")
    else:
        x, cond = getattr(dataset, "x", None), getattr(dataset, "cond", None)
    if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() < 2:
        raise UserError("dataset must have a float tensor `x` of shape [N, ...] "
                        "(use tiltflow.data.load_dataset)")
    if cond is not None and (not torch.is_tensor(cond) or cond.shape[:1] != x.shape[:1]):
        raise UserError(f"dataset.cond must be None or a tensor with {x.shape[0]} rows")
    return x, cond


# -- signals -----------------------------------------------------------------------------------

class _StopOnSignal:
    """SIGINT/SIGTERM set a flag; the loop stops after the current step. The first signal
    restores the previous handler, so a second one acts immediately."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# -- helpers -----------------------------------------------------------------------------------

def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def _param_groups(net: nn.Module, weight_decay: float):
    params = [p for p in net.parameters() if p.requires_grad]
    if weight_decay == 0:
        return [{"params": params, "weight_decay": 0.0}]
    # Decay weight matrices only; biases and norm gains stay free (as nanoGPT does).
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def _make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    gpu = torch.cuda.is_available()
    mp = cfg.mixed_precision
    if not gpu and mp != "no":
        log.warning("note: mixed_precision=%s needs a GPU; training in float32 on CPU", mp)
        mp = "no"
    try:
        return Accelerator(cpu=not gpu, mixed_precision=mp)
    except ValueError as e:
        if "already been initialized" not in str(e):
            raise
        # accelerate keeps one process-wide state; a second train() call in the same process
        # (a notebook, a sweep) with another precision resets it, keeping the process group.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=False)
        return Accelerator(cpu=not gpu, mixed_precision=mp)


def _total_norm(params) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads)


def _model_config(model, net, objective, cfg: TrainConfig, world: int, meta) -> dict:
    den = {"prediction": getattr(model, "prediction", None),
           "precondition": getattr(model, "precondition", False),
           "sigma_data": getattr(model, "sigma_data", None)}
    sched = getattr(model, "schedule", None)
    den["schedule"] = sched.config() if hasattr(sched, "config") else None
    obj = objective.config() if callable(getattr(objective, "config", None)) else None
    return _jsonable({"train": cfg.to_dict(), "model": getattr(net, "config", None),
                      "denoiser": den, "objective": obj, "world_size": world, "run": meta})


# -- checks before the first step --------------------------------------------------------------

#: entries of a checkpoint's config that define the network and the data: a resume that changes
#: them would train another model on top of this one's weights
RESUME_KEYS = ("run.config.data", "run.data", "dataset", "model", "denoiser", "objective")
_ABSENT = object()


def _lookup(tree, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _ABSENT
        tree = tree[part]
    return tree


def _differences(old, new, path: str) -> list[str]:
    """``"key: old -> new"`` for each dotted key whose value differs between two JSON trees.
    A key present on one side only is skipped: a newer tiltflow may add a key with its default.
    A bare name equals ``{name: ...}`` (``data=moons`` vs ``data: {name: moons}``)."""
    if isinstance(old, str) and isinstance(new, dict):
        old = {"name": old}
    if isinstance(new, str) and isinstance(old, dict):
        new = {"name": new}
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in old if k in new for d in _differences(old[k], new[k], f"{path}.{k}")]
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


def config_changes(saved: dict, new: dict, keys=RESUME_KEYS) -> list[str]:
    """What changed between a checkpoint's config and the one of this call, in ``keys``."""
    changes = []
    for key in keys:
        old, now = _lookup(saved, key), _lookup(new, key)
        if old is not _ABSENT and now is not _ABSENT:
            changes += _differences(old, now, key)
    return changes


def _check_resume_config(ckpt, train_config: dict, allow: bool, is_main: bool) -> None:
    """Refuse to resume a checkpoint whose model or data differ from this call's (naming the
    keys), unless ``allow``: continuing silently would give a model of neither config."""
    changes = config_changes(ckpt.config, train_config)
    if not changes:
        return
    listed = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
    if not allow:
        raise UserError(f"cannot resume {ckpt.path}: it was trained with another model or data "
                        f"({listed}); resume with its own config, train into another "
                        "train.out_dir, or pass --allow-config-change (train(..., "
                        "allow_config_change=True)) to continue anyway")
    if is_main:
        log.warning("note: resuming with a changed model or data (%s)", listed)


#: the per-step loss and gradient norm kept in TrainResult: two Python floats and their slots
_HISTORY_BYTES_PER_STEP = 64


def _activation_sum(model, x_all, cond_all) -> float:
    """Per-example activation bytes of one model call (kept for the backward pass); 0 when the
    probe call fails (an unusual model): the estimate then counts weights and history only."""
    from .memory import denoiser_activation_bytes

    try:
        return denoiser_activation_bytes(model, tuple(x_all.shape[1:]),
                                         1 if cond_all is not None else 0)[0]
    except Exception:  # an estimate must never stop a run the real loop could do
        return 0.0


def _check_training_fits(model, net, x_all, cond_all, cfg: TrainConfig, step: int,
                         device) -> None:
    """Refuse, before the optimizer, EMA and data are allocated, a run that cannot fit: the
    weights with their gradients, Adam moments and EMA, a batch's activations (on ``device``)
    and the per-step loss history of ``train.steps`` (in host memory)."""
    from .memory import check_fits

    params = sum(p.numel() for p in net.parameters())
    elem = next(net.parameters()).element_size()
    example = math.prod(x_all.shape[1:]) * x_all.element_size()
    on_device = {
        "the weights with their gradients, Adam moments and EMA": params * (4 * elem + 4),
        f"the activations of a batch of {cfg.batch_size}":
            cfg.batch_size * (2 * _activation_sum(model, x_all, cond_all) + 4 * example + 16)}
    history = {f"the loss history of {cfg.steps - step} steps":
               max(cfg.steps - step, 0) * _HISTORY_BYTES_PER_STEP}
    what = (f"training ({params:,} parameters, train.batch_size={cfg.batch_size}, "
            f"train.steps={cfg.steps})")
    fix = "lower train.batch_size or train.steps, or make the model smaller"
    if torch.device(device).type == "cpu":
        on_device.update(history)
    else:
        check_fits(sum(history.values()), what, fix, parts=history)
    check_fits(sum(on_device.values()), what, fix, device=device, parts=on_device)


# -- the loop ----------------------------------------------------------------------------------

def train(
    model: nn.Module,
    objective: Callable,
    dataset,
    config: TrainConfig | dict | None = None,
    *,
    resume: bool | str | Path = False,
    callbacks: Sequence[Callable[[StepInfo], None]] | None = None,
    accelerator=None,
    meta: dict | None = None,
    allow_config_change: bool = False,
) -> TrainResult:
    """Train ``model.net`` (a :class:`~tiltflow.Denoiser`'s network) on ``objective``.

    ``objective(model, {"x", "cond"}, generator=g) -> loss [B]``; ``dataset`` has ``x [N, ...]``
    and ``cond`` (``LongTensor[N]`` or None). ``resume``: ``True`` continues from the latest
    checkpoint in ``config.out_dir`` if there is one, a path continues from that checkpoint.
    ``callbacks`` are called as ``cb(StepInfo)`` every ``sample_every`` steps on the main
    process (the global RNG is restored afterwards, so they do not change the run). ``meta``:
    JSON-able description of the run (e.g. the whole YAML config), stored in every checkpoint.
    A resume whose model or data differ from the checkpoint's (:data:`RESUME_KEYS`) is refused,
    naming the keys, unless ``allow_config_change``. Before the first step, stale temporaries of
    killed checkpoint writes are removed and a run that cannot fit in memory is refused.

    Raises :class:`TrainingDiverged` on NaN/inf and :class:`TrainingInterrupted` on SIGINT/SIGTERM
    (both after leaving a good checkpoint on disk).
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    net = getattr(model, "net", None)
    if not isinstance(net, nn.Module) or not any(p.requires_grad for p in net.parameters()):
        raise UserError("train() needs model.net to be an nn.Module with trainable parameters")
    if sum(p.numel() for p in model.parameters()) != sum(p.numel() for p in net.parameters()):
        raise ValueError("train() optimizes model.net; this model has parameters outside .net")
    x_all, cond_all = _dataset_tensors(dataset)

    acc = accelerator if accelerator is not None else _make_accelerator(cfg)
    is_main, rank, world = acc.is_main_process, acc.process_index, acc.num_processes
    device = acc.device
    if cfg.batch_size % world:
        raise UserError(f"train.batch_size={cfg.batch_size} must be divisible by the number of "
                        f"processes ({world})")
    local = cfg.batch_size // world
    run_dir = Path(cfg.out_dir)

    if is_main:
        clean_temporaries(run_dir)  # left by a checkpoint write killed midway

    # Where to start: a checkpoint or scratch (never silently on top of another run).
    ckpt = None
    if resume is not False and resume is not None:
        if resume is True:
            if find_latest(run_dir) is not None:
                ckpt = load_checkpoint(run_dir)
            elif is_main:
                log.warning("note: no checkpoint in %s; starting from step 0", run_dir)
        else:
            ckpt = load_checkpoint(resume)
    elif find_latest(run_dir) is not None:
        raise UserError(f"{run_dir} already holds checkpoints (latest: {find_latest(run_dir)}); "
                        "pass resume=True to continue that run or choose another out_dir")
    train_config = _model_config(model, net, objective, cfg, world, meta)
    train_config["dataset"] = {"examples": int(x_all.shape[0]), "shape": list(x_all.shape[1:])}
    if ckpt is not None:
        _check_resume_config(ckpt, train_config, allow_config_change, is_main)
    _check_training_fits(model, net, x_all, cond_all, cfg, ckpt.step if ckpt else 0, device)

    net.to(device)
    net.train()
    optimizer = torch.optim.AdamW(_param_groups(net, cfg.weight_decay), lr=cfg.lr,
                                  betas=cfg.betas, weight_decay=cfg.weight_decay)
    gen = torch.Generator(device=device)
    step = 0
    order = None
    if ckpt is not None:
        load_weights(net, ckpt.model, ckpt.path / "model.safetensors")
        if ckpt.optimizer is not None:
            check_finite(flatten_state(ckpt.optimizer)[0], ckpt.path / "optimizer.safetensors")
        try:
            if ckpt.optimizer is not None:
                optimizer.load_state_dict(ckpt.optimizer)
            if ckpt.objective is not None and hasattr(objective, "load_state_dict"):
                objective.load_state_dict(ckpt.objective)
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"checkpoint {ckpt.path} does not fit this model/optimizer "
                            f"({str(e).splitlines()[0]}); build the same network as that run"
                            ) from None
        step = ckpt.step
        old = (ckpt.config.get("train") or {})
        changed = [k for k in ("batch_size", "seed", "lr", "betas", "weight_decay",
                               "warmup_steps", "lr_schedule", "ema_decay", "grad_clip")
                   if k in old and old[k] != cfg.to_dict()[k]]
        if changed and is_main:
            log.warning("note: resuming with changed %s; the run will not match an "
                        "uninterrupted one", ", ".join(changed))
        pos = ckpt.data_position
        if pos:
            order = DataOrder(x_all.shape[0], cfg.seed, pos.get("epoch", 0), pos.get("index", 0))
        per_rank = (ckpt.rng or {}).get("per_rank") or []
        if len(per_rank) == world:
            try:
                restore_rng(per_rank[rank]["global"])
                set_generator_state(gen, per_rank[rank]["objective"])
            except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
                raise UserError(f"{ckpt.path / 'state.json'}: its RNG state is damaged "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e!r}"
                                "); resume from an earlier step_NNNNNN directory") from None
        else:
            if is_main:
                log.warning("note: checkpoint has RNG states for %d process(es), this run has "
                            "%d; reseeding", len(per_rank), world)
            gen.manual_seed(_derive_seed(cfg.seed, rank, step, 0x0B1))
    else:
        torch.manual_seed(_derive_seed(cfg.seed, rank, 0x6105))  # dropout etc. (as nanoGPT)
        gen.manual_seed(_derive_seed(cfg.seed, rank, 0x0B1))
    if order is None:
        order = DataOrder(x_all.shape[0], cfg.seed)
    if step >= cfg.steps and is_main:
        log.warning("note: checkpoint is at step %d >= train.steps=%d; nothing to do",
                    step, cfg.steps)

    # EMA: a float32 copy of the whole Denoiser, never trained directly.
    ema = copy.deepcopy(model).float().eval().requires_grad_(False)
    if ckpt is not None and ckpt.ema is not None:
        load_weights(ema.net, ckpt.ema, ckpt.path / "ema.safetensors")
    params = [p for p in net.parameters()]
    if x_all.is_floating_point() and x_all.dtype != params[0].dtype:
        x_all = x_all.to(params[0].dtype)  # e.g. float64 samples from tiltflow.analytic
    ema_params = [p for p in ema.net.parameters()]

    # Data lives on the device when it is small (2-D sets, digits); else moved per batch.
    if device.type != "cpu" and x_all.numel() * x_all.element_size() < 2**31:
        x_all = x_all.to(device)
        cond_all = cond_all.to(device) if cond_all is not None else None

    gpu = device.type == "cuda"
    use_compile = cfg.compile is True or (cfg.compile == "auto" and gpu)
    if use_compile and not gpu:
        if is_main:
            log.warning("note: torch.compile is used on GPU only; running eagerly on CPU")
        use_compile = False
    run_net, optimizer = acc.prepare(net, optimizer)
    if use_compile:
        run_net = torch.compile(run_net)
    check_grad = acc.mixed_precision != "fp16"  # fp16 loss scaling makes inf grads routine
    # accelerate's per-step wrappers do nothing for plain DDP without a loss scaler, yet cost
    # ~0.3 ms of Python per step (accelerate 1.x looks up installed packages in every
    # backward()); call torch directly then, and keep accelerate's path for the rest (fp16
    # scaler, FSDP, DeepSpeed, XLA).
    from accelerate.utils import DistributedType

    direct = acc.scaler is None and acc.distributed_type in (
        DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
    backward = (lambda loss: loss.backward()) if direct else acc.backward
    clip = torch.nn.utils.clip_grad_norm_ if direct else acc.clip_grad_norm_
    step_optimizer = getattr(optimizer, "optimizer", optimizer) if direct else optimizer

    writer = pbar = None
    tb_dir = run_dir / "tensorboard"
    if is_main:
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        run_dir.mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(str(tb_dir))
        pbar = tqdm(total=cfg.steps, initial=step, desc="train", dynamic_ncols=True,
                    disable=not sys.stderr.isatty())

    first_step = step + 1
    losses: list[float] = []
    grad_norms: list[float] = []
    loss_buf: list[torch.Tensor] = []
    gn_buf: list[torch.Tensor] = []
    metrics: dict = {}
    last_ckpt: Path | None = find_latest(run_dir) if ckpt is not None else None
    t_flush, step_flush = time.perf_counter(), step
    callbacks = list(callbacks or [])
    if callbacks and not cfg.sample_every and is_main:
        log.warning("note: callbacks were given but train.sample_every=0; they will not run")

    def flush(stop_local: bool) -> bool:
        """One device sync: read buffered losses/grad norms, check them, log. Returns whether
        any process asked to stop."""
        nonlocal t_flush, step_flush, metrics
        n = len(loss_buf)
        packed = torch.stack(loss_buf + gn_buf).float() if n else torch.zeros(0, device=device)
        packed = torch.cat([packed, torch.tensor([float(stop_local)], device=packed.device)])
        if world > 1:
            torch.distributed.all_reduce(packed)  # sum: per-rank losses -> mean below
            packed[:n] /= world
            packed[n:2 * n] /= world
        vals = packed.tolist()
        ls, gs, stop = vals[:n], vals[n:2 * n], vals[-1] > 0
        loss_buf.clear()
        gn_buf.clear()
        start = step - n + 1
        for i, (lv, gv) in enumerate(zip(ls, gs, strict=True)):
            if not math.isfinite(lv) or (check_grad and not math.isfinite(gv)):
                good = find_latest(run_dir)
                what = "loss" if not math.isfinite(lv) else "gradient norm"
                raise TrainingDiverged(
                    f"non-finite {what} at step {start + i} (loss={lv}, grad norm={gv}); last "
                    f"good checkpoint: {good if good else 'none written yet'}. Lower train.lr or "
                    "raise train.warmup_steps / train.grad_clip, then resume from it",
                    start + i, good)
        losses.extend(ls)
        grad_norms.extend(gs)
        now = time.perf_counter()
        sps = (step - step_flush) / max(now - t_flush, 1e-9)
        t_flush, step_flush = now, step
        if n:
            metrics = {"loss": sum(ls) / n, "grad_norm": gs[-1], "lr": lr_at(step, cfg),
                       "steps_per_s": sps}
            if writer is not None:
                for k, v in metrics.items():
                    writer.add_scalar(f"train/{k}", v, step)
            if pbar is not None:
                pbar.update(step - pbar.n)
                pbar.set_postfix(loss=f"{metrics['loss']:.4g}", it_s=f"{sps:.1f}")
        return stop

    def checkpoint() -> Path | None:
        state = {"global": capture_rng(), "objective": generator_state(gen)}
        if world > 1:
            from accelerate.utils import gather_object

            per_rank = gather_object([state])
        else:
            per_rank = [state]
        path = None
        if is_main:
            for b_ema, b in zip(ema.net.buffers(), net.buffers(), strict=True):
                b_ema.copy_(b)
            path = save_checkpoint(
                run_dir, step, model=net, ema=ema.net, optimizer=optimizer,
                rng={"world_size": world, "per_rank": per_rank},
                data_position={**order.position(), "batch_size": cfg.batch_size},
                config=train_config, metrics=metrics, keep=cfg.keep_checkpoints,
                objective=objective.state_dict() if hasattr(objective, "state_dict") else None)
        if world > 1:
            acc.wait_for_everyone()
        return path

    def result(status: str) -> TrainResult:
        return TrainResult(step=step, losses=losses, grad_norms=grad_norms,
                           first_step=first_step, model=model, ema=ema, run_dir=run_dir,
                           checkpoint=last_ckpt, tensorboard_dir=tb_dir if is_main else None,
                           status=status)

    model.net = run_net  # objectives call model(...) -> DDP/compiled net
    try:
        with _StopOnSignal() as stop_signal:
            while step < cfg.steps:
                step += 1
                idx = order.next(cfg.batch_size)
                if world > 1:
                    idx = idx[rank * local:(rank + 1) * local]
                x = x_all[idx].to(device, non_blocking=True)
                cond = cond_all[idx].to(device, non_blocking=True) if cond_all is not None else None
                lr = lr_at(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss = objective(model, {"x": x, "cond": cond}, generator=gen).mean()
                backward(loss)
                if cfg.grad_clip > 0:
                    gn = clip(params, cfg.grad_clip)
                else:
                    gn = _total_norm(params)
                step_optimizer.step()
                step_optimizer.zero_grad(set_to_none=True)
                ema_update(ema_params, params, ema_decay_at(step, cfg))
                loss_buf.append(loss.detach())
                gn_buf.append(gn.detach() if torch.is_tensor(gn) else torch.tensor(gn))

                at_ckpt = step == cfg.steps or (cfg.ckpt_every and step % cfg.ckpt_every == 0)
                at_sample = bool(cfg.sample_every and callbacks and step % cfg.sample_every == 0)
                asked = stop_signal.received is not None and world == 1
                stop = False
                if step % cfg.log_every == 0 or at_ckpt or at_sample or asked:
                    stop = flush(stop_signal.received is not None)
                if at_sample and is_main:
                    model.net = net
                    try:
                        devices = [device.index or 0] if gpu else []
                        with torch.random.fork_rng(devices=devices):
                            info = StepInfo(step, model, ema, run_dir, losses, acc)
                            for cb in callbacks:
                                cb(info)
                    finally:
                        model.net = run_net
                        net.train()
                if at_ckpt or stop:
                    last_ckpt = checkpoint() or last_ckpt
                if stop:
                    why = stop_signal.received or "a signal on another process"
                    raise TrainingInterrupted(
                        f"training stopped by {why} at step {step}; checkpoint: {last_ckpt}; "
                        "resume with resume=True (CLI: --resume)", result("interrupted"))
            if loss_buf:
                flush(False)
    finally:
        model.net = net
        if acc.mixed_precision != "no":  # drop accelerate's autocast wrapper from net.forward
            acc.unwrap_model(run_net, keep_fp32_wrapper=False)
        if writer is not None:
            writer.flush()
            writer.close()
        if pbar is not None:
            pbar.close()
    return result("completed")
