"""Experiment configuration: pydantic models loaded from YAML, and the one :class:`ConfigError`.

Every model is frozen and forbids unknown keys, so a typo fails with a message naming the key and the
file. Defaults live here and nowhere else; validated config objects are passed down to the library.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import pandas as pd

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from forecasting.errors import ForecastingError
from forecasting.schema import ConformOptions


class ConfigError(ForecastingError, ValueError):
    """A configuration file or value is invalid; the message names the file and the key."""


class StrictModel(BaseModel):
    """Base of every config model: immutable, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class RegionConfig(StrictModel):
    """A latitude/longitude box in degrees; longitudes in [0, 360], not crossing the 0 meridian."""

    lat_min: float = Field(45.0, ge=-90, le=90)
    lat_max: float = Field(72.0, ge=-90, le=90)
    lon_min: float = Field(0.0, ge=0, le=360)
    lon_max: float = Field(40.0, ge=0, le=360)

    @model_validator(mode="after")
    def _ordered(self) -> RegionConfig:
        if self.lat_min >= self.lat_max:
            raise ValueError(f"lat_min ({self.lat_min}) must be below lat_max ({self.lat_max})")
        if self.lon_min >= self.lon_max:
            raise ValueError(
                f"lon_min ({self.lon_min}) must be below lon_max ({self.lon_max}); boxes crossing 0E are not supported"
            )
        return self

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.lat_min, self.lat_max, self.lon_min, self.lon_max)


class SimulationConfig(StrictModel):
    """The built-in physical dataset (see forecasting.data.simulator for the physics)."""

    years: float = Field(1.0, gt=0, le=50)
    seed: int = 0
    spinup_days: float = Field(60.0, ge=0)
    nlat: int = Field(128, ge=32)
    nlon: int = Field(256, ge=64)
    n_stations: int = Field(100, ge=1, le=1000)
    region: RegionConfig = RegionConfig()

    @model_validator(mode="after")
    def _grid(self) -> SimulationConfig:
        if self.nlat % 32 or self.nlon != 2 * self.nlat:
            raise ValueError(f"nlat must be a multiple of 32 and nlon = 2 * nlat; got nlat={self.nlat}, nlon={self.nlon}")
        return self


class ConformConfig(StrictModel):
    """What a user declares about a source that its files do not say (see schema.ConformOptions)."""

    rename: dict[str, str] = {}
    units: dict[str, str] = {}
    levels: dict[str, float] = {}
    reference_time: str | None = None
    nan_policy: Literal["error", "fixed", "allow"] = "error"

    def to_options(self) -> ConformOptions:
        return ConformOptions(
            rename=dict(self.rename),
            units=dict(self.units),
            levels=dict(self.levels),
            reference_time=self.reference_time,
            nan_policy=self.nan_policy,
        )


class IngestConfig(StrictModel):
    """One ingestion: sources (paths, globs, URLs or catalog names) into one analysis-ready store."""

    sources: list[str] = Field(min_length=1)
    out: str
    variables: list[str] | None = None
    levels: list[float] | None = None
    time: tuple[str | None, str | None] | None = None
    area: tuple[float, float, float, float] | None = None
    train_period: tuple[str | None, str | None] | None = None
    dask_address: str | None = None
    conform: ConformConfig = ConformConfig()


Period = tuple[str | None, str | None]


def _check_period(period: Period | None, key: str) -> None:
    """Both bounds parse as times (None = open) and start <= end; ValueError naming ``key`` otherwise."""
    if period is None:
        return
    parsed = []
    for bound in period:
        if bound is None:
            parsed.append(None)
            continue
        try:
            parsed.append(pd.Timestamp(bound))
        except ValueError:
            raise ValueError(f"{key} bound {bound!r} is not a time") from None
    if parsed[0] is not None and parsed[1] is not None and parsed[0] > parsed[1]:
        raise ValueError(f"{key} is reversed: {period[0]} > {period[1]}")


class ForecastDataConfig(StrictModel):
    """The training stores a forecaster learns from and starts from (see forecasting.data.store).

    ``global_store`` is the coarse global grid and ``regional_store`` the fine regional grid; which ones a
    model needs depends on its mode (stretched: both; global: the global one; limited_area: the regional
    one, with the global one as the boundary source). ``variables`` are the forecast variables (every
    level of a variable with a level dim); None takes every time-dependent variable of the first store.
    ``static_variables`` (None: every static field of the store) are inputs only. ``step`` is the model's
    time step. ``in_memory`` loads the stores into memory for training (small stores only).
    """

    global_store: str | None = None
    regional_store: str | None = None
    variables: list[str] | None = None
    static_variables: list[str] | None = None
    step: str = "6h"
    in_memory: bool = True

    @model_validator(mode="after")
    def _valid(self) -> ForecastDataConfig:
        if self.global_store is None and self.regional_store is None:
            raise ValueError("give at least one of global_store and regional_store")
        try:
            step = pd.Timedelta(self.step)
        except ValueError:
            raise ValueError(f"step {self.step!r} is not a time interval (e.g. '6h')") from None
        if step <= pd.Timedelta(0):
            raise ValueError(f"step must be positive; found {self.step!r}")
        return self


