"""Plots: each writes a readable PNG atomically, labels name variables and units, maps never download.

Figures are inspected through the ``_figure_*`` helpers (the Figure before saving) and the written PNGs
through PIL. The synthetic inputs below are shaped like real ones (ERA5-like fields, verify-style
scores) and are reused by the example script described in the plotting report.
"""

from __future__ import annotations

from pathlib import Path

import cartopy
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from PIL import Image

from forecasting import plotting
from forecasting.errors import SchemaError

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
LEADS = pd.to_timedelta(np.arange(12, 241, 12), unit="h")


# ----------------------------------------------------------------------------------------------
# Synthetic inputs shaped like the real ones
# ----------------------------------------------------------------------------------------------
def global_geopotential(step: float = 2.5) -> xr.DataArray:
    """Z500-like geopotential (m**2 s**-2) on a global grid: a polar low and a planetary wave."""
    lat = np.arange(-90.0, 90.0 + step / 2, step)
    lon = np.arange(0.0, 360.0, step)
    phi, lam = np.deg2rad(lat)[:, None], np.deg2rad(lon)[None, :]
    height = 5750.0 - 550.0 * np.sin(phi) ** 2 + 120.0 * np.cos(phi) ** 2 * np.sin(4 * lam + 2 * phi)
    return xr.DataArray(
        (9.80665 * height).astype("float32"),
        dims=("latitude", "longitude"),
        coords={"latitude": lat, "longitude": lon, "level": 500.0, "time": np.datetime64("2020-01-01T00"),
                "prediction_timedelta": np.timedelta64(72, "h"), "valid_time": np.datetime64("2020-01-04T00")},
        name="geopotential",
        attrs={"units": "m**2 s**-2"},
    )


def wrapped_uk_temperature() -> xr.DataArray:
    """2m temperature (K) on a 0.25 deg UK box stored as ERA5 does in 0..360: [0 .. 2, 350 .. 359.75]."""
    lat = np.arange(49.0, 61.0 + 0.125, 0.25)
    lon = np.concatenate([np.arange(0.0, 2.0 + 0.125, 0.25), np.arange(350.0, 360.0, 0.25)])
    signed = np.where(lon > 180, lon - 360, lon)
    values = 283.0 - 0.6 * (lat[:, None] - 49.0) + 0.25 * signed[None, :] + np.sin(np.deg2rad(8 * signed))[None, :]
    return xr.DataArray(
        values.astype("float32"), dims=("latitude", "longitude"), coords={"latitude": lat, "longitude": lon},
        name="2m_temperature", attrs={"units": "K"},
    )


def uk_stations() -> pd.DataFrame:
    """Three observation sites in the UK box (one without a value), table layout of the data contract."""
    return pd.DataFrame({
        "station_id": ["LHR", "EDI", "BFS"],
        "latitude": [51.47, 55.95, 54.66],
        "longitude": [-0.45, -3.37, -6.22],
        "time": pd.to_datetime(["2020-01-01"] * 3),
        "2m_temperature": [284.0, 279.5, np.nan],
    })


def verify_scores() -> xr.DataArray:
    """Scores as `forecast verify` writes them: (model, metric, variable, prediction_timedelta, region)."""
    days = LEADS / pd.Timedelta("1D")
    growth = 1.0 - np.exp(-days / 4.0)
    rmse = np.stack([60 + 700 * growth, 0.6 + 2.6 * growth])  # (variable, lead)
    crps = np.stack([30 + 330 * growth, 0.3 + 1.3 * growth])
    acc = np.stack([1 - 0.4 * growth**2, 1 - 0.45 * growth**2])
    graph = np.stack([rmse, crps, acc])  # (metric, variable, lead)
    persistence = graph * np.array([1.6, 1.6, 0.8])[:, None, None]
    climatology = np.broadcast_to(graph[:, :, -1:] * np.array([1.15, 1.15, 0.0])[:, None, None], graph.shape)
    region_factor = np.array([[1.0, 1.1], [1.0, 1.1], [1.0, 0.97]])[:, None, None, :]  # (metric, ..., region)
    values = np.stack([graph, persistence, climatology])[..., None] * region_factor
    return xr.DataArray(
        values,
        dims=("model", "metric", "variable", "prediction_timedelta", "region"),
        coords={"model": ["graph", "persistence", "climatology"], "metric": ["rmse", "crps", "acc"],
                "variable": ["geopotential@500", "2m_temperature"],
                "units": ("variable", ["m**2 s**-2", "K"]),
                "prediction_timedelta": LEADS, "region": ["global", "europe"]},
        name="score",
    )


