"""Benchmark suite ``reliability``: every bad input a one-line error, nothing left behind, and
training that survives being killed.

**Bad inputs.** A table of cases (over 200): every subcommand's arguments, config files and keys,
data files of every format, damaged checkpoints, output locations that cannot be written, sizes
that cannot fit. Each runs in a folder of its own and is classified:

- *clean*: exit code 2, stderr is one line ``tiltflow: error: ...`` (``note:`` log lines aside),
  no traceback, nothing new or changed on disk, no expensive work before the failing check;
- otherwise it counts as a *traceback*, a *wrong exit code* (0 with a silently wrong result, 1,
  a signal, a timeout), *files left behind* (new paths under the workspace), *files changed*
  (an existing file rewritten or removed), or *work before the check* (fit-solver computing
  its reference).

A few valid edge inputs (controls) must still succeed, so a refusal is not bought by refusing
too much. Cases run as forked children of this process calling ``tiltflow.cli.main`` (the
console script's code path minus the interpreter start, ~10x faster); a representative subset
(each group's first cases and every fifth) also runs through the real ``tiltflow`` console
script in a subprocess, and both ways must classify alike. Children get an address-space limit
(RLIMIT_AS), so an unchecked huge allocation fails instead of waking the OOM killer.

**Kills.** Copies of one started run (its first checkpoint) continue: a reference without
interruption; the others stopped by SIGINT, SIGTERM, SIGINT twice and SIGKILL at random
moments, and killed (SIGKILL) at each point inside a checkpoint write (before each file, before
the rename, between the two renames of a re-save, before the ``latest`` pointer, while pruning
old checkpoints). Each is then resumed with ``tiltflow train --resume``: the latest checkpoint
must load, stale temporaries must be gone after the resume, and the final weights, EMA and
optimizer state must equal the reference's bit for bit.

Read-only and full-disk cases mount a small tmpfs when the machine allows it (root); otherwise
they are skipped and the report says so. Permission cases drop root's CAP_DAC_OVERRIDE.

    python benchmarks/reliability_suite.py [--quick]      # or: tiltflow bench reliability
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_spec = importlib.util.spec_from_file_location("tiltflow_bench_common",
                                               Path(__file__).with_name("common.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

#: address-space limit of every child: generous for real work, small enough that an unchecked
#: 10**12-element allocation fails at once instead of swapping the machine to death
ADDRESS_LIMIT = 8 * 2**30
CASE_TIMEOUT = 60.0
TINY = ["data=eight_gaussians", "data.n=512", "model.hidden=32", "model.depth=1",
        "train.steps=6", "train.batch_size=64", "train.log_every=2", "train.ckpt_every=3",
        "train.warmup_steps=0"]
SMALL = ["model.hidden=16", "model.depth=1", "train.steps=2", "train.batch_size=8",
         "train.log_every=1", "train.warmup_steps=0"]


# -- cases -------------------------------------------------------------------------------------

@dataclass
class Case:
    """One command line. Tokens ``@CASE`` (its own folder, the working directory), ``@RUN`` /
    ``@COND`` (the 2-D and the class-conditional fixture runs), ``@FX`` (the fixtures folder),
    ``@RO`` / ``@FULL`` (read-only and tiny tmpfs mounts) are replaced when it runs."""

    group: str
    name: str
    argv: list[str]
    setup: Callable[[Path, Path], None] | None = None  # (case folder, fixtures folder)
    expect: int = 2
    no_override: bool = False  # permission cases: run without root's permission override
    needs_mount: bool = False
    work_marker: str | None = None  # stdout text showing that expensive work started
    timeout: float = CASE_TIMEOUT


def _touch(rel: str, text: str = "x"):
    def setup(case: Path, fx: Path) -> None:
        (case / rel).parent.mkdir(parents=True, exist_ok=True)
        (case / rel).write_text(text)
    return setup


def _mkdir(rel: str, mode: int | None = None):
    def setup(case: Path, fx: Path) -> None:
        (case / rel).mkdir(parents=True, exist_ok=True)
        if mode is not None:
            os.chmod(case / rel, mode)
    return setup


def _copy_run(src: str, dst: str = "run"):
    def setup(case: Path, fx: Path) -> None:
        shutil.copytree(fx / src, case / dst)
    return setup


def _both(*setups):
    def setup(case: Path, fx: Path) -> None:
        for s in setups:
            s(case, fx)
    return setup


def global_cases() -> list[Case]:
    g = "command line"
    return [Case(g, "no command", []),
            Case(g, "unknown command", ["trian"]),
            Case(g, "unknown top-level flag", ["--bogus"]),
            Case(g, "sample without a run", ["sample"]),
            Case(g, "flag without its value", ["sample", "@RUN", "--nfe"]),
            Case(g, "unknown flag of a command", ["train", "--resume", "--bogus"]),
            Case(g, "likelihood unknown --trace", ["likelihood", "@RUN", "--trace", "bogus"]),
            Case(g, "fit-solver unknown --kind", ["fit-solver", "@RUN", "--kind", "bogus",
                                                   "--out", "x.safetensors"])]


def _train(*overrides: str) -> list[str]:
    return ["train", *SMALL, "train.out_dir=@CASE/run", *overrides]


def config_cases() -> list[Case]:
    g = "train config"
    files = [
        ("config file missing", ["train", "/no/such.yaml"], None),
        ("config not YAML", ["train", "bad.yaml"], _touch("bad.yaml", "a: [1, 2\n")),
        ("config a list", ["train", "list.yaml"], _touch("list.yaml", "- 1\n- 2\n")),
        ("config unknown section", ["train", "u.yaml"], _touch("u.yaml", "trian: {steps: 2}\n")),
        ("config train not a mapping", ["train", "t.yaml"], _touch("t.yaml", "train: 5\n")),
        ("config binary garbage", ["train", "g.yaml"], _touch("g.yaml", "\x00\x01\x02: [\n")),
        ("config is a folder", ["train", "cfgdir"], _mkdir("cfgdir")),
    ]
    cases = [Case(g, n, a, s) for n, a, s in files]
    overrides = [
        "train.stepz=3", "train.lr=-1", "train.lr=abc", "train.lr=nan", "train.lr=inf",
        "train.steps=0", "train.steps=-5", "train.steps=1.5", "train.steps=abc",
        "train.batch_size=0", "train.betas=[0.9]", "train.betas=[2,3]", "train.ema_decay=1",
        "train.mixed_precision=fp8", "train.compile=maybe", "train.lr_schedule=linear",
        "train.grad_clip=-1", "train.warmup_steps=-1", "train.keep_checkpoints=0",
        "train.ema_warmup=maybe", "train.out_dir=[]", "train.log_every=0",
        "train.min_lr_ratio=2", "train.lr", "=3", "train..lr=3", "foo.bar=1", "train.lr=[1,2",
        "model.name=resnet", "model.hidden=-1", "model.hidden=0", "model.hidden=abc",
        "model.depth=-1", "model.foo=1", "model.prediction=bogus", "model=5",
        "schedule=bogus", "objective=dpo", "objective.time_sampling=bogus", "objective.foo=1",
        "train.lr.x=1",
    ]
    cases += [Case(g, o, _train(o)) for o in overrides]
    return cases


def size_cases() -> list[Case]:
    g = "sizes that cannot fit"
    return [
        Case(g, "model.hidden=10**9", _train("model.hidden=1000000000")),
        Case(g, "model.hidden=10**6", _train("model.hidden=1000000")),
        Case(g, "unet base_channels=10**5", ["train", "data=digits", "model.base_channels=100000",
                                             "train.steps=1", "train.out_dir=@CASE/run"]),
        Case(g, "train.steps=10**21", _train("train.steps=1000000000000000000000")),
        Case(g, "train.steps=10**12", _train("train.steps=1000000000000")),
        Case(g, "train.batch_size=10**12", _train("train.batch_size=1000000000000")),
        Case(g, "data.n=10**12", _train("data.n=1000000000000")),
        Case(g, "sample --num 10**12", ["sample", "@RUN", "--num", "1000000000000"]),
        Case(g, "sample --num 10**9", ["sample", "@RUN", "--num", "1000000000"]),
        Case(g, "sample euler --nfe 10**10", ["sample", "@RUN", "--solver", "euler",
                                              "--nfe", "10000000000"]),
        Case(g, "sample heun --nfe 10**10+1", ["sample", "@RUN", "--nfe", "10000000001"]),
        Case(g, "sample ddim --nfe 10**8 --parallel", ["sample", "@RUN", "--solver", "ddim",
                                                       "--nfe", "100000000", "--parallel",
                                                       "picard"]),
        Case(g, "sample --num 10**7 --parallel", ["sample", "@RUN", "--solver", "ddim", "--nfe",
                                                  "1000", "--num", "10000000", "--parallel",
                                                  "picard"]),
        Case(g, "likelihood --steps 10**12", ["likelihood", "@RUN", "--steps", "1000000000000"]),
        Case(g, "invert --nfe 10**10", ["invert", "@RUN", "--nfe", "10000000000"]),
        Case(g, "fit-solver --num-noises 10**12", ["fit-solver", "@RUN", "--nfe", "4",
                                                   "--num-noises", "1000000000000",
                                                   "--out", "x.safetensors"]),
        Case(g, "fit-solver --nfe 10**10", ["fit-solver", "@RUN", "--nfe", "10000000000",
                                            "--kind", "bns", "--out", "x.safetensors"]),
    ]


def data_cases() -> list[Case]:
    g = "data files"
    names = ["csv_text", "csv_empty", "csv_header_only", "csv_ragged", "csv_missing", "csv_inf",
             "csv_nan", "csv_binary", "npy_object", "npy_empty", "npy_nan", "npy_5d",
             "npy_strings", "npy_truncated", "npy_text", "npz_several", "npz_y_and_labels",
             "npz_no_data", "npz_label_shape", "npz_label_negative", "npz_label_float",
             "npz_garbage", "img_empty", "img_corrupt", "img_sizes", "img_mixed_levels",
             "img_no_images", "data.txt"]
    cases = [Case(g, n, _train(f"data=@FX/data/{n}" + _DATA_SUFFIX.get(n[:3], ""))) for n in names]
    cases += [
        Case(g, "csv label_column missing", _train("data=@FX/data/csv_good.csv",
                                                   "data.label_column=nosuch")),
        Case(g, "csv only a label column", _train("data=@FX/data/csv_label_only.csv",
                                                  "data.label_column=0")),
        Case(g, "csv header option", _train("data=@FX/data/csv_good.csv", "data.header=maybe")),
        Case(g, "image folder labels=true, no classes", _train("data=@FX/data/img_flat",
                                                                "data.labels=true")),
        Case(g, "npy value_range reversed", _train("data=@FX/data/npy_images.npy",
                                                   "data.value_range=[1,0]")),
        Case(g, "npy value_range on a table", _train("data=@FX/data/csv_good.csv",
                                                     "data.value_range=[0,1]")),
        Case(g, "data folder missing", _train("data=/no/such/folder")),
        Case(g, "data unknown built-in", _train("data=mnist")),
        Case(g, "data.n=-5", _train("data.n=-5")),
        Case(g, "data.n=0", _train("data.n=0")),
        Case(g, "data option unknown", _train("data.foo=1")),
        Case(g, "digits split bogus", _train("data=digits", "data.split=bogus")),
        Case(g, "csv more n than rows", _train("data=@FX/data/csv_good.csv", "data.n=100000")),
    ]
    return cases


_DATA_SUFFIX = {"csv": ".csv", "npy": ".npy", "npz": ".npz"}


def output_cases() -> list[Case]:
    g = "output locations"
    file_under = _touch("afile")
    cases = []
    for cmd, args, kind in (
            ("sample", ["sample", "@RUN", "--nfe", "3", "--num", "8", "--out"], "prefix"),
            ("likelihood", ["likelihood", "@RUN", "--num", "8", "--steps", "2", "--out"], "file"),
            ("invert", ["invert", "@RUN", "--num", "8", "--nfe", "2", "--out"], "file"),
            ("fit-solver", ["fit-solver", "@RUN", "--nfe", "4", "--num-noises", "8", "--steps",
                            "1", "--out"], "safetensors"),
            ("train", ["train", *SMALL, "--out"], "dir"),
            ("demo", ["demo", "--quick", "--out"], "dir")):
        ext = ".safetensors" if kind == "safetensors" else ""
        marker = "computing" if cmd == "fit-solver" else None
        cases += [
            Case(g, f"{cmd}: under an existing file", [*args, f"afile/x{ext}"], file_under,
                 work_marker=marker),
            Case(g, f"{cmd}: deep under an existing file", [*args, f"afile/a/b/x{ext}"],
                 file_under, work_marker=marker),
            Case(g, f"{cmd}: on /proc", [*args, f"/proc/tiltflow_x{ext}"], work_marker=marker),
            Case(g, f"{cmd}: on /sys", [*args, f"/sys/tiltflow_x{ext}"], work_marker=marker),
            Case(g, f"{cmd}: read-only file system", [*args, f"@RO/x{ext}"], needs_mount=True,
                 work_marker=marker),
            Case(g, f"{cmd}: folder without permission", [*args, f"locked/x{ext}"],
                 _mkdir("locked", 0o555), no_override=True, work_marker=marker),
            Case(g, f"{cmd}: full disk", [*args, f"@FULL/x{ext}"], needs_mount=True,
                 work_marker=marker),
        ]
        if kind == "dir":
            cases.append(Case(g, f"{cmd}: a file where a folder is wanted", [*args, "afile"],
                              file_under))
        elif kind == "prefix":
            cases.append(Case(g, f"{cmd}: PREFIX.npy is a folder", [*args, "s"], _mkdir("s.npy")))
            cases.append(Case(g, f"{cmd}: PREFIX.png is a folder", [*args, "s"], _mkdir("s.png")))
        else:
            name = f"x{ext}" if ext else "x.npy"
            cases.append(Case(g, f"{cmd}: a folder where a file is wanted",
                              [*args, name.removesuffix(".npy") if not ext else name],
                              _mkdir(name), work_marker=marker))
    cases.append(Case(g, "bench: results folder is a file", ["bench", "fake"],
                      _both(_touch("benchmarks/fake_suite.py", _FAKE_SUITE),
                            _touch("benchmarks/results", "not a folder"))))
    cases.append(Case(g, "bench: results under a read-only folder", ["bench", "fake"],
                      _both(_touch("benchmarks/fake_suite.py", _FAKE_SUITE),
                            _mkdir("benchmarks/results", 0o555)), no_override=True))
    return cases


#: a suite that would leave a marker file if it ran before its output folder was checked
_FAKE_SUITE = ("from pathlib import Path\n"
               "def run(quick=False):\n"
               "    Path('ran_before_the_check').write_text('x')\n"
               "    return {'suite': 'fake'}\n")


def checkpoint_cases() -> list[Case]:
    g = "damaged checkpoints"
    cases = []
    for name in CORRUPTIONS:
        if name in RESUME_ONLY:
            continue
        cases.append(Case(g, f"sample: {name}", ["sample", f"@FX/bad/{name}", "--nfe", "3",
                                                  "--num", "8"]))
    for name in ("nan_ema", "shape_mismatch", "missing_shape", "missing_tensor", "truncated"):
        cases.append(Case(g, f"likelihood: {name}", ["likelihood", f"@FX/bad/{name}", "--num",
                                                      "8", "--steps", "2"]))
        cases.append(Case(g, f"invert: {name}", ["invert", f"@FX/bad/{name}", "--num", "8",
                                                  "--nfe", "2"]))
        cases.append(Case(g, f"fit-solver: {name}", ["fit-solver", f"@FX/bad/{name}", "--nfe",
                                                      "4", "--num-noises", "8", "--steps", "1",
                                                      "--out", "x.safetensors"],
                          work_marker="computing"))
    cases.append(Case(g, "sample --negative damaged", ["sample", "@RUN", "--negative",
                                                        "@FX/bad/nan_ema", "--guidance", "1",
                                                        "--nfe", "3", "--num", "8"]))
    cases.append(Case(g, "sample --no-ema: inf model weight", ["sample", "@FX/bad/inf_model",
                                                                "--no-ema", "--nfe", "3"]))
    cases.append(Case(g, "run path is a file", ["sample", "afile"], _touch("afile")))
    cases.append(Case(g, "sample: damaged, over an existing output", ["sample",
                      "@FX/bad/huge_weights", "--nfe", "3", "--out", "s"],
                      _both(_touch("s.npy"), _touch("s.png"))))
    cases.append(Case(g, "run folder empty", ["sample", "empty"], _mkdir("empty")))
    return cases


def resume_cases() -> list[Case]:
    g = "train --resume"
    tiny = [a for a in TINY if not a.startswith("train.steps")] + ["train.steps=9"]

    def resume(*extra: str, src: str = "run") -> tuple[list[str], Callable]:
        flags = [e for e in extra if e.startswith("--")]  # after the key=value overrides
        overrides = [e for e in extra if not e.startswith("--")]
        return (["train", *tiny, *overrides, "train.out_dir=@CASE/run", "--resume", *flags],
                _copy_run(src))

    specs = [
        ("different data set", ("data=moons",)),
        ("different data size", ("data.n=1024",)),
        ("different model width", ("model.hidden=64",)),
        ("different objective", ("objective=rectified_flow",)),
        ("different schedule", ("schedule=cosine",)),
        ("different prediction", ("model.prediction=noise",)),
        ("allowed change of width", ("model.hidden=64", "--allow-config-change")),
    ]
    cases = [Case(g, n, *resume(*extra)) for n, extra in specs]
    for name in ("nan_ema", "nan_model", "truncated", "missing_tensor", "extra_tensor",
                 "optimizer_json", "optimizer_nan", "rng_damaged", "data_position",
                 "state_not_json"):
        cases.append(Case(g, f"from {name}", *resume(src=f"bad/{name}")))
    cases.append(Case(g, "existing run without --resume",
                      ["train", *tiny, "train.out_dir=@CASE/run"], _copy_run("run")))
    cases.append(Case(g, "--allow-config-change without --resume",
                      ["train", *tiny, "train.out_dir=@CASE/new", "--allow-config-change"]))
    return cases


def argument_cases() -> list[Case]:
    g = "sample arguments"
    s = ["sample", "@RUN", "--out", "s"]
    c = ["sample", "@COND", "--out", "s"]
    sample = [
        ("--num 0", [*s, "--num", "0"]), ("--num -1", [*s, "--num", "-1"]),
        ("--num abc", [*s, "--num", "abc"]), ("--num 1e3", [*s, "--num", "1e3"]),
        ("--nfe 0", [*s, "--nfe", "0"]), ("--nfe -3", [*s, "--nfe", "-3"]),
        ("--nfe abc", [*s, "--nfe", "abc"]), ("heun --nfe 4", [*s, "--nfe", "4"]),
        ("--guidance nan", [*c, "--guidance", "nan"]), ("--guidance inf", [*c, "--guidance", "inf"]),
        ("--guidance=-inf", [*c, "--guidance=-inf"]), ("--guidance abc", [*c, "--guidance", "x"]),
        ("--guidance 1e308", [*c, "--guidance", "1e308", "--nfe", "3", "--num", "8"]),
        ("--guidance, unconditional", [*s, "--guidance", "2"]),
        ("--label, unconditional", [*s, "--label", "3"]),
        ("--label 99", [*c, "--label", "99"]), ("--label -1", [*c, "--label", "-1"]),
        ("--solver eulr", [*s, "--solver", "eulr"]), ("--solver dopri5", [*s, "--solver", "dopri5"]),
        ("--grid bogus", [*s, "--grid", "bogus", "--nfe", "3"]),
        ("--option etta=1", [*s, "--solver", "ddim", "--nfe", "4", "--option", "etta=1"]),
        ("--option no equals", [*s, "--solver", "ddim", "--option", "eta"]),
        ("--option bad YAML", [*s, "--solver", "ddim", "--option", "eta=[1"]),
        ("--option eta=nan", [*s, "--solver", "ddim", "--nfe", "4", "--option", "eta=nan"]),
        ("--seed 2**70", [*s, "--seed", str(2**70)]), ("--seed abc", [*s, "--seed", "abc"]),
        ("--tol nan", [*s, "--solver", "ddim", "--parallel", "picard", "--tol", "nan"]),
        ("--tol 0", [*s, "--solver", "ddim", "--parallel", "picard", "--tol", "0"]),
        ("--tol -1", [*s, "--solver", "ddim", "--parallel", "picard", "--tol", "-1"]),
        ("--parallel bogus", [*s, "--parallel", "bogus"]),
        ("--parallel with heun", [*s, "--parallel", "picard", "--nfe", "3"]),
        ("--parallel with --option", [*s, "--solver", "ddim", "--parallel", "picard",
                                      "--option", "eta=0"]),
        ("--negative missing", [*s, "--negative", "/no/such/run", "--guidance", "1"]),
        ("--negative without --guidance", [*s, "--negative", "@RUN"]),
        ("--negative of another shape", [*s, "--negative", "@COND", "--guidance", "1",
                                         "--nfe", "3"]),
        ("--option params missing file", [*s, "--solver", "bespoke", "--nfe", "4", "--option",
                                          "params=/no/such.safetensors"]),
        ("--option ems garbage", [*s, "--solver", "dpm_solver_v3", "--nfe", "6", "--option",
                                  "ems=@FX/data/npz_garbage.npz"]),
    ]
    cases = [Case(g, n, a) for n, a in sample]
    g = "fit-solver arguments"
    f = ["fit-solver", "@RUN", "--num-noises", "8", "--steps", "1"]
    fit = [
        ("no --out", [*f, "--nfe", "4"]),
        ("--out not .safetensors", [*f, "--nfe", "4", "--out", "x.txt"]),
        ("--nfe 0", [*f, "--nfe", "0", "--out", "x.safetensors"]),
        ("--nfe missing", [*f, "--out", "x.safetensors"]),
        ("midpoint odd --nfe", [*f, "--nfe", "3", "--out", "x.safetensors"]),
        ("--base bogus", [*f, "--nfe", "4", "--base", "bogus", "--out", "x.safetensors"]),
        ("--loss bogus", [*f, "--nfe", "4", "--loss", "bogus", "--out", "x.safetensors"]),
        ("--lipschitz nan", [*f, "--nfe", "4", "--loss", "bound", "--lipschitz", "nan",
                             "--out", "x.safetensors"]),
        ("--lipschitz without bound", [*f, "--nfe", "4", "--lipschitz", "1",
                                       "--out", "x.safetensors"]),
        ("--loss with bns", [*f, "--nfe", "4", "--kind", "bns", "--loss", "bound",
                             "--out", "x.safetensors"]),
        ("--num-noises 1", ["fit-solver", "@RUN", "--nfe", "4", "--num-noises", "1",
                            "--out", "x.safetensors"]),
        ("--steps 0", ["fit-solver", "@RUN", "--nfe", "4", "--steps", "0",
                       "--out", "x.safetensors"]),
        ("--option with bespoke", [*f, "--nfe", "4", "--option", "eta=1",
                                   "--out", "x.safetensors"]),
        ("grid auto nelder_mead", [*f, "--nfe", "4", "--kind", "grid", "--method", "nelder_mead",
                                   "--out", "x.safetensors"]),
        ("grid bad option", [*f, "--nfe", "4", "--kind", "grid", "--base", "unipc", "--option",
                             "bogus=1", "--out", "x.safetensors"]),
        ("bns impossible nfe", [*f, "--nfe", "4", "--kind", "bns", "--base", "heun",
                                "--out", "x.safetensors"]),
        ("--seed abc", [*f, "--nfe", "4", "--seed", "abc", "--out", "x.safetensors"]),
        ("--label unconditional", [*f, "--nfe", "4", "--label", "1", "--out", "x.safetensors"]),
    ]
    cases += [Case(g, n, a, work_marker="computing") for n, a in fit]
    g = "likelihood / invert arguments"
    other = [
        ("likelihood --num 0", ["likelihood", "@RUN", "--num", "0"]),
        ("likelihood --steps 0", ["likelihood", "@RUN", "--steps", "0"]),
        ("likelihood --steps -1", ["likelihood", "@RUN", "--steps", "-1"]),
        ("likelihood --solver bogus", ["likelihood", "@RUN", "--solver", "bogus"]),
        ("likelihood --probes 0", ["likelihood", "@RUN", "--probes", "0"]),
        ("likelihood --data of another shape", ["likelihood", "@RUN", "--data", "digits"]),
        ("likelihood --data missing", ["likelihood", "@RUN", "--data", "/no/such.csv"]),
        ("likelihood --seed abc", ["likelihood", "@RUN", "--seed", "abc"]),
        ("invert --nfe 0", ["invert", "@RUN", "--nfe", "0"]),
        ("invert --num -1", ["invert", "@RUN", "--num", "-1"]),
        ("invert stochastic solver", ["invert", "@RUN", "--solver", "ddpm"]),
        ("invert --solver bogus", ["invert", "@RUN", "--solver", "bogus"]),
        ("invert --data of another shape", ["invert", "@RUN", "--data", "digits"]),
        ("invert --data bad csv", ["invert", "@RUN", "--data", "@FX/data/csv_text.csv"]),
        ("bench unknown suite", ["bench", "nosuchsuite"]),
        ("bench without a suite", ["bench"]),
        ("demo unknown flag", ["demo", "--fast"]),
    ]
    cases += [Case(g, n, a) for n, a in other]
    return cases


def distill_cases() -> list[Case]:
    """The ``distill`` subcommand joins the table once it is in the CLI."""
    from tiltflow.cli import COMMANDS

    if "distill" not in COMMANDS:
        return []
    g = "distill"
    return [Case(g, "no arguments", ["distill"]),
            Case(g, "unknown method", ["distill", "--method", "bogus", "--teacher", "@RUN",
                                       "--out", "d"]),
            Case(g, "teacher missing", ["distill", "--method", "reflow", "--teacher",
                                        "/no/such/run", "--out", "d"]),
            Case(g, "teacher damaged", ["distill", "--method", "reflow", "--teacher",
                                        "@FX/bad/nan_ema", "--out", "d"]),
            Case(g, "out is a file", ["distill", "--method", "reflow", "--teacher", "@RUN",
                                      "--out", "afile"], _touch("afile")),
            Case(g, "out on /proc", ["distill", "--method", "reflow", "--teacher", "@RUN",
                                     "--out", "/proc/tiltflow_d"])]


def control_cases() -> list[Case]:
    """Valid edge inputs: must succeed (exit 0), so refusing is not bought by refusing too much."""
    g = "controls (valid)"
    return [
        Case(g, "sample small", ["sample", "@RUN", "--nfe", "3", "--num", "8", "--out", "s"],
             expect=0),
        Case(g, "sample --num 100000", ["sample", "@RUN", "--solver", "euler", "--nfe", "2",
                                        "--num", "100000", "--out", "s"], expect=0),
        Case(g, "sample --seed -1 into a new folder", ["sample", "@RUN", "--nfe", "3", "--num",
                                                      "8", "--seed", "-1", "--out", "new/sub/s"],
             expect=0),
        Case(g, "sample overwrites its own output", ["sample", "@RUN", "--nfe", "3", "--num", "8",
                                                     "--out", "s"], _touch("s.npy"), expect=0),
        Case(g, "sample conditional with guidance", ["sample", "@COND", "--label", "1",
                                                     "--guidance", "1.5", "--nfe", "3",
                                                     "--num", "4", "--out", "s"], expect=0),
        Case(g, "likelihood", ["likelihood", "@RUN", "--num", "8", "--steps", "2",
                               "--out", "lp"], expect=0),
        Case(g, "invert", ["invert", "@RUN", "--num", "8", "--nfe", "2", "--out", "n"], expect=0),
        Case(g, "fit-solver", ["fit-solver", "@RUN", "--nfe", "4", "--num-noises", "8",
                               "--steps", "1", "--out", "x.safetensors"], expect=0),
        Case(g, "train small", _train(), expect=0),
        Case(g, "train --resume, same config", ["train"]
             + [a for a in TINY if not a.startswith("train.steps")]
             + ["train.steps=9", "train.out_dir=@CASE/run", "--resume"], _copy_run("run"),
             expect=0),
    ]


def all_cases() -> list[Case]:
    return (global_cases() + config_cases() + data_cases() + size_cases() + output_cases()
            + checkpoint_cases() + resume_cases() + argument_cases() + distill_cases()
            + control_cases())


# -- fixtures ----------------------------------------------------------------------------------

def _cli_command() -> list[str]:
    """The real console script next to this interpreter, else ``python -m tiltflow.cli``."""
    script = Path(sys.executable).with_name("tiltflow")
    return [str(script)] if script.exists() else [sys.executable, "-m", "tiltflow.cli"]


def _train_fixture(out: Path, args: list[str]) -> None:
    res = subprocess.run([*_cli_command(), "train", *args, f"train.out_dir={out}"],
                         capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"fixture training failed: {res.stderr[-2000:]}")


def _latest(run: Path) -> Path:
    return run / (run / "latest").read_text().strip()


def _rehash(step: Path, name: str) -> None:
    import hashlib

    state = json.loads((step / "state.json").read_text())
    state["files"][name] = hashlib.sha256((step / name).read_bytes()).hexdigest()
    (step / "state.json").write_text(json.dumps(state))


def _edit_tensors(step: Path, name: str, fn) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = fn(dict(load_file(step / name)))
    save_file(tensors, step / name, metadata={"tiltflow": name.split(".")[0], "format": "pt"})
    _rehash(step, name)


def _edit_state(step: Path, fn) -> None:
    state = json.loads((step / "state.json").read_text())
    fn(state)
    (step / "state.json").write_text(json.dumps(state))


def _first_weight(t: dict) -> str:
    return next(k for k, v in t.items() if v.ndim == 2)


def _set(t: dict, value: float) -> dict:
    """The first weight matrix with its first entry set to ``value``."""
    k = _first_weight(t)
    a = t[k].copy()
    a.flat[0] = value
    return {**t, k: a}


def _data_pos(s):
    s["data_position"]["index"] = 10**9


def _rng(s):
    s["rng"]["per_rank"][0]["global"]["torch"] = "AAAA"


def _drop_shape(s):
    s["config"]["run"]["data"].pop("shape")


def _truncate(step: Path, name: str, keep_hash: bool) -> None:
    data = (step / name).read_bytes()
    (step / name).write_bytes(data[: len(data) // 2])
    if not keep_hash:
        _rehash(step, name)


#: damaged copies of the 2-D run: name -> edit of its latest step directory
CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "nan_ema": lambda s: _edit_tensors(s, "ema.safetensors", lambda t: _set(t, np.nan)),
    "inf_ema": lambda s: _edit_tensors(s, "ema.safetensors", lambda t: _set(t, np.inf)),
    "nan_model": lambda s: _edit_tensors(s, "model.safetensors", lambda t: _set(t, np.nan)),
    "inf_model": lambda s: _edit_tensors(s, "model.safetensors", lambda t: _set(t, np.inf)),
    "huge_weights": lambda s: _edit_tensors(
        s, "ema.safetensors", lambda t: {k: v * np.float32(1e30) for k, v in t.items()}),
    "shape_mismatch": lambda s: _edit_tensors(
        s, "ema.safetensors", lambda t: {**t, _first_weight(t): t[_first_weight(t)][:, :-1]}),
    "missing_tensor": lambda s: _edit_tensors(
        s, "ema.safetensors", lambda t: {k: v for k, v in t.items() if k != _first_weight(t)}),
    "extra_tensor": lambda s: _edit_tensors(
        s, "ema.safetensors", lambda t: {**t, "bogus.weight": np.zeros((3, 3), np.float32)}),
    "config_width": lambda s: _edit_state(
        s, lambda st: st["config"]["run"]["config"].setdefault("model", {}).update(hidden=64)),
    "config_unknown_net": lambda s: _edit_state(
        s, lambda st: st["config"]["run"]["config"].update(model={"name": "resnet"})),
    "missing_shape": lambda s: _edit_state(s, _drop_shape),
    "shape_not_a_list": lambda s: _edit_state(
        s, lambda st: st["config"]["run"]["data"].update(shape="abc")),
    "num_classes_negative": lambda s: _edit_state(
        s, lambda st: st["config"]["run"]["data"].update(num_classes=-1)),
    "kind_not_a_string": lambda s: _edit_state(
        s, lambda st: st["config"]["run"]["data"].update(kind=5)),
    "no_run_config": lambda s: _edit_state(s, lambda st: st["config"].pop("run")),
    "truncated": lambda s: _truncate(s, "ema.safetensors", keep_hash=False),
    "checksum_mismatch": lambda s: _truncate(s, "ema.safetensors", keep_hash=True),
    "garbage_weights": lambda s: ((s / "model.safetensors").write_bytes(b"\x00" * 64),
                                  _rehash(s, "model.safetensors")),
    "state_not_json": lambda s: (s / "state.json").write_text("{not json"),
    "state_a_list": lambda s: (s / "state.json").write_text("[1, 2]"),
    "state_no_step": lambda s: _edit_state(s, lambda st: st.pop("step")),
    "model_file_deleted": lambda s: (s / "model.safetensors").unlink(),
    "optimizer_json": lambda s: ((s / "optimizer.json").write_text("{\"state\": 3"),
                                 _rehash(s, "optimizer.json")),
    "optimizer_nan": lambda s: _edit_tensors(
        s, "optimizer.safetensors", lambda t: {k: (v * np.nan if v.ndim else v)
                                               for k, v in t.items()}),
    "rng_damaged": lambda s: _edit_state(s, _rng),
    "data_position": lambda s: _edit_state(s, _data_pos),
    "no_step_dirs": lambda s: [shutil.rmtree(p) for p in s.parent.glob("step_*")],
}


#: damage that sampling does not read (the raw weights, optimizer, RNG and data position)
RESUME_ONLY = {"nan_model", "inf_model", "optimizer_nan", "rng_damaged", "data_position"}


def _damaged_runs(fx: Path) -> None:
    for name, edit in CORRUPTIONS.items():
        dst = fx / "bad" / name
        shutil.copytree(fx / "run", dst)
        edit(_latest(dst))


def _write_png(path: Path, size: int = 8, mode: str = "L") -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size, size) if mode == "L" else (size, size, 3)
    Image.fromarray((rng.random(shape) * 255).astype(np.uint8), mode=mode).save(path)


def _data_files(d: Path) -> None:
    """One bad file (or folder) per way a data set can be wrong, plus a few good ones."""
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    good = np.column_stack([rng.normal(size=50), rng.normal(size=50)])
    np.savetxt(d / "csv_good.csv", good, delimiter=",", header="a,b", comments="")
    texts = {"csv_text.csv": "a,b\n1,2\n3,hello\n", "csv_empty.csv": "",
             "csv_header_only.csv": "a,b\n", "csv_ragged.csv": "a,b\n1,2\n3\n",
             "csv_missing.csv": "a,b\n1,2\n3,\n", "csv_inf.csv": "a,b\n1,2\n3,inf\n",
             "csv_nan.csv": "a,b\n1,2\nnan,4\n", "csv_label_only.csv": "y\n1\n2\n",
             "npy_text.npy": "just text, not an array\n", "data.txt": "1,2\n"}
    for name, text in texts.items():
        (d / name).write_text(text)
    (d / "csv_binary.csv").write_bytes(bytes(range(256)) * 4)
    np.save(d / "npy_object.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.save(d / "npy_empty.npy", np.zeros((0, 2)))
    np.save(d / "npy_nan.npy", np.array([[1.0, np.nan], [2.0, 3.0]]))
    np.save(d / "npy_5d.npy", np.zeros((2, 2, 2, 2, 2)))
    np.save(d / "npy_strings.npy", np.array(["a", "b"]))
    np.save(d / "npy_images.npy", rng.random((6, 1, 8, 8)))
    np.save(d / "npy_truncated.npy", good)
    raw = (d / "npy_truncated.npy").read_bytes()
    (d / "npy_truncated.npy").write_bytes(raw[: len(raw) // 2])
    np.savez(d / "npz_several.npz", a=good, b=good)
    np.savez(d / "npz_y_and_labels.npz", x=good, y=np.zeros(50, int), labels=np.zeros(50, int))
    np.savez(d / "npz_no_data.npz", y=np.zeros(50, int))
    np.savez(d / "npz_label_shape.npz", x=good, y=np.zeros(7, int))
    np.savez(d / "npz_label_negative.npz", x=good, y=-np.ones(50, int))
    np.savez(d / "npz_label_float.npz", x=good, y=np.full(50, 0.5))
    (d / "npz_garbage.npz").write_bytes(b"PK\x03\x04garbage" * 10)
    (d / "img_empty").mkdir()
    _write_png(d / "img_corrupt" / "a.png")
    (d / "img_corrupt" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    _write_png(d / "img_sizes" / "a.png", 8)
    _write_png(d / "img_sizes" / "b.png", 9)
    _write_png(d / "img_mixed_levels" / "top.png")
    _write_png(d / "img_mixed_levels" / "cat" / "a.png")
    (d / "img_no_images").mkdir()
    (d / "img_no_images" / "notes.txt").write_text("no images here")
    _write_png(d / "img_flat" / "a.png")
    _write_png(d / "img_flat" / "b.png")


def _fixtures(fx: Path) -> None:
    _train_fixture(fx / "run", TINY)
    _train_fixture(fx / "cond", ["data=digits", "model.base_channels=8", "train.steps=2",
                                 "train.batch_size=16", "train.log_every=1",
                                 "train.warmup_steps=0"])
    _damaged_runs(fx)
    _data_files(fx / "data")


class _Mounts:
    """A read-only tmpfs and a 64 KB one (a full disk), when this machine lets us mount."""

    def __init__(self, root: Path):
        self.root, self.ro, self.full = root, root / "ro", root / "full"
        self.ok = self._mount(self.ro, "ro,size=64k") and self._mount(self.full, "size=64k")
        if self.ok:
            self._fill(self.full)

    @staticmethod
    def _fill(path: Path) -> None:
        """Fill the disk: creating a file still works, writing its first bytes fails (ENOSPC)."""
        try:
            with open(path / ".filler", "wb") as f:
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
        except OSError:
            pass

    @staticmethod
    def _mount(path: Path, options: str) -> bool:
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0 or not shutil.which("mount"):
            return False
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                             capture_output=True)
        return res.returncode == 0

    def close(self) -> None:
        for p in (self.ro, self.full):
            subprocess.run(["umount", str(p)], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


# -- running one case --------------------------------------------------------------------------

@dataclass
class Outcome:
    rc: int
    out: str
    err: str
    seconds: float


def _drop_permission_override() -> None:
    """Root ignores file permissions (CAP_DAC_OVERRIDE): drop that capability, and
    CAP_DAC_READ_SEARCH, from this process and its bounding set (so an exec'd child lacks them
    too). Root keeps its uid, so the interpreter under /root stays readable."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capget(ctypes.byref(header), data) == 0:
        keep = ~0b110 & 0xFFFFFFFF
        data[0].effective &= keep
        data[0].permitted &= keep
        data[0].inheritable &= keep
        libc.capset(ctypes.byref(header), data)


