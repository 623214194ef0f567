"""Datasets: built-in 2-D sets, scikit-learn digits, and the user's own data.

Everything loads into a :class:`Dataset` whose ``x`` lives in *model space*:

- images ``[N, C, H, W]`` scaled to ``[-1, 1]``; ``Dataset.to_uint8`` maps model outputs to
  ``0..255`` for viewing and ``Dataset.denormalize`` maps them back to the user's units;
- tabular data ``[N, D]``: user tables (CSV, 2-D arrays) are standardised per column,
  ``x = (x_user - shift) / scale`` with the column mean and (population) standard deviation;
  the built-in 2-D sets keep their natural coordinates (``shift = 0``, ``scale = 1``) so they
  match the exact mixtures of :mod:`tiltflow.analytic`.

:func:`load_dataset` takes a built-in name (:func:`available`) or a path:

- a folder of PNG/JPEG images (read with Pillow), all of one size. Greyscale images give 1
  channel, colour ones 3 (alpha is dropped; if any image has colour, all are read as RGB).
  When the folder has subfolders with images, each immediate subfolder is a class
  (``class_names`` = sorted subfolder names); ``labels=False`` ignores them.
- a ``.npy`` array or an ``.npz`` archive (data under key ``"x"`` or the only non-label array;
  optional class labels under ``"y"`` or ``"labels"``: non-negative integers, or strings).
  Shape rule: ``[N]`` and ``[N, D]`` are tabular; ``[N, H, W]`` are greyscale images;
  ``[N, C, H, W]`` with ``C <= 4`` are channels-first images, otherwise ``[N, H, W, C]`` with
  ``C <= 4`` channels-last. Image value range: integers in ``0..255`` are 8-bit; floats in
  ``[0, 1]`` or ``[-1, 1]`` keep that range; otherwise the array's min..max (override with
  ``value_range=(lo, hi)``); the range is mapped linearly onto ``[-1, 1]``.
- a ``.csv`` (or ``.tsv``) table of numbers; the header is detected (``header="auto"``: the
  first row is a header when one of its cells is not a number); ``label_column=`` (a header
  name or a 0-based index) names a class column (integers or strings).

Bad input raises :class:`tiltflow.errors.UserError` with a one-line message naming the problem
and the fix; loading never writes files.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

__all__ = [
    "Dataset",
    "DIGITS_NUM_TRAIN",
    "digits_arrays",
    "make_2d",
    "load_dataset",
    "available",
    "to_uint8",
]

DIGITS_NUM_TRAIN = 1437  # 80 % of the 1,797 images; the rest is the test split


def digits_arrays(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits as ``(x [N, 1, 8, 8] float32 in [-1, 1], labels [N] int64)``.

    The split is fixed: a permutation by ``numpy.random.RandomState(0)``, the first 1,437
    images for ``"train"``, the remaining 360 for ``"test"``; ``"all"`` returns every image in
    the original order.
    """
    from sklearn.datasets import load_digits

    if split not in ("train", "test", "all"):
        raise ValueError(f"digits split must be 'train', 'test' or 'all', got {split!r}")
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0 * 2 - 1
    y = torch.tensor(d.target, dtype=torch.int64)
    if split == "all":
        return x, y
    perm = torch.from_numpy(np.random.RandomState(0).permutation(len(y)))
    idx = perm[:DIGITS_NUM_TRAIN] if split == "train" else perm[DIGITS_NUM_TRAIN:]
    return x[idx], y[idx]


TWO_D = ("eight_gaussians", "moons", "checkerboard", "rings", "spirals")
DEFAULT_N_2D = 10_000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


# -- the dataset type --------------------------------------------------------------------------
def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in ``[-1, 1]`` (any shape) to ``uint8`` in ``0..255``, clamping out-of-range
    values; the layout is unchanged (``[B, C, H, W]`` stays channels-first)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@dataclass
