"""Parallel-in-time sampling: fewer *sequential* network rounds for the same answer.

A sequential sampler with n steps makes n network calls one after another. The two methods here
reach the same endpoint (to a tolerance, or exactly after enough iterations) with fewer rounds
of *batched* calls, at the price of more total evaluations — worth it when a bigger batch costs
about the same wall time as a small one (a GPU that is not saturated):

- ``"picard"``: ParaDiGMS (Shih et al. 2023, "Parallel Sampling of Diffusion Models",
  Algorithm 1): Picard iteration of the whole discretised trajectory over a sliding window.
- ``"parareal"``: SRDS (Selvam et al. 2024, "Self-Refining Diffusion Samplers: Enabling
  Parallelization via Parareal Iterations"): a coarse sequential solver corrected by fine
  solvers that run in parallel on each coarse interval, optionally pipelined.

Both iterate a *base* sequential solver's per-step update — ``"euler"`` or ``"ddim"`` on the
probability-flow ODE, or ``"ddpm"`` with its noise drawn up front (same generator, same order
as the sequential ``ddpm`` solver), so the fixed point is exactly the sequential stochastic
sample. ``stats["rounds"]`` counts batched network calls (what wall time follows on a parallel
device), ``stats["nfe"]`` the per-sample evaluations summed over all batches.

These are not registry solvers: the registry's contract is a fixed NFE for a given grid, and an
adaptive parallel method spends a data-dependent number. Call :func:`parallel_sample`.
"""

from __future__ import annotations

import math

import torch

from .ddim import posterior_coefficients
from .registry import Predictor

__all__ = ["parallel_sample", "METHODS", "BASES"]

METHODS = ("picard", "parareal")
BASES = ("euler", "ddim", "ddpm")


# -- the base solver's per-step update, for a batch of steps at once --------------------------
class _Base:
    """Step coefficients of a base solver on ``grid`` (float64, computed once, moved to x's
    device and dtype). ``step(idx, x, pred)`` maps states ``x`` at steps ``idx`` (a slice or
    index tensor of length m, x shaped ``[m, B, ...]``) to their next states."""

    def __init__(self, name, denoiser, grid, x, generator):
        self.name = name
        n = len(grid) - 1
        dev = dict(device=x.device, dtype=x.dtype)
        if name == "euler":
            self.dt = (grid[1:] - grid[:-1]).to(**dev)
        else:
            a_next, eps_coef, std = posterior_coefficients(
                denoiser.schedule, grid, 1.0 if name == "ddpm" else 0.0)
            self.a_next, self.eps_coef = a_next.to(**dev), eps_coef.to(**dev)
            self.noise = None
            if name == "ddpm":
                # drawn in the order the sequential ddpm solver draws them: the fixed point is
                # its sample for the same generator state
                std_list = std.tolist()
                z = [torch.randn(x.shape, generator=generator, **dev) if s > 0
                     else torch.zeros_like(x) for s in std_list]
                self.noise = std.to(**dev).reshape((n,) + (1,) * x.dim()) * torch.stack(z)

    def _col(self, coef, idx, like):
        return coef[idx].reshape((-1,) + (1,) * (like.dim() - 1))

    def step(self, idx, x, pred):
        if self.name == "euler":
            return x + self._col(self.dt, idx, x) * pred.velocity
        out = self._col(self.a_next, idx, x) * pred.data + self._col(self.eps_coef, idx, x) * pred.noise
        if self.noise is not None:
            out = out + self.noise[idx]
        return out


