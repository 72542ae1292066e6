"""``forecast verify``: scores, scorecard and plots of one forecast against truth, stations and a reference.

Inputs are paths: a forecast Zarr (forecast layout, or an analysis store viewed as a lead-0 forecast),
optionally a gridded truth store, optionally observations (an observation store, CSV, Parquet or station
netCDF) and references (``persistence`` or ``climatology`` built from the truth, or other forecast Zarrs;
the scorecard is against the first). Everything is scored by the same streaming code (:mod:`.gridded`, :mod:`.stations`), so the
reference's numbers are directly comparable. Outputs, all under ``out_dir`` (written to a temporary
directory and renamed into place at the end):

* ``scores.nc``: ``score`` (model, metric, variable, prediction_timedelta, region); regions are the
  named areas of the grid plus ``stations``; ``scores.csv``: the same as a long table;
* ``scorecard.nc`` / ``scorecard.csv`` / ``scorecard.md``: skill against the reference with paired
  bootstrap intervals over start times;
* ``station_scores.nc`` (per station), ``rank_histogram.nc``, ``spectra.nc`` where they apply (zonal spectra on
  a global grid, 2-D DCT spectra on a limited-area one, with the small-scale variance each model restores in
  ``summary.md``);
* ``plots/*.png`` and ``summary.md``.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from forecasting.data.store import store_train_period, streaming_chunks
from forecasting.errors import SchemaError, SourceError, StoreError
from forecasting.inference import (
    baseline_forecast,
    climatology_with_fallback,
    open_forecast,
)
from forecasting.schema import LEAD, LEVEL, MEMBER, TIME, VALID_TIME
from forecasting.verification.baselines import climatology_forecast
from forecasting.verification.gridded import (
    GRIDDED_METRICS,
    METRIC,
    REGION,
    VARIABLE,
    GridVerification,
    check_comparable,
    is_global,
    verify_grid,
)
from forecasting.verification.scorecard import (
    DEFAULT_SCORECARD_METRICS,
    BlockLength,
    build_scorecard,
    scorecard_markdown,
    scorecard_to_frame,
)
from forecasting.verification.spectra import truth_resolution_km
from forecasting.verification.stations import verify_stations

MODEL = "model"
STATIONS_REGION = "stations"
DETERMINISTIC_STATION_METRICS = ("rmse", "mae", "bias")
ENSEMBLE_STATION_METRICS = ("crps", "fair_crps", "ensemble_mean_rmse", "spread", "spread_skill_ratio")
Area = tuple[float, float, float, float]


@dataclass(frozen=True)
class VerifyResult:
    """Where the outputs went and the main tables (also on disk)."""

    out_dir: Path
    scores: xr.Dataset
    scorecard: xr.Dataset | None
    files: tuple[Path, ...] = field(default_factory=tuple)


def open_truth(path: str | Path, *, use_dask: bool = True) -> xr.Dataset:
    """The time-dependent fields of a truth store, lazily.

    With ``use_dask`` (for passes over long periods, e.g. a climatology) as dask arrays of about
    :data:`~forecasting.data.store.TARGET_CHUNK_BYTES` per chunk; without (for picking the truth at given
    valid times) as lazily indexed arrays, so a selection reads just its own steps in one Zarr call.
    """
    try:
        ds = xr.open_zarr(path, consolidated=None, chunks=None)
    except (FileNotFoundError, ValueError, KeyError, OSError) as exc:
        raise SourceError(f"cannot open truth {path}: {exc}") from None
    ds = ds[[v for v in ds.data_vars if TIME in ds[v].dims and not str(v).endswith("_mask")]]
    # dask chunks of many one-step Zarr chunks: one read per task, not one task per time step
    return streaming_chunks(ds) if use_dask else ds


def open_observations(path: str | Path) -> xr.Dataset:
    """Station observations as a (station, time) Dataset: a station Zarr store as it is, or a CSV, Parquet or
    station netCDF file read and quality-controlled (:mod:`forecasting.data.observations`).

    Raises:
        SourceError: a store that cannot be opened.
        SchemaError: a store without a ``station`` dim.
    """
    from forecasting.data.observations import (
        observations_to_dataset,
        quality_control,
        read_observations,
    )

    p = Path(path)
    if p.suffix == ".zarr" and p.is_dir():
        try:
            ds = xr.open_zarr(p, consolidated=None)
        except (FileNotFoundError, ValueError, KeyError, OSError) as exc:
            raise SourceError(f"cannot open observations {p}: {exc}") from None
        if "station" not in ds.dims:
            raise SchemaError(f"observations {p}: expected a 'station' dim; found dims {dict(ds.sizes)}")
        return ds
    table, _ = quality_control(read_observations(p), source=str(p))
    return observations_to_dataset(table)


def scored_regions(forecast: xr.Dataset, extra: Mapping[str, Area] | None) -> dict[str, Area | None]:
    """The areas a forecast is scored over: ``global`` (a global grid) or ``domain`` (a limited area) whole,
    ``region`` for the box in the forecast's ``region`` attribute (``lat_min,lat_max,lon_min,lon_max``), then
    ``extra``."""
    regions: dict[str, Area | None] = {"global" if is_global(forecast) else "domain": None}
    box = forecast.attrs.get("region")
    if isinstance(box, str) and box:
        values = [float(x) for x in box.split(",")]
        if len(values) == 4:
            regions["region"] = tuple(values)  # type: ignore[assignment]
    for name, area in (extra or {}).items():
        regions[name] = area
    return regions


def _select_common(reference: xr.Dataset, forecast: xr.Dataset, *, name: str) -> xr.Dataset:
    """The reference at the forecast's start times, leads and variables; error naming what is missing."""
    missing_vars = [v for v in forecast.data_vars if v not in reference.data_vars]
    if missing_vars:
        raise SchemaError(f"reference {name} lacks variables {missing_vars}")
    starts = pd.DatetimeIndex(forecast[TIME].values)
    have = pd.DatetimeIndex(reference[TIME].values)
    missing_t = starts.difference(have)
    if len(missing_t):
        raise SchemaError(f"reference {name} lacks start times {[str(t) for t in missing_t[:5]]}")
    leads = pd.TimedeltaIndex(forecast[LEAD].values)
    missing_l = leads.difference(pd.TimedeltaIndex(reference[LEAD].values))
    if len(missing_l):
        raise SchemaError(f"reference {name} lacks leads {[str(t) for t in missing_l]}")
    return reference[list(forecast.data_vars)].sel({TIME: starts.values, LEAD: leads.values})


