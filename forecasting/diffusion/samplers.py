"""Noise schedules and samplers of the probability-flow ODE, all with one signature.

Karras, Aittala, Aila and Laine 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"
(EDM), with the paper's symbols: the ODE ``dx/dsigma = (x - D(x; sigma)) / sigma`` is integrated from
``sigma_0 = sigma_max`` (``x_0 = sigma_max * noise``) down to ``sigma_N = 0`` on the schedule (eq. 5)

    sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,   i < N;   sigma_N = 0.

Solvers (``method``):

* ``"euler"``: first order, one evaluation of ``D`` per step;
* ``"heun"``: EDM Algorithm 1/2, Heun's second-order correction on every step but the last (which goes to
  ``sigma = 0``), ``2N - 1`` evaluations;
* ``"dpmpp_2m"``: the multistep second-order DPM-Solver++(2M) (Lu, Zhou, Bao, Chen, Li and Zhu 2022,
  "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", Algorithm 2) in the
  data-prediction form for the variance-exploding ODE (``alpha = 1``, ``t = -ln sigma``, ``h_i = t_i - t_{i-1}``,
  ``r_i = h_{i-1} / h_i``): ``x_i = (sigma_i / sigma_{i-1}) x_{i-1} - (e^{-h_i} - 1) D_i`` with
  ``D_i = (1 + 1 / (2 r_i)) D(x_{i-1}) - 1 / (2 r_i) D(x_{i-2})`` (first order on the first step), ``N``
  evaluations; a churned step is first order (DPM-Solver++(1), which is the Euler step), since the
  last ``D`` belongs to the trajectory before the noise was added.

Stochastic churn (EDM Algorithm 2) works with every solver: where ``S_tmin <= sigma_i <= S_tmax`` the
step starts from ``sigma_hat = sigma_i (1 + gamma_i)``, ``gamma_i = min(S_churn / N, sqrt(2) - 1)``, after
adding noise of std ``sqrt(sigma_hat^2 - sigma_i^2) S_noise`` (``churn`` is ``S_churn``).

A schedule (:func:`karras_sigmas`) and a solver (:func:`sample`) swap independently. Random draws come
from ``generator``: one for the whole batch, or a sequence of one per batch row, so that a row's samples
do not depend on which other rows share its batch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = ["SAMPLERS", "DenoiseFn", "Generators", "evaluations", "karras_sigmas", "sample", "standard_normal"]

#: ``(x (B, ...), sigma (B,)) -> denoised (B, ...)``: the denoiser ``D(x; sigma)``, conditioning bound in.
DenoiseFn = Callable[[Tensor, Tensor], Tensor]
#: One generator for the batch, one per batch row, or None (torch's default stream).
Generators = torch.Generator | Sequence[torch.Generator] | None

SAMPLERS: tuple[str, ...] = ("euler", "heun", "dpmpp_2m")


def karras_sigmas(
    steps: int, *, sigma_min: float, sigma_max: float, rho: float = 7.0, device: torch.device | str | None = None
) -> Tensor:
    """The EDM schedule (eq. 5) of ``steps`` intervals: shape (steps + 1,), float32, descending, last 0.

    ``steps == 1`` gives ``[sigma_max, 0]``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1; found {steps}")
    if not 0 < sigma_min < sigma_max or not rho > 0:
        raise ValueError(f"need 0 < sigma_min < sigma_max and rho > 0; found {sigma_min}, {sigma_max}, {rho}")
    ramp = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    low, high = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sigmas = (high + ramp * (low - high)) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)]).to(device=device, dtype=torch.float32)


def evaluations(method: str, steps: int) -> int:
    """Network evaluations of :func:`sample` with ``method`` on a schedule of ``steps`` intervals ending at 0."""
    _check_method(method)
    if steps < 1:
        raise ValueError(f"steps must be >= 1; found {steps}")
    return 2 * steps - 1 if method == "heun" else steps