class _Batched:
    """Evaluates the denoiser on m states of batch B with per-state times in ONE call: the states
    are flattened to a batch of m*B, ``cond`` is tiled to match. Returns a ``[m, B, ...]`` view of
    the prediction's ``data``/``noise``/``velocity``."""

    def __init__(self, denoiser, cond, guidance, x_shape):
        if getattr(guidance, "interval", None) is not None:
            raise ValueError("parallel sampling mixes times within one batch; a guidance "
                             "interval is not supported there (use interval=None)")
        self.denoiser, self.cond, self.guidance = denoiser, cond, guidance
        self.shape = tuple(x_shape)
        self.rounds = 0
        self.evals = 0
        self._predictors = {}

    def _predictor(self, m):
        if m not in self._predictors:
            cond = self.cond
            if cond is not None:
                cond = cond.repeat((m,) + (1,) * (cond.dim() - 1))
            self._predictors[m] = Predictor(self.denoiser, cond, self.guidance)
        return self._predictors[m]

    def __call__(self, x, t):
        """``x [m, B, ...]``, ``t [m]`` (float64, x's device)."""
        m, b = x.shape[0], x.shape[1]
        self.rounds += 1
        self.evals += m
        pred = self._predictor(m)(x.reshape((m * b,) + self.shape[1:]), t.repeat_interleave(b))
        return _View(pred, x.shape)


class _View:
    def __init__(self, pred, shape):
        self._pred, self._shape = pred, shape

    def __getattr__(self, kind):
        return getattr(self._pred, kind).reshape(self._shape)


def _rms(a, b):
    """Per-sample RMS difference over the feature dims of ``[B, ...]`` states -> ``[B]``."""
    return (a - b).pow(2).flatten(1).mean(1).sqrt()


def _per_sample_ms(diff):
    """Mean square over the feature dims of ``diff [m, B, ...]`` -> ``[m, B]``."""
    return diff.pow(2).flatten(2).mean(2)


# -- ParaDiGMS ----------------------------------------------------------------------------------
def _picard(den, x_init, grid, base, ev, *, window, tol, max_iters, keep):
    """Shih et al. 2023, Algorithm 1. With ``Delta_i(x) = step_i(x) - x`` the base solver's
    increment, the discrete trajectory is the fixed point of
    ``x_{i+1} = x_s + sum_{j=s}^{i} Delta_j(x_j)`` (their eq. 4, the Picard form of the
    discretised ODE/SDE). Each iteration evaluates ``Delta_j`` at the p window points at once
    (one batched call), rebuilds the window by a cumulative sum, and measures the change of each
    point, ``e_i = ||x_i^{k+1} - x_i^k||^2 / D``. The window slides past the first point whose
    change exceeds ``tol^2 * v_i`` (all earlier points converged, so that point's inputs did:
    it is accepted too), new points enter initialised to the window's last state, and the run
    stops when the last step is accepted. ``v_i`` is the variance of the noise DDPM adds on the
    step into point i (their tolerance scaling, sec. 3.3; used for the ODE bases as well, with
    steps that add no noise (into t = 0) using the smallest positive one). The convergence test
    reads one boolean vector per round (one device sync per round — inherent to the method);
    the error is the worst over the batch, so all samples share one window."""
    n = len(grid) - 1
    ts = grid.to(device=x_init.device, dtype=torch.float64)
    v = posterior_coefficients(den.schedule, grid, 1.0)[2].pow(2)
    floor = float(v[v > 0].min()) if bool((v > 0).any()) else 1.0
    thr = (tol**2 * torch.where(v > 0, v, torch.full_like(v, floor))).to(x_init.device)
    xs = x_init.unsqueeze(0).repeat((n + 1,) + (1,) * x_init.dim())
    s, iters = 0, 0
    while s < n and iters < max_iters:
        p = min(window, n - s)
        win = slice(s, s + p)
        xw = xs[win]
        delta = base.step(win, xw, ev(xw, ts[win])) - xw
        new = xs[s] + delta.cumsum(0)
        err = _per_sample_ms(new - xs[s + 1:s + p + 1]).amax(1)
        xs[s + 1:s + p + 1] = new
        iters += 1
        bad = (err > thr[s:s + p]).tolist()  # thr[j] belongs to point j + 1
        stride = bad.index(True) + 1 if True in bad else p
        end = s + p
        if end < n:  # points entering the window start at the window's last state
            xs[end + 1:min(end + stride, n) + 1] = xs[end]
        s += stride
    stats = {"iterations": iters, "converged": s >= n}
    if keep:
        stats["trajectory"] = xs
    return xs[n], stats


