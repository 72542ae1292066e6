"""The plots ``forecast verify`` writes: lead-time curves, spread-skill, rank histograms, spectra, maps,
a station plume and scorecards, chosen from what the scores hold. Drawing is :mod:`forecasting.plotting`'s.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from forecasting import plotting
from forecasting.schema import LEAD, LEVEL, MEMBER, TIME, VALID_TIME
from forecasting.verification.gridded import METRIC, REGION, VARIABLE

MAX_VARIABLES = 6


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label)


def _field(ds: xr.Dataset, label: str) -> xr.DataArray:
    name, _, level = label.partition("@")
    da = ds[name]
    if level and LEVEL in da.dims:
        da = da.sel({LEVEL: float(level)})
    return da


def make_plots(
    folder: Path,
    *,
    scores: xr.Dataset,
    scorecard: xr.Dataset | None,
    ranks: dict[str, xr.DataArray],
    spectra: dict[str, xr.DataArray],
    forecast: xr.Dataset,
    truth: xr.Dataset | None,
    observations: xr.Dataset | None,
    model: str,
) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    variables = [str(v) for v in scores[VARIABLE].values][:MAX_VARIABLES]
    metrics = [str(m) for m in scores[METRIC].values]
    regions = [str(r) for r in scores[REGION].values]
    score = scores["score"]
    for variable in variables:
        for metric in ("rmse", "crps", "acc"):
            if metric not in metrics:
                continue
            for region in regions:
                data = score.sel({METRIC: [metric], VARIABLE: [variable], REGION: [region]})
                if bool(data.isnull().all()):
                    continue
                path = folder / f"{metric}_{_safe(variable)}_{_safe(region)}.png"
                files.append(plotting.plot_lead_time_curves(scores.sel({REGION: [region]}), path, metric=metric,
                                                            variable=variable, region=region))
        if "spread" in metrics and "ensemble_mean_rmse" in metrics:
            region = regions[0]
            n_member = int(forecast.sizes[MEMBER])
            spread = score.sel({METRIC: "spread", VARIABLE: variable, REGION: region}) * np.sqrt((n_member + 1) / n_member)
            rmse = score.sel({METRIC: "ensemble_mean_rmse", VARIABLE: variable, REGION: region})
            keep = rmse.notnull().any(LEAD) & spread.notnull().any(LEAD)
            if bool(keep.any()):
                spread, rmse = spread.sel(model=keep), rmse.sel(model=keep)
                spread.attrs["units"] = rmse.attrs["units"] = str(score["units"].sel({VARIABLE: variable}).item()) \
                    if "units" in score.coords else ""
                path = folder / f"spread_skill_{_safe(variable)}.png"
                files.append(plotting.plot_spread_skill(
                    spread, rmse, path, variable=variable,
                    title=f"Spread (corrected) and ensemble-mean RMSE of {variable} ({region})"))
    for name, hist in ranks.items():
        for variable in [str(v) for v in hist[VARIABLE].values][:MAX_VARIABLES]:
            leads = hist[LEAD].values
            pick = leads[np.unique(np.linspace(0, len(leads) - 1, min(4, len(leads))).astype(int))]
            data = hist.sel({VARIABLE: variable, REGION: str(hist[REGION].values[0]), LEAD: pick})
            path = folder / f"rank_histogram_{_safe(name)}_{_safe(variable)}.png"
            files.append(plotting.plot_rank_histogram(data, path, title=f"Rank histogram of {variable}: {name}"))
    if spectra:
        files += _spectra_plots(folder, spectra, forecast=forecast)
    if truth is not None:
        files += _maps(folder, forecast=forecast, truth=truth, variables=variables, model=model)
    if observations is not None:
        files += _plume(folder, forecast=forecast, observations=observations)
    if scorecard is not None:
        for region in [str(r) for r in scorecard[REGION].values]:
            card = scorecard.sel({REGION: [region]})
            for metric in [str(m) for m in scorecard[METRIC].values]:
                if bool(card["skill"].sel({METRIC: metric}).isnull().all()):
                    continue
                path = folder / f"scorecard_{metric}_{_safe(region)}.png"
                files.append(plotting.plot_scorecard(
                    card, path, metric=metric,
                    title=f"{scorecard.attrs.get('model')} vs {scorecard.attrs.get('reference')}: "
                          f"{metric} skill ({region})"))
    return files


def _spectra_plots(folder: Path, spectra: dict[str, xr.DataArray], *, forecast: xr.Dataset) -> list[Path]:
    files = []
    first = next(iter(spectra.values()))
    last_lead = first[LEAD].values[-1]
    for variable in [str(v) for v in first[VARIABLE].values][:MAX_VARIABLES]:
        lines = []
        for k, a in spectra.items():
            lines.append(a.sel({"source": "forecast", VARIABLE: variable, LEAD: last_lead}, drop=True)
                         .expand_dims(model=[k]))
            if "ensemble_mean" in a["source"].values:  # regional spectra of an ensemble: its mean too
                mean = a.sel({"source": "ensemble_mean", VARIABLE: variable, LEAD: last_lead}, drop=True)
                if not bool(mean.isnull().all()):
                    lines.append(mean.expand_dims(model=[f"{k} (ensemble mean)"]))
        lines.append(first.sel({"source": "truth", VARIABLE: variable, LEAD: last_lead}, drop=True)
                     .expand_dims(model=["truth"]))
        data = xr.concat(lines, dim="model", coords="minimal", compat="override")
        units = _field(forecast, variable).attrs.get("units", "")
        data.attrs["units"] = f"({units})**2" if units else "1"
        data.name = variable
        hours = pd.Timedelta(last_lead) / pd.Timedelta(hours=1)
        path = folder / f"spectra_{_safe(variable)}.png"
        zonal = "lat_band" in first.dims
        kind = "Zonal power spectra" if zonal else "2-D DCT spectra (members: mean)"
        files.append(plotting.plot_spectra(data, path, title=f"{kind} of {variable} at lead {hours:g} h",
                                           xlabel="zonal wavenumber" if zonal else "2-D DCT wavenumber band"))
    return files


def _maps(folder: Path, *, forecast: xr.Dataset, truth: xr.Dataset, variables: list[str], model: str) -> list[Path]:
    files = []
    start = forecast[TIME].values[0]
    lead = forecast[LEAD].values[-1]
    valid = start + lead
    hours = pd.Timedelta(lead) / pd.Timedelta(hours=1)
    for variable in variables[:3]:
        name = variable.split("@")[0]
        if name not in forecast.data_vars:
            continue
        fc = _field(forecast, variable).sel({TIME: start, LEAD: lead}).isel({MEMBER: 0}, drop=True)
        fc = fc.drop_vars([c for c in fc.coords if c in (VALID_TIME, TIME, LEAD)]).load()
        fc.name = variable
        vmin, vmax = float(fc.min()), float(fc.max())
        files.append(plotting.plot_map(fc, folder / f"map_{_safe(variable)}_forecast.png", vmin=vmin, vmax=vmax,
                                       title=f"{model} {variable}, start {pd.Timestamp(start):%Y-%m-%d %H}Z + {hours:g} h"))
        if valid in truth[TIME].values:
            tr = _field(truth, variable).sel({TIME: valid}).drop_vars(TIME).load()
            tr.name = variable
            files.append(plotting.plot_map(tr, folder / f"map_{_safe(variable)}_truth.png", vmin=vmin, vmax=vmax,
                                           title=f"Truth {variable}, {pd.Timestamp(valid):%Y-%m-%d %H}Z"))
    return files


def _plume(folder: Path, *, forecast: xr.Dataset, observations: xr.Dataset) -> list[Path]:
    from forecasting.verification.stations import interpolate_to_points

    shared = [v for v in forecast.data_vars if v in observations.data_vars and LEVEL not in forecast[v].dims]
    if not shared:
        return []
    variable = shared[0]
    counts = observations[variable].notnull().sum(TIME)
    station = int(np.argmax(counts.values))
    obs = observations.isel(station=station)
    lat, lon = float(obs["latitude"]), float(obs["longitude"])
    start = forecast[TIME].values[0]
    field = forecast[variable].sel({TIME: start})
    try:
        at = interpolate_to_points(field, latitude=np.array([lat]), longitude=np.array([lon]), method="bilinear")
    except Exception:  # a station off this grid: no plume rather than a failed verification
        return []
    at = at.isel(station=0, drop=True).load()
    at.attrs["units"] = forecast[variable].attrs.get("units", "")
    station_id = str(obs["station_id"].values) if "station_id" in obs.coords else str(station)
    path = folder / f"plume_{_safe(station_id)}_{_safe(variable)}.png"
    obs_series = observations[variable].isel(station=station)
    obs_series = obs_series.drop_vars([c for c in obs_series.coords if c != TIME])
    return [plotting.plot_station_plume(at, obs_series, path, station_id=station_id, variable=variable)]
