"""Bilinear interpolation between regular latitude-longitude grids (NumPy and xarray; no torch).

Used wherever one grid's values are needed on another: boundary values of a limited-area model, the
"coarse model interpolated to the region" reference of the stretched-grid and downscaling evaluations.

Conventions: latitudes ascending, longitudes ascending in degrees east (any 360-degree convention for the
points). A source grid whose longitudes span the whole circle (``n * spacing = 360``) wraps around;
any other must cover the target longitudes. Targets poleward of the outermost source latitudes take the
outermost row (the usual clamp of global 0.25/1.5/5.625-degree grids, whose rows stop short of the poles).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

from forecasting.errors import SchemaError
from forecasting.schema import LAT, LON

__all__ = ["COORD_ATOL", "bilinear_weights", "interpolate"]

#: Tolerance in degrees when grid coordinates are compared (float32 files).
COORD_ATOL = 1e-4


def bilinear_weights(
    src_lat: np.ndarray, src_lon: np.ndarray, dst_lat: np.ndarray, dst_lon: np.ndarray, *, source: str
) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear interpolation from a regular lat/lon grid to points.

    ``src_lat``/``src_lon`` ascending (degrees); a grid whose longitudes span the circle (``n * spacing``
    = 360) wraps around, any other must cover the points' longitudes. Points poleward of the outermost
    latitudes take the outermost row. Returns ``(index, weight)``, each of shape (P, 4): row-major indices
    into the flattened ``(H * W)`` source grid and weights summing to 1.

    Raises SchemaError naming ``source`` when a point lies outside a non-global source grid.
    """
    src_lat = np.asarray(src_lat, dtype=np.float64)
    src_lon = np.asarray(src_lon, dtype=np.float64)
    dst_lat = np.asarray(dst_lat, dtype=np.float64)
    dst_lon = np.mod(np.asarray(dst_lon, dtype=np.float64), 360.0)
    height, width = len(src_lat), len(src_lon)
    spacing = (src_lon[-1] - src_lon[0]) / max(width - 1, 1)
    periodic = width > 1 and np.isclose(spacing * width, 360.0, atol=1e-3)
    # Latitude: clamp to the outermost rows.
    if height > 1:
        i1 = np.clip(np.searchsorted(src_lat, dst_lat), 1, height - 1)
        i0 = i1 - 1
        t = np.clip((dst_lat - src_lat[i0]) / (src_lat[i1] - src_lat[i0]), 0.0, 1.0)
    else:
        i0 = i1 = np.zeros(len(dst_lat), dtype=np.int64)
        t = np.zeros(len(dst_lat))
    if periodic:
        x = np.mod(dst_lon - src_lon[0], 360.0) + src_lon[0]
        extended = np.append(src_lon, src_lon[0] + 360.0)
        j1 = np.clip(np.searchsorted(extended, x), 1, width)
        j0 = j1 - 1
        u = (x - extended[j0]) / (extended[j1] - extended[j0])
        j1 = j1 % width
    else:
        outside = (dst_lon < src_lon[0] - COORD_ATOL) | (dst_lon > src_lon[-1] + COORD_ATOL)
        if np.any(outside):
            raise SchemaError(
                f"{source}: longitudes {src_lon[0]:g}..{src_lon[-1]:g} do not cover the points to interpolate "
                f"to (e.g. {dst_lon[outside][:3].tolist()}); give a global dataset or one covering them"
            )
        j1 = np.clip(np.searchsorted(src_lon, dst_lon), 1, width - 1)
        j0 = j1 - 1
        u = np.clip((dst_lon - src_lon[j0]) / (src_lon[j1] - src_lon[j0]), 0.0, 1.0)
    index = np.stack([i0 * width + j0, i0 * width + j1, i1 * width + j0, i1 * width + j1], axis=1)
    weight = np.stack([(1 - t) * (1 - u), (1 - t) * u, t * (1 - u), t * u], axis=1)
    return index.astype(np.int64), weight


def interpolate(
    ds: xr.Dataset,
    latitude: Sequence[float] | np.ndarray,
    longitude: Sequence[float] | np.ndarray,
    *,
    source: str,
) -> xr.Dataset:
    """``ds`` bilinearly interpolated onto the grid ``latitude`` x ``longitude`` (lazy when ``ds`` is dask).

    Every variable with both ``latitude`` and ``longitude`` dims is interpolated (other dims, e.g. ``time``,
    ``prediction_timedelta``, ``realization``, ``level``, are kept); variables without them are kept as
    they are. Coordinates on the horizontal dims (e.g. a 2-D mask coordinate) are dropped. NaNs propagate
    to every target point whose four neighbours include one. The result's attrs add ``regridded_from``.

    Raises SchemaError naming ``source`` when ``ds`` has no latitude/longitude dims, when its latitudes or
    longitudes are not ascending, or when a non-global grid does not cover the target longitudes.
    """
    if LAT not in ds.dims or LON not in ds.dims:
        raise SchemaError(f"{source}: cannot interpolate: no {LAT!r}/{LON!r} dims (dims {dict(ds.sizes)})")
    src_lat = np.asarray(ds[LAT].values, dtype=np.float64)
    src_lon = np.asarray(ds[LON].values, dtype=np.float64)
    for name, axis in ((LAT, src_lat), (LON, src_lon)):
        if axis.size > 1 and np.any(np.diff(axis) <= 0):
            raise SchemaError(f"{source}: {name} must be ascending to interpolate; found {axis[:4].tolist()}...")
    dst_lat = np.asarray(latitude, dtype=np.float64)
    dst_lon = np.asarray(longitude, dtype=np.float64)
    lat2, lon2 = np.meshgrid(dst_lat, dst_lon, indexing="ij")
    index, weight = bilinear_weights(src_lat, src_lon, lat2.ravel(), lon2.ravel(), source=source)
    shape = (len(dst_lat), len(dst_lon))

    def apply(values: np.ndarray) -> np.ndarray:
        flat = values.reshape(*values.shape[:-2], -1)
        out = (flat[..., index] * weight).sum(axis=-1)
        return out.reshape(*values.shape[:-2], *shape).astype(values.dtype, copy=False)

    out_vars = {}
    for name, var in ds.data_vars.items():
        if LAT not in var.dims or LON not in var.dims:
            out_vars[name] = var
            continue
        moved = var.transpose(..., LAT, LON)
        result = xr.apply_ufunc(
            apply, moved.rename({LAT: "_lat_in", LON: "_lon_in"}),
            input_core_dims=[["_lat_in", "_lon_in"]], output_core_dims=[[LAT, LON]],
            dask="parallelized", output_dtypes=[var.dtype],
            dask_gufunc_kwargs={"output_sizes": {LAT: shape[0], LON: shape[1]}, "allow_rechunk": True},
            keep_attrs=True,
        )
        out_vars[name] = result.transpose(*var.dims)
    coords = {k: v for k, v in ds.coords.items() if LAT not in v.dims and LON not in v.dims}
    out = xr.Dataset(out_vars, coords={**coords, LAT: (LAT, dst_lat.astype(ds[LAT].dtype), ds[LAT].attrs),
                                       LON: (LON, dst_lon.astype(ds[LON].dtype), ds[LON].attrs)}, attrs=dict(ds.attrs))
    out.attrs["regridded_from"] = f"{source} ({len(src_lat)} x {len(src_lon)}, bilinear)"
    return out
