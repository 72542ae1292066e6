"""The rolling diffusion family (``model.family: rolling``): a sliding window of future states denoised together.

Ruhe, Heek, Salimans and Hoogeboom 2024, "Rolling Diffusion Models" (ICML; arXiv 2402.09470), with the
paper's symbols. A window holds ``W`` future frames ``x^k``, ``k = 0 .. W-1`` (``k = 0`` the nearest lead).
The global diffusion time ``t`` runs from 1 (noise) to 0 (data) in each sampling pass, and frame ``k`` sits at
the *local* time

    rolling schedule:  t_k(t)      = (k + t) / W
    init schedule:     t_k^init(t) = clip(k / W + t)          (clipped to [0, 1])

so the noise of a frame grows with its lead. A rolling pass takes frame 0 from local time ``1 / W`` to 0 (it is
finished and emitted) and frame ``k`` from ``(k + 1) / W`` to ``k / W``, where frame ``k - 1`` started: after
the emitted frame is dropped and a fully noised frame (local time 1) is appended, the window stands at
``t = 1`` of the next pass. The first window starts from pure noise (``t_k^init(1) = 1`` for every frame)
and one pass of the init schedule brings it to ``t_k^init(0) = k / W = t_k(0)``, the end of a rolling pass.
Training draws ``t ~ U(0, 1]`` per window and noises each frame at its local time; a share
``init_fraction`` of the windows uses the init schedule, the rest the rolling one (the paper trains on both).

The noise is written the EDM way (Karras et al. 2022, :mod:`forecasting.diffusion.edm`: ``x = y + sigma n``,
the variance-exploding form of the paper's ``alpha_t, sigma_t`` process). Local time ``tau`` maps to

    sigma(tau) = (sigma_min^(1/rho) + tau (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho,   tau > 0;   sigma(0) = 0,

so that with ``S`` uniform steps of ``t`` per pass a frame passes, over its ``W`` passes, through EDM's
schedule formula (eq. 5) at ``W S`` evenly spaced local times, then 0; ``rho < 0`` keeps more of the window at
low noise, which ERDM (Ruehling Cachay et al. 2025, "Elucidated Rolling Diffusion Models for Probabilistic
Forecasting of Complex Dynamics") found best for weather. ``sigma_min`` is the lowest noise a frame holds before
the last step of its last pass replaces it with the denoiser's estimate. EDM's 0.002 suits images; the frames
here are six-hour changes with little power at the smallest scales, and a denoiser trained on them tells noise
from signal there only down to about 0.1 (``forecast check-denoiser``, :mod:`forecasting.diffusion.diagnostics`).
Below that it returns the noisy frame as it is, so frames finished from lower levels keep their noise and
every emitted state adds some; the default is therefore 0.1 (the README has the measurements).

Each frame gets EDM's preconditioning at its own ``sigma_k`` (``c_skip, c_out, c_in, c_noise``;
:func:`~forecasting.diffusion.edm.preconditioning`) and the loss
``lambda(sigma_k) ||D^k - y^k||^2``, optionally times ERDM's log-normal weight of ``ln sigma_k``
(:class:`RollingObjective`).

What the frames are: the successive changes of the window's states in tendency-std units,
``y^k = (x_{t+k+1} - x_{t+k}) / tendency_std`` (the conditional family's residual, one per frame, each of about
unit variance: ``sigma_data = 1``). They are shift-invariant: when frame 0 is emitted as the next state
``x_{t+1} = x_t + y^0 tendency_std``, the frames left are the changes from it onwards. The network
(:class:`~forecasting.models.UNet`, circular in longitude on the global grid) sees the noisy window scaled by
``c_in``, the ``input_steps`` clean states before it (the emitted states join them as the window rolls), the
time forcings of those times and of the ``W`` frame times, the static fields, ``sin``/``cos`` of latitude and
each frame's ``c_noise = ln(sigma_k) / 4`` as a constant channel; its FiLM noise embedding gets the window's
mean ``c_noise``.

Sampling integrates the probability-flow ODE of every frame, ``dx^k/dt = (x^k - D^k) / sigma_k dsigma_k/dt``,
on ``t_i = 1 - i / S`` with Euler or Heun steps (EDM Algorithm 1: no correction on the last step, where frame
0 reaches ``sigma = 0`` and becomes the denoiser's estimate exactly): ``evaluations(method, S)`` network calls
per emitted lead (:func:`~forecasting.diffusion.samplers.evaluations`), the first window ``evaluations(method,
init_steps)``. Forecasts run for any number of leads, past the training window. Optional stochastic churn (EDM
Algorithm 2, frame by frame) and renewed perturbations (``window_perturbation``: after every ``W`` emitted
leads, or every ``perturbation_every``, the states the window is conditioned on get a fresh smooth field, as
for DYffusion; ours, not the paper's) are sampling choices. The noise of every frame of
member ``m`` from start ``s`` comes from a generator seeded by ``(seed, s, m)``, so a member is the same
whatever the batching; ``member_batch`` samples go through the network at once.

:class:`RollingSchedule` holds the schedules, :class:`RollingDiffusion` the torch side (normalised tensors
only), :class:`RollingDiffusionForecaster` the :class:`~forecasting.forecasters.Forecaster` (it shares the
one-grid plumbing of :class:`~forecasting.diffusion.conditional.OneGridDiffusionForecaster`: stores,
checkpoints, input checks, initial states, forcings); :class:`RollingObjective` and
:func:`rolling_training_setup` plug the family into ``forecast train``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from forecasting.config import ConfigError, ExperimentConfig, RollingDiffusionModelConfig
from forecasting.diffusion.conditional import (
    OneGridDiffusionForecaster,
    OneGridNetwork,
    WeightedObjective,
    check_one_grid_training,
    one_grid_training_setup,
)
from forecasting.diffusion.edm import loss_weight, preconditioning
from forecasting.diffusion.samplers import Generators, evaluations, standard_normal
from forecasting.models import UNet

if TYPE_CHECKING:
    from forecasting.training.train import TrainingSetup

__all__ = [
    "ROLLING_SAMPLERS",
    "RollingDiffusion",
    "RollingDiffusionForecaster",
    "RollingObjective",
    "RollingSchedule",
    "init_local_times",
    "rolling_local_times",
    "rolling_training_setup",
]

#: Solvers of a rolling pass (a multistep solver would need per-frame histories across window shifts).
ROLLING_SAMPLERS: tuple[str, ...] = ("euler", "heun")


def rolling_local_times(t: Tensor, window: int) -> Tensor:
    """The rolling schedule ``t_k = (k + t) / W``: global times ``t`` (...,) -> local times (..., W)."""
    k = torch.arange(window, dtype=torch.float64, device=t.device)
    return (k + t.double()[..., None]) / window


def init_local_times(t: Tensor, window: int) -> Tensor:
    """The init schedule ``t_k^init = clip(k / W + t, 0, 1)``: global times ``t`` (...,) -> local times (..., W)."""
    k = torch.arange(window, dtype=torch.float64, device=t.device)
    return (k / window + t.double()[..., None]).clamp(0.0, 1.0)


@dataclass(frozen=True)
class RollingSchedule:
    """The window's noise levels (see the module docstring).

    Attributes:
        window: ``W``, frames in the window.
        sigma_min, sigma_max: Noise at local times just above 0 and at 1.
        rho: Curvature of the map from local time to noise (any nonzero value; EDM uses 7, ERDM -10).
    """

    window: int
    sigma_min: float
    sigma_max: float
    rho: float

    def __post_init__(self) -> None:
        if self.window < 1 or not 0 < self.sigma_min < self.sigma_max or self.rho == 0:
            raise ValueError(f"RollingSchedule needs window >= 1, 0 < sigma_min < sigma_max and rho != 0; found {self}")

    def noise(self, tau: Tensor) -> Tensor:
        """``sigma(tau)`` elementwise (float64): EDM's schedule at local times ``tau`` in [0, 1], 0 at ``tau = 0``."""
        tau = tau.double()
        low, high = self.sigma_min ** (1.0 / self.rho), self.sigma_max ** (1.0 / self.rho)
        sigma = (low + tau * (high - low)) ** self.rho
        return torch.where(tau > 0, sigma, torch.zeros_like(sigma))

    def sigmas(self, t: Tensor, *, init: Tensor | bool) -> Tensor:
        """Noise of each frame at global times ``t`` (...,): (..., W), float64; ``init`` (bool, or a bool tensor
        shaped like ``t``) picks the init schedule instead of the rolling one."""
        init = torch.as_tensor(init, device=t.device)
        local = torch.where(init[..., None], init_local_times(t, self.window), rolling_local_times(t, self.window))
        return self.noise(local)


