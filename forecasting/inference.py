"""Forecast datasets on disk: Zarr in the WeatherBench2 forecast layout, with provenance attributes.

Layout (shared/DESIGN.md): dims ``time`` (initialisation), ``prediction_timedelta``, ``realization``,
optional ``level``, ``latitude``, ``longitude``; a ``valid_time`` coordinate; chunks of one start time and
one lead (whole field, all members) so a reader picks any (start, lead) cheaply. Attributes name the
model, the checkpoint hash, the config hash and the package version. Writes go to a temporary sibling
directory that is renamed into place at the end, so a reader never sees a half-written forecast.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import xarray as xr

from forecasting import __version__
from forecasting.errors import SourceError, StoreError
from forecasting.schema import LEAD, MEMBER, TIME, VALID_TIME, analysis_as_forecast, validate_forecast, with_valid_time
from forecasting.verification.baselines import climatology, climatology_forecast, persistence_forecast


def config_hash(config: Mapping[str, object]) -> str:
    """A short, stable hash of a JSON-serialisable config, for provenance."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_forecast(
    forecast: xr.Dataset,
    path: str | Path,
    *,
    model: str,
    checkpoint_hash: str = "none",
    config: Mapping[str, object] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a forecast Dataset (lazy is fine: computed chunk by chunk) atomically to Zarr."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise StoreError(f"forecast {path} already exists; pass --overwrite to replace it")
    forecast = with_valid_time(forecast)
    validate_forecast(forecast, source=str(path))
    chunks = {d: forecast.sizes[d] for d in forecast.dims}
    chunks.update({TIME: 1, LEAD: 1})
    out = forecast.chunk(chunks)
    for name in out.variables:
        out[name].encoding = {}
    out.attrs = {
        **{k: v for k, v in forecast.attrs.items() if isinstance(v, str | int | float)},
        "model": model,
        "checkpoint_hash": checkpoint_hash,
        "config_hash": config_hash(dict(config or {})),
        "config": json.dumps(dict(config or {}), default=str),
        "forecasting_version": __version__,
        "created": pd.Timestamp.now(tz="UTC").isoformat(),
    }
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        out.to_zarr(tmp, mode="w", zarr_format=2, consolidated=True)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def open_forecast(path: str | Path) -> xr.Dataset:
    """Open a forecast Zarr lazily; an analysis store (no lead dim) is viewed as a lead-0, one-member forecast."""
    try:
        ds = xr.open_zarr(path, consolidated=None)
    except (FileNotFoundError, ValueError, KeyError, OSError) as exc:
        raise SourceError(f"cannot open forecast {path}: {exc}") from None
    ds = ds.drop_vars([v for v in ds.data_vars if str(v).endswith("_mask")])
    if LEAD not in ds.dims:
        ds = analysis_as_forecast(ds[[v for v in ds.data_vars if TIME in ds[v].dims]])
    if VALID_TIME not in ds.coords:
        ds = with_valid_time(ds)
    validate_forecast(ds, source=str(path))
    return ds


def baseline_forecast(
    truth: xr.Dataset,
    *,
    kind: str,
    init_times,
    leads,
    climatology_period: tuple[str | None, str | None] | None = None,
) -> xr.Dataset:
    """Persistence or climatology forecasts from an analysis, in the forecast layout (lazy)."""
    if kind == "persistence":
        return persistence_forecast(truth, init_times=init_times, leads=leads)
    if kind == "climatology":
        period = climatology_period or (str(pd.Timestamp(truth[TIME].values[0])), str(pd.Timestamp(truth[TIME].values[-1])))
        clim = climatology(truth, period=period)
        return climatology_forecast(clim, init_times=init_times, leads=leads)
    raise StoreError(f"unknown baseline {kind!r}; choose persistence or climatology")

