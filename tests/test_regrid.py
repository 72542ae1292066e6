"""Bilinear regridding: exact on fields linear in latitude and longitude, periodic on global grids, and
``forecast regrid`` keeps the forecast layout and fails cleanly on a grid that does not cover the target."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from forecasting.cli import main
from forecasting.errors import SchemaError
from forecasting.inference import open_forecast, write_forecast
from forecasting.regrid import interpolate
from forecasting.schema import LEAD, MEMBER, TIME, VALID_TIME

COARSE_LAT = np.linspace(-87.1875, 87.1875, 32)
COARSE_LON = np.arange(64) * 5.625
FINE_LAT = np.linspace(45.0, 72.0, 20)
FINE_LON = np.linspace(0.0, 40.0, 29)


def _forecast(lat: np.ndarray, lon: np.ndarray, field: np.ndarray) -> xr.Dataset:
    """A 2-start, 3-lead, 2-member forecast of ``field`` (lat, lon) scaled by lead and member."""
    starts = pd.date_range("2000-01-01", periods=2, freq="1D")
    leads = pd.to_timedelta([6, 12, 18], unit="h")
    scale = (1.0 + np.arange(3))[None, :, None, None, None] * (1.0 + np.arange(2))[None, None, :, None, None]
    values = np.broadcast_to(field, (2, 3, 2, *field.shape)) * scale
    return xr.Dataset(
        {"2m_temperature": ((TIME, LEAD, MEMBER, "latitude", "longitude"), values.astype("float32"), {"units": "K"})},
        coords={TIME: starts, LEAD: leads, MEMBER: np.arange(2), "latitude": lat, "longitude": lon},
    )


def test_linear_fields_are_reproduced_and_other_dims_kept():
    field = 250.0 + 0.5 * COARSE_LAT[:, None] + 0.0 * COARSE_LON[None, :]
    fc = _forecast(COARSE_LAT, COARSE_LON, field).chunk({TIME: 1})
    out = interpolate(fc, FINE_LAT, FINE_LON, source="coarse")
    assert out["2m_temperature"].dims == fc["2m_temperature"].dims
    assert out.sizes == {TIME: 2, LEAD: 3, MEMBER: 2, "latitude": 20, "longitude": 29}
    expected = 250.0 + 0.5 * FINE_LAT[:, None] + 0.0 * FINE_LON[None, :]
    got = out["2m_temperature"].isel({TIME: 1, LEAD: 2, MEMBER: 1}).values
    np.testing.assert_allclose(got, 6 * expected, rtol=1e-6)
    assert out["2m_temperature"].attrs["units"] == "K"
    assert "coarse" in out.attrs["regridded_from"]


def test_global_grids_wrap_across_the_dateline_and_regional_ones_must_cover():
    # A field linear in longitude between the last column (354.375) and 360 (= column 0) is interpolated
    # across the seam.
    lon_field = np.where(COARSE_LON > 350, COARSE_LON - 354.375, 0.0)
    values = np.broadcast_to(lon_field, (32, 64)).copy()
    values[:, 0] = 5.625
    ds = xr.Dataset({"a": (("latitude", "longitude"), values)}, coords={"latitude": COARSE_LAT, "longitude": COARSE_LON})
    out = interpolate(ds, np.array([0.0]), np.array([357.1875, -2.8125]), source="global")
    np.testing.assert_allclose(out["a"].values[0], [2.8125, 2.8125])

    regional = xr.Dataset({"a": (("latitude", "longitude"), np.zeros((20, 29)))},
                          coords={"latitude": FINE_LAT, "longitude": FINE_LON})
    with pytest.raises(SchemaError, match=r"regional box.*longitudes 0\.\.40 do not cover"):
        interpolate(regional, np.array([50.0]), np.array([50.0]), source="regional box")


def test_regrid_command_writes_the_forecast_layout_with_provenance(tmp_path):
    field = 250.0 + 0.5 * COARSE_LAT[:, None] + 0.1 * np.sin(np.deg2rad(COARSE_LON))[None, :]
    source = write_forecast(_forecast(COARSE_LAT, COARSE_LON, field), tmp_path / "coarse.zarr", model="coarse-model")
    like = tmp_path / "fine.zarr"
    xr.Dataset({"x": (("latitude", "longitude"), np.zeros((20, 29)))},
               coords={"latitude": FINE_LAT, "longitude": FINE_LON}).to_zarr(like, zarr_format=2)
    out = tmp_path / "regridded.zarr"
    assert main(["regrid", str(source), "--like", str(like), "--out", str(out)]) == 0
    fc = open_forecast(out)
    assert fc.attrs["model"] == "coarse-model (bilinear)"
    np.testing.assert_allclose(fc["latitude"].values, FINE_LAT)
    np.testing.assert_array_equal(fc[VALID_TIME].values, open_forecast(source)[VALID_TIME].values)
    assert main(["regrid", str(source), "--like", str(like), "--out", str(out)]) == 2  # exists: refused


def test_a_regional_forecast_that_does_not_cover_the_target_leaves_nothing(tmp_path, capsys):
    small = write_forecast(_forecast(FINE_LAT, FINE_LON, np.zeros((20, 29))), tmp_path / "small.zarr", model="m")
    like = tmp_path / "wide.zarr"
    xr.Dataset({"x": (("latitude", "longitude"), np.zeros((3, 4)))},
               coords={"latitude": [50.0, 55.0, 60.0], "longitude": [-20.0, 0.0, 20.0, 60.0]}).to_zarr(like, zarr_format=2)
    out = tmp_path / "out.zarr"
    assert main(["regrid", str(small), "--like", str(like), "--out", str(out)]) == 2
    assert "do not cover" in capsys.readouterr().err
    assert not out.exists()
    assert not list(tmp_path.glob(".out.zarr*"))
