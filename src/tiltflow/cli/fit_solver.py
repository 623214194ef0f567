"""``tiltflow fit-solver RUN --nfe N --out FILE``: fit a trained solver for one model and NFE.

Kinds (see :mod:`tiltflow.solvers.trained`): ``bespoke`` (scale-time RK1/RK2, Shaul et al.
2023; ``--loss rmse`` fits the endpoint RMSE, ``--loss bound`` the paper's RMSE-bound), ``bns``
(non-stationary, Shaul et al. 2024), ``grid`` (optimised time grid of a registered solver).
The fitted parameters go to one safetensors file; sample with it through
``tiltflow.sample(den, noise, "bespoke", nfe=N, options={"params": FILE})``.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import UserError
from .common import (
    check_finite,
    check_output,
    check_solver_fits,
    class_labels,
    positive_float,
    positive_int,
    seed_int,
)

_DEFAULT_BASE = {"bespoke": "midpoint", "bns": "ddim", "grid": "auto"}
_DEFAULT_STEPS = {"bespoke": 400, "bns": 600, "grid": None}  # grid: fit_grid's, per method


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "fit-solver", help="fit a bespoke / BNS solver or an optimised grid for a trained run",
        description="Learn solver parameters for ONE model and ONE NFE by matching a tight "
                    "reference solution on a few hundred noises; writes a .safetensors file.")
    p.add_argument("run", help="run directory or checkpoint directory (from `tiltflow train`)")
    p.add_argument("--nfe", type=positive_int,
                   help="exact number of network evaluations (all kinds but ems, whose "
                        "statistics serve every NFE)")
    p.add_argument("--kind", choices=["bespoke", "bns", "grid", "ems"], default="bespoke",
                   help="bespoke / bns solver, optimised grid, or DPM-Solver-v3's empirical "
                        "model statistics (use: --solver dpm_solver_v3 --option ems=FILE)")
    p.add_argument("--base", default=None,
                   help="base solver: bespoke euler|midpoint (default midpoint); bns: a linear "
                        "registered solver to start from (default ddim); grid: the registered "
                        "solver whose grid is optimised, or auto (default: fit several bases, "
                        "keep the best on held-out noises)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="grid: an option of the --base solver, repeatable (e.g. --option "
                        "variant=bh1 for unipc); saved with the grid")
    p.add_argument("--method", choices=["lbfgs", "adam", "nelder_mead"], default=None,
                   help="grid: optimiser (default lbfgs through the registered solver, "
                        "nelder_mead for one not differentiable in its grid)")
    p.add_argument("--loss", default=None,
                   help="bespoke only: rmse (endpoint RMSE to the reference, the default) or "
                        "bound (the paper's RMSE-bound: local errors along the ground-truth "
                        "path weighted by Lipschitz factors)")
    p.add_argument("--lipschitz", type=positive_float, default=None,
                   help="with --loss bound: the velocity's Lipschitz constant L of the bound "
                        "(default 1)")
    p.add_argument("--num-noises", type=positive_int, default=256,
                   help="training noises (default 256)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="optimiser iterations (default: bespoke 400, bns 600, grid: 100 for "
                        "lbfgs, 800 for adam, 1500 solver runs for nelder_mead)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the training noises")
    p.add_argument("--label", type=int, default=None,
                   help="class label for conditional models (default: labels cycle over classes)")
    p.add_argument("--out", required=True, help="output file (.safetensors)")
    p.add_argument("--no-ema", action="store_true", help="fit on the raw weights, not the EMA")


def _check_out(args) -> Path:
    """``--out`` and ``--num-noises``, checked before the model loads or anything is fitted."""
    if args.num_noises < 2:
        raise UserError(f"--num-noises must be >= 2, got {args.num_noises}")
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise UserError(f"--out must end in .safetensors, got {str(out)!r}")
    return check_output(out)


def _load(args, out: Path, steps: int, kept_evaluations: int):
    """The run's denoiser in float64, the training noises, labels and a model description;
    refuses first a request that cannot fit in memory (``steps`` of the solves, the
    ``kept_evaluations`` whose activations the fit backpropagates through)."""
    import torch

    from ..runs import load_trained

    trained = load_trained(args.run, use_ema=not args.no_ema)
    info = trained.data
    if args.label is not None and not info["num_classes"]:
        raise UserError("--label given but this model is unconditional")
    # float64 throughout: the reference solution is a float64 solve (the fitted parameters do
    # not depend on the dtype the solver later runs in)
    den = trained.denoiser.double()
    check_solver_fits(den, info["shape"], args.num_noises, steps,
                      what=f"fitting on --num-noises {args.num_noises}",
                      fix="lower --num-noises or --nfe", num_classes=info["num_classes"],
                      kept_evaluations=kept_evaluations)
    gen = torch.Generator().manual_seed(args.seed)
    noises = torch.randn((args.num_noises, *info["shape"]), generator=gen, dtype=torch.float64)
    cond = None
    if info["num_classes"]:
        cond = class_labels(args.label, info["num_classes"], args.num_noises)
    model = {"run": str(trained.path), "step": trained.step, "data": info.get("name"),
             "shape": list(info["shape"]), "ema": not args.no_ema}
    for p in den.parameters():
        p.requires_grad_(False)  # gradients flow to the solver parameters only
    return den, noises, cond, model, out


def _run_ems(args) -> int:
    from ..solvers import dpm_v3

    out = _check_out(args)
    den, noises, cond, model, out = _load(args, out, steps=161, kept_evaluations=0)
    print(f"computing DPM-Solver-v3 statistics on {len(noises)} trajectories ...")
    ems = dpm_v3.compute_ems(den, noises, cond=cond, seed=args.seed)
    _check_fitted({"l": ems.l, "s": ems.s, "b": ems.b}, "the model statistics")
    ems.info = {**(ems.info or {}), "model": model}
    ems.save(out)
    print(f"wrote {out}: sample with --solver dpm_solver_v3 --option ems={out}")
    return 0


def run(args) -> int:
    from ..solvers import get as get_solver
    from ..solvers import reference_solve
    from ..solvers import trained as B

    if args.kind != "bespoke" and (args.loss is not None or args.lipschitz is not None):
        raise UserError(f"--loss and --lipschitz apply to --kind bespoke only (got --kind "
                        f"{args.kind})")
    if args.kind == "ems":
        return _run_ems(args)
    if args.nfe is None:
        raise UserError(f"--kind {args.kind} needs --nfe N (the solver is fitted for one NFE)")
    if args.nfe < 1:
        raise UserError(f"--nfe must be >= 1, got {args.nfe}")
    steps = args.steps if args.steps is not None else _DEFAULT_STEPS[args.kind]
    if steps is not None and steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}")
    if args.kind != "grid" and (getattr(args, "option", None) or getattr(args, "method", None)):
        raise UserError("--option and --method apply to --kind grid only")
    base = args.base or _DEFAULT_BASE[args.kind]
    loss = args.loss if args.loss is not None else "rmse"
    if loss not in B.LOSSES:
        raise UserError(f"--loss must be bound or rmse, got {loss!r}")
    if args.lipschitz is not None:
        if loss != "bound":
            raise UserError("--lipschitz is the L of the RMSE-bound: use it with --loss bound")
        if not (math.isfinite(args.lipschitz) and args.lipschitz > 0):
            raise UserError(f"--lipschitz must be a finite number > 0, got {args.lipschitz}")
    if args.kind == "bespoke":
        if base not in B.BespokeSolver.BASES:
            raise UserError(f"--base for bespoke must be euler or midpoint, got {base!r}")
        if B.BespokeSolver.BASES[base] == 2 and args.nfe % 2:
            raise UserError(f"a bespoke {base} solver spends 2 evaluations per step; use an "
                            f"even --nfe (got {args.nfe}) or --base euler")
    elif args.kind == "grid":
        grid_kw = _grid_args(args, base)
    else:
        get_solver(base).steps_for_nfe(args.nfe)  # clear error for an impossible NFE
    out = _check_out(args)
    den, noises, cond, model, out = _load(args, out, steps=args.nfe, kept_evaluations=args.nfe)
    print(f"computing the reference solution for {args.num_noises} noises ...")
    x_init = B.start_state(den, noises)
    ref = reference_solve(den, x_init, cond=cond).to(x_init.dtype)
    common = dict(noises=noises, reference=ref, cond=cond, model=model, progress=True)
    if args.kind == "grid":
        fitted = B.fit_grid(den, args.nfe, base, steps=steps, **grid_kw, **common)
        base = fitted.base + (f" {fitted.options}" if fitted.options else "")
    elif args.kind == "bespoke":
        lip = args.lipschitz if args.lipschitz is not None else 1.0
        fitted = B.BespokeSolver.fit(den, args.nfe, base, steps=steps, loss=loss, lipschitz=lip,
                                     **common)
    else:
        fitted = B.BNSSolver.fit(den, args.nfe, base, steps=steps, **common)
    _check_fitted(fitted._tensors(), "the fitted parameters")
    fitted.save(out)
    fit = fitted.fit_info
    init = f" (start {fit['init_rmse']:.4g})" if "init_rmse" in fit else ""
    how = f", loss {loss}" if args.kind == "bespoke" else ""
    print(f"wrote {out}: {args.kind} solver, nfe={args.nfe}, base={base}{how}; training "
          f"endpoint RMSE {fit['train_rmse']:.4g}{init}, {fit['seconds']:.1f} s")
    return 0


def _check_fitted(tensors: dict, what: str) -> None:
    """Nothing non-finite is written: a diverged fit is an error, not a NaN file."""
    for name, value in tensors.items():
        check_finite(value.detach(), f"{what} ({name})", "the fit diverged: try fewer --steps, "
                                                        "another --base or more --num-noises")


def _grid_args(args, base: str) -> dict:
    """``fit_grid`` keywords from ``--option`` / ``--method``, checked before the model loads."""
    from ..config import parse_options
    from ..solvers import get as get_solver

    options = parse_options(args.option, example="variant=bh1")
    if base == "auto":
        if options:
            raise UserError("--option needs one --base solver; --base auto tries its own "
                            "candidates")
        if args.method == "nelder_mead":
            raise UserError("--base auto fits by gradient: use --method lbfgs or adam")
        return {"method": args.method or "lbfgs"}
    info = get_solver(base)
    try:
        info.steps_for_nfe(args.nfe, options)  # clear errors for an impossible NFE / option
        info.check_options(options)
    except ValueError as e:
        raise UserError(str(e)) from None
    method = args.method or ("lbfgs" if info.differentiable else "nelder_mead")
    return {"method": method, "options": options or None}