class Dataset:
    """Training data in model space plus what is needed to map it back to the user's units.

    ``x``: float32 ``[N, ...]``; ``cond``: ``LongTensor[N]`` of labels in ``[0, num_classes)``
    or ``None``; ``kind``: ``"tabular"`` (``x`` is ``[N, D]``) or ``"image"`` (``[N, C, H, W]``
    in ``[-1, 1]``); ``shift``/``scale``: ``x_user = x * scale + shift`` (per column ``[D]``
    for tabular data, scalars for images); ``None`` means 0 / 1.
    """

    x: torch.Tensor
    cond: torch.Tensor | None = None
    num_classes: int = 0
    kind: str = "tabular"
    name: str = ""
    class_names: list[str] | None = None
    shift: torch.Tensor | None = None
    scale: torch.Tensor | None = None

    def __post_init__(self):
        if not torch.is_tensor(self.x) or not self.x.is_floating_point():
            raise TypeError("Dataset.x must be a float tensor [N, ...]")
        self.x = self.x.float()
        if self.kind not in ("tabular", "image"):
            raise ValueError(f"Dataset.kind must be 'tabular' or 'image', got {self.kind!r}")
        want = 2 if self.kind == "tabular" else 4
        if self.x.dim() != want:
            raise ValueError(f"{self.kind} data must have {want} dims, got {tuple(self.x.shape)}")
        if self.cond is not None:
            if self.cond.dtype != torch.long or self.cond.shape != (len(self.x),):
                raise ValueError(f"Dataset.cond must be a LongTensor[{len(self.x)}]")
            if self.num_classes < 1:
                raise ValueError("Dataset.cond given but num_classes is 0")
            if len(self.cond) and (self.cond.min() < 0 or self.cond.max() >= self.num_classes):
                raise ValueError(f"Dataset.cond labels must lie in [0, {self.num_classes})")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError("Dataset.class_names must have num_classes entries")
        self.shift = torch.as_tensor(0.0 if self.shift is None else self.shift).float()
        self.scale = torch.as_tensor(1.0 if self.scale is None else self.scale).float()

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one example: ``(D,)`` or ``(C, H, W)``."""
        return tuple(self.x.shape[1:])

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Model space to the user's units: ``x * scale + shift``."""
        return x * self.scale.to(x) + self.shift.to(x)

    def normalize(self, x_user: torch.Tensor) -> torch.Tensor:
        """The user's units to model space (inverse of :meth:`denormalize`)."""
        return (x_user - self.shift.to(x_user)) / self.scale.to(x_user)

    def to_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space images to ``uint8`` (see :func:`to_uint8`)."""
        if self.kind != "image":
            raise ValueError("to_uint8 is for image data; use denormalize for tabular data")
        return to_uint8(x)

    def subset(self, index) -> Dataset:
        """The examples at ``index`` (a LongTensor, slice or list), same metadata."""
        return Dataset(self.x[index], None if self.cond is None else self.cond[index],
                       self.num_classes, self.kind, self.name, self.class_names,
                       self.shift, self.scale)

    def batch(self, index) -> dict:
        """``{"x": ..., "cond": ...}`` for the examples at ``index`` (the objectives' format)."""
        return {"x": self.x[index], "cond": None if self.cond is None else self.cond[index]}


# -- built-in 2-D sets -------------------------------------------------------------------------
def _eight_gaussians(n: int, g: torch.Generator) -> torch.Tensor:
    # equal-weight mixture, means 4 (cos 2 pi k/8, sin 2 pi k/8), std 0.5: tiltflow.analytic's bed
    k = torch.randint(0, 8, (n,), generator=g)
    angle = k.double() * (2 * math.pi / 8)
    means = 4.0 * torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    return (means + 0.5 * torch.randn(n, 2, generator=g, dtype=torch.float64)).float()


def _moons(n: int, g: torch.Generator) -> torch.Tensor:
    # two interleaved half circles (as scikit-learn's make_moons, noise 0.1), centred, x2
    theta = torch.rand(n, generator=g, dtype=torch.float64) * math.pi
    upper = torch.rand(n, generator=g) < 0.5
    a = torch.stack([torch.cos(theta), torch.sin(theta)], 1)
    b = torch.stack([1 - torch.cos(theta), 0.5 - torch.sin(theta)], 1)
    noise = 0.1 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    p = torch.where(upper[:, None], a, b) + noise
    return (2 * (p - torch.tensor([0.5, 0.25], dtype=torch.float64))).float()


def _checkerboard(n: int, g: torch.Generator) -> torch.Tensor:
    # uniform on the 8 dark squares (side 2) of a 4 x 4 board covering [-4, 4]^2
    cell = torch.randint(0, 8, (n,), generator=g)
    row = cell // 2
    col = 2 * (cell % 2) + (row % 2)
    u = torch.rand(n, 2, generator=g, dtype=torch.float64)
    return torch.stack([-4 + 2 * col + 2 * u[:, 0], -4 + 2 * row + 2 * u[:, 1]], 1).float()


def _rings(n: int, g: torch.Generator) -> torch.Tensor:
    # four concentric circles of radii 1..4, equal weights, radial noise std 0.08
    radius = torch.randint(1, 5, (n,), generator=g).double()
    radius = radius + 0.08 * torch.randn(n, generator=g, dtype=torch.float64)
    angle = torch.rand(n, generator=g, dtype=torch.float64) * 2 * math.pi
    return (radius[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], 1)).float()


