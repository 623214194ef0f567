"""GPU path check (needs CUDA): solvers without device syncs, CUDA per-step cost, and training
throughput in float32 / bf16 / bf16 + torch.compile through tiltflow.train.

Writes ``benchmarks/results/gpu.{json,md}``. Each check records its error text instead of
stopping the others, so one failure still leaves the rest of the table.

    python benchmarks/gpu_suite.py [--quick]
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

import tiltflow as tf
from tiltflow import nets
from tiltflow import schedules as S

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("tiltflow_bench_common", HERE / "common.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

SOLVERS = ("euler", "heun", "ddim", "ddpm", "dpm_solver_3", "dpmpp_2s", "dpmpp_2m", "dpmpp_3m",
           "unipc", "unipc_p", "deis", "ipndm", "midpoint", "rk4", "rk4_38", "dpmpp_2m_sde",
           "edm_sde")


def _nfe(name: str) -> int:
    info = tf.solvers.get(name)
    for n in (10, 9, 11, 12, 7):
        try:
            info.steps_for_nfe(n)
            return n
        except ValueError:
            continue
    raise ValueError(name)


def _timed(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def sync_free_rows(device) -> list[dict]:
    """Each solver on CUDA under ``set_sync_debug_mode("error")``: a host-device sync inside
    the sampling loop raises."""
    net = nets.build({"name": "mlp", "dim": 2, "hidden": 64, "depth": 2}).to(device).eval()
    den = tf.Denoiser(net, S.RectifiedFlow(), "velocity")
    noise = torch.randn(64, 2, device=device)
    rows = []
    for name in SOLVERS:
        nfe = _nfe(name)
        gen = torch.Generator(device=device).manual_seed(0)
        tf.sample(den, noise, name, nfe=nfe, generator=gen)  # warm-up (allocations, caches)
        torch.cuda.synchronize()
        err = None
        torch.cuda.set_sync_debug_mode("error")
        try:
            tf.sample(den, noise, name, nfe=nfe, generator=gen)
        except RuntimeError as e:
            err = str(e).splitlines()[0][:200]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        rows.append({"bed": "mlp_2d", "method": name, "role": "ours", "nfe": nfe,
                     "metric": "sync_free", "value": float(err is None), "floor": None,
                     "extra": {"error": err}})
    return rows


def per_step_rows(device, quick: bool) -> list[dict]:
    """Marginal CUDA time per step: zero model (pure overhead, batch 4) and the digits UNet
    (batch 256): difference of 10- and 50-step runs."""
    rows = []
    unet = nets.build({"name": "unet", "in_channels": 1, "num_classes": 10}).to(device).eval()
    models = {
        "zero_model_b4": (tf.Denoiser.from_fn(lambda x, t, cond=None: torch.zeros_like(x),
                                              S.RectifiedFlow(), "velocity"),
                          torch.randn(4, 2, device=device), None),
        "unet_digits_b256": (tf.Denoiser(unet, S.RectifiedFlow(), "velocity"),
                             torch.randn(256, 1, 8, 8, device=device),
                             torch.arange(256, device=device) % 10),
    }
    reps = 3 if quick else 10
    for bed, (den, noise, cond) in models.items():
        for name in ("euler", "ddim", "dpmpp_2m", "unipc", "heun"):
            info = tf.solvers.get(name)
            times = {}
            for steps in (10, 50):
                grid = tf.solvers.grids.uniform(steps)

                def go(den=den, noise=noise, grid=grid, name=name, cond=cond):
                    with torch.no_grad():
                        tf.solvers.solve(den, noise, grid, name, cond=cond)

                times[steps] = _timed(go, reps)
            us = (times[50] - times[10]) / 40 * 1e6
            rows.append({"bed": bed, "method": name, "role": "ours", "nfe": None,
                         "metric": "us_per_step", "value": round(us, 1), "floor": None,
                         "extra": {"evals_per_step": info.evals(), "device": "cuda"}})
    return rows


def train_rows(device, quick: bool) -> list[dict]:
    """tiltflow.train on digits (UNet, batch 256): steps/s in fp32, bf16, bf16 + compile."""
    from tiltflow.config import TrainConfig, load_config
    from tiltflow.runs import build_run, data_info

    rows = []
    steps = 60 if quick else 300
    for label, mp, comp in (("fp32", "no", False), ("bf16", "bf16", False),
                            ("bf16+compile", "bf16", True)):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_config({
                "data": {"name": "digits"},
                "model": {"name": "unet", "base_channels": 64, "channel_mults": [1, 2]},
                "objective": {"name": "rectified_flow", "label_dropout": 0.1},
                "train": {"steps": steps, "batch_size": 256, "lr": 1e-3, "warmup_steps": 10,
                          "ckpt_every": steps, "log_every": 50, "mixed_precision": mp,
                          "compile": comp, "out_dir": tmp}})
            ds, den, obj = build_run(cfg)
            err, rate, loss = None, None, None
            try:
                t0 = time.perf_counter()
                res = tf.train.train(den, obj, ds, TrainConfig.from_dict(cfg["train"]),
                                     meta={"config": cfg, "data": data_info(ds)})
                rate = steps / (time.perf_counter() - t0)
                loss = sum(res.losses[-20:]) / 20
            except Exception as e:  # noqa: BLE001 - recorded in the results, not hidden
                err = "".join(traceback.format_exception_only(type(e), e)).strip()[:300]
            rows.append({"bed": "digits_unet64_b256", "method": f"tiltflow.train {label}",
                         "role": "ours", "nfe": None, "metric": "steps_per_s",
                         "value": None if rate is None else round(rate, 2), "floor": None,
                         "extra": {"steps": steps, "final_loss": loss, "error": err,
                                   "note": "whole train() call incl. compile and checkpoint"}})
    return rows


def markdown(res: dict) -> str:
    lines = ["# gpu suite", "", bench.header(res), "",
             f"Device: {res.get('device', '?')}.", "",
             "| bed | method | metric | value | extra |", "| --- | --- | --- | ---: | --- |"]
    for r in res["rows"]:
        extra = {k: v for k, v in (r.get("extra") or {}).items() if v is not None}
        lines.append(f"| {r['bed']} | {r['method']} | {r['metric']} | {r['value']} | {extra} |")
    return "\n".join(lines) + "\n"


def run(quick: bool = False) -> dict:
    if not torch.cuda.is_available():
        from tiltflow.errors import UserError

        raise UserError("the gpu suite needs a CUDA device; none is visible here")
    t_start = time.time()
    device = torch.device("cuda")
    rows = sync_free_rows(device) + per_step_rows(device, quick) + train_rows(device, quick)
    res = bench.result("gpu", t_start, quick, rows, device=torch.cuda.get_device_name())
    res["machine"] = f"{res['machine']}, {torch.cuda.get_device_name()}"
    bench.write_results(res, markdown(res))
    return res


if __name__ == "__main__":
    sys.exit(bench.cli(__doc__, run, markdown, "a short run", sys.argv[1:]))
