"""Gridded data sources: netCDF, GRIB and Zarr (local or through fsspec), and named catalog entries.

Every source returns an ``xarray.Dataset`` that is

* lazy: dask-backed, nothing but coordinates and metadata is read on ``open()``;
* conformed with :func:`forecasting.schema.conform` (dims ``time``, optional ``realization`` and
  ``level`` (hPa, ascending), ``latitude`` (ascending), ``longitude`` in [0, 360) ascending; WeatherBench2
  long variable names in canonical units);
* subset by a :class:`Selection` (variables, levels, time range, area) by xarray selection on the lazy
  arrays, so only the selected bytes are ever read (for Zarr, only the chunks holding them).

A source may span several files (a glob or a list, e.g. one file per month) and ``open_sources`` may
join several sources. Both go through one combination rule: the same variable in several files is
concatenated along ``time`` (files sorted by their first time; overlapping or duplicated times are an
error naming both files), different variables are merged, and all files must share exactly the same
latitude, longitude and level values (else a :class:`SourceError` saying which files differ and how).

Conform options given for several files at once (``--rename t=2m_temperature`` for a set of files of
which only one holds ``t``) apply to the files holding the variables they name; an option naming a
variable found in no file at all is an error.
"""

from __future__ import annotations

import glob as globlib
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, ClassVar, Protocol, TypeVar, runtime_checkable

import cfgrib
import eccodes
import fsspec
import numpy as np
import pandas as pd
import xarray as xr
from fsspec.registry import known_implementations

from forecasting.data.catalog import Catalog, load_catalog
from forecasting.errors import SourceError
from forecasting.schema import LAT, LEVEL, LON, TIME, ConformOptions, canonical_name, conform, subset

NETCDF_SUFFIXES = (".nc", ".nc4", ".cdf", ".netcdf")
GRIB_SUFFIXES = (".grib", ".grb", ".grib2", ".grb2")
_ZARR_NAME_RE = re.compile(r"\.zarr(-v\d+)?$", re.IGNORECASE)  # store.zarr, ARCO's ...chunk-1.zarr-v3
_ZARR_MARKERS = ("zarr.json", ".zgroup", ".zarray")
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_GLOB_CHARS = re.compile(r"[*?\[]")
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# pip package for protocols whose fsspec class lives in fsspec itself but needs another package
_PROTOCOL_PACKAGES = {"http": "aiohttp", "https": "aiohttp"}


# ----------------------------------------------------------------------------------------------
# Selection and the Source protocol
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Selection:
    """What to read from a source; ``None`` means everything along that axis.

    variables: canonical names (``2m_temperature``, ``geopotential``).
    levels: pressure levels in hPa.
    time: inclusive ``(start, end)`` ISO strings; either may be None (open-ended).
    area: ``(lat_min, lat_max, lon_min, lon_max)`` in degrees; ``lon_min > lon_max`` wraps across 0E.
    """

    variables: tuple[str, ...] | None = None
    levels: tuple[float, ...] | None = None
    time: tuple[str | None, str | None] | None = None
    area: tuple[float, float, float, float] | None = None

    def __post_init__(self) -> None:
        # Accept lists from configs and the CLI, keep the frozen object hashable.
        if self.variables is not None:
            object.__setattr__(self, "variables", tuple(self.variables))
        if self.levels is not None:
            object.__setattr__(self, "levels", tuple(float(lv) for lv in self.levels))
        if self.time is not None:
            if len(self.time) != 2:
                raise SourceError(f"selection time must be (start, end); found {self.time!r}")
            object.__setattr__(self, "time", tuple(self.time))
        if self.area is not None:
            if len(self.area) != 4:
                raise SourceError(f"selection area must be (lat_min, lat_max, lon_min, lon_max); found {self.area!r}")
            object.__setattr__(self, "area", tuple(float(a) for a in self.area))


@runtime_checkable
class Source(Protocol):
    """A gridded data source: ``open()`` returns a conformed, lazily subset ``xarray.Dataset``."""

    kind: ClassVar[str]
    location: str

    def open(self, selection: Selection | None = None) -> xr.Dataset: ...


SOURCE_TYPES: dict[str, type[Source]] = {}

_S = TypeVar("_S", bound=type)


def register_source(cls: _S) -> _S:
    """Class decorator: add ``cls`` to :data:`SOURCE_TYPES` under ``cls.kind``."""
    kind = getattr(cls, "kind", None)
    if not isinstance(kind, str) or not kind:
        raise TypeError(f"{cls.__qualname__} needs a non-empty class attribute 'kind' to be registered")
    existing = SOURCE_TYPES.get(kind)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"source kind {kind!r} is already registered by {existing.__qualname__}")
    SOURCE_TYPES[kind] = cls
    return cls


# ----------------------------------------------------------------------------------------------
# Parts: what one file (or store) gives before files are combined
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SourcePart:
    """One conformed, lazy piece of a source (a file, a store, a GRIB file), named for messages."""

    name: str
    dataset: xr.Dataset


@dataclass(frozen=True)
class OpenedParts:
    """The parts of a source plus what its conform options matched.

    unused_options: ``(field, key)`` pairs of ``options`` (field ``rename``, ``units`` or ``levels``) that
        named no variable in any file of the source.
    available: canonical names of the gridded variables the files hold (for messages).
    """

    parts: tuple[SourcePart, ...]
    options: ConformOptions
    unused_options: frozenset[tuple[str, str]]
    available: tuple[str, ...]


