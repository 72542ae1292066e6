"""The training store: an analysis-ready Zarr directory, written atomically and appendable in time.

Layout (Zarr format 2 with consolidated metadata, so WeatherBench2 tools, plain ``xr.open_zarr(path)``
and readers over HTTP need no project code):

* every canonical data variable of the input, dims a subset of ``(time, realization, level, latitude,
  longitude)`` in that order; a variable with a ``time`` dim is chunked one time step (and one member)
  per chunk and the whole field otherwise, so a training sample reads exactly the chunks of its steps;
  a static variable (no ``time`` dim, e.g. ``land_sea_mask`` or a ``<var>_mask``) is one chunk;
* compression Blosc(zstd, level 3, byte shuffle); ``time`` is stored as int64 seconds since 1970-01-01;
* root attributes ``format_version`` (:data:`STORE_FORMAT_VERSION`), ``kind`` (``gridded``),
  ``created`` (UTC ISO), ``forecasting_version``, ``source``, ``train_period`` (``[start, end]`` as
  requested, None = open), ``time_step`` (e.g. ``"6h"``), the input's and the user's attributes, and
  ``updated`` after an append;
* the group ``statistics`` (see :mod:`forecasting.data.statistics`) with per-variable mean, std and
  tendency std over the training period, so the store is one self-contained directory.

Writes never leave partial output at the target: :func:`write_store` builds the store in a hidden
sibling directory and renames it into place; :func:`append_store` records the array lengths and
metadata first and shrinks and restores them if anything fails. Data stream through dask chunk by
chunk (dask chunks of about :data:`TARGET_CHUNK_BYTES`, each a whole number of Zarr chunks), so memory
stays flat whatever the length of the dataset: one pass computes the input and writes it, a second
reads the written store back for the statistics (so the input graph of readers and ``conform`` runs
once, and the statistics describe exactly what is stored). With a ``distributed.Client`` (given, or
active) the work runs on that cluster; the store path must then be visible to its workers.

Station observations (dims ``time``, ``station``) are written by :func:`write_observation_store` in the
same format, with ``kind = "observations"`` and no statistics.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import dask
import numcodecs
import numpy as np
import pandas as pd
import xarray as xr
import zarr

import forecasting
from forecasting.data.statistics import STATISTIC, compute_statistics, select_train_period
from forecasting.errors import SchemaError, StoreError
from forecasting.schema import LAT, LEVEL, LON, MEMBER, TIME, check_time_axis, validate

if TYPE_CHECKING:
    import distributed

STORE_FORMAT_VERSION: int = 1
STATISTICS_GROUP = "statistics"
#: Size of the dask chunks that stream through a write or a statistics pass (a whole number of steps).
TARGET_CHUNK_BYTES = 4 * 2**20

STATION = "station"
_ALLOWED_DIMS = (TIME, MEMBER, LEVEL, LAT, LON)
_RESERVED_ATTRS = (
    "format_version", "created", "forecasting_version", "train_period", "time_step", "updated", "kind"
)
_METADATA_FILES = (".zarray", ".zattrs", ".zgroup", ".zmetadata")
_COMPRESSOR = numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.SHUFFLE)
_TIME_ENCODING = {"units": "seconds since 1970-01-01", "calendar": "proleptic_gregorian", "dtype": "int64"}


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def write_store(
    ds: xr.Dataset,
    path: str | Path,
    *,
    overwrite: bool = False,
    train_period: tuple[str | None, str | None] | None = None,
    attrs: Mapping[str, object] | None = None,
    client: distributed.Client | None = None,
) -> Path:
    """Write the conformed, value-checked dataset ``ds`` (lazy or not) as a training store at ``path``.

    ``train_period`` = ``(start, end)`` (inclusive labels, either None = open; None = all times) is the
    period the statistics use. ``attrs`` are added to the store's attributes (``source`` is taken from
    here, else from ``ds.attrs``). Returns ``path``.

    Raises :class:`StoreError` if ``path`` exists and ``overwrite`` is False (before any work), if the
    train period holds no times, or if ``ds`` is not a gridded analysis with a time dim;
    :class:`SchemaError` if ``ds`` breaks the canonical layout. With ``overwrite`` the old store is
    removed only once the new one is complete. Nothing is left at ``path`` (or beside it) on failure.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise StoreError(f"training store {path} already exists; pass overwrite=True to replace it")
    source = f"dataset written to {path}"
    report = validate(ds, source=source)
    _check_layout(ds, source=source)
    assert report is not None  # _check_layout ensured a time dim
    user_attrs = dict(attrs or {})
    reserved = sorted(k for k in user_attrs if k in _RESERVED_ATTRS)
    if reserved:
        raise StoreError(f"attributes {reserved} for {path} are set by the store writer and cannot be given")
    period = _parse_period(train_period, path=path)

    prepared = streaming_chunks(ds.drop_encoding())
    prepared.attrs = {
        **_store_attrs(ds, user_attrs),
        "kind": "gridded",
        "train_period": list(period),
        "time_step": _format_step(report.step),
    }
    encoding = _encoding(prepared)

    select_train_period(ds, period)  # an empty period fails now, before any work

    def fill(tmp: Path) -> None:
        delayed = prepared.to_zarr(
            tmp, mode="w-", zarr_format=2, consolidated=False, encoding=encoding, compute=False
        )
        _compute(delayed, client=client)
        # From the written store rather than the input: the input graph (readers, conform) is not run
        # twice, and the statistics describe exactly what is stored.
        _write_statistics(tmp, period, client=client)

    _write_atomically(path, fill)
    return path


