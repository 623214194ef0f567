"""memory: estimates made before allocating, and the machine's limit they are checked against."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tiltflow import memory
from tiltflow.errors import UserError


def test_format_bytes():
    assert memory.format_bytes(999) == "999 B"
    assert memory.format_bytes(1.5e9) == "1.5 GB"
    assert memory.format_bytes(6.4e22) == "64.0 ZB"
    assert memory.format_bytes(1e30) == "1.0e+06 YB"


def test_available_bytes_is_a_positive_number_with_its_source():
    limit, source = memory.available_bytes()
    assert limit is None or limit > 0
    assert isinstance(source, str) and source


def test_check_fits_names_the_estimate_the_limit_and_the_largest_part(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: (2_000_000_000, "RAM"))
    memory.check_fits(1e9, "x", "fix")  # fits: nothing happens
    with pytest.raises(UserError) as e:
        memory.check_fits(3e12, "sampling 10^12", "lower --num",
                          parts={"the states": 2.9e12, "the grid": 1e11})
    assert str(e.value) == ("sampling 10^12 needs about 3.0 TB of memory, mostly the states "
                            "(2.9 TB), more than the 2.0 GB this machine has (RAM); lower --num")


def test_count_parameters_allocates_nothing():
    """A network of 10^13 parameters is counted on the meta device, not built."""
    n = memory.count_parameters(lambda: nn.Sequential(nn.Linear(10**6, 10**7), nn.LayerNorm(4)))
    assert n == 10**13 + 10**7 + 8


def test_activation_bytes_measures_and_leaves_the_module_as_it_was():
    net = nn.Sequential(nn.Linear(4, 32), nn.Dropout(0.5), nn.Linear(32, 8))
    net[2].eval()  # mixed modes must survive the probe
    state = torch.random.get_rng_state()
    total, peak = memory.activation_bytes(lambda b: net(torch.zeros(b, 4)), net)
    assert (total, peak) == ((32 + 32 + 8) * 4, 32 * 4)  # float32, per example
    assert [m.training for m in net.modules()] == [True, True, True, False]
    assert torch.equal(torch.random.get_rng_state(), state)  # no dropout draws


def test_sampling_parts_grow_with_the_request():
    small = memory.sampling_parts((2,), 10, 10, 100.0)
    big = memory.sampling_parts((2,), 10**12, 10**10, 100.0, trajectory=True)
    assert sum(big.values()) > 1e15 > sum(small.values())
    assert any("trajectory" in k for k in big)
