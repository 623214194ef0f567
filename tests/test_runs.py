"""runs: a run config builds the same network every time, and a checkpoint that disagrees
with its own config is one clear error naming the file."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tiltflow.config import load_config
from tiltflow.errors import UserError
from tiltflow.runs import build_run, load_trained

SMALL = ["data=eight_gaussians", "data.n=64", "model.hidden=16", "model.depth=1"]


def _weights(cfg):
    return {k: v.clone() for k, v in build_run(cfg)[1].state_dict().items()}


def test_build_run_draws_the_initial_weights_from_train_seed():
    """Same config, same network (so an interrupted and an uninterrupted run can be compared
    bit for bit); another seed, another network; the global RNG is left as it was."""
    cfg = load_config(None, SMALL)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, b = _weights(cfg), _weights(cfg)
    assert torch.equal(torch.rand(3), expected_next)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = _weights(load_config(None, [*SMALL, "train.seed=1"]))
    assert any(not torch.equal(a[k], c[k]) for k in a)


def _edit_state(run_dir, edit):
    step = run_dir / (run_dir / "latest").read_text().strip()
    state = json.loads((step / "state.json").read_text())
    edit(state)
    (step / "state.json").write_text(json.dumps(state))
    return step / "state.json"


@pytest.mark.parametrize("edit,needle", [
    (lambda s: s["config"]["run"]["data"].pop("shape"), "lacks run.data.shape"),
    (lambda s: s["config"]["run"]["data"].update(shape="abc"), "run.data.shape must be"),
    (lambda s: s["config"]["run"]["data"].update(num_classes=-1), "run.data.num_classes"),
    (lambda s: s["config"].pop("run"), "has no run config"),
    (lambda s: s["config"]["run"]["config"].update(model={"name": "resnet"}),
     "does not build a model"),
    (lambda s: s["config"]["run"]["config"].update(model={"hidden": 64, "depth": 1}),
     "has shape"),
])
def test_load_trained_names_the_file_and_the_key(tiny_run, tmp_path, edit, needle):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    state_path = _edit_state(run_dir, edit)
    with pytest.raises(UserError) as e:
        load_trained(run_dir)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg
    named = "ema.safetensors" if needle == "has shape" else str(state_path)  # EMA: what samples
    assert named.split("/")[-1] in msg
