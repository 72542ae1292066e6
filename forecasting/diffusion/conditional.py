"""The conditional diffusion family (``model.family: diffusion``): GenCast-style ensembles on one grid, and
the one-grid plumbing that the diffusion families share.

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

Shared by the one-grid families (``diffusion`` here, ``rolling`` in :mod:`forecasting.diffusion.rolling`,
``dyffusion`` in :mod:`forecasting.diffusion.dyffusion`): :class:`OneGridNetwork` (the residual scale and the
conditioning stack of their torch modules), :class:`WeightedObjective` (cell-area times channel loss
weights), :class:`OneGridDiffusionForecaster` (stores, checkpoints, input checks, the initial states and
forcings of a forecast and its lead-by-lead output; a family supplies its network and its sampler) and
:func:`check_one_grid_training` / :func:`one_grid_training_setup` (the ``forecast train`` plumbing).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self

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
    OneGridDiffusionConfig,
    TrainingConfig,
    parse_config,
)
from forecasting.data.store import open_store, read_statistics
from forecasting.data.torch_dataset import FORCING_NAMES, normalised, time_forcings
from forecasting.diffusion.edm import (
    Denoiser,
    EDMConfig,
    denoising_loss,
    loss_weight,
    sample_training_sigma,
)
from forecasting.diffusion.perturbations import change_std_map, perturb_initial_states
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
    check_axis,
    member_seed,
    step_text,
)
from forecasting.models import SpectralFilter, UNet
from forecasting.schema import LAT, LON, TIME
from forecasting.weights import latitude_weights

if TYPE_CHECKING:
    from forecasting.training.checkpoint import Checkpoint
    from forecasting.training.module import Objective
    from forecasting.training.train import TrainingSetup

__all__ = [
    "ConditionalDiffusion",
    "DenoisingObjective",
    "DiffusionForecaster",
    "OneGridDiffusionForecaster",
    "OneGridNetwork",
    "WeightedObjective",
    "check_one_grid_training",
    "diffusion_training_setup",
    "one_grid_training_setup",
]

#: Tolerance in degrees when deciding whether longitudes go round the globe (float32 files).
_CIRCLE_ATOL = 1e-3
#: Mixed into the member seeds of the initial perturbations, so that they are not the sampler's noise.
_PERTURBATION_SALT = 0x1A5E_D0C7_9E37_79B9
#: Salts the generators of the renewed perturbations (the ``n``-th renewal uses ``_RENEWAL_SALT + n``) apart from
#: the sampler's noise and the initial perturbations.
_RENEWAL_SALT = 0x5BD1_E995_7F4A_7C15
#: At most this many pairs of times estimate a perturbation map's change deviations (about 2 % sampling error).
PERTURBATION_MAP_PAIRS = 1024


# ----------------------------------------------------------------------------------------------
# Shared by the one-grid families
# ----------------------------------------------------------------------------------------------
class OneGridNetwork(nn.Module):
    """Base of the one-grid families' torch modules: the residual scale and the conditioning stack.

    Shapes: states ``(B, T_in, C, H, W)`` normalised, oldest first; forcings ``(B, forcing_times, F, H, W)``
    (the input times first, then the family's own times); static ``(B, S, H, W)`` normalised.

    Args:
        n_channels, n_forcings, n_static, input_steps: C, F, S and T_in.
        forcing_times: Times of forcings the conditioning takes (``T_in`` plus the family's own).
        latitude: Shape (H,), the grid's latitudes in degrees (``sin``/``cos`` become input channels).
        residual_scale: Shape (C,), ``std / tendency_std``: a normalised state change times this is in
            tendency-std units.

    Attributes: ``n_condition``, the channels of :meth:`conditioning`. Buffers (not saved in the state dict):
    ``residual_scale`` (C, 1, 1) and ``latitude_features`` (2, H, 1).
    """

    def __init__(
        self,
        *,
        n_channels: int,
        n_forcings: int,
        n_static: int,
        input_steps: int,
        forcing_times: int,
        latitude: np.ndarray,
        residual_scale: np.ndarray,
    ) -> None:
        super().__init__()
        self.n_channels, self.input_steps, self.forcing_times = n_channels, input_steps, forcing_times
        scale = np.asarray(residual_scale, dtype=np.float32)
        if scale.shape != (n_channels,):
            raise ValueError(f"residual_scale must have shape ({n_channels},); found {scale.shape}")
        self.register_buffer("residual_scale", torch.from_numpy(scale)[:, None, None], persistent=False)  # (C, 1, 1)
        phi = np.deg2rad(np.asarray(latitude, dtype=np.float64))
        features = np.stack([np.sin(phi), np.cos(phi)]).astype(np.float32)[:, :, None]  # (2, H, 1)
        self.register_buffer("latitude_features", torch.from_numpy(features), persistent=False)
        self.n_condition = input_steps * n_channels + forcing_times * n_forcings + n_static + 2

    def conditioning(self, states: Tensor, forcings: Tensor, static: Tensor) -> Tensor:
        """``[states, forcings, static, sin/cos latitude]`` along channels: (B, n_condition, H, W)."""
        batch, steps, channels, height, width = states.shape
        if steps != self.input_steps or channels != self.n_channels:
            raise ValueError(
                f"states must have shape (B, {self.input_steps}, {self.n_channels}, H, W); found {tuple(states.shape)}"
            )
        if forcings.shape[1] != self.forcing_times:
            raise ValueError(
                f"forcings must cover {self.forcing_times} times in dim 1; found shape {tuple(forcings.shape)}"
            )
        grid = self.latitude_features.to(states.dtype).expand(batch, -1, -1, width)
        if grid.shape[2] != height:
            raise ValueError(f"the model's grid has {grid.shape[2]} latitudes; the states have {height}")
        return torch.cat(
            [states.reshape(batch, -1, height, width), forcings.reshape(batch, -1, height, width).to(states.dtype),
             static.to(states.dtype), grid],
            dim=1,
        )


class WeightedObjective:
    """Base of the one-grid objectives: errors are weighted per point by channel times cell area.

    Args:
        area_weights: Shape (H,), cell-area weights of the grid's latitudes, mean 1.
        channel_weights: Shape (C,), mean 1.
    """

    def __init__(self, *, area_weights: np.ndarray, channel_weights: np.ndarray) -> None:
        self.area_weights = torch.as_tensor(np.asarray(area_weights, dtype=np.float32))
        self.channel_weights = torch.as_tensor(np.asarray(channel_weights, dtype=np.float32))

    def point_weights(self, device: torch.device) -> Tensor:
        """``channel_weights x area_weights`` on ``device``: (C, H, 1), broadcasting against (..., C, H, W)."""
        return self.channel_weights.to(device)[:, None, None] * self.area_weights.to(device)[:, None]


class OneGridDiffusionForecaster(Forecaster):
    """Base of the one-grid diffusion forecasters: everything but the network and the sampler.

    Build one with :meth:`from_stores` (untrained) or :meth:`from_checkpoint`. Attributes: ``model_config``,
    ``channels``, ``static`` (static input channels), ``normalisation``, ``grid`` (``"global"`` or
    ``"regional"``), ``latitude``/``longitude`` (the grid's axes), ``step``, ``input_steps`` and ``model`` (the
    family's :class:`OneGridNetwork`, from :meth:`_network`).

    A family sets ``family``, ``config_type`` and ``checkpoint_name`` and implements :meth:`_network` and
    :meth:`_sample_leads`; :meth:`_iterate` turns the sampled normalised states into forecast chunks.
    """

    #: The family's model config class: :meth:`from_config` and :meth:`from_checkpoint` accept only its instances.
    config_type: ClassVar[type[OneGridDiffusionConfig]]
    #: What errors call a checkpoint of the family, e.g. ``"diffusion forecaster"``.
    checkpoint_name: ClassVar[str]

    model: OneGridNetwork

    def __init__(
        self,
        *,
        model_config: OneGridDiffusionConfig,
        channels: Channels,
        static: Channels,
        normalisation: Normalisation,
        grid: str,
        latitude: np.ndarray,
        longitude: np.ndarray,
        step: pd.Timedelta,
    ) -> None:
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
        self.perturbation_scale = self._perturbation_scale()
        self.initial_perturbation_scale = torch.as_tensor(
            self.channels.per_channel(model_config.initial_perturbation_scales,
                                      key="model.initial_perturbation_scales"),
            dtype=torch.float32,
        )
        self.perturbation_map: Tensor | None = None  # set per forecast from the store (perturbation_map_hours)
        self.spectral_filter = self._spectral_filter()
        self.model = self._network()

    @abstractmethod
    def _network(self) -> OneGridNetwork:
        """The family's torch module; called once, at the end of ``__init__``, after the attributes above are
        set. It also sets the family's own attributes derived from ``model_config`` and raises ConfigError
        naming the key when they are invalid."""

    def _perturbation_scale(self) -> Tensor:
        """(C,) float32: the normalised size of each channel's perturbation per unit of amplitude, its 6-hour
        tendency std over its std times ``model.perturbation_scales`` (ConfigError for a key that is neither a
        variable nor a channel)."""
        norm = self.normalisation
        scales = self.channels.per_channel(self.model_config.perturbation_scales, key="model.perturbation_scales")
        return torch.as_tensor(norm.tendency_std / norm.std * scales, dtype=torch.float32)

    def _spectral_filter(self) -> SpectralFilter | None:
        """The damping of ``model.spectral_filter_hours`` (None when unset); ConfigError on a regional grid."""
        hours = self.model_config.spectral_filter_hours
        if hours is None:
            return None
        if self.grid != GLOBAL:
            raise ConfigError(
                "model.spectral_filter_hours needs the global grid (spherical harmonics); this model forecasts "
                f"the {self.grid} grid"
            )
        return SpectralFilter(
            len(self.latitude), len(self.longitude), e_folding_steps=hours / (self.step / pd.Timedelta(hours=1)),
            order=self.model_config.spectral_filter_order,
        )

    def _perturbed(self, states: Tensor, generators: Sequence[torch.Generator], amplitude: float, *,
                   initial: bool = False) -> Tensor:
        """``states`` (n_samples, T_in, C, H, W), normalised, plus a smooth field per sample of ``amplitude``
        6-hour tendency stds drawn from its generator, with the config's ``perturbation_length`` and
        ``perturbation_scales`` (and ``initial_perturbation_scales`` when ``initial``)
        (:func:`~forecasting.diffusion.perturbations.perturb_initial_states`)."""
        scale = self.perturbation_scale * self.initial_perturbation_scale if initial else self.perturbation_scale
        return perturb_initial_states(
            states, generators, amplitude=amplitude, length=self.model_config.perturbation_length,
            periodic_lon=self.grid == GLOBAL, tendency_scale=scale, spatial_scale=self.perturbation_map,
        )

    def _renewed(self, states: Tensor, starts: pd.DatetimeIndex, members: int, seed: int, *, emitted: int,
                 steps: int, every: int) -> Tensor:
        """The states (n_samples, T_in, C, H, W) the next lead is conditioned on, after ``emitted`` of ``steps``
        leads: plus a fresh smooth field per sample of ``window_perturbation`` tendency stds when one is due (every
        ``every`` leads, not after the last), else as they are. The ``n``-th field comes from a generator seeded
        by ``(seed, start, member)`` and salted by ``n`` apart from the sampler's noise and the initial
        perturbations; the emitted states themselves stay as sampled."""
        amplitude = self.model_config.window_perturbation
        if amplitude == 0 or emitted % every != 0 or emitted >= steps:
            return states
        generators = self._member_generators(starts, members, seed, salt=_RENEWAL_SALT + emitted // every)
        return self._perturbed(states, generators, amplitude)

    def _perturbation_map(self, ds: xr.Dataset) -> Tensor | None:
        """The map of ``model.perturbation_map_hours`` (C, H, W) from the analysis ``ds`` over its statistics
        period (:func:`~forecasting.diffusion.perturbations.change_std_map`), or None when the key is unset.
        The change deviations come from every pair of times that far apart in the period, or from
        :data:`PERTURBATION_MAP_PAIRS` of them drawn at random (a fixed draw) when there are more.
        Raises SchemaError when ``ds`` has no ``train_period`` or no pair of times that far apart in it."""
        config = self.model_config
        if config.perturbation_map_hours is None:
            return None
        source = f"initial conditions ({self.grid} grid)"
        period = ds.attrs.get("train_period")
        if period is None or len(period) != 2:
            raise SchemaError(
                f"{source}: model.perturbation_map_hours needs the store's statistics period (attribute "
                f"'train_period'); found {period!r}"
            )
        lag = pd.Timedelta(hours=config.perturbation_map_hours)
        variables = list(self.channels.variables)
        sub = ds[variables].sel({TIME: slice(*period)})
        times = pd.DatetimeIndex(sub[TIME].values)
        firsts = np.flatnonzero(times.isin(times - lag))  # positions whose state `lag` later is in the period
        if len(firsts) < 2:
            raise SchemaError(
                f"{source}: fewer than 2 pairs of times {lag} apart in the statistics period {list(period)}; "
                "model.perturbation_map_hours cannot be estimated"
            )
        if len(firsts) > PERTURBATION_MAP_PAIRS:  # a fixed random subset: the cost stays bounded on long stores
            firsts = np.sort(np.random.default_rng(0).choice(firsts, PERTURBATION_MAP_PAIRS, replace=False))
        seconds = times.get_indexer(times[firsts] + lag)
        read, where = np.unique(np.concatenate([firsts, seconds]), return_inverse=True)
        states = sub.isel({TIME: read}).load()  # each time read once
        later, earlier = states.isel({TIME: where[len(firsts):]}), states.isel({TIME: where[:len(firsts)]})
        change = later - earlier.assign_coords({TIME: later[TIME]})
        std = self.channels.stack(change.std(TIME))
        try:
            spatial = change_std_map(std, self.latitude, power=config.perturbation_map_power)
        except ValueError as exc:
            raise SchemaError(f"{source}: model.perturbation_map_hours: {exc}") from None
        return torch.as_tensor(spatial, dtype=torch.float32, device=self.device)

    def _damped(self, state: Tensor, origin: Tensor, steps: float = 1.0) -> Tensor:
        """``origin + D(state - origin)``: ``state`` (B, C, H, W, normalised) with its change since ``origin``
        (B, C, H, W) damped over ``steps`` steps by :attr:`spectral_filter`; ``state`` itself when there is none."""
        if self.spectral_filter is None:
            return state
        return origin + self.spectral_filter(state - origin, steps)

    def _network_arguments(self) -> dict[str, Any]:
        """The keyword arguments of every family's torch module: ``n_channels``, ``n_forcings``, ``n_static``,
        ``input_steps``, ``latitude``, ``residual_scale`` (``std / tendency_std``), ``periodic_lon`` (the global
        grid) and ``unet`` (the config's U-Net sizes)."""
        return {
            "n_channels": len(self.channels),
            "n_forcings": len(FORCING_NAMES),
            "n_static": len(self.static),
            "input_steps": self.input_steps,
            "latitude": self.latitude,
            "residual_scale": self.normalisation.std / self.normalisation.tendency_std,
            "periodic_lon": self.grid == GLOBAL,
            "unet": self.model_config.unet_sizes(),
        }

    @property
    def device(self) -> torch.device:
        return self.model.residual_scale.device

    def to(self, device: torch.device | str) -> Self:
        """Move the model to ``device`` (in place); returns self."""
        self.model.to(device)
        if self.spectral_filter is not None:
            self.spectral_filter.to(device)
        return self

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: ExperimentConfig, *, checkpoint: Checkpoint | None = None) -> Self:
        if checkpoint is not None:
            return cls.from_checkpoint(checkpoint)
        model = config.model
        assert isinstance(model, cls.config_type)
        if config.data is None:
            raise ConfigError("the config has no 'data' section naming the stores (data.global_store, data.regional_store)")
        return cls.from_stores(model, config.data)

    @classmethod
    def from_stores(cls, model: OneGridDiffusionConfig, data: ForecastDataConfig) -> Self:
        """An untrained forecaster on the store of ``model.grid``: checks it and reads its statistics.

        Raises ConfigError when that store is not given; SchemaError when variables are missing or a
        ``global`` store's longitudes do not go round the globe; StoreError when the store cannot be read.
        """
        path = _store_path(model, data)
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
    def from_checkpoint(cls, checkpoint: Checkpoint) -> Self:
        """Rebuild from a checkpoint written by :meth:`save_checkpoint` (weights and persistent buffers loaded,
        eval mode).

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
        if not isinstance(model, cls.config_type) or missing:
            raise SchemaError(
                f"{checkpoint.path}: not a {cls.checkpoint_name} checkpoint (model config {type(model).__name__}, "
                f"data entries missing: {missing})"
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
            "step": step_text(self.step),
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

    # -- inference -------------------------------------------------------------------------------
    def check_initial(self, initial: Mapping[str, xr.Dataset], starts: pd.DatetimeIndex) -> None:
        super().check_initial(initial, starts)
        ds = initial[self.grid]
        source = f"initial conditions ({self.grid} grid)"
        check_axis(ds, LAT, self.latitude, source=source)
        check_axis(ds, LON, self.longitude, source=source)
        missing = [v for v in self.static.variables if v not in ds.data_vars]
        if missing:
            raise SchemaError(f"{source}: static variables {missing} are not in the analysis")

    def _iterate(self, initial, *, starts, positions, steps, members, boundary, seed) -> Iterator[LeadChunk]:
        if boundary is not None:
            raise SchemaError(
                f"the {self.family} family forecasts one grid without boundary values; pass no boundary dataset"
            )
        ds = initial[self.grid]
        states, static = self._initial_tensors(ds, starts, members)
        norm = self.normalisation
        self.perturbation_map = self._perturbation_map(ds)
        if self.model_config.initial_perturbation > 0:
            states = self._perturbed(
                states, self._member_generators(starts, members, seed, salt=_PERTURBATION_SALT),
                self.model_config.initial_perturbation, initial=True,
            )
        shape = (len(starts), members, len(self.channels), len(self.latitude), len(self.longitude))
        mean = torch.as_tensor(norm.mean, dtype=torch.float32, device=self.device)[:, None, None]
        std = torch.as_tensor(norm.std, dtype=torch.float32, device=self.device)[:, None, None]
        leads = self._sample_leads(states, static, starts=starts, steps=steps, members=members, seed=seed)
        with self._evaluating():
            for lead, state in leads:
                values = (state * std + mean).cpu().numpy().reshape(shape)
                chunk = self._chunk_dataset(
                    values, starts=starts, lead=lead, members=members, lat=ds[LAT].values, lon=ds[LON].values
                )
                yield LeadChunk(positions, lead, {self.grid: chunk})

    @abstractmethod
    def _sample_leads(
        self, states: Tensor, static: Tensor, *, starts: pd.DatetimeIndex, steps: int, members: int, seed: int
    ) -> Iterator[tuple[int, Tensor]]:
        """Sample the forecast from the normalised input ``states`` (n_starts * members, T_in, C, H, W) (start
        by start, the members of a start together) and ``static`` fields (S, H, W), on the model's device.

        Yields ``(lead, state)`` for leads 0 .. steps-1 in order, ``state`` (n_starts * members, C, H, W)
        normalised. Runs in eval mode without gradients (:meth:`_iterate`).
        """

    def _initial_tensors(self, ds: xr.Dataset, starts: pd.DatetimeIndex, members: int) -> tuple[Tensor, Tensor]:
        """The normalised input states of ``starts`` in ``ds``, each start's repeated for its ``members``:
        (n_starts * members, T_in, C, H, W), and the normalised static fields (S, H, W), on the model's device."""
        norm = self.normalisation
        index = self._input_positions(ds, starts, source=f"initial conditions ({self.grid} grid)")
        stacked = self.channels.stack(ds[list(self.channels.variables)].isel({TIME: index.ravel()}))
        states = (
            torch.from_numpy(normalised(stacked, norm.mean[:, None, None], norm.std[:, None, None]))
            .reshape(len(starts), self.input_steps, len(self.channels), len(self.latitude), len(self.longitude))
            .repeat_interleave(members, dim=0)
            .to(self.device)
        )
        static_values = self.static.stack(ds[list(self.static.variables)])
        static = torch.from_numpy(
            normalised(static_values, norm.static_mean[:, None, None], norm.static_std[:, None, None])
        ).to(self.device)
        return states, static

    def _forcings(
        self, starts: pd.DatetimeIndex, members: int, *, ahead: Sequence[float], later: int = 0
    ) -> Tensor:
        """Time forcings of each start's input times and of the times ``ahead`` (in model steps after the start,
        fractions allowed), everything ``later`` steps later: (n_starts * members, T_in + len(ahead), F, H, W)
        on the model's device, each start's rows repeated for its members."""
        offsets = [self.step * (k - self.input_steps + 1) for k in range(self.input_steps)]
        offsets += [self.step * a for a in ahead]
        times = starts.values[:, None] + np.array(offsets, dtype="m8[ns]")[None, :]
        times = times + np.timedelta64(self.step * later)
        values = np.stack([time_forcings(row, self.longitude, len(self.latitude)) for row in times])
        return torch.from_numpy(values).repeat_interleave(members, dim=0).to(self.device)

    def _member_generators(
        self, starts: pd.DatetimeIndex, members: int, seed: int, *, salt: int = 0
    ) -> list[torch.Generator]:
        """One generator per sample (start by start, its members in order), seeded by ``(seed, start, member)``
        so that a member's noise does not depend on the batching; a nonzero ``salt`` (XORed into the seed) gives
        another stream for the same members."""
        return [
            torch.Generator(device=self.device).manual_seed(member_seed(seed, start, m) ^ salt)
            for start in starts for m in range(members)
        ]

    def _member_batches(self, n_samples: int) -> list[slice]:
        """The samples in consecutive groups of at most ``model_config.member_batch``."""
        size = self.model_config.member_batch
        return [slice(first, min(first + size, n_samples)) for first in range(0, n_samples, size)]

    @contextmanager
    def _evaluating(self) -> Iterator[None]:
        """The model in eval mode without gradients; its training flag is restored afterwards."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was_training)


def _store_path(model: OneGridDiffusionConfig, data: ForecastDataConfig) -> str:
    """The store of ``model.grid``; ConfigError when ``data`` does not name it."""
    path = data.global_store if model.grid == GLOBAL else data.regional_store
    if path is None:
        raise ConfigError(f"model.grid {model.grid!r} needs data.{model.grid}_store")
    return path


def _goes_round(longitude: np.ndarray) -> bool:
    """Whether equally spaced ascending longitudes cover the circle (``n * spacing = 360``)."""
    if longitude.size < 2:
        return False
    spacing = (longitude[-1] - longitude[0]) / (longitude.size - 1)
    return bool(np.isclose(spacing * longitude.size, 360.0, atol=_CIRCLE_ATOL * longitude.size))


def check_one_grid_training(training: TrainingConfig, *, family: str, trains: str, validates: str) -> None:
    """Raise ConfigError unless ``training`` suits a one-grid family that trains without rollouts:
    ``training.rollout`` of one stage of 1 step, ``val_rollout_steps`` unset or 1, no ``regional_loss_share``.

    ``trains`` and ``validates`` say how the family trains and validates instead (they complete the messages,
    e.g. ``"the diffusion family trains one step at a time"``).
    """
    if training.max_rollout_steps != 1:
        raise ConfigError(
            f"training.rollout asks for up to {training.max_rollout_steps} steps; {trains}: use rollout "
            "[{at_step: 0, steps: 1}]"
        )
    if training.val_rollout_steps not in (None, 1):
        raise ConfigError(
            f"training.val_rollout_steps is {training.val_rollout_steps}; {validates} (leave it unset or 1)"
        )
    if training.regional_loss_share is not None:
        raise ConfigError(f"training.regional_loss_share applies to two-grid models; the {family} family uses one grid")


def one_grid_training_setup(
    config: ExperimentConfig,
    forecaster: OneGridDiffusionForecaster,
    *,
    target_steps: int,
    objective: Callable[..., Objective],
    summary: Mapping[str, Any],
) -> TrainingSetup:
    """The :class:`~forecasting.training.train.TrainingSetup` of an untrained one-grid ``forecaster`` (from
    :meth:`~OneGridDiffusionForecaster.from_stores` with ``config``'s model and data).

    Windows of ``forecaster.input_steps`` states and ``target_steps`` targets of its store for the training and
    validation periods (:class:`~forecasting.data.torch_dataset.WindowDataset`, normalised with the store's
    statistics; SchemaError naming the store and the period when a period holds none); the loss
    ``objective(area_weights=..., channel_weights=...)`` with the cell-area weights of the grid's latitudes and
    the channel weights of ``training.variable_weights``; an export writing the forecaster's checkpoint; and a
    summary of the family, grid, shape, channels and parameter count, updated with ``summary``.
    """
    from forecasting.data.torch_dataset import WindowDataset
    from forecasting.training.data import open_training_store
    from forecasting.training.train import TrainingSetup

    training, data = config.training, config.data
    assert training is not None and data is not None
    path = _store_path(forecaster.model_config, data)
    store = open_training_store(path, in_memory=data.in_memory)
    statistics = read_statistics(path)

    def windows(period: tuple[str | None, str | None], what: str) -> WindowDataset:
        try:
            return WindowDataset(
                store, variables=list(forecaster.channels.variables), input_steps=forecaster.input_steps,
                target_steps=target_steps, step=forecaster.step, time=period, statistics=statistics,
                static_variables=list(forecaster.static.variables), normalise=True,
            )
        except SchemaError as exc:
            raise SchemaError(f"{path}, {what} period {list(period)}: {exc}") from None

    train_set = windows(training.train_period, "training")
    val_set = windows(training.val_period, "validation") if training.val_period is not None else None
    loss = objective(
        area_weights=latitude_weights(forecaster.latitude),
        channel_weights=forecaster.channels.loss_weights(training.variable_weights),
    )

    def export(out: Path, metadata: dict) -> Path:
        return forecaster.save_checkpoint(out, config=config, metadata=metadata)

    described = {
        "family": forecaster.family,
        "grid": forecaster.grid,
        "shape": [len(forecaster.latitude), len(forecaster.longitude)],
        "channels": list(forecaster.channels.names),
        "parameters": sum(p.numel() for p in forecaster.model.parameters()),
        **summary,
    }
    return TrainingSetup(
        model=forecaster.model, objective=loss, train=train_set, val=val_set, val_rollout_steps=1,
        export=export, summary=described,
    )


# ----------------------------------------------------------------------------------------------
# The conditional diffusion family
# ----------------------------------------------------------------------------------------------
class ConditionalDiffusion(OneGridNetwork):
    """The denoiser of the next state's residual and the one-step sampler, on normalised tensors.

    Shapes: states ``(B, T_in, C, H, W)`` normalised, oldest first; forcings ``(B, T_in + 1, F, H, W)`` (the
    input times and the target time); static ``(B, S, H, W)`` normalised; residuals and next states
    ``(B, C, H, W)`` (residuals in tendency-std units, states normalised).

    Args:
        n_channels, n_forcings, n_static, input_steps, latitude, residual_scale: As for
            :class:`OneGridNetwork` (the conditioning takes the forcings of ``T_in + 1`` times).
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
        super().__init__(
            n_channels=n_channels, n_forcings=n_forcings, n_static=n_static, input_steps=input_steps,
            forcing_times=input_steps + 1, latitude=latitude, residual_scale=residual_scale,
        )
        network = UNet(
            n_channels + self.n_condition, n_channels, conditions=("noise",), periodic_lon=periodic_lon, **dict(unet)
        )
        self.denoiser = Denoiser(network, sigma_data=sigma_data)

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


class DenoisingObjective(WeightedObjective):
    """The EDM loss of a :class:`ConditionalDiffusion` on a batch of WindowDataset windows.

    A batch holds ``inputs`` (B, T_in, C, H, W) and ``targets`` (B, 1, C, H, W) normalised, ``forcings``
    (B, T_in + 1, F, H, W) and ``static`` (B, S, H, W) (:class:`~forecasting.data.torch_dataset.WindowDataset`
    with ``normalise=True``). One ``sigma`` per sample from ``generator``, the unreduced loss
    (:func:`~forecasting.diffusion.edm.denoising_loss`) weighted by ``area_weights`` (H,) and
    ``channel_weights`` (C,) (both mean 1) and averaged. The metric ``denoised_rmse`` is the weighted RMSE of
    the denoised residual (tendency-std units) at the drawn noise levels, from the same network call.
    """

    def __init__(self, *, area_weights: np.ndarray, channel_weights: np.ndarray, edm: EDMConfig) -> None:
        super().__init__(area_weights=area_weights, channel_weights=channel_weights)
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
        weights = self.point_weights(inputs.device)
        loss = (per_point * weights).mean()
        with torch.no_grad():
            error = per_point / loss_weight(sigma.view(-1, 1, 1, 1), self.edm.sigma_data)
            rmse = (error * weights).mean().sqrt()
        return {"loss": loss, "denoised_rmse": rmse}


class DiffusionForecaster(OneGridDiffusionForecaster):
    """The conditional diffusion forecaster on one grid (see the module docstring).

    Build it with :meth:`from_stores` (untrained) or :meth:`from_checkpoint`. Attributes as for
    :class:`OneGridDiffusionForecaster`, plus ``edm`` (:class:`EDMConfig`); ``model`` is a
    :class:`ConditionalDiffusion`.
    """

    family = "diffusion"
    config_type = DiffusionModelConfig
    checkpoint_name = "diffusion forecaster"

    model_config: DiffusionModelConfig
    model: ConditionalDiffusion

    def _network(self) -> ConditionalDiffusion:
        try:
            self.edm = EDMConfig(**self.model_config.edm_settings())
        except ValueError as exc:
            raise ConfigError(f"model: {exc}") from None
        return ConditionalDiffusion(**self._network_arguments(), sigma_data=self.edm.sigma_data)

    def _sample_leads(self, states, static, *, starts, steps, members, seed) -> Iterator[tuple[int, Tensor]]:
        config = self.model_config
        device = self.device
        n_samples, height, width = states.shape[0], len(self.latitude), len(self.longitude)
        generators = self._member_generators(starts, members, seed)
        sigmas = karras_sigmas(
            config.sampling_steps, sigma_min=self.edm.sigma_min, sigma_max=self.edm.sigma_max, rho=self.edm.rho,
            device=device,
        )
        s_tmax = float("inf") if config.s_tmax is None else config.s_tmax
        window, origin = states, states[:, -1]  # (n_samples, T_in, C, H, W), (n_samples, C, H, W)
        for k in range(steps):
            forcing = self._forcings(starts, members, ahead=(1,), later=k)  # input times and the target time
            parts = []
            for rows in self._member_batches(n_samples):
                noise = standard_normal(
                    (rows.stop - rows.start, len(self.channels), height, width), generators[rows],
                    device=device, dtype=torch.float32,
                )
                parts.append(self.model(
                    window[rows], forcing[rows], static.expand(rows.stop - rows.start, -1, -1, -1),
                    noise=noise, sigmas=sigmas, method=config.sampler, churn=config.churn,
                    s_tmin=config.s_tmin, s_tmax=s_tmax, s_noise=config.s_noise, generator=generators[rows],
                ))
            state = self._damped(torch.cat(parts), origin)  # (n_samples, C, H, W), normalised
            window = torch.cat([window[:, 1:], state[:, None]], dim=1)
            window = self._renewed(window, starts, members, seed, emitted=k + 1, steps=steps,
                                   every=config.perturbation_every)
            yield k, state


def diffusion_training_setup(config: ExperimentConfig) -> TrainingSetup:
    """Forecaster, objective and windows of the diffusion family for ``forecast train``.

    Checks (before anything is written): one-step training (``training.rollout`` of one stage of 1 step,
    ``val_rollout_steps`` unset or 1), no ``regional_loss_share`` (one grid), the store, variables, grid and
    periods. Windows come from :class:`~forecasting.data.torch_dataset.WindowDataset` (normalised with the
    store's statistics, one target step).
    """
    training, data, model = config.training, config.data, config.model
    assert training is not None and data is not None and isinstance(model, DiffusionModelConfig)
    check_one_grid_training(
        training, family=DiffusionForecaster.family, trains="the diffusion family trains one step at a time",
        validates="the diffusion family validates one step",
    )
    forecaster = DiffusionForecaster.from_stores(model, data)
    return one_grid_training_setup(
        config, forecaster, target_steps=1,
        objective=partial(DenoisingObjective, edm=forecaster.edm),
        summary={"sampler": model.sampler,
                 "network_evaluations_per_step": evaluations(model.sampler, model.sampling_steps)},
    )
