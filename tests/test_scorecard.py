"""Skill scores, the paired bootstrap over start times, and scorecard tables."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from forecasting.errors import SchemaError
from forecasting.verification.baselines import climatology, climatology_forecast, persistence_forecast
from forecasting.verification.scorecard import (
    block_length_for,
    build_scorecard,
    format_lead,
    lag1_autocorrelation,
    paired_bootstrap,
    scorecard_markdown,
    scorecard_to_frame,
    skill_score,
)
from forecasting.verification.stations import per_start_scores

LEADS = pd.to_timedelta([6, 24, 48], unit="h")


def _per_start(rmse: np.ndarray, *, times: pd.DatetimeIndex | None = None) -> xr.DataArray:
    """Per-start scores (time, prediction_timedelta) from an array of shape (n_time, 3)."""
    times = pd.date_range("2020-01-01", periods=rmse.shape[0], freq="12h") if times is None else times
    return xr.DataArray(rmse, dims=("time", "prediction_timedelta"), coords={"time": times, "prediction_timedelta": LEADS})


def _errors(n: int, *, scale: float, seed: int) -> np.ndarray:
    return scale * (1.0 + 0.3 * np.abs(np.random.default_rng(seed).standard_normal((n, 3))))


def test_skill_score_forms():
    np.testing.assert_allclose(skill_score(np.array([1.0, 2.0]), np.array([2.0, 2.0]), higher_is_better=False), [0.5, 0.0])
    np.testing.assert_allclose(skill_score(0.8, 0.6, higher_is_better=True), 0.5)  # ACC: half the shortfall recovered
    np.testing.assert_allclose(skill_score(-0.5, 1.0, higher_is_better=None), 0.5)  # bias: magnitude halved
    assert np.isnan(skill_score(1.0, 0.0, higher_is_better=False))
    model = xr.DataArray([1.0, 3.0], dims="lead")
    assert skill_score(model, xr.DataArray(2.0), higher_is_better=False).dims == ("lead",)


def test_bootstrap_of_identical_scores_is_zero_and_not_significant():
    rmse = _per_start(_errors(60, scale=1.0, seed=0))
    result = paired_bootstrap(rmse, rmse, n_resamples=300, seed=1, statistic="rmse")
    np.testing.assert_array_equal(result["skill"].values, 0.0)
    np.testing.assert_array_equal(result["lower"].values, 0.0)
    np.testing.assert_array_equal(result["upper"].values, 0.0)
    assert not result["significant"].any()
    np.testing.assert_array_equal(result["p_value"].values, 1.0)


def test_clearly_smaller_errors_are_significantly_better():
    reference = _errors(80, scale=1.0, seed=2)
    model = reference * 0.8 * (1.0 + 0.05 * np.random.default_rng(3).standard_normal(reference.shape))
    result = paired_bootstrap(_per_start(model), _per_start(reference), n_resamples=1000, seed=0, statistic="rmse")
    assert result["significant"].all()
    assert (result["lower"] > 0.1).all() and (result["upper"] < 0.3).all()
    np.testing.assert_allclose(result["skill"].values, 0.2, atol=0.02)
    assert (result["p_value"] < 0.01).all()
    worse = paired_bootstrap(_per_start(reference), _per_start(model), n_resamples=1000, seed=0, statistic="rmse")
    assert worse["significant"].all() and (worse["upper"] < 0).all()


def test_full_sample_aggregates_are_root_mean_square_or_mean():
    values = np.array([[3.0, 1.0, 2.0], [4.0, 1.0, 2.0]])
    reference = np.full_like(values, 5.0)
    rms = paired_bootstrap(_per_start(values), _per_start(reference), n_resamples=10, statistic="rmse")
    np.testing.assert_allclose(rms["model_score"].values, np.sqrt((values**2).mean(axis=0)))
    mean = paired_bootstrap(_per_start(values), _per_start(reference), n_resamples=10, statistic="mean")
    np.testing.assert_allclose(mean["model_score"].values, values.mean(axis=0))
    np.testing.assert_allclose(mean["skill"].values, 1.0 - values.mean(axis=0) / 5.0)


def test_a_start_missing_in_either_series_is_left_out_of_both():
    model = np.array([[1.0] * 3, [9.0] * 3, [1.0] * 3])
    reference = np.array([[2.0] * 3, [np.nan] * 3, [2.0] * 3])
    result = paired_bootstrap(_per_start(model), _per_start(reference), n_resamples=50, statistic="mean")
    np.testing.assert_allclose(result["model_score"].values, 1.0)
    np.testing.assert_allclose(result["skill"].values, 0.5)


def test_interval_shrinks_with_more_start_times():
    widths = []
    for n in (20, 500):
        reference = _errors(n, scale=1.0, seed=4)
        model = _errors(n, scale=0.9, seed=5)
        result = paired_bootstrap(_per_start(model), _per_start(reference), n_resamples=500, seed=0)
        widths.append(float((result["upper"] - result["lower"]).mean()))
    assert widths[1] < widths[0] / 3  # ~ 1/sqrt(n): sqrt(25) = 5


def test_bootstrap_is_reproducible_for_a_seed_and_fast():
    model, reference = _per_start(_errors(365, scale=0.9, seed=6)), _per_start(_errors(365, scale=1.0, seed=7))
    first = paired_bootstrap(model, reference, n_resamples=200, seed=11)
    again = paired_bootstrap(model, reference, n_resamples=200, seed=11)
    other = paired_bootstrap(model, reference, n_resamples=200, seed=12)
    xr.testing.assert_identical(first, again)
    assert not np.array_equal(first["lower"].values, other["lower"].values)
    many = xr.concat([model] * 100, dim="variable")  # 300 series x 365 starts x 1000 resamples
    started = time.perf_counter()
    paired_bootstrap(many, xr.concat([reference] * 100, dim="variable"), n_resamples=1000)
    assert time.perf_counter() - started < 5.0


def test_bootstrap_refuses_different_start_times():
    model = _per_start(_errors(10, scale=1.0, seed=8))
    reference = _per_start(_errors(10, scale=1.0, seed=9), times=pd.date_range("2021-01-01", periods=10, freq="12h"))
    with pytest.raises(SchemaError, match="different coordinates"):
        paired_bootstrap(model, reference)


def _ar1(n: int, series: int, *, rho: float, seed: int) -> np.ndarray:
    """``series`` independent AR(1) series of length ``n`` with lag-1 autocorrelation ``rho``, shape (n, series)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, series))
    out[0] = rng.standard_normal(series)
    for t in range(1, n):
        out[t] = rho * out[t - 1] + np.sqrt(1.0 - rho**2) * rng.standard_normal(series)
    return out