def rank_counts() -> xr.DataArray:
    """Rank counts for M = 10 members: an under-dispersed (U-shaped) and a reliable (flat) model."""
    ranks = np.arange(11)
    u_shape = 300 + 900 * ((ranks - 5) / 5.0) ** 2
    flat = np.full(11, 500.0) + 40 * np.sin(ranks)
    leads = pd.to_timedelta([24, 72, 120], unit="h")
    counts = np.stack([np.stack([u_shape * (1 - 0.1 * i) + 200 * i for i in range(3)]), np.stack([flat] * 3)])
    return xr.DataArray(counts, dims=("model", "prediction_timedelta", "rank"),
                        coords={"model": ["graph", "diffusion"], "prediction_timedelta": leads, "rank": ranks})


def spread_and_rmse() -> tuple[xr.DataArray, xr.DataArray]:
    """2m temperature spread and ensemble-mean RMSE (K): one over-confident and one reliable model."""
    days = LEADS / pd.Timedelta("1D")
    rmse = np.stack([0.7 + 2.3 * (1 - np.exp(-days / 4)), 0.75 + 2.2 * (1 - np.exp(-days / 4))])
    spread = rmse * np.array([[0.65], [0.98]])
    coords = {"model": ["graph", "diffusion"], "prediction_timedelta": LEADS}
    dims = ("model", "prediction_timedelta")
    return (xr.DataArray(spread, dims=dims, coords=coords, attrs={"units": "K"}),
            xr.DataArray(rmse, dims=dims, coords=coords, attrs={"units": "K"}))


def zonal_spectra() -> xr.DataArray:
    """Z500-like zonal power spectra (k^-3 tail) for truth and two models in two latitude bands."""
    k = np.arange(0, 181)
    base = 1e6 * np.maximum(k, 1) ** -3.0
    damp = np.exp(-((k / 60.0) ** 2))
    lines = np.stack([base, base * damp, base * (1 + 0.2 * np.sin(k / 7.0))])  # truth, graph, diffusion
    power = np.stack([lines, lines * 0.4], axis=1)  # (model, lat_band, wavenumber)
    band_lat = np.array([0.0, 45.0])
    wavelength = 40075.0 * np.cos(np.deg2rad(band_lat))[:, None] / np.maximum(k, 1)[None, :]
    return xr.DataArray(
        power, dims=("model", "lat_band", "wavenumber"), name="geopotential",
        coords={"model": ["truth", "graph", "diffusion"], "lat_band": ["tropics", "mid-latitudes"],
                "wavenumber": k, "wavelength_km": (("lat_band", "wavenumber"), wavelength)},
        attrs={"units": "m**4 s**-4"},
    )


