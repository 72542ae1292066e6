"""Station observations: read, convert to canonical names and units, quality-control and write.

Two canonical in-memory forms (shared/DESIGN.md, "Observations"):

* **long table** -- a pandas DataFrame with columns ``station_id`` (str), ``latitude`` (float, degrees
  north), ``longitude`` (float, degrees east in [0, 360)), ``elevation`` (float, m; NaN if unknown),
  ``time`` (datetime64[ns], UTC, naive), then one float column per observed variable, named by its
  WeatherBench2 / ERA5 long name in canonical units (``forecasting.schema.VARIABLES``); rows sorted by
  (``station_id``, ``time``). Shape (n_rows, 5 + n_variables).
* **Dataset** -- dims (``time``, ``station``); coords ``station_id``, ``latitude``, ``longitude``,
  ``elevation`` on ``station`` and ``time``; one variable per observed quantity with dims
  (``time``, ``station``) and a canonical ``units`` attribute. Missing observations are NaN.

``read_observations`` accepts CSV and Parquet tables and station netCDF/Zarr datasets (a ``station`` dim,
possibly without coordinate, with latitude/longitude/altitude and a station id as per-station variables).
Names and units are mapped with the same rules ``schema.conform`` applies to gridded data:
``schema.canonical_name`` for variable aliases, ``schema.unit_conversion`` for units, and precipitation
given as a rate (e.g. ``mm d-1``) becomes an accumulation over the data's time step, named
``total_precipitation_{N}hr`` as WeatherBench2 does. A table column named canonically is taken in
canonical units; any other column must have its units declared (``ConformOptions.units``), while a
Dataset variable carries them in its ``units`` attribute. Columns that are neither station metadata nor
a known variable (station names, quality flags ...) are not part of the contract and are left out.

``quality_control`` applies range checks (``VariableSpec.valid_range`` unless overridden), resolves
duplicated (station, time) rows and drops rows with no data, returning a :class:`QCReport`. Writes are
atomic: a temporary file in the destination folder is renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from forecasting import schema
from forecasting.errors import SchemaError, SourceError, StoreError
from forecasting.schema import TIME, VARIABLES, ConformOptions, canonical_name, unit_conversion

STATION = "station"
STATION_ID = "station_id"
LATITUDE = schema.LAT
LONGITUDE = schema.LON
ELEVATION = "elevation"
#: Columns of a canonical observation table that come before the variables, in this order.
METADATA_COLUMNS = (STATION_ID, LATITUDE, LONGITUDE, ELEVATION, TIME)
#: At most this many flagged values are listed one by one in a :class:`QCReport` (all are counted).
MAX_FLAGGED = 200

_TABLE_SUFFIXES = (".csv", ".parquet", ".pq")
_DATASET_SUFFIXES = (".nc", ".nc4", ".cdf", ".netcdf", ".h5", ".zarr")

# Names found in files for each metadata column, matched case-insensitively, in order of preference.
_METADATA_ALIASES: dict[str, tuple[str, ...]] = {
    STATION_ID: ("station_id", "station", "id", "stationid", "station_code", "site_id", "site"),
    LATITUDE: ("latitude", "lat", "lat_deg", "lats"),
    LONGITUDE: ("longitude", "lon", "lon_deg", "long", "lng", "lons"),
    ELEVATION: ("elevation", "elev", "altitude", "alt", "height", "station_elevation"),
    TIME: ("time", "date", "datetime", "valid_time", "timestamp", "obs_time"),
}
# Any name starting like this is also a station id (e.g. ``StationID_SEQ``), after the exact aliases.
_ID_PREFIX = "stationid"


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
def read_observations(
    path: str | Path, *, options: ConformOptions | None = None, variables: Sequence[str] | None = None
) -> pd.DataFrame:
    """Read station observations from CSV, Parquet or a station netCDF/Zarr dataset as a canonical table.

    Returns the canonical long table (module docstring), every (station, time) of the file kept as a row
    even where all values are missing, so that :func:`quality_control` can count them. ``variables``
    (canonical names or aliases) selects and orders the variable columns; by default all variables found
    are returned in file order. ``options.rename`` maps source columns to canonical names and
    ``options.units`` declares units (keyed by source or canonical name); ``levels`` are not meaningful
    for station data and are refused.

    Raises :class:`SourceError` when the file cannot be read, :class:`SchemaError` when a station id,
    latitude, longitude or time column is missing, when units are unknown or undeclared, when values do
    not parse, or when a requested variable is not in the file.
    """
    path = Path(path)
    source = str(path)
    opts = options or ConformOptions()
    if opts.levels:
        raise SchemaError(f"{source}: levels {dict(opts.levels)} were given, but station observations have no levels")
    if not path.exists():
        raise SourceError(f"observation file {source} does not exist")
    suffix = path.suffix.lower()
    if suffix in _TABLE_SUFFIXES:
        raw, file_units, long_names = _read_table_file(path, source=source), None, {}
    elif suffix in _DATASET_SUFFIXES or path.is_dir():
        ds = _open_station_dataset(path, source=source)
        raw, file_units, long_names = _station_dataset_to_raw_table(ds, source=source, rename=opts.rename)
    else:
        raise SourceError(
            f"{source}: cannot read observations from a {suffix or 'suffix-less'} file; expected one of "
            f"{', '.join(_TABLE_SUFFIXES + _DATASET_SUFFIXES)}"
        )
    if raw.empty:
        raise SourceError(f"{source}: holds no observation rows")
    return _conform_raw_table(
        raw, source=source, options=opts, variables=variables, file_units=file_units, long_names=long_names
    )


def _find_name(names: Sequence[str], role: str, *, source: str) -> str | None:
    """The name among ``names`` that plays metadata ``role``, by preference order; None if there is none."""
    lowered: dict[str, list[str]] = {}
    for name in names:
        lowered.setdefault(name.lower(), []).append(name)
    for alias in _METADATA_ALIASES[role]:
        found = lowered.get(alias, [])
        if len(found) > 1:
            raise SchemaError(f"{source}: several columns could be the {role}: {found}; keep one")
        if found:
            return found[0]
    if role == STATION_ID:
        found = [n for n in names if n.lower().startswith(_ID_PREFIX)]
        if len(found) > 1:
            raise SchemaError(f"{source}: several columns could be the station id: {found}; keep one")
        if found:
            return found[0]
    return None


def _metadata_names(names: Sequence[str], *, source: str, what: str) -> dict[str, str]:
    """Map canonical metadata column -> source name; raise naming the file and ``names`` if one is missing."""
    found = {role: _find_name(names, role, source=source) for role in METADATA_COLUMNS}
    missing = [role for role in (STATION_ID, LATITUDE, LONGITUDE, TIME) if found[role] is None]
    if missing:
        raise SchemaError(
            f"{source}: no {' / '.join(missing)} {what} found (accepted names: "
            f"{'; '.join(', '.join(_METADATA_ALIASES[r]) for r in missing)}); the file has {list(names)}"
        )
    return {role: name for role, name in found.items() if name is not None}


def _read_table_file(path: Path, *, source: str) -> pd.DataFrame:
    """Read a CSV or Parquet table with its metadata columns renamed to canonical names (values untouched)."""
    try:
        if path.suffix.lower() == ".csv":
            header = [str(c) for c in pd.read_csv(path, nrows=0).columns]
            id_column = _find_name(header, STATION_ID, source=source)
            # ids such as "00123" must stay strings
            table = pd.read_csv(path, dtype={id_column: str} if id_column else None)
        else:
            table = pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot read observation table {source}: {exc}") from exc
    table.columns = [str(c) for c in table.columns]
    names = _metadata_names(list(table.columns), source=source, what="column")
    return table.rename(columns={src: role for role, src in names.items()})


def _open_station_dataset(path: Path, *, source: str) -> xr.Dataset:
    """Open a netCDF file or Zarr store and load it into memory (station files are small)."""
    try:
        if path.suffix.lower() == ".zarr" or path.is_dir():
            opened = xr.open_zarr(path, consolidated=False)
        else:
            opened = xr.open_dataset(path)
        with opened:
            return opened.load()
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, IndexError) as exc:
        raise SourceError(f"cannot read station dataset {source}: {type(exc).__name__}: {exc}") from exc


def _station_dataset_to_raw_table(
    ds: xr.Dataset, *, source: str, rename: Mapping[str, str]
) -> tuple[pd.DataFrame, dict[str, str | None], dict[str, str]]:
    """Flatten a station Dataset (station, time) into a raw long table, one row per (station, time).

    Returns the table (canonical metadata columns, source variable names), each variable's ``units``
    attribute (None when absent) and its ``long_name``. Per-station variables named like a station id,
    latitude, longitude or elevation become metadata and every variable on (time, station) a column
    (names are mapped later); a known variable on other dims is an error, anything else is left out.
    """
    time_dim = _find_name([str(d) for d in ds.dims], TIME, source=source)
    if time_dim is None:
        raise SchemaError(f"{source}: no time dim found; the dataset has dims {dict(ds.sizes)}")
    if STATION in ds.dims:
        station_dim = STATION
    else:
        others = {str(d) for v in ds.data_vars.values() if time_dim in v.dims for d in v.dims if d != time_dim}
        if len(others) != 1:
            raise SchemaError(
                f"{source}: cannot tell the station dim: variables on {time_dim!r} also use dims {sorted(others)}; "
                "expected exactly one (e.g. 'station')"
            )
        station_dim = others.pop()
    per_station = [str(n) for n, v in ds.variables.items() if v.dims == (station_dim,) and n != station_dim]
    found = {role: _find_name(per_station, role, source=source) for role in (STATION_ID, LATITUDE, LONGITUDE, ELEVATION)}
    if found[STATION_ID] is None and station_dim in ds.coords:
        found[STATION_ID] = station_dim  # an index coordinate on the station dim is the last resort for ids
    missing = [role for role in (STATION_ID, LATITUDE, LONGITUDE) if found[role] is None]
    if missing:
        raise SchemaError(
            f"{source}: no {' / '.join(missing)} variable on dim {station_dim!r} found; per-station variables "
            f"are {per_station} (accepted names: {'; '.join(', '.join(_METADATA_ALIASES[r]) for r in missing)})"
        )

    kept: list[str] = []
    for name, var in ds.data_vars.items():
        name = str(name)
        if set(var.dims) == {time_dim, station_dim}:
            kept.append(name)
            continue
        target = rename.get(name) or canonical_name(name) or canonical_name(str(var.attrs.get("long_name", "")))
        if target is not None:
            raise SchemaError(
                f"{source}: variable {name!r} ({target}) has dims {var.dims}; station observations must be on "
                f"({time_dim!r}, {station_dim!r})"
            )

    n_station, n_time = ds.sizes[station_dim], ds.sizes[time_dim]
    columns: dict[str, np.ndarray] = {}
    for role, name in found.items():
        if name is not None:
            columns[role] = np.repeat(ds[name].values, n_time)  # station-major: (n_station * n_time,)
    columns[TIME] = np.tile(ds[time_dim].values, n_station)
    for name in kept:
        columns[name] = ds[name].transpose(station_dim, time_dim).values.reshape(-1)  # (n_station * n_time,)
    units = {name: _attr_or_none(ds[name].attrs.get("units")) for name in kept}
    long_names = {name: str(ds[name].attrs.get("long_name", "")) for name in kept}
    return pd.DataFrame(columns), units, long_names


def _attr_or_none(value: object) -> str | None:
    return None if value is None else str(value)


def _conform_raw_table(
    raw: pd.DataFrame,
    *,
    source: str,
    options: ConformOptions,
    variables: Sequence[str] | None,
    file_units: Mapping[str, str | None] | None,
    long_names: Mapping[str, str],
) -> pd.DataFrame:
    """Canonical metadata values, variable names and units for a raw table with canonical metadata names.

    ``file_units`` holds the units attribute of each variable of a Dataset source (None for tables).
    """
    meta_names = set(METADATA_COLUMNS)
    candidates = [c for c in raw.columns if c not in meta_names]
    rename = options.rename
    unknown_targets = [t for t in rename.values() if t not in VARIABLES]
    if unknown_targets:
        raise SchemaError(
            f"{source}: cannot rename to {unknown_targets}: not canonical variable names "
            f"(known: {', '.join(sorted(VARIABLES))})"
        )
    missing_renames = [s for s in rename if s not in candidates]
    if missing_renames:
        raise SchemaError(f"{source}: columns {missing_renames} named in rename are not in the file; it has {candidates}")

    mapping: dict[str, str] = {}
    for col in candidates:
        target = rename.get(col) or canonical_name(col) or canonical_name(long_names.get(col, ""))
        if target is not None:
            mapping[col] = target
    unmapped = [c for c in candidates if c not in mapping]
    targets = list(mapping.values())
    dupes = sorted({t for t in targets if targets.count(t) > 1})
    if dupes:
        clash = {t: [c for c, tt in mapping.items() if tt == t] for t in dupes}
        raise SchemaError(f"{source}: several columns map onto the same variable: {clash}; say which is which with rename")
    reverse = {t: c for c, t in mapping.items()}
    declared: dict[str, str] = {}
    for key, units in options.units.items():
        col = key if key in mapping else reverse.get(canonical_name(key) or key)
        if col is None:
            raise SchemaError(
                f"{source}: units declared for {key!r}, which is not a variable of the file; it has {list(mapping)}"
            )
        declared[col] = units

    out = pd.DataFrame(
        {
            STATION_ID: _station_id_strings(raw[STATION_ID], source=source),
            LATITUDE: _coordinate(raw[LATITUDE], LATITUDE, (-90.0, 90.0), source=source),
            LONGITUDE: _wrap_longitude(_coordinate(raw[LONGITUDE], LONGITUDE, (-180.0, 360.0), source=source)),
            ELEVATION: _numeric(raw[ELEVATION], ELEVATION, source=source) if ELEVATION in raw else np.nan,
            TIME: _parse_times(raw[TIME], source=source),
        }
    )
    for col, target in mapping.items():
        values = _numeric(raw[col], col, source=source)
        if col in declared:
            units, where = declared[col], "declared"
        elif file_units is not None:
            units, where = file_units.get(col), "attribute"
        else:
            units, where = (VARIABLES[target].units if col == target else None), "canonical column name"
        if units is None:
            why = (
                "no units attribute" if file_units is not None
                else "no units: only columns named canonically are taken in canonical units"
            )
            raise SchemaError(
                f"{source}: column {col!r} ({target}) has {why}; declare its units "
                f"(e.g. --units {col}={VARIABLES[target].units})"
            )
        name, converted = _to_canonical_units(
            values, target, str(units), where=where, original=col, source=source,
            station_ids=out[STATION_ID], times=out[TIME],
        )
        if name in out.columns:
            raise SchemaError(f"{source}: column {col!r} becomes {name!r}, which another column already provides")
        out[name] = converted

    available = [c for c in out.columns if c not in meta_names]
    if variables is not None:
        wanted = [canonical_name(v) or v for v in variables]
        absent = [v for v, w in zip(variables, wanted) if w not in available]
        if absent:
            raise SchemaError(
                f"{source}: requested variables {absent} are not in the file; it has {available}"
                + (f" (columns not mapped to a variable: {unmapped})" if unmapped else "")
            )
        available = list(dict.fromkeys(wanted))
    out = out[list(METADATA_COLUMNS) + available]
    return out.sort_values([STATION_ID, TIME], kind="stable").reset_index(drop=True)


def _station_id_strings(values: pd.Series, *, source: str) -> pd.Series:
    """Station ids as strings; integral numbers (``6193.0``) become ``"6193"``, bytes are decoded.

    Works on the distinct ids only (few), then maps them back onto the rows.
    """
    if values.isna().any():
        row = int(np.flatnonzero(values.isna().to_numpy())[0])
        raise SchemaError(f"{source}: station id missing in row {row}")
    codes, uniques = pd.factorize(values.to_numpy())
    if np.issubdtype(np.asarray(uniques).dtype, np.number):
        numbers = np.asarray(uniques)
        if np.issubdtype(numbers.dtype, np.floating) and np.all(np.mod(numbers, 1) == 0):
            numbers = numbers.astype(np.int64)
        names = [str(n) for n in numbers]
    else:
        names = [(u.decode() if isinstance(u, bytes) else str(u)).strip() for u in uniques]
    if "" in names:
        row = int(np.flatnonzero(codes == names.index(""))[0])
        raise SchemaError(f"{source}: empty station id in row {row}")
    return pd.Series(np.asarray(names, dtype=object)[codes], dtype=str)


def _numeric(values: pd.Series, column: str, *, source: str) -> np.ndarray:
    """Column values as floats (float32 kept); raise naming the first value that is not a number."""
    if pd.api.types.is_bool_dtype(values.dtype):
        raise SchemaError(f"{source}: column {column!r} holds booleans, not numbers")
    if pd.api.types.is_numeric_dtype(values.dtype):
        array = values.to_numpy()
        return array if array.dtype in (np.float32, np.float64) else array.astype(np.float64)
    coerced = pd.to_numeric(values, errors="coerce")
    bad = coerced.isna().to_numpy() & values.notna().to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise SchemaError(f"{source}: column {column!r} holds {values.iloc[row]!r} in row {row}, which is not a number")
    return coerced.to_numpy(dtype=np.float64)


def _coordinate(values: pd.Series, column: str, bounds: tuple[float, float], *, source: str) -> np.ndarray:
    array = _numeric(values, column, source=source).astype(np.float64)
    bad = ~np.isfinite(array) | (array < bounds[0] - 1e-9) | (array > bounds[1] + 1e-9)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise SchemaError(
            f"{source}: {column} must be finite and within [{bounds[0]}, {bounds[1]}]; found {array[row]} in row {row}"
        )
    return array


def _wrap_longitude(lon: np.ndarray) -> np.ndarray:
    """Longitudes in [0, 360): -10 -> 350, 360 -> 0."""
    wrapped = np.mod(lon, 360.0)
    return np.where(np.isclose(wrapped, 360.0), 0.0, wrapped)


def _parse_times(values: pd.Series, *, source: str) -> np.ndarray:
    """Times as naive UTC datetime64[ns]; timezone-aware values are converted to UTC."""
    if pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_datetime64_any_dtype(values.dtype):
        raise SchemaError(
            f"{source}: time column holds numbers (first {values.iloc[0]!r}); expected dates and times"
        )
    if pd.api.types.is_datetime64_any_dtype(values.dtype):
        parsed = values
    else:
        parsed = None
        for fmt in (None, "ISO8601"):
            with contextlib.suppress(ValueError, TypeError, OverflowError):
                parsed = pd.to_datetime(values, utc=True, format=fmt)
                break
        if parsed is None:
            coerced = pd.to_datetime(values, utc=True, format="mixed", errors="coerce")
            bad = np.flatnonzero(coerced.isna().to_numpy() & values.notna().to_numpy())
            example = f"{values.iloc[bad[0]]!r} in row {bad[0]}" if len(bad) else f"{values.iloc[0]!r}..."
            raise SchemaError(f"{source}: time column holds values that are not times: {example}")
    if isinstance(parsed.dtype, pd.DatetimeTZDtype):
        parsed = parsed.dt.tz_convert("UTC").dt.tz_localize(None)
    if parsed.isna().any():
        row = int(np.flatnonzero(parsed.isna().to_numpy())[0])
        raise SchemaError(f"{source}: time missing in row {row}")
    try:
        return parsed.to_numpy().astype("datetime64[ns]")
    except (ValueError, OverflowError) as exc:
        raise SchemaError(f"{source}: times outside the datetime64[ns] range: {exc}") from exc


def _to_canonical_units(
    values: np.ndarray,
    variable: str,
    units: str,
    *,
    where: str,
    original: str,
    source: str,
    station_ids: pd.Series,
    times: np.ndarray,
) -> tuple[str, np.ndarray]:
    """Convert one column to canonical units; returns (canonical name, values). Shape (n_rows,).

    Follows ``schema.conform``: a known conversion is ``x * scale + offset``; a precipitation rate is
    multiplied by the time step and named ``total_precipitation_{N}hr`` (``total_precipitation`` for 1 h).
    """
    spec = VARIABLES[variable]
    conv = unit_conversion(variable, units)
    if conv is not None:
        scale, offset = conv
        return variable, values if (scale, offset) == (1.0, 0.0) else (values * scale + offset).astype(values.dtype)
    if spec.kind == "accumulation":
        rate = schema.precipitation_rate_factor(units)
        if rate is None:
            raise SchemaError(
                f"{source}: precipitation column {original!r} has units {units!r} ({where}); expected an "
                "accumulation (m, mm, kg m**-2) or a rate (mm d-1, kg m-2 s-1)"
            )
        step = _table_time_step(station_ids, times, source=source, column=original)
        target = schema.accumulation_name(step, source=source)
        return target, (values * (rate * step.total_seconds())).astype(values.dtype)
    allowed = ", ".join(schema.allowed_units(variable))
    raise SchemaError(
        f"{source}: column {original!r} ({variable}) has units {units!r} ({where}), which are not "
        f"{spec.kind} units (expected one of: {allowed}); declare the real units (e.g. --units {original}={spec.units})"
    )


def _table_time_step(station_ids: pd.Series, times: np.ndarray, *, source: str, column: str) -> pd.Timedelta:
    """The observation interval: the smallest step between successive times of one station.

    Every step of every station must be a multiple of it, else the rate has no single accumulation period.
    """
    frame = pd.DataFrame({STATION_ID: station_ids.to_numpy(), TIME: times}).drop_duplicates()
    frame = frame.sort_values([STATION_ID, TIME])
    diffs = frame.groupby(STATION_ID, sort=False)[TIME].diff().dropna()
    if diffs.empty:
        raise SchemaError(
            f"{source}: precipitation rate {column!r} needs two or more times at a station to become an accumulation"
        )
    step = diffs.min()
    uneven = diffs[(diffs % step) != pd.Timedelta(0)]
    if not uneven.empty:
        row = uneven.index[0]
        raise SchemaError(
            f"{source}: irregular observation times for rate {column!r}: step {step} but station "
            f"{frame.loc[row, STATION_ID]} has a step of {uneven.iloc[0]} ending at {frame.loc[row, TIME]}"
        )
    return step


# ----------------------------------------------------------------------------------------------
# Table <-> Dataset
# ----------------------------------------------------------------------------------------------
def _checked_table(df: pd.DataFrame, *, source: str) -> pd.DataFrame:
    """A canonical copy of ``df`` (column order, dtypes, index reset), or SchemaError naming what is off.

    Checks the required columns, canonical variable names, datetimes, coordinate ranges and that each
    station has one latitude, longitude and elevation.
    """
    missing = [c for c in (STATION_ID, LATITUDE, LONGITUDE, TIME) if c not in df.columns]
    if missing:
        raise SchemaError(f"{source}: observation table lacks columns {missing}; it has {list(map(str, df.columns))}")
    variables = [str(c) for c in df.columns if c not in METADATA_COLUMNS]
    unknown = [v for v in variables if v not in VARIABLES]
    if unknown:
        raise SchemaError(
            f"{source}: columns {unknown} are not canonical variable names (read the file with read_observations "
            "to map aliases)"
        )
    if not pd.api.types.is_datetime64_dtype(df[TIME].dtype):
        raise SchemaError(f"{source}: column 'time' has dtype {df[TIME].dtype}; expected naive datetime64 (UTC)")
    out = pd.DataFrame(
        {
            STATION_ID: _station_id_strings(df[STATION_ID].reset_index(drop=True), source=source),
            LATITUDE: _coordinate(df[LATITUDE], LATITUDE, (-90.0, 90.0), source=source),
            LONGITUDE: _coordinate(df[LONGITUDE], LONGITUDE, (0.0, 360.0), source=source),
            ELEVATION: _numeric(df[ELEVATION], ELEVATION, source=source).astype(np.float64)
            if ELEVATION in df.columns
            else np.nan,
            TIME: df[TIME].to_numpy().astype("datetime64[ns]"),
        }
    )
    if (out[LONGITUDE] >= 360.0).any():
        raise SchemaError(f"{source}: longitude must lie in [0, 360); found {out[LONGITUDE].max()}")
    if out[TIME].isna().any():
        raise SchemaError(f"{source}: time missing in row {int(np.flatnonzero(out[TIME].isna().to_numpy())[0])}")
    for name in variables:
        out[name] = _numeric(df[name], name, source=source)
    _check_station_coordinates(out, source=source)
    return out


def _check_station_coordinates(table: pd.DataFrame, *, source: str) -> None:
    """Raise SchemaError if a station's latitude, longitude or elevation differs between its rows."""
    grouped = table.groupby(STATION_ID, sort=True)
    n_rows = grouped.size()
    for column, tolerance in ((LATITUDE, 1e-6), (LONGITUDE, 1e-6), (ELEVATION, 1e-3)):
        spread = grouped[column].max() - grouped[column].min()
        n_nan = table[column].isna().groupby(table[STATION_ID], sort=True).sum()
        mixed = (n_nan > 0) & (n_nan < n_rows)  # known at some rows of a station, unknown at others
        bad = spread.index[(spread > tolerance).to_numpy() | mixed.to_numpy()]
        if len(bad):
            station = bad[0]
            values = table.loc[table[STATION_ID] == station, column].drop_duplicates().tolist()[:5]
            raise SchemaError(
                f"{source}: station {station!r} has inconsistent {column} between its rows: {values}"
                + (f" ({len(bad)} stations affected)" if len(bad) > 1 else "")
            )


