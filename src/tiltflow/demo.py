"""``tiltflow demo``: train two small models on a CPU and write ``report.html``.

1. A flow-matching MLP on the eight-Gaussians mixture, whose exact density tiltflow knows:
   samples next to exact ones, sliced W2 / MMD / energy distance with their noise floors.
2. A class-conditional rectified-flow UNet on scikit-learn's 8x8 digits: one row per class
   next to real digits, FD-digits with its floor, and the accuracy of a digits classifier on
   the samples.
3. Each method family's own section, from its ``demo.py`` (solvers: :mod:`tiltflow.solvers.demo`,
   few-step students: :mod:`tiltflow.fewstep.demo`).

Each part is a function ``part(out_dir, report, quick)``; later capabilities add theirs to
``PARTS``. Budgets fit `make demo` in about ten minutes on two CPU cores.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from . import analytic, metrics
from .config import TrainConfig, load_config
from .report import Report, save_figure
from .runs import build_run, data_info
from .solvers import sample
from .train import train

EIGHT_GAUSSIANS = {
    "data": {"name": "eight_gaussians", "n": 20000},
    "model": {"name": "mlp", "hidden": 128, "depth": 3, "prediction": "velocity"},
    "schedule": "rectified_flow",
    "objective": {"name": "rectified_flow"},
    "train": {"steps": 2500, "batch_size": 512, "lr": 2e-3, "warmup_steps": 100,
              "ema_decay": 0.995, "ckpt_every": 2500, "log_every": 100},
}

DIGITS = {
    "data": {"name": "digits"},
    "model": {"name": "unet", "base_channels": 32, "channel_mults": [1, 2],
              "num_res_blocks": 1, "prediction": "velocity"},
    "schedule": "rectified_flow",
    "objective": {"name": "rectified_flow", "time_sampling": "logit_normal", "label_dropout": 0.1},
    "train": {"steps": 2000, "batch_size": 128, "lr": 1e-3, "warmup_steps": 200,
              "ema_decay": 0.998, "ckpt_every": 2000, "log_every": 50},
}


def _train(cfg: dict, out_dir: Path, quick: bool):
    overrides = [f"train.out_dir={out_dir}"]
    if quick:
        overrides += ["train.steps=30", "train.ckpt_every=30", "train.log_every=10",
                      "train.warmup_steps=5"]
    cfg = load_config(cfg, overrides)
    dataset, den, objective = build_run(cfg)
    start = time.perf_counter()
    result = train(den, objective, dataset, TrainConfig.from_dict(cfg["train"]),
                   meta={"config": cfg, "data": data_info(dataset)})
    return dataset, result, time.perf_counter() - start


def _loss_figure(result, title):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    losses = torch.tensor(result.losses)
    steps = torch.arange(len(losses)) + result.first_step
    ax.plot(steps, losses, lw=0.5, alpha=0.35, color="tab:blue", label="per step")
    k = max(1, len(losses) // 50)
    if len(losses) >= 2 * k:
        smooth = losses.unfold(0, k, 1).mean(1)
        ax.plot(steps[k - 1:], smooth, color="tab:blue", label=f"mean of {k}")
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.set_yscale("log")
    ax.legend()
    return fig


def two_d_part(out: Path, report: Report, quick: bool) -> None:
    import matplotlib.pyplot as plt

    dataset, result, secs = _train(EIGHT_GAUSSIANS, out / "eight_gaussians", quick)
    n = 500 if quick else 2000
    gmm = analytic.eight_gaussians()
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
    x = sample(result.ema, noise, "heun", nfe=19).double()
    exact = gmm.sample(n, generator=torch.Generator().manual_seed(2))
    scores = metrics.compare(x, lambda m, g: gmm.sample(m, generator=g),
                             metrics=("sw2", "mmd", "energy"), repeats=10,
                             generator=torch.Generator().manual_seed(3))

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.4), sharex=True, sharey=True)
    for ax, pts, title in [(axes[0], x, "model (heun, 19 NFE)"), (axes[1], exact, "exact mixture")]:
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.4)
        ax.set_title(title)
        ax.set_aspect("equal")
    save_figure(fig, out / "eight_gaussians_samples.png")
    save_figure(_loss_figure(result, "eight Gaussians: training loss"), out / "eight_gaussians_loss.png")

    sec = report.section(
        "Flow matching on eight Gaussians (exact target)",
        f"An MLP ({sum(p.numel() for p in result.ema.parameters()):,} parameters) trained with "
        f"rectified flow for {result.step} steps in {secs:.0f} s; {n} samples with Heun at 19 "
        "evaluations, compared with exact samples of the same size. The floor is the same "
        "distance between two independent exact sample sets: a perfect model sits at the floor, "
        "within its spread (MMD^2 and energy distance are unbiased, so they scatter around 0).")
    sec.tables.append((["metric", "model vs exact", "noise floor (mean)", "floor std (10 draws)"],
                       [[k, v["value"], v["floor"], v["floor_std"]] for k, v in scores.items()]))
    sec.images += [("eight_gaussians_samples.png", "samples (left) next to exact samples (right)"),
                   ("eight_gaussians_loss.png", "training loss")]


def digits_part(out: Path, report: Report, quick: bool) -> None:
    from .plots import save_grid

    dataset, result, secs = _train(DIGITS, out / "digits", quick)
    classes = dataset.num_classes
    per_class = 2 if quick else 36
    cond = torch.arange(classes).repeat_interleave(per_class)
    noise = torch.randn(len(cond), *dataset.shape, generator=torch.Generator().manual_seed(1))
    rows = []
    for w in (0.0, 1.0):
        x = sample(result.ema, noise, "heun", nfe=19, cond=cond, guidance=w)
        fd = metrics.fd_digits(x)
        acc = metrics.digits_classifier_accuracy(x, cond)
        rows.append([f"CFG w={w:g}", fd, acc])
        if w == 1.0:
            shown = x.view(classes, per_class, *dataset.shape)[:, :10].reshape(-1, *dataset.shape)
    floor = metrics.fd_digits_floor()
    save_grid(shown, out / "digits_samples.png", nrow=min(10, per_class),
              title="samples, one row per class (CFG w=1)")
    real = torch.stack([dataset.x[dataset.cond == c][:10] for c in range(classes)])
    save_grid(real.reshape(-1, *dataset.shape), out / "digits_real.png", nrow=10,
              title="real digits (training split)")
    save_figure(_loss_figure(result, "digits: training loss"), out / "digits_loss.png")
    sec = report.section(
        "Class-conditional digits (rectified flow, UNet)",
        f"A UNet ({sum(p.numel() for p in result.ema.parameters()):,} parameters) trained for "
        f"{result.step} steps in {secs:.0f} s on the 1,437 training digits, 10% label dropout "
        f"for classifier-free guidance; {len(cond)} samples ({per_class} per class) with Heun "
        "at 19 evaluations. FD-digits is the Fréchet distance in the features of tiltflow's "
        "digits classifier; its floor is FD(train split, test split). Accuracy: how often that "
        "classifier recognises the requested class in the samples.")
    sec.tables.append((["sampler", "FD-digits", "classifier accuracy"], rows))
    sec.tables.append((["reference", "FD-digits"], [["floor: train vs test split", floor]]))
    sec.images += [("digits_samples.png", "generated, one row per class"),
                   ("digits_real.png", "real, one row per class"),
                   ("digits_loss.png", "training loss")]


def _solvers_part(out: Path, report: Report, quick: bool) -> None:
    from .solvers.demo import solvers_part

    solvers_part(out, report, quick)


def _fewstep_part(out: Path, report: Report, quick: bool) -> None:
    from .fewstep.demo import fewstep_part

    fewstep_part(out, report, quick)


PARTS = [two_d_part, digits_part, _solvers_part, _fewstep_part]


def run_demo(out_dir="runs/demo", quick: bool = False) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = Report("tiltflow demo", out)
    start = time.perf_counter()
    for part in PARTS:
        part(out, report, quick)
        report.write()  # write after every part, so a long demo shows progress
    import os
    import platform

    from . import __version__

    report.section("About this run", (
        f"tiltflow {__version__}, torch {torch.__version__}, {platform.machine()}, "
        f"{os.cpu_count()} CPU cores{', CUDA' if torch.cuda.is_available() else ''}; "
        f"the whole demo took {time.perf_counter() - start:.0f} s."
        + (" Quick mode: tiny budgets, the numbers mean nothing." if quick else "")))
    return report.write()
