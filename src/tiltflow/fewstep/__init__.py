"""Few-step generation: turn a teacher into a student that samples in 1, 2 or 4 network
evaluations, or train a few-step model from data.

>>> student = tiltflow.fewstep.distill("consistency_distillation", teacher=den,
...                                    config={"steps": 2000})
>>> x = tiltflow.fewstep.sample(student, torch.randn(64, 2), nfe=2)

``methods()`` lists the registered methods; each is an objective for the common training loop
(:func:`tiltflow.train.train`) and a student with its own sampler (:mod:`.student`). ``teacher``
is any :class:`~tiltflow.Denoiser`, the exact ``GaussianMixture.denoiser(schedule)`` included,
which isolates each method's own error. ``tiltflow distill`` is the same from the command line.
"""

from __future__ import annotations

from . import consistency, flowmaps, mmd, progressive, reflow, scm, score  # noqa: F401
from .base import COMMON, distill, get_method, is_student, load, methods, register
from .student import FlowMap, Student, sample

__all__ = ["distill", "sample", "methods", "get_method", "load", "is_student", "register",
           "Student", "FlowMap", "COMMON"]
