"""EDM preconditioning, training noise levels and the denoising loss.

Karras, Aittala, Aila and Laine 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"
(EDM), Table 1 and section 5, with the paper's symbols:

* data ``y ~ p_data`` with standard deviation ``sigma_data``; a noisy sample ``x = y + n``,
  ``n ~ N(0, sigma^2 I)``;
* the denoiser ``D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))`` wraps a raw
  network ``F`` with

      c_skip  = sigma_data^2 / (sigma^2 + sigma_data^2)
      c_out   = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
      c_in    = 1 / sqrt(sigma^2 + sigma_data^2)
      c_noise = ln(sigma) / 4

  so that the network's input and its effective training target ``(y - c_skip x) / c_out`` both have unit
  variance at every noise level;
* training noise levels ``ln(sigma) ~ N(P_mean, P_std^2)`` and the loss
  ``lambda(sigma) ||D(y + n; sigma) - y||^2`` with ``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2``
  = ``1 / c_out^2``, i.e. the plain MSE of ``F`` against its effective target.

Conditional models (GenCast, Price et al. 2025, "Probabilistic weather forecasting with machine learning")
concatenate the conditioning fields to ``c_in x`` along channels; only the noisy target is scaled.
Tensors are batch first: ``x`` is (B, C, H, W), ``sigma`` is (B,).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["Denoiser", "EDMConfig", "denoising_loss", "loss_weight", "preconditioning", "sample_training_sigma"]


@dataclass(frozen=True)
class EDMConfig:
    """The EDM constants (Karras et al. 2022, Table 1, "EDM" column).

    Attributes:
        sigma_data: Standard deviation of the data (of the normalised targets).
        sigma_min, sigma_max, rho: The sampling schedule's range and curvature
            (:func:`~forecasting.diffusion.samplers.karras_sigmas`).
        p_mean, p_std: Mean and std of ``ln(sigma)`` during training.
    """

    sigma_data: float = 1.0
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    p_mean: float = -1.2
    p_std: float = 1.2

    def __post_init__(self) -> None:
        if not (self.sigma_data > 0 and 0 < self.sigma_min < self.sigma_max and self.rho > 0 and self.p_std > 0):
            raise ValueError(
                "EDMConfig needs sigma_data > 0, 0 < sigma_min < sigma_max, rho > 0 and p_std > 0; found "
                f"{self}"
            )


def preconditioning(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(c_skip, c_out, c_in, c_noise)`` of EDM (module docstring), elementwise over ``sigma``.

    Each has the shape of ``sigma``: pass ``sigma`` shaped ``(B, 1, 1, 1)`` to broadcast against (B, C, H, W)
    fields. ``sigma`` must be positive (``c_noise`` is ``ln(sigma) / 4``).
    """
    sigma_data = float(sigma_data)
    total = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / total
    c_out = sigma * sigma_data / total.sqrt()
    c_in = total.rsqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def loss_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2`` (= 1 / c_out^2), elementwise."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


class Denoiser(nn.Module):
    """D(x; sigma, cond) = c_skip x + c_out F(c_in x, c_noise, cond).

    ``network`` is called as ``network(inputs, noise=c_noise, lead_time=lead_time)`` with ``inputs`` the
    concatenation ``[c_in x, condition]`` along channels (B, C + Cc, H, W), ``c_noise`` of shape (B,) and
    ``lead_time`` (B,) or None; it returns ``F`` of the shape of ``x`` (e.g. :class:`~forecasting.models.UNet`).
    """

    def __init__(self, network: nn.Module, *, sigma_data: float = 1.0) -> None:
        super().__init__()
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be positive; found {sigma_data}")
        self.network = network
        self.sigma_data = float(sigma_data)

    def forward(
        self, x: Tensor, sigma: Tensor, condition: Tensor | None = None, *, lead_time: Tensor | None = None
    ) -> Tensor:
        """Denoise ``x`` (B, C, H, W) at noise levels ``sigma`` (B,) given ``condition`` (B, Cc, H, W) and
        ``lead_time`` (B,) in hours; returns the estimate of the clean target, (B, C, H, W)."""
        batch = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if sigma.shape != (batch,):
            raise ValueError(f"sigma must have shape ({batch},) for x of shape {tuple(x.shape)}; found {tuple(sigma.shape)}")
        c_skip, c_out, c_in, c_noise = preconditioning(sigma.view(batch, *([1] * (x.ndim - 1))), self.sigma_data)
        inputs = c_in * x
        if condition is not None:
            if condition.shape[0] != batch or condition.shape[2:] != x.shape[2:]:
                raise ValueError(
                    f"condition must have shape ({batch}, Cc, *{tuple(x.shape[2:])}); found {tuple(condition.shape)}"
                )
            inputs = torch.cat([inputs, condition.to(x.dtype)], dim=1)
        raw = self.network(inputs, noise=c_noise.view(batch), lead_time=lead_time)
        return c_skip * x + c_out * raw.to(x.dtype)


def sample_training_sigma(
    batch: int, config: EDMConfig, *, generator: torch.Generator | None, device: torch.device | str | None
) -> Tensor:
    """Training noise levels, shape (batch,): ``sigma = exp(P_mean + P_std * N(0, 1))`` (EDM, Table 1)."""
    normal = torch.randn((batch,), generator=generator, device=device)
    return (config.p_mean + config.p_std * normal).exp()


def denoising_loss(
    denoiser: Denoiser,
    x0: Tensor,
    sigma: Tensor,
    *,
    condition: Tensor | None = None,
    lead_time: Tensor | None = None,
    generator: torch.Generator | None = None,
    sigma_data: float = 1.0,
) -> Tensor:
    """The unreduced EDM loss ``lambda(sigma) (D(x0 + sigma n; sigma) - x0)^2``, shape (B, C, H, W).

    ``x0`` is the clean target (B, C, H, W), ``sigma`` (B,) the noise levels, ``n ~ N(0, I)`` drawn from
    ``generator``. ``sigma_data`` must be the denoiser's (it sets the weight ``lambda``); a mismatch raises
    ValueError. Reduce (area and channel weights, mean) in the caller.
    """
    if float(sigma_data) != denoiser.sigma_data:
        raise ValueError(f"sigma_data {sigma_data} differs from the denoiser's {denoiser.sigma_data}")
    batch = x0.shape[0]
    sigma = torch.as_tensor(sigma, dtype=x0.dtype, device=x0.device)
    if sigma.shape != (batch,):
        raise ValueError(f"sigma must have shape ({batch},) for x0 of shape {tuple(x0.shape)}; found {tuple(sigma.shape)}")
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    s = sigma.view(batch, *([1] * (x0.ndim - 1)))
    denoised = denoiser(x0 + s * noise, sigma, condition, lead_time=lead_time)
    return loss_weight(s, sigma_data) * (denoised - x0) ** 2
