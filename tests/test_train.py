"""The training loop: bit-exact resume, NaN stop, SIGTERM, schedules, EMA, logs, distribution,
and a quality check against the exact eight-Gaussians target."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tiltflow import checkpoint as ck
from tiltflow.config import TrainConfig
from tiltflow.errors import UserError
from tiltflow.plots import grid_callback
from tiltflow.train import TrainingDiverged, ema_decay_at, ema_update, lr_at, train

sys.path.insert(0, str(Path(__file__).parent))
import dist_train_script as helper  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).parent / "dist_train_script.py"


def _cfg(out, **kw):
    base = dict(steps=20, batch_size=16, lr=1e-3, warmup_steps=3, log_every=5, ckpt_every=10,
                ema_decay=0.9, out_dir=str(out))
    base.update(kw)
    return TrainConfig(**base)


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _same_nested(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_nested(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_nested(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _assert_same_checkpoint(p, q):
    a, b = ck.load_checkpoint(p), ck.load_checkpoint(q)
    assert a.step == b.step
    assert _same_state(a.model, b.model), "parameters differ"
    assert _same_state(a.ema, b.ema), "EMA differs"
    assert _same_nested(a.optimizer, b.optimizer), "optimizer state differs"
    assert a.data_position == b.data_position
    assert a.rng == b.rng


# -- resume ------------------------------------------------------------------------------------

def test_resume_is_bit_exact(tmp_path):
    """2N steps in one go == N steps, stop, resume to 2N (parameters, EMA, optimizer, RNG,
    data position). 100 examples with batch 16: batches straddle epoch boundaries; dropout
    exercises the global RNG."""
    data = helper.make_data(100)
    n = 12
    full = train(helper.make_model(dropout=0.1), helper.flow_matching_loss, data,
                 _cfg(tmp_path / "full", steps=2 * n, ckpt_every=n))
    half = train(helper.make_model(dropout=0.1), helper.flow_matching_loss, data,
                 _cfg(tmp_path / "split", steps=n, ckpt_every=n))
    assert half.step == n
    resumed = train(helper.make_model(seed=123, dropout=0.1), helper.flow_matching_loss, data,
                    _cfg(tmp_path / "split", steps=2 * n, ckpt_every=n), resume=True)
    assert resumed.step == 2 * n and resumed.first_step == n + 1
    _assert_same_checkpoint(full.checkpoint, resumed.checkpoint)
    assert full.losses[n:] == resumed.losses  # the same per-step losses after the resume
    for p, q in zip(full.ema.parameters(), resumed.ema.parameters(), strict=True):
        assert torch.equal(p, q)
    # resume from an explicit step directory works too
    again = train(helper.make_model(seed=7, dropout=0.1), helper.flow_matching_loss, data,
                  _cfg(tmp_path / "again", steps=2 * n, ckpt_every=n),
                  resume=tmp_path / "full" / "step_000012")
    _assert_same_checkpoint(full.checkpoint, again.checkpoint)


def test_existing_run_needs_resume(tmp_path):
    data = helper.make_data(40)
    train(helper.make_model(), helper.flow_matching_loss, data, _cfg(tmp_path, steps=2))
    with pytest.raises(UserError, match="already holds checkpoints"):
        train(helper.make_model(), helper.flow_matching_loss, data, _cfg(tmp_path, steps=4))
    with pytest.raises(UserError, match="does not exist"):
        train(helper.make_model(), helper.flow_matching_loss, data, _cfg(tmp_path / "x"),
              resume=tmp_path / "nowhere")


# -- NaN ---------------------------------------------------------------------------------------

class NaNAt:
    """Flow-matching loss that turns NaN from call ``k`` on (call k happens in step k)."""

    def __init__(self, k):
        self.k, self.calls = k, 0

    def __call__(self, model, batch, generator=None):
        self.calls += 1
        loss = helper.flow_matching_loss(model, batch, generator)
        return loss + float("nan") if self.calls >= self.k else loss


def test_nan_loss_stops_naming_the_step_and_keeps_good_checkpoint(tmp_path):
    data = helper.make_data(100)
    with pytest.raises(TrainingDiverged, match=r"non-finite loss at step 23\b") as err:
        train(helper.make_model(), NaNAt(23), data,
              _cfg(tmp_path, steps=100, log_every=7, ckpt_every=10))
    assert err.value.step == 23
    assert err.value.last_checkpoint == tmp_path / "step_000020"
    assert "last good checkpoint: " + str(tmp_path / "step_000020") in str(err.value)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_000010", "step_000020"]
    good = ck.load_checkpoint(tmp_path)
    assert good.step == 20
    assert all(torch.isfinite(v).all() for v in good.model.values())
    # the good checkpoint equals a clean run's step 20
    clean = train(helper.make_model(), helper.flow_matching_loss, data,
                  _cfg(tmp_path / "clean", steps=20, log_every=7, ckpt_every=10))
    _assert_same_checkpoint(good.path, clean.checkpoint)


def test_nan_before_any_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged, match="step 2 .*none written yet"):
        train(helper.make_model(), NaNAt(2), helper.make_data(50), _cfg(tmp_path, steps=50))
    assert ck.find_latest(tmp_path) is None


# -- SIGTERM -----------------------------------------------------------------------------------

def test_sigterm_writes_clean_checkpoint_and_resume_matches(tmp_path):
    run, ready = tmp_path / "run", tmp_path / "ready"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--out", str(run), "--steps", "1000000",
         "--ready-file", str(ready), "--log-every", "1000"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    try:
        deadline = time.time() + 120
        while not ready.exists():
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "training subprocess did not start in 120 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    stopped = int(out.split("INTERRUPTED step=")[1].split()[0])
    assert stopped >= 5
    latest = ck.load_checkpoint(run)
    assert latest.step == stopped and not list(run.glob(".tmp_*"))

    # resume for 5 more steps == an uninterrupted run to the same step
    data = helper.make_data()
    cfg = dict(lr=1e-3, warmup_steps=3, log_every=5, ckpt_every=0, ema_decay=0.9)
    resumed = train(helper.make_model(), helper.flow_matching_loss, data,
                    _cfg(run, steps=stopped + 5, **cfg), resume=True)
    straight = train(helper.make_model(), helper.flow_matching_loss, data,
                     _cfg(tmp_path / "straight", steps=stopped + 5, **cfg))
    _assert_same_checkpoint(resumed.checkpoint, straight.checkpoint)


# -- schedules, EMA, logs, callbacks ------------------------------------------------------------

def test_warmup_and_cosine_lr():
    c = TrainConfig(lr=1.0, warmup_steps=4, steps=14)
    assert [lr_at(s, c) for s in range(1, 7)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    c = TrainConfig(lr=2.0, warmup_steps=4, steps=14, lr_schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(4, c) == 2.0
    assert math.isclose(lr_at(9, c), 2.0 * (0.1 + 0.9 * 0.5))  # half way: mean of max/min
    assert math.isclose(lr_at(14, c), 0.2) and math.isclose(lr_at(20, c), 0.2)
    assert lr_at(1, TrainConfig(lr=1.0, warmup_steps=0)) == 1.0


def test_lr_used_by_optimizer_and_tensorboard_written(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(tmp_path, steps=8, warmup_steps=5, log_every=1, lr=0.01)
    result = train(helper.make_model(), helper.flow_matching_loss, helper.make_data(50), cfg)
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and result.tensorboard_dir == tmp_path / "tensorboard"
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/steps_per_s"} <= set(
        acc.Tags()["scalars"])
    lrs = {e.step: e.value for e in acc.Scalars("train/lr")}
    assert all(math.isclose(lrs[s], lr_at(s, cfg), rel_tol=1e-6) for s in range(1, 9))
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert [pytest.approx(v, rel=1e-6) for v in result.losses] == losses
    assert "train:" not in capsys.readouterr().err  # no progress bar when stderr is not a TTY


def test_ema_update_formula(tmp_path):
    e, p = torch.randn(10), torch.randn(10)
    expected = 0.9 * e + 0.1 * p
    ema_update([e], [p], 0.9)
    torch.testing.assert_close(e, expected)
    c = TrainConfig(ema_decay=0.99)
    assert ema_decay_at(1, c) == 2 / 11 and ema_decay_at(10_000, c) == 0.99
    assert ema_decay_at(1, TrainConfig(ema_decay=0.5, ema_warmup=False)) == 0.5

    # inside the loop: ema_k = d_k ema_{k-1} + (1 - d_k) param_k, starting from the init
    seen = []
    model = helper.make_model()
    start = [q.detach().clone() for q in model.net.parameters()]

    def record(info):
        seen.append(([q.detach().cpu().clone() for q in info.model.net.parameters()],
                     [q.detach().cpu().clone() for q in info.ema.net.parameters()]))

    cfg = _cfg(tmp_path, steps=4, sample_every=1, ema_decay=0.5)
    train(model, helper.flow_matching_loss, helper.make_data(50), cfg, callbacks=[record])
    ema = start
    for k, (params, ema_k) in enumerate(seen, start=1):
        d = ema_decay_at(k, cfg)
        ema = [d * a + (1 - d) * b for a, b in zip(ema, params, strict=True)]
        for a, b in zip(ema, ema_k, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_callbacks_write_grids_without_changing_the_run(tmp_path):
    data = helper.make_data(60)

    def draw(info):  # uses the global RNG on purpose
        x = torch.randn(64, 2).to(next(info.ema.parameters()).device)
        return info.ema(x, torch.full((64,), 0.5, device=x.device)).data

    images = grid_callback(lambda info: torch.rand(4, 1, 8, 8) * 2 - 1, name="img")
    with_cb = train(helper.make_model(dropout=0.1), helper.flow_matching_loss, data,
                    _cfg(tmp_path / "a", steps=10, sample_every=5),
                    callbacks=[grid_callback(draw), images])
    without = train(helper.make_model(dropout=0.1), helper.flow_matching_loss, data,
                    _cfg(tmp_path / "b", steps=10, sample_every=5))
    pngs = sorted(p.name for p in (tmp_path / "a" / "samples").iterdir())
    assert pngs == ["img_step_000005.png", "img_step_000010.png",
                    "samples_step_000005.png", "samples_step_000010.png"]
    assert all((tmp_path / "a" / "samples" / n).read_bytes()[:4] == b"\x89PNG" for n in pngs)
    _assert_same_checkpoint(with_cb.checkpoint, without.checkpoint)


# -- distributed -------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_run_matches_single_process(tmp_path):
    """accelerate launch, 2 gloo processes on CPU, global batch 16 = 2 x 8: ranks stay in sync
    and match one process with batch 16 (deterministic objective; tolerance: float32
    reduction order, ~1e-7 relative per step, over 20 Adam steps)."""
    launcher = Path(sys.executable).parent / "accelerate"
    if not launcher.exists() or not torch.distributed.is_available() or \
            not torch.distributed.is_gloo_available():
        pytest.skip("accelerate's launcher or torch.distributed gloo is not available here")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"),
               CUDA_VISIBLE_DEVICES="")
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()),
           str(SCRIPT), "--out", str(tmp_path / "dist"), "--dump", str(tmp_path / "dump"),
           "--objective", "det", "--steps", "20", "--batch", "16", "--ckpt-every", "10"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("DONE step=20") == 2

    from safetensors.torch import load_file

    r0 = load_file(str(tmp_path / "dump" / "rank0.safetensors"))
    r1 = load_file(str(tmp_path / "dump" / "rank1.safetensors"))
    assert _same_state(r0, r1), "ranks drifted apart"
    saved = ck.load_checkpoint(tmp_path / "dist")
    assert saved.step == 20 and _same_state(saved.model, r0)
    assert len(saved.rng["per_rank"]) == 2 and saved.config["world_size"] == 2

    single = train(helper.make_model(), helper.deterministic_loss, helper.make_data(),
                   _cfg(tmp_path / "single", steps=20, ckpt_every=10))
    for k, v in single.model.net.state_dict().items():
        torch.testing.assert_close(r0[k], v.cpu(), rtol=1e-5, atol=1e-6)


# -- quality -----------------------------------------------------------------------------------

def test_flow_matching_mlp_reaches_noise_floor_on_eight_gaussians(tmp_path):
    """A flow-matching MLP on eight_gaussians: sliced W2 of 2,000 samples (Heun, 32 steps from
    the EMA) within 2x the noise floor of 2,000 exact samples."""
    import tiltflow
    from tiltflow import analytic, metrics, nets, objectives

    gmm = analytic.eight_gaussians()
    data = gmm.sample(20_000, generator=torch.Generator().manual_seed(0)).float()
    torch.manual_seed(0)
    net = nets.build({"name": "mlp", "dim": 2, "hidden": 128, "depth": 3})
    den = tiltflow.Denoiser(net, tiltflow.schedules.RectifiedFlow(), "velocity")
    cfg = TrainConfig(steps=3000, batch_size=256, lr=2e-3, warmup_steps=100, ema_decay=0.995,
                      lr_schedule="cosine", log_every=100, ckpt_every=0, out_dir=str(tmp_path))
    t0 = time.time()
    result = train(den, objectives.get("flow_matching"), data, cfg)
    train_s = time.time() - t0
    n = 2000
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
    samples = tiltflow.sample(result.ema, noise, solver="heun", steps=32)
    sw2 = metrics.sliced_w2(samples, gmm.sample(n, generator=torch.Generator().manual_seed(2)))
    floor = metrics.noise_floor("sw2", lambda k, g: gmm.sample(k, generator=g), n).mean
    print(f"\nquality: sw2={sw2:.4f} floor={floor:.4f} ratio={sw2 / floor:.2f} "
          f"train={train_s:.1f}s")
    assert sw2 <= 2 * floor, f"sliced W2 {sw2:.4f} > 2 x noise floor {floor:.4f}"