class GraphModelConfig(StrictModel):
    """The stretched-grid graph forecaster (forecasting.models.graph_network, wrapped in forecasting.forecasters).

    mode: ``stretched`` (coarse global grid + fine regional grid on a regionally refined multi-mesh),
    ``global`` (coarse global grid only) or ``limited_area`` (regional grid only, boundary values from the
    global store every step on a strip ``boundary_width`` grid points wide along the box edges).
    ``region`` is the refinement box; None takes the box covering the regional grid. ``noise_channels``
    > 0 makes the model probabilistic (members from noise, trained with the fair CRPS).

    ``nesting`` (stretched mode) says how the two grids meet in the regional box: ``cutout`` drops the
    coarse points inside it (Nipen et al.), ``overlap`` keeps them as data nodes too, and ``refine`` keeps
    them and makes each fine node's tendency the bilinear interpolation of the coarse nodes' tendencies
    plus the network's own output there, so the fine grid's large scales move with the coarse grid's.

    ``encoder_aggregation`` is how a mesh node combines its data nodes' messages: ``sum`` (GraphCast) or
    ``mean``. Over the fine grid the mesh nodes read far more data nodes than elsewhere, so summed
    messages there have another scale (forecasting.models.layers).

    ``detail_inputs`` (``nesting: refine`` only) gives every regional node, besides its states, their
    departure from the bilinear interpolation of the coarse nodes' states there (its fine detail), which
    the network could otherwise only estimate through the mesh; the other nodes get zeros.

    ``regional_encoder: false`` (``nesting`` ``overlap`` or ``refine``) gives the regional nodes decoder edges
    only: the mesh reads the coarse grid alone, as a coarse-only model's does, and the fine nodes take their
    output from the mesh and their own inputs.
    """

    family: Literal["graph"] = "graph"
    mode: Literal["stretched", "global", "limited_area"] = "stretched"
    input_steps: int = Field(2, ge=1, le=8)
    hidden: int = Field(64, ge=1)
    processor_layers: int = Field(4, ge=0)
    mlp_hidden_layers: int = Field(1, ge=1)
    global_level: int = Field(3, ge=0, le=12)
    regional_level: int = Field(5, ge=0, le=12)
    margin_deg: float = Field(5.0, ge=0, le=90)
    region: RegionConfig | None = None
    encoder: Literal["radius", "knn"] = "radius"
    encoder_radius_factor: float = Field(0.6, gt=0)
    encoder_k: int = Field(3, ge=1)
    decoder_k: int = Field(3, ge=1)
    noise_channels: int = Field(0, ge=0)
    checkpoint_processor: bool = False
    boundary_width: int = Field(2, ge=1)
    nesting: Literal["cutout", "overlap", "refine"] = "cutout"
    encoder_aggregation: Literal["sum", "mean"] = "sum"
    detail_inputs: bool = False
    regional_encoder: bool = True

    @model_validator(mode="after")
    def _levels(self) -> GraphModelConfig:
        if self.mode != "limited_area" and self.regional_level < self.global_level:
            raise ValueError(
                f"regional_level ({self.regional_level}) must be >= global_level ({self.global_level})"
            )
        if self.nesting != "cutout" and self.mode != "stretched":
            raise ValueError(
                f"nesting {self.nesting!r} joins the two grids of the stretched mode; mode {self.mode!r} has one "
                "grid, so leave nesting at 'cutout'"
            )
        if self.detail_inputs and self.nesting != "refine":
            raise ValueError(
                "detail_inputs measures the regional nodes against the interpolated coarse nodes of "
                f"nesting 'refine'; nesting is {self.nesting!r}"
            )
        if not self.regional_encoder and self.nesting == "cutout":
            raise ValueError(
                "regional_encoder: false leaves the mesh over the regional box to the coarse points there, which "
                "nesting 'cutout' drops; use nesting 'overlap' or 'refine'"
            )
        return self


class PersistenceModelConfig(StrictModel):
    """Persistence: the analysis at the start time for every lead (forecasting.verification.baselines)."""

    family: Literal["persistence"] = "persistence"


class ClimatologyModelConfig(StrictModel):
    """Climatology of the store over ``period`` (None: the store's training period, else all of it)."""

    family: Literal["climatology"] = "climatology"
    period: Period | None = None
    smoothing_days: int = Field(15, ge=1)

    @model_validator(mode="after")
    def _valid(self) -> ClimatologyModelConfig:
        _check_period(self.period, "period")
        if self.smoothing_days % 2 == 0:
            raise ValueError(f"smoothing_days must be odd; found {self.smoothing_days}")
        return self


