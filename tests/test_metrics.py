"""Verification metrics and area weights: analytic values, library cross-checks, NaN and dim handling."""

from __future__ import annotations

import dask
import numpy as np
import pandas as pd
import properscoring
import pytest
import xarray as xr
import xskillscore

from forecasting.errors import SchemaError
from forecasting.verification import metrics as m
from forecasting.verification.metrics import METRICS
from forecasting.weights import area_weights, latitude_weights

MEMBER = "realization"


# ----------------------------------------------------------------------------------------------
# Small synthetic data in the forecast layout
# ----------------------------------------------------------------------------------------------
def grid_coords(n_time: int = 3, n_lat: int = 4, n_lon: int = 8) -> dict[str, np.ndarray]:
    return {
        "time": pd.date_range("2020-01-01", periods=n_time, freq="12h").to_numpy(),
        "latitude": np.linspace(-67.5, 67.5, n_lat),
        "longitude": np.arange(n_lon) * (360.0 / n_lon),
    }


def ensemble_pair(
    *, n_members: int = 5, n_time: int = 3, n_lat: int = 4, n_lon: int = 8, seed: int = 0
) -> tuple[xr.DataArray, xr.DataArray]:
    """A random ensemble forecast (time, realization, latitude, longitude) and truth (time, latitude, longitude)."""
    rng = np.random.default_rng(seed)
    coords = grid_coords(n_time, n_lat, n_lon)
    truth = xr.DataArray(
        rng.normal(size=(n_time, n_lat, n_lon)), dims=("time", "latitude", "longitude"), coords=coords, name="t"
    )
    forecast = xr.DataArray(
        rng.normal(size=(n_time, n_members, n_lat, n_lon)),
        dims=("time", MEMBER, "latitude", "longitude"),
        coords={**coords, MEMBER: np.arange(n_members)},
        name="t",
    )
    return forecast, truth


def station_pair(
    *, n_members: int = 4, n_time: int = 6, n_station: int = 5, seed: int = 1
) -> tuple[xr.DataArray, xr.DataArray]:
    """Forecast (time, realization, station) and truth (time, station) at stations, no area weights."""
    rng = np.random.default_rng(seed)
    coords = {"time": pd.date_range("2020-01-01", periods=n_time).to_numpy(), "station": np.arange(n_station)}
    truth = xr.DataArray(rng.normal(size=(n_time, n_station)), dims=("time", "station"), coords=coords, name="t")
    forecast = xr.DataArray(
        rng.normal(size=(n_time, n_members, n_station)),
        dims=("time", MEMBER, "station"),
        coords={**coords, MEMBER: np.arange(n_members)},
        name="t",
    )
    return forecast, truth


def call(name: str, forecast, truth, **kwargs):
    """Call a registered metric with the arguments its spec says it needs."""
    spec = METRICS[name]
    if spec.needs_climatology:
        kwargs["climatology"] = truth.mean("time") * 0.5
    if spec.kind == "probability":
        kwargs["threshold"] = 0.3
    return spec.function(forecast, truth, **kwargs)


# ----------------------------------------------------------------------------------------------
# Latitude weights
# ----------------------------------------------------------------------------------------------
def test_latitude_weights_of_wb2_5625_grid_match_cell_area_formula():
    lat = -87.1875 + 5.625 * np.arange(32)
    expected = np.sin(np.deg2rad(lat + 2.8125)) - np.sin(np.deg2rad(lat - 2.8125))
    expected = expected / expected.mean()
    np.testing.assert_allclose(latitude_weights(lat), expected, rtol=1e-13)
    # WeatherBench2's own construction: cell bounds at midpoints and +-90
    bounds = np.deg2rad(np.concatenate([[-90.0], (lat[1:] + lat[:-1]) / 2, [90.0]]))
    wb2 = np.diff(np.sin(bounds))
    np.testing.assert_allclose(latitude_weights(lat), wb2 / wb2.mean(), rtol=1e-13)


@pytest.mark.parametrize(
    "lat", [np.linspace(-90, 90, 721), np.linspace(-89.5, 89.5, 180), -87.1875 + 5.625 * np.arange(32)]
)
def test_latitude_weights_have_mean_one_and_are_symmetric(lat):
    weights = latitude_weights(lat)
    assert weights.mean() == pytest.approx(1.0, rel=1e-12)
    np.testing.assert_allclose(weights, weights[::-1], rtol=1e-12)
    assert np.all(weights > 0)


