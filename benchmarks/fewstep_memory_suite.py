"""Benchmark suite ``fewstep_memory``: training memory of one step of every few-step method,
as a ratio to one flow-matching step of the same network and batch.

Measured as the peak of the bytes autograd holds for backward passes during one training step
(tensors saved through ``torch.autograd.graph.saved_tensors_hooks``, each storage once, released
when their graph is freed): the activation memory that grows with batch and network size, on
any device and deterministic on a CPU. Parameters, optimizer state and the teacher's no-grad
evaluations are not in it (a second network — a fake score, an EMA target — is listed in
``extra``). Teacher: the exact eight-Gaussians denoiser; network: MLP 128 x 3; batch 256.

    python benchmarks/fewstep_memory_suite.py [--quick]      # or: tiltflow bench fewstep_memory
"""

from __future__ import annotations

import importlib.util
import sys
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


def _one_step_bytes(method: str, config: dict, data) -> int:
    """Saved bytes of the last training step of a 2-step distillation (the first may include
    a warm-up, e.g. the fake score's)."""
    from tiltflow import train as train_mod

    counted = []
    original = train_mod.ema_update

    def ema_update_and_count(*args, **kwargs):  # called once per step, after the update
        counted.append(meter.peak)
        meter.reset()
        return original(*args, **kwargs)

    mixture = analytic.eight_gaussians()
    teacher = mixture.denoiser("rectified_flow")
    train_mod.ema_update = ema_update_and_count
    try:
        with SavedBytes() as meter:
            fewstep.distill(method, teacher, data=data, config={
                "steps": 2, "batch_size": BATCH, "num_data": 1024, "ckpt_every": 0,
                "model": dict(NET), "warmup_steps": 1, **config})
    finally:
        train_mod.ema_update = original
    return counted[-1]


def _flow_matching_bytes(data) -> int:
    den = Denoiser(nets.build(dict(NET)), "rectified_flow", "velocity")
    loss_fn = objectives.get("flow_matching")
    with SavedBytes() as meter:
        loss = loss_fn(den, {"x": data[:BATCH]}, torch.Generator().manual_seed(0)).mean()
        loss.backward()
    return meter.peak


METHODS = {
    "reflow": {}, "perflow": {}, "progressive_distillation": {"teacher_steps": 4},
    "consistency_distillation": {}, "phased_consistency_distillation": {},
    "consistency_training": {}, "easy_consistency_tuning": {}, "stable_consistency_tuning": {},
    "shortcut": {}, "meanflow": {"jvp": "func"}, "meanflow (finite differences)":
        {"jvp": "finite_difference"}, "mmd": {"nfe": 1}, "mmd (2 steps)": {"nfe": 2},
    "dmd": {"regression_pairs": 256, "fake_warmup": 0}, "vsd": {"fake_warmup": 0},
    "sid": {"fake_warmup": 0},
}


def run(quick: bool = False) -> dict:
    t_start = time.time()
    mixture = analytic.eight_gaussians()
    data = mixture.sample(4096, generator=torch.Generator().manual_seed(0)).float()
    base = _flow_matching_bytes(data)
    rows = [{"bed": "eight_gaussians", "method": "flow_matching", "role": "baseline", "nfe": None,
             "metric": "saved_mb", "value": base / 2**20, "floor": None,
             "extra": {"ratio_to_fm": 1.0}}]
    for label, config in METHODS.items():
        method = label.split(" (")[0]
        needs = fewstep.get_method(method).needs_data
        used = _one_step_bytes(method, config, data if needs else None)
        rows.append({"bed": "eight_gaussians", "method": label, "role": "ours", "nfe": None,
                     "metric": "saved_mb", "value": used / 2**20, "floor": None,
                     "extra": {"ratio_to_fm": round(used / base, 2),
                               "second_network": SECOND_NETWORK.get(method, "")}})
        print(f"{label}: {used / base:.2f}x", file=sys.stderr, flush=True)
    res = bench.result("fewstep_memory", t_start, quick, rows)
    bench.write_results(res, _markdown(res))
    return res


def _markdown(res: dict) -> str:
    lines = ["# fewstep_memory: activation memory of one training step", "",
             bench.header(res) + ".", "",
             "Peak bytes autograd holds for backward during one step (distinct storages), MLP "
             "128 x 3, batch 256, exact eight-Gaussians teacher; ratio to one flow-matching "
             "step of the same network and batch. Parameters and optimizer states are not "
             "included; methods that keep a second network say which.", "",
             "| method | peak saved MB | x flow matching | second network |",
             "| --- | --- | --- | --- |"]
    for r in res["rows"]:
        lines.append(f"| {r['method']} | {r['value']:.2f} | {r['extra']['ratio_to_fm']:.2f} | "
                     f"{r['extra'].get('second_network', '')} |")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    return bench.cli(__doc__, run, _markdown, "same as the full run (it is small)", argv)


if __name__ == "__main__":
    sys.exit(main())