def _spirals(n: int, g: torch.Generator) -> torch.Tensor:
    # two interleaved Archimedean spiral arms r ~ theta, theta in [0, 3 pi], outer radius 4
    theta = torch.sqrt(torch.rand(n, generator=g, dtype=torch.float64)) * 3 * math.pi
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    p = sign[:, None] * theta[:, None] * torch.stack([torch.cos(theta), torch.sin(theta)], 1)
    p = p * (4 / (3 * math.pi))
    return (p + 0.1 * torch.randn(n, 2, generator=g, dtype=torch.float64)).float()


_SAMPLERS = {
    "eight_gaussians": _eight_gaussians,
    "moons": _moons,
    "checkerboard": _checkerboard,
    "rings": _rings,
    "spirals": _spirals,
}


def make_2d(name: str, n: int = DEFAULT_N_2D, seed: int = 0) -> torch.Tensor:
    """``n`` points ``[n, 2]`` (float32) of a built-in 2-D set, drawn with a
    ``torch.Generator`` seeded by ``seed`` (same seed, same points).

    - ``eight_gaussians``: 8 equal-weight Gaussians, std 0.5, means on a circle of radius 4 at
      angles ``2 pi k / 8`` (Grathwohl et al. 2019; identical to ``analytic.eight_gaussians``);
    - ``moons``: two interleaved half circles with noise 0.1, centred and scaled by 2;
    - ``checkerboard``: uniform on the dark squares of a 4x4 board on ``[-4, 4]^2``;
    - ``rings``: four concentric circles of radius 1..4, radial noise 0.08;
    - ``spirals``: two interleaved spiral arms of outer radius 4, noise 0.1.
    """
    if name not in _SAMPLERS:
        raise UserError(f"unknown 2-D dataset {name!r}; choose one of {list(TWO_D)}")
    _check_n(n)
    from .memory import check_fits

    # the points, their noise and the samplers' temporaries: about 8 float32 copies of [n, 2]
    check_fits(int(n) * 2 * 4 * 8, f"the 2-D dataset {name!r} with n={n}", "lower data.n")
    return _SAMPLERS[name](int(n), torch.Generator().manual_seed(int(seed)))


def available() -> list[str]:
    """Built-in dataset names accepted by :func:`load_dataset`."""
    return [*TWO_D, "digits"]


