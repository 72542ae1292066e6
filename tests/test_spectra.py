"""Zonal power spectra: sinusoids, Parseval, smoothing, bands, regional grids and real ERA5 data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from forecasting.errors import SchemaError
from forecasting.verification.spectra import EARTH_RADIUS_KM, zonal_power_spectrum
from forecasting.weights import latitude_weights

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
UK_T2M = REAL_DATA / "era5-2mt-2019-03-uk.grib"


def global_grid(n_lat: int = 16, n_lon: int = 32) -> tuple[np.ndarray, np.ndarray]:
    d_lat = 180.0 / n_lat
    return -90 + d_lat / 2 + d_lat * np.arange(n_lat), np.arange(n_lon) * (360.0 / n_lon)


def field_from(values: np.ndarray, lat: np.ndarray, lon: np.ndarray, **leading: np.ndarray) -> xr.DataArray:
    dims = (*leading, "latitude", "longitude")
    return xr.DataArray(values, dims=dims, coords={**leading, "latitude": lat, "longitude": lon}, name="z")


@pytest.mark.parametrize("k", [1, 5, 15])
def test_zonal_sinusoid_puts_all_power_at_its_wavenumber(k):
    lat, lon = global_grid()
    amplitude = 2.0 + np.cos(np.deg2rad(lat))[:, None]  # varies with latitude
    values = amplitude * np.cos(k * np.deg2rad(lon)[None, :] + 0.7)
    spectrum = zonal_power_spectrum(field_from(values, lat, lon))
    assert spectrum.dims == ("lat_band", "wavenumber")
    np.testing.assert_array_equal(spectrum["wavenumber"], np.arange(17))
    others = spectrum.drop_sel(wavenumber=k)
    np.testing.assert_allclose(others.values, 0.0, atol=1e-20)
    # power A**2 / 2 at k, averaged over the band with area weights
    weights = latitude_weights(lat)
    inside = lat >= 30
    expected = np.average(amplitude[inside, 0] ** 2 / 2, weights=weights[inside])
    assert float(spectrum.sel(lat_band="30N-90N", wavenumber=k)) == pytest.approx(expected, rel=1e-12)


def test_nyquist_wave_has_its_full_squared_amplitude():
    lat, lon = global_grid(n_lon=32)
    values = np.tile(3.0 * (-1.0) ** np.arange(32), (lat.size, 1))
    spectrum = zonal_power_spectrum(field_from(values, lat, lon))
    np.testing.assert_allclose(spectrum.sel(wavenumber=16).values, 9.0)


def test_parseval_power_sums_to_zonal_mean_square_and_variance():
    lat, lon = global_grid(n_lat=12, n_lon=33)  # odd number of longitudes too
    rng = np.random.default_rng(0)
    values = 5.0 + rng.normal(size=(3, lat.size, lon.size))
    field = field_from(values, lat, lon, time=pd.date_range("2020-01-01", periods=3).to_numpy())
    spectrum = zonal_power_spectrum(field, lat_bands=[(-90, 90)])
    weights = xr.DataArray(latitude_weights(lat), dims="latitude", coords={"latitude": lat})
    zonal_variance = field.var("longitude").weighted(weights).mean("latitude")  # population variance (ddof=0)
    zonal_mean_square = (field**2).mean("longitude").weighted(weights).mean("latitude")
    xr.testing.assert_allclose(spectrum.sum("wavenumber").squeeze("lat_band", drop=True), zonal_mean_square)
    xr.testing.assert_allclose(
        spectrum.sel(wavenumber=slice(1, None)).sum("wavenumber").squeeze("lat_band", drop=True),
        zonal_variance,
    )


def test_smoothed_field_loses_power_at_high_wavenumbers():
    lat, lon = global_grid(n_lat=8, n_lon=64)
    rng = np.random.default_rng(1)
    field = field_from(rng.normal(size=(lat.size, lon.size)), lat, lon)
    smoothed = field.pad(longitude=2, mode="wrap").rolling(longitude=5, center=True).mean().isel(longitude=slice(2, -2))
    raw_spectrum = zonal_power_spectrum(field).sel(lat_band="global")
    smooth_spectrum = zonal_power_spectrum(smoothed).sel(lat_band="global")
    ratio = smooth_spectrum / raw_spectrum
    assert float(ratio.sel(wavenumber=slice(1, 3)).min()) > 0.8  # large scales kept
    assert float(ratio.sel(wavenumber=slice(16, None)).max()) < 0.2  # small scales damped
    assert float(smooth_spectrum.sel(wavenumber=slice(16, None)).sum()) < 0.1 * float(
        raw_spectrum.sel(wavenumber=slice(16, None)).sum()
    )


def test_default_bands_are_labelled_and_other_dims_preserved():
    lat, lon = global_grid()
    rng = np.random.default_rng(2)
    lead = pd.to_timedelta([6, 12], "h").to_numpy()
    values = rng.normal(size=(2, 3, lat.size, lon.size))
    field = field_from(values, lat, lon, prediction_timedelta=lead, realization=np.arange(3))
    spectrum = zonal_power_spectrum(field)
    assert spectrum.dims == ("prediction_timedelta", "realization", "lat_band", "wavenumber")
    assert list(spectrum["lat_band"].values) == ["90S-30S", "30S-30N", "30N-90N", "global"]
    assert spectrum["wavelength_km"].dims == ("lat_band", "wavenumber")
    equator_circle = 2 * np.pi * EARTH_RADIUS_KM
    assert float(spectrum["wavelength_km"].sel(lat_band="global", wavenumber=4)) == pytest.approx(equator_circle / 4)
    assert np.isinf(spectrum["wavelength_km"].sel(wavenumber=0)).all()


def test_band_mean_uses_area_weights_within_the_band():
    lat = np.array([-45.0, -15.0, 15.0, 45.0])
    lon = np.arange(8) * 45.0
    amplitudes = np.array([1.0, 2.0, 3.0, 4.0])
    values = amplitudes[:, None] * np.cos(2 * np.deg2rad(lon))[None, :]
    spectrum = zonal_power_spectrum(field_from(values, lat, lon), lat_bands=[(0, 60), (-20, 20)])
    assert list(spectrum["lat_band"].values) == ["EQ-60N", "20S-20N"]
    weights = latitude_weights(lat)
    np.testing.assert_allclose(
        spectrum.sel(wavenumber=2).values,
        [
            np.average(amplitudes[2:] ** 2 / 2, weights=weights[2:]),
            np.average(amplitudes[1:3] ** 2 / 2, weights=weights[1:3]),
        ],
    )


def test_regional_grid_counts_waves_across_the_domain_and_reports_wavelength():
    lat = np.arange(40.0, 60.01, 0.5)
    lon = 350.0 + 0.25 * np.arange(40)  # 10 degrees wide, crosses 0/360 when stored in 0..360 order
    lon_stored = lon % 360.0
    order = np.argsort(lon_stored)
    values = np.cos(2 * np.pi * 3 * np.arange(40) / 40)[None, :] * np.ones((lat.size, 1))
    contiguous = field_from(values, lat, lon)
    wrapped = field_from(values[:, order], lat, lon_stored[order])
    spectrum = zonal_power_spectrum(wrapped)
    assert list(spectrum["lat_band"].values) == ["30N-90N", "global"]  # empty default bands are left out
    assert int(spectrum.sel(lat_band="global").argmax("wavenumber")) == 3
    assert float(spectrum.sel(lat_band="global", wavenumber=3)) == pytest.approx(0.5)
    xr.testing.assert_allclose(spectrum, zonal_power_spectrum(contiguous))
    expected_km = 10.0 * np.pi / 180 * EARTH_RADIUS_KM * np.cos(np.deg2rad(50.0)) / 3
    assert float(spectrum["wavelength_km"].sel(lat_band="global", wavenumber=3)) == pytest.approx(expected_km)
    assert spectrum.attrs["longitude_extent_degrees"] == pytest.approx(10.0)


def test_dask_input_stays_lazy_and_dataset_is_done_per_variable():
    lat, lon = global_grid()
    rng = np.random.default_rng(3)
    field = field_from(rng.normal(size=(4, lat.size, lon.size)), lat, lon, time=np.arange(4))
    lazy = zonal_power_spectrum(field.chunk({"time": 1, "longitude": 8}))
    assert lazy.chunks is not None
    xr.testing.assert_allclose(lazy.compute(), zonal_power_spectrum(field))
    spectra = zonal_power_spectrum(xr.Dataset({"a": field, "b": 2 * field}))
    xr.testing.assert_allclose(spectra["b"], 4 * spectra["a"])


def test_bad_grids_and_bands_raise_schema_errors():
    lat, lon = global_grid()
    field = field_from(np.zeros((lat.size, lon.size)), lat, lon)
    with pytest.raises(SchemaError, match="regularly spaced"):
        zonal_power_spectrum(field.isel(longitude=[0, 1, 2, 5, 6, 9]))
    with pytest.raises(SchemaError, match="holds no latitude"):
        zonal_power_spectrum(field.sel(latitude=slice(0, 90)), lat_bands=[(-60, -30)])
    with pytest.raises(SchemaError, match="longitude"):
        zonal_power_spectrum(field.rename(longitude="x"))


def test_real_era5_uk_temperature_spectrum_is_red_and_seam_independent():
    if not UK_T2M.is_file():
        pytest.skip(f"real ERA5 test file not found at {UK_T2M} (../shared/data/real beside the project)")
    from forecasting.schema import conform

    raw = xr.open_dataset(UK_T2M, engine="cfgrib", backend_kwargs={"indexpath": ""})
    t2m_raw = raw["t2m"].isel(time=slice(0, 12)).load()  # longitudes -10..2, latitudes descending
    t2m = conform(raw.isel(time=slice(0, 12)), source=str(UK_T2M))["2m_temperature"].load()  # 0..2, 350..360
    spectrum = zonal_power_spectrum(t2m).sel(lat_band="global").mean("time")
    assert spectrum.sizes["wavenumber"] == t2m.sizes["longitude"] // 2 + 1
    assert float(spectrum.sel(wavenumber=1)) > 100 * float(spectrum.isel(wavenumber=-1))  # red spectrum
    assert float(spectrum["wavelength_km"].sel(wavenumber=1)) == pytest.approx(800, rel=0.02)  # 12.25 deg at 54N
    from_raw = zonal_power_spectrum(t2m_raw).sel(lat_band="global").mean("time")
    np.testing.assert_allclose(spectrum.values, from_raw.values, rtol=1e-5)
    raw.close()
