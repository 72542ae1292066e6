"""Where flows run: the Prefect API a flow talks to, and the Dask task runner that fans out a backtest.

A backtest's start times run on a ``prefect_dask.DaskTaskRunner``: on the Dask scheduler at
``dask.address`` of the config, or on a ``distributed.LocalCluster`` it starts. Worker processes of a
LocalCluster talk to the Prefect API themselves; without ``PREFECT_API_URL`` in their environment each
would start a temporary Prefect server of its own and leave it running, so :func:`exported_api_url`
exports the API of the running flow for as long as the cluster lives.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.context import FlowRunContext
from prefect.settings import PREFECT_API_URL
from prefect_dask import DaskTaskRunner

from forecasting.config import DaskConfig


def current_api_url() -> str | None:
    """The Prefect API of the running flow (the temporary server's too), else ``PREFECT_API_URL``."""
    context = FlowRunContext.get()
    client = getattr(context, "client", None)
    if client is not None:
        return str(client.api_url).rstrip("/")
    return PREFECT_API_URL.value() or None


@contextmanager
def exported_api_url() -> Iterator[str | None]:
    """Export the running flow's API as ``PREFECT_API_URL`` (for processes started meanwhile); restore after."""
    url = current_api_url()
    before = os.environ.get("PREFECT_API_URL")
    if url is not None:
        os.environ["PREFECT_API_URL"] = url
    try:
        yield url
    finally:
        if before is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = before


def worker_threads() -> int:
    """Worker threads of the running flow's Dask cluster, once it has one worker (1 without a cluster)."""
    runner = getattr(FlowRunContext.get(), "task_runner", None)
    if not isinstance(runner, DaskTaskRunner):
        return 1
    client = runner.client
    client.wait_for_workers(1, timeout=300)
    return max(sum(client.nthreads().values()), 1)


def dask_task_runner(settings: DaskConfig) -> DaskTaskRunner:
    """A task runner on the scheduler at ``settings.address``, or on a LocalCluster sized by ``settings``."""
    if settings.address:
        return DaskTaskRunner(address=settings.address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": settings.n_workers,
            "threads_per_worker": settings.threads_per_worker,
            "processes": settings.processes,
            "dashboard_address": None,
        },
    )
