"""Prefect flows and deployments: the only package that imports Prefect.

Each flow is a thin wrapper over functions of the ``forecasting`` library, which are tested without Prefect:
tasks pass paths and configs, never arrays; finished outputs are recorded by the library's manifests
(:func:`forecasting.backtest.run_once`), so a flow run again skips them and a flow that died half-way
resumes at the first unfinished output.

* :mod:`workflows.flows`: the flows (``ingest``, ``train``, ``forecast``, ``verify``, ``backtest``,
  ``quickstart``) and :data:`workflows.flows.FLOWS`, the registry ``forecast flow`` and ``forecast serve`` use;
* :mod:`workflows.runtime`: the Dask task runner of backtests and the Prefect API a flow talks to;
* :mod:`workflows.serve`: deployments with cron schedules served against a Prefect server.

Without ``PREFECT_API_URL`` a flow starts Prefect's temporary local server: no set-up is needed. Prefect
reads its settings when first imported, so the defaults below are set here, before any submodule imports
it: no usage analytics (the machine may be offline) and a start-up timeout for the temporary server that
a loaded 2-core machine meets (the default 20 s is tight). Both can be overridden in the environment.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