def test_block_length_follows_wilks_rule():
    assert block_length_for(0.0, 50) == 1 and block_length_for(-0.4, 50) == 1 and block_length_for(np.nan, 50) == 1
    assert block_length_for(0.9, 1) == 1
    for rho, n in ((0.3, 22), (0.5, 90), (0.8, 365)):
        length = block_length_for(rho, n)
        exponent = (2 / 3) * (1 - (1 - rho) / (1 + rho))
        # the rounded fixed point of L = (n - L + 1)^exponent
        assert abs(length - (n - length + 1) ** exponent) <= 0.5 + exponent
    lengths = [block_length_for(rho, 100) for rho in (0.1, 0.3, 0.5, 0.7, 0.9)]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]
    assert block_length_for(0.5, 20) < block_length_for(0.5, 400)


def test_lag1_autocorrelation_of_red_noise_and_gaps():
    series = _ar1(400, 50, rho=0.7, seed=0).T
    assert lag1_autocorrelation(series) == pytest.approx(0.7, abs=0.05)
    series[:, ::7] = np.nan  # gaps: only pairs with both values count
    assert lag1_autocorrelation(series) == pytest.approx(0.7, abs=0.06)
    assert lag1_autocorrelation(_ar1(400, 50, rho=0.0, seed=1).T) == pytest.approx(0.0, abs=0.03)
    assert np.isnan(lag1_autocorrelation(np.ones((3, 10))))  # no variance
    assert np.isnan(lag1_autocorrelation(np.full((2, 10), np.nan)))


