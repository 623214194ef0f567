"""``tiltflow`` command line: train | sample | fit-solver | likelihood | invert | bench | demo.

Every user mistake (missing file, bad config key, unknown solver ...) prints one line
``tiltflow: error: ...`` and exits with code 2; nothing is half-written.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
from pathlib import Path

from .errors import UserError

EXAMPLES = """examples:
  tiltflow train configs/eight_gaussians.yaml train.steps=2000 train.out_dir=runs/8g
  tiltflow train configs/digits.yaml --resume
  tiltflow sample runs/8g --solver heun --nfe 9 --num 2000 --out runs/8g/samples
  tiltflow sample runs/digits --label 3 --guidance 1.5 --num 64 --out three
  tiltflow fit-solver runs/8g --nfe 6 --kind bespoke --out runs/8g/bespoke6.safetensors
  tiltflow sample runs/8g --solver bespoke --nfe 6 --option params=runs/8g/bespoke6.safetensors
  tiltflow likelihood runs/8g --num 512 --steps 32
  tiltflow invert runs/8g --solver heun --nfe 19 --out runs/8g/noise
  tiltflow sample runs/8g --solver ddim --nfe 100 --parallel picard
  tiltflow bench train
  tiltflow demo --out runs/demo
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tiltflow", description="Train diffusion / flow models, then sample them fast.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train a model from a YAML config (+ key=value overrides)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="overrides: dotted keys with YAML values, e.g. train.lr=3e-4 "
                              "model.hidden=128 data=moons objective.time_sampling=logit_normal")
    t.add_argument("config", nargs="?", help="YAML config (see configs/); omit to use overrides only")
    t.add_argument("overrides", nargs="*", help="key=value overrides")
    t.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    t.add_argument("--out", help="run directory (same as train.out_dir=...)")

    s = sub.add_parser("sample", help="draw samples from a trained run")
    s.add_argument("run", help="run directory or checkpoint directory")
    s.add_argument("--solver", default="heun", help="solver name (see --list-solvers)")
    s.add_argument("--nfe", type=int, default=19, help="exact number of network evaluations")
    s.add_argument("--grid", default="uniform", help="time grid: uniform, logsnr, karras, shifted")
    s.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="solver option, repeatable (e.g. --option eta=0.5 for ddim)")
    s.add_argument("--num", type=int, default=64, help="number of samples")
    s.add_argument("--label", type=int, default=None, help="class label (conditional models)")
    s.add_argument("--guidance", type=float, default=0.0,
                   help="classifier-free guidance w (eps_c + w (eps_c - eps_u)); 0 = none")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="samples", help="output prefix: writes PREFIX.npy and PREFIX.png")
    s.add_argument("--list-solvers", action="store_true", help="print the solver names and exit")
    s.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    s.add_argument("--negative", metavar="RUN",
                   help="two-model guidance: eps = (w+1) eps_this - w eps_negative, w = --guidance")
    s.add_argument("--parallel", choices=["picard", "parareal"],
                   help="parallel-in-time sampling of the same answer (solver: ddim, euler or "
                        "ddpm); prints rounds and NFE")
    s.add_argument("--tol", type=float, default=1e-3, help="tolerance of --parallel")

    b = sub.add_parser("bench", help="run a benchmark suite (writes benchmarks/results/)")
    b.add_argument("suite", help="suite name (e.g. train) or 'all'")
    b.add_argument("--quick", action="store_true", help="a fast smoke run (numbers not for the record)")

    from . import cli_analysis, cli_fit_solver

    cli_fit_solver.add_parser(sub)
    cli_analysis.add_parsers(sub)

    d = sub.add_parser("demo", help="train small digit and 2-D models and write an HTML report")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--quick", action="store_true", help="tiny budgets (a smoke test)")
    return p


def _cmd_train(args) -> int:
    from . import config as config_mod
    from .train import TrainingInterrupted, grid_callback
    from .train import train as run_train

    overrides = list(args.overrides)
    if args.config and "=" in args.config and not Path(args.config).exists():
        overrides.insert(0, args.config)
        args.config = None
    if args.out:
        overrides.append(f"train.out_dir={args.out}")
    cfg = config_mod.load_config(args.config, overrides)
    from .runs import build_run, data_info

    dataset, den, objective = build_run(cfg)
    tcfg = config_mod.TrainConfig.from_dict(cfg["train"])
    callbacks = []
    if tcfg.sample_every:
        callbacks.append(grid_callback(_preview_sampler(dataset, cfg)))
    meta = {"config": cfg, "data": data_info(dataset)}
    try:
        result = run_train(den, objective, dataset, tcfg, resume=args.resume,
                           callbacks=callbacks, meta=meta)
    except TrainingInterrupted as e:
        print(f"tiltflow: {e}", file=sys.stderr)
        return 130
    print(f"trained {result.step} steps; checkpoint: {result.checkpoint}")
    return 0


