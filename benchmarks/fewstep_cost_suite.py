"""Benchmark suite ``fewstep_cost``: memory and time of one training step of every few-step
method, as ratios to one flow-matching step of the same network and batch.

Memory: the peak of the bytes autograd holds for backward passes during one training step
(tensors saved through ``torch.autograd.graph.saved_tensors_hooks``, each storage once, released
when their graph is freed): the activation memory that grows with batch and network size, on
any device and deterministic on a CPU. Parameters, optimizer state and the teacher's no-grad
evaluations are not in it (a second network — a fake score, an EMA target — is named).
Time: the median seconds per step after five warm-up steps, one thread, with flow matching
timed right before each method so both see the same machine load. Teacher: the exact
eight-Gaussians denoiser; network: MLP 128 x 3; batch 256.

    python benchmarks/fewstep_cost_suite.py [--quick]      # or: tiltflow bench fewstep_cost
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from tiltflow import Denoiser, analytic, fewstep, nets, objectives

_spec = importlib.util.spec_from_file_location("tiltflow_bench_common",
                                               Path(__file__).with_name("common.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

NET = {"name": "mlp", "dim": 2, "hidden": 128, "depth": 3}
BATCH = 256
SECOND_NETWORK = {"consistency_distillation": "EMA target", "phased_consistency_distillation":
                  "EMA target", "latent_consistency_distillation": "EMA target",
                  "dmd": "fake score + its AdamW", "vsd": "fake score + its AdamW",
                  "sid": "fake score + its AdamW"}


class _Saved:
    """What autograd keeps instead of a saved tensor; its release (the graph is freed after
    backward) lowers the live count."""

    def __init__(self, meter, key, tensor):
        self.meter, self.key, self.tensor = meter, key, tensor

    def __del__(self):
        self.meter.release(self.key)


class SavedBytes:
    """The peak of the bytes autograd holds for backward while active (distinct storages)."""

    def __init__(self):
        self.live, self.count, self.now, self.peak = {}, {}, 0, 0

    def pack(self, t):
        try:
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        except RuntimeError:  # a forward-mode (torch.func.jvp) wrapper: count its own size
            key = (id(t), t.numel() * t.element_size())
        if key not in self.count:
            self.count[key] = 0
            self.now += key[1]
            self.peak = max(self.peak, self.now)
        self.count[key] += 1
        return _Saved(self, key, t)

    def release(self, key):
        self.count[key] -= 1
        if not self.count[key]:
            del self.count[key]
            self.now -= key[1]

    def reset(self):
        self.peak = self.now

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda s: s.tensor)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


class StepProbe:
    """Patches the training loop's per-step EMA update (called once per step, after the
    optimizer) to read, for every step, the peak saved bytes and the seconds since the last."""

    def __init__(self, meter: SavedBytes):
        self.meter, self.peaks, self.times = meter, [], []

    def __enter__(self):
        from tiltflow import train as train_mod

        self._module, self._original = train_mod, train_mod.ema_update

        def probe(*args, **kwargs):
            self.peaks.append(self.meter.peak)
            self.times.append(time.perf_counter())
            self.meter.reset()
            return self._original(*args, **kwargs)

        train_mod.ema_update = probe
        return self

    def __exit__(self, *exc):
        self._module.ema_update = self._original

    def per_step(self) -> tuple[int, float]:
        """Peak bytes of the last step, median seconds of the steps after the first five."""
        gaps = [b - a for a, b in zip(self.times[5:-1], self.times[6:], strict=True)]
        return self.peaks[-1], statistics.median(gaps)


def _profile(run, steps: int) -> tuple[int, float]:
    with SavedBytes() as meter, StepProbe(meter) as probe:
        run(steps)
    return probe.per_step()


def _method_run(method: str, config: dict, data):
    teacher = analytic.eight_gaussians().denoiser("rectified_flow")

    def run(steps):
        fewstep.distill(method, teacher, data=data, config={
            "steps": steps, "batch_size": BATCH, "num_data": 1024, "ckpt_every": 0,
            "log_every": 1000, "model": dict(NET), "warmup_steps": 1, **config})
    return run


def _flow_matching_run(data):
    from tiltflow.train import train

    def run(steps):
        den = Denoiser(nets.build(dict(NET)), "rectified_flow", "velocity")
        with tempfile.TemporaryDirectory() as tmp:
            train(den, objectives.get("flow_matching"), {"x": data},
                  {"steps": steps, "batch_size": BATCH, "ckpt_every": 0, "log_every": 1000,
                   "warmup_steps": 1, "out_dir": tmp})
    return run


METHODS = {
    "reflow": {}, "perflow": {}, "progressive_distillation": {"teacher_steps": 4},
    "consistency_distillation": {}, "phased_consistency_distillation": {},
    "consistency_training": {}, "easy_consistency_tuning": {}, "stable_consistency_tuning": {},
    "shortcut": {}, "meanflow": {"jvp": "func"}, "meanflow (finite differences)":
        {"jvp": "finite_difference"}, "mmd": {"nfe": 1}, "mmd (2 steps)": {"nfe": 2},
    "dmd": {"regression_pairs": 256, "fake_warmup": 0}, "vsd": {"fake_warmup": 0},
    "sid": {"fake_warmup": 0}, "scm": {},
}


def run(quick: bool = False) -> dict:
    t_start = time.time()
    torch.set_num_threads(1)  # steady timings on a shared machine
    steps = 12 if quick else 40
    mixture = analytic.eight_gaussians()
    data = mixture.sample(4096, generator=torch.Generator().manual_seed(0)).float()
    rows = []
    for label, config in METHODS.items():
        method = label.split(" (")[0]
        needs = fewstep.get_method(method).needs_data
        # flow matching right before each method: the ratio sees the same machine load
        fm_bytes, fm_seconds = _profile(_flow_matching_run(data), steps)
        used, seconds = _profile(_method_run(method, config, data if needs else None), steps)
        rows.append({"bed": "eight_gaussians", "method": label, "role": "ours", "nfe": None,
                     "metric": "saved_mb", "value": used / 2**20, "floor": None,
                     "extra": {"memory_vs_fm": round(used / fm_bytes, 2),
                               "ms_per_step": round(1e3 * seconds, 2),
                               "time_vs_fm": round(seconds / fm_seconds, 2),
                               "fm_mb": round(fm_bytes / 2**20, 2),
                               "second_network": SECOND_NETWORK.get(method, "")}})
        print(f"{label}: memory {used / fm_bytes:.2f}x, time {seconds / fm_seconds:.2f}x",
              file=sys.stderr, flush=True)
    res = bench.result("fewstep_cost", t_start, quick, rows, steps=steps)
    bench.write_results(res, _markdown(res))
    return res


def _markdown(res: dict) -> str:
    fm = res["rows"][0]["extra"]["fm_mb"]
    lines = ["# fewstep_cost: memory and time of one training step", "",
             bench.header(res) + ".", "",
             "Per training step of each method, as a ratio to one flow-matching step of the same "
             f"network (MLP 128 x 3) and batch (256), measured right before it (flow matching: "
             f"{fm:.2f} MB held for backward). Memory: the peak bytes autograd holds for "
             "backward (distinct storages; parameters and optimizer states not included, a "
             "second network is named). Time: median seconds per step after five warm-up "
             f"steps of {res['steps']}, one thread, exact eight-Gaussians teacher (so a "
             "teacher's evaluations cost little; with a network teacher the distillation "
             "methods' teacher steps add its forward passes).", "",
             "| method | peak saved MB | memory x FM | ms / step | time x FM | second network |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in res["rows"]:
        e = r["extra"]
        lines.append(f"| {r['method']} | {r['value']:.2f} | {e['memory_vs_fm']:.2f} | "
                     f"{e['ms_per_step']} | {e['time_vs_fm']:.2f} | {e['second_network']} |")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    return bench.cli(__doc__, run, _markdown, "12 steps per method instead of 40", argv)


if __name__ == "__main__":
    sys.exit(main())
