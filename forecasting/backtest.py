"""Forecasts over many start times, scored start by start: backtests and the operational forecast cycle.

Both run a trained model (``model.pt`` of ``forecast train``) from analysis stores and score it with the
verification code of :mod:`forecasting.verification` (WeatherBench2 scores, Rasp et al. 2024; paired
bootstrap scorecards, Efron and Tibshirani 1993) against gridded truth, station observations and the
baselines (persistence, climatology) for the same start times. One config, :class:`ForecastRunConfig`
(the ``forecast`` section of ``configs/backtest.yaml``, :func:`load_forecast_run`), names the model, its
data, how it is verified and where outputs go (``out``).

**Backtest** (:func:`run_backtest`). Start times are independent: :func:`score_start` forecasts one start
into a scratch Zarr (:func:`forecasting.inference.predict`), scores it and the baselines for that start on
every grid and at the stations, and keeps only the per-start scores (dims ``model``, ``metric``,
``variable``, ``time`` (one start), ``prediction_timedelta``, ``region``; a few kB) in
``OUT/scores/<start>.nc``. Each call opens the stores itself and returns only that path, so start times
fan out over a Dask cluster with memory that does not grow with their number, and a backtest that is
interrupted and run again computes only the start times whose scores are missing. Regions are labelled
``<grid>/<region>``: ``global/global`` and the configured boxes on a global grid, ``regional/domain`` on a
regional one, ``<grid>/stations`` for the station scores of that grid. :func:`summarise_backtest` then
reads the per-start scores, aggregates them over start times (WeatherBench2 order: per-start spatial
means first, then the start-time mean, then the root for RMSE-type scores) and writes ``OUT/summary``:
``scores.nc``/``scores.csv``, a scorecard of the model against each baseline, plots and ``summary.md``.

**Forecast cycle** (:func:`forecast_start`, :func:`pending_verifications`, :func:`verify_run`). The
forecast of one start time, by default the latest analysis time all initial-condition stores hold, is
written to ``OUT/forecasts/<start>.zarr``; every earlier forecast whose leads the truth now covers and that
has not been verified yet is verified (``forecast verify`` outputs) into ``OUT/verification/<start>/<grid>``.

**Resumable outputs** (:func:`run_once`). Every output is written atomically (a temporary sibling renamed
into place) and then recorded by a manifest beside it, ``<output>.done.json``, holding a key: the hash of
the settings that made it and of its inputs' fingerprints. An input with a manifest of its own contributes
its key (so a chain of outputs is invalidated from the first changed step on), another file its size and
modification time, and a directory (a Zarr store) its path only: stores are treated as append-only, so an
analysis store growing by the latest times does not invalidate finished scores (replace a store's content
and pass ``overwrite`` to recompute). An output whose manifest holds the current key is never recomputed;
an output without one (a run died before finishing it) is made again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import dask
import numpy as np
import pandas as pd
import xarray as xr

from forecasting.config import ConfigError, ForecastRunConfig, load_config
from forecasting.errors import SchemaError, StoreError
from forecasting.schema import LEAD, TIME

if TYPE_CHECKING:
    import distributed

    from forecasting.forecasters import Forecaster

MANIFEST_SUFFIX = ".done.json"
MODEL = "model"
METRIC = "metric"
VARIABLE = "variable"
REGION = "region"
STATIONS = "stations"
#: Leads shown in the Markdown tables of a summary: every this-many hours.
TABLE_LEAD_HOURS = 24
#: At most this many variables get lead-time plots in a summary.
PLOT_VARIABLES = 4
#: Metrics of the scorecards shown in a summary's Markdown (the files hold all of them).
CARD_METRICS = ("rmse", "crps", "acc")

Log = Callable[[str], None]


# ----------------------------------------------------------------------------------------------
# Resumable outputs
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepResult:
    """One output of a resumable step: where it is, whether this call made it, and how long that took."""

    path: Path
    computed: bool
    seconds: float


def manifest_path(output: str | Path) -> Path:
    """The manifest recording that ``output`` is complete: ``<output>.done.json`` beside it."""
    output = Path(output)
    return output.with_name(output.name + MANIFEST_SUFFIX)


def fingerprint(path: str | Path) -> str:
    """What identifies an input (see the module docstring): its manifest key, file stamp, or path."""
    path = Path(path)
    manifest = manifest_path(path)
    if manifest.is_file():
        try:
            return "key:" + str(json.loads(manifest.read_text())["key"])
        except (json.JSONDecodeError, KeyError, OSError):
            pass  # an unreadable manifest says nothing: fall back to the path itself
    if path.is_file():
        stat = path.stat()
        return f"file:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return f"path:{path.resolve()}"


def output_key(settings: Mapping[str, object], inputs: Iterable[str | Path | None] = ()) -> str:
    """The key of an output: a hash of its settings (JSON-serialisable) and its inputs' fingerprints."""
    text = json.dumps(
        {"settings": settings, "inputs": [fingerprint(p) for p in inputs if p is not None]},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def is_current(output: str | Path, key: str) -> bool:
    """True when ``output`` exists and its manifest holds ``key``."""
    output = Path(output)
    manifest = manifest_path(output)
    if not output.exists() or not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("key") == key
    except (json.JSONDecodeError, OSError):
        return False


def is_complete(output: str | Path) -> bool:
    """True when ``output`` exists and has a manifest (whatever its key): it was finished by some run."""
    return Path(output).exists() and manifest_path(output).is_file()


def _write_json(path: Path, data: Mapping[str, object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def run_once(output: str | Path, *, key: str, make: Callable[[], object], overwrite: bool = False) -> StepResult:
    """Make ``output`` with ``make()`` unless its manifest already holds ``key`` (or ``overwrite``).

    ``make`` must write ``output`` atomically and replace an existing one. The old manifest is removed
    before ``make`` runs and the new one written only after it returns, so an interrupted ``make`` leaves
    an output that the next call makes again.
    """
    output = Path(output)
    if not overwrite and is_current(output, key):
        return StepResult(output, False, 0.0)
    manifest = manifest_path(output)
    manifest.unlink(missing_ok=True)
    started = time.perf_counter()
    make()
    seconds = time.perf_counter() - started
    if not output.exists():
        raise StoreError(f"step did not write its output {output}")
    _write_json(manifest, {"key": key, "output": str(output), "seconds": round(seconds, 3),
                           "finished": pd.Timestamp.now(tz="UTC").isoformat()})
    return StepResult(output, True, seconds)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the hidden temporaries (``.NAME.tmp-*``) that a killed run left in ``folder``; return them.

    Only for folders one run writes at a time (a backtest's own output folder).
    """
    stale = sorted(folder.glob(".*.tmp-*")) if folder.is_dir() else []
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


def replace_path(tmp: Path, path: Path) -> None:
    """Move the finished ``tmp`` (file or directory) onto ``path``, replacing what is there."""
    if path.is_dir():
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Config (the models live in forecasting.config)
# ----------------------------------------------------------------------------------------------
def load_forecast_run(path: str | Path) -> ForecastRunConfig:
    """The ``forecast`` section of the experiment config at ``path`` (ConfigError naming the file when absent)."""
    section = load_config(path).forecast
    if section is None:
        raise ConfigError(
            f"config {path} has no 'forecast' section (checkpoint, out, starts ...; see configs/backtest.yaml)"
        )
    return section


def _scoring_settings(config: ForecastRunConfig) -> dict[str, object]:
    """The settings a start's scores depend on (not where they run, not the other start times)."""
    return config.model_dump(mode="json", exclude={"out", "starts", "dask", "plots", "n_resamples", "bootstrap_block",
                                                  "keep_forecasts"})


# ----------------------------------------------------------------------------------------------
# The model and its data
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelData:
    """A checkpoint's model and the stores it runs on.

    name: the model's name (the config's ``name``), used as its label in scores. grids: the forecaster's
    grids in order. stores / truth: grid -> store path.
    """

    name: str
    forecaster: Forecaster
    grids: tuple[str, ...]
    stores: dict[str, str]
    truth: dict[str, str]


@lru_cache(maxsize=4)
def _load_model(checkpoint: str, stamp: str) -> tuple[str, Forecaster, dict[str, str | None]]:
    """The checkpoint's model name, forecaster and default stores; cached per file version (``stamp``)."""
    from forecasting.config import parse_config
    from forecasting.forecasters import GLOBAL, REGIONAL, build_forecaster
    from forecasting.training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    config = parse_config(ckpt.config, source=f"config in {checkpoint}")
    forecaster = build_forecaster(config, checkpoint=ckpt)
    data = config.data
    defaults = {GLOBAL: data.global_store if data else None, REGIONAL: data.regional_store if data else None}
    return config.name, forecaster, defaults


def checkpoint_grids(checkpoint: str | Path) -> tuple[str, ...]:
    """The grids (``global``, ``regional``) the model of ``checkpoint`` reads and forecasts."""
    return tuple(_load_model(str(Path(checkpoint).resolve()), fingerprint(checkpoint))[1].grids)


def model_data(config: ForecastRunConfig) -> ModelData:
    """The model of ``config.checkpoint`` with its initial-condition and truth stores, checked to exist."""
    checkpoint = Path(config.checkpoint)
    if not checkpoint.is_file():
        raise StoreError(f"checkpoint {checkpoint} does not exist (train a model first: forecast train CONFIG)")
    name, forecaster, defaults = _load_model(str(checkpoint.resolve()), fingerprint(checkpoint))
    grids = tuple(forecaster.grids)
    unknown = sorted((set(config.stores) | set(config.truth)) - set(grids))
    if unknown:
        raise SchemaError(f"stores/truth name grids {unknown}; the model of {checkpoint} uses grids {list(grids)}")
    stores: dict[str, str] = {}
    for grid in grids:
        path = config.stores.get(grid) or defaults.get(grid)
        if path is None:
            raise SchemaError(f"no initial-condition store for grid {grid!r}: give stores: {{{grid}: PATH}}")
        stores[grid] = str(path)
    truth = {grid: str(config.truth.get(grid) or stores[grid]) for grid in grids}
    for what, paths in (("initial-condition", stores), ("truth", truth)):
        for grid, path in paths.items():
            if "://" not in path and not Path(path).exists():
                raise StoreError(f"{what} store of grid {grid!r} does not exist: {path}")
    if config.observations is not None and not Path(config.observations).exists():
        raise StoreError(f"observations {config.observations} do not exist")
    return ModelData(name=name, forecaster=forecaster, grids=grids, stores=stores, truth=truth)


def start_label(start: pd.Timestamp | str | np.datetime64) -> str:
    """A start time as used in file names: ``20001002T0000``."""
    return pd.Timestamp(start).strftime("%Y%m%dT%H%M")


def _time_axis(path: str) -> pd.DatetimeIndex:
    with xr.open_zarr(path, consolidated=None) as ds:
        return pd.DatetimeIndex(ds[TIME].values)


# ----------------------------------------------------------------------------------------------
# Backtest
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BacktestResult:
    """What :func:`run_backtest` did: the start times scored now and those whose scores were there already."""

    out: Path
    summary: Path
    computed: tuple[pd.Timestamp, ...]
    reused: tuple[pd.Timestamp, ...]
    seconds: float


def scores_path(config: ForecastRunConfig, start) -> Path:
    """Where the per-start scores of ``start`` go: ``OUT/scores/<start>.nc``."""
    return Path(config.out) / "scores" / f"{start_label(start)}.nc"


def climatology_path(config: ForecastRunConfig, grid: str) -> Path:
    return Path(config.out) / "climatology" / f"{grid}.nc"


def backtest_starts(config: ForecastRunConfig) -> pd.DatetimeIndex:
    """The configured start times, checked against the stores: each needs its input times in every
    initial-condition store and its first lead in every truth store (SchemaError naming the starts)."""
    if config.starts is None:
        raise SchemaError("a backtest needs start times: add starts: {first: T, last: T, every: 24h} to the config")
    starts = config.starts.times()
    data = model_data(config)
    forecaster = data.forecaster
    from forecasting.data.store import open_store

    forecaster.check_initial({g: open_store(p) for g, p in data.stores.items()}, starts)
    first_valid = starts + forecaster.leads(1)[0]
    for grid, path in data.truth.items():
        have = _time_axis(path)
        missing = starts[~first_valid.isin(have)]
        if len(missing):
            raise SchemaError(
                f"truth {path} ({grid} grid, {have[0]} .. {have[-1]}) lacks the first lead of "
                f"{len(missing)} start times: {[str(t) for t in missing[:5]]}"
            )
    return starts


def prepare_backtest(config: ForecastRunConfig, *, overwrite: bool = False) -> dict[str, Path | None]:
    """The climatology of each truth store (for the climatology baseline and the ACC), computed once.

    Returns grid -> climatology file, or None where the truth is too short to make one (then the ACC is
    skipped; SchemaError when the climatology baseline was asked for).
    """
    from forecasting.data.store import store_train_period
    from forecasting.inference import climatology_with_fallback
    from forecasting.verification.verify import open_truth

    data = model_data(config)
    out: dict[str, Path | None] = {}
    for grid, truth_path in data.truth.items():
        path = climatology_path(config, grid)
        period = store_train_period(truth_path)
        key = output_key({"climatology_of": truth_path, "period": period}, [truth_path])
        if not overwrite and is_current(path, key):
            out[grid] = path
            continue
        try:
            clim, note = climatology_with_fallback(open_truth(truth_path), period)
        except SchemaError as exc:
            if "climatology" in config.baselines:
                raise SchemaError(
                    f"the climatology baseline cannot be made from {truth_path}: {exc}; "
                    "drop it from baselines or use a longer truth"
                ) from None
            out[grid] = None
            continue

        def make(clim=clim, note=note, path=path) -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            ds = clim.copy()
            ds.attrs = {**clim.attrs, "note": note or ""}
            tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
            try:
                with _NETCDF_LOCK:
                    ds.to_netcdf(tmp)
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise

        out[grid] = run_once(path, key=key, make=make, overwrite=True).path
    return out


def score_start(config: ForecastRunConfig, start, *, overwrite: bool = False) -> StepResult:
    """Forecast one start time, score it and the baselines, write ``OUT/scores/<start>.nc`` (see the module
    docstring); skipped when those scores exist for the same settings. Needs :func:`prepare_backtest` first."""
    start = pd.Timestamp(start)
    out = scores_path(config, start)
    data = model_data(config)
    climatologies = {g: climatology_path(config, g) for g in data.grids}
    inputs = [config.checkpoint, *data.stores.values(), *data.truth.values(), config.observations,
              *[p for p in climatologies.values() if p.exists()]]
    key = output_key({"scores": _scoring_settings(config), "start": str(start)}, inputs)

    def make() -> None:
        with _in_task_thread():
            per_start = _forecast_and_score(config, data, start, climatologies)
        out.parent.mkdir(parents=True, exist_ok=True)
        per_start.attrs = {"start": str(start), "model": data.name, "members": config.members,
                           "checkpoint": str(config.checkpoint)}
        _write_netcdf(per_start.to_dataset(name="score"), out)

    return run_once(out, key=key, make=make, overwrite=overwrite)


def _in_task_thread() -> contextlib.AbstractContextManager:
    """On a Dask worker, compute a start's (dask-backed) arrays in the task's own thread: the fan-out over
    start times is the parallelism, and graphs sent back to the cluster from inside its tasks would make
    every task wait on the others (and clash in the scheduler: the same store read by many tasks)."""
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return contextlib.nullcontext()
    return dask.config.set(scheduler="synchronous")


def _forecast_and_score(config: ForecastRunConfig, data: ModelData, start: pd.Timestamp,
                        climatologies: Mapping[str, Path]) -> xr.DataArray:
    """Per-start scores (model, metric, variable, time, prediction_timedelta, region) of one start."""
    from forecasting.inference import predict

    folder = Path(config.out) / "forecasts"
    folder.mkdir(parents=True, exist_ok=True)
    keep = folder / f"{start_label(start)}.zarr"
    target = keep if config.keep_forecasts else folder / f".{start_label(start)}.scratch-{uuid.uuid4().hex[:8]}.zarr"
    predict(config.checkpoint, starts=[start], members=config.members, steps=config.steps, out=target,
            stores=data.stores, seed=config.seed, batch_size=config.batch_size, overwrite=True)
    try:
        grids = forecast_grids(target)
        per_model: dict[str, list[xr.DataArray]] = {}
        for grid in data.grids:
            clim = climatologies[grid]
            for model, array in _score_grid(config, data, grid, grids[grid], clim if clim.exists() else None):
                per_model.setdefault(model, []).append(array)
    finally:
        if not config.keep_forecasts:
            shutil.rmtree(target, ignore_errors=True)
    return _stack_models(per_model)


def _score_grid(config: ForecastRunConfig, data: ModelData, grid: str, forecast_path: Path,
                climatology_file: Path | None) -> list[tuple[str, xr.DataArray]]:
    """(model, per-start scores with regions ``<grid>/...``) for the model and each baseline on one grid."""
    from forecasting.inference import open_forecast
    from forecasting.verification.baselines import (
        climatology_forecast,
        persistence_forecast,
    )
    from forecasting.verification.gridded import (
        check_comparable,
        is_global,
        verify_grid,
    )
    from forecasting.verification.verify import (
        open_observations,
        open_truth,
        scored_regions,
        station_scores,
    )

    truth_path = data.truth[grid]
    forecast = open_forecast(forecast_path)
    truth = open_truth(truth_path)
    names = check_comparable(forecast, truth, source=str(forecast_path), truth_source=truth_path)
    forecast = forecast[names]
    extra = {k: v.as_tuple() for k, v in config.regions.items()} if is_global(forecast) else None
    regions = scored_regions(forecast, extra)
    observations = open_observations(config.observations) if config.observations is not None else None
    clim = _read_netcdf(climatology_file) if climatology_file is not None else None
    init, leads = forecast[TIME].values, forecast[LEAD].values
    models: dict[str, xr.Dataset] = {data.name: forecast}
    for kind in config.baselines:
        if kind == "persistence":
            models["persistence"] = persistence_forecast(truth[names], init_times=init, leads=leads)
        elif clim is not None:
            models["climatology"] = climatology_forecast(clim[names], init_times=init, leads=leads)

    def climatology_for_acc(init_times, lead_times) -> xr.Dataset | None:
        if clim is None:
            return None
        return climatology_forecast(clim[names], init_times=init_times, leads=lead_times)

    out: list[tuple[str, xr.DataArray]] = []
    for model, fc in models.items():
        gridded = verify_grid(fc, truth, regions=regions, climatology_forecast=climatology_for_acc,
                              chunk_starts=1, spectra=False, source=f"{model} ({grid})",
                              truth_source=truth_path).per_start["score"]
        out.append((model, _label_regions(gridded, grid)))
        if observations is not None:
            stations = station_scores(fc, observations, method=config.station_method, chunk_starts=1)
            if stations is not None:
                per_start = stations[2].expand_dims({REGION: [STATIONS]}, axis=-1)
                out.append((model, _label_regions(per_start, grid)))
    return out


def _label_regions(scores: xr.DataArray, grid: str) -> xr.DataArray:
    labels = [f"{grid}/{r}" for r in scores[REGION].values]
    return scores.assign_coords({REGION: np.asarray(labels, dtype=object)})


def _stack_models(per_model: Mapping[str, Sequence[xr.DataArray]]) -> xr.DataArray:
    """One array (model, metric, variable, time, prediction_timedelta, region), NaN where a model lacks a score."""
    arrays = []
    for model, parts in per_model.items():
        joined = xr.concat(parts, dim=REGION, join="outer", coords="minimal", compat="override")
        arrays.append(joined.expand_dims({MODEL: [model]}))
    stacked = xr.concat(arrays, dim=MODEL, join="outer", coords="minimal", compat="override")
    return stacked.transpose(MODEL, METRIC, VARIABLE, TIME, LEAD, REGION)


#: Serialises this module's netCDF reads and writes within a process: the HDF5 library under netCDF4 is not
#: thread-safe, and backtest start times run as threads of one process on a threaded Dask cluster (two
#: concurrent writes crashed the interpreter with a segmentation fault).
_NETCDF_LOCK = threading.Lock()


def _read_netcdf(path: Path) -> xr.Dataset:
    """The netCDF file at ``path`` loaded into memory (under :data:`_NETCDF_LOCK`, file closed)."""
    with _NETCDF_LOCK, xr.open_dataset(path) as ds:
        return ds.load()


def _write_netcdf(ds: xr.Dataset, path: Path) -> None:
    """Atomically write ``ds`` (string labels as fixed strings, floats as float32)."""
    out = ds.copy()
    for name in list(out.coords):
        if out[name].dtype == object or out[name].dtype.kind == "U":
            out[name] = out[name].astype(str)
    encoding = {name: {"dtype": "float32"} for name, var in out.data_vars.items() if var.dtype.kind == "f"}
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with _NETCDF_LOCK:
            out.to_netcdf(tmp, encoding=encoding)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def run_backtest(
    config: ForecastRunConfig,
    *,
    client: distributed.Client | None = None,
    overwrite: bool = False,
    log: Log | None = None,
) -> BacktestResult:
    """Score every start time (skipping those already scored), then write the summary.

    Without ``client`` the start times run one after the other in this process; with a
    ``distributed.Client`` they run on its cluster, at most twice as many in flight as it has worker
    threads, so memory stays flat however many start times there are. ``log`` receives progress lines.
    Output paths must be visible to the workers.
    """
    started = time.perf_counter()
    say = log or (lambda _: None)
    starts = backtest_starts(config)
    prepare_backtest(config, overwrite=overwrite)
    remove_stale_temporaries(Path(config.out) / "scores")
    remove_stale_temporaries(Path(config.out) / "forecasts")
    computed: list[pd.Timestamp] = []
    reused: list[pd.Timestamp] = []

    def record(start: pd.Timestamp, result: StepResult) -> None:
        (computed if result.computed else reused).append(start)
        done = len(computed) + len(reused)
        say(f"start {start_label(start)}: {'scored' if result.computed else 'already scored'} "
            f"({done}/{len(starts)}, {result.seconds:.1f} s)")

    if client is None:
        for start in starts:
            record(start, score_start(config, start, overwrite=overwrite))
    else:
        for start, result in _map_bounded(client, config, starts, overwrite=overwrite):
            record(start, result)
    summary = summarise_backtest(config, starts, overwrite=overwrite).path
    say(f"backtest summary: {summary / 'summary.md'}")
    return BacktestResult(out=Path(config.out), summary=summary, computed=tuple(sorted(computed)),
                          reused=tuple(sorted(reused)), seconds=time.perf_counter() - started)


def _map_bounded(client: distributed.Client, config: ForecastRunConfig, starts: pd.DatetimeIndex, *,
                 overwrite: bool):
    """Yield (start, StepResult) as the cluster finishes them, keeping a bounded number in flight."""
    from distributed import as_completed

    window = 2 * max(sum(client.nthreads().values()), 1)
    waiting = iter(starts)
    in_flight = {}

    def submit() -> object | None:
        start = next(waiting, None)
        if start is None:
            return None
        future = client.submit(score_start, config, start, overwrite=overwrite, pure=False)
        in_flight[future] = start
        return future

    first = [f for f in (submit() for _ in range(window)) if f is not None]
    queue = as_completed(first)
    for future in queue:
        start = in_flight.pop(future)
        result = future.result()
        following = submit()
        if following is not None:
            queue.add(following)
        yield start, result


# ----------------------------------------------------------------------------------------------
# Summary: aggregate scores and scorecards
# ----------------------------------------------------------------------------------------------
def read_per_start_scores(paths: Sequence[Path]) -> xr.DataArray:
    """Concatenate per-start score files along ``time``: (model, metric, variable, time, lead, region)."""
    if not paths:
        raise StoreError("no per-start scores to read")
    parts = []
    for path in paths:
        if not path.is_file():
            raise StoreError(f"per-start scores {path} are missing: run the backtest first")
        parts.append(_read_netcdf(path)["score"])
    joined = xr.concat(parts, dim=TIME, join="outer", coords="minimal", compat="override")
    return joined.transpose(MODEL, METRIC, VARIABLE, TIME, LEAD, REGION)


def aggregate_scores(per_start: xr.DataArray, *, members: Mapping[str, int]) -> xr.Dataset:
    """Scores over start times per model (WeatherBench2 aggregation of :func:`gridded.aggregate`):
    ``score`` (model, metric, variable, prediction_timedelta, region). ``members``: model -> ensemble size
    (for the spread-skill ratio; models not named have one member)."""
    from forecasting.verification.gridded import PER_START_AGGREGATION, aggregate

    parts = []
    for model in per_start[MODEL].values:
        values = per_start.sel({MODEL: model}, drop=True)
        present = [str(m) for m in values[METRIC].values
                   if str(m) in PER_START_AGGREGATION and bool(values.sel({METRIC: m}).notnull().any())]
        result = aggregate(values.sel({METRIC: present}), n_member=int(members.get(str(model), 1)))
        parts.append(result.expand_dims({MODEL: [str(model)]}))
    scores = xr.concat(parts, dim=MODEL, join="outer", coords="minimal", compat="override")
    return scores.transpose(MODEL, METRIC, VARIABLE, LEAD, REGION).to_dataset(name="score")


def scorecard_against(per_start: xr.DataArray, *, model: str, reference: str, n_resamples: int,
                      block_length: int | str = "auto") -> xr.Dataset:
    """Skill of ``model`` over ``reference`` from their per-start scores (paired bootstrap over starts)."""
    from forecasting.verification.scorecard import DEFAULT_SCORECARD_METRICS, build_scorecard

    def usable(name: str) -> list[str]:
        values = per_start.sel({MODEL: name}, drop=True)
        return [str(m) for m in values[METRIC].values
                if str(m) in DEFAULT_SCORECARD_METRICS and bool(values.sel({METRIC: m}).notnull().any())]

    shared = [m for m in usable(model) if m in usable(reference)]
    if not shared:
        raise SchemaError(f"{model} and {reference} share no metric a scorecard can bootstrap")
    pick = {METRIC: shared}
    return build_scorecard(
        per_start.sel({MODEL: model}, drop=True).sel(pick).to_dataset(name="score"),
        per_start.sel({MODEL: reference}, drop=True).sel(pick).to_dataset(name="score"),
        model_name=model, reference_name=reference, metrics=shared, n_resamples=n_resamples,
        block_length=block_length,
    )


def summarise_backtest(config: ForecastRunConfig, starts: Sequence | pd.DatetimeIndex, *,
                       overwrite: bool = False) -> StepResult:
    """Write ``OUT/summary`` from the per-start scores of ``starts`` (all must exist); skipped when it was
    written from the same scores and settings."""
    data = model_data(config)
    paths = [scores_path(config, s) for s in starts]
    missing = [p.name for p in paths if not is_complete(p)]
    if missing:
        raise StoreError(f"backtest {config.out}: per-start scores missing for {len(missing)} start times, "
                         f"e.g. {missing[:3]}; run the backtest to compute them")
    out = Path(config.out) / "summary"
    key = output_key({"summary": config.model_dump(mode="json", exclude={"dask"}),
                      "starts": [str(s) for s in pd.DatetimeIndex(starts)]}, paths)

    def make() -> None:
        per_start = read_per_start_scores(paths)
        scores = aggregate_scores(per_start, members={data.name: config.members})
        scores.attrs = {"model": data.name, "checkpoint": config.checkpoint, "n_start_times": len(paths),
                        "first_start": str(pd.Timestamp(starts[0])), "last_start": str(pd.Timestamp(starts[-1])),
                        "members": config.members}
        cards = {ref: scorecard_against(per_start, model=data.name, reference=ref, n_resamples=config.n_resamples,
                                        block_length=config.bootstrap_block)
                 for ref in config.baselines if ref in per_start[MODEL].values}
        write_summary(out, scores=scores, scorecards=cards, title=f"Backtest of {data.name}",
                      intro=_backtest_intro(config, data, starts), plots=config.plots)

    return run_once(out, key=key, make=make, overwrite=overwrite)


def _backtest_intro(config: ForecastRunConfig, data: ModelData, starts) -> str:
    starts = pd.DatetimeIndex(starts)
    return (
        f"Model `{data.name}` ({config.checkpoint}), {config.members} member(s), {config.steps} steps, "
        f"{len(starts)} start times {starts[0]} .. {starts[-1]}; truth {', '.join(data.truth.values())}; "
        f"observations {config.observations}; baselines {', '.join(config.baselines) or 'none'}. Per-start "
        f"scores are in `{Path(config.out) / 'scores'}`."
    )


def write_summary(out: Path, *, scores: xr.Dataset, scorecards: Mapping[str, xr.Dataset], title: str,
                  intro: str, plots: bool = True) -> Path:
    """Write ``scores.nc``/``scores.csv``, ``scorecard_<label>.{nc,csv,md}`` per entry of ``scorecards``
    (label -> scorecard), lead-time and scorecard plots (``plots/``) and ``summary.md`` into ``out``,
    atomically; returns ``out``."""
    from forecasting.verification.scorecard import (
        scorecard_markdown,
        scorecard_to_frame,
    )
    from forecasting.verification.verify import scores_to_frame

    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        _write_netcdf(scores, tmp / "scores.nc")
        scores_to_frame(scores).to_csv(tmp / "scores.csv", index=False)
        for label, card in scorecards.items():
            _write_netcdf(card, tmp / f"scorecard_{label}.nc")
            scorecard_to_frame(card).to_csv(tmp / f"scorecard_{label}.csv", index=False)
            (tmp / f"scorecard_{label}.md").write_text(scorecard_markdown(card))
        figures = comparison_plots(tmp / "plots", scores=scores, scorecards=scorecards) if plots else []
        text = summary_markdown(scores, scorecards, title=title, intro=intro,
                                figures=[f.relative_to(tmp) for f in figures])
        (tmp / "summary.md").write_text(text)
        replace_path(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main_regions(scores: xr.Dataset) -> list[str]:
    """The first region of each grid and each grid's stations, in the order the scores hold them."""
    seen: dict[str, list[str]] = {}
    for label in (str(r) for r in scores[REGION].values):
        grid, _, region = label.rpartition("/")
        seen.setdefault(grid, []).append(region)
    chosen = []
    for grid, regions in seen.items():
        prefix = f"{grid}/" if grid else ""
        areas = [r for r in regions if r != STATIONS]
        chosen += [prefix + r for r in areas[:1]] + [prefix + STATIONS for r in regions if r == STATIONS]
    return chosen


def comparison_plots(folder: Path, *, scores: xr.Dataset, scorecards: Mapping[str, xr.Dataset]) -> list[Path]:
    """Lead-time curves for every model in the main regions (:func:`main_regions`): RMSE of the first
    :data:`PLOT_VARIABLES` variables and CRPS of the first one; and each scorecard's RMSE panel for the first
    region of each grid. Returns the PNG paths."""
    from forecasting import plotting

    folder.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    score = scores["score"]
    variables = [str(v) for v in scores[VARIABLE].values][:PLOT_VARIABLES]
    for region in main_regions(scores):
        for metric, chosen in (("rmse", variables), ("crps", variables[:1])):
            if metric not in scores[METRIC].values:
                continue
            for variable in chosen:
                data = score.sel({METRIC: [metric], VARIABLE: [variable], REGION: [region]})
                if bool(data.isnull().all()):
                    continue
                path = folder / f"{metric}_{_safe(variable)}_{_safe(region)}.png"
                files.append(plotting.plot_lead_time_curves(scores.sel({REGION: [region]}), path, metric=metric,
                                                            variable=variable, region=region))
    for label, card in scorecards.items():
        if "rmse" not in card[METRIC].values:
            continue
        for region in (r for r in main_regions(card) if r.rpartition("/")[2] != STATIONS):
            if bool(card["skill"].sel({METRIC: "rmse", REGION: region}).isnull().all()):
                continue
            path = folder / f"scorecard_{_safe(label)}_rmse_{_safe(region)}.png"
            files.append(plotting.plot_scorecard(
                card.sel({REGION: [region]}), path, metric="rmse",
                title=f"{card.attrs.get('model')} vs {card.attrs.get('reference')}: RMSE skill ({region})"))
    return files


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label)


def table_leads(scores: xr.Dataset) -> np.ndarray:
    """The leads shown in tables: every :data:`TABLE_LEAD_HOURS` hours (all leads when none fall there)."""
    leads = pd.TimedeltaIndex(scores[LEAD].values)
    hours = leads / pd.Timedelta(hours=1)
    chosen = leads[(hours % TABLE_LEAD_HOURS) == 0]
    return (chosen if len(chosen) else leads).values


def summary_markdown(scores: xr.Dataset, scorecards: Mapping[str, xr.Dataset], *, title: str, intro: str,
                     figures: Sequence[Path] = ()) -> str:
    """Markdown: RMSE, CRPS, spread-skill and ACC tables per region at the leads of :func:`table_leads`,
    the scorecards (:data:`CARD_METRICS`, main regions) and the figures."""
    from forecasting.verification.scorecard import scorecard_markdown
    from forecasting.verification.verify import summary_table

    lines = [f"# {title}", "", intro, "",
             ("RMSE is the square root of the start-time mean of the area-weighted spatial-mean squared error "
              "(WeatherBench2); deterministic scores of an ensemble are those of its mean.")]
    leads = table_leads(scores)
    for region in (str(r) for r in scores[REGION].values):
        for metric in ("rmse", "crps", "spread_skill_ratio", "acc"):
            table = summary_table(scores, region=region, metric=metric, leads=leads)
            if table:
                lines += ["", f"### {metric} — {region}", "", table]
    for card in scorecards.values():
        shown = card.sel({REGION: main_regions(card),
                          METRIC: [m for m in CARD_METRICS if m in card[METRIC].values] or card[METRIC].values,
                          LEAD: [x for x in leads if x in card[LEAD].values] or card[LEAD].values})
        table = scorecard_markdown(shown)
        table = table.split("\n", 1)[1] if table.startswith("## ") else table  # its title is the one below
        lines += ["", f"### Scorecard: {card.attrs.get('model')} against {card.attrs.get('reference')}",
                  table.replace("\n### ", "\n#### ").rstrip()]
    if figures:
        lines += ["", "### Plots", ""] + [f"![{Path(f).stem}]({Path(f).as_posix()})" for f in figures]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# The forecast cycle
# ----------------------------------------------------------------------------------------------
def forecast_grids(path: str | Path) -> dict[str, Path]:
    """Grid -> forecast Dataset location of a forecast Zarr (its groups, or the root for one grid)."""
    import zarr

    path = Path(path)
    try:
        attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    except (FileNotFoundError, ValueError, KeyError, OSError, zarr.errors.BaseZarrError) as exc:
        raise StoreError(f"cannot open forecast {path}: {exc}") from None
    if attrs.get("grids"):
        return {str(g): path / str(g) for g in attrs["grids"]}
    if "grid" not in attrs:
        raise StoreError(f"forecast {path} does not say its grid (no 'grid' or 'grids' attribute)")
    return {str(attrs["grid"]): path}


def latest_start(config: ForecastRunConfig) -> pd.Timestamp:
    """The latest analysis time every initial-condition store holds."""
    data = model_data(config)
    return min(_time_axis(path)[-1] for path in data.stores.values())


def cycle_forecast_path(config: ForecastRunConfig, start) -> Path:
    return Path(config.out) / "forecasts" / f"{start_label(start)}.zarr"


def forecast_start(config: ForecastRunConfig, start=None, *, overwrite: bool = False) -> StepResult:
    """The forecast of ``start`` (default: :func:`latest_start`) in ``OUT/forecasts/<start>.zarr``; skipped
    when it exists for the same checkpoint and settings."""
    from forecasting.inference import predict

    data = model_data(config)
    start = latest_start(config) if start is None else pd.Timestamp(start)
    out = cycle_forecast_path(config, start)
    settings = config.model_dump(mode="json", include={"checkpoint", "stores", "members", "steps", "seed"})
    key = output_key({"forecast": settings, "start": str(start)}, [config.checkpoint, *data.stores.values()])

    def make() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        predict(config.checkpoint, starts=[start], members=config.members, steps=config.steps, out=out,
                stores=data.stores, seed=config.seed, batch_size=config.batch_size, overwrite=True)

    return run_once(out, key=key, make=make, overwrite=overwrite)


def verification_path(config: ForecastRunConfig, start) -> Path:
    return Path(config.out) / "verification" / start_label(start)


def _verification_key(config: ForecastRunConfig, start, forecast: Path) -> str:
    settings = config.model_dump(mode="json", include={"truth", "observations", "baselines", "regions",
                                                       "station_method", "n_resamples", "plots"})
    return output_key({"verification": settings, "start": str(pd.Timestamp(start))}, [forecast])


def cycle_forecasts(config: ForecastRunConfig) -> list[pd.Timestamp]:
    """Start times of the complete forecasts in ``OUT/forecasts`` (those with a manifest), in order."""
    folder = Path(config.out) / "forecasts"
    starts = []
    for manifest in folder.glob(f"*.zarr{MANIFEST_SUFFIX}"):
        label = manifest.name[: -len(".zarr" + MANIFEST_SUFFIX)]
        try:
            starts.append(pd.Timestamp(pd.to_datetime(label, format="%Y%m%dT%H%M")))
        except ValueError:
            continue
    return sorted(s for s in starts if cycle_forecast_path(config, s).exists())


def pending_verifications(config: ForecastRunConfig) -> list[pd.Timestamp]:
    """Forecasts in ``OUT/forecasts`` not yet verified whose every valid time the truth now holds."""
    from forecasting.inference import open_forecast

    data = model_data(config)
    truth_end = {grid: _time_axis(path)[-1] for grid, path in data.truth.items()}
    pending = []
    for start in cycle_forecasts(config):
        forecast = cycle_forecast_path(config, start)
        if is_current(verification_path(config, start), _verification_key(config, start, forecast)):
            continue
        grids = forecast_grids(forecast)
        last = max(pd.Timedelta(open_forecast(p)[LEAD].values[-1]) for p in grids.values())
        if all(start + last <= truth_end.get(grid, pd.Timestamp.min) for grid in grids):
            pending.append(start)
    return pending


def verify_run(config: ForecastRunConfig, start, *, overwrite: bool = False) -> StepResult:
    """Verify the cycle forecast of ``start`` on each grid (``forecast verify`` outputs, scorecard against the
    first baseline) into ``OUT/verification/<start>/<grid>``."""
    from forecasting.inference import open_forecast
    from forecasting.verification.gridded import is_global
    from forecasting.verification.verify import verify

    data = model_data(config)
    forecast = cycle_forecast_path(config, start)
    if not is_complete(forecast):
        raise StoreError(f"no complete forecast {forecast} to verify")
    out = verification_path(config, start)
    reference = config.baselines[0] if config.baselines else None

    def make() -> None:
        tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.mkdir(parents=True)
        try:
            for grid, path in forecast_grids(forecast).items():
                regions = ({k: v.as_tuple() for k, v in config.regions.items()}
                           if is_global(open_forecast(path)) else None)
                verify(path, out_dir=tmp / grid, truth_path=data.truth[grid], observations_path=config.observations,
                       reference=reference, regions=regions, station_method=config.station_method,
                       n_resamples=config.n_resamples, plots=config.plots)
            replace_path(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    return run_once(out, key=_verification_key(config, start, forecast), make=make, overwrite=overwrite)