class UNetSizesConfig(StrictModel):
    """The sizes of a forecasting.models.UNet: ``base_channels``, ``channel_mult`` (channels per resolution
    level, in multiples of ``base_channels``), ``blocks_per_level``, ``embedding_dim`` (of the conditioning
    embedding; even) and ``dropout``. A base of the model configs whose networks are U-Nets."""

    base_channels: int = Field(32, ge=1)
    channel_mult: list[Annotated[int, Field(ge=1)]] = Field([1, 2, 2], min_length=1, max_length=6)
    blocks_per_level: int = Field(1, ge=1)
    embedding_dim: int = Field(64, ge=2)
    dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _even_embedding(self) -> UNetSizesConfig:
        if self.embedding_dim % 2:
            raise ValueError(f"embedding_dim must be even; found {self.embedding_dim}")
        return self

    def unet_sizes(self) -> dict[str, Any]:
        """The sizes as keyword arguments of forecasting.models.UNet (``channel_mult`` as a tuple)."""
        return {
            "base_channels": self.base_channels,
            "channel_mult": tuple(self.channel_mult),
            "blocks_per_level": self.blocks_per_level,
            "embedding_dim": self.embedding_dim,
            "dropout": self.dropout,
        }


class OneGridDiffusionConfig(UNetSizesConfig):
    """Keys shared by the one-grid diffusion families (``diffusion``, ``rolling``, ``dyffusion``).

    ``grid`` picks ``data.global_store`` (periodic in longitude) or ``data.regional_store``; the networks see
    the last ``input_steps`` states; ``member_batch`` samples (start time x member) go through the network at
    once when forecasting; U-Net sizes as in :class:`UNetSizesConfig`. ``initial_perturbation`` > 0 perturbs
    each member's initial states when forecasting (not in training) by a smooth Gaussian random field of
    ``initial_perturbation`` times each channel's 6-hour tendency std, correlated over ``perturbation_length``
    grid cells (forecasting.diffusion.perturbations): a source of ensemble spread besides the model's own.
    ``perturbation_scales`` multiplies the amplitude per variable or channel (e.g. ``{2m_temperature: 0}``
    leaves t2m unperturbed; default 1), for every perturbation: the initial ones, the renewed ones of
    ``window_perturbation`` (rolling, DYffusion) and DYffusion's ``estimate_perturbation``.
    ``initial_perturbation_scales`` multiplies the initial perturbations alone on top of it, per variable or
    channel (default 1): a channel whose first hours are under-dispersed gets a larger start without changing
    the perturbations renewed later.
    ``perturbation_map_hours`` (None: one amplitude everywhere) shapes every perturbation field in space: it is
    multiplied at each grid point by the standard deviation of the ``perturbation_map_hours`` change there over
    the initial-condition store's statistics period (its ``train_period``; at most 1,024 pairs of times, a fixed
    random draw), to the power
    ``perturbation_map_power``, scaled to an area-weighted rms of 1 per channel, so that members spread more
    where the weather changes more and the mean amplitude stays.
    ``spectral_filter_hours`` (forecasting only; global grid only; None: off) damps the forecast's change since
    its initial state at every lead with hyperdiffusion of order ``spectral_filter_order`` whose e-folding time
    at the grid's smallest resolved scale is ``spectral_filter_hours`` (forecasting.models.spectral_filter):
    it takes away the small-scale power a rollout piles up.
    """

    grid: Literal["global", "regional"] = "global"
    input_steps: int = Field(2, ge=1, le=8)
    member_batch: int = Field(8, ge=1)
    initial_perturbation: float = Field(0.0, ge=0)
    perturbation_length: float = Field(3.0, gt=0)
    perturbation_scales: dict[str, Annotated[float, Field(ge=0)]] = Field(default_factory=dict)
    initial_perturbation_scales: dict[str, Annotated[float, Field(ge=0)]] = Field(default_factory=dict)
    perturbation_map_hours: float | None = Field(None, gt=0)
    perturbation_map_power: float = Field(1.0, gt=0)
    spectral_filter_hours: float | None = Field(None, gt=0)
    spectral_filter_order: int = Field(4, ge=1, le=8)


class EDMSamplingConfig(StrictModel):
    """The EDM constants and sampler settings of a Karras et al. 2022 diffusion model.

    ``sigma_data``, ``sigma_min``, ``sigma_max``, ``rho``, ``p_mean``, ``p_std`` default (None) to the paper's
    (forecasting.diffusion.edm.EDMConfig). Sampling: ``sampler``, ``sampling_steps`` schedule intervals,
    stochastic churn ``churn`` with ``s_noise`` between ``s_tmin`` and ``s_tmax`` (None: no upper bound)
    (EDM Algorithm 2).
    """

    sigma_data: float | None = Field(None, gt=0)
    sigma_min: float | None = Field(None, gt=0)
    sigma_max: float | None = Field(None, gt=0)
    rho: float | None = Field(None, gt=0)
    p_mean: float | None = None
    p_std: float | None = Field(None, gt=0)
    sampler: Literal["euler", "heun", "dpmpp_2m"] = "heun"
    sampling_steps: int = Field(20, ge=1)
    churn: float = Field(0.0, ge=0)
    s_noise: float = Field(1.0, ge=0)
    s_tmin: float = Field(0.0, ge=0)
    s_tmax: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _ordered_bounds(self) -> EDMSamplingConfig:
        if self.sigma_min is not None and self.sigma_max is not None and self.sigma_min >= self.sigma_max:
            raise ValueError(f"sigma_min ({self.sigma_min}) must be below sigma_max ({self.sigma_max})")
        if self.s_tmax is not None and self.s_tmin > self.s_tmax:
            raise ValueError(f"s_tmin ({self.s_tmin}) must not exceed s_tmax ({self.s_tmax})")
        return self

    def edm_settings(self) -> dict[str, float]:
        """The EDM constants set in the config (the rest keep the paper's values)."""
        names = ("sigma_data", "sigma_min", "sigma_max", "rho", "p_mean", "p_std")
        return {name: float(getattr(self, name)) for name in names if getattr(self, name) is not None}


