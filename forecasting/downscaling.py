"""Regional downscaling: a coarse field in, the fine regional field out (``model.family: downscaling``).

The model follows CorrDiff (Mardani et al. 2024, "Residual corrective diffusion modeling for km-scale
atmospheric downscaling", arXiv:2309.15214): a deterministic regression
network predicts the conditional mean ``mu = E[y | x]`` of the fine field ``y`` given the coarse input ``x``,
and a diffusion model (EDM, Karras et al. 2022; :mod:`forecasting.diffusion`) samples the residual
``r = y - mu``, giving an ensemble of fine fields with the small-scale detail the mean cannot hold.

Inputs and target (one pair, one time; fine grid ``H x W``, C channels, S static fields):

* ``x``: the coarse field (an analysis, or any model's forecast) bilinearly interpolated onto the fine grid
  (:func:`forecasting.regrid.bilinear_weights`), in the fine store's normalised units
  ``(x - mean) / std``: (C, H, W);
* conditioning features ``[x, static, forcings, position]``: the normalised fine static fields (orography,
  land-sea mask; (S, H, W)), the time forcings of the valid time (day of year and local time,
  :func:`forecasting.data.torch_dataset.time_forcings`; (4, H, W)) and the position in the domain (latitude
  and longitude ramps from -1 to 1; (2, H, W));
* ``y``: the fine field, normalised the same way: (C, H, W).

Both networks are :class:`~forecasting.models.UNet` (replicate padding on a regional grid, circular in
longitude on a global one). Residuals are measured in units of the *detail scale* ``d``: the per-channel
root-mean-square difference between the fine field and the interpolated coarse field over the training pairs
(what interpolation misses), normalised like the fields:

* regression: ``mu = x + d R([x, static, forcings, position])``; a network that outputs zero reproduces the
  bilinear interpolation exactly. Loss: the area-weighted MSE of ``(mu - y) / d``;
* residual diffusion: the clean sample is ``r = (y - mu) / d`` with ``mu`` from the frozen regression network;
  the denoiser ``D(r_noisy; sigma, [x, static, forcings, position, mu])`` (EDM preconditioning,
  :class:`~forecasting.diffusion.edm.Denoiser`) is trained with the EDM loss
  (:func:`~forecasting.diffusion.edm.denoising_loss`), area-weighted; a sample is ``mu + d r``.

Stages (``model.stage``): ``regression``, ``diffusion`` (on the frozen regression of another checkpoint), or
``both`` in one ``forecast train`` run: the first ``regression_steps`` optimiser steps train the regression,
the rest the diffusion with the regression frozen. The stage of a step is read from the network's step
counter (a persistent buffer, so ``--resume`` continues in the right stage); the learning-rate schedule spans
the whole run. Each stage leaves the other network without gradients: under DDP use a strategy that allows
unused parameters (``ddp_find_unused_parameters_true``).

Inference (:func:`downscale`): a coarse forecast Zarr in (forecast layout; an analysis store counts as a
lead-0 forecast), a fine forecast Zarr out in the same layout, streamed lead by lead through
:class:`~forecasting.inference.ForecastWriter`: start times and leads are kept (all, or a chosen subset),
every input member gives ``members_per_input`` output members (member ``m * K + k`` is sample ``k`` of input
member ``m``), and every sample draws its noise from a generator seeded by (seed, start, lead, input member,
k), so outputs do not depend on batching. The input is checked first (variables and units, the coarse grid's spacing against the
training one, coverage of the fine region, leads and the times of day the model was trained on); a failure
leaves nothing at the output.

:class:`PairDataset` holds the training pairs, :class:`DownscalingNetwork` the torch side (normalised tensors
only), :class:`DownscalingModel` the xarray side and checkpoints, :class:`DownscalingObjective` and
:func:`downscaling_training_setup` plug the family into ``forecast train``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
import xarray as xr
from torch import Tensor, nn

from forecasting.config import (
    ConfigError,
    DownscalingModelConfig,
    ExperimentConfig,
    parse_config,
)
from forecasting.data.store import open_store, read_statistics
from forecasting.data.torch_dataset import FORCING_NAMES, time_forcings
from forecasting.diffusion.edm import (
    Denoiser,
    EDMConfig,
    denoising_loss,
    loss_weight,
    sample_training_sigma,
)
from forecasting.diffusion.samplers import (
    evaluations,
    karras_sigmas,
    sample,
    standard_normal,
)
from forecasting.errors import SchemaError, StoreError
from forecasting.forecasters import REGIONAL, Channels, Normalisation
from forecasting.models import UNet
from forecasting.regrid import COORD_ATOL, bilinear_weights
from forecasting.schema import LAT, LEAD, LEVEL, LON, MEMBER, TIME
from forecasting.weights import latitude_weights

if TYPE_CHECKING:
    from forecasting.training.checkpoint import Checkpoint
    from forecasting.training.train import TrainingSetup

__all__ = [
    "FAMILY",
    "CoarseToFine",
    "DownscalingModel",
    "DownscalingNetwork",
    "DownscalingObjective",
    "PairDataset",
    "downscale",
    "downscaling_training_setup",
    "grid_spacing",
]

FAMILY = "downscaling"
#: Position features: latitude and longitude ramps across the domain.
N_POSITION = 2
#: Relative tolerance when grid spacings are compared (float32 coordinates).
_SPACING_RTOL = 1e-3
#: Pairs read to estimate the detail scale (evenly spaced over the training period).
_DETAIL_SAMPLES = 512

Period = tuple[str | None, str | None]


# ----------------------------------------------------------------------------------------------
# Grids
# ----------------------------------------------------------------------------------------------
def grid_spacing(values: np.ndarray, *, name: str, source: str) -> float:
    """The spacing in degrees of a regularly spaced ascending axis; SchemaError naming ``source`` otherwise."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        raise SchemaError(f"{source}: {name} needs at least 2 points; found {values.size}")
    steps = np.diff(values)
    step = float(np.median(steps))
    if step <= 0 or not np.allclose(steps, step, rtol=_SPACING_RTOL, atol=1e-6):
        raise SchemaError(
            f"{source}: {name} must be one ascending, regularly spaced range; found steps "
            f"{np.unique(np.round(steps, 6))[:5].tolist()}"
        )
    return step


def _goes_round(longitude: np.ndarray, spacing: float) -> bool:
    """Whether regularly spaced longitudes cover the circle (``n * spacing = 360``)."""
    return bool(abs(len(longitude) * spacing - 360.0) < 1e-3 * len(longitude))


