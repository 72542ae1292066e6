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

Limited-area grids: 2-D DCT spectra (:func:`regional_power_spectrum`). A regional field is not periodic, so
its Fourier spectrum aliases the jump between opposite edges into every wavenumber. The discrete cosine
transform (Denis, Côté and Laprise 2002, "Spectral decomposition of two-dimensional atmospheric fields on
limited-area domains using the discrete cosine transform (DCT)", Mon. Wea. Rev. 130, 1812-1829) expands the
field in cosines that are even about the domain's edges and needs neither detrending nor tapering. With
``N_i x N_j`` points (latitude x longitude), the orthonormal DCT-II coefficients ``F(m, n)`` satisfy
``sum F**2 = sum f**2``, so the variance is ``sigma**2 = sum_{(m, n) != (0, 0)} F(m, n)**2 / (N_i N_j)`` (population
variance) and mode ``(m, n)`` has the physical wavenumber (cycles per km)
``kappa = sqrt((m / (2 L_y))**2 + (n / (2 L_x))**2)``, with domain lengths ``L_y = N_i dy`` and ``L_x = N_j dx``,
``dy = dlat (pi / 180) R`` and ``dx = dlon (pi / 180) R cos(phi_mid)`` at the domain's middle latitude. Modes are
binned in bands of width ``delta = 1 / (2 min(L_x, L_y))``: band ``k`` (the ``wavenumber`` coordinate, 1..K) holds
``(k - 1/2) delta <= kappa < (k + 1/2) delta`` and has ``wavelength_km = 1 / (k delta)`` (``k`` half-wavelengths
across the shorter side); ``K = round(kappa_N / delta)`` with ``kappa_N = min(1 / (2 dy), 1 / (2 dx))``, the
largest wavenumber resolved in every direction. The band powers sum to the variance less what lies in band 0
(wavelengths longer than twice the longer side) and in the corners beyond band K. A cosine mode
``A cos(pi n (j + 1/2) / N_j)`` has power ``A**2 / 2`` in its band. :func:`small_scale_power_ratio` compares the
power at the finest scales of two spectra.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.fft
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


def regional_power_spectrum(field: xr.DataArray | xr.Dataset) -> xr.DataArray | xr.Dataset:
    """2-D DCT variance spectrum of limited-area fields (Denis et al. 2002; see the module docstring).

    Args:
        field: dims (..., latitude, longitude) in any order, on a regular grid (one ascending range in each
            direction) holding at least 2 bands (:func:`regional_band_count`). A Dataset is done per variable;
            dask input stays lazy.

    Returns:
        Shape (..., wavenumber): the other dims preserved, ``wavenumber`` = band ``k`` = 1..K, coordinate
        ``wavelength_km`` (wavenumber). Units of the field squared; attrs ``band_width_per_km`` (``delta``).

    Raises:
        SchemaError: missing latitude/longitude dims or coordinates, irregular axes, or a grid too small to
            hold a band.
    """
    if isinstance(field, xr.Dataset):
        return field.map(regional_power_spectrum)
    for dim in (LAT, LON):
        if dim not in field.dims or dim not in field.coords:
            raise SchemaError(
                f"regional_power_spectrum needs {LAT!r} and {LON!r} dims with coordinates; field {field.name!r} has "
                f"dims {dict(field.sizes)}"
            )
    n_i, n_j = field.sizes[LAT], field.sizes[LON]
    band, delta = _dct_bands(field[LAT].values, field[LON].values, field_name=field.name)
    n_bands = regional_band_count(field[LAT].values, field[LON].values)
    if n_bands < 2:
        raise SchemaError(
            f"regional_power_spectrum: the grid of field {field.name!r} ({n_i} x {n_j} points) is too small for a "
            "spectrum: it holds fewer than 2 bands (see regional_band_count)"
        )
    membership = np.zeros((n_i * n_j, n_bands))  # (mode, band): which band each mode falls in
    inside = np.flatnonzero((band.ravel() >= 1) & (band.ravel() <= n_bands))
    membership[inside, band.ravel()[inside] - 1] = 1.0

    def power(values: np.ndarray) -> np.ndarray:
        coefficients = scipy.fft.dctn(values, type=2, norm="ortho", axes=(-2, -1))
        per_mode = coefficients.reshape(*values.shape[:-2], n_i * n_j) ** 2 / (n_i * n_j)
        return per_mode @ membership

    if field.chunks is not None:
        field = field.chunk({LAT: -1, LON: -1})
    out = xr.apply_ufunc(
        power, field, input_core_dims=[[LAT, LON]], output_core_dims=[[WAVENUMBER]], dask="parallelized",
        output_dtypes=[np.float64], dask_gufunc_kwargs={"output_sizes": {WAVENUMBER: n_bands}},
    )
    wavenumbers = np.arange(1, n_bands + 1)
    out = out.assign_coords({WAVENUMBER: wavenumbers, WAVELENGTH: (WAVENUMBER, 1.0 / (wavenumbers * delta))})
    out.name = field.name
    out.attrs = {"long_name": "2-D DCT variance spectrum (Denis et al. 2002)", "band_width_per_km": float(delta)}
    if "units" in field.attrs:
        out.attrs["units"] = f"({field.attrs['units']})**2"
    return out


def small_scale_power_ratio(
    power: xr.DataArray | xr.Dataset,
    reference: xr.DataArray | xr.Dataset,
    *,
    fraction: float = 1.0 / 3.0,
    wavelengths_km: tuple[float, float] | None = None,
) -> xr.DataArray | xr.Dataset:
    """Power at small scales of ``power`` over that of ``reference``, every dim but ``wavenumber`` kept.

    The scales are the wavenumbers above ``(1 - fraction)`` of the largest one (the highest third by default),
    or, with ``wavelengths_km = (shortest, longest)``, the bands whose ``wavelength_km`` lies in that range (e.g.
    the scales a coarse grid cannot hold but the truth resolves). Both spectra need the same ``wavenumber`` axis
    (e.g. from :func:`regional_power_spectrum` on one grid). A ratio of 1 restores the reference's variance at
    those scales. Raises SchemaError for a bad ``fraction``, different axes or an empty wavelength range.
    """
    if not 0.0 < fraction <= 1.0:
        raise SchemaError(f"fraction must be in (0, 1]; found {fraction}")
    for name, spectrum in (("power", power), ("reference", reference)):
        if WAVENUMBER not in spectrum.dims:
            raise SchemaError(f"small_scale_power_ratio: {name} has no {WAVENUMBER!r} dim (dims {dict(spectrum.sizes)})")
    k = np.asarray(power[WAVENUMBER].values, dtype=np.float64)
    if not np.array_equal(k, np.asarray(reference[WAVENUMBER].values, dtype=np.float64)):
        raise SchemaError("small_scale_power_ratio: the two spectra have different wavenumber axes")
    if wavelengths_km is None:
        chosen = k > (1.0 - fraction) * k.max()
    else:
        if WAVELENGTH not in power.coords or power[WAVELENGTH].dims != (WAVENUMBER,):
            raise SchemaError(
                f"small_scale_power_ratio: wavelengths_km needs a {WAVELENGTH!r} coordinate along {WAVENUMBER!r} only "
                "(as regional_power_spectrum gives)"
            )
        wavelength = np.asarray(power[WAVELENGTH].values, dtype=np.float64)
        chosen = (wavelength >= min(wavelengths_km)) & (wavelength <= max(wavelengths_km))
        if not chosen.any():
            raise SchemaError(
                f"small_scale_power_ratio: no band has a wavelength in {list(wavelengths_km)} km; the bands span "
                f"{wavelength.min():.0f}..{wavelength.max():.0f} km"
            )
    finest = {WAVENUMBER: chosen}
    return power.isel(finest).sum(WAVENUMBER) / reference.isel(finest).sum(WAVENUMBER)


def regional_band_count(latitude: np.ndarray, longitude: np.ndarray) -> int:
    """The number K of bands of :func:`regional_power_spectrum` on a grid (see the module docstring).

    Raises SchemaError when an axis is not one ascending, regularly spaced range.
    """
    lat = np.asarray(latitude, dtype=np.float64)
    lon = np.asarray(longitude, dtype=np.float64)
    dy, dx = _grid_lengths(lat, lon, field_name="grid")
    delta = 1.0 / (2.0 * min(lat.size * dy, lon.size * dx))
    return int(np.floor(min(1.0 / (2.0 * dy), 1.0 / (2.0 * dx)) / delta + 0.5))


def _grid_lengths(lat: np.ndarray, lon: np.ndarray, *, field_name: object) -> tuple[float, float]:
    """Grid lengths ``(dy, dx)`` in km: ``dx`` at the domain's middle latitude."""
    d_lat = _regular_spacing(lat, name=LAT, field_name=field_name)
    d_lon = _regular_spacing(lon, name=LON, field_name=field_name)
    dy = float(np.deg2rad(d_lat) * EARTH_RADIUS_KM)
    dx = float(np.deg2rad(d_lon) * EARTH_RADIUS_KM * np.cos(np.deg2rad((lat[0] + lat[-1]) / 2.0)))
    return dy, dx


def _dct_bands(latitude: np.ndarray, longitude: np.ndarray, *, field_name: object) -> tuple[np.ndarray, float]:
    """The band of every DCT mode, shape (N_i, N_j) int64 (0: the mean and the longest waves), and ``delta``."""
    lat = np.asarray(latitude, dtype=np.float64)
    lon = np.asarray(longitude, dtype=np.float64)
    dy, dx = _grid_lengths(lat, lon, field_name=field_name)
    length_y, length_x = lat.size * dy, lon.size * dx
    delta = 1.0 / (2.0 * min(length_x, length_y))
    m = np.arange(lat.size)[:, None]
    n = np.arange(lon.size)[None, :]
    kappa = np.sqrt((m / (2.0 * length_y)) ** 2 + (n / (2.0 * length_x)) ** 2)  # cycles per km
    return np.floor(kappa / delta + 0.5).astype(np.int64), delta


def _regular_spacing(axis: np.ndarray, *, name: str, field_name: object) -> float:
    """Spacing of an ascending, regularly spaced axis (one contiguous range)."""
    if axis.size < 2:
        raise SchemaError(f"{name} of field {field_name!r} needs at least 2 points; found {axis.size}")
    steps = np.diff(axis)
    step = float(np.median(steps))
    if step <= 0 or not np.allclose(steps, step, rtol=1e-3, atol=1e-6):
        raise SchemaError(
            f"{name} of field {field_name!r} must be one ascending, regularly spaced range for a 2-D DCT spectrum; "
            f"found steps {np.unique(np.round(steps, 6))[:5].tolist()}"
        )
    return step


def truth_resolution_km(truth: xr.Dataset | None) -> float | None:
    """The shortest wavelength (km) the truth resolves when it says so: a truth made by a spectral model
    truncated at total wavenumber T (attribute ``spectral_truncation``, as the built-in data carries) holds no
    variance at wavelengths below ``2 pi a / T``, whatever its grid spacing. None when the truth does not say."""
    value = None if truth is None else truth.attrs.get("spectral_truncation")
    try:
        truncation = float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
    return 2.0 * np.pi * EARTH_RADIUS_KM / truncation if truncation and truncation > 0 else None


def small_scale_band(wavelengths_km: np.ndarray, shortest_km: float | None = None) -> tuple[float, float]:
    """The finest third of the resolved bands (shortest, longest wavelength in km): of every band, or, when
    the truth resolves only wavelengths down to ``shortest_km``, of the bands at or above it."""
    wavelengths = np.sort(np.asarray(wavelengths_km, dtype=np.float64))
    if shortest_km is not None and (wavelengths >= shortest_km).any():
        wavelengths = wavelengths[wavelengths >= shortest_km]
    finest = wavelengths[: max(1, int(np.ceil(wavelengths.size / 3)))]
    return float(finest[0]), float(finest[-1])
