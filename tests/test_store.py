"""The training store: layout, atomic writes, appends with rollback, statistics, distributed writes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr

import forecasting
from forecasting.data import store as store_module
from forecasting.data.statistics import compute_statistics
from forecasting.data.store import (
    STORE_FORMAT_VERSION,
    append_store,
    open_store,
    read_statistics,
    store_info,
    write_store,
)
from forecasting.errors import StoreError

N_LAT, N_LON = 12, 24


def make_dataset(
    *, n_times: int = 40, start: str = "2000-01-01", freq: str = "6h", seed: int = 0, members: int | None = None
) -> xr.Dataset:
    """A canonical dataset: geopotential on [500, 850] hPa, 2m_temperature, mean_sea_level_pressure and a
    static geopotential_at_surface, on a 12x24 global grid; float32, random around physical values."""
    rng = np.random.default_rng(seed)
    time = pd.date_range(start, periods=n_times, freq=freq)
    lat = np.linspace(-82.5, 82.5, N_LAT)
    lon = np.arange(N_LON) * (360.0 / N_LON)
    level = np.array([500.0, 850.0])
    lead = (n_times,) if members is None else (n_times, members)
    lead_dims = ("time",) if members is None else ("time", "realization")

    def field(offset: float, scale: float, *shape: int) -> np.ndarray:
        return (offset + scale * rng.standard_normal((*lead, *shape))).astype("float32")

    coords = {"time": time, "level": ("level", level, {"units": "hPa"}), "latitude": lat, "longitude": lon}
    if members is not None:
        coords["realization"] = np.arange(members)
    return xr.Dataset(
        {
            "geopotential": ((*lead_dims, "level", "latitude", "longitude"), field(5.4e4, 300.0, 2, N_LAT, N_LON),
                             {"units": "m**2 s**-2"}),
            "2m_temperature": ((*lead_dims, "latitude", "longitude"), field(280.0, 8.0, N_LAT, N_LON), {"units": "K"}),
            "mean_sea_level_pressure": ((*lead_dims, "latitude", "longitude"), field(1.0e5, 900.0, N_LAT, N_LON),
                                        {"units": "Pa"}),
            "geopotential_at_surface": (("latitude", "longitude"),
                                        (3000.0 * rng.random((N_LAT, N_LON))).astype("float32"),
                                        {"units": "m**2 s**-2"}),
        },
        coords=coords,
        attrs={"source": "synthetic test data"},
    )


def failing(ds: xr.Dataset, name: str, *, chunk: int = 10) -> xr.Dataset:
    """``ds`` with ``name`` replaced by a dask array whose second time chunk raises when computed."""

    def explode(block: np.ndarray, block_info=None) -> np.ndarray:
        if block_info[None]["chunk-location"][0] == 1:
            raise RuntimeError("injected failure in the second chunk")
        return block

    var = ds[name]
    data = da.from_array(var.values, chunks=(chunk,) + var.shape[1:]).map_blocks(explode, dtype=var.dtype)
    return ds.assign({name: var.copy(data=data)})


def file_digests(path: Path) -> dict[str, str]:
    """relative path -> md5 of every file under ``path``."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = Path(root) / name
            out[str(full.relative_to(path))] = hashlib.md5(full.read_bytes()).hexdigest()
    return out


@pytest.fixture
def dataset() -> xr.Dataset:
    return make_dataset()


# ----------------------------------------------------------------------------------------------
# Layout and round trip
# ----------------------------------------------------------------------------------------------
def test_store_round_trips_and_reopens_with_plain_xarray(tmp_path: Path, dataset: xr.Dataset) -> None:
    path = write_store(dataset, tmp_path / "train.zarr", train_period=("2000-01-01", "2000-01-05"),
                       attrs={"experiment": "round-trip"})
    with xr.open_zarr(path) as reopened:  # no project code needed to read it
        xr.testing.assert_equal(reopened.load(), dataset)
        assert reopened.attrs["format_version"] == STORE_FORMAT_VERSION
        assert reopened.attrs["forecasting_version"] == forecasting.__version__
        assert reopened.attrs["source"] == "synthetic test data"
        assert reopened.attrs["train_period"] == ["2000-01-01", "2000-01-05"]
        assert reopened.attrs["time_step"] == "6h"
        assert reopened.attrs["experiment"] == "round-trip"
        pd.Timestamp(reopened.attrs["created"])
    xr.testing.assert_equal(open_store(path).load(), dataset)