class RollingDiffusion(OneGridNetwork):
    """The window denoiser and one sampling pass, on normalised tensors (see the module docstring).

    Shapes: states ``(B, T_in, C, H, W)`` normalised, oldest first; forcings ``(B, T_in + W_f, F, H, W)`` (the
    input times, then the ``W_f`` frame times; ``W_f`` is the window ``window``); static ``(B, S, H, W)``
    normalised; a window of frames ``(B, W_f, C, H, W)`` (changes in tendency-std units); noise levels ``(B, W_f)``.

    Args:
        n_channels, n_forcings, n_static, input_steps, latitude, residual_scale: As for
            :class:`~forecasting.diffusion.conditional.OneGridNetwork` (the conditioning takes the forcings of
            ``T_in + W_f`` times; a normalised state change times ``residual_scale`` is a frame).
        schedule: The window's :class:`RollingSchedule`.
        periodic_lon: The grid goes round the globe (circular padding in longitude).
        sigma_data: EDM ``sigma_data`` of the frames.
        unet: Keyword arguments of :class:`~forecasting.models.UNet` (``base_channels``, ``channel_mult``,
            ``blocks_per_level``, ``embedding_dim``, ``dropout``).
    """

    def __init__(
        self,
        *,
        n_channels: int,
        n_forcings: int,
        n_static: int,
        input_steps: int,
        schedule: RollingSchedule,
        latitude: np.ndarray,
        residual_scale: np.ndarray,
        periodic_lon: bool,
        sigma_data: float,
        unet: Mapping[str, Any],
    ) -> None:
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be positive; found {sigma_data}")
        super().__init__(
            n_channels=n_channels, n_forcings=n_forcings, n_static=n_static, input_steps=input_steps,
            forcing_times=input_steps + schedule.window, latitude=latitude, residual_scale=residual_scale,
        )
        self.window = schedule.window
        self.schedule = schedule
        self.sigma_data = float(sigma_data)
        frames = self.window * n_channels
        # Network input: the scaled noisy frames, the conditioning and one c_noise channel per frame.
        self.network = UNet(
            frames + self.n_condition + self.window, frames, conditions=("noise",), periodic_lon=periodic_lon,
            **dict(unet),
        )

    def frames(self, states: Tensor, targets: Tensor) -> Tensor:
        """The clean window ``y^k = (n_{t+k+1} - n_{t+k}) std / tendency_std`` of normalised targets
        (B, W, C, H, W) after states (B, T_in, C, H, W): (B, W, C, H, W)."""
        previous = torch.cat([states[:, -1:], targets[:, :-1]], dim=1)
        return (targets - previous) * self.residual_scale

    def next_state(self, last_state: Tensor, frame: Tensor) -> Tensor:
        """The normalised state after ``last_state`` (B, C, H, W) given its finished frame (B, C, H, W)."""
        return last_state + frame / self.residual_scale

    def denoise(self, x: Tensor, sigma: Tensor, condition: Tensor) -> Tensor:
        """``D(x; sigma)`` of every frame: noisy window ``x`` (B, W, C, H, W) at noise ``sigma`` (B, W), all
        positive, given ``condition`` (B, n_condition, H, W); returns the clean window's estimate (B, W, C, H, W)."""
        batch, window, channels, height, width = x.shape
        if window != self.window or channels != self.n_channels or sigma.shape != (batch, window):
            raise ValueError(
                f"x must have shape (B, {self.window}, {self.n_channels}, H, W) and sigma (B, {self.window}); "
                f"found {tuple(x.shape)} and {tuple(sigma.shape)}"
            )
        sigma = sigma.to(x.dtype)
        c_skip, c_out, c_in, c_noise = preconditioning(sigma[..., None, None, None], self.sigma_data)
        noise_maps = c_noise.reshape(batch, window, 1, 1).expand(-1, -1, height, width)
        inputs = torch.cat([(c_in * x).reshape(batch, -1, height, width), condition.to(x.dtype), noise_maps], dim=1)
        raw = self.network(inputs, noise=c_noise.reshape(batch, window).mean(dim=1))
        return c_skip * x + c_out * raw.reshape(x.shape).to(x.dtype)

    def denoising_pass(
        self,
        x: Tensor,
        condition: Tensor,
        *,
        init: bool,
        steps: int,
        method: str,
        churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: Generators = None,
    ) -> Tensor:
        """One pass of global time ``t`` from 1 to 0 in ``steps`` uniform steps: the window ``x`` (B, W, C, H, W)
        at its noise of ``t = 1`` goes to that of ``t = 0`` (frame 0 finished); ``init`` picks the init schedule.
        ``method`` ``euler`` or ``heun`` (``evaluations(method, steps)`` network calls). ``churn > 0`` adds EDM's
        stochastic churn (Algorithm 2) frame by frame: a frame at ``s_tmin <= sigma_k <= s_tmax`` is raised to
        ``sigma_k (1 + gamma)`` with fresh noise of std ``sqrt((1 + gamma)^2 - 1) sigma_k s_noise`` before the
        step, ``gamma = min(churn / (W steps), sqrt(2) - 1)`` (a frame lives ``W`` passes, so ``churn`` is
        spread over its ``W steps`` steps as EDM's ``S_churn`` over ``N``); the noise comes from ``generator``
        (one per batch row: :data:`~forecasting.diffusion.samplers.Generators`)."""
        if method not in ROLLING_SAMPLERS:
            raise ValueError(f"unknown rolling sampler {method!r}; known: {list(ROLLING_SAMPLERS)}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1; found {steps}")
        if churn < 0 or s_noise < 0:
            raise ValueError(f"churn and s_noise must be >= 0; found {churn}, {s_noise}")
        batch = x.shape[0]
        times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        gamma = min(churn / (self.window * steps), math.sqrt(2.0) - 1.0)

        def levels(t: Tensor) -> Tensor:  # (B, W, 1, 1, 1)
            sigma = self.schedule.sigmas(t.expand(batch), init=init)
            return sigma.to(device=x.device, dtype=x.dtype)[..., None, None, None]

        for i in range(steps):
            sigma, sigma_next = levels(times[i]), levels(times[i + 1])
            if gamma > 0:
                churned = (sigma >= s_tmin) & (sigma <= s_tmax) & (sigma > 0)
                sigma_hat = torch.where(churned, sigma * (1.0 + gamma), sigma)
                eps = standard_normal(x.shape, generator, device=x.device, dtype=x.dtype)
                x = x + (sigma_hat**2 - sigma**2).sqrt() * s_noise * eps
                sigma = sigma_hat
            slope = (x - self.denoise(x, sigma[..., 0, 0, 0], condition)) / sigma  # dx/dsigma per frame
            x_next = x + (sigma_next - sigma) * slope
            if method == "heun" and i < steps - 1:  # every frame has sigma_next > 0 before the last step
                slope_next = (x_next - self.denoise(x_next, sigma_next[..., 0, 0, 0], condition)) / sigma_next
                x_next = x + (sigma_next - sigma) * 0.5 * (slope + slope_next)
            x = x_next
        return x