# -- SRDS (parareal) ----------------------------------------------------------------------------
def _default_coarse(n: int) -> int:
    """The divisor of n closest to sqrt(n) (SRDS uses sqrt(n) coarse steps of sqrt(n) fine)."""
    divs = [d for d in range(1, n + 1) if n % d == 0]
    return min(divs, key=lambda d: (abs(math.log(d) - 0.5 * math.log(n)), d))


def _parareal(den, x_init, grid, base, ev, *, coarse, tol, max_iters, pipelined, keep):
    """Parareal (Lions, Maday & Turinici 2001) as used by SRDS (Selvam et al. 2024, Alg. 1):
    coarse points ``T_k`` every M fine steps; ``G`` is one deterministic base step over a coarse
    interval (DDIM for the ddpm base), ``F`` the M fine base steps. Level 0 is the coarse sweep
    ``x_{k+1}^0 = G(x_k^0)``; level p corrects it,
    ``x_{k+1}^p = G(x_k^p) + F(x_k^{p-1}) - G(x_k^{p-1})`` (SRDS eq. 5). After p levels the first
    p coarse points equal the fine sequential solution exactly, so at most N levels are needed.

    Rounds are real batched calls of a small scheduler: every evaluation whose input is known
    joins the next call. G's evaluation at ``x_k^p`` is the first fine sub-step from the same
    point, so it is shared (SRDS sec. 3.2). ``pipelined=False`` is the textbook order (the fine
    solves of level p start once level p is complete); ``pipelined=True`` (SRDS sec. 3.3) starts
    each fine solve as soon as its start point is known, speculatively ahead of the convergence
    test (wasted work still counts in ``nfe``). Points already exact are never recomputed.
    Stops at the first level whose coarse points moved by at most ``tol`` (per-sample RMS over
    dimensions, worst sample and point) from the previous level."""
    n = len(grid) - 1
    if n % coarse:
        raise ValueError(f"coarse={coarse} must divide the number of steps {n} (each coarse "
                         f"interval holds the same number of fine steps); try {_default_coarse(n)}")
    N, M = coarse, n // coarse
    ts = grid.to(device=x_init.device, dtype=torch.float64)
    cgrid = grid[::M]
    gbase = _Base("euler" if base.name == "euler" else "ddim", den, cgrid, x_init, None)
    levels = min(max_iters, N)
    X, G, F = {(0, 0): x_init}, {}, {}  # keys (k, p): x_k^p, G(x_k^p), F(x_k^p)
    ready, held = [(0, 0, 0, x_init)], []  # eval tasks (k, p, r, state at fine point kM + r)
    done, level, iters, converged = {}, 0, 0, False  # done[p] = x_N^p

    def x_at(k, p):
        return X[(k, min(k, p))]

    while ready:
        idx = torch.tensor([k * M + r for k, _, r, _ in ready], device=x_init.device)
        states = torch.stack([s for *_, s in ready])
        pred = ev(states, ts[idx])
        nxt = base.step(idx, states, pred)
        ci = torch.tensor([k for k, _, r, _ in ready if r == 0], device=x_init.device)
        first = [j for j, (_, _, r, _) in enumerate(ready) if r == 0]
        if first:
            sub = _Sub(pred, first)
            gout = gbase.step(ci, states[first], sub)
            for j, g in zip(first, gout, strict=True):
                G[ready[j][:2]] = g
        new_tasks = []
        for j, (k, p, r, _) in enumerate(ready):
            if r + 1 == M:
                F[(k, p)] = nxt[j]
            elif r > 0 or p + 1 <= levels:  # a fine solve from level p serves level p + 1
                new_tasks.append((k, p, r + 1, nxt[j]))
        # resolve every coarse point that became computable
        progress = True
        while progress:
            progress = False
            for p in range(0, levels + 1):
                for k in range(max(p - 1, 0), N):
                    if (k + 1, p) in X or p > levels or p > k + 1:
                        continue
                    if p == 0:
                        if (k, 0) not in G:
                            continue
                        val = G[(k, 0)]
                    elif p == k + 1:  # x_k^p = x_k^{p-1}: the G terms cancel exactly
                        if (k, p - 1) not in F:
                            continue
                        val = F[(k, p - 1)]
                    else:
                        if (k, p) not in G or (k, p - 1) not in F:
                            continue
                        val = G[(k, p)] + (F[(k, p - 1)] - G[(k, p - 1)])
                    X[(k + 1, p)] = val
                    progress = True
                    if k + 1 < N:
                        new_tasks.append((k + 1, p, 0, val))
                    else:
                        done[p] = val
        ready = [t for t in new_tasks if pipelined or t[2] == 0 or t[1] < level]
        held += [t for t in new_tasks if not (pipelined or t[2] == 0 or t[1] < level)]
        # test each level that completed this round, in order
        stop = False
        while level in done:
            iters = level
            if level >= 1:
                change = torch.stack([_rms(X[(k, level)], X[(k, level - 1)])
                                      for k in range(level, N + 1)])
                converged = bool(change.max() <= tol) or level == N
            if converged or level >= levels:
                stop = True
                break
            level += 1
            if not pipelined:  # release the fine solves of the completed level
                ready += [t for t in held if t[1] < level]
                held = [t for t in held if t[1] >= level]
        if stop:
            break
    stats = {"iterations": iters, "converged": converged, "coarse": N, "fine_per_coarse": M}
    if keep:
        stats["trajectory"] = torch.stack([x_at(k, iters) for k in range(N + 1)])
    return done[iters], stats