def _limit_child(no_override: bool) -> None:
    """In the child: default SIGTERM, a capped address space; permission cases run without
    root's override."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_LIMIT, ADDRESS_LIMIT))
    if no_override and os.geteuid() == 0:
        _drop_permission_override()


def _run_forked(argv: list[str], cwd: Path, logs: Path, timeout: float,
                no_override: bool) -> Outcome:
    """``tiltflow.cli.main(argv)`` in a forked child with stdout / stderr in files: the console
    script's code path without a new interpreter (an uncaught exception prints its traceback
    and exits 1, as the interpreter would)."""
    out_path, err_path = logs / "out.txt", logs / "err.txt"
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.chdir(cwd)
            for fd, path in ((1, out_path), (2, err_path)):
                f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
                os.dup2(f, fd)
                os.close(f)
            _limit_child(no_override)
            from tiltflow.cli import main

            try:
                code = main(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
                code = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code if isinstance(code, int) else 1)
    rc = _wait(pid, timeout)
    return Outcome(rc, out_path.read_text(errors="replace"), err_path.read_text(errors="replace"),
                   time.perf_counter() - t0)


TIMED_OUT = 124


def _wait(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return TIMED_OUT
        time.sleep(0.01)


def _run_subprocess(argv: list[str], cwd: Path, timeout: float, no_override: bool) -> Outcome:
    t0 = time.perf_counter()
    try:
        res = subprocess.run([*_cli_command(), *argv], cwd=cwd, capture_output=True, text=True,
                             timeout=timeout, preexec_fn=lambda: _limit_child(no_override))
        rc, out, err = res.returncode, res.stdout, res.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = TIMED_OUT, str(e.stdout or ""), str(e.stderr or "")
    return Outcome(rc, out, err, time.perf_counter() - t0)


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with (size, mtime) for files, (-1, 0) for folders."""
    seen = {}
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            seen[os.path.join(folder, d)] = (-1, 0)
        for f in files:
            p = os.path.join(folder, f)
            try:
                st = os.lstat(p)
                seen[p] = (st.st_size, st.st_mtime_ns)
            except OSError:
                pass
    return seen


