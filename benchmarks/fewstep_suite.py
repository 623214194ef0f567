"""Benchmark suite ``fewstep``: students at 1, 2 and 4 NFE against their teacher.

Teachers are the exact mixtures (``eight_gaussians``, ``anisotropic_2d``) on the rectified-flow
schedule, so a student's error is its method's own. Quality: sliced W2 between 10,000 student
samples and 10,000 exact samples, next to the noise floor (the same distance between two exact
sets). Baseline: the teacher sampled with the best tiltflow training-free solver at the same NFE
(the minimum over several solvers). The methods that train from data get exact samples; the
distillation methods train on the teacher's own samples (``fewstep.distill(data=None)``).

Cost: seconds per training step, as a ratio to one flow-matching step of the same network and
batch, measured in the same run (MeanFlow is run twice: ``torch.func.jvp`` and the
finite-difference fallback).

    python benchmarks/fewstep_suite.py [--quick]      # or: tiltflow bench fewstep
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch

from tiltflow import analytic, fewstep, metrics, objectives, solvers
from tiltflow.train import train

_spec = importlib.util.spec_from_file_location("tiltflow_bench_common",
                                               Path(__file__).with_name("common.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

BEDS = ("eight_gaussians", "anisotropic_2d")
NFES = (1, 2, 4)
N_SAMPLES = 10_000
NET = {"name": "mlp", "dim": 2, "hidden": 128, "depth": 3}
TEACHER_SOLVERS = ("euler", "ddim", "dpmpp_2m", "unipc", "deis", "ipndm", "heun", "dpm_solver")
METHODS = {  # name -> (method, extra config)
    "reflow": ("reflow", {}),
    "reflow_instaflow": ("reflow", {"one_step_steps": 500}),
    "perflow": ("perflow", {"windows": 4}),
    "progressive_distillation": ("progressive_distillation", {"teacher_steps": 64}),
    "consistency_distillation": ("consistency_distillation", {}),
    "phased_consistency_distillation": ("phased_consistency_distillation", {"phases": 4}),
    "consistency_training": ("consistency_training", {}),
    "easy_consistency_tuning": ("easy_consistency_tuning", {}),
    "stable_consistency_tuning": ("stable_consistency_tuning", {}),
    "shortcut": ("shortcut", {}),
    "meanflow": ("meanflow", {}),
    "meanflow_fd": ("meanflow", {"jvp": "finite_difference"}),
    "mmd": ("mmd", {"nfe": 1}),
    "dmd": ("dmd", {}),
    "vsd": ("vsd", {}),
    "sid": ("sid", {}),
    "scm": ("scm", {}),
}


def _sw2(x, ref) -> float:
    return metrics.sliced_w2(x.double(), ref, generator=torch.Generator().manual_seed(11))


def _teacher_rows(bed, den, noise, ref, floor):
    """The best training-free solver at each NFE (and Heun at 32 NFE as the many-step mark)."""
    rows = []
    for nfe in NFES:
        best = None
        for name in TEACHER_SOLVERS:
            try:
                x = solvers.sample(den, noise.double(), name, nfe=nfe)
            except ValueError:  # this NFE is not reachable for the solver
                continue
            value = _sw2(x, ref)
            if best is None or value < best[1]:
                best = (name, value)
        rows.append({"bed": bed, "method": f"teacher ({best[0]})", "role": "teacher", "nfe": nfe,
                     "metric": "sw2", "value": best[1], "floor": floor, "extra": {}})
    x = solvers.sample(den, noise.double(), "heun", nfe=31)
    rows.append({"bed": bed, "method": "teacher (heun)", "role": "teacher", "nfe": 31,
                 "metric": "sw2", "value": _sw2(x, ref), "floor": floor, "extra": {}})
    return rows


def _fm_seconds_per_step(data, steps: int, common: dict) -> float:
    """One flow-matching step of the same network and batch (the cost unit)."""
    from tiltflow import Denoiser, nets

    den = Denoiser(nets.build(dict(NET)), "rectified_flow", "velocity")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {k: common[k] for k in ("batch_size", "lr", "warmup_steps", "log_every")}
        t0 = time.perf_counter()
        train(den, objectives.get("flow_matching"), {"x": data}, {**cfg, "steps": steps,
                                                                  "ckpt_every": 0,
                                                                  "out_dir": tmp})
        return (time.perf_counter() - t0) / steps


def run(quick: bool = False) -> dict:
    t_start = time.time()
    torch.set_num_threads(1)  # on a shared 2-core machine more threads only contend
    steps = 100 if quick else 1000
    common = {"steps": steps, "batch_size": 256, "lr": 1e-3, "warmup_steps": 100,
              "log_every": 50, "ckpt_every": 0, "num_data": 8192, "model": dict(NET)}
    rows, notes = [], []
    for bed in BEDS:
        mixture = analytic.get_testbed(bed)
        den = mixture.denoiser("rectified_flow")
        ref = mixture.sample(N_SAMPLES, generator=torch.Generator().manual_seed(1))
        floor = metrics.noise_floor("sw2", mixture.sample, N_SAMPLES).mean
        noise = torch.randn(N_SAMPLES, 2, generator=torch.Generator().manual_seed(2))
        data = mixture.sample(8192, generator=torch.Generator().manual_seed(3)).float()
        rows += _teacher_rows(bed, den, noise, ref, floor)
        fm_step = _fm_seconds_per_step(data, min(steps, 300), common)
        for label, (method, extra) in METHODS.items():
            spec = fewstep.get_method(method)
            cfg = {**common, **extra}
            if method == "progressive_distillation":  # 6 rounds, each a third of the budget
                cfg["steps"] = max(steps // 3, 20)
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                student = fewstep.distill(method, den, data=data if spec.needs_data else None,
                                          config=cfg, out_dir=tmp)
                seconds = time.perf_counter() - t0
                total_steps = cfg["steps"] * (6 if method == "progressive_distillation" else 1)
                for nfe in NFES:
                    lo, hi = student.nfe
                    if method != "progressive_distillation" and (nfe < lo or (hi and nfe > hi)):
                        continue  # a fixed-NFE student (MMD fine-tuning)
                    if method == "progressive_distillation":
                        student = fewstep.load(Path(tmp) / f"round_{nfe:04d}")
                    x = fewstep.sample(student, noise, nfe=nfe,
                                       generator=torch.Generator().manual_seed(4))
                    rows.append({"bed": bed, "method": label, "role": "ours", "nfe": nfe,
                                 "metric": "sw2", "value": _sw2(x, ref), "floor": floor,
                                 "extra": {"train_seconds": round(seconds, 1),
                                           "steps": total_steps,
                                           "cost_per_step_vs_fm": round(
                                               seconds / total_steps / fm_step, 2)}})
            print(f"{bed} {label}: {seconds:.0f} s", file=sys.stderr, flush=True)
    rows += _guided_rows(common)
    notes.append("distillation methods (reflow, progressive, consistency distillation) train on "
                 "8,192 teacher samples (Heun, 63 NFE), counted in their training time; the data "
                 "methods on 8,192 exact samples")
    notes.append("progressive distillation: 6 rounds (64 teacher steps -> 1), each "
                 f"{max(steps // 3, 20)} steps; its 1/2/4-NFE students are the rounds' students")
    notes.append("cost_per_step_vs_fm includes teacher sampling and, for the distillation "
                 "methods, the teacher's solver steps inside each training step")
    res = bench.result("fewstep", t_start, quick, rows, notes=notes)
    _plot(res)
    bench.write_results(res, _markdown(res))
    return res


GUIDED_BED = "eight_gaussians_classes"
GUIDANCE = (0.0, 2.0)


def _guided_rows(common: dict) -> list:
    """Latent consistency distillation on the exact class-conditional eight Gaussians (classes
    = components), w ~ U[0, 4]: at each guidance scale the target is the guided teacher's ODE
    solution (tight dopri5 from other noises; at w = 0 the exact class-conditional law)."""
    mixture = analytic.eight_gaussians()
    teacher = mixture.denoiser("rectified_flow", conditional=True)
    x, labels = mixture.sample(8192, generator=torch.Generator().manual_seed(3),
                               return_labels=True)
    labels_eval = torch.arange(N_SAMPLES) % mixture.num_components
    noise = torch.randn(N_SAMPLES, 2, generator=torch.Generator().manual_seed(2))
    ref_noise = torch.randn(N_SAMPLES, 2, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(5))
    floor = metrics.noise_floor("sw2", mixture.sample, N_SAMPLES).mean
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        student = fewstep.distill("latent_consistency_distillation", teacher,
                                  data={"x": x.float(), "cond": labels},
                                  config={**common, "w_min": 0.0, "w_max": 4.0}, out_dir=tmp)
    seconds = time.perf_counter() - t0
    rows = []
    for w in GUIDANCE:
        ref = solvers.reference_solve(teacher, ref_noise, cond=labels_eval,
                                      guidance=w or None)
        for nfe in NFES:
            best = None
            for name in TEACHER_SOLVERS:
                try:
                    out = solvers.sample(teacher, noise.double(), name, nfe=nfe,
                                         cond=labels_eval, guidance=w or None)
                except ValueError:
                    continue
                value = _sw2(out, ref)
                best = min(best or (value, name), (value, name))
            extra = {"guidance": w}
            rows.append({"bed": GUIDED_BED, "method": f"teacher ({best[1]})", "role": "teacher",
                         "nfe": nfe, "metric": "sw2", "value": best[0], "floor": floor,
                         "extra": extra})
            out = fewstep.sample(student, noise, nfe, cond=labels_eval, guidance=w,
                                 generator=torch.Generator().manual_seed(4))
            rows.append({"bed": GUIDED_BED, "method": "latent_consistency_distillation",
                         "role": "ours", "nfe": nfe, "metric": "sw2", "value": _sw2(out, ref),
                         "floor": floor, "extra": {**extra, "train_seconds": round(seconds, 1)}})
    print(f"{GUIDED_BED} latent_consistency_distillation: {seconds:.0f} s", file=sys.stderr,
          flush=True)
    return rows


def _plot(res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(BEDS), figsize=(5.2 * len(BEDS) + 2.6, 4.4))
    colors, markers = plt.get_cmap("tab20"), "osD^v<>ph*Xd"
    for ax, bed in zip(axes, BEDS, strict=True):
        rows = [r for r in res["rows"] if r["bed"] == bed]
        teacher = [r for r in rows if r["role"] == "teacher" and r["nfe"] in NFES]
        ax.plot([r["nfe"] for r in teacher], [r["value"] for r in teacher], "k--o", lw=2,
                label="teacher, best solver")
        for i, label in enumerate(METHODS):
            own = [r for r in rows if r["method"] == label]
            ax.plot([r["nfe"] for r in own], [r["value"] for r in own], marker=markers[i % 11],
                    color=colors(i % 20), lw=1.3, ms=5, label=label)
        ax.axhline(rows[0]["floor"], color="gray", lw=1, ls=":", label="noise floor")
        ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel="sliced W2 to exact samples",
               title=bed)
        ax.set_xticks(list(NFES), [str(n) for n in NFES])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(bench.RESULTS / "fewstep_quality_vs_nfe.png", dpi=110)
    plt.close(fig)


def _markdown(res: dict) -> str:
    lines = ["# fewstep: students at 1, 2, 4 NFE vs the teacher's best solver", "",
             bench.header(res) + ".", "",
             "Sliced W2 to 10,000 exact samples (floor: two exact sets). `x teacher`: the "
             "teacher's best training-free solver at the same NFE divided by the student's "
             "(the bar: >= 3 at 1 and 2 NFE). Cost: seconds per training step / one "
             "flow-matching step of the same network.", ""]
    for bed in BEDS:
        rows = [r for r in res["rows"] if r["bed"] == bed]
        if not rows:
            continue
        teacher = {r["nfe"]: r for r in rows if r["role"] == "teacher"}
        lines += [f"## {bed} (noise floor {rows[0]['floor']:.3f}; teacher at 31 NFE: "
                  f"{teacher[31]['value']:.3f})", "",
                  "| method | SW2 @1 | SW2 @2 | SW2 @4 | x teacher @1 | x teacher @2 | "
                  "train s | cost/step vs FM |", "| --- | " + "--- | " * 7]
        lines.append("| " + " | ".join(["teacher, best solver"] + [
            f"{teacher[n]['value']:.3f} ({teacher[n]['method'][9:-1]})" for n in NFES]
            + ["", "", "", ""]) + " |")
        for label in METHODS:
            own = {r["nfe"]: r for r in rows if r["method"] == label}
            e = next(iter(own.values()))["extra"]
            lines.append(
                f"| {label} | " + " | ".join(f"{own[n]['value']:.3f}" if n in own else "-"
                                             for n in NFES) + " | "
                + " | ".join(f"{teacher[n]['value'] / own[n]['value']:.1f}" if n in own else "-"
                             for n in (1, 2))
                + f" | {e['train_seconds']} | {e['cost_per_step_vs_fm']} |")
        lines.append("")
    guided = [r for r in res["rows"] if r["bed"] == GUIDED_BED]
    if guided:
        lines += [f"## {GUIDED_BED}: latent consistency distillation at guidance w", "",
                  "One w-conditioned student (w ~ U[0, 4] in training) against the guided "
                  "teacher's tight ODE solution at the same w (at w = 0: the exact "
                  "class-conditional law). Floor "
                  f"{guided[0]['floor']:.3f}.", "",
                  "| w | who | SW2 @1 | SW2 @2 | SW2 @4 |", "| --- | --- | --- | --- | --- |"]
        for w in GUIDANCE:
            for role in ("teacher", "ours"):
                cells = {r["nfe"]: r for r in guided
                         if r["role"] == role and r["extra"]["guidance"] == w}
                who = "teacher, best solver" if role == "teacher" else "LCM student"
                lines.append(f"| {w} | {who} | " + " | ".join(
                    f"{cells[n]['value']:.3f}" + (f" ({cells[n]['method'][9:-1]})"
                                                  if role == "teacher" else "")
                    for n in NFES) + " |")
        lines.append("")
    lines += ["![quality vs NFE](fewstep_quality_vs_nfe.png)", "",
              "Notes: " + "; ".join(res["notes"]), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    return bench.cli(__doc__, run, _markdown, "100 training steps instead of 1,000", argv)


if __name__ == "__main__":
    sys.exit(main())
