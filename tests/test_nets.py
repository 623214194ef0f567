"""Networks: shapes, conditioning semantics, trainability, errors, config round trip."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tiltflow import nets
from tiltflow.errors import UserError
from tiltflow.nets.embeddings import sinusoidal_embedding

SMALL = {
    "mlp": {"name": "mlp", "dim": 2, "hidden": 32, "depth": 2},
    "unet": {"name": "unet", "in_channels": 1, "base_channels": 8, "attention_head_dim": 8},
    "dit": {"name": "dit", "in_channels": 1, "image_size": 8, "hidden": 32, "depth": 2},
}

# (spec, input shape) for every network on every shape it accepts
CASES = [
    ({"name": "mlp", "dim": 2, "hidden": 32, "depth": 2}, (5, 2)),
    ({"name": "unet", "in_channels": 1, "base_channels": 16}, (5, 1, 8, 8)),
    ({"name": "unet", "in_channels": 3, "base_channels": 16}, (5, 3, 16, 16)),
    ({"name": "unet", "in_channels": 3, "base_channels": 8, "channel_mults": [1, 2, 2],
      "num_res_blocks": 2, "attention_resolutions": [2, 4], "dropout": 0.1}, (2, 3, 32, 32)),
    ({"name": "dit", "in_channels": 1, "image_size": 8, "hidden": 32, "depth": 2}, (5, 1, 8, 8)),
    ({"name": "dit", "in_channels": 3, "image_size": 16, "patch_size": 4, "hidden": 32,
      "depth": 2}, (5, 3, 16, 16)),
]


EPS32 = torch.finfo(torch.float32).eps


def _changed(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``b`` differs from ``a`` by more than float32 round-off: a forward pass through a few
    dozen layers keeps a relative error <~ 64 eps_32 (8e-6) of its output scale, while the
    effects tested here (0.05-scale random weights on every path) are >~ 1e-4 relative."""
    return bool((a - b).abs().max() > 64 * EPS32 * a.abs().max())


def _ids(case):
    return f"{case[0]['name']}-{'x'.join(map(str, case[1]))}"


def _perturb(net: torch.nn.Module, seed: int = 0) -> None:
    """Give the zero-initialised layers random weights so every path is active."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_output_shape_and_zero_init(case):
    spec, shape = case
    torch.manual_seed(0)
    net = nets.build(spec).eval()
    x = torch.randn(shape)
    out = net(x, torch.rand(shape[0]))
    assert out.shape == x.shape and out.dtype == x.dtype
    # zero-initialised output layer: the untrained network predicts exactly 0
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_conditional_shapes_and_null_label(case):
    spec, shape = case
    torch.manual_seed(0)
    net = nets.build({**spec, "num_classes": 3}).eval()
    _perturb(net)
    b = shape[0]
    x, t = torch.randn(shape), torch.rand(b)
    null = net(x, t, torch.full((b,), -1))
    assert null.shape == x.shape
    # cond=None means all-null: identical output
    assert torch.equal(net(x, t, None), null)
    # a real label changes the output; different labels give different outputs
    out0 = net(x, t, torch.zeros(b, dtype=torch.long))
    out2 = net(x, t, torch.full((b,), 2))
    assert _changed(null, out0)
    assert _changed(out0, out2)
    # labels act per example: a mixed batch equals the per-label results row by row
    mixed = torch.tensor([0, -1] * b)[:b]
    out_mixed = net(x, t, mixed)
    for i in range(b):
        ref = out0 if mixed[i] == 0 else null
        # another batch changes only reduction orders: float32 round-off (<~ 100 eps_32 of O(1))
        torch.testing.assert_close(out_mixed[i], ref[i], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_time_dependence_over_edm_range(name):
    """The output depends on t both on [0, 1] and on EDM's c_noise = log(sigma)/4 range."""
    torch.manual_seed(0)
    net = nets.build(SMALL[name]).eval()
    _perturb(net)
    shape = (1, 2) if name == "mlp" else (1, 1, 8, 8)
    x = torch.randn(shape)
    for a, b in ((0.3, 0.301), (-2.0, -1.9), (1.4, 1.5)):
        ya, yb = net(x, torch.tensor([a]), None), net(x, torch.tensor([b]), None)
        assert torch.isfinite(ya).all() and _changed(ya, yb)