class RollingObjective(WeightedObjective):
    """The per-frame EDM loss of a :class:`RollingDiffusion` on windows of WindowDataset samples.

    A batch holds ``inputs`` (B, T_in, C, H, W) and ``targets`` (B, W, C, H, W) normalised, ``forcings``
    (B, T_in + W, F, H, W) and ``static`` (B, S, H, W). Per window, ``t ~ U(0, 1]`` and, with probability
    ``init_fraction``, the init schedule instead of the rolling one, from ``generator``; the unreduced loss
    ``lambda(sigma_k) (D^k - y^k)^2`` is weighted by ``area_weights`` (H,) and ``channel_weights`` (C,) (both
    mean 1) and averaged over frames and points. With ``lognormal = (P_mean, P_std)`` each frame's loss is also
    weighted by ``exp(-(ln sigma_k - P_mean)^2 / (2 P_std^2))``, ERDM's emphasis of the noise levels where
    the forecast turns from predictable to uncertain (the normal density of ``ln sigma``, scaled to 1 at its
    mode). Metrics ``loss_first_frame`` and ``loss_last_frame``: the same loss of frame 0 (about to be
    emitted) and of the last frame (newest).
    """

    def __init__(
        self,
        *,
        area_weights: np.ndarray,
        channel_weights: np.ndarray,
        init_fraction: float,
        lognormal: tuple[float, float] | None = None,
    ) -> None:
        if not 0.0 <= init_fraction <= 1.0:
            raise ValueError(f"init_fraction must be in [0, 1]; found {init_fraction}")
        if lognormal is not None and not lognormal[1] > 0:
            raise ValueError(f"the log-normal weighting needs P_std > 0; found {lognormal}")
        super().__init__(area_weights=area_weights, channel_weights=channel_weights)
        self.init_fraction = float(init_fraction)
        self.lognormal = lognormal

    def __call__(
        self, model: nn.Module, batch: Mapping[str, Tensor], *, steps: int, generator: torch.Generator
    ) -> dict[str, Tensor]:
        if steps != 1:
            raise ValueError(f"the rolling family trains on windows, without rollouts; asked for {steps} steps")
        assert isinstance(model, RollingDiffusion)
        inputs, targets = batch["inputs"].float(), batch["targets"].float()
        batch_size, steps_in = inputs.shape[:2]
        if targets.shape[1] != model.window:
            raise ValueError(f"a window of {model.window} frames needs {model.window} targets; found {targets.shape[1]}")
        device = inputs.device
        y = model.frames(inputs, targets)  # (B, W, C, H, W)
        condition = model.conditioning(inputs, batch["forcings"][:, : steps_in + model.window], batch["static"])
        t = 1.0 - torch.rand((batch_size,), generator=generator, device=device, dtype=torch.float64)  # (0, 1]
        init = torch.rand((batch_size,), generator=generator, device=device) < self.init_fraction
        sigma = model.schedule.sigmas(t, init=init).to(torch.float32)  # (B, W), all > 0
        noise = torch.randn(y.shape, generator=generator, device=device)
        s = sigma[..., None, None, None]
        denoised = model.denoise(y + s * noise, sigma, condition)
        frame_weight = loss_weight(s, model.sigma_data)  # (B, W, 1, 1, 1)
        if self.lognormal is not None:
            p_mean, p_std = self.lognormal
            frame_weight = frame_weight * torch.exp(-((s.log() - p_mean) ** 2) / (2 * p_std**2))
        weights = self.point_weights(device)  # (C, H, 1)
        per_frame = (frame_weight * (denoised.float() - y) ** 2 * weights).mean(dim=(0, 2, 3, 4))  # (W,)
        return {"loss": per_frame.mean(), "loss_first_frame": per_frame[0].detach(),
                "loss_last_frame": per_frame[-1].detach()}