@dataclass(frozen=True, eq=False)
class CoarseToFine:
    """Bilinear interpolation from one coarse grid onto the model's fine grid (weights computed once).

    Attributes:
        index, weight: Shape (H * W, 4), from :func:`forecasting.regrid.bilinear_weights`.
        shape: The fine grid's ``(H, W)``.
        spacing: The coarse grid's ``(latitude, longitude)`` spacing in degrees.
    """

    index: np.ndarray
    weight: np.ndarray
    shape: tuple[int, int]
    spacing: tuple[float, float]

    @classmethod
    def between(
        cls, coarse_lat: np.ndarray, coarse_lon: np.ndarray, fine_lat: np.ndarray, fine_lon: np.ndarray, *, source: str
    ) -> CoarseToFine:
        """Weights from the coarse grid (``source``) onto the fine one, after checking that it covers it.

        The coarse grid must be regular; its cell centres must span the fine latitudes (a global grid, whose
        outermost rows lie within one spacing of the poles, also reaches the polar caps beyond them: those points
        take the outermost row) and, unless it goes round the globe, the fine longitudes. Raises SchemaError
        naming ``source`` and both areas otherwise.
        """
        clat = np.asarray(coarse_lat, dtype=np.float64)
        clon = np.asarray(coarse_lon, dtype=np.float64)
        flat = np.asarray(fine_lat, dtype=np.float64)
        flon = np.asarray(fine_lon, dtype=np.float64)
        dlat = grid_spacing(clat, name=LAT, source=source)
        dlon = grid_spacing(clon, name=LON, source=source)
        periodic = _goes_round(clon, dlon)
        # a global grid's outermost rows stop short of the poles: points beyond them take those rows
        south = dlat if periodic and clat[0] - dlat <= -90.0 + COORD_ATOL else 0.0
        north = dlat if periodic and clat[-1] + dlat >= 90.0 - COORD_ATOL else 0.0
        lat_ok = (flat >= clat[0] - south - COORD_ATOL) & (flat <= clat[-1] + north + COORD_ATOL)
        lon_ok = np.ones_like(flon, dtype=bool) if periodic else (
            (flon >= clon[0] - COORD_ATOL) & (flon <= clon[-1] + COORD_ATOL)
        )
        if not lat_ok.all() or not lon_ok.all():
            raise SchemaError(
                f"{source}: its area (cell centres lat {clat[0]:g}..{clat[-1]:g}, lon {clon[0]:g}..{clon[-1]:g}) does "
                f"not cover the fine region (lat {flat[0]:g}..{flat[-1]:g}, lon {flon[0]:g}..{flon[-1]:g}): "
                f"{int((~lat_ok).sum())} latitudes and {int((~lon_ok).sum())} longitudes of the fine grid lie outside; "
                "give a coarse field on a global grid or one covering the region"
            )
        lat2, lon2 = np.meshgrid(flat, flon, indexing="ij")
        index, weight = bilinear_weights(clat, clon, lat2.ravel(), lon2.ravel(), source=source)
        return cls(index=index, weight=weight.astype(np.float32), shape=(flat.size, flon.size), spacing=(dlat, dlon))

    def __call__(self, values: np.ndarray) -> np.ndarray:
        """Coarse fields ``(..., h, w)`` -> fine fields ``(..., H, W)``, float32."""
        flat = np.asarray(values, dtype=np.float32).reshape(*values.shape[:-2], -1)
        out = (flat[..., self.index] * self.weight).sum(axis=-1)
        return out.reshape(*values.shape[:-2], *self.shape).astype(np.float32, copy=False)


def _position_features(latitude: np.ndarray, longitude: np.ndarray) -> np.ndarray:
    """Latitude and longitude ramps from -1 to 1 across the domain: (2, H, W) float32."""

    def ramp(axis: np.ndarray) -> np.ndarray:
        axis = np.asarray(axis, dtype=np.float64)
        span = axis[-1] - axis[0]
        return 2.0 * (axis - axis[0]) / span - 1.0 if span > 0 else np.zeros_like(axis)

    lat2, lon2 = np.meshgrid(ramp(latitude), ramp(longitude), indexing="ij")
    return np.stack([lat2, lon2]).astype(np.float32)


def _seconds_of_day(times: np.ndarray) -> np.ndarray:
    ns = np.asarray(times).astype("datetime64[ns]").astype(np.int64)
    return (ns % (86400 * 10**9)) // 10**9


def _positive(values: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(values) & (values > 0), values, fallback)


