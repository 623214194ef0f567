"""Issue 13's classes of bad input, one test each: every one ends in a single line
``tiltflow: error: ...`` with exit code 2, before any expensive work, leaving nothing behind and
never a silently wrong result. (The full table of bad inputs is ``tiltflow bench reliability``.)
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tiltflow.cli import main

TINY = ["data=eight_gaussians", "data.n=256", "model.hidden=16", "model.depth=1",
        "train.steps=2", "train.batch_size=32", "train.ckpt_every=2", "train.warmup_steps=0"]


def run(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line(code, err, *needles):
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("tiltflow: error: "), err
    for needle in needles:
        assert str(needle) in lines[0], err


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def latest(run_dir: Path) -> Path:
    return run_dir / (run_dir / "latest").read_text().strip()


def rehash(step: Path, name: str) -> None:
    import hashlib

    state = json.loads((step / "state.json").read_text())
    state["files"][name] = hashlib.sha256((step / name).read_bytes()).hexdigest()
    (step / "state.json").write_text(json.dumps(state))


def damaged(run_dir: Path, dest: Path, *, tensors=None, state=None,
            files=("ema.safetensors",)) -> Path:
    """A copy of ``run_dir`` whose latest checkpoint has ``tensors(dict) -> dict`` applied to
    ``files`` (checksums updated, as another program writing them would) and ``state(dict)``
    applied to its state.json."""
    shutil.copytree(run_dir, dest)
    step = latest(dest)
    for name in files if tensors else ():
        edited = {n: v.contiguous() for n, v in tensors(load_file(step / name)).items()}
        save_file(edited, step / name, metadata={"format": "pt"})
        rehash(step, name)
    if state:
        data = json.loads((step / "state.json").read_text())
        state(data)
        (step / "state.json").write_text(json.dumps(data))
    return dest


def first_weight(t: dict) -> str:
    return next(k for k, v in t.items() if v.dim() == 2)


def test_outputs_that_cannot_be_written_fail_first_in_one_line(tiny_run, tmp_path, capsys,
                                                               monkeypatch):
    """Every writing command checks its output location before any work (a path under a file,
    a file where a folder is wanted, a pseudo file system), and an OSError while writing is one
    line naming the path, with nothing half-written left."""
    monkeypatch.chdir(tmp_path)
    Path("afile").write_text("x")
    r = str(tiny_run)
    commands = {
        "sample": ["sample", r, "--nfe", "3", "--num", "4", "--out"],
        "likelihood": ["likelihood", r, "--num", "4", "--steps", "2", "--out"],
        "invert": ["invert", r, "--num", "4", "--nfe", "2", "--out"],
        "fit-solver": ["fit-solver", r, "--nfe", "4", "--num-noises", "4", "--out"],
        "train": ["train", *TINY, "--out"],
        "demo": ["demo", "--quick", "--out"],
    }
    for name, args in commands.items():
        ext = ".safetensors" if name == "fit-solver" else ""
        for out, needle in ((f"afile/sub/x{ext}", "'afile' is a file"),
                            (f"/proc/tiltflow_x{ext}", "does not accept new files")):
            code, stdout, err = run([*args, out], capsys)
            assert_one_line(code, err, needle)
            assert "computing" not in stdout, f"{name} worked before checking {out}"
    for name in ("train", "demo"):
        code, _, err = run([*commands[name], "afile"], capsys)
        assert_one_line(code, err, "is a file, but a folder is needed")
    Path("s.npy").mkdir()
    code, _, err = run([*commands["sample"], "s"], capsys)
    assert_one_line(code, err, "is a folder, but a file is needed")
    assert tree(tmp_path) == ["afile", "s.npy"]

    def full_disk(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("tiltflow.fileio.write_synced", full_disk)
    code, _, err = run([*commands["sample"], "new/s"], capsys)
    assert_one_line(code, err, "new/s.npy", "No space left on device", "free space")
    assert tree(tmp_path) == ["afile", "s.npy"], "a failed write left files behind"

    class Full:  # os.statvfs of a full disk: known before any work
        f_bavail, f_frsize = 0, 4096

    monkeypatch.setattr("os.statvfs", lambda path: Full())
    code, stdout, err = run([*commands["fit-solver"], "x.safetensors"], capsys)
    assert_one_line(code, err, "is full")
    assert "computing" not in stdout


def test_weights_that_do_not_match_the_config_name_file_and_tensor(tiny_run, tmp_path, capsys):
    """Shape mismatch, a missing or an extra tensor, a run config missing a key: one line
    naming the file, the tensor and expected vs stored, for sampling and for --resume."""
    k = first_weight(load_file(latest(tiny_run) / "ema.safetensors"))
    shape = list(load_file(latest(tiny_run) / "ema.safetensors")[k].shape)
    cases = {
        "shape": (dict(tensors=lambda t: {**t, k: t[k][:, :-1]}),
                  ("ema.safetensors", k, f"{[shape[0], shape[1] - 1]}", f"expects {shape}")),
        "missing": (dict(tensors=lambda t: {n: v for n, v in t.items() if n != k}),
                    ("ema.safetensors", f"lacks tensor '{k}'")),
        "extra": (dict(tensors=lambda t: {**t, "bogus": torch.zeros(2)}),
                  ("ema.safetensors", "'bogus'")),
        "no_shape_key": (dict(state=lambda s: s["config"]["run"]["data"].pop("shape")),
                         ("state.json", "run.data.shape")),
    }
    for name, (edit, needles) in cases.items():
        bad = damaged(tiny_run, tmp_path / name, **edit)
        code, _, err = run(["sample", bad, "--nfe", "3", "--out", tmp_path / "s"], capsys)
        assert_one_line(code, err, *needles)
    bad = damaged(tiny_run, tmp_path / "resume", tensors=lambda t: {**t, k: t[k][:, :-1]},
                  files=("model.safetensors",))
    code, _, err = run(["train", *TINY, "train.steps=4", f"train.out_dir={bad}", "--resume"],
                       capsys)
    assert_one_line(code, err, "model.safetensors", k, f"expects {shape}")
    assert not list(tmp_path.glob("s.*"))


def test_sizes_that_cannot_fit_are_refused_before_allocating(tiny_run, tmp_path, capsys,
                                                             monkeypatch):
    """Requests far beyond the machine are estimated and refused with the estimate and the
    machine's limit; an allocation failure that gets past an estimate is one line too."""
    monkeypatch.chdir(tmp_path)
    for args, needle in (
            (["sample", tiny_run, "--num", 10**12], "--num 1000000000000"),
            (["sample", tiny_run, "--solver", "euler", "--nfe", 10**10], "time grid"),
            (["likelihood", tiny_run, "--steps", 10**12], "--steps"),
            (["train", *TINY, "model.hidden=1000000000", "--out", "r"], "parameters"),
            (["train", *TINY, f"train.steps={10**21}", "--out", "r"], "loss history"),
            (["train", *TINY, f"train.batch_size={10**12}", "--out", "r"], "activations")):
        code, _, err = run(args, capsys)
        assert_one_line(code, err, needle, "needs about", "this machine has")

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: not "
                           "enough memory: you tried to allocate 8000000000000 bytes.")

    monkeypatch.setattr(torch, "randn", no_memory)
    code, _, err = run(["sample", tiny_run, "--nfe", "3", "--out", "s"], capsys)
    assert_one_line(code, err, "out of memory", "8000000000000 bytes")
    assert tree(tmp_path) == []


