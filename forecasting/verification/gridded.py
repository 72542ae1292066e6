"""Streaming verification of gridded forecasts against gridded truth, per region, over many start times.

Scores follow WeatherBench2 (Rasp et al. 2024): every score is first reduced over space with the area
(latitude) weights of :mod:`forecasting.weights`, separately for each start time and lead, and only then
aggregated over start times. Deterministic scores of an ensemble are the scores of its ensemble mean.
Aggregates over start times (``aggregate``):

* ``rmse``, ``ensemble_mean_rmse``: ``sqrt(mean_t MSE_t)``; ``spread``: ``sqrt(mean_t var_t)`` with the
  unbiased member variance; ``spread_skill_ratio``: ``sqrt((M+1)/M) * spread / ensemble_mean_rmse``
  (Fortin et al. 2014);
* ``mae``, ``bias``, ``acc``, ``crps``, ``fair_crps``: the mean over start times.

Start times are processed ``chunk_starts`` at a time: one chunk of forecast fields (and the truth at
their valid times) is in memory at once, so memory does not grow with the number of start times. What is
kept are the per-start scores (small: metric x variable x time x lead x region), the rank-histogram counts
and the summed zonal spectra. Variables with a level dim are scored per level, labelled ``name@level``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import xarray as xr

from forecasting.errors import SchemaError
from forecasting.schema import LAT, LEAD, LEVEL, LON, MEMBER, TIME, VALID_TIME, subset
from forecasting.verification import metrics as m
from forecasting.verification.spectra import (
    regional_band_count,
    regional_power_spectrum,
    zonal_power_spectrum,
)

VARIABLE = "variable"
REGION = "region"
METRIC = "metric"

#: Per-start scores and how they aggregate over start times.
PER_START_AGGREGATION: dict[str, str] = {
    "rmse": "rms",
    "ensemble_mean_rmse": "rms",
    "spread": "rms",
    "mae": "mean",
    "bias": "mean",
    "acc": "mean",
    "crps": "mean",
    "fair_crps": "mean",
}
GRIDDED_METRICS = (*PER_START_AGGREGATION, "spread_skill_ratio")
ENSEMBLE_ONLY = ("fair_crps", "ensemble_mean_rmse", "spread", "spread_skill_ratio")

Area = tuple[float, float, float, float] | None


@dataclass(frozen=True)
class GridVerification:
    """Results of :func:`verify_grid`.

    scores: ``score`` (metric, variable, prediction_timedelta, region).
    per_start: ``score`` (metric, variable, time, prediction_timedelta, region), the scorecard's input
        (RMSE-type entries are per-start RMSEs: ``sqrt(MSE_t)``).
    rank_histogram: counts (variable, prediction_timedelta, region, rank), or None for one member.
    spectra: on a global grid, mean zonal power (source, variable, prediction_timedelta, lat_band,
        wavenumber) of the forecast (member 0) and the truth; on a limited-area grid, mean 2-D DCT power
        (source, variable, prediction_timedelta, wavenumber; :func:`~.spectra.regional_power_spectrum`) of
        the forecast's members (the mean of their spectra), its ensemble mean (``ensemble_mean``, several
        members only) and the truth; None when not asked for or the grid is too small or irregular.
    """

    scores: xr.Dataset
    per_start: xr.Dataset
    rank_histogram: xr.DataArray | None
    spectra: xr.DataArray | None


def flatten_levels(ds: xr.Dataset) -> xr.Dataset:
    """One variable per (name, level), labelled ``name@level``; variables without a level keep their name."""
    out: dict[str, xr.DataArray] = {}
    for name, var in ds.data_vars.items():
        if LEVEL in var.dims:
            for level in var[LEVEL].values:
                out[f"{name}@{float(level):g}"] = var.sel({LEVEL: level}, drop=True)
        else:
            out[str(name)] = var
    return xr.Dataset(out)


def truth_at_valid_times(truth: xr.Dataset, forecast: xr.Dataset) -> xr.Dataset:
    """The truth at each (start time, lead)'s valid time; NaN where the truth has no such time.

    Returns dims (time, prediction_timedelta, ...) aligned with ``forecast``'s ``time`` and lead.
    """
    valid = (forecast[TIME] + forecast[LEAD]).transpose(TIME, LEAD)
    flat = pd.DatetimeIndex(valid.values.ravel())
    positions = truth.get_index(TIME).get_indexer(flat)
    needed = truth.isel({TIME: np.unique(positions[positions >= 0])})
    if not any(var.chunks for var in needed.data_vars.values()):
        # lazily indexed (no dask): one orthogonal Zarr read per variable, of only the steps needed
        needed = needed.load()
    taken = needed.reindex({TIME: flat})
    shaped = taken.assign_coords({TIME: np.arange(flat.size)}).coarsen({TIME: valid.shape[1]}).construct(
        {TIME: ("_start", LEAD)}
    )
    shaped = shaped.drop_vars(TIME).rename({"_start": TIME})
    return shaped.assign_coords({TIME: forecast[TIME].values, LEAD: forecast[LEAD].values,
                                 VALID_TIME: ((TIME, LEAD), valid.values)})


def check_comparable(forecast: xr.Dataset, truth: xr.Dataset, *, source: str, truth_source: str) -> list[str]:
    """Variables both hold, after checking units and grids; raise naming what differs."""
    shared = [v for v in forecast.data_vars if v in truth.data_vars and TIME in truth[v].dims]
    if not shared:
        raise SchemaError(
            f"{source} and {truth_source} share no variables: forecast has {sorted(map(str, forecast.data_vars))}, "
            f"truth has {sorted(map(str, truth.data_vars))}"
        )
    for name in shared:
        fu, tu = forecast[name].attrs.get("units"), truth[name].attrs.get("units")
        if fu != tu:
            raise SchemaError(f"variable {name!r}: units differ: {source} has {fu!r}, {truth_source} has {tu!r}")
    for dim in (LAT, LON):
        a, b = forecast[dim].values, truth[dim].values
        if a.shape != b.shape or not np.allclose(a, b, atol=1e-6):
            raise SchemaError(
                f"grids differ in {dim}: {source} has {a.size} points {_span(a)}, {truth_source} has {b.size} "
                f"points {_span(b)}; regrid one of them first"
            )
    for name in shared:
        if LEVEL in forecast[name].dims:
            missing = sorted(set(forecast[LEVEL].values.tolist()) - set(truth[LEVEL].values.tolist()))
            if missing:
                raise SchemaError(f"variable {name!r}: levels {missing} of {source} are not in {truth_source}")
    return [str(v) for v in shared]


def _span(values: np.ndarray) -> str:
    if values.size == 0:
        return "(empty)"
    step = f", step {values[1] - values[0]:g}" if values.size > 1 else ""
    return f"{values[0]:g}..{values[-1]:g}{step}"


def is_global(ds: xr.Dataset) -> bool:
    """True when the longitudes cover the whole circle at a regular spacing."""
    lon = ds[LON].values
    if lon.size < 2:
        return False
    step = lon[1] - lon[0]
    return bool(np.allclose(np.diff(lon), step) and abs(lon.size * step - 360.0) < 1e-6)


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _per_start(
    forecast: xr.Dataset, truth: xr.Dataset, *, climatology: xr.Dataset | None, metrics: Sequence[str]
) -> xr.DataArray:
    """Per-start scores of one chunk: (metric, variable, time, prediction_timedelta) for one region."""
    keep = (TIME, LEAD)
    n_member = forecast.sizes[MEMBER]
    mean = forecast.mean(MEMBER)
    pieces: dict[str, xr.Dataset] = {}
    if "rmse" in metrics or "ensemble_mean_rmse" in metrics or "spread_skill_ratio" in metrics:
        mse_t = m.mse(mean, truth, preserve_dims=keep)
        pieces["rmse"] = np.sqrt(mse_t)
        if n_member > 1:
            pieces["ensemble_mean_rmse"] = pieces["rmse"]
    if "mae" in metrics:
        pieces["mae"] = m.mae(mean, truth, preserve_dims=keep)
    if "bias" in metrics:
        pieces["bias"] = m.bias(mean, truth, preserve_dims=keep)
    if "acc" in metrics and climatology is not None:
        pieces["acc"] = m.acc(mean, truth, climatology=climatology, preserve_dims=keep)
    if "crps" in metrics:
        pieces["crps"] = m.crps(forecast, truth, fair=False, preserve_dims=keep)
    if n_member > 1:
        if "fair_crps" in metrics:
            pieces["fair_crps"] = m.crps(forecast, truth, fair=True, preserve_dims=keep)
        if "spread" in metrics or "spread_skill_ratio" in metrics:
            pieces["spread"] = m.spread(forecast, truth, preserve_dims=keep)
    arrays = [piece.to_array(VARIABLE).transpose(VARIABLE, TIME, LEAD) for piece in pieces.values()]
    return xr.concat(arrays, dim=pd.Index(list(pieces), name=METRIC, dtype=object), coords="minimal", compat="override")


def _rank_counts(forecast: xr.Dataset, truth: xr.Dataset) -> xr.DataArray:
    hist = m.rank_histogram(forecast, truth, preserve_dims=(LEAD,), normalize=False)
    return hist.to_array(VARIABLE)


def aggregate(per_start: xr.DataArray, *, n_member: int) -> xr.DataArray:
    """Aggregate per-start scores over ``time`` (see the module docstring); adds spread_skill_ratio."""
    out = []
    names = []
    for metric in per_start[METRIC].values:
        values = per_start.sel({METRIC: metric}, drop=True)
        if PER_START_AGGREGATION[str(metric)] == "rms":
            out.append(np.sqrt((values**2).mean(TIME, skipna=True)))
        else:
            out.append(values.mean(TIME, skipna=True))
        names.append(str(metric))
    result = xr.concat(out, dim=pd.Index(names, name=METRIC, dtype=object))
    if "spread" in names and "ensemble_mean_rmse" in names:
        ratio = np.sqrt((n_member + 1) / n_member) * result.sel({METRIC: "spread"}) / result.sel(
            {METRIC: "ensemble_mean_rmse"}
        )
        result = xr.concat([result, ratio.expand_dims({METRIC: ["spread_skill_ratio"]})], dim=METRIC)
    return result


def verify_grid(
    forecast: xr.Dataset,
    truth: xr.Dataset,
    *,
    regions: Mapping[str, Area],
    metrics: Sequence[str] = GRIDDED_METRICS,
    climatology_forecast=None,
    chunk_starts: int = 8,
    spectra: bool = True,
    source: str = "forecast",
    truth_source: str = "truth",
    progress=None,
) -> GridVerification:
    """Score ``forecast`` against ``truth`` over every start time, streamed in chunks of start times.

    forecast: forecast layout (time, prediction_timedelta, realization, [level], latitude, longitude),
        lazy. truth: analysis layout on the same grid. regions: name -> (lat_min, lat_max, lon_min, lon_max)
        or None for the whole grid. climatology_forecast: optional callable ``(init_times, leads) ->
        forecast-layout climatology`` (or None) used as the climatology of the ACC (skipped without it).
    """
    unknown = [x for x in metrics if x not in GRIDDED_METRICS]
    if unknown:
        raise SchemaError(f"unknown gridded metrics {unknown}; choose from {list(GRIDDED_METRICS)}")
    if chunk_starts < 1:
        raise SchemaError(f"chunk_starts must be at least 1; found {chunk_starts}")
    names = check_comparable(forecast, truth, source=source, truth_source=truth_source)
    forecast = forecast[names]
    truth = truth[names]
    if LEVEL in forecast.dims:
        truth = truth.sel({LEVEL: forecast[LEVEL].values})
    n_member = forecast.sizes[MEMBER]
    spectra_kind = _spectra_kind(forecast) if spectra else None
    per_start_parts: list[xr.DataArray] = []
    rank_total: xr.DataArray | None = None
    spectra_total: xr.DataArray | None = None
    n_valid = 0
    chunks = list(_chunks(forecast.sizes[TIME], chunk_starts))
    for i, part in enumerate(chunks):
        fc = flatten_levels(forecast.isel({TIME: part})).load()
        tr = flatten_levels(truth_at_valid_times(truth, forecast.isel({TIME: part}))).load()
        tr = tr.drop_vars(VALID_TIME)
        fc = fc.drop_vars(VALID_TIME, errors="ignore")
        n_valid += int(tr.to_array().notnull().any([d for d in tr.dims if d not in (TIME, LEAD)]).sum())
        clim = None
        clim_fc = climatology_forecast(fc[TIME].values, fc[LEAD].values) if climatology_forecast else None
        if clim_fc is not None:
            clim = flatten_levels(clim_fc).isel({MEMBER: 0}, drop=True).drop_vars(VALID_TIME, errors="ignore").load()
        region_scores = []
        region_ranks = []
        for region, area in regions.items():
            fc_r, tr_r = fc, tr
            clim_r = clim
            if area is not None:
                fc_r = subset(fc, area=area, source=f"{source} region {region}")
                tr_r = subset(tr, area=area, source=f"{truth_source} region {region}")
                clim_r = subset(clim, area=area, source="climatology") if clim is not None else None
            region_scores.append(_per_start(fc_r, tr_r, climatology=clim_r, metrics=metrics))
            if n_member > 1:
                region_ranks.append(_rank_counts(fc_r, tr_r))
        per_start_parts.append(xr.concat(region_scores, dim=pd.Index(list(regions), name=REGION, dtype=object)))
        if region_ranks:
            counts = xr.concat(region_ranks, dim=pd.Index(list(regions), name=REGION, dtype=object))
            rank_total = counts if rank_total is None else rank_total + counts
        if spectra_kind is not None:
            spec = (_spectra(fc, tr) if spectra_kind == "zonal" else _regional_spectra(fc, tr)) * fc.sizes[TIME]
            spectra_total = spec if spectra_total is None else spectra_total + spec
        if progress is not None:
            progress(i + 1, len(chunks))
    if n_valid == 0:
        raise SchemaError(
            f"{truth_source} holds none of the valid times of {source} "
            f"(starts {pd.Timestamp(forecast[TIME].values[0])}..{pd.Timestamp(forecast[TIME].values[-1])}, "
            f"leads up to {pd.Timedelta(forecast[LEAD].values[-1])})"
        )
    per_start = xr.concat(per_start_parts, dim=TIME).transpose(METRIC, VARIABLE, TIME, LEAD, REGION)
    scores = aggregate(per_start, n_member=n_member).transpose(METRIC, VARIABLE, LEAD, REGION)
    if spectra_total is not None:
        spectra_total = spectra_total / forecast.sizes[TIME]
    return GridVerification(
        scores=scores.to_dataset(name="score"),
        per_start=per_start.to_dataset(name="score"),
        rank_histogram=rank_total.transpose(VARIABLE, LEAD, REGION, m.RANK) if rank_total is not None else None,
        spectra=spectra_total,
    )


def _spectra(forecast: xr.Dataset, truth: xr.Dataset) -> xr.DataArray:
    """Zonal spectra averaged over the chunk's start times: forecast member 0 and truth."""
    fc = zonal_power_spectrum(forecast.isel({MEMBER: 0}, drop=True)).mean(TIME, skipna=True).to_array(VARIABLE)
    tr = zonal_power_spectrum(truth).mean(TIME, skipna=True).to_array(VARIABLE)
    return xr.concat([fc, tr], dim=pd.Index(["forecast", "truth"], name="source", dtype=object))


