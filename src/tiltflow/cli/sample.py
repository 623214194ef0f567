"""``tiltflow sample RUN``: draw samples from a trained run with any registered solver."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .common import class_labels


def add_parser(sub) -> None:
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


def run(args) -> int:
    import numpy as np
    import torch

    from .. import solvers
    from ..plots import save_grid
    from ..runs import load_trained

    if args.list_solvers:
        for name in solvers.available():
            print(f"{name:16s} {solvers.get(name).description}")
        return 0
    if args.num < 1:
        raise UserError(f"--num must be >= 1, got {args.num}")
    solvers.get(args.solver)  # fail fast on a typo, before loading anything
    trained = load_trained(args.run, use_ema=not args.no_ema)
    info = trained.data
    if args.label is not None and not info["num_classes"]:
        raise UserError("--label given but this model is unconditional")
    cond = class_labels(args.label, info["num_classes"], args.num) if info["num_classes"] else None
    guidance = args.guidance or None
    if args.negative:
        from ..solvers import TwoModel

        if not args.guidance:
            raise UserError("--negative needs a guidance weight: add --guidance W")
        guidance = TwoModel(load_trained(args.negative, use_ema=not args.no_ema).denoiser,
                            args.guidance)
    elif args.guidance and cond is None:
        raise UserError("--guidance needs a class-conditional model (or --negative RUN)")
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn((args.num, *info["shape"]), generator=gen)
    from ..config import parse_options

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