# EDMSamplingConfig comes first among the bases so that pydantic, which runs the validators of the bases in
# reverse method-resolution order, checks embedding_dim before the EDM bounds (as the flat class did).
class DiffusionModelConfig(EDMSamplingConfig, OneGridDiffusionConfig):
    """The conditional diffusion forecaster (forecasting.diffusion.conditional; GenCast-style).

    One grid per model (``grid``). A forecasting.models.UNet (sizes as in :class:`UNetSizesConfig`) denoises
    the next state's residual given the last ``input_steps`` states, with the EDM constants and sampler
    settings of :class:`EDMSamplingConfig`; ``member_batch`` samples (start time x member) per sampler call.
    ``window_perturbation`` > 0 adds, when forecasting, a fresh smooth field of that many 6-hour tendency stds
    to each member's states after every ``perturbation_every`` leads (as the rolling family's renewed
    perturbations; ``perturbation_length`` and ``perturbation_scales`` apply; ours, not GenCast's).
    """

    family: Literal["diffusion"] = "diffusion"
    window_perturbation: float = Field(0.0, ge=0)
    perturbation_every: int = Field(1, ge=1)


class RollingDiffusionModelConfig(OneGridDiffusionConfig):
    """Rolling diffusion (forecasting.diffusion.rolling; Ruhe et al. 2024, "Rolling Diffusion Models").

    One grid per model (``grid`` as for the diffusion family). A window of ``window`` future states (their
    successive changes in tendency-std units) is denoised together, the noise of each growing with its lead;
    each sampling pass of ``sampling_steps`` steps (``sampler`` euler: one network evaluation a step, heun:
    two but on the last) finishes and emits the first state and appends a fully noised one. The first
    window comes from pure noise in ``init_steps`` steps of the init schedule; ``init_fraction`` of the
    training windows are noised with that schedule, the rest with the rolling one. Local diffusion time
    ``tau`` maps to noise ``sigma = (sigma_min^(1/rho) + tau (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho``
    (EDM's schedule; ``rho < 0`` keeps more of the window at low noise, which ERDM, Ruehling Cachay et al.
    2025, found best); ``sigma_min`` is the lowest noise a frame holds before its last step (0.1, not EDM's
    0.002: a denoiser of six-hour changes leaves the noise below about 0.1 in the frame, see
    :mod:`forecasting.diffusion.rolling`); ``sigma_data`` is the EDM preconditioning's data std. With
    ``p_mean`` set, each frame's loss is also weighted by ``exp(-(ln sigma - p_mean)^2 / (2 p_std^2))`` (ERDM's log-normal weighting; None:
    EDM's weighting alone). Stochastic churn ``churn`` with ``s_noise`` on frames between ``s_tmin`` and ``s_tmax``
    (None: no upper bound) as EDM's Algorithm 2, spread over the ``window * sampling_steps`` steps a frame
    lives (0: the deterministic ODE). ``window_perturbation`` > 0 adds, when forecasting, a fresh smooth field of
    that many 6-hour tendency stds to each member's states after every ``perturbation_every`` emitted leads
    (None: every ``window``, as DYffusion's renewed perturbations; ``perturbation_length`` and
    ``perturbation_scales`` apply). U-Net sizes as in
    :class:`UNetSizesConfig`;
    ``member_batch`` samples (start time x member) per network call.
    """

    family: Literal["rolling"] = "rolling"
    window: int = Field(4, ge=1, le=32)
    sigma_data: float = Field(1.0, gt=0)
    sigma_min: float = Field(0.1, gt=0)
    sigma_max: float = Field(80.0, gt=0)
    rho: float = -10.0
    p_mean: float | None = None
    p_std: float = Field(1.2, gt=0)
    init_fraction: float = Field(0.25, ge=0, le=1)
    sampler: Literal["euler", "heun"] = "heun"
    sampling_steps: int = Field(8, ge=1)
    init_steps: int = Field(16, ge=1)
    churn: float = Field(0.0, ge=0)
    s_noise: float = Field(1.0, ge=0)
    s_tmin: float = Field(0.0, ge=0)
    s_tmax: float | None = Field(None, gt=0)
    window_perturbation: float = Field(0.0, ge=0)
    perturbation_every: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _valid(self) -> RollingDiffusionModelConfig:
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"sigma_min ({self.sigma_min}) must be below sigma_max ({self.sigma_max})")
        if self.s_tmax is not None and self.s_tmin > self.s_tmax:
            raise ValueError(f"s_tmin ({self.s_tmin}) must not exceed s_tmax ({self.s_tmax})")
        if self.rho == 0:
            raise ValueError("rho must not be 0 (the schedule is sigma = (...)^rho)")
        return self


