"""Pieces the subcommands share: the class labels of ``sample`` / ``fit-solver``, the data
arguments of ``likelihood`` / ``invert`` and the examples they load, and the optional ``.npy``
output."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError


def class_labels(label: int | None, num_classes: int, n: int):
    """``n`` labels of a conditional model: ``--label`` repeated, else cycling over the classes."""
    import torch

    if label is None:
        return torch.arange(n) % num_classes
    if not 0 <= label < num_classes:
        raise UserError(f"--label must be in [0, {num_classes}), got {label}")
    return torch.full((n,), label, dtype=torch.long)


def add_data_args(p) -> None:
    p.add_argument("--data", help="data to evaluate: a built-in name or a path (default: the "
                                  "run's own data; digits: the held-out test split)")
    p.add_argument("--num", type=int, default=256, help="number of examples (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write per-example results to this .npy file")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")


def load_examples(args):
    """The trained run and up to ``--num`` examples in the run's model space, with labels."""
    import torch

    from ..data import load_dataset
    from ..runs import load_trained

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


def save_npy(path, values, what: str) -> None:
    """Write ``values`` to ``path`` (.npy) when the user asked for a file."""
    if not path:
        return
    import numpy as np

    out = Path(path).with_suffix(".npy")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, values.numpy())
    print(f"wrote {out} ({what})")
