"""conform(), validate() and check_values(): every mapping and every failure names what it found."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from conftest import make_canonical_dataset
from forecasting.errors import SchemaError
from forecasting.schema import (
    ConformOptions,
    canonical_name,
    check_time_axis,
    check_values,
    conform,
    subset,
    unit_conversion,
    validate,
)


def _raw_era5_like() -> xr.Dataset:
    """What an ERA5 netCDF download looks like: short names, lat descending, -180..180, (lon, lat, time)."""
    time = pd.date_range("2020-01-01", periods=4, freq="6h")
    lat = np.array([60.0, 30.0, 0.0, -30.0, -60.0])
    lon = np.array([-180.0, -90.0, 0.0, 90.0])
    t2m = np.arange(4 * 5 * 4, dtype="float32").reshape(4, 5, 4) + 250
    ds = xr.Dataset(
        {"t2m": (("lon", "lat", "time"), t2m.transpose(2, 1, 0), {"units": "K"}),
         "msl": (("time", "lat", "lon"), np.full((4, 5, 4), 1013.0, "float32"), {"units": "hPa"})},
        coords={"time": time, "lat": lat, "lon": lon},
    )
    return ds


def test_conform_maps_short_names_dims_orientation_and_units():
    raw = _raw_era5_like()
    ds = conform(raw, source="era5.nc")
    assert set(ds.data_vars) == {"2m_temperature", "mean_sea_level_pressure"}
    assert ds["2m_temperature"].dims == ("time", "latitude", "longitude")
    assert np.all(np.diff(ds.latitude) > 0)
    assert ds.longitude.values.tolist() == [0.0, 90.0, 180.0, 270.0]
    # value at (t=1, lat=60, lon=-90) in the raw file sits at (lat=60, lon=270) after conforming
    expected = float(raw.t2m.sel(time=raw.time[1], lat=60.0, lon=-90.0))
    assert float(ds["2m_temperature"].isel(time=1).sel(latitude=60.0, longitude=270.0)) == expected
    np.testing.assert_allclose(ds.mean_sea_level_pressure.values, 101300.0)
    assert ds.mean_sea_level_pressure.attrs["units"] == "Pa"
    assert ds["2m_temperature"].attrs["source_name"] == "t2m"
    assert validate(ds, source="era5.nc").step == pd.Timedelta("6h")


def test_conform_does_not_mutate_input():
    raw = _raw_era5_like()
    before = raw.copy(deep=True)
    conform(raw, source="x")
    xr.testing.assert_identical(raw, before)


def test_conform_levels_from_pa_and_isobaric_names_sorted_ascending():
    base = make_canonical_dataset(levels=(850.0, 500.0))
    raw = base.rename({"level": "plev", "geopotential": "z"}).assign_coords(plev=[85000.0, 50000.0])
    raw["plev"].attrs["units"] = "Pa"
    ds = conform(raw, source="cmip.nc")
    assert ds.level.values.tolist() == [500.0, 850.0]
    np.testing.assert_array_equal(ds.geopotential.sel(level=500.0).values, base.geopotential.sel(level=500.0).values)
    raw2 = base.rename({"level": "isobaricInhPa"})
    assert conform(raw2, source="x.grib").level.values.tolist() == [500.0, 850.0]


def test_conform_grib_number_and_step():
    base = make_canonical_dataset(levels=(500.0,))
    raw = base.rename({"level": "isobaricInhPa", "geopotential": "z", "2m_temperature": "t2m"})
    raw = raw.expand_dims(number=[0, 1, 2]).assign_coords(step=np.timedelta64(0, "ns"), surface=0.0)
    raw = raw.assign_coords(valid_time=("time", raw.time.values))
    ds = conform(raw, source="ens.grib")
    assert ds.geopotential.dims == ("time", "realization", "level", "latitude", "longitude")
    assert "step" not in ds.coords and "surface" not in ds.coords and "valid_time" not in ds.coords

    fc = raw.isel(time=0).expand_dims(step=pd.to_timedelta([0, 6, 12], unit="h")).drop_vars("valid_time")
    fc = fc.assign_coords(time=raw.time.values[0])
    ds_fc = conform(fc.drop_vars("step").assign_coords(step=fc.step.values), source="fc.grib")
    assert "prediction_timedelta" in ds_fc.dims
    assert ds_fc.valid_time.values[-1] == raw.time.values[0] + np.timedelta64(12, "h")


def test_conform_integer_hour_offsets_with_reference_string():
    raw = xr.Dataset(
        {"p": (("timestep", "lat", "lon"), np.full((3, 2, 2), 101000.0, "float32"), {"units": "Pa"}),
         "reftime": ((), np.bytes_(b"1996 01 05 00:00"))},
        coords={"timestep": np.array([0, 6, 12], dtype="int32"), "lat": [20.0, 21.25], "lon": [-140.0, -137.5]},
    )
    ds = conform(raw, source="storm.cdf", options=ConformOptions(rename={"p": "mean_sea_level_pressure"}))
    assert pd.DatetimeIndex(ds.time.values).tolist() == list(pd.date_range("1996-01-05", periods=3, freq="6h"))
    assert ds.time.dtype == np.dtype("datetime64[ns]")
    assert ds.longitude.values.tolist() == [220.0, 222.5]
    with pytest.raises(SchemaError, match="no reference time"):
        conform(raw.drop_vars("reftime"), source="storm.cdf")


def test_missing_units_error_names_file_and_variable_and_declaring_fixes_it():
    raw = _raw_era5_like()
    raw["t2m"].attrs = {}
    with pytest.raises(SchemaError, match=r"era5\.nc: variable 't2m' .* no units"):
        conform(raw, source="era5.nc")
    ds = conform(raw, source="era5.nc", options=ConformOptions(units={"t2m": "degC"}))
    assert float(ds["2m_temperature"].min()) == pytest.approx(250 + 273.15)


def test_wrong_units_are_rejected_with_the_value_found():
    raw = _raw_era5_like()
    raw["t2m"].attrs["units"] = "mm d-1"
    with pytest.raises(SchemaError, match=r"'mm d-1'.*not temperature units"):
        conform(raw, source="q.nc")


def test_precipitation_rate_becomes_accumulation_over_the_step():
    time = pd.date_range("1970-01-01", periods=3, freq="D")
    raw = xr.Dataset({"tp": (("time", "lat", "lon"), np.full((3, 1, 1), 10.0, "float32"), {"units": "mm d-1"})},
                     coords={"time": time, "lat": [45.0], "lon": [285.0]})
    ds = conform(raw, source="q.nc")
    assert list(ds.data_vars) == ["total_precipitation_24hr"]
    np.testing.assert_allclose(ds.total_precipitation_24hr.values, 0.01)
    assert ds.total_precipitation_24hr.attrs["units"] == "m"


@pytest.mark.parametrize(
    ("times", "message"),
    [
        (["2000-01-01T00", "2000-01-01T06", "2000-01-01T06"], "duplicated time 2000-01-01 06:00"),
        (["2000-01-01T06", "2000-01-01T00", "2000-01-01T12"], "not increasing: 2000-01-01 06:00:00 is followed by 2000-01-01 00:00"),
        (["2000-01-01T00", "2000-01-01T06", "2000-01-01T10"], "irregular time spacing"),
    ],
)
def test_bad_time_axes_are_rejected(times, message):
    with pytest.raises(SchemaError, match=message):
        check_time_axis(pd.DatetimeIndex(times).values, source="f.nc")


def test_gaps_are_reported_not_rejected():
    times = pd.DatetimeIndex(["2000-01-01T00", "2000-01-01T06", "2000-01-02T00", "2000-01-02T06"])
    report = check_time_axis(times.values, source="f.nc")
    assert report.step == pd.Timedelta("6h")
    assert report.gaps == ((pd.Timestamp("2000-01-01T06"), pd.Timestamp("2000-01-02T00")),)
    assert "1 gap(s)" in report.describe()


def test_duplicate_target_names_need_an_explicit_rename():
    raw = _raw_era5_like()
    raw["tas"] = raw["t2m"]
    with pytest.raises(SchemaError, match=r"several variables map onto \['2m_temperature'\]"):
        conform(raw, source="x.nc")


def test_unknown_rename_target_and_missing_rename_source():
    raw = _raw_era5_like()
    with pytest.raises(SchemaError, match="not canonical variable names"):
        conform(raw, source="x.nc", options=ConformOptions(rename={"t2m": "temp2"}))
    with pytest.raises(SchemaError, match=r"variables \['t3m'\] named in rename are not in the file"):
        conform(raw, source="x.nc", options=ConformOptions(rename={"t3m": "2m_temperature"}))


def test_latitude_out_of_range_is_named():
    raw = _raw_era5_like().assign_coords(lat=[95.0, 30.0, 0.0, -30.0, -60.0])
    with pytest.raises(SchemaError, match=r"x\.nc: latitude outside \[-90, 90\]: .* max 95"):
        conform(raw, source="x.nc")


def test_attach_level_to_single_level_file():
    raw = _raw_era5_like()[["t2m"]].rename({"t2m": "u"})
    raw["u"].attrs["units"] = "m s-1"
    ds = conform(raw, source="u500.cdf", options=ConformOptions(levels={"u": 500}))
    assert ds.u_component_of_wind.dims == ("time", "level", "latitude", "longitude")
    assert ds.level.values.tolist() == [500.0]
    assert ds.u_component_of_wind.attrs["units"] == "m s**-1"


def test_check_values_rejects_nans_without_a_declared_mask(canonical_dataset):
    ds = canonical_dataset.copy(deep=True)
    ds["2m_temperature"][2, 1, 3] = np.nan
    with pytest.raises(SchemaError, match=r"'2m_temperature' holds 1 NaN values \(first at .*'latitude'"):
        check_values(ds, source="f.nc")


def test_check_values_rejects_infinities(canonical_dataset):
    ds = canonical_dataset.copy(deep=True)
    ds["geopotential"][0, 0, 0, 0] = np.inf
    with pytest.raises(SchemaError, match="infinite"):
        check_values(ds, source="f.nc", nan_policy="allow")


def test_fixed_mask_is_kept_and_fully_missing_steps_dropped(canonical_dataset):
    ds = canonical_dataset.copy(deep=True)
    ds["2m_temperature"][:, 0, :] = np.nan  # a static mask: the first latitude row
    ds["2m_temperature"][3] = np.nan  # one time step missing entirely
    out, report = check_values(ds, source="f.nc", nan_policy="fixed")
    assert report.masked_points == {"2m_temperature": ds.sizes["longitude"]}
    assert report.dropped_times == (pd.Timestamp(ds.time.values[3]),)
    assert out.sizes["time"] == ds.sizes["time"] - 1
    assert out["2m_temperature_mask"].dtype == bool
    assert not bool(out["2m_temperature_mask"].isel(latitude=0).any())
    assert canonical_dataset["2m_temperature"].notnull().all()  # input untouched

    ds["2m_temperature"][5, 2, 2] = np.nan  # a stray NaN outside the mask
    with pytest.raises(SchemaError, match="NaNs outside its static mask"):
        check_values(ds, source="f.nc", nan_policy="fixed")


def test_validate_rejects_non_canonical_layouts(canonical_dataset):
    with pytest.raises(SchemaError, match="latitude must be ascending"):
        validate(canonical_dataset.isel(latitude=slice(None, None, -1)), source="s")
    bad_units = canonical_dataset.copy()
    bad_units["2m_temperature"] = bad_units["2m_temperature"].assign_attrs(units="degC")
    with pytest.raises(SchemaError, match="canonical units are 'K'"):
        validate(bad_units, source="s")


def test_subset_by_variable_level_time_and_wrapping_area(canonical_dataset):
    ds = canonical_dataset
    out = subset(ds, variables=["geopotential"], levels=[500.0], time=("2000-01-01T06", "2000-01-01T18"),
                 area=(-30.0, 45.0, 300.0, 60.0), source="s")
    assert list(out.data_vars) == ["geopotential"]
    assert out.level.values.tolist() == [500.0]
    assert out.sizes["time"] == 3
    assert out.longitude.values.tolist() == [0.0, 30.0, 60.0, 300.0, 330.0]
    assert out.latitude.min() >= -30 and out.latitude.max() <= 45
    with pytest.raises(SchemaError, match=r"requested variables \['temperature'\] are not available"):
        subset(ds, variables=["temperature"], source="s")
    with pytest.raises(SchemaError, match=r"levels \[700.0\] hPa not available"):
        subset(ds, levels=[700.0], source="s")
    with pytest.raises(SchemaError, match="holds no grid points"):
        subset(ds, area=(80.0, 85.0, 0.0, 10.0), source="s")


def test_alias_and_unit_tables():
    assert canonical_name("t2m") == "2m_temperature"
    assert canonical_name("isobaricInhPa") is None
    assert unit_conversion("2m_temperature", "degC") == (1.0, 273.15)
    assert unit_conversion("10m_u_component_of_wind", "m/s") == (1.0, 0.0)
    assert unit_conversion("10m_u_component_of_wind", "m s-1") == (1.0, 0.0)
    assert unit_conversion("geopotential", "m2 s-2") == (1.0, 0.0)
    assert unit_conversion("2m_temperature", "mm d-1") is None


def test_real_grib_files_conform(real_data):
    for name, n_vars in [("era5-2mt-2019-03-uk.grib", 1), ("era5-levels-members.grib", 2)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            raw = xr.open_dataset(real_data / name, engine="cfgrib", backend_kwargs={"indexpath": ""})
        ds = conform(raw, source=name)
        validate(ds, source=name)
        assert len(ds.data_vars) == n_vars
    assert ds.geopotential.dims == ("time", "realization", "level", "latitude", "longitude")


def test_real_quebec_grid_needs_declared_units(real_data):
    path = real_data / "era5land-quebec-1970-daily.nc"
    raw = xr.open_dataset(path)
    with pytest.raises(SchemaError, match=r"'tasmax' .* units 'mm d-1'"):
        conform(raw, source=str(path))
    ds = conform(raw, source=str(path), options=ConformOptions(units={"tasmax": "degC", "tasmin": "degC"}))
    validate(ds, source=str(path))
    raw_value = float(raw.tasmax.isel(time=200, latitude=0, longitude=0))
    assert float(ds.maximum_2m_temperature.isel(time=200).sel(
        latitude=float(raw.latitude[0]), longitude=float(raw.longitude[0]) % 360)) == pytest.approx(raw_value + 273.15, abs=1e-3)