def observations_to_dataset(df: pd.DataFrame) -> xr.Dataset:
    """The canonical Dataset of a canonical table: dims (time, station), NaN where a row is absent.

    Stations are ordered by ``station_id``, times ascending; variable dtypes are kept (float32 or
    float64). Raises :class:`SchemaError` on a non-canonical table or duplicated (station_id, time) rows
    (resolve them with :func:`quality_control` first). Shape of each variable (n_time, n_station).
    """
    source = "<observation table>"
    table = _checked_table(df, source=source)
    keys = table[[STATION_ID, TIME]]
    if keys.duplicated().any():
        dup = table.loc[keys.duplicated(), [STATION_ID, TIME]].iloc[0]
        raise SchemaError(
            f"{source}: duplicated row for station {dup[STATION_ID]!r} at {dup[TIME]}; run quality_control first"
        )
    stations = table.drop_duplicates(STATION_ID).sort_values(STATION_ID)
    station_ids = stations[STATION_ID].to_numpy()
    times = np.unique(table[TIME].to_numpy())
    i_time = np.searchsorted(times, table[TIME].to_numpy())
    i_station = pd.Index(station_ids).get_indexer(table[STATION_ID])  # hashed: string comparisons are slow
    data_vars = {}
    for name in table.columns[len(METADATA_COLUMNS):]:
        values = table[name].to_numpy()
        grid = np.full((len(times), len(station_ids)), np.nan, dtype=values.dtype)  # (time, station)
        grid[i_time, i_station] = values
        data_vars[name] = ((TIME, STATION), grid, {"units": VARIABLES[name].units})
    coords = {
        TIME: (TIME, times),
        STATION_ID: (STATION, np.asarray(station_ids, dtype=object), {"long_name": "station identifier"}),
        LATITUDE: (STATION, stations[LATITUDE].to_numpy(), {"units": "degrees_north", "long_name": "latitude"}),
        LONGITUDE: (STATION, stations[LONGITUDE].to_numpy(), {"units": "degrees_east", "long_name": "longitude"}),
        ELEVATION: (STATION, stations[ELEVATION].to_numpy(), {"units": "m", "long_name": "station elevation"}),
    }
    return xr.Dataset(data_vars, coords=coords)


