"""Verification of gridded forecasts against station observations, streamed over start times.

Three steps, each usable alone:

1. :func:`interpolate_to_points` takes a gridded field (any dims besides ``latitude``/``longitude``) to
   station locations, bilinearly or by nearest grid point, with vectorised index arithmetic: the corner
   indices and weights are computed once with NumPy and applied with ``.isel`` and DataArray indexers,
   so dask-backed fields stay lazy. Global grids are periodic in longitude (a station at 359.9E on a
   1-degree grid lies between the 359E and 0E columns); regional grids may wrap across 0E (stored as
   ``[0 .. 2, 350 .. 359.75]``): their longitudes are unwrapped at the largest gap between columns.
2. :func:`match_valid_times` picks the observation at each forecast's valid time (``time`` +
   ``prediction_timedelta``), exact match, NaN where there is none.
3. :func:`verify_stations` (and its two views :func:`score_stations`, :func:`per_start_scores`) streams
   the forecast's start times in chunks, interpolates each chunk, and accumulates sufficient statistics
   (counts, sums of errors, absolute and squared errors, ensemble variances, CRPS, cross products), so
   memory does not grow with the number of start times and the result equals a one-go computation.

Metric definitions are those of :data:`forecasting.verification.metrics.METRICS` with uniform station
weights, in WeatherBench2 order (Rasp et al. 2024): a point statistic is averaged over the stations that
have data at each (start time, lead), that mean is averaged over the start times that have any data,
and a root (RMSE, spread) or ratio (spread-skill ratio, correlation) is taken last. Per station the
first step is trivial, so a station's RMSE is the root of its mean squared error over start times. A
pair counts when the observation and every member are finite. Point statistics, members ``x_i``,
ensemble mean ``f``, observation ``o``:

* ``mse`` mean_i (x_i - o)^2, ``rmse`` its root; ``mae`` mean_i |x_i - o|; ``bias`` f - o (members are
  averaged like any other dim, as ``metrics.rmse`` does on an ensemble);
* ``ensemble_mean_rmse`` root of (f - o)^2;
* ``crps`` (empirical CDF) and ``fair_crps`` from ``scores.probability.crps_for_ensemble``;
* ``spread`` root of the member variance (ddof=1); ``spread_skill_ratio`` sqrt((M + 1)/M) spread /
  ensemble_mean_rmse (Fortin et al. 2014), both with at least two members;
* ``correlation``: Pearson correlation of f and o from the averaged moments f, o, f^2, o^2, f o (not in
  ``METRICS``; pooled over stations and start times, each start time weighing the same).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np
import pandas as pd
import scores.probability
import xarray as xr

from forecasting.data.observations import STATION, STATION_ID
from forecasting.errors import SchemaError
from forecasting.schema import LAT, LEAD, LEVEL, LON, MEMBER, TIME, VALID_TIME

#: Metrics :func:`verify_stations` computes, in the order they appear in its output.
STATION_METRICS = (
    "rmse",
    "mse",
    "mae",
    "bias",
    "crps",
    "fair_crps",
    "ensemble_mean_rmse",
    "spread",
    "spread_skill_ratio",
    "correlation",
)
_NEED_MEMBERS = ("fair_crps", "spread", "spread_skill_ratio")
# The point statistics (means over members where members enter) each metric is computed from.
_STATISTICS: dict[str, tuple[str, ...]] = {
    "rmse": ("se",),
    "mse": ("se",),
    "mae": ("ae",),
    "bias": ("e",),
    "crps": ("crps",),
    "fair_crps": ("fair_crps",),
    "ensemble_mean_rmse": ("em_se",),
    "spread": ("var",),
    "spread_skill_ratio": ("var", "em_se"),
    "correlation": ("f", "o", "ff", "oo", "fo"),
}

Field = TypeVar("Field", xr.Dataset, xr.DataArray)
Method = Literal["bilinear", "nearest"]
Outside = Literal["error", "nan"]

# Positions within this many degrees of the grid's edge count as on it (float32 coordinates).
_EDGE_TOLERANCE = 1e-6


# ----------------------------------------------------------------------------------------------
# Interpolation
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InterpolationPlan:
    """Corner indices and weights taking one lat/lon grid to a set of points. Shapes (n_corner, n_point).

    ``lat_index``/``lon_index`` are positions in the grid as stored; ``weight`` sums to 1 over corners
    (bilinear: 4 corners, nearest: 1); ``inside`` is False for points outside the grid's area.
    """

    lat_index: np.ndarray
    lon_index: np.ndarray
    weight: np.ndarray
    inside: np.ndarray


def plan_interpolation(
    grid_latitude: np.ndarray,
    grid_longitude: np.ndarray,
    *,
    latitude: np.ndarray,
    longitude: np.ndarray,
    method: Method = "bilinear",
    outside: Outside = "error",
    point_ids: Sequence[object] | None = None,
    source: str = "field",
) -> InterpolationPlan:
    """Indices and weights that take a grid (ascending latitudes, longitudes ascending in [0, 360)) to points.

    Longitude is periodic when the columns cover the whole circle (the largest gap, the wrap-around one
    included, is at most 1.5 times the median spacing); then points poleward of the outermost latitude
    rows take the value of that row. Otherwise the grid is regional: its longitudes are unwrapped at the
    largest gap, and points outside [first, last] latitude or longitude (within 1e-6 degrees) are an
    error naming them (``point_ids`` or positions), or flagged in ``inside`` when ``outside="nan"``.
    """
    if method not in ("bilinear", "nearest"):
        raise SchemaError(f"{source}: interpolation method must be 'bilinear' or 'nearest'; found {method!r}")
    if outside not in ("error", "nan"):
        raise SchemaError(f"{source}: outside must be 'error' or 'nan'; found {outside!r}")
    glat = np.asarray(grid_latitude, dtype=np.float64)
    glon = np.asarray(grid_longitude, dtype=np.float64)
    plat = np.asarray(latitude, dtype=np.float64).ravel()
    plon = np.mod(np.asarray(longitude, dtype=np.float64).ravel(), 360.0)
    if plat.shape != plon.shape:
        raise SchemaError(f"{source}: {plat.size} point latitudes but {plon.size} point longitudes")
    if not (np.all(np.isfinite(plat)) and np.all(np.isfinite(plon))):
        bad = np.flatnonzero(~np.isfinite(plat + plon))[:5].tolist()
        raise SchemaError(f"{source}: point coordinates hold NaN at positions {bad}")
    if glat.size == 0 or glon.size == 0:
        raise SchemaError(f"{source}: empty grid ({glat.size} latitudes, {glon.size} longitudes)")
    if glat.size > 1 and not np.all(np.diff(glat) > 0):
        raise SchemaError(f"{source}: latitude must be ascending; found {glat[:3].tolist()}...")
    if glon.min() < 0 or glon.max() >= 360 or (glon.size > 1 and not np.all(np.diff(glon) > 0)):
        raise SchemaError(f"{source}: longitude must be ascending in [0, 360); found {glon[:3].tolist()}...")

    lon_axis, lon_order, periodic = _unwrapped_longitude(glon)
    x = np.where(plon < lon_axis[0] - _EDGE_TOLERANCE, plon + 360.0, plon)
    back = (x > lon_axis[-1]) & (x - 360.0 >= lon_axis[0] - _EDGE_TOLERANCE)  # within tolerance west of the box
    x = np.where(back, np.maximum(x - 360.0, lon_axis[0]), x)
    if periodic:
        lon_axis = np.append(lon_axis, lon_axis[0] + 360.0)
        lon_order = np.append(lon_order, lon_order[0])
    j0, wx, lon_inside = _bracket(lon_axis, x)
    i0, wy, lat_inside = _bracket(glat, plat)
    if periodic:
        lat_inside = np.ones_like(lat_inside)  # poleward of the outermost rows: that row's value (clamped)
    inside = lat_inside & lon_inside
    if not np.all(inside) and outside == "error":
        bad = np.flatnonzero(~inside)
        names = [point_ids[k] if point_ids is not None else k for k in bad[:5]]
        shown = ", ".join(f"{n} ({plat[k]:.3f}N, {plon[k]:.3f}E)" for n, k in zip(names, bad[:5]))
        more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
        raise SchemaError(
            f"{source}: {len(bad)} points lie outside the grid (latitude {glat[0]}..{glat[-1]}, longitude "
            f"{lon_axis[0]:.3f}..{lon_axis[-1] % 360:.3f}E): {shown}{more}"
        )
    i1 = np.minimum(i0 + 1, glat.size - 1)
    j1 = np.minimum(j0 + 1, lon_axis.size - 1)
    if method == "nearest":
        lat_index = np.where(wy <= 0.5, i0, i1)[None, :]
        lon_index = lon_order[np.where(wx <= 0.5, j0, j1)][None, :]
        weight = np.ones((1, plat.size))
    else:
        lat_index = np.stack([i0, i0, i1, i1])
        lon_index = lon_order[np.stack([j0, j1, j0, j1])]
        weight = np.stack([(1 - wy) * (1 - wx), (1 - wy) * wx, wy * (1 - wx), wy * wx])
    return InterpolationPlan(lat_index=lat_index, lon_index=lon_index, weight=weight, inside=inside)


def _unwrapped_longitude(lon: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """Longitudes in physical (west to east) order, increasing past 360 where a regional box wraps.

    Returns (unwrapped longitudes, their positions in ``lon``, periodic).
    """
    if lon.size == 1:
        return lon.copy(), np.zeros(1, dtype=np.int64), False
    gaps = np.diff(np.append(lon, lon[0] + 360.0))  # gap after each column, the wrap-around one last
    largest = int(np.argmax(gaps))
    periodic = bool(gaps[largest] <= 1.5 * np.median(gaps))
    if periodic:
        return lon.copy(), np.arange(lon.size), True
    order = np.roll(np.arange(lon.size), -(largest + 1))
    unwrapped = lon[order] + np.where(order < order[0], 360.0, 0.0)
    return unwrapped, order, False


def _bracket(axis: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower bracketing index, fractional weight of the upper neighbour (clipped to [0, 1]) and inside flag."""
    inside = (x >= axis[0] - _EDGE_TOLERANCE) & (x <= axis[-1] + _EDGE_TOLERANCE)
    if axis.size == 1:
        return np.zeros(x.shape, dtype=np.int64), np.zeros(x.shape), inside
    i0 = np.clip(np.searchsorted(axis, x, side="right") - 1, 0, axis.size - 2)
    w = np.clip((x - axis[i0]) / (axis[i0 + 1] - axis[i0]), 0.0, 1.0)
    return i0, w, inside