# ----------------------------------------------------------------------------------------------
# Training pairs
# ----------------------------------------------------------------------------------------------
class PairDataset(torch.utils.data.Dataset):
    """(coarse, fine) pairs at every time both stores hold (within ``time``), on the fine grid.

    One sample (fine grid H x W, C channels, F = 4 forcings):

    * ``inputs``   (C, H, W) float32: the coarse field bilinearly interpolated onto the fine grid, normalised
      with the fine store's statistics ``(x - mean) / std``;
    * ``targets``  (C, H, W) float32: the fine field, normalised the same way;
    * ``forcings`` (F, H, W) float32: time forcings of the pair's time;
    * ``time``     () int64: nanoseconds since 1970 of the pair's time.

    Args:
        coarse, fine: Training stores (paths, opened lazily once per process, or in-memory Datasets).
        channels: The downscaled variables (both stores must hold them with the same levels and units).
        normalisation: The fine store's statistics (its ``mean``/``std`` rows are used).
        time: ``(start, end)`` inclusive labels; None: all common times.
        sources: Names of the coarse and fine data in error messages.

    Raises SchemaError when a variable is missing or differs, when the coarse grid does not cover the fine one,
    or when the stores share no time in ``time``.
    """

    def __init__(
        self,
        coarse: xr.Dataset | str,
        fine: xr.Dataset | str,
        *,
        channels: Channels,
        normalisation: Normalisation,
        time: Period | None,
        sources: tuple[str, str],
    ) -> None:
        self._given = {"coarse": coarse, "fine": fine}
        self._cache: dict[str, xr.Dataset] = {}
        self._cache_pid: int | None = None
        self.channels = channels
        self.sources = sources
        coarse_ds, fine_ds = self._stores()
        for ds, source in ((coarse_ds, sources[0]), (fine_ds, sources[1])):
            channels.check_matches(ds[list(channels.variables)], source=source)
        self.latitude = np.asarray(fine_ds[LAT].values, dtype=np.float64)
        self.longitude = np.asarray(fine_ds[LON].values, dtype=np.float64)
        self.interpolation = CoarseToFine.between(
            coarse_ds[LAT].values, coarse_ds[LON].values, self.latitude, self.longitude, source=sources[0]
        )
        coarse_times = pd.DatetimeIndex(coarse_ds[TIME].values)
        fine_times = pd.DatetimeIndex(fine_ds[TIME].values)
        common = fine_times.intersection(coarse_times)
        if time is not None:  # inclusive labels, as pandas slices them ("2000-09-30" holds the whole day)
            common = common.to_series().loc[slice(time[0], time[1])].index
        if len(common) == 0:
            raise SchemaError(
                f"{sources[0]} and {sources[1]} share no time{'' if time is None else f' within {list(time)}'}: "
                f"coarse {coarse_times[0]} .. {coarse_times[-1]}, fine {fine_times[0]} .. {fine_times[-1]}"
            )
        self.times = common.values
        self._coarse_index = coarse_times.get_indexer(common)
        self._fine_index = fine_times.get_indexer(common)
        self._mean = np.asarray(normalisation.mean, dtype=np.float32)[:, None, None]
        self._std = np.asarray(normalisation.std, dtype=np.float32)[:, None, None]
        # In-memory stores: every pair normalised once, up front (reading per sample costs more than a step).
        self._pairs: tuple[np.ndarray, np.ndarray] | None = None
        if all(isinstance(store, xr.Dataset) for store in self._given.values()):
            self._pairs = self._read(np.arange(len(self.times)))

    def _read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalised (inputs, targets) of pairs ``rows``: each (len(rows), C, H, W) float32."""
        coarse_ds, fine_ds = self._stores()
        variables = list(self.channels.variables)
        coarse = self.channels.stack(coarse_ds[variables].isel({TIME: self._coarse_index[rows]}))  # (n, C, h, w)
        fine = self.channels.stack(fine_ds[variables].isel({TIME: self._fine_index[rows]}))  # (n, C, H, W)
        inputs = (self.interpolation(coarse) - self._mean) / self._std
        targets = (fine - self._mean) / self._std
        for values, source in ((inputs, self.sources[0]), (targets, self.sources[1])):
            bad = ~np.isfinite(values).all(axis=(-2, -1))  # (n, C)
            if bad.any():
                row, channel = np.argwhere(bad)[0]
                raise SchemaError(
                    f"{source}: {self.channels.names[channel]} has missing values (NaN) at "
                    f"{pd.Timestamp(self.times[rows[row]])}; downscaling pairs need complete fields"
                )
        return inputs.astype(np.float32, copy=False), targets.astype(np.float32, copy=False)

    def _stores(self) -> tuple[xr.Dataset, xr.Dataset]:
        """The two stores, opened once in this process (paths) or as given (Datasets)."""
        pid = os.getpid()
        if self._cache_pid != pid:
            self._cache = {
                key: value if isinstance(value, xr.Dataset) else open_store(value, use_dask=False)
                for key, value in self._given.items()
            }
            self._cache_pid = pid
        return self._cache["coarse"], self._cache["fine"]

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state["_cache"], state["_cache_pid"] = {}, None
        return state

    def __len__(self) -> int:
        return len(self.times)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"pair {index} out of range for {len(self)} pairs")
        index = index % len(self)
        if self._pairs is not None:
            inputs, targets = self._pairs[0][index], self._pairs[1][index]
        else:
            many_inputs, many_targets = self._read(np.array([index]))
            inputs, targets = many_inputs[0], many_targets[0]
        time = self.times[index : index + 1]
        return {
            "inputs": torch.from_numpy(np.ascontiguousarray(inputs)),
            "targets": torch.from_numpy(np.ascontiguousarray(targets)),
            "forcings": torch.from_numpy(time_forcings(time, self.longitude, len(self.latitude))[0]),
            "time": torch.tensor(int(time.astype("datetime64[ns]").astype(np.int64)[0])),
        }

    def detail_rms(self, max_samples: int = _DETAIL_SAMPLES) -> np.ndarray:
        """Per-channel RMS of (fine - interpolated coarse) in physical units over up to ``max_samples`` pairs
        spread evenly over the dataset: shape (C,), float64 (a channel without any difference gets its std)."""
        picks = np.unique(np.linspace(0, len(self) - 1, min(max_samples, len(self))).round().astype(np.int64))
        total = np.zeros(len(self.channels))
        for i in picks:
            item = self[int(i)]
            difference = (item["targets"] - item["inputs"]).numpy().astype(np.float64) * self._std
            total += (difference**2).mean(axis=(-2, -1))
        return _positive(np.sqrt(total / len(picks)), self._std[:, 0, 0].astype(np.float64))


# ----------------------------------------------------------------------------------------------
# Torch side
# ----------------------------------------------------------------------------------------------
class DownscalingNetwork(nn.Module):
    """Regression U-Net and residual denoiser on normalised tensors (see the module docstring).

    Shapes: ``inputs`` (B, C, H, W) the normalised interpolated coarse field; ``forcings`` (B, F, H, W);
    features (B, C + S + F + 2, H, W); ``mean`` and samples (B, C, H, W) normalised; residuals (B, C, H, W) in
    detail units.

    Args:
        n_channels, n_forcings: C and F.
        static: Shape (S, H, W), the normalised static fields (a persistent buffer: checkpoints carry them).
        position: Shape (2, H, W), :func:`_position_features`.
        detail_scale: Shape (C,), the detail scale ``d`` in normalised units (detail RMS / std).
        periodic_lon: The fine grid goes round the globe.
        with_denoiser: Build the residual denoiser (False: a regression-only model).
        sigma_data: EDM ``sigma_data`` of the residuals.
        unet: Keyword arguments of :class:`~forecasting.models.UNet` shared by both networks.

    Buffers: ``static``, ``trained_steps`` (int64 scalar, persistent: optimiser steps taken by
    :class:`DownscalingObjective`, which decides the stage from it), ``position`` and ``detail_scale``.
    """

    def __init__(
        self,
        *,
        n_channels: int,
        n_forcings: int,
        static: np.ndarray,
        position: np.ndarray,
        detail_scale: np.ndarray,
        periodic_lon: bool,
        with_denoiser: bool,
        sigma_data: float,
        unet: Mapping[str, Any],
    ) -> None:
        super().__init__()
        static = np.asarray(static, dtype=np.float32)
        scale = np.asarray(detail_scale, dtype=np.float32)
        if static.ndim != 3 or np.asarray(position).shape != (N_POSITION, *static.shape[1:]):
            raise ValueError(
                f"static must be (S, H, W) and position ({N_POSITION}, H, W); found {static.shape}, {np.shape(position)}"
            )
        if scale.shape != (n_channels,):
            raise ValueError(f"detail_scale must have shape ({n_channels},); found {scale.shape}")
        self.n_channels = n_channels
        self.register_buffer("static", torch.from_numpy(static.copy()))
        self.register_buffer("trained_steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("position", torch.from_numpy(np.asarray(position, dtype=np.float32)), persistent=False)
        self.register_buffer("detail_scale", torch.from_numpy(scale)[:, None, None], persistent=False)  # (C, 1, 1)
        self.n_features = n_channels + static.shape[0] + n_forcings + N_POSITION
        self.regression = UNet(self.n_features, n_channels, conditions=(), periodic_lon=periodic_lon, **dict(unet))
        self.denoiser: Denoiser | None = None
        if with_denoiser:
            network = UNet(
                n_channels + self.n_features + n_channels, n_channels, conditions=("noise",), periodic_lon=periodic_lon,
                **dict(unet),
            )
            self.denoiser = Denoiser(network, sigma_data=sigma_data)

    def features(self, inputs: Tensor, forcings: Tensor) -> Tensor:
        """``[inputs, static, forcings, position]`` along channels: (B, n_features, H, W)."""
        batch, channels, height, width = inputs.shape
        if channels != self.n_channels or tuple(self.static.shape[1:]) != (height, width):
            raise ValueError(
                f"inputs must have shape (B, {self.n_channels}, {self.static.shape[1]}, {self.static.shape[2]}); "
                f"found {tuple(inputs.shape)}"
            )
        return torch.cat(
            [inputs, self.static.expand(batch, -1, -1, -1).to(inputs.dtype), forcings.to(inputs.dtype),
             self.position.expand(batch, -1, -1, -1).to(inputs.dtype)],
            dim=1,
        )

    def regression_mean(self, features: Tensor) -> Tensor:
        """``mu = x + d R(features)``, the regression's estimate of the normalised fine field: (B, C, H, W)."""
        inputs = features[:, : self.n_channels]
        return inputs + self.detail_scale * self.regression(features)

    def residual(self, targets: Tensor, mean: Tensor) -> Tensor:
        """The diffusion target ``(y - mu) / d``: (B, C, H, W)."""
        return (targets - mean) / self.detail_scale

    def condition(self, features: Tensor, mean: Tensor) -> Tensor:
        """The denoiser's conditioning channels ``[features, mu]``: (B, n_features + C, H, W)."""
        return torch.cat([features, mean], dim=1)

    def forward(
        self,
        inputs: Tensor,
        forcings: Tensor,
        *,
        noise: Tensor | None,
        sigmas: Tensor | None,
        method: str = "heun",
        churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator=None,
    ) -> Tensor:
        """A normalised fine field (B, C, H, W): the regression mean plus, with a denoiser and ``noise``, a
        residual sampled from unit ``noise`` (B, C, H, W) on the schedule ``sigmas`` with
        :func:`~forecasting.diffusion.samplers.sample` (same keyword arguments)."""
        features = self.features(inputs, forcings)
        mean = self.regression_mean(features)
        if noise is None:
            return mean
        if self.denoiser is None or sigmas is None:
            raise ValueError("sampling a residual needs a network with a denoiser and a noise schedule (sigmas)")
        condition = self.condition(features, mean)
        denoiser = self.denoiser

        def denoise(x: Tensor, sigma: Tensor) -> Tensor:
            return denoiser(x, sigma, condition)

        residual = sample(
            denoise, noise, sigmas, method=method, churn=churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise,
            generator=generator,
        )
        return mean + self.detail_scale * residual


