"""Station verification: interpolation to points, valid-time matching and streamed scores."""

from __future__ import annotations

from pathlib import Path

import dask.array
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from forecasting.errors import SchemaError
from forecasting.verification import metrics
from forecasting.verification.stations import (
    STATION_METRICS,
    interpolate_to_points,
    match_valid_times,
    per_start_scores,
    score_stations,
    verify_stations,
)

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
NAME = "2m_temperature"


def _linear_field(lat: np.ndarray, lon: np.ndarray, *, unwrapped_lon: np.ndarray | None = None) -> xr.DataArray:
    """f = 2 lat + 0.5 lon' + 3 on (time=2, latitude, longitude); lon' = ``unwrapped_lon`` or lon."""
    x = lon if unwrapped_lon is None else unwrapped_lon
    values = 2.0 * lat[:, None] + 0.5 * x[None, :] + 3.0
    values = np.stack([values, values + 1.0])
    return xr.DataArray(
        values, dims=("time", "latitude", "longitude"),
        coords={"time": pd.date_range("2000-01-01", periods=2), "latitude": lat, "longitude": lon},
        name=NAME, attrs={"units": "K"},
    )


def test_bilinear_is_exact_on_a_field_linear_in_latitude_and_longitude():
    lat = np.arange(40.0, 50.01, 0.5)
    lon = np.arange(280.0, 290.01, 0.25)
    field = _linear_field(lat, lon)
    rng = np.random.default_rng(1)
    plat = rng.uniform(40.0, 50.0, 25)
    plon = rng.uniform(280.0, 290.0, 25) - 360.0  # -180..180 input is taken modulo 360
    out = interpolate_to_points(field, latitude=plat, longitude=plon)
    assert out.dims == ("time", "station")
    expected = 2.0 * plat + 0.5 * (plon + 360.0) + 3.0
    np.testing.assert_allclose(out.isel(time=0).values, expected, rtol=0, atol=1e-10)
    np.testing.assert_allclose(out.isel(time=1).values, expected + 1.0, rtol=0, atol=1e-10)
    np.testing.assert_allclose(out["longitude"].values, plon + 360.0)
    assert out.attrs == {"units": "K"}


def test_nearest_picks_the_nearest_grid_point():
    lat = np.array([0.0, 1.0, 2.0])
    lon = np.array([10.0, 11.0, 12.0, 13.0])
    field = _linear_field(lat, lon)
    out = interpolate_to_points(field, latitude=[0.4, 1.6, 2.0], longitude=[10.6, 12.2, 13.0], method="nearest")
    picked = [field.sel(latitude=a, longitude=b).values for a, b in [(0.0, 11.0), (2.0, 12.0), (2.0, 13.0)]]
    np.testing.assert_array_equal(out.values, np.stack(picked, axis=-1))


def test_global_grid_is_periodic_across_360():
    lat = np.array([-10.0, 0.0, 10.0])
    lon = np.arange(0.0, 360.0, 1.0)
    values = np.cos(np.deg2rad(lon))[None, :] * np.ones((3, 1))
    field = xr.DataArray(values, dims=("latitude", "longitude"), coords={"latitude": lat, "longitude": lon})
    out = interpolate_to_points(field, latitude=[0.0, 5.0, 0.0], longitude=[359.25, 359.5, -0.5])
    c359, c0 = np.cos(np.deg2rad(359.0)), 1.0
    np.testing.assert_allclose(out.values, [0.75 * c359 + 0.25 * c0, 0.5 * c359 + 0.5 * c0, 0.5 * c359 + 0.5 * c0])
    nearest = interpolate_to_points(field, latitude=[0.0], longitude=[359.75], method="nearest")
    assert float(nearest[0]) == c0  # 359.75 is nearer to 0E than to 359E
    poles = interpolate_to_points(field, latitude=[89.0, -89.0], longitude=[0.0, 0.0])
    np.testing.assert_allclose(poles.values, [1.0, 1.0])  # beyond the last row: that row's value


def test_regional_grid_across_0e_is_unwrapped():
    lat = np.array([50.0, 51.0, 52.0])
    lon = np.concatenate([np.arange(0.0, 2.01, 0.25), np.arange(350.0, 360.0, 0.25)])  # stored 0..360 ascending
    field = _linear_field(lat, lon, unwrapped_lon=np.where(lon >= 180.0, lon - 360.0, lon))
    plat = np.array([50.5, 51.0, 51.5, 52.0])
    plon = np.array([359.9, 0.1, -8.0, 2.0])
    out = interpolate_to_points(field, latitude=plat, longitude=plon).isel(time=0)
    np.testing.assert_allclose(out.values, 2.0 * plat + 0.5 * np.array([-0.1, 0.1, -8.0, 2.0]) + 3.0, atol=1e-10)