def station_plume_inputs() -> tuple[xr.DataArray, xr.DataArray]:
    """A 20-member 2m temperature forecast at one station (6-hourly to 5 days) and hourly observations."""
    rng = np.random.default_rng(3)
    init = np.datetime64("2020-01-01T00")
    leads = pd.to_timedelta(np.arange(0, 121, 6), unit="h").to_numpy()
    hours = leads.astype("timedelta64[h]").astype(float)
    diurnal = 4.0 * np.sin(2 * np.pi * (hours - 9) / 24)
    members = 280 + diurnal[:, None] + np.cumsum(rng.normal(0, 0.5, (leads.size, 20)), axis=0)
    forecast = xr.DataArray(
        members, dims=("prediction_timedelta", "realization"),
        coords={"prediction_timedelta": leads, "realization": np.arange(20), "time": init,
                "valid_time": ("prediction_timedelta", init + leads)},
        name="2m_temperature", attrs={"units": "K"},
    )
    obs_time = pd.date_range("2019-12-31", "2020-01-07", freq="3h")
    obs_hours = (obs_time - pd.Timestamp(init)) / pd.Timedelta("1h")
    observed = 280.5 + 4.0 * np.sin(2 * np.pi * (obs_hours - 9) / 24) + rng.normal(0, 0.6, obs_time.size)
    observations = xr.DataArray(observed, dims="time", coords={"time": obs_time}, attrs={"units": "K"})
    return forecast, observations


def scorecard_dataset() -> xr.Dataset:
    """A scorecard (metric, variable, prediction_timedelta) with skill as a fraction and its interval."""
    variables = ["geopotential@500", "temperature@850", "2m_temperature", "10m_wind_speed", "mean_sea_level_pressure"]
    leads = pd.to_timedelta([24, 72, 120, 168, 240], unit="h")
    grid = np.linspace(-0.08, 0.15, len(variables) * len(leads)).reshape(len(variables), len(leads))
    skill = np.stack([grid, grid[::-1]])
    half_width = 0.04
    skill[0, 2, 4] = np.nan  # one cell without a score
    coords = {"metric": ["rmse", "crps"], "variable": variables, "prediction_timedelta": leads}
    dims = ("metric", "variable", "prediction_timedelta")
    return xr.Dataset(
        {"skill": (dims, skill), "lower": (dims, skill - half_width), "upper": (dims, skill + half_width),
         "significant": (dims, np.abs(skill) > half_width)},
        coords=coords, attrs={"model": "graph", "reference": "persistence"},
    )


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _texts(fig) -> str:
    """Every title, axis label, legend text and figure text of a figure, joined."""
    parts = [t.get_text() for t in fig.texts] + [fig.get_suptitle(), fig.get_supxlabel()]
    for ax in fig.axes:
        parts += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        legend = ax.get_legend()
        if legend is not None:
            parts += [t.get_text() for t in legend.get_texts()] + [legend.get_title().get_text()]
        for child in ax.get_children():
            if hasattr(child, "get_xlabel") and child is not ax:  # secondary axes
                parts.append(child.get_xlabel())
    return "\n".join(parts)


def _assert_png(path: Path, fig_size_inches) -> None:
    """A non-empty PNG of exactly the figure's size at the module's DPI."""
    assert path.is_file() and path.stat().st_size > 5000
    with Image.open(path) as image:
        assert image.format == "PNG"
        expected = tuple(int(round(v * plotting.DPI)) for v in fig_size_inches)
        assert image.size == expected


@pytest.fixture
def no_download(tmp_path, monkeypatch):
    """Point cartopy's download folder at an empty dir and make any downloader call fail loudly."""
    data_dir = tmp_path / "cartopy_data"
    data_dir.mkdir()
    monkeypatch.setitem(cartopy.config, "data_dir", str(data_dir))

    class Forbidden:
        def path(self, format_dict):
            raise AssertionError(f"cartopy tried to fetch {format_dict}")

        def acquire_resource(self, target_path, format_dict):
            raise AssertionError(f"cartopy tried to download {format_dict}")

    monkeypatch.setitem(cartopy.config, "downloaders", {key: Forbidden() for key in cartopy.config["downloaders"]})
    yield data_dir
    assert list(data_dir.rglob("*")) == [], "cartopy wrote into its download folder"


def _coastline_geometry_count(fig) -> int:
    """Number of geometries drawn by cartopy feature artists on the figure's map axes."""
    from cartopy.mpl.feature_artist import FeatureArtist

    count = 0
    for ax in fig.axes:
        for artist in ax.get_children():
            if isinstance(artist, FeatureArtist):
                count += sum(1 for _ in artist._feature.geometries())
    return count