class DYffusionModelConfig(OneGridDiffusionConfig):
    """DYffusion (forecasting.diffusion.dyffusion; Ruehling Cachay et al. 2023) on one grid (``grid``).

    A stochastic interpolator ``I(x_t, x_{t+h}, i)`` (dropout ``interpolator_dropout``, kept on when
    forecasting) and a forecaster ``F(x_{t+i}, i) -> x_{t+h}`` over ``horizon`` steps ``h``, two
    forecasting.models.UNet of the same sizes (:class:`UNetSizesConfig`; ``dropout`` is the forecaster's, off
    when forecasting unless ``forecaster_dropout_at_inference``, which makes the forecaster a second source
    of ensemble spread by Monte Carlo dropout, as U-Cast does, arXiv 2604.09041). Training runs both stages
    in one ``forecast train``: the interpolator for ``interpolator_steps`` optimiser steps (None: half of
    ``training.max_steps``), then the forecaster on interpolated states with the interpolator frozen;
    ``lookahead_weight`` is the share of the forecaster loss taken by the paper's one-step look-ahead
    term. ``sampler`` ``cold`` is the paper's cold sampling, which visits ``sampling_steps`` interpolation
    times per window (None: the horizon): the whole steps 0 .. h-1 plus ``sampling_steps - horizon`` extra ones
    evenly in (0, 1); ``direct`` calls the forecaster once per window, from the window's start, takes that
    estimate as the window's end and the interpolator's states between (ours; the released code's
    "refined intermediate predictions" on a one-step schedule; it has no ``sampling_steps``);
    ``member_batch`` samples (start time x member) per network call. ``window_perturbation`` > 0 adds, when
    forecasting, a fresh smooth random field of that many 6-hour tendency stds (correlated over
    ``perturbation_length`` cells, as ``initial_perturbation``) to each member's states at the start of every
    window after the first: spread renewed as the forecast goes on, where the initial perturbations are damped.
    ``estimate_perturbation`` > 0 adds such a field, drawn once per member and window, to every forecaster
    estimate ``x^_{t+h}`` of the window, so that the interpolated states carry a growing share of it through the
    window (ours, not the paper's). ``training_windows`` K > 1 trains the forecaster (stage 2) on the last of
    K chained windows: a random number 0 .. K-1 of windows per batch is first sampled by the model itself
    (its ``sampler``, no gradients), so that the forecaster learns to start from its own forecasts as it
    must beyond the horizon (the pushforward trick of Brandstetter et al. 2022; ours, not the paper's).
    ``forecaster_times`` ``all`` trains the forecaster at every interpolation time ``i`` in 0 .. h-1 (the
    paper); ``start`` at ``i = 0`` only, the one time at which the ``direct`` sampler calls it (ours; it needs
    ``sampler: direct`` and ``lookahead_weight: 0``, since cold sampling and the look-ahead call the forecaster at
    later times).
    """

    family: Literal["dyffusion"] = "dyffusion"
    input_steps: int = Field(1, ge=1, le=8)
    horizon: int = Field(4, ge=2, le=64)
    interpolator_dropout: float = Field(0.15, gt=0, lt=1)
    forecaster_dropout_at_inference: bool = False
    interpolator_steps: int | None = Field(None, ge=1)
    lookahead_weight: float = Field(0.5, ge=0, lt=1)
    sampler: Literal["cold", "direct"] = "cold"
    sampling_steps: int | None = Field(None, ge=2)
    window_perturbation: float = Field(0.0, ge=0)
    estimate_perturbation: float = Field(0.0, ge=0)
    training_windows: int = Field(1, ge=1, le=16)
    forecaster_times: Literal["all", "start"] = "all"

    @model_validator(mode="after")
    def _valid(self) -> DYffusionModelConfig:
        if self.sampling_steps is not None and self.sampling_steps < self.horizon:
            raise ValueError(
                f"sampling_steps ({self.sampling_steps}) must be at least the horizon ({self.horizon}): every step "
                "0 .. horizon-1 is a sampling step"
            )
        if self.sampler == "direct" and self.sampling_steps is not None:
            raise ValueError(
                f"sampling_steps ({self.sampling_steps}) sets the schedule of cold sampling; the 'direct' sampler "
                "calls the forecaster once per window: leave sampling_steps unset (null)"
            )
        if self.forecaster_times == "start" and (self.sampler != "direct" or self.lookahead_weight != 0):
            raise ValueError(
                "forecaster_times 'start' trains the forecaster at the window's start only, so it needs sampler "
                f"'direct' and lookahead_weight 0 (both call it at later times otherwise); found sampler "
                f"{self.sampler!r} and lookahead_weight {self.lookahead_weight}"
            )
        if self.forecaster_dropout_at_inference and self.dropout == 0:
            raise ValueError(
                "forecaster_dropout_at_inference needs a forecaster dropout above 0 (model.dropout); found 0"
            )
        return self