def _preview_sampler(dataset, cfg):
    import torch

    from .solvers import sample

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


def _cmd_sample(args) -> int:
    import numpy as np
    import torch

    from . import solvers
    from .runs import load_trained
    from .train import save_grid

    if args.list_solvers:
        for name in solvers.available():
            print(f"{name:16s} {solvers.get(name).description}")
        return 0
    if args.num < 1:
        raise UserError(f"--num must be >= 1, got {args.num}")
    solvers.get(args.solver)  # fail fast on a typo, before loading anything
    trained = load_trained(args.run, use_ema=not args.no_ema)
    info = trained.data
    cond = None
    if args.label is not None:
        if not info["num_classes"]:
            raise UserError("--label given but this model is unconditional")
        if not 0 <= args.label < info["num_classes"]:
            raise UserError(f"--label must be in [0, {info['num_classes']}), got {args.label}")
        cond = torch.full((args.num,), args.label, dtype=torch.long)
    elif info["num_classes"]:
        cond = torch.arange(args.num) % info["num_classes"]
    guidance = args.guidance or None
    if args.negative:
        from .solvers import TwoModel

        if not args.guidance:
            raise UserError("--negative needs a guidance weight: add --guidance W")
        guidance = TwoModel(load_trained(args.negative, use_ema=not args.no_ema).denoiser,
                            args.guidance)
    elif args.guidance and cond is None:
        raise UserError("--guidance needs a class-conditional model (or --negative RUN)")
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn((args.num, *info["shape"]), generator=gen)
    from .config import parse_options

    options = parse_options(args.option)
    if args.parallel:
        if options:
            raise UserError("--option is not supported with --parallel")
        x, stats = solvers.parallel_sample(trained.denoiser, noise, args.parallel, args.solver,
                                           nfe=args.nfe, grid=args.grid, tol=args.tol, cond=cond,
                                           guidance=guidance, generator=gen)
        print(f"{args.parallel}: {stats['rounds']} sequential rounds instead of "
              f"{stats['sequential_rounds']}, {stats['nfe']} network evaluations per sample, "
              f"converged: {stats['converged']}")
    else:
        x = solvers.sample(trained.denoiser, noise, args.solver, nfe=args.nfe, grid=args.grid,
                           cond=cond, guidance=guidance, generator=gen, options=options)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    arr = trained.denormalize(x).numpy()
    np.save(out.with_suffix(".npy"), arr)
    if info["kind"] == "image" or x.shape[1] == 2:
        save_grid(x if info["kind"] == "image" else trained.denormalize(x), out.with_suffix(".png"),
                  title=f"{args.solver}, nfe={args.nfe}")
    print(f"wrote {out.with_suffix('.npy')} ({arr.shape[0]} samples"
          f"{', and .png' if out.with_suffix('.png').exists() else ''})")
    return 0


def _find_suite(name: str) -> Path:
    roots = [Path.cwd() / "benchmarks", Path(__file__).resolve().parents[2] / "benchmarks"]
    for root in roots:
        path = root / f"{name}_suite.py"
        if path.is_file():
            return path
    avail = sorted({p.name[:-9] for r in roots if r.is_dir() for p in r.glob("*_suite.py")})
    raise UserError(f"unknown benchmark suite {name!r}; available: {avail or 'none found'} "
                    "(run from the repository root)")


def _cmd_bench(args) -> int:
    names = [args.suite]
    if args.suite == "all":
        roots = [Path.cwd() / "benchmarks", Path(__file__).resolve().parents[2] / "benchmarks"]
        names = sorted({p.name[:-9] for r in roots if r.is_dir() for p in r.glob("*_suite.py")})
        import torch

        if not torch.cuda.is_available() and "gpu" in names:
            print("bench all: skipping the gpu suite (no CUDA device here)")
            names.remove("gpu")
    for name in names:
        path = _find_suite(name)
        spec = importlib.util.spec_from_file_location(f"tiltflow_bench_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        result = module.run(quick=args.quick)
        print(json.dumps({k: result[k] for k in ("suite", "seconds") if k in result}))
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    path = run_demo(args.out, quick=args.quick)
    print(f"report: {path}")
    return 0


def _cmd_likelihood(args) -> int:
    from . import cli_analysis

    return cli_analysis.run_likelihood(args)


def _cmd_invert(args) -> int:
    from . import cli_analysis

    return cli_analysis.run_invert(args)


def _cmd_fit_solver(args) -> int:
    from . import cli_fit_solver

    return cli_fit_solver.run(args)


COMMANDS = {"train": _cmd_train, "sample": _cmd_sample, "bench": _cmd_bench, "demo": _cmd_demo,
            "fit-solver": _cmd_fit_solver, "likelihood": _cmd_likelihood, "invert": _cmd_invert}


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return COMMANDS[args.command](args)
    except (UserError, ValueError, TypeError, FileNotFoundError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"tiltflow: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tiltflow: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