class DownscalingObjective:
    """The loss of a :class:`DownscalingNetwork` on a batch of :class:`PairDataset` samples.

    Regression steps (the network's ``trained_steps`` below ``regression_steps``; None: always): the weighted
    MSE of ``(mu - y) / d``. Diffusion steps (from ``regression_steps`` on): the weighted EDM loss of the
    residual, with the regression mean computed without gradients (frozen). Weights: ``area_weights`` (H,)
    and ``channel_weights`` (C,), both mean 1. A training call (network in training mode, gradients on)
    advances ``trained_steps`` by one.

    Metrics besides ``loss``: ``stage`` (0 regression, 1 diffusion); regression steps: ``rmse_ratio_<channel>``,
    the RMSE of ``mu`` over that of the interpolated coarse field (below 1: better than interpolation);
    diffusion steps: ``denoised_rmse`` (detail units, at the drawn noise levels).
    """

    def __init__(
        self,
        *,
        area_weights: np.ndarray,
        channel_weights: np.ndarray,
        edm: EDMConfig,
        regression_steps: int | None,
        channel_names: Sequence[str],
    ) -> None:
        self.area_weights = torch.as_tensor(np.asarray(area_weights, dtype=np.float32))
        self.channel_weights = torch.as_tensor(np.asarray(channel_weights, dtype=np.float32))
        self.edm = edm
        self.regression_steps = regression_steps
        self.channel_names = tuple(channel_names)

    def diffusion_stage(self, model: DownscalingNetwork) -> bool:
        """Whether the network's next step trains the diffusion model."""
        return self.regression_steps is not None and int(model.trained_steps) >= self.regression_steps

    def __call__(
        self, model: nn.Module, batch: Mapping[str, Tensor], *, steps: int, generator: torch.Generator
    ) -> dict[str, Tensor]:
        if steps != 1:
            raise ValueError(f"downscaling maps one time to one time; asked for {steps} rollout steps")
        assert isinstance(model, DownscalingNetwork)
        diffusion = self.diffusion_stage(model)
        if model.training and torch.is_grad_enabled():
            model.trained_steps += 1
        inputs, targets = batch["inputs"].float(), batch["targets"].float()
        device = inputs.device
        weights = self.channel_weights.to(device)[:, None, None] * self.area_weights.to(device)[:, None]  # (C, H, 1)
        features = model.features(inputs, batch["forcings"])
        metrics: dict[str, Tensor] = {"stage": torch.tensor(float(diffusion), device=device)}
        if not diffusion:
            mean = model.regression_mean(features)
            error = (mean - targets) / model.detail_scale
            metrics["loss"] = (error**2 * weights).mean()
            with torch.no_grad():
                area = self.area_weights.to(device)[:, None]
                model_mse = ((mean - targets) ** 2 * area).mean(dim=(0, 2, 3))
                interpolation_mse = ((inputs - targets) ** 2 * area).mean(dim=(0, 2, 3))
                ratio = (model_mse / interpolation_mse.clamp_min(1e-12)).sqrt()
                for name, value in zip(self.channel_names, ratio, strict=True):
                    metrics[f"rmse_ratio_{name}"] = value
            return metrics
        if model.denoiser is None:
            raise ValueError("the diffusion stage needs a network with a denoiser")
        was_training = model.regression.training
        model.regression.eval()  # frozen: as at inference (no dropout)
        try:
            with torch.no_grad():
                mean = model.regression_mean(features)
        finally:
            model.regression.train(was_training)
        x0 = model.residual(targets, mean)
        sigma = sample_training_sigma(inputs.shape[0], self.edm, generator=generator, device=device)
        per_point = denoising_loss(
            model.denoiser, x0, sigma, condition=model.condition(features, mean), generator=generator,
            sigma_data=self.edm.sigma_data,
        ).float()
        metrics["loss"] = (per_point * weights).mean()
        with torch.no_grad():
            error = per_point / loss_weight(sigma.view(-1, 1, 1, 1), self.edm.sigma_data)
            metrics["denoised_rmse"] = (error * weights).mean().sqrt()
        return metrics