class DownscalingModelConfig(EDMSamplingConfig, UNetSizesConfig):
    """Regional downscaling (forecasting.downscaling): a regression U-Net plus a residual diffusion model
    (CorrDiff, Mardani et al. 2024), from a coarse field to the fine regional field.

    ``data.global_store`` holds the coarse fields (any grid covering the fine one: global, or a coarsened
    regional store), ``data.regional_store`` the fine fields (targets) and the fine static fields.
    ``stage``: ``regression`` trains the regression network alone (a deterministic model); ``diffusion`` trains
    the residual diffusion model on top of the frozen regression network of ``regression_checkpoint`` (a
    downscaling checkpoint); ``both`` trains the regression for ``regression_steps`` optimiser steps (None: half
    of ``training.max_steps``), then the diffusion model with the regression frozen, in one run. The two
    :class:`~forecasting.models.UNet` share the sizes ``base_channels``, ``channel_mult``, ``blocks_per_level``,
    ``embedding_dim`` and ``dropout``. EDM constants (None: the paper's, forecasting.diffusion.edm.EDMConfig) and
    sampling (``sampler``, ``sampling_steps``, ``churn``, ``s_noise``, ``s_tmin``, ``s_tmax``) as for the
    diffusion family (:class:`UNetSizesConfig`, :class:`EDMSamplingConfig`); ``member_batch`` samples go through
    the network at once.
    """

    family: Literal["downscaling"] = "downscaling"
    stage: Literal["regression", "diffusion", "both"] = "both"
    regression_steps: int | None = Field(None, ge=1)
    regression_checkpoint: str | None = None
    sampling_steps: int = Field(18, ge=1)
    member_batch: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _valid(self) -> DownscalingModelConfig:
        if self.stage == "diffusion" and self.regression_checkpoint is None:
            raise ValueError("stage 'diffusion' needs regression_checkpoint (a trained downscaling checkpoint)")
        if self.stage != "diffusion" and self.regression_checkpoint is not None:
            raise ValueError(f"regression_checkpoint is only used by stage 'diffusion'; the stage is {self.stage!r}")
        if self.stage != "both" and self.regression_steps is not None:
            raise ValueError(f"regression_steps is only used by stage 'both'; the stage is {self.stage!r}")
        return self


#: The model families, picked by the ``family`` key (see forecasting.forecasters.FAMILIES; ``downscaling`` is
#: not a forecaster but a downscaler, see forecasting.downscaling).
ModelConfig = Annotated[
    GraphModelConfig | PersistenceModelConfig | ClimatologyModelConfig | DiffusionModelConfig
    | RollingDiffusionModelConfig | DYffusionModelConfig | DownscalingModelConfig,
    Field(discriminator="family"),
]


class RolloutStage(StrictModel):
    """From optimiser step ``at_step`` on, train on ``steps`` autoregressive steps (backprop through all)."""

    at_step: int = Field(ge=0)
    steps: int = Field(ge=1)


class TrainingConfig(StrictModel):
    """Optimisation, rollout fine-tuning, validation and hardware of ``forecast train``.

    The learning rate rises linearly over ``warmup_steps`` to ``learning_rate`` and decays along a cosine
    to ``min_learning_rate`` at ``max_steps``. ``rollout`` is the rollout schedule (first stage at step 0,
    stages in increasing ``at_step``). ``variable_weights`` weight the loss per variable (``geopotential``,
    every level) or channel (``geopotential@500``); unnamed ones weigh 1. ``regional_loss_share`` is the
    share of the loss on the regional nodes (None: their share of the area). ``ensemble_size`` members per
    sample are drawn for the fair CRPS of a probabilistic model. ``precision`` ``auto`` is ``bf16-mixed`` on
    a GPU and ``32-true`` on the CPU. ``out_dir`` defaults to ``runs/<name>``. ``num_threads`` sets torch's
    CPU threads (None: torch's default, one per core); on a small shared machine 1 is often several times
    faster than 2, because two threads contending with other processes wait on each other. ``init_from``: a
    model checkpoint (``model.pt``) of the same family and network whose weights start the run, for
    fine-tuning (e.g. longer rollouts) or transfer to other data; optimiser and schedule start afresh. A
    coarse-only graph model (``model.mode: global``) also starts a stretched one of the same sizes.
    """

    train_period: Period = (None, None)
    val_period: Period | None = None
    batch_size: int = Field(4, ge=1)
    max_steps: int = Field(1000, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    min_learning_rate: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(50, ge=0)
    gradient_clip: float | None = Field(1.0, gt=0)
    rollout: list[RolloutStage] = [RolloutStage(at_step=0, steps=1)]
    val_rollout_steps: int | None = Field(None, ge=1)
    val_every: int = Field(100, ge=1)
    val_batches: int = Field(4, ge=1)
    ensemble_size: int = Field(2, ge=2)
    variable_weights: dict[str, float] = {}
    regional_loss_share: float | None = Field(None, ge=0, le=1)
    seed: int = 0
    num_workers: int = Field(0, ge=0)
    num_threads: int | None = Field(None, ge=1)
    accelerator: str = "auto"
    devices: int | str = "auto"
    num_nodes: int = Field(1, ge=1)
    strategy: str = "auto"
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = "auto"
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)
    out_dir: str | None = None
    init_from: str | None = None

    @model_validator(mode="after")
    def _valid(self) -> TrainingConfig:
        _check_period(self.train_period, "train_period")
        _check_period(self.val_period, "val_period")
        if not self.rollout or self.rollout[0].at_step != 0:
            raise ValueError("rollout must start with a stage at_step 0")
        at = [stage.at_step for stage in self.rollout]
        if any(b <= a for a, b in zip(at, at[1:])):
            raise ValueError(f"rollout stages must have increasing at_step; found {at}")
        if self.min_learning_rate > self.learning_rate:
            raise ValueError(
                f"min_learning_rate ({self.min_learning_rate}) must not exceed learning_rate ({self.learning_rate})"
            )
        bad = {k: v for k, v in self.variable_weights.items() if not v >= 0}
        if bad:
            raise ValueError(f"variable_weights must be >= 0; found {bad}")
        return self

    @property
    def max_rollout_steps(self) -> int:
        """The longest rollout of the schedule."""
        return max(stage.steps for stage in self.rollout)


