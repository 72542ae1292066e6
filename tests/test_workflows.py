"""Prefect flows (workflows/) and the resumable outputs they rely on (forecasting.backtest.run_once).

This module also holds what the other workflow test modules share: the session-wide Prefect test harness
(``prefect_harness``), a private ``PREFECT_HOME`` set before Prefect is first imported, and
``make_model_run``: tiny stores (tests.test_forecasters.make_stores), an ingested station store and an
untrained graph-model checkpoint, the inputs of a forecast run.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

# Prefect reads PREFECT_HOME when first imported: a private one keeps the session off ~/.prefect. (This
# module may be imported twice, as `test_workflows` by pytest and as `tests.test_workflows` by the other
# modules: the marker makes the second import keep the first one's home.)
if "FORECASTING_TEST_PREFECT_HOME" not in os.environ:
    _home = tempfile.mkdtemp(prefix="prefect-home-")
    atexit.register(shutil.rmtree, _home, True)
    os.environ["FORECASTING_TEST_PREFECT_HOME"] = os.environ["PREFECT_HOME"] = _home
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # flows' progress lines are INFO: keep test output short

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml

import workflows  # noqa: F401  (Prefect defaults before Prefect itself)
from forecasting.backtest import (
    fingerprint,
    is_current,
    manifest_path,
    output_key,
    run_once,
)
from forecasting.cli import main
from forecasting.config import ForecastRunConfig
from forecasting.data.ingest import ingest
from forecasting.data.store import append_store, open_store
from forecasting.errors import StoreError
from forecasting.forecasters import build_forecaster
from forecasting.schema import LEAD, MEMBER, TIME
from forecasting.training.checkpoint import load_checkpoint
from tests.test_forecasters import (
    COARSE_LAT,
    COARSE_LON,
    REGIONAL_LAT,
    REGIONAL_LON,
    graph_config,
    make_stores,
    synthetic_analysis,
)


@pytest.fixture(scope="session")
def prefect_harness(request: pytest.FixtureRequest) -> Iterator[str]:
    """One Prefect test server for the session; its API is exported as PREFECT_API_URL for subprocesses
    and Dask workers. Every module importing this fixture gets its own copy of it, so the server is kept
    on the session and shared, reference-counted, by all of them."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    shared = request.session.__dict__.setdefault("prefect_harness", {"users": 0, "stack": None})
    if shared["users"] == 0:
        stack = ExitStack()
        stack.enter_context(prefect_test_harness(server_startup_timeout=180))
        before = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = str(PREFECT_API_URL.value())
        stack.callback(lambda: os.environ.pop("PREFECT_API_URL") if before is None
                       else os.environ.__setitem__("PREFECT_API_URL", before))
        shared["stack"] = stack
    shared["users"] += 1
    try:
        yield str(PREFECT_API_URL.value())
    finally:
        shared["users"] -= 1
        if shared["users"] == 0:
            shared["stack"].close()


STATIONS = {"S0": (50.0, 5.0), "S1": (55.0, 12.0), "S2": (60.0, 20.0), "S3": (65.0, 33.0)}


def make_station_store(root: Path, regional_store: Path) -> Path:
    """Stations inside the regional box observing the regional grid's 2m temperature plus noise (CSV ->
    ``forecast ingest`` -> ``root/stations.zarr``)."""
    ds = open_store(regional_store)
    rng = np.random.default_rng(1)
    rows = []
    for name, (lat, lon) in STATIONS.items():
        values = ds["2m_temperature"].interp(latitude=lat, longitude=lon).values
        rows += [{"station_id": name, "latitude": lat, "longitude": lon, "time": t, "2m_temperature": v + rng.normal()}
                 for t, v in zip(ds["time"].values, values)]
    pd.DataFrame(rows).to_csv(root / "stations.csv", index=False)
    return ingest([str(root / "stations.csv")], root / "stations.zarr").out


def make_model_run(root: Path, *, n_times: int = 60, stations: bool = True, **settings) -> Path:
    """Tiny stores, stations, an untrained graph checkpoint and a config ``root/run.yaml`` whose ``forecast``
    section runs it (2 members, 4 steps, persistence baseline, no plots); ``settings`` override its keys."""
    root.mkdir(parents=True, exist_ok=True)
    stores = make_stores(root, n_times=n_times)
    experiment = graph_config(stores)
    build_forecaster(experiment).save_checkpoint(root / "model.pt", config=experiment, metadata={})
    section = {
        "checkpoint": str(root / "model.pt"), "out": str(root / "out"),
        "observations": str(make_station_store(root, stores[1])) if stations else None,
        "members": 2, "steps": 4, "baselines": ["persistence"], "n_resamples": 20, "plots": False,
        **settings,
    }
    ForecastRunConfig.model_validate(section)
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny-run", "forecast": section}))
    return path


