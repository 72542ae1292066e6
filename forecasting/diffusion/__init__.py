"""Diffusion models: EDM preconditioning and loss, noise schedules and samplers, and the diffusion families.

* :mod:`~forecasting.diffusion.edm`: preconditioning (``c_skip``, ``c_out``, ``c_in``, ``c_noise``), the
  :class:`~forecasting.diffusion.edm.Denoiser` wrapper, training noise levels and the unreduced loss
  (Karras et al. 2022);
* :mod:`~forecasting.diffusion.samplers`: the EDM schedule and the Euler, Heun and DPM-Solver++(2M)
  samplers with stochastic churn, all with one signature;
* :mod:`~forecasting.diffusion.conditional`: the ``diffusion`` family (GenCast-style next-state diffusion,
  rolled out autoregressively). Not imported here: it builds on :mod:`forecasting.forecasters`, which
  imports it only when the family is asked for.
"""

from forecasting.diffusion.edm import (
    Denoiser,
    EDMConfig,
    denoising_loss,
    loss_weight,
    preconditioning,
    sample_training_sigma,
)
from forecasting.diffusion.samplers import (
    SAMPLERS,
    DenoiseFn,
    evaluations,
    karras_sigmas,
    sample,
)

__all__ = [
    "SAMPLERS",
    "DenoiseFn",
    "Denoiser",
    "EDMConfig",
    "denoising_loss",
    "evaluations",
    "karras_sigmas",
    "loss_weight",
    "preconditioning",
    "sample",
    "sample_training_sigma",
]
