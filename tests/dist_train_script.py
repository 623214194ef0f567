"""Helper for tests/test_train.py: a tiny model, two objectives, and a training entry point.

Run directly (one process, used for the SIGTERM test) or under
``accelerate launch --multi_gpu --num_processes 2`` (CPU: two gloo processes). Each process
writes its final network parameters to ``--dump/rank<r>.safetensors``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

import tiltflow
from tiltflow.config import TrainConfig
from tiltflow.train import TrainingInterrupted, train


class TinyNet(nn.Module):
    """A small time-conditioned MLP for 2-D data (with dropout: it exercises the global RNG)."""

    def __init__(self, dim: int = 2, hidden: int = 32, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x, t, cond=None):
        return self.net(torch.cat([x, t[:, None].to(x.dtype)], dim=1))


def make_model(seed: int = 0, dropout: float = 0.0, hidden: int = 32) -> tiltflow.Denoiser:
    torch.manual_seed(seed)
    return tiltflow.Denoiser(TinyNet(hidden=hidden, dropout=dropout),
                             tiltflow.schedules.RectifiedFlow(), "velocity")


def make_data(n: int = 100, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0]])
    pick = torch.randint(0, 3, (n,), generator=g)
    return centers[pick] + 0.3 * torch.randn(n, 2, generator=g)


def flow_matching_loss(model, batch, generator=None):
    """Rectified-flow velocity loss with t ~ U(0, 1) and Gaussian noise from ``generator``."""
    x = batch["x"]
    t = torch.rand(x.shape[0], generator=generator, device=x.device)
    noise = torch.randn(x.shape, generator=generator, device=x.device)
    x_t = (1 - t[:, None]) * x + t[:, None] * noise
    return (model(x_t, t, batch.get("cond")).velocity - (noise - x)).square().mean(dim=1)


def deterministic_loss(model, batch, generator=None):
    """The same loss with t and the 'noise' fixed functions of x: no random draws, so a
    multi-process run can be compared exactly with a single-process one."""
    x = batch["x"]
    t = 0.05 + 0.9 * torch.sigmoid(x.sum(dim=1))
    noise = torch.sin(3 * x).flip(1)
    x_t = (1 - t[:, None]) * x + t[:, None] * noise
    return (model(x_t, t, batch.get("cond")).velocity - (noise - x)).square().mean(dim=1)


OBJECTIVES = {"fm": flow_matching_loss, "det": deterministic_loss}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--objective", choices=sorted(OBJECTIVES), default="fm")
    p.add_argument("--dump", default=None)
    p.add_argument("--ckpt-every", type=int, default=0)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--ready-file", default=None, help="written once step 5 is done")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    callbacks, sample_every = [], 0
    if args.ready_file:
        def ready(info):
            Path(args.ready_file).write_text(str(info.step))
        callbacks, sample_every = [ready], 5
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch, lr=1e-3, warmup_steps=3,
                      log_every=args.log_every, ckpt_every=args.ckpt_every,
                      sample_every=sample_every, out_dir=args.out, ema_decay=0.9)
    model = make_model()
    try:
        result = train(model, OBJECTIVES[args.objective], make_data(), cfg,
                       resume=args.resume, callbacks=callbacks)
    except TrainingInterrupted as e:
        print(f"INTERRUPTED step={e.result.step}", flush=True)
        return 0
    if args.dump:
        from accelerate import PartialState
        from safetensors.torch import save_file

        rank = PartialState().process_index
        Path(args.dump).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in result.model.net.state_dict().items()},
                  str(Path(args.dump) / f"rank{rank}.safetensors"))
    print(f"DONE step={result.step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