def test_latitude_weights_approach_normalised_cosine_on_fine_grid():
    with_poles = np.linspace(-90, 90, 721)
    cosine = np.cos(np.deg2rad(with_poles))
    np.testing.assert_allclose(latitude_weights(with_poles), cosine / cosine.mean(), atol=1e-3)
    without_poles = np.linspace(-89.875, 89.875, 720)
    cosine = np.cos(np.deg2rad(without_poles))
    np.testing.assert_allclose(latitude_weights(without_poles), cosine / cosine.mean(), rtol=1e-10)


def test_latitude_weights_fall_back_to_cosine_for_irregular_and_single_latitudes():
    irregular = np.array([-60.0, -10.0, 0.0, 45.0])
    cosine = np.cos(np.deg2rad(irregular))
    np.testing.assert_allclose(latitude_weights(irregular), cosine / cosine.mean())
    np.testing.assert_array_equal(latitude_weights(np.array([52.0])), [1.0])


def test_latitude_weights_keep_the_input_type():
    lat = xr.DataArray(np.linspace(-45, 45, 4), dims="latitude", name="latitude")
    lat = lat.assign_coords(latitude=lat.values)
    weights = latitude_weights(lat)
    assert isinstance(weights, xr.DataArray)
    assert weights.dims == ("latitude",)
    np.testing.assert_array_equal(weights["latitude"], lat.values)
    assert isinstance(latitude_weights(lat.values), np.ndarray)


def test_latitude_weights_reject_impossible_latitudes():
    with pytest.raises(SchemaError, match="within"):
        latitude_weights(np.array([0.0, 95.0]))
    with pytest.raises(SchemaError, match="1-D"):
        latitude_weights(np.zeros((2, 2)))


def test_area_weights_are_latitude_weights_on_grids_and_none_at_stations():
    forecast, truth = ensemble_pair()
    weights = area_weights(truth)
    assert weights.dims == ("latitude",)
    np.testing.assert_allclose(weights.values, latitude_weights(truth.latitude.values))
    _, station_truth = station_pair()
    station_truth = station_truth.assign_coords(latitude=("station", np.linspace(40, 50, 5)))
    assert area_weights(station_truth) is None


# ----------------------------------------------------------------------------------------------
# Deterministic scores: analytic values
# ----------------------------------------------------------------------------------------------
def test_perfect_forecast_has_zero_error_and_unit_acc():
    forecast, truth = ensemble_pair(n_members=1)
    perfect = truth.expand_dims({MEMBER: [0]}, axis=1)
    climatology = truth.mean("time")
    for metric in (m.mse, m.rmse, m.mae, m.bias):
        assert float(metric(perfect, truth)) == pytest.approx(0.0, abs=1e-15)
    assert float(m.acc(perfect, truth, climatology=climatology)) == pytest.approx(1.0, rel=1e-12)
    assert float(m.crps(perfect, truth, fair=False)) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("offset", [2.5, -1.5])
def test_constant_offset_gives_bias_and_absolute_errors(offset):
    forecast, truth = ensemble_pair(n_members=1)
    shifted = truth.expand_dims({MEMBER: [0]}, axis=1) + offset
    assert float(m.bias(shifted, truth)) == pytest.approx(offset)
    assert float(m.rmse(shifted, truth)) == pytest.approx(abs(offset))
    assert float(m.mae(shifted, truth)) == pytest.approx(abs(offset))
    assert float(m.mse(shifted, truth)) == pytest.approx(offset**2)


def test_scores_on_two_latitude_grid_use_cell_area_weights():
    # lat 0 and 60 with spacing 60: cells [-30, 30] and [30, 90], areas sin30 - sin(-30) = 1 and
    # sin90 - sin30 = 0.5, normalised weights 4/3 and 2/3. Errors 1 at lat 0 and 2 at lat 60.
    coords = {"latitude": [0.0, 60.0], "longitude": [0.0, 180.0]}
    truth = xr.DataArray(np.zeros((2, 2)), dims=("latitude", "longitude"), coords=coords)
    forecast = xr.DataArray([[1.0, 1.0], [2.0, 2.0]], dims=("latitude", "longitude"), coords=coords)
    np.testing.assert_allclose(area_weights(truth).values, [4 / 3, 2 / 3])
    assert float(m.mse(forecast, truth)) == pytest.approx((2 * 1 + 4) / 3)
    assert float(m.mae(forecast, truth)) == pytest.approx((2 * 1 + 2) / 3)
    assert float(m.bias(forecast, truth)) == pytest.approx((2 * 1 + 2) / 3)
    assert float(m.mse(forecast, truth, weights=None)) == pytest.approx(2.5)
    zonal = m.mse(forecast, truth, preserve_dims=["latitude"])
    np.testing.assert_allclose(zonal.values, [1.0, 4.0])