def apply_interpolation(field: Field, plan: InterpolationPlan, *, point_dim: str = STATION) -> Field:
    """Apply ``plan`` to ``field``: ``latitude``/``longitude`` dims become ``point_dim``; lazy on dask.

    Corners of zero weight are skipped, so a point on a grid node is not spoilt by a NaN neighbour; a
    NaN corner of non-zero weight gives NaN. Points outside the grid (``plan.inside`` False) are NaN.
    Floating variables keep their dtype. In a Dataset, variables on both dims are interpolated, those on
    neither pass unchanged and those on only one of them (a latitude profile) are dropped.
    """
    if isinstance(field, xr.DataArray):
        return _interpolate_array(field, plan, point_dim=point_dim)
    gridded = [n for n, v in field.data_vars.items() if LAT in v.dims and LON in v.dims]
    others = field.drop_vars(gridded).drop_dims([d for d in (LAT, LON) if d in field.dims], errors="ignore")
    out = {name: _interpolate_array(field[name], plan, point_dim=point_dim) for name in gridded}
    result = xr.Dataset(out).merge(others, compat="override", join="outer")
    result.attrs = dict(field.attrs)
    return result


def _interpolate_array(var: xr.DataArray, plan: InterpolationPlan, *, point_dim: str) -> xr.DataArray:
    grid_coords = [c for c in var.coords if LAT in var[c].dims or LON in var[c].dims]
    plain = var.drop_vars(grid_coords)
    total: xr.DataArray | None = None
    for k in range(plan.weight.shape[0]):
        ilat = xr.DataArray(plan.lat_index[k], dims=point_dim)
        ilon = xr.DataArray(plan.lon_index[k], dims=point_dim)
        w = xr.DataArray(plan.weight[k], dims=point_dim)
        corner = plain.isel({LAT: ilat, LON: ilon})
        term = (corner * w).where(w > 0, 0.0)
        total = term if total is None else total + term
    assert total is not None
    out = total.where(xr.DataArray(plan.inside, dims=point_dim))
    if np.issubdtype(var.dtype, np.floating):
        out = out.astype(var.dtype)
    out.name = var.name
    out.attrs = dict(var.attrs)
    return out


