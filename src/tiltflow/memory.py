"""Will a request fit? Memory estimates made before allocating, and the machine's limit.

A request that cannot fit (``--num 10**12``, ``--nfe 10**10``, ``model.hidden=10**6``) must be
refused before it allocates: a huge allocation may succeed lazily on Linux (overcommit) and the
process is then killed by the kernel with no message at all. :func:`check_fits` compares an
estimate with :func:`available_bytes` and raises a one-line :class:`UserError` naming both.

Estimates are deliberately rough (the right order of magnitude, not a byte count): they count
the tensors a request must hold at once (states, weights, optimizer moments, activations, the
time grid), measured where that is cheap (a network's parameter count on the ``meta`` device,
its activation sizes by one forward pass on two examples). Allocation failures that slip past an
estimate are still turned into one line by :func:`tiltflow.errors.as_user_error`.
"""

from __future__ import annotations

import math
import os
import resource
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from .errors import UserError

__all__ = ["available_bytes", "format_bytes", "check_fits", "count_parameters",
           "activation_bytes", "GRID_STEP_BYTES", "FLOAT_BYTES"]

#: Python objects a solver keeps per step of its time grid (GridPoints with their float64
#: coefficient tensors, step coefficients): measured ~3.2 KB for the GridPoints alone
GRID_STEP_BYTES = 4096
FLOAT_BYTES = 4  # float32: networks, states and samples


def format_bytes(n: float) -> str:
    """``1234567`` -> ``"1.2 MB"`` (decimal units, up to YB; beyond that in scientific form)."""
    units = ["B", "KB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB"]
    n = float(n)
    if not math.isfinite(n):
        return "an unbounded amount"
    for unit in units:
        if abs(n) < 1000 or unit == units[-1]:
            break
        n /= 1000
    if abs(n) >= 1000:
        return f"{n:.1e} {unit}"
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


def _meminfo_available() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else free physical pages from sysconf."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_available() -> int | None:
    """A cgroup v2 (``memory.max``) or v1 limit minus its current use; None when unlimited."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            text = Path(limit_file).read_text().strip()
            if text == "max" or int(text) >= 2**60:
                return None
            return max(int(text) - int(Path(usage_file).read_text().strip()), 0)
        except (OSError, ValueError):
            continue
    return None


def _address_space_available() -> int | None:
    """RLIMIT_AS (``ulimit -v``) minus the address space this process already maps."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[0])
        used = pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        used = 0
    return max(soft - used, 0)