def write_observation_store(ds: xr.Dataset, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write a station dataset (dims ``time`` and ``station``, see ``observations.observations_to_dataset``).

    Same Zarr format, attributes and atomic write as :func:`write_store`, with ``kind = "observations"``
    and no statistics group; chunks hold whole stations and about :data:`TARGET_CHUNK_BYTES` of times.
    Raises :class:`StoreError` if ``path`` exists and ``overwrite`` is False, or the dims are not
    (time, station).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise StoreError(f"observation store {path} already exists; pass overwrite=True to replace it")
    for name, var in ds.data_vars.items():
        if set(var.dims) != {TIME, STATION}:
            raise StoreError(
                f"observation dataset for {path}: variable {name!r} has dims {var.dims}; expected (time, station)"
            )
    prepared = ds.drop_encoding()
    prepared.attrs = {**_store_attrs(ds, {}), "kind": "observations"}
    encoding: dict[str, dict[str, object]] = {TIME: dict(_TIME_ENCODING)}
    for name, var in prepared.data_vars.items():
        rows = max(1, TARGET_CHUNK_BYTES // max(var.dtype.itemsize * var.sizes[STATION], 1))
        chunks = tuple(min(rows, var.sizes[d]) if d == TIME else var.sizes[d] for d in var.dims)
        encoding[str(name)] = {"chunks": chunks, "compressors": (_COMPRESSOR,)}

    def fill(tmp: Path) -> None:
        prepared.to_zarr(tmp, mode="w-", zarr_format=2, consolidated=False, encoding=encoding)

    _write_atomically(path, fill)
    return path


def _store_attrs(ds: xr.Dataset, user_attrs: Mapping[str, object]) -> dict[str, object]:
    """The input's attributes, the user's, and the ones every store carries (version, creation time, source)."""
    return {
        **{k: v for k, v in ds.attrs.items() if k not in _RESERVED_ATTRS},
        **user_attrs,
        "source": str(user_attrs.get("source", ds.attrs.get("source", "unspecified"))),
        "format_version": STORE_FORMAT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "forecasting_version": forecasting.__version__,
    }


def _write_atomically(path: Path, fill: Callable[[Path], None]) -> None:
    """Run ``fill(tmp)`` on a hidden sibling directory, consolidate its metadata and rename it onto ``path``.

    On any exception the temporary directory is removed and the exception re-raised; an old store at
    ``path`` is replaced only once the new one is complete.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    try:
        fill(tmp)
        zarr.consolidate_metadata(str(tmp), zarr_format=2)
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def append_store(ds: xr.Dataset, path: str | Path, *, client: distributed.Client | None = None) -> Path:
    """Append the times of ``ds`` to the store at ``path``; returns ``path``.

    ``ds`` must hold the same time-dependent variables with the same dims, units and grid coordinates
    (exactly) as the store, and times strictly after the last stored time on the store's step (gaps
    are allowed and show in :func:`store_info`). Float data are cast to the stored dtype. Static
    variables may be left out; any given must equal the stored ones. Statistics are recomputed when
    the store's train period includes some of the new times (always when its end is open).

    Raises :class:`StoreError` saying what differs. If anything fails half-way the arrays are shrunk
    back to their old length and all metadata restored, so the store is exactly as before.
    """
    path = Path(path)
    stored = open_store(path)
    source = f"dataset appended to {path}"
    _check_layout(ds, source=source)
    _check_appendable(stored, ds, path=path)
    validate(ds, source=source)

    time_vars = [str(n) for n, v in stored.data_vars.items() if TIME in v.dims]
    new = ds[time_vars].drop_encoding()
    for name in time_vars:
        var = new[name].astype(stored[name].dtype)
        var.attrs = dict(stored[name].attrs)
        new[name] = var
    new = streaming_chunks(new)
    new.attrs = {**stored.attrs, "updated": datetime.now(UTC).isoformat(timespec="seconds")}
    start, end = stored.attrs.get("train_period") or (None, None)
    recompute = ds[TIME].sel({TIME: slice(start, end)}).size > 0

    snapshot = _read_metadata_files(path)
    old_shapes = _time_array_shapes(path)
    stats_backup: Path | None = None
    try:
        _compute(new.to_zarr(path, mode="a", append_dim=TIME, consolidated=False, compute=False), client=client)
        if recompute:
            stats_backup = path.parent / f".{path.name}.statistics-{uuid.uuid4().hex}"
            os.replace(path / STATISTICS_GROUP, stats_backup)
            _write_statistics(path, (start, end), client=client)
        zarr.consolidate_metadata(str(path), zarr_format=2)
    except BaseException:
        _roll_back(path, old_shapes=old_shapes, metadata=snapshot, stats_backup=stats_backup)
        raise
    if stats_backup is not None:
        shutil.rmtree(stats_backup)
    return path


def _check_layout(ds: xr.Dataset, *, source: str) -> None:
    if TIME not in ds.dims:
        raise StoreError(f"{source}: a training store needs a 'time' dim; found dims {dict(ds.sizes)}")
    for name, var in ds.data_vars.items():
        extra = [d for d in var.dims if d not in _ALLOWED_DIMS]
        if extra:
            raise StoreError(
                f"{source}: variable {name!r} has dims {var.dims}; a training store holds analyses with "
                f"dims from {_ALLOWED_DIMS} (found {extra})"
            )
    if not any(TIME in var.dims for var in ds.data_vars.values()):
        raise StoreError(f"{source}: no variable has a 'time' dim; variables {sorted(map(str, ds.data_vars))}")


def _parse_period(
    train_period: tuple[str | None, str | None] | None, *, path: Path
) -> tuple[str | None, str | None]:
    if train_period is None:
        return (None, None)
    if len(train_period) != 2:
        raise StoreError(f"train_period for {path} must be (start, end); found {train_period!r}")
    out: list[str | None] = []
    for bound in train_period:
        if bound is None:
            out.append(None)
            continue
        try:
            pd.Timestamp(bound)
        except ValueError as exc:
            raise StoreError(f"train_period bound {bound!r} for {path} is not a date") from exc
        out.append(str(bound))
    return (out[0], out[1])


def _format_step(step: pd.Timedelta | None) -> str | None:
    """``6h``, ``30min``, ``90s`` (each parseable by ``pd.Timedelta``), or None for a single time."""
    if step is None:
        return None
    seconds = int(step.total_seconds())
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0:
        return f"{seconds // 60}min"
    return f"{seconds}s"


def _steps_per_chunk(ds: xr.Dataset) -> int:
    """Time steps per dask chunk so that the largest variable's chunk is about TARGET_CHUNK_BYTES (at least 1)."""
    step_bytes = max(
        (var.nbytes // max(var.sizes[TIME], 1) for var in ds.data_vars.values() if TIME in var.dims), default=1
    )
    return max(1, TARGET_CHUNK_BYTES // max(step_bytes, 1))


def streaming_chunks(ds: xr.Dataset) -> xr.Dataset:
    """Dask chunks of :func:`_steps_per_chunk` steps along time, whole along every other dim.

    On a Dataset opened without dask (``chunks=None``) each dask task then reads its steps in one Zarr call."""
    steps = _steps_per_chunk(ds)
    return ds.chunk({dim: (min(steps, size) if dim == TIME else -1) for dim, size in ds.sizes.items()})


def _encoding(ds: xr.Dataset) -> dict[str, dict[str, object]]:
    encoding: dict[str, dict[str, object]] = {TIME: dict(_TIME_ENCODING)}
    for name, var in ds.data_vars.items():
        chunks = tuple(1 if (d in (TIME, MEMBER) and TIME in var.dims) else var.sizes[d] for d in var.dims)
        encoding[str(name)] = {"chunks": chunks, "compressors": (_COMPRESSOR,)}
    return encoding


def _compute(*lazy: object, client: distributed.Client | None) -> None:
    if client is not None:
        dask.compute(*lazy, scheduler=client)
    else:
        dask.compute(*lazy)


def _write_statistics(path: Path, period: tuple[str | None, str | None], *, client: distributed.Client | None) -> None:
    """Compute statistics from the (complete) store at ``path`` and write them as its ``statistics`` group."""
    with xr.open_zarr(path, consolidated=False, chunks=None) as probe:
        steps = _steps_per_chunk(probe)
    with xr.open_zarr(path, consolidated=False, chunks={TIME: steps}) as stored:
        stats = compute_statistics(stored, train_period=period, client=client)
    stats.to_zarr(path, group=STATISTICS_GROUP, mode="w", zarr_format=2, consolidated=False)


def _move_into_place(tmp: Path, path: Path) -> None:
    """Rename the finished store ``tmp`` onto ``path``; an old store there is set aside, then deleted."""
    if not path.exists():
        os.replace(tmp, path)
        return
    aside = path.parent / f".{path.name}.old-{uuid.uuid4().hex}"
    os.replace(path, aside)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(aside, path)
        raise
    if aside.is_dir():
        shutil.rmtree(aside)
    else:
        aside.unlink()


# ----------------------------------------------------------------------------------------------
# Appending
# ----------------------------------------------------------------------------------------------
def _check_appendable(stored: xr.Dataset, ds: xr.Dataset, *, path: Path) -> None:
    problems: list[str] = []
    stored_time_vars = {str(n) for n, v in stored.data_vars.items() if TIME in v.dims}
    new_time_vars = {str(n) for n, v in ds.data_vars.items() if TIME in v.dims}
    if stored_time_vars - new_time_vars:
        problems.append(f"variables {sorted(stored_time_vars - new_time_vars)} are missing")
    if new_time_vars - stored_time_vars:
        problems.append(f"variables {sorted(new_time_vars - stored_time_vars)} are not in the store")
    for name in sorted(stored_time_vars & new_time_vars):
        old, new = stored[name], ds[name]
        if old.dims != new.dims:
            problems.append(f"variable {name!r} has dims {new.dims}; the store has {old.dims}")
        if old.attrs.get("units") != new.attrs.get("units"):
            problems.append(
                f"variable {name!r} has units {new.attrs.get('units')!r}; the store has {old.attrs.get('units')!r}"
            )
        if old.dtype != new.dtype and not (
            np.issubdtype(old.dtype, np.floating) and np.issubdtype(new.dtype, np.floating)
        ):
            problems.append(f"variable {name!r} has dtype {new.dtype}; the store has {old.dtype}")
    for name, new in ds.data_vars.items():
        if TIME in new.dims:
            continue
        if name not in stored.data_vars:
            problems.append(f"static variable {name!r} is not in the store")
        elif stored[name].dims != new.dims or not np.array_equal(
            stored[name].values, new.values, equal_nan=np.issubdtype(new.dtype, np.floating)
        ):
            problems.append(f"static variable {name!r} differs from the stored one")
    for dim in (LEVEL, LAT, LON, MEMBER):
        have, given = dim in stored.dims, dim in ds.dims
        if have != given:
            problems.append(f"dim {dim!r} is {'missing' if have else 'not in the store'}")
        elif have and not np.array_equal(stored[dim].values, ds[dim].values):
            problems.append(
                f"{dim} coordinate differs: store has {_preview(stored[dim].values)}, "
                f"dataset has {_preview(ds[dim].values)}"
            )
    old_times, new_times = stored[TIME].values, ds[TIME].values
    if new_times.size == 0:
        problems.append("the dataset holds no times")
    elif new_times[0] <= old_times[-1]:
        problems.append(
            f"new times start at {pd.Timestamp(new_times[0])}, not after the last stored time "
            f"{pd.Timestamp(old_times[-1])}"
        )
    else:
        try:
            combined = check_time_axis(np.concatenate([old_times, new_times]), source=str(path))
        except SchemaError as exc:
            problems.append(str(exc))
        else:
            stored_step = stored.attrs.get("time_step")
            if stored_step is not None and combined.step != pd.Timedelta(stored_step):
                problems.append(f"new times have step {combined.step}; the store's step is {stored_step}")
    if problems:
        raise StoreError(f"cannot append to {path}: " + "; ".join(problems))


def _preview(values: np.ndarray) -> str:
    shown = ", ".join(f"{v:g}" if np.issubdtype(values.dtype, np.number) else str(v) for v in values[:4])
    return f"[{shown}{', ...' if values.size > 4 else ''}] ({values.size} values)"


def _metadata_paths(path: Path) -> Iterator[Path]:
    for root, _, files in os.walk(path):
        for name in files:
            if name in _METADATA_FILES:
                yield Path(root) / name


def _read_metadata_files(path: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in _metadata_paths(path)}


def _time_array_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    group = zarr.open_group(str(path), mode="r", use_consolidated=False, zarr_format=2)
    return {
        name: array.shape
        for name, array in group.arrays()
        if TIME in array.attrs.get("_ARRAY_DIMENSIONS", ())
    }


def _roll_back(
    path: Path, *, old_shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[Path, bytes], stats_backup: Path | None
) -> None:
    """Shrink the time arrays to their old length (deleting the new chunks) and restore every metadata file."""
    group = zarr.open_group(str(path), mode="r+", use_consolidated=False, zarr_format=2)
    for name, shape in old_shapes.items():
        array = group[name]
        assert isinstance(array, zarr.Array)
        if array.shape != shape:
            array.resize(shape)
    if stats_backup is not None and stats_backup.exists():
        shutil.rmtree(path / STATISTICS_GROUP, ignore_errors=True)
        os.replace(stats_backup, path / STATISTICS_GROUP)
    for extra in set(_metadata_paths(path)) - set(metadata):
        extra.unlink()
    for file, content in metadata.items():
        file.write_bytes(content)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
def _location(path_or_url: str | Path) -> str:
    text = str(path_or_url)
    return text if "://" in text else str(Path(text))


def open_store(path_or_url: str | Path, *, use_dask: bool = True) -> xr.Dataset:
    """Open a training store lazily. Local path or URL (``http://``, ``s3://`` ... through fsspec).

    With ``use_dask`` (default) the variables are dask arrays whose chunks hold whole Zarr chunks, about
    :data:`TARGET_CHUNK_BYTES` of time steps each (one step of a large grid, thousands of a small one): each
    dask task reads its Zarr chunks in one call, so a pass over a small store is not thousands of
    millisecond tasks. With ``use_dask=False`` they are lazily indexed arrays without dask (the torch dataset
    uses this: a sample then reads only its chunks, with no task overhead).

    Raises :class:`StoreError` if there is no store, it is not a training store (no
    ``format_version``), or it was written by a newer format version.
    """
    location = _location(path_or_url)
    if "://" not in location and not Path(location).exists():
        raise StoreError(f"no training store at {location}")
    try:
        ds = xr.open_zarr(location, consolidated=True, chunks=None)
    except (OSError, KeyError, ValueError, zarr.errors.BaseZarrError) as exc:
        raise StoreError(f"cannot open training store {location}: {exc}") from exc
    if use_dask:
        ds = streaming_chunks(ds)
    version = ds.attrs.get("format_version")
    if version is None:
        raise StoreError(f"{location} is a Zarr store but not a training store (no 'format_version' attribute)")
    if int(version) > STORE_FORMAT_VERSION:
        raise StoreError(
            f"training store {location} has format_version {version}; this version of forecasting "
            f"({forecasting.__version__}) reads up to {STORE_FORMAT_VERSION}"
        )
    return ds


def read_statistics(path_or_url: str | Path) -> xr.Dataset:
    """The store's ``statistics`` group, loaded: each variable has dims ``(statistic, [level])``."""
    location = _location(path_or_url)
    open_store(location)
    try:
        with xr.open_zarr(location, group=STATISTICS_GROUP, consolidated=True) as stats:
            return stats.load()
    except (OSError, KeyError, ValueError, zarr.errors.BaseZarrError) as exc:
        raise StoreError(f"training store {location} has no readable '{STATISTICS_GROUP}' group: {exc}") from exc


def store_info(path: str | Path) -> dict[str, object]:
    """A JSON-ready summary for ``forecast stats``.

    Keys: ``path``, ``kind`` (``gridded`` or ``observations``), ``format_version``, ``dims`` (name ->
    size), ``variables`` (name -> dims, shape, chunks, dtype, units), ``time`` (start, end, count, step,
    gaps as [last before, first after] pairs; step ``"irregular"`` for an irregular station axis),
    ``attrs``, ``statistics_attrs`` and ``statistics``: one row per channel, ``{"variable", "level"
    (None without a level dim), "mean", "std", "tendency_std"}`` (empty for an observation store).
    """
    location = _location(path)
    ds = open_store(location)
    variables = {}
    for name, var in ds.data_vars.items():
        variables[str(name)] = {
            "dims": list(map(str, var.dims)),
            "shape": list(var.shape),
            "chunks": list(var.encoding.get("chunks", var.shape)),
            "dtype": str(var.dtype),
            "units": var.attrs.get("units"),
        }
    kind = str(ds.attrs.get("kind", "gridded"))
    info: dict[str, object] = {
        "path": location,
        "kind": kind,
        "format_version": int(ds.attrs["format_version"]),
        "dims": {str(d): int(n) for d, n in ds.sizes.items()},
        "variables": variables,
        "time": _time_summary(ds[TIME].values, source=location),
        "attrs": _plain(dict(ds.attrs)),
        "statistics_attrs": {},
        "statistics": [],
    }
    if kind != "observations":
        stats = read_statistics(location)
        info["statistics_attrs"] = _plain(dict(stats.attrs))
        info["statistics"] = _statistics_rows(stats)
    return info


def _time_summary(times: np.ndarray, *, source: str) -> dict[str, object]:
    summary: dict[str, object] = {"start": None, "end": None, "count": int(times.size), "step": None, "gaps": []}
    if times.size == 0:
        return summary
    summary["start"] = pd.Timestamp(times[0]).isoformat()
    summary["end"] = pd.Timestamp(times[-1]).isoformat()
    try:
        report = check_time_axis(times, source=source)
    except SchemaError:
        summary["step"] = "irregular"
        return summary
    summary["step"] = _format_step(report.step)
    summary["gaps"] = [[a.isoformat(), b.isoformat()] for a, b in report.gaps]
    return summary


def _statistics_rows(stats: xr.Dataset) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for name, var in stats.data_vars.items():
        levels = var[LEVEL].values.tolist() if LEVEL in var.dims else [None]
        for level in levels:
            sel = var.sel({LEVEL: level}) if level is not None else var
            row: dict[str, object] = {"variable": str(name), "level": level}
            row.update({str(s): float(sel.sel({STATISTIC: s}).values) for s in stats[STATISTIC].values})
            rows.append(row)
    return rows


def _plain(attrs: dict[str, object]) -> dict[str, object]:
    """Attributes with numpy scalars and arrays turned into Python values (for JSON)."""
    out: dict[str, object] = {}
    for key, value in attrs.items():
        if isinstance(value, np.ndarray):
            out[key] = value.tolist()
        elif isinstance(value, np.generic):
            out[key] = value.item()
        else:
            out[key] = value
    return out


def store_train_period(store: str | Path) -> tuple[str, str] | None:
    """The training period recorded in a store's attributes, or None when it has none (or is unreadable)."""
    try:
        attrs = xr.open_zarr(store, consolidated=None).attrs
    except (FileNotFoundError, ValueError, KeyError, OSError):
        return None
    period = attrs.get("train_period")
    if isinstance(period, str):
        try:
            period = json.loads(period)
        except json.JSONDecodeError:
            return None
    if isinstance(period, list | tuple) and len(period) == 2 and all(period):
        return (str(period[0]), str(period[1]))
    return None


__all__ = [
    "STORE_FORMAT_VERSION",
    "TARGET_CHUNK_BYTES",
    "append_store",
    "open_store",
    "read_statistics",
    "store_info",
    "store_train_period",
    "write_observation_store",
    "write_store",
]

