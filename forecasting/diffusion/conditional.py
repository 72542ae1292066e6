"""The conditional diffusion family (``model.family: diffusion``): GenCast-style ensembles on one grid.

Following GenCast (Price et al. 2025, "Probabilistic weather forecasting with machine learning", Nature;
arXiv 2312.15796), a diffusion model samples the next state given the current ones, and forecasts are
rolled out autoregressively, each member from its own noise:

* **target**: GenCast predicts *residuals*. With normalised states ``n_t = (x_t - mean) / std`` (the
  training store's statistics, as :class:`~forecasting.data.torch_dataset.WindowDataset` normalises), the
  clean target is the change over one step in units of the tendency std,
  ``y = (x_{t+1} - x_t) / tendency_std = (n_{t+1} - n_t) * std / tendency_std``, which has roughly unit
  variance (``sigma_data = 1``);
* **conditioning**: the ``input_steps`` previous normalised states, the time forcings of those times and
  of the target time, the normalised static fields and ``sin``/``cos`` of latitude, concatenated to the
  noisy target along channels (Karras et al. 2022 preconditioning, :mod:`forecasting.diffusion.edm`);
* **network**: :class:`~forecasting.models.UNet` conditioned on the noise level, circular in longitude on
  the global grid;
* **training**: the EDM loss at ``ln(sigma) ~ N(P_mean, P_std^2)``, weighted by latitude cell area
  (:func:`forecasting.weights.latitude_weights`) and per channel (``training.variable_weights``);
* **sampling**: :func:`forecasting.diffusion.samplers.sample` with the config's solver, number of steps and
  churn on the EDM schedule; the samples of each (start time, member) draw from their own generator seeded
  by ``(seed, start, member)``, so a member is the same whatever the batching; ``member_batch`` samples go
  through the sampler at once. ``next state = last state + y * tendency_std``.

:class:`ConditionalDiffusion` is the torch side (normalised tensors only); :class:`DiffusionForecaster`
is the :class:`~forecasting.forecasters.Forecaster` (xarray in, forecast layout out, checkpoints);
:class:`DenoisingObjective` and :func:`diffusion_training_setup` plug the family into ``forecast train``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
import xarray as xr
from torch import Tensor, nn

from forecasting.config import (
    ConfigError,
    DiffusionModelConfig,
    ExperimentConfig,
    ForecastDataConfig,
    parse_config,
)
from forecasting.data.store import open_store, read_statistics
from forecasting.data.torch_dataset import FORCING_NAMES, _normalised, time_forcings
from forecasting.diffusion.edm import (
    Denoiser,
    EDMConfig,
    denoising_loss,
    loss_weight,
    sample_training_sigma,
)
from forecasting.diffusion.samplers import (
    Generators,
    evaluations,
    karras_sigmas,
    sample,
    standard_normal,
)
from forecasting.errors import SchemaError
from forecasting.forecasters import (
    GLOBAL,
    Channels,
    Forecaster,
    LeadChunk,
    Normalisation,
    _check_axis,
    _member_seed,
    _step_text,
)
from forecasting.models import UNet
from forecasting.schema import LAT, LON, TIME
from forecasting.weights import latitude_weights

if TYPE_CHECKING:
    from forecasting.training.checkpoint import Checkpoint
    from forecasting.training.train import TrainingSetup

__all__ = ["ConditionalDiffusion", "DenoisingObjective", "DiffusionForecaster", "diffusion_training_setup"]

#: Tolerance in degrees when deciding whether longitudes go round the globe (float32 files).
_CIRCLE_ATOL = 1e-3


class ConditionalDiffusion(nn.Module):
    """The denoiser of the next state's residual and the one-step sampler, on normalised tensors.

    Shapes: states ``(B, T_in, C, H, W)`` normalised, oldest first; forcings ``(B, T_in + 1, F, H, W)`` (the
    input times and the target time); static ``(B, S, H, W)`` normalised; residuals and next states
    ``(B, C, H, W)`` (residuals in tendency-std units, states normalised).

    Args:
        n_channels, n_forcings, n_static, input_steps: C, F, S and T_in.
        latitude: Shape (H,), the grid's latitudes in degrees (``sin``/``cos`` become input channels).
        residual_scale: Shape (C,), ``std / tendency_std``: a normalised state change times this is a residual.
        periodic_lon: The grid goes round the globe (circular padding in longitude).
        sigma_data: EDM ``sigma_data`` of the residuals.
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
        latitude: np.ndarray,
        residual_scale: np.ndarray,
        periodic_lon: bool,
        sigma_data: float,
        unet: Mapping[str, Any],
    ) -> None:
        super().__init__()
        self.n_channels, self.input_steps = n_channels, input_steps
        scale = np.asarray(residual_scale, dtype=np.float32)
        if scale.shape != (n_channels,):
            raise ValueError(f"residual_scale must have shape ({n_channels},); found {scale.shape}")
        self.register_buffer("residual_scale", torch.from_numpy(scale)[:, None, None], persistent=False)  # (C, 1, 1)
        phi = np.deg2rad(np.asarray(latitude, dtype=np.float64))
        features = np.stack([np.sin(phi), np.cos(phi)]).astype(np.float32)[:, :, None]  # (2, H, 1)
        self.register_buffer("latitude_features", torch.from_numpy(features), persistent=False)
        self.n_condition = input_steps * n_channels + (input_steps + 1) * n_forcings + n_static + 2
        network = UNet(
            n_channels + self.n_condition, n_channels, conditions=("noise",), periodic_lon=periodic_lon, **dict(unet)
        )
        self.denoiser = Denoiser(network, sigma_data=sigma_data)

    def conditioning(self, states: Tensor, forcings: Tensor, static: Tensor) -> Tensor:
        """The conditioning channels ``[states, forcings, static, sin/cos latitude]``: (B, n_condition, H, W)."""
        batch, steps, channels, height, width = states.shape
        if steps != self.input_steps or channels != self.n_channels:
            raise ValueError(
                f"states must have shape (B, {self.input_steps}, {self.n_channels}, H, W); found {tuple(states.shape)}"
            )
        if forcings.shape[1] != steps + 1:
            raise ValueError(f"forcings must cover {steps + 1} times in dim 1; found shape {tuple(forcings.shape)}")
        grid = self.latitude_features.to(states.dtype).expand(batch, -1, -1, width)
        if grid.shape[2] != height:
            raise ValueError(f"the model's grid has {grid.shape[2]} latitudes; the states have {height}")
        return torch.cat(
            [states.reshape(batch, -1, height, width), forcings.reshape(batch, -1, height, width).to(states.dtype),
             static.to(states.dtype), grid],
            dim=1,
        )

    def residual(self, states: Tensor, next_state: Tensor) -> Tensor:
        """The clean target: ``(n_{t+1} - n_t) * std / tendency_std``, (B, C, H, W)."""
        return (next_state - states[:, -1]) * self.residual_scale

    def next_state(self, states: Tensor, residual: Tensor) -> Tensor:
        """The inverse of :meth:`residual`: the normalised next state (B, C, H, W)."""
        return states[:, -1] + residual / self.residual_scale

    def forward(
        self,
        states: Tensor,
        forcings: Tensor,
        static: Tensor,
        *,
        noise: Tensor,
        sigmas: Tensor,
        method: str = "heun",
        churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: Generators = None,
    ) -> Tensor:
        """Sample the normalised next state (B, C, H, W) from unit ``noise`` (B, C, H, W) on the schedule
        ``sigmas`` with :func:`~forecasting.diffusion.samplers.sample` (same keyword arguments)."""
        condition = self.conditioning(states, forcings, static)

        def denoise(x: Tensor, sigma: Tensor) -> Tensor:
            return self.denoiser(x, sigma, condition)

        residual = sample(
            denoise, noise, sigmas, method=method, churn=churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise,
            generator=generator,
        )
        return self.next_state(states, residual)