# -- entry point -------------------------------------------------------------------------------
def load_dataset(spec, *, n: int | None = None, seed: int = 0, **options) -> Dataset:
    """Load a built-in set by name or the user's data from a path.

    ``n``: number of examples; for the 2-D sets the sample size (default 10,000), for finite
    data a random subset (seeded by ``seed``, original order kept). ``options`` depend on the
    source: ``digits``: ``split="train" | "test" | "all"``; image folder: ``labels``;
    ``.npy/.npz``: ``value_range``, ``standardize``; CSV: ``label_column``, ``header``,
    ``delimiter``, ``standardize``. See the module docstring for the rules.
    """
    if isinstance(spec, str) and spec in available():
        if spec == "digits":
            _check_options(options, ("split",), "the digits dataset")
            return _subset(_load_digits(**options), n, seed)
        _check_options(options, (), f"the built-in {spec!r} dataset")
        x = make_2d(spec, DEFAULT_N_2D if n is None else n, seed)
        return Dataset(x, kind="tabular", name=spec)
    if not isinstance(spec, str | os.PathLike):
        raise UserError(f"dataset must be a built-in name or a path, got {type(spec).__name__}")
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(
            f"no such dataset or file: {str(spec)!r}; pass one of {available()} or the path of "
            "an image folder, .npy/.npz array or .csv table"
        )
    if path.is_dir():
        _check_options(options, ("labels",), "image folders")
        ds = _load_image_folder(path, **options)
    else:
        suffix = path.suffix.lower()
        if suffix in (".npy", ".npz"):
            _check_options(options, ("value_range", "standardize"), f"{suffix} files")
            ds = _load_array_file(path, **options)
        elif suffix in (".csv", ".tsv"):
            _check_options(options, ("label_column", "header", "delimiter", "standardize"),
                           "CSV tables")
            ds = _load_csv(path, **options)
        else:
            raise UserError(
                f"unsupported file type {suffix or '(none)'!r} for {path}; use a folder of "
                "PNG/JPEG images, a .npy/.npz array or a .csv table"
            )
    return _subset(ds, n, seed)


# -- helpers -----------------------------------------------------------------------------------
def _check_options(options: dict, allowed: tuple, what: str) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        valid = ", ".join(allowed) if allowed else "none"
        raise UserError(f"unknown option(s) {unknown} for {what}; valid options: {valid}")


def _check_n(n) -> None:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise UserError(f"n must be a positive integer, got {n!r}")


def _subset(ds: Dataset, n, seed: int) -> Dataset:
    if n is None:
        return ds
    _check_n(n)
    if n > len(ds):
        raise UserError(f"asked for n={n} examples but {ds.name!r} has only {len(ds)}; "
                        f"pass n <= {len(ds)} or n=None for all")
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(len(ds), generator=g)[: int(n)].sort().values
    return ds.subset(idx)


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def _encode_labels(values: np.ndarray, where: str):
    """Class labels to ``(LongTensor, num_classes, class_names)``: non-negative integers are
    class ids (``num_classes = max + 1``); strings are sorted and numbered."""
    values = np.asarray(values)
    if values.dtype.kind in "US":
        names = sorted({str(v) for v in values.tolist()})
        lookup = {name: i for i, name in enumerate(names)}
        ids = np.array([lookup[str(v)] for v in values.tolist()], dtype=np.int64)
        return torch.from_numpy(ids), len(names), names
    if values.dtype.kind == "f":
        if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
            raise UserError(f"labels in {where} must be integers or strings, found non-integer "
                            "values; round them or store class names")
        values = values.astype(np.int64)
    if values.dtype.kind not in "iub":
        raise UserError(f"labels in {where} have unsupported type {values.dtype}; use "
                        "non-negative integers or strings")
    values = values.astype(np.int64)
    if values.size and values.min() < 0:
        raise UserError(f"labels in {where} must be non-negative class ids, found "
                        f"{int(values.min())}; renumber them from 0")
    k = int(values.max()) + 1 if values.size else 0
    return torch.from_numpy(values.copy()), k, [str(i) for i in range(k)]