def test_sinusoidal_embedding_resolves_both_ranges():
    t = torch.cat([torch.linspace(0, 1, 1001), torch.linspace(-2, 1.5, 351)])
    emb = sinusoidal_embedding(t, 128)
    assert emb.shape == (len(t), 128) and torch.isfinite(emb).all()
    # features of distinct times are distinct; norm of each row is sqrt(64) (cos^2 + sin^2)
    torch.testing.assert_close(emb.norm(dim=1), torch.full((len(t),), 8.0))
    # rows s = 1000 t apart by u have distance sqrt(sum_k 4 sin^2(w_k u / 2)), w_k = 1e4^(-k/64),
    # whatever t: no two of the 1001 times on [0, 1] may be closer than neighbours (u = 1), up
    # to float32 rounding of the arguments (<= 2 eps_32 * 1000 each; the distance moves by at
    # most 2 sqrt(128) times that)
    w = torch.exp(-math.log(1e4) * torch.arange(64, dtype=torch.float64) / 64)
    neighbours = float(torch.sqrt((4 * torch.sin(w / 2) ** 2).sum()))
    d = torch.cdist(emb[:1001], emb[:1001]) + torch.eye(1001) * 1e3
    assert d.min() >= neighbours - 2 * math.sqrt(128) * 2 * EPS32 * 1000
    assert sinusoidal_embedding(torch.zeros(3), 7).shape == (3, 7)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_all_parameters_get_gradients_and_loss_decreases(name):
    torch.manual_seed(0)
    spec = {**SMALL[name], "num_classes": 3}
    net = nets.build(spec)
    g = torch.Generator().manual_seed(1)
    shape = (12, 2) if name == "mlp" else (12, 1, 8, 8)
    x = torch.randn(shape, generator=g)
    t = torch.rand(12, generator=g)
    cond = torch.tensor([0, 1, 2, -1] * 3)  # every label and the null token
    target = torch.randn(shape, generator=g)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = (net(x, t, cond) - target).pow(2).mean()
        loss.backward()
        losses.append(loss.item())
        if len(losses) == 4:
            # after 3 steps the zero-init layers are non-zero, so every parameter has a gradient
            dead = [n for n, p in net.named_parameters()
                    if p.grad is None or p.grad.abs().max() == 0]
            assert not dead, f"parameters without gradient: {dead}"
        opt.step()
    assert losses[-1] < 0.75 * losses[0]


def test_unconditional_rejects_labels():
    net = nets.build(SMALL["mlp"])
    x, t = torch.randn(3, 2), torch.rand(3)
    net(x, t, torch.full((3,), -1))  # all-null is fine
    with pytest.raises(ValueError, match="unconditional"):
        net(x, t, torch.tensor([0, -1, -1]))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_bad_labels(name):
    net = nets.build({**SMALL[name], "num_classes": 3})
    shape = (2, 2) if name == "mlp" else (2, 1, 8, 8)
    x, t = torch.randn(shape), torch.rand(2)
    for bad in ([0, 3], [-2, 0]):
        with pytest.raises(ValueError, match="out of range"):
            net(x, t, torch.tensor(bad))
    with pytest.raises(TypeError, match="integer"):
        net(x, t, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        net(x, t, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="shape"):
        net(x, torch.rand(3), None)


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        nets.build(SMALL["mlp"])(torch.randn(2, 3), torch.rand(2))
    unet = nets.build({"name": "unet", "channel_mults": [1, 2, 2], "base_channels": 8})
    with pytest.raises(ValueError, match="divisible by 4"):
        unet(torch.randn(2, 1, 6, 8), torch.rand(2))
    with pytest.raises(ValueError, match="in_channels"):
        unet(torch.randn(2, 3, 8, 8), torch.rand(2))
    dit = nets.build(SMALL["dit"])
    with pytest.raises(ValueError, match="image_size"):
        dit(torch.randn(2, 1, 16, 16), torch.rand(2))
    with pytest.raises(ValueError, match="divisible"):
        nets.DiT(image_size=9, patch_size=2)
    with pytest.raises(ValueError, match="divisible"):
        nets.DiT(hidden=30, heads=4)


def test_build_round_trip_and_errors():
    assert nets.available() == ["dit", "mlp", "unet"]
    for spec, shape in CASES:
        torch.manual_seed(0)
        net = nets.build({**spec, "num_classes": 2})
        config = json.loads(json.dumps(net.config))  # JSON-serialisable
        assert config == net.config and config["name"] == spec["name"]
        twin = nets.build(config)
        assert twin.config == net.config
        twin.load_state_dict(net.state_dict())  # same architecture, strict load
        _perturb(net)
        twin.load_state_dict(net.state_dict())
        x, t, c = torch.randn(shape), torch.rand(shape[0]), torch.zeros(shape[0], dtype=torch.long)
        torch.testing.assert_close(twin.eval()(x, t, c), net.eval()(x, t, c))
    with pytest.raises(UserError, match="unknown network 'resnet'.*mlp"):
        nets.build({"name": "resnet"})
    with pytest.raises(UserError, match="unknown option.*'widht'"):
        nets.build({"name": "mlp", "dim": 2, "widht": 3})
    with pytest.raises(UserError, match="needs option.*dim"):
        nets.build({"name": "mlp"})
    with pytest.raises(UserError, match="no 'name'"):
        nets.build({"dim": 2})


def test_parameter_counts_are_reasonable():
    def count(net):
        return sum(p.numel() for p in net.parameters())

    assert count(nets.MLP(2)) < 1_500_000
    assert count(nets.UNet()) < 1_000_000
    assert count(nets.UNet(in_channels=3, num_classes=10)) < 1_000_000
    assert count(nets.DiT()) < 1_500_000
    assert count(nets.build(SMALL["mlp"])) < 20_000