class BaseSource(ABC):
    """A source made of parts; ``open()`` combines and subsets them (see the module docstring)."""

    kind: ClassVar[str]
    location: str
    options: ConformOptions

    @abstractmethod
    def open_parts(self, selection: Selection | None = None) -> OpenedParts:
        """Open, preselect (variables) and conform every part; nothing is combined or subset yet."""

    def open(self, selection: Selection | None = None) -> xr.Dataset:
        """The conformed dataset, lazily subset by ``selection``."""
        return _finish([self.open_parts(selection)], selection, source=self.location)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"


# ----------------------------------------------------------------------------------------------
# Preselection and per-part conform options
# ----------------------------------------------------------------------------------------------
def _target_name(raw: xr.Dataset, name: str, rename: Mapping[str, str]) -> str:
    """The name ``conform`` will give the raw variable ``name`` (same rule as schema's renaming)."""
    return (
        rename.get(name)
        or canonical_name(name)
        or canonical_name(str(raw[name].attrs.get("long_name", "")))
        or name
    )


def _may_become(target: str, wanted: Iterable[str]) -> bool:
    """Whether a variable conformed to ``target`` can be one of ``wanted``.

    A precipitation rate conforms to ``total_precipitation`` and then becomes
    ``total_precipitation_{N}hr`` once the time step is known.
    """
    wanted = set(wanted)
    if target in wanted:
        return True
    return target == "total_precipitation" and any(w.startswith("total_precipitation_") for w in wanted)


def _conform_part(
    raw: xr.Dataset, *, name: str, options: ConformOptions, selection: Selection
) -> tuple[SourcePart | None, set[tuple[str, str]], set[str]]:
    """Preselect the requested variables (and time range) of one raw dataset, then conform it (lazily).

    Gridded raw variables (2 dims or more) that cannot become a requested variable are dropped before
    ``conform`` sees them; small 0-1 dim variables (a reference-time string, station metadata) are kept
    for ``conform`` to interpret. The conform options are restricted to the variables kept. The caller
    still applies the full selection to the conformed result.

    Returns the part (None if the file holds none of the requested variables), the option keys that
    named a variable of this file, and the canonical names of the file's gridded variables.
    """
    variables = selection.variables
    targets = {str(n): _target_name(raw, str(n), options.rename) for n in raw.data_vars}
    available = {t for n, t in targets.items() if raw[n].ndim >= 2}
    if variables is not None:
        drop = [n for n, t in targets.items() if raw[n].ndim >= 2 and not _may_become(t, variables)]
        kept = raw.drop_vars(drop)
        if not any(_may_become(targets[str(n)], variables) for n in kept.data_vars):
            return None, _matched_option_keys(targets, options), available
    else:
        kept = raw
    kept_targets = {n: t for n, t in targets.items() if n in kept.data_vars}
    part_options = replace(
        options,
        rename={k: v for k, v in options.rename.items() if k in kept_targets},
        units={k: v for k, v in options.units.items() if _names_variable(k, kept_targets)},
        levels={k: v for k, v in options.levels.items() if _names_variable(k, kept_targets)},
    )
    conformed = conform(_as_dask(_narrow_time(kept, selection.time)), source=name, options=part_options)
    return SourcePart(name, conformed), _matched_option_keys(targets, options), available


def _narrow_time(raw: xr.Dataset, time: tuple[str | None, str | None] | None) -> xr.Dataset:
    """Select the time range on the raw, not yet dask-backed dataset when its time axis is plainly the
    valid time: an increasing datetime ``time`` dim and no GRIB ``step`` / ``valid_time``.

    Only an optimisation (the conformed result is subset again): dask graphs are then built for the
    selected steps only, which matters for stores with one chunk per hour over decades.
    """
    if time is None or TIME not in raw.dims or "step" in raw.variables or "valid_time" in raw.variables:
        return raw
    index = raw.indexes.get(TIME)
    if not isinstance(index, pd.DatetimeIndex) or not index.is_monotonic_increasing:
        return raw
    return raw.sel({TIME: slice(time[0], time[1])})


def _as_dask(ds: xr.Dataset) -> xr.Dataset:
    """Wrap each lazily indexed data variable in dask, chunked as its file stores it (one block if unknown).

    Readers open with ``chunks=None`` and only the variables kept after preselection become dask arrays:
    building dask graphs for every variable of a large store (ARCO-ERA5: ~270 variables x ~750k hourly
    chunks) costs far more than reading its metadata.
    """
    out = ds.copy()
    for name, var in ds.data_vars.items():
        preferred = var.encoding.get("preferred_chunks") or {}
        out[name] = var.chunk({dim: size for dim, size in preferred.items() if dim in var.dims})
    return out


def _names_variable(key: str, targets: Mapping[str, str]) -> bool:
    """An option key may give a raw name or the canonical name of a variable."""
    return key in targets or key in targets.values() or (canonical_name(key) or key) in targets.values()


def _matched_option_keys(targets: Mapping[str, str], options: ConformOptions) -> set[tuple[str, str]]:
    matched = {("rename", k) for k in options.rename if k in targets}
    matched |= {("units", k) for k in options.units if _names_variable(k, targets)}
    matched |= {("levels", k) for k in options.levels if _names_variable(k, targets)}
    return matched


def _option_keys(options: ConformOptions) -> set[tuple[str, str]]:
    return (
        {("rename", k) for k in options.rename}
        | {("units", k) for k in options.units}
        | {("levels", k) for k in options.levels}
    )


# ----------------------------------------------------------------------------------------------
# Combining parts
# ----------------------------------------------------------------------------------------------
def _describe_axis(values: np.ndarray) -> str:
    if values.size == 0:
        return "0 points"
    text = f"{values.size} points, first {np.round(values[:3], 6).tolist()}"
    if values.size > 1:
        steps = np.unique(np.round(np.diff(values.astype(float)), 6))
        text += f", spacing {steps[0]}" if steps.size == 1 else f", spacings {steps[:3].tolist()}"
    return text