def _expand(argv: list[str], places: dict[str, str]) -> list[str]:
    out = []
    for a in argv:
        for token, value in places.items():
            a = a.replace(token, value)
        out.append(a)
    return out


def classify(case: Case, o: Outcome, new: list[str], changed: list[str]) -> dict:
    """The verdict on one outcome (see the module docstring)."""
    lines = [line for line in o.err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("tiltflow: error: ")]
    other = [line for line in lines if not line.startswith(("tiltflow: error: ", "note:"))]
    tb = "Traceback (most recent call last)" in o.err
    one_line = len(errors) == 1 and not other and lines[-1] == errors[0]
    work = bool(case.work_marker and case.work_marker in o.out)
    if case.expect == 0:
        clean = o.rc == 0 and not tb
    else:
        clean = o.rc == 2 and one_line and not tb and not new and not changed and not work
    return {"clean": clean, "traceback": tb, "wrong_exit": o.rc != case.expect,
            "multi_line": case.expect == 2 and o.rc == 2 and not one_line and not tb,
            "left_behind": len(new), "changed": len(changed), "work_before_check": work}


def run_case(case: Case, i: int, ws: Path, places: dict, logs: Path, mode: str,
             roots: list[Path]) -> dict:
    """Set up, snapshot, run (``fork`` or ``subprocess``), snapshot again, classify."""
    folder = ws / "cases" / f"{i:03d}_{mode}"
    folder.mkdir(parents=True)
    if case.setup:
        case.setup(folder, ws / "fx")
    argv = _expand(case.argv, {**places, "@CASE": str(folder)})
    before = {k: v for r in roots for k, v in _snapshot(r).items()}
    if mode == "fork":
        o = _run_forked(argv, folder, logs, case.timeout, case.no_override)
    else:
        o = _run_subprocess(argv, folder, case.timeout, case.no_override)
    after = {k: v for r in roots for k, v in _snapshot(r).items()}
    new = sorted(set(after) - set(before))
    changed = sorted(p for p in before if (p not in after or after[p] != before[p])
                     and before[p][0] >= 0)  # rewritten or removed files
    verdict = classify(case, o, new, changed)
    err_lines = [line for line in o.err.splitlines() if line.strip()]
    return {"id": i, "group": case.group, "case": case.name, "mode": mode, "expect": case.expect,
            "command": "tiltflow " + " ".join(argv).replace(str(ws), "$WS"), "rc": o.rc,
            **verdict, "seconds": round(o.seconds, 2),
            "message": (err_lines[-1] if err_lines else "").replace(str(ws), "$WS")[:300],
            "new_paths": [p.replace(str(ws), "$WS") for p in new[:3]]}


