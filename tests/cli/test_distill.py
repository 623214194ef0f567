"""``tiltflow distill``: a student from a trained run and from an exact mixture, sampled by
``tiltflow sample``; bad input is one line with exit 2."""

import numpy as np
import pytest
from cli_run import run

from tiltflow.cli import main

TINY = ["data=eight_gaussians", "data.n=512", "model.hidden=32", "model.depth=1",
        "train.steps=4", "train.batch_size=64", "train.log_every=2", "train.warmup_steps=0"]
FAST = ["--set", "steps=4", "--set", "batch_size=32", "--set", "num_data=64",
        "--set", "log_every=2", "--set", "teacher_nfe=5"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    assert main(["train", *TINY, f"train.out_dir={out}"]) == 0
    return out


def test_distill_a_trained_run_then_sample_it(teacher_run, tmp_path, capsys):
    out = tmp_path / "student"
    code, text, err = run(["distill", "--method", "reflow", "--teacher", str(teacher_run),
                           "--out", str(out), *FAST], capsys)
    assert code == 0, err
    assert "tiltflow sample" in text
    prefix = tmp_path / "s"
    code, _, err = run(["sample", str(out), "--nfe", "2", "--num", "10", "--out", str(prefix)],
                       capsys)
    assert code == 0, err
    x = np.load(prefix.with_suffix(".npy"))
    assert x.shape == (10, 2) and np.isfinite(x).all()
    # resume of a finished distillation: nothing to redo, same student
    code, _, err = run(["distill", "--method", "reflow", "--teacher", str(teacher_run),
                        "--out", str(out), "--resume", *FAST], capsys)
    assert code == 0, err


def test_distill_an_exact_mixture(tmp_path, capsys):
    out = tmp_path / "cd"
    code, _, err = run(["distill", "--method", "consistency_distillation", "--teacher",
                        "analytic:eight_gaussians", "--out", str(out), *FAST,
                        "--set", "scales=4"], capsys)
    assert code == 0, err
    code, _, err = run(["sample", str(out), "--nfe", "3", "--num", "5", "--out",
                        str(tmp_path / "s")], capsys)
    assert code == 0, err
    code, _, err = run(["sample", str(out), "--nfe", "99", "--num", "5", "--out",
                        str(tmp_path / "s")], capsys)
    assert code == 2 and "nfe 1..8, got 99" in err
    code, _, err = run(["sample", str(out), "--solver", "euler", "--out", str(tmp_path / "s")],
                       capsys)
    assert code == 2 and "own sampler" in err


def test_list_methods(capsys):
    code, out, _ = run(["distill", "--list-methods"], capsys)
    assert code == 0
    for name in ("reflow", "progressive_distillation", "consistency_distillation",
                 "consistency_training", "shortcut", "meanflow"):
        assert name in out


@pytest.mark.parametrize("args, needle", [
    (["--method", "nope", "--teacher", "analytic:eight_gaussians"], "unknown few-step method"),
    (["--method", "reflow", "--teacher", "/no/such/run"], "does not exist"),
    (["--method", "reflow", "--teacher", "analytic:nosuchbed"], "nosuchbed"),
    (["--method", "reflow", "--teacher", "analytic:eight_gaussians", "--set", "stepz=1"],
     "unknown config key"),
    (["--method", "reflow", "--teacher", "analytic:eight_gaussians", "--set", "steps=0"],
     "positive integer"),
    (["--method", "reflow", "--teacher", "analytic:eight_gaussians", "--data", "digits"],
     "shape"),
    (["--teacher", "analytic:eight_gaussians"], "--method is required"),
])
def test_bad_input_is_one_line_exit_2(args, needle, tmp_path, capsys):
    code, _, err = run(["distill", *args, "--out", str(tmp_path / "o")], capsys)
    assert code == 2, err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()  # nothing half-written