def available_bytes(device=None) -> tuple[int | None, str]:
    """The memory this process can still allocate on ``device`` and where that figure comes from.

    CPU: the least of MemAvailable (/proc/meminfo), the cgroup limit and RLIMIT_AS (each minus
    what is in use). CUDA: the device's free memory. ``(None, ...)`` when nothing is known."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free memory of {torch.cuda.get_device_name(device)}"
    found = [(v, name) for v, name in (
        (_meminfo_available(), "available RAM"), (_cgroup_available(), "the cgroup memory limit"),
        (_address_space_available(), "the address-space limit, ulimit -v")) if v is not None]
    if not found:
        return None, "unknown"
    return min(found)


def check_fits(need: float, what: str, fix: str, device=None,
               parts: Mapping[str, float] | None = None) -> None:
    """Raise a one-line :class:`UserError` when ``need`` bytes exceed what ``device`` has left.

    ``what`` names the request ("sampling 10^12 examples"), ``fix`` says what to lower;
    ``parts`` (name -> bytes) lets the message name the largest share of the estimate."""
    limit, source = available_bytes(device)
    if limit is None or need <= limit:
        return
    share = ""
    if parts and len(parts) > 1:
        name, size = max(parts.items(), key=lambda kv: kv[1])
        share = f", mostly {name} ({format_bytes(size)})"
    raise UserError(f"{what} needs about {format_bytes(need)} of memory{share}, more than the "
                    f"{format_bytes(limit)} this machine has ({source}); {fix}")


def count_parameters(build: Callable[[], torch.nn.Module]) -> int:
    """Parameters + buffers of the module ``build()`` returns, built on the ``meta`` device so
    that nothing is allocated (a network too large for the machine is counted, not built)."""
    with torch.device("meta"):
        module = build()
    return sum(t.numel() for t in module.parameters()) + sum(t.numel() for t in module.buffers())


def activation_bytes(forward: Callable[[int], object], module: torch.nn.Module,
                     probe: int = 2) -> tuple[float, float]:
    """Per-example bytes of ``module``'s activations as ``(sum, peak)`` over its leaf modules,
    measured by ``forward(probe)`` (a no-grad call on ``probe`` examples) with forward hooks.

    The sum is what training keeps for the backward pass; the peak (the largest single output)
    bounds what a no-grad evaluation holds at once. The probe runs in eval mode and restores
    every submodule's mode, so it neither draws random numbers nor updates statistics."""
    sizes: list[int] = []

    def hook(_module, _inputs, output):
        for t in (output if isinstance(output, (tuple, list)) else (output,)):
            if torch.is_tensor(t):
                sizes.append(t.numel() * t.element_size())

    modes = [(m, m.training) for m in module.modules()]
    leaves = [m for m in module.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    module.eval()  # no dropout draws, no batch-norm statistics updates: the probe changes nothing
    try:
        with torch.no_grad():
            forward(probe)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    if not sizes:
        return 0.0, 0.0
    return sum(sizes) / probe, max(sizes) / probe


def denoiser_activation_bytes(denoiser: torch.nn.Module, shape, num_classes: int = 0
                              ) -> tuple[float, float]:
    """:func:`activation_bytes` of one ``denoiser(x_t, t, cond)`` call on examples of ``shape``
    (class-conditional models get label 0)."""
    params = list(denoiser.parameters())
    dtype = params[0].dtype if params else torch.float32
    device = params[0].device if params else torch.device("cpu")

    def forward(b):
        x = torch.zeros((b, *shape), dtype=dtype, device=device)
        t = torch.full((b,), 0.5, dtype=dtype, device=device)
        cond = torch.zeros(b, dtype=torch.long, device=device) if num_classes else None
        denoiser(x, t, cond)

    return activation_bytes(forward, denoiser)


#: float copies of the state a sampling call holds at once: noise, x, the prediction's kinds,
#: x_next, a multistep solver's history, the denormalized output and its numpy copy
STATE_COPIES = 10
#: a no-grad evaluation holds its largest layer output with its input and a temporary or two
PEAK_FACTOR = 4


def sampling_parts(shape, num: int, steps: int, activation_peak: float, *,
                   dtype_bytes: int = FLOAT_BYTES, batch_factor: int = 1,
                   trajectory: bool = False, activation_sum: float = 0.0,
                   kept_evaluations: int = 0) -> dict[str, float]:
    """Bytes a solver call on ``num`` examples of ``shape`` over ``steps`` steps needs, by part.

    ``batch_factor`` 2 for classifier-free guidance (both branches in one call); ``trajectory``
    for parallel-in-time samplers, which hold the state at every time of the grid;
    ``kept_evaluations`` network calls whose activations (``activation_sum`` per example) are
    kept for a backward pass through the solver (fitting a solver)."""
    state = math.prod(shape) * dtype_bytes
    parts = {"the samples and solver states": float(num) * state * STATE_COPIES,
             "the network's activations": float(num) * activation_peak * PEAK_FACTOR * batch_factor,
             f"the time grid of {steps} steps": float(steps + 1) * GRID_STEP_BYTES}
    if trajectory:
        parts["the whole trajectory (parallel sampling)"] = float(num) * (steps + 1) * state * 3
    if kept_evaluations:
        parts["the activations kept for the backward pass"] = (
            float(num) * kept_evaluations * (activation_sum + 2 * state))
    return parts