class QuickstartModelConfig(StrictModel):
    """One model the quickstart trains, forecasts with and verifies (see forecasting.quickstart).

    ``config`` is an experiment YAML (relative to the project root unless absolute) whose ``model`` and
    ``training`` sections are used; the quickstart points its ``data`` stores at the quickstart's stores
    and its training and validation periods at the held-in and held-out parts of the record.
    ``overrides`` are merged into that config section by section (``{model: {noise_channels: 8}}``).
    ``name`` (default: the config's ``name``) names the run directory, the forecast and its scores.
    ``max_steps`` and ``fast_max_steps`` are the optimiser steps of the default and the ``--fast`` run
    (they also set the length of the learning-rate schedule); ``members`` the ensemble size forecast.
    """

    config: str
    name: str | None = None
    overrides: dict[str, Any] = {}
    max_steps: int = Field(200, ge=1)
    fast_max_steps: int = Field(5, ge=1)
    members: int = Field(1, ge=1)


class QuickstartConfig(StrictModel):
    """The quickstart's models and forecasts (the ``quickstart`` section of configs/quickstart.yaml).

    Forecasts start at 00 UTC every ``start_every`` through the held-out last quarter of the record and
    run ``forecast_steps`` model steps; the ``fast_*`` values replace them in ``forecast quickstart --fast``.
    ``bootstrap``: resamples of the scorecards' paired bootstrap.
    """

    models: list[QuickstartModelConfig] = []
    forecast_steps: int = Field(20, ge=1)
    fast_forecast_steps: int = Field(8, ge=1)
    start_every: str = "48h"
    fast_start_every: str = "24h"
    bootstrap: int = Field(500, ge=1)

    @model_validator(mode="after")
    def _valid(self) -> QuickstartConfig:
        for key in ("start_every", "fast_start_every"):
            value = getattr(self, key)
            try:
                every = pd.Timedelta(value)
            except ValueError:
                raise ValueError(f"{key} {value!r} is not a time interval (e.g. '48h')") from None
            if every < pd.Timedelta(hours=1):
                raise ValueError(f"{key} must be at least 1h; found {value!r}")
        return self


class StartTimesConfig(StrictModel):
    """Start times ``first``, ``first + every``, ... up to ``last`` (inclusive), e.g. every ``24h``."""

    first: str
    last: str
    every: str = "24h"

    @model_validator(mode="after")
    def _valid(self) -> StartTimesConfig:
        try:
            first, last, every = pd.Timestamp(self.first), pd.Timestamp(self.last), pd.Timedelta(self.every)
        except ValueError as exc:
            raise ValueError(f"cannot read start times {self.first!r} .. {self.last!r} every {self.every!r}: {exc}") from None
        if every <= pd.Timedelta(0):
            raise ValueError(f"every must be positive; found {self.every!r}")
        if last < first:
            raise ValueError(f"last ({self.last}) is before first ({self.first})")
        return self

    def times(self) -> pd.DatetimeIndex:
        return pd.date_range(pd.Timestamp(self.first), pd.Timestamp(self.last), freq=pd.Timedelta(self.every))


class DaskConfig(StrictModel):
    """Where a backtest's start times run: the scheduler at ``address`` (e.g. ``tcp://10.0.0.5:8786``), or a
    ``distributed.LocalCluster`` of ``n_workers`` workers with ``threads_per_worker`` threads each, worker
    processes when ``processes`` (else threads of this process)."""

    address: str | None = None
    n_workers: int = Field(2, ge=1)
    threads_per_worker: int = Field(1, ge=1)
    processes: bool = True


