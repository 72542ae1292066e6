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
Forecasting of Complex Dynamics") found best for weather. Each frame gets EDM's preconditioning at its own
``sigma_k`` (``c_skip, c_out, c_in, c_noise``; :func:`~forecasting.diffusion.edm.preconditioning`) and the loss
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
init_steps)``. Forecasts run for any number of leads, past the training window. The noise of every frame of
member ``m`` from start ``s`` comes from a generator seeded by ``(seed, s, m)``, so a member is the same
whatever the batching; ``member_batch`` samples go through the network at once.

:class:`RollingSchedule` holds the schedules, :class:`RollingDiffusion` the torch side (normalised tensors
only), :class:`RollingDiffusionForecaster` the :class:`~forecasting.forecasters.Forecaster` (it shares the
one-grid plumbing of :class:`~forecasting.diffusion.conditional.DiffusionForecaster`: stores, checkpoints,
input checks); :class:`RollingObjective` and :func:`rolling_training_setup` plug the family into
``forecast train``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from forecasting.config import (
    ConfigError,
    ExperimentConfig,
    RollingDiffusionModelConfig,
    parse_config,
)
from forecasting.data.store import read_statistics
from forecasting.data.torch_dataset import FORCING_NAMES, _normalised, time_forcings
from forecasting.diffusion.conditional import DiffusionForecaster
from forecasting.diffusion.edm import loss_weight, preconditioning
from forecasting.diffusion.samplers import evaluations, standard_normal
from forecasting.errors import SchemaError
from forecasting.forecasters import GLOBAL, Channels, LeadChunk, Normalisation, _member_seed
from forecasting.models import UNet
from forecasting.schema import LAT, LON, TIME
from forecasting.weights import latitude_weights

if TYPE_CHECKING:
    from forecasting.training.checkpoint import Checkpoint
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


