"""Run configs: YAML + key=value overrides, key checking with suggestions, value validation."""

from __future__ import annotations

import pytest

from tiltflow.config import TrainConfig, load_config, parse_value
from tiltflow.errors import UserError


def test_overrides_parse_as_yaml_scalars(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {name: mlp, hidden: 64}\ndata: {name: eight_gaussians, n: 5000}\n"
                    "train: {steps: 100, lr: 1e-3}\n")
    cfg = load_config(path, ["train.lr=3e-4", "model.hidden=128", "data=moons",
                             "train.betas=[0.9, 0.99]", "train.ema_warmup=false",
                             "train.mixed_precision=no", "objective.name=flow_matching",
                             "model.depth=3"])
    assert cfg["train"]["lr"] == 3e-4 and isinstance(cfg["train"]["lr"], float)
    assert cfg["train"]["steps"] == 100 and cfg["train"]["betas"] == [0.9, 0.99]
    assert cfg["train"]["ema_warmup"] is False and cfg["train"]["mixed_precision"] == "no"
    assert cfg["model"] == {"name": "mlp", "hidden": 128, "depth": 3}
    assert cfg["data"] == {"name": "moons", "n": 5000}  # switched dataset, options kept
    assert cfg["objective"] == {"name": "flow_matching"}
    assert TrainConfig.from_dict(cfg["train"]).betas == (0.9, 0.99)
    # every TrainConfig field is filled in
    assert set(cfg["train"]) == set(TrainConfig().to_dict())

    assert parse_value("1e-4") == 1e-4 and parse_value("128") == 128
    assert parse_value("true") is True and parse_value("moons") == "moons"
    cfg = load_config({"data": "moons"}, ["data.n=10"])
    assert cfg["data"] == {"name": "moons", "n": 10}


def test_unknown_keys_suggest_close_matches(tmp_path):
    with pytest.raises(UserError, match=r"did you mean 'train.lr'\?.*train.batch_size"):
        load_config({}, ["train.lrr=1"])
    with pytest.raises(UserError, match=r"did you mean 'train.warmup_steps'"):
        load_config({"train": {"warmup_step": 3}})
    with pytest.raises(UserError, match=r"did you mean 'model'"):
        load_config({}, ["modle.hidden=3"])
    path = tmp_path / "bad.yaml"
    path.write_text("trian: {steps: 3}\n")
    with pytest.raises(UserError, match=r"did you mean 'train'"):
        load_config(path)
    with pytest.raises(UserError, match="not key=value"):
        load_config({}, ["train.lr"])
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("train: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(path)


@pytest.mark.parametrize("override, message", [
    ("train.steps=0", "train.steps must be a positive integer"),
    ("train.steps=1.5", "train.steps must be a positive integer"),
    ("train.batch_size=-4", "train.batch_size must be a positive integer"),
    ("train.ema_decay=1", r"train.ema_decay must be in \[0, 1\)"),
    ("train.ema_decay=-0.1", r"train.ema_decay must be in"),
    ("train.lr=0", r"train.lr must be in \(0"),
    ("train.lr=fast", "train.lr must be a number"),
    ("train.grad_clip=-1", "train.grad_clip must be in"),
    ("train.betas=[0.9]", "train.betas must be two numbers"),
    ("train.betas=[0.9, 1.0]", r"train.betas must both lie in \[0, 1\)"),
    ("train.mixed_precision=fp8", "train.mixed_precision must be 'no', 'bf16' or 'fp16'"),
    ("train.lr_schedule=linear", "train.lr_schedule must be 'constant' or 'cosine'"),
    ("train.compile=maybe", "train.compile must be true, false or 'auto'"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints must be a positive integer"),
])
def test_validation_errors(override, message):
    with pytest.raises(UserError, match=message):
        load_config({}, [override])


def test_defaults_are_valid_and_coerced():
    cfg = TrainConfig(lr="2e-4", steps=10.0, mixed_precision=False)
    assert cfg.lr == 2e-4 and cfg.steps == 10 and cfg.mixed_precision == "no"
    assert TrainConfig().to_dict()["betas"] == [0.9, 0.999]