def test_block_bootstrap_keeps_false_alarms_near_nominal_for_autocorrelated_starts():
    """Model and reference equally good, their per-start differences red noise (rho 0.7, as for daily starts):
    the ordinary bootstrap calls about 40 % of the 300 equal pairs significant at the 95 % level. The block
    bootstrap with Wilks' length (12 here) calls about 12 %: a third as many, though still above the nominal
    5 % (block bootstraps under-cover on short series; 9 % at n = 365)."""
    n, pairs = 120, 300
    base = 2.0 + 0.2 * _ar1(n, pairs, rho=0.5, seed=2)
    difference = 0.1 * _ar1(n, pairs, rho=0.7, seed=3)
    times = pd.date_range("2020-01-01", periods=n, freq="D")

    def scores(values: np.ndarray) -> xr.DataArray:
        return xr.DataArray(values, dims=("time", "variable"), coords={"time": times, "variable": np.arange(pairs)})

    model, reference = scores(base + difference / 2), scores(base - difference / 2)
    ordinary = paired_bootstrap(model, reference, n_resamples=400, seed=0, statistic="mean", block_length=1)
    blocks = paired_bootstrap(model, reference, n_resamples=400, seed=0, statistic="mean")
    assert ordinary.attrs["block_length"] == 1
    assert blocks.attrs["lag1_autocorrelation"] == pytest.approx(0.7, abs=0.08)
    assert blocks.attrs["block_length"] == block_length_for(blocks.attrs["lag1_autocorrelation"], n) >= 4
    false_alarms = {name: float(card["significant"].mean()) for name, card in (("ordinary", ordinary), ("blocks", blocks))}
    assert false_alarms["ordinary"] > 0.2, false_alarms
    assert false_alarms["blocks"] < 0.15 and false_alarms["blocks"] < false_alarms["ordinary"] / 3, false_alarms
    widths = [float((card["upper"] - card["lower"]).median()) for card in (ordinary, blocks)]
    assert widths[1] > 1.6 * widths[0]
    # a fixed length is used as given; the full-sample skill does not depend on the resampling
    fixed = paired_bootstrap(model, reference, n_resamples=400, seed=0, statistic="mean", block_length=6)
    assert fixed.attrs["block_length"] == 6 and np.isnan(fixed.attrs["lag1_autocorrelation"])
    np.testing.assert_array_equal(fixed["skill"].values, ordinary["skill"].values)


def test_block_bootstrap_sorts_start_times_and_checks_the_length():
    model = _per_start(_errors(40, scale=0.9, seed=10) + 0.2 * _ar1(40, 3, rho=0.8, seed=11))
    reference = _per_start(_errors(40, scale=1.0, seed=12))
    order = np.random.default_rng(0).permutation(40)
    in_order = paired_bootstrap(model, reference, n_resamples=200, seed=5, block_length=4)
    shuffled = paired_bootstrap(model.isel(time=order), reference.isel(time=order), n_resamples=200, seed=5, block_length=4)
    xr.testing.assert_identical(in_order, shuffled)
    for bad in (0, -2, 1.5, "five", True):
        with pytest.raises(SchemaError, match="block length"):
            paired_bootstrap(model, reference, block_length=bad)
    with pytest.raises(SchemaError, match="block length"):
        build_scorecard(_per_start_dataset({"2m_temperature": 1.0, "10m_wind_speed": 1.0}, n=5, seed=0),
                        _per_start_dataset({"2m_temperature": 1.0, "10m_wind_speed": 1.0}, n=5, seed=1),
                        model_name="a", reference_name="b", block_length=0)


def _per_start_dataset(scale: dict[str, float], *, n: int, seed: int) -> xr.Dataset:
    """Per-start scores of two metrics and two variables, layout of stations.per_start_scores."""
    rng = np.random.default_rng(seed)
    metrics, variables = ["rmse", "crps"], ["2m_temperature", "10m_wind_speed"]
    values = np.empty((2, 2, n, 3))
    for i, var in enumerate(variables):
        values[:, i] = scale[var] * (1.0 + 0.2 * np.abs(rng.standard_normal((2, n, 3))))
    return xr.Dataset(
        {"score": (("metric", "variable", "time", "prediction_timedelta"), values)},
        coords={
            "metric": metrics, "variable": variables, "time": pd.date_range("2020-01-01", periods=n, freq="D"),
            "prediction_timedelta": LEADS,
        },
    )


def test_scorecard_layout_frame_and_markdown():
    reference = _per_start_dataset({"2m_temperature": 1.0, "10m_wind_speed": 1.0}, n=120, seed=0)
    model_values = reference["score"].copy()
    model_values.loc[{"variable": "2m_temperature"}] *= 0.877  # 12.3% better
    model_values.loc[{"variable": "10m_wind_speed"}] *= 1.04  # 4% worse
    model = reference.copy(data={"score": model_values.values})
    card = build_scorecard(model, reference, model_name="graph", reference_name="persistence", n_resamples=300)

    assert card["skill"].dims == ("metric", "variable", "prediction_timedelta", "region")
    assert card["region"].values.tolist() == ["all"]
    assert card["significant"].dtype == bool and bool(card["significant"].all())
    np.testing.assert_allclose(card["skill"].sel(variable="2m_temperature").values, 0.123)

    frame = scorecard_to_frame(card)
    assert len(frame) == 2 * 2 * 3
    assert list(frame.columns[:6]) == ["model", "reference", "metric", "variable", "prediction_timedelta", "region"]
    assert set(frame["model"]) == {"graph"}
    assert card["block_length"].dims == ("metric",) and set(frame["block_length"]) == set(card["block_length"].values)
    assert card.attrs["block_length"] == "auto"

    text = scorecard_markdown(card)
    assert "## Scorecard: graph vs persistence" in text
    assert "one start at a time" in text  # independent starts: blocks of 1
    blocked = build_scorecard(model, reference, model_name="graph", reference_name="persistence", n_resamples=50,
                              block_length=3)
    assert "in circular blocks of 3 consecutive starts" in scorecard_markdown(blocked)
    assert "### rmse (all)" in text and "### crps (all)" in text
    assert "| variable | 6h | 1d | 2d |" in text
    assert "| 2m_temperature | +12.3%* | +12.3%* | +12.3%* |" in text
    assert "| 10m_wind_speed | -4.0%* | -4.0%* | -4.0%* |" in text


