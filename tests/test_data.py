"""Datasets: built-in sets, user data round trips, and every bad-input error."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tiltflow import data
from tiltflow.errors import UserError

TWO_D = ["eight_gaussians", "moons", "checkerboard", "rings", "spirals"]


def test_available():
    assert data.available() == [*TWO_D, "digits"]


@pytest.mark.parametrize("name", TWO_D)
def test_2d_shapes_determinism_and_range(name):
    a = data.make_2d(name, 2000, seed=3)
    assert a.shape == (2000, 2) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, data.make_2d(name, 2000, seed=3))
    assert not torch.equal(a, data.make_2d(name, 2000, seed=4))
    # every set lives in [-4, 4]^2 plus Gaussian noise of std <= 0.5 (eight_gaussians); 6 std
    # (a per-coordinate tail of 1e-9, over 4000 coordinates) reach 4 + 6 * 0.5 = 7
    assert a.abs().max() < 7
    ds = data.load_dataset(name, n=500, seed=3)
    assert len(ds) == 500 and ds.shape == (2,)
    assert ds.kind == "tabular" and ds.cond is None and ds.num_classes == 0
    assert torch.equal(ds.x, data.make_2d(name, 500, seed=3))
    assert torch.equal(ds.denormalize(ds.x), ds.x)  # natural coordinates
    assert len(data.load_dataset(name)) == data.DEFAULT_N_2D


def test_eight_gaussians_matches_the_mixture():
    """Each point's nearest mean on the radius-4 circle; residuals are N(0, 0.5^2 I)."""
    n = 20000
    x = data.make_2d("eight_gaussians", n, seed=0).double()
    angles = torch.arange(8, dtype=torch.float64) * 2 * math.pi / 8
    means = 4 * torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    k = torch.cdist(x, means).argmin(1)  # neighbouring means are 3.06 = 6 std apart
    r = x - means[k]
    counts = torch.bincount(k, minlength=8).double() / n
    assert (counts - 1 / 8).abs().max() < 5 * math.sqrt(1 / 8 * 7 / 8 / n)  # 5 binomial SE
    assert r.mean(0).abs().max() < 5 * 0.5 / math.sqrt(n)  # 5 SE of a mean of N(0, 0.5^2)
    # var of a sample variance of N(0, s^2) is 2 s^4 / n
    assert (r.var(0) - 0.25).abs().max() < 5 * 0.25 * math.sqrt(2 / n)


def test_2d_supports():
    board = data.make_2d("checkerboard", 4000, seed=1)
    cells = torch.floor((board + 4) / 2).long()  # 0..3 in each axis
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all() and board.abs().max() <= 4
    rings = data.make_2d("rings", 4000, seed=1).norm(dim=1)
    assert (rings - rings.round()).abs().max() < 0.5 and rings.round().unique().tolist() == [
        1.0, 2.0, 3.0, 4.0]


def test_digits_labels_and_splits():
    train = data.load_dataset("digits")
    test = data.load_dataset("digits", split="test")
    assert len(train) == 1437 and len(test) == 360
    assert train.shape == (1, 8, 8) and train.kind == "image" and train.num_classes == 10
    assert train.class_names == [str(i) for i in range(10)]
    assert train.cond.dtype == torch.long and set(train.cond.tolist()) == set(range(10))
    assert train.x.min() == -1 and train.x.max() == 1
    x, y = data.digits_arrays("train")
    assert torch.equal(train.x, x) and torch.equal(train.cond, y)
    # user units are scikit-learn's 0..16 intensities
    from sklearn.datasets import load_digits

    everything = data.load_dataset("digits", split="all")
    torch.testing.assert_close(everything.denormalize(everything.x)[:, 0],
                               torch.tensor(load_digits().images, dtype=torch.float32))
    assert train.to_uint8(train.x).dtype == torch.uint8
    sub = data.load_dataset("digits", n=100, seed=5)
    assert len(sub) == 100 and torch.equal(sub.x, data.load_dataset("digits", n=100, seed=5).x)


def test_to_uint8():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0])
    assert data.to_uint8(x).tolist() == [0, 0, 128, 255, 255]