def test_points_outside_a_regional_grid_are_named_or_nan():
    lat = np.arange(44.0, 47.01, 0.5)
    lon = np.arange(285.0, 288.01, 0.5)
    field = _linear_field(lat, lon)
    points = xr.Dataset(
        coords={
            "station_id": ("station", ["A", "FAR", "B"]),
            "latitude": ("station", [45.0, 60.0, 46.0]),
            "longitude": ("station", [286.0, 286.0, 287.0]),
        }
    )
    with pytest.raises(SchemaError, match=r"FAR \(60\.000N, 286\.000E\)"):
        interpolate_to_points(field, latitude=points["latitude"], longitude=points["longitude"])
    out = interpolate_to_points(field, latitude=points["latitude"], longitude=points["longitude"], outside="nan")
    assert out["station_id"].values.tolist() == ["A", "FAR", "B"]
    assert np.isnan(out.sel(station=1)).all() and np.isfinite(out.sel(station=[0, 2])).all()


def test_a_nan_neighbour_of_zero_weight_does_not_spoil_a_point_on_a_node():
    lat = np.array([0.0, 1.0])
    lon = np.array([0.0, 1.0, 2.0])
    values = np.array([[1.0, 2.0, np.nan], [4.0, 5.0, 6.0]])
    field = xr.DataArray(values, dims=("latitude", "longitude"), coords={"latitude": lat, "longitude": lon})
    out = interpolate_to_points(field, latitude=[0.0, 0.0, 0.5], longitude=[1.0, 1.5, 0.5])
    np.testing.assert_allclose(out.values[[0, 2]], [2.0, 3.0])
    assert np.isnan(out.values[1])  # a NaN corner with weight 0.5 gives NaN


def test_interpolation_stays_lazy_on_dask_and_handles_datasets():
    lat = np.arange(0.0, 10.01, 1.0)
    lon = np.arange(0.0, 360.0, 2.0)
    field = _linear_field(lat, lon).to_dataset().assign(mask=xr.DataArray(np.ones(lat.size), dims="latitude"))
    field = field.assign(scalar=xr.DataArray(7.0))
    lazy = interpolate_to_points(field.chunk({"time": 1, "longitude": 45}), latitude=[2.5, 7.25], longitude=[10.0, 101.0])
    assert isinstance(lazy[NAME].data, dask.array.Array)
    eager = interpolate_to_points(field, latitude=[2.5, 7.25], longitude=[10.0, 101.0])
    xr.testing.assert_allclose(lazy.compute(), eager)
    assert set(eager[NAME].dims) == {"time", "station"} and "station" not in eager["scalar"].dims


def _observations(times: pd.DatetimeIndex, n_station: int, *, seed: int, missing: float = 0.3) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    values = 280.0 + rng.standard_normal((len(times), n_station))
    values[rng.random(values.shape) < missing] = np.nan
    return xr.Dataset(
        {NAME: (("time", "station"), values, {"units": "K"})},
        coords={
            "time": times,
            "station_id": ("station", np.array([f"S{i:02d}" for i in range(n_station)], dtype=object)),
            "latitude": ("station", rng.uniform(-60.0, 60.0, n_station)),
            "longitude": ("station", rng.uniform(0.0, 360.0, n_station)),
            "elevation": ("station", rng.uniform(0.0, 500.0, n_station)),
        },
    )


def _forecast(n_time: int, n_member: int, *, seed: int, offset: float = 0.0) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    lat = np.linspace(-80.0, 80.0, 9)
    lon = np.arange(0.0, 360.0, 20.0)
    times = pd.date_range("2000-01-01", periods=n_time, freq="12h")
    leads = pd.to_timedelta([0, 12, 24], unit="h")
    values = 280.0 + offset + rng.standard_normal((n_time, len(leads), n_member, lat.size, lon.size))
    ds = xr.Dataset(
        {NAME: (("time", "prediction_timedelta", "realization", "latitude", "longitude"), values, {"units": "K"})},
        coords={
            "time": times, "prediction_timedelta": leads, "realization": np.arange(n_member),
            "latitude": lat, "longitude": lon,
        },
    )
    return ds.assign_coords(valid_time=ds["time"] + ds["prediction_timedelta"])


