"""`forecast baseline` + `forecast verify` end to end: scores, scorecard, plots; errors for mismatches."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from forecasting.cli import main
from forecasting.data.observations import dataset_to_observations, observations_to_dataset
from forecasting.data.store import write_observation_store, write_store
from forecasting.verification import metrics


def _truth(n_days: int = 365, seed: int = 0) -> xr.Dataset:
    """A 6-hourly global 16x32 'analysis' with a travelling wave, a seasonal cycle and weather noise."""
    rng = np.random.default_rng(seed)
    time = pd.date_range("2001-01-01", periods=4 * n_days, freq="6h")
    lat = np.linspace(-84.375, 84.375, 16)
    lon = np.arange(32) * 11.25
    t = np.arange(time.size)[:, None, None] / 4.0
    la = np.deg2rad(lat)[None, :, None]
    lo = np.deg2rad(lon)[None, None, :]
    wave = 8 * np.cos(la) * np.sin(3 * lo - 0.5 * t)
    noise = np.cumsum(rng.normal(0, 0.8, (time.size, 16, 32)), axis=0) * 0.3
    t2m = 285 - 25 * np.sin(la) ** 2 + wave + noise
    z = 54000 + 800 * np.cos(la) ** 2 + 60 * wave[:, None] * np.ones((1, 1, 1, 1)) + 30 * noise[:, None]
    return xr.Dataset(
        {
            "2m_temperature": (("time", "latitude", "longitude"), t2m.astype("float32"), {"units": "K"}),
            "geopotential": (("time", "level", "latitude", "longitude"), z.astype("float32"), {"units": "m**2 s**-2"}),
        },
        coords={"time": time, "level": ("level", [500.0], {"units": "hPa"}), "latitude": lat, "longitude": lon},
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    truth = _truth()
    write_store(truth, root / "truth.zarr", train_period=("2001-01-01", "2001-09-30"))
    # 12 stations observing the truth with noise
    rng = np.random.default_rng(3)
    lat = rng.uniform(-60, 60, 12)
    lon = rng.uniform(0, 360, 12)
    from forecasting.verification.stations import interpolate_to_points

    at = interpolate_to_points(truth["2m_temperature"], latitude=lat, longitude=lon)
    values = at.values + rng.normal(0, 0.5, at.shape)
    obs = xr.Dataset(
        {"2m_temperature": (("time", "station"), values.astype("float32"), {"units": "K"})},
        coords={"time": truth.time.values, "station_id": ("station", [f"S{i:02d}" for i in range(12)]),
                "latitude": ("station", lat), "longitude": ("station", lon), "elevation": ("station", np.zeros(12))},
    )
    write_observation_store(observations_to_dataset(dataset_to_observations(obs)), root / "obs.zarr")
    return root, truth


def test_baseline_then_verify_writes_scores_scorecard_and_plots(setup, capsys):
    root, truth = setup
    fc = root / "clim.zarr"
    assert main(["baseline", "climatology", "--truth", str(root / "truth.zarr"), "--out", str(fc),
                 "--starts", "2001-10-01", "2001-10-12", "24h", "--steps", "8"]) == 0
    out = root / "verify-clim"
    code = main(["verify", "--forecast", str(fc), "--truth", str(root / "truth.zarr"), "--obs", str(root / "obs.zarr"),
                 "--reference", "persistence", "--out", str(out), "--bootstrap", "200", "--bootstrap-block", "2",
                 "--region", "north", "20", "80", "0", "360"])
    assert code == 0, capsys.readouterr().err
    scores = xr.open_dataset(out / "scores.nc")
    assert set(scores["score"].dims) == {"model", "metric", "variable", "prediction_timedelta", "region"}
    assert set(scores.model.values) == {"climatology", "persistence"}
    assert set(scores.region.values) == {"global", "north", "stations"}
    assert "geopotential@500" in scores.variable.values
    csv = pd.read_csv(out / "scores.csv")
    assert list(csv.columns) == ["model", "metric", "variable", "lead_hours", "region", "value"]
    for name in ("scorecard.nc", "scorecard.csv", "scorecard.md", "summary.md"):
        assert (out / name).exists(), name
    # bias has no skill score worth showing (a reference's near-zero bias makes it explode): values only
    card = xr.open_dataset(out / "scorecard.nc")
    assert "bias" not in card.metric.values and {"rmse", "crps"} <= set(card.metric.values)
    assert set(card["block_length"].values) == {2} and "circular blocks of 2" in (out / "scorecard.md").read_text()
    assert "bias" in scores.metric.values
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert any(p.startswith("rmse_") for p in pngs) and any(p.startswith("scorecard_") for p in pngs)
    assert any(p.startswith("spectra_") for p in pngs) and any(p.startswith("map_") for p in pngs)
    assert any(p.startswith("plume_") for p in pngs)
    # the reference's scores are exactly those of the metric functions on the same fields
    written = xr.open_zarr(fc)
    starts, leads = written.time.values, written.prediction_timedelta.values
    from forecasting.verification.baselines import persistence_forecast
    from forecasting.verification.gridded import truth_at_valid_times

    pf = persistence_forecast(truth, init_times=starts, leads=leads)
    tv = truth_at_valid_times(truth, pf)
    expected = metrics.rmse(pf["2m_temperature"].isel(realization=0), tv["2m_temperature"],
                            preserve_dims=("prediction_timedelta",))
    got = scores["score"].sel(model="persistence", metric="rmse", variable="2m_temperature", region="global")
    np.testing.assert_allclose(got.values, expected.values, rtol=1e-5)


def test_verify_refuses_mismatched_grids_and_existing_output(setup, tmp_path, capsys):
    root, truth = setup
    other = truth.isel(latitude=slice(0, 12))
    write_store(other, tmp_path / "other.zarr")
    fc = tmp_path / "p.zarr"
    assert main(["baseline", "persistence", "--truth", str(tmp_path / "other.zarr"), "--out", str(fc),
                 "--start", "2001-01-05", "--steps", "4"]) == 0
    out = tmp_path / "v"
    code = main(["verify", "--forecast", str(fc), "--truth", str(root / "truth.zarr"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code != 0 and "grids differ in latitude" in err
    assert not out.exists()
    out.mkdir()
    code = main(["verify", "--forecast", str(fc), "--truth", str(tmp_path / "other.zarr"), "--out", str(out)])
    assert code != 0 and "already exists" in capsys.readouterr().err


def test_verify_refuses_different_units(setup, tmp_path, capsys):
    root, truth = setup
    celsius = truth.copy()
    celsius["2m_temperature"] = (truth["2m_temperature"] - 273.15).assign_attrs(units="degC")
    from forecasting.schema import analysis_as_forecast

    fc = analysis_as_forecast(celsius[["2m_temperature"]].isel(time=slice(0, 4)))
    fc.to_zarr(tmp_path / "c.zarr")
    code = main(["verify", "--forecast", str(tmp_path / "c.zarr"), "--truth", str(root / "truth.zarr"),
                 "--out", str(tmp_path / "v"), "--no-plots"])
    err = capsys.readouterr().err
    assert code != 0 and "'degC'" in err and "canonical units are 'K'" in err
    assert not (tmp_path / "v").exists()


def test_quebec_gauges_against_era5_land(real_data, tmp_path, capsys):
    grid = tmp_path / "quebec.zarr"
    gauges = tmp_path / "gauges.zarr"
    assert main(["ingest", str(real_data / "era5land-quebec-1970-daily.nc"), "--out", str(grid), "--quiet",
                 "--units", "tasmax=degC", "--units", "tasmin=degC"]) == 0
    assert main(["ingest", str(real_data / "stations-quebec-1970-daily-precip.nc"), "--out", str(gauges),
                 "--quiet"]) == 0
    out = tmp_path / "v"
    code = main(["verify", "--forecast", str(grid), "--obs", str(gauges), "--out", str(out),
                 "--station-method", "nearest"])
    assert code == 0, capsys.readouterr().err
    scores = xr.open_dataset(out / "scores.nc")["score"].sel(region="stations", variable="total_precipitation_24hr")
    rmse = float(scores.sel(metric="rmse").squeeze())
    # daily precipitation at gauges vs the 0.1-degree grid: a few mm/day of representativeness error
    assert 0.002 < rmse < 0.008
    assert (out / "plots").exists()