def interpolate_to_points(
    field: Field,
    *,
    latitude: np.ndarray | Sequence[float] | xr.DataArray,
    longitude: np.ndarray | Sequence[float] | xr.DataArray,
    method: Method = "bilinear",
    point_dim: str = STATION,
    outside: Outside = "error",
    source: str = "field",
) -> Field:
    """``field`` (dims ..., ``latitude``, ``longitude``) at points: dims ..., ``point_dim``.

    latitude, longitude: shape (n_point,), degrees (longitude in any convention, taken modulo 360).
        DataArrays over ``point_dim`` may carry more coordinates (``station_id``, ``elevation``): they are
        attached to the result, and ``station_id`` names the points in errors.
    method: ``bilinear`` (default) or ``nearest`` (nearest node in degrees of latitude and longitude).
    outside: ``error`` (default) raises :class:`SchemaError` naming the points outside a regional grid;
        ``nan`` gives NaN there.
    Returns the same type as ``field`` with coordinates ``latitude``/``longitude`` on ``point_dim`` set
    to the points (longitude in [0, 360)); lazy when ``field`` is dask-backed.
    """
    for dim in (LAT, LON):
        if dim not in field.dims or dim not in field.coords:
            raise SchemaError(f"{source}: dim {dim!r} with coordinate values needed; found dims {tuple(field.dims)}")
    point_coords: dict[str, xr.DataArray] = {}
    ids: Sequence[object] | None = None
    for values in (latitude, longitude):
        if isinstance(values, xr.DataArray):
            if values.dims != (point_dim,):
                raise SchemaError(f"{source}: point coordinates must have dims ({point_dim!r},); found {values.dims}")
            point_coords.update({str(c): values[c] for c in values.coords if c not in (LAT, LON)})
    if STATION_ID in point_coords:
        ids = [str(v) for v in point_coords[STATION_ID].values]
    plat = np.asarray(latitude, dtype=np.float64)
    plon = np.asarray(longitude, dtype=np.float64)
    plan = plan_interpolation(
        field[LAT].values, field[LON].values, latitude=plat, longitude=plon, method=method, outside=outside,
        point_ids=ids, source=source,
    )
    out = apply_interpolation(field, plan, point_dim=point_dim)
    coords = {LAT: (point_dim, plat.ravel()), LON: (point_dim, np.mod(plon.ravel(), 360.0))}
    return out.assign_coords(coords).assign_coords(point_coords)