class RollingDiffusion(nn.Module):
    """The window denoiser and one sampling pass, on normalised tensors (see the module docstring).

    Shapes: states ``(B, T_in, C, H, W)`` normalised, oldest first; forcings ``(B, T_in + W_f, F, H, W)`` (the
    input times, then the ``W_f`` frame times; ``W_f`` is the window ``window``); static ``(B, S, H, W)``
    normalised; a window of frames ``(B, W_f, C, H, W)`` (changes in tendency-std units); noise levels ``(B, W_f)``.

    Args:
        n_channels, n_forcings, n_static, input_steps: C, F, S and T_in.
        schedule: The window's :class:`RollingSchedule`.
        latitude: Shape (H,), the grid's latitudes in degrees.
        residual_scale: Shape (C,), ``std / tendency_std``: a normalised state change times this is a frame.
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
        super().__init__()
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be positive; found {sigma_data}")
        self.n_channels, self.input_steps, self.window = n_channels, input_steps, schedule.window
        self.schedule = schedule
        self.sigma_data = float(sigma_data)
        scale = np.asarray(residual_scale, dtype=np.float32)
        if scale.shape != (n_channels,):
            raise ValueError(f"residual_scale must have shape ({n_channels},); found {scale.shape}")
        self.register_buffer("residual_scale", torch.from_numpy(scale)[:, None, None], persistent=False)  # (C, 1, 1)
        phi = np.deg2rad(np.asarray(latitude, dtype=np.float64))
        features = np.stack([np.sin(phi), np.cos(phi)]).astype(np.float32)[:, :, None]  # (2, H, 1)
        self.register_buffer("latitude_features", torch.from_numpy(features), persistent=False)
        frames = self.window * n_channels
        # Conditioning: clean states, forcings of input and frame times, static fields, sin/cos latitude.
        self.n_condition = input_steps * n_channels + (input_steps + self.window) * n_forcings + n_static + 2
        # Network input: the scaled noisy frames, the conditioning and one c_noise channel per frame.
        self.network = UNet(
            frames + self.n_condition + self.window, frames, conditions=("noise",), periodic_lon=periodic_lon,
            **dict(unet),
        )

    def conditioning(self, states: Tensor, forcings: Tensor, static: Tensor) -> Tensor:
        """``[states, forcings, static, sin/cos latitude]`` along channels: (B, n_condition, H, W)."""
        batch, steps, channels, height, width = states.shape
        if steps != self.input_steps or channels != self.n_channels:
            raise ValueError(
                f"states must have shape (B, {self.input_steps}, {self.n_channels}, H, W); found {tuple(states.shape)}"
            )
        if forcings.shape[1] != steps + self.window:
            raise ValueError(
                f"forcings must cover {steps + self.window} times in dim 1; found shape {tuple(forcings.shape)}"
            )
        grid = self.latitude_features.to(states.dtype).expand(batch, -1, -1, width)
        if grid.shape[2] != height:
            raise ValueError(f"the model's grid has {grid.shape[2]} latitudes; the states have {height}")
        return torch.cat(
            [states.reshape(batch, -1, height, width), forcings.reshape(batch, -1, height, width).to(states.dtype),
             static.to(states.dtype), grid],
            dim=1,
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

    def denoising_pass(self, x: Tensor, condition: Tensor, *, init: bool, steps: int, method: str) -> Tensor:
        """One pass of global time ``t`` from 1 to 0 in ``steps`` uniform steps: the window ``x`` (B, W, C, H, W)
        at its noise of ``t = 1`` goes to that of ``t = 0`` (frame 0 finished); ``init`` picks the init schedule.
        ``method`` ``euler`` or ``heun`` (``evaluations(method, steps)`` network calls)."""
        if method not in ROLLING_SAMPLERS:
            raise ValueError(f"unknown rolling sampler {method!r}; known: {list(ROLLING_SAMPLERS)}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1; found {steps}")
        batch = x.shape[0]
        times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)

        def levels(t: Tensor) -> Tensor:  # (B, W, 1, 1, 1)
            sigma = self.schedule.sigmas(t.expand(batch), init=init)
            return sigma.to(device=x.device, dtype=x.dtype)[..., None, None, None]

        for i in range(steps):
            sigma, sigma_next = levels(times[i]), levels(times[i + 1])
            slope = (x - self.denoise(x, sigma[..., 0, 0, 0], condition)) / sigma  # dx/dsigma per frame
            x_next = x + (sigma_next - sigma) * slope
            if method == "heun" and i < steps - 1:  # every frame has sigma_next > 0 before the last step
                slope_next = (x_next - self.denoise(x_next, sigma_next[..., 0, 0, 0], condition)) / sigma_next
                x_next = x + (sigma_next - sigma) * 0.5 * (slope + slope_next)
            x = x_next
        return x


class RollingObjective:
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
        self.area_weights = torch.as_tensor(np.asarray(area_weights, dtype=np.float32))
        self.channel_weights = torch.as_tensor(np.asarray(channel_weights, dtype=np.float32))
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
        weights = self.channel_weights.to(device)[:, None, None] * self.area_weights.to(device)[:, None]  # (C, H, 1)
        per_frame = (frame_weight * (denoised.float() - y) ** 2 * weights).mean(dim=(0, 2, 3, 4))  # (W,)
        return {"loss": per_frame.mean(), "loss_first_frame": per_frame[0].detach(),
                "loss_last_frame": per_frame[-1].detach()}


class RollingDiffusionForecaster(DiffusionForecaster):
    """The rolling diffusion forecaster on one grid (see the module docstring).

    Build it with :meth:`from_stores` (untrained) or :meth:`from_checkpoint`. Attributes as for
    :class:`~forecasting.diffusion.conditional.DiffusionForecaster` (``model_config``, ``channels``, ``static``,
    ``normalisation``, ``grid``, ``latitude``, ``longitude``), plus ``schedule`` (:class:`RollingSchedule`);
    ``model`` is a :class:`RollingDiffusion`.
    """

    family = "rolling"

    def __init__(
        self,
        *,
        model_config: RollingDiffusionModelConfig,
        channels: Channels,
        static: Channels,
        normalisation: Normalisation,
        grid: str,
        latitude: np.ndarray,
        longitude: np.ndarray,
        step: pd.Timedelta,
    ) -> None:
        try:
            self.schedule = RollingSchedule(
                window=model_config.window, sigma_min=model_config.sigma_min, sigma_max=model_config.sigma_max,
                rho=model_config.rho,
            )
        except ValueError as exc:
            raise ConfigError(f"model: {exc}") from None
        self.model_config = model_config
        self.channels = channels
        self.static = static
        self.normalisation = normalisation
        self.grid = grid
        self.grids = (grid,)
        self.latitude = np.asarray(latitude, dtype=np.float64)
        self.longitude = np.asarray(longitude, dtype=np.float64)
        self.step = pd.Timedelta(step)
        self.input_steps = model_config.input_steps
        self.model = RollingDiffusion(
            n_channels=len(channels),
            n_forcings=len(FORCING_NAMES),
            n_static=len(static),
            input_steps=self.input_steps,
            schedule=self.schedule,
            latitude=self.latitude,
            residual_scale=normalisation.std / normalisation.tendency_std,
            periodic_lon=grid == GLOBAL,
            sigma_data=model_config.sigma_data,
            unet={
                "base_channels": model_config.base_channels,
                "channel_mult": tuple(model_config.channel_mult),
                "blocks_per_level": model_config.blocks_per_level,
                "embedding_dim": model_config.embedding_dim,
                "dropout": model_config.dropout,
            },
        )

    @classmethod
    def from_config(
        cls, config: ExperimentConfig, *, checkpoint: Checkpoint | None = None
    ) -> RollingDiffusionForecaster:
        if checkpoint is not None:
            return cls.from_checkpoint(checkpoint)
        assert isinstance(config.model, RollingDiffusionModelConfig)
        if config.data is None:
            raise ConfigError("the config has no 'data' section naming the stores (data.global_store, data.regional_store)")
        return cls.from_stores(config.model, config.data)

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint) -> RollingDiffusionForecaster:
        """Rebuild from a checkpoint written by :meth:`save_checkpoint` (weights loaded, eval mode).

        Raises SchemaError naming the file when it holds another family or weights that do not fit.
        """
        if checkpoint.family != cls.family:
            raise SchemaError(
                f"{checkpoint.path} holds a {checkpoint.family!r} model, not a {cls.family!r} one; use a checkpoint "
                f"trained with model.family: {cls.family}"
            )
        model = parse_config(checkpoint.config, source=str(checkpoint.path)).model
        data = checkpoint.data
        missing = [k for k in ("channels", "static", "step", "grid", "latitude", "longitude") if k not in data]
        if not isinstance(model, RollingDiffusionModelConfig) or missing:
            raise SchemaError(
                f"{checkpoint.path}: not a rolling diffusion checkpoint (model config {type(model).__name__}, data "
                f"entries missing: {missing})"
            )
        forecaster = cls(
            model_config=model,
            channels=Channels.from_dict(data["channels"]),
            static=Channels.from_dict(data["static"]),
            normalisation=Normalisation.from_dict(checkpoint.statistics),
            grid=str(data["grid"]),
            latitude=np.asarray(data["latitude"], dtype=np.float64),
            longitude=np.asarray(data["longitude"], dtype=np.float64),
            step=pd.Timedelta(data["step"]),
        )
        try:
            forecaster.model.load_state_dict(checkpoint.state_dict)
        except RuntimeError as exc:
            raise SchemaError(f"{checkpoint.path}: the weights do not fit the model its config describes: {exc}") from None
        forecaster.model.eval()
        return forecaster

    # -- inference -------------------------------------------------------------------------------
    def _iterate(self, initial, *, starts, positions, steps, members, boundary, seed) -> Iterator[LeadChunk]:
        if boundary is not None:
            raise SchemaError("the rolling family forecasts one grid without boundary values; pass no boundary dataset")
        config = self.model_config
        device = self.device
        ds = initial[self.grid]
        n_starts, n_samples = len(starts), len(starts) * members
        n_channels, height, width = len(self.channels), len(self.latitude), len(self.longitude)
        window = self.schedule.window
        norm = self.normalisation
        index = self._input_positions(ds, starts, source=f"initial conditions ({self.grid} grid)")
        stacked = self.channels.stack(ds[list(self.channels.variables)].isel({TIME: index.ravel()}))
        states = (
            torch.from_numpy(_normalised(stacked, norm.mean[:, None, None], norm.std[:, None, None]))
            .reshape(n_starts, self.input_steps, n_channels, height, width)
            .repeat_interleave(members, dim=0)
            .to(device)
        )  # (n_samples, T_in, C, H, W)
        static_values = self.static.stack(ds[list(self.static.variables)])
        static = torch.from_numpy(
            _normalised(static_values, norm.static_mean[:, None, None], norm.static_std[:, None, None])
        ).to(device)  # (S, H, W)
        # The input times and the window's frame times of the first pass: (n_starts, T_in + W).
        times = starts.values[:, None] + np.array(
            [self.step * (k - self.input_steps + 1) for k in range(self.input_steps + window)], dtype="m8[ns]"
        )[None, :]

        def forcings(k: int) -> Tensor:  # pass k: everything k steps later
            later = times + np.timedelta64(self.step * k)
            values = np.stack([time_forcings(row, self.longitude, height) for row in later])  # (n, T_in + W, F, H, W)
            return torch.from_numpy(values).repeat_interleave(members, dim=0).to(device)

        generators = [
            torch.Generator(device=device).manual_seed(_member_seed(seed, start, m))
            for start in starts for m in range(members)
        ]
        groups = [slice(first, min(first + config.member_batch, n_samples))
                  for first in range(0, n_samples, config.member_batch)]
        sigma_max = self.schedule.sigma_max

        def fresh(rows: slice, n_frames: int) -> Tensor:  # fully noised frames: (rows, n_frames, C, H, W)
            shape = (rows.stop - rows.start, n_frames, n_channels, height, width)
            return sigma_max * standard_normal(shape, generators[rows], device=device, dtype=torch.float32)

        mean = torch.as_tensor(norm.mean, dtype=torch.float32, device=device)[:, None, None]
        std = torch.as_tensor(norm.std, dtype=torch.float32, device=device)[:, None, None]
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                frames = [fresh(rows, window) for rows in groups]
                for k in range(steps):
                    forcing = forcings(k)
                    emitted = []
                    for g, rows in enumerate(groups):
                        if k > 0:  # drop the emitted frame, append a fully noised one
                            frames[g] = torch.cat([frames[g][:, 1:], fresh(rows, 1)], dim=1)
                        condition = self.model.conditioning(
                            states[rows], forcing[rows], static.expand(rows.stop - rows.start, -1, -1, -1)
                        )
                        passes = config.init_steps if k == 0 else config.sampling_steps
                        frames[g] = self.model.denoising_pass(
                            frames[g], condition, init=k == 0, steps=passes, method=config.sampler
                        )
                        emitted.append(self.model.next_state(states[rows, -1], frames[g][:, 0]))
                    state = torch.cat(emitted)  # (n_samples, C, H, W), normalised
                    states = torch.cat([states[:, 1:], state[:, None]], dim=1)
                    values = (state * std + mean).cpu().numpy()
                    chunk = self._chunk_dataset(
                        values.reshape(n_starts, members, n_channels, height, width), starts=starts, lead=k,
                        members=members, lat=ds[LAT].values, lon=ds[LON].values,
                    )
                    yield LeadChunk(positions, k, {self.grid: chunk})
        finally:
            self.model.train(was_training)


def rolling_training_setup(config: ExperimentConfig) -> TrainingSetup:
    """Forecaster, objective and windows of the rolling family for ``forecast train``.

    Checks (before anything is written): no rollout schedule (``training.rollout`` of one stage of 1 step,
    ``val_rollout_steps`` unset or 1: a window is trained at once), no ``regional_loss_share`` (one grid), the
    store, variables, grid and periods. Windows of ``input_steps`` states and ``window`` targets come from
    :class:`~forecasting.data.torch_dataset.WindowDataset` (normalised with the store's statistics).
    """
    from forecasting.data.torch_dataset import WindowDataset
    from forecasting.training.data import open_training_store
    from forecasting.training.train import TrainingSetup

    training, data, model = config.training, config.data, config.model
    assert training is not None and data is not None and isinstance(model, RollingDiffusionModelConfig)
    if training.max_rollout_steps != 1:
        raise ConfigError(
            f"training.rollout asks for up to {training.max_rollout_steps} steps; the rolling family trains whole "
            "windows (model.window) without rollouts: use rollout [{at_step: 0, steps: 1}]"
        )
    if training.val_rollout_steps not in (None, 1):
        raise ConfigError(
            f"training.val_rollout_steps is {training.val_rollout_steps}; the rolling family validates whole windows "
            "(leave it unset or 1)"
        )
    if training.regional_loss_share is not None:
        raise ConfigError("training.regional_loss_share applies to two-grid models; the rolling family uses one grid")
    forecaster = RollingDiffusionForecaster.from_stores(model, data)
    path = data.global_store if model.grid == GLOBAL else data.regional_store
    assert path is not None
    store = open_training_store(path, in_memory=data.in_memory)
    statistics = read_statistics(path)

    def windows(period: tuple[str | None, str | None], what: str) -> WindowDataset:
        try:
            return WindowDataset(
                store, variables=list(forecaster.channels.variables), input_steps=forecaster.input_steps,
                target_steps=model.window, step=forecaster.step, time=period, statistics=statistics,
                static_variables=list(forecaster.static.variables), normalise=True,
            )
        except SchemaError as exc:
            raise SchemaError(f"{path}, {what} period {list(period)}: {exc}") from None

    train_set = windows(training.train_period, "training")
    val_set = windows(training.val_period, "validation") if training.val_period is not None else None
    objective = RollingObjective(
        area_weights=latitude_weights(forecaster.latitude),
        channel_weights=forecaster.channel_weights(training.variable_weights),
        init_fraction=model.init_fraction,
        lognormal=None if model.p_mean is None else (model.p_mean, model.p_std),
    )

    def export(out: Path, metadata: dict) -> Path:
        return forecaster.save_checkpoint(out, config=config, metadata=metadata)

    summary = {
        "family": forecaster.family,
        "grid": forecaster.grid,
        "shape": [len(forecaster.latitude), len(forecaster.longitude)],
        "channels": list(forecaster.channels.names),
        "parameters": sum(p.numel() for p in forecaster.model.parameters()),
        "window": model.window,
        "sampler": model.sampler,
        "network_evaluations_per_lead": evaluations(model.sampler, model.sampling_steps),
        "network_evaluations_first_window": evaluations(model.sampler, model.init_steps),
    }
    return TrainingSetup(
        model=forecaster.model, objective=objective, train=train_set, val=val_set, val_rollout_steps=1,
        export=export, summary=summary,
    )
