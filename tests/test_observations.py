"""Station observations: reading with aliases and unit conversion, QC, Dataset <-> table, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from forecasting.data.observations import (
    METADATA_COLUMNS,
    dataset_to_observations,
    observations_to_dataset,
    quality_control,
    read_observations,
    write_observations,
    write_qc_report,
)
from forecasting.errors import SchemaError, SourceError, StoreError
from forecasting.schema import ConformOptions

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
QUEBEC = REAL_DATA / "stations-quebec-1970-daily-precip.nc"


def canonical_table(*, n_stations: int = 3, n_times: int = 4, seed: int = 0) -> pd.DataFrame:
    """A complete canonical table: every station at every 6-hourly time, sorted by (station_id, time)."""
    rng = np.random.default_rng(seed)
    ids = [f"S{i:02d}" for i in range(n_stations)]
    times = pd.date_range("2020-01-01", periods=n_times, freq="6h").to_numpy().astype("datetime64[ns]")
    rows = len(ids) * n_times
    return pd.DataFrame(
        {
            "station_id": pd.Series(np.repeat(ids, n_times), dtype=str),
            "latitude": np.repeat(np.linspace(40.0, 50.0, n_stations), n_times),
            "longitude": np.repeat(np.linspace(350.0, 359.5, n_stations), n_times),
            "elevation": np.repeat(np.arange(n_stations) * 100.0, n_times),
            "time": np.tile(times, n_stations),
            "2m_temperature": 280.0 + rng.standard_normal(rows),
            "mean_sea_level_pressure": 101000.0 + 100 * rng.standard_normal(rows),
        }
    )


# ----------------------------------------------------------------------------------------------
# Reading tables
# ----------------------------------------------------------------------------------------------
def test_csv_with_aliases_and_declared_units_becomes_canonical(tmp_path):
    path = tmp_path / "obs.csv"
    path.write_text(
        "id,lat,lon,alt,date,t2m,msl,station_name\n"
        "00123,45.5,-73.6,30,2020-01-01T00:00,-5.0,1013.0,Montreal\n"
        "00123,45.5,-73.6,30,2020-01-01T06:00,-4.5,1012.0,Montreal\n"
        "B7,50.0,10.0,,2020-01-01T00:00,10.0,,Bonn\n"
    )
    df = read_observations(path, options=ConformOptions(units={"t2m": "degC", "msl": "hPa"}))
    assert list(df.columns) == [*METADATA_COLUMNS, "2m_temperature", "mean_sea_level_pressure"]
    assert df["station_id"].tolist() == ["00123", "00123", "B7"]  # leading zeros kept, sorted
    np.testing.assert_allclose(df["longitude"], [286.4, 286.4, 10.0])
    np.testing.assert_allclose(df["2m_temperature"], [268.15, 268.65, 283.15])
    np.testing.assert_allclose(df["mean_sea_level_pressure"], [101300.0, 101200.0, np.nan])
    assert np.isnan(df["elevation"].iloc[2]) and df["elevation"].iloc[0] == 30.0
    assert df["time"].dtype == np.dtype("datetime64[ns]")
    assert df["time"].iloc[1] == pd.Timestamp("2020-01-01T06:00")


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_written_table_reads_back_identical(tmp_path, suffix):
    df = canonical_table()
    path = write_observations(df, tmp_path / f"obs{suffix}")
    back = read_observations(path)
    pd.testing.assert_frame_equal(back, df, check_exact=suffix == ".parquet", rtol=1e-12)


def test_parquet_with_aliases_timezones_and_numeric_ids(tmp_path):
    raw = pd.DataFrame(
        {
            "StationID_SEQ": [6193.0, 6193.0, 9345.0],
            "lat_deg": [45.0, 45.0, 46.0],
            "lon_deg": [-180.0, -180.0, 179.5],
            "elev": [10.0, 10.0, 20.0],
            "valid_time": pd.to_datetime(["2020-01-01 01:00", "2020-01-01 02:00", "2020-01-01 01:00"]).tz_localize(
                "Etc/GMT-1"
            ),  # UTC+1
            "2m_temperature": [270.0, 271.0, 272.0],  # canonical name: taken in K
            "tp": [1.0, 2.0, 0.0],
        }
    )
    path = tmp_path / "obs.parquet"
    raw.to_parquet(path)
    df = read_observations(path, options=ConformOptions(units={"tp": "mm"}), variables=["tp", "2m_temperature"])
    assert list(df.columns) == [*METADATA_COLUMNS, "total_precipitation", "2m_temperature"]
    assert df["station_id"].tolist() == ["6193", "6193", "9345"]
    np.testing.assert_allclose(df["longitude"], [180.0, 180.0, 179.5])
    assert df["time"].tolist() == pd.to_datetime(["2020-01-01 00:00", "2020-01-01 01:00", "2020-01-01 00:00"]).tolist()
    np.testing.assert_allclose(df["total_precipitation"], [1e-3, 2e-3, 0.0])
    np.testing.assert_allclose(df["2m_temperature"], [270.0, 271.0, 272.0])


@pytest.mark.parametrize(
    ("freq", "units", "name", "factor"),
    [("1D", "mm d-1", "total_precipitation_24hr", 1e-3), ("6h", "mm h-1", "total_precipitation_6hr", 6e-3)],
)
def test_precipitation_rate_becomes_accumulation_over_the_step(tmp_path, freq, units, name, factor):
    times = pd.date_range("2021-03-01", periods=3, freq=freq)
    raw = pd.DataFrame(
        {"station": ["a"] * 3 + ["b"] * 3, "latitude": [1.0] * 3 + [2.0] * 3, "longitude": [3.0] * 3 + [4.0] * 3,
         "time": list(times) * 2, "precip": [0.0, 2.0, 4.0, 1.0, 3.0, 5.0]}
    )
    path = tmp_path / "rate.csv"
    raw.to_csv(path, index=False)
    df = read_observations(path, options=ConformOptions(units={"precip": units}))
    assert list(df.columns)[-1] == name
    np.testing.assert_allclose(df[name], np.array([0.0, 2.0, 4.0, 1.0, 3.0, 5.0]) * factor, rtol=1e-12)


def test_precipitation_rate_on_irregular_times_is_refused(tmp_path):
    raw = pd.DataFrame(
        {"id": ["a"] * 3, "lat": [1.0] * 3, "lon": [3.0] * 3,
         "time": ["2021-03-01T00:00", "2021-03-01T06:00", "2021-03-01T15:00"], "precip": [1.0, 2.0, 3.0]}
    )
    path = tmp_path / "irregular.csv"
    raw.to_csv(path, index=False)
    with pytest.raises(SchemaError, match=r"irregular observation times for rate 'precip'.*station a"):
        read_observations(path, options=ConformOptions(units={"precip": "mm h-1"}))


def station_netcdf(path: Path, *, precip_units: str | None = "mm d-1") -> Path:
    """A file laid out like the Quebec station file: dim ``station`` without coordinate, metadata as variables."""
    times = pd.date_range("1999-12-30", periods=4, freq="D")
    precip = np.array([[0.0, 1.5, np.nan, 4.0], [np.nan, np.nan, 2.0, 0.5]], dtype="float32")  # (station, date)
    attrs = {"long_name": "total_precipitation"} | ({"units": precip_units} if precip_units else {})
    ds = xr.Dataset(
        {
            "rain": (("station", "date"), precip, attrs),  # unknown name: mapped by its long_name
            "qflag": (("station", "date"), np.zeros((2, 4), dtype="int8")),  # not a variable: left out
            "lat": ("station", [46.8, 45.5]),
            "lon": ("station", [-71.2, -73.6]),
            "altitude": ("station", [70.0, 36.0]),
            "StationID_SEQ": ("station", [7016294.0, 702.0]),
        },
        coords={"date": times},
    )
    ds.to_netcdf(path)
    return path


def test_station_netcdf_layout_is_mapped_onto_the_canonical_table(tmp_path):
    df = read_observations(station_netcdf(tmp_path / "stations.nc"))
    assert list(df.columns) == [*METADATA_COLUMNS, "total_precipitation_24hr"]
    assert df["station_id"].tolist() == ["7016294"] * 4 + ["702"] * 4
    assert df["elevation"].tolist() == [70.0] * 4 + [36.0] * 4
    np.testing.assert_allclose(df["longitude"].iloc[[0, 4]], [288.8, 286.4])
    expected = np.array([0.0, 1.5, np.nan, 4.0, np.nan, np.nan, 2.0, 0.5], dtype="float32") / 1000
    np.testing.assert_allclose(df["total_precipitation_24hr"], expected, rtol=1e-6)
    assert df["time"].iloc[2] == pd.Timestamp("2000-01-01")


def test_station_netcdf_variable_without_units_is_refused(tmp_path):
    path = station_netcdf(tmp_path / "nounits.nc", precip_units=None)
    with pytest.raises(SchemaError, match=r"nounits.nc: column 'rain' \(total_precipitation\) has no units attribute"):
        read_observations(path)
    df = read_observations(path, options=ConformOptions(units={"rain": "mm"}))
    assert "total_precipitation" in df.columns


# ----------------------------------------------------------------------------------------------
# Real station netCDF
# ----------------------------------------------------------------------------------------------
def test_quebec_station_netcdf_is_read_and_converted_to_metres():
    if not QUEBEC.is_file():
        pytest.skip(f"real station file not found at {QUEBEC} (../shared/data/real beside the project)")
    df = read_observations(QUEBEC)
    assert list(df.columns) == [*METADATA_COLUMNS, "total_precipitation_24hr"]
    assert df["station_id"].nunique() == 38
    assert len(df) == 38 * 365
    missing = df["total_precipitation_24hr"].isna().mean()
    assert 0.45 < missing < 0.53, missing
    assert df["longitude"].between(0, 360, inclusive="left").all()
    with xr.open_dataset(QUEBEC) as raw:
        raw = raw.load()
    # station 6193 (StationID_SEQ 6193.0) on the wettest day of that station
    i = int(np.flatnonzero(raw["StationID_SEQ"].values == 6193)[0])
    mm = raw["precip"].isel(station=i)
    t = mm.idxmax("time").values
    row = df[(df["station_id"] == "6193") & (df["time"] == t)]
    assert len(row) == 1
    np.testing.assert_allclose(row["total_precipitation_24hr"].iloc[0], float(mm.max()) / 1000.0, rtol=1e-6)
    assert row["elevation"].iloc[0] == float(raw["altitude"].values[i])
    np.testing.assert_allclose(row["longitude"].iloc[0], float(raw["longitude"].values[i]) % 360.0)

    clean, report = quality_control(df, source=str(QUEBEC))
    precip = report.variable("total_precipitation_24hr")
    assert precip.n_missing == int(df["total_precipitation_24hr"].isna().sum())
    assert precip.n_values + precip.n_missing == 38 * 365
    assert report.n_empty_rows_dropped == precip.n_missing
    assert precip.n_stations + len(precip.stations_without_data) == 38
    assert clean["total_precipitation_24hr"].notna().all()


# ----------------------------------------------------------------------------------------------
# Quality control
# ----------------------------------------------------------------------------------------------
def qc_table() -> pd.DataFrame:
    t0, t1, t2 = (pd.Timestamp("2020-01-01") + pd.Timedelta(hours=6 * k) for k in range(3))
    return pd.DataFrame(
        {
            "station_id": ["A", "A", "A", "A", "B", "B", "B", "B"],
            "latitude": [10.0] * 4 + [20.0] * 4,
            "longitude": [5.0] * 4 + [6.0] * 4,
            "elevation": [1.0] * 4 + [np.nan] * 4,
            "time": np.array([t0, t1, t1, t2, t0, t0, t1, t2], dtype="datetime64[ns]"),
            # A: t0 ok, t1 twice identical, t2 out of range | B: t0 twice conflicting, t1 empty, t2 ok
            "2m_temperature": [280.0, 281.0, 281.0, 400.0, 270.0, 275.0, np.nan, 271.0],
            "mean_sea_level_pressure": [1.0e5, 1.01e5, 1.01e5, 1.02e5, 1.0e5, 1.0e5, np.nan, np.nan],
        }
    )


def test_quality_control_flags_ranges_and_resolves_duplicates():
    df = qc_table()
    before = df.copy(deep=True)
    clean, report = quality_control(df, source="qc.csv")
    pd.testing.assert_frame_equal(df, before)  # input untouched

    # A@t1 identical copies collapse; B@t0 disagrees on temperature only; B@t1 is empty and dropped
    assert report.n_rows_in == 8
    assert report.n_duplicate_rows_removed == 2
    assert report.n_identical_duplicate_rows == 1
    assert report.n_empty_rows_dropped == 1
    assert report.n_rows_out == len(clean) == 5
    assert clean[["station_id", "time"]].duplicated().sum() == 0

    temp = report.variable("2m_temperature")
    assert (temp.n_values, temp.n_missing, temp.n_out_of_range, temp.n_conflicting) == (7, 1, 1, 1)
    assert temp.valid_range == (170.0, 340.0)
    assert temp.n_valid == 3  # A@t0, A@t1, B@t2
    a_t2 = clean[(clean["station_id"] == "A") & (clean["time"] == pd.Timestamp("2020-01-01 12:00"))]
    assert np.isnan(a_t2["2m_temperature"].iloc[0]) and a_t2["mean_sea_level_pressure"].iloc[0] == 1.02e5
    b_t0 = clean[(clean["station_id"] == "B") & (clean["time"] == pd.Timestamp("2020-01-01"))]
    assert np.isnan(b_t0["2m_temperature"].iloc[0])
    assert b_t0["mean_sea_level_pressure"].iloc[0] == 1.0e5  # the duplicates agree on pressure
    assert report.variable("mean_sea_level_pressure").n_conflicting == 0

    reasons = {(f.station_id, f.variable, f.reason, f.values) for f in report.flagged}
    assert reasons == {("A", "2m_temperature", "out_of_range", (400.0,)),
                       ("B", "2m_temperature", "conflicting_duplicate", (270.0, 275.0))}
    assert report.n_flagged == 2
    assert clean["station_id"].tolist() == ["A", "A", "A", "B", "B"]
    assert clean["time"].dt.hour.tolist() == [0, 6, 12, 0, 12]


def test_quality_control_counts_stations_without_data_and_custom_ranges():
    df = qc_table()
    df["2m_temperature"] = np.where(df["station_id"] == "B", 100.0, df["2m_temperature"])
    clean, report = quality_control(df, source="qc.csv", ranges={"2m_temperature": (250.0, 450.0)})
    temp = report.variable("2m_temperature")
    assert temp.valid_range == (250.0, 450.0)
    assert temp.n_out_of_range == 4  # all of B; 400 K at A is now valid
    assert temp.stations_without_data == ("B",)
    assert temp.n_stations == 1
    assert (temp.first_time, temp.last_time) == (pd.Timestamp("2020-01-01"), pd.Timestamp("2020-01-01 12:00"))


def test_quality_control_rejects_inconsistent_station_coordinates():
    df = qc_table()
    df.loc[2, "latitude"] = 10.5
    with pytest.raises(SchemaError, match=r"qc.csv: station 'A' has inconsistent latitude.*10.0, 10.5"):
        quality_control(df, source="qc.csv")


def test_quality_control_rejects_unknown_range_and_columns():
    with pytest.raises(SchemaError, match=r"ranges given for \['2m_temprature'\]"):
        quality_control(qc_table(), source="qc.csv", ranges={"2m_temprature": (0.0, 1.0)})
    with pytest.raises(SchemaError, match=r"\['t2m'\] are not canonical variable names"):
        quality_control(qc_table().rename(columns={"2m_temperature": "t2m"}), source="qc.csv")


def test_qc_report_writes_markdown_and_json(tmp_path):
    _, report = quality_control(qc_table(), source="qc.csv")
    path = write_qc_report(report, tmp_path / "obs.qc.md")
    text = path.read_text()
    assert "# Quality control: qc.csv" in text and "| 2m_temperature | K | [170, 340] | 7 | 1 | 1 | 1 | 3 |" in text
    assert "conflicting_duplicate" in text
    loaded = json.loads((tmp_path / "obs.qc.json").read_text())
    assert loaded == json.loads(json.dumps(report.to_dict()))
    assert loaded["variables"][0]["n_out_of_range"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["obs.qc.json", "obs.qc.md"]


# ----------------------------------------------------------------------------------------------
# Dataset <-> table
# ----------------------------------------------------------------------------------------------
def test_table_dataset_round_trip_is_exact():
    df = canonical_table()
    ds = observations_to_dataset(df)
    assert dict(ds.sizes) == {"time": 4, "station": 3}
    assert ds["2m_temperature"].dims == ("time", "station")
    assert ds["2m_temperature"].attrs["units"] == "K"
    assert ds["station_id"].values.tolist() == ["S00", "S01", "S02"]
    pd.testing.assert_frame_equal(dataset_to_observations(ds), df, check_exact=True)
    xr.testing.assert_identical(observations_to_dataset(dataset_to_observations(ds)), ds)


def test_sparse_table_gives_nan_cells_and_survives_a_file_round_trip(tmp_path):
    df = canonical_table().drop(index=[1, 6]).reset_index(drop=True)
    ds = observations_to_dataset(df)
    assert int(ds["2m_temperature"].isnull().sum()) == 2
    dense = dataset_to_observations(ds)
    assert len(dense) == 12
    pd.testing.assert_frame_equal(
        dense.dropna(subset=["2m_temperature"]).reset_index(drop=True), df, check_exact=True
    )
    ds.to_netcdf(tmp_path / "obs.nc")
    pd.testing.assert_frame_equal(read_observations(tmp_path / "obs.nc"), dense, check_exact=True)
    ds.to_zarr(tmp_path / "obs.zarr", consolidated=False)
    # a Zarr store lists its variables alphabetically, so only the column order may differ
    pd.testing.assert_frame_equal(read_observations(tmp_path / "obs.zarr"), dense, check_exact=True, check_like=True)


def test_observations_to_dataset_refuses_duplicates():
    df = canonical_table()
    with pytest.raises(SchemaError, match=r"duplicated row for station 'S00' at 2020-01-01.*quality_control"):
        observations_to_dataset(pd.concat([df, df.iloc[[0]]], ignore_index=True))


def test_dataset_to_observations_refuses_wrong_units_and_repeated_ids():
    ds = observations_to_dataset(canonical_table())
    wrong_units = ds.assign({"2m_temperature": ds["2m_temperature"].assign_attrs(units="degC")})
    with pytest.raises(SchemaError, match=r"'2m_temperature' has units 'degC'; canonical units are 'K'"):
        dataset_to_observations(wrong_units)
    repeated = ds.assign_coords(station_id=("station", np.array(["S00", "S01", "S00"], dtype=object)))
    with pytest.raises(SchemaError, match=r"station_id 'S00' names more than one station"):
        dataset_to_observations(repeated)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------
def test_missing_latitude_column_names_the_file_and_columns(tmp_path):
    path = tmp_path / "nolat.csv"
    path.write_text("id,lon,time,2m_temperature\nA,1.0,2020-01-01,280\n")
    with pytest.raises(SchemaError, match=r"nolat.csv: no latitude column found.*\['id', 'lon', 'time', '2m_temperature'\]"):
        read_observations(path)


def test_units_unknown_or_undeclared_are_refused(tmp_path):
    path = tmp_path / "units.csv"
    path.write_text("id,lat,lon,time,t2m\nA,1.0,2.0,2020-01-01,280\n")
    with pytest.raises(SchemaError, match=r"column 't2m' \(2m_temperature\) has no units.*--units t2m=K"):
        read_observations(path)
    with pytest.raises(SchemaError, match=r"'t2m' \(2m_temperature\) has units 'furlongs' \(declared\)"):
        read_observations(path, options=ConformOptions(units={"t2m": "furlongs"}))
    with pytest.raises(SchemaError, match=r"units declared for 'msl', which is not a variable of the file"):
        read_observations(path, options=ConformOptions(units={"t2m": "K", "msl": "hPa"}))


def test_requested_variable_missing_is_refused(tmp_path):
    path = tmp_path / "vars.csv"
    path.write_text("id,lat,lon,time,2m_temperature,temp_f\nA,1.0,2.0,2020-01-01,280,44\n")
    expected = r"requested variables \['10m_wind_speed'\].*not mapped to a variable: \['temp_f'\]"
    with pytest.raises(SchemaError, match=expected):
        read_observations(path, variables=["2m_temperature", "10m_wind_speed"])


@pytest.mark.parametrize(
    ("row", "message"),
    [("A,1.0,2.0,yesterday,280", r"time column holds values that are not times: 'yesterday'"),
     ("A,1.0,2.0,2020-01-01,warm", r"column '2m_temperature' holds 'warm' in row 0"),
     ("A,95.0,2.0,2020-01-01,280", r"latitude must be finite and within \[-90.0, 90.0\]; found 95.0"),
     (",1.0,2.0,2020-01-01,280", r"station id missing in row 0")],
)
def test_bad_values_are_refused_with_the_value(tmp_path, row, message):
    path = tmp_path / "bad.csv"
    path.write_text(f"station_id,latitude,longitude,time,2m_temperature\n{row}\n")
    with pytest.raises(SchemaError, match=message):
        read_observations(path)


@pytest.mark.parametrize("name", ["broken.parquet", "broken.nc", "broken.zarr", "missing.csv", "table.xlsx"])
def test_unreadable_files_raise_source_error(tmp_path, name):
    path = tmp_path / name
    if name != "missing.csv":
        path.write_bytes(b"\x00\x01 this is not a data file \xff" * 10)
    with pytest.raises(SourceError, match=name):
        read_observations(path)


# ----------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------
def test_write_is_atomic_and_refuses_existing_output(tmp_path):
    df = canonical_table()
    path = write_observations(df, tmp_path / "out" / "obs.parquet")
    assert sorted(p.name for p in path.parent.iterdir()) == ["obs.parquet"]  # no temporary file left
    with pytest.raises(StoreError, match=r"obs.parquet already exists"):
        write_observations(df.iloc[:2], path)
    pd.testing.assert_frame_equal(read_observations(path), df)  # untouched by the refused write
    write_observations(df.iloc[:4], path, overwrite=True)
    assert len(read_observations(path)) == 4
    assert sorted(p.name for p in path.parent.iterdir()) == ["obs.parquet"]


def test_failed_write_leaves_nothing_behind(tmp_path):
    bad = canonical_table().rename(columns={"2m_temperature": "t2m"})
    with pytest.raises(SchemaError, match=r"\['t2m'\] are not canonical"):
        write_observations(bad, tmp_path / "obs.csv")
    with pytest.raises(StoreError, match=r"suffix '.txt'"):
        write_observations(canonical_table(), tmp_path / "obs.txt")
    assert list(tmp_path.iterdir()) == []