# ----------------------------------------------------------------------------------------------
# Maps
# ----------------------------------------------------------------------------------------------
def test_global_map_draws_offline_coastlines_and_labels_units(tmp_path, no_download):
    field = global_geopotential()
    before = field.copy(deep=True)
    fig = plotting._figure_map(field, title=None, cmap=None, vmin=None, vmax=None, region=None, stations=None)
    text = _texts(fig)
    assert "geopotential 500 hPa" in text and "m² s⁻²" in text
    assert "valid 2020-01-04 00:00 UTC" in text
    assert fig.axes[0].projection.__class__.__name__ == "Robinson"
    assert _coastline_geometry_count(fig) > 100
    size = fig.get_size_inches()
    out = plotting.plot_map(field, tmp_path / "z500.png")
    assert out == tmp_path / "z500.png"
    _assert_png(out, size)
    xr.testing.assert_identical(field, before)
    assert plt.get_fignums() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cartopy_data", "z500.png"]  # no temp file left


def test_regional_map_of_grid_wrapped_across_greenwich_is_contiguous(tmp_path, no_download):
    field = wrapped_uk_temperature()
    lat, lon, values = plotting._map_grid(field, name="2m_temperature")
    assert lon[0] == -10.0 and lon[-1] == 2.0 and np.all(np.diff(lon) == 0.25)
    np.testing.assert_array_equal(values[:, 0], field.sel(longitude=350.0).values)
    fig = plotting._figure_map(field, title=None, cmap="coolwarm", vmin=None, vmax=None, region=None,
                               stations=uk_stations())
    ax = fig.axes[0]
    x0, x1, y0, y1 = ax.get_extent(crs=plotting.ccrs.PlateCarree())
    assert x0 == pytest.approx(-10.125, abs=0.01) and x1 == pytest.approx(2.125, abs=0.01)
    assert y0 == pytest.approx(48.875, abs=0.01) and y1 == pytest.approx(61.125, abs=0.01)
    text = _texts(fig)
    assert "2m temperature (K)" in text
    assert "stations (2)" in text and "stations without a value (1)" in text
    assert _coastline_geometry_count(fig) > 20  # British Isles coastlines and borders, cut to the box
    size = fig.get_size_inches()
    _assert_png(plotting._save(fig, tmp_path / "uk.png"), size)


def test_large_regular_grid_is_drawn_as_warped_image_small_one_as_mesh(no_download):
    from matplotlib.collections import QuadMesh
    from matplotlib.image import AxesImage

    lat = np.arange(35.0, 65.0 + 0.05, 0.1)
    lon = np.arange(350.0, 385.0, 0.1) % 360.0  # 0.1 deg Europe, wrapped across 0E: 301 x 350 cells
    large = xr.DataArray(np.add.outer(lat, np.zeros(lon.size)), dims=("latitude", "longitude"),
                         coords={"latitude": lat, "longitude": lon}, name="2m_temperature", attrs={"units": "K"})
    assert large.size > plotting._IMAGE_MIN_CELLS
    fig = plotting._figure_map(large, title=None, cmap=None, vmin=None, vmax=None, region=None, stations=None)
    assert len(fig.axes[0].get_images()) == 1 and isinstance(fig.axes[0].get_images()[0], AxesImage)
    fig = plotting._figure_map(wrapped_uk_temperature(), title=None, cmap=None, vmin=None, vmax=None,
                               region=None, stations=None)
    assert fig.axes[0].get_images() == [] and any(isinstance(c, QuadMesh) for c in fig.axes[0].collections)


