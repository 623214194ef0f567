"""``tiltflow train CONFIG [key=value ...]``: train a model from a YAML config."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UserError
from .common import check_output


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="train a model from a YAML config (+ key=value overrides)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="overrides: dotted keys with YAML values, e.g. train.lr=3e-4 "
                              "model.hidden=128 data=moons objective.time_sampling=logit_normal")
    t.add_argument("config", nargs="?", help="YAML config (see configs/); omit to use overrides only")
    t.add_argument("overrides", nargs="*", help="key=value overrides")
    t.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    t.add_argument("--out", help="run directory (same as train.out_dir=...)")
    t.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: continue even though the model or data config differs "
                        "from the checkpoint's (the result matches neither config)")


def run(args) -> int:
    from .. import config as config_mod
    from ..checkpoint import find_latest
    from ..plots import grid_callback
    from ..train import TrainingInterrupted
    from ..train import train as run_train

    overrides = list(args.overrides)
    if args.config and "=" in args.config and not Path(args.config).exists():
        overrides.insert(0, args.config)
        args.config = None
    if args.out:
        overrides.append(f"train.out_dir={args.out}")
    cfg = config_mod.load_config(args.config, overrides)
    tcfg = config_mod.TrainConfig.from_dict(cfg["train"])
    if args.allow_config_change and not args.resume:
        raise UserError("--allow-config-change only applies with --resume")
    # before the data loads: a run directory that cannot be written fails now, and one this
    # command creates is removed again if training fails before its first checkpoint
    check_output(tcfg.out_dir, kind="dir", what="train.out_dir",
                 keep_if=lambda path: find_latest(path) is not None)
    from ..runs import build_run, data_info

    dataset, den, objective = build_run(cfg)
    callbacks = []
    if tcfg.sample_every:
        callbacks.append(grid_callback(_preview_sampler(dataset, cfg)))
    meta = {"config": cfg, "data": data_info(dataset)}
    try:
        result = run_train(den, objective, dataset, tcfg, resume=args.resume,
                           callbacks=callbacks, meta=meta,
                           allow_config_change=args.allow_config_change)
    except TrainingInterrupted as e:
        print(f"tiltflow: {e}", file=sys.stderr)
        return 130
    print(f"trained {result.step} steps; checkpoint: {result.checkpoint}")
    return 0


def _preview_sampler(dataset, cfg):
    import torch

    from ..solvers import sample

    spec = cfg.get("sample") or {}
    n = 64 if dataset.kind == "image" else 1000
    noise = torch.randn((n, *dataset.shape), generator=torch.Generator().manual_seed(0))
    cond = None
    if dataset.num_classes:
        cond = torch.arange(n) % dataset.num_classes

    def make(info):
        return sample(info.ema, noise, spec.get("solver", "heun"), nfe=spec.get("nfe", 19),
                      cond=cond, guidance=spec.get("guidance"))

    return make