# ----------------------------------------------------------------------------------------------
# Resumable outputs (library, no Prefect)
# ----------------------------------------------------------------------------------------------
def test_run_once_skips_finished_outputs_and_redoes_unfinished_or_changed_ones(tmp_path):
    calls = []
    out = tmp_path / "a.txt"

    def make(text: str):
        def write() -> None:
            calls.append(text)
            out.write_text(text)
        return write

    key = output_key({"x": 1})
    assert run_once(out, key=key, make=make("one")).computed
    assert not run_once(out, key=key, make=make("two")).computed and out.read_text() == "one"
    assert run_once(out, key=output_key({"x": 2}), make=make("three")).computed  # settings changed
    assert run_once(out, key=output_key({"x": 2}), make=make("four"), overwrite=True).computed
    assert calls == ["one", "three", "four"]

    # A make that dies leaves no manifest: the output counts as unfinished and is made again.
    def dies() -> None:
        out.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_once(out, key=output_key({"x": 3}), make=dies)
    assert not manifest_path(out).exists() and not is_current(out, output_key({"x": 3}))
    assert run_once(out, key=output_key({"x": 3}), make=make("five")).computed
    with pytest.raises(StoreError, match="did not write its output"):
        run_once(tmp_path / "never.txt", key=key, make=lambda: None)

    # Inputs: a finished output is fingerprinted by its key (a chain), a plain file by its stamp,
    # a directory (an append-only store) by its path.
    downstream = output_key({"y": 1}, [out])
    assert fingerprint(out).startswith("key:") and downstream == output_key({"y": 1}, [out])
    run_once(out, key=output_key({"x": 4}), make=make("six"))
    assert output_key({"y": 1}, [out]) != downstream
    plain = tmp_path / "plain.txt"
    plain.write_text("a")
    assert fingerprint(plain).startswith("file:") and fingerprint(tmp_path) == f"path:{tmp_path.resolve()}"


# ----------------------------------------------------------------------------------------------
# Flows under the Prefect test harness
# ----------------------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _append_times(store: Path, lat: np.ndarray, lon: np.ndarray, *, until: int) -> None:
    """Append the synthetic analysis times the store lacks, up to ``until`` times in all (new analyses)."""
    have = open_store(store).sizes[TIME]
    full = synthetic_analysis(lat, lon, n_times=until)
    append_store(full.isel({TIME: slice(have, until)}).drop_vars(["geopotential_at_surface", "land_sea_mask"]), store)


def test_forecast_flow_verifies_earlier_runs_once_the_truth_covers_them(tmp_path, prefect_harness):
    from workflows.flows import forecast_flow, verify_flow

    truth_root = tmp_path / "truth"
    truth = make_stores(truth_root, n_times=50)  # the truth so far ends 2000-01-13T06
    config = make_model_run(tmp_path, stations=False,
                            truth={"global": str(truth[0]), "regional": str(truth[1])})
    out = tmp_path / "out"

    first = forecast_flow(str(config), start="2000-01-12T12")  # leads up to 2000-01-13T12: not yet verifiable
    assert first == {"forecast": str(out / "forecasts" / "20000112T1200.zarr"), "verified": []}
    fc = xr.open_zarr(out / "forecasts" / "20000112T1200.zarr" / "regional")
    assert dict(fc.sizes)[MEMBER] == 2 and fc.sizes[LEAD] == 4
    assert verify_flow(str(config)) == []

    _append_times(truth[0], COARSE_LAT, COARSE_LON, until=60)  # the analyses of the next days arrive
    _append_times(truth[1], REGIONAL_LAT, REGIONAL_LON, until=60)
    verified = verify_flow(str(config))
    assert verified == [str(out / "verification" / "20000112T1200")]
    for grid in ("global", "regional"):
        scores = xr.open_dataset(out / "verification" / "20000112T1200" / grid / "scores.nc")
        assert {"tiny", "persistence"} <= set(scores["model"].values.tolist())
        assert np.isfinite(scores["score"].sel(model="tiny", metric="rmse").values).all()

    # The scheduled cycle: the latest analysis of the initial-condition stores, nothing left to verify.
    latest = forecast_flow(str(config))
    assert latest == {"forecast": str(out / "forecasts" / "20000115T1800.zarr"), "verified": []}
    stamp = manifest_path(out / "forecasts" / "20000115T1800.zarr").stat().st_mtime_ns
    assert forecast_flow(str(config))["verified"] == []
    assert manifest_path(out / "forecasts" / "20000115T1800.zarr").stat().st_mtime_ns == stamp  # not made again