def test_time_dependent_variables_are_chunked_one_step_and_one_member_per_chunk(tmp_path: Path) -> None:
    ds = make_dataset(n_times=6, members=3)
    write_store(ds, tmp_path / "s.zarr")
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert group["geopotential"].chunks == (1, 1, 2, N_LAT, N_LON)
    assert group["2m_temperature"].chunks == (1, 1, N_LAT, N_LON)
    assert group["geopotential_at_surface"].chunks == (N_LAT, N_LON)
    assert group.metadata.zarr_format == 2
    assert (tmp_path / "s.zarr" / ".zmetadata").is_file()  # consolidated, readable over plain HTTP
    meta = json.loads((tmp_path / "s.zarr" / "geopotential" / ".zarray").read_text())
    assert meta["compressor"]["id"] == "blosc" and meta["compressor"]["cname"] == "zstd"


def test_write_does_not_mutate_the_input(tmp_path: Path, dataset: xr.Dataset) -> None:
    dataset["2m_temperature"].encoding = {"chunksizes": (5, N_LAT, N_LON), "zlib": True}
    before = dataset.copy(deep=True)
    write_store(dataset, tmp_path / "s.zarr")
    xr.testing.assert_identical(dataset, before)
    assert dataset["2m_temperature"].encoding == {"chunksizes": (5, N_LAT, N_LON), "zlib": True}


# ----------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("failure", ["data chunk", "empty train period"])
def test_failed_write_leaves_neither_store_nor_temporary_directory(tmp_path: Path, dataset: xr.Dataset,
                                                                    failure: str) -> None:
    target = tmp_path / "s.zarr"
    if failure == "data chunk":
        with pytest.raises(RuntimeError, match="injected failure"):
            write_store(failing(dataset, "2m_temperature"), target)
    else:
        with pytest.raises(StoreError, match="holds no times"):
            write_store(dataset, target, train_period=("2010-01-01", "2010-12-31"))
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_existing_store_is_refused_before_any_work_without_overwrite(tmp_path: Path, dataset: xr.Dataset) -> None:
    target = write_store(dataset, tmp_path / "s.zarr")
    before = file_digests(target)
    # A dataset that would fail if computed: the refusal must come first, naming the path.
    with pytest.raises(StoreError, match=f"{target}.*already exists"):
        write_store(failing(dataset, "geopotential"), target)
    assert file_digests(target) == before


def test_overwrite_replaces_the_store_and_keeps_the_old_one_if_the_new_write_fails(
    tmp_path: Path, dataset: xr.Dataset
) -> None:
    target = write_store(dataset, tmp_path / "s.zarr")
    other = make_dataset(seed=7)
    with pytest.raises(RuntimeError, match="injected failure"):
        write_store(failing(other, "geopotential"), target, overwrite=True)
    xr.testing.assert_equal(open_store(target).load(), dataset)
    write_store(other, target, overwrite=True)
    xr.testing.assert_equal(open_store(target).load(), other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]


def test_overwrite_of_a_store_by_a_subset_of_itself(tmp_path: Path, dataset: xr.Dataset) -> None:
    target = write_store(dataset, tmp_path / "s.zarr")
    subset = open_store(target).isel(time=slice(0, 10))
    write_store(subset, target, overwrite=True)
    xr.testing.assert_equal(open_store(target).load(), dataset.isel(time=slice(0, 10)))


def test_reserved_attributes_cannot_be_given(tmp_path: Path, dataset: xr.Dataset) -> None:
    with pytest.raises(StoreError, match="format_version"):
        write_store(dataset, tmp_path / "s.zarr", attrs={"format_version": 9})


def test_dataset_without_time_is_refused(tmp_path: Path, dataset: xr.Dataset) -> None:
    with pytest.raises(StoreError, match="needs a 'time' dim"):
        write_store(dataset[["geopotential_at_surface"]], tmp_path / "s.zarr")