# ----------------------------------------------------------------------------------------------
# Valid-time matching
# ----------------------------------------------------------------------------------------------
def match_valid_times(
    forecast_at_stations: xr.Dataset, observations: xr.Dataset, *, source: str = "observations"
) -> xr.Dataset:
    """Observations at every forecast valid time: dims (``time``, ``prediction_timedelta``, ``station``).

    forecast_at_stations: dims ``time`` (init), ``prediction_timedelta``, ``station`` (others ignored).
    observations: dims (``time``, ``station``); stations are matched by ``station_id`` when both carry
    it (every forecast station must be observed), else by position (equal counts required).
    Valid times are matched exactly; where the observation time axis has no such time the value is NaN.
    Returns the observation variables on (time, prediction_timedelta, station) with the forecast's
    ``time``, ``prediction_timedelta``, ``station`` coordinates and ``valid_time`` (time,
    prediction_timedelta); values are floating (NaN for missing).
    """
    for dim in (TIME, LEAD, STATION):
        if dim not in forecast_at_stations.dims:
            raise SchemaError(f"forecast at stations: dim {dim!r} missing; found {tuple(forecast_at_stations.dims)}")
    for dim in (TIME, STATION):
        if dim not in observations.dims:
            raise SchemaError(f"{source}: dim {dim!r} missing; found {tuple(observations.dims)}")
    obs_times = pd.DatetimeIndex(observations[TIME].values)
    if obs_times.has_duplicates:
        raise SchemaError(f"{source}: duplicated observation time {obs_times[obs_times.duplicated()][0]}")
    inits = forecast_at_stations[TIME].values
    leads = forecast_at_stations[LEAD].values
    valid = inits[:, None] + leads[None, :]  # (time, prediction_timedelta)
    position = obs_times.get_indexer(pd.DatetimeIndex(valid.ravel())).reshape(valid.shape)
    station_index = _station_index(forecast_at_stations, observations, source=source)

    time_index = xr.DataArray(np.maximum(position, 0), dims=("init", LEAD))
    names = [n for n, v in observations.data_vars.items() if set(v.dims) == {TIME, STATION}]
    plain = observations[names].reset_coords(drop=True)
    picked = plain.isel({TIME: time_index, STATION: xr.DataArray(station_index, dims=STATION)})
    picked = picked.where(xr.DataArray(position >= 0, dims=("init", LEAD)))
    picked = picked.drop_vars([c for c in picked.coords], errors="ignore").rename({"init": TIME})
    picked = picked.transpose(TIME, LEAD, STATION)
    station_coords = {
        c: forecast_at_stations[c] for c in forecast_at_stations.coords if forecast_at_stations[c].dims == (STATION,)
    }
    return picked.assign_coords(
        {TIME: inits, LEAD: leads, VALID_TIME: ((TIME, LEAD), valid), **station_coords}
    )