# ----------------------------------------------------------------------------------------------
# The xarray side
# ----------------------------------------------------------------------------------------------
class DownscalingModel:
    """A downscaling model on one fine grid: checks coarse inputs, samples fine fields, reads and writes
    checkpoints (see the module docstring).

    Attributes:
        model_config: The ``model`` section.
        channels, static: The downscaled variables and the static input fields (fine store).
        normalisation: The fine store's statistics (``mean``, ``std``, ``static_mean``, ``static_std``).
        detail_rms: Shape (C,), the detail scale in physical units.
        latitude, longitude: The fine grid's axes (degrees).
        coarse_spacing: ``(latitude, longitude)`` spacing in degrees of the coarse fields trained on.
        valid_seconds: Seconds of the day of the training pairs' times (the times of day the model knows).
        regression_steps: Optimiser steps of the regression stage in this network's counter (None: a
            regression-only model; 0: a diffusion-stage model on a trained regression).
        regression_base_steps: Regression steps trained before this network's counter started (stage
            ``diffusion``: those of the regression checkpoint).
        edm: :class:`~forecasting.diffusion.edm.EDMConfig`.
        network: :class:`DownscalingNetwork`.

    The constructor takes these (but ``edm`` and ``network``, which it builds) and ``static_normalised``, shape
    (S, H, W): the normalised static fields the network holds.
    """

    family = FAMILY

    def __init__(
        self,
        *,
        model_config: DownscalingModelConfig,
        channels: Channels,
        static: Channels,
        normalisation: Normalisation,
        detail_rms: np.ndarray,
        latitude: np.ndarray,
        longitude: np.ndarray,
        static_normalised: np.ndarray,
        coarse_spacing: tuple[float, float],
        valid_seconds: Sequence[int],
        regression_steps: int | None,
        regression_base_steps: int = 0,
    ) -> None:
        try:
            self.edm = EDMConfig(**model_config.edm_settings())
        except ValueError as exc:
            raise ConfigError(f"model: {exc}") from None
        self.model_config = model_config
        self.channels = channels
        self.static = static
        self.normalisation = normalisation
        self.detail_rms = np.asarray(detail_rms, dtype=np.float64)
        self.latitude = np.asarray(latitude, dtype=np.float64)
        self.longitude = np.asarray(longitude, dtype=np.float64)
        self.coarse_spacing = (float(coarse_spacing[0]), float(coarse_spacing[1]))
        self.valid_seconds = tuple(sorted(int(s) for s in valid_seconds))
        self.regression_steps = regression_steps
        self.regression_base_steps = int(regression_base_steps)
        source = "the model's fine grid"
        spacing = grid_spacing(self.longitude, name=LON, source=source)
        grid_spacing(self.latitude, name=LAT, source=source)
        self.network = DownscalingNetwork(
            n_channels=len(channels),
            n_forcings=len(FORCING_NAMES),
            static=static_normalised,
            position=_position_features(self.latitude, self.longitude),
            detail_scale=self.detail_rms / np.asarray(normalisation.std, dtype=np.float64),
            periodic_lon=_goes_round(self.longitude, spacing),
            with_denoiser=model_config.stage != "regression",
            sigma_data=self.edm.sigma_data,
            unet=model_config.unet_sizes(),
        )

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def to(self, device: torch.device | str) -> DownscalingModel:
        """Move the network to ``device`` (in place); returns self."""
        self.network.to(device)
        return self

    def steps_trained(self) -> tuple[int, int]:
        """Optimiser steps trained so far: ``(regression, diffusion)``."""
        counter = int(self.network.trained_steps)
        if self.regression_steps is None:
            return self.regression_base_steps + counter, 0
        return (self.regression_base_steps + min(counter, self.regression_steps),
                max(0, counter - self.regression_steps))

    @property
    def probabilistic(self) -> bool:
        """Whether samples differ: a denoiser that has been trained."""
        return self.network.denoiser is not None and self.steps_trained()[1] > 0

    @property
    def stages(self) -> str:
        """``regression`` or ``regression+diffusion``: what :meth:`sample` applies."""
        return "regression+diffusion" if self.probabilistic else "regression"

    # -- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(
        self, path: str | Path, *, config: ExperimentConfig, metadata: Mapping[str, Any] | None = None
    ) -> Path:
        """Write the model (weights with the static fields, config, statistics, grid) as a checkpoint file
        (:mod:`forecasting.training.checkpoint`, no graph)."""
        from forecasting.training.checkpoint import save_checkpoint

        regression, diffusion = self.steps_trained()
        data = {
            "channels": self.channels.to_dict(),
            "static": self.static.to_dict(),
            "latitude": [float(x) for x in self.latitude],
            "longitude": [float(x) for x in self.longitude],
            "coarse_spacing": list(self.coarse_spacing),
            "valid_seconds": list(self.valid_seconds),
            "regression_steps": self.regression_steps,
            "regression_base_steps": self.regression_base_steps,
            "steps_trained": {"regression": regression, "diffusion": diffusion},
        }
        statistics = {**self.normalisation.to_dict(), "detail_rms": torch.from_numpy(self.detail_rms.copy())}
        return save_checkpoint(
            path, family=self.family, config=config.model_dump(mode="json"), state_dict=self.network.state_dict(),
            statistics=statistics, graph=None, data=data, metadata=metadata,
        )

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint) -> DownscalingModel:
        """Rebuild from a checkpoint written by :meth:`save_checkpoint` (weights loaded, eval mode).

        Raises SchemaError naming the file when it holds another family or does not fit the model its config
        describes.
        """
        if checkpoint.family != FAMILY:
            raise SchemaError(
                f"{checkpoint.path} holds a {checkpoint.family!r} model, not a downscaling one; use a checkpoint "
                f"trained with model.family: {FAMILY}"
            )
        config = parse_config(checkpoint.config, source=str(checkpoint.path))
        data = checkpoint.data
        keys = ("channels", "static", "latitude", "longitude", "coarse_spacing", "valid_seconds", "regression_steps",
                "regression_base_steps")
        missing = [k for k in keys if k not in data]
        if not isinstance(config.model, DownscalingModelConfig) or missing or "static" not in checkpoint.state_dict:
            raise SchemaError(
                f"{checkpoint.path}: not a downscaling checkpoint (model config {type(config.model).__name__}, data "
                f"entries missing: {missing})"
            )
        model = cls(
            model_config=config.model,
            channels=Channels.from_dict(data["channels"]),
            static=Channels.from_dict(data["static"]),
            normalisation=Normalisation.from_dict(checkpoint.statistics),
            detail_rms=checkpoint.statistics["detail_rms"].numpy(),
            latitude=np.asarray(data["latitude"]),
            longitude=np.asarray(data["longitude"]),
            static_normalised=checkpoint.state_dict["static"].numpy(),
            coarse_spacing=tuple(data["coarse_spacing"]),
            valid_seconds=data["valid_seconds"],
            regression_steps=data["regression_steps"],
            regression_base_steps=data["regression_base_steps"],
        )
        try:
            model.network.load_state_dict(checkpoint.state_dict)
        except RuntimeError as exc:
            raise SchemaError(f"{checkpoint.path}: the weights do not fit the model its config describes: {exc}") from None
        model.network.eval()
        return model

    # -- inputs ----------------------------------------------------------------------------------
    def coarse_input(self, forecast: xr.Dataset, *, source: str) -> tuple[xr.Dataset, CoarseToFine]:
        """The model's variables (and levels) of a coarse forecast, and its interpolation onto the fine grid.

        ``forecast`` is in the forecast layout. Raises SchemaError naming ``source`` when a variable or level
        is missing or its units differ, when the coarse grid's spacing differs from the one trained on, or
        when its area does not cover the fine region.
        """
        missing = [v for v in self.channels.variables if v not in forecast.data_vars]
        if missing:
            raise SchemaError(
                f"{source}: variables {missing} of the downscaling model are not in it; it has "
                f"{sorted(map(str, forecast.data_vars))}"
            )
        picked = forecast[list(self.channels.variables)]
        if any(self.channels.has_level):
            have = np.asarray(picked[LEVEL].values, dtype=np.float64) if LEVEL in picked.dims else np.zeros(0)
            absent = [lv for lv in self.channels.levels if not np.any(np.isclose(have, lv))]
            if absent:
                raise SchemaError(f"{source}: levels {absent} hPa of the downscaling model are not in it (it has {have.tolist()})")
            picked = picked.sel({LEVEL: [have[np.isclose(have, lv)][0] for lv in self.channels.levels]})
        self.channels.check_matches(picked, source=source, extra_dims=(LEAD, MEMBER))
        clat = np.asarray(picked[LAT].values, dtype=np.float64)
        clon = np.asarray(picked[LON].values, dtype=np.float64)
        spacing = (grid_spacing(clat, name=LAT, source=source), grid_spacing(clon, name=LON, source=source))
        if not np.allclose(spacing, self.coarse_spacing, rtol=_SPACING_RTOL):
            raise SchemaError(
                f"{source}: its grid spacing is {spacing[0]:g} x {spacing[1]:g} degrees (lat x lon); the model was trained "
                f"to downscale fields on a {self.coarse_spacing[0]:g} x {self.coarse_spacing[1]:g} degree grid. Give "
                "coarse fields at the training resolution, or train a model for this one"
            )
        return picked, CoarseToFine.between(clat, clon, self.latitude, self.longitude, source=source)

    def check_valid_times(self, valid: np.ndarray, *, source: str) -> None:
        """Raise SchemaError naming ``source`` unless every valid time falls at a time of day trained on (the
        diurnal cycle is learned at those times only)."""
        seconds = _seconds_of_day(np.ravel(valid))
        unknown = np.setdiff1d(np.unique(seconds), np.asarray(self.valid_seconds, dtype=np.int64))
        if unknown.size:
            hours = ", ".join(f"{s / 3600:g} h" for s in unknown[:6])
            known = ", ".join(f"{s / 3600:g} h" for s in self.valid_seconds[:24])
            raise SchemaError(
                f"{source}: valid times fall at times of day the model never saw in training ({hours} UTC; it was "
                f"trained at {known} UTC): its leads do not fit the training data's time step. Give leads whose "
                "valid times fall on those hours (select them with leads / --leads) or train on data that has them"
            )

    # -- sampling --------------------------------------------------------------------------------
    def sample(
        self,
        coarse: np.ndarray,
        *,
        valid_times: np.ndarray,
        samples: int,
        seeds: Sequence[int],
        sampler: str | None = None,
        sampling_steps: int | None = None,
        batch: int | None = None,
    ) -> np.ndarray:
        """Fine fields from coarse fields already on the fine grid.

        Args:
            coarse: Shape (N, C, H, W), physical units: coarse fields interpolated onto the fine grid.
            valid_times: Shape (N,), datetime64: their valid times (the time forcings).
            samples: K samples per input (1 for a regression-only model).
            seeds: N * K seeds, row ``n * K + k`` for sample ``k`` of input ``n``.
            sampler, sampling_steps: Override the config's solver and number of schedule intervals.
            batch: Samples per network call (None: the config's ``member_batch``).

        Returns shape (N, K, C, H, W), float32, physical units.
        """
        n = coarse.shape[0]
        if samples < 1 or (samples > 1 and not self.probabilistic):
            raise SchemaError(
                f"{samples} samples per input asked of a deterministic (regression-only) downscaling model; it gives "
                "one field per input: use 1 member per input, or train the diffusion stage"
            )
        if len(seeds) != n * samples:
            raise ValueError(f"{n * samples} seeds needed for {n} inputs x {samples} samples; found {len(seeds)}")
        config = self.model_config
        device = self.device
        mean = np.asarray(self.normalisation.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.normalisation.std, dtype=np.float32)[:, None, None]
        inputs = torch.from_numpy(((np.asarray(coarse, dtype=np.float32) - mean) / std).astype(np.float32))
        forcings = torch.from_numpy(time_forcings(np.asarray(valid_times), self.longitude, len(self.latitude)))
        inputs = inputs.repeat_interleave(samples, dim=0)
        forcings = forcings.repeat_interleave(samples, dim=0)
        step = batch or config.member_batch
        sigmas = None
        if self.probabilistic:
            sigmas = karras_sigmas(
                sampling_steps or config.sampling_steps, sigma_min=self.edm.sigma_min, sigma_max=self.edm.sigma_max,
                rho=self.edm.rho, device=device,
            )
        generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        s_tmax = float("inf") if config.s_tmax is None else config.s_tmax
        parts = []
        was_training = self.network.training
        self.network.eval()
        try:
            with torch.no_grad():
                for first in range(0, n * samples, step):
                    rows = slice(first, min(first + step, n * samples))
                    x, f = inputs[rows].to(device), forcings[rows].to(device)
                    noise = None
                    if sigmas is not None:
                        noise = standard_normal(x.shape, generators[rows], device=device, dtype=torch.float32)
                    parts.append(self.network(
                        x, f, noise=noise, sigmas=sigmas, method=sampler or config.sampler, churn=config.churn,
                        s_tmin=config.s_tmin, s_tmax=s_tmax, s_noise=config.s_noise, generator=generators[rows],
                    ).cpu())
        finally:
            self.network.train(was_training)
        values = torch.cat(parts).numpy() * std + mean
        return values.reshape(n, samples, *values.shape[1:]).astype(np.float32, copy=False)