def test_match_valid_times_selects_observations_at_valid_time_and_by_station_id():
    times = pd.date_range("2000-01-01", periods=5, freq="12h")  # up to 2000-01-03 00:00
    obs = _observations(times, 3, seed=0, missing=0.0)
    fc = interpolate_to_points(_forecast(4, 1, seed=0), latitude=obs["latitude"], longitude=obs["longitude"])
    fc = fc.isel(station=[2, 0])  # another order and a subset
    matched = match_valid_times(fc, obs)
    assert matched[NAME].dims == ("time", "prediction_timedelta", "station")
    assert matched["station_id"].values.tolist() == ["S02", "S00"]
    # init 2000-01-02 00:00 + 12 h = 2000-01-02 12:00, the fourth observation time
    np.testing.assert_array_equal(
        matched[NAME].isel(time=2, prediction_timedelta=1).values, obs[NAME].isel(time=3, station=[2, 0]).values
    )
    # init 2000-01-02 12:00 + 24 h = 2000-01-03 12:00 lies beyond the observations
    assert np.isnan(matched[NAME].isel(time=3, prediction_timedelta=2)).all()
    np.testing.assert_array_equal(matched["valid_time"].values, fc["valid_time"].values)


def test_streamed_scores_equal_one_go_and_the_metrics_module():
    times = pd.date_range("2000-01-01", periods=20, freq="6h")
    obs = _observations(times, 11, seed=2)
    fc = _forecast(7, 4, seed=3)
    chosen = list(STATION_METRICS)
    streamed = verify_stations(fc, obs, metrics=chosen, chunk_starts=2)
    at_once = verify_stations(fc, obs, metrics=chosen, chunk_starts=100)
    xr.testing.assert_allclose(streamed.scores, at_once.scores, rtol=1e-12)
    xr.testing.assert_allclose(streamed.per_start, at_once.per_start, rtol=1e-12)

    at_stations = interpolate_to_points(fc, latitude=obs["latitude"], longitude=obs["longitude"])
    truth = match_valid_times(at_stations, obs)
    f, o = at_stations[NAME], truth[NAME]
    for name in ("rmse", "mse", "mae", "bias", "crps", "fair_crps", "ensemble_mean_rmse", "spread", "spread_skill_ratio"):
        fn = metrics.METRICS[name].function
        overall = fn(f, o, preserve_dims=["prediction_timedelta"], weights=None)
        np.testing.assert_allclose(
            streamed.scores["score"].sel(metric=name, variable=NAME).values, overall.values, rtol=1e-10, err_msg=name
        )
        station = fn(f, o, preserve_dims=["prediction_timedelta", "station"], weights=None)
        np.testing.assert_allclose(
            streamed.scores["station_score"].sel(metric=name, variable=NAME).values,
            station.transpose("prediction_timedelta", "station").values, rtol=1e-10, err_msg=name,
        )
        start = fn(f, o, preserve_dims=["time", "prediction_timedelta"], weights=None)
        np.testing.assert_allclose(
            streamed.per_start["score"].sel(metric=name, variable=NAME).values, start.values, rtol=1e-10, err_msg=name
        )
    # the root mean square over start times of per-start RMSEs is the overall RMSE (what the bootstrap uses)
    per_start_rmse = streamed.per_start["score"].sel(metric="rmse", variable=NAME)
    np.testing.assert_allclose(
        np.sqrt((per_start_rmse**2).mean("time")).values, streamed.scores["score"].sel(metric="rmse", variable=NAME).values
    )
    counts = streamed.scores
    assert int(counts["count"].sum()) == int(counts["station_count"].sum()) == int(streamed.per_start["count"].sum())


def test_correlation_equals_pooled_pearson_when_nothing_is_missing():
    times = pd.date_range("2000-01-01", periods=20, freq="6h")
    obs = _observations(times, 6, seed=4, missing=0.0)
    fc = _forecast(5, 3, seed=5)
    scores = score_stations(fc, obs, metrics=["correlation"], chunk_starts=2)
    at_stations = interpolate_to_points(fc, latitude=obs["latitude"], longitude=obs["longitude"])
    truth = match_valid_times(at_stations, obs)
    mean = at_stations[NAME].mean("realization")
    for k in range(3):
        a = mean.isel(prediction_timedelta=k).values.ravel()
        b = truth[NAME].isel(prediction_timedelta=k).values.ravel()
        got = float(scores["score"].isel(metric=0, variable=0, prediction_timedelta=k))
        np.testing.assert_allclose(got, np.corrcoef(a, b)[0, 1], rtol=1e-9)


