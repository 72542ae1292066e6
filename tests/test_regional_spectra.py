"""Regional (2-D DCT) power spectra: cosine modes, Parseval, trends, smoothing, coordinates, errors, and their use
in ``forecast verify`` on a limited-area grid with several references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from forecasting.data.store import write_store
from forecasting.errors import SchemaError
from forecasting.inference import write_forecast
from forecasting.verification.spectra import (
    EARTH_RADIUS_KM,
    regional_band_count,
    regional_power_spectrum,
    small_scale_band,
    small_scale_power_ratio,
    truth_resolution_km,
)
from forecasting.verification.verify import verify

LAT = 45.0 + 1.5 * np.arange(16)  # 16 x 20 points, 1.5 x 2 degrees
LON = 2.0 * np.arange(20)


def field(values: np.ndarray, lat: np.ndarray = LAT, lon: np.ndarray = LON, **leading: np.ndarray) -> xr.DataArray:
    dims = (*leading, "latitude", "longitude")
    return xr.DataArray(values, dims=dims, coords={**leading, "latitude": lat, "longitude": lon}, name="t2m",
                        attrs={"units": "K"})


def geometry(lat: np.ndarray = LAT, lon: np.ndarray = LON) -> tuple[float, float, float]:
    """(L_y, L_x, delta) in km as the module docstring defines them."""
    dy = np.deg2rad(lat[1] - lat[0]) * EARTH_RADIUS_KM
    dx = np.deg2rad(lon[1] - lon[0]) * EARTH_RADIUS_KM * np.cos(np.deg2rad((lat[0] + lat[-1]) / 2))
    length_y, length_x = lat.size * dy, lon.size * dx
    return length_y, length_x, 1.0 / (2.0 * min(length_y, length_x))


def cosine_mode(m: int, n: int, amplitude: float, lat: np.ndarray = LAT, lon: np.ndarray = LON) -> np.ndarray:
    i, j = np.arange(lat.size)[:, None], np.arange(lon.size)[None, :]
    return amplitude * np.cos(np.pi * m * (i + 0.5) / lat.size) * np.cos(np.pi * n * (j + 0.5) / lon.size)


@pytest.mark.parametrize(("m", "n"), [(0, 1), (0, 7), (3, 0), (4, 5), (9, 2)])
def test_a_cosine_mode_puts_its_power_in_its_band(m, n):
    amplitude = 3.0
    values = cosine_mode(m, n, amplitude)
    spectrum = regional_power_spectrum(field(values))
    length_y, length_x, delta = geometry()
    kappa = np.hypot(m / (2 * length_y), n / (2 * length_x))
    band = int(np.floor(kappa / delta + 0.5))
    expected = amplitude**2 / 2 if m == 0 or n == 0 else amplitude**2 / 4  # mean of cos^2 (cos^2)
    assert spectrum.dims == ("wavenumber",)
    assert float(spectrum.sel(wavenumber=band)) == pytest.approx(expected, rel=1e-10)
    np.testing.assert_allclose(spectrum.drop_sel(wavenumber=band).values, 0.0, atol=1e-20)
    assert float(spectrum.sel(wavenumber=band)) == pytest.approx(values.var(), rel=1e-10)


def test_band_powers_sum_to_the_variance_of_fields_inside_the_resolved_circle():
    rng = np.random.default_rng(0)
    _, _, delta = geometry()
    n_bands = regional_band_count(LAT, LON)
    length_y, length_x, _ = geometry()
    values = np.full((LAT.size, LON.size), 7.0)  # a mean, which is no variance
    for m in range(LAT.size):
        for n in range(LON.size):
            band = np.floor(np.hypot(m / (2 * length_y), n / (2 * length_x)) / delta + 0.5)
            if (m or n) and 1 <= band <= n_bands:
                values = values + cosine_mode(m, n, rng.normal())
    spectrum = regional_power_spectrum(field(values))
    assert float(spectrum.sum()) == pytest.approx(values.var(), rel=1e-10)


def test_a_linear_trend_stays_at_the_largest_scales_without_detrending():
    # Not periodic: a Fourier spectrum would smear the edge jump over every wavenumber; the DCT does not.
    values = np.tile(np.linspace(0.0, 10.0, LON.size), (LAT.size, 1))
    spectrum = regional_power_spectrum(field(values))
    total = values.var()
    assert float(spectrum.sel(wavenumber=1)) > 0.98 * total
    finest = spectrum.wavenumber > 2 * spectrum.wavenumber.max() / 3
    assert float(spectrum.where(finest, drop=True).sum()) < 1e-3 * total


def test_an_interpolated_coarse_field_loses_small_scale_power():
    rng = np.random.default_rng(1)
    fine = rng.normal(size=(12, 18)).cumsum(axis=0).cumsum(axis=1) / 6 + rng.normal(size=(12, 18))
    lat, lon = LAT[:12], LON[:18]
    coarse = fine.reshape(4, 3, 6, 3).mean(axis=(1, 3))  # 3 x 3 block means
    smooth = xr.DataArray(coarse, dims=("latitude", "longitude"),
                          coords={"latitude": lat.reshape(4, 3).mean(1), "longitude": lon.reshape(6, 3).mean(1)})
    smooth = smooth.interp(latitude=lat, longitude=lon, kwargs={"fill_value": "extrapolate"})
    truth = regional_power_spectrum(field(fine, lat, lon))
    blurred = regional_power_spectrum(field(smooth.values, lat, lon))
    assert float(small_scale_power_ratio(truth, truth)) == pytest.approx(1.0)
    assert float(small_scale_power_ratio(blurred, truth)) < 0.3
    # a wavelength window picks the bands inside it
    window = (float(truth.wavelength_km[4]), float(truth.wavelength_km[2]))
    expected = blurred.isel(wavenumber=[2, 3, 4]).sum() / truth.isel(wavenumber=[2, 3, 4]).sum()
    assert float(small_scale_power_ratio(blurred, truth, wavelengths_km=window)) == pytest.approx(float(expected))
    with pytest.raises(SchemaError, match="no band has a wavelength"):
        small_scale_power_ratio(blurred, truth, wavelengths_km=(1.0, 2.0))


def test_other_dims_are_kept_and_wavelengths_follow_the_bands():
    rng = np.random.default_rng(2)
    times = pd.date_range("2000-01-01", periods=3, freq="6h").to_numpy()
    values = rng.normal(size=(3, 2, LAT.size, LON.size))
    data = field(values, time=times, realization=np.arange(2)).transpose("latitude", "time", "longitude", "realization")
    spectrum = regional_power_spectrum(data)
    assert spectrum.dims == ("time", "realization", "wavenumber")
    np.testing.assert_array_equal(spectrum.wavenumber, np.arange(1, regional_band_count(LAT, LON) + 1))
    _, _, delta = geometry()
    np.testing.assert_allclose(spectrum.wavelength_km * spectrum.wavenumber, 1.0 / delta)
    assert spectrum.attrs["units"] == "(K)**2"
    single = regional_power_spectrum(field(values[1, 0]))
    np.testing.assert_allclose(spectrum.isel(time=1, realization=0).values, single.values, rtol=1e-12)
    lazy = regional_power_spectrum(xr.Dataset({"t2m": data.chunk({"time": 1})}))
    assert lazy["t2m"].chunks is not None
    np.testing.assert_allclose(lazy["t2m"].transpose(*spectrum.dims).values, spectrum.values, rtol=1e-12)


def test_bad_grids_raise_schema_errors():
    with pytest.raises(SchemaError, match="regularly spaced"):
        regional_power_spectrum(field(np.zeros((LAT.size, 3)), lon=np.array([0.0, 1.0, 5.0])))
    with pytest.raises(SchemaError, match="too small"):
        regional_power_spectrum(field(np.zeros((3, 3)), lat=LAT[:3], lon=20.0 * np.arange(3)))  # 1.5 x 20 degrees
    with pytest.raises(SchemaError, match="'latitude' and 'longitude' dims"):
        regional_power_spectrum(xr.DataArray(np.zeros((4, 4)), dims=("y", "x")))
    spectrum = regional_power_spectrum(field(np.ones((LAT.size, LON.size))))
    other = regional_power_spectrum(field(np.ones((10, 10)), lat=LAT[:10], lon=LON[:10]))
    with pytest.raises(SchemaError, match="different wavenumber axes"):
        small_scale_power_ratio(spectrum, other)
    with pytest.raises(SchemaError, match="fraction"):
        small_scale_power_ratio(spectrum, spectrum, fraction=0.0)


# ----------------------------------------------------------------------------------------------
# forecast verify on a limited-area grid
# ----------------------------------------------------------------------------------------------
def _regional_truth(root: Path) -> tuple[Path, xr.Dataset]:
    rng = np.random.default_rng(3)
    times = pd.date_range("2000-01-01", periods=12, freq="6h")
    large = np.cos(np.deg2rad(LON))[None, None, :] * np.linspace(0, 4, LAT.size)[None, :, None]
    values = 270.0 + large + rng.normal(size=(12, LAT.size, LON.size))
    truth = xr.Dataset({"2m_temperature": (("time", "latitude", "longitude"), values.astype("float32"), {"units": "K"})},
                       coords={"time": times, "latitude": LAT, "longitude": LON})
    return write_store(truth, root / "truth.zarr"), truth


def _as_forecast(truth: xr.Dataset, members: list[np.ndarray]) -> xr.Dataset:
    starts = truth.time.values[:4]
    values = np.stack([np.stack([m[i : i + 2] for i in range(4)]) for m in members], axis=2)  # (start, lead, member, ..)
    return xr.Dataset(
        {"2m_temperature": (("time", "prediction_timedelta", "realization", "latitude", "longitude"),
                            values.astype("float32"), {"units": "K"})},
        coords={"time": starts, "prediction_timedelta": pd.to_timedelta([0, 6], unit="h"),
                "realization": np.arange(len(members)), "latitude": LAT, "longitude": LON},
    )


def test_verify_writes_regional_spectra_and_the_small_scale_table_with_several_references(tmp_path):
    truth_path, truth = _regional_truth(tmp_path)
    rng = np.random.default_rng(4)
    t = truth["2m_temperature"].values
    smooth = (t + np.roll(t, 1, axis=-1) + np.roll(t, -1, axis=-1) + np.roll(t, 1, axis=-2) + np.roll(t, -1, axis=-2)) / 5
    ensemble = write_forecast(_as_forecast(truth, [t + 0.3 * rng.normal(size=t.shape) for _ in range(3)]),
                              tmp_path / "ensemble.zarr", model="ensemble")
    blurred = write_forecast(_as_forecast(truth, [smooth]), tmp_path / "blurred.zarr", model="blurred")
    other = write_forecast(_as_forecast(truth, [t + 1.0]), tmp_path / "other.zarr", model="shifted")
    result = verify(ensemble, out_dir=tmp_path / "verify", truth_path=truth_path, reference=[str(blurred), str(other)],
                    n_resamples=50, plots=True)
    spectra = xr.open_dataset(result.out_dir / "spectra.nc")["power"].load()
    assert set(spectra.model.values) == {"ensemble", "blurred", "shifted"}
    assert set(spectra.source.values) == {"forecast", "ensemble_mean", "truth"}
    assert "lat_band" not in spectra.dims
    ratio = small_scale_power_ratio(spectra.sel(source="forecast"), spectra.sel(source="truth"))
    lead = {"prediction_timedelta": spectra.prediction_timedelta.values[0], "variable": "2m_temperature"}
    assert 0.9 < float(ratio.sel(model="ensemble", **lead)) < 1.3  # noise of std 0.3 on unit noise adds ~9 %
    assert float(ratio.sel(model="blurred", **lead)) < 0.5
    assert float(ratio.sel(model="shifted", **lead)) == pytest.approx(1.0, rel=1e-5)  # a constant shift has no variance
    assert result.scorecard is not None and result.scorecard.attrs["reference"] == "blurred"
    assert {"ensemble", "blurred", "shifted"} == set(result.scores.model.values)
    summary = (result.out_dir / "summary.md").read_text()
    assert "## Small-scale variance restored" in summary and "| 2m_temperature | ensemble (ensemble mean) |" in summary
    assert "references scored alongside: blurred, shifted" in summary
    assert (result.out_dir / "plots" / "spectra_2m_temperature.png").stat().st_size > 0


def test_the_small_scale_band_stops_at_the_shortest_wavelength_the_truth_resolves():
    wavelengths = np.array([4000.0, 2000.0, 1300.0, 1000.0, 800.0, 650.0, 540.0, 460.0, 400.0])
    assert small_scale_band(wavelengths) == (400.0, 540.0)  # the finest third of all nine bands
    assert small_scale_band(wavelengths, 635.0) == (650.0, 800.0)  # the finest third of the six it resolves
    assert small_scale_band(wavelengths, 5000.0) == (400.0, 540.0)  # resolves none: the grid's bands
    truth = xr.Dataset(attrs={"spectral_truncation": 63})
    assert truth_resolution_km(truth) == pytest.approx(2 * np.pi * 6371.0 / 63)  # 635 km
    assert truth_resolution_km(xr.Dataset()) is None
    assert truth_resolution_km(xr.Dataset(attrs={"spectral_truncation": "n/a"})) is None


def test_verify_compares_small_scales_the_truth_resolves_when_it_names_its_truncation(tmp_path):
    _, truth = _regional_truth(tmp_path)
    truth.attrs["spectral_truncation"] = 20  # 2002 km: only the longest bands of this small box are resolved
    truth_path = write_store(truth, tmp_path / "truncated.zarr")
    forecast = write_forecast(_as_forecast(truth, [truth["2m_temperature"].values]), tmp_path / "f.zarr", model="f")
    summary = (verify(forecast, out_dir=tmp_path / "v", truth_path=truth_path, plots=False).out_dir
               / "summary.md").read_text()
    assert "resolves wavelengths down to 2002 km" in summary
    assert "| 2m_temperature | f | 1.000 | 1.000 |" in summary
