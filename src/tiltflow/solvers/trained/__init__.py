"""Trained solvers: parameters fitted for ONE model and ONE NFE by matching a reference solution.

Three kinds, all fitted on a few hundred noises against a tight reference solution of the same
probability-flow ODE (:func:`~tiltflow.solvers.reference.reference_solve`), by default on the
**plain endpoint RMSE**
``sqrt(mean_b ||x_solver(noise_b) - x_ref(noise_b)||^2)``:

- :func:`fit_grid` / :func:`optimize_grid` (:mod:`.grid`) -- only the time grid of an existing
  registered solver (with its options) is optimised (monotone parameterisation: softmax of the
  increments), by L-BFGS (or Adam) through the registered solver itself (its samples are
  differentiable in the grid), judged on held-out validation noises; ``solver="auto"`` (default) fits the
  bases of :data:`AUTO_GRID_SOLVERS` and keeps the best; or derivative-free
  (``method="nelder_mead"``) for any deterministic registered solver.
- :class:`BespokeSolver` (:mod:`.bespoke`) -- Shaul et al. 2023, "Bespoke Solvers for Generative Flow Models"
  (ICLR 2024): a scale-time transformation of the base RK1 (Euler) / RK2 (midpoint) solver.
- :class:`BNSSolver` (:mod:`.bns`) -- Shaul et al. 2024, "Bespoke Non-Stationary Solvers for Fast Sampling of
  Diffusion and Flow Models" (ICML 2024): every step is a learned linear combination of the start
  state and all previous model outputs.

Loss: BNS (2024) trains on the endpoint error itself, and so do the grids and BNS here
(backpropagation through the whole n-step solve, which at these NFEs is cheap). Bespoke (2023)
trains on an upper bound of the global error built from local truncation errors along the
ground-truth path; :meth:`BespokeSolver.fit` offers both: ``loss="rmse"`` (the endpoint RMSE,
the default: it gives the lower held-out error on our test beds, benchmarks/results/bespoke.md)
and ``loss="bound"`` (the paper's RMSE-bound, :meth:`BespokeSolver.rmse_bound`, along a
:class:`GroundTruthPath` computed once: per-step, parallel over the steps, no backpropagation
through a solve).

A fitted solver is used as a solver in two ways (documented choice, both thin):

- ``fitted.as_solver()`` returns a function with the one solver signature
  ``fn(denoiser, x_init, grid, *, cond=None, guidance=None, generator=None, record=None)``;
- the registry has an entry ``"bespoke"`` taking
  ``options={"params": fitted_or_path}``, so ``tiltflow.sample(den, noise, "bespoke", nfe=N,
  options={"params": "fit.safetensors"})`` works. For this entry one "step" is one network
  evaluation; the grid ``sample`` builds only fixes the count (``len(grid) - 1`` must equal the
  fitted NFE) and its end points (start 1, end 0): the interior times are the fitted ones.

Files (``save``/``load``): one ``.safetensors`` file holding the float64 parameters; its header
metadata carries JSON with the kind, NFE, base solver, schedule config, a description of the model
it was fitted on and fit statistics. Written atomically (temp file + fsync + rename); ``load``
validates everything and raises :class:`~tiltflow.errors.UserError` with a one-line fix.
"""

from .base import FittedSolver, endpoint_rmse, load, start_state
from .bespoke import LOSSES, BespokeSolver, BoundTerms, GroundTruthPath, ground_truth_path
from .bns import BNSSolver, linear_plan
from .grid import AUTO_GRID_SOLVERS, FittedGrid, fit_grid, optimize_grid

__all__ = ["FittedSolver", "FittedGrid", "BespokeSolver", "BNSSolver", "GroundTruthPath",
           "BoundTerms", "LOSSES", "AUTO_GRID_SOLVERS", "fit_grid", "optimize_grid",
           "ground_truth_path", "linear_plan", "load", "endpoint_rmse", "start_state"]