def _standardize(x: np.ndarray, standardize: bool):
    x = x.astype(np.float64)
    if not standardize:
        return torch.from_numpy(x).float(), None, None
    mean = x.mean(0)
    std = x.std(0)
    std = np.where(std > 0, std, 1.0)
    z = (x - mean) / std
    as_t = torch.from_numpy
    return as_t(z).float(), as_t(mean).float(), as_t(std).float()


def _load_digits(split: str = "train") -> Dataset:
    if split not in ("train", "test", "all"):
        raise UserError(f"digits split must be 'train', 'test' or 'all', got {split!r}")
    x, y = digits_arrays(split)
    # pixels were 0..16 in scikit-learn: x_user = 8 x + 8
    return Dataset(x, y, 10, "image", "digits", [str(i) for i in range(10)],
                   torch.tensor(8.0), torch.tensor(8.0))


# -- user data: image folders ------------------------------------------------------------------
def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_SUFFIXES)


def _load_image_folder(path: Path, labels: bool | None = None) -> Dataset:
    from PIL import Image

    try:
        top = _image_files(path)
        subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        classes = {d.name: files for d in subdirs if (files := _image_files(d))}
    except OSError as e:
        raise UserError(
            f"cannot list folder {path} ({_first_line(e)}); check its permissions"
        ) from None
    use_labels = bool(classes) if labels is None else bool(labels)
    if use_labels:
        if not classes:
            raise UserError(f"labels=True but {path} has no subfolders with images; put each "
                            "class in its own subfolder or pass labels=False")
        if top:
            raise UserError(f"{path} has images both at the top level ({top[0].name}) and in "
                            "class subfolders; move them into a class subfolder or pass "
                            "labels=False")
        names = list(classes)
        files = [f for name in names for f in classes[name]]
        ids = [i for i, name in enumerate(names) for _ in classes[name]]
    else:
        files = top + [f for fs in classes.values() for f in fs]
    if not files:
        raise UserError(f"no images (.png/.jpg/.jpeg) found in folder {path}; add images or "
                        "pass another folder")

    arrays, grey, first_size = [], [], None
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                size, mode = im.size, im.mode
                is_grey = mode in _GREY_MODES
                arr = np.asarray(im.convert("L" if is_grey else "RGB"))
        except Exception as e:  # Pillow raises many types for corrupt files
            raise UserError(f"cannot read image {f} ({_first_line(e)}); re-save it as PNG/JPEG "
                            "or remove it") from None
        if first_size is None:
            first_size = (files[0], size)
        elif size != first_size[1]:
            (w0, h0), (w1, h1) = first_size[1], size
            raise UserError(
                f"images must all have the same size, but {first_size[0]} is {w0}x{h0} and {f} "
                f"is {w1}x{h1} (width x height); resize them to one size first"
            )
        arrays.append(arr)
        grey.append(is_grey)
    if all(grey):
        x = np.stack(arrays)[:, None]  # [N, 1, H, W]
    else:  # any colour image: read everything as RGB
        pairs = zip(arrays, grey, strict=True)
        x = np.stack([np.repeat(a[..., None], 3, -1) if g else a for a, g in pairs])
        x = x.transpose(0, 3, 1, 2)
    xt = torch.from_numpy(x.astype(np.float32)) / 127.5 - 1
    if use_labels:
        return Dataset(xt, torch.tensor(ids, dtype=torch.long), len(names), "image", path.name,
                       names, torch.tensor(127.5), torch.tensor(127.5))
    return Dataset(xt, kind="image", name=path.name, shift=torch.tensor(127.5),
                   scale=torch.tensor(127.5))