def _station_index(forecast: xr.Dataset, observations: xr.Dataset, *, source: str) -> np.ndarray:
    """Positions in ``observations`` of each forecast station, shape (n_station,)."""
    n_fc, n_obs = forecast.sizes[STATION], observations.sizes[STATION]
    if STATION_ID in forecast.coords and STATION_ID in observations.coords:
        obs_ids = pd.Index([str(v) for v in observations[STATION_ID].values])
        if obs_ids.has_duplicates:
            raise SchemaError(f"{source}: duplicated station_id {obs_ids[obs_ids.duplicated()][0]!r}")
        fc_ids = [str(v) for v in forecast[STATION_ID].values]
        index = obs_ids.get_indexer(fc_ids)
        if np.any(index < 0):
            missing = [fc_ids[k] for k in np.flatnonzero(index < 0)[:5]]
            raise SchemaError(f"{source}: forecast stations {missing} are not among the observed stations")
        return index
    if n_fc != n_obs:
        raise SchemaError(
            f"{source}: {n_fc} forecast stations but {n_obs} observed ones, and no station_id to match them by"
        )
    return np.arange(n_obs)




# ----------------------------------------------------------------------------------------------
# Streaming verification
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StationVerification:
    """Both products of one streaming pass of :func:`verify_stations`.

    scores: ``score`` (metric, variable, prediction_timedelta) over all stations; ``station_score``
        (metric, variable, prediction_timedelta, station) per station; ``count`` (variable,
        prediction_timedelta): valid (start time, station) pairs; ``start_count`` (variable,
        prediction_timedelta): start times with at least one; ``station_count`` (variable,
        prediction_timedelta, station): valid start times per station. Station coordinates
        (``station_id``, ``latitude``, ``longitude``, ``elevation``) ride on ``station``.
    per_start: ``score`` (metric, variable, time, prediction_timedelta), each start time's metric over
        the stations with data (its RMSE is the root of its station-mean squared error; NaN where no
        station has data) and ``count`` (variable, time, prediction_timedelta): those stations. The
        layout :func:`forecasting.verification.scorecard.build_scorecard` reads; the root of the mean
        over start times of the squared per-start RMSE is ``scores["score"]`` exactly.
    """

    scores: xr.Dataset
    per_start: xr.Dataset