def dataset_to_observations(ds: xr.Dataset) -> pd.DataFrame:
    """The canonical table of a canonical station Dataset: one row per (station, time), sorted.

    Every cell becomes a row, also where all variables are missing (``quality_control`` drops those).
    ``elevation`` may be absent (NaN). Raises :class:`SchemaError` naming the missing dim or coordinate,
    a variable not on (time, station), a non-canonical name or wrong units.
    """
    source = "<observation dataset>"
    for dim in (TIME, STATION):
        if dim not in ds.dims:
            raise SchemaError(f"{source}: dim {dim!r} missing; the dataset has dims {dict(ds.sizes)}")
    for coord in (STATION_ID, LATITUDE, LONGITUDE):
        if coord not in ds.coords or ds[coord].dims != (STATION,):
            raise SchemaError(
                f"{source}: coordinate {coord!r} on dim 'station' missing; coords are {sorted(map(str, ds.coords))}"
            )
    for name, var in ds.data_vars.items():
        spec = VARIABLES.get(str(name))
        if spec is None:
            raise SchemaError(f"{source}: variable {name!r} is not a canonical variable name")
        if set(var.dims) != {TIME, STATION}:
            raise SchemaError(f"{source}: variable {name!r} has dims {var.dims}; expected ('time', 'station')")
        if var.attrs.get("units") != spec.units:
            raise SchemaError(
                f"{source}: variable {name!r} has units {var.attrs.get('units')!r}; canonical units are {spec.units!r}"
            )
    ids = pd.Index(ds[STATION_ID].values)
    if ids.has_duplicates:
        raise SchemaError(f"{source}: station_id {ids[ids.duplicated()][0]!r} names more than one station")
    n_station, n_time = ds.sizes[STATION], ds.sizes[TIME]
    elevation = ds[ELEVATION].values if ELEVATION in ds.coords else np.full(n_station, np.nan)
    columns: dict[str, object] = {
        STATION_ID: np.repeat(ds[STATION_ID].values, n_time),  # station-major: (n_station * n_time,)
        LATITUDE: np.repeat(ds[LATITUDE].values, n_time),
        LONGITUDE: np.repeat(ds[LONGITUDE].values, n_time),
        ELEVATION: np.repeat(elevation, n_time),
        TIME: np.tile(ds[TIME].values, n_station),
    }
    for name in ds.data_vars:
        columns[str(name)] = ds[name].transpose(STATION, TIME).values.reshape(-1)
    table = _checked_table(pd.DataFrame(columns), source=source)
    return table.sort_values([STATION_ID, TIME], kind="stable").reset_index(drop=True)


