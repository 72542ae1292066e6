"""Ingestion: sources in, analysis-ready Zarr out (``forecast ingest``).

Gridded sources go through ``sources.open_sources`` (conform + lazy subset), ``schema.check_values``
(NaNs and declared masks), then ``store.write_store`` / ``store.append_store`` (atomic, one time step per
chunk, statistics over the training period). Station tables (CSV, Parquet, station netCDF/Zarr) go
through ``observations.read_observations`` and ``observations.quality_control`` and are written as a
(station, time) Zarr store with a QC report beside it (``STORE.qc.md`` and ``STORE.qc.json``).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from forecasting.data import store as store_mod
from forecasting.data.sources import Selection, open_sources
from forecasting.errors import SourceError, StoreError
from forecasting.schema import ConformOptions, TimeAxisReport, ValueReport, check_values, validate

_TABLE_SUFFIXES = {".csv", ".parquet", ".pq"}
_DATASET_SUFFIXES = {".nc", ".nc4", ".cdf", ".netcdf", ".zarr", ".h5"}


@dataclass(frozen=True)
class IngestReport:
    """What one ingestion did: output, kind, variables, time axis, masks/dropped steps, size and speed."""

    out: Path
    kind: str  # "gridded" or "observations"
    variables: tuple[str, ...]
    n_times: int
    time_axis: TimeAxisReport | None
    values: ValueReport | None
    nbytes: int
    seconds: float
    appended: bool = False
    qc_report: Path | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        mb = self.nbytes / 1e6
        lines = [
            f"wrote {self.kind} store {self.out} ({'appended' if self.appended else 'new'})",
            f"  variables: {', '.join(self.variables)}",
            f"  times: {self.n_times}" + (f" ({self.time_axis.describe()})" if self.time_axis else ""),
            f"  data: {mb:.1f} MB in {self.seconds:.1f} s ({mb / max(self.seconds, 1e-9):.1f} MB/s)",
        ]
        if self.values is not None:
            if self.values.dropped_times:
                lines.append(f"  dropped all-missing time steps: {[str(t) for t in self.values.dropped_times]}")
            if self.values.masked_points:
                lines.append(f"  static masks (points masked): {dict(self.values.masked_points)}")
        if self.qc_report is not None:
            lines.append(f"  QC report: {self.qc_report}")
        lines.extend(f"  {note}" for note in self.notes)
        return "\n".join(lines)


def is_observation_source(spec: str) -> bool:
    """True for station tables: CSV/Parquet files, or datasets with a ``station`` dim and no lat/lon grid."""
    path = Path(spec)
    suffix = path.suffix.lower()
    if suffix in _TABLE_SUFFIXES:
        return True
    if suffix not in _DATASET_SUFFIXES or not path.exists():
        return False
    try:
        if suffix == ".zarr":
            ds = xr.open_zarr(path, decode_times=False)
        else:
            ds = xr.open_dataset(path, decode_times=False)
    except Exception:  # unreadable files are reported by the reader that is chosen next
        return False
    with ds:
        dims = set(map(str, ds.dims))
    return "station" in dims and not ({"latitude", "lat"} & dims)


@contextlib.contextmanager
def _dask_client(address: str | None) -> Iterator[object | None]:
    if address is None:
        yield None
        return
    from distributed import Client

    try:
        client = Client(address, timeout="20s")
    except OSError as exc:
        raise SourceError(f"cannot reach the Dask scheduler at {address}: {exc}") from None
    try:
        yield client
    finally:
        client.close()


def ingest(
    sources: Sequence[str],
    out: Path,
    *,
    selection: Selection | None = None,
    options: ConformOptions | None = None,
    overwrite: bool = False,
    append: bool = False,
    train_period: tuple[str | None, str | None] | None = None,
    dask_address: str | None = None,
    progress: bool = False,
) -> IngestReport:
    """Ingest ``sources`` into the store ``out``; see the module docstring. Nothing partial is left on failure."""
    if not sources:
        raise SourceError("no sources given")
    if append and overwrite:
        raise StoreError("--append and --overwrite exclude each other")
    if out.exists() and not (overwrite or append):
        raise StoreError(f"output {out} already exists; pass --overwrite to replace it or --append to extend it")
    if append and not out.exists():
        raise StoreError(f"cannot append: store {out} does not exist")
    options = options or ConformOptions()
    kinds = {is_observation_source(s) for s in sources}
    if len(kinds) > 1:
        raise SourceError(f"cannot ingest station tables and gridded data into one store: {list(sources)}")
    start = time.perf_counter()
    if kinds.pop():
        return _ingest_observations(sources, out, selection=selection, options=options, overwrite=overwrite,
                                    append=append, started=start)
    with _dask_client(dask_address) as client:
        ds = open_sources(sources, selection=selection, options=options)
        ds, values = check_values(ds, source=", ".join(sources), nan_policy=options.nan_policy)
        time_axis = validate(ds, source=", ".join(sources))
        attrs = {"source": ", ".join(str(s) for s in sources), "conform_options": _options_json(options)}
        if append:
            store_mod.append_store(ds, out, client=client)
        else:
            store_mod.write_store(ds, out, overwrite=overwrite, train_period=train_period, attrs=attrs, client=client)
    return IngestReport(
        out=out,
        kind="gridded",
        variables=tuple(str(v) for v in ds.data_vars),
        n_times=int(ds.sizes.get("time", 0)),
        time_axis=time_axis,
        values=values,
        nbytes=int(ds.nbytes),
        seconds=time.perf_counter() - start,
        appended=append,
    )


def _options_json(options: ConformOptions) -> str:
    return json.dumps(
        {
            "rename": dict(options.rename),
            "units": dict(options.units),
            "levels": dict(options.levels),
            "reference_time": options.reference_time,
            "nan_policy": options.nan_policy,
        }
    )


def _ingest_observations(
    sources: Sequence[str],
    out: Path,
    *,
    selection: Selection | None,
    options: ConformOptions,
    overwrite: bool,
    append: bool,
    started: float,
) -> IngestReport:
    from forecasting.data.observations import (
        observations_to_dataset,
        quality_control,
        read_observations,
        write_qc_report,
    )

    if append:
        raise StoreError("appending to an observation store is not supported; ingest all station files together")
    variables = list(selection.variables) if selection and selection.variables else None
    frames = [read_observations(s, options=options, variables=variables) for s in sources]
    table = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    if selection is not None and selection.time is not None:
        lo, hi = selection.time
        mask = np.ones(len(table), dtype=bool)
        if lo is not None:
            mask &= table["time"] >= pd.Timestamp(lo)
        if hi is not None:
            mask &= table["time"] <= pd.Timestamp(hi)
        table = table[mask]
    if selection is not None and selection.area is not None:
        lat_min, lat_max, lon_min, lon_max = selection.area
        lon = table["longitude"] % 360.0
        in_lon = (lon >= lon_min % 360) & (lon <= lon_max % 360) if lon_min % 360 <= lon_max % 360 else (
            (lon >= lon_min % 360) | (lon <= lon_max % 360))
        table = table[(table["latitude"] >= lat_min) & (table["latitude"] <= lat_max) & in_lon]
    if table.empty:
        raise SourceError(f"no observations left in {list(sources)} after selection {selection}")
    clean, qc = quality_control(table, source=", ".join(sources))
    ds = observations_to_dataset(clean)
    ds.attrs.update({"source": ", ".join(str(s) for s in sources), "kind": "observations",
                     "qc_summary": json.dumps(qc.to_dict(), default=str)[:100_000]})
    store_mod.write_observation_store(ds, out, overwrite=overwrite)
    report_path = write_qc_report(qc, out.with_name(out.name + ".qc.md"))
    variables_out = tuple(str(v) for v in ds.data_vars)
    return IngestReport(
        out=out,
        kind="observations",
        variables=variables_out,
        n_times=int(ds.sizes.get("time", 0)),
        time_axis=None,
        values=None,
        nbytes=int(ds.nbytes),
        seconds=time.perf_counter() - started,
        qc_report=report_path,
        notes=(f"stations: {ds.sizes.get('station', 0)}",),
    )


def describe_store(path: str | Path, *, as_json: bool = False) -> str:
    """Human-readable (or JSON) summary of a store: variables, time axis, chunks and statistics."""
    info = store_mod.store_info(path)
    if as_json:
        return json.dumps(info, indent=2, default=str)
    lines = [f"store {path}", f"  kind: {info.get('kind')}, format version {info.get('format_version')}",
             f"  dims: {info.get('dims')}"]
    for name, var in info.get("variables", {}).items():
        lines.append(f"  {name}: {tuple(var.get('dims', ()))} {var.get('units', '')}, chunks {var.get('chunks')}")
    if info.get("time"):
        lines.append(f"  time: {info['time']}")
    attrs = info.get("attrs", {})
    for key in ("source", "train_period", "time_step", "created", "forecasting_version"):
        if key in attrs:
            lines.append(f"  {key}: {attrs[key]}")
    stats = info.get("statistics")
    if stats:
        lines.append("  statistics (training period):")
        header = f"    {'variable':32s} {'level':>7s} {'mean':>14s} {'std':>14s} {'tendency_std':>14s}"
        lines.append(header)
        for row in stats:
            level = "" if row.get("level") is None else f"{row['level']:g}"
            lines.append(
                f"    {row['variable']:32s} {level:>7s} {row['mean']:14.6g} {row['std']:14.6g} {row['tendency_std']:14.6g}"
            )
    return "\n".join(lines)
