"""Data sources: one contract for every registered kind, real HTTP reads, real files, combining, bad input."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import dask.array as da
import eccodes
import fsspec
import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml

from conftest import make_canonical_dataset
from forecasting.config import ConfigError
from forecasting.data.catalog import CATALOG_ENV, DATA_ROOT_ENV, Catalog, load_catalog
from forecasting.data.sources import (
    SOURCE_TYPES,
    CatalogSource,
    GribSource,
    NetCDFSource,
    Selection,
    ZarrSource,
    open_sources,
    resolve_source,
)
from forecasting.errors import SchemaError, SourceError
from forecasting.schema import GRID_DIM_ORDER, LAT, LEVEL, LON, TIME, VARIABLES, ConformOptions, check_values, validate
from helpers_http import ServedDirectory, http_directory  # noqa: F401 (a fixture)

SELECTION = Selection(
    variables=("geopotential", "2m_temperature"),
    levels=(500.0,),
    time=("2000-01-01T06", "2000-01-01T18"),
    area=(-50.0, 50.0, 20.0, 200.0),
)


def _expected(canonical: xr.Dataset, selection: Selection) -> xr.Dataset:
    """What ``selection`` must give, computed with plain xarray on the in-memory canonical dataset."""
    lat_min, lat_max, lon_min, lon_max = selection.area
    return canonical[list(selection.variables)].sel(
        {
            LEVEL: list(selection.levels),
            TIME: slice(*selection.time),
            LAT: slice(lat_min, lat_max),
            LON: slice(lon_min, lon_max),
        }
    )


@pytest.fixture
def canonical() -> xr.Dataset:
    """8 times x 2 levels x 6 latitudes (-75..75 by 30) x 12 longitudes (0..330 by 30)."""
    return make_canonical_dataset()


# ----------------------------------------------------------------------------------------------
# Writers: the canonical dataset as files look in the wild
# ----------------------------------------------------------------------------------------------
def _raw_form(canonical: xr.Dataset) -> xr.Dataset:
    """ERA5-download look: short names, lat/lon dims, latitudes north to south, -180..180 longitudes,
    levels as ``plev`` in Pa."""
    raw = canonical.rename({"geopotential": "z", "2m_temperature": "t2m", LAT: "lat", LON: "lon", LEVEL: "plev"})
    raw = raw.isel(lat=slice(None, None, -1))
    raw = raw.assign_coords(lon=((raw["lon"] + 180.0) % 360.0) - 180.0).sortby("lon")
    raw = raw.assign_coords(plev=("plev", raw["plev"].values * 100.0, {"units": "Pa"}))
    return raw


def _grib_message(sample: str, short_name: str, field: np.ndarray, lat: np.ndarray, lon: np.ndarray,
                  when: np.datetime64, level: float | None = None) -> bytes:
    """One GRIB 2 message on a regular lat/lon grid (``lat`` north to south), written with ecCodes."""
    handle = eccodes.codes_grib_new_from_samples(sample)
    try:
        stamp = pd.Timestamp(when)
        keys = {
            "centre": "ecmf",
            "dataDate": int(stamp.strftime("%Y%m%d")),
            "dataTime": int(stamp.strftime("%H%M")),
            "Ni": lon.size,
            "Nj": lat.size,
            "latitudeOfFirstGridPointInDegrees": float(lat[0]),
            "latitudeOfLastGridPointInDegrees": float(lat[-1]),
            "longitudeOfFirstGridPointInDegrees": float(lon[0]),
            "longitudeOfLastGridPointInDegrees": float(lon[-1]),
            "iDirectionIncrementInDegrees": float(lon[1] - lon[0]),
            "jDirectionIncrementInDegrees": float(lat[0] - lat[1]),
            "shortName": short_name,
        }
        for key, value in keys.items():
            eccodes.codes_set(handle, key, value)
        if level is not None:
            eccodes.codes_set(handle, "typeOfLevel", "isobaricInhPa")
            eccodes.codes_set(handle, "level", int(level))
        eccodes.codes_set(handle, "bitsPerValue", 24)
        eccodes.codes_set_values(handle, np.asarray(field, dtype=float).ravel())
        return eccodes.codes_get_message(handle)
    finally:
        eccodes.codes_release(handle)


def _write_grib(path: Path, canonical: xr.Dataset, *, surface_times: np.ndarray | None = None) -> Path:
    """geopotential on pressure levels and 2m_temperature at the surface in one GRIB file (two hypercubes)."""
    lat = canonical[LAT].values[::-1]
    lon = canonical[LON].values
    surface_times = canonical[TIME].values if surface_times is None else surface_times
    with open(path, "wb") as f:
        for when in canonical[TIME].values:
            for level in canonical[LEVEL].values:
                field = canonical["geopotential"].sel({TIME: when, LEVEL: level}).values[::-1]
                f.write(_grib_message("regular_ll_pl_grib2", "z", field, lat, lon, when, level))
            if when in surface_times:
                field = canonical["2m_temperature"].sel({TIME: when}).values[::-1]
                f.write(_grib_message("regular_ll_sfc_grib2", "2t", field, lat, lon, when))
    return path


def _write_catalog(path: Path, entries: dict[str, dict]) -> Path:
    path.write_text(yaml.safe_dump({"sources": entries}))
    return path


# ----------------------------------------------------------------------------------------------
# The contract: one test over every registered kind
# ----------------------------------------------------------------------------------------------
# builder(tmp_path, server, canonical) -> (spec, catalog or None, relative tolerance of the values)
Builder = Callable[[Path, ServedDirectory, xr.Dataset], tuple[str, Catalog | None, float]]


def _netcdf_file(tmp_path: Path, server: ServedDirectory, canonical: xr.Dataset) -> tuple[str, None, float]:
    path = tmp_path / "era5.nc"
    _raw_form(canonical).to_netcdf(path, engine="netcdf4")
    return str(path), None, 0.0


def _grib_file(tmp_path: Path, server: ServedDirectory, canonical: xr.Dataset) -> tuple[str, None, float]:
    return str(_write_grib(tmp_path / "era5.grib2", canonical)), None, 1e-6  # 24-bit packing


def _zarr_local_v3(tmp_path: Path, server: ServedDirectory, canonical: xr.Dataset) -> tuple[str, None, float]:
    path = tmp_path / "era5.zarr"
    _raw_form(canonical).chunk({"time": 1}).to_zarr(path, zarr_format=3, consolidated=False)
    return str(path), None, 0.0


def _zarr_http_v2(tmp_path: Path, server: ServedDirectory, canonical: xr.Dataset) -> tuple[str, None, float]:
    _raw_form(canonical).chunk({"time": 1}).to_zarr(server.root / "era5.zarr", zarr_format=2, consolidated=True)
    return server.url("era5.zarr"), None, 0.0


def _catalog_http_zarr(tmp_path: Path, server: ServedDirectory, canonical: xr.Dataset) -> tuple[str, Catalog, float]:
    """A store whose 2 m temperature is in degC without a units attribute: the entry declares it."""
    raw = _raw_form(canonical)
    raw["t2m"] = (raw["t2m"] - 273.15).astype("float32")
    raw["t2m"].attrs = {}
    raw.chunk({"time": 2}).to_zarr(server.root / "store", zarr_format=2, consolidated=True)  # no .zarr suffix
    entry = {
        "kind": "zarr",
        "url": server.url("store"),
        "description": "test store over HTTP",
        "resolution": "30 deg",
        "time_step": "6h",
        "conform": {"units": {"t2m": "degC"}},
    }
    catalog = load_catalog(_write_catalog(tmp_path / "catalog.yaml", {"test-era5": entry}), data_root=tmp_path)
    return "test-era5", catalog, 1e-6


CONTRACT_FIXTURES: dict[str, dict[str, Builder]] = {
    "netcdf": {"netcdf-file": _netcdf_file},
    "grib": {"grib-two-hypercubes": _grib_file},
    "zarr": {"zarr-local-v3": _zarr_local_v3, "zarr-http-v2-consolidated": _zarr_http_v2},
    "catalog": {"catalog-entry-http-zarr": _catalog_http_zarr},
}
CONTRACT_CASES = [
    (kind, variant) for kind in SOURCE_TYPES for variant in (CONTRACT_FIXTURES.get(kind) or ["<no fixture>"])
]


def _assert_lazy(ds: xr.Dataset) -> None:
    for name, var in ds.data_vars.items():
        assert isinstance(var.data, da.Array), f"{name} is not dask-backed: {type(var.data)}"


def _assert_canonical(ds: xr.Dataset, *, source: str) -> None:
    validate(ds, source=source)
    for name, var in ds.data_vars.items():
        assert var.attrs["units"] == VARIABLES[str(name)].units
        assert all(d in GRID_DIM_ORDER for d in var.dims), var.dims
    assert ds[LAT].attrs["units"] == "degrees_north" and ds[LON].attrs["units"] == "degrees_east"
    assert ds[TIME].dtype == np.dtype("datetime64[ns]")


@pytest.mark.parametrize(("kind", "variant"), CONTRACT_CASES, ids=[f"{k}:{v}" for k, v in CONTRACT_CASES])
def test_every_source_kind_returns_lazy_conformed_data_and_subsets_exactly(
    kind: str, variant: str, tmp_path: Path, http_directory: ServedDirectory, canonical: xr.Dataset
) -> None:
    builders = CONTRACT_FIXTURES.get(kind)
    if not builders:
        pytest.fail(f"source kind {kind!r} is registered but has no fixture in CONTRACT_FIXTURES")
    spec, catalog, rtol = builders[variant](tmp_path, http_directory, canonical)
    source = resolve_source(spec, catalog=catalog)
    assert source.kind == kind and isinstance(source, SOURCE_TYPES[kind])

    full = source.open()
    _assert_lazy(full)
    _assert_canonical(full, source=variant)
    assert set(full.data_vars) == {"geopotential", "2m_temperature"}
    xr.testing.assert_allclose(full.load(), canonical, rtol=rtol, atol=0)

    part = source.open(SELECTION)
    _assert_lazy(part)
    _assert_canonical(part, source=variant)
    expected = _expected(canonical, SELECTION)
    assert dict(part.sizes) == {TIME: 3, LEVEL: 1, LAT: 4, LON: 6}
    xr.testing.assert_allclose(part.load(), expected, rtol=rtol, atol=0)


# ----------------------------------------------------------------------------------------------
# Remote reading over real HTTP
# ----------------------------------------------------------------------------------------------
def _chunk_gets(server: ServedDirectory, prefix: str) -> list[str]:
    meta = (".zarray", ".zattrs", ".zgroup", ".zmetadata", "zarr.json")
    return [p for p in server.gets(prefix) if not p.endswith(meta)]


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_http_zarr_selection_reads_only_the_chunks_it_needs(
    zarr_format: int, http_directory: ServedDirectory, canonical: xr.Dataset
) -> None:
    raw = _raw_form(canonical).chunk({"time": 1, "lat": 3})  # t2m: 8 x 2 chunks; z: 8 x 2 chunks (levels together)
    raw.to_zarr(http_directory.root / "era5.zarr", zarr_format=zarr_format, consolidated=zarr_format == 2)
    source = ZarrSource(http_directory.url("era5.zarr"))
    http_directory.clear()
    one = Selection(variables=("2m_temperature",), time=("2000-01-01T12", "2000-01-01T12"), area=(0, 80, 0, 359))
    ds = source.open(one)
    assert _chunk_gets(http_directory, "/era5.zarr/t2m/") == [] and _chunk_gets(http_directory, "/era5.zarr/z/") == []
    values = ds["2m_temperature"].values  # northern half (lat 15..75) is one chunk of the north-to-south store
    np.testing.assert_array_equal(values, canonical["2m_temperature"].isel(time=[2], latitude=slice(3, 6)).values)
    one_step = _chunk_gets(http_directory, "/era5.zarr/t2m/")
    assert len(one_step) == 1 and _chunk_gets(http_directory, "/era5.zarr/z/") == []

    http_directory.clear()
    source.open().load()
    everything = _chunk_gets(http_directory, "/era5.zarr/t2m/") + _chunk_gets(http_directory, "/era5.zarr/z/")
    assert len(everything) == 32  # 16 chunks of t2m and 16 of z
    assert len(everything) >= 30 * len(one_step)


def test_dask_graph_grows_with_the_selection_not_with_the_store(tmp_path: Path) -> None:
    long = make_canonical_dataset(n_times=400, n_lat=4, n_lon=4, levels=(500.0,))
    raw = _raw_form(long)[["t2m"]].chunk({"time": 1})
    raw.to_zarr(tmp_path / "hourly.zarr", zarr_format=2, consolidated=True, compute=False)  # metadata only
    raw.isel(time=[4, 5]).drop_vars(["lat", "lon"]).to_zarr(tmp_path / "hourly.zarr", region={"time": slice(4, 6)})
    source = ZarrSource(str(tmp_path / "hourly.zarr"))
    ds = source.open(Selection(variables=("2m_temperature",), time=("2000-01-02T00", "2000-01-02T06")))
    graph = ds["2m_temperature"].data.__dask_graph__()
    assert ds.sizes[TIME] == 2 and len(graph) < 40  # the store has 400 chunks
    np.testing.assert_array_equal(ds["2m_temperature"].values, long["2m_temperature"].isel(time=[4, 5]).values)


@pytest.mark.parametrize("fmt", ["NETCDF4", "NETCDF3_64BIT"])
def test_netcdf_over_http_reads_with_byte_ranges(
    fmt: str, http_directory: ServedDirectory, canonical: xr.Dataset
) -> None:
    _raw_form(canonical).to_netcdf(http_directory.root / "era5.nc", format=fmt)
    source = resolve_source(http_directory.url("era5.nc"))
    assert isinstance(source, NetCDFSource)
    ds = source.open(SELECTION)
    _assert_lazy(ds)
    xr.testing.assert_equal(ds.load(), _expected(canonical, SELECTION))


def test_memory_zarr_url_opens(canonical: xr.Dataset) -> None:
    url = f"memory://sources-test-{uuid.uuid4().hex}/era5.zarr"
    _raw_form(canonical).to_zarr(url, zarr_format=2, consolidated=True)
    try:
        ds = resolve_source(url).open(Selection(variables=("2m_temperature",)))
        xr.testing.assert_equal(ds.load(), canonical[["2m_temperature"]])
    finally:
        fsspec.filesystem("memory").rm(url.removeprefix("memory://").split("/")[0], recursive=True)


def test_url_whose_protocol_package_is_missing_names_the_package() -> None:
    try:
        import adlfs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("adlfs is installed, so az:// has its package")
    with pytest.raises(SourceError, match=r"adlfs.*pip install adlfs"):
        resolve_source("az://container/era5.zarr")


# ----------------------------------------------------------------------------------------------
# GRIB specifics
# ----------------------------------------------------------------------------------------------
def test_grib_leaves_no_index_files_beside_its_inputs(tmp_path: Path, canonical: xr.Dataset) -> None:
    path = _write_grib(tmp_path / "era5.grib", canonical)
    resolve_source(str(path)).open().load()
    GribSource(str(path)).open(Selection(variables=("2m_temperature",))).load()
    assert sorted(os.listdir(tmp_path)) == ["era5.grib"]


def test_grib_hypercubes_that_do_not_fit_together_ask_for_filter_by_keys(tmp_path: Path, canonical: xr.Dataset) -> None:
    path = _write_grib(tmp_path / "mixed.grib", canonical, surface_times=canonical[TIME].values[:2])
    hint = r"mixed\.grib holds 2 hypercubes .*filter_by_keys.*\{'typeOfLevel': 'isobaricInhPa'\} holds \['geopotential'\]"
    with pytest.raises(SourceError, match=hint):
        GribSource(str(path)).open()
    only_levels = GribSource(str(path), filter_by_keys={"typeOfLevel": "isobaricInhPa"}).open()
    xr.testing.assert_allclose(only_levels.load(), canonical[["geopotential"]], rtol=1e-6, atol=0)
    # asking for one variable opens only the cube that holds it
    surface = GribSource(str(path)).open(Selection(variables=("2m_temperature",)))
    assert surface.sizes[TIME] == 2


# ----------------------------------------------------------------------------------------------
# Several files: combine over time, merge variables, refuse what does not fit
# ----------------------------------------------------------------------------------------------
def test_netcdf_split_over_time_in_three_files_combines_in_time_order(tmp_path: Path, canonical: xr.Dataset) -> None:
    raw = _raw_form(canonical)
    # names sort in the opposite order of their times: combining must sort by time, not by name
    for name, times in (("c.nc", slice(0, 3)), ("b.nc", slice(3, 6)), ("a.nc", slice(6, 8))):
        raw.isel(time=times).to_netcdf(tmp_path / name)
    via_glob = resolve_source(str(tmp_path / "*.nc"))
    assert isinstance(via_glob, NetCDFSource) and len(via_glob.paths) == 3
    ds = via_glob.open()
    _assert_lazy(ds)
    xr.testing.assert_equal(ds.load(), canonical)
    listed = open_sources([str(tmp_path / n) for n in ("a.nc", "c.nc", "b.nc")], selection=SELECTION)
    xr.testing.assert_equal(listed.load(), _expected(canonical, SELECTION))


def test_different_variables_in_different_files_are_merged(tmp_path: Path, canonical: xr.Dataset) -> None:
    raw = _raw_form(canonical)
    raw[["z"]].to_netcdf(tmp_path / "z.nc")
    raw[["t2m"]].to_zarr(tmp_path / "t2m.zarr", zarr_format=2, consolidated=True)
    ds = open_sources([str(tmp_path / "z.nc"), str(tmp_path / "t2m.zarr")])
    xr.testing.assert_equal(ds.load(), canonical)
    only_z = open_sources(
        [str(tmp_path / "z.nc"), str(tmp_path / "t2m.zarr")], selection=Selection(variables=("geopotential",))
    )
    assert list(only_z.data_vars) == ["geopotential"]
    raw[["t2m"]].isel(time=slice(0, 4)).to_netcdf(tmp_path / "t2m_short.nc")
    specs = [str(tmp_path / "z.nc"), str(tmp_path / "t2m_short.nc")]
    with pytest.raises(SourceError, match=r"'geopotential' .*z\.nc.* and '2m_temperature' .*cover different times"):
        open_sources(specs)
    common = Selection(time=("2000-01-01T00", "2000-01-01T18"))
    xr.testing.assert_equal(open_sources(specs, selection=common).load(), canonical.isel(time=slice(0, 4)))


def test_files_on_different_grids_are_refused_naming_both(tmp_path: Path, canonical: xr.Dataset) -> None:
    raw = _raw_form(canonical)
    raw.isel(time=slice(0, 4)).to_netcdf(tmp_path / "first.nc")
    shifted = raw.isel(time=slice(4, 8)).assign_coords(lat=raw["lat"].values + 2.5)
    shifted.to_netcdf(tmp_path / "second.nc")
    differ = r"first\.nc and .*second\.nc.*latitude values differ.*first \[-75\.0.*first \[-72\.5"
    with pytest.raises(SourceError, match=differ):
        open_sources([str(tmp_path / "first.nc"), str(tmp_path / "second.nc")])
    (tmp_path / "coarse").mkdir()
    shutil.copyfile(tmp_path / "first.nc", tmp_path / "coarse" / "first.nc")
    coarse = make_canonical_dataset(n_lon=6).isel(time=slice(4, 8))
    _raw_form(coarse).to_netcdf(tmp_path / "coarse" / "second.nc")
    differ = r"longitude values differ.*12 points.*spacing 30\.0.*6 points.*spacing 60\.0"
    with pytest.raises(SourceError, match=differ):
        resolve_source(str(tmp_path / "coarse" / "*.nc")).open(Selection(variables=("2m_temperature",)))


def test_overlapping_times_are_refused_naming_both_files(tmp_path: Path, canonical: xr.Dataset) -> None:
    raw = _raw_form(canonical)
    raw.isel(time=slice(0, 5)).to_netcdf(tmp_path / "early.nc")
    raw.isel(time=slice(3, 8)).to_netcdf(tmp_path / "late.nc")
    overlap = r"overlap between .*early\.nc and .*late\.nc: 2000-01-01 18:00:00 \.\. 2000-01-02 00:00:00 \(2 times\)"
    with pytest.raises(SourceError, match=overlap):
        resolve_source(str(tmp_path / "*.nc")).open()
    with pytest.raises(SourceError, match="overlap"):
        open_sources([str(tmp_path / "early.nc"), str(tmp_path / "early.nc")])


def test_one_set_of_conform_options_serves_several_files(tmp_path: Path, canonical: xr.Dataset) -> None:
    raw = _raw_form(canonical).rename({"z": "zz", "t2m": "tt"})
    raw["tt"].attrs = {}
    raw[["zz"]].to_netcdf(tmp_path / "zz.nc")
    raw[["tt"]].to_netcdf(tmp_path / "tt.nc")
    options = ConformOptions(rename={"zz": "geopotential", "tt": "2m_temperature"}, units={"tt": "K"})
    specs = [str(tmp_path / "zz.nc"), str(tmp_path / "tt.nc")]
    xr.testing.assert_equal(open_sources(specs, options=options).load(), canonical)
    typo = ConformOptions(rename={**options.rename, "qq": "temperature"}, units={"tt": "K"})
    with pytest.raises(SourceError, match=r"rename 'qq'"):
        open_sources(specs, options=typo)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["NETCDF4", "NETCDF3_64BIT"])
def test_truncated_netcdf_is_refused_naming_the_file(fmt: str, tmp_path: Path, canonical: xr.Dataset) -> None:
    full = tmp_path / "full.nc"
    _raw_form(canonical).to_netcdf(full, format=fmt)
    data = full.read_bytes()
    cut = tmp_path / "cut.nc"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(SourceError, match=rf"{cut}.*truncated"):
        resolve_source(str(cut)).open()


def test_truncated_or_foreign_grib_is_refused_naming_the_file(tmp_path: Path, canonical: xr.Dataset) -> None:
    data = _write_grib(tmp_path / "full.grib", canonical).read_bytes()
    cut = tmp_path / "cut.grib"
    cut.write_bytes(data[: len(data) * 11 // 20])  # ends inside a message
    with pytest.raises(SourceError, match=rf"cannot open GRIB file {cut}: PrematureEndOfFileError"):
        resolve_source(str(cut)).open()
    text = tmp_path / "text.grib"
    text.write_text("plain text, no messages\n")
    with pytest.raises(SourceError, match=rf"cannot open GRIB file {text}: .*No valid message"):
        resolve_source(str(text)).open()


def test_text_file_named_nc_is_refused_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "notes.nc"
    bad.write_text("this is not a netCDF file\n")
    with pytest.raises(SourceError, match=rf"{bad} is not a netCDF file: it starts with b'this is "):
        resolve_source(str(bad)).open()


def test_missing_file_and_empty_glob_are_named(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=rf"no such file or directory: {tmp_path}/absent\.nc"):
        resolve_source(str(tmp_path / "absent.nc"))
    with pytest.raises(SourceError, match=r"no files match the glob .*\*\.grib"):
        resolve_source(str(tmp_path / "*.grib"))
    with pytest.raises(SourceError, match="no such file"):
        open_sources([str(tmp_path / "absent.zarr")])


def test_directory_that_is_not_a_zarr_store_is_refused(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    with pytest.raises(SourceError, match="is not a Zarr store"):
        resolve_source(str(tmp_path / "plain"))
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(SourceError, match=r"empty\.zarr is not a Zarr store"):
        resolve_source(str(tmp_path / "empty.zarr")).open()


def test_unknown_catalog_name_lists_the_known_names(tmp_path: Path) -> None:
    catalog = load_catalog()
    with pytest.raises(SourceError, match=r"'era6' .*known catalog names: .*era5-wb2-64x32"):
        resolve_source("era6", catalog=catalog)
    with pytest.raises(SourceError, match=r"no catalog entry named 'era6'.*era5-arco-0p25-1h"):
        CatalogSource("era6", catalog=catalog)


def test_unknown_key_in_catalog_yaml_is_a_config_error(tmp_path: Path) -> None:
    entry = {"kind": "zarr", "url": "a.zarr", "description": "d", "resolution": "1 deg", "time_step": "6h", "urll": "x"}
    with pytest.raises(ConfigError, match=rf"{tmp_path}/bad\.yaml.*unknown key 'sources\.mine\.urll'"):
        load_catalog(_write_catalog(tmp_path / "bad.yaml", {"mine": entry}))
    entry = {"kind": "zarr", "url": "a.zarr", "description": "d", "resolution": "1 deg", "time_step": "six hours"}
    with pytest.raises(ConfigError, match=r"time_step"):
        load_catalog(_write_catalog(tmp_path / "bad_step.yaml", {"mine": entry}))
    entry = {"kind": "netcdf", "url": "a.nc", "description": "d", "resolution": "1 deg", "time_step": "6h",
             "filter_by_keys": {"typeOfLevel": "surface"}}
    with pytest.raises(ConfigError, match=r"filter_by_keys applies to kind 'grib' only"):
        load_catalog(_write_catalog(tmp_path / "bad_filter.yaml", {"mine": entry}))


# ----------------------------------------------------------------------------------------------
# The project catalog and local entries
# ----------------------------------------------------------------------------------------------
def test_project_catalog_names_the_public_era5_archives() -> None:
    catalog = load_catalog()
    wb2 = "gs://weatherbench2/datasets/era5/1959-2023_01_10-"
    expected = {
        "era5-wb2-64x32": wb2 + "6h-64x32_equiangular_conservative.zarr",
        "era5-wb2-240x121": wb2 + "6h-240x121_equiangular_with_poles_conservative.zarr",
        "era5-wb2-1440x721": wb2 + "wb13-6h-1440x721_with_derived_variables.zarr",
        "era5-arco-0p25-1h": "gs://gcp-public-data-arco-era5/ar/full_37-1h-0p25deg-chunk-1.zarr-v3",
    }
    for name, url in expected.items():
        entry = catalog.entry(name)
        assert (entry.kind, entry.url, entry.storage_options) == ("zarr", url, {"token": "anon"})
        assert all(v in VARIABLES for v in entry.variables)
    assert catalog.entry("era5-arco-0p25-1h").time_step == "1h" and len(catalog.entry("era5-arco-0p25-1h").levels) == 13
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(SourceError, match=r"pip install gcsfs"):
            resolve_source("era5-wb2-64x32")
    else:
        source = resolve_source("era5-wb2-64x32")  # builds the reader; nothing is fetched
        assert isinstance(source, CatalogSource) and isinstance(source.source, ZarrSource)
        assert source.source.paths == (expected["era5-wb2-64x32"],)


def test_catalog_paths_are_relative_to_the_data_root_and_the_catalog_file_is_overridable(
    tmp_path: Path, canonical: xr.Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    (root / "monthly").mkdir(parents=True)
    raw = _raw_form(canonical)
    raw.isel(time=slice(0, 4)).to_netcdf(root / "monthly" / "m1.nc")
    raw.isel(time=slice(4, 8)).to_netcdf(root / "monthly" / "m2.nc")
    entry = {"kind": "netcdf", "url": "monthly/*.nc", "description": "two files", "resolution": "30 deg",
             "time_step": "6h", "variables": ["2m_temperature"]}
    path = _write_catalog(tmp_path / "mine.yaml", {"local-monthly": entry})
    monkeypatch.setenv(CATALOG_ENV, str(path))
    monkeypatch.setenv(DATA_ROOT_ENV, str(root))
    ds = open_sources(["local-monthly"])  # default catalog: the file the environment names
    assert list(ds.data_vars) == ["2m_temperature"]  # the entry's default variables
    xr.testing.assert_equal(ds.load(), canonical[["2m_temperature"]])
    both = resolve_source("local-monthly").open(Selection(variables=("geopotential", "2m_temperature")))
    assert set(both.data_vars) == {"geopotential", "2m_temperature"}


# ----------------------------------------------------------------------------------------------
# Real files (../shared/data/real)
# ----------------------------------------------------------------------------------------------
def _storm(name: str, variable: str, raw: str, units: str, level: float | None = None) -> tuple:
    options = ConformOptions(
        rename={raw: variable}, units={raw: units}, levels={raw: level} if level else {}, nan_policy="fixed"
    )
    return (name, options, {variable})


REAL_FILES = [
    ("era5land-quebec-1970-daily.nc", ConformOptions(units={"tasmax": "degC", "tasmin": "degC"}),
     {"maximum_2m_temperature", "minimum_2m_temperature", "total_precipitation_24hr"}),
    _storm("Pstorm.cdf", "mean_sea_level_pressure", "p", "Pa"),
    _storm("Tstorm.cdf", "2m_temperature", "t", "K"),
    _storm("Ustorm.cdf", "10m_u_component_of_wind", "u", "m s-1"),
    _storm("Vstorm.cdf", "10m_v_component_of_wind", "v", "m s-1"),
    _storm("U500storm.cdf", "u_component_of_wind", "u", "m s-1", 500.0),
    _storm("V500storm.cdf", "v_component_of_wind", "v", "m s-1", 500.0),
    ("era5-2mt-2019-03-uk.grib", None, {"2m_temperature"}),
    ("era5-levels-members.grib", None, {"geopotential", "temperature"}),
]


@pytest.mark.parametrize(("name", "options", "variables"), REAL_FILES, ids=[r[0] for r in REAL_FILES])
def test_real_files_open_conformed_and_lazy(real_data: Path, name: str, options, variables: set[str]) -> None:
    before = sorted(os.listdir(real_data))
    source = resolve_source(str(real_data / name), options=options)
    ds = source.open()
    _assert_lazy(ds)
    _assert_canonical(ds, source=name)
    assert set(ds.data_vars) == variables
    checked, report = check_values(ds, source=name, nan_policy=source.options.nan_policy)
    assert checked.sizes[TIME] >= ds.sizes[TIME] - 2
    assert sorted(os.listdir(real_data)) == before  # no .idx or other files left beside the inputs


def test_real_quebec_temperatures_are_converted_from_degc(real_data: Path) -> None:
    path = real_data / "era5land-quebec-1970-daily.nc"
    options = ConformOptions(units={"tasmax": "degC", "tasmin": "degC"})
    ds = resolve_source(str(path), options=options).open(
        Selection(
            variables=("maximum_2m_temperature",), time=("1970-07-01", "1970-07-01"), area=(44.95, 45.05, 285.95, 286.05)
        )
    )
    with xr.open_dataset(path) as raw:
        point = raw["tasmax"].sel(time="1970-07-01", latitude=45.0, longitude=-74.0, method="nearest")
        expected = float(point) + 273.15
    assert ds["maximum_2m_temperature"].shape == (1, 1, 1)
    np.testing.assert_allclose(float(ds["maximum_2m_temperature"].values.squeeze()), expected, rtol=1e-6)


def test_real_storm_files_combine_through_catalog_entries(real_data: Path, tmp_path: Path) -> None:
    entries = {}
    for name, options, variables in REAL_FILES[1:7]:
        entries[name.removesuffix(".cdf").lower()] = {
            "kind": "netcdf",
            "url": name,
            "description": f"storm case {name}",
            "resolution": "2.5 x 1.25 deg",
            "time_step": "6h",
            "conform": {"rename": dict(options.rename), "units": dict(options.units),
                        "levels": dict(options.levels), "nan_policy": "fixed"},
        }
    catalog = load_catalog(_write_catalog(tmp_path / "storm.yaml", entries), data_root=real_data)
    ds = open_sources(list(entries), catalog=catalog, selection=Selection(time=("1996-01-06", "1996-01-10")))
    assert set(ds.data_vars) == set().union(*(r[2] for r in REAL_FILES[1:7]))
    assert ds[LEVEL].values.tolist() == [500.0] and ds.sizes[TIME] == 20
    checked, report = check_values(ds, source="storm", nan_policy="fixed")
    assert report.dropped_times == (pd.Timestamp("1996-01-09 06:00"),)
    assert set(report.masked_points.values()) == {224}
    with pytest.raises(SchemaError, match="requested variables .*relative_humidity"):
        wanted = Selection(variables=("relative_humidity", "2m_temperature"))
        open_sources(list(entries), catalog=catalog, selection=wanted)


def test_copies_of_real_grib_in_a_writable_folder_leave_no_idx(real_data: Path, tmp_path: Path) -> None:
    copy = tmp_path / "members.grib"
    shutil.copyfile(real_data / "era5-levels-members.grib", copy)
    selection = Selection(variables=("temperature",), levels=(850.0,), time=("2017-01-02", None))
    ds = resolve_source(str(copy)).open(selection)
    assert dict(ds.sizes) == {TIME: 2, "realization": 10, LEVEL: 1, LAT: 61, LON: 120}
    ds.load()
    assert sorted(os.listdir(tmp_path)) == ["members.grib"]
