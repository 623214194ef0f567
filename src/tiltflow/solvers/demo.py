"""The demo report's section on fast sampling: the eight-Gaussians mixture sampled with its
*exact* denoiser (no training) by several solvers at a low NFE, next to exact samples, and each
solver's endpoint error against the exact probability-flow ODE solution versus NFE."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from .. import analytic, metrics
from ..report import Report, save_figure
from ..schedules import VPDiscrete
from .compare import deterministic_solvers, endpoint_rmse, measure_solver, reference, spendable_nfe

__all__ = ["solvers_part"]

_F64 = torch.float64


# -- the demo section ----------------------------------------------------------------------
_SHOWN = ("euler", "ddim", "heun", "dpmpp_2m", "unipc", "ipndm", "deis", "dpmpp_3m")
_PLOTTED = ("euler", "ddim", "heun", "midpoint", "rk4", "dpmpp_2m", "dpmpp_3m", "unipc", "deis",
            "ipndm")


def _error_curves(gmm, schedule, x_init, ref, names, nfes):
    curves = {}
    for name in names:
        pts = []
        for nfe in nfes:
            spent = spendable_nfe(name, nfe)
            if spent is None or spent[0] < 1:
                continue
            x, calls = measure_solver(name, gmm, schedule, x_init, spent[1])
            err = endpoint_rmse(x, ref)
            if math.isfinite(err) and calls == spent[0]:
                pts.append((calls, err))
        if pts:
            curves[name] = sorted(set(pts))
    return curves


def solvers_part(out: Path, report: Report, quick: bool) -> None:
    """Report section: low-NFE samples of several solvers on eight Gaussians (exact denoiser,
    diffusers' linear-beta VP schedule) next to exact samples, and endpoint error vs NFE."""
    import matplotlib
    import matplotlib.pyplot as plt

    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gmm = analytic.eight_gaussians()
    schedule = VPDiscrete.linear()
    n = 400 if quick else 1500
    nfe_shown = 4
    noise = torch.randn(n, 2, dtype=_F64, generator=torch.Generator().manual_seed(1))
    x_init = float(schedule(torch.tensor(1.0, dtype=_F64)).sigma) * noise
    ref, how = reference(gmm, schedule, x_init)
    exact = gmm.sample(n, generator=torch.Generator().manual_seed(2))

    names = deterministic_solvers()
    shown = [s for s in _SHOWN if s in names][:6]
    panels = [("exact samples", exact), ("exact PF-ODE map of the noise", ref)]
    rows = []
    floor = metrics.noise_floor("sw2", lambda m, g: gmm.sample(m, generator=g), n, repeats=3)
    for name in shown:
        spent = spendable_nfe(name, nfe_shown)
        if spent is None:
            continue
        x, calls = measure_solver(name, gmm, schedule, x_init, spent[1])
        panels.append((f"{name}, {calls} NFE", x))
        ok = bool(torch.isfinite(x).all())
        rows.append([name, calls, endpoint_rmse(x, ref),
                     metrics.sliced_w2(x, exact) if ok else math.inf, floor.mean])

    cols = 4
    nrow = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrow, cols, figsize=(3.1 * cols, 3.1 * nrow), sharex=True,
                             sharey=True, squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for ax, (title, pts) in zip(axes.flat, panels, strict=False):
        ax.set_visible(True)
        pts = pts[torch.isfinite(pts).all(1)]
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.4, color="tab:blue")
        ax.set_title(title, fontsize=9)
        ax.set_xlim(-6.5, 6.5)
        ax.set_ylim(-6.5, 6.5)
        ax.set_aspect("equal")
    fig.suptitle(f"eight Gaussians, exact denoiser, linear-beta VP: solvers at ~{nfe_shown} NFE")
    save_figure(fig, out / "solvers_samples.png")

    nfes = (2, 4, 6, 8, 10, 16) if quick else (2, 4, 6, 8, 10, 16, 32)
    plotted = [s for s in _PLOTTED if s in names]
    curves = _error_curves(gmm, schedule, x_init[: min(n, 300)], ref[: min(n, 300)], plotted,
                           nfes)
    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    cmap, markers = plt.get_cmap("tab10"), "os^vD<>ph*"
    for i, name in enumerate(plotted):
        if name not in curves:
            continue
        xs, ys = zip(*curves[name], strict=True)
        ax.plot(xs, ys, marker=markers[i % 10], ms=4, lw=1.5, color=cmap(i % 10), label=name)
    ax.set(xscale="log", yscale="log", xlabel="NFE (network evaluations)",
           ylabel="RMS endpoint error vs exact ODE",
           title="eight Gaussians, linear-beta VP, uniform (trailing) grid")
    ax.set_xticks([1, 2, 4, 8, 16, 32] if not quick else [1, 2, 4, 8, 16])
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    save_figure(fig, out / "solvers_error_vs_nfe.png")

    sec = report.section(
        "Fast sampling: solvers on an exact mixture",
        f"Every deterministic solver in the registry ({len(names)}: {', '.join(names)}) driven by "
        "the exact eight-Gaussians denoiser under diffusers' linear-beta VP schedule (1000 "
        f"steps), all from the same {n} start states at t = 1. The endpoint error is the RMS "
        "distance to the exact solution of the same probability-flow ODE from the same start "
        f"({how}); sliced W2 compares the samples with exact samples, next to its noise floor "
        "(two exact sample sets of the same size). Solvers that cannot spend exactly "
        f"{nfe_shown} evaluations are shown at {nfe_shown - 1}. The full comparison with "
        "diffusers and flow_matching is `tiltflow bench solvers`."
        f"\n\nThis section took {time.perf_counter() - start:.0f} s.")
    sec.tables.append((["solver", "NFE", "endpoint RMSE", "sliced W2 vs exact", "SW2 noise floor"],
                       rows))
    sec.images += [("solvers_samples.png", f"samples at ~{nfe_shown} NFE next to exact samples"),
                   ("solvers_error_vs_nfe.png", "endpoint error vs NFE (log-log)")]