def _progress(i: int, n: int, row: dict) -> None:
    verdict = "clean" if row["clean"] else "NOT CLEAN"
    print(f"[{i + 1}/{n}] {row['group']}: {row['case']} ({row['mode']}): {verdict}",
          file=sys.stderr, flush=True)


def _subprocess_subset(cases: list[Case]) -> set[int]:
    """Each group's first three cases and every fifth case: the real console-script path."""
    chosen, per_group = set(), {}
    for i, c in enumerate(cases):
        per_group[c.group] = per_group.get(c.group, 0) + 1
        if per_group[c.group] <= 3 or i % 5 == 0:
            chosen.add(i)
    return chosen


# -- kills and resumes ---------------------------------------------------------------------------

KILL_STEPS = 150
KILL_ARGS = ["data=eight_gaussians", "data.n=512", "model.hidden=32", "model.depth=1",
             f"train.steps={KILL_STEPS}", "train.batch_size=64", "train.log_every=5",
             "train.ckpt_every=25", "train.warmup_steps=10"]
WEIGHT_FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors")


def _same_tensors(fa: Path, fb: Path) -> bool:
    """The two safetensors files hold the same tensors, bit for bit (their headers may list
    the metadata in another order)."""
    from safetensors.numpy import load_file

    if not (fa.is_file() and fb.is_file()):
        return False
    a, b = load_file(fa), load_file(fb)
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes()
        for k in a)


