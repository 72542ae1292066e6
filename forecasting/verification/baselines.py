"""Reference forecasts every benchmark is scored against: persistence and (smoothed) climatology.

Both produce the WeatherBench2 forecast layout of shared/DESIGN.md: dims ``time`` (initialisation),
``prediction_timedelta``, ``realization`` (size 1), optional ``level``, ``latitude``, ``longitude``, with a
``valid_time`` coordinate on (``time``, ``prediction_timedelta``). Only the analysis variables that have a
``time`` dim are forecast; static fields (land-sea mask, orography) are left out.

The climatology follows the WeatherBench2 construction (Rasp et al. 2024, section 4.1): a mean per day of
year and time of day, smoothed over neighbouring days of year. Day of year is counted on a 366-day
calendar so that a calendar date has the same index in every year (1 March is day 61 in leap and
non-leap years alike); 29 February (day 60) only receives data from leap years and is filled from its
neighbours by the smoothing window. The window is a circular boxcar over day of year that weights every
analysis sample in it equally (sums of values divided by sums of counts), so days with more samples do
not get a larger say and a short record (one year of built-in data) still gives a climatology for every
day. Everything stays lazy on dask-backed inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import xarray as xr

from forecasting.errors import SchemaError
from forecasting.schema import GRID_DIM_ORDER, LEAD, MEMBER, TIME, VALID_TIME

DAYOFYEAR = "dayofyear"
HOUR = "hour"
#: Days of the 366-day calendar the climatology is indexed by.
DAYS_OF_YEAR = np.arange(1, 367)

TimesLike = Sequence[str | datetime | np.datetime64 | pd.Timestamp] | pd.DatetimeIndex | np.ndarray
LeadsLike = Sequence[timedelta | np.timedelta64 | pd.Timedelta | str] | pd.TimedeltaIndex | np.ndarray


# ----------------------------------------------------------------------------------------------
# Persistence
# ----------------------------------------------------------------------------------------------
def persistence_forecast(
    analysis: xr.Dataset, *, init_times: TimesLike, leads: LeadsLike, source: str = "analysis"
) -> xr.Dataset:
    """The analysis at each initialisation time, repeated over every lead.

    analysis: dims ``time``, optional ``level``, ``latitude``, ``longitude``; every ``init_times`` entry must
    be one of its times exactly (else :class:`SchemaError` naming the missing times). Valid times need not
    lie in the analysis: persistence does not look at them.
    Returns dims (``time`` = init_times, ``prediction_timedelta`` = leads, ``realization`` = [0], [``level``],
    ``latitude``, ``longitude``) with coordinate ``valid_time`` (time, prediction_timedelta); lazy when the
    analysis is dask-backed.
    """
    inits = _as_times(init_times, name="init_times", source=source)
    lead_index = _as_leads(leads, source=source)
    fields = _time_dependent(analysis, source=source)
    _require_times(fields, inits, what="init times", source=source)
    at_init = fields.sel({TIME: inits.values})
    forecast = at_init.expand_dims({LEAD: lead_index.values})
    return _forecast_layout(forecast, model="persistence")


# ----------------------------------------------------------------------------------------------
# Climatology
# ----------------------------------------------------------------------------------------------
def leap_dayofyear(times: pd.DatetimeIndex) -> np.ndarray:
    """Day of year on a 366-day calendar: dates from 1 March on get the same number in every year.

    Shape (n,) int64 in 1..366; 29 February is 60, 1 March is 61, 31 December is 366.
    """
    doy = np.asarray(times.day_of_year, dtype=np.int64)
    shift = (~np.asarray(times.is_leap_year)) & (doy >= 60)
    return doy + shift.astype(np.int64)


def climatology(
    analysis: xr.Dataset,
    *,
    period: tuple[str | datetime | pd.Timestamp, str | datetime | pd.Timestamp],
    smoothing_days: int = 15,
    source: str = "analysis",
) -> xr.Dataset:
    """Mean of ``analysis`` per day of year and hour of day over ``period``, smoothed over day of year.

    period: inclusive (start, end), as ``.sel(time=slice(start, end))`` reads it; it must not start
        before, nor end after, the analysis by more than one time step.
    smoothing_days: odd width of the circular boxcar window over day of year (1 = no smoothing). Every
        analysis sample inside the window weighs the same; NaN values are left out of sums and counts.
    Returns dims (``dayofyear`` = 1..366, ``hour`` = the hours of day the analysis holds, [``level``],
    ``latitude``, ``longitude``) for every time-dependent variable (dtype kept), plus the coordinate
    ``sample_count`` (dayofyear, hour): how many analysis times fall in each window. Raises
    :class:`SchemaError` when some (day of year, hour) has no sample in its window, naming them.
    """
    if smoothing_days < 1 or smoothing_days % 2 == 0:
        raise SchemaError(f"{source}: smoothing_days must be a positive odd number of days; found {smoothing_days}")
    fields = _time_dependent(analysis, source=source)
    selected = _select_period(fields, period, source=source)
    times = pd.DatetimeIndex(selected[TIME].values)
    off_hour = times[(times.minute != 0) | (times.second != 0) | (times.nanosecond != 0) | (times.microsecond != 0)]
    if len(off_hour):
        raise SchemaError(
            f"{source}: climatology needs times on whole hours; found {[str(t) for t in off_hour[:3]]}"
        )
    doy = leap_dayofyear(times)
    hour_of = np.asarray(times.hour, dtype=np.int64)
    hours = np.unique(hour_of)

    time_counts = np.zeros((len(DAYS_OF_YEAR), len(hours)), dtype=np.int64)  # (dayofyear, hour)
    np.add.at(time_counts, (doy - 1, np.searchsorted(hours, hour_of)), 1)
    window_counts = _circular_window_sum_numpy(time_counts, smoothing_days)
    empty = np.argwhere(window_counts == 0)
    if len(empty):
        shown = ", ".join(f"day {DAYS_OF_YEAR[i]} hour {hours[j]}" for i, j in empty[:5])
        raise SchemaError(
            f"{source}: {len(empty)} (day of year, hour) cells have no analysis time within a "
            f"{smoothing_days}-day window over period {period} ({shown}); use a longer period or a larger "
            "smoothing_days"
        )

    hour_index = np.searchsorted(hours, hour_of)
    out: dict[str, xr.DataArray] = {}
    for name, var in selected.data_vars.items():
        sums = _sum_by_day_and_hour(var, doy_index=doy - 1, hour_index=hour_index, n_hours=len(hours), count=False)
        counts = _sum_by_day_and_hour(var, doy_index=doy - 1, hour_index=hour_index, n_hours=len(hours), count=True)
        window_valid = _circular_window_sum(counts, smoothing_days)
        clim = _circular_window_sum(sums, smoothing_days) / window_valid.where(window_valid > 0)
        if np.issubdtype(var.dtype, np.floating):
            clim = clim.astype(var.dtype)
        out[str(name)] = clim.assign_attrs(var.attrs)
    result = xr.Dataset(out)
    result = result.assign_coords(
        {
            DAYOFYEAR: DAYS_OF_YEAR,
            HOUR: hours,
            "sample_count": ((DAYOFYEAR, HOUR), window_counts),
        }
    )
    result.attrs = {
        "climatology_period": f"{times[0]} / {times[-1]}",
        "smoothing_days": smoothing_days,
        "dayofyear_calendar": "366-day: 29 February is day 60 and 1 March day 61 in every year",
    }
    return result


def climatology_forecast(
    clim: xr.Dataset, *, init_times: TimesLike, leads: LeadsLike, source: str = "climatology"
) -> xr.Dataset:
    """The climatology at each valid time's day of year (366-day calendar) and hour of day.

    clim: as returned by :func:`climatology` (dims ``dayofyear`` 1..366, ``hour``, ...). Every valid time
    must fall on one of its hours exactly (else :class:`SchemaError` naming the valid times).
    Returns the forecast layout: dims (``time``, ``prediction_timedelta``, ``realization`` = [0],
    [``level``], ``latitude``, ``longitude``) with coordinate ``valid_time``; lazy for a dask-backed clim.
    """
    for dim in (DAYOFYEAR, HOUR):
        if dim not in clim.dims:
            raise SchemaError(f"{source}: a climatology needs dim {dim!r}; found dims {tuple(clim.dims)}")
    if clim.sizes[DAYOFYEAR] != len(DAYS_OF_YEAR) or not np.array_equal(clim[DAYOFYEAR].values, DAYS_OF_YEAR):
        raise SchemaError(f"{source}: dayofyear must run 1..366; found {clim[DAYOFYEAR].values[:3].tolist()}...")
    inits = _as_times(init_times, name="init_times", source=source)
    lead_index = _as_leads(leads, source=source)
    valid = pd.DatetimeIndex((inits.values[:, None] + lead_index.values[None, :]).ravel())
    hours = np.asarray(clim[HOUR].values, dtype=np.int64)
    on_hour = (valid.minute == 0) & (valid.second == 0) & (valid.microsecond == 0) & (valid.nanosecond == 0)
    hour_pos = np.searchsorted(hours, valid.hour)
    known = on_hour & (hour_pos < len(hours)) & (hours[np.minimum(hour_pos, len(hours) - 1)] == valid.hour)
    if not np.all(known):
        bad = valid[~known]
        raise SchemaError(
            f"{source}: {len(bad)} valid times fall on no hour of the climatology (hours {hours.tolist()}): "
            f"{[str(t) for t in bad[:5]]}"
        )
    shape = (len(inits), len(lead_index))
    doy_index = xr.DataArray((leap_dayofyear(valid) - 1).reshape(shape), dims=(TIME, LEAD))
    hour_index = xr.DataArray(hour_pos.reshape(shape), dims=(TIME, LEAD))
    picked = clim.drop_vars("sample_count", errors="ignore").isel({DAYOFYEAR: doy_index, HOUR: hour_index})
    picked = picked.drop_vars([DAYOFYEAR, HOUR], errors="ignore")
    picked = picked.assign_coords({TIME: inits.values, LEAD: lead_index.values})
    picked.attrs = {}
    return _forecast_layout(picked, model="climatology", attrs=dict(clim.attrs))


# ----------------------------------------------------------------------------------------------
# Perfect model (the built-in data only)
# ----------------------------------------------------------------------------------------------
def perfect_model_forecast(
    truth: xr.Dataset, *, init_times: TimesLike, steps: int, members: int, source: str = "truth",
    stirring_seed: int = 1,
) -> xr.Dataset:
    """The simulator's own ensemble from the true state of a store written by the built-in simulator.

    The bound on the skill any forecaster of the built-in data can reach: see
    :func:`forecasting.data.simulator.rerun_ensemble` (members differ only in the future stirring,
    which the data do not carry). ``truth``: a store of the simulator's coarse global or fine regional
    grid, whose ``settings_json`` attribute gives the simulation; leads are 6-hourly, ``steps`` of them;
    start times are sorted. Raises SchemaError naming ``source`` for a store without the attribute, on another grid, or whose
    fields at the start times differ from the re-run simulation (another simulator version or machine).
    """
    import json

    from forecasting.data.simulator import SimulationSettings, output_grid, rerun_ensemble

    text = truth.attrs.get("settings_json")
    if not text:
        raise SchemaError(
            f"{source} has no 'settings_json' attribute: the perfect-model baseline needs a store written by the "
            "built-in simulator (forecast simulate, then forecast ingest; or forecast quickstart)"
        )
    try:
        settings = SimulationSettings.from_dict(json.loads(text))
    except (ValueError, TypeError) as exc:
        raise SchemaError(f"{source}: its 'settings_json' attribute is not simulation settings: {exc}") from None
    inits = _as_times(init_times, name="init_times", source=source).sort_values()
    stored = _time_dependent(truth, source=source)
    _require_times(stored, inits, what="start times", source=source)
    shape = (truth.sizes.get("latitude"), truth.sizes.get("longitude"))
    grids = {g: output_grid(settings, g) for g in ("global", "regional")}
    grid = next((g for g, (lat, lon) in grids.items() if (len(lat), len(lon)) == shape
                 and np.allclose(lat, truth["latitude"]) and np.allclose(lon, truth["longitude"])), None)
    if grid is None:
        raise SchemaError(
            f"{source}: its {shape[0]} x {shape[1]} grid is neither the coarse global nor the regional grid of the "
            "simulation its 'settings_json' describes"
        )
    try:
        forecast, at_starts = rerun_ensemble(settings, init_times=inits, steps=steps, members=members, grid=grid,
                                             stirring_seed=stirring_seed)
    except ValueError as exc:
        raise SchemaError(f"{source}: {exc}") from None
    stored = stored.sel({TIME: inits.values})
    for name in at_starts.data_vars:
        if name not in stored:
            raise SchemaError(f"{source} has no variable {name!r}, which the simulation writes")
        expected = at_starts[name].values
        found = stored[name].transpose(*at_starts[name].dims).values
        scale = float(np.std(expected)) or 1.0
        worst = float(np.max(np.abs(found - expected))) / scale
        if not worst < 1e-3:
            raise SchemaError(
                f"{source}: {name} at the start times differs from the re-run simulation by up to {worst:.2g} of its "
                "standard deviation; the store was not written by this simulator with these settings"
            )
    return forecast


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _as_times(values: TimesLike, *, name: str, source: str) -> pd.DatetimeIndex:
    try:
        times = pd.DatetimeIndex(pd.to_datetime(np.atleast_1d(np.asarray(values))))
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"{source}: cannot read {name} as times: {values!r}") from exc
    if len(times) == 0:
        raise SchemaError(f"{source}: {name} is empty")
    if times.has_duplicates:
        raise SchemaError(f"{source}: {name} holds duplicates: {[str(t) for t in times[times.duplicated()][:3]]}")
    return times


def _as_leads(values: LeadsLike, *, source: str) -> pd.TimedeltaIndex:
    raw = [values] if isinstance(values, (str, timedelta, np.timedelta64)) else values
    try:
        leads = pd.TimedeltaIndex(pd.to_timedelta(raw if isinstance(raw, (pd.Index, np.ndarray)) else list(raw)))
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"{source}: cannot read leads as time deltas: {values!r}") from exc
    if len(leads) == 0:
        raise SchemaError(f"{source}: leads is empty")
    if (leads < pd.Timedelta(0)).any() or leads.has_duplicates:
        raise SchemaError(f"{source}: leads must be unique and non-negative; found {[str(x) for x in leads]}")
    return leads


def _time_dependent(analysis: xr.Dataset, *, source: str) -> xr.Dataset:
    if TIME not in analysis.dims:
        raise SchemaError(f"{source}: the analysis has no {TIME!r} dim; dims are {tuple(analysis.dims)}")
    if MEMBER in analysis.dims or LEAD in analysis.dims:
        raise SchemaError(
            f"{source}: a baseline is built from a deterministic analysis; found dims {tuple(analysis.dims)}"
        )
    names = [name for name, var in analysis.data_vars.items() if TIME in var.dims]
    if not names:
        raise SchemaError(f"{source}: no variable has a {TIME!r} dim; variables are {list(analysis.data_vars)}")
    return analysis[names]


def _require_times(ds: xr.Dataset, wanted: pd.DatetimeIndex, *, what: str, source: str) -> None:
    have = pd.DatetimeIndex(ds[TIME].values)
    missing = wanted[have.get_indexer(wanted) < 0]
    if len(missing):
        shown = [str(t) for t in missing[:5]]
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise SchemaError(
            f"{source}: {len(missing)} {what} are not times of the analysis, which spans {have[0]} .. {have[-1]} "
            f"({len(have)} times): {shown}{more}"
        )


def _select_period(ds: xr.Dataset, period: tuple, *, source: str) -> xr.Dataset:
    start, end = (pd.Timestamp(p) for p in period)
    if start > end:
        raise SchemaError(f"{source}: climatology period is reversed: {period}")
    have = pd.DatetimeIndex(ds[TIME].values)
    step = pd.Timedelta(np.min(np.diff(have.values))) if len(have) > 1 else pd.Timedelta(0)
    if start < have[0] - step or end > have[-1] + step:
        raise SchemaError(
            f"{source}: climatology period {period[0]} .. {period[1]} is not covered by the analysis, which "
            f"spans {have[0]} .. {have[-1]}"
        )
    selected = ds.sel({TIME: slice(period[0], period[1])})
    if selected.sizes[TIME] == 0:
        raise SchemaError(f"{source}: no analysis times in climatology period {period}")
    return selected


def _sum_by_day_and_hour(
    var: xr.DataArray, *, doy_index: np.ndarray, hour_index: np.ndarray, n_hours: int, count: bool
) -> xr.DataArray:
    """Sum over time per (day of year, hour) of ``var`` (NaN as 0), or of its valid-value flags if ``count``.

    Returns dims (``dayofyear`` 1..366, ``hour``, other dims of ``var``), float64, 0 where no sample.
    One sort-and-``reduceat`` pass per block; dask-backed input is rechunked to whole time series per
    block (``apply_ufunc`` with ``allow_rechunk``) and stays lazy.
    """
    if var.chunks is not None:
        # whole time series per block, blocks split over the other dims; an explicit rechunk is planned
        # far faster than apply_ufunc's own (minutes for thousands of one-step chunks)
        var = var.chunk({TIME: -1, **{d: "auto" for d in var.dims if d != TIME}})
    summed = xr.apply_ufunc(
        _reduce_by_key,
        var,
        input_core_dims=[[TIME]],
        output_core_dims=[[DAYOFYEAR, HOUR]],
        kwargs={
            "keys": doy_index * n_hours + hour_index, "n_days": len(DAYS_OF_YEAR), "n_hours": n_hours, "count": count
        },
        dask="parallelized",
        output_dtypes=[np.float64],
        dask_gufunc_kwargs={"output_sizes": {DAYOFYEAR: len(DAYS_OF_YEAR), HOUR: n_hours}, "allow_rechunk": True},
    )
    return summed.transpose(DAYOFYEAR, HOUR, ...)


def _reduce_by_key(values: np.ndarray, *, keys: np.ndarray, n_days: int, n_hours: int, count: bool) -> np.ndarray:
    """Sums over the last axis (time) of ``values`` per key ``day * n_hours + hour``: shape (..., n_days, n_hours)."""
    finite = np.isfinite(values)
    terms = finite.astype(np.float64) if count else np.where(finite, values, 0.0).astype(np.float64)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    out = np.zeros(values.shape[:-1] + (n_days * n_hours,))
    out[..., sorted_keys[starts]] = np.add.reduceat(terms[..., order], starts, axis=-1)
    return out.reshape(values.shape[:-1] + (n_days, n_hours))


def _circular_window_sum(values: xr.DataArray, width: int) -> xr.DataArray:
    """Centred boxcar sum of ``width`` (odd) days over the circular ``dayofyear`` axis, via a cumulative sum."""
    if width == 1:
        return values
    half = width // 2
    n = values.sizes[DAYOFYEAR]
    plain = values.drop_vars(DAYOFYEAR, errors="ignore")
    padded = xr.concat(
        [plain.isel({DAYOFYEAR: slice(n - half, n)}), plain, plain.isel({DAYOFYEAR: slice(0, half)})], dim=DAYOFYEAR
    )
    zero = xr.zeros_like(padded.isel({DAYOFYEAR: slice(0, 1)}))
    cumulative = xr.concat([zero, padded.cumsum(DAYOFYEAR)], dim=DAYOFYEAR)
    upper = cumulative.isel({DAYOFYEAR: slice(width, width + n)})
    lower = cumulative.isel({DAYOFYEAR: slice(0, n)})
    return values.copy(data=upper.data - lower.data)


def _circular_window_sum_numpy(values: np.ndarray, width: int) -> np.ndarray:
    """The same window as :func:`_circular_window_sum` over axis 0 of a NumPy array."""
    half = width // 2
    padded = np.concatenate([values[len(values) - half :], values, values[:half]], axis=0) if half else values
    cumulative = np.concatenate([np.zeros_like(values[:1]), np.cumsum(padded, axis=0)], axis=0)
    return cumulative[width : width + len(values)] - cumulative[: len(values)]


def _forecast_layout(forecast: xr.Dataset, *, model: str, attrs: dict | None = None) -> xr.Dataset:
    """Add ``realization`` = [0] and ``valid_time``, order dims as GRID_DIM_ORDER, name the model."""
    out = forecast.expand_dims({MEMBER: [0]})
    order = {d: GRID_DIM_ORDER.index(d) if d in GRID_DIM_ORDER else len(GRID_DIM_ORDER) for d in out.dims}
    out = out.transpose(*sorted(out.dims, key=lambda d: order[d]))
    valid_time = out[TIME] + out[LEAD]
    out = out.assign_coords({VALID_TIME: valid_time.transpose(TIME, LEAD)})
    out.attrs = {**(attrs or {}), "model": model}
    return out
