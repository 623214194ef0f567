"""The demo report's section on few-step generation: students distilled from the *exact*
eight-Gaussians teacher (or trained on exact samples), sampled at 1, 2 and 4 steps next to the
teacher's own samples at the same NFE and at many NFE."""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import torch

from .. import analytic, metrics, solvers
from ..report import Report, save_figure
from .base import distill, get_method
from .student import sample

__all__ = ["fewstep_part"]

_SHOWN = ("reflow", "consistency_distillation", "consistency_training", "shortcut", "meanflow")
_NFES = (1, 2, 4)


def fewstep_part(out: Path, report: Report, quick: bool) -> None:
    """Report section: a grid of scatter plots, one row per method (teacher first), one
    column per NFE, with sliced W2 to exact samples in each title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gmm = analytic.eight_gaussians()
    teacher = gmm.denoiser("rectified_flow")
    n = 300 if quick else 1500
    steps = 60 if quick else 1500
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
    exact = gmm.sample(n, generator=torch.Generator().manual_seed(2))
    data = gmm.sample(8192, generator=torch.Generator().manual_seed(3)).float()
    config = {"steps": steps, "lr": 1e-3, "ckpt_every": 0, "num_data": 4096 if quick else 8192,
              "model": {"name": "mlp", "dim": 2, "hidden": 128, "depth": 3}}
    floor = metrics.noise_floor("sw2", lambda m, g: gmm.sample(m, generator=g), n).mean

    rows, panels = [], {}
    teacher_cells = []
    for nfe in _NFES:
        x = solvers.sample(teacher, noise.double(), "euler" if nfe == 1 else "dpmpp_2m", nfe=nfe)
        teacher_cells.append((nfe, x))
    panels["teacher (Euler / DPM++ 2M)"] = teacher_cells
    rows.append(["teacher (exact)"] + [metrics.sliced_w2(x.double(), exact)
                                       for _, x in teacher_cells] + ["-"])
    for name in _SHOWN:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            needs = get_method(name).needs_data
            student = distill(name, teacher, data=data if needs else None, config=config,
                              out_dir=tmp)
        cells = [(nfe, sample(student, noise, nfe, generator=torch.Generator().manual_seed(4)))
                 for nfe in _NFES]
        panels[name] = cells
        rows.append([name] + [metrics.sliced_w2(x.double(), exact) for _, x in cells]
                    + [round(time.perf_counter() - t0, 1)])

    fig, axes = plt.subplots(len(panels), len(_NFES), figsize=(2.6 * len(_NFES),
                                                               2.6 * len(panels)),
                             sharex=True, sharey=True, squeeze=False)
    for r, (name, cells) in enumerate(panels.items()):
        for c, (nfe, x) in enumerate(cells):
            ax = axes[r, c]
            pts = x[torch.isfinite(x).all(1)]
            ax.scatter(exact[:, 0], exact[:, 1], s=1, alpha=0.15, color="lightgray")
            ax.scatter(pts[:, 0], pts[:, 1], s=1.5, alpha=0.5, color="tab:blue")
            sw2 = rows[r][1 + c]
            ax.set_title(f"{name}\n{nfe} NFE, SW2 {sw2:.2f}" if c == 0 else
                         f"{nfe} NFE, SW2 {sw2:.2f}", fontsize=8)
            ax.set_xlim(-6.5, 6.5)
            ax.set_ylim(-6.5, 6.5)
            ax.set_aspect("equal")
    fig.suptitle("few-step students of the exact eight-Gaussians teacher (gray: exact samples)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    save_figure(fig, out / "fewstep_samples.png")

    sec = report.section(
        "Few-step generation: distilled students",
        f"Students of the exact eight-Gaussians denoiser (rectified-flow schedule, no teacher "
        f"training, so each error is the method's own), each trained {steps} steps on CPU, "
        "sampled at 1, 2 and 4 network evaluations from the same noise. The teacher row is the "
        "exact denoiser with Euler (1 NFE) and DPM-Solver++ 2M. Sliced W2 is to exact samples; "
        f"its noise floor at {n} points is {floor:.3f}. The full comparison, with progressive "
        "distillation and per-step costs, is `tiltflow bench fewstep`."
        f"\n\nThis section took {time.perf_counter() - start:.0f} s.")
    sec.tables.append((["method"] + [f"SW2 @ {k} NFE" for k in _NFES] + ["train s"],
                       [[v if not isinstance(v, float) or math.isfinite(v) else "inf"
                         for v in row] for row in rows]))
    sec.images.append(("fewstep_samples.png", "1-, 2- and 4-step samples of each student"))
