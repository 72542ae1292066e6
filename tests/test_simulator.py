"""Tests of the built-in physical dataset (forecasting.data.simulator, forecasting.data.synthetic_stations).

Small and fast: T42 on a 64 x 128 grid, a few simulated days, one torch thread.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch_harmonics as th
import xarray as xr
from scipy.interpolate import RegularGridInterpolator
from torch_harmonics.examples.shallow_water_equations import ShallowWaterSolver

from forecasting.data import simulator as sim

SMALL = sim.SimulationSettings(nlat=64, nlon=128, years=6 / 365.25, spinup_days=4.0, seed=1, num_threads=1)
NO_FORCING = dict(relaxation_days=math.inf, eddy_relaxation_days=math.inf, drag_days=math.inf, stirring_rate=0.0)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tests that drive the model directly run it on one thread, like ``SMALL`` (num_threads=1)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def small() -> sim.SimulationResult:
    return sim.simulate(SMALL)


def _to_torch_harmonics(coeff: torch.Tensor, ntrunc: int) -> torch.Tensor:
    """(m, j) layout -> torch-harmonics (l, m) layout, degrees 0..ntrunc."""
    out = torch.zeros(ntrunc + 1, ntrunc + 1, dtype=torch.complex128)
    for m in range(ntrunc + 1):
        out[m:, m] = coeff[m, : ntrunc + 1 - m]
    return out


# ----------------------------------------------------------------------------------------------
# Numerics
# ----------------------------------------------------------------------------------------------
def test_transform_matches_torch_harmonics_real_sht():
    nlat, nlon, ntrunc = 64, 128, SMALL.truncation
    mu_north, weights_north = sim._gaussian_mu_north(nlat)
    transform = sim._SphericalHarmonicTransform(
        mu_north, nlon, lmax=ntrunc + 1, mmax=ntrunc, weights_north=weights_north
    )
    forward = th.RealSHT(nlat, nlon, lmax=ntrunc + 2, mmax=ntrunc + 1, grid="legendre-gauss", csphase=False).double()
    inverse = th.InverseRealSHT(
        nlat, nlon, lmax=ntrunc + 2, mmax=ntrunc + 1, grid="legendre-gauss", csphase=False
    ).double()
    field = torch.from_numpy(np.random.default_rng(0).standard_normal((nlat, nlon)))  # north to south
    folded = torch.cat((torch.arange(nlat // 2), torch.arange(nlat - 1, nlat // 2 - 1, -1)))

    ours = transform.forward(field[folded][None])[..., 0]
    theirs = forward(field)  # (l, m)
    for m in range(ntrunc + 1):
        torch.testing.assert_close(ours[m, : ntrunc + 2 - m], theirs[m:, m], rtol=0, atol=1e-13)
    torch.testing.assert_close(transform.inverse(ours[..., None])[0], inverse(theirs)[folded], rtol=0, atol=1e-12)


def test_tendencies_match_torch_harmonics_shallow_water_solver():
    """Explicit tendencies + the semi-implicit linear terms equal ShallowWaterSolver.dudtspec."""
    settings = dataclasses.replace(SMALL, orography_scale=0.0, perturbation_vorticity=0.0, **NO_FORCING)
    model = sim._build_model(settings)
    ntrunc = settings.truncation
    solver = ShallowWaterSolver(
        64, 128, 60.0, lmax=ntrunc + 1, mmax=ntrunc + 1, grid="legendre-gauss", radius=sim.EARTH_RADIUS
    ).double()
    rng = np.random.default_rng(0)
    vort, div, phi = (model._band_noise(rng, 1, 20, rms) for rms in (3e-5, 3e-6, 500.0))
    state = torch.stack((vort, div, phi, torch.zeros_like(vort)), dim=-1)
    theirs_state = torch.stack([_to_torch_harmonics(c, ntrunc) for c in (phi, vort, div)])
    theirs_state[0, 0, 0] += model._mean_offset  # their Phi is the full layer geopotential
    theirs = solver.dudtspec(theirs_state)

    ours = model._tendencies(state)
    reference = settings.reference_geopotential
    expected = {
        "vorticity": (ours[..., 0], theirs[1]),
        "divergence": (ours[..., 1] - model._lap[..., 0] * phi, theirs[2]),  # add the implicit -lap Phi'
        "geopotential": (ours[..., 2] - reference * div, theirs[0]),  # add the implicit -Phi_ref delta
    }
    for name, (mine, reference_tendency) in expected.items():
        mine = _to_torch_harmonics(mine * model._state_mask[..., 0], ntrunc)
        scale = reference_tendency.abs().max()
        torch.testing.assert_close(mine, reference_tendency, rtol=0, atol=1e-7 * scale, msg=name)


def test_steady_geostrophic_flow_stays_steady():
    """Williamson et al. (1992) test case 2: solid-body zonal flow in geostrophic balance, no forcing."""
    settings = dataclasses.replace(SMALL, orography_scale=0.0, perturbation_vorticity=0.0, **NO_FORCING)
    model = sim._build_model(settings)
    mu = torch.from_numpy(np.sin(np.deg2rad(model.world.gaussian_lat)))[:, None] * torch.ones(1, settings.nlon)
    u0 = 2.0 * math.pi * sim.EARTH_RADIUS / (12.0 * sim.SECONDS_PER_DAY)
    phi = 2.94e4 - (sim.EARTH_RADIUS * sim.OMEGA * u0 + 0.5 * u0**2) * mu**2
    spec = model.transform.forward(
        torch.stack((2.0 * u0 / sim.EARTH_RADIUS * mu, phi - settings.reference_geopotential))
    )
    spec = spec * model._state_mask
    model.now = torch.stack((spec[..., 0], torch.zeros_like(spec[..., 0]), spec[..., 1], model.now[..., 3]), dim=-1)
    model.prev = None
    initial = model.now.clone()
    model.advance(5 * 4 * settings.steps_per_output)
    error = (model.now[..., :3] - initial[..., :3]).abs().amax(dim=(0, 1)) / initial[..., :3].abs().amax(
        dim=(0, 1)
    ).clamp(min=1e-30)
    assert error[0] < 1e-6 and error[2] < 1e-6, error
    assert (model.now[..., 1].abs().max() / initial[..., 0].abs().max()) < 1e-6


def test_mass_is_conserved_without_forcing():
    model = sim._build_model(dataclasses.replace(SMALL, **NO_FORCING))
    mass = model.now[0, 0, 2].real.item() + model._mean_offset
    model.advance(8 * SMALL.steps_per_output)
    assert abs(model.now[0, 0, 2].real.item() + model._mean_offset - mass) < 1e-12 * mass


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def test_same_seed_gives_bitwise_identical_output(small):
    again = sim.simulate(SMALL)
    xr.testing.assert_identical(again.coarse, small.coarse)
    xr.testing.assert_identical(again.fine_regional, small.fine_regional)
    pd.testing.assert_frame_equal(again.stations, small.stations)


def test_different_seed_gives_different_output(small):
    other = sim.simulate(dataclasses.replace(SMALL, seed=2))
    assert not np.array_equal(other.coarse["geopotential"].values, small.coarse["geopotential"].values)
    assert not np.array_equal(other.stations["latitude"].values, small.stations["latitude"].values)


def test_output_layout(small):
    coarse, regional = small.coarse, small.fine_regional
    units = {
        "geopotential": "m**2 s**-2",
        "u_component_of_wind": "m s**-1",
        "v_component_of_wind": "m s**-1",
        "2m_temperature": "K",
        "geopotential_at_surface": "m**2 s**-2",
        "land_sea_mask": "1",
    }
    for ds in (coarse, regional):
        assert set(ds.data_vars) == set(units)
        for name, unit in units.items():
            assert ds[name].attrs["units"] == unit
            assert ds[name].dtype == np.float32
        for name in ("geopotential", "u_component_of_wind", "v_component_of_wind"):
            assert ds[name].dims == ("time", "level", "latitude", "longitude")
        assert ds["2m_temperature"].dims == ("time", "latitude", "longitude")
        assert ds["land_sea_mask"].dims == ("latitude", "longitude")
        assert ds["level"].values.tolist() == [500] and ds["level"].attrs["units"] == "hPa"
        assert ds["latitude"].attrs["units"] == "degrees_north" and ds["longitude"].attrs["units"] == "degrees_east"
        assert np.all(np.diff(ds["latitude"].values) > 0)
        assert ds["longitude"].min() >= 0 and ds["longitude"].max() < 360
        times = ds["time"].values
        assert times.dtype == np.dtype("datetime64[ns]") and times[0] == np.datetime64("2000-01-01T00:00")
        assert len(times) == SMALL.n_times == 24
        assert np.all(np.diff(times) == np.timedelta64(6, "h"))
        assert ds.attrs["seed"] == 1 and json.loads(ds.attrs["settings_json"])["nlat"] == 64

    np.testing.assert_array_equal(coarse["latitude"].values, -87.1875 + 5.625 * np.arange(32))
    np.testing.assert_array_equal(coarse["longitude"].values, 5.625 * np.arange(64))
    region = SMALL.region
    assert regional["latitude"].min() >= region.lat_min and regional["latitude"].max() <= region.lat_max
    assert regional["longitude"].min() >= region.lon_min and regional["longitude"].max() <= region.lon_max
    fine_step = 5.625 / (SMALL.nlat // 32)
    np.testing.assert_allclose(np.diff(regional["latitude"].values), fine_step)
    np.testing.assert_allclose(np.diff(regional["longitude"].values), fine_step)
    # the box is covered: the next fine point outside lies beyond it
    assert (
        regional["latitude"].min() - fine_step < region.lat_min
        and regional["latitude"].max() + fine_step > region.lat_max
    )


def test_coarse_is_area_weighted_mean_of_fine_cells(small):
    """Coarse cells fully inside the region equal the cos-lat weighted mean of the fine cells they cover."""
    factor = SMALL.nlat // 32
    fine, coarse = small.fine_regional, small.coarse
    lat, lon = fine["latitude"].values, fine["longitude"].values
    half = 5.625 / 2
    checked = 0
    for clat in coarse["latitude"].values:
        for clon in coarse["longitude"].values:
            if not (
                lat.min() <= clat - half + 0.1
                and clat + half - 0.1 <= lat.max()
                and lon.min() <= clon - half
                and clon + half <= lon.max()
            ):
                continue
            # overlap of each fine cell with the coarse cell, times the cell's cos(lat) area weight
            lat_overlap = np.clip(
                np.minimum(lat + half / factor, clat + half) - np.maximum(lat - half / factor, clat - half), 0, None
            )
            lon_overlap = np.clip(
                np.minimum(lon + half / factor, clon + half) - np.maximum(lon - half / factor, clon - half), 0, None
            )
            weights = (lat_overlap * np.cos(np.deg2rad(lat)))[:, None] * lon_overlap[None, :]
            for name in ("geopotential", "2m_temperature", "geopotential_at_surface"):
                values = fine[name].squeeze("level", drop=True) if "level" in fine[name].dims else fine[name]
                expected = (values * weights).sum(("latitude", "longitude")) / weights.sum()
                actual = coarse[name].squeeze("level", drop=True) if "level" in coarse[name].dims else coarse[name]
                np.testing.assert_allclose(actual.sel(latitude=clat, longitude=clon).values, expected.values, rtol=2e-6)
            checked += 1
    assert checked >= 10


def test_fields_are_physically_sane(small):
    ds = small.coarse
    for name in ds.data_vars:
        assert np.isfinite(ds[name].values).all(), name
    assert float(np.abs(ds["u_component_of_wind"]).max()) < 100.0
    assert float(np.abs(ds["v_component_of_wind"]).max()) < 100.0
    assert 4.3e4 < float(ds["geopotential"].min()) and float(ds["geopotential"].max()) < 6.2e4  # Z500-like
    assert 200.0 < float(ds["2m_temperature"].min()) and float(ds["2m_temperature"].max()) < 320.0
    assert 0.0 <= float(ds["land_sea_mask"].min()) and float(ds["land_sea_mask"].max()) <= 1.0
    assert (
        0.25 < float(ds["land_sea_mask"].weighted(np.cos(np.deg2rad(ds.latitude))).mean()) < 0.4
    )  # Earth: about 0.29 + Antarctica
    orography = ds["geopotential_at_surface"] / sim.GRAVITY
    assert 1500.0 < float(orography.max()) < 3500.0


def test_global_mean_geopotential_stays_at_its_equilibrium(small):
    """Forcing relaxes the free surface to Phi_eq, whose global mean is mean_geopotential; the initial state has it."""
    z = small.coarse["geopotential"].squeeze("level")
    mean = z.weighted(np.cos(np.deg2rad(z.latitude))).mean(("latitude", "longitude"))
    np.testing.assert_allclose(mean.values, SMALL.mean_geopotential, rtol=1e-3)


def test_stations_follow_the_network_and_the_grid_truth(small):
    stations = small.stations
    assert list(stations.columns) == ["station_id", "latitude", "longitude", "elevation", "time", "2m_temperature"]
    sites = stations.drop_duplicates("station_id")
    assert len(sites) == SMALL.n_stations and sites["station_id"].iloc[0] == "SYN0001"
    assert len(stations) == SMALL.n_stations * SMALL.n_times
    near = SMALL.region.contains(sites["latitude"].values, sites["longitude"].values, margin=4.0)
    assert 0.75 <= near.mean() <= 0.85
    assert (sites["elevation"] >= 0).all()
    missing = stations["2m_temperature"].isna().mean()
    assert 0.003 < missing < 0.035

    # inside the regional grid the truth is reproducible: bilinear interpolation + lapse-rate correction
    fine = small.fine_regional
    lat, lon = fine["latitude"].values, fine["longitude"].values
    inside = stations[
        (stations.latitude > lat[0])
        & (stations.latitude < lat[-1])
        & (stations.longitude > lon[0])
        & (stations.longitude < lon[-1])
    ]
    inside = inside.dropna(subset=["2m_temperature"])
    assert inside["station_id"].nunique() >= 30
    height = RegularGridInterpolator((lat, lon), fine["geopotential_at_surface"].values / sim.GRAVITY)(
        inside[["latitude", "longitude"]].values
    )
    truth = np.empty(len(inside))
    for t, rows in inside.groupby("time").indices.items():
        field = fine["2m_temperature"].sel(time=t).values
        truth[rows] = RegularGridInterpolator((lat, lon), field)(inside[["latitude", "longitude"]].values[rows])
    residual = inside["2m_temperature"].values - (truth - SMALL.lapse_rate * (inside["elevation"].values - height))
    assert abs(residual.mean()) < 0.2
    assert 0.5 < residual.std() < 0.9  # the representativeness noise, 0.7 K


def test_a_tiny_perturbation_grows():
    settings = dataclasses.replace(SMALL, spinup_days=10.0)
    twin = sim.twin_error_growth(settings, days=10.0, perturbation_vorticity=1e-8)
    error = twin["geopotential_rmse"]
    day1, day10 = float(error.sel(lead_time=np.timedelta64(1, "D"))), float(error.isel(lead_time=-1))
    assert 0.0 < day1 < 1.0  # tiny: the climate std is hundreds of m2 s-2
    assert day10 > 2.0 * day1
    assert float(twin["geopotential_climate_std"]) > 100.0


# ----------------------------------------------------------------------------------------------
# Settings and writing
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"nlat": 48, "nlon": 96}, "nlat must be a positive multiple of 32; found 48"),
        ({"nlon": 100}, "nlon must be 2 \\* nlat"),
        ({"timestep_minutes": 7.0}, "timestep_minutes must divide"),
    ],
)
def test_invalid_settings_are_rejected(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(SMALL, **changes)


def test_invalid_region_is_rejected():
    with pytest.raises(ValueError, match="lon_min=350.0, lon_max=10.0"):
        sim.Region(45.0, 72.0, 350.0, 10.0)


def test_write_simulation_is_atomic_and_refuses_to_overwrite(small, tmp_path):
    out = tmp_path / "sim"
    paths = sim.write_simulation(small, out)
    assert {p.name for p in out.iterdir()} == {
        "global_coarse.nc",
        "regional_fine.nc",
        "stations.parquet",
        "simulation.json",
    }
    with xr.open_dataset(paths["global_coarse"]) as coarse, xr.open_dataset(paths["regional_fine"]) as regional:
        xr.testing.assert_identical(coarse.load(), small.coarse)
        xr.testing.assert_identical(regional.load(), small.fine_regional)
        assert coarse["geopotential"].encoding["zlib"]
    pd.testing.assert_frame_equal(pd.read_parquet(paths["stations"]), small.stations, check_dtype=False)
    metadata = json.loads(paths["metadata"].read_text())
    assert metadata["settings"]["seed"] == 1 and "torch" in metadata["package_versions"]

    with pytest.raises(FileExistsError, match=str(out)):
        sim.write_simulation(small, out)
    sim.write_simulation(small, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sim"]  # no temporary directories left behind


def test_coarsen_centres_coarse_cells_on_their_longitudes():
    """sin(lon) coarsens to K sin(lon_coarse): no phase shift, as a 4-block mean starting at 0E would give."""
    lat, lon = sim.fine_grid(128, 256)
    fine = xr.Dataset(
        {
            "sin_lon": (("latitude", "longitude"), np.ones((128, 1)) * np.sin(np.deg2rad(lon))[None, :]),
            "constant": (("latitude", "longitude"), np.full((128, 256), 3.0)),
        },
        coords={"latitude": lat, "longitude": lon},
    )
    coarse = sim.coarsen(fine, 4)
    np.testing.assert_array_equal(coarse["longitude"].values, 5.625 * np.arange(64))
    np.testing.assert_array_equal(coarse["latitude"].values, -87.1875 + 5.625 * np.arange(32))
    expected = np.sin(np.deg2rad(coarse["longitude"].values)) * float(coarse["sin_lon"].sel(longitude=90.0).mean())
    np.testing.assert_allclose(coarse["sin_lon"].values, np.broadcast_to(expected, (32, 64)), atol=1e-6)
    np.testing.assert_allclose(coarse["constant"].values, 3.0, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Perfect-model forecasts
# ----------------------------------------------------------------------------------------------
def test_perfect_model_without_stirring_is_the_truth():
    """Without the stirring nothing is unknown: every member is the simulation itself, on both grids."""
    settings = dataclasses.replace(SMALL, stirring_rate=0.0, years=3 / 365.25)
    truth = sim.simulate(settings)
    starts = pd.DatetimeIndex(truth.coarse.time.values[[1, 4]])
    for grid, stored in (("global", truth.coarse), ("regional", truth.fine_regional)):
        forecast, at_starts = sim.rerun_ensemble(settings, init_times=starts, steps=3, members=2, grid=grid)
        assert forecast.sizes["realization"] == 2 and forecast.sizes["prediction_timedelta"] == 3
        for name in ("geopotential", "u_component_of_wind", "2m_temperature"):
            np.testing.assert_allclose(at_starts[name].values, stored[name].sel(time=starts).values, rtol=1e-6)
            for m in range(2):
                member = forecast[name].isel(realization=m)
                expected = stored[name].sel(time=member.valid_time.values.ravel()).values.reshape(member.shape)
                np.testing.assert_allclose(member.values, expected, rtol=1e-5, atol=1e-5)
        assert np.array_equal(forecast.latitude.values, stored.latitude.values)


def test_perfect_model_members_differ_by_their_future_stirring(small):
    starts = pd.DatetimeIndex(small.coarse.time.values[[2]])
    forecast, at_starts = sim.rerun_ensemble(SMALL, init_times=starts, steps=8, members=3, grid="global")
    z = forecast["geopotential"].isel(time=0, level=0)
    spread = z.std("realization").mean(["latitude", "longitude"]).values
    assert spread[0] > 0 and spread[-1] > 3 * spread[0], spread
    np.testing.assert_allclose(at_starts["geopotential"].values, small.coarse["geopotential"].sel(time=starts).values,
                               rtol=1e-6)
    with pytest.raises(ValueError, match="not output times"):
        sim.rerun_ensemble(SMALL, init_times=starts + pd.Timedelta("1h"), steps=1, members=1, grid="global")
    with pytest.raises(ValueError, match="grid must be"):
        sim.rerun_ensemble(SMALL, init_times=starts, steps=1, members=1, grid="europe")


def test_settings_round_trip_through_json():
    settings = dataclasses.replace(SMALL, eddy_relaxation_days=math.inf, region=sim.Region(40.0, 60.0, 5.0, 30.0))
    assert sim.SimulationSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings
    with pytest.raises(ValueError, match=r"unknown simulation settings \['colour'\]"):
        sim.SimulationSettings.from_dict({**settings.to_dict(), "colour": "blue"})


def test_perfect_model_baseline_from_a_store_and_its_bad_input(small, tmp_path):
    from forecasting.cli import main
    from forecasting.errors import SchemaError
    from forecasting.verification.baselines import perfect_model_forecast

    store = tmp_path / "regional.zarr"
    small.fine_regional.to_zarr(store)
    starts = [str(t) for t in small.fine_regional.time.values[[1, 3]]]
    out = tmp_path / "perfect.zarr"
    assert main(["baseline", "perfect-model", "--truth", str(store), "--start", starts[0], "--start", starts[1],
                 "--steps", "2", "--members", "2", "--out", str(out)]) == 0
    written = xr.open_zarr(out)
    assert written.sizes["realization"] == 2 and written.attrs["model"] == "perfect-model"
    direct, _ = sim.rerun_ensemble(SMALL, init_times=pd.DatetimeIndex(starts), steps=2, members=2, grid="regional")
    np.testing.assert_array_equal(written["2m_temperature"].values, direct["2m_temperature"].values)

    # bad input: clear errors, nothing written
    assert main(["baseline", "persistence", "--truth", str(store), "--start", starts[0], "--members", "2",
                 "--out", str(tmp_path / "p.zarr")]) == 2
    assert main(["baseline", "perfect-model", "--truth", str(store), "--start", starts[0], "--step-hours", "12",
                 "--out", str(tmp_path / "p.zarr")]) == 2
    assert not (tmp_path / "p.zarr").exists()
    unmarked = small.coarse.copy()
    unmarked.attrs = {}
    with pytest.raises(SchemaError, match="no 'settings_json' attribute"):
        perfect_model_forecast(unmarked, init_times=starts, steps=1, members=1, source="unmarked.zarr")
    with pytest.raises(SchemaError, match="neither the coarse global nor the regional grid"):
        perfect_model_forecast(small.coarse.isel(latitude=slice(1, None)), init_times=starts, steps=1, members=1)
    other = small.coarse.copy()
    other["geopotential"] = other["geopotential"] + 500.0
    with pytest.raises(SchemaError, match="geopotential at the start times differs from the re-run simulation"):
        perfect_model_forecast(other, init_times=starts, steps=1, members=1, source="other.zarr")

    # the same through inference.baseline_forecast, which the CLI and the verification's references use
    from forecasting.errors import StoreError
    from forecasting.inference import baseline_forecast

    truth = xr.open_zarr(store)
    via = baseline_forecast(truth, kind="perfect-model", init_times=starts, leads=pd.to_timedelta([6, 12], unit="h"),
                            members=2)
    np.testing.assert_array_equal(via["2m_temperature"].values, direct["2m_temperature"].values)
    with pytest.raises(StoreError, match="leads must be 6 h, 12 h"):
        baseline_forecast(truth, kind="perfect-model", init_times=starts, leads=pd.to_timedelta([12], unit="h"))
    with pytest.raises(StoreError, match="members=2: only the perfect-model baseline has members"):
        baseline_forecast(truth, kind="persistence", init_times=starts, leads=pd.to_timedelta([6], unit="h"), members=2)
