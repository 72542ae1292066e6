"""`forecast serve`: deployments with cron schedules, run by a real `prefect server start` on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import get_args

import httpx
import pytest
import xarray as xr
import yaml

import tests.test_workflows  # noqa: F401  (a private PREFECT_HOME before Prefect is imported)
from forecasting.config import ConfigError, parse_config
from forecasting.errors import ForecastingError
from tests.test_forecasters import COARSE_LAT, COARSE_LON, synthetic_analysis


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(process: subprocess.Popen, *, timeout: float = 30) -> None:
    """SIGTERM the process group, SIGKILL it if it does not end; then check nothing of it is left."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while True:  # children of the group (uvicorn, flow-run processes) go too
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            return
        time.sleep(0.2)


# Server services this test does not need (the scheduler, which it tests, stays on): less load while it waits.
_IDLE_SERVICES = {f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false"
                  for name in ("CANCELLATION_CLEANUP", "FOREMAN", "LATE_RUNS", "PAUSE_EXPIRATIONS", "TRIGGERS")}


def _environment(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return {**env, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra}


@pytest.fixture
def prefect_server(tmp_path: Path) -> Iterator[str]:
    """`prefect server start --host 127.0.0.1` on a free port with its own database; stopped afterwards."""
    port = _free_port()
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=_environment(tmp_path / "server-home", PREFECT_UI_ENABLED="false", **_IDLE_SERVICES), stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "the Prefect server did not become healthy in 180 s"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield url
    finally:
        _stop(server)
        log.close()


def _runs(url: str, deployment: str) -> list[dict]:
    response = httpx.post(f"{url}/flow_runs/filter", timeout=10,
                          json={"deployments": {"name": {"any_": [deployment]}}})
    response.raise_for_status()
    return response.json()


def test_serve_runs_a_per_minute_deployment_on_a_real_server(tmp_path, prefect_server):
    source = tmp_path / "analysis.nc"
    synthetic_analysis(COARSE_LAT, COARSE_LON, n_times=8).to_netcdf(source)
    store = tmp_path / "analysis.zarr"
    ingest_config = tmp_path / "ingest.yaml"
    ingest_config.write_text(yaml.safe_dump({"ingest": [{"sources": [str(source)], "out": str(store)}]}))
    serve_config = tmp_path / "serve.yaml"
    serve_config.write_text(yaml.safe_dump({"serve": {"deployments": [
        {"name": "tick", "flow": "ingest", "cron": "* * * * *", "parameters": {"config": str(ingest_config)}},
    ]}}))
    log = (tmp_path / "serve.log").open("w")
    serving = subprocess.Popen(
        [sys.executable, "-m", "forecasting.cli", "serve", str(serve_config)], cwd=tmp_path,
        env=_environment(tmp_path / "client-home", PREFECT_API_URL=prefect_server, PREFECT_RUNNER_POLL_FREQUENCY="2"),
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240  # the next minute, the runner's poll, a loaded machine
        while True:
            assert serving.poll() is None, (tmp_path / "serve.log").read_text()
            states = [run["state_type"] for run in _runs(prefect_server, "tick")]
            if "COMPLETED" in states:
                break
            assert not {"FAILED", "CRASHED"} & set(states), (states, (tmp_path / "serve.log").read_text())
            assert time.monotonic() < deadline, f"no run completed in 240 s: {states}"
            time.sleep(1)
    finally:
        _stop(serving)
        log.close()
    assert xr.open_zarr(store).sizes["time"] == 8  # the run ingested the analysis
    assert "serving 1 deployments" in (tmp_path / "serve.log").read_text()


def test_serve_needs_a_reachable_server_and_a_valid_config(tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from forecasting.config import FlowName, ServeConfig
    from workflows.flows import FLOWS
    from workflows.serve import build_deployments, load_serve_config, server_url

    nowhere = f"http://127.0.0.1:{_free_port()}/api"
    with temporary_settings(updates={PREFECT_API_URL: None}), pytest.raises(
            ForecastingError, match="needs a Prefect server.*prefect server start --host 127.0.0.1"):
        server_url()
    with temporary_settings(updates={PREFECT_API_URL: nowhere}), pytest.raises(
            ForecastingError, match="does not answer"):
        server_url()
    with pytest.raises(ConfigError, match=r"'serve\.deployments\.0\.flow': Input should be 'ingest', 'train'"):
        parse_config({"serve": {"deployments": [{"name": "a", "flow": "forcast", "cron": "* * * * *"}]}})
    with pytest.raises(ConfigError, match="give exactly one of cron and interval"):
        parse_config({"serve": {"deployments": [{"name": "a", "flow": "verify"}]}})
    bad_cron = parse_config({"deployments": [{"name": "a", "flow": "verify", "cron": "61 * * * *",
                                              "parameters": {"config": "x.yaml"}}]}, model=ServeConfig)
    with pytest.raises(ConfigError, match=r"'serve\.deployments\.0' \(a\): Invalid cron string"):
        build_deployments(bad_cron, source="serve.yaml")
    bad_parameters = parse_config({"deployments": [{"name": "a", "flow": "verify", "interval": "6h",
                                                    "parameters": {"confg": "x.yaml"}}]}, model=ServeConfig)
    with pytest.raises(ConfigError, match=r"parameters \{'confg': 'x.yaml'\} do not fit flow 'verify'"):
        build_deployments(bad_parameters, source="serve.yaml")
    with pytest.raises(ConfigError, match="has no 'serve' section"):
        load_serve_config("configs/backtest.yaml")
    deployments = build_deployments(load_serve_config("configs/serve.yaml"))
    assert [d.entrypoint for d in deployments] == ["workflows.flows.forecast_flow", "workflows.flows.verify_flow",
                                                   "workflows.flows.backtest_flow"]
    assert set(get_args(FlowName)) == set(FLOWS)  # every flow the config accepts exists, and only those
