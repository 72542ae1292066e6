"""Experiment configuration: pydantic models loaded from YAML, and the one :class:`ConfigError`.

Every model is frozen and forbids unknown keys, so a typo fails with a message naming the key and the
file. Defaults live here and nowhere else; validated config objects are passed down to the library.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

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


class ExperimentConfig(StrictModel):
    """Top-level experiment config (configs/*.yaml)."""

    name: str = "experiment"
    data_root: str = "data"
    simulation: SimulationConfig = SimulationConfig()
    ingest: list[IngestConfig] = []


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
