"""``tiltflow sample RUN``: draw samples from a trained run with any registered solver."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .common import (
    check_finite,
    check_prefix,
    check_solver_fits,
    class_labels,
    finite_float,
    positive_float,
    positive_int,
    seed_int,
    write_npy,
)


def add_parser(sub) -> None:
    s = sub.add_parser("sample", help="draw samples from a trained run")
    s.add_argument("run", help="run directory or checkpoint directory")
    s.add_argument("--solver", default="heun", help="solver name (see --list-solvers)")
    s.add_argument("--nfe", type=positive_int, default=19, help="exact number of network evaluations")
    s.add_argument("--grid", default="uniform", help="time grid: uniform, logsnr, karras, shifted")
    s.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="solver option, repeatable (e.g. --option eta=0.5 for ddim)")
    s.add_argument("--num", type=positive_int, default=64, help="number of samples")
    s.add_argument("--label", type=int, default=None, help="class label (conditional models)")
    s.add_argument("--guidance", type=finite_float, default=0.0,
                   help="classifier-free guidance w (eps_c + w (eps_c - eps_u)); 0 = none")
    s.add_argument("--seed", type=seed_int, default=0)
    s.add_argument("--out", default="samples", help="output prefix: writes PREFIX.npy and PREFIX.png")
    s.add_argument("--list-solvers", action="store_true", help="print the solver names and exit")
    s.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    s.add_argument("--negative", metavar="RUN",
                   help="two-model guidance: eps = (w+1) eps_this - w eps_negative, w = --guidance")
    s.add_argument("--parallel", choices=["picard", "parareal"],
                   help="parallel-in-time sampling of the same answer (solver: ddim, euler or "
                        "ddpm); prints rounds and NFE")
    s.add_argument("--tol", type=positive_float, default=1e-3, help="tolerance of --parallel")


def run(args) -> int:
    from .. import solvers

    if args.list_solvers:
        for name in solvers.available():
            print(f"{name:16s} {solvers.get(name).description}")
        return 0
    from .. import fewstep

    if fewstep.is_student(args.run):
        return _sample_student(args)
    steps, options = _check_arguments(args)
    out = check_prefix(args.out, (".npy", ".png"))
    trained, cond, guidance = _load(args)
    info = trained.data
    check_solver_fits(trained.denoiser, info["shape"], args.num, steps,
                      what=f"sampling --num {args.num} with --nfe {args.nfe}",
                      fix="lower --num or --nfe (or sample in several calls with other --seed)",
                      num_classes=info["num_classes"], batch_factor=2 if guidance else 1,
                      trajectory=bool(args.parallel))
    x = _sample(args, trained, cond, guidance, options)
    arr = trained.denormalize(x)
    check_finite(arr, "the samples", "the model or the solver diverged: try another --solver, a "
                                     "larger --nfe or an earlier checkpoint of the run")
    _write(out, x, arr, trained, args)
    return 0


def _sample_student(args) -> int:
    """A ``tiltflow distill`` run: its student samples with its own sampler at ``--nfe``."""
    import torch

    from .. import fewstep
    from ..checkpoint import load_checkpoint
    from ..runs import Trained

    for flag, given in (("--solver", args.solver != "heun"), ("--option", bool(args.option)),
                        ("--guidance", bool(args.guidance)), ("--negative", bool(args.negative)),
                        ("--parallel", bool(args.parallel)), ("--grid", args.grid != "uniform")):
        if given:
            raise UserError(f"{flag} does not apply to a few-step student: it samples with its "
                            "own sampler; give --nfe only")
    out = check_prefix(args.out, (".npy", ".png"))
    student = fewstep.load(args.run, use_ema=not args.no_ema)
    student.check_nfe(args.nfe)
    info = (load_checkpoint(student.run_dir).config.get("run") or {}).get("data") or {}
    if args.label is not None and not info.get("num_classes"):
        raise UserError("--label given but this model is unconditional")
    cond = class_labels(args.label, info["num_classes"], args.num) if info.get("num_classes") \
        else None
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn((args.num, *info["shape"]), generator=gen)
    x = fewstep.sample(student, noise, args.nfe, cond=cond, generator=gen)
    trained = Trained(student.model, info, {}, 0, student.run_dir)
    arr = trained.denormalize(x)
    check_finite(arr, "the samples", "the student diverged: try another --nfe or an earlier "
                                     "checkpoint of the distillation")
    args.solver = student.method  # the PNG's title
    _write(out, x, arr, trained, args)
    return 0


def _check_arguments(args) -> tuple[int, dict]:
    """Everything checkable before the model loads: solver, options, NFE (the grid's steps)."""
    from .. import solvers
    from ..config import parse_options

    info = solvers.get(args.solver)  # fail fast on a typo, before loading anything
    options = parse_options(args.option)
    if args.parallel and options:
        raise UserError("--option is not supported with --parallel")
    if args.negative and not args.guidance:
        raise UserError("--negative needs a guidance weight: add --guidance W")
    try:
        info.check_options(options)
        steps = info.steps_for_nfe(args.nfe, options)
    except ValueError as e:
        raise UserError(str(e)) from None
    return steps, options


def _load(args):
    """The trained run, the class labels and the guidance of this request."""
    from ..runs import load_trained

    trained = load_trained(args.run, use_ema=not args.no_ema)
    info = trained.data
    if args.label is not None and not info["num_classes"]:
        raise UserError("--label given but this model is unconditional")
    cond = class_labels(args.label, info["num_classes"], args.num) if info["num_classes"] else None
    guidance = args.guidance or None
    if args.negative:
        from ..solvers import TwoModel

        negative = load_trained(args.negative, use_ema=not args.no_ema)
        if list(negative.data["shape"]) != list(info["shape"]):
            raise UserError(f"--negative {args.negative!r} models examples of shape "
                            f"{list(negative.data['shape'])}, this run {list(info['shape'])}; "
                            "give a run trained on data of the same shape")
        guidance = TwoModel(negative.denoiser, args.guidance)
    elif args.guidance and cond is None:
        raise UserError("--guidance needs a class-conditional model (or --negative RUN)")
    return trained, cond, guidance


def _sample(args, trained, cond, guidance, options):
    import torch

    from .. import solvers

    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn((args.num, *trained.data["shape"]), generator=gen)
    if not args.parallel:
        return solvers.sample(trained.denoiser, noise, args.solver, nfe=args.nfe, grid=args.grid,
                              cond=cond, guidance=guidance, generator=gen, options=options)
    x, stats = solvers.parallel_sample(trained.denoiser, noise, args.parallel, args.solver,
                                       nfe=args.nfe, grid=args.grid, tol=args.tol, cond=cond,
                                       guidance=guidance, generator=gen)
    print(f"{args.parallel}: {stats['rounds']} sequential rounds instead of "
          f"{stats['sequential_rounds']}, {stats['nfe']} network evaluations per sample, "
          f"converged: {stats['converged']}")
    return x


def _write(out: Path, x, arr, trained, args) -> None:
    """PREFIX.npy (the samples in the data's units) and, for images and 2-D points, PREFIX.png;
    both written atomically."""
    from ..plots import save_grid

    write_npy(out.with_suffix(".npy"), arr.numpy())
    png = trained.data["kind"] == "image" or x.shape[1] == 2
    if png:
        save_grid(x if trained.data["kind"] == "image" else arr, out.with_suffix(".png"),
                  title=f"{args.solver}, nfe={args.nfe}")
    print(f"wrote {out.with_suffix('.npy')} ({arr.shape[0]} samples{', and .png' if png else ''})")