# -- user data ---------------------------------------------------------------------------------
def _write_png(path, array):
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def test_image_folder_grey_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    imgs = {}
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            a = rng.integers(0, 256, (8, 6))  # H=8, W=6
            _write_png(tmp_path / cls / f"{i}.png", a)
            imgs[(cls, i)] = a
    ds = data.load_dataset(tmp_path)
    assert ds.kind == "image" and ds.shape == (1, 8, 6) and len(ds) == 6
    assert ds.num_classes == 2 and ds.class_names == ["cat", "dog"]
    assert ds.cond.tolist() == [0, 0, 0, 1, 1, 1]
    back = ds.denormalize(ds.x)
    torch.testing.assert_close(back[4, 0], torch.tensor(imgs[("dog", 1)], dtype=torch.float32),
                               atol=1e-4, rtol=0)
    assert torch.equal(ds.to_uint8(ds.x)[0, 0], torch.tensor(imgs[("cat", 0)], dtype=torch.uint8))
    flat = data.load_dataset(tmp_path, labels=False)
    assert flat.cond is None and len(flat) == 6


def test_image_folder_rgb(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (16, 16, 3))
    _write_png(tmp_path / "a.png", rgb)
    Image.fromarray(rng.integers(0, 256, (16, 16)).astype(np.uint8)).save(tmp_path / "b.jpg")
    ds = data.load_dataset(tmp_path)
    assert ds.shape == (3, 16, 16) and ds.cond is None and ds.x.min() >= -1 and ds.x.max() <= 1
    assert torch.equal(ds.to_uint8(ds.x)[0], torch.tensor(rgb, dtype=torch.uint8).permute(2, 0, 1))
    # the grey JPEG is replicated over the 3 channels
    assert torch.equal(ds.x[1, 0], ds.x[1, 1]) and torch.equal(ds.x[1, 0], ds.x[1, 2])


def test_npy_tabular_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.normal([1.0, -50.0, 3.0], [0.1, 20.0, 0.0], size=(200, 3))  # one constant column
    np.save(tmp_path / "t.npy", x)
    ds = data.load_dataset(tmp_path / "t.npy")
    assert ds.kind == "tabular" and ds.shape == (3,) and ds.cond is None
    # float32 storage: standardised values (|z| <~ 4) carry ~eps_32 * 4 = 5e-7, user units (up to
    # ~110) ~eps_32 * 110 = 1.3e-5; the tolerances below are ~10x those
    torch.testing.assert_close(ds.x[:, :2].mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(ds.x[:, :2].std(0, unbiased=False), torch.ones(2), atol=1e-5,
                               rtol=0)
    assert torch.isfinite(ds.x).all()  # the zero-variance column is only shifted
    torch.testing.assert_close(ds.denormalize(ds.x).double(), torch.from_numpy(x),
                               atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ds.normalize(ds.denormalize(ds.x)), ds.x, atol=1e-5, rtol=1e-5)
    raw = data.load_dataset(tmp_path / "t.npy", standardize=False)
    torch.testing.assert_close(raw.x.double(), torch.from_numpy(x), atol=1e-4, rtol=1e-6)


@pytest.mark.parametrize(
    "shape,layout,expect",
    [((4, 5, 6), "nhw", (1, 5, 6)), ((4, 3, 8, 8), "nchw", (3, 8, 8)),
     ((4, 8, 8, 3), "nhwc", (3, 8, 8))],
)
def test_npz_images_with_labels(tmp_path, shape, layout, expect):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, shape).astype(np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([2, 0, 1, 2]))
    ds = data.load_dataset(tmp_path / "d.npz")
    assert ds.kind == "image" and ds.shape == expect and ds.num_classes == 3
    assert ds.cond.tolist() == [2, 0, 1, 2] and ds.x.min() >= -1 and ds.x.max() <= 1
    ref = torch.from_numpy(x).float()
    if layout == "nhw":
        ref = ref[:, None]
    elif layout == "nhwc":
        ref = ref.permute(0, 3, 1, 2)
    torch.testing.assert_close(ds.denormalize(ds.x), ref, atol=1e-4, rtol=0)