class DenoisingObjective:
    """The EDM loss of a :class:`ConditionalDiffusion` on a batch of WindowDataset windows.

    A batch holds ``inputs`` (B, T_in, C, H, W) and ``targets`` (B, 1, C, H, W) normalised, ``forcings``
    (B, T_in + 1, F, H, W) and ``static`` (B, S, H, W) (:class:`~forecasting.data.torch_dataset.WindowDataset`
    with ``normalise=True``). One ``sigma`` per sample from ``generator``, the unreduced loss
    (:func:`~forecasting.diffusion.edm.denoising_loss`) weighted by ``area_weights`` (H,) and
    ``channel_weights`` (C,) (both mean 1) and averaged. The metric ``denoised_rmse`` is the weighted RMSE of
    the denoised residual (tendency-std units) at the drawn noise levels, from the same network call.
    """

    def __init__(self, *, area_weights: np.ndarray, channel_weights: np.ndarray, edm: EDMConfig) -> None:
        self.area_weights = torch.as_tensor(np.asarray(area_weights, dtype=np.float32))
        self.channel_weights = torch.as_tensor(np.asarray(channel_weights, dtype=np.float32))
        self.edm = edm

    def __call__(
        self, model: nn.Module, batch: Mapping[str, Tensor], *, steps: int, generator: torch.Generator
    ) -> dict[str, Tensor]:
        if steps != 1:
            raise ValueError(f"the diffusion family trains one step at a time; asked for {steps} steps")
        assert isinstance(model, ConditionalDiffusion)
        inputs, targets = batch["inputs"].float(), batch["targets"].float()
        batch_size, steps_in = inputs.shape[:2]
        x0 = model.residual(inputs, targets[:, 0])  # (B, C, H, W)
        condition = model.conditioning(inputs, batch["forcings"][:, : steps_in + 1], batch["static"])
        sigma = sample_training_sigma(batch_size, self.edm, generator=generator, device=inputs.device)
        per_point = denoising_loss(
            model.denoiser, x0, sigma, condition=condition, generator=generator, sigma_data=self.edm.sigma_data
        ).float()
        weights = self.channel_weights.to(inputs.device)[:, None, None] * self.area_weights.to(inputs.device)[:, None]
        loss = (per_point * weights).mean()
        with torch.no_grad():
            error = per_point / loss_weight(sigma.view(-1, 1, 1, 1), self.edm.sigma_data)
            rmse = (error * weights).mean().sqrt()
        return {"loss": loss, "denoised_rmse": rmse}