# ----------------------------------------------------------------------------------------------
# Quality control
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FlaggedValue:
    """One value QC set to missing: why, and the value(s) found (several for conflicting duplicates)."""

    station_id: str
    time: pd.Timestamp
    variable: str
    reason: str  # "out_of_range" or "conflicting_duplicate"
    values: tuple[float, ...]

    def to_dict(self) -> dict:
        return {
            "station_id": self.station_id,
            "time": self.time.isoformat(),
            "variable": self.variable,
            "reason": self.reason,
            "values": [_json_float(v) for v in self.values],
        }


@dataclass(frozen=True)
class VariableQC:
    """QC counts of one variable. Counts are of values (one per row), except ``n_conflicting``.

    n_values: non-missing values in the input; n_missing: missing values in the input;
    n_out_of_range: values outside ``valid_range`` (inclusive bounds), set missing;
    n_conflicting: (station_id, time) keys whose duplicated rows disagree on this variable, set missing;
    n_valid: non-missing values in the output; n_stations: stations with at least one valid value;
    stations_without_data: stations of the input with none; first_time / last_time: span of valid values.
    """

    name: str
    units: str
    valid_range: tuple[float, float]
    n_values: int
    n_missing: int
    n_out_of_range: int
    n_conflicting: int
    n_valid: int
    n_stations: int
    stations_without_data: tuple[str, ...]
    first_time: pd.Timestamp | None
    last_time: pd.Timestamp | None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "units": self.units,
            "valid_range": [_json_float(b) for b in self.valid_range],
            "n_values": self.n_values,
            "n_missing": self.n_missing,
            "n_out_of_range": self.n_out_of_range,
            "n_conflicting": self.n_conflicting,
            "n_valid": self.n_valid,
            "n_stations": self.n_stations,
            "stations_without_data": list(self.stations_without_data),
            "first_time": None if self.first_time is None else self.first_time.isoformat(),
            "last_time": None if self.last_time is None else self.last_time.isoformat(),
        }


