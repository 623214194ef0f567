"""``tiltflow distill --method NAME --teacher RUN --out DIR``: train a few-step student.

The teacher is a run directory of ``tiltflow train`` or an exact mixture,
``analytic:eight_gaussians`` (``analytic:BED:SCHEDULE`` for another schedule). The student's run
directory is a normal one: ``tiltflow sample DIR --nfe 2`` samples it with its own sampler,
``--resume`` continues a stopped distillation. Methods and their settings: ``--list-methods``.
"""

from __future__ import annotations

from ..errors import UserError
from .common import check_output


def add_parser(sub) -> None:
    p = sub.add_parser("distill", help="distill a teacher into a 1-4 step student",
                       description="Few-step distillation (reflow, progressive, consistency, "
                                   "shortcut, MeanFlow); see --list-methods.")
    p.add_argument("--method", help="few-step method (see --list-methods)")
    p.add_argument("--teacher", help="teacher run directory, or analytic:BED[:SCHEDULE]")
    p.add_argument("--data", default=None,
                   help="training data for the methods that use it (a dataset name or file); "
                        "default: the teacher run's data, or teacher samples")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                   help="a method setting, repeatable (e.g. --set steps=2000)")
    p.add_argument("--out", help="output run directory")
    p.add_argument("--resume", action="store_true", help="continue a stopped distillation")
    p.add_argument("--list-methods", action="store_true",
                   help="print the methods with their settings and exit")


def _list_methods() -> int:
    from .. import fewstep

    for name in fewstep.methods():
        m = fewstep.get_method(name)
        data = " (trains from data)" if m.needs_data else ""
        print(f"{name:26s} {m.description}{data}")
        own = ", ".join(f"{k}={v}" for k, v in m.defaults.items())
        print(f"{'':26s} settings: {own}")
    print("settings every method takes: " + ", ".join(f"{k}={v}" for k, v in
                                                       fewstep.COMMON.items()))
    return 0


def _teacher(spec: str):
    """``(denoiser, data_info, run config or None)`` of ``--teacher``."""
    if spec.startswith("analytic:"):
        from ..analytic import get_testbed

        parts = spec.split(":")
        if len(parts) not in (2, 3):
            raise UserError(f"--teacher {spec!r}: write analytic:BED or analytic:BED:SCHEDULE")
        mixture = get_testbed(parts[1])
        den = mixture.denoiser(parts[2] if len(parts) == 3 else "rectified_flow")
        info = {"name": parts[1], "kind": "points", "shape": [mixture.dim], "num_classes": 0,
                "class_names": None, "shift": [0.0] * mixture.dim, "scale": [1.0] * mixture.dim}
        return den, info, None
    from ..runs import load_trained

    trained = load_trained(spec)
    return trained.denoiser, trained.data, trained.config


def _data(args, run_config, method):
    from .. import data as data_mod

    if args.data is not None:
        ds = data_mod.load_dataset(args.data)
    elif method.needs_data and run_config is not None:
        spec = run_config.get("data") or "eight_gaussians"
        spec = {"name": spec} if isinstance(spec, str) else dict(spec)
        ds = data_mod.load_dataset(spec.pop("name"), **spec)
    else:
        return None
    return {"x": ds.x, "cond": ds.cond}


def run(args) -> int:
    from .. import fewstep
    from ..config import parse_options

    if args.list_methods:
        return _list_methods()
    for flag in ("method", "teacher", "out"):
        if getattr(args, flag) is None:
            raise UserError(f"--{flag} is required (see tiltflow distill --help)")
    method = fewstep.get_method(args.method)
    settings = parse_options(args.settings, example="steps=2000")
    fewstep.base.check_config(method, settings)  # a bad setting fails before any work
    check_output(args.out, kind="dir")
    teacher, info, run_config = _teacher(args.teacher)
    data = _data(args, run_config, method)
    if data is not None and list(data["x"].shape[1:]) != list(info["shape"]):
        raise UserError(f"--data has examples of shape {list(data['x'].shape[1:])}, the teacher "
                        f"was trained on {info['shape']}")
    if info.get("num_classes"):
        settings.setdefault("num_classes", info["num_classes"])
    student = fewstep.distill(args.method, teacher, data=data, config=settings,
                              out_dir=args.out, resume=args.resume, data_info=info)
    lo, hi = student.nfe
    print(f"{args.method} student written to {student.run_dir}; sample it with "
          f"`tiltflow sample {args.out} --nfe {lo if lo == hi else max(lo, 2)}` "
          f"(nfe {lo}{'' if lo == hi else '..' + str(hi) if hi else '+'})")
    return 0