def _sample_seed(seed: int, start: np.datetime64, lead: np.timedelta64, member: int, sample_index: int) -> int:
    """A 63-bit seed for sample ``sample_index`` of input member ``member`` at (start, lead), independent of
    batching."""
    start_ns = int(np.datetime64(start, "ns").astype(np.int64))
    lead_ns = int(np.timedelta64(lead, "ns").astype(np.int64))
    words = [seed, start_ns & 0xFFFFFFFF, (start_ns >> 32) & 0xFFFFFFFF, lead_ns & 0xFFFFFFFF,
             (lead_ns >> 32) & 0xFFFFFFFF, member, sample_index]
    state = np.random.SeedSequence(words).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


# ----------------------------------------------------------------------------------------------
# Inference: coarse forecast Zarr -> fine forecast Zarr
# ----------------------------------------------------------------------------------------------
def _pick_starts(forecast: xr.Dataset, starts: Sequence | pd.DatetimeIndex | None, *, source: str) -> np.ndarray:
    """Positions of the requested start times in the forecast (None: all of them)."""
    have = pd.DatetimeIndex(forecast[TIME].values)
    if starts is None:
        return np.arange(len(have))
    try:
        wanted = pd.DatetimeIndex(pd.to_datetime(np.atleast_1d(np.asarray(starts))))
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"cannot read start times {starts!r}: {exc}") from None
    if len(wanted) == 0 or wanted.has_duplicates:
        raise SchemaError(f"start times must be unique and at least one; found {list(map(str, wanted))}")
    positions = have.get_indexer(wanted)
    if np.any(positions < 0):
        absent = [str(t) for t in wanted[positions < 0][:5]]
        raise SchemaError(f"{source}: start times {absent} are not in it ({have[0]} .. {have[-1]})")
    return positions


def _pick_leads(forecast: xr.Dataset, leads: Sequence | pd.TimedeltaIndex | None, *, source: str) -> xr.Dataset:
    """The forecast at the requested leads, in increasing order (None: all of them)."""
    if leads is None:
        return forecast
    try:
        wanted = pd.TimedeltaIndex(pd.to_timedelta(np.atleast_1d(np.asarray(leads)))).sort_values()
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"cannot read leads {leads!r}: {exc}") from None
    if len(wanted) == 0 or wanted.has_duplicates:
        raise SchemaError(f"leads must be unique and at least one; found {[str(x) for x in wanted]}")
    have = pd.TimedeltaIndex(forecast[LEAD].values)
    positions = have.get_indexer(wanted)
    if np.any(positions < 0):
        raise SchemaError(
            f"{source}: leads {[str(x) for x in wanted[positions < 0][:5]]} are not in it (it has {[str(x) for x in have[:8]]}..)"
        )
    return forecast.isel({LEAD: positions})