@dataclass(frozen=True)
class QCReport:
    """What :func:`quality_control` found and did, per table and per variable.

    n_rows_in / n_rows_out: rows before and after; n_duplicate_rows_removed: rows merged away because
    another row had the same (station_id, time), of which n_identical_duplicate_rows were exact copies;
    n_empty_rows_dropped: rows left with every variable missing; flagged: the values set missing, listed
    up to ``MAX_FLAGGED`` (``n_flagged`` counts them all).
    """

    source: str
    n_rows_in: int
    n_rows_out: int
    n_stations: int
    first_time: pd.Timestamp | None
    last_time: pd.Timestamp | None
    n_duplicate_rows_removed: int
    n_identical_duplicate_rows: int
    n_empty_rows_dropped: int
    variables: tuple[VariableQC, ...]
    flagged: tuple[FlaggedValue, ...]
    n_flagged: int

    def variable(self, name: str) -> VariableQC:
        """The counts of one variable; KeyError naming those present if it was not checked."""
        for var in self.variables:
            if var.name == name:
                return var
        raise KeyError(f"{name!r} not in the QC report; it has {[v.name for v in self.variables]}")

    def to_dict(self) -> dict:
        """A JSON-serialisable summary (infinite bounds become null, times ISO 8601 strings)."""
        return {
            "source": self.source,
            "n_rows_in": self.n_rows_in,
            "n_rows_out": self.n_rows_out,
            "n_stations": self.n_stations,
            "first_time": None if self.first_time is None else self.first_time.isoformat(),
            "last_time": None if self.last_time is None else self.last_time.isoformat(),
            "n_duplicate_rows_removed": self.n_duplicate_rows_removed,
            "n_identical_duplicate_rows": self.n_identical_duplicate_rows,
            "n_empty_rows_dropped": self.n_empty_rows_dropped,
            "variables": [v.to_dict() for v in self.variables],
            "n_flagged": self.n_flagged,
            "flagged": [f.to_dict() for f in self.flagged],
        }

    def to_markdown(self) -> str:
        """A human-readable report: summary, one table row per variable, flagged values."""
        span = "no data" if self.first_time is None else f"{self.first_time} to {self.last_time}"
        lines = [
            f"# Quality control: {self.source}",
            "",
            f"- rows: {self.n_rows_in} in, {self.n_rows_out} out",
            f"- stations: {self.n_stations}",
            f"- time span: {span}",
            f"- duplicated (station_id, time) rows removed: {self.n_duplicate_rows_removed} "
            f"({self.n_identical_duplicate_rows} identical copies)",
            f"- rows with every variable missing dropped: {self.n_empty_rows_dropped}",
            "",
            "| variable | units | valid range | values | missing | out of range | conflicting | valid out "
            "| stations with data | time span |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for v in self.variables:
            var_span = "-" if v.first_time is None else f"{v.first_time:%Y-%m-%d %H:%M} to {v.last_time:%Y-%m-%d %H:%M}"
            lines.append(
                f"| {v.name} | {v.units} | [{v.valid_range[0]:g}, {v.valid_range[1]:g}] | {v.n_values} | "
                f"{v.n_missing} | {v.n_out_of_range} | {v.n_conflicting} | {v.n_valid} | "
                f"{v.n_stations} | {var_span} |"
            )
        for v in self.variables:
            if v.stations_without_data:
                shown = ", ".join(v.stations_without_data[:50])
                more = f" (+{len(v.stations_without_data) - 50} more)" if len(v.stations_without_data) > 50 else ""
                lines += ["", f"Stations without valid {v.name}: {shown}{more}"]
        if self.flagged:
            listed = f", first {len(self.flagged)} listed" if self.n_flagged > len(self.flagged) else ""
            lines += [
                "",
                f"## Flagged values ({self.n_flagged}{listed})",
                "",
                "| station_id | time | variable | reason | value(s) |",
                "|---|---|---|---|---|",
            ]
            for f in self.flagged:
                values = ", ".join(f"{x:g}" for x in f.values)
                lines.append(f"| {f.station_id} | {f.time} | {f.variable} | {f.reason} | {values} |")
        return "\n".join(lines) + "\n"


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def quality_control(
    df: pd.DataFrame, *, source: str, ranges: Mapping[str, tuple[float, float]] | None = None
) -> tuple[pd.DataFrame, QCReport]:
    """Range-check, de-duplicate and prune a canonical observation table; never mutates ``df``.

    In order: (1) station coordinates must agree between the rows of a station (else SchemaError);
    (2) values outside the valid range (``ranges`` per variable, default ``VariableSpec.valid_range``,
    bounds inclusive; infinities always) are set missing; (3) rows sharing (station_id, time) become
    one row: per variable the common value, missing where the rows give different non-missing values
    (counted as conflicting); identical copies simply collapse; (4) rows with every variable missing are
    dropped. Returns the cleaned canonical table, sorted, and the :class:`QCReport`.
    """
    table = _checked_table(df, source=source)
    variables = [str(c) for c in table.columns[len(METADATA_COLUMNS):]]
    bounds = _ranges(variables, ranges, source=source)
    n_rows_in = len(table)
    flagged: list[FlaggedValue] = []
    n_flagged = 0

    n_values = {v: int(table[v].notna().sum()) for v in variables}
    n_identical = int(table.duplicated([STATION_ID, TIME] + variables).sum())
    n_out: dict[str, int] = {}
    for name in variables:
        lo, hi = bounds[name]
        values = table[name].to_numpy()
        bad = ~np.isnan(values) & (~np.isfinite(values) | (values < lo) | (values > hi))
        n_out[name] = int(bad.sum())
        n_flagged += n_out[name]
        for row in np.flatnonzero(bad)[: max(0, MAX_FLAGGED - len(flagged))]:
            station, when = str(table.at[row, STATION_ID]), pd.Timestamp(table.at[row, TIME])
            flagged.append(FlaggedValue(station, when, name, "out_of_range", (float(values[row]),)))
        if bad.any():
            table[name] = np.where(bad, np.nan, values).astype(values.dtype)

    table, n_conflicting, conflicts = _merge_duplicates(table, variables)
    n_flagged += len(conflicts)
    flagged.extend(conflicts[: max(0, MAX_FLAGGED - len(flagged))])
    n_after_merge = len(table)

    empty = table[variables].isna().all(axis=1).to_numpy() if variables else np.zeros(len(table), dtype=bool)
    all_stations = sorted(table[STATION_ID].unique())
    clean = table.loc[~empty].sort_values([STATION_ID, TIME], kind="stable").reset_index(drop=True)

    per_variable = []
    for name in variables:
        valid = clean.loc[clean[name].notna(), [STATION_ID, TIME]]
        with_data = set(valid[STATION_ID].unique())
        per_variable.append(
            VariableQC(
                name=name,
                units=VARIABLES[name].units,
                valid_range=bounds[name],
                n_values=n_values[name],
                n_missing=n_rows_in - n_values[name],
                n_out_of_range=n_out[name],
                n_conflicting=n_conflicting[name],
                n_valid=len(valid),
                n_stations=len(with_data),
                stations_without_data=tuple(s for s in all_stations if s not in with_data),
                first_time=pd.Timestamp(valid[TIME].min()) if len(valid) else None,
                last_time=pd.Timestamp(valid[TIME].max()) if len(valid) else None,
            )
        )
    report = QCReport(
        source=source,
        n_rows_in=n_rows_in,
        n_rows_out=len(clean),
        n_stations=len(all_stations),
        first_time=pd.Timestamp(clean[TIME].min()) if len(clean) else None,
        last_time=pd.Timestamp(clean[TIME].max()) if len(clean) else None,
        n_duplicate_rows_removed=n_rows_in - n_after_merge,
        n_identical_duplicate_rows=n_identical,
        n_empty_rows_dropped=int(empty.sum()),
        variables=tuple(per_variable),
        flagged=tuple(flagged),
        n_flagged=n_flagged,
    )
    return clean, report


def _ranges(
    variables: Sequence[str], ranges: Mapping[str, tuple[float, float]] | None, *, source: str
) -> dict[str, tuple[float, float]]:
    given = dict(ranges or {})
    unknown = [k for k in given if k not in variables]
    if unknown:
        raise SchemaError(
            f"{source}: ranges given for {unknown}, which are not columns of the table; it has {list(variables)}"
        )
    out = {}
    for name in variables:
        lo, hi = (float(b) for b in given.get(name, VARIABLES[name].valid_range))
        if not lo <= hi:
            raise SchemaError(f"{source}: valid range of {name!r} is reversed or empty: ({lo}, {hi})")
        out[name] = (lo, hi)
    return out


def _merge_duplicates(
    table: pd.DataFrame, variables: Sequence[str]
) -> tuple[pd.DataFrame, dict[str, int], list[FlaggedValue]]:
    """One row per (station_id, time): agreeing values kept, disagreeing non-missing values set missing.

    Returns the merged table, the count of conflicting keys per variable and one flag per conflict.
    """
    keys = [STATION_ID, TIME]
    counts = {name: 0 for name in variables}
    dup = table.duplicated(keys, keep=False).to_numpy()
    if not dup.any():
        return table, counts, []
    groups = table.loc[dup].groupby(keys, sort=True)
    merged = groups[list(METADATA_COLUMNS[1:4]) + list(variables)].first()  # first non-missing per column
    flags: list[FlaggedValue] = []
    for name in variables:
        distinct = groups[name].nunique(dropna=True)
        conflict = distinct > 1
        counts[name] = int(conflict.sum())
        if counts[name]:
            merged.loc[conflict, name] = np.nan
            for (station, time), values in groups[name].unique()[conflict].items():
                found = tuple(float(x) for x in values if not np.isnan(x))
                flags.append(FlaggedValue(str(station), pd.Timestamp(time), name, "conflicting_duplicate", found))
    merged = merged.reset_index()[list(table.columns)]
    for name in variables:
        merged[name] = merged[name].astype(table[name].dtype)
    out = pd.concat([table.loc[~dup], merged], ignore_index=True)
    out[STATION_ID] = out[STATION_ID].astype(str)
    return out, counts, flags


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed onto it on success and removed on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # a unique name created by the writer itself, so the file gets the usual (umask) permissions
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_observations(df: pd.DataFrame, path: Path, *, overwrite: bool = False) -> Path:
    """Write a canonical table as Parquet (``.parquet``/``.pq``) or CSV (``.csv``), atomically.

    Raises :class:`StoreError` naming ``path`` if it exists and ``overwrite`` is False, or for another
    suffix; :class:`SchemaError` if ``df`` is not a canonical table. Returns ``path``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _TABLE_SUFFIXES:
        raise StoreError(
            f"cannot write observations to {path}: suffix {suffix!r} is not one of {', '.join(_TABLE_SUFFIXES)}"
        )
    if path.exists() and not overwrite:
        raise StoreError(f"output {path} already exists; pass overwrite=True (--overwrite) to replace it")
    table = _checked_table(df, source=str(path))
    try:
        with _atomic_path(path) as tmp:
            if suffix == ".csv":
                table.to_csv(tmp, index=False, date_format="%Y-%m-%dT%H:%M:%S")
            else:
                table.to_parquet(tmp, index=False)
    except OSError as exc:
        raise StoreError(f"cannot write observations to {path}: {exc}") from exc
    return path


def write_qc_report(report: QCReport, path: Path) -> Path:
    """Write ``report`` as Markdown at ``path`` and as JSON at ``path.with_suffix('.json')``, atomically.

    A report describes the latest QC run, so existing reports are replaced. Returns ``path``.
    """
    path = Path(path)
    json_path = path.with_suffix(".json")
    if json_path == path:
        raise StoreError(f"QC report path {path} must not end in .json (the JSON copy is written beside it)")
    try:
        with _atomic_path(json_path) as tmp:
            tmp.write_text(json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
        with _atomic_path(path) as tmp:
            tmp.write_text(report.to_markdown(), encoding="utf-8")
    except OSError as exc:
        raise StoreError(f"cannot write QC report {path}: {exc}") from exc
    return path
