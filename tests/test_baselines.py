"""Persistence and climatology baselines: analytic answers on small synthetic analyses."""

from __future__ import annotations

import dask.array
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from forecasting.errors import SchemaError
from forecasting.verification.baselines import (
    DAYS_OF_YEAR,
    climatology,
    climatology_forecast,
    leap_dayofyear,
    persistence_forecast,
)


def _analysis(times: pd.DatetimeIndex, values: np.ndarray | None = None, *, n_lat: int = 3, n_lon: int = 4) -> xr.Dataset:
    """Canonical analysis (time, latitude, longitude); ``values`` (time,) is broadcast over space plus a ramp."""
    lat = np.linspace(-30.0, 30.0, n_lat)
    lon = np.arange(n_lon) * (360.0 / n_lon)
    base = np.arange(len(times), dtype=np.float64) if values is None else values
    ramp = lat[:, None] / 10.0 + lon[None, :] / 100.0
    field = base[:, None, None] + ramp[None]
    return xr.Dataset(
        {
            "2m_temperature": (("time", "latitude", "longitude"), field, {"units": "K"}),
            "land_sea_mask": (("latitude", "longitude"), np.ones((n_lat, n_lon)), {"units": "1"}),
        },
        coords={"time": times, "latitude": lat, "longitude": lon},
    )


def _seasonal(times: pd.DatetimeIndex) -> np.ndarray:
    return 10.0 * np.sin(2 * np.pi * (leap_dayofyear(times) - 1) / 366.0)


def _boxcar_gain(width: int) -> float:
    """Gain of a centred ``width``-day mean on a sine of period 366 days."""
    k = np.arange(width) - width // 2
    return float(np.mean(np.cos(2 * np.pi * k / 366.0)))


def test_persistence_lead_zero_equals_truth_and_repeats_over_leads():
    times = pd.date_range("2001-01-01", periods=12, freq="6h")
    analysis = _analysis(times)
    inits = times[[2, 5]]
    leads = pd.to_timedelta([0, 6, 18], unit="h")
    fc = persistence_forecast(analysis, init_times=inits, leads=leads)

    assert fc["2m_temperature"].dims == ("time", "prediction_timedelta", "realization", "latitude", "longitude")
    assert fc.sizes["realization"] == 1
    assert "land_sea_mask" not in fc  # static fields are not forecast
    truth = analysis["2m_temperature"].sel(time=inits)
    for lead in leads:
        xr.testing.assert_equal(
            fc["2m_temperature"].sel(prediction_timedelta=lead).isel(realization=0, drop=True).drop_vars(
                ["prediction_timedelta", "valid_time"]
            ),
            truth,
        )
    expected_valid = inits.values[:, None] + leads.values[None, :]
    np.testing.assert_array_equal(fc["valid_time"].values, expected_valid)
    assert fc.attrs["model"] == "persistence"


def test_persistence_accepts_python_timedeltas_and_stays_lazy():
    times = pd.date_range("2001-01-01", periods=8, freq="6h")
    analysis = _analysis(times).chunk({"time": 2})
    from datetime import timedelta

    fc = persistence_forecast(analysis, init_times=[times[0]], leads=[timedelta(hours=0), timedelta(days=1)])
    assert isinstance(fc["2m_temperature"].data, dask.array.Array)
    assert fc["prediction_timedelta"].values.tolist() == pd.to_timedelta(["0h", "24h"]).values.tolist()


def test_persistence_names_init_times_missing_from_the_analysis():
    times = pd.date_range("2001-01-01", periods=4, freq="6h")
    with pytest.raises(SchemaError, match="2001-01-05 00:00:00"):
        persistence_forecast(_analysis(times), init_times=["2001-01-01", "2001-01-05"], leads=["0h"])
    with pytest.raises(SchemaError, match="non-negative"):
        persistence_forecast(_analysis(times), init_times=[times[0]], leads=["-6h"])


def test_leap_dayofyear_gives_a_calendar_date_the_same_day_in_every_year():
    dates = pd.DatetimeIndex(["2000-02-29", "2000-03-01", "2001-02-28", "2001-03-01", "2001-12-31", "2000-12-31"])
    assert leap_dayofyear(dates).tolist() == [60, 61, 59, 61, 366, 366]


def test_climatology_of_a_pure_seasonal_sine_recovers_it():
    times = pd.date_range("2000-01-01", "2001-12-31", freq="D")
    analysis = _analysis(times, _seasonal(times))
    width = 15
    clim = climatology(analysis, period=("2000-01-01", "2001-12-31"), smoothing_days=width)

    assert clim["2m_temperature"].dims == ("dayofyear", "hour", "latitude", "longitude")
    assert clim["dayofyear"].values.tolist() == DAYS_OF_YEAR.tolist()
    assert clim["hour"].values.tolist() == [0]
    doy = clim["dayofyear"].values
    sine = 10.0 * np.sin(2 * np.pi * (doy - 1) / 366.0) * _boxcar_gain(width)
    ramp = analysis["2m_temperature"].isel(time=0) - _seasonal(times[:1])[0]
    expected = xr.DataArray(sine, dims="dayofyear", coords={"dayofyear": doy}) + ramp.drop_vars("time")
    got = clim["2m_temperature"].isel(hour=0, drop=True).drop_vars("sample_count")
    expected = expected.transpose(*got.dims)
    # 29 February has one sample in two years, so only windows around it weigh days slightly unevenly
    near = np.abs(doy - 60) <= width // 2
    xr.testing.assert_allclose(got.isel(dayofyear=~near), expected.isel(dayofyear=~near), atol=1e-9)
    xr.testing.assert_allclose(got.isel(dayofyear=near), expected.isel(dayofyear=near), atol=0.03)
    assert int(clim["sample_count"].sel(dayofyear=60, hour=0)) == 2 * width - 1