def test_scorecard_marks_insignificant_cells_without_a_star_and_checks_inputs():
    reference = _per_start_dataset({"2m_temperature": 1.0, "10m_wind_speed": 1.0}, n=30, seed=1)
    shuffled = np.random.default_rng(2).permutation(30)  # same values, other start times: full-sample skill 0
    model = reference.copy(data={"score": reference["score"].values[:, :, shuffled]})
    card = build_scorecard(model, reference, model_name="a", reference_name="b", metrics=["rmse"], n_resamples=200)
    text = scorecard_markdown(card)
    cells = [c.strip() for line in text.splitlines() if line.startswith("| 2m_") for c in line.split("|")[2:-1]]
    assert cells == ["+0.0%"] * 3
    with pytest.raises(SchemaError, match="cannot be bootstrapped"):
        build_scorecard(model, reference, model_name="a", reference_name="b", metrics=["spread_skill_ratio"])
    with pytest.raises(SchemaError, match="prediction_timedelta"):
        build_scorecard(model, reference.isel(prediction_timedelta=[0, 1]), model_name="a", reference_name="b")


def test_format_lead():
    assert [format_lead(np.timedelta64(h, "h")) for h in (0, 6, 24, 36, 240)] == ["0h", "6h", "1d", "36h", "10d"]


def test_station_scorecard_climatology_beats_persistence_at_long_leads():
    """End to end: two baselines scored at stations, then compared on a scorecard."""
    times = pd.date_range("2001-01-01", "2002-12-31 18:00", freq="6h")
    lat, lon = np.linspace(40.0, 50.0, 6), np.linspace(0.0, 10.0, 6)
    rng = np.random.default_rng(0)
    seasonal = 10.0 * np.sin(2 * np.pi * (times.day_of_year.to_numpy() - 1) / 365.0)
    weather = np.zeros(len(times))
    for i in range(1, len(times)):  # red noise with a one-day memory
        weather[i] = 0.78 * weather[i - 1] + 2.0 * rng.standard_normal()
    values = 280.0 + seasonal + weather
    analysis = xr.Dataset(
        {"2m_temperature": (("time", "latitude", "longitude"), values[:, None, None] + np.zeros((1, 6, 6)), {"units": "K"})},
        coords={"time": times, "latitude": lat, "longitude": lon},
    )
    stations = analysis["2m_temperature"].isel(latitude=[1, 4], longitude=[2, 3]).stack(station=("latitude", "longitude"))
    observations = xr.Dataset(
        {"2m_temperature": stations.reset_index("station").drop_vars(["latitude", "longitude"])},
        coords={
            "station_id": ("station", ["a", "b", "c", "d"]),
            "latitude": ("station", stations["latitude"].values),
            "longitude": ("station", stations["longitude"].values),
        },
    )
    inits = times[(times >= "2002-01-01") & (times.hour == 0)][::3]
    leads = pd.to_timedelta([0, 6, 120], unit="h")
    clim = climatology(analysis, period=("2001-01-01", "2001-12-31"), smoothing_days=31)
    forecasts = {
        "persistence": persistence_forecast(analysis, init_times=inits, leads=leads),
        "climatology": climatology_forecast(clim, init_times=inits, leads=leads),
    }
    per_start = {name: per_start_scores(fc, observations, metrics=["rmse", "mae"]) for name, fc in forecasts.items()}
    card = build_scorecard(
        per_start["climatology"], per_start["persistence"], model_name="climatology", reference_name="persistence",
        n_resamples=500,
    )
    rmse_skill = card["skill"].sel(metric="rmse", variable="2m_temperature", region="all")
    assert np.isnan(rmse_skill.sel(prediction_timedelta="0h"))  # persistence is perfect at lead 0
    assert bool(card["significant"].sel(metric="rmse", prediction_timedelta="6h").all())
    assert float(rmse_skill.sel(prediction_timedelta="6h")) < 0  # persistence wins at 6 h
    assert float(rmse_skill.sel(prediction_timedelta="120h")) > 0  # climatology wins at 5 days
    assert "n/a" in scorecard_markdown(card)