def _same_final(a: Path, b: Path) -> bool:
    fa, fb = a / f"step_{KILL_STEPS:06d}", b / f"step_{KILL_STEPS:06d}"
    return all(_same_tensors(fa / n, fb / n) for n in WEIGHT_FILES)


def _temporaries(run: Path) -> list[str]:
    return sorted(p.name for p in run.glob(".*") if p.name.startswith((".tmp_", ".latest.")))


def _loadable(run: Path, logs: Path) -> bool:
    """``load_checkpoint(run)`` succeeds, checked in a forked child (torch stays out of here)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            from tiltflow.checkpoint import load_checkpoint

            load_checkpoint(run)
            code = 0
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    return _wait(pid, 120) == 0


def _resume(run: Path) -> int:
    res = subprocess.run([*_cli_command(), "train", *KILL_ARGS, f"train.out_dir={run}",
                          "--resume"], capture_output=True, text=True, timeout=600)
    return res.returncode


def _signal_run(run: Path, sig: signal.Signals, twice: bool, delay: float) -> int:
    """Continue training the started run, wait for its next checkpoint plus ``delay`` s, send
    ``sig`` (twice: the second acts at once); returns the exit code."""
    first = (run / "latest").read_text()
    p = subprocess.Popen([*_cli_command(), "train", *KILL_ARGS, f"train.out_dir={run}",
                          "--resume"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while ((run / "latest").read_text() == first and p.poll() is None
           and time.monotonic() < deadline):
        time.sleep(0.005)
    time.sleep(delay)
    if p.poll() is None:
        p.send_signal(sig)
        if twice:
            time.sleep(0.002)
            if p.poll() is None:
                p.send_signal(sig)
    return p.wait(timeout=300)


class _OsProxy:
    """``os`` for tiltflow.checkpoint, whose ``rename`` calls ``before(src, dst)`` first."""

    def __init__(self, before):
        self._before = before

    def __getattr__(self, name):
        return getattr(os, name)

    def rename(self, src, dst):
        self._before(Path(src), Path(dst))
        return os.rename(src, dst)


def _install_kill(point: str, step_name: str) -> None:
    """In a child: SIGKILL this process at ``point`` of the write of ``step_name``."""
    import tiltflow.checkpoint as ck

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if point.startswith("before "):
        file = point.removeprefix("before ")
        real_write = ck._write_file

        def write(path, data):
            if path.parent.name.startswith(f".tmp_{step_name}_") and path.name == file:
                die()
            return real_write(path, data)

        ck._write_file = write
    elif point in ("rename", "swap"):
        def before_rename(src: Path, dst: Path):
            if dst.name == step_name and src.name.startswith(".tmp_step_") and (
                    point == "rename" or any(dst.parent.glob(f".tmp_old_{step_name}_*"))):
                die()

        ck.os = _OsProxy(before_rename)
    elif point == "pointer":
        real_pointer = ck._write_pointer

        def pointer(run_dir, name):
            if name == step_name:
                die()
            return real_pointer(run_dir, name)

        ck._write_pointer = pointer
    elif point == "pruning":
        real_rmtree = shutil.rmtree

        class _Shutil:
            def __getattr__(self, name):
                return getattr(shutil, name)

            @staticmethod
            def rmtree(path, *a, **k):
                files = sorted(Path(path).glob("*"))
                if Path(path).name.startswith("step_") and files:
                    files[0].unlink()  # half-way through deleting an old checkpoint
                    die()
                return real_rmtree(path, *a, **k)

        ck.shutil = _Shutil()


def _killed_run(run: Path, point: str, step_name: str, logs: Path) -> int:
    """Continue training in a forked child that SIGKILLs itself at ``point``; its exit code."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for fd in (1, 2):
                f = os.open(logs / "kill.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
                os.dup2(f, fd)
                os.close(f)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            _install_kill(point, step_name)
            from tiltflow.cli import main

            code = main(["train", *KILL_ARGS, f"train.out_dir={run}", "--resume"])
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code if isinstance(code, int) else 1)
    return _wait(pid, 300)


