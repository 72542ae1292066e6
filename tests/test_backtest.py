"""Backtests: start times scored one by one and streamed to disk (forecasting.backtest), fanned out over
Dask, aggregated exactly like a one-go verification, and resumed after being killed (workflows.flows)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml

from forecasting.backtest import (
    load_forecast_run,
    run_backtest,
    scores_path,
    start_label,
)
from forecasting.cli import main
from forecasting.errors import SchemaError
from forecasting.inference import baseline_forecast, write_forecast
from forecasting.verification.verify import open_truth, verify
from tests.test_workflows import make_model_run, prefect_harness  # noqa: F401  (the shared harness fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BOX = {"lat_min": 45.0, "lat_max": 72.0, "lon_min": 0.0, "lon_max": 40.0}


def test_backtest_on_a_dask_cluster_aggregates_exactly_like_one_verification(tmp_path):
    from distributed import Client, LocalCluster

    path = make_model_run(tmp_path, regions={"box": BOX},
                          starts={"first": "2000-01-11T00", "last": "2000-01-12T00", "every": "12h"})
    config = load_forecast_run(path)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        result = run_backtest(config, client=client)
    starts = pd.date_range("2000-01-11T00", "2000-01-12T00", freq="12h")
    assert list(result.computed) == list(starts) and result.reused == ()
    for start in starts:
        per_start = xr.open_dataset(scores_path(config, start))["score"]
        assert per_start.sizes["time"] == 1 and set(per_start["model"].values.tolist()) == {"tiny", "persistence"}
    summary = xr.open_dataset(result.summary / "scores.nc")["score"]
    assert set(summary["region"].values.tolist()) == {"global/global", "global/box", "global/stations",
                                                      "regional/domain", "regional/stations"}
    assert np.isfinite(summary.sel(model="tiny", metric="spread_skill_ratio", region="regional/domain",
                                   variable="2m_temperature")).all()
    card = xr.open_dataset(result.summary / "scorecard_persistence.nc")
    assert card.attrs["model"] == "tiny" and card.attrs["n_start_times"] == 3
    assert card.attrs["block_length"] == "auto" and "block_length" in card.data_vars  # forecast.bootstrap_block
    assert "Scorecard: tiny against persistence" in (result.summary / "summary.md").read_text()

    # The persistence rows equal `forecast verify` of a persistence forecast of all start times at once.
    truth = open_truth(tmp_path / "global.zarr")
    leads = pd.to_timedelta([6, 12, 18, 24], unit="h")
    write_forecast(baseline_forecast(truth, kind="persistence", init_times=starts, leads=leads),
                   tmp_path / "persistence.zarr", model="persistence")
    one_go = verify(tmp_path / "persistence.zarr", out_dir=tmp_path / "one-go", truth_path=tmp_path / "global.zarr",
                    observations_path=tmp_path / "stations.zarr", regions={"box": tuple(BOX.values())},
                    plots=False).scores["score"].sel(model="persistence")
    for region in ("global", "box", "stations"):
        for metric in ("rmse", "mae", "bias", "crps"):
            want = one_go.sel(region=region, metric=metric)
            got = summary.sel(model="persistence", region=f"global/{region}", metric=metric).sel(
                variable=want["variable"].values)
            np.testing.assert_allclose(got.values, want.values, rtol=2e-5, err_msg=f"{metric} {region}")


def _score_manifests(out: Path) -> set[str]:
    return {p.name.split(".")[0] for p in (out / "scores").glob(f"*.nc{'.done.json'}")}


def test_a_killed_backtest_run_again_scores_only_the_missing_start_times(
    tmp_path, prefect_harness  # noqa: F811  (the shared fixture)
):
    from distributed import LocalCluster

    from workflows.flows import backtest_flow

    path = make_model_run(tmp_path, stations=False,
                          starts={"first": "2000-01-11T00", "last": "2000-01-12T06", "every": "6h"},
                          dask={"n_workers": 1, "threads_per_worker": 1, "processes": False})
    config = load_forecast_run(path)
    out = Path(config.out)
    everything = {start_label(s) for s in config.starts.times()}
    assert len(everything) == 6

    # `forecast backtest` in its own process group, talking to the harness's API, killed once two start
    # times are scored.
    env = {**os.environ, "PREFECT_API_URL": prefect_harness, "PREFECT_LOGGING_LEVEL": "WARNING"}
    log = (tmp_path / "killed.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "forecasting.cli", "backtest", str(path), "--quiet"],
                               env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(_score_manifests(out)) < 2:
            assert process.poll() is None, (tmp_path / "killed.log").read_text()
            assert time.monotonic() < deadline, "the backtest scored nothing in 240 s"
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        log.close()
    finished = _score_manifests(out)
    assert 2 <= len(finished) < len(everything), f"killed too late to test resuming: {sorted(finished)}"
    stamps = {label: (out / "scores" / f"{label}.nc").stat().st_mtime_ns for label in finished}

    # Run again, on a Dask scheduler given by address: only the missing start times are scored.
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        result = backtest_flow(str(path), address=cluster.scheduler_address)
    assert {start_label(s) for s in result["computed"]} == everything - finished
    assert {start_label(s) for s in result["reused"]} == finished
    assert {label: (out / "scores" / f"{label}.nc").stat().st_mtime_ns for label in finished} == stamps
    assert _score_manifests(out) == everything
    assert not [p.name for p in out.rglob(".*") if ".tmp-" in p.name or ".scratch-" in p.name]
    assert xr.open_dataset(out / "summary" / "scores.nc").attrs["n_start_times"] == 6

    # Everything is there now: the library run without Prefect reuses every start time.
    assert main(["backtest", str(path), "--no-prefect", "--quiet"]) == 0


def test_backtest_refuses_start_times_the_stores_cannot_serve_before_writing(tmp_path):
    path = make_model_run(tmp_path, stations=False,
                          starts={"first": "2000-01-15T12", "last": "2000-01-15T18", "every": "6h"})
    with pytest.raises(SchemaError, match=r"lacks the first lead of 1 start times: \['2000-01-15 18:00:00'\]"):
        run_backtest(load_forecast_run(path))
    section = yaml.safe_load(path.read_text())["forecast"]
    early = dict(section, starts={"first": "2000-01-01T00", "last": "2000-01-02T00"})
    path.write_text(yaml.safe_dump({"forecast": early}))
    with pytest.raises(SchemaError, match=r"input times are not in the analysis"):
        run_backtest(load_forecast_run(path))
    no_starts = {k: v for k, v in early.items() if k != "starts"}
    path.write_text(yaml.safe_dump({"forecast": no_starts}))
    with pytest.raises(SchemaError, match="a backtest needs start times"):
        run_backtest(load_forecast_run(path))
    assert not (tmp_path / "out").exists()