def _check_grids(parts: Sequence[SourcePart]) -> None:
    """Latitude, longitude and level values must be exactly equal in every part that has them."""
    for dim in (LAT, LON, LEVEL):
        reference: SourcePart | None = None
        for part in parts:
            if dim not in part.dataset.dims:
                continue
            if reference is None:
                reference = part
                continue
            ref, new = reference.dataset[dim].values, part.dataset[dim].values
            if ref.shape != new.shape or not np.array_equal(ref, new):
                raise SourceError(
                    f"cannot combine {reference.name} and {part.name}: their {dim} values differ "
                    f"({reference.name}: {_describe_axis(ref)}; {part.name}: {_describe_axis(new)}); "
                    "regrid them onto one grid first"
                )


def _concat_over_time(name: str, pieces: list[tuple[SourcePart, xr.Dataset]]) -> xr.Dataset:
    """Concatenate one variable's pieces along time, sorted by first time; overlaps are an error."""
    nonempty = [p for p in pieces if p[1].sizes[TIME] > 0]
    if not nonempty:  # every file lies outside the selected time range: the final subset says so
        return pieces[0][1]
    pieces = sorted(nonempty, key=lambda p: p[1][TIME].values[0])
    for (a_part, a), (b_part, b) in zip(pieces, pieces[1:]):
        a_end, b_start = a[TIME].values[-1], b[TIME].values[0]
        if b_start <= a_end:
            overlap = np.intersect1d(a[TIME].values, b[TIME].values)
            if overlap.size:
                shown = f"{pd.Timestamp(overlap[0])} .. {pd.Timestamp(overlap[-1])} ({overlap.size} times)"
            else:
                shown = f"{pd.Timestamp(b_start)} .. {pd.Timestamp(a_end)} (interleaved)"
            raise SourceError(
                f"times of {name!r} overlap between {a_part.name} and {b_part.name}: {shown}; "
                "each time must come from exactly one file"
            )
    if len(pieces) == 1:
        return pieces[0][1]
    return xr.concat(
        [p[1] for p in pieces],
        dim=TIME,
        data_vars="minimal",
        coords="minimal",
        compat="override",
        join="exact",
        combine_attrs="override",
    )


def combine_parts(parts: Sequence[SourcePart]) -> xr.Dataset:
    """Join conformed parts into one lazy dataset (see the module docstring for the rule).

    Static variables (no time dim) found in several parts are taken from the first. Variables that
    vary in time must end up on one common time axis, else :class:`SourceError` names the variables.
    """
    if not parts:
        raise SourceError("nothing to combine: no parts")
    if len(parts) == 1:
        return parts[0].dataset
    _check_grids(parts)
    by_variable: dict[str, list[tuple[SourcePart, xr.Dataset]]] = {}
    static: dict[str, xr.Dataset] = {}
    for part in parts:
        for name, var in part.dataset.data_vars.items():
            single = part.dataset[[name]]
            if TIME in var.dims:
                by_variable.setdefault(str(name), []).append((part, single))
            else:
                static.setdefault(str(name), single)
    combined = {name: _concat_over_time(name, pieces) for name, pieces in by_variable.items()}
    times = {name: ds[TIME].values for name, ds in combined.items()}
    if times:
        first_name, first_times = next(iter(times.items()))
        for name, values in times.items():
            if values.shape != first_times.shape or not np.array_equal(values, first_times):

                def files(variable: str) -> str:
                    return ", ".join(p.name for p, _ in by_variable[variable])

                raise SourceError(
                    f"variables {first_name!r} (from {files(first_name)}) and {name!r} (from {files(name)}) "
                    f"cover different times: {_describe_times(first_times)} vs {_describe_times(values)}; "
                    "select a common time range or add the missing files"
                )
    datasets = list(combined.values()) + list(static.values())
    return xr.merge(datasets, join="exact", compat="override", combine_attrs="override")


def _describe_times(values: np.ndarray) -> str:
    if values.size == 0:
        return "no times"
    return f"{values.size} times {pd.Timestamp(values[0])} .. {pd.Timestamp(values[-1])}"


def _finish(opened: Sequence[OpenedParts], selection: Selection | None, *, source: str) -> xr.Dataset:
    """Check option usage across sources, combine all parts and subset the result."""
    _check_unused_options(opened, source=source)
    parts = [part for o in opened for part in o.parts]
    if not parts:
        wanted = list(selection.variables) if selection and selection.variables else []
        held = sorted({name for o in opened for name in o.available})
        raise SourceError(f"{source}: none of the requested variables {wanted} is there; the data hold {held}")
    sel = selection or Selection()
    if sel.time is not None:  # before combining, so files are compared on the selected times only
        parts = [
            SourcePart(p.name, p.dataset.sel({TIME: slice(*sel.time)})) if TIME in p.dataset.dims else p
            for p in parts
        ]
    ds = combine_parts(parts)
    return subset(ds, variables=sel.variables, levels=sel.levels, time=sel.time, area=sel.area, source=source)


def _check_unused_options(opened: Sequence[OpenedParts], *, source: str) -> None:
    keys = set().union(*(_option_keys(o.options) for o in opened))
    unused = [
        key
        for key in sorted(keys)
        if all(key in o.unused_options for o in opened if key in _option_keys(o.options))
    ]
    if unused:
        shown = ", ".join(f"{fld} {k!r}" for fld, k in unused)
        held = sorted({name for o in opened for name in o.available})
        raise SourceError(
            f"{source}: conform options name variables that are in no file: {shown}; the files hold {held}"
        )


