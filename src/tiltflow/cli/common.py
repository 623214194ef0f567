"""Pieces the subcommands share.

- **Argument types** (:func:`positive_int`, :func:`finite_float`, ...): a bad number is refused
  by the parser, before anything loads, as one line naming the flag.
- **Output locations** (:func:`check_output`): every command that writes checks where it will
  write before doing any work, and a command that fails removes what it created
  (:func:`remove_outputs_on_failure`, entered once by :func:`tiltflow.cli.main`).
- **Results** (:func:`check_finite`, :func:`save_npy`): nothing non-finite is written, and
  files are written atomically, so a failed write leaves no half-written file.
- **Memory** (:func:`check_solver_fits`): a solver request is estimated before it allocates.
- The class labels of ``sample`` / ``fit-solver`` and the data arguments of ``likelihood`` /
  ``invert`` with the examples they load.
"""

from __future__ import annotations

import argparse
import errno
import io
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError, os_fix

# -- argument types ---------------------------------------------------------------------------


def _int_type(lo: int | None, hi: int | None, what: str) -> Callable[[str], int]:
    """An argparse ``type`` parsing an integer in ``[lo, hi)`` (``None``: unbounded)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if (lo is not None and value < lo) or (hi is not None and value >= hi):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__name__ = what
    return parse


def _float_type(positive: bool) -> Callable[[str], float]:
    """An argparse ``type`` parsing a finite float (NaN / inf would silently poison results)."""
    what = "a finite number > 0" if positive else "a finite number"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not math.isfinite(value) or (positive and value <= 0):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__name__ = what
    return parse


positive_int = _int_type(1, None, "an integer >= 1")
nonnegative_int = _int_type(0, None, "an integer >= 0")
#: torch.Generator.manual_seed takes any 64-bit value (negative ones wrap around)
seed_int = _int_type(-(2**63), 2**64, "an integer seed in [-2^63, 2^64)")
finite_float = _float_type(positive=False)
positive_float = _float_type(positive=True)


# -- output locations -------------------------------------------------------------------------

#: per active :func:`remove_outputs_on_failure` block: (path to remove, the output it was
#: created for, keep_if)
_Claim = tuple[Path, Path, Callable[[Path], bool] | None]
_claims: list[list[_Claim]] = []


@contextmanager
def remove_outputs_on_failure() -> Iterator[None]:
    """Within this block, paths that :func:`check_output` found missing are removed again if
    the block raises (a failed command leaves nothing behind). ``keep_if(output)`` spares one
    whose output holds something worth keeping (a training run's good checkpoints)."""
    claims: list[_Claim] = []
    _claims.append(claims)
    try:
        yield
    except BaseException:
        for created, output, keep_if in reversed(claims):
            if _exists(created) and not (keep_if is not None and keep_if(output)):
                _remove(created)
        raise
    finally:
        _claims.remove(claims)


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except OSError:
        pass  # best effort: the command's own error is what the user needs to see


def _exists(path: Path) -> bool:
    try:
        return path.exists() or path.is_symlink()
    except OSError:
        return False


def _first_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (``.`` at the latest)."""
    for candidate in (path, *path.parents):
        if _exists(candidate):
            return candidate
    return Path(".")


#: a folder with less free space than this takes no output at all (a full disk)
MIN_FREE_BYTES = 64 * 1024


def _probe_writable(folder: Path, label: str) -> None:
    """Create and delete a hidden file in ``folder``: the one check that catches permissions,
    read-only and pseudo file systems alike (``os.access`` is fooled by root and by /proc);
    then refuse a full disk, where creating a file works but writing to it does not."""
    try:
        fd, name = tempfile.mkstemp(prefix=".tiltflow-write-check-", dir=folder)
    except OSError as e:  # /proc and /sys answer ENOENT: no file can be made there
        fix = "choose a folder you may write to" if e.errno == errno.ENOENT else os_fix(e.errno)
        raise UserError(f"cannot write {label}: {str(folder)!r} does not accept new files "
                        f"({e.strerror}); {fix}") from None
    os.close(fd)
    os.unlink(name)
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):  # no statvfs (Windows): the write itself will tell
        return
    if st.f_bavail * st.f_frsize < MIN_FREE_BYTES:
        raise UserError(f"cannot write {label}: the disk holding {str(folder)!r} is full "
                        f"({st.f_bavail * st.f_frsize} bytes free); free space or choose "
                        "another disk")


def check_output(path, *, kind: str = "file", what: str = "--out",
                 keep_if: Callable[[Path], bool] | None = None) -> Path:
    """Refuse, before any work, an output location this command could not write.

    ``kind`` is ``"file"`` or ``"dir"``. Refused: a folder where a file is wanted (and the
    reverse), a path under an existing file, a folder that does not accept new files (no
    permission, read-only or pseudo file system). The path component that does not exist yet is
    remembered, so that :func:`remove_outputs_on_failure` can take it away again."""
    p = Path(path)
    label = f"{what} {str(p)!r}"
    if kind == "dir" and _exists(p) and not p.is_dir():
        raise UserError(f"{label} is a file, but a folder is needed there; remove the file or "
                        "choose another path")
    if kind == "file" and p.is_dir():
        raise UserError(f"{label} is a folder, but a file is needed there; give a file name")
    anchor = _first_existing(p)
    if anchor == p and kind == "file":  # an existing file is replaced: its folder takes the new
        anchor = p.parent
    if not anchor.is_dir():
        raise UserError(f"cannot create {label}: {str(anchor)!r} is a file, not a folder; "
                        "choose another path")
    _probe_writable(anchor, label)
    if not _exists(p) and _claims:  # only what this command creates; an existing file stays
        created = p
        while created.parent != anchor:
            created = created.parent
        if not any(created == c for c, _, _ in _claims[-1]):
            _claims[-1].append((created, p, keep_if))
    return p


def check_prefix(prefix, suffixes: tuple[str, ...], what: str = "--out") -> Path:
    """:func:`check_output` for each file ``PREFIX.<suffix>`` a command writes."""
    for suffix in suffixes:
        check_output(Path(prefix).with_suffix(suffix), what=what)
    return Path(prefix)


# -- results ----------------------------------------------------------------------------------

def check_finite(values, what: str, hint: str) -> None:
    """Refuse to write ``values`` (a tensor) holding NaN or inf: a silent NaN file is worse
    than an error. ``hint`` says what to try instead."""
    import torch

    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        raise UserError(f"{int(bad.sum())} of {values.numel()} values of {what} are NaN or "
                        f"infinite, so nothing was written; {hint}")


def write_npy(path, array) -> Path:
    """``numpy.save`` to ``path``, atomically (a failed write leaves no partial file)."""
    import numpy as np

    from ..fileio import atomic_write_bytes

    buf = io.BytesIO()
    np.save(buf, array)
    return atomic_write_bytes(path, buf.getvalue())


def save_npy(path, values, what: str) -> None:
    """Write ``values`` to ``path`` (.npy) when the user asked for a file."""
    if not path:
        return
    out = write_npy(Path(path).with_suffix(".npy"), values.numpy())
    print(f"wrote {out} ({what})")


# -- memory -----------------------------------------------------------------------------------

def check_solver_fits(denoiser, shape, num: int, steps: int, *, what: str, fix: str,
                      num_classes: int = 0, batch_factor: int = 1, trajectory: bool = False,
                      kept_evaluations: int = 0) -> None:
    """Refuse a solver run on ``num`` examples over ``steps`` steps that cannot fit in memory,
    before its noise, grid or states are allocated (see :func:`tiltflow.memory.sampling_parts`
    for the other arguments)."""
    from .. import memory

    dtype_bytes = next(denoiser.parameters()).element_size()
    total, peak = memory.denoiser_activation_bytes(denoiser, shape, num_classes)
    parts = memory.sampling_parts(shape, num, steps, peak, dtype_bytes=dtype_bytes,
                                  batch_factor=batch_factor, trajectory=trajectory,
                                  activation_sum=total, kept_evaluations=kept_evaluations)
    memory.check_fits(sum(parts.values()), what, fix, parts=parts)


# -- labels and data --------------------------------------------------------------------------

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
    p.add_argument("--num", type=positive_int, default=256,
                   help="number of examples (default 256)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--out", help="write per-example results to this .npy file")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")


def check_data_out(args) -> None:
    """The ``--out`` of ``likelihood`` / ``invert``, checked before anything loads."""
    if args.out:
        check_output(Path(args.out).with_suffix(".npy"))


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