def test_every_check_comes_before_the_expensive_step(tiny_run, tmp_path, capsys, monkeypatch):
    """fit-solver computes nothing, bench runs no suite, when a later check would fail."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "fake_suite.py").write_text(
        "from pathlib import Path\n"
        "def run(quick=False):\n"
        "    Path('suite_ran').write_text('x')\n"
        "    return {'suite': 'fake'}\n")
    (tmp_path / "benchmarks" / "results").write_text("a file, not a folder")
    code, _, err = run(["bench", "fake"], capsys)
    assert_one_line(code, err, "results")
    assert not (tmp_path / "suite_ran").exists()
    for args in (["--out", "/proc/x.safetensors"], ["--out", "x.safetensors", "--loss", "bound",
                                                    "--lipschitz", "nan"],
                 ["--out", "x.safetensors", "--num-noises", 10**12]):
        code, out, err = run(["fit-solver", tiny_run, "--nfe", "4", *args], capsys)
        assert_one_line(code, err)
        assert "computing" not in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["benchmarks"]


def test_no_silent_nan(tiny_run, tmp_path, capsys):
    """Non-finite weights are refused at load naming the tensor, non-finite samples are never
    written, NaN / inf guidance and NaN options are refused."""
    k = first_weight(load_file(latest(tiny_run) / "ema.safetensors"))

    def poke(value):
        def edit(t):
            w = t[k].clone()
            w.view(-1)[0] = value
            return {**t, k: w}
        return edit

    bad = damaged(tiny_run, tmp_path / "nan", tensors=poke(float("nan")))
    code, _, err = run(["sample", bad, "--out", tmp_path / "s"], capsys)
    assert_one_line(code, err, "ema.safetensors", k, "NaN/inf")
    huge = damaged(tiny_run, tmp_path / "huge", tensors=lambda t: {n: v * 1e30 for n, v in
                                                                   t.items()})
    (tmp_path / "old.npy").write_text("an earlier result")
    code, _, err = run(["sample", huge, "--nfe", "3", "--out", tmp_path / "old"], capsys)
    assert_one_line(code, err, "samples are NaN or infinite", "nothing was written")
    assert (tmp_path / "old.npy").read_text() == "an earlier result"
    for value in ("nan", "inf", "-inf"):
        code, _, err = run(["sample", tiny_run, f"--guidance={value}", "--out",
                            tmp_path / "s"], capsys)
        assert_one_line(code, err, "--guidance", "finite")
    code, _, err = run(["sample", tiny_run, "--solver", "ddim", "--nfe", "4", "--option",
                        "eta=nan", "--out", tmp_path / "s"], capsys)
    assert_one_line(code, err, "eta", "NaN")
    assert not list(tmp_path.glob("s.*")) and not (tmp_path / "old.png").exists()


def test_resume_refuses_another_model_or_data_and_cleans_stale_temporaries(tiny_run, tmp_path,
                                                                          capsys):
    """--resume compares the saved config with the requested one and names the changed keys
    (--allow-config-change overrides); temporaries of a killed checkpoint write (this layout's
    names only) are removed when training starts."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    before = tree(run_dir)
    resume = ["train", *TINY, "train.steps=4", f"train.out_dir={run_dir}"]
    code, _, err = run([*resume, "data=moons", "--resume"], capsys)
    assert_one_line(code, err, "run.config.data.name: 'eight_gaussians' -> 'moons'",
                     "--allow-config-change")
    code, _, err = run([*resume, "model.hidden=32", "--resume"], capsys)
    assert_one_line(code, err, "model.hidden: 16 -> 32")
    assert tree(run_dir) == before, "a refused resume changed the run"
    (run_dir / ".tmp_step_000003_0123abcd").mkdir()  # a checkpoint write killed midway
    (run_dir / ".latest.89abcdef.tmp").write_text("step_000003\n")
    (run_dir / ".tmp_mine").mkdir()  # not a name this layout creates: left alone
    code, out, err = run([*resume, "data=moons", "--resume", "--allow-config-change"], capsys)
    assert code == 0, err
    assert "trained 4 steps" in out
    hidden = sorted(p.name for p in run_dir.iterdir() if p.name.startswith("."))
    assert hidden == [".tmp_mine"]
