"""Capture a whole tiltflow sampling loop in one CUDA graph and replay it (needs CUDA).

The solvers precompute every coefficient as python floats and never sync, so the loop is
static and capturable. Checks replay == eager for several solvers and times both.

    python benchmarks/cuda_graph_check.py
"""

import time

import torch

import tiltflow as tf
from tiltflow import nets
from tiltflow import schedules as S


def main():
    dev = torch.device("cuda")
    torch.manual_seed(0)
    net = nets.build({"name": "unet", "in_channels": 1, "base_channels": 32}).to(dev).eval()
    den = tf.Denoiser(net, S.RectifiedFlow(), "velocity")
    noise = torch.randn(256, 1, 8, 8, device=dev)
    for name, steps in (("euler", 10), ("dpmpp_2m", 10), ("unipc", 10), ("heun", 5)):
        grid = tf.solvers.grids.uniform(steps)
        with torch.no_grad():
            eager = tf.solvers.solve(den, noise, grid, name)
            static_in = noise.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
                for _ in range(2):
                    tf.solvers.solve(den, static_in, grid, name)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = tf.solvers.solve(den, static_in, grid, name)
            graph.replay()
            torch.cuda.synchronize()
            err = (static_out - eager).abs().max().item()

            def timed(fn, n=20):
                fn()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                torch.cuda.synchronize()
                return (time.perf_counter() - t0) / n * 1e3

            t_eager = timed(lambda: tf.solvers.solve(den, noise, grid, name))  # noqa: B023
            t_graph = timed(graph.replay)
        print(f"{name:9s} steps={steps:3d} max|graph-eager|={err:.2e} eager {t_eager:.2f} ms "
              f"graph {t_graph:.2f} ms speed-up {t_eager / t_graph:.1f}x")


if __name__ == "__main__":
    main()