def downscale(
    forecast_path: str | Path,
    *,
    checkpoint: str | Path,
    out: str | Path,
    members_per_input: int = 1,
    starts: Sequence | pd.DatetimeIndex | None = None,
    leads: Sequence | pd.TimedeltaIndex | None = None,
    sampler: str | None = None,
    sampling_steps: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    device: str = "cpu",
    overwrite: bool = False,
) -> Path:
    """Downscale a coarse forecast and stream the fine forecast to ``out`` (see the module docstring).

    Args:
        forecast_path: A forecast Zarr (a group such as ``F.zarr/global`` for a stretched-grid model) or an
            analysis store (read as a lead-0, one-member forecast).
        checkpoint: A downscaling checkpoint (``model.pt`` of ``forecast train``).
        out: The fine forecast Zarr (dims time, prediction_timedelta, realization, [level], latitude, longitude).
        members_per_input: K output members per input member (1 for a regression-only model).
        starts: Start times to downscale (None: all of the forecast's).
        leads: Leads to downscale (timedeltas or pandas strings such as ``"24h"``; None: all of the forecast's).
        sampler, sampling_steps: Override the checkpoint's solver and number of schedule intervals.
        seed: Seed of the samples' noise.
        batch_size: Samples per network call (None: the config's ``member_batch``).
        device: Torch device (``cpu``, ``cuda``).
        overwrite: Replace an existing ``out`` (only once the new forecast is complete).

    Returns ``out``. Attributes: those of :class:`~forecasting.inference.ForecastWriter` (model, checkpoint and
    config hashes, version) plus ``model_family``, ``checkpoint``, ``source_forecast``, ``source_model``,
    ``source_checkpoint_hash``, ``source_config_hash``, ``members_per_input``, ``downscaling_stages``,
    ``sampler``, ``sampling_steps`` and ``seed``. Raises StoreError when ``out`` exists (without
    ``overwrite``), SourceError for unreadable inputs, SchemaError for inputs the model cannot take (see
    :meth:`DownscalingModel.coarse_input`, :meth:`DownscalingModel.check_valid_times`; leads must be >= 0, a
    deterministic model takes one member per input); nothing is written at ``out`` on failure.
    """
    from forecasting.inference import ForecastWriter, open_forecast
    from forecasting.training.checkpoint import load_checkpoint

    out = Path(out)
    if out.exists() and not overwrite:
        raise StoreError(f"forecast {out} already exists; pass --overwrite to replace it")
    if members_per_input < 1:
        raise SchemaError(f"members_per_input must be >= 1; found {members_per_input}")
    ckpt = load_checkpoint(checkpoint, family=FAMILY)
    model = DownscalingModel.from_checkpoint(ckpt).to(device)
    if members_per_input > 1 and not model.probabilistic:
        raise SchemaError(
            f"{checkpoint} is a deterministic (regression-only) downscaling model: it gives one member per input "
            f"member, not {members_per_input}; train the diffusion stage for ensembles"
        )
    source = str(forecast_path)
    forecast = open_forecast(forecast_path)
    coarse, interpolation = model.coarse_input(forecast, source=source)
    positions = _pick_starts(coarse, starts, source=source)
    coarse = _pick_leads(coarse, leads, source=source)
    leads = pd.TimedeltaIndex(coarse[LEAD].values)
    if np.any(leads < pd.Timedelta(0)):
        raise SchemaError(f"{source}: leads must be >= 0 to downscale; found {[str(x) for x in leads[leads < pd.Timedelta(0)][:3]]}")
    start_index = pd.DatetimeIndex(coarse[TIME].values[positions])
    model.check_valid_times(start_index.values[:, None] + leads.values[None, :], source=source)
    n_members, samples = coarse.sizes[MEMBER], members_per_input
    batch = batch_size or model.model_config.member_batch
    group = max(1, batch // (n_members * samples))
    config = parse_config(ckpt.config, source=str(checkpoint))
    attrs = {
        "model_family": FAMILY,
        "checkpoint": str(checkpoint),
        "source_forecast": source,
        "source_model": str(forecast.attrs.get("model", Path(source).stem)),
        "source_checkpoint_hash": str(forecast.attrs.get("checkpoint_hash", "none")),
        "source_config_hash": str(forecast.attrs.get("config_hash", "none")),
        "members_per_input": str(samples),
        "downscaling_stages": model.stages,
        "sampler": str(sampler or model.model_config.sampler) if model.probabilistic else "none",
        "sampling_steps": str(sampling_steps or model.model_config.sampling_steps) if model.probabilistic else "0",
        "seed": str(seed),
    }
    height, width = len(model.latitude), len(model.longitude)
    with ForecastWriter(
        out, starts=start_index, leads=leads, model=config.name, checkpoint_hash=ckpt.sha256, config=ckpt.config,
        attrs=attrs, overwrite=overwrite,
    ) as writer:
        for first in range(0, len(positions), group):
            chosen = slice(first, min(first + group, len(positions)))
            group_starts = start_index[chosen]
            for k, lead in enumerate(leads):
                chunk = coarse.isel({TIME: positions[chosen], LEAD: [k]}).load()
                values = model.channels.stack(chunk)[:, 0]  # (n, M, C, h, w)
                if not np.isfinite(values).all():
                    raise SchemaError(
                        f"{source}: missing values (NaN) in the coarse fields at lead {lead} of the starts from "
                        f"{group_starts[0]}; downscaling needs complete fields"
                    )
                n = len(group_starts)
                fine_input = interpolation(values).reshape(n * n_members, len(model.channels), height, width)
                valid = np.repeat((group_starts + lead).values, n_members)
                seeds = [
                    _sample_seed(seed, start, lead.to_timedelta64(), m, s)
                    for start in group_starts.values for m in range(n_members) for s in range(samples)
                ]
                fields = model.sample(
                    fine_input, valid_times=valid, samples=samples, seeds=seeds, sampler=sampler,
                    sampling_steps=sampling_steps, batch=batch,
                )  # (n * M, K, C, H, W)
                fields = fields.reshape(n, 1, n_members * samples, len(model.channels), height, width)
                ds = model.channels.unstack(
                    fields, dims=(TIME, LEAD, MEMBER),
                    coords={TIME: group_starts.values, LEAD: [lead.to_timedelta64()],
                            MEMBER: np.arange(n_members * samples)},
                    lat=model.latitude, lon=model.longitude,
                )
                writer.write({REGIONAL: ds}, starts=chosen, lead=k)
    return out


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def _check_same(actual: Sequence, expected: Sequence, *, what: str, source: str) -> None:
    if list(actual) != list(expected):
        raise SchemaError(f"{source}: {what} {list(actual)} differ from the regression checkpoint's {list(expected)}")


def downscaling_training_setup(config: ExperimentConfig) -> TrainingSetup:
    """Model, objective and pairs of the downscaling family for ``forecast train``.

    Checks (before anything is written): one-step training (``training.rollout`` of one stage of 1 step,
    ``val_rollout_steps`` unset or 1), no ``regional_loss_share``, both stores (``data.global_store`` coarse,
    ``data.regional_store`` fine), variables, grids, periods and, for stage ``both``, that ``regression_steps``
    leaves steps for the diffusion; for stage ``diffusion``, that the regression checkpoint fits the stores.
    """
    from forecasting.training.checkpoint import load_checkpoint
    from forecasting.training.data import open_training_store
    from forecasting.training.train import TrainingSetup

    training, data, model_config = config.training, config.data, config.model
    assert training is not None and data is not None and isinstance(model_config, DownscalingModelConfig)
    if training.max_rollout_steps != 1:
        raise ConfigError(
            f"training.rollout asks for up to {training.max_rollout_steps} steps; downscaling maps one time to one "
            "time: use rollout [{at_step: 0, steps: 1}]"
        )
    if training.val_rollout_steps not in (None, 1):
        raise ConfigError(f"training.val_rollout_steps is {training.val_rollout_steps}; downscaling validates one time (leave it unset or 1)")
    if training.regional_loss_share is not None:
        raise ConfigError("training.regional_loss_share applies to two-grid forecasters; downscaling has one output grid")
    if data.global_store is None or data.regional_store is None:
        raise ConfigError(
            "downscaling needs data.global_store (the coarse fields) and data.regional_store (the fine fields)"
        )
    coarse_path, fine_path = data.global_store, data.regional_store
    regression_steps: int | None = None
    if model_config.stage == "both":
        regression_steps = model_config.regression_steps or training.max_steps // 2
        if not 1 <= regression_steps < training.max_steps:
            raise ConfigError(
                f"model.regression_steps ({regression_steps}) must be at least 1 and below training.max_steps "
                f"({training.max_steps}) so that the diffusion stage gets steps"
            )
    elif model_config.stage == "diffusion":
        regression_steps = 0

    base: DownscalingModel | None = None
    base_hash = None
    if model_config.stage == "diffusion":
        assert model_config.regression_checkpoint is not None
        regression_ckpt = load_checkpoint(model_config.regression_checkpoint, family=FAMILY)
        base = DownscalingModel.from_checkpoint(regression_ckpt)
        base_hash = regression_ckpt.sha256
        if base.steps_trained()[0] == 0:
            raise ConfigError(f"model.regression_checkpoint {model_config.regression_checkpoint} has an untrained regression")
        channels, static, normalisation = base.channels, base.static, base.normalisation
    else:
        fine_ds = open_store(fine_path)
        channels = Channels.from_dataset(fine_ds, data.variables, source=str(fine_path))
        static = Channels.from_dataset(fine_ds, data.static_variables, source=str(fine_path), static=True)
        normalisation = Normalisation.from_statistics(
            read_statistics(fine_path), channels, static, source=f"statistics of {fine_path}"
        )

    stores = (open_training_store(coarse_path, in_memory=data.in_memory),
              open_training_store(fine_path, in_memory=data.in_memory))

    def pairs(period: Period, what: str) -> PairDataset:
        try:
            return PairDataset(*stores, channels=channels, normalisation=normalisation, time=period,
                               sources=(str(coarse_path), str(fine_path)))
        except SchemaError as exc:
            raise SchemaError(f"{what} period {list(period)}: {exc}") from None

    train_set = pairs(training.train_period, "training")
    val_set = pairs(training.val_period, "validation") if training.val_period is not None else None
    coarse_spacing = train_set.interpolation.spacing
    if base is not None:
        source = f"data of {config.name} (stage diffusion)"
        requested = Channels.from_dataset(open_store(fine_path), data.variables, source=str(fine_path))
        _check_same(requested.names, base.channels.names, what="variables", source=source)
        if data.static_variables is not None:
            _check_same(data.static_variables, base.static.variables, what="static variables", source=source)
        for name, mine, theirs in ((LAT, train_set.latitude, base.latitude), (LON, train_set.longitude, base.longitude)):
            if mine.shape != theirs.shape or not np.allclose(mine, theirs, atol=COORD_ATOL):
                raise SchemaError(f"{source}: the fine grid's {name} of {fine_path} differs from the regression checkpoint's")
        if not np.allclose(coarse_spacing, base.coarse_spacing, rtol=_SPACING_RTOL):
            raise SchemaError(
                f"{source}: {coarse_path} has grid spacing {coarse_spacing}; the regression was trained on "
                f"{base.coarse_spacing}"
            )
        detail_rms, valid_seconds = base.detail_rms, base.valid_seconds
        static_normalised = base.network.static.numpy()
        base_steps = base.steps_trained()[0]
    else:
        fine_ds = open_store(fine_path)
        static_values = static.stack(fine_ds)  # (S, H, W); (0, H, W) without static fields
        static_normalised = ((static_values - normalisation.static_mean[:, None, None])
                             / normalisation.static_std[:, None, None])
        detail_rms = train_set.detail_rms()
        valid_seconds = np.unique(_seconds_of_day(train_set.times)).tolist()
        base_steps = 0
    model = DownscalingModel(
        model_config=model_config, channels=channels, static=static, normalisation=normalisation,
        detail_rms=detail_rms, latitude=train_set.latitude, longitude=train_set.longitude,
        static_normalised=static_normalised, coarse_spacing=coarse_spacing, valid_seconds=valid_seconds,
        regression_steps=regression_steps, regression_base_steps=base_steps,
    )
    if base is not None:
        model.network.regression.load_state_dict(base.network.regression.state_dict())
        model.network.regression.requires_grad_(False)
    objective = DownscalingObjective(
        area_weights=latitude_weights(model.latitude),
        channel_weights=channels.loss_weights(training.variable_weights),
        edm=model.edm,
        regression_steps=regression_steps,
        channel_names=channels.names,
    )

    def export(path: Path, metadata: dict) -> Path:
        extra = {"regression_checkpoint_sha256": base_hash} if base_hash is not None else {}
        return model.save_checkpoint(path, config=config, metadata={**metadata, **extra})

    summary = {
        "family": FAMILY,
        "stage": model_config.stage,
        "regression_steps": regression_steps,
        "fine_shape": [len(model.latitude), len(model.longitude)],
        "coarse_spacing_deg": list(coarse_spacing),
        "channels": list(channels.names),
        "static": list(static.names),
        "detail_rms": dict(zip(channels.names, map(float, detail_rms), strict=True)),
        "training_pairs": len(train_set),
        "parameters": {
            "regression": sum(p.numel() for p in model.network.regression.parameters()),
            "denoiser": sum(p.numel() for p in model.network.denoiser.parameters()) if model.network.denoiser else 0,
        },
        "network_evaluations_per_sample": evaluations(model_config.sampler, model_config.sampling_steps)
        if model.network.denoiser is not None else 0,
    }
    return TrainingSetup(
        model=model.network, objective=objective, train=train_set, val=val_set, val_rollout_steps=1,
        export=export, summary=summary,
    )
