"""Forecast datasets on disk: Zarr in the WeatherBench2 forecast layout, with provenance attributes.

Layout (shared/DESIGN.md): dims ``time`` (initialisation), ``prediction_timedelta``, ``realization``,
optional ``level``, ``latitude``, ``longitude``; a ``valid_time`` coordinate; chunks of one start time and
one lead (whole field, all members) so a reader picks any (start, lead) cheaply. Attributes name the
model, the checkpoint hash, the config hash and the package version. Writes go to a temporary sibling
directory that is renamed into place at the end, so a reader never sees a half-written forecast.

Model forecasts (``forecast predict``) are streamed: :class:`ForecastWriter` first writes the metadata of
the full-shape forecast (a lazy template, ``to_zarr(compute=False)``), then each lead of each group of
start times as it leaves the model (``to_zarr(region=...)``), so memory does not grow with the number of
steps. A forecast on one grid is the Zarr root; a forecast on several grids (the stretched-grid model)
writes one group per grid (``F.zarr/global``, ``F.zarr/regional``), each a complete forecast in the
layout above with its own consolidated metadata, so ``open_forecast("F.zarr/regional")`` and
``xr.open_zarr("F.zarr", group="regional")`` both read it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
import zarr

from forecasting import __version__
from forecasting.errors import SchemaError, SourceError, StoreError
from forecasting.schema import (
    LAT,
    LEAD,
    LON,
    TIME,
    VALID_TIME,
    analysis_as_forecast,
    validate_forecast,
    with_valid_time,
)
from forecasting.verification.baselines import climatology, climatology_forecast, persistence_forecast

if TYPE_CHECKING:
    from forecasting.config import ExperimentConfig
    from forecasting.forecasters import Forecaster
    from forecasting.training.checkpoint import Checkpoint


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
    """Open a forecast Zarr lazily; an analysis store (no lead dim) is viewed as a lead-0, one-member forecast.

    The dask chunks hold many Zarr chunks (one start time and one lead each on disk): all the leads of one
    start time, or as many leads as fit in about :data:`~forecasting.data.store.TARGET_CHUNK_BYTES`, so that
    reading a forecast is a few Zarr calls per start time rather than one dask task per field.
    """
    from forecasting.data.store import streaming_chunks

    try:
        ds = xr.open_zarr(path, consolidated=None, chunks=None)
    except (FileNotFoundError, ValueError, KeyError, OSError) as exc:
        raise SourceError(f"cannot open forecast {path}: {exc}") from None
    ds = ds.drop_vars([v for v in ds.data_vars if str(v).endswith("_mask")])
    if LEAD not in ds.dims:
        ds = analysis_as_forecast(streaming_chunks(ds[[v for v in ds.data_vars if TIME in ds[v].dims]]))
    else:
        ds = _forecast_chunks(ds)
    if VALID_TIME not in ds.coords:
        ds = with_valid_time(ds)
    validate_forecast(ds, source=str(path))
    return ds


def _forecast_chunks(ds: xr.Dataset) -> xr.Dataset:
    """Dask chunks for reading a forecast opened without dask: one start time, and all its leads when they
    fit in about TARGET_CHUNK_BYTES (else as many as fit); whole along the other dims."""
    from forecasting.data.store import TARGET_CHUNK_BYTES

    per_lead = max((var.nbytes // max(var.sizes[TIME] * var.sizes[LEAD], 1)
                    for var in ds.data_vars.values() if TIME in var.dims and LEAD in var.dims), default=1)
    n_lead = ds.sizes[LEAD]
    leads = max(1, min(n_lead, TARGET_CHUNK_BYTES // max(per_lead, 1)))
    return ds.chunk({TIME: 1, LEAD: leads})


def regrid_forecast(
    forecast: str | Path, *, like: str | Path, out: str | Path, overwrite: bool = False
) -> Path:
    """The forecast at ``forecast`` bilinearly interpolated onto the grid of the store ``like``, written to ``out``.

    The reference a regional product is judged against: a coarse model "interpolated to the region". Leads,
    members and start times are kept; the attrs name the source forecast and say it was interpolated
    (:func:`forecasting.regrid.interpolate`). Raises StoreError when ``out`` exists (without ``overwrite``),
    SourceError for unreadable inputs and SchemaError when the forecast's grid does not cover ``like``'s;
    nothing is written on failure.
    """
    from forecasting.regrid import interpolate

    out = Path(out)
    if out.exists() and not overwrite:
        raise StoreError(f"forecast {out} already exists; pass --overwrite to replace it")
    source = open_forecast(forecast)
    try:
        target = xr.open_zarr(like, consolidated=None)
    except (FileNotFoundError, ValueError, KeyError, OSError) as exc:
        raise SourceError(f"cannot open target grid store {like}: {exc}") from None
    for dim in (LAT, LON):
        if dim not in target.dims:
            raise SchemaError(f"{like}: no {dim!r} dim to take the target grid from")
    regridded = interpolate(source, target[LAT].values, target[LON].values, source=str(forecast))
    model = str(source.attrs.get("model", Path(forecast).stem))
    config = {"regridded_from": str(forecast), "like": str(like), "method": "bilinear",
              "source_config_hash": str(source.attrs.get("config_hash", "none"))}
    write_forecast(regridded, out, model=f"{model} (bilinear)",
                   checkpoint_hash=str(source.attrs.get("checkpoint_hash", "none")), config=config, overwrite=overwrite)
    return out


def climatology_with_fallback(
    truth: xr.Dataset, period: tuple[str | None, str | None] | None
) -> tuple[xr.Dataset, str | None]:
    """The climatology over ``period``; when that period is too short to fill every day of the year (less
    than about a year), the climatology of the whole record, with a note saying so (it is then in-sample,
    which favours the climatology baseline)."""
    whole = (str(pd.Timestamp(truth[TIME].values[0])), str(pd.Timestamp(truth[TIME].values[-1])))
    if period is not None and tuple(period) != whole:
        try:
            return climatology(truth, period=period), None
        except SchemaError as exc:
            note = (f"climatology computed over the whole record {whole[0]}..{whole[1]} (in-sample) because the "
                    f"period {period[0]}..{period[1]} cannot fill every day of the year: {exc}")
            return climatology(truth, period=whole), note
    return climatology(truth, period=whole), None


def baseline_forecast(
    truth: xr.Dataset,
    *,
    kind: str,
    init_times,
    leads,
    climatology_period: tuple[str | None, str | None] | None = None,
    members: int = 1,
    source: str = "the truth",
) -> xr.Dataset:
    """Persistence, climatology or perfect-model forecasts from an analysis, in the forecast layout.

    ``members`` and ``source`` (the store's name in messages) are for ``perfect-model``
    (:func:`~forecasting.verification.baselines.perfect_model_forecast`: the built-in data's simulator restarted
    from ``truth``), whose leads must be 6 h, 12 h, ... (the simulation's step). Persistence and climatology
    are lazy and have one member. Raises StoreError for another kind, or for members or leads a kind cannot
    give.
    """
    if kind == "perfect-model":
        from forecasting.verification.baselines import perfect_model_forecast

        steps = len(leads)
        expected = pd.to_timedelta([6 * (i + 1) for i in range(steps)], unit="h")
        if steps < 1 or not (pd.to_timedelta(leads) == expected).all():
            raise StoreError("the perfect-model baseline runs at the simulation's 6 h step: leads must be 6 h, 12 h, ...")
        return perfect_model_forecast(truth, init_times=init_times, steps=steps, members=members, source=source)
    if members != 1:
        raise StoreError(f"members={members}: only the perfect-model baseline has members")
    if kind == "persistence":
        return persistence_forecast(truth, init_times=init_times, leads=leads)
    if kind == "climatology":
        clim, _ = climatology_with_fallback(truth, climatology_period)
        return climatology_forecast(clim, init_times=init_times, leads=leads)
    raise StoreError(f"unknown baseline {kind!r}; choose persistence, climatology or perfect-model")



# ----------------------------------------------------------------------------------------------
# Streaming model forecasts
# ----------------------------------------------------------------------------------------------
class ForecastWriter:
    """Write a forecast to Zarr lead by lead, atomically (see the module docstring).

    Use as a context manager; call :meth:`write` with each lead of each group of start times (any order).
    The first call fixes the grids, variables and shapes (every later call must match) and writes the
    metadata of the whole forecast; a clean exit consolidates the metadata and renames the temporary
    directory onto ``path``; an exception removes it, leaving ``path`` untouched.

    Args:
        path: The forecast Zarr directory.
        starts: All start times (the ``time`` axis).
        leads: All leads (the ``prediction_timedelta`` axis).
        model: Model name for the ``model`` attribute.
        checkpoint_hash: SHA-256 of the checkpoint file (``checkpoint_hash`` attribute).
        config: The resolved config (``config`` and ``config_hash`` attributes).
        attrs: More string attributes (e.g. ``model_family``).
        overwrite: Replace an existing forecast at ``path`` (only once the new one is complete).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        starts: pd.DatetimeIndex,
        leads: pd.TimedeltaIndex,
        model: str,
        checkpoint_hash: str = "none",
        config: Mapping[str, object] | None = None,
        attrs: Mapping[str, str] | None = None,
        overwrite: bool = False,
    ) -> None:
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise StoreError(f"forecast {self.path} already exists; pass --overwrite to replace it")
        self.starts = pd.DatetimeIndex(starts)
        self.leads = pd.TimedeltaIndex(leads)
        config = dict(config or {})
        self.attrs = {
            **dict(attrs or {}),
            "model": model,
            "checkpoint_hash": checkpoint_hash,
            "config_hash": config_hash(config),
            "config": json.dumps(config, default=str),
            "forecasting_version": __version__,
            "created": pd.Timestamp.now(tz="UTC").isoformat(),
        }
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}")
        self._grids: tuple[str, ...] | None = None
        self._written: dict[str, np.ndarray] = {}

    def __enter__(self) -> ForecastWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if kind is None:
            try:
                self._commit()
            except BaseException:
                shutil.rmtree(self._tmp, ignore_errors=True)
                raise
        else:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def _group(self, grid: str) -> str | None:
        assert self._grids is not None
        return None if len(self._grids) == 1 else grid

    def write(self, grids: Mapping[str, xr.Dataset], *, starts: slice, lead: int) -> None:
        """Write lead ``lead`` of the start times ``starts`` (positions) for every grid.

        Each Dataset has dims (time = those starts, prediction_timedelta [size 1], realization, [level],
        latitude, longitude).
        """
        names = tuple(grids)
        if self._grids is None:
            self._grids = names
            for name, ds in grids.items():
                self._create(name, ds)
        elif names != self._grids:
            raise SchemaError(f"forecast {self.path}: grids {list(names)} after {list(self._grids)}")
        for name, ds in grids.items():
            n_starts = starts.stop - starts.start
            if ds.sizes.get(TIME) != n_starts or ds.sizes.get(LEAD) != 1:
                raise SchemaError(
                    f"forecast {self.path} ({name}): a chunk of {n_starts} start times and one lead was expected; "
                    f"found dims {dict(ds.sizes)}"
                )
            values = ds.drop_vars([c for c in ds.coords]).drop_encoding()
            values.to_zarr(
                self._tmp, group=self._group(name), region={TIME: starts, LEAD: slice(lead, lead + 1)},
                zarr_format=2, consolidated=False,
            )
            self._written[name][starts, lead] = True

    def _create(self, name: str, chunk: xr.Dataset) -> None:
        """Write the metadata and coordinates of the full forecast of grid ``name`` shaped like ``chunk``."""
        sizes = {**chunk.sizes, TIME: len(self.starts), LEAD: len(self.leads)}
        coords = {
            TIME: self.starts.values,
            LEAD: self.leads.values,
            **{k: v.values for k, v in chunk.coords.items() if k not in (TIME, LEAD, VALID_TIME)},
        }
        data = {}
        for var_name, var in chunk.data_vars.items():
            shape = tuple(sizes[d] for d in var.dims)
            chunks = tuple(1 if d in (TIME, LEAD) else sizes[d] for d in var.dims)
            lazy = da.zeros(shape, chunks=chunks, dtype=np.float32)
            data[var_name] = xr.DataArray(lazy, dims=var.dims, attrs=dict(var.attrs))
        template = with_valid_time(xr.Dataset(data, coords=coords))
        validate_forecast(template, source=f"forecast {self.path} ({name})")
        template.attrs = {**self.attrs, "grid": name}
        encoding = {v: {"chunks": template[v].data.chunksize} for v in template.data_vars}
        template.to_zarr(
            self._tmp, group=self._group(name), mode="w" if not self._written else "a", compute=False,
            zarr_format=2, consolidated=False, encoding=encoding,
        )
        self._written[name] = np.zeros((len(self.starts), len(self.leads)), dtype=bool)

    def _commit(self) -> None:
        if self._grids is None:
            raise StoreError(f"forecast {self.path}: nothing was written")
        for name, done in self._written.items():
            if not done.all():
                missing = np.argwhere(~done)[:3].tolist()
                raise StoreError(
                    f"forecast {self.path} ({name}): {int((~done).sum())} (start, lead) chunks were never written, "
                    f"e.g. positions {missing}"
                )
        if len(self._grids) > 1:
            root = zarr.open_group(str(self._tmp), mode="a", zarr_format=2)
            root.attrs.update({**self.attrs, "grids": list(self._grids)})
            for name in self._grids:
                zarr.consolidate_metadata(str(self._tmp / name), zarr_format=2)
        zarr.consolidate_metadata(str(self._tmp), zarr_format=2)
        if self.path.exists():
            old = self.path.with_name(f".{self.path.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(self.path, old)
            os.replace(self._tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self._tmp, self.path)


def predict(
    checkpoint: str | Path,
    *,
    starts: Sequence | pd.DatetimeIndex,
    members: int,
    steps: int,
    out: str | Path,
    stores: Mapping[str, str] | None = None,
    boundary: str | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    sampling: Mapping[str, object] | None = None,
) -> Path:
    """Forecast with a trained model and stream the forecast to ``out`` (see :class:`ForecastWriter`).

    The ``model`` attribute is the config's ``name``; ``model_family`` the family.

    Args:
        checkpoint: A model checkpoint (``model.pt`` of ``forecast train``).
        starts: Start times; each needs the model's input times in the initial-condition stores.
        members: Ensemble members (a deterministic model repeats its forecast).
        steps: Leads, one model step apart.
        out: The forecast Zarr.
        stores: Grid name (``global``, ``regional``) -> analysis store with the initial conditions; grids
            not given use the stores of the checkpoint's config.
        boundary: Limited-area models: the boundary source, an analysis store or a forecast Zarr on a grid
            covering the region (default: the config's global store).
        seed: Seed of the members' noise.
        batch_size: Samples (start times x members) per model call (None: all at once).
        device: Torch device to run on (``cpu``, ``cuda``, ``cuda:1``).
        overwrite: Replace an existing forecast.
        sampling: Sampler settings of a diffusion family that replace the checkpoint's for this forecast
            (:data:`SAMPLING_KEYS`, e.g. ``{"sampling_steps": 20}``): the speed-for-quality trade made at
            inference; the forecast's ``config`` attribute records the settings used.

    Returns ``out``. Raises StoreError if ``out`` exists (without ``overwrite``), SourceError for a bad
    checkpoint, SchemaError for missing variables or times, ConfigError for a sampling key the family does
    not have or a bad value; nothing is written at ``out`` on failure.
    """
    from forecasting.data.store import open_store
    from forecasting.forecasters import GLOBAL, REGIONAL
    from forecasting.training.checkpoint import load_checkpoint

    out = Path(out)
    if out.exists() and not overwrite:
        raise StoreError(f"forecast {out} already exists; pass --overwrite to replace it")
    ckpt = load_checkpoint(checkpoint)
    if ckpt.family == "downscaling":
        raise SchemaError(
            f"{checkpoint} is a downscaling model: it maps a coarse forecast to the fine grid rather than rolling "
            "out from initial conditions; use 'forecast downscale F.zarr --checkpoint CKPT --out OUT.zarr'"
        )
    forecaster, config, ckpt = sampled_forecaster(ckpt, sampling)
    if callable(getattr(forecaster, "to", None)):  # torch families move to the device; baselines run on xarray
        forecaster.to(device)
    defaults = {
        GLOBAL: config.data.global_store if config.data is not None else None,
        REGIONAL: config.data.regional_store if config.data is not None else None,
    }
    given = dict(stores or {})
    unknown = sorted(set(given) - set(forecaster.grids))
    if unknown:
        raise SchemaError(f"--store names grids {unknown}; the model of {checkpoint} uses grids {list(forecaster.grids)}")
    paths = {grid: given.get(grid) or defaults.get(grid) for grid in forecaster.grids}
    absent = [grid for grid, p in paths.items() if p is None]
    if absent:
        raise SchemaError(f"no initial-condition store for grids {absent}: give --store GRID=PATH")
    # without dask: each start time's inputs are read as just their own steps
    initial = {grid: open_store(p, use_dask=False) for grid, p in paths.items()}
    boundary_ds = None
    if getattr(forecaster, "limited_area", False):
        location = boundary or defaults[GLOBAL]
        if location is None:
            raise SchemaError("a limited-area model needs --boundary (an analysis store or a forecast Zarr)")
        boundary_ds = open_forecast(location) if _is_forecast(location) else open_store(location, use_dask=False)
    start_index = forecaster.start_times(initial, starts)
    forecaster.check_initial(initial, start_index)
    with ForecastWriter(
        out, starts=start_index, leads=forecaster.leads(steps), model=config.name, checkpoint_hash=ckpt.sha256,
        config=ckpt.config, attrs={"model_family": forecaster.family, "checkpoint": str(checkpoint)},
        overwrite=overwrite,
    ) as writer:
        for chunk in forecaster.iterate(
            initial, steps=steps, members=members, starts=start_index, boundary=boundary_ds, seed=seed,
            batch_size=batch_size,
        ):
            writer.write(chunk.grids, starts=chunk.starts, lead=chunk.lead)
    return out


# The model keys a forecast may change without retraining, per family: how the trained network is sampled.
SAMPLING_KEYS: dict[str, tuple[str, ...]] = {
    "diffusion": ("sampler", "sampling_steps", "sigma_min", "sigma_max", "rho", "churn", "s_noise", "s_tmin",
                  "s_tmax", "member_batch", "initial_perturbation", "perturbation_length", "perturbation_scales",
                  "initial_perturbation_scales", "window_perturbation", "perturbation_every", "perturbation_map_hours",
                  "perturbation_map_power", "spectral_filter_hours", "spectral_filter_order"),
    "rolling": ("sampler", "sampling_steps", "init_steps", "churn", "s_noise", "s_tmin", "s_tmax", "member_batch",
                "initial_perturbation", "perturbation_length", "perturbation_scales", "initial_perturbation_scales",
                "window_perturbation", "perturbation_every", "perturbation_map_hours", "perturbation_map_power",
                "spectral_filter_hours", "spectral_filter_order"),
    "dyffusion": ("sampler", "sampling_steps", "member_batch", "forecaster_dropout_at_inference",
                  "initial_perturbation", "perturbation_length", "perturbation_scales",
                  "initial_perturbation_scales", "window_perturbation", "estimate_perturbation",
                  "perturbation_map_hours", "perturbation_map_power", "spectral_filter_hours",
                  "spectral_filter_order"),
}


def sampled_forecaster(
    ckpt: Checkpoint, sampling: Mapping[str, object] | None
) -> tuple[Forecaster, ExperimentConfig, Checkpoint]:
    """The forecaster of the checkpoint ``ckpt`` with its sampler settings replaced by ``sampling``
    (:func:`with_sampling`; None or empty: as trained), the config it was built from and the checkpoint with
    that config."""
    from forecasting.config import parse_config
    from forecasting.forecasters import build_forecaster

    if sampling:
        ckpt = with_sampling(ckpt, sampling)
    config = parse_config(ckpt.config, source=f"config in {ckpt.path}")
    return build_forecaster(config, checkpoint=ckpt), config, ckpt


def with_sampling(ckpt: Checkpoint, sampling: Mapping[str, object]) -> Checkpoint:
    """``ckpt`` (a :class:`~forecasting.training.checkpoint.Checkpoint`) with its config's sampler settings
    replaced by ``sampling`` (keys of :data:`SAMPLING_KEYS` for its family), validated like a config.

    Raises ConfigError naming the key when the family has no such sampling setting or a value is invalid.
    """
    import dataclasses

    from forecasting.config import ConfigError, parse_config

    allowed = SAMPLING_KEYS.get(ckpt.family, ())
    unknown = sorted(set(sampling) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{ckpt.path}: a {ckpt.family!r} model has no sampling setting {unknown}; "
            + (f"it has {list(allowed)}" if allowed else "it is not sampled by a diffusion sampler")
        )
    config = json.loads(json.dumps(ckpt.config))  # a deep copy
    config["model"] = {**config["model"], **dict(sampling)}
    parse_config(config, source=f"{ckpt.path} with sampling settings {dict(sampling)}")  # validates
    return dataclasses.replace(ckpt, config=config)


def _is_forecast(location: str | Path) -> bool:
    """Whether a Zarr store holds a forecast (a ``prediction_timedelta`` array) rather than an analysis."""
    try:
        group = zarr.open_group(str(location), mode="r")
    except (FileNotFoundError, ValueError, KeyError, OSError, zarr.errors.BaseZarrError) as exc:
        raise SourceError(f"cannot open boundary dataset {location}: {exc}") from None
    return LEAD in group