def _spectra_kind(forecast: xr.Dataset) -> str | None:
    """``zonal`` on a global grid, ``regional`` (2-D DCT) on a limited-area grid that holds at least two
    bands, None on one too small or irregular for a spectrum (no spectrum rather than no verification)."""
    if is_global(forecast):
        return "zonal"
    try:
        bands = regional_band_count(forecast[LAT].values, forecast[LON].values)
    except SchemaError:
        return None
    return "regional" if bands >= 2 else None


def _regional_spectra(forecast: xr.Dataset, truth: xr.Dataset) -> xr.DataArray:
    """2-D DCT spectra averaged over the chunk's start times: the members (mean of their spectra), the ensemble
    mean (several members) and the truth."""
    parts = [regional_power_spectrum(forecast).mean([TIME, MEMBER], skipna=True).to_array(VARIABLE)]
    sources = ["forecast"]
    if forecast.sizes[MEMBER] > 1:
        parts.append(regional_power_spectrum(forecast.mean(MEMBER)).mean(TIME, skipna=True).to_array(VARIABLE))
        sources.append("ensemble_mean")
    parts.append(regional_power_spectrum(truth).mean(TIME, skipna=True).to_array(VARIABLE))
    sources.append("truth")
    return xr.concat(parts, dim=pd.Index(sources, name="source", dtype=object))