def test_npz_value_ranges_and_string_labels(tmp_path):
    rng = np.random.default_rng(4)
    unit = rng.uniform(0, 1, (6, 1, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "u.npz", images=unit, labels=np.array(["b", "a", "b", "c", "a", "a"]))
    ds = data.load_dataset(tmp_path / "u.npz")
    assert ds.class_names == ["a", "b", "c"] and ds.cond.tolist() == [1, 0, 1, 2, 0, 0]
    torch.testing.assert_close(ds.x, torch.from_numpy(unit) * 2 - 1)
    wide = rng.uniform(-7, 9, (6, 1, 4, 4))
    np.save(tmp_path / "w.npy", wide)
    ds = data.load_dataset(tmp_path / "w.npy")
    assert ds.x.min() == -1 and ds.x.max() == 1
    torch.testing.assert_close(ds.denormalize(ds.x).double(), torch.from_numpy(wide), atol=1e-5,
                               rtol=1e-5)
    ds = data.load_dataset(tmp_path / "w.npy", value_range=(-10, 10))
    torch.testing.assert_close(ds.x.double(), torch.from_numpy(wide) / 10, atol=1e-6, rtol=1e-6)


def test_csv_round_trip_with_header_and_labels(tmp_path):
    p = tmp_path / "table.csv"
    p.write_text("a, b ,kind,c\n1.5,2,x,-1\n2.5,4,y,0\n\n3.5,9,x,1e3\n")
    ds = data.load_dataset(p, label_column="kind")
    assert ds.kind == "tabular" and ds.shape == (3,) and len(ds) == 3
    assert ds.class_names == ["x", "y"] and ds.cond.tolist() == [0, 1, 0]
    expect = torch.tensor([[1.5, 2, -1], [2.5, 4, 0], [3.5, 9, 1e3]])
    # float32 round trip: error ~ eps_32 (1.2e-7) x column magnitude (up to 1e3)
    torch.testing.assert_close(ds.denormalize(ds.x), expect, atol=4 * 1.2e-7 * 1e3, rtol=1e-6)
    torch.testing.assert_close(ds.x.mean(0), torch.zeros(3), atol=1e-6, rtol=0)
    # no header, integer labels by index, and a subset
    q = tmp_path / "plain.csv"
    q.write_text("0,1.0,2.0\n1,3.0,4.0\n3,5.0,6.0\n")
    ds = data.load_dataset(q, label_column=0, standardize=False)
    assert ds.num_classes == 4 and ds.cond.tolist() == [0, 1, 3]
    assert torch.equal(ds.x, torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    assert len(data.load_dataset(q, n=2)) == 2


# -- bad input: every case is a one-line UserError, and nothing is written ---------------------
def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, fs in os.walk(root) for f in fs)


def _bad_cases(tmp):
    """(path or name, options, regex the message must match)."""
    cases = []
    cases.append((tmp / "missing.npz", {}, "no such dataset or file.*missing.npz"))
    cases.append(("mnist", {}, "no such dataset.*'mnist'.*eight_gaussians"))
    empty = tmp / "empty_dir"
    empty.mkdir()
    cases.append((empty, {}, "no images.*empty_dir"))
    mixed = tmp / "mixed"
    mixed.mkdir()
    _write_png(mixed / "a.png", np.zeros((8, 8)))
    _write_png(mixed / "b.png", np.zeros((16, 12)))
    cases.append((mixed, {}, r"same size.*a\.png is 8x8.*b\.png is 12x16"))
    corrupt = tmp / "corrupt"
    corrupt.mkdir()
    _write_png(corrupt / "ok.png", np.zeros((8, 8)))
    (corrupt / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    cases.append((corrupt, {}, r"cannot read image .*bad\.png"))
    both = tmp / "both"
    (both / "cls").mkdir(parents=True)
    _write_png(both / "cls" / "a.png", np.zeros((8, 8)))
    _write_png(both / "top.png", np.zeros((8, 8)))
    cases.append((both, {}, "both at the top level"))
    (tmp / "junk.npy").write_bytes(b"definitely not numpy")
    cases.append((tmp / "junk.npy", {}, r"junk\.npy is not a NumPy \.npy"))
    (tmp / "junk.npz").write_bytes(b"PK not a zip")
    cases.append((tmp / "junk.npz", {}, r"junk\.npz is not a NumPy \.npz"))
    np.save(tmp / "cut.npy", np.zeros((50, 4)))
    (tmp / "cut.npy").write_bytes((tmp / "cut.npy").read_bytes()[:200])  # truncated
    cases.append((tmp / "cut.npy", {}, r"cannot read .*cut\.npy"))
    np.save(tmp / "obj.npy", np.array([{"a": 1}, None], dtype=object))
    cases.append((tmp / "obj.npy", {}, "pickled Python objects"))
    np.save(tmp / "nan.npy", np.array([[1.0, 2.0], [3.0, np.nan]]))
    cases.append((tmp / "nan.npy", {}, r"non-finite.*\[1, 1\]"))
    np.save(tmp / "zero.npy", np.zeros((0, 3)))
    cases.append((tmp / "zero.npy", {}, "no examples"))
    np.savez(tmp / "many.npz", a=np.zeros((2, 2)), b=np.zeros((2, 2)))
    cases.append((tmp / "many.npz", {}, "several arrays.*'x'"))
    np.savez(tmp / "badlab.npz", x=np.zeros((3, 2)), y=np.array([0, 1]))
    cases.append((tmp / "badlab.npz", {}, "one label per example"))
    np.savez(tmp / "neglab.npz", x=np.zeros((2, 2)), y=np.array([0, -1]))
    cases.append((tmp / "neglab.npz", {}, "non-negative"))
    (tmp / "empty.csv").write_text("")
    cases.append((tmp / "empty.csv", {}, "is empty"))
    (tmp / "header_only.csv").write_text("a,b\n")
    cases.append((tmp / "header_only.csv", {}, "no data rows"))
    (tmp / "nan.csv").write_text("a,b\n1,2\n3,nan\n")
    cases.append((tmp / "nan.csv", {}, "line 3, column 'b' is 'nan'"))
    (tmp / "inf.csv").write_text("a,b\n1,-inf\n")
    cases.append((tmp / "inf.csv", {}, "line 2, column 'b' is '-inf'"))
    (tmp / "text.csv").write_text("a,b\n1,2\n3,abc\n")
    cases.append((tmp / "text.csv", {}, "line 3, column 'b': 'abc' is not a number"))
    (tmp / "hole.csv").write_text("a,b\n1,\n")
    cases.append((tmp / "hole.csv", {}, "line 2, column 'b' is empty"))
    (tmp / "ragged.csv").write_text("a,b\n1,2\n3\n")
    cases.append((tmp / "ragged.csv", {}, "line 3 has 1 cells"))
    (tmp / "ok.csv").write_text("a,b\n1,2\n")
    cases.append((tmp / "ok.csv", {"label_column": "c"}, "label_column 'c'.*'a', 'b'"))
    cases.append((tmp / "ok.csv", {"lables": "a"}, "unknown option.*lables.*label_column"))
    cases.append((tmp / "ok.csv", {}, "n=5.*only 1", 5))
    (tmp / "data.xlsx").write_bytes(b"x")
    cases.append((tmp / "data.xlsx", {}, "unsupported file type '.xlsx'"))
    cases.append(("moons", {"split": "test"}, "unknown option.*split"))
    cases.append(("digits", {"split": "val"}, "digits split"))
    cases.append(("moons", {}, "n must be a positive integer", 0))
    return cases


def test_bad_inputs_raise_user_errors_and_write_nothing(tmp_path):
    cases = _bad_cases(tmp_path)
    before = _files(tmp_path)
    for spec, options, pattern, *n in cases:
        with pytest.raises(UserError, match=pattern) as info:
            data.load_dataset(spec, n=n[0] if n else None, **options)
        msg = str(info.value)
        assert "\n" not in msg and len(msg) < 400, msg
        # every message says how to fix it
        fix_words = ("pass", "add", "use", "save", "fill", "remove", "resize", "choose", "move",
                     "re-save", "renumber", "give", "fix", "keep", "valid", "must", "check")
        assert any(w in msg for w in fix_words), msg
    assert _files(tmp_path) == before


def test_make_2d_errors():
    with pytest.raises(UserError, match="unknown 2-D dataset"):
        data.make_2d("swissroll", 10)
    with pytest.raises(UserError, match="positive integer"):
        data.make_2d("moons", -1)


def test_dataset_validation():
    with pytest.raises(ValueError, match="4 dims"):
        data.Dataset(torch.zeros(3, 2), kind="image")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        data.Dataset(torch.zeros(3, 2), torch.tensor([0, 1, 2]), 2)
    ds = data.Dataset(torch.zeros(3, 2), torch.tensor([0, 1, 1]), 2)
    b = ds.batch(torch.tensor([0, 2]))
    assert b["x"].shape == (2, 2) and b["cond"].tolist() == [0, 1]
    with pytest.raises(ValueError, match="image data"):
        ds.to_uint8(ds.x)


def test_a_2d_set_too_large_for_the_machine_is_refused_before_it_is_drawn():
    with pytest.raises(UserError, match=r"n=1000000000000 needs about 64\.0 TB of memory"):
        data.load_dataset("moons", n=10**12)