# ----------------------------------------------------------------------------------------------
# Paths, URLs and filesystems
# ----------------------------------------------------------------------------------------------
def is_url(spec: str) -> bool:
    """True for ``scheme://...`` strings."""
    return bool(_URL_RE.match(spec))


def _protocol(url: str) -> str:
    return url.split("://", 1)[0].lower()


def _require_protocol(url: str) -> None:
    """Raise :class:`SourceError` naming the package to install when fsspec cannot read ``url``'s protocol."""
    protocol = _protocol(url)
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError:
        impl = known_implementations.get(protocol, {})
        package = _PROTOCOL_PACKAGES.get(protocol) or str(impl.get("class", protocol)).split(".")[0]
        raise SourceError(
            f"{url}: reading {protocol}:// URLs needs the package {package!r}, which is not installed "
            f"(pip install {package})"
        ) from None
    except ValueError:
        raise SourceError(f"{url}: unknown protocol {protocol!r} (fsspec has no filesystem for it)") from None


def _local_path(spec: str | os.PathLike[str]) -> str | None:
    """The local path of a plain path or a ``file://`` URL; None for other URLs."""
    text = os.fspath(spec)
    if text.lower().startswith("file://"):
        return text[len("file://"):]
    if is_url(text):
        return None
    return str(Path(text).expanduser())


def _expand(specs: Sequence[str | os.PathLike[str]]) -> tuple[str, ...]:
    """Expand local globs and check local paths exist; URLs are kept (their protocol checked)."""
    out: list[str] = []
    for spec in specs:
        local = _local_path(spec)
        if local is None:
            _require_protocol(os.fspath(spec))
            out.append(os.fspath(spec))
        elif _GLOB_CHARS.search(local):
            matches = sorted(globlib.glob(local))
            if not matches:
                raise SourceError(f"no files match the glob {os.fspath(spec)!r}")
            out.extend(matches)
        elif not Path(local).exists():
            raise SourceError(f"no such file or directory: {os.fspath(spec)}")
        else:
            out.append(local)
    return tuple(out)


def _first_bytes(path: str, n: int = 8) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror or exc}") from None


# ----------------------------------------------------------------------------------------------
# netCDF-3 header: the size a file must have
# ----------------------------------------------------------------------------------------------
_NC_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 4, 6: 8, 7: 1, 8: 2, 9: 4, 10: 8, 11: 8}
_NC_DIMENSION, _NC_VARIABLE, _NC_ATTRIBUTE = 0x0A, 0x0B, 0x0C