def test_station_weights_given_by_the_caller_weight_the_spatial_mean():
    forecast, truth = station_pair(n_members=1)
    weights = xr.DataArray([3.0, 1.0, 1.0, 1.0, 0.0], dims="station")
    error2 = ((forecast.isel({MEMBER: 0}) - truth) ** 2).values  # (time, station)
    expected = ((error2 * weights.values).sum(1) / weights.values.sum()).mean()
    assert float(m.mse(forecast, truth, weights=weights)) == pytest.approx(expected)


def test_rmse_takes_square_root_after_the_time_mean():
    coords = {"time": pd.date_range("2020-01-01", periods=2).to_numpy(), "station": np.arange(3)}
    truth = xr.DataArray(np.zeros((2, 3)), dims=("time", "station"), coords=coords)
    forecast = xr.DataArray([[1.0, 1.0, 1.0], [3.0, 3.0, 3.0]], dims=("time", "station"), coords=coords)
    per_time = m.rmse(forecast, truth, preserve_dims=["time"])
    np.testing.assert_allclose(per_time.values, [1.0, 3.0])
    assert float(m.rmse(forecast, truth)) == pytest.approx(np.sqrt(5.0))
    assert float(per_time.mean()) == pytest.approx(2.0)  # the mean of per-time RMSEs is not the RMSE


def test_rmse_averages_space_per_time_before_time_when_stations_are_missing():
    # time 0: one station observed, error 3; time 1: three stations, error 1. WeatherBench2 order gives
    # sqrt((9 + 1) / 2); pooling the four valid points would give sqrt((9 + 3) / 4).
    coords = {"time": pd.date_range("2020-01-01", periods=2).to_numpy(), "station": np.arange(3)}
    truth = xr.DataArray([[0.0, np.nan, np.nan], [0.0, 0.0, 0.0]], dims=("time", "station"), coords=coords)
    forecast = xr.DataArray([[3.0, 7.0, 7.0], [1.0, 1.0, 1.0]], dims=("time", "station"), coords=coords)
    assert float(m.rmse(forecast, truth)) == pytest.approx(np.sqrt(5.0))
    assert float(m.mse(forecast, truth, preserve_dims=["time"])[0]) == pytest.approx(9.0)


def test_acc_is_one_for_scaled_anomalies_minus_one_for_flipped_and_matches_formula():
    forecast, truth = ensemble_pair(n_members=2)
    climatology = truth.mean("time") + 0.3
    truth_anomaly = truth - climatology
    scaled = (climatology + 2.0 * truth_anomaly).expand_dims({MEMBER: [0]}, axis=1)
    flipped = (climatology - truth_anomaly).expand_dims({MEMBER: [0]}, axis=1)
    assert float(m.acc(scaled, truth, climatology=climatology)) == pytest.approx(1.0)
    assert float(m.acc(flipped, truth, climatology=climatology)) == pytest.approx(-1.0)

    result = m.acc(forecast, truth, climatology=climatology, preserve_dims=["time", MEMBER])
    w = latitude_weights(truth.latitude.values)[:, None]
    for t in range(truth.sizes["time"]):
        for k in range(2):
            fa = (forecast - climatology).isel(time=t, realization=k).values
            oa = truth_anomaly.isel(time=t).values
            expected = (w * fa * oa).sum() / np.sqrt((w * fa**2).sum() * (w * oa**2).sum())
            assert float(result.isel(time=t, realization=k)) == pytest.approx(expected, rel=1e-12)
    assert float(m.acc(forecast, truth, climatology=climatology)) == pytest.approx(float(result.mean()))