# ----------------------------------------------------------------------------------------------
# Appending
# ----------------------------------------------------------------------------------------------
def test_append_adds_times_and_reports_the_gap(tmp_path: Path) -> None:
    full = make_dataset(n_times=60)
    first, second = full.isel(time=slice(0, 40)), full.isel(time=slice(44, 60))
    target = write_store(first, tmp_path / "s.zarr")
    append_store(second.drop_vars("geopotential_at_surface"), target)
    expected = xr.concat([first, second], dim="time", data_vars="minimal", coords="minimal", compat="override")
    xr.testing.assert_equal(open_store(target).load(), expected)
    info = store_info(target)
    assert info["time"]["count"] == 56
    assert info["time"]["gaps"] == [["2000-01-10T18:00:00", "2000-01-12T00:00:00"]]
    assert "updated" in info["attrs"]


def test_append_float64_data_is_cast_to_the_stored_dtype(tmp_path: Path) -> None:
    full = make_dataset(n_times=50)
    target = write_store(full.isel(time=slice(0, 40)), tmp_path / "s.zarr")
    append_store(full.isel(time=slice(40, None)).astype("float64"), target)
    reopened = open_store(target).load()
    assert reopened["geopotential"].dtype == np.float32
    xr.testing.assert_equal(reopened, full)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("overlapping times", "not after the last stored time"),
        ("other grid", "latitude coordinate differs"),
        ("other units", "units 'degC'; the store has 'K'"),
        ("other levels", "level coordinate differs"),
        ("missing variable", r"variables \['mean_sea_level_pressure'\] are missing"),
        ("other step", "step 0 days 03:00:00"),
        ("other static field", "static variable 'geopotential_at_surface' differs"),
    ],
)
def test_append_refuses_incompatible_data_saying_what_differs(tmp_path: Path, change: str, message: str) -> None:
    full = make_dataset(n_times=60)
    target = write_store(full.isel(time=slice(0, 40)), tmp_path / "s.zarr")
    before = file_digests(target)
    new = full.isel(time=slice(40, None))
    if change == "overlapping times":
        new = full.isel(time=slice(35, None))
    elif change == "other grid":
        new = new.assign_coords(latitude=new.latitude + 0.5)
    elif change == "other units":
        new["2m_temperature"] = (new["2m_temperature"] - 273.15).assign_attrs(units="degC")
    elif change == "other levels":
        new = new.assign_coords(level=[500.0, 700.0])
    elif change == "missing variable":
        new = new.drop_vars("mean_sea_level_pressure")
    elif change == "other step":
        new = make_dataset(n_times=8, start="2000-01-11", freq="3h")
    elif change == "other static field":
        new["geopotential_at_surface"] = new["geopotential_at_surface"] + 1.0
    with pytest.raises(StoreError, match=message) as info:
        append_store(new, target)
    assert str(target) in str(info.value)
    assert file_digests(target) == before