def test_ingest_and_train_flows_keep_finished_work_and_continue_a_stopped_run(tmp_path, prefect_harness):
    from workflows.flows import ingest_flow, train_flow

    source = tmp_path / "analysis.nc"
    synthetic_analysis(COARSE_LAT, COARSE_LON, n_times=20).to_netcdf(source)
    config = tmp_path / "ingest.yaml"
    config.write_text(yaml.safe_dump({"ingest": [{"sources": [str(source)], "out": str(tmp_path / "a.zarr")}]}))
    assert ingest_flow(str(config)) == [str(tmp_path / "a.zarr")]
    stamp = manifest_path(tmp_path / "a.zarr").stat().st_mtime_ns
    assert ingest_flow(str(config)) == [str(tmp_path / "a.zarr")]
    assert manifest_path(tmp_path / "a.zarr").stat().st_mtime_ns == stamp
    assert xr.open_zarr(tmp_path / "a.zarr").sizes[TIME] == 20

    stores = make_stores(tmp_path / "stores")
    experiment = graph_config(stores, training={"max_steps": 2, "batch_size": 2, "warmup_steps": 0,
                                                "val_every": 1, "val_batches": 1, "checkpoint_every": 1})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(experiment.model_dump(mode="json")))
    run = tmp_path / "run"
    assert train_flow(str(path), out=str(run), max_steps=1) == str(run / "model.pt")
    assert load_checkpoint(run / "model.pt").metadata["global_step"] == 1
    # Asked for more steps, the stopped run continues from its last checkpoint (not from scratch) ...
    train_flow(str(path), out=str(run), max_steps=2)
    assert load_checkpoint(run / "model.pt").metadata["global_step"] == 2
    assert len(list((run / "logs").glob("version_*"))) == 2  # one log version per run segment
    # ... and a finished run is kept.
    stamp = (run / "model.pt").stat().st_mtime_ns
    train_flow(str(path), out=str(run), max_steps=2)
    assert (run / "model.pt").stat().st_mtime_ns == stamp


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command, phrases", [
    (["quickstart"], ["--fast", "--workdir", "report.md", "Prefect"]),
    (["run"], ["latest analysis", "OUT/forecasts/<start>.zarr", "--start", "--verify-only"]),
    (["backtest"], ["OUT/scores/<start>.nc", "--address", "--workers", "LocalCluster", "missing ones"]),
    (["serve"], ["prefect server start --host 127.0.0.1", "PREFECT_API_URL", "cron"]),
    (["flow"], ["ingest", "train", "backtest", "--param"]),
])
def test_every_flow_command_explains_its_options(command, phrases, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for phrase in phrases:
        assert phrase in text, phrase


def test_flow_commands_reject_bad_input_with_messages(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"forecast": {"checkpoint": str(tmp_path / "none.pt"),
                                                   "out": str(tmp_path / "out"), "membres": 2}}))
    assert main(["run", str(config)]) == 2
    assert "unknown key 'forecast.membres'" in capsys.readouterr().err
    config.write_text(yaml.safe_dump({"name": "no-section"}))
    assert main(["backtest", str(config)]) == 2
    assert "has no 'forecast' section" in capsys.readouterr().err
    assert main(["flow", "verify", str(config), "--param", "bogus=1"]) == 2
    err = capsys.readouterr().err
    assert "flow verify" in err and "bogus" in err
    assert main(["backtest", str(config), "--address", "tcp://127.0.0.1:1", "--workers", "2"]) == 2
    assert "give one" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_forecast_run_with_a_missing_checkpoint_fails_naming_it(tmp_path, capsys, prefect_harness):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"forecast": {"checkpoint": str(tmp_path / "none.pt"),
                                                   "out": str(tmp_path / "out")}}))
    assert main(["run", str(config), "--quiet"]) == 2
    assert f"checkpoint {tmp_path / 'none.pt'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_forecast_run_config_names_the_bad_key(tmp_path):
    from forecasting.config import ConfigError, load_config

    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps({"forecast": {"checkpoint": "m.pt", "out": "o",
                                             "starts": {"first": "2000-01-02", "last": "2000-01-01"}}}))
    with pytest.raises(ConfigError, match=r"bad\.yaml: 'forecast\.starts': .*last \(2000-01-01\) is before first"):
        load_config(path)
