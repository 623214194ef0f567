"""Suite-wide settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The tests use tiny tensors; on the shared 2-core machines extra intra-op threads only
    add contention (measured up to 40x slower for a small MLP step)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-step CLI training run on eight_gaussians (a tiny MLP): a run folder for CLI tests."""
    from tiltflow.cli import main

    run_dir = tmp_path_factory.mktemp("run")
    assert main(["train", "data=eight_gaussians", "data.n=256", "model.hidden=16",
                 "model.depth=1", "train.steps=2", "train.batch_size=32", "train.ckpt_every=2",
                 "train.warmup_steps=0", f"train.out_dir={run_dir}"]) == 0
    return run_dir