def verify_stations(
    forecast: xr.Dataset,
    observations: xr.Dataset,
    *,
    metrics: Sequence[str],
    variables: Sequence[str] | None = None,
    method: Method = "bilinear",
    chunk_starts: int = 16,
    outside: Outside = "error",
    source: str = "forecast",
) -> StationVerification:
    """Score ``forecast`` against ``observations`` at the stations, ``chunk_starts`` start times at a time.

    forecast: dims (``time``, ``prediction_timedelta``, ``realization``, ``latitude``, ``longitude``), lazy
        or not; variables with a ``level`` dim cannot be matched to stations and are refused.
    observations: dims (``time``, ``station``) with ``latitude``/``longitude`` (and ``station_id``,
        ``elevation``) coordinates on ``station``; NaN = missing. Units must agree with the forecast's.
    metrics: names from :data:`STATION_METRICS`. variables: default every variable both datasets hold.
    Only one chunk of interpolated values (chunk x lead x member x station) is in memory at a time; the
    running sums have shape (lead, station) and the per-start means (time, lead). Definitions: see the
    module docstring.
    """
    unknown = [m for m in metrics if m not in STATION_METRICS]
    if unknown or not metrics:
        raise SchemaError(
            f"{source}: unknown station metrics {unknown or list(metrics)}; choose from {list(STATION_METRICS)}"
        )
    if chunk_starts < 1:
        raise SchemaError(f"{source}: chunk_starts must be at least 1; found {chunk_starts}")
    names = _scored_variables(forecast, observations, variables, source=source)
    n_member = forecast.sizes[MEMBER]
    too_few = [m for m in metrics if m in _NEED_MEMBERS]
    if n_member < 2 and too_few:
        raise SchemaError(f"{source}: metrics {too_few} need at least 2 members along {MEMBER!r}; found {n_member}")
    for coord in (LAT, LON):
        if coord not in observations.coords or observations[coord].dims != (STATION,):
            raise SchemaError(
                f"observations: coordinate {coord!r} on dim 'station' needed; "
                f"coords are {sorted(map(str, observations.coords))}"
            )

    obs = observations[names].compute()
    ids = [str(v) for v in obs[STATION_ID].values] if STATION_ID in obs.coords else None
    plan = plan_interpolation(
        forecast[LAT].values, forecast[LON].values, latitude=obs[LAT].values, longitude=obs[LON].values,
        method=method, outside=outside, point_ids=ids, source=source,
    )
    station_coords = {str(c): obs[c] for c in obs.coords if obs[c].dims == (STATION,)}
    needed = sorted({stat for metric in metrics for stat in _STATISTICS[metric]})
    shape = (forecast.sizes[LEAD], obs.sizes[STATION])

    station_sums = {name: {k: np.zeros(shape) for k in (*needed, "n")} for name in names}
    start_means: dict[str, list[dict[str, np.ndarray]]] = {name: [] for name in names}
    for chunk in _time_chunks(forecast[names], chunk_starts):
        # Load the chunk's grid once (valid_time is recomputed from time + lead when matching): interpolating
        # a lazy chunk would build one dask graph per station weight.
        chunk = chunk.drop_vars(VALID_TIME, errors="ignore").load()
        at_stations = apply_interpolation(chunk, plan).assign_coords(station_coords)
        matched = match_valid_times(at_stations, obs, source="observations")
        for name in names:
            members = at_stations[name].transpose(TIME, LEAD, MEMBER, STATION).values.astype(np.float64)
            observed = matched[name].transpose(TIME, LEAD, STATION).values.astype(np.float64)
            point = _point_statistics(members, observed, needed)  # each (time, lead, station)
            for k, values in point.items():
                station_sums[name][k] += values.sum(axis=0)
            n_stations = point["n"].sum(axis=-1)  # (time, lead)
            means = {k: _divide(point[k].sum(axis=-1), n_stations) for k in needed}
            start_means[name].append({**means, "n": n_stations})

    leads = forecast[LEAD].values
    pooled, per_station, per_start, counts = {}, {}, {}, {}
    for name in names:
        sums = station_sums[name]
        per_station[name] = _finalise({k: _divide(sums[k], sums["n"]) for k in needed}, metrics, n_member)
        series = {k: np.concatenate([part[k] for part in start_means[name]]) for k in (*needed, "n")}
        per_start[name] = _finalise({k: series[k] for k in needed}, metrics, n_member)
        has_data = series["n"] > 0  # (time, lead)
        n_starts = has_data.sum(axis=0)
        pooled[name] = _finalise(
            {k: _divide(np.where(has_data, series[k], 0.0).sum(axis=0), n_starts) for k in needed}, metrics, n_member
        )
        counts[name] = (sums["n"].sum(axis=-1), n_starts, sums["n"], series["n"])

    def stacked(values: dict[str, dict[str, np.ndarray]]) -> np.ndarray:
        return np.stack([np.stack([values[n][m] for n in names]) for m in metrics])  # (metric, variable, ...)

    def counted(i: int) -> np.ndarray:
        return np.stack([counts[n][i] for n in names]).astype(np.int64)  # (variable, ...)

    attrs = _attrs(forecast, method=method)
    scores_ds = xr.Dataset(
        {
            "score": (("metric", "variable", LEAD), stacked(pooled)),
            "station_score": (("metric", "variable", LEAD, STATION), stacked(per_station)),
            "count": (("variable", LEAD), counted(0)),
            "start_count": (("variable", LEAD), counted(1)),
            "station_count": (("variable", LEAD, STATION), counted(2)),
        },
        coords={"metric": list(metrics), "variable": names, LEAD: leads, **station_coords},
        attrs=attrs,
    )
    per_start_ds = xr.Dataset(
        {
            "score": (("metric", "variable", TIME, LEAD), stacked(per_start)),
            "count": (("variable", TIME, LEAD), counted(3)),
        },
        coords={"metric": list(metrics), "variable": names, TIME: forecast[TIME].values, LEAD: leads},
        attrs=attrs,
    )
    return StationVerification(scores=scores_ds, per_start=per_start_ds)


