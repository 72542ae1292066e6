"""`forecast ingest` end to end: real files come out conformed with statistics; bad input exits non-zero,
names the problem and leaves no partial output."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from conftest import make_canonical_dataset
from forecasting.cli import main
from forecasting.data.store import read_statistics
from forecasting.schema import validate


def _ingest(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["ingest", *args, "--quiet"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


REAL_CASES = {
    "era5-2mt-2019-03-uk.grib": [],
    "era5-levels-members.grib": [],
    "era5land-quebec-1970-daily.nc": ["--units", "tasmax=degC", "--units", "tasmin=degC"],
    "Pstorm.cdf": ["--rename", "p=mean_sea_level_pressure", "--units", "p=Pa", "--nan-policy", "fixed"],
    "Tstorm.cdf": ["--rename", "t=2m_temperature", "--units", "t=K", "--nan-policy", "fixed"],
    "Ustorm.cdf": ["--rename", "u=10m_u_component_of_wind", "--units", "u=m s-1", "--nan-policy", "fixed"],
    "Vstorm.cdf": ["--rename", "v=10m_v_component_of_wind", "--units", "v=m s-1", "--nan-policy", "fixed"],
    "U500storm.cdf": ["--units", "u=m s-1", "--level", "u=500", "--nan-policy", "fixed"],
    "V500storm.cdf": ["--units", "v=m s-1", "--level", "v=500", "--nan-policy", "fixed"],
    "stations-quebec-1970-daily-precip.nc": [],
}


def test_every_real_file_is_covered(real_data):
    assert sorted(p.name for p in real_data.iterdir() if not p.name.endswith((".md", ".idx"))) == sorted(REAL_CASES)


@pytest.mark.parametrize("name", sorted(REAL_CASES))
def test_real_file_ingests_conformed_with_statistics(real_data, tmp_path, capsys, name):
    out = tmp_path / "store.zarr"
    code, stdout, stderr = _ingest(capsys, str(real_data / name), "--out", str(out), *REAL_CASES[name])
    assert code == 0, stderr
    ds = xr.open_zarr(out)
    if name.startswith("stations"):
        # 38 gauges in the file, 18 of them without a single valid value in 1970: QC keeps 20
        assert ds.sizes["station"] == 20
        assert "total_precipitation_24hr" in ds.data_vars
        report = (out.parent / "store.zarr.qc.md").read_text()
        assert "38" in report
        return
    validate(ds, source=name)
    stats = read_statistics(out)
    for var in ds.data_vars:
        if not str(var).endswith("_mask"):
            assert var in stats.data_vars
            assert np.isfinite(stats[var].sel(statistic="mean")).all()
    assert ds.latitude.values[0] < ds.latitude.values[-1]
    assert (ds.longitude >= 0).all() and (ds.longitude < 360).all()
    chunks = ds[[v for v in ds.data_vars if "time" in ds[v].dims][0]].encoding["chunks"]
    assert chunks[0] == 1
    assert not list(real_data.glob("*.idx"))


def test_storm_files_merge_and_drop_missing_steps(real_data, tmp_path, capsys):
    out = tmp_path / "storm.zarr"
    code, stdout, stderr = _ingest(
        capsys, str(real_data / "Pstorm.cdf"), str(real_data / "Tstorm.cdf"), "--out", str(out),
        "--rename", "p=mean_sea_level_pressure", "--rename", "t=2m_temperature",
        "--units", "p=Pa", "--units", "t=K", "--nan-policy", "fixed",
    )
    assert code == 0, stderr
    assert "dropped all-missing time steps" in stdout
    ds = xr.open_zarr(out)
    assert set(ds.data_vars) >= {"mean_sea_level_pressure", "2m_temperature"}
    assert pd.Timestamp("1996-01-09T06") not in pd.DatetimeIndex(ds.time.values)


def test_stats_command_prints_statistics(real_data, tmp_path, capsys):
    out = tmp_path / "uk.zarr"
    assert _ingest(capsys, str(real_data / "era5-2mt-2019-03-uk.grib"), "--out", str(out))[0] == 0
    assert main(["stats", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2m_temperature" in text and "tendency_std" in text


# ---------------------------------------------------------------------------------------------
# Bad input: one test per case
# ---------------------------------------------------------------------------------------------
def _write(ds: xr.Dataset, path) -> str:
    ds.to_netcdf(path)
    return str(path)


def test_truncated_file_is_rejected(tmp_path, capsys):
    good = _write(make_canonical_dataset(), tmp_path / "good.nc")
    data = open(good, "rb").read()
    bad = tmp_path / "bad.nc"
    bad.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out.zarr"
    code, _, err = _ingest(capsys, str(bad), "--out", str(out))
    assert code != 0 and "bad.nc" in err
    assert not out.exists() and _leftovers(tmp_path) == ["bad.nc", "good.nc"]


def test_unreadable_file_is_rejected(tmp_path, capsys):
    bad = tmp_path / "notes.nc"
    bad.write_text("this is not netCDF")
    out = tmp_path / "out.zarr"
    code, _, err = _ingest(capsys, str(bad), "--out", str(out))
    assert code != 0 and "notes.nc" in err
    assert not out.exists()


def test_missing_variable_is_named(tmp_path, capsys):
    src = _write(make_canonical_dataset(), tmp_path / "a.nc")
    out = tmp_path / "out.zarr"
    code, _, err = _ingest(capsys, src, "--out", str(out), "--variables", "temperature")
    assert code != 0 and "temperature" in err
    assert not out.exists()


def test_nans_without_mask_are_rejected(tmp_path, capsys):
    ds = make_canonical_dataset()
    ds["2m_temperature"][1, 2, 3] = np.nan
    src = _write(ds, tmp_path / "a.nc")
    out = tmp_path / "out.zarr"
    code, _, err = _ingest(capsys, src, "--out", str(out))
    assert code != 0 and "NaN" in err and "2m_temperature" in err
    assert not out.exists()


def test_duplicated_times_are_rejected(tmp_path, capsys):
    ds = make_canonical_dataset()
    times = ds.time.values.copy()
    times[3] = times[2]
    src = _write(ds.assign_coords(time=times), tmp_path / "a.nc")
    out = tmp_path / "out.zarr"
    code, _, err = _ingest(capsys, src, "--out", str(out))
    assert code != 0 and "duplicated time" in err
    assert not out.exists()


def test_unsorted_times_are_rejected(tmp_path, capsys):
    ds = make_canonical_dataset()
    src = _write(ds.isel(time=[0, 2, 1, 3]), tmp_path / "a.nc")
    out = tmp_path / "out.zarr"
    code, _, err = _ingest(capsys, src, "--out", str(out))
    assert code != 0 and "not increasing" in err
    assert not out.exists()


def test_inconsistent_grids_across_files_are_rejected(tmp_path, capsys):
    a = _write(make_canonical_dataset(start="2000-01-01"), tmp_path / "a.nc")
    b = _write(make_canonical_dataset(start="2000-01-03", n_lat=7), tmp_path / "b.nc")
    out = tmp_path / "out.zarr"
    code, _, err = _ingest(capsys, a, b, "--out", str(out))
    assert code != 0 and "a.nc" in err and "b.nc" in err
    assert not out.exists()


def test_unknown_units_are_rejected(tmp_path, capsys):
    ds = make_canonical_dataset()
    ds["2m_temperature"].attrs["units"] = "furlongs"
    src = _write(ds, tmp_path / "a.nc")
    out = tmp_path / "out.zarr"
    code, _, err = _ingest(capsys, src, "--out", str(out))
    assert code != 0 and "furlongs" in err
    assert not out.exists()


def test_unknown_config_key_is_rejected(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("ingest:\n  - sources: [a.nc]\n    out: o.zarr\n    variabels: [x]\n")
    code, _, err = _ingest(capsys, "--config", str(cfg))
    assert code != 0 and "unknown key 'ingest.0.variabels'" in err
    assert not (tmp_path / "o.zarr").exists()


def test_existing_output_is_refused_unless_overwrite(tmp_path, capsys):
    src = _write(make_canonical_dataset(), tmp_path / "a.nc")
    out = tmp_path / "out.zarr"
    assert _ingest(capsys, src, "--out", str(out))[0] == 0
    before = sorted(p.name for p in out.rglob("*"))
    code, _, err = _ingest(capsys, src, "--out", str(out))
    assert code != 0 and "already exists" in err
    assert sorted(p.name for p in out.rglob("*")) == before
    assert _ingest(capsys, src, "--out", str(out), "--overwrite")[0] == 0


def test_append_extends_the_store(tmp_path, capsys):
    a = _write(make_canonical_dataset(start="2000-01-01"), tmp_path / "a.nc")
    b = _write(make_canonical_dataset(start="2000-01-03", seed=1), tmp_path / "b.nc")
    out = tmp_path / "out.zarr"
    assert _ingest(capsys, a, "--out", str(out))[0] == 0
    assert _ingest(capsys, b, "--out", str(out), "--append")[0] == 0
    assert xr.open_zarr(out).sizes["time"] == 16


def test_dask_address_runs_on_an_existing_cluster(tmp_path, capsys):
    from distributed import LocalCluster

    src = _write(make_canonical_dataset(), tmp_path / "a.nc")
    out = tmp_path / "out.zarr"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        code, _, err = _ingest(capsys, src, "--out", str(out), "--dask-address", cluster.scheduler_address)
    assert code == 0, err
    xr.testing.assert_allclose(xr.open_zarr(out).load()[["2m_temperature"]],
                               make_canonical_dataset()[["2m_temperature"]])


def test_catalog_source_over_http(tmp_path, capsys, monkeypatch):
    from helpers_http import serve_directory

    www = tmp_path / "www"
    www.mkdir()
    make_canonical_dataset().to_zarr(www / "era.zarr", zarr_format=2, consolidated=True)
    with serve_directory(www) as server:
        catalog = tmp_path / "catalog.yaml"
        catalog.write_text(f"sources:\n  local-era:\n    kind: zarr\n    url: {server.url('era.zarr')}\n"
                           "    description: test\n    resolution: 30 deg\n    time_step: 6h\n")
        monkeypatch.setenv("FORECASTING_CATALOG", str(catalog))
        out = tmp_path / "out.zarr"
        code, _, err = _ingest(capsys, "local-era", "--out", str(out), "--variables", "geopotential",
                               "--levels", "500")
    assert code == 0, err
    ds = xr.open_zarr(out)
    assert list(ds.data_vars) == ["geopotential"] and ds.level.values.tolist() == [500.0]
    shutil.rmtree(out)
