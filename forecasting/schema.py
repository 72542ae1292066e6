"""Canonical names, dims and units of every dataset in the system, and ``conform()`` onto them.

The canonical layout follows WeatherBench2 / ERA5 conventions (Rasp et al. 2024, WeatherBench 2):

* gridded analysis: dims ``time``, optional ``realization`` and ``level`` (hPa, ascending), ``latitude``
  (ascending, degrees north), ``longitude`` (ascending, degrees east in [0, 360));
* forecast: ``time`` (initialisation), ``prediction_timedelta`` (timedelta64), ``realization``, optional
  ``level``, ``latitude``, ``longitude`` with a ``valid_time`` coordinate;
* variables carry long names (``2m_temperature``, ``geopotential`` ...) and units spelled as ERA5 does
  (``K``, ``m s**-1``, ``m**2 s**-2``, ``Pa``, ``m``, ``1``).

``conform(ds, source=...)`` maps what readers actually find onto this layout (short ERA5 names, ``lat``/
``lon``, ``isobaricInhPa``/``plev``/``pressure_level``, descending latitudes, -180..180 longitudes,
transposed dims, GRIB ``number``/``step``/``valid_time``, integer hour offsets with a reference-time
string, unit spellings and convertible units) or raises :class:`SchemaError` naming the source, the
variable or dim and the value it could not map. ``check_values()`` is the separate, value-reading check
(NaNs and declared masks); it is kept apart because it has to read every byte.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import xarray as xr

from forecasting.errors import SchemaError

# ----------------------------------------------------------------------------------------------
# Dims
# ----------------------------------------------------------------------------------------------
TIME = "time"
LEAD = "prediction_timedelta"
MEMBER = "realization"
LEVEL = "level"
LAT = "latitude"
LON = "longitude"
VALID_TIME = "valid_time"

#: Order of dims in every canonical gridded dataset (those present).
GRID_DIM_ORDER = (TIME, LEAD, MEMBER, LEVEL, LAT, LON)

_DIM_ALIASES: dict[str, str] = {
    "lat": LAT,
    "lats": LAT,
    "y": LAT,
    "nav_lat": LAT,
    "lon": LON,
    "lons": LON,
    "long": LON,
    "x": LON,
    "nav_lon": LON,
    "isobaricInhPa": LEVEL,
    "pressure_level": LEVEL,
    "plev": LEVEL,
    "lev": LEVEL,
    "pressure": LEVEL,
    "number": MEMBER,
    "member": MEMBER,
    "ensemble": MEMBER,
    "ensemble_member": MEMBER,
    "t": TIME,
    "times": TIME,
    "date": TIME,
}


# ----------------------------------------------------------------------------------------------
# Variables and units
# ----------------------------------------------------------------------------------------------
UnitKind = Literal[
    "temperature", "speed", "geopotential", "pressure", "length", "fraction", "specific", "accumulation"
]


@dataclass(frozen=True)
class VariableSpec:
    """A canonical variable: its long name, aliases found in files, canonical units and valid range.

    ``valid_range`` is a generous physical plausibility range in canonical units, used by QC of
    observations and by tests; it is not a climatological range.
    """

    name: str
    units: str
    kind: UnitKind
    aliases: tuple[str, ...] = ()
    has_level: bool = False
    valid_range: tuple[float, float] = (-np.inf, np.inf)
    description: str = ""


VARIABLES: dict[str, VariableSpec] = {
    spec.name: spec
    for spec in (
        VariableSpec("2m_temperature", "K", "temperature", ("t2m", "2t", "tas", "t2"), valid_range=(170.0, 340.0)),
        VariableSpec("maximum_2m_temperature", "K", "temperature", ("tasmax", "mx2t", "tmax"), valid_range=(170.0, 345.0)),
        VariableSpec("minimum_2m_temperature", "K", "temperature", ("tasmin", "mn2t", "tmin"), valid_range=(165.0, 340.0)),
        VariableSpec("2m_dewpoint_temperature", "K", "temperature", ("d2m", "2d"), valid_range=(160.0, 320.0)),
        VariableSpec("sea_surface_temperature", "K", "temperature", ("sst",), valid_range=(260.0, 315.0)),
        VariableSpec("10m_u_component_of_wind", "m s**-1", "speed", ("u10", "10u", "uas"), valid_range=(-100.0, 100.0)),
        VariableSpec("10m_v_component_of_wind", "m s**-1", "speed", ("v10", "10v", "vas"), valid_range=(-100.0, 100.0)),
        VariableSpec("10m_wind_speed", "m s**-1", "speed", ("si10", "ws10", "sfcWind"), valid_range=(0.0, 120.0)),
        VariableSpec("mean_sea_level_pressure", "Pa", "pressure", ("msl", "mslp", "psl", "slp"), valid_range=(85000.0, 110000.0)),
        VariableSpec("surface_pressure", "Pa", "pressure", ("sp", "ps"), valid_range=(40000.0, 110000.0)),
        VariableSpec("total_precipitation", "m", "accumulation", ("tp", "pr", "precip", "prcp"), valid_range=(0.0, 1.0)),
        VariableSpec("total_precipitation_6hr", "m", "accumulation", (), valid_range=(0.0, 1.0)),
        VariableSpec("total_precipitation_24hr", "m", "accumulation", (), valid_range=(0.0, 2.0)),
        VariableSpec("total_cloud_cover", "1", "fraction", ("tcc",), valid_range=(0.0, 1.0)),
        VariableSpec("land_sea_mask", "1", "fraction", ("lsm", "sftlf"), valid_range=(0.0, 1.0)),
        VariableSpec("geopotential_at_surface", "m**2 s**-2", "geopotential", ("orog_geopotential",), valid_range=(-5000.0, 90000.0)),
        VariableSpec("geopotential", "m**2 s**-2", "geopotential", ("z", "zg_geopotential"), True, (-10000.0, 400000.0)),
        VariableSpec("temperature", "K", "temperature", ("t", "ta"), True, (150.0, 350.0)),
        VariableSpec("u_component_of_wind", "m s**-1", "speed", ("u", "ua"), True, (-200.0, 200.0)),
        VariableSpec("v_component_of_wind", "m s**-1", "speed", ("v", "va"), True, (-200.0, 200.0)),
        VariableSpec("vertical_velocity", "Pa s**-1", "speed", ("w", "wap"), True, (-50.0, 50.0)),
        VariableSpec("specific_humidity", "kg kg**-1", "specific", ("q", "hus"), True, (0.0, 0.05)),
        VariableSpec("relative_humidity", "%", "fraction", ("r", "hur"), True, (0.0, 110.0)),
    )
}

_ALIAS_TO_NAME: dict[str, str] = {}
for _spec in VARIABLES.values():
    _ALIAS_TO_NAME[_spec.name] = _spec.name
    for _alias in _spec.aliases:
        _ALIAS_TO_NAME[_alias] = _spec.name


def _normalise_unit(units: str) -> str:
    """Collapse spelling differences: ``m/s``, ``m s-1``, ``m s^-1``, ``m.s-1`` all become ``m s**-1``."""
    u = units.strip()
    u = re.sub(r"\s+", " ", u)
    u = u.replace("^", "**").replace(".", " ")
    u = re.sub(r"(?<=[A-Za-z])\*{0,2}(-?\d)", r"**\1", u)  # m2 -> m**2, s-1 -> s**-1
    u = re.sub(r"\s*/\s*([A-Za-z]+)(\*\*(-?\d+))?", lambda m: f" {m.group(1)}**-{m.group(3) or '1'}", u)
    u = u.replace("**--", "**")  # a/b**-1 -> a b**1 is not used in practice; keep a stable form
    return u.strip()


# canonical kind -> {normalised spelling: (scale, offset) to canonical units: x_canon = x * scale + offset}
_CONVERSIONS: dict[str, dict[str, tuple[float, float]]] = {
    "temperature": {"K": (1.0, 0.0), "kelvin": (1.0, 0.0), "degK": (1.0, 0.0), "deg K": (1.0, 0.0),
                    "degC": (1.0, 273.15), "deg C": (1.0, 273.15), "°C": (1.0, 273.15), "C": (1.0, 273.15),
                    "celsius": (1.0, 273.15), "degrees_Celsius": (1.0, 273.15), "degree_Celsius": (1.0, 273.15)},
    "speed": {"m s**-1": (1.0, 0.0), "km h**-1": (1 / 3.6, 0.0), "kt": (0.514444, 0.0),
              "knots": (0.514444, 0.0), "Pa s**-1": (1.0, 0.0)},
    "geopotential": {"m**2 s**-2": (1.0, 0.0)},
    "pressure": {"Pa": (1.0, 0.0), "hPa": (100.0, 0.0), "mbar": (100.0, 0.0), "mb": (100.0, 0.0),
                 "kPa": (1000.0, 0.0)},
    "length": {"m": (1.0, 0.0), "mm": (1e-3, 0.0), "cm": (1e-2, 0.0)},
    "fraction": {"1": (1.0, 0.0), "(0 - 1)": (1.0, 0.0), "0-1": (1.0, 0.0), "~": (1.0, 0.0),
                 "": (1.0, 0.0), "%": (1.0, 0.0), "fraction": (1.0, 0.0)},
    "specific": {"kg kg**-1": (1.0, 0.0), "1": (1.0, 0.0), "g kg**-1": (1e-3, 0.0)},
    "accumulation": {"m": (1.0, 0.0), "mm": (1e-3, 0.0), "kg m**-2": (1e-3, 0.0), "cm": (1e-2, 0.0)},
}
# Precipitation given as a rate: metres of water per second. Turned into an accumulation over the
# dataset's (regular) time step, named total_precipitation_{N}hr as WeatherBench2 does.
_RATE_TO_M_PER_S: dict[str, float] = {
    "mm d**-1": 1e-3 / 86400, "mm day**-1": 1e-3 / 86400, "kg m**-2 d**-1": 1e-3 / 86400,
    "mm h**-1": 1e-3 / 3600, "mm hr**-1": 1e-3 / 3600, "kg m**-2 s**-1": 1e-3, "mm s**-1": 1e-3,
    "m s**-1": 1.0, "m d**-1": 1.0 / 86400,
}


def unit_conversion(variable: str, units: str) -> tuple[float, float] | None:
    """Return ``(scale, offset)`` taking ``units`` to the canonical units of ``variable``, or None."""
    spec = VARIABLES[variable]
    table = _CONVERSIONS[spec.kind]
    for candidate in (units, _normalise_unit(units)):
        if candidate in table:
            if spec.kind == "fraction" and spec.name == "relative_humidity" and candidate != "%":
                return (100.0, 0.0)
            return table[candidate]
    return None


def allowed_units(variable: str) -> list[str]:
    """The unit spellings accepted (and converted) for a canonical variable, for error messages."""
    return sorted(k for k in _CONVERSIONS[VARIABLES[variable].kind] if k)


def precipitation_rate_factor(units: str) -> float | None:
    """Metres of water per second per unit of a precipitation rate in ``units``; None if not a rate."""
    return _RATE_TO_M_PER_S.get(units) or _RATE_TO_M_PER_S.get(_normalise_unit(units))


def accumulation_name(step: pd.Timedelta, *, source: str) -> str:
    """Canonical name of precipitation accumulated over ``step`` (WeatherBench2: total_precipitation_6hr...)."""
    hours = step / pd.Timedelta(hours=1)
    if hours != int(hours):
        raise SchemaError(f"{source}: cannot name precipitation accumulated over a {step} step")
    name = f"total_precipitation_{int(hours)}hr" if hours != 1 else "total_precipitation"
    if name not in VARIABLES:
        raise SchemaError(f"{source}: precipitation accumulated over {int(hours)} h has no canonical name")
    return name


def canonical_name(name: str) -> str | None:
    """The canonical long name for a name found in a file, or None if it is not a known variable."""
    return _ALIAS_TO_NAME.get(name)


# ----------------------------------------------------------------------------------------------
# Options and reports
# ----------------------------------------------------------------------------------------------
NanPolicy = Literal["error", "fixed", "allow"]


@dataclass(frozen=True)
class ConformOptions:
    """What a user declares about a source that the file itself does not say (or says wrongly).

    rename: source variable -> canonical name, overriding the alias table (``t`` -> ``2m_temperature``).
    units: variable (source or canonical name) -> the units its values really are in, for files whose
        ``units`` attribute is missing or wrong; converted to canonical units like any other.
    levels: variable -> pressure level (hPa) to attach to a variable stored without a level dim.
    reference_time: start of integer hour offsets when the file carries no reference-time string.
    nan_policy: ``error`` (default): any NaN is an error; ``fixed``: NaNs allowed only where a value is
        missing at every time (a static mask, e.g. sea points of a land-only product), and time steps
        missing entirely are dropped and reported as gaps; ``allow``: NaNs allowed and counted.
    """

    rename: Mapping[str, str] = field(default_factory=dict)
    units: Mapping[str, str] = field(default_factory=dict)
    levels: Mapping[str, float] = field(default_factory=dict)
    reference_time: str | None = None
    nan_policy: NanPolicy = "error"


@dataclass(frozen=True)
class TimeAxisReport:
    """Regularity of a time axis: its step and the gaps in it (as (last time before, first time after))."""

    step: pd.Timedelta | None
    gaps: tuple[tuple[pd.Timestamp, pd.Timestamp], ...] = ()

    def describe(self) -> str:
        if self.step is None:
            return "single time"
        text = f"step {self.step}"
        if self.gaps:
            shown = ", ".join(f"{a:%Y-%m-%d %H:%M} -> {b:%Y-%m-%d %H:%M}" for a, b in self.gaps[:5])
            more = f" (+{len(self.gaps) - 5} more)" if len(self.gaps) > 5 else ""
            text += f", {len(self.gaps)} gap(s): {shown}{more}"
        return text


# ----------------------------------------------------------------------------------------------
# conform
# ----------------------------------------------------------------------------------------------
def conform(ds: xr.Dataset, *, source: str = "<dataset>", options: ConformOptions | None = None) -> xr.Dataset:
    """Map a dataset as read from a file onto the canonical gridded layout; lazy, never reads values.

    Returns a new Dataset with canonical dim and variable names, ascending latitude and level,
    longitudes in [0, 360) ascending, dims in ``GRID_DIM_ORDER`` and canonical units. Raises
    :class:`SchemaError` naming ``source`` and what could not be mapped.
    """
    opts = options or ConformOptions()
    ds = ds.copy()  # shallow: never mutate the caller's dataset
    ds = _decode_offset_time(ds, source=source, reference_time=opts.reference_time)
    ds = _rename_dims(ds, source=source)
    ds = _handle_grib_time(ds, source=source)
    ds = _drop_scalar_clutter(ds)
    ds = _rename_variables(ds, source=source, rename=opts.rename)
    ds = _attach_levels(ds, source=source, levels=opts.levels)
    ds = _conform_level(ds, source=source)
    ds = _conform_latitude(ds, source=source)
    ds = _conform_longitude(ds, source=source)
    ds = _conform_time(ds, source=source)
    ds = _conform_units(ds, source=source, declared=opts.units, original_names=_original_names(ds))
    ds = _order_dims(ds)
    return ds


def _original_names(ds: xr.Dataset) -> dict[str, str]:
    return {str(name): str(var.attrs.get("source_name", name)) for name, var in ds.data_vars.items()}


def _decode_offset_time(ds: xr.Dataset, *, source: str, reference_time: str | None) -> xr.Dataset:
    """Turn an integer hour-offset dim (``timestep``, ``hours``, ``step``) plus a reference time into ``time``."""
    for dim in ("timestep", "hours", "hour", "forecast_hour"):
        if dim not in ds.dims or dim not in ds.coords or TIME in ds.dims:
            continue
        offsets = ds[dim].values
        if not np.issubdtype(offsets.dtype, np.integer):
            raise SchemaError(
                f"{source}: dim {dim!r} should hold integer hour offsets; found dtype {offsets.dtype}"
            )
        ref = reference_time
        for ref_name in ("reftime", "reference_time", "ref_time", "basetime"):
            if ref is None and ref_name in ds.variables:
                raw = ds[ref_name].values
                ref = raw.item().decode() if isinstance(raw.item(), bytes) else str(raw.item())
                ds = ds.drop_vars(ref_name)
            elif ref is None and ref_name in ds.attrs:
                ref = str(ds.attrs[ref_name])
        if ref is None:
            raise SchemaError(
                f"{source}: dim {dim!r} holds integer offsets {offsets[:3].tolist()}... but no reference "
                "time was found (variable or attribute 'reftime'); declare one with reference_time"
            )
        try:
            start = pd.Timestamp(ref.strip())
        except ValueError:
            try:
                start = pd.to_datetime(ref.strip(), format="%Y %m %d %H:%M")
            except ValueError as exc:
                raise SchemaError(f"{source}: cannot parse reference time {ref!r} of dim {dim!r}") from exc
        times = start + pd.to_timedelta(offsets.astype(np.int64), unit="h")
        ds = ds.assign_coords({dim: times.values}).rename({dim: TIME})
        ds[TIME].attrs = {"long_name": "time", "reference_time": str(start)}
    return ds


def _rename_dims(ds: xr.Dataset, *, source: str) -> xr.Dataset:
    mapping: dict[str, str] = {}
    for name in list(ds.dims) + [c for c in ds.coords if c not in ds.dims]:
        target = _DIM_ALIASES.get(str(name))
        if target is None or target in ds.variables or target in mapping.values():
            continue
        if name == "t" and name in ds.data_vars:  # 't' is temperature when it is a variable
            continue
        mapping[str(name)] = target
    # new CDS netCDF: the time dim is called valid_time and there is no 'time'
    if VALID_TIME in ds.dims and TIME not in ds.variables and TIME not in mapping.values():
        mapping[VALID_TIME] = TIME
    return ds.rename(mapping) if mapping else ds


def _handle_grib_time(ds: xr.Dataset, *, source: str) -> xr.Dataset:
    """cfgrib writes ``time`` (reference), ``step`` (lead) and ``valid_time``; keep only what has meaning.

    An analysis has a zero (scalar) step: the reference time is the valid time. A forecast file has a
    ``step`` dim, which becomes ``prediction_timedelta`` with ``valid_time`` as a coordinate.
    """
    if "step" in ds.dims:
        ds = ds.rename({"step": LEAD})
        if VALID_TIME not in ds.coords and TIME in ds.coords:
            ds = ds.assign_coords({VALID_TIME: ds[TIME] + ds[LEAD]})
        return ds
    if "step" in ds.coords:
        step = pd.to_timedelta(ds["step"].values)
        if step != pd.Timedelta(0):
            # a single non-zero lead: the valid time is what an analysis user wants
            if VALID_TIME in ds.coords and TIME in ds.dims:
                ds = ds.assign_coords({TIME: ds[VALID_TIME].values})
        ds = ds.drop_vars("step")
    if VALID_TIME in ds.coords and VALID_TIME not in ds.dims:
        ds = ds.drop_vars(VALID_TIME)
    return ds


def _drop_scalar_clutter(ds: xr.Dataset) -> xr.Dataset:
    """Drop scalar coordinates that carry GRIB bookkeeping rather than meaning (``surface``, ``number``...)."""
    clutter = [name for name, coord in ds.coords.items() if coord.ndim == 0 and name not in (TIME, LEVEL)]
    return ds.drop_vars(clutter)


def _rename_variables(ds: xr.Dataset, *, source: str, rename: Mapping[str, str]) -> xr.Dataset:
    unknown_targets = [t for t in rename.values() if t not in VARIABLES]
    if unknown_targets:
        raise SchemaError(
            f"{source}: cannot rename to {unknown_targets}: not canonical variable names "
            f"(known: {', '.join(sorted(VARIABLES))})"
        )
    missing = [s for s in rename if s not in ds.data_vars]
    if missing:
        raise SchemaError(
            f"{source}: variables {missing} named in rename are not in the file; it has {sorted(map(str, ds.data_vars))}"
        )
    mapping: dict[str, str] = {}
    for name in ds.data_vars:
        target = rename.get(str(name)) or canonical_name(str(name))
        if target is None:
            long_name = ds[name].attrs.get("long_name", "")
            target = canonical_name(str(long_name))
        if target is not None and target != name:
            mapping[str(name)] = target
    targets = list(mapping.values()) + [str(n) for n in ds.data_vars if n not in mapping]
    dupes = sorted({t for t in targets if targets.count(t) > 1})
    if dupes:
        raise SchemaError(
            f"{source}: several variables map onto {dupes}; say which is which with rename"
        )
    out = ds.rename(mapping)
    for old, new in mapping.items():
        out[new].attrs = {**out[new].attrs, "source_name": old}
    return out


def _attach_levels(ds: xr.Dataset, *, source: str, levels: Mapping[str, float]) -> xr.Dataset:
    if not levels:
        return ds
    out = ds
    for name, level in levels.items():
        target = name if name in out.data_vars else canonical_name(name)
        if target is None or target not in out.data_vars:
            raise SchemaError(f"{source}: variable {name!r} given a level is not in the file")
        if LEVEL in out[target].dims:
            raise SchemaError(f"{source}: variable {target!r} already has a level dim; cannot attach level {level}")
        out = out.assign({target: out[target].expand_dims({LEVEL: [float(level)]})})
    return out


def _conform_level(ds: xr.Dataset, *, source: str) -> xr.Dataset:
    if LEVEL not in ds.dims:
        if LEVEL in ds.coords:  # scalar level left by a reader: keep it as a length-1 dim is not wanted
            ds = ds.drop_vars(LEVEL)
        return ds
    levels = ds[LEVEL]
    units = str(levels.attrs.get("units", "hPa")).strip()
    values = levels.values.astype(float)
    if units in ("Pa", "pa") or (units == "" and values.max() > 2000):
        values = values / 100.0
    elif units not in ("hPa", "millibars", "mbar", "mb", "hectopascal"):
        raise SchemaError(f"{source}: level coordinate has units {units!r}; expected hPa or Pa")
    if np.any(values <= 0) or np.any(values > 1100):
        raise SchemaError(f"{source}: pressure levels out of range (0, 1100] hPa: {values.tolist()}")
    if len(np.unique(values)) != len(values):
        raise SchemaError(f"{source}: duplicated pressure levels {values.tolist()}")
    ds = ds.assign_coords({LEVEL: values})
    if values.size > 1 and not np.all(np.diff(values) > 0):
        ds = ds.isel({LEVEL: np.argsort(values, kind="stable")})
    ds[LEVEL].attrs = {"units": "hPa", "long_name": "pressure level"}
    return ds


def _conform_latitude(ds: xr.Dataset, *, source: str) -> xr.Dataset:
    if LAT not in ds.dims:
        return ds
    lat = ds[LAT].values.astype(float)
    if lat.size and (np.nanmin(lat) < -90.0 - 1e-6 or np.nanmax(lat) > 90.0 + 1e-6):
        raise SchemaError(f"{source}: latitude outside [-90, 90]: min {np.nanmin(lat)}, max {np.nanmax(lat)}")
    if len(np.unique(lat)) != len(lat):
        raise SchemaError(f"{source}: duplicated latitudes in {lat[:5].tolist()}...")
    if lat.size > 1 and not (np.all(np.diff(lat) > 0) or np.all(np.diff(lat) < 0)):
        raise SchemaError(f"{source}: latitude is not monotonic; found {lat[:5].tolist()}...")
    ds = ds.assign_coords({LAT: lat})
    if lat.size > 1 and lat[0] > lat[-1]:
        ds = ds.isel({LAT: slice(None, None, -1)})  # a reversed slice, not a sort: cheap on dask
    ds[LAT].attrs = {"units": "degrees_north", "long_name": "latitude", "standard_name": "latitude"}
    return ds


def _conform_longitude(ds: xr.Dataset, *, source: str) -> xr.Dataset:
    if LON not in ds.dims:
        return ds
    lon = ds[LON].values.astype(float)
    if lon.size and (np.nanmin(lon) < -180.0 - 1e-6 or np.nanmax(lon) > 360.0 + 1e-6):
        raise SchemaError(f"{source}: longitude outside [-180, 360]: min {np.nanmin(lon)}, max {np.nanmax(lon)}")
    wrapped = np.mod(lon, 360.0)
    wrapped = np.where(np.isclose(wrapped, 360.0), 0.0, wrapped)
    if len(np.unique(np.round(wrapped, 9))) != len(wrapped):
        # e.g. a grid holding both -180 and 180, or 0 and 360: the same meridian twice
        keep = ~pd.Index(np.round(wrapped, 9)).duplicated()
        if not np.all(keep):
            ds = ds.isel({LON: np.flatnonzero(keep)})
            wrapped = wrapped[keep]
    ds = ds.assign_coords({LON: wrapped})
    if wrapped.size > 1 and not np.all(np.diff(wrapped) > 0):
        ds = ds.isel({LON: np.argsort(wrapped, kind="stable")})
    ds[LON].attrs = {"units": "degrees_east", "long_name": "longitude", "standard_name": "longitude"}
    return ds


def _conform_time(ds: xr.Dataset, *, source: str) -> xr.Dataset:
    if TIME not in ds.dims:
        return ds
    values = ds[TIME].values
    if not np.issubdtype(values.dtype, np.datetime64):
        raise SchemaError(
            f"{source}: time coordinate has dtype {values.dtype} (first values {values[:3].tolist()}); "
            "expected datetimes or integer hour offsets with a reference time"
        )
    check_time_axis(values, source=source)
    if values.dtype != np.dtype("datetime64[ns]"):
        ds = ds.assign_coords({TIME: values.astype("datetime64[ns]")})
    return ds


def check_time_axis(values: np.ndarray, *, source: str) -> TimeAxisReport:
    """Raise on duplicated or unsorted times; return the step and the gaps of an increasing axis."""
    times = pd.DatetimeIndex(values)
    if times.hasnans:
        raise SchemaError(f"{source}: time coordinate holds NaT at positions {np.flatnonzero(times.isna())[:5].tolist()}")
    if times.has_duplicates:
        dup = times[times.duplicated()][0]
        raise SchemaError(f"{source}: duplicated time {dup} (time must be unique and increasing)")
    diffs = np.diff(times.values)
    if np.any(diffs <= np.timedelta64(0)):
        i = int(np.flatnonzero(diffs <= np.timedelta64(0))[0])
        raise SchemaError(
            f"{source}: times are not increasing: {times[i]} is followed by {times[i + 1]} (position {i + 1})"
        )
    if len(times) < 2:
        return TimeAxisReport(step=None)
    step = pd.Timedelta(np.min(diffs))
    gap_idx = np.flatnonzero(diffs != step.to_timedelta64())
    uneven = [i for i in gap_idx if diffs[i] % step.to_timedelta64() != np.timedelta64(0)]
    if uneven:
        i = uneven[0]
        raise SchemaError(
            f"{source}: irregular time spacing: step {step} but {times[i]} -> {times[i + 1]} is not a multiple of it"
        )
    return TimeAxisReport(step=step, gaps=tuple((times[i], times[i + 1]) for i in gap_idx))


def _conform_units(
    ds: xr.Dataset, *, source: str, declared: Mapping[str, str], original_names: Mapping[str, str]
) -> xr.Dataset:
    out = ds
    reverse = {orig: name for name, orig in original_names.items()}
    declared_canon = {reverse.get(k, canonical_name(k) or k): v for k, v in declared.items()}
    unknown = [k for k in declared_canon if k not in out.data_vars]
    if unknown:
        raise SchemaError(f"{source}: units declared for {unknown}, which are not in the file")
    for name in list(out.data_vars):
        var = out[name]
        original = original_names.get(str(name), str(name))
        if str(name) in declared_canon:
            units = declared_canon[str(name)]
            where = "declared"
        else:
            units = var.attrs.get("units")
            where = "attribute"
        spec = VARIABLES.get(str(name))
        if units is None or (isinstance(units, str) and units.strip() == "" and (spec is None or spec.kind != "fraction")):
            raise SchemaError(
                f"{source}: variable {original!r} ({name}) has no units attribute; declare its units "
                f"(e.g. --units {original}=...)"
            )
        units = str(units)
        if spec is None:
            # Not a variable we know: keep it with the units the file gives, untouched.
            continue
        conv = unit_conversion(spec.name, units)
        if conv is None and spec.kind == "accumulation":
            out = _precipitation_rate_to_accumulation(out, str(name), units, source=source, original=original)
            continue
        if conv is None:
            allowed = ", ".join(allowed_units(spec.name))
            raise SchemaError(
                f"{source}: variable {original!r} ({name}) has units {units!r} ({where}), which are not "
                f"{spec.kind} units (expected one of: {allowed}); if the attribute is wrong, declare the "
                f"real units (e.g. --units {original}={spec.units})"
            )
        scale, offset = conv
        attrs = {k: v for k, v in var.attrs.items() if k not in ("units", "GRIB_units")}
        new = var if (scale, offset) == (1.0, 0.0) else (var * scale + offset).astype(var.dtype)
        new.attrs = {**attrs, "units": spec.units}
        if where == "declared":
            new.attrs["units_declared"] = units
        out = out.assign({name: new})
    return out


def _precipitation_rate_to_accumulation(
    ds: xr.Dataset, name: str, units: str, *, source: str, original: str
) -> xr.Dataset:
    rate = precipitation_rate_factor(units)
    if rate is None:
        raise SchemaError(
            f"{source}: precipitation variable {original!r} has units {units!r}; expected an accumulation "
            f"(m, mm, kg m**-2) or a rate (mm d-1, kg m-2 s-1)"
        )
    if TIME not in ds.dims or ds.sizes[TIME] < 2:
        raise SchemaError(f"{source}: precipitation rate {original!r} needs a time axis to become an accumulation")
    report = check_time_axis(ds[TIME].values, source=source)
    assert report.step is not None
    target = accumulation_name(report.step, source=source)
    var = ds[name]
    new = (var * (rate * report.step.total_seconds())).astype(var.dtype)
    new.attrs = {k: v for k, v in var.attrs.items() if k != "units"}
    hours = int(report.step / pd.Timedelta(hours=1))
    new.attrs.update({"units": "m", "accumulation_period": f"{hours}h", "converted_from_units": units})
    return ds.drop_vars(name).assign({target: new})


def _order_dims(ds: xr.Dataset) -> xr.Dataset:
    def key(d: str) -> tuple[int, str]:
        return (GRID_DIM_ORDER.index(d) if d in GRID_DIM_ORDER else len(GRID_DIM_ORDER), d)

    out = ds
    for name in ds.data_vars:
        dims = tuple(sorted(map(str, ds[name].dims), key=key))
        if dims != ds[name].dims:
            out = out.assign({name: ds[name].transpose(*dims)})
    return out


# ----------------------------------------------------------------------------------------------
# Validation of a conformed dataset
# ----------------------------------------------------------------------------------------------
def validate(ds: xr.Dataset, *, source: str = "<dataset>") -> TimeAxisReport | None:
    """Check that ``ds`` follows the canonical gridded layout (coords only; never reads data values).

    Returns the time-axis report (step and gaps) when there is a time dim.
    """
    for dim in ds.dims:
        if dim in (LAT, LON, LEVEL, TIME, LEAD) and dim not in ds.coords:
            raise SchemaError(f"{source}: dim {dim!r} has no coordinate")
    if LAT in ds.dims:
        lat = ds[LAT].values
        if lat.size > 1 and not np.all(np.diff(lat) > 0):
            raise SchemaError(f"{source}: latitude must be ascending; found {lat[:3].tolist()}...")
    if LON in ds.dims:
        lon = ds[LON].values
        if lon.size and (lon.min() < 0 or lon.max() >= 360):
            raise SchemaError(f"{source}: longitude must lie in [0, 360); found {lon.min()}..{lon.max()}")
        if lon.size > 1 and not np.all(np.diff(lon) > 0):
            raise SchemaError(f"{source}: longitude must be ascending; found {lon[:3].tolist()}...")
    if LEVEL in ds.dims:
        lev = ds[LEVEL].values
        if lev.size > 1 and not np.all(np.diff(lev) > 0):
            raise SchemaError(f"{source}: level must be ascending; found {lev.tolist()}")
    for name, var in ds.data_vars.items():
        spec = VARIABLES.get(str(name))
        if spec is not None and var.attrs.get("units") != spec.units:
            raise SchemaError(
                f"{source}: variable {name!r} has units {var.attrs.get('units')!r}; canonical units are {spec.units!r}"
            )
        order = [d for d in GRID_DIM_ORDER if d in var.dims]
        if [d for d in var.dims if d in GRID_DIM_ORDER] != order:
            raise SchemaError(f"{source}: variable {name!r} has dims {var.dims}; expected order {tuple(order)}")
    if TIME in ds.dims:
        return check_time_axis(ds[TIME].values, source=source)
    return None


@dataclass(frozen=True)
class ValueReport:
    """What ``check_values`` found: missing time steps dropped, static mask size, NaN counts per variable."""

    dropped_times: tuple[pd.Timestamp, ...] = ()
    masked_points: Mapping[str, int] = field(default_factory=dict)
    nan_counts: Mapping[str, int] = field(default_factory=dict)


def check_values(ds: xr.Dataset, *, source: str, nan_policy: NanPolicy = "error") -> tuple[xr.Dataset, ValueReport]:
    """Detect NaNs and infinities; apply the declared NaN policy. Reads the data (computes dask arrays).

    Under ``fixed`` a variable's static mask is where it is missing at every time; a time step missing
    at every unmasked point of some variable is dropped from the whole dataset; any other NaN is an
    error. Infinite values are always an error. The returned dataset carries a ``<var>_mask`` boolean
    variable (True = valid) for each masked variable.
    """
    nan_counts: dict[str, int] = {}
    masked: dict[str, int] = {}
    drop: set[np.datetime64] = set()
    masks: dict[str, xr.DataArray] = {}
    spatial = [d for d in (LAT, LON) if d in ds.dims]
    for name, var in ds.data_vars.items():
        if not np.issubdtype(var.dtype, np.floating):
            continue
        isnan = var.isnull()
        isinf = np.isinf(var)
        n_inf = int(isinf.sum())
        if n_inf:
            first = _first_index(isinf)
            raise SchemaError(f"{source}: variable {name!r} holds {n_inf} infinite values (first at {first})")
        n_nan = int(isnan.sum())
        nan_counts[str(name)] = n_nan
        if n_nan == 0:
            continue
        if nan_policy == "error":
            first = _first_index(isnan)
            raise SchemaError(
                f"{source}: variable {name!r} holds {n_nan} NaN values (first at {first}) and no mask is "
                "declared; declare a static mask (nan policy 'fixed') or allow missing values ('allow')"
            )
        if nan_policy == "allow":
            continue
        if TIME not in var.dims:
            mask = ~isnan
        else:
            mask = ~isnan.all(TIME)
        masks[str(name)] = mask
        masked[str(name)] = int((~mask).sum())
        if TIME in var.dims:
            other = [d for d in var.dims if d not in (TIME,)]
            unmasked_nan = isnan & mask
            per_time = unmasked_nan.sum(other)
            size = int(mask.sum()) * int(np.prod([var.sizes[d] for d in other if d not in spatial] or [1]))
            full = per_time.values == size
            partial = (per_time.values > 0) & ~full
            if np.any(partial):
                t = ds[TIME].values[np.flatnonzero(partial)[0]]
                raise SchemaError(
                    f"{source}: variable {name!r} has NaNs outside its static mask at {pd.Timestamp(t)} "
                    f"({int(per_time.values[np.flatnonzero(partial)[0]])} points) that do not fill the whole "
                    "time step; use nan policy 'allow' to keep them"
                )
            drop.update(ds[TIME].values[full].tolist() if full.any() else [])
    out = ds
    if drop:
        drop_idx = sorted(pd.Timestamp(t) for t in drop)
        out = out.drop_sel({TIME: [np.datetime64(t, "ns") for t in drop_idx]})
    for name, mask in masks.items():
        out = out.assign({f"{name}_mask": mask.astype(bool).assign_attrs(units="1", long_name=f"valid points of {name}")})
    return out, ValueReport(
        dropped_times=tuple(sorted(pd.Timestamp(t) for t in drop)), masked_points=masked, nan_counts=nan_counts
    )


def _first_index(flags: xr.DataArray) -> dict[str, object]:
    idx = np.argwhere(np.asarray(flags.values))
    if not len(idx):
        return {}
    first = idx[0]
    out: dict[str, object] = {}
    for dim, i in zip(flags.dims, first):
        coord = flags[dim].values[i] if dim in flags.coords else int(i)
        out[str(dim)] = str(coord) if isinstance(coord, np.datetime64) else coord.item() if hasattr(coord, "item") else coord
    return out


def subset(
    ds: xr.Dataset,
    *,
    variables: Sequence[str] | None = None,
    levels: Sequence[float] | None = None,
    time: tuple[str | None, str | None] | None = None,
    area: tuple[float, float, float, float] | None = None,
    source: str = "<dataset>",
) -> xr.Dataset:
    """Lazily select variables, levels, a time range and an area (lat_min, lat_max, lon_min, lon_max).

    Works on a conformed dataset; an area whose lon_min > lon_max wraps across the 0 meridian. Raises
    :class:`SchemaError` naming what is missing (a variable, a level) or an empty selection.
    """
    out = ds
    if variables is not None:
        missing = [v for v in variables if v not in out.data_vars]
        if missing:
            raise SchemaError(
                f"{source}: requested variables {missing} are not available; it has {sorted(map(str, out.data_vars))}"
            )
        keep = list(variables) + [f"{v}_mask" for v in variables if f"{v}_mask" in out.data_vars]
        out = out[keep]
    if levels is not None:
        if LEVEL not in out.dims:
            raise SchemaError(f"{source}: levels {list(levels)} requested but the data has no level dim")
        have = out[LEVEL].values
        missing = [lv for lv in levels if not np.any(np.isclose(have, lv))]
        if missing:
            raise SchemaError(f"{source}: levels {missing} hPa not available; it has {have.tolist()}")
        out = out.sel({LEVEL: [float(lv) for lv in levels]})
    if time is not None and TIME in out.dims:
        out = out.sel({TIME: slice(time[0], time[1])})
        if out.sizes[TIME] == 0:
            raise SchemaError(f"{source}: no times between {time[0]} and {time[1]}")
    if area is not None:
        lat_min, lat_max, lon_min, lon_max = area
        if lat_min > lat_max:
            raise SchemaError(f"{source}: area latitude bounds reversed: {lat_min} > {lat_max}")
        out = out.sel({LAT: slice(lat_min, lat_max)})
        lon_min, lon_max = lon_min % 360.0, lon_max % 360.0 if lon_max != 360 else 360.0
        lon = out[LON].values
        if lon_min <= lon_max:
            sel = (lon >= lon_min) & (lon <= lon_max)
        else:
            sel = (lon >= lon_min) | (lon <= lon_max)
        out = out.isel({LON: np.flatnonzero(sel)})
        if out.sizes[LAT] == 0 or out.sizes[LON] == 0:
            raise SchemaError(f"{source}: area {area} holds no grid points")
    return out


# ----------------------------------------------------------------------------------------------
# Forecast layout (WeatherBench2): time (init), prediction_timedelta, realization, [level], lat, lon
# ----------------------------------------------------------------------------------------------
def with_valid_time(ds: xr.Dataset) -> xr.Dataset:
    """Return ``ds`` with the ``valid_time`` coordinate (time, prediction_timedelta) = time + lead."""
    return ds.assign_coords({VALID_TIME: ds[TIME] + ds[LEAD]})


def validate_forecast(ds: xr.Dataset, *, source: str = "<forecast>") -> None:
    """Check the forecast layout of DESIGN.md (coords only): dims, lead dtype, members, valid_time, units."""
    for dim in (TIME, LEAD, MEMBER):
        if dim not in ds.dims:
            raise SchemaError(
                f"{source}: a forecast needs dims ({TIME}, {LEAD}, {MEMBER}, ...); {dim!r} is missing "
                f"(dims found: {dict(ds.sizes)})"
            )
    if not np.issubdtype(ds[LEAD].dtype, np.timedelta64):
        raise SchemaError(f"{source}: {LEAD} must be timedelta64; found dtype {ds[LEAD].dtype}")
    if ds.sizes[LEAD] > 1 and not np.all(np.diff(ds[LEAD].values) > np.timedelta64(0)):
        raise SchemaError(f"{source}: {LEAD} must be increasing; found {ds[LEAD].values[:4]}")
    if VALID_TIME in ds.coords:
        expected = ds[TIME] + ds[LEAD]
        if not np.array_equal(np.asarray(ds[VALID_TIME].broadcast_like(expected).values), expected.values):
            raise SchemaError(f"{source}: coordinate {VALID_TIME} is not time + {LEAD}")
    validate(ds, source=source)


def analysis_as_forecast(ds: xr.Dataset) -> xr.Dataset:
    """View an analysis (time, ..., lat, lon) as a one-member forecast at lead 0, e.g. to score a gridded
    product against stations with the same machinery as forecasts."""
    out = ds.expand_dims({LEAD: [np.timedelta64(0, "ns")], MEMBER: [0]})
    return _order_dims(with_valid_time(out))
