"""``tiltflow likelihood RUN``: exact PF-ODE log-likelihood of data under a trained run."""

from __future__ import annotations

from ..errors import UserError
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
    lk = sub.add_parser("likelihood", help="exact PF-ODE log-likelihood of data under a trained run")
    lk.add_argument("run", help="run directory or checkpoint directory")
    add_data_args(lk)
    lk.add_argument("--steps", type=positive_int, default=32, help="ODE steps (default 32)")
    lk.add_argument("--solver", default="rk4", help="euler, midpoint, heun, rk4 (default) or rk4_38")
    lk.add_argument("--trace", default="auto", choices=["auto", "exact", "hutchinson"],
                    help="divergence: exact (D backward passes) or Hutchinson; auto = exact "
                         "up to 64 dimensions")
    lk.add_argument("--probes", type=positive_int, default=1, help="Hutchinson probes (default 1)")


def run(args) -> int:
    import torch

    from ..solvers import bits_per_dim, log_likelihood
    from ..solvers.likelihood import TABLEAUX

    if args.solver not in TABLEAUX:
        raise UserError(f"unknown likelihood solver {args.solver!r}; choose one of "
                        f"{sorted(TABLEAUX)}")
    check_data_out(args)
    trained, x, cond, scale = load_examples(args)
    den = trained.denoiser.double()
    # the divergence backpropagates through the network: activations are kept (factor 2)
    check_solver_fits(den, trained.data["shape"], len(x), args.steps,
                      what=f"the likelihood of {len(x)} examples over --steps {args.steps}",
                      fix="lower --num or --steps", num_classes=trained.data["num_classes"],
                      batch_factor=2 * max(args.probes, 1))
    log_p = log_likelihood(den, x, cond=cond, steps=args.steps, solver=args.solver,
                           trace=args.trace, num_probes=args.probes,
                           generator=torch.Generator().manual_seed(args.seed))
    check_finite(log_p, "the log-likelihoods", "the model or the ODE solve diverged: try more "
                                               "--steps or an earlier checkpoint of the run")
    d = x[0].numel()
    line = f"{len(x)} examples: NLL {float(-log_p.mean()) / d:.4f} nats/dim (model space)"
    if trained.data["kind"] == "tabular":
        # change of variables to the user's units: x_user = x * scale + shift
        log_p_user = log_p - torch.log(scale.abs()).sum()
        line += f", {float(-log_p_user.mean()) / d:.4f} nats/dim in the data's own units"
    else:
        line += f", {float(bits_per_dim(log_p, d).mean()):.3f} bits/dim (8-bit pixels)"
    print(line)
    save_npy(args.out, log_p, "log p per example, nats, model space")
    return 0