def test_climatology_keeps_the_time_of_day_and_forecasts_it_at_valid_hours():
    times = pd.date_range("2001-01-01", "2001-12-31 18:00", freq="6h")
    diurnal = 3.0 * np.cos(2 * np.pi * np.asarray(times.hour) / 24.0)
    analysis = _analysis(times, diurnal + _seasonal(times))
    clim = climatology(analysis, period=("2001-01-01", "2001-12-31"), smoothing_days=1 + 2 * 10)
    assert clim["hour"].values.tolist() == [0, 6, 12, 18]
    spatial_mean = clim["2m_temperature"].mean(["latitude", "longitude"]) - analysis["2m_temperature"].isel(
        time=0
    ).mean().item()
    by_hour = (spatial_mean.mean("dayofyear")).values  # the seasonal sine averages out over the year
    diurnal_at = 3.0 * np.cos(2 * np.pi * np.array([0, 6, 12, 18]) / 24.0)
    np.testing.assert_allclose(by_hour - by_hour.mean(), diurnal_at, atol=0.01)

    fc = climatology_forecast(clim, init_times=["2005-07-01"], leads=pd.to_timedelta([0, 6, 30], unit="h"))
    assert fc["2m_temperature"].dims == ("time", "prediction_timedelta", "realization", "latitude", "longitude")
    got = fc["2m_temperature"].isel(time=0, realization=0)
    for i, (doy, hour) in enumerate([(183, 0), (183, 6), (184, 6)]):  # 1 July = day 183; +30 h = 2 July 06:00
        expected = clim["2m_temperature"].sel(dayofyear=doy, hour=hour).values
        np.testing.assert_array_equal(got.isel(prediction_timedelta=i).values, expected)
    assert fc.attrs["model"] == "climatology"


def test_climatology_forecast_names_valid_times_off_the_climatology_hours():
    times = pd.date_range("2001-01-01", "2001-12-31", freq="D")
    clim = climatology(_analysis(times, _seasonal(times)), period=("2001-01-01", "2001-12-31"))
    with pytest.raises(SchemaError, match=r"2001-03-01 12:00:00"):
        climatology_forecast(clim, init_times=["2001-03-01"], leads=["0h", "12h"])


def test_one_year_without_smoothing_leaves_29_february_empty_and_says_so():
    times = pd.date_range("2001-01-01", "2001-12-31", freq="D")
    analysis = _analysis(times, _seasonal(times))
    with pytest.raises(SchemaError, match="day 60 hour 0"):
        climatology(analysis, period=("2001-01-01", "2001-12-31"), smoothing_days=1)
    smoothed = climatology(analysis, period=("2001-01-01", "2001-12-31"), smoothing_days=3)
    assert bool(smoothed["2m_temperature"].notnull().all())


def test_climatology_rejects_a_period_outside_the_analysis_and_even_windows():
    times = pd.date_range("2001-01-01", "2001-12-31", freq="D")
    analysis = _analysis(times)
    with pytest.raises(SchemaError, match="not covered"):
        climatology(analysis, period=("1990-01-01", "2001-12-31"))
    with pytest.raises(SchemaError, match="odd"):
        climatology(analysis, period=("2001-01-01", "2001-12-31"), smoothing_days=4)


def test_climatology_is_lazy_on_dask_and_matches_the_eager_result():
    times = pd.date_range("2001-01-01", "2001-12-31", freq="D")
    analysis = _analysis(times, _seasonal(times))
    eager = climatology(analysis, period=("2001-01-01", "2001-12-31"))
    lazy = climatology(analysis.chunk({"time": 100}), period=("2001-01-01", "2001-12-31"))
    assert isinstance(lazy["2m_temperature"].data, dask.array.Array)
    xr.testing.assert_allclose(lazy.compute(), eager)


def test_climatology_skips_missing_values_instead_of_spreading_them():
    times = pd.date_range("2001-01-01", "2001-12-31", freq="D")
    analysis = _analysis(times, np.full(len(times), 5.0))
    field = analysis["2m_temperature"].values.copy()
    field[10:20, 0, 0] = np.nan
    analysis = analysis.assign({"2m_temperature": (analysis["2m_temperature"].dims, field, {"units": "K"})})
    clim = climatology(analysis, period=("2001-01-01", "2001-12-31"))
    expected = analysis["2m_temperature"].isel(time=0)
    np.testing.assert_allclose(clim["2m_temperature"].isel(dayofyear=14, hour=0).values[0, 0], expected.values[0, 0])
    assert bool(clim["2m_temperature"].notnull().all())
    assert analysis["2m_temperature"].isnull().sum() == 10  # input untouched
