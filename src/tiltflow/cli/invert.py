"""``tiltflow invert RUN``: map data to its noise with a deterministic ODE solver (and back)."""

from __future__ import annotations

import math

from .common import (
    add_data_args,
    check_data_out,
    check_finite,
    check_solver_fits,
    load_examples,
    positive_int,
    save_npy,
)


def add_parser(sub) -> None:
    inv = sub.add_parser("invert", help="map data to its noise with a deterministic ODE solver")
    inv.add_argument("run", help="run directory or checkpoint directory")
    add_data_args(inv)
    inv.add_argument("--solver", default="ddim", help="ddim (default), euler or heun")
    inv.add_argument("--nfe", type=positive_int, default=50, help="network evaluations each way")


def run(args) -> int:
    from ..solvers import round_trip

    check_data_out(args)
    trained, x, cond, _ = load_examples(args)
    den = trained.denoiser.double()
    # a deterministic solver spends >= 1 evaluation per step: at most --nfe steps each way
    check_solver_fits(den, trained.data["shape"], len(x), args.nfe,
                      what=f"inverting {len(x)} examples with --nfe {args.nfe}",
                      fix="lower --num or --nfe", num_classes=trained.data["num_classes"])
    noise, x_back = round_trip(den, x, solver=args.solver, nfe=args.nfe, cond=cond)
    check_finite(noise, "the inverted noise", "the model or the solver diverged: try another "
                                              "--solver, a larger --nfe or an earlier checkpoint")
    err = (x_back - x).flatten(1).norm(dim=1)
    d = x[0].numel()
    print(f"{len(x)} examples inverted with {args.solver}, {args.nfe} evaluations; round trip "
          f"RMS error {float(err.pow(2).mean().sqrt()) / math.sqrt(d):.3g} per dimension; noise "
          f"std {float(noise.std()):.3f} (1 for a perfect map to N(0, I))")
    save_npy(args.out, noise, "standard-normal noise; sampling from it reconstructs the data")
    return 0