def test_streaming_runs_lazily_under_a_dask_cluster():
    from distributed import Client, LocalCluster

    times = pd.date_range("2000-01-01", periods=20, freq="6h")
    obs = _observations(times, 5, seed=6)
    fc = _forecast(6, 2, seed=7)
    eager = per_start_scores(fc, obs, metrics=["rmse", "crps"], chunk_starts=4)
    cluster = LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None)
    with cluster, Client(cluster):
        lazy = per_start_scores(
            fc.chunk({"time": 2, "longitude": 9}), obs.chunk({"time": 5}), metrics=["rmse", "crps"], chunk_starts=4
        )
    xr.testing.assert_allclose(lazy, eager)
    assert lazy["score"].dims == ("metric", "variable", "time", "prediction_timedelta")


def test_verification_refuses_mismatched_units_levels_metrics_and_member_counts():
    times = pd.date_range("2000-01-01", periods=12, freq="6h")
    obs = _observations(times, 3, seed=8)
    fc = _forecast(3, 1, seed=9)
    with pytest.raises(SchemaError, match="'degC'"):
        score_stations(fc, obs.assign({NAME: obs[NAME].assign_attrs(units="degC")}), metrics=["rmse"])
    with pytest.raises(SchemaError, match="unknown station metrics"):
        score_stations(fc, obs, metrics=["acc"])
    with pytest.raises(SchemaError, match="at least 2 members"):
        score_stations(fc, obs, metrics=["fair_crps"])
    with_level = fc.assign({NAME: fc[NAME].expand_dims(level=[850.0], axis=3)})
    with pytest.raises(SchemaError, match="level"):
        score_stations(with_level, obs, metrics=["rmse"])
    one_member = score_stations(fc, obs, metrics=["crps", "mae"])
    xr.testing.assert_allclose(  # one member: the CRPS is the absolute error
        one_member["score"].sel(metric="crps", drop=True), one_member["score"].sel(metric="mae", drop=True)
    )


def test_era5_land_precipitation_against_quebec_rain_gauges():
    grid_path = REAL_DATA / "era5land-quebec-1970-daily.nc"
    gauge_path = REAL_DATA / "stations-quebec-1970-daily-precip.nc"
    if not (grid_path.exists() and gauge_path.exists()):
        pytest.skip(f"real Quebec precipitation files not found in {REAL_DATA} (../shared/data/real)")
    name = "total_precipitation_24hr"
    with xr.open_dataset(grid_path) as grid_file, xr.open_dataset(gauge_path) as gauge_file:
        assert grid_file["tp"].attrs["units"] == gauge_file["precip"].attrs["units"] == "mm d-1"
        tp = (grid_file["tp"].load() * 1e-3).transpose("time", "latitude", "longitude")  # mm/day -> m per day
        tp = tp.assign_coords(longitude=tp["longitude"] % 360.0).sortby("latitude")
        forecast = (
            xr.Dataset({name: tp.assign_attrs(units="m")})
            .expand_dims(prediction_timedelta=[np.timedelta64(0, "ns")], realization=[0])
            .transpose("time", "prediction_timedelta", "realization", "latitude", "longitude")
        )
        gauges = gauge_file.load()
    observations = xr.Dataset(
        {name: (("time", "station"), gauges["precip"].transpose("time", "station").values * 1e-3, {"units": "m"})},
        coords={
            "time": gauges["time"].values,
            "station_id": ("station", [str(int(v)) for v in gauges["StationID_SEQ"].values]),
            "latitude": ("station", gauges["latitude"].values),
            "longitude": ("station", gauges["longitude"].values % 360.0),
            "elevation": ("station", gauges["altitude"].values),
        },
    )
    result = verify_stations(
        forecast, observations, metrics=["rmse", "correlation", "bias"], method="nearest", chunk_starts=64
    )
    scores = result.scores["score"].sel(variable=name).isel(prediction_timedelta=0)
    assert result.scores.sizes["station"] == 38
    assert 0.5 < float(scores.sel(metric="correlation")) < 0.7  # measured 0.586
    assert 0.002 < float(scores.sel(metric="rmse")) < 0.008  # measured 4.8 mm/day
    assert int(result.scores["count"].sum()) == int(np.isfinite(observations[name]).sum())  # every gauge value used
    station_corr = result.scores["station_score"].sel(metric="correlation", variable=name)
    assert float(station_corr.min()) > 0.3
