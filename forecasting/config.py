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

    @model_validator(mode="after")
    def _levels(self) -> GraphModelConfig:
        if self.mode != "limited_area" and self.regional_level < self.global_level:
            raise ValueError(
                f"regional_level ({self.regional_level}) must be >= global_level ({self.global_level})"
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


#: The model families, picked by the ``family`` key (see forecasting.forecasters.FAMILIES).
ModelConfig = Annotated[
    GraphModelConfig | PersistenceModelConfig | ClimatologyModelConfig, Field(discriminator="family")
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
    a GPU and ``32-true`` on the CPU. ``out_dir`` defaults to ``runs/<name>``.
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
    accelerator: str = "auto"
    devices: int | str = "auto"
    num_nodes: int = Field(1, ge=1)
    strategy: str = "auto"
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = "auto"
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)
    out_dir: str | None = None

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


class ExperimentConfig(StrictModel):
    """Top-level experiment config (configs/*.yaml)."""

    name: str = "experiment"
    data_root: str = "data"
    simulation: SimulationConfig = SimulationConfig()
    ingest: list[IngestConfig] = []
    data: ForecastDataConfig | None = None
    model: ModelConfig | None = None
    training: TrainingConfig | None = None


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
