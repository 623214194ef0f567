"""Checkpoints: exact round trip, atomic writes, rotation, clear errors, no pickle."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tiltflow import checkpoint as ck
from tiltflow.errors import UserError


def _trained_parts(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 8), nn.SiLU(), nn.Linear(8, 3))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    for _ in range(3):
        net(torch.randn(4, 3)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    ema = nn.Sequential(nn.Linear(3, 8), nn.SiLU(), nn.Linear(8, 3))
    return net, ema, opt


def _save(run, step, net, ema, opt, **kw):
    return ck.save_checkpoint(run, step, model=net, ema=ema, optimizer=opt,
                              rng={"global": ck.capture_rng()},
                              data_position={"epoch": 2, "index": 17, "seed": 5},
                              config={"train": {"lr": 1e-2}}, metrics={"loss": 0.5}, **kw)


def _equal_nested(a, b):
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(
            _equal_nested(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(
            _equal_nested(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_round_trip_model_ema_optimizer_rng(tmp_path):
    net, ema, opt = _trained_parts()
    gen = torch.Generator().manual_seed(3)
    torch.randn(5, generator=gen)
    torch.manual_seed(11)
    np.random.seed(12)
    random.seed(13)
    rng = ck.capture_rng()
    path = ck.save_checkpoint(tmp_path, 7, model=net, ema=ema, optimizer=opt,
                              rng={"global": rng, "objective": ck.generator_state(gen)},
                              data_position={"epoch": 1, "index": 3, "seed": 0},
                              config={"train": {"lr": 0.01}}, metrics={"loss": 1.25})
    assert path == tmp_path / "step_000007"
    expected = (torch.rand(3), np.random.rand(3), random.random(), torch.randn(4, generator=gen))

    loaded = ck.load_checkpoint(tmp_path)  # run dir -> latest
    assert loaded.step == 7 and loaded.path == path
    assert _equal_nested(loaded.model, net.state_dict())
    assert _equal_nested(loaded.ema, ema.state_dict())
    assert _equal_nested(loaded.optimizer, opt.state_dict())  # int keys, tuples, tensors exact
    assert loaded.data_position == {"epoch": 1, "index": 3, "seed": 0}
    assert loaded.config == {"train": {"lr": 0.01}} and loaded.metrics == {"loss": 1.25}

    # RNG: restoring reproduces the exact draws that followed the save.
    torch.manual_seed(999)
    np.random.seed(999)
    random.seed(999)
    ck.restore_rng(loaded.rng["global"])
    gen2 = torch.Generator()
    ck.set_generator_state(gen2, loaded.rng["objective"])
    again = (torch.rand(3), np.random.rand(3), random.random(), torch.randn(4, generator=gen2))
    assert torch.equal(again[0], expected[0]) and np.array_equal(again[1], expected[1])
    assert again[2] == expected[2] and torch.equal(again[3], expected[3])

    # A fresh optimizer loaded from the checkpoint takes the same next step.
    net2, _, _ = _trained_parts(seed=1)
    net2.load_state_dict(loaded.model)
    opt2 = torch.optim.AdamW(net2.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    opt2.load_state_dict(loaded.optimizer)
    x = torch.randn(4, 3)
    for n, o in ((net, opt), (net2, opt2)):
        n(x).square().mean().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), net2.parameters(), strict=True))


def test_tied_weights_and_nested_structures(tmp_path):
    lin = nn.Linear(4, 4)
    tied = nn.ModuleDict({"a": lin, "b": lin})  # same tensors under two names
    skeleton_in = {"state": {0: {"x": torch.arange(3)}, 1: {}},
                   "groups": [{"betas": (0.9, 0.99), "nan": float("nan"), "none": None}]}
    tensors, skeleton = ck.flatten_state(skeleton_in)
    json.dumps(skeleton)  # JSON-able
    back = ck.unflatten_state(json.loads(json.dumps(skeleton)), tensors)
    assert back["groups"][0]["betas"] == (0.9, 0.99) and back["groups"][0]["none"] is None
    assert np.isnan(back["groups"][0]["nan"])
    assert torch.equal(back["state"][0]["x"], torch.arange(3))
    assert set(back["state"]) == {0, 1}
    ck.save_checkpoint(tmp_path, 1, model=tied)
    loaded = ck.load_checkpoint(tmp_path / "step_000001")
    assert torch.equal(loaded.model["a.weight"], loaded.model["b.weight"])
    assert loaded.ema is None and loaded.optimizer is None


def test_crash_mid_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    net, ema, opt = _trained_parts()
    first = _save(tmp_path, 10, net, ema, opt)
    real_write = ck._write_file
    calls = {"n": 0}

    def failing_write(path, data):
        calls["n"] += 1
        if calls["n"] == 3:  # after model + ema were written, before the optimizer
            raise OSError("disk full (simulated)")
        return real_write(path, data)

    monkeypatch.setattr(ck, "_write_file", failing_write)
    with pytest.raises(OSError, match="simulated"):
        _save(tmp_path, 20, net, ema, opt)
    monkeypatch.setattr(ck, "_write_file", real_write)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["latest", "step_000010"]  # no partial step dir, no temp dir left
    assert (tmp_path / "latest").read_text().strip() == "step_000010"
    assert ck.find_latest(tmp_path) == first
    assert ck.load_checkpoint(tmp_path).step == 10

    # A process killed mid-write leaves a hidden temp dir: ignored, then cleaned by the next save.
    (tmp_path / ".tmp_step_000030_deadbeef").mkdir()
    assert ck.find_latest(tmp_path) == first
    _save(tmp_path, 40, net, ema, opt)
    assert not list(tmp_path.glob(".tmp_*"))


def test_rotation_keeps_the_newest(tmp_path):
    net, ema, opt = _trained_parts()
    for step in (1, 2, 3, 4, 5):
        _save(tmp_path, step, net, ema, opt, keep=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_000004", "step_000005"]
    assert ck.load_checkpoint(tmp_path).step == 5
    # re-saving an existing step replaces it atomically
    _save(tmp_path, 5, net, ema, opt, keep=2)
    assert ck.load_checkpoint(tmp_path).step == 5


def test_missing_and_corrupt_files_raise_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        ck.load_checkpoint(tmp_path / "nope")
    with pytest.raises(UserError, match="no checkpoint"):
        ck.load_checkpoint(tmp_path)
    assert ck.find_latest(tmp_path) is None

    net, ema, opt = _trained_parts()
    path = _save(tmp_path, 3, net, ema, opt)

    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:-7] + b"garbage")  # flipped payload bytes
    with pytest.raises(UserError, match="corrupt"):
        ck.load_checkpoint(path)
    (path / "model.safetensors").write_bytes(b"\x00" * 5)  # truncated header, no hash to check
    state = json.loads((path / "state.json").read_text())
    state["files"].pop("model.safetensors")
    (path / "state.json").write_text(json.dumps(state))
    with pytest.raises(UserError, match="corrupt"):
        ck.load_checkpoint(path)

    (path / "model.safetensors").unlink()
    with pytest.raises(UserError, match="missing"):
        ck.load_checkpoint(path)

    (path / "state.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        ck.load_checkpoint(path)

    # a stale `latest` pointer falls back to the newest step dir
    (tmp_path / "latest").write_text("step_999999\n")
    assert ck.find_latest(tmp_path) == path


def test_no_pickle_anywhere(tmp_path, monkeypatch):
    import pickle

    net, ema, opt = _trained_parts()
    _save(tmp_path, 1, net, ema, opt)

    def forbidden(*a, **k):
        raise AssertionError("checkpoint code must not unpickle")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    ck.load_checkpoint(tmp_path)
    for f in (tmp_path / "step_000001").iterdir():
        head = f.read_bytes()[:2]
        assert head != b"\x80\x04" and head != b"\x80\x02", f"{f.name} looks pickled"
    source = Path(ck.__file__).read_text()
    assert "import pickle" not in source and "torch.load(" not in source


def test_load_weights_names_the_file_the_tensor_and_the_shapes():
    """Weights that do not fit the module: one-line UserErrors instead of load_state_dict's
    multi-line RuntimeError, and non-finite values refused."""
    net = nn.Linear(3, 2)
    good = {k: v.clone() for k, v in net.state_dict().items()}
    cases = [
        ({**good, "weight": torch.zeros(2, 4)}, "tensor 'weight' has shape [2, 4], the network "
                                                "expects [2, 3]"),
        ({"weight": good["weight"]}, "lacks tensor 'bias' (shape [2])"),
        ({**good, "extra": torch.zeros(1)}, "holds tensor 'extra' (shape [1])"),
        ({**good, "bias": torch.tensor([0.0, float("nan")])}, "tensor 'bias' holds 1 NaN/inf"),
        ({**good, "weight": torch.full((2, 3), float("inf"))}, "holds 6 NaN/inf"),
    ]
    for state, needle in cases:
        with pytest.raises(UserError) as e:
            ck.load_weights(net, state, "run/step_000001/ema.safetensors")
        msg = str(e.value)
        assert "'run/step_000001/ema.safetensors'" in msg and needle in msg and "\n" not in msg
    ck.load_weights(net, {k: v + 1 for k, v in good.items()}, "file")
    assert torch.equal(net.bias, good["bias"] + 1)
    ck.check_finite({"step": torch.tensor(3), "x": torch.ones(2)}, "file")  # ints: nothing to check


def test_clean_temporaries_touches_only_this_layouts_names(tmp_path):
    """A killed write's ``.tmp_step_*`` / ``.latest.*.tmp`` go; a ``.tmp_old_*`` copy whose step
    directory is missing (killed between the two renames of a re-save) comes back; other names
    stay."""
    net, ema, opt = _trained_parts()
    _save(tmp_path, 10, net, ema, opt)
    (tmp_path / ".tmp_step_000020_0123abcd").mkdir()
    (tmp_path / ".latest.89abcdef.tmp").write_text("step_000020\n")
    (tmp_path / ".tmp_old_step_000010_fedcba98").mkdir()  # step_000010 exists: a stale copy
    # step_000030 is missing: this complete copy is what a killed re-save left, restore it
    shutil.copytree(tmp_path / "step_000010", tmp_path / ".tmp_old_step_000030_00000000")
    keep = [".tmp_step_x", ".tmp_step_000020_dead", ".tmp_notes", "my.tmp"]
    for name in keep:
        (tmp_path / name).mkdir()
    removed = ck.clean_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".latest.89abcdef.tmp",
                                               ".tmp_old_step_000010_fedcba98",
                                               ".tmp_step_000020_0123abcd"]
    assert (tmp_path / "step_000030" / "state.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*keep, "latest", "step_000010", "step_000030"])
    assert ck.find_latest(tmp_path).name == "step_000010"  # the pointer still rules
    assert ck.clean_temporaries(tmp_path / "missing") == []