def netcdf3_required_bytes(f: BinaryIO) -> int | None:
    """Bytes a netCDF-3 file (classic, 64-bit offset or CDF-5) must hold according to its header.

    The netCDF-C library reads a truncated classic file without complaint and returns fill values for
    the missing part; comparing this number with the file size catches that. Returns None for a file
    written in streaming mode (record count unknown). Raises ValueError for a malformed header.
    Follows the netCDF classic format specification (header, dim/att/var lists, vsize and begin).
    """
    magic = f.read(4)
    if len(magic) < 4 or magic[:3] != b"CDF" or magic[3] not in (1, 2, 5):
        raise ValueError(f"not a netCDF-3 header (starts with {magic!r})")
    version = magic[3]
    count_size = 8 if version == 5 else 4

    def read_uint(size: int) -> int:
        data = f.read(size)
        if len(data) < size:
            raise ValueError("header ends before it is complete")
        return int.from_bytes(data, "big")

    def count() -> int:
        return read_uint(count_size)

    def skip_name() -> None:
        n = count()
        f.seek((n + 3) // 4 * 4, 1)

    def skip_attributes() -> None:
        tag, n = read_uint(4), count()
        if tag not in (0, _NC_ATTRIBUTE):
            raise ValueError(f"bad attribute list tag {tag:#x}")
        for _ in range(n):
            skip_name()
            nc_type, nelems = read_uint(4), count()
            if nc_type not in _NC_TYPE_SIZES:
                raise ValueError(f"unknown attribute type {nc_type}")
            f.seek((nelems * _NC_TYPE_SIZES[nc_type] + 3) // 4 * 4, 1)

    numrecs = count()
    streaming = numrecs == (1 << (8 * count_size)) - 1
    tag, n_dims = read_uint(4), count()
    if tag not in (0, _NC_DIMENSION):
        raise ValueError(f"bad dimension list tag {tag:#x}")
    dims = []
    for _ in range(n_dims):
        skip_name()
        dims.append(count())
    skip_attributes()
    tag, n_vars = read_uint(4), count()
    if tag not in (0, _NC_VARIABLE):
        raise ValueError(f"bad variable list tag {tag:#x}")
    variables = []
    for _ in range(n_vars):
        skip_name()
        dimids = [count() for _ in range(count())]
        skip_attributes()
        nc_type, vsize, begin = read_uint(4), count(), read_uint(4 if version == 1 else 8)
        if nc_type not in _NC_TYPE_SIZES or any(d >= len(dims) for d in dimids):
            raise ValueError("bad variable description")
        is_record = bool(dimids) and dims[dimids[0]] == 0
        fixed = [dims[d] for d in (dimids[1:] if is_record else dimids)]
        variables.append((is_record, int(np.prod(fixed, dtype=np.int64)) * _NC_TYPE_SIZES[nc_type], vsize, begin))
    record_size = sum(vsize for is_record, _, vsize, _ in variables if is_record)
    required = f.tell()
    for is_record, nbytes, _, begin in variables:
        if is_record:
            if streaming:
                return None
            if numrecs:
                required = max(required, begin + (numrecs - 1) * record_size + nbytes)
        else:
            required = max(required, begin + nbytes)
    return required


# ----------------------------------------------------------------------------------------------
# File sources
# ----------------------------------------------------------------------------------------------
class FileSource(BaseSource):
    """A source read from one or more files or stores (paths, globs or URLs), one part per file.

    paths: a path, glob or URL, or a sequence of them; local globs are expanded (sorted) and local paths
        must exist when the source is created.
    options: conform options for these files.
    storage_options: fsspec options for URLs (``{"token": "anon"}`` for public gs:// buckets).
    """

    def __init__(
        self,
        paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        options: ConformOptions | None = None,
        storage_options: Mapping[str, object] | None = None,
    ) -> None:
        specs = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not specs:
            raise SourceError(f"{type(self).__name__}: no paths given")
        self.location = ", ".join(os.fspath(s) for s in specs)
        self.paths = _expand(specs)
        self.options = options or ConformOptions()
        self.storage_options = dict(storage_options or {})

    @abstractmethod
    def _open_raw(self, path: str) -> list[tuple[str, xr.Dataset]]:
        """Open one path lazily as read (no conform); several datasets when a file holds several parts."""

    def _conform_path(
        self, path: str, selection: Selection
    ) -> tuple[list[SourcePart], set[tuple[str, str]], set[str]]:
        """Conformed parts of one path, the option keys its variables matched, its gridded variables."""
        return self._conform_named(self._open_raw(path), selection)

    def _conform_named(
        self, named: Sequence[tuple[str, xr.Dataset]], selection: Selection
    ) -> tuple[list[SourcePart], set[tuple[str, str]], set[str]]:
        parts: list[SourcePart] = []
        matched: set[tuple[str, str]] = set()
        available: set[str] = set()
        for name, raw in named:
            part, used, held = _conform_part(raw, name=name, options=self.options, selection=selection)
            matched |= used
            available |= held
            if part is not None:
                parts.append(part)
        return parts, matched, available

    def open_parts(self, selection: Selection | None = None) -> OpenedParts:
        selection = selection or Selection()
        parts: list[SourcePart] = []
        matched: set[tuple[str, str]] = set()
        available: set[str] = set()
        for path in self.paths:
            new, used, held = self._conform_path(path, selection)
            parts.extend(new)
            matched |= used
            available |= held
        return OpenedParts(
            parts=tuple(parts),
            options=self.options,
            unused_options=frozenset(_option_keys(self.options) - matched),
            available=tuple(sorted(available)),
        )


@register_source
class NetCDFSource(FileSource):
    """netCDF-3 and netCDF-4 files, local or by URL, one or many (glob or list) combined over time.

    Returns dims ``time``, optional ``level``, ``latitude``, ``longitude`` (plus whatever else the files
    carry, e.g. ``realization``), dask-backed with the files' own chunking. netCDF-3 files are read with
    the netCDF4 engine after checking from the header that the file is complete; netCDF-4 (HDF5) files
    with h5netcdf, whose errors say why a file is unreadable (e.g. ``truncated file: eof = ...``).
    By URL, netCDF-4 files are read by byte ranges through fsspec; netCDF-3 files (scipy engine) are
    read whole, as the format has no chunks to select.
    """

    kind = "netcdf"

    def _open_raw(self, path: str) -> list[tuple[str, xr.Dataset]]:
        if is_url(path):
            return [(path, self._open_url(path))]
        magic = _first_bytes(path)
        if magic[:3] == b"CDF":
            with open(path, "rb") as f:
                try:
                    required = netcdf3_required_bytes(f)
                except ValueError as exc:
                    raise SourceError(f"cannot read netCDF file {path}: {exc}") from None
            size = os.path.getsize(path)
            if required is not None and size < required:
                raise SourceError(
                    f"netCDF file {path} is truncated: its header describes {required} bytes but the file holds {size}"
                )
            engine = "netcdf4"
        elif magic == _HDF5_SIGNATURE:
            engine = "h5netcdf"
        else:
            raise SourceError(
                f"{path} is not a netCDF file: it starts with {magic!r} (netCDF-3 starts with b'CDF', "
                "netCDF-4 with the HDF5 signature b'\\x89HDF')"
            )
        try:
            return [(path, xr.open_dataset(path, engine=engine, chunks=None))]
        except (OSError, ValueError, RuntimeError, KeyError, IndexError) as exc:
            raise SourceError(f"cannot open netCDF file {path}: {exc}") from None

    def _open_url(self, url: str) -> xr.Dataset:
        try:
            handle = fsspec.open(url, mode="rb", **self.storage_options).open()
            magic = handle.read(8)
            handle.seek(0)
        except (OSError, ValueError) as exc:
            raise SourceError(f"cannot read {url}: {exc}") from None
        if magic[:3] == b"CDF":
            try:
                required = netcdf3_required_bytes(handle)
            except ValueError as exc:
                raise SourceError(f"cannot read netCDF file {url}: {exc}") from None
            handle.seek(0)
            size = handle.size
            if required is not None and size is not None and size < required:
                raise SourceError(
                    f"netCDF file {url} is truncated: its header describes {required} bytes but it holds {size}"
                )
            engine = "scipy"
        elif magic == _HDF5_SIGNATURE:
            engine = "h5netcdf"
        else:
            raise SourceError(f"{url} is not a netCDF file: it starts with {magic!r}")
        try:
            return xr.open_dataset(handle, engine=engine, chunks=None)
        except (OSError, ValueError, RuntimeError, KeyError, IndexError) as exc:
            raise SourceError(f"cannot open netCDF file {url}: {exc}") from None


@register_source
class GribSource(FileSource):
    """GRIB 1/2 files read by cfgrib/ecCodes, local only, one or many combined over time.

    No index files are written beside the inputs (``indexpath=""``). A file holding several GRIB
    hypercubes (e.g. surface and pressure-level fields) is opened cube by cube with
    ``cfgrib.open_datasets`` and the cubes are combined when they share the grid and time axis; otherwise
    :class:`SourceError` lists the cubes and the ``filter_by_keys`` that opens each one. Returns dims
    ``time``, optional ``prediction_timedelta`` / ``realization`` / ``level``, ``latitude``, ``longitude``.
    """

    kind = "grib"

    def __init__(
        self,
        paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        options: ConformOptions | None = None,
        storage_options: Mapping[str, object] | None = None,
        filter_by_keys: Mapping[str, str | int | float] | None = None,
    ) -> None:
        super().__init__(paths, options=options, storage_options=storage_options)
        remote = [p for p in self.paths if is_url(p)]
        if remote:
            raise SourceError(
                f"GRIB is read by ecCodes from local files only; copy {remote[0]} to a local disk first "
                "(e.g. fsspec.get or gsutil cp)"
            )
        self.filter_by_keys = dict(filter_by_keys or {})

    def _backend_kwargs(self) -> dict[str, object]:
        kwargs: dict[str, object] = {"indexpath": ""}
        if self.filter_by_keys:
            kwargs["filter_by_keys"] = dict(self.filter_by_keys)
        return kwargs

    def _open_raw(self, path: str) -> list[tuple[str, xr.Dataset]]:
        """The file as one dataset, or its hypercubes each named with the keys that tell them apart."""
        if os.path.getsize(path) == 0:
            raise SourceError(f"GRIB file {path} is empty")
        try:
            # errors="raise": by default cfgrib logs and silently drops variables that do not fit one cube
            strict = {**self._backend_kwargs(), "errors": "raise"}
            return [(path, xr.open_dataset(path, engine="cfgrib", chunks=None, backend_kwargs=strict))]
        except cfgrib.DatasetBuildError:
            pass  # several hypercubes: opened one by one below
        except _GRIB_ERRORS as exc:
            raise SourceError(f"cannot open GRIB file {path}: {type(exc).__name__}: {exc}") from None
        try:
            cubes = cfgrib.open_datasets(path, backend_kwargs=self._backend_kwargs())
        except _GRIB_ERRORS as exc:
            raise SourceError(f"cannot open GRIB file {path}: {type(exc).__name__}: {exc}") from None
        return [(_cube_name(path, keys), cube) for keys, cube in zip(_distinguishing_keys(cubes), cubes)]

    def _conform_path(
        self, path: str, selection: Selection
    ) -> tuple[list[SourcePart], set[tuple[str, str]], set[str]]:
        """One part per file: the hypercubes of a file are combined here, or the error says how to pick one."""
        parts, matched, available = super()._conform_path(path, selection)
        if len(parts) <= 1:
            return parts, matched, available
        names = [set(map(str, p.dataset.data_vars)) for p in parts]
        clashes = sorted({v for i, a in enumerate(names) for b in names[i + 1:] for v in a & b})
        try:
            if clashes:
                raise SourceError(f"variables {clashes} appear in several hypercubes")
            combined = combine_parts(parts)
        except SourceError as exc:
            # conform keeps the GRIB_* attributes, so the cubes' keys can be read off the parts
            keys = _distinguishing_keys([p.dataset for p in parts])
            choices = "; ".join(f"{k!r} holds {sorted(map(str, p.dataset.data_vars))}" for k, p in zip(keys, parts))
            raise SourceError(
                f"GRIB file {path} holds {len(parts)} hypercubes that cannot be combined: {exc}. Open one at a "
                f"time with filter_by_keys (catalog entry key, or GribSource(filter_by_keys=...)): {choices}"
            ) from None
        return [SourcePart(path, combined)], matched, available


# what ecCodes and cfgrib raise for unreadable files (a truncated file: PrematureEndOfFileError)
_GRIB_ERRORS = (OSError, ValueError, RuntimeError, KeyError, EOFError, eccodes.GribInternalError)


def _cube_name(path: str, keys: Mapping[str, object]) -> str:
    return f"{path} [{', '.join(f'{k}={v}' for k, v in keys.items())}]"


def _cube_keys(cube: xr.Dataset) -> dict[str, object]:
    attrs = next(iter(cube.data_vars.values())).attrs if cube.data_vars else {}
    keys = ("typeOfLevel", "stepType", "dataType", "gridType", "numberOfPoints")
    return {k: attrs[f"GRIB_{k}"] for k in keys if f"GRIB_{k}" in attrs}


def _distinguishing_keys(cubes: Sequence[xr.Dataset]) -> list[dict[str, object]]:
    """For each cube, the GRIB keys whose values differ between cubes (what filter_by_keys needs)."""
    all_keys = [_cube_keys(c) for c in cubes]
    differing = [k for k in all_keys[0] if len({repr(ks.get(k)) for ks in all_keys}) > 1] if all_keys else []
    out = []
    for cube, ks in zip(cubes, all_keys):
        chosen = {k: ks[k] for k in differing if k in ks}
        if not chosen:
            chosen = {"shortName": str(next(iter(cube.data_vars.values())).attrs.get("GRIB_shortName", "?"))}
        out.append(chosen)
    return out


@register_source
class ZarrSource(FileSource):
    """Zarr stores (format 2 or 3), local or at any fsspec URL (gs://, s3://, http(s)://, memory://).

    Consolidated metadata is used when the store has it (checked first, so no fallback warning); data
    are dask arrays with the store's own chunks, so a selection reads only the chunks it touches.
    Returns the store's dims after conform: ``time``, optional ``level``, ``latitude``, ``longitude``.
    """

    kind = "zarr"

    def _open_raw(self, path: str) -> list[tuple[str, xr.Dataset]]:
        url = path if is_url(path) else str(Path(path).resolve())
        try:
            fs, root = fsspec.core.url_to_fs(url, **self.storage_options)
            consolidated = _zarr_consolidated(fs, root)
            if consolidated is None:
                raise SourceError(f"{path} is not a Zarr store: it has none of {', '.join(_ZARR_MARKERS)}")
            ds = xr.open_zarr(
                url,
                consolidated=consolidated,
                chunks=None,
                storage_options=(self.storage_options or None) if is_url(path) else None,
            )
        except SourceError:
            raise
        except Exception as exc:  # backends raise anything from aiohttp, zarr or the filesystem
            raise SourceError(f"cannot open Zarr store {path}: {type(exc).__name__}: {exc}") from None
        return [(path, ds)]


def _read_if_present(fs: fsspec.AbstractFileSystem, path: str) -> bytes | None:
    """The file's bytes, or None when it does not exist; other failures (no connection...) propagate."""
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None


def _zarr_consolidated(fs: fsspec.AbstractFileSystem, root: str) -> bool | None:
    """Whether the store at ``root`` has consolidated metadata; None when it is no Zarr store at all.

    Zarr 3: ``zarr.json`` (consolidated when it holds ``consolidated_metadata``); Zarr 2: ``.zgroup`` or
    ``.zarray``, consolidated when ``.zmetadata`` exists. Deciding here avoids xarray's fallback warning.
    """
    v3 = _read_if_present(fs, f"{root}/zarr.json")
    if v3 is not None:
        try:
            meta = json.loads(v3)
        except ValueError as exc:
            raise SourceError(f"cannot parse the Zarr metadata {root}/zarr.json: {exc}") from None
        return isinstance(meta, dict) and meta.get("consolidated_metadata") is not None
    if _read_if_present(fs, f"{root}/.zgroup") is None and _read_if_present(fs, f"{root}/.zarray") is None:
        return None
    return bool(fs.exists(f"{root}/.zmetadata"))


# ----------------------------------------------------------------------------------------------
# Catalog entries
# ----------------------------------------------------------------------------------------------
def _overlay_options(base: ConformOptions, top: ConformOptions | None) -> ConformOptions:
    """``top`` over ``base``: mapping keys of ``top`` win; its reference_time / nan_policy win when set."""
    if top is None:
        return base
    return ConformOptions(
        rename={**base.rename, **top.rename},
        units={**base.units, **top.units},
        levels={**base.levels, **top.levels},
        reference_time=top.reference_time or base.reference_time,
        nan_policy=top.nan_policy if top.nan_policy != "error" else base.nan_policy,
    )


@register_source
class CatalogSource(BaseSource):
    """A named entry of the data catalog, opened by the reader its ``kind`` names.

    The entry's conform options are the base and ``options`` given here are laid over them; the entry's
    ``variables`` / ``levels`` are read when the selection names none. ``options`` holds the effective
    conform options (its ``nan_policy`` is the one to use with ``schema.check_values``).
    """

    kind = "catalog"

    def __init__(self, name: str, *, catalog: Catalog | None = None, options: ConformOptions | None = None) -> None:
        self.catalog = catalog if catalog is not None else load_catalog()
        self.name = name
        self.entry = self.catalog.entry(name)
        self.location = name
        base = self.entry.conform.to_options() if self.entry.conform else ConformOptions()
        self.options = _overlay_options(base, options)
        reader = SOURCE_TYPES[self.entry.kind]
        url = self.catalog.resolve_url(self.entry.url)
        if reader is GribSource:
            self.source: FileSource = GribSource(
                url, options=self.options, storage_options=self.entry.storage_options,
                filter_by_keys=self.entry.filter_by_keys,
            )
        else:
            assert issubclass(reader, FileSource), f"catalog kind {self.entry.kind!r} must be a file source"
            self.source = reader(url, options=self.options, storage_options=self.entry.storage_options)

    def open_parts(self, selection: Selection | None = None) -> OpenedParts:
        sel = selection or Selection()
        variables = sel.variables if sel.variables is not None else self.entry.variables
        opened = self.source.open_parts(replace(sel, variables=variables))
        levels = self.entry.levels if sel.levels is None else None
        if levels is None:
            return opened
        parts = tuple(
            SourcePart(p.name, subset(p.dataset, levels=levels, source=f"{self.name} ({p.name})"))
            if LEVEL in p.dataset.dims
            else p
            for p in opened.parts
        )
        return replace(opened, parts=parts)


# ----------------------------------------------------------------------------------------------
# Resolving specs and opening several sources
# ----------------------------------------------------------------------------------------------
def _kind_of_local(path: Path) -> str:
    if path.is_dir():
        if _ZARR_NAME_RE.search(path.name) or any((path / m).exists() for m in _ZARR_MARKERS):
            return "zarr"
        raise SourceError(f"directory {path} is not a Zarr store (it has none of {', '.join(_ZARR_MARKERS)})")
    suffix = path.suffix.lower()
    if suffix in NETCDF_SUFFIXES:
        return "netcdf"
    if suffix in GRIB_SUFFIXES:
        return "grib"
    magic = _first_bytes(str(path))
    if magic[:3] == b"CDF" or magic == _HDF5_SIGNATURE:
        return "netcdf"
    if magic[:4] == b"GRIB":
        return "grib"
    raise SourceError(
        f"cannot tell what kind of data {path} holds: its suffix {suffix!r} is none of "
        f"{', '.join(NETCDF_SUFFIXES + GRIB_SUFFIXES)}, .zarr and its first bytes {magic!r} are neither netCDF nor GRIB"
    )


def _kind_of_url(url: str, storage_options: Mapping[str, object]) -> str:
    name = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    lower = name.lower()
    if lower.endswith(NETCDF_SUFFIXES):
        return "netcdf"
    if lower.endswith(GRIB_SUFFIXES):
        return "grib"
    if _ZARR_NAME_RE.search(lower):
        return "zarr"
    _require_protocol(url)
    try:
        fs, root = fsspec.core.url_to_fs(url, **storage_options)
        is_zarr = any(fs.exists(f"{root}/{m}") for m in _ZARR_MARKERS)
    except Exception as exc:  # any filesystem error while probing
        raise SourceError(f"cannot reach {url}: {type(exc).__name__}: {exc}") from None
    if is_zarr:
        return "zarr"
    raise SourceError(
        f"cannot tell what kind of data {url} holds: it ends in none of {', '.join(NETCDF_SUFFIXES + GRIB_SUFFIXES)}, "
        ".zarr and is not a Zarr store"
    )


def _is_catalog_name(text: str) -> bool:
    """A bare word: no URL, no existing path, no glob, no path separator and no data-file suffix."""
    local = _local_path(text)
    if local is None or _GLOB_CHARS.search(local) or "/" in text or os.sep in text:
        return False
    path = Path(local)
    return not path.exists() and path.suffix.lower() not in NETCDF_SUFFIXES + GRIB_SUFFIXES + (".zarr",)


def resolve_source(
    spec: str | os.PathLike[str], *, options: ConformOptions | None = None, catalog: Catalog | None = None
) -> Source:
    """The source for ``spec``: a local path, a glob, a URL, or a catalog name.

    The kind comes from the suffix (``.nc .nc4 .cdf .netcdf`` -> netcdf, ``.grib .grb .grib2 .grb2`` ->
    grib, ``.zarr`` -> zarr), from a directory holding ``zarr.json`` / ``.zgroup``, or from the first
    bytes of a file. A bare word that is no existing path is looked up in ``catalog`` (default: the
    project catalog). Raises :class:`SourceError` for a missing file, a glob matching nothing, an unknown
    catalog name (listing the known ones) or a URL whose protocol package is not installed.
    """
    text = os.fspath(spec)
    local = _local_path(text)
    if local is None:
        _require_protocol(text)
        return SOURCE_TYPES[_kind_of_url(text, {})](text, options=options)
    path = Path(local)
    if path.exists():
        return SOURCE_TYPES[_kind_of_local(path)](text, options=options)
    if _GLOB_CHARS.search(local):
        matches = sorted(globlib.glob(local))
        if not matches:
            raise SourceError(f"no files match the glob {text!r}")
        kinds = {_kind_of_local(Path(m)) for m in matches}
        if len(kinds) > 1:
            raise SourceError(
                f"the glob {text!r} matches files of several kinds {sorted(kinds)}; use one glob per kind"
            )
        return SOURCE_TYPES[kinds.pop()](text, options=options)
    if not _is_catalog_name(text):
        raise SourceError(f"no such file or directory: {text}")
    cat = catalog if catalog is not None else load_catalog()
    if text not in cat.sources:
        raise SourceError(
            f"{text!r} is no existing file, directory, glob or URL, and no entry of the data catalog "
            f"{cat.path or ''}; known catalog names: {', '.join(cat.names()) or '(none)'}"
        )
    return CatalogSource(text, catalog=cat, options=options)


def open_sources(
    specs: Sequence[str | os.PathLike[str]],
    *,
    selection: Selection | None = None,
    options: ConformOptions | None = None,
    catalog: Catalog | None = None,
) -> xr.Dataset:
    """Open several sources and combine them into one conformed, lazily subset dataset.

    The same variable in several sources is concatenated along time (sorted by first time; overlapping
    times are an error naming both files); different variables are merged; latitude, longitude and level
    values must match exactly (else :class:`SourceError` naming the files and how they differ). A source
    holding none of the selected variables is skipped.
    """
    if not specs:
        raise SourceError("no sources given")
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    names = ", ".join(os.fspath(s) for s in specs)
    cat = catalog
    if cat is None and any(_is_catalog_name(os.fspath(s)) for s in specs):
        cat = load_catalog()  # once for all names
    opened: list[OpenedParts] = []
    for spec in specs:
        source = resolve_source(spec, options=options, catalog=cat)
        if isinstance(source, BaseSource):
            opened.append(source.open_parts(selection))
        else:  # a Source that is not made of parts: take what it gives as one part
            ds = source.open(None)
            opened.append(
                OpenedParts(
                    parts=(SourcePart(source.location, ds),),
                    options=ConformOptions(),
                    unused_options=frozenset(),
                    available=tuple(map(str, ds.data_vars)),
                )
            )
    return _finish(opened, selection, source=names)


__all__ = [
    "GRIB_SUFFIXES",
    "NETCDF_SUFFIXES",
    "SOURCE_TYPES",
    "BaseSource",
    "CatalogSource",
    "FileSource",
    "GribSource",
    "NetCDFSource",
    "OpenedParts",
    "Selection",
    "Source",
    "SourcePart",
    "ZarrSource",
    "combine_parts",
    "is_url",
    "netcdf3_required_bytes",
    "open_sources",
    "register_source",
    "resolve_source",
]
