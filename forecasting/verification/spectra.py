"""Zonal power spectra of gridded fields, averaged over latitude bands.

A field's smoothness is judged by its spectrum: ML forecasts that blur lose power at high zonal
wavenumbers (WeatherBench2's ``ZonalEnergySpectrum``; Rasp et al. 2024, WeatherBench 2).

Convention. Along each latitude circle, with ``N`` longitudes ``x_0..x_{N-1}`` and the discrete Fourier
transform ``X_k = sum_j x_j exp(-2 pi i j k / N)``, the one-sided power at zonal wavenumber
``k = 0..N//2`` is::

    P_k = c_k |X_k|**2 / N**2,   c_k = 1 for k = 0 and (N even) k = N/2, c_k = 2 otherwise

so that (Parseval) ``sum_k P_k = mean_j x_j**2`` and ``sum_{k >= 1} P_k`` is the zonal variance
``mean_j (x_j - mean x)**2`` (population variance, factor 1). A zonal wave ``A cos(2 pi k j / N)`` has
power ``A**2 / 2`` at ``k``. Units are the field's units squared.

Bands. ``P_k`` is averaged over the latitudes of each band with the area (cos-latitude) weights of
:func:`forecasting.weights.latitude_weights`, computed on the field's whole latitude axis and restricted to
the band. Band edges are inclusive.

Regional grids. For a longitude range that is not the full circle, ``k`` counts waves across the domain
(``N`` points of spacing ``dlon``), which is not periodic: expect some leakage, and detrend or taper
first if that matters. In both cases the coordinate ``wavelength_km`` (lat_band, wavenumber) is
``N dlon (pi / 180) R cos(phi_mid) / k`` with ``R = 6371 km`` and ``phi_mid`` the middle of the band's
latitudes present in the field (``inf`` at ``k = 0``); for the global band that is the equator.
Time, lead and member means are left to the caller.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

from forecasting.errors import SchemaError
from forecasting.schema import LAT, LON
from forecasting.weights import latitude_weights

WAVENUMBER = "wavenumber"
LAT_BAND = "lat_band"
WAVELENGTH = "wavelength_km"
EARTH_RADIUS_KM = 6371.0
GLOBAL_BAND = "global"
#: Default bands: southern extratropics, tropics, northern extratropics, and the whole globe.
DEFAULT_LAT_BANDS: tuple[tuple[float, float], ...] = ((-90.0, -30.0), (-30.0, 30.0), (30.0, 90.0), (-90.0, 90.0))


def band_label(band: tuple[float, float]) -> str:
    """Label of a latitude band: ``(-30, 30)`` -> ``"30S-30N"``, ``(0, 60)`` -> ``"EQ-60N"``."""

    def one(lat: float) -> str:
        if lat == 0:
            return "EQ"
        return f"{abs(lat):g}{'N' if lat > 0 else 'S'}"

    return f"{one(band[0])}-{one(band[1])}"


def zonal_power_spectrum(
    field: xr.DataArray | xr.Dataset,
    *,
    lat_bands: Sequence[tuple[float, float]] | None = None,
) -> xr.DataArray | xr.Dataset:
    """One-sided zonal power spectrum per latitude band (see the module docstring for the convention).

    Args:
        field: dims (..., latitude, longitude) in any order; longitudes regularly spaced, either the full
            circle or a contiguous range (which may cross 0/360). A Dataset is done per variable.
        lat_bands: (south, north) pairs in degrees north, inclusive. Default: 90S-30S, 30S-30N, 30N-90N
            and ``global``, leaving out bands with no latitude in the field. A band given explicitly
            that holds no latitude is an error.

    Returns:
        Shape (..., lat_band, wavenumber): the other dims of ``field`` preserved, ``lat_band`` labelled
        like ``"30N-90N"``, ``wavenumber`` 0..N//2, coordinate ``wavelength_km`` (lat_band, wavenumber).
        Units of the field squared.

    Raises:
        SchemaError: missing latitude/longitude dims, irregular longitudes, or an empty band.
    """
    if isinstance(field, xr.Dataset):
        return field.map(zonal_power_spectrum, lat_bands=lat_bands)
    for dim in (LAT, LON):
        if dim not in field.dims or dim not in field.coords:
            raise SchemaError(
                f"zonal_power_spectrum needs {LAT!r} and {LON!r} dims with coordinates; "
                f"field {field.name!r} has dims {dict(field.sizes)}"
            )
    n_lon = field.sizes[LON]
    domain_degrees = _longitude_extent(np.asarray(field[LON].values, dtype=np.float64), name=field.name)
    latitudes = np.asarray(field[LAT].values, dtype=np.float64)
    weights = xr.DataArray(latitude_weights(latitudes), dims=LAT, coords={LAT: field[LAT].values})

    power = _zonal_power(field, n_lon)  # (..., latitude, wavenumber)

    explicit = lat_bands is not None
    bands = list(lat_bands) if explicit else list(DEFAULT_LAT_BANDS)
    labels, spectra, mid_latitudes = [], [], []
    for south, north in bands:
        if south > north:
            raise SchemaError(f"lat band ({south}, {north}) must be given as (south, north)")
        inside = (latitudes >= south) & (latitudes <= north)
        if not inside.any():
            if explicit:
                raise SchemaError(
                    f"lat band {band_label((south, north))} holds no latitude of field {field.name!r}; "
                    f"latitudes span {latitudes.min():g} to {latitudes.max():g}"
                )
            continue
        band_power = power.isel({LAT: np.flatnonzero(inside)})
        spectra.append(band_power.weighted(weights.isel({LAT: np.flatnonzero(inside)})).mean(LAT))
        is_global = not explicit and (south, north) == (-90.0, 90.0)
        labels.append(GLOBAL_BAND if is_global else band_label((south, north)))
        band_lats = latitudes[inside]
        mid_latitudes.append((band_lats.min() + band_lats.max()) / 2.0)

    result = xr.concat(spectra, dim=LAT_BAND, join="exact").assign_coords({LAT_BAND: labels})
    wavenumbers = np.arange(n_lon // 2 + 1)
    circle_km = domain_degrees * np.pi / 180.0 * EARTH_RADIUS_KM * np.cos(np.deg2rad(mid_latitudes))
    with np.errstate(divide="ignore"):
        wavelength = circle_km[:, None] / wavenumbers[None, :]
    result = result.assign_coords({WAVELENGTH: ((LAT_BAND, WAVENUMBER), wavelength)})
    result.name = field.name
    result.attrs = {"long_name": "zonal power spectrum", "longitude_extent_degrees": float(domain_degrees)}
    if "units" in field.attrs:
        result.attrs["units"] = f"({field.attrs['units']})**2"
    return result.transpose(..., LAT_BAND, WAVENUMBER)


def _longitude_extent(lon: np.ndarray, *, name: object) -> float:
    """Return ``N * dlon`` in degrees (360 for a global grid) after checking regular spacing.

    A contiguous regional range that crosses the 0/360 seam is stored sorted (0..10, 350..360), which is
    a circular shift of the domain; the power spectrum does not change under circular shifts, so only
    one gap in the circular spacing is allowed (the part of the circle outside the domain).
    """
    if lon.size < 2:
        raise SchemaError(f"zonal_power_spectrum needs at least 2 longitudes in field {name!r}; found {lon.size}")
    circular_steps = np.diff(np.concatenate([lon, lon[:1] + 360.0])) % 360.0
    step = float(np.median(circular_steps))
    irregular = ~np.isclose(circular_steps, step, rtol=1e-3, atol=1e-6)
    duplicated = circular_steps < 0.5 * step
    if step <= 0 or irregular.sum() > 1 or duplicated.any():
        raise SchemaError(
            f"longitudes of field {name!r} must be regularly spaced (one contiguous range); "
            f"found steps {np.unique(np.round(circular_steps, 6))[:5]}"
        )
    return min(lon.size * step, 360.0)


def _zonal_power(field: xr.DataArray, n_lon: int) -> xr.DataArray:
    """One-sided power ``c_k |X_k|**2 / N**2`` along longitude. Shape (..., wavenumber)."""
    if field.chunks is not None:
        field = field.chunk({LON: -1})
    n_k = n_lon // 2 + 1
    factor = np.full(n_k, 2.0)
    factor[0] = 1.0
    if n_lon % 2 == 0:
        factor[-1] = 1.0

    def power(values: np.ndarray) -> np.ndarray:
        coefficients = np.fft.rfft(values, axis=-1)
        return factor * np.abs(coefficients) ** 2 / n_lon**2

    out = xr.apply_ufunc(
        power,
        field,
        input_core_dims=[[LON]],
        output_core_dims=[[WAVENUMBER]],
        dask="parallelized",
        output_dtypes=[np.float64],
        dask_gufunc_kwargs={"output_sizes": {WAVENUMBER: n_k}},
    )
    return out.assign_coords({WAVENUMBER: np.arange(n_k)})
