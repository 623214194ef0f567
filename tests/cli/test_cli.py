"""The command line: an end-to-end train -> sample run, and bad input for every command."""

import subprocess
import sys

import numpy as np
import pytest
from cli_run import run

from tiltflow.cli import main

TINY = ["data=eight_gaussians", "data.n=512", "model.hidden=32", "model.depth=1",
        "train.steps=6", "train.batch_size=64", "train.log_every=2", "train.ckpt_every=3",
        "train.warmup_steps=0"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", *TINY, f"train.out_dir={out}"]) == 0
    return out


def test_train_then_sample(trained_run, tmp_path, capsys):
    prefix = tmp_path / "s"
    code, out, err = run(["sample", str(trained_run), "--solver", "euler", "--nfe", "4",
                          "--num", "10", "--out", str(prefix)], capsys)
    assert code == 0, err
    x = np.load(prefix.with_suffix(".npy"))
    assert x.shape == (10, 2) and np.isfinite(x).all()
    assert prefix.with_suffix(".png").exists()
    code, out, err = run(["sample", str(trained_run), "--solver", "ddim", "--nfe", "4",
                          "--option", "eta=1.0", "--num", "10", "--out", str(prefix)], capsys)
    assert code == 0, err


def test_train_resume_continues(trained_run, capsys):
    code, out, err = run(["train", *TINY, "train.steps=9", f"train.out_dir={trained_run}",
                          "--resume"], capsys)
    assert code == 0, err
    assert "trained 9 steps" in out


def test_list_solvers(capsys):
    code, out, _ = run(["sample", "x", "--list-solvers"], capsys)
    assert code == 0 and "heun" in out and "ddpm" in out


@pytest.mark.parametrize("args,needle", [
    (["train", "/no/such.yaml"], "not found"),
    (["train", "train.lr=-1"], "train.lr"),
    (["train", "train.stepz=3"], "train.steps"),
    (["train", "data=/no/such/folder"], "no such dataset or file"),
    (["train", "data=mnist"], "mnist"),
    (["train", "model.name=resnet"], "resnet"),
    (["train", "objective=dpo"], "dpo"),
    (["sample", "/no/such/run"], "/no/such/run"),
    (["bench", "nosuchsuite"], "nosuchsuite"),
])
def test_bad_input_is_one_line_exit_2(args, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tiltflow: error:") and needle in lines[0], err
    assert not any(tmp_path.iterdir()), "a failed command must not leave files behind"


@pytest.mark.parametrize("args,needle", [
    (["--solver", "eulr"], "did you mean 'euler'"),
    (["--solver", "heun", "--nfe", "4"], "nfe=4"),
    (["--num", "0"], "--num"),
    (["--label", "3"], "unconditional"),
    (["--guidance", "2"], "class-conditional"),
    (["--solver", "ddim", "--nfe", "4", "--option", "etta=1"], "no option"),
    (["--solver", "dopri5"], "adaptive"),
])
def test_sample_bad_arguments(trained_run, args, needle, capsys, tmp_path):
    code, out, err = run(["sample", str(trained_run), "--out", str(tmp_path / "s"), *args], capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not any(tmp_path.iterdir())


def test_console_script_help():
    res = subprocess.run([sys.executable, "-m", "tiltflow.cli", "--help"], capture_output=True,
                         text=True)
    assert res.returncode == 0 and "train" in res.stdout and "sample" in res.stdout


def test_fit_solver_then_sample_with_it(trained_run, tmp_path, capsys):
    params = tmp_path / "bespoke4.safetensors"
    code, out, err = run(["fit-solver", str(trained_run), "--nfe", "4", "--kind", "bespoke",
                          "--num-noises", "32", "--steps", "5", "--out", str(params)], capsys)
    assert code == 0, err
    assert params.exists()
    prefix = tmp_path / "s"
    code, out, err = run(["sample", str(trained_run), "--solver", "bespoke", "--nfe", "4",
                          "--option", f"params={params}", "--num", "8", "--out", str(prefix)], capsys)
    assert code == 0, err
    assert np.isfinite(np.load(prefix.with_suffix(".npy"))).all()
    code, out, err = run(["fit-solver", str(trained_run), "--nfe", "4", "--out", str(tmp_path / "x"),
                          "--kind", "bns", "--base", "nosuch"], capsys)
    assert code == 2 and "nosuch" in err


def test_demo_quick_writes_a_report_with_every_section(tmp_path, capsys):
    code, out, err = run(["demo", "--quick", "--out", str(tmp_path / "demo")], capsys)
    assert code == 0, err
    html = (tmp_path / "demo" / "report.html").read_text()
    for title in ("eight Gaussians", "digits", "solvers", "Few-step", "About this run"):
        assert title in html
    for png in ("eight_gaussians_samples.png", "digits_samples.png", "digits_real.png",
                "solvers_error_vs_nfe.png", "fewstep_samples.png"):
        assert (tmp_path / "demo" / png).stat().st_size > 1000


def test_fit_solver_grid_kind(trained_run, tmp_path, capsys):
    out = tmp_path / "grid6.safetensors"
    code, _, err = run(["fit-solver", str(trained_run), "--nfe", "6", "--kind", "grid",
                        "--num-noises", "32", "--steps", "5", "--out", str(out)], capsys)
    assert code == 0, err
    code, _, err = run(["fit-solver", str(trained_run), "--nfe", "6", "--kind", "grid", "--base",
                        "ipndm", "--num-noises", "16", "--steps", "5", "--out", str(out)], capsys)
    assert code == 0, err  # no differentiable copy of ipndm: Nelder-Mead


def test_train_and_sample_on_a_csv_table_and_an_image_folder(tmp_path, capsys):
    """The README's own-data path: a CSV table (samples come back in its units) and a folder of
    PNGs with class subfolders (a conditional image model)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    table = np.column_stack([rng.normal(100.0, 5.0, 300), rng.normal(-3.0, 0.1, 300)])
    csv = tmp_path / "table.csv"
    np.savetxt(csv, table, delimiter=",", header="a,b", comments="")
    run_dir = tmp_path / "run_csv"
    code, _, err = run(["train", f"data={csv}", "model.hidden=32", "model.depth=1",
                        "train.steps=4", "train.batch_size=32", "train.log_every=2",
                        "train.warmup_steps=0", f"train.out_dir={run_dir}"], capsys)
    assert code == 0, err
    code, _, err = run(["sample", str(run_dir), "--solver", "euler", "--nfe", "4", "--num", "50",
                        "--out", str(tmp_path / "csv_samples")], capsys)
    assert code == 0, err
    x = np.load(tmp_path / "csv_samples.npy")
    # 4 training steps: no fit, but standardised noise mapped back lands in the table's units
    assert x.shape == (50, 2) and 60 < x[:, 0].mean() < 140 and -4 < x[:, 1].mean() < -2

    for label in ("cat", "dog"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(6):
            img = (rng.random((8, 8)) * 255).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / "imgs" / label / f"{i}.png")
    run_dir = tmp_path / "run_img"
    code, _, err = run(["train", f"data={tmp_path / 'imgs'}", "model.base_channels=8",
                        "train.steps=2", "train.batch_size=4", "train.log_every=1",
                        "train.warmup_steps=0", f"train.out_dir={run_dir}"], capsys)
    assert code == 0, err
    code, _, err = run(["sample", str(run_dir), "--label", "1", "--guidance", "1.0", "--nfe", "3",
                        "--solver", "heun", "--num", "4", "--out", str(tmp_path / "img")], capsys)
    assert code == 0, err
    assert np.load(tmp_path / "img.npy").shape == (4, 1, 8, 8)
    code, _, err = run(["sample", str(run_dir), "--label", "2", "--nfe", "3", "--solver", "heun",
                        "--out", str(tmp_path / "img2")], capsys)
    assert code == 2 and "--label must be in [0, 2), got 2" in err, err


def test_likelihood_and_invert_commands(trained_run, tmp_path, capsys):
    code, out, err = run(["likelihood", str(trained_run), "--num", "16", "--steps", "4",
                          "--out", str(tmp_path / "lp")], capsys)
    assert code == 0, err
    assert "nats/dim" in out and "own units" in out
    lp = np.load(tmp_path / "lp.npy")
    assert lp.shape == (16,) and np.isfinite(lp).all()
    code, out, err = run(["invert", str(trained_run), "--num", "8", "--nfe", "6",
                          "--out", str(tmp_path / "noise")], capsys)
    assert code == 0, err
    assert np.load(tmp_path / "noise.npy").shape == (8, 2) and "round trip" in out
    code, out, err = run(["likelihood", str(trained_run), "--data", "digits"], capsys)
    assert code == 2 and "shape" in err


def test_sample_parallel_negative_and_ems(trained_run, tmp_path, capsys):
    code, out, err = run(["sample", str(trained_run), "--solver", "ddim", "--nfe", "20",
                          "--parallel", "picard", "--num", "8", "--out", str(tmp_path / "p")],
                         capsys)
    assert code == 0, err
    assert "sequential rounds instead of 20" in out
    code, out, err = run(["sample", str(trained_run), "--negative", str(trained_run),
                          "--guidance", "1.5", "--nfe", "5", "--num", "8",
                          "--out", str(tmp_path / "n")], capsys)
    assert code == 0, err
    ems = tmp_path / "ems.safetensors"
    code, out, err = run(["fit-solver", str(trained_run), "--kind", "ems", "--num-noises", "16",
                          "--out", str(ems)], capsys)
    assert code == 0, err
    code, out, err = run(["sample", str(trained_run), "--solver", "dpm_solver_v3", "--nfe", "6",
                          "--option", f"ems={ems}", "--num", "8", "--out", str(tmp_path / "v3")],
                         capsys)
    assert code == 0, err
    assert np.isfinite(np.load(tmp_path / "v3.npy")).all()
    code, out, err = run(["fit-solver", str(trained_run), "--kind", "bns",
                          "--out", str(tmp_path / "x.safetensors")], capsys)
    assert code == 2 and "--nfe" in err