WRITE_POINTS = ["before model.safetensors", "before ema.safetensors",
                "before optimizer.safetensors", "before optimizer.json", "before state.json",
                "rename", "pointer", "pruning"]


def resume_checks(ws: Path, logs: Path, quick: bool) -> list[dict]:
    """Signals at random moments and SIGKILL at every point of a checkpoint write, each
    followed by ``--resume`` to the end and compared bit for bit with an uninterrupted run.

    Every run continues a copy of one started run (its first checkpoint, step 25), so the
    comparison holds whatever the network's initialisation does."""
    root = ws / "kills"
    root.mkdir()
    start = root / "start"
    _train_fixture(start, [*KILL_ARGS, "train.steps=25"])

    def copy(name: str) -> Path:
        shutil.copytree(start, root / name)
        return root / name

    reference = copy("reference")
    if _resume(reference) != 0:
        raise RuntimeError("the uninterrupted reference run failed")
    rng = random.Random(0)
    rows = []

    def finish(kind: str, what: str, run: Path, first_rc: int, expected_rc: int) -> None:
        stale = _temporaries(run)
        loadable = _loadable(run, logs) if (run / "latest").exists() else None
        rc = _resume(run)
        rows.append({"kind": kind, "what": what, "first_rc": first_rc,
                     "expected_first_rc": expected_rc, "latest_loadable": loadable,
                     "temporaries_before_resume": stale, "resume_rc": rc,
                     "temporaries_after_resume": _temporaries(run),
                     "bitwise_equal": rc == 0 and _same_final(reference, run)})

    signals = [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGINT, True),
               (signal.SIGKILL, False)]
    repeats = 1 if quick else 3
    for sig, twice in signals:
        for r in range(repeats):
            run = copy(f"{sig.name.lower()}{'_twice' if twice else ''}_{r}")
            delay = rng.uniform(0.0, 0.4)
            rc = _signal_run(run, sig, twice, delay)
            expected = -signal.SIGKILL if sig == signal.SIGKILL else 130
            finish("signal", f"{sig.name}{' twice' if twice else ''} after {delay:.2f} s", run,
                   rc, expected)
    step_name = "step_000050"
    points = WRITE_POINTS[::3] if quick else WRITE_POINTS
    for point in points:
        run = copy(f"kill_{point.replace(' ', '_')}")
        rc = _killed_run(run, point, "step_000075" if point == "pruning" else step_name, logs)
        finish("kill in checkpoint write", point, run, rc, -signal.SIGKILL)
    # a re-save of an existing step (after a kill before the pointer), killed between its renames
    run = copy("kill_swap")
    _killed_run(run, "pointer", step_name, logs)
    rc = _killed_run(run, "swap", step_name, logs)
    finish("kill in checkpoint write", "between the two renames of a re-save", run, rc,
           -signal.SIGKILL)
    return rows


