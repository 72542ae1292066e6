"""Area weights of latitude/longitude grids: the one weighting shared by the training loss and the metrics.

A cell of a regular latitude grid centred on latitude ``phi`` with spacing ``dphi`` covers the band
``[phi - dphi/2, phi + dphi/2]`` (clipped to [-90, 90] at the poles), whose area on the unit sphere is
proportional to ``sin(phi + dphi/2) - sin(phi - dphi/2)``. This is WeatherBench2's ``get_lat_weights``
(Rasp et al. 2024, WeatherBench 2), whose cell bounds are the midpoints between latitudes and +-90 at the
ends; for a regular grid both are the same numbers. Away from the poles the weight is exactly
proportional to ``cos(phi)``; a row that sits on a pole gets the area of its half cell instead of zero.

Irregular grids (Gaussian grids, hand-made lists) and single latitudes fall back to ``cos(phi)``.
Weights are normalised to mean 1, so a weighted mean is ``mean(w * x)`` and a loss keeps its scale.

Only NumPy and xarray are used here, so torch code can call :func:`latitude_weights` with a NumPy array.
"""

from __future__ import annotations

from typing import overload

import numpy as np
import xarray as xr

from forecasting.errors import SchemaError
from forecasting.schema import LAT

#: Relative tolerance on the latitude spacing below which a grid counts as regular (float32 files).
_REGULAR_RTOL = 1e-3


@overload
def latitude_weights(latitude: xr.DataArray) -> xr.DataArray: ...


@overload
def latitude_weights(latitude: np.ndarray) -> np.ndarray: ...


def latitude_weights(latitude: np.ndarray | xr.DataArray) -> np.ndarray | xr.DataArray:
    """Cell-area weights of the latitudes ``latitude`` (degrees north), normalised to mean 1.

    Args:
        latitude: 1-D latitudes in degrees, ascending or descending. Shape (n_lat,).

    Returns:
        Weights of shape (n_lat,), float64: a NumPy array for array input, a DataArray with the
        input's dims and coords (named ``latitude_weights``) for DataArray input. For a regular grid
        ``w_i ~ sin(min(phi_i + d/2, 90)) - sin(max(phi_i - d/2, -90))``; otherwise ``w_i ~ cos(phi_i)``.

    Raises:
        SchemaError: when the latitudes are not 1-D, contain NaN or lie outside [-90, 90].
    """
    if isinstance(latitude, xr.DataArray):
        values = _latitude_weights(np.asarray(latitude.values), source=f"DataArray {latitude.name!r}")
        return xr.DataArray(values, dims=latitude.dims, coords=latitude.coords, name="latitude_weights")
    return _latitude_weights(np.asarray(latitude), source="array")


def _latitude_weights(latitude: np.ndarray, *, source: str) -> np.ndarray:
    lat = latitude.astype(np.float64)
    if lat.ndim != 1:
        raise SchemaError(f"latitude must be 1-D for area weights ({source}); found shape {lat.shape}")
    if lat.size == 0:
        raise SchemaError(f"latitude is empty ({source}); cannot compute area weights")
    if not np.all(np.isfinite(lat)) or np.any(np.abs(lat) > 90.0):
        bad = lat[~np.isfinite(lat) | (np.abs(lat) > 90.0)]
        raise SchemaError(f"latitude must be finite and within [-90, 90] ({source}); found {bad[:3]}")
    if lat.size == 1:
        return np.ones(1)
    steps = np.diff(lat)
    regular = steps[0] != 0 and np.allclose(steps, steps[0], rtol=_REGULAR_RTOL, atol=0.0)
    if regular:
        half = abs(float(steps[0])) / 2.0
        upper = np.deg2rad(np.clip(lat + half, -90.0, 90.0))
        lower = np.deg2rad(np.clip(lat - half, -90.0, 90.0))
        weights = np.sin(upper) - np.sin(lower)
    else:
        weights = np.clip(np.cos(np.deg2rad(lat)), 0.0, None)
    total = weights.mean()
    if total <= 0.0:
        raise SchemaError(f"latitude area weights are all zero ({source}); latitudes {lat[:3]}")
    return weights / total


def area_weights(obj: xr.Dataset | xr.DataArray) -> xr.DataArray | None:
    """Area weights for averaging ``obj`` over space, or None where every point counts the same.

    Args:
        obj: gridded data with a ``latitude`` dim (any other dims), or station data with a ``station``
            dim (``latitude`` is then a per-station coordinate, not a dim).

    Returns:
        For gridded data a DataArray of shape (latitude,) from :func:`latitude_weights` (mean 1,
        constant along longitude); for data without a ``latitude`` dim (stations, single points) None,
        meaning uniform weights.
    """
    if LAT not in obj.dims:
        return None
    if LAT not in obj.coords:
        raise SchemaError(f"dim {LAT!r} has no coordinate values; cannot compute area weights")
    return latitude_weights(obj[LAT].reset_coords(drop=True))