def standard_normal(shape: Sequence[int], generator: Generators, *, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``N(0, 1)`` of ``shape`` (batch first), one row per generator when given a sequence."""
    shape = tuple(shape)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
    return torch.stack([torch.randn(shape[1:], generator=g, device=device, dtype=dtype) for g in generator])


def sample(
    denoise: DenoiseFn,
    noise: Tensor,
    sigmas: Tensor,
    *,
    method: Literal["euler", "heun", "dpmpp_2m"] = "heun",
    churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    generator: Generators = None,
) -> Tensor:
    """Integrate from ``sigmas[0]`` down to ``sigmas[-1]`` (see the module docstring).

    Args:
        denoise: ``D(x; sigma)`` (:data:`DenoiseFn`), called with ``sigma`` of shape (B,).
        noise: Unit Gaussian noise of the output's shape (B, ...); the start is ``sigmas[0] * noise``.
        sigmas: Shape (N + 1,), strictly decreasing, all positive but possibly the last
            (:func:`karras_sigmas`).
        method: One of :data:`SAMPLERS`.
        churn, s_tmin, s_tmax, s_noise: ``S_churn``, ``S_tmin``, ``S_tmax``, ``S_noise`` of EDM Algorithm 2
            (``churn = 0``: the deterministic ODE).
        generator: The source of the churn noise (see the module docstring).

    Returns:
        ``x`` at ``sigmas[-1]`` (the sample at ``sigma = 0`` for a schedule ending at 0), shape of ``noise``.
        :func:`evaluations` gives the number of ``denoise`` calls.
    """
    _check_method(method)
    levels = [float(s) for s in torch.as_tensor(sigmas).detach().cpu().reshape(-1)]
    if len(levels) < 2 or any(b >= a for a, b in itertools.pairwise(levels)) or levels[-1] < 0 or levels[-2] <= 0:
        raise ValueError(f"sigmas must be 1-D, at least 2 long, strictly decreasing and >= 0; found {levels[:4]}..")
    if churn < 0 or s_noise < 0:
        raise ValueError(f"churn and s_noise must be >= 0; found {churn}, {s_noise}")
    steps = len(levels) - 1
    batch = noise.shape[0]

    def call(x: Tensor, sigma: float) -> Tensor:
        return denoise(x, torch.full((batch,), sigma, dtype=x.dtype, device=x.device))

    x = noise * levels[0]
    previous: tuple[Tensor, float] | None = None  # DPM-Solver++(2M): the last D(x) and its t = -ln(sigma)
    for i in range(steps):
        sigma, sigma_next = levels[i], levels[i + 1]
        gamma = min(churn / steps, math.sqrt(2.0) - 1.0) if churn > 0 and s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (1.0 + gamma)
        if gamma > 0:
            eps = standard_normal(x.shape, generator, device=x.device, dtype=x.dtype)
            x = x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * eps
        denoised = call(x, sigma_hat)
        if method == "dpmpp_2m":
            t = -math.log(sigma_hat)
            if sigma_next == 0:
                x = denoised
            else:
                h = -math.log(sigma_next) - t
                estimate = denoised
                # After churn the history lies on another trajectory: that step is first order.
                if previous is not None and gamma == 0:
                    r = (t - previous[1]) / h
                    estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * previous[0]
                x = (sigma_next / sigma_hat) * x - math.expm1(-h) * estimate
            previous = (denoised, t)
            continue
        slope = (x - denoised) / sigma_hat  # dx/dsigma at sigma_hat
        x_next = x + (sigma_next - sigma_hat) * slope
        if method == "heun" and sigma_next > 0:
            slope_next = (x_next - call(x_next, sigma_next)) / sigma_next
            x_next = x + (sigma_next - sigma_hat) * 0.5 * (slope + slope_next)
        x = x_next
    return x


def _check_method(method: str) -> None:
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; known samplers: {list(SAMPLERS)}")