# -- the suite -----------------------------------------------------------------------------------

def _totals(rows: list[dict]) -> dict:
    bad = [r for r in rows if r["expect"] == 2]
    ctrl = [r for r in rows if r["expect"] == 0]
    return {"bad_inputs": len(bad), "clean": sum(r["clean"] for r in bad),
            "tracebacks": sum(r["traceback"] for r in bad),
            "wrong_exit_codes": sum(r["wrong_exit"] for r in bad),
            "multi_line_errors": sum(r["multi_line"] for r in bad),
            "cases_leaving_files": sum(r["left_behind"] > 0 for r in bad),
            "cases_changing_files": sum(r["changed"] > 0 for r in bad),
            "work_before_check": sum(r["work_before_check"] for r in bad),
            "controls": len(ctrl), "controls_ok": sum(r["clean"] for r in ctrl)}


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def run(quick: bool = False, results_dir: Path | None = None) -> dict:
    t_start = time.time()
    cases = all_cases()
    if quick:
        cases = cases[::4]
    ws = Path(tempfile.mkdtemp(prefix="tiltflow-reliability-"))
    logs = Path(tempfile.mkdtemp(prefix="tiltflow-reliability-logs-"))
    mounts = _Mounts(Path(tempfile.mkdtemp(prefix="tiltflow-reliability-mnt-")))
    clock = {"start": time.perf_counter()}
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so that `finally` unmounts
    try:
        _fixtures(ws / "fx")
        clock["fixtures"] = time.perf_counter()
        import tiltflow.cli  # noqa: F401  (imported once here: the forked children share it)
        import tiltflow.runs  # noqa: F401
        import tiltflow.solvers  # noqa: F401
        import tiltflow.train  # noqa: F401

        places = {"@RUN": str(ws / "fx" / "run"), "@COND": str(ws / "fx" / "cond"),
                  "@FX": str(ws / "fx"), "@RO": str(mounts.ro), "@FULL": str(mounts.full)}
        rows, skipped = [], []
        subset = _subprocess_subset(cases)
        for i, case in enumerate(cases):
            if case.needs_mount and not mounts.ok:
                skipped.append(case.name)
                continue
            roots = [ws, mounts.root] if mounts.ok else [ws]
            rows.append(run_case(case, i, ws, places, logs, "fork", roots))
            if i in subset:
                rows.append(run_case(case, i, ws, places, logs, "subprocess", roots))
            _progress(i, len(cases), rows[-1])
        clock["cases"] = time.perf_counter()
        kills = resume_checks(ws, logs, quick)
        clock["kills"] = time.perf_counter()
    finally:
        signal.signal(signal.SIGTERM, previous)
        mounts.close()
        shutil.rmtree(ws, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)
    fork_rows = [r for r in rows if r["mode"] == "fork"]
    sub_rows = [r for r in rows if r["mode"] == "subprocess"]
    by_id = {r["id"]: r for r in fork_rows}
    agree = sum(by_id[r["id"]]["clean"] == r["clean"] for r in sub_rows)
    groups = {}
    for r in fork_rows:
        groups.setdefault(r["group"], []).append(r)
    res = bench.result(
        "reliability", t_start, quick, rows,
        totals=_totals(fork_rows), subprocess_totals=_totals(sub_rows),
        subprocess_agreement={"cases": len(sub_rows), "same_verdict": agree},
        groups={g: _totals(rs) for g, rs in groups.items()},
        skipped=skipped, address_limit_bytes=ADDRESS_LIMIT,
        section_seconds={k: round(clock[k] - clock[prev], 1) for prev, k in
                         (("start", "fixtures"), ("fixtures", "cases"), ("cases", "kills"))},
        kills={"runs": len(kills), "bitwise_equal": sum(k["bitwise_equal"] for k in kills),
               "expected_exit": sum(k["first_rc"] == k["expected_first_rc"] for k in kills),
               "latest_loadable": sum(bool(k["latest_loadable"]) for k in kills),
               "temporaries_left_after_resume": sum(bool(k["temporaries_after_resume"])
                                                    for k in kills),
               "rows": kills})
    _write(res, results_dir)
    return res