def score_stations(
    forecast: xr.Dataset,
    observations: xr.Dataset,
    *,
    metrics: Sequence[str],
    variables: Sequence[str] | None = None,
    method: Method = "bilinear",
    chunk_starts: int = 16,
    outside: Outside = "error",
) -> xr.Dataset:
    """Scores per station and over all stations: :attr:`StationVerification.scores` of :func:`verify_stations`."""
    return verify_stations(
        forecast, observations, metrics=metrics, variables=variables, method=method, chunk_starts=chunk_starts,
        outside=outside,
    ).scores


def per_start_scores(
    forecast: xr.Dataset,
    observations: xr.Dataset,
    *,
    metrics: Sequence[str],
    variables: Sequence[str] | None = None,
    method: Method = "bilinear",
    chunk_starts: int = 16,
    outside: Outside = "error",
) -> xr.Dataset:
    """Station-mean scores per start time: :attr:`StationVerification.per_start` of :func:`verify_stations`."""
    return verify_stations(
        forecast, observations, metrics=metrics, variables=variables, method=method, chunk_starts=chunk_starts,
        outside=outside,
    ).per_start


def _scored_variables(
    forecast: xr.Dataset, observations: xr.Dataset, variables: Sequence[str] | None, *, source: str
) -> list[str]:
    for dim in (TIME, LEAD, MEMBER, LAT, LON):
        if dim not in forecast.dims:
            raise SchemaError(f"{source}: forecast dim {dim!r} missing; found dims {tuple(forecast.dims)}")
    for dim in (TIME, STATION):
        if dim not in observations.dims:
            raise SchemaError(f"observations: dim {dim!r} missing; found dims {tuple(observations.dims)}")
    if variables is None:
        names = [str(n) for n in forecast.data_vars if n in observations.data_vars]
        if not names:
            raise SchemaError(
                f"{source}: no variable is both forecast ({sorted(map(str, forecast.data_vars))}) and observed "
                f"({sorted(map(str, observations.data_vars))})"
            )
    else:
        names = list(variables)
        for name in names:
            if name not in forecast.data_vars:
                raise SchemaError(
                    f"{source}: variable {name!r} is not in the forecast; it has {sorted(map(str, forecast.data_vars))}"
                )
            if name not in observations.data_vars:
                raise SchemaError(
                    f"observations: variable {name!r} is not observed; "
                    f"they hold {sorted(map(str, observations.data_vars))}"
                )
    for name in names:
        if LEVEL in forecast[name].dims:
            raise SchemaError(f"{source}: variable {name!r} has a {LEVEL!r} dim; station observations are single-level")
        fc_units, obs_units = forecast[name].attrs.get("units"), observations[name].attrs.get("units")
        if fc_units is not None and obs_units is not None and fc_units != obs_units:
            raise SchemaError(f"{source}: variable {name!r} is in {fc_units!r} but observed in {obs_units!r}")
    return names