class RollingDiffusionForecaster(OneGridDiffusionForecaster):
    """The rolling diffusion forecaster on one grid (see the module docstring).

    Build it with :meth:`from_stores` (untrained) or :meth:`from_checkpoint`. Attributes as for
    :class:`~forecasting.diffusion.conditional.OneGridDiffusionForecaster` (``model_config``, ``channels``,
    ``static``, ``normalisation``, ``grid``, ``latitude``, ``longitude``), plus ``schedule``
    (:class:`RollingSchedule`); ``model`` is a :class:`RollingDiffusion`.
    """

    family = "rolling"
    config_type = RollingDiffusionModelConfig
    checkpoint_name = "rolling diffusion"

    model_config: RollingDiffusionModelConfig
    model: RollingDiffusion

    def _network(self) -> RollingDiffusion:
        config = self.model_config
        try:
            self.schedule = RollingSchedule(
                window=config.window, sigma_min=config.sigma_min, sigma_max=config.sigma_max, rho=config.rho
            )
        except ValueError as exc:
            raise ConfigError(f"model: {exc}") from None
        return RollingDiffusion(**self._network_arguments(), schedule=self.schedule, sigma_data=config.sigma_data)

    def _sample_leads(self, states, static, *, starts, steps, members, seed) -> Iterator[tuple[int, Tensor]]:
        config = self.model_config
        device = self.device
        n_samples = states.shape[0]
        n_channels, height, width = len(self.channels), len(self.latitude), len(self.longitude)
        window = self.schedule.window
        every = window if config.perturbation_every is None else config.perturbation_every
        generators = self._member_generators(starts, members, seed)
        groups = self._member_batches(n_samples)
        sigma_max = self.schedule.sigma_max

        def fresh(rows: slice, n_frames: int) -> Tensor:  # fully noised frames: (rows, n_frames, C, H, W)
            shape = (rows.stop - rows.start, n_frames, n_channels, height, width)
            return sigma_max * standard_normal(shape, generators[rows], device=device, dtype=torch.float32)

        frames = [fresh(rows, window) for rows in groups]
        origin = states[:, -1]
        for k in range(steps):
            # Pass k: the input times and the window's frame times, k steps on from the first pass.
            forcing = self._forcings(starts, members, ahead=range(1, window + 1), later=k)
            emitted = []
            for g, rows in enumerate(groups):
                if k > 0:  # drop the emitted frame, append a fully noised one
                    frames[g] = torch.cat([frames[g][:, 1:], fresh(rows, 1)], dim=1)
                condition = self.model.conditioning(
                    states[rows], forcing[rows], static.expand(rows.stop - rows.start, -1, -1, -1)
                )
                passes = config.init_steps if k == 0 else config.sampling_steps
                frames[g] = self.model.denoising_pass(
                    frames[g], condition, init=k == 0, steps=passes, method=config.sampler, churn=config.churn,
                    s_tmin=config.s_tmin, s_tmax=math.inf if config.s_tmax is None else config.s_tmax,
                    s_noise=config.s_noise, generator=generators[rows],
                )
                emitted.append(self.model.next_state(states[rows, -1], frames[g][:, 0]))
            state = self._damped(torch.cat(emitted), origin)  # (n_samples, C, H, W), normalised
            states = torch.cat([states[:, 1:], state[:, None]], dim=1)
            states = self._renewed(states, starts, members, seed, emitted=k + 1, steps=steps, every=every)
            yield k, state


