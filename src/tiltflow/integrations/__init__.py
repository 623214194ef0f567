"""Bridges to other libraries' models. Each submodule imports its library lazily, so
``import tiltflow.integrations.<name>`` works without it and only the functions that need the
library ask for it (with the ``pip install`` line to fix it).

- :mod:`tiltflow.integrations.diffusers`: a diffusers denoiser (UNet2DModel,
  UNet2DConditionModel, SD3 / Flux transformers) and its scheduler as a tiltflow ``Denoiser``;
  scheduler time grids as tiltflow grids; local pipeline loading.
"""
