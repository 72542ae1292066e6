"""WindowDataset: shapes, channel order, normalisation, windows around gaps, forcings, multi-process loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from forecasting.data.store import open_store, read_statistics, write_store
from forecasting.data.torch_dataset import FORCING_NAMES, WindowDataset, time_forcings
from forecasting.errors import SchemaError

N_LAT, N_LON = 12, 24
GAP = [20, 21]  # positions dropped from 40 six-hourly times: segments of 20 and 18 times


def make_dataset(*, n_times: int = 40, n_lat: int = N_LAT, n_lon: int = N_LON, lat_range=(-82.5, 82.5),
                 lon_range=(0.0, 360.0), members: int | None = None, seed: int = 0) -> xr.Dataset:
    """Canonical data: geopotential on [500, 850] hPa, 2m_temperature, u_component_of_wind on 500 hPa,
    statics geopotential_at_surface and land_sea_mask; six-hourly from 2000-01-01."""
    rng = np.random.default_rng(seed)
    time = pd.date_range("2000-01-01", periods=n_times, freq="6h")
    lat = np.linspace(*lat_range, n_lat)
    lon = np.linspace(*lon_range, n_lon, endpoint=lon_range != (0.0, 360.0))
    lead = (n_times,) if members is None else (n_times, members)
    lead_dims = ("time",) if members is None else ("time", "realization")

    def field(offset: float, scale: float, *shape: int) -> np.ndarray:
        return (offset + scale * rng.standard_normal((*lead, *shape))).astype("float32")

    coords = {"time": time, "level": ("level", [500.0, 850.0], {"units": "hPa"}), "latitude": lat, "longitude": lon}
    if members is not None:
        coords["realization"] = np.arange(members)
    return xr.Dataset(
        {
            "geopotential": ((*lead_dims, "level", "latitude", "longitude"), field(5.4e4, 300.0, 2, n_lat, n_lon),
                             {"units": "m**2 s**-2"}),
            "2m_temperature": ((*lead_dims, "latitude", "longitude"), field(280.0, 8.0, n_lat, n_lon), {"units": "K"}),
            "u_component_of_wind": ((*lead_dims, "latitude", "longitude"), field(5.0, 10.0, n_lat, n_lon),
                                    {"units": "m s**-1"}),
            "geopotential_at_surface": (("latitude", "longitude"), 3000.0 * rng.random((n_lat, n_lon)),
                                        {"units": "m**2 s**-2"}),
            "land_sea_mask": (("latitude", "longitude"), (rng.random((n_lat, n_lon)) > 0.5).astype("float32"),
                              {"units": "1"}),
        },
        coords=coords,
    )


@pytest.fixture(scope="module")
def raw() -> xr.Dataset:
    full = make_dataset()
    return full.isel(time=np.setdiff1d(np.arange(40), GAP))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, raw: xr.Dataset) -> Path:
    return write_store(raw, tmp_path_factory.mktemp("torch") / "train.zarr")


def test_sample_shapes_and_channel_order(store: Path) -> None:
    ds = WindowDataset(store, variables=["geopotential", "2m_temperature"], input_steps=2, target_steps=3)
    assert ds.channels == ("geopotential@500", "geopotential@850", "2m_temperature")
    assert ds.static_names == ("geopotential_at_surface", "land_sea_mask")
    assert ds.forcing_names == FORCING_NAMES
    sample = ds[0]
    assert sample["inputs"].shape == (2, 3, N_LAT, N_LON)
    assert sample["targets"].shape == (3, 3, N_LAT, N_LON)
    assert sample["forcings"].shape == (5, 4, N_LAT, N_LON)
    assert sample["static"].shape == (2, N_LAT, N_LON)
    assert sample["inputs"].dtype == sample["forcings"].dtype == torch.float32
    assert sample["time"].dtype == sample["index"].dtype == torch.int64


def test_default_variables_are_every_time_dependent_field_in_store_order(store: Path) -> None:
    ds = WindowDataset(store)
    assert ds.channels == ("2m_temperature", "geopotential@500", "geopotential@850", "u_component_of_wind")


def test_denormalised_inputs_and_targets_equal_the_store_values(store: Path, raw: xr.Dataset) -> None:
    ds = WindowDataset(store, variables=["u_component_of_wind", "geopotential"], input_steps=2, target_steps=1)
    i = 25
    sample = ds[i]
    times = ds.window_times(i)
    expected = np.concatenate(
        [raw["u_component_of_wind"].sel(time=times).values[:, None],
         raw["geopotential"].sel(time=times).values],
        axis=1,
    )  # (T, C, H, W)
    np.testing.assert_allclose(ds.denormalise(sample["inputs"]).numpy(), expected[:2], rtol=1e-6, atol=1e-3)
    np.testing.assert_allclose(ds.denormalise(sample["targets"]).numpy(), expected[2:], rtol=1e-6, atol=1e-3)
    stats = read_statistics(store)
    z500 = stats["geopotential"].sel(level=500.0)
    np.testing.assert_allclose(
        sample["inputs"][0, 1].numpy(),
        (expected[0, 1] - z500.sel(statistic="mean").item()) / z500.sel(statistic="std").item(),
        rtol=1e-4, atol=1e-5,
    )
    lsm = raw["land_sea_mask"].values
    np.testing.assert_allclose(sample["static"][1].numpy(), (lsm - lsm.mean()) / lsm.std(), rtol=1e-5, atol=1e-5)


def test_unnormalised_samples_are_raw_values(store: Path, raw: xr.Dataset) -> None:
    ds = WindowDataset(store, variables=["2m_temperature"], normalise=False)
    np.testing.assert_array_equal(ds[0]["inputs"][:, 0].numpy(), raw["2m_temperature"].values[:2])
    assert torch.equal(ds.denormalise(ds[0]["inputs"]), ds[0]["inputs"])


@pytest.mark.parametrize(("step", "input_steps", "target_steps"),
                         [("6h", 2, 1), ("12h", 2, 1), ("6h", 1, 0), ("18h", 1, 1)])
def test_window_count_counts_only_windows_whose_steps_all_exist(store: Path, raw: xr.Dataset, step: str,
                                                                input_steps: int, target_steps: int) -> None:
    ds = WindowDataset(store, step=step, input_steps=input_steps, target_steps=target_steps)
    stored = set(pd.DatetimeIndex(raw["time"].values))
    offsets = [k * pd.Timedelta(step) for k in range(input_steps + target_steps)]
    expected = [t for t in sorted(stored) if all(t + o in stored for o in offsets)]
    assert len(ds) == len(expected)
    assert [pd.Timestamp(ds.window_times(i)[0]) for i in range(len(ds))] == expected


def test_window_count_with_a_gap(store: Path) -> None:
    # 38 stored times: 20 before the 12-hour gap and 18 after it
    assert len(WindowDataset(store, input_steps=2, target_steps=1)) == (20 - 2) + (18 - 2)
    # an 18-hour step jumps the gap: 01-05 12h -> 01-06 06h is missing, but 01-05 18h -> 01-06 12h exists
    assert len(WindowDataset(store, step="18h", input_steps=1, target_steps=1)) == (20 - 3) + (18 - 3) + 1


def test_target_is_the_state_one_step_after_the_last_input(store: Path, raw: xr.Dataset) -> None:
    ds = WindowDataset(store, variables=["2m_temperature"], step="12h", input_steps=2, target_steps=1)
    for i in (0, 7, len(ds) - 1):
        sample = ds[i]
        last_input = pd.Timestamp(int(sample["time"]))
        target = ds.denormalise(sample["targets"])[0, 0].numpy()
        np.testing.assert_allclose(target, raw["2m_temperature"].sel(time=last_input + pd.Timedelta("12h")).values,
                                   rtol=1e-6)
        assert int(sample["index"]) == i
    assert ds[-1]["index"] == len(ds) - 1
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_time_range_keeps_windows_inside_it(store: Path) -> None:
    ds = WindowDataset(store, time=("2000-01-02", "2000-01-03T18:00"), input_steps=2, target_steps=1)
    assert len(ds) == 8 - 2  # 8 stored times on 01-02 and 01-03
    assert pd.Timestamp(ds.window_times(0)[0]) == pd.Timestamp("2000-01-02")
    assert pd.Timestamp(ds.window_times(len(ds) - 1)[-1]) == pd.Timestamp("2000-01-03T18:00")


def test_forcings_have_their_analytic_values() -> None:
    times = np.array(["1970-01-01T00:00", "1970-01-01T06:00", "1970-07-02T14:54:22.608"], dtype="datetime64[ns]")
    lon = np.array([0.0, 90.0, 180.0, 270.0])
    out = time_forcings(times, lon, n_lat=3)  # (T, 4, 3, 4)
    assert out.shape == (3, 4, 3, 4)
    # year progress: 0 at the epoch; half a tropical year (182.621095 days) later it is 0.5
    np.testing.assert_allclose(out[0, 0], 1.0, atol=1e-6)
    np.testing.assert_allclose(out[0, 1], 0.0, atol=1e-6)
    np.testing.assert_allclose(out[2, 0], -1.0, atol=1e-6)
    np.testing.assert_allclose(out[2, 1], 0.0, atol=1e-5)
    # local solar time: 00 UTC at lon 0/90/180/270 is 0/6/12/18 h; 06 UTC adds 6 h
    for row in range(3):
        np.testing.assert_allclose(out[0, 2, row], [1.0, 0.0, -1.0, 0.0], atol=1e-6)
        np.testing.assert_allclose(out[0, 3, row], [0.0, 1.0, 0.0, -1.0], atol=1e-6)
        np.testing.assert_allclose(out[1, 2, row], [0.0, -1.0, 0.0, 1.0], atol=1e-6)
        np.testing.assert_allclose(out[1, 3, row], [1.0, 0.0, -1.0, 0.0], atol=1e-6)


def test_sample_forcings_follow_the_window_times(store: Path, raw: xr.Dataset) -> None:
    ds = WindowDataset(store, target_steps=2)
    sample = ds[5]
    expected = time_forcings(ds.window_times(5), raw["longitude"].values, N_LAT)
    np.testing.assert_array_equal(sample["forcings"].numpy(), expected)


def test_dataloader_with_two_workers_gives_the_same_batches(store: Path) -> None:
    ds = WindowDataset(store, target_steps=2)
    serial = list(torch.utils.data.DataLoader(ds, batch_size=8, num_workers=0))
    parallel = list(torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2))
    assert len(serial) == len(parallel) == -(-len(ds) // 8)
    for a, b in zip(serial, parallel, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert serial[0]["inputs"].shape == (8, 2, 4, N_LAT, N_LON)


def test_missing_variable_error_lists_what_the_store_has(store: Path) -> None:
    with pytest.raises(SchemaError, match=r"\['temperature'\] are not in the store; it has .*'geopotential'"):
        WindowDataset(store, variables=["geopotential", "temperature"])
    with pytest.raises(SchemaError, match="static variable needs dims"):
        WindowDataset(store, static_variables=["2m_temperature"])


def test_step_must_be_a_multiple_of_the_store_step(store: Path) -> None:
    with pytest.raises(SchemaError, match="not a positive multiple of the store's time step 0 days 06:00:00"):
        WindowDataset(store, step="9h")


def test_a_selection_without_any_window_is_an_error(store: Path) -> None:
    with pytest.raises(SchemaError, match="no window of 3 times 0 days 06:00:00 apart lies within time range"):
        WindowDataset(store, time=("2000-01-02T00:00", "2000-01-02T06:00"))


def test_regional_dataset_in_memory_with_one_member_and_masked_points() -> None:
    ds = make_dataset(n_times=10, n_lat=5, n_lon=7, lat_range=(44.0, 47.0), lon_range=(285.0, 288.0), members=1)
    mask = xr.ones_like(ds["2m_temperature"].isel(time=0, realization=0), dtype=bool)
    mask[0, 0] = False
    ds["2m_temperature"] = ds["2m_temperature"].where(mask).assign_attrs(units="K")
    ds["2m_temperature_mask"] = mask
    windows = WindowDataset(ds, input_steps=1, target_steps=1)
    assert "2m_temperature_mask" not in windows.channels + windows.static_names
    sample = windows[0]
    assert sample["inputs"].shape == (1, 4, 5, 7)
    assert torch.isfinite(sample["inputs"]).all()
    t2m = windows.channels.index("2m_temperature")
    assert sample["inputs"][0, t2m, 0, 0] == 0.0  # a masked point is the mean after normalisation
    assert sample["inputs"][0, t2m, 0, 1] != 0.0
    # forcings use this grid's longitudes: local time at 285 E is 19 h at 00 UTC
    np.testing.assert_allclose(sample["forcings"][0, 2, :, 0], np.cos(2 * np.pi * 19 / 24), atol=1e-6)


def test_several_members_are_refused_with_the_way_to_pick_one(tmp_path: Path) -> None:
    path = write_store(make_dataset(n_times=6, members=3), tmp_path / "ens.zarr")
    with pytest.raises(SchemaError, match=r"3 ensemble members.*isel\(realization=k\)"):
        WindowDataset(path)
    member = WindowDataset(open_store(path).isel(realization=2), statistics=read_statistics(path))
    assert len(member) == 6 - 2
    assert member[0]["inputs"].shape == (2, 4, N_LAT, N_LON)