# -- user data: .npy / .npz --------------------------------------------------------------------
def _load_array_file(path: Path, value_range=None, standardize: bool = True) -> Dataset:
    y = None
    is_npz = path.suffix.lower() == ".npz"
    kind = "NumPy .npz archive" if is_npz else "NumPy .npy array"
    try:
        with open(path, "rb") as fh:
            magic = fh.read(6)
    except OSError as e:
        raise UserError(f"cannot read {path} ({_first_line(e)}); check the path and its "
                        "permissions") from None
    expected = b"PK\x03\x04" if is_npz else b"\x93NUMPY"
    if not magic.startswith(expected):
        raise UserError(f"{path} is not a {kind} (unexpected file header); save the data with "
                        f"numpy.{'savez' if is_npz else 'save'}")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            x = loaded
        else:
            with loaded:
                keys = list(loaded.files)
                label_keys = [k for k in ("y", "labels") if k in keys]
                if len(label_keys) > 1:
                    raise UserError(f"{path} has both 'y' and 'labels' arrays; keep one of them")
                data_keys = [k for k in keys if k not in label_keys]
                if "x" in data_keys:
                    key = "x"
                elif len(data_keys) == 1:
                    key = data_keys[0]
                elif not data_keys:
                    raise UserError(f"{path} holds no data array; save the data under key 'x'")
                else:
                    raise UserError(f"{path} holds several arrays {data_keys}; save the data "
                                    "under key 'x' (labels under 'y')")
                x = loaded[key]
                y = loaded[label_keys[0]] if label_keys else None
    except UserError:
        raise
    except Exception as e:
        if "pickle" in str(e):
            raise UserError(f"{path} holds pickled Python objects, which tiltflow never loads; "
                            "save a numeric array instead") from None
        raise UserError(f"cannot read {path} as a {kind} ({_first_line(e)}); re-save it with "
                        "numpy.save / numpy.savez (no pickled objects)") from None
    if x.dtype.kind not in "biuf":
        raise UserError(f"{path} holds {x.dtype} data; save a numeric (int or float) array")
    if x.ndim == 0 or x.shape[0] == 0 or x.size == 0:
        raise UserError(f"{path} holds no examples (shape {x.shape}); save a non-empty array")
    bad = ~np.isfinite(x.astype(np.float64, copy=False))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise UserError(f"{path} has a non-finite value ({x[where]}) at index {list(where)}; "
                        "remove or fill missing values first")
    cond, num_classes, class_names = None, 0, None
    if y is not None:
        y = np.asarray(y)
        if y.shape != (x.shape[0],):
            raise UserError(f"labels in {path} have shape {y.shape} but the data has "
                            f"{x.shape[0]} examples; save one label per example")
        cond, num_classes, class_names = _encode_labels(y, str(path))
    name = path.stem
    if x.ndim <= 2:
        x2 = x.reshape(x.shape[0], -1)
        if value_range is not None:
            raise UserError("value_range is for image arrays; tabular data is standardised "
                            "(pass standardize=False to keep raw values)")
        xt, shift, scale = _standardize(x2, standardize)
        return Dataset(xt, cond, num_classes, "tabular", name, class_names, shift, scale)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[1] > 4:
            if x.shape[3] > 4:
                raise UserError(f"{path} has shape {x.shape}: cannot find a channel axis of size "
                                "<= 4; save images as [N, C, H, W] or [N, H, W, C]")
            x = x.transpose(0, 3, 1, 2)
    else:
        raise UserError(f"{path} has {x.ndim} dimensions {x.shape}; use [N, D] tables or "
                        "[N, H, W] / [N, C, H, W] images")
    lo, hi = _value_range(x, value_range, path)
    shift, scale = (hi + lo) / 2, ((hi - lo) / 2) or 1.0
    xt = torch.from_numpy(((x.astype(np.float64) - shift) / scale).astype(np.float32))
    return Dataset(xt, cond, num_classes, "image", name, class_names,
                   torch.tensor(shift), torch.tensor(scale))


