"""``tiltflow likelihood`` and ``tiltflow invert``: PF-ODE log-likelihood and ODE inversion of
data under a trained run."""

from __future__ import annotations

import math
from pathlib import Path

from .errors import UserError


def add_parsers(sub) -> None:
    lk = sub.add_parser("likelihood", help="exact PF-ODE log-likelihood of data under a trained run")
    lk.add_argument("run", help="run directory or checkpoint directory")
    _data_args(lk)
    lk.add_argument("--steps", type=int, default=32, help="ODE steps (default 32)")
    lk.add_argument("--solver", default="rk4", help="euler, midpoint, heun, rk4 (default) or rk4_38")
    lk.add_argument("--trace", default="auto", choices=["auto", "exact", "hutchinson"],
                    help="divergence: exact (D backward passes) or Hutchinson; auto = exact "
                         "up to 64 dimensions")
    lk.add_argument("--probes", type=int, default=1, help="Hutchinson probes (default 1)")

    inv = sub.add_parser("invert", help="map data to its noise with a deterministic ODE solver")
    inv.add_argument("run", help="run directory or checkpoint directory")
    _data_args(inv)
    inv.add_argument("--solver", default="ddim", help="ddim (default), euler or heun")
    inv.add_argument("--nfe", type=int, default=50, help="network evaluations each way")


def _data_args(p) -> None:
    p.add_argument("--data", help="data to evaluate: a built-in name or a path (default: the "
                                  "run's own data; digits: the held-out test split)")
    p.add_argument("--num", type=int, default=256, help="number of examples (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write per-example results to this .npy file")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")


def _load(args):
    """The trained run and up to ``--num`` examples in the run's model space, with labels."""
    import torch

    from .data import load_dataset
    from .runs import load_trained

    if args.num < 1:
        raise UserError(f"--num must be >= 1, got {args.num}")
    trained = load_trained(args.run, use_ema=not args.no_ema)
    info = trained.data
    if args.data:
        ds = load_dataset(args.data)
    else:
        spec = trained.config.get("data") or {"name": info["name"]}
        spec = {"name": spec} if isinstance(spec, str) else dict(spec)
        name = spec.pop("name")
        if name == "digits":
            spec["split"] = "test"
        ds = load_dataset(name, **spec)
    if list(ds.shape) != list(info["shape"]):
        raise UserError(f"the data's examples have shape {list(ds.shape)}, the model's "
                        f"{list(info['shape'])}")
    n = min(args.num, len(ds))
    x_user = ds.denormalize(ds.x[:n]).double()
    shift, scale = torch.tensor(info["shift"]).double(), torch.tensor(info["scale"]).double()
    x = (x_user - shift) / scale if info["kind"] == "tabular" else ds.x[:n].double()
    cond = ds.cond[:n] if (ds.cond is not None and info["num_classes"]) else None
    if info["num_classes"] and cond is None:
        cond = torch.full((n,), -1, dtype=torch.long)  # unconditional branch (null label)
    return trained, x, cond, scale


def _save(path, values, what: str) -> None:
    """Write ``values`` to ``path`` (.npy) when the user asked for a file."""
    if not path:
        return
    import numpy as np

    out = Path(path).with_suffix(".npy")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, values.numpy())
    print(f"wrote {out} ({what})")


def run_likelihood(args) -> int:
    import torch

    from .solvers import bits_per_dim, log_likelihood

    trained, x, cond, scale = _load(args)
    den = trained.denoiser.double()
    log_p = log_likelihood(den, x, cond=cond, steps=args.steps, solver=args.solver,
                           trace=args.trace, num_probes=args.probes,
                           generator=torch.Generator().manual_seed(args.seed))
    d = x[0].numel()
    line = f"{len(x)} examples: NLL {float(-log_p.mean()) / d:.4f} nats/dim (model space)"
    if trained.data["kind"] == "tabular":
        # change of variables to the user's units: x_user = x * scale + shift
        log_p_user = log_p - torch.log(scale.abs()).sum()
        line += f", {float(-log_p_user.mean()) / d:.4f} nats/dim in the data's own units"
    else:
        line += f", {float(bits_per_dim(log_p, d).mean()):.3f} bits/dim (8-bit pixels)"
    print(line)
    _save(args.out, log_p, "log p per example, nats, model space")
    return 0


def run_invert(args) -> int:
    from .solvers import round_trip

    trained, x, cond, _ = _load(args)
    den = trained.denoiser.double()
    noise, x_back = round_trip(den, x, solver=args.solver, nfe=args.nfe, cond=cond)
    err = (x_back - x).flatten(1).norm(dim=1)
    d = x[0].numel()
    print(f"{len(x)} examples inverted with {args.solver}, {args.nfe} evaluations; round trip "
          f"RMS error {float(err.pow(2).mean().sqrt()) / math.sqrt(d):.3g} per dimension; noise "
          f"std {float(noise.std()):.3f} (1 for a perfect map to N(0, I))")
    _save(args.out, noise, "standard-normal noise; sampling from it reconstructs the data")
    return 0