def _time_chunks(forecast: xr.Dataset, size: int) -> Iterator[xr.Dataset]:
    for start in range(0, forecast.sizes[TIME], size):
        yield forecast.isel({TIME: slice(start, start + size)})


def _point_statistics(members: np.ndarray, observed: np.ndarray, needed: Sequence[str]) -> dict[str, np.ndarray]:
    """Point statistics of ``members`` (time, lead, member, station) against ``observed`` (time, lead, station).

    Returns ``n`` (1 for a valid pair, else 0) and each statistic in ``needed``, shape (time, lead,
    station), zero where the pair is invalid (a NaN observation or member).
    """
    valid = np.isfinite(observed) & np.all(np.isfinite(members), axis=2)
    x = np.where(valid[:, :, None, :], members, 0.0)
    o = np.where(valid, observed, 0.0)
    f = x.mean(axis=2)
    out = {"n": valid.astype(np.float64)}
    for stat in needed:
        if stat == "e":
            out[stat] = f - o
        elif stat == "ae":
            out[stat] = np.abs(x - o[:, :, None, :]).mean(axis=2)
        elif stat == "se":
            out[stat] = ((x - o[:, :, None, :]) ** 2).mean(axis=2)
        elif stat == "em_se":
            out[stat] = (f - o) ** 2
        elif stat == "var":
            out[stat] = x.var(axis=2, ddof=1)
        elif stat in ("crps", "fair_crps"):
            value = scores.probability.crps_for_ensemble(
                xr.DataArray(x, dims=(TIME, LEAD, MEMBER, STATION)),
                xr.DataArray(o, dims=(TIME, LEAD, STATION)),
                MEMBER,
                method="fair" if stat == "fair_crps" else "ecdf",
                preserve_dims="all",
            )
            out[stat] = np.where(valid, value.transpose(TIME, LEAD, STATION).values, 0.0)
        elif stat == "f":
            out[stat] = f
        elif stat == "o":
            out[stat] = o
        elif stat == "ff":
            out[stat] = f * f
        elif stat == "oo":
            out[stat] = o * o
        elif stat == "fo":
            out[stat] = f * o
    return out


def _divide(numerator: np.ndarray, count: np.ndarray) -> np.ndarray:
    """``numerator / count`` where ``count > 0``, NaN elsewhere (no warning)."""
    safe = np.where(count > 0, count, 1.0)
    return np.where(count > 0, numerator / safe, np.nan)


def _finalise(means: dict[str, np.ndarray], metrics: Sequence[str], n_member: int) -> dict[str, np.ndarray]:
    """Metrics from averaged point statistics (any common shape); NaN where a mean is NaN or undefined."""
    out: dict[str, np.ndarray] = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for metric in metrics:
            if metric == "mse":
                value = means["se"]
            elif metric == "rmse":
                value = np.sqrt(means["se"])
            elif metric == "mae":
                value = means["ae"]
            elif metric == "bias":
                value = means["e"]
            elif metric in ("crps", "fair_crps"):
                value = means[metric]
            elif metric == "ensemble_mean_rmse":
                value = np.sqrt(means["em_se"])
            elif metric == "spread":
                value = np.sqrt(means["var"])
            elif metric == "spread_skill_ratio":
                value = np.sqrt((n_member + 1) / n_member) * np.sqrt(means["var"] / means["em_se"])
            else:  # correlation
                cov = means["fo"] - means["f"] * means["o"]
                var_f = np.maximum(means["ff"] - means["f"] ** 2, 0.0)
                var_o = np.maximum(means["oo"] - means["o"] ** 2, 0.0)
                value = cov / np.sqrt(var_f * var_o)
            out[metric] = np.where(np.isfinite(value), value, np.nan)
    return out


def _attrs(forecast: xr.Dataset, *, method: str) -> dict[str, object]:
    attrs: dict[str, object] = {"interpolation": method, "n_start_times": int(forecast.sizes[TIME])}
    if "model" in forecast.attrs:
        attrs["model"] = str(forecast.attrs["model"])
    return attrs
