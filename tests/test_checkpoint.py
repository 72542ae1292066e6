"""Checkpoints (round trip, weights_only, format versions, family, corrupt files) and ``forecast predict`` (streamed
Zarr equal to the in-memory rollout, provenance, atomic writes, bad input)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from forecasting.cli import main
from forecasting.data.store import open_store
from forecasting.errors import SourceError, StoreError
from forecasting.forecasters import GLOBAL, REGIONAL, GraphForecaster, build_forecaster
from forecasting.inference import ForecastWriter, config_hash, open_forecast, predict, write_forecast
from forecasting.schema import LEAD, validate_forecast
from forecasting.training import checkpoint as checkpoint_module
from forecasting.training.checkpoint import CHECKPOINT_FORMAT_VERSION, file_sha256, load_checkpoint
from forecasting.verification.baselines import persistence_forecast
from test_forecasters import graph_config, make_stores

STARTS = ["2000-01-03T00", "2000-01-05T12"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_stores(tmp_path_factory.mktemp("checkpoint"))


@pytest.fixture(scope="module")
def initial(stores) -> dict[str, xr.Dataset]:
    return {GLOBAL: open_store(stores[0]), REGIONAL: open_store(stores[1])}


@pytest.fixture(scope="module")
def saved(stores, tmp_path_factory) -> tuple[GraphForecaster, Path, object]:
    """A probabilistic stretched-grid model with random weights, saved."""
    config = graph_config(stores, model={"noise_channels": 3})
    torch.manual_seed(1)
    forecaster = build_forecaster(config)
    path = forecaster.save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", config=config,
                                      metadata={"global_step": 0})
    return forecaster, path, config


def _payload(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_round_trip_gives_identical_predictions(saved, initial):
    forecaster, path, config = saved
    payload = _payload(path)  # plain torch.load(weights_only=True) reads it: no pickled objects
    assert payload["format_version"] == CHECKPOINT_FORMAT_VERSION and payload["family"] == "graph"
    ckpt = load_checkpoint(path, family="graph")
    assert ckpt.config == config.model_dump(mode="json") and ckpt.sha256 == file_sha256(path)
    for name in ("data_grid_index", "data_area_weight", "encoder_edges", "decoder_edge_features"):
        np.testing.assert_array_equal(getattr(ckpt.graph, name), getattr(forecaster.graph, name))
    np.testing.assert_array_equal(ckpt.graph.mesh.edges, forecaster.graph.mesh.edges)
    assert ckpt.graph.description == forecaster.graph.description
    np.testing.assert_array_equal(ckpt.statistics["tendency_std"].numpy(), forecaster.normalisation.tendency_std)
    reloaded = GraphForecaster.from_checkpoint(ckpt)
    kwargs = {"steps": 3, "members": 2, "starts": STARTS, "seed": 5}
    before, after = forecaster.forecast(initial, **kwargs), reloaded.forecast(initial, **kwargs)
    for grid in (GLOBAL, REGIONAL):
        xr.testing.assert_identical(before[grid], after[grid])


def test_save_refuses_objects_that_would_need_pickle(saved, tmp_path):
    forecaster, _, config = saved
    with pytest.raises(TypeError, match=r"metadata\.when must be plain data; found Timestamp"):
        forecaster.save_checkpoint(tmp_path / "x.pt", config=config, metadata={"when": pd.Timestamp("2000")})
    assert list(tmp_path.iterdir()) == []


def test_format_versions_load_migrate_or_say_what_to_do(saved, tmp_path, monkeypatch):
    _, path, _ = saved
    payload = _payload(path)
    newer, older = tmp_path / "newer.pt", tmp_path / "older.pt"
    torch.save({**payload, "format_version": CHECKPOINT_FORMAT_VERSION + 1}, newer)
    with pytest.raises(SourceError, match=rf"{newer}.*newer than this forecasting .*upgrade the forecasting package"):
        load_checkpoint(newer)
    old = {k: v for k, v in payload.items() if k != "data"}
    torch.save({**old, "format_version": CHECKPOINT_FORMAT_VERSION - 1, "channels": payload["data"]}, older)
    with pytest.raises(SourceError, match=rf"{older} has format version {CHECKPOINT_FORMAT_VERSION - 1}.*retrain"):
        load_checkpoint(older)

    def rename_channels(old_payload: dict) -> dict:
        upgraded = {k: v for k, v in old_payload.items() if k != "channels"}
        return {**upgraded, "data": old_payload["channels"], "format_version": CHECKPOINT_FORMAT_VERSION}

    monkeypatch.setitem(checkpoint_module.MIGRATIONS, CHECKPOINT_FORMAT_VERSION - 1, rename_channels)
    migrated = load_checkpoint(older)
    assert migrated.format_version == CHECKPOINT_FORMAT_VERSION and migrated.data == payload["data"]


def test_checkpoint_of_another_family_is_refused(saved):
    _, path, _ = saved
    with pytest.raises(SourceError, match=rf"checkpoint {path} holds a 'graph' model, not a 'diffusion' one"):
        load_checkpoint(path, family="diffusion")


class _Payload:
    """A class torch.load(weights_only=True) must refuse to rebuild."""


@pytest.mark.parametrize("damage", ["truncated", "random", "pickled object", "not a checkpoint", "missing"])
def test_corrupt_checkpoint_files_raise_source_error_naming_the_file(saved, tmp_path, damage):
    _, path, _ = saved
    bad = tmp_path / "bad.pt"
    if damage == "truncated":
        bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "random":
        bad.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "pickled object":
        torch.save({"format_version": 1, "payload": _Payload()}, bad)
    elif damage == "not a checkpoint":
        torch.save({"weights": torch.zeros(3)}, bad)
    with pytest.raises(SourceError, match=str(bad)):
        load_checkpoint(bad)


def test_predict_streams_a_forecast_equal_to_the_in_memory_rollout(saved, initial, tmp_path):
    forecaster, path, config = saved
    out = tmp_path / "forecast.zarr"
    predict(path, starts=STARTS, members=2, steps=3, out=out, seed=11, batch_size=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forecast.zarr"]  # no temporary leftovers
    expected = forecaster.forecast(initial, steps=3, members=2, starts=STARTS, seed=11)
    for grid in (GLOBAL, REGIONAL):
        written = open_forecast(out / grid)
        validate_forecast(written)
        assert written.attrs["checkpoint_hash"] == file_sha256(path)
        assert written.attrs["config_hash"] == config_hash(config.model_dump(mode="json"))
        assert written.attrs["model"] == "tiny" and written.attrs["model_family"] == "graph"
        assert "forecasting_version" in written.attrs
        for name in ("geopotential", "2m_temperature"):
            np.testing.assert_array_equal(written[name].values, expected[grid][name].values)
        np.testing.assert_array_equal(written["valid_time"].values, expected[grid]["valid_time"].values)
    assert xr.open_zarr(out, group=REGIONAL).sizes[LEAD] == 3
    with pytest.raises(StoreError, match="already exists"):
        predict(path, starts=STARTS, members=1, steps=1, out=out)


def test_predict_cli_single_grid_forecast_at_the_root(stores, initial, tmp_path):
    config = graph_config(stores, model={"mode": "global"})
    forecaster = build_forecaster(config)
    path = forecaster.save_checkpoint(tmp_path / "global.pt", config=config)
    out = tmp_path / "f.zarr"
    args = ["predict", "--checkpoint", str(path), "--start", STARTS[0], "--start", STARTS[1], "--members", "1",
            "--steps", "2", "--out", str(out), "--store", f"global={stores[0]}"]
    assert main(args) == 0
    written = open_forecast(out)
    expected = forecaster.forecast(initial[GLOBAL], steps=2, starts=STARTS)
    np.testing.assert_array_equal(written["2m_temperature"].values, expected["2m_temperature"].values)


def test_predict_limited_area_with_a_forecast_as_boundary(stores, initial, tmp_path):
    config = graph_config(stores, model={"mode": "limited_area"})
    forecaster = build_forecaster(config)
    path = forecaster.save_checkpoint(tmp_path / "lam.pt", config=config)
    boundary = tmp_path / "boundary.zarr"
    write_forecast(persistence_forecast(initial[GLOBAL], init_times=STARTS, leads=pd.to_timedelta([6, 12], unit="h")),
                   boundary, model="persistence")
    out = tmp_path / "lam.zarr"
    predict(path, starts=STARTS, members=1, steps=2, out=out, boundary=str(boundary))
    expected = forecaster.forecast(initial[REGIONAL], steps=2, starts=STARTS, boundary=open_forecast(boundary))
    np.testing.assert_array_equal(open_forecast(out)["geopotential"].values, expected["geopotential"].values)


def test_predict_bad_checkpoint_writes_nothing(saved, tmp_path):
    _, path, _ = saved
    bad = tmp_path / "bad.pt"
    bad.write_bytes(path.read_bytes()[:1000])
    out = tmp_path / "f.zarr"
    code = main(["predict", "--checkpoint", str(bad), "--start", STARTS[0], "--steps", "2", "--out", str(out)])
    assert code == 2 and not out.exists()
    code = main(["predict", "--checkpoint", str(path), "--start", "1999-06-01", "--steps", "2", "--out", str(out)])
    assert code == 2 and sorted(os.listdir(tmp_path)) == ["bad.pt"]


def test_forecast_writer_removes_everything_when_a_write_fails(saved, initial, tmp_path):
    forecaster, _, _ = saved
    out = tmp_path / "f.zarr"
    starts = pd.DatetimeIndex(STARTS)
    with pytest.raises(RuntimeError, match="model failed"):
        with ForecastWriter(out, starts=starts, leads=forecaster.leads(2), model="graph") as writer:
            for chunk in forecaster.iterate(initial, steps=2, starts=starts, batch_size=1):
                writer.write(chunk.grids, starts=chunk.starts, lead=chunk.lead)
                raise RuntimeError("model failed")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(StoreError, match="chunks were never written"):
        with ForecastWriter(out, starts=starts, leads=forecaster.leads(2), model="graph") as writer:
            chunk = next(forecaster.iterate(initial, steps=2, starts=starts))
            writer.write(chunk.grids, starts=chunk.starts, lead=chunk.lead)
    assert list(tmp_path.iterdir()) == []
