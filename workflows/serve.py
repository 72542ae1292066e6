"""``forecast serve CONFIG``: deployments of the flows on cron schedules, served against a Prefect server.

CONFIG (the ``serve`` section of configs/serve.yaml, :class:`forecasting.config.ServeConfig`) lists
deployments: a ``name``, the ``flow`` (a key of :data:`workflows.flows.FLOWS`), a ``cron`` schedule
(``"0 */6 * * *"``; ``timezone``, UTC by default) or an ``interval`` (``6h``), and the flow's
``parameters`` (e.g. ``{config: configs/backtest.yaml}``).
:func:`serve_deployments` registers them with the server at ``PREFECT_API_URL`` and runs their flow runs
in this process's runner until it is stopped (Ctrl-C or SIGTERM). Schedules need a real server (``prefect
server start --host 127.0.0.1``): Prefect's temporary server never runs scheduled flows, so serving
without ``PREFECT_API_URL`` is refused with a message saying how to start one.
"""

from __future__ import annotations

import datetime as dt

import httpx
import pandas as pd
from prefect import serve
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.exceptions import ParameterTypeError, SignatureMismatchError
from prefect.schedules import Cron, Interval
from prefect.settings import PREFECT_API_URL
from pydantic import ValidationError

from forecasting.config import ConfigError, ServeConfig, load_config
from forecasting.errors import ForecastingError
from workflows.flows import FLOWS


def build_deployments(config: ServeConfig, *, source: str = "<serve config>") -> list[RunnerDeployment]:
    """One RunnerDeployment per entry, its parameters checked against the flow's signature.

    The flows are referenced by module path (``workflows.flows.forecast_flow``), so the runner finds them
    from any working directory where the package is installed. Raises ConfigError naming the deployment
    for a bad schedule or parameters.
    """
    deployments = []
    for index, spec in enumerate(config.deployments):
        where = f"invalid config {source}: 'serve.deployments.{index}' ({spec.name})"
        flow = FLOWS[spec.flow]
        try:
            flow.validate_parameters(dict(spec.parameters))
        except (ParameterTypeError, SignatureMismatchError) as exc:
            raise ConfigError(f"{where}: parameters {spec.parameters} do not fit flow {spec.flow!r}: {exc}") from None
        try:
            if spec.cron is not None:
                schedule = Cron(spec.cron, timezone=spec.timezone)
            else:
                every = dt.timedelta(seconds=pd.Timedelta(spec.interval).total_seconds())
                schedule = Interval(every, timezone=spec.timezone)
            deployments.append(flow.to_deployment(
                name=spec.name, parameters=dict(spec.parameters), description=spec.description,
                entrypoint_type=EntrypointType.MODULE_PATH, schedule=schedule,
            ))
        except (ValueError, ValidationError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return deployments


def server_url() -> str:
    """The Prefect server at ``PREFECT_API_URL``, checked to answer; ForecastingError saying how to start one."""
    url = PREFECT_API_URL.value()
    how = ("start one with `prefect server start --host 127.0.0.1` and point this shell at it with "
           "`export PREFECT_API_URL=http://127.0.0.1:4200/api`")
    if not url:
        raise ForecastingError(
            f"forecast serve needs a Prefect server (scheduled runs never start on Prefect's temporary one): {how}"
        )
    try:
        response = httpx.get(f"{url.rstrip('/')}/health", timeout=10)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise ForecastingError(f"the Prefect server at PREFECT_API_URL={url} does not answer ({exc}); {how}") from None
    return url


def load_serve_config(path: str) -> ServeConfig:
    """The ``serve`` section of the experiment config at ``path`` (ConfigError naming the file when absent)."""
    section = load_config(path).serve
    if section is None:
        raise ConfigError(f"config {path} has no 'serve' section (deployments; see configs/serve.yaml)")
    return section


def serve_deployments(config_path: str) -> None:
    """Register the deployments of ``config_path`` with the server and run their flow runs until stopped."""
    config = load_serve_config(config_path)
    deployments = build_deployments(config, source=config_path)
    url = server_url()
    print(f"serving {len(deployments)} deployments against {url}: "
          + ", ".join(f"{d.flow_name}/{d.name}" for d in deployments))
    print(f"watch them in the Prefect UI at {url.rstrip('/').removesuffix('/api')}; stop with Ctrl-C")
    serve(*deployments, limit=config.limit)