class ForecastRunConfig(StrictModel):
    """A trained model's forecasts and their verification (the ``forecast`` section, configs/backtest.yaml):
    what ``forecast backtest`` scores over many start times and ``forecast run`` makes from the latest
    analysis (see forecasting.backtest).

    ``checkpoint``: a ``model.pt``. ``out``: the output folder. ``stores``: grid (``global``,
    ``regional``) -> initial-condition store; grids not named use the stores of the checkpoint's config.
    ``truth``: grid -> truth store (default: the initial-condition store). ``observations``: a station
    store, CSV, Parquet or station netCDF. ``members``, ``steps``, ``seed``, ``batch_size``: as for
    ``forecast predict``. ``starts``: the backtest's start times. ``baselines``: scored for the same
    starts; the first is the reference of the forecast cycle's scorecards. ``regions``: extra named boxes
    scored on global grids. ``n_resamples``: bootstrap resamples of the scorecards; ``bootstrap_block``: start
    times per block of their circular block bootstrap, or ``auto`` (chosen from the scores). ``keep_forecasts``:
    keep each backtest start's forecast in ``OUT/forecasts``. ``plots``: draw the summary plots. ``dask``:
    where the backtest's start times run.
    """

    checkpoint: str
    out: str
    stores: dict[str, str] = {}
    truth: dict[str, str] = {}
    observations: str | None = None
    members: int = Field(1, ge=1)
    steps: int = Field(20, ge=1)
    seed: int = 0
    batch_size: int | None = Field(None, ge=1)
    starts: StartTimesConfig | None = None
    baselines: list[Literal["persistence", "climatology"]] = ["persistence", "climatology"]
    regions: dict[str, RegionConfig] = {}
    station_method: Literal["bilinear", "nearest"] = "bilinear"
    n_resamples: int = Field(1000, ge=1)
    bootstrap_block: Literal["auto"] | Annotated[int, Field(ge=1)] = "auto"
    keep_forecasts: bool = False
    plots: bool = True
    dask: DaskConfig = DaskConfig()

    @model_validator(mode="after")
    def _valid(self) -> ForecastRunConfig:
        if len(set(self.baselines)) != len(self.baselines):
            raise ValueError(f"baselines holds duplicates: {self.baselines}")
        return self


#: The flows ``forecast serve`` can deploy (workflows.flows.FLOWS holds them).
FlowName = Literal["ingest", "train", "forecast", "verify", "backtest", "quickstart", "downscale"]


class DeploymentConfig(StrictModel):
    """One deployment of ``forecast serve``: ``flow`` run with ``parameters`` on a ``cron`` schedule (in
    ``timezone``) or every ``interval`` (``6h``)."""

    name: str
    flow: FlowName
    cron: str | None = None
    interval: str | None = None
    timezone: str = "UTC"
    parameters: dict[str, Any] = {}
    description: str | None = None

    @model_validator(mode="after")
    def _valid(self) -> DeploymentConfig:
        if (self.cron is None) == (self.interval is None):
            raise ValueError("give exactly one of cron and interval")
        if self.interval is not None:
            try:
                every = pd.Timedelta(self.interval)
            except ValueError:
                raise ValueError(f"interval {self.interval!r} is not a time interval (e.g. '6h')") from None
            if every < pd.Timedelta(minutes=1):
                raise ValueError(f"interval must be at least 1 minute; found {self.interval!r}")
        return self


class ServeConfig(StrictModel):
    """The deployments of ``forecast serve`` (the ``serve`` section, configs/serve.yaml) and how many of
    their flow runs may run at once (``limit``)."""

    deployments: list[DeploymentConfig] = Field(min_length=1)
    limit: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _unique(self) -> ServeConfig:
        names = [d.name for d in self.deployments]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"deployment names must be unique; repeated: {repeated}")
        return self


class ExperimentConfig(StrictModel):
    """Top-level experiment config (configs/*.yaml)."""

    name: str = "experiment"
    data_root: str = "data"
    simulation: SimulationConfig = SimulationConfig()
    ingest: list[IngestConfig] = []
    data: ForecastDataConfig | None = None
    model: ModelConfig | None = None
    training: TrainingConfig | None = None
    quickstart: QuickstartConfig | None = None
    forecast: ForecastRunConfig | None = None
    serve: ServeConfig | None = None


def _format_validation_error(exc: ValidationError, path: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<top level>"
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key '{loc}'")
        else:
            lines.append(f"'{loc}': {err['msg']} (found {err.get('input')!r})")
    return f"invalid config {path}: " + "; ".join(lines)


def parse_config(data: Mapping[str, Any], *, source: str = "<config>", model: type[StrictModel] = ExperimentConfig):
    """Validate a mapping into ``model``; raise ConfigError naming ``source`` and the offending keys."""
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping; raise ConfigError naming the file (and line) when it cannot be read or parsed."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {p}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"cannot parse config {p}{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {p} must hold a mapping at the top level; found {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike, *, model: type[StrictModel] = ExperimentConfig):
    """Load and validate a YAML config file."""
    return parse_config(load_yaml(path), source=str(path), model=model)