def test_region_zooms_a_global_field_across_the_dateline(tmp_path, no_download):
    fig = plotting._figure_map(global_geopotential(), title="Z500 over the Bering Sea", cmap=None, vmin=None,
                               vmax=None, region=(45.0, 70.0, 160.0, -150.0), stations=None)
    x0, x1, y0, y1 = fig.axes[0].get_extent(crs=plotting.ccrs.PlateCarree(central_longitude=180.0))
    assert (x0, x1, y0, y1) == pytest.approx((-20.0, 30.0, 45.0, 70.0), abs=0.01)
    assert "Z500 over the Bering Sea" in _texts(fig)


def test_map_of_real_era5_uk_grib_is_drawn(tmp_path, no_download):
    grib = REAL_DATA / "era5-2mt-2019-03-uk.grib"
    if not grib.is_file():
        pytest.skip(f"real ERA5 UK 2m temperature file not found at {grib}")
    from forecasting.schema import conform

    raw = xr.open_dataset(grib, engine="cfgrib", backend_kwargs={"indexpath": ""})
    field = conform(raw, source=str(grib))["2m_temperature"].isel(time=12).load()
    assert field.longitude.values[0] == 0.0 and field.longitude.values[-1] == 359.75  # wrapped layout
    out = plotting.plot_map(field, tmp_path / "era5_uk.png", cmap="RdYlBu_r")
    with Image.open(out) as image:
        assert image.format == "PNG"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f.rename({"latitude": "y"}), "missing dim(s) ['latitude']"),
        (lambda f: f.drop_attrs(), "no 'units' attribute"),
        (lambda f: f.expand_dims(time2=3), "unexpected dim(s) ['time2']"),
    ],
)
def test_map_rejects_bad_fields_naming_what_is_missing(tmp_path, change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        plotting.plot_map(change(global_geopotential()), tmp_path / "bad.png")
    assert list(tmp_path.iterdir()) == []


def test_map_rejects_stations_without_the_field_variable(tmp_path):
    with pytest.raises(ValueError, match=r"stations table lacks columns \['2m_temperature'\]"):
        plotting.plot_map(wrapped_uk_temperature(), tmp_path / "x.png",
                          stations=uk_stations().drop(columns="2m_temperature"))


# ----------------------------------------------------------------------------------------------
# Curves, histograms, spectra, plume, scorecard
# ----------------------------------------------------------------------------------------------
def test_lead_time_curves_show_one_line_per_model_with_units(tmp_path):
    scores = verify_scores()
    before = scores.copy(deep=True)
    fig = plotting._figure_lead_time_curves(scores, metric="rmse", variable="geopotential@500", region="europe")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["graph", "persistence", "climatology"]
    assert ax.get_ylabel() == "RMSE of geopotential 500 hPa (m² s⁻²)"
    assert ax.get_xlabel() == "lead time (days)"
    assert "region: europe" in ax.get_title()
    np.testing.assert_allclose(ax.get_lines()[0].get_xdata(), LEADS / pd.Timedelta("1D"))
    np.testing.assert_allclose(
        ax.get_lines()[1].get_ydata(),
        scores.sel(model="persistence", metric="rmse", variable="geopotential@500", region="europe").values,
    )
    _assert_png(plotting.plot_lead_time_curves(scores, tmp_path / "rmse.png", metric="rmse",
                                               variable="geopotential@500", region="europe"), fig.get_size_inches())
    xr.testing.assert_identical(scores, before)


def test_lead_time_curves_accept_weatherbench_dataset_and_short_leads():
    scores = verify_scores().sel(variable="2m_temperature", region="global", drop=True)
    dataset = xr.Dataset({"2m_temperature": scores.isel(prediction_timedelta=slice(0, 4))})
    fig = plotting._figure_lead_time_curves(dataset, metric="acc", variable="2m_temperature", region=None)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "lead time (hours)"
    assert ax.get_ylabel() == "ACC of 2m temperature"  # dimensionless: no units
    fig = plotting._figure_lead_time_curves(dataset, metric="rmse", variable="2m_temperature", region=None)
    assert fig.axes[0].get_ylabel() == "RMSE of 2m temperature (K)"  # canonical units of the variable


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"metric": "seeps", "variable": "2m_temperature", "region": "global"}, r"metric 'seeps' not present"),
        ({"metric": "rmse", "variable": "total_precipitation", "region": "global"},
         r"variable 'total_precipitation' not present"),
        ({"metric": "rmse", "variable": "2m_temperature", "region": None}, r"several regions \['global', 'europe'\]"),
        ({"metric": "rmse", "variable": "2m_temperature", "region": "asia"}, r"region 'asia' not present"),
    ],
)
def test_lead_time_curves_reject_missing_labels(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        plotting.plot_lead_time_curves(verify_scores(), tmp_path / "x.png", **kwargs)


def test_lead_time_curves_reject_scores_without_metric_dim(tmp_path):
    with pytest.raises(SchemaError, match=r"missing dim 'metric'"):
        plotting.plot_lead_time_curves(verify_scores().isel(metric=0), tmp_path / "x.png", metric="rmse",
                                       variable="2m_temperature", region="global")


def test_rank_histogram_is_normalised_with_flat_reference(tmp_path):
    ranks = rank_counts()
    fig = plotting._figure_rank_histogram(ranks, title="Rank histogram of 2m temperature")
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 3
    heights = np.array([patch.get_height() for patch in axes[0].patches])
    assert heights.size == 22  # 2 models x 11 ranks
    np.testing.assert_allclose(heights[:11].sum(), 1.0)
    flat = [line for line in axes[0].get_lines() if line.get_linestyle() == "--"][0]
    assert flat.get_ydata()[0] == pytest.approx(1 / 11)
    text = _texts(fig)
    assert "Rank histogram of 2m temperature" in text and "lead 3 d" in text and "relative frequency" in text
    assert "M = 10 members" in text and "graph" in text and "diffusion" in text
    _assert_png(plotting.plot_rank_histogram(ranks, tmp_path / "ranks.png", title="Ranks"), fig.get_size_inches())


def test_rank_histogram_rejects_missing_rank_dim(tmp_path):
    with pytest.raises(ValueError, match=r"missing dim\(s\) \['rank'\]"):
        plotting.plot_rank_histogram(rank_counts().rename(rank="bin"), tmp_path / "x.png", title="x")


def test_spread_skill_plots_both_and_their_ratio(tmp_path):
    spread, rmse = spread_and_rmse()
    fig = plotting._figure_spread_skill(spread, rmse, variable="2m_temperature", title=None)
    top, bottom = fig.axes[:2]
    assert top.get_ylabel() == "RMSE and spread of 2m temperature (K)" and bottom.get_ylabel() == "spread / RMSE"
    ratios = [line.get_ydata() for line in bottom.get_lines()[:2]]
    np.testing.assert_allclose(ratios[0], 0.65)
    np.testing.assert_allclose(ratios[1], 0.98)
    text = _texts(fig)
    assert "ensemble spread" in text and "ensemble-mean RMSE" in text and "ratio 1: reliable ensemble" in text
    _assert_png(plotting.plot_spread_skill(spread, rmse, tmp_path / "ss.png", variable="2m_temperature"),
                fig.get_size_inches())


def test_spread_skill_rejects_mismatched_leads(tmp_path):
    spread, rmse = spread_and_rmse()
    with pytest.raises(ValueError, match="spread and rmse coordinates differ"):
        plotting.plot_spread_skill(spread.isel(prediction_timedelta=slice(1, None)), rmse, tmp_path / "x.png",
                                   variable="2m_temperature")


def test_spectra_are_log_log_with_wavelength_axis(tmp_path):
    spectra = zonal_spectra()
    fig = plotting._figure_spectra(spectra, title="Z500 zonal spectra", truth_label="truth")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    truth = ax.get_lines()[0]
    assert truth.get_color() == "black" and truth.get_xdata()[0] == 1  # wavenumber 0 left out
    text = _texts(fig)
    assert "power spectral density of geopotential (m⁴ s⁻⁴)" in text
    assert "wavelength (km)" in text and "latitude band: tropics" in text and "Z500 zonal spectra" in text
    _assert_png(plotting.plot_spectra(spectra, tmp_path / "spectra.png", title="Z500"), fig.get_size_inches())
    assert "zonal wavenumber" in text
    regional = plotting._figure_spectra(spectra, title="DCT", truth_label="truth", xlabel="2-D DCT wavenumber band")
    assert "2-D DCT wavenumber band" in _texts(regional) and "zonal wavenumber" not in _texts(regional)


def test_spectra_without_units_are_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"no 'units' attribute"):
        plotting.plot_spectra(zonal_spectra().drop_attrs(), tmp_path / "x.png", title="x")