class _Sub:
    """The rows ``rows`` of a ``[m, B, ...]`` prediction view."""

    def __init__(self, view, rows):
        self._view, self._rows = view, rows

    def __getattr__(self, kind):
        return getattr(self._view, kind)[self._rows]


# -- entry point ----------------------------------------------------------------------------------
def parallel_sample(
    denoiser,
    noise: torch.Tensor,
    method: str = "picard",
    base: str = "ddim",
    *,
    steps: int | None = None,
    nfe: int | None = None,
    grid: str | torch.Tensor = "uniform",
    grid_options: dict | None = None,
    window: int | None = None,
    tol: float = 1e-3,
    max_iters: int | None = None,
    coarse: int | None = None,
    pipelined: bool = True,
    cond=None,
    guidance=None,
    generator: torch.Generator | None = None,
    reference: bool = False,
    trajectory: bool = False,
) -> tuple[torch.Tensor, dict]:
    """Sample like ``tiltflow.sample(denoiser, noise, solver=base, steps=steps)`` with fewer
    sequential rounds of (batched) network calls. Returns ``(x, stats)``.

    ``method``: ``"picard"`` (ParaDiGMS, Shih et al. 2023, Alg. 1; options ``window`` = steps
    evaluated per round, default all; ``tol`` on each point's change scaled by the DDPM noise
    variance of its step, as in the paper) or ``"parareal"`` (SRDS, Selvam et al. 2024;
    ``coarse`` = number of coarse intervals, must divide ``steps``, default the divisor nearest
    sqrt(steps); ``tol`` on the per-sample RMS change of the coarse points between iterations;
    ``pipelined`` starts fine solves as soon as their start is known).
    ``base``: ``"euler"``, ``"ddim"`` (PF-ODE) or ``"ddpm"`` (noise drawn up front from
    ``generator``, so the fixed point is the sequential ``ddpm`` sample for the same generator).
    ``steps`` (or ``nfe``, the same number: each base step costs one evaluation) is the
    sequential solver's step count; ``grid``/``grid_options`` as in :func:`tiltflow.sample`.
    ``max_iters`` caps the iterations (Picard rounds / parareal levels; default: enough for the
    exact answer). ``tol=0`` runs to the exact fixed point.

    ``stats``: ``rounds`` (batched network calls: the sequential depth), ``nfe`` (per-sample
    evaluations, summed over batches), ``iterations``, ``converged``, ``sequential_rounds``
    (= steps) and, with ``reference=True``, ``error``: the RMS distance (over samples and
    dimensions) to the sequential base solver's answer, which is run for it (not counted).
    ``trajectory=True`` adds the final points (Picard: all n + 1; parareal: the N + 1 coarse).
    """
    from . import grids as grids_mod
    from . import solve

    if method not in METHODS:
        raise ValueError(f"unknown parallel method {method!r}; choose one of {list(METHODS)}")
    if base not in BASES:
        raise ValueError(f"unknown base solver {base!r} for parallel sampling; choose one of "
                         f"{list(BASES)}")
    if not torch.is_tensor(noise) or not noise.is_floating_point() or noise.dim() < 2:
        raise ValueError("noise must be a float tensor of shape [B, ...] (batch first)")
    if (steps is None) == (nfe is None):
        raise ValueError("give exactly one of steps= or nfe= (the sequential solver's count)")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if cond is not None and (not torch.is_tensor(cond) or cond.shape[:1] != noise.shape[:1]):
        raise ValueError(f"cond must be a tensor with leading dim {noise.shape[0]} (the batch)")
    if isinstance(grid, str):
        n = int(steps if steps is not None else nfe)
        t_grid = grids_mod.get_grid(grid, n, denoiser.schedule, **(grid_options or {}))
    else:
        t_grid = torch.as_tensor(grid, dtype=torch.float64).flatten().cpu()
        if t_grid.numel() < 2 or not bool((t_grid[1:] < t_grid[:-1]).all()):
            raise ValueError("a time grid must be strictly decreasing with at least 2 points")
    n = len(t_grid) - 1
    if steps is not None and int(steps) != n or nfe is not None and int(nfe) != n:
        raise ValueError(f"the given grid has {n} steps, not {steps if steps is not None else nfe}")
    if max_iters is None:
        max_iters = n
    if int(max_iters) < 1:
        raise ValueError(f"max_iters must be >= 1, got {max_iters}")
    from .guidance import as_guidance

    guidance = as_guidance(guidance)
    x_init = float(denoiser.schedule(t_grid[:1]).sigma) * noise
    ev = _Batched(denoiser, cond, guidance, x_init.shape)
    if base == "ddpm" and generator is None:  # a private generator seeded from the global RNG
        generator = torch.Generator(device=noise.device)
        generator.manual_seed(int(torch.randint(2**62, (1,))))
    with torch.no_grad():
        if base == "ddpm":
            state = generator.get_state()
        b = _Base(base, denoiser, t_grid, x_init, generator)
        if method == "picard":
            w = n if window is None else int(window)
            if w < 1:
                raise ValueError(f"window must be >= 1, got {window}")
            x, stats = _picard(denoiser, x_init, t_grid, b, ev, window=w, tol=float(tol),
                               max_iters=int(max_iters), keep=trajectory)
        else:
            c = _default_coarse(n) if coarse is None else int(coarse)
            if not 1 <= c <= n:
                raise ValueError(f"coarse must be in [1, steps={n}], got {coarse}")
            x, stats = _parareal(denoiser, x_init, t_grid, b, ev, coarse=c, tol=float(tol),
                                 max_iters=int(max_iters), pipelined=bool(pipelined),
                                 keep=trajectory)
        stats = {"rounds": ev.rounds, "nfe": ev.evals, **stats, "sequential_rounds": n}
        if reference:
            gen = None
            if base == "ddpm":
                gen = torch.Generator(device=generator.device)
                gen.set_state(state)
            seq = solve(denoiser, x_init, t_grid, base, cond=cond, guidance=guidance,
                        generator=gen)
            stats["error"] = float((x - seq).pow(2).mean().sqrt())
    return x, stats
