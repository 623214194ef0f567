"""Benchmark suite ``train``: steps/s of ``tiltflow.train.train`` vs a plain PyTorch loop, and
resume exactness.

Both loops train the same MLP (same initial weights) with the same objective, batch, AdamW,
linear lr warm-up, gradient clipping and EMA update: the plain loop does *the same math* and
nothing else (no accelerate, no loss buffering/NaN check, no TensorBoard, no progress bar, no
checkpoint). tiltflow's time is the whole ``train()`` call, including its setup and the final
checkpoint, so the ratio is the full price of the framework. Runs are interleaved
(ours, plain, plain, ours, ...) and the median of the repeats is reported.

    python benchmarks/train_suite.py [--quick]      # or: tiltflow bench train
"""

from __future__ import annotations

import copy
import importlib.util
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import tiltflow
from tiltflow import checkpoint as ck
from tiltflow.config import TrainConfig
from tiltflow.train import DataOrder, ema_decay_at, ema_update, lr_at, train

# benchmarks/ is not a package (``tiltflow bench`` loads suites by file path): load the shared
# helpers in common.py by path too
_spec = importlib.util.spec_from_file_location("tiltflow_bench_common",
                                               Path(__file__).with_name("common.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


class _MLP(nn.Module):  # stand-in when tiltflow.nets is not there
    def __init__(self, dim=2, hidden=256, depth=4):
        super().__init__()
        layers, d = [], dim + 1
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.SiLU()]
            d = hidden
        self.f = nn.Sequential(*layers, nn.Linear(d, dim))

    def forward(self, x, t, cond=None):
        return self.f(torch.cat([x, t[:, None]], 1))


def _fm_loss(model, batch, generator=None):  # stand-in flow-matching loss
    x = batch["x"]
    t = torch.rand(x.shape[0], generator=generator)
    noise = torch.randn(x.shape, generator=generator)
    x_t = (1 - t[:, None]) * x + t[:, None] * noise
    return (model(x_t, t).velocity - (noise - x)).square().mean(1)


def _setup():
    try:
        from tiltflow import nets

        net = nets.build({"name": "mlp", "dim": 2, "hidden": 256, "depth": 4})
    except (ImportError, AttributeError):
        net = _MLP()
    try:
        from tiltflow import objectives

        objective = objectives.get("flow_matching")
    except (ImportError, AttributeError):
        objective = _fm_loss
    try:
        from tiltflow import analytic

        data = analytic.eight_gaussians().sample(
            20_000, generator=torch.Generator().manual_seed(0)).float()
    except (ImportError, AttributeError):
        data = torch.randn(20_000, 2, generator=torch.Generator().manual_seed(0))
    return net, objective, data


def plain_loop(model, objective, data, cfg: TrainConfig) -> float:
    """The same training math as tiltflow.train, written as a bare loop. Returns seconds."""
    t0 = time.perf_counter()
    net = model.net
    net.train()
    opt = torch.optim.AdamW([p for p in net.parameters()], lr=cfg.lr, betas=cfg.betas,
                            weight_decay=cfg.weight_decay)
    ema = copy.deepcopy(model).float().eval().requires_grad_(False)
    params, ema_params = list(net.parameters()), list(ema.net.parameters())
    gen = torch.Generator().manual_seed(cfg.seed)
    order = DataOrder(data.shape[0], cfg.seed)
    for step in range(1, cfg.steps + 1):
        x = data[order.next(cfg.batch_size)]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        loss = objective(model, {"x": x, "cond": None}, generator=gen).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(ema_params, params, ema_decay_at(step, cfg))
    float(loss.detach())
    return time.perf_counter() - t0


def _resume_exact(objective, data, root: Path) -> bool:
    def fresh():
        torch.manual_seed(0)
        net, _, _ = _setup()
        return tiltflow.Denoiser(net, tiltflow.schedules.RectifiedFlow(), "velocity")

    kw = dict(batch_size=256, lr=1e-3, warmup_steps=10, log_every=10, ckpt_every=20)
    full = train(fresh(), objective, data, TrainConfig(steps=40, out_dir=str(root / "a"), **kw))
    train(fresh(), objective, data, TrainConfig(steps=20, out_dir=str(root / "b"), **kw))
    resumed = train(fresh(), objective, data, TrainConfig(steps=40, out_dir=str(root / "b"), **kw),
                    resume=True)
    a, b = ck.load_checkpoint(full.checkpoint), ck.load_checkpoint(resumed.checkpoint)
    same = all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    same &= all(torch.equal(a.ema[k], b.ema[k]) for k in a.ema)
    ta, _ = ck.flatten_state(a.optimizer)
    tb, _ = ck.flatten_state(b.optimizer)
    same &= ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    return bool(same)


def run(quick: bool = False) -> dict:
    """Measure and write ``benchmarks/results/train.{json,md}``; returns the result dict."""
    t_start = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core machines: one thread gives stable timings
    try:
        steps, repeats = (200, 3) if quick else (800, 5)
        net0, objective, data = _setup()
        init = copy.deepcopy(net0.state_dict())
        cfg_kw = dict(steps=steps, batch_size=256, lr=1e-3, warmup_steps=100, grad_clip=1.0,
                      ema_decay=0.999, log_every=50, ckpt_every=0)

        def model():
            net = copy.deepcopy(net0)
            net.load_state_dict(init)
            return tiltflow.Denoiser(net, tiltflow.schedules.RectifiedFlow(), "velocity")

        ours, plain = [], []
        with tempfile.TemporaryDirectory() as tmp:
            # warm-up: imports (tensorboard, accelerate) and allocator, not timed
            train(model(), objective, data, TrainConfig(**{**cfg_kw, "steps": 20},
                                                        out_dir=f"{tmp}/warm"))
            plain_loop(model(), objective, data, TrainConfig(**{**cfg_kw, "steps": 20}))
            for r in range(repeats):
                for who in (("ours", "plain") if r % 2 == 0 else ("plain", "ours")):
                    cfg = TrainConfig(**cfg_kw, out_dir=f"{tmp}/run{r}")
                    if who == "ours":
                        t0 = time.perf_counter()
                        train(model(), objective, data, cfg)
                        ours.append(steps / (time.perf_counter() - t0))
                    else:
                        plain.append(steps / plain_loop(model(), objective, data, cfg))
            exact = _resume_exact(objective, data, Path(tmp) / "resume")
    finally:
        torch.set_num_threads(threads)

    o, p = statistics.median(ours), statistics.median(plain)
    extra = {"steps": steps, "batch_size": 256, "repeats": repeats, "threads": 1,
             "model": "MLP 2-D, hidden 256, depth 4", "runs": None}
    rows = [
        {"bed": "eight_gaussians", "method": "tiltflow.train", "role": "ours", "nfe": None,
         "metric": "steps_per_s", "value": round(o, 2), "floor": None,
         "extra": {**extra, "runs": [round(v, 2) for v in ours],
                   "ratio_to_plain": round(o / p, 4), "overhead_pct": round(100 * (1 - o / p), 2)}},
        {"bed": "eight_gaussians", "method": "plain PyTorch loop (same math)", "role": "baseline",
         "nfe": None, "metric": "steps_per_s", "value": round(p, 2), "floor": None,
         "extra": {**extra, "runs": [round(v, 2) for v in plain]}},
        {"bed": "eight_gaussians", "method": "tiltflow.train resume (20+20 vs 40 steps)",
         "role": "ours", "nfe": None, "metric": "resume_exact", "value": 1.0 if exact else 0.0,
         "floor": None, "extra": {"compared": "parameters, EMA, optimizer state"}},
    ]
    result = bench.result("train", t_start, quick, rows)
    bench.write_results(result, _markdown(result))
    return result


def _markdown(res: dict) -> str:
    ours, base, exact = res["rows"]
    lines = [
        "# train suite",
        "",
        f"{bench.header(res)}.",
        "",
        "Same model, data, objective, batch, AdamW, warm-up, clipping and EMA in both loops; the "
        "plain loop has no logging, NaN check, accelerate or checkpoint. tiltflow's time is the "
        "whole `train()` call (setup and final checkpoint included). Median of interleaved "
        "repeats.",
        "",
        "| method | role | metric | value | runs |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in (ours, base):
        runs = ", ".join(f"{v:g}" for v in r["extra"]["runs"])
        lines.append(f"| {r['method']} | {r['role']} | {r['metric']} | {r['value']:g} | {runs} |")
    lines.append(f"| {exact['method']} | {exact['role']} | {exact['metric']} | "
                 f"{exact['value']:g} | bitwise: {exact['extra']['compared']} |")
    ratio = ours["extra"]["ratio_to_plain"]
    lines += ["", f"Ratio tiltflow / plain: **{ratio:.3f}** (overhead "
              f"{ours['extra']['overhead_pct']:.1f} %; target <= 5 %).", ""]
    if not math.isfinite(ratio):  # pragma: no cover
        lines.append("(ratio not finite)")
    return "\n".join(lines)


def main(argv=None) -> int:
    return bench.cli(__doc__, run, _markdown, "fewer steps and repeats", argv)


if __name__ == "__main__":
    sys.exit(main())