def rolling_training_setup(config: ExperimentConfig) -> TrainingSetup:
    """Forecaster, objective and windows of the rolling family for ``forecast train``.

    Checks (before anything is written): no rollout schedule (``training.rollout`` of one stage of 1 step,
    ``val_rollout_steps`` unset or 1: a window is trained at once), no ``regional_loss_share`` (one grid), the
    store, variables, grid and periods. Windows of ``input_steps`` states and ``window`` targets come from
    :class:`~forecasting.data.torch_dataset.WindowDataset` (normalised with the store's statistics).
    """
    training, data, model = config.training, config.data, config.model
    assert training is not None and data is not None and isinstance(model, RollingDiffusionModelConfig)
    check_one_grid_training(
        training, family=RollingDiffusionForecaster.family,
        trains="the rolling family trains whole windows (model.window) without rollouts",
        validates="the rolling family validates whole windows",
    )
    forecaster = RollingDiffusionForecaster.from_stores(model, data)
    return one_grid_training_setup(
        config, forecaster, target_steps=model.window,
        objective=partial(RollingObjective, init_fraction=model.init_fraction,
                          lognormal=None if model.p_mean is None else (model.p_mean, model.p_std)),
        summary={
            "window": model.window,
            "sampler": model.sampler,
            "network_evaluations_per_lead": evaluations(model.sampler, model.sampling_steps),
            "network_evaluations_first_window": evaluations(model.sampler, model.init_steps),
        },
    )