def test_station_plume_shows_members_band_mean_and_observations_in_window(tmp_path):
    forecast, observations = station_plume_inputs()
    fig = plotting._figure_station_plume(forecast, observations, station_id="LHR", variable="2m_temperature")
    ax = fig.axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    valid = forecast.valid_time.values
    in_window = int(((observations.time >= valid[0]) & (observations.time <= valid[-1])).sum())
    assert legend == ["members (20)", "10–90 % of members", "ensemble mean", f"observations ({in_window})"]
    assert ax.get_ylabel() == "2m temperature (K)" and ax.get_xlabel() == "valid time (UTC)"
    assert "station LHR" in ax.get_title() and "initialised 2020-01-01 00:00 UTC" in ax.get_title()
    _assert_png(plotting.plot_station_plume(forecast, observations, tmp_path / "plume.png", station_id="LHR",
                                            variable="2m_temperature"), fig.get_size_inches())


def test_station_plume_rejects_forecast_without_members(tmp_path):
    forecast, observations = station_plume_inputs()
    with pytest.raises(ValueError, match=r"missing dim\(s\) \['realization'\]"):
        plotting.plot_station_plume(forecast.mean("realization"), observations, tmp_path / "x.png",
                                    station_id="LHR", variable="2m_temperature")


def test_scorecard_annotates_percent_skill_and_marks_significance(tmp_path):
    card = scorecard_dataset()
    fig = plotting._figure_scorecard(card, metric="rmse", title="graph vs persistence")
    ax = fig.axes[0]
    image = ax.get_images()[0]
    assert image.norm.vmin == -image.norm.vmax  # diverging scale centred at 0
    cell_texts = [t.get_text() for t in ax.texts]
    assert f"{100 * card.skill.sel(metric='rmse').values[0, 0]:+.1f}" in cell_texts
    assert "n/a" in cell_texts
    framed = [p for p in ax.patches if not p.get_fill()]
    assert len(framed) == int(card.significant.sel(metric="rmse").sum())
    assert [t.get_text() for t in ax.get_yticklabels()][0] == "geopotential 500 hPa"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1 d", "3 d", "5 d", "7 d", "10 d"]
    text = _texts(fig) + "\n".join(a.get_ylabel() for a in fig.axes)
    assert "RMSE skill, graph vs persistence (%)" in text and "significant" in text
    _assert_png(plotting.plot_scorecard(card, tmp_path / "card.png", metric="rmse", title="card"),
                fig.get_size_inches())


def test_scorecard_rejects_missing_metric_and_variables(tmp_path):
    with pytest.raises(ValueError, match=r"metric 'acc' not present; found \['rmse', 'crps'\]"):
        plotting.plot_scorecard(scorecard_dataset(), tmp_path / "x.png", metric="acc", title="x")
    with pytest.raises(ValueError, match=r"lacks data variables \['significant'\]"):
        plotting.plot_scorecard(scorecard_dataset().drop_vars("significant"), tmp_path / "x.png", metric="rmse",
                                title="x")


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "ranks.png"
    target.write_bytes(b"old")

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(plotting.Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        plotting.plot_rank_histogram(rank_counts(), target, title="x")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["ranks.png"]