def station_scores(forecast: xr.Dataset, observations: xr.Dataset, *, method: str, chunk_starts: int):
    """Scores of the forecast's surface variables at the stations: ``(scores, station_scores, per_start)``
    (aggregated, per station, per start time), each with a ``metric`` dim; None when the observations hold
    none of the forecast's surface variables. Deterministic metrics score the ensemble mean, ensemble metrics
    the members."""
    surface = [v for v in forecast.data_vars if LEVEL not in forecast[v].dims and v in observations.data_vars]
    if not surface:
        return None
    fc = forecast[surface]
    mean = fc.mean(MEMBER).expand_dims({MEMBER: [0]}).transpose(*[d for d in fc.dims])
    mean = mean.assign_coords({VALID_TIME: fc[VALID_TIME]}) if VALID_TIME in fc.coords else mean
    det = verify_stations(mean, observations, metrics=DETERMINISTIC_STATION_METRICS, method=method,
                          chunk_starts=chunk_starts, outside="nan")
    parts_scores = [det.scores]
    parts_per_start = [det.per_start]
    n_member = fc.sizes[MEMBER]
    ens_metrics = [m for m in ENSEMBLE_STATION_METRICS if n_member > 1 or m == "crps"]
    ens = verify_stations(fc, observations, metrics=ens_metrics, method=method, chunk_starts=chunk_starts,
                          outside="nan")
    parts_scores.append(ens.scores)
    parts_per_start.append(ens.per_start)
    scores = xr.concat([p["score"] for p in parts_scores], dim=METRIC)
    station_score = xr.concat([p["station_score"] for p in parts_scores], dim=METRIC)
    per_start = xr.concat([p["score"] for p in parts_per_start], dim=METRIC)
    return scores, station_score, per_start