def test_failed_append_rolls_the_store_back_exactly(tmp_path: Path) -> None:
    full = make_dataset(n_times=60)
    target = write_store(full.isel(time=slice(0, 40)), tmp_path / "s.zarr")
    before = file_digests(target)
    with pytest.raises(RuntimeError, match="injected failure"):
        append_store(failing(full.isel(time=slice(40, None)), "geopotential"), target)
    assert file_digests(target) == before
    xr.testing.assert_equal(open_store(target).load(), full.isel(time=slice(0, 40)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]
    # and the store still takes a good append afterwards
    append_store(full.isel(time=slice(40, None)), target)
    xr.testing.assert_equal(open_store(target).load(), full)


def test_append_failing_in_the_statistics_rolls_back_data_and_statistics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = make_dataset(n_times=60)
    target = write_store(full.isel(time=slice(0, 40)), tmp_path / "s.zarr")
    before = file_digests(target)

    def broken(*args: object, **kwargs: object) -> xr.Dataset:
        raise RuntimeError("injected failure in the statistics")

    monkeypatch.setattr(store_module, "compute_statistics", broken)
    with pytest.raises(RuntimeError, match="statistics"):
        append_store(full.isel(time=slice(40, None)), target)
    assert file_digests(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]


def test_append_recomputes_statistics_only_when_the_train_period_takes_new_times(tmp_path: Path) -> None:
    full = make_dataset(n_times=60)
    closed = write_store(full.isel(time=slice(0, 40)), tmp_path / "closed.zarr", train_period=(None, "2000-01-05"))
    open_ended = write_store(full.isel(time=slice(0, 40)), tmp_path / "open.zarr", train_period=("2000-01-02", None))
    closed_before = read_statistics(closed)
    append_store(full.isel(time=slice(40, None)), closed)
    append_store(full.isel(time=slice(40, None)), open_ended)
    xr.testing.assert_identical(read_statistics(closed), closed_before)
    expected = compute_statistics(full, train_period=("2000-01-02", None))
    xr.testing.assert_allclose(read_statistics(open_ended), expected, rtol=1e-10)
    assert read_statistics(open_ended).attrs["train_period"] == ["2000-01-02T00:00:00", "2000-01-15T18:00:00"]


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------
def _trend_dataset(n_times: int, freq: str, *, alternating: float = 0.0) -> xr.Dataset:
    """x(t, lat, lon) = pattern(lat, lon) + 2 * t_hours + alternating * (-1)**k, k the time index."""
    time = pd.date_range("2001-01-01", periods=n_times, freq=freq)
    hours = ((time - time[0]) / pd.Timedelta(hours=1)).to_numpy()
    lat = np.linspace(-60, 60, 4)
    lon = np.arange(8) * 45.0
    pattern = np.add.outer(lat, lon / 10.0)  # (lat, lon)
    sign = (-1.0) ** np.arange(n_times)
    values = pattern[None] + 2.0 * hours[:, None, None] + alternating * sign[:, None, None]
    return xr.Dataset(
        {"2m_temperature": (("time", "latitude", "longitude"), values, {"units": "K"})},
        coords={"time": time, "latitude": lat, "longitude": lon},
    )


def test_statistics_of_a_linear_trend_use_only_the_train_period(tmp_path: Path) -> None:
    ds = _trend_dataset(40, "6h")
    ds["2m_temperature"][30:] += 1.0e4  # outside the train period: must not be seen
    target = write_store(ds, tmp_path / "s.zarr", train_period=(None, "2001-01-07T06:00"))
    stats = read_statistics(target)["2m_temperature"]
    k_hours = 6.0 * np.arange(26)  # 2001-01-01 00 .. 01-07 06: 26 steps
    pattern = np.add.outer(np.linspace(-60, 60, 4), np.arange(8) * 4.5)
    expected_mean = pattern.mean() + 2.0 * k_hours.mean()
    expected_std = np.sqrt(pattern.var() + 4.0 * k_hours.var())
    np.testing.assert_allclose(stats.sel(statistic="mean"), expected_mean, rtol=1e-12)
    np.testing.assert_allclose(stats.sel(statistic="std"), expected_std, rtol=1e-10)
    np.testing.assert_allclose(stats.sel(statistic="tendency_std"), 0.0, atol=1e-9)
    attrs = read_statistics(target).attrs
    assert attrs["n_times"] == 26 and attrs["n_tendency_pairs"] == 25
    assert attrs["train_period"] == ["2001-01-01T00:00:00", "2001-01-07T06:00:00"]


@pytest.mark.parametrize(
    ("freq", "lag_steps", "tendency_hours"),
    [("1h", 6, 6.0), ("3h", 2, 6.0), ("6h", 1, 6.0), ("24h", 1, 24.0), ("4h", 1, 4.0)],
)
def test_tendency_std_uses_six_hour_pairs_or_one_step(freq: str, lag_steps: int, tendency_hours: float) -> None:
    # An alternating +-A on top of a linear trend: the trend's difference is constant, so the tendency
    # std is that of A * (s[k + lag] - s[k]) with s = +-1: zero for an even lag, near 2A for an odd one.
    amplitude, n = 3.0, 48
    stats = compute_statistics(_trend_dataset(n, freq, alternating=amplitude), train_period=None)
    sign = (-1.0) ** np.arange(n)
    expected = np.std(amplitude * (sign[lag_steps:] - sign[:-lag_steps]))
    assert stats.attrs["tendency_hours"] == tendency_hours
    assert stats.attrs["n_tendency_pairs"] == n - lag_steps
    np.testing.assert_allclose(stats["2m_temperature"].sel(statistic="tendency_std"), expected, atol=1e-9)


def test_tendency_pairs_never_bridge_a_gap() -> None:
    ds = _trend_dataset(40, "6h", alternating=1.0)
    kept = np.setdiff1d(np.arange(40), [10, 11, 12])
    stats = compute_statistics(ds.isel(time=kept), train_period=None)
    sign = (-1.0) ** kept
    pairs = [sign[i + 1] - sign[i] for i in range(len(kept) - 1) if kept[i + 1] - kept[i] == 1]
    assert stats.attrs["n_tendency_pairs"] == len(pairs) == 35
    np.testing.assert_allclose(stats["2m_temperature"].sel(statistic="tendency_std"), np.std(pairs), atol=1e-9)


@pytest.mark.parametrize("chunk", [1, 4, 7, 100])
def test_statistics_do_not_depend_on_the_chunking(chunk: int) -> None:
    # hourly with gaps: a 6-hour partner lies up to 6 positions later, often in another chunk
    ds = make_dataset(n_times=60, freq="1h").isel(time=np.setdiff1d(np.arange(60), [10, 11, 30]))
    stats = compute_statistics(ds.chunk(time=chunk), train_period=None)
    times = pd.DatetimeIndex(ds.time.values)
    position = {t: i for i, t in enumerate(times)}
    pairs = [(i, position[t + pd.Timedelta("6h")]) for i, t in enumerate(times) if t + pd.Timedelta("6h") in position]
    z = ds["geopotential"].values.astype(np.float64)  # (time, level, lat, lon)
    tendency = np.stack([z[j] - z[i] for i, j in pairs])
    assert stats.attrs["n_tendency_pairs"] == len(pairs)
    np.testing.assert_allclose(stats["geopotential"].sel(statistic="mean"), z.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(stats["geopotential"].sel(statistic="std"), z.std(axis=(0, 2, 3)), rtol=1e-10)
    np.testing.assert_allclose(stats["geopotential"].sel(statistic="tendency_std"), tendency.std(axis=(0, 2, 3)),
                               rtol=1e-10)


def test_statistics_skip_masked_points_and_give_static_fields_zero_tendency() -> None:
    ds = _trend_dataset(12, "6h")
    mask = xr.DataArray(np.ones((4, 8), dtype=bool), dims=("latitude", "longitude"), coords={
        "latitude": ds.latitude, "longitude": ds.longitude})
    mask[0, :] = False
    values = ds["2m_temperature"].where(mask)
    values[:, 0, :] = np.nan
    ds = ds.assign({"2m_temperature": values.assign_attrs(units="K"), "2m_temperature_mask": mask,
                    "land_sea_mask": (("latitude", "longitude"), np.linspace(0, 1, 32).reshape(4, 8), {"units": "1"})})
    stats = compute_statistics(ds, train_period=None)
    valid = ds["2m_temperature"].values[:, 1:, :]
    np.testing.assert_allclose(stats["2m_temperature"].sel(statistic="mean"), valid.mean(), rtol=1e-12)
    np.testing.assert_allclose(stats["2m_temperature"].sel(statistic="std"), valid.std(), rtol=1e-10)
    lsm = np.linspace(0, 1, 32)
    np.testing.assert_allclose(stats["land_sea_mask"].values, [lsm.mean(), lsm.std(), 0.0], atol=1e-12)
    assert "2m_temperature_mask" not in stats


def test_statistics_layout_has_statistic_and_level_dims(tmp_path: Path, dataset: xr.Dataset) -> None:
    stats = read_statistics(write_store(dataset, tmp_path / "s.zarr"))
    assert stats["statistic"].values.tolist() == ["mean", "std", "tendency_std"]
    assert stats["geopotential"].dims == ("statistic", "level")
    assert stats["2m_temperature"].dims == ("statistic",)
    np.testing.assert_allclose(
        stats["geopotential"].sel(statistic="mean"),
        dataset["geopotential"].astype("float64").mean(("time", "latitude", "longitude")),
        rtol=1e-12,
    )
    with xr.open_zarr(tmp_path / "s.zarr", group="statistics") as plain:  # plain xarray reads it too
        xr.testing.assert_identical(plain.load(), stats)


# ----------------------------------------------------------------------------------------------
# Distributed, reading, info
# ----------------------------------------------------------------------------------------------
def test_write_through_a_distributed_client_gives_identical_output(tmp_path: Path, dataset: xr.Dataset) -> None:
    distributed = pytest.importorskip("distributed")
    local = write_store(dataset, tmp_path / "local.zarr")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        remote = write_store(dataset, tmp_path / "cluster.zarr", client=client)
    local_files, remote_files = file_digests(local), file_digests(remote)
    assert local_files.keys() == remote_files.keys()
    # everything but the metadata that holds the creation time is byte-identical
    differing = {name for name in local_files if local_files[name] != remote_files[name]}
    assert differing <= {".zattrs", ".zmetadata"}
    xr.testing.assert_identical(read_statistics(local), read_statistics(remote))


def test_open_store_refuses_missing_foreign_and_newer_stores(tmp_path: Path, dataset: xr.Dataset) -> None:
    with pytest.raises(StoreError, match="no training store at"):
        open_store(tmp_path / "missing.zarr")
    dataset.to_zarr(tmp_path / "plain.zarr", zarr_format=2, consolidated=True)
    with pytest.raises(StoreError, match="not a training store"):
        open_store(tmp_path / "plain.zarr")
    target = write_store(dataset, tmp_path / "s.zarr")
    group = zarr.open_group(str(target), mode="r+")
    group.attrs["format_version"] = STORE_FORMAT_VERSION + 1
    zarr.consolidate_metadata(str(target), zarr_format=2)
    with pytest.raises(StoreError, match="format_version 2"):
        open_store(target)


def test_store_info_summarises_variables_time_and_statistics(tmp_path: Path, dataset: xr.Dataset) -> None:
    info = store_info(write_store(dataset, tmp_path / "s.zarr", train_period=(None, "2000-01-03")))
    json.dumps(info)  # ready for the CLI
    assert info["kind"] == "gridded"
    assert info["variables"]["geopotential"]["chunks"] == [1, 2, N_LAT, N_LON]
    assert info["variables"]["geopotential_at_surface"]["dims"] == ["latitude", "longitude"]
    assert info["time"] == {"start": "2000-01-01T00:00:00", "end": "2000-01-10T18:00:00", "count": 40,
                            "step": "6h", "gaps": []}
    rows = {(row["variable"], row["level"]): row for row in info["statistics"]}
    assert set(rows) == {("geopotential", 500.0), ("geopotential", 850.0), ("2m_temperature", None),
                         ("mean_sea_level_pressure", None), ("geopotential_at_surface", None)}
    assert rows[("geopotential_at_surface", None)]["tendency_std"] == 0.0
    assert info["statistics_attrs"]["n_times"] == 12


def test_observation_store_is_written_atomically_and_described(tmp_path: Path) -> None:
    times = pd.date_range("1970-01-01", periods=5, freq="D").append(pd.DatetimeIndex(["1970-01-09"]))
    obs = xr.Dataset(
        {"total_precipitation_24hr": (("time", "station"), np.arange(18.0).reshape(6, 3) * 1e-3, {"units": "m"})},
        coords={"time": times, "station_id": ("station", np.array(["A1", "B22", "C3"], dtype=object)),
                "latitude": ("station", [45.0, 46.0, 47.0]), "longitude": ("station", [286.0, 287.0, 288.0])},
        attrs={"source": "gauges.csv"},
    )
    target = store_module.write_observation_store(obs, tmp_path / "obs.zarr")
    with pytest.raises(StoreError, match="already exists"):
        store_module.write_observation_store(obs, target)
    with xr.open_zarr(target) as reopened:
        xr.testing.assert_equal(reopened.load().drop_vars("station_id"), obs.drop_vars("station_id"))
        assert reopened["station_id"].values.tolist() == ["A1", "B22", "C3"]
    info = store_info(target)
    assert info["kind"] == "observations" and info["statistics"] == []
    assert info["time"]["gaps"] == [["1970-01-05T00:00:00", "1970-01-09T00:00:00"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["obs.zarr"]