class DiffusionForecaster(Forecaster):
    """The conditional diffusion forecaster on one grid (see the module docstring).

    Build it with :meth:`from_stores` (untrained) or :meth:`from_checkpoint`. Attributes: ``model_config``,
    ``channels``, ``static`` (static input channels), ``normalisation``, ``grid`` (``"global"`` or
    ``"regional"``), ``latitude``/``longitude`` (the grid's axes), ``edm`` (:class:`EDMConfig`) and ``model``
    (:class:`ConditionalDiffusion`).
    """

    family = "diffusion"

    def __init__(
        self,
        *,
        model_config: DiffusionModelConfig,
        channels: Channels,
        static: Channels,
        normalisation: Normalisation,
        grid: str,
        latitude: np.ndarray,
        longitude: np.ndarray,
        step: pd.Timedelta,
    ) -> None:
        try:
            self.edm = EDMConfig(**model_config.edm_settings())
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
        self.model = ConditionalDiffusion(
            n_channels=len(channels),
            n_forcings=len(FORCING_NAMES),
            n_static=len(static),
            input_steps=self.input_steps,
            latitude=self.latitude,
            residual_scale=normalisation.std / normalisation.tendency_std,
            periodic_lon=grid == GLOBAL,
            sigma_data=self.edm.sigma_data,
            unet={
                "base_channels": model_config.base_channels,
                "channel_mult": tuple(model_config.channel_mult),
                "blocks_per_level": model_config.blocks_per_level,
                "embedding_dim": model_config.embedding_dim,
                "dropout": model_config.dropout,
            },
        )

    @property
    def device(self) -> torch.device:
        return self.model.residual_scale.device

    def to(self, device: torch.device | str) -> DiffusionForecaster:
        """Move the model to ``device`` (in place); returns self."""
        self.model.to(device)
        return self

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: ExperimentConfig, *, checkpoint: Checkpoint | None = None) -> DiffusionForecaster:
        if checkpoint is not None:
            return cls.from_checkpoint(checkpoint)
        model = config.model
        assert isinstance(model, DiffusionModelConfig)
        if config.data is None:
            raise ConfigError("the config has no 'data' section naming the stores (data.global_store, data.regional_store)")
        return cls.from_stores(model, config.data)

    @classmethod
    def from_stores(cls, model: DiffusionModelConfig, data: ForecastDataConfig) -> DiffusionForecaster:
        """An untrained forecaster on the store of ``model.grid``: checks it and reads its statistics.

        Raises ConfigError when that store is not given; SchemaError when variables are missing or a
        ``global`` store's longitudes do not go round the globe; StoreError when the store cannot be read.
        """
        path = data.global_store if model.grid == GLOBAL else data.regional_store
        if path is None:
            raise ConfigError(f"model.grid {model.grid!r} needs data.{model.grid}_store")
        ds = open_store(path)
        channels = Channels.from_dataset(ds, data.variables, source=str(path))
        static = Channels.from_dataset(ds, data.static_variables, source=str(path), static=True)
        normalisation = Normalisation.from_statistics(
            read_statistics(path), channels, static, source=f"statistics of {path}"
        )
        longitude = np.asarray(ds[LON].values, dtype=np.float64)
        if model.grid == GLOBAL and not _goes_round(longitude):
            raise SchemaError(
                f"model.grid 'global' needs a store whose longitudes go round the globe; {path} has {longitude.size} "
                f"longitudes {longitude[0]:g}..{longitude[-1]:g}; use model.grid 'regional' for a limited area"
            )
        return cls(
            model_config=model, channels=channels, static=static, normalisation=normalisation, grid=model.grid,
            latitude=ds[LAT].values, longitude=longitude, step=pd.Timedelta(data.step),
        )

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint) -> DiffusionForecaster:
        """Rebuild from a checkpoint written by :meth:`save_checkpoint` (weights loaded, eval mode).

        Raises SchemaError naming the file when it holds another family or weights that do not fit.
        """
        if checkpoint.family != cls.family:
            raise SchemaError(
                f"{checkpoint.path} holds a {checkpoint.family!r} model, not a {cls.family!r} one; use a checkpoint "
                f"trained with model.family: {cls.family}"
            )
        config = parse_config(checkpoint.config, source=str(checkpoint.path))
        model = config.model
        data = checkpoint.data
        missing = [k for k in ("channels", "static", "step", "grid", "latitude", "longitude") if k not in data]
        if not isinstance(model, DiffusionModelConfig) or missing:
            raise SchemaError(
                f"{checkpoint.path}: not a diffusion forecaster checkpoint (model config "
                f"{type(model).__name__}, data entries missing: {missing})"
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

    def save_checkpoint(
        self, path: str | Path, *, config: ExperimentConfig, metadata: Mapping[str, Any] | None = None
    ) -> Path:
        """Write this model (weights, ``config``, statistics, channels, grid) as a checkpoint file
        (:mod:`forecasting.training.checkpoint`, no graph)."""
        from forecasting.training.checkpoint import save_checkpoint

        data = {
            "channels": self.channels.to_dict(),
            "static": self.static.to_dict(),
            "step": _step_text(self.step),
            "grid": self.grid,
            "latitude": [float(x) for x in self.latitude],
            "longitude": [float(x) for x in self.longitude],
        }
        return save_checkpoint(
            path,
            family=self.family,
            config=config.model_dump(mode="json"),
            state_dict=self.model.state_dict(),
            statistics=self.normalisation.to_dict(),
            graph=None,
            data=data,
            metadata=metadata,
        )

    # -- training support ------------------------------------------------------------------------
    def channel_weights(self, variable_weights: Mapping[str, float]) -> np.ndarray:
        """Per-channel loss weights (C,), mean 1, from weights per variable or channel (default 1).

        Raises ConfigError naming keys that are neither a variable nor a channel, or when all weights are 0.
        """
        names = self.channels.names
        unknown = sorted(set(variable_weights) - set(names) - set(self.channels.variables))
        if unknown:
            raise ConfigError(
                f"training.variable_weights names {unknown}, which are neither variables "
                f"{list(self.channels.variables)} nor channels {list(names)}"
            )
        weights = np.array(
            [variable_weights.get(name, variable_weights.get(name.split("@")[0], 1.0)) for name in names],
            dtype=np.float64,
        )
        if weights.sum() <= 0:
            raise ConfigError("training.variable_weights leave every channel with weight 0")
        return weights / weights.mean()

    # -- inference -------------------------------------------------------------------------------
    def check_initial(self, initial: Mapping[str, xr.Dataset], starts: pd.DatetimeIndex) -> None:
        super().check_initial(initial, starts)
        ds = initial[self.grid]
        source = f"initial conditions ({self.grid} grid)"
        _check_axis(ds, LAT, self.latitude, source=source)
        _check_axis(ds, LON, self.longitude, source=source)
        missing = [v for v in self.static.variables if v not in ds.data_vars]
        if missing:
            raise SchemaError(f"{source}: static variables {missing} are not in the analysis")

    def _iterate(self, initial, *, starts, positions, steps, members, boundary, seed) -> Iterator[LeadChunk]:
        if boundary is not None:
            raise SchemaError("the diffusion family forecasts one grid without boundary values; pass no boundary dataset")
        config = self.model_config
        device = self.device
        ds = initial[self.grid]
        n_starts, n_samples = len(starts), len(starts) * members
        height, width = len(self.latitude), len(self.longitude)
        norm = self.normalisation
        index = self._input_positions(ds, starts, source=f"initial conditions ({self.grid} grid)")
        stacked = self.channels.stack(ds[list(self.channels.variables)].isel({TIME: index.ravel()}))
        states = _normalised(stacked, norm.mean[:, None, None], norm.std[:, None, None])
        window = (
            torch.from_numpy(states.reshape(n_starts, self.input_steps, len(self.channels), height, width))
            .repeat_interleave(members, dim=0)
            .to(device)
        )  # (n_samples, T_in, C, H, W)
        static_values = self.static.stack(ds[list(self.static.variables)])
        static = torch.from_numpy(
            _normalised(static_values, norm.static_mean[:, None, None], norm.static_std[:, None, None])
        ).to(device)  # (S, H, W)
        input_times = starts.values[:, None] + np.array(
            [self.step * (k - self.input_steps + 1) for k in range(self.input_steps + 1)], dtype="m8[ns]"
        )[None, :]  # (n_starts, T_in + 1): the input times and the target time of the first step

        def forcings(k: int) -> Tensor:
            times = input_times + np.timedelta64(self.step * k)
            values = np.stack([time_forcings(row, self.longitude, height) for row in times])  # (n, T_in + 1, F, H, W)
            return torch.from_numpy(values).repeat_interleave(members, dim=0).to(device)

        generators = [
            torch.Generator(device=device).manual_seed(_member_seed(seed, start, m))
            for start in starts for m in range(members)
        ]
        sigmas = karras_sigmas(
            config.sampling_steps, sigma_min=self.edm.sigma_min, sigma_max=self.edm.sigma_max, rho=self.edm.rho,
            device=device,
        )
        s_tmax = float("inf") if config.s_tmax is None else config.s_tmax
        mean = torch.as_tensor(norm.mean, dtype=torch.float32, device=device)[:, None, None]
        std = torch.as_tensor(norm.std, dtype=torch.float32, device=device)[:, None, None]
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for k in range(steps):
                    forcing = forcings(k)
                    parts = []
                    for first in range(0, n_samples, config.member_batch):
                        rows = slice(first, min(first + config.member_batch, n_samples))
                        noise = standard_normal(
                            (rows.stop - rows.start, len(self.channels), height, width), generators[rows],
                            device=device, dtype=torch.float32,
                        )
                        parts.append(self.model(
                            window[rows], forcing[rows], static.expand(rows.stop - rows.start, -1, -1, -1),
                            noise=noise, sigmas=sigmas, method=config.sampler, churn=config.churn,
                            s_tmin=config.s_tmin, s_tmax=s_tmax, s_noise=config.s_noise, generator=generators[rows],
                        ))
                    state = torch.cat(parts)  # (n_samples, C, H, W), normalised
                    window = torch.cat([window[:, 1:], state[:, None]], dim=1)
                    values = (state * std + mean).cpu().numpy()
                    chunk = self._chunk_dataset(
                        values.reshape(n_starts, members, len(self.channels), height, width), starts=starts, lead=k,
                        members=members, lat=ds[LAT].values, lon=ds[LON].values,
                    )
                    yield LeadChunk(positions, k, {self.grid: chunk})
        finally:
            self.model.train(was_training)


def _goes_round(longitude: np.ndarray) -> bool:
    """Whether equally spaced ascending longitudes cover the circle (``n * spacing = 360``)."""
    if longitude.size < 2:
        return False
    spacing = (longitude[-1] - longitude[0]) / (longitude.size - 1)
    return bool(np.isclose(spacing * longitude.size, 360.0, atol=_CIRCLE_ATOL * longitude.size))


def diffusion_training_setup(config: ExperimentConfig) -> TrainingSetup:
    """Forecaster, objective and windows of the diffusion family for ``forecast train``.

    Checks (before anything is written): one-step training (``training.rollout`` of one stage of 1 step,
    ``val_rollout_steps`` unset or 1), no ``regional_loss_share`` (one grid), the store, variables, grid and
    periods. Windows come from :class:`~forecasting.data.torch_dataset.WindowDataset` (normalised with the
    store's statistics, one target step).
    """
    from forecasting.data.torch_dataset import WindowDataset
    from forecasting.training.data import open_training_store
    from forecasting.training.train import TrainingSetup

    training, data, model = config.training, config.data, config.model
    assert training is not None and data is not None and isinstance(model, DiffusionModelConfig)
    if training.max_rollout_steps != 1:
        raise ConfigError(
            f"training.rollout asks for up to {training.max_rollout_steps} steps; the diffusion family trains one "
            "step at a time: use rollout [{at_step: 0, steps: 1}]"
        )
    if training.val_rollout_steps not in (None, 1):
        raise ConfigError(
            f"training.val_rollout_steps is {training.val_rollout_steps}; the diffusion family validates one step "
            "(leave it unset or 1)"
        )
    if training.regional_loss_share is not None:
        raise ConfigError("training.regional_loss_share applies to two-grid models; the diffusion family uses one grid")
    forecaster = DiffusionForecaster.from_stores(model, data)
    path = data.global_store if model.grid == GLOBAL else data.regional_store
    assert path is not None
    store = open_training_store(path, in_memory=data.in_memory)
    statistics = read_statistics(path)

    def windows(period: tuple[str | None, str | None], what: str) -> WindowDataset:
        try:
            return WindowDataset(
                store, variables=list(forecaster.channels.variables), input_steps=forecaster.input_steps,
                target_steps=1, step=forecaster.step, time=period, statistics=statistics,
                static_variables=list(forecaster.static.variables), normalise=True,
            )
        except SchemaError as exc:
            raise SchemaError(f"{path}, {what} period {list(period)}: {exc}") from None

    train_set = windows(training.train_period, "training")
    val_set = windows(training.val_period, "validation") if training.val_period is not None else None
    objective = DenoisingObjective(
        area_weights=latitude_weights(forecaster.latitude),
        channel_weights=forecaster.channel_weights(training.variable_weights),
        edm=forecaster.edm,
    )

    def export(out: Path, metadata: dict) -> Path:
        return forecaster.save_checkpoint(out, config=config, metadata=metadata)

    summary = {
        "family": forecaster.family,
        "grid": forecaster.grid,
        "shape": [len(forecaster.latitude), len(forecaster.longitude)],
        "channels": list(forecaster.channels.names),
        "parameters": sum(p.numel() for p in forecaster.model.parameters()),
        "sampler": model.sampler,
        "network_evaluations_per_step": evaluations(model.sampler, model.sampling_steps),
    }
    return TrainingSetup(
        model=forecaster.model, objective=objective, train=train_set, val=val_set, val_rollout_steps=1,
        export=export, summary=summary,
    )