def verify(
    forecast_path: str | Path,
    *,
    out_dir: str | Path,
    truth_path: str | Path | None = None,
    observations_path: str | Path | None = None,
    reference: str | Sequence[str] | None = None,
    regions: Mapping[str, Area] | None = None,
    metrics: Sequence[str] = GRIDDED_METRICS,
    station_method: str = "bilinear",
    chunk_starts: int = 8,
    n_resamples: int = 1000,
    bootstrap_block: BlockLength = "auto",
    model_name: str | None = None,
    overwrite: bool = False,
    plots: bool = True,
) -> VerifyResult:
    """Verify a forecast; see the module docstring for inputs and outputs.

    ``reference`` is one reference or several (e.g. the bilinear interpolation of a coarse model and a
    stretched-grid model's regional output for a downscaled forecast): all are scored, plotted and compared in
    the spectra; the scorecard is against the first. ``bootstrap_block``: start times per block of the
    scorecard's bootstrap, or ``"auto"`` (see :mod:`forecasting.verification.scorecard`).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise StoreError(f"output directory {out_dir} already exists; pass --overwrite to replace it")
    if truth_path is None and observations_path is None:
        raise SchemaError("nothing to verify against: give --truth and/or --obs")
    references = [reference] if isinstance(reference, str) else [str(r) for r in reference or ()]
    for ref_spec in references:
        if ref_spec in ("persistence", "climatology") and truth_path is None:
            raise SchemaError(f"reference {ref_spec!r} is built from the truth: give --truth too")

    forecast = open_forecast(forecast_path)
    name = model_name or str(forecast.attrs.get("model", Path(forecast_path).stem))
    truth = open_truth(truth_path, use_dask=False) if truth_path is not None else None
    observations = open_observations(observations_path) if observations_path is not None else None
    if truth is not None:
        shared = check_comparable(forecast, truth, source=str(forecast_path), truth_source=str(truth_path))
        forecast = forecast[shared]
    if observations is not None and truth is None:
        shared = [v for v in forecast.data_vars if v in observations.data_vars]
        if not shared:
            raise SchemaError(
                f"{forecast_path} and {observations_path} share no variables: forecast has "
                f"{sorted(map(str, forecast.data_vars))}, observations have {sorted(map(str, observations.data_vars))}"
            )
    area_regions = scored_regions(forecast, regions)

    clim_fn = None
    train_period = None
    if truth is not None:
        train_period = store_train_period(truth_path)
        clim_fn = _ClimatologyForecaster(open_truth(truth_path), train_period)

    models: dict[str, xr.Dataset] = {name: forecast}
    ref_name = None
    for ref_spec in references:
        if ref_spec in ("persistence", "climatology"):
            ref = baseline_forecast(truth, kind=ref_spec, init_times=forecast[TIME].values,
                                    leads=forecast[LEAD].values, climatology_period=train_period)
            this_name = ref_spec
        else:
            ref = open_forecast(ref_spec)
            this_name = str(ref.attrs.get("model", Path(ref_spec).stem))
            if this_name in models:
                this_name = f"{this_name} ({Path(ref_spec).name})"
            if this_name in models:
                raise SchemaError(f"reference {ref_spec} is given twice")
        models[this_name] = _select_common(ref, forecast, name=this_name)
        ref_name = ref_name or this_name

    score_parts: dict[str, list[xr.DataArray]] = {}
    per_start: dict[str, list[xr.DataArray]] = {}
    grids: dict[str, GridVerification] = {}
    station_tables: dict[str, xr.DataArray] = {}
    for model, fc in models.items():
        score_parts[model] = []
        per_start[model] = []
        if truth is not None:
            grid = verify_grid(fc, truth, regions=area_regions, metrics=metrics, climatology_forecast=clim_fn,
                               chunk_starts=chunk_starts, source=model, truth_source=str(truth_path))
            grids[model] = grid
            score_parts[model].append(grid.scores["score"])
            per_start[model].append(grid.per_start["score"])
        if observations is not None:
            result = station_scores(fc, observations, method=station_method, chunk_starts=chunk_starts)
            if result is not None:
                st_scores, st_station, st_per_start = result
                score_parts[model].append(st_scores.expand_dims({REGION: [STATIONS_REGION]}, axis=-1))
                per_start[model].append(st_per_start.expand_dims({REGION: [STATIONS_REGION]}, axis=-1))
                station_tables[model] = st_station
    notes = []
    if clim_fn is not None and clim_fn.note:
        notes.append(clim_fn.note)
    if clim_fn is not None and clim_fn.unavailable:
        notes.append(f"ACC skipped: no climatology could be made from the truth ({clim_fn.unavailable})")
    if len(references) > 1:
        notes.append(f"references scored alongside: {', '.join(list(models)[1:])}; the scorecard is against {ref_name}")
    scores = _combine_models(score_parts)
    scores.attrs = {"forecast": str(forecast_path), "truth": str(truth_path), "observations": str(observations_path),
                    "reference": ", ".join(references) or "None", "n_start_times": int(forecast.sizes[TIME]),
                    "n_members": int(forecast.sizes[MEMBER]),
                    "rmse_definition": "sqrt of the start-time mean of area-weighted spatial-mean MSE (WeatherBench2)"}
    scorecard = None
    if ref_name is not None:
        model_ps = xr.concat(per_start[name], dim=REGION, join="outer").to_dataset(name="score")
        ref_ps = xr.concat(per_start[ref_name], dim=REGION, join="outer").to_dataset(name="score")
        # a one-member reference has no ensemble scores: the card compares what both have
        shared_metrics = [str(x) for x in model_ps[METRIC].values
                          if str(x) in DEFAULT_SCORECARD_METRICS and str(x) in ref_ps[METRIC].values]
        scorecard = build_scorecard(model_ps, ref_ps, model_name=name, reference_name=ref_name,
                                    metrics=shared_metrics, n_resamples=n_resamples, block_length=bootstrap_block)

    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        files = _write_outputs(tmp, scores=scores, scorecard=scorecard, grids=grids, station_tables=station_tables,
                               forecast=forecast, truth=truth, observations=observations, model=name,
                               reference=ref_name, plots=plots, notes=notes)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return VerifyResult(out_dir=out_dir, scores=scores, scorecard=scorecard,
                        files=tuple(out_dir / f.relative_to(tmp) for f in files))


class _ClimatologyForecaster:
    """Climatology-forecast maker for the ACC: the climatology is computed once, on first use."""

    def __init__(self, truth: xr.Dataset, period: tuple[str, str] | None):
        self._truth = truth
        self._period = period
        self._clim: xr.Dataset | None = None
        self.unavailable: str | None = None
        self.note: str | None = None

    def __call__(self, init_times, leads) -> xr.Dataset | None:
        """The climatology at the valid times, or None when the truth is too short to make one."""
        if self.unavailable is not None:
            return None
        if self._clim is None:
            try:
                clim, self.note = climatology_with_fallback(self._truth, self._period)
                self._clim = clim.load()
            except SchemaError as exc:  # e.g. less than a year of truth: no ACC rather than no verification
                self.unavailable = str(exc)
                return None
        return climatology_forecast(self._clim, init_times=init_times, leads=leads)


def _combine_models(parts: Mapping[str, list[xr.DataArray]]) -> xr.Dataset:
    per_model = []
    for model, arrays in parts.items():
        joined = xr.concat(arrays, dim=REGION, join="outer") if len(arrays) > 1 else arrays[0]
        per_model.append(joined.expand_dims({MODEL: [model]}))
    combined = xr.concat(per_model, dim=MODEL, join="outer")
    combined = combined.transpose(MODEL, METRIC, VARIABLE, LEAD, REGION)
    return combined.to_dataset(name="score")


def scores_to_frame(scores: xr.Dataset) -> pd.DataFrame:
    """One row per (model, metric, variable, lead, region) with ``value``; leads in hours; NaN rows dropped."""
    frame = scores["score"].to_dataframe(name="value").reset_index()
    frame["lead_hours"] = frame[LEAD] / pd.Timedelta(hours=1)
    frame = frame.drop(columns=[LEAD])
    frame = frame.dropna(subset=["value"])
    return frame[[MODEL, METRIC, VARIABLE, "lead_hours", REGION, "value"]]


def _units_of(variable: str, forecast: xr.Dataset) -> str:
    base = variable.split("@")[0]
    return str(forecast[base].attrs.get("units", "")) if base in forecast.data_vars else ""


def _write_outputs(tmp: Path, *, scores, scorecard, grids, station_tables, forecast, truth, observations, model,
                   reference, plots, notes) -> list[Path]:
    files: list[Path] = []
    units = {str(v): _units_of(str(v), forecast) for v in scores[VARIABLE].values}
    scores = scores.assign_coords(units=(VARIABLE, [units[str(v)] for v in scores[VARIABLE].values]))
    _to_netcdf(scores, tmp / "scores.nc")
    scores_to_frame(scores).to_csv(tmp / "scores.csv", index=False)
    files += [tmp / "scores.nc", tmp / "scores.csv"]
    if scorecard is not None:
        _to_netcdf(scorecard, tmp / "scorecard.nc")
        scorecard_to_frame(scorecard).to_csv(tmp / "scorecard.csv", index=False)
        (tmp / "scorecard.md").write_text(scorecard_markdown(scorecard))
        files += [tmp / "scorecard.nc", tmp / "scorecard.csv", tmp / "scorecard.md"]
    if station_tables:
        stations = xr.concat([a.expand_dims({MODEL: [k]}) for k, a in station_tables.items()], dim=MODEL, join="outer")
        _to_netcdf(stations.to_dataset(name="station_score"), tmp / "station_scores.nc")
        files.append(tmp / "station_scores.nc")
    ranks = {k: g.rank_histogram for k, g in grids.items() if g.rank_histogram is not None}
    if ranks:
        rank_ds = xr.concat([a.expand_dims({MODEL: [k]}) for k, a in ranks.items()], dim=MODEL, join="outer")
        _to_netcdf(rank_ds.to_dataset(name="count"), tmp / "rank_histogram.nc")
        files.append(tmp / "rank_histogram.nc")
    spectra = {k: g.spectra for k, g in grids.items() if g.spectra is not None}
    if spectra:
        spec_ds = xr.concat([a.expand_dims({MODEL: [k]}) for k, a in spectra.items()], dim=MODEL, join="outer")
        _to_netcdf(spec_ds.to_dataset(name="power"), tmp / "spectra.nc")
        files.append(tmp / "spectra.nc")
    if plots:
        from forecasting.verification.report_plots import make_plots

        files += make_plots(tmp / "plots", scores=scores, scorecard=scorecard, ranks=ranks, spectra=spectra,
                            forecast=forecast, truth=truth, observations=observations, model=model)
    (tmp / "summary.md").write_text(
        _summary(scores, scorecard, model=model, reference=reference, files=files, root=tmp, notes=notes,
                 small_scales=_small_scale_table(spectra, shortest_km=truth_resolution_km(truth))))
    files.append(tmp / "summary.md")
    return files


def _to_netcdf(ds: xr.Dataset, path: Path) -> None:
    out = ds.copy()
    for name in list(out.coords) + list(out.data_vars):
        if out[name].dtype == object or str(out[name].dtype).startswith("string") or out[name].dtype.kind == "U":
            out[name] = out[name].astype(str)
    out.to_netcdf(path)


def summary_table(scores: xr.Dataset, *, region: str, metric: str, leads: Sequence[np.timedelta64] | None = None) -> str:
    """A Markdown table: rows = (variable, model), columns = leads, for one metric and region."""
    if metric not in scores[METRIC].values or region not in scores[REGION].values:
        return ""
    data = scores["score"].sel({METRIC: metric, REGION: region})
    lead_values = data[LEAD].values if leads is None else np.asarray(leads)
    header = "| variable | model | " + " | ".join(_lead_label(x) for x in lead_values) + " |"
    lines = [header, "|" + "---|" * (2 + len(lead_values))]
    for variable in data[VARIABLE].values:
        for model in data[MODEL].values:
            row = data.sel({VARIABLE: variable, MODEL: model, LEAD: lead_values})
            if bool(row.isnull().all()):
                continue
            cells = " | ".join("" if np.isnan(v) else f"{v:.4g}" for v in row.values)
            lines.append(f"| {variable} | {model} | {cells} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _lead_label(lead) -> str:
    hours = pd.Timedelta(lead) / pd.Timedelta(hours=1)
    return f"{hours:g} h"


def _small_scale_table(spectra: Mapping[str, xr.DataArray], *, shortest_km: float | None = None) -> str:
    """A Markdown table of the power at the finest resolved scales (:func:`small_scale_band`) relative to the
    truth's (2-D DCT spectra of limited-area grids), per variable and model (members and, for ensembles, the
    ensemble mean) at each lead, under a line naming the band; empty for zonal spectra or none."""
    from forecasting.verification.spectra import (
        WAVELENGTH,
        small_scale_band,
        small_scale_power_ratio,
    )

    regional = {k: a for k, a in spectra.items() if "lat_band" not in a.dims}
    if not regional:
        return ""
    first = next(iter(regional.values()))
    leads = first[LEAD].values
    band = small_scale_band(first[WAVELENGTH].values, shortest_km)
    if shortest_km is not None and band[0] >= shortest_km:
        where = (f"The truth is a spectral model's output that resolves wavelengths down to {shortest_km:.0f} km "
                 f"(its `spectral_truncation`); the finest third of the bands at or above that, {band[0]:.0f}-"
                 f"{band[1]:.0f} km, are compared.")
    else:
        where = f"The finest third of the grid's bands, {band[0]:.0f}-{band[1]:.0f} km, are compared."
    lines = [where, "", "| variable | model | " + " | ".join(_lead_label(x) for x in leads) + " |",
             "|" + "---|" * (2 + len(leads))]
    for variable in first[VARIABLE].values:
        truth = first.sel({"source": "truth", VARIABLE: variable})
        for model, spectrum in regional.items():
            for source, label in (("forecast", model), ("ensemble_mean", f"{model} (ensemble mean)")):
                if source not in spectrum["source"].values:
                    continue
                ratio = small_scale_power_ratio(spectrum.sel({"source": source, VARIABLE: variable}), truth,
                                                wavelengths_km=band)
                cells = " | ".join("" if np.isnan(v) else f"{v:.3f}" for v in ratio.sel({LEAD: leads}).values)
                lines.append(f"| {variable} | {label} | {cells} |")
    return "\n".join(lines)


def _summary(scores: xr.Dataset, scorecard, *, model: str, reference: str | None, files, root: Path,
             notes: Sequence[str] = (), small_scales: str = "") -> str:
    lines = [f"# Verification of {model}", ""]
    attrs = scores.attrs
    lines.append(f"Forecast `{attrs.get('forecast')}`: {attrs.get('n_start_times')} start times, "
                 f"{attrs.get('n_members')} member(s). Truth `{attrs.get('truth')}`; observations "
                 f"`{attrs.get('observations')}`; reference `{reference}`.")
    lines.append("")
    lines.append("RMSE is the square root of the start-time mean of the area-weighted spatial-mean squared error "
                 "(WeatherBench2); deterministic scores of an ensemble are those of its mean.")
    lines += [f"\nNote: {note}" for note in notes]
    for region in scores[REGION].values:
        for metric in ("rmse", "crps", "spread_skill_ratio", "acc"):
            table = summary_table(scores, region=str(region), metric=metric)
            if table:
                lines += ["", f"## {metric} — {region}", "", table]
    if small_scales:
        explanation = ("Power at the finest resolved scales relative to the truth's (2-D DCT spectra, Denis et al. "
                       "2002; members: their mean spectrum); 1 restores the truth's small-scale variance.")
        lines += ["", "## Small-scale variance restored", "", explanation, "", small_scales]
    if scorecard is not None:
        lines += ["", f"## Scorecard: {model} against {reference}", "",
                  "Skill in % (positive: better than the reference); * marks a 95% paired-bootstrap interval "
                  "(start times resampled in blocks; see the scorecard) that excludes 0.", "",
                  scorecard_markdown(scorecard)]
    pngs = [f for f in files if f.suffix == ".png"]
    if pngs:
        lines += ["", "## Plots", ""]
        lines += [f"![{p.stem}]({p.relative_to(root)})" for p in pngs]
    return "\n".join(lines) + "\n"
