"""forecasting.downscaling and forecasting.data.pairs: derived pairs, pair windows, both training stages, streaming
downscaling of coarse forecasts (layout, members, provenance, seeds), bad inputs, the CLI, the Prefect flow and
real ERA5 pairs.

Stores are the tiny ones of tests/test_forecasters.py (a 22.5-degree global grid and a 5-degree regional grid of
the same analytic world); the model is a tiny U-Net pair trained for a few dozen steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
import yaml

from forecasting.cli import main
from forecasting.config import ConfigError, parse_config
from forecasting.data.pairs import coarsen_area_mean, make_derived_pairs
from forecasting.data.sources import Selection, open_sources
from forecasting.data.store import open_store, read_statistics
from forecasting.downscaling import DownscalingModel, PairDataset, downscale
from forecasting.errors import SchemaError, StoreError
from forecasting.forecasters import Channels, Normalisation
from forecasting.inference import open_forecast, write_forecast
from forecasting.regrid import interpolate
from forecasting.schema import LEAD, MEMBER, TIME
from forecasting.training.checkpoint import load_checkpoint
from forecasting.training.train import TRAINABLE, train
from tests.test_forecasters import TRAIN_END, VAL_START, make_stores, synthetic_analysis
from tests.test_workflows import prefect_harness  # noqa: F401  (the session's Prefect server; sets PREFECT_HOME)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REGRESSION_STEPS = 30
MAX_STEPS = 60


def downscaling_config(stores: tuple[Path, Path], *, model: dict | None = None, training: dict | None = None):
    """A tiny downscaling experiment: coarse = the global store, fine = the regional store."""
    return parse_config({
        "name": "tiny-downscale",
        "model": {"family": "downscaling", "stage": "both", "regression_steps": REGRESSION_STEPS, "base_channels": 8,
                  "channel_mult": [1, 2], "embedding_dim": 16, "sampling_steps": 4, "member_batch": 32,
                  "sigma_data": 0.5, **(model or {})},
        "data": {"global_store": str(stores[0]), "regional_store": str(stores[1])},
        "training": {"train_period": [None, TRAIN_END], "val_period": [VAL_START, None], "max_steps": MAX_STEPS,
                     "batch_size": 8, "learning_rate": 3e-3, "warmup_steps": 5, "log_every": 5, "val_every": 20,
                     "val_batches": 2, "checkpoint_every": 30, **(training or {})},
    })


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_stores(tmp_path_factory.mktemp("downscaling"))


@pytest.fixture(scope="module")
def trained(stores, tmp_path_factory) -> Path:
    """Both stages trained in one ``forecast train`` run (through the CLI); returns the run directory."""
    root = tmp_path_factory.mktemp("trained")
    path = root / "downscale.yaml"
    path.write_text(yaml.safe_dump(downscaling_config(stores).model_dump(mode="json")))
    assert main(["train", str(path), "--out", str(root / "run"), "--quiet"]) == 0
    return root / "run"


def coarse_forecast(stores, path: Path, *, leads_hours=(0, 6, 12), members: int = 2, grid=None) -> Path:
    """A coarse forecast (persistence of the global store from two starts, member m shifted by m K in 2 m
    temperature) written with write_forecast; ``grid`` = (lat, lon) puts the same world on another grid."""
    truth = open_store(stores[0]).load() if grid is None else synthetic_analysis(*grid)
    starts = pd.DatetimeIndex(["2000-01-12T00", "2000-01-12T12"])
    leads = pd.to_timedelta(list(leads_hours), unit="h")
    fields = truth[["2m_temperature", "geopotential"]]
    picked = [fields.sel(time=starts + lead, method="nearest").assign_coords(time=starts) for lead in leads]
    fc = xr.concat(picked, dim=pd.Index(leads, name=LEAD))
    fc = xr.concat([fc + xr.Dataset({"2m_temperature": float(m), "geopotential": 0.0}) for m in range(members)],
                   dim=pd.Index(np.arange(members), name=MEMBER))
    fc = fc.transpose(TIME, LEAD, MEMBER, ...)
    for name in fc.data_vars:
        fc[name].attrs = dict(truth[name].attrs)
    return write_forecast(fc, path, model="coarse-persistence")


def leftovers(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if ".tmp-" in p.name)


# ----------------------------------------------------------------------------------------------
# Pairs
# ----------------------------------------------------------------------------------------------
def test_coarsening_is_the_area_weighted_block_mean_and_leaves_the_input_alone():
    lat = -88.5 + 3.0 * np.arange(60)  # 3-degree global rows, of which 2 x 3 + remainder
    lon = 3.0 * np.arange(8)
    rng = np.random.default_rng(0)
    values = rng.normal(size=(2, lat.size, lon.size)).astype("float32")
    ds = xr.Dataset({"2m_temperature": (("time", "latitude", "longitude"), values, {"units": "K"}),
                     "land_sea_mask": (("latitude", "longitude"), values[0] > 0, {"units": "1"})},
                    coords={"time": pd.date_range("2000", periods=2, freq="6h"), "latitude": lat, "longitude": lon})
    before = ds.copy(deep=True)
    coarse = coarsen_area_mean(ds.isel(latitude=slice(0, 13)), 3, source="test")  # 13 rows: the last is dropped
    xr.testing.assert_identical(ds, before)
    assert dict(coarse.sizes) == {"time": 2, "latitude": 4, "longitude": 2}
    # the cell area of a 3-degree row is proportional to sin(north edge) - sin(south edge)
    area = np.diff(np.sin(np.deg2rad(np.append(lat[:12] - 1.5, lat[11] + 1.5)))).reshape(4, 3)  # (I, i)
    block = values[:, :12, :6].reshape(2, 4, 3, 2, 3)  # (time, I, i, J, j)
    expected = (block * area[None, :, :, None, None]).sum(axis=(2, 4)) / (3 * area.sum(axis=1))[None, :, None]
    np.testing.assert_allclose(coarse["2m_temperature"].values, expected, rtol=1e-5)
    np.testing.assert_allclose(coarse.latitude, lat[:12].reshape(4, 3).mean(1))
    np.testing.assert_allclose(coarse.longitude, [3.0, 12.0])
    assert coarse["2m_temperature"].dtype == np.float32 and coarse["2m_temperature"].attrs == {"units": "K"}
    mask = (values[0, :12, :6] > 0).reshape(4, 3, 2, 3)
    np.testing.assert_allclose(coarse["land_sea_mask"].values,
                               (mask * area[:, :, None, None]).sum(axis=(1, 3)) / (3 * area.sum(axis=1))[:, None],
                               rtol=1e-5)
    with pytest.raises(SchemaError, match="regularly spaced range"):
        coarsen_area_mean(ds.isel(longitude=[0, 1, 2, 5, 6, 7]), 2, source="gappy.nc")
    with pytest.raises(SchemaError, match="integer >= 2"):
        coarsen_area_mean(ds, 1, source="test")


def test_derived_pairs_are_labelled_aligned_and_cover_the_fine_targets(tmp_path):
    lat = 50.0 + 0.25 * np.arange(16)
    lon = 350.0 + 0.25 * np.arange(16)
    world = synthetic_analysis(lat, lon, n_times=8)[["2m_temperature"]]
    world["2m_temperature"] = world["2m_temperature"] + 0.5 * np.sin(np.arange(16) * 2.1)[None, :, None]
    world.to_netcdf(tmp_path / "fine.nc")
    pairs = make_derived_pairs([str(tmp_path / "fine.nc")], tmp_path / "pairs", factor=4)
    coarse, fine = open_store(pairs.coarse).load(), open_store(pairs.fine).load()
    for ds, role in ((coarse, "coarse"), (fine, "fine")):
        assert ds.attrs["derived"] == "true" and ds.attrs["pair_role"] == role
        assert ds.attrs["coarsening_factor"] == 4 and "fine.nc" in ds.attrs["derived_from"]
    assert coarse.sizes["latitude"] == 4 and coarse.sizes["longitude"] == 4
    # the fine targets: the points between the outermost coarse centres (50.375 .. 53.375)
    np.testing.assert_allclose(fine.latitude, lat[(lat >= 50.375) & (lat <= 53.375)])
    xr.testing.assert_allclose(coarse["2m_temperature"], coarsen_area_mean(world, 4, source="x")["2m_temperature"])
    with pytest.raises(StoreError, match="already exists"):
        make_derived_pairs([str(tmp_path / "fine.nc")], tmp_path / "pairs", factor=4)
    with pytest.raises(SchemaError, match="fewer than 2 x 2 fine points"):
        make_derived_pairs([str(tmp_path / "fine.nc")], tmp_path / "too_coarse", factor=16)
    assert not (tmp_path / "too_coarse").exists() and leftovers(tmp_path) == []


def test_pair_inputs_are_the_interpolated_coarse_field_and_targets_the_fine_field_at_the_same_time(stores):
    coarse, fine = open_store(stores[0]), open_store(stores[1])
    channels = Channels.from_dataset(fine, None, source="fine")
    normalisation = Normalisation.from_statistics(read_statistics(stores[1]), channels,
                                                  Channels.from_dataset(fine, None, source="f", static=True), source="s")
    for given in ((coarse.load(), fine.load()), (str(stores[0]), str(stores[1]))):  # in memory and lazily per sample
        pairs = PairDataset(*given, channels=channels, normalisation=normalisation, time=("2000-01-03", "2000-01-04"),
                            sources=("coarse", "fine"))
        assert len(pairs) == 8 and pd.Timestamp(pairs.times[0]) == pd.Timestamp("2000-01-03")
        item = pairs[5]
        time = pairs.times[5]
        assert int(item["time"]) == pd.Timestamp(time).value
        std = normalisation.std[:, None, None]
        mean = normalisation.mean[:, None, None]
        target = channels.stack(fine.sel(time=time))
        np.testing.assert_allclose(item["targets"].numpy() * std + mean, target, rtol=1e-5)
        expected = channels.stack(interpolate(coarse.sel(time=time), fine.latitude.values, fine.longitude.values,
                                              source="coarse"))
        np.testing.assert_allclose(item["inputs"].numpy() * std + mean, expected, rtol=1e-5)
    with pytest.raises(SchemaError, match="share no time"):
        PairDataset(coarse, fine, channels=channels, normalisation=normalisation, time=("2001-01-01", None),
                    sources=("coarse", "fine"))
    gappy = fine.load().copy(deep=True)
    gappy["2m_temperature"][10, 2, 3] = np.nan
    with pytest.raises(SchemaError, match=r"fine: 2m_temperature has missing values \(NaN\) at 2000-01-03 12:00:00"):
        PairDataset(coarse.load(), gappy, channels=channels, normalisation=normalisation, time=None,
                    sources=("coarse", "fine"))


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def test_one_run_trains_the_regression_then_the_diffusion_and_each_loss_falls(stores, trained):
    ckpt = load_checkpoint(trained / "model.pt", family="downscaling")
    assert ckpt.data["steps_trained"] == {"regression": REGRESSION_STEPS, "diffusion": MAX_STEPS - REGRESSION_STEPS}
    metrics = pd.read_csv(trained / "logs" / "version_0" / "metrics.csv")
    assert metrics["val/stage"].dropna().tolist() == [0.0, 1.0, 1.0]  # validated after 20 (regression), 40, 60 steps
    config = downscaling_config(stores)
    torch.manual_seed(0)
    setup = TRAINABLE["downscaling"](config)
    batch = torch.utils.data.default_collate([setup.train[i] for i in range(0, len(setup.train), 2)])
    model = DownscalingModel.from_checkpoint(ckpt)

    def loss(network, stage_steps: int) -> float:
        network.trained_steps.fill_(stage_steps)
        values = [setup.objective(network, batch, steps=1, generator=torch.Generator().manual_seed(s))["loss"].item()
                  for s in range(6)]  # several noise levels for the diffusion loss
        return float(np.mean(values))

    for stage_steps in (0, REGRESSION_STEPS):  # regression, then diffusion
        before, after = loss(setup.model, stage_steps), loss(model.network, stage_steps)
        assert after < 0.8 * before, (stage_steps, before, after)
    # the regression beats bilinear interpolation on the training pairs
    ratios = setup.objective(model.network.eval(), batch, steps=1, generator=torch.Generator())
    assert all(float(v) < 1.0 for k, v in ratios.items() if k.startswith("rmse_ratio_"))


def test_the_diffusion_stage_keeps_the_regression_of_its_checkpoint_frozen(stores, trained, tmp_path):
    config = downscaling_config(stores, model={"stage": "diffusion", "regression_steps": None,
                                               "regression_checkpoint": str(trained / "model.pt")},
                                training={"max_steps": 4, "val_period": None})
    result = train(config, out_dir=tmp_path / "run", progress=False)
    base, new = load_checkpoint(trained / "model.pt"), load_checkpoint(result.checkpoint)
    regression = [k for k in base.state_dict if k.startswith("regression.")]
    assert regression and all(torch.equal(base.state_dict[k], new.state_dict[k]) for k in regression)
    assert any(not torch.equal(base.state_dict[k], new.state_dict[k]) for k in base.state_dict if k.startswith("denoiser."))
    assert new.data["steps_trained"] == {"regression": REGRESSION_STEPS, "diffusion": 4}
    assert new.metadata["regression_checkpoint_sha256"] == base.sha256


def test_bad_training_configs_are_refused_before_writing(stores, tmp_path):
    with pytest.raises(ConfigError, match="needs regression_checkpoint"):
        downscaling_config(stores, model={"stage": "diffusion", "regression_steps": None})
    with pytest.raises(ConfigError, match="regression_steps is only used by stage 'both'"):
        downscaling_config(stores, model={"stage": "regression"})
    for config, message in (
        (downscaling_config(stores, model={"regression_steps": MAX_STEPS}), "must be at least 1 and below"),
        (downscaling_config(stores, training={"rollout": [{"at_step": 0, "steps": 2}]}), "maps one time to one time"),
        (downscaling_config(stores, training={"variable_weights": {"humidity": 1.0}}), r"names \['humidity'\]"),
    ):
        with pytest.raises(ConfigError, match=message):
            train(config, out_dir=tmp_path / "run", progress=False)
    far = downscaling_config((stores[0], stores[1]), training={"train_period": ["2001-01-01", None]})
    with pytest.raises(SchemaError, match=r"training period \['2001-01-01', None\]: .* share no time"):
        train(far, out_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------
# Downscaling coarse forecasts
# ----------------------------------------------------------------------------------------------
def test_downscale_keeps_starts_leads_and_members_and_records_provenance(stores, trained, tmp_path):
    source = coarse_forecast(stores, tmp_path / "coarse.zarr")
    ckpt = trained / "model.pt"
    out = downscale(source, checkpoint=ckpt, out=tmp_path / "fine.zarr", members_per_input=3, seed=7)
    fine, coarse = open_forecast(out), open_forecast(source)
    regional = open_store(stores[1])
    np.testing.assert_array_equal(fine[TIME].values, coarse[TIME].values)
    np.testing.assert_array_equal(fine[LEAD].values.astype("m8[ns]"), coarse[LEAD].values.astype("m8[ns]"))
    np.testing.assert_array_equal(fine["valid_time"].values, coarse["valid_time"].values)
    assert fine.sizes[MEMBER] == 6 and set(fine.data_vars) == {"2m_temperature", "geopotential"}
    np.testing.assert_allclose(fine.latitude, regional.latitude)
    np.testing.assert_allclose(fine.longitude, regional.longitude)
    assert fine["2m_temperature"].attrs["units"] == "K"
    attrs = fine.attrs
    assert attrs["model_family"] == "downscaling" and attrs["source_forecast"] == str(source)
    assert attrs["source_model"] == "coarse-persistence" and attrs["source_config_hash"] == coarse.attrs["config_hash"]
    assert attrs["checkpoint_hash"] == load_checkpoint(ckpt).sha256 and attrs["members_per_input"] == "3"
    assert attrs["downscaling_stages"] == "regression+diffusion" and len(attrs["config_hash"]) == 16
    values = fine["2m_temperature"].values
    assert np.isfinite(values).all() and np.std(values[:, :, :3] - values[:, :, :1], axis=2).mean() > 0
    # member m * K + k is sample k of input member m: the K = 1 run's members are members 0 and 3 here
    single = open_forecast(downscale(source, checkpoint=ckpt, out=tmp_path / "one.zarr", seed=7, batch_size=5))
    np.testing.assert_array_equal(single["2m_temperature"].values, values[:, :, [0, 3]])
    # a subset of leads gives the same fields at those leads
    subset = open_forecast(downscale(source, checkpoint=ckpt, out=tmp_path / "sub.zarr", members_per_input=3, seed=7,
                                     leads=["12h", "0h"]))
    np.testing.assert_array_equal(subset[LEAD].values.astype("m8[h]").astype(int), [0, 12])
    np.testing.assert_array_equal(subset["2m_temperature"].values, values[:, [0, 2]])
    with pytest.raises(SchemaError, match=r"leads \['0 days 18:00:00'\] are not in it"):
        downscale(source, checkpoint=ckpt, out=tmp_path / "none.zarr", leads=["18h"])
    # input member 1 is 1 K warmer: so, on average, are its output members
    shift = values[:, :, 3:].mean() - values[:, :, :3].mean()
    assert 0.5 < shift < 1.5, shift


def test_downscale_cli_takes_an_analysis_store_as_a_lead_zero_forecast(stores, trained, tmp_path):
    out = tmp_path / "analysis.zarr"
    argv = ["downscale", str(stores[0]), "--checkpoint", str(trained / "model.pt"), "--out", str(out),
            "--start", "2000-01-13T06", "--start", "2000-01-14", "--members-per-input", "2", "--sampling-steps", "2"]
    assert main(argv) == 0
    fine = open_forecast(out)
    assert fine.sizes == {TIME: 2, LEAD: 1, MEMBER: 2, "latitude": 6, "longitude": 9, "level": 1}
    assert fine.attrs["sampling_steps"] == "2"
    assert main(argv) == 2  # exists: refused
    assert main([*argv[:-2], "--start", "2003-01-01", "--overwrite"]) == 2  # unknown start: nothing replaced
    xr.testing.assert_identical(open_forecast(out).load(), fine.load())


def test_predict_points_a_downscaling_checkpoint_to_forecast_downscale(stores, trained, tmp_path, capsys):
    out = tmp_path / "predicted.zarr"
    argv = ["predict", "--checkpoint", str(trained / "model.pt"), "--start", "2000-01-14", "--steps", "1",
            "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "is a downscaling model" in err and "forecast downscale" in err
    assert not out.exists()


@pytest.mark.parametrize(("case", "message"), [
    ("area", r"does not cover the fine region \(lat 45\.\.70, lon 0\.\.40\)"),
    ("variable", r"variables \['2m_temperature'\] of the downscaling model are not in it"),
    ("units", r"'2m_temperature' has units 'degC'; canonical units are 'K'"),
    ("grid", r"grid spacing is 11\.25 x 11\.25 degrees .* trained to downscale fields on a 22\.5 x 22\.5 degree grid"),
    ("leads", r"times of day the model never saw in training \(3 h, 15 h UTC; it was trained at 0 h, 6 h, 12 h, 18 h"),
    ("members", r"deterministic \(regression-only\) downscaling model"),
])
def test_bad_coarse_inputs_raise_clear_errors_and_write_nothing(stores, trained, tmp_path, case, message):
    checkpoint = trained / "model.pt"
    if case == "area":
        source = coarse_forecast(stores, tmp_path / "coarse.zarr")
        open_forecast(source).sel(latitude=slice(None, 60)).pipe(write_forecast, tmp_path / "south.zarr", model="x")
        source = tmp_path / "south.zarr"
    elif case == "variable":
        source = tmp_path / "coarse.zarr"
        open_forecast(coarse_forecast(stores, tmp_path / "c.zarr"))[["geopotential"]].pipe(write_forecast, source, model="x")
    elif case == "units":  # written without write_forecast, which refuses non-canonical units
        source = tmp_path / "coarse.zarr"
        fc = open_forecast(coarse_forecast(stores, tmp_path / "c.zarr")).load()
        fc["2m_temperature"] = (fc["2m_temperature"] - 273.15).assign_attrs(units="degC")
        fc.drop_encoding().to_zarr(source, zarr_format=2, consolidated=True)
    elif case == "grid":
        lat, lon = -90 + 11.25 * (np.arange(16) + 0.5), 11.25 * np.arange(32)
        source = coarse_forecast(stores, tmp_path / "coarse.zarr", grid=(lat, lon))
    elif case == "leads":
        source = coarse_forecast(stores, tmp_path / "coarse.zarr", leads_hours=(0, 3, 6))
    else:
        config = downscaling_config(stores, model={"stage": "regression", "regression_steps": None},
                                    training={"max_steps": 2, "val_period": None})
        checkpoint = train(config, out_dir=tmp_path / "regression", progress=False).checkpoint
        source = coarse_forecast(stores, tmp_path / "coarse.zarr")
    with pytest.raises(SchemaError, match=message):
        downscale(source, checkpoint=checkpoint, out=tmp_path / "out.zarr", members_per_input=2)
    assert not (tmp_path / "out.zarr").exists() and leftovers(tmp_path) == []


def test_the_downscale_flow_runs_under_prefect_and_keeps_a_finished_output(
    stores, trained, tmp_path, prefect_harness  # noqa: F811  (the shared fixture)
):
    from workflows.downscale import downscale_flow

    source = str(coarse_forecast(stores, tmp_path / "coarse.zarr", leads_hours=(6,)))
    out = str(tmp_path / "fine.zarr")
    kwargs = {"checkpoint": str(trained / "model.pt"), "out": out, "members_per_input": 2, "sampling_steps": 2}
    assert downscale_flow(source, **kwargs) == out
    first = json.loads((tmp_path / "fine.zarr.done.json").read_text())
    assert open_forecast(out).sizes[MEMBER] == 4
    assert downscale_flow(source, **kwargs) == out  # current: kept as it is
    assert json.loads((tmp_path / "fine.zarr.done.json").read_text()) == first
    downscale_flow(source, **{**kwargs, "members_per_input": 1})  # another setting: made again
    assert open_forecast(out).sizes[MEMBER] == 2


# ----------------------------------------------------------------------------------------------
# Real data
# ----------------------------------------------------------------------------------------------
def test_real_era5_uk_pairs_train_and_downscale(real_data, tmp_path):
    grib = real_data / "era5-2mt-2019-03-uk.grib"
    if not grib.is_file():
        pytest.skip(f"{grib.name} not in {real_data}")
    pairs = make_derived_pairs([str(grib)], tmp_path / "pairs", factor=4, area=(50.0, 57.75, 352.0, 359.75),
                               time=("2019-03-01", "2019-03-02T23"), train_period=(None, "2019-03-02T11"))
    coarse, fine = open_store(pairs.coarse), open_store(pairs.fine)
    assert (coarse.sizes["latitude"], coarse.sizes["longitude"], fine.sizes["latitude"]) == (8, 8, 28)
    assert coarse.attrs["derived"] == "true" and "era5-2mt-2019-03-uk.grib" in fine.attrs["derived_from"]
    # coarse cell (2, 3) is the area-weighted mean of fine rows 8..11 and columns 12..15 of the ERA5 field
    era5 = open_sources([str(grib)], selection=Selection(time=("2019-03-01", "2019-03-01"),
                                                         area=(50.0, 57.75, 352.0, 359.75)))
    block = era5["2m_temperature"].isel(time=0, latitude=slice(8, 12), longitude=slice(12, 16)).values
    weights = np.cos(np.deg2rad(era5.latitude.values[8:12]))[:, None]
    expected = (block * weights).sum() / (4 * weights.sum())
    assert float(coarse["2m_temperature"].isel(time=0, latitude=2, longitude=3)) == pytest.approx(expected, abs=2e-3)
    # the fine targets are the ERA5 values themselves
    np.testing.assert_array_equal(fine["2m_temperature"].isel(time=0).values,
                                  era5["2m_temperature"].isel(time=0).sel(latitude=fine.latitude, longitude=fine.longitude))
    config = parse_config({
        "name": "era5-uk",
        "model": {"family": "downscaling", "stage": "both", "regression_steps": 3, "base_channels": 8,
                  "channel_mult": [1, 2], "embedding_dim": 16, "sampling_steps": 2},
        "data": {"global_store": str(pairs.coarse), "regional_store": str(pairs.fine), "step": "1h"},
        "training": {"train_period": [None, "2019-03-02T11"], "val_period": ["2019-03-02T12", None], "max_steps": 6,
                     "batch_size": 4, "warmup_steps": 1, "val_every": 6, "val_batches": 1},
    })
    result = train(config, out_dir=tmp_path / "run", progress=False)
    assert np.isfinite(result.metrics["val/loss"])
    out = downscale(pairs.coarse, checkpoint=result.checkpoint, out=tmp_path / "fine.zarr", members_per_input=2,
                    starts=["2019-03-02T13", "2019-03-02T20"])
    fc = open_forecast(out)
    assert fc.sizes[MEMBER] == 2 and fc.sizes["latitude"] == 28 and np.isfinite(fc["2m_temperature"].values).all()