def _write(res: dict, results_dir: Path | None) -> None:
    if results_dir is None:
        bench.write_results(res, markdown(res))
        return
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "reliability.json").write_text(json.dumps(res, indent=1) + "\n")
    (results_dir / "reliability.md").write_text(markdown(res))


def _count_row(name: str, t: dict) -> str:
    return (f"| {name} | {t['bad_inputs']} | {t['clean']} | {t['tracebacks']} | "
            f"{t['wrong_exit_codes']} | {t['multi_line_errors']} | {t['cases_leaving_files']} | "
            f"{t['cases_changing_files']} | {t['work_before_check']} |")


def markdown(res: dict) -> str:
    t, k = res["totals"], res["kills"]
    lines = [
        "# reliability suite", "", f"{bench.header(res)}.", "",
        "Bad inputs through the command line (forked `tiltflow.cli.main`; a subset also through "
        "the console script in a subprocess). *Clean* = exit 2, one stderr line "
        "`tiltflow: error: ...`, no traceback, nothing new or changed on disk, no expensive "
        "work before the failing check. Every child runs under a "
        f"{res['address_limit_bytes'] // 2**30} GiB address-space limit.", "",
        f"**{t['clean']} of {t['bad_inputs']} bad inputs clean**; valid controls: "
        f"{t['controls_ok']} of {t['controls']} succeed; console-script subset: "
        f"{res['subprocess_agreement']['same_verdict']} of {res['subprocess_agreement']['cases']}"
        " classified the same as in-process.", "",
        "| group | bad inputs | clean | tracebacks | wrong exit code | multi-line error | "
        "left files | changed files | work before check |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for g, gt in res["groups"].items():
        if gt["bad_inputs"]:
            lines.append(_count_row(g, gt))
    lines.append(_count_row("**all (in-process)**", t))
    lines.append(_count_row("console script subset", res["subprocess_totals"]))
    if res["skipped"]:
        lines += ["", f"Skipped (no tmpfs mount allowed here): {len(res['skipped'])} cases."]
    bad = [r for r in res["rows"] if not r["clean"]]
    if bad:
        lines += ["", "## Not clean", "", "| group | case | mode | exit | last stderr line |",
                  "| --- | --- | --- | --- | --- |"]
        for r in bad:
            msg = r["message"].replace("|", "\\|")
            lines.append(f"| {r['group']} | {r['case']} | {r['mode']} | {r['rc']} | {msg} |")
    lines += ["", "## Kills and resumes", "",
              f"{k['bitwise_equal']} of {k['runs']} interrupted runs resumed to weights, EMA "
              f"and optimizer state bitwise equal to an uninterrupted run; {k['expected_exit']} "
              f"exited as expected (130 after SIGINT / SIGTERM, killed by SIGKILL); latest "
              f"checkpoint loadable after {k['latest_loadable']}; runs with temporaries left "
              f"after the resume: {k['temporaries_left_after_resume']}.", "",
              "| interruption | when | exit | latest loads | temporaries before resume | "
              "after | bitwise equal |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in k["rows"]:
        lines.append(f"| {r['kind']} | {r['what']} | {r['first_rc']} | {r['latest_loadable']} | "
                     f"{len(r['temporaries_before_resume'])} | "
                     f"{len(r['temporaries_after_resume'])} | {r['bitwise_equal']} |")
    lines += ["", "## Cases", "", "| # | group | case | exit | clean | message |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in res["rows"]:
        if r["mode"] == "fork":
            msg = r["message"].replace("|", "\\|")
            lines.append(f"| {r['id']} | {r['group']} | {r['case']} | {r['rc']} | "
                         f"{'yes' if r['clean'] else '**no**'} | {msg} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="every 4th case, fewer kills")
    ap.add_argument("--results-dir", type=Path, default=None,
                    help="write reliability.json / .md here instead of benchmarks/results/")
    args = ap.parse_args(argv)
    res = run(quick=args.quick, results_dir=args.results_dir)
    print(json.dumps({"totals": res["totals"], "kills": {k: v for k, v in res["kills"].items()
                                                         if k != "rows"}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
