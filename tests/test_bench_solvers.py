"""The ``solvers`` benchmark's core on a tiny setting: the peer adapters target the same ODE.

A peer wired to the wrong time convention, start state or prediction kind would not converge
to the reference solution of the PF-ODE; correctly wired, its endpoint error falls with NFE.
"""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "solvers_suite.py"


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("tiltflow_bench_solvers_test", SUITE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _errors(rows, role):
    out = {}
    for r in rows:
        if r["role"] == role and r["metric"] == "endpoint_rmse":
            out.setdefault(r["method"], {})[r["extra"]["nfe_target"]] = (r["nfe"], r["value"])
    return out


def test_ours_converge_and_nfe_is_exact(suite):
    torch.set_num_threads(1)
    rows, _, info = suite.endpoint_errors("anisotropic_2d", "rectified_flow", nfes=(4, 16),
                                          n_points=48, ours=["euler", "heun"],
                                          grid_names=("uniform",), peers=[], check_points=16)
    assert info["skipped"] == []
    errs = _errors(rows, "ours")
    assert errs["euler"][4][0] == 4 and errs["euler"][16][0] == 16
    assert errs["heun"][4][0] == 3 and errs["heun"][16][0] == 15  # 2n - 1, run at N - 1
    for name, cells in errs.items():
        assert cells[16][1] < 0.5 * cells[4][1], (name, cells)
    # the reference agrees with an independent RK4 far below any solver error
    assert rows[0]["floor"] < 1e-6


def test_diffusers_peers_converge_and_ddim_matches_ours(suite):
    pytest.importorskip("diffusers")
    torch.set_num_threads(1)
    peers = ["diffusers DDIM", "diffusers DPM++2M", "diffusers Euler", "diffusers Heun",
             "diffusers DEIS"]
    rows, _, info = suite.endpoint_errors("anisotropic_2d", "vp_discrete_linear", nfes=(4, 16),
                                          n_points=48, ours=["ddim"], grid_names=("uniform",),
                                          peers=peers, check_points=16)
    assert info["skipped"] == []
    errs = _errors(rows, "peer")
    for name in peers:
        (n4, e4), (n16, e16) = errs[name][4], errs[name][16]
        assert (n4, n16) == ((3, 15) if name == "diffusers Heun" else (4, 16)), name
        assert math.isfinite(e4) and e16 < 0.6 * e4, (name, e4, e16)
    # trailing spacing at 4 steps is tiltflow's uniform grid exactly: same DDIM map (float32)
    ours = _errors(rows, "ours")["ddim"][4][1]
    assert abs(errs["diffusers DDIM"][4][1] - ours) < 1e-4 * max(ours, 1.0)
    assert abs(errs["diffusers Euler"][4][1] - ours) < 1e-4 * max(ours, 1.0)


def test_flow_matching_peers_converge_and_match_ours(suite):
    pytest.importorskip("flow_matching")
    torch.set_num_threads(1)
    peers = ["flow_matching euler", "flow_matching midpoint"]
    rows, _, _ = suite.endpoint_errors("anisotropic_2d", "rectified_flow", nfes=(4, 16),
                                       n_points=48, ours=["euler"], grid_names=("uniform",),
                                       peers=peers, check_points=16)
    errs = _errors(rows, "peer")
    for name in peers:
        assert errs[name][16][1] < 0.6 * errs[name][4][1], (name, errs[name])
    # same method, same grid, same start: flow_matching's Euler is tiltflow's Euler
    ours = _errors(rows, "ours")["euler"]
    for n in (4, 16):
        assert errs["flow_matching euler"][n][1] == pytest.approx(ours[n][1], rel=1e-9)