# ----------------------------------------------------------------------------------------------
# Ensemble scores: analytic values
# ----------------------------------------------------------------------------------------------
def test_crps_of_one_member_ensemble_is_mae():
    forecast, truth = ensemble_pair(n_members=1)
    xr.testing.assert_allclose(
        m.crps(forecast, truth, fair=False, preserve_dims=["time"]), m.mae(forecast, truth, preserve_dims=["time"])
    )


def test_fair_and_standard_crps_of_two_members():
    # members 0 and 2, truth 1: mean |x - y| = 1, |x1 - x2| = 2; standard 1 - 2*2/(2*4) = 0.5, fair 1 - 2*2/(2*2) = 0
    forecast = xr.DataArray([[0.0, 2.0]], dims=("station", MEMBER), coords={"station": [0]})
    truth = xr.DataArray([1.0], dims="station", coords={"station": [0]})
    assert float(m.crps(forecast, truth, fair=False)) == pytest.approx(0.5)
    assert float(m.crps(forecast, truth, fair=True)) == pytest.approx(0.0)
    with pytest.raises(SchemaError, match="at least 2"):
        m.crps(forecast.isel({MEMBER: [0]}), truth, fair=True)


def consistent_ensemble(
    *, n_members: int, n_time: int = 400, n_station: int = 100, member_scale: float = 1.0, seed: int = 7
) -> tuple[xr.DataArray, xr.DataArray]:
    """Members and truth drawn from the same distribution N(mu, 1) per case (mu varies between cases)."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=(n_time, 1, n_station)) * 3.0
    members = centre + member_scale * rng.normal(size=(n_time, n_members, n_station))
    observed = centre[:, 0, :] + rng.normal(size=(n_time, n_station))
    coords = {"time": pd.date_range("2000-01-01", periods=n_time).to_numpy(), "station": np.arange(n_station)}
    forecast = xr.DataArray(
        members, dims=("time", MEMBER, "station"), coords={**coords, MEMBER: np.arange(n_members)}
    )
    return forecast, xr.DataArray(observed, dims=("time", "station"), coords=coords)


def test_spread_skill_ratio_of_consistent_ensemble_is_one_with_the_finite_ensemble_correction():
    n_members = 4
    forecast, truth = consistent_ensemble(n_members=n_members)
    corrected = float(m.spread_skill_ratio(forecast, truth))
    plain = float(m.spread_skill_ratio(forecast, truth, corrected=False))
    assert corrected == pytest.approx(1.0, abs=0.02)
    assert plain == pytest.approx(np.sqrt(n_members / (n_members + 1)), abs=0.02)
    assert plain == pytest.approx(
        float(m.spread(forecast, truth)) / float(m.ensemble_mean_rmse(forecast, truth)), rel=1e-12
    )


def test_spread_is_root_mean_unbiased_member_variance():
    forecast, truth = station_pair(n_members=3)
    expected = np.sqrt(forecast.var(MEMBER, ddof=1).mean("station").mean("time"))
    assert float(m.spread(forecast, truth)) == pytest.approx(float(expected), rel=1e-12)


def test_rank_histogram_is_flat_for_consistent_and_u_shaped_for_under_dispersed_ensemble():
    n_members = 5
    forecast, truth = consistent_ensemble(n_members=n_members)
    flat = m.rank_histogram(forecast, truth)
    assert flat.dims == ("rank",)
    np.testing.assert_array_equal(flat["rank"], np.arange(n_members + 1))
    assert float(flat.sum()) == pytest.approx(1.0)
    np.testing.assert_allclose(flat.values, 1 / (n_members + 1), atol=0.01)

    narrow, truth = consistent_ensemble(n_members=n_members, member_scale=0.4)
    u_shape = m.rank_histogram(narrow, truth).values
    assert u_shape[0] > 2 * u_shape[2] and u_shape[-1] > 2 * u_shape[3]
    assert u_shape[0] > 1 / (n_members + 1) and u_shape[-1] > 1 / (n_members + 1)


def test_rank_histogram_breaks_ties_at_random_so_a_discrete_consistent_ensemble_is_flat():
    forecast, truth = consistent_ensemble(n_members=3)
    forecast, truth = np.round(forecast / 2), np.round(truth / 2)  # many exact ties
    histogram = m.rank_histogram(forecast, truth, seed=3)
    np.testing.assert_allclose(histogram.values, 0.25, atol=0.01)
    xr.testing.assert_equal(histogram, m.rank_histogram(forecast, truth, seed=3))
    counts = m.rank_histogram(forecast, truth, normalize=False, seed=3)
    assert float(counts.sum()) == truth.size


def test_brier_score_analytic_case():
    # members 0, 1, 2, 3 and threshold 1.5: probability 0.5; truth 2 (event) and 1 (no event)
    forecast = xr.DataArray([[0.0, 1.0, 2.0, 3.0]] * 2, dims=("station", MEMBER), coords={"station": [0, 1]})
    truth = xr.DataArray([2.0, 1.0], dims="station", coords={"station": [0, 1]})
    assert float(m.brier_score(forecast, truth, threshold=1.5)) == pytest.approx(0.25)
    assert float(m.brier_score(forecast, truth, threshold=-1.0)) == pytest.approx(0.0)
    assert float(m.brier_score(forecast, truth, threshold=2.5)) == pytest.approx((0.25**2 + 0.25**2) / 2)


def test_energy_score_of_one_member_is_euclidean_distance():
    forecast = xr.DataArray([[[3.0, 4.0]]], dims=("station", MEMBER, "variable"), coords={"station": [0]})
    truth = xr.DataArray([[0.0, 0.0]], dims=("station", "variable"), coords={"station": [0]})
    assert float(m.energy_score(forecast, truth)) == pytest.approx(5.0)


def test_energy_score_of_one_variable_equals_crps():
    forecast, truth = ensemble_pair(n_members=6, seed=4)
    for fair in (False, True):
        energy = m.energy_score(
            forecast.to_dataset(name="t"), truth.to_dataset(name="t"), fair=fair, preserve_dims=["time"]
        )
        xr.testing.assert_allclose(energy, m.crps(forecast, truth, fair=fair, preserve_dims=["time"]))


def test_energy_score_matches_pairwise_formula_for_two_variables():
    forecast, truth = ensemble_pair(n_members=4, seed=5)
    forecast = xr.Dataset({"a": forecast, "b": 2 * forecast**2})
    truth = xr.Dataset({"a": truth, "b": truth + 1})
    x = forecast.to_dataarray("variable").transpose(..., MEMBER, "variable").values  # (T, lat, lon, M, V)
    y = truth.to_dataarray("variable").transpose(..., "variable").values[..., None, :]  # (T, lat, lon, 1, V)
    first = np.linalg.norm(x - y, axis=-1).mean(-1)
    pairs = np.linalg.norm(x[..., :, None, :] - x[..., None, :, :], axis=-1).sum((-1, -2))
    for fair, k in ((False, 16), (True, 12)):
        expected = first - pairs / (2 * k)  # (T, lat, lon)
        w = latitude_weights(truth.latitude.values)[None, :, None]
        expected_mean = ((expected * w).mean((1, 2))).mean()
        assert float(m.energy_score(forecast, truth, fair=fair)) == pytest.approx(expected_mean, rel=1e-12)


# ----------------------------------------------------------------------------------------------
# Cross-checks against properscoring and xskillscore
# ----------------------------------------------------------------------------------------------
def test_crps_matches_properscoring_and_xskillscore_pointwise():
    forecast, truth = ensemble_pair(n_members=7, seed=11)
    ours = m.crps(forecast, truth, fair=False, preserve_dims=["time", "latitude", "longitude"])
    reference = properscoring.crps_ensemble(truth.values, np.moveaxis(forecast.values, 1, -1))
    np.testing.assert_allclose(ours.transpose("time", "latitude", "longitude").values, reference, rtol=1e-12)
    xs = xskillscore.crps_ensemble(truth, forecast, member_dim=MEMBER, dim=[])
    xr.testing.assert_allclose(ours, xs.transpose(*ours.dims))


def test_fair_crps_matches_pairwise_formula():
    forecast, truth = ensemble_pair(n_members=5, seed=12)
    x = np.moveaxis(forecast.values, 1, -1)
    y = truth.values[..., None]
    pairs = np.abs(x[..., :, None] - x[..., None, :]).sum((-1, -2))
    expected = np.abs(x - y).mean(-1) - pairs / (2 * 5 * 4)
    ours = m.crps(forecast, truth, fair=True, preserve_dims=["time", "latitude", "longitude"])
    np.testing.assert_allclose(ours.transpose("time", "latitude", "longitude").values, expected, rtol=1e-12)


def test_brier_score_matches_xskillscore():
    forecast, truth = ensemble_pair(n_members=8, seed=13)
    ours = m.brier_score(forecast, truth, threshold=0.4, weights=None, preserve_dims=["time"])
    theirs = xskillscore.brier_score(truth > 0.4, (forecast > 0.4).mean(MEMBER), dim=["latitude", "longitude"])
    xr.testing.assert_allclose(ours, theirs)


def test_rank_histogram_counts_match_xskillscore_without_ties():
    forecast, truth = ensemble_pair(n_members=6, n_time=20, seed=14)
    ours = m.rank_histogram(forecast, truth, normalize=False, weights=None)
    theirs = xskillscore.rank_histogram(truth, forecast, dim=["time", "latitude", "longitude"], member_dim=MEMBER)
    np.testing.assert_array_equal(ours.values, theirs.values)
    np.testing.assert_array_equal(ours["rank"].values + 1, theirs["rank"].values)


# ----------------------------------------------------------------------------------------------
# Missing truth, dims, Datasets, dask, registry
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(n for n in METRICS if n != "energy_score"))
def test_missing_truth_at_a_station_is_skipped_like_a_dropped_station(name):
    forecast, truth = station_pair()
    gappy = truth.where(truth.station != 2)
    with_gap = call(name, forecast, gappy, preserve_dims=["time"])
    without = call(name, forecast.drop_sel(station=2), truth.drop_sel(station=2), preserve_dims=["time"])
    xr.testing.assert_allclose(with_gap, without)


def test_rank_histogram_skips_missing_truth():
    forecast, truth = station_pair()
    gappy = truth.where(truth.station != 2)
    counts = m.rank_histogram(forecast, gappy, normalize=False)
    expected = m.rank_histogram(forecast.drop_sel(station=2), truth.drop_sel(station=2), normalize=False)
    xr.testing.assert_equal(counts, expected)
    assert float(counts.sum()) == gappy.count()


def test_missing_truth_renormalises_area_weights_per_time():
    forecast, truth = ensemble_pair(n_members=2, n_time=2)
    gappy = truth.copy()
    gappy[0, 1, :] = np.nan  # time 0 loses a latitude row
    gappy[1, :, 3] = np.nan  # time 1 loses a longitude column
    error2 = ((forecast - gappy) ** 2).mean(MEMBER)
    w = xr.DataArray(latitude_weights(truth.latitude.values), dims="latitude", coords={"latitude": truth.latitude})
    per_time = (error2 * w).sum(["latitude", "longitude"]) / (w * gappy.notnull()).sum(["latitude", "longitude"])
    assert float(m.mse(forecast, gappy)) == pytest.approx(float(per_time.mean()))
    crps_gap = m.crps(forecast, gappy, fair=True, preserve_dims=["time", "latitude", "longitude"])
    assert bool(crps_gap.isel(time=0, latitude=1).isnull().all())
    energy = m.energy_score(forecast.to_dataset(), gappy.to_dataset(), fair=True)
    assert float(energy) == pytest.approx(float(m.crps(forecast, gappy, fair=True)))


def test_results_have_only_the_preserved_dims():
    forecast, truth = ensemble_pair()
    forecast = forecast.expand_dims(prediction_timedelta=pd.to_timedelta([6, 12], "h")).transpose("time", ...)
    truth = truth.expand_dims(prediction_timedelta=pd.to_timedelta([6, 12], "h")).transpose("time", ...)
    for name in METRICS:
        if name == "energy_score":
            result = m.energy_score(forecast.to_dataset(), truth.to_dataset(), preserve_dims=["prediction_timedelta"])
        else:
            result = call(name, forecast, truth, preserve_dims=["prediction_timedelta"])
        assert result.dims == ("prediction_timedelta",), name
    histogram = m.rank_histogram(forecast, truth, preserve_dims=["prediction_timedelta", "latitude"])
    assert set(histogram.dims) == {"prediction_timedelta", "latitude", "rank"} and histogram.dims[-1] == "rank"
    spatial_only = m.mse(forecast, truth, reduce_dims=["latitude", "longitude"])
    assert spatial_only.dims == ("time", "prediction_timedelta", MEMBER)


def test_dataset_is_scored_per_variable():
    forecast, truth = ensemble_pair(seed=2)
    forecast_ds = xr.Dataset({"a": forecast, "b": forecast * 3})
    truth_ds = xr.Dataset({"a": truth, "b": truth * 3})
    for name in METRICS:
        if METRICS[name].per_variable:
            result = call(name, forecast_ds, truth_ds, preserve_dims=["time"])
            xr.testing.assert_allclose(result["a"], call(name, forecast, truth, preserve_dims=["time"]).rename("a"))


@pytest.fixture
def synchronous_dask():
    """The tiny dask graphs below compute fastest without threads on a shared 2-core machine."""
    with dask.config.set(scheduler="synchronous"):
        yield


def test_metrics_are_lazy_on_dask_inputs_and_equal_to_numpy(synchronous_dask):
    forecast, truth = ensemble_pair(seed=3)
    lazy_forecast, lazy_truth = forecast.chunk({"time": 1}), truth.chunk({"time": 1})
    for name in METRICS:
        if name == "energy_score":
            eager = m.energy_score(forecast.to_dataset(), truth.to_dataset(), preserve_dims=["time"])
            lazy = m.energy_score(lazy_forecast.to_dataset(), lazy_truth.to_dataset(), preserve_dims=["time"])
        else:
            eager = call(name, forecast, truth, preserve_dims=["time"])
            lazy = call(name, lazy_forecast, lazy_truth, preserve_dims=["time"])
        assert lazy.chunks is not None, name
        xr.testing.assert_allclose(lazy.compute(), eager)
    member_chunks = m.crps(forecast.chunk({MEMBER: 2}), truth, fair=True, preserve_dims=["time"])
    xr.testing.assert_allclose(member_chunks.compute(), m.crps(forecast, truth, fair=True, preserve_dims=["time"]))
    lazy_histogram = m.rank_histogram(lazy_forecast, lazy_truth, preserve_dims=["time"])
    assert lazy_histogram.chunks is not None
    np.testing.assert_allclose(lazy_histogram.sum("rank").values, 1.0)


def test_inputs_are_not_mutated():
    forecast, truth = ensemble_pair()
    forecast_ds, truth_ds = forecast.to_dataset(), truth.to_dataset()
    before = (forecast_ds.copy(deep=True), truth_ds.copy(deep=True))
    for name in METRICS:
        if name == "energy_score":
            m.energy_score(forecast_ds, truth_ds)
        else:
            call(name, forecast_ds, truth_ds)
    m.rank_histogram(forecast_ds, truth_ds)
    xr.testing.assert_identical(forecast_ds, before[0])
    xr.testing.assert_identical(truth_ds, before[1])


def test_bad_inputs_raise_errors_naming_the_problem():
    forecast, truth = ensemble_pair()
    shifted = truth.assign_coords(latitude=truth.latitude + 0.5)
    with pytest.raises(SchemaError, match="latitude"):
        m.rmse(forecast, shifted)
    with pytest.raises(SchemaError, match="member dim 'number'"):
        m.crps(forecast, truth, fair=False, member_dim="number")
    with pytest.raises(ValueError, match=r"\['level'\]"):
        m.mse(forecast, truth, preserve_dims=["level"])
    with pytest.raises(ValueError, match="consumed"):
        m.crps(forecast, truth, fair=False, preserve_dims=[MEMBER])
    with pytest.raises(SchemaError, match="same variables"):
        m.mse(xr.Dataset({"a": forecast}), xr.Dataset({"b": truth}))
    with pytest.raises(SchemaError, match="station"):
        m.mse(forecast, truth, weights=xr.DataArray(np.ones(3), dims="station"))
    with pytest.raises(SchemaError, match="spatial mean"):
        m.mse(forecast, truth, weights=xr.DataArray(np.ones(3), dims="time"))


def test_registry_describes_every_metric():
    assert {"rmse", "acc", "crps", "fair_crps", "spread_skill_ratio", "brier_score", "energy_score"} <= set(METRICS)
    for name, spec in METRICS.items():
        assert spec.name == name
        assert spec.kind in ("deterministic", "ensemble", "probability")
        assert spec.units in ("same as variable", "square of variable", "1")
    assert [name for name, spec in METRICS.items() if spec.needs_climatology] == ["acc"]
    assert METRICS["acc"].higher_is_better is True and METRICS["rmse"].higher_is_better is False
    assert METRICS["bias"].higher_is_better is None and METRICS["bias"].perfect_score == 0.0
    with pytest.raises(AttributeError):
        METRICS["rmse"].units = "1"  # frozen
