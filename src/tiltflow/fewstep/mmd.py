"""MMD fine-tuning of a few-step sampler (Aiello et al. 2023, "Fast Inference in Denoising
Diffusion Models via MMD Finetuning", MMD-DDM).

The teacher's network, sampled with a fixed few-step solver (DDIM with ``nfe`` steps by
default), is fine-tuned so that its samples match the data in maximum mean discrepancy:
each training step draws a batch of noises, runs the whole ``nfe``-step sampler with gradients
(``tiltflow.sample(..., grad=True)``) and minimizes the unbiased MMD^2 estimate (Gretton et al.
2012, eq. 3) between those samples and a data batch, with a sum of Gaussian kernels at
multiples of the median pairwise distance. The paper computes the kernel on Inception features
for images; on ``[B, D]`` data the kernel acts on the points themselves, on images on their
flattened pixels unless a ``features`` function is given.
"""

from __future__ import annotations

import torch

from .base import fit, make_student, randn_like, register
from .student import Student

__all__ = ["MMDLoss", "mmd2_unbiased"]


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, scales=(0.5, 1.0, 2.0)) -> torch.Tensor:
    """Unbiased MMD^2 between ``x [n, d]`` and ``y [m, d]`` for the kernel
    ``sum_s exp(-|a - b|^2 / (2 (s h)^2))``, ``h`` the median distance of the pooled points
    (fixed, without gradient). Differentiable in ``x`` and ``y``."""
    pooled = torch.cat([x, y])
    d2 = torch.cdist(pooled, pooled).pow(2)
    h2 = d2.detach()[d2.detach() > 0].median().clamp(min=1e-12)
    k = sum(torch.exp(-d2 / (2 * s * s * h2)) for s in scales)
    n, m = x.shape[0], y.shape[0]
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    off = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    off_y = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return off + off_y - 2 * kxy.mean()


class MMDLoss:
    """MMD^2 between ``nfe``-step samples of the model and the data batch (module docstring);
    the batch statistic is returned for every example (its mean is the loss)."""

    def __init__(self, nfe: int = 2, solver: str = "ddim", features=None):
        self.nfe, self.solver, self.features = int(nfe), solver, features

    def __call__(self, model, batch, generator=None) -> torch.Tensor:
        from ..solvers import sample

        x, cond = batch["x"], batch.get("cond")
        fake = sample(model, randn_like(x, generator), self.solver, nfe=self.nfe, cond=cond,
                      generator=generator, grad=True)
        embed = self.features or (lambda a: a.reshape(a.shape[0], -1))
        return mmd2_unbiased(embed(fake), embed(x)).expand(x.shape[0])

    def config(self) -> dict:
        return {"name": "mmd", "nfe": self.nfe, "solver": self.solver}


@register("mmd", needs_data=True, defaults={"nfe": 2, "solver": "ddim", "lr": 1e-4})
def mmd_finetune(job) -> Student:
    """MMD fine-tuning: the teacher's few-step sampler matched to the data in MMD."""
    cfg = job.config
    student = Student(make_student(job), "mmd", "solver", (cfg["nfe"], cfg["nfe"]),
                      {"solver": cfg["solver"]})
    return fit(job, student, MMDLoss(cfg["nfe"], cfg["solver"]), job.teacher_data())