def _value_range(x: np.ndarray, value_range, path: Path) -> tuple[float, float]:
    if value_range is not None:
        try:
            lo, hi = (float(v) for v in value_range)
        except (TypeError, ValueError):
            raise UserError(f"value_range must be a pair (lo, hi), got {value_range!r}") from None
        if not hi > lo:
            raise UserError(f"value_range needs lo < hi, got {value_range!r}")
        return lo, hi
    lo, hi = float(x.min()), float(x.max())
    if x.dtype.kind in "biu":
        return (0.0, 255.0) if lo >= 0 and hi <= 255 else (lo, hi)
    for a, b in ((0.0, 1.0), (-1.0, 1.0), (0.0, 255.0)):
        if lo >= a and hi <= b:
            return a, b
    return lo, hi


# -- user data: CSV tables ---------------------------------------------------------------------
def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _load_csv(path: Path, label_column=None, header="auto", delimiter=None,
              standardize: bool = True) -> Dataset:
    if header not in ("auto", True, False):
        raise UserError(f"header must be 'auto', True or False, got {header!r}")
    delimiter = delimiter or ("\t" if path.suffix.lower() == ".tsv" else ",")
    try:
        text = path.read_text(encoding="utf-8-sig")
        reader = csv.reader(io.StringIO(text), delimiter=delimiter)
        rows = [(reader.line_num, [c.strip() for c in row]) for row in reader
                if any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read {path} as a CSV table ({_first_line(e)}); save it as "
                        "UTF-8 text with one example per line") from None
    if not rows:
        raise UserError(f"{path} is empty; add a header line and rows of numbers")
    has_header = (any(not _is_number(c) for c in rows[0][1]) if header == "auto"
                  else bool(header))
    width = len(rows[0][1])
    if has_header:
        columns = rows[0][1]
        rows = rows[1:]
    else:
        columns = [f"column {i + 1}" for i in range(width)]
    if not rows:
        raise UserError(f"{path} has a header but no data rows; add rows of numbers")

    label_idx = None
    if label_column is not None:
        if isinstance(label_column, str) and label_column in columns:
            label_idx = columns.index(label_column)
        elif (isinstance(label_column, int) and not isinstance(label_column, bool)
              and 0 <= label_column < width):
            label_idx = label_column
        else:
            raise UserError(f"label_column {label_column!r} is not a column of {path}; "
                            f"choose one of {columns} (or a 0-based index)")
    feature_idx = [i for i in range(width) if i != label_idx]
    if not feature_idx:
        raise UserError(f"{path} has no numeric columns besides the label column; add data")

    values = np.empty((len(rows), len(feature_idx)), dtype=np.float64)
    labels = []
    for r, (line, row) in enumerate(rows):
        if len(row) != width:
            raise UserError(f"{path}, line {line} has {len(row)} cells but the table has "
                            f"{width} columns; fix that row (or pass delimiter=)")
        for j, i in enumerate(feature_idx):
            cell = row[i]
            where = f"{path}, line {line}, column {columns[i]!r}"
            if cell == "":
                raise UserError(f"{where} is empty (a missing value); fill it or drop the row")
            try:
                v = float(cell)
            except ValueError:
                raise UserError(f"{where}: {cell!r} is not a number; tables must be numeric "
                                "(name a class column with label_column=)") from None
            if not math.isfinite(v):
                raise UserError(f"{where} is {cell!r}; remove or fill non-finite values")
            values[r, j] = v
        if label_idx is not None:
            if row[label_idx] == "":
                raise UserError(f"{path}, line {line}: the label cell is empty; give every row "
                                "a label")
            labels.append(row[label_idx])
    cond, num_classes, class_names = None, 0, None
    if label_idx is not None:
        raw = np.array(labels)
        try:
            as_int = np.array([int(v) for v in labels], dtype=np.int64)
            raw = as_int
        except ValueError:
            pass
        cond, num_classes, class_names = _encode_labels(raw, f"column {columns[label_idx]!r}")
    xt, shift, scale = _standardize(values, standardize)
    return Dataset(xt, cond, num_classes, "tabular", path.stem, class_names, shift, scale)
