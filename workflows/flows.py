"""The flows: thin Prefect wrappers over the library, one task per resumable output.

=============  =================================================================================
flow           what it runs (library functions)
=============  =================================================================================
``ingest``     every ``ingest`` entry of an experiment config (:func:`forecasting.quickstart.ingest_job`)
``train``      ``forecast train`` of an experiment config (:func:`forecasting.quickstart.train_once`)
``forecast``   one start time of a ``forecast`` config section (configs/backtest.yaml): the latest analysis
               (or ``start``) in, ``OUT/forecasts/<start>.zarr`` out, then the verification of every
               earlier forecast the truth now covers (:mod:`forecasting.backtest` forecast cycle)
``verify``     only that verification (e.g. nightly)
``backtest``   every start time of a forecast-run config on a Dask cluster, scores streamed to
               ``OUT/scores/<start>.nc``, then the summary (:func:`forecasting.backtest.score_start` ...)
``quickstart`` the quickstart pipeline (:mod:`forecasting.quickstart`), one task per step
``downscale``  a coarse forecast to the fine regional grid (:mod:`workflows.downscale`)
=============  =================================================================================

Every flow but two takes the path of its config, so a deployment re-reads the config at each run
(``quickstart`` takes the work directory, ``downscale`` its paths and settings). Tasks pass paths and
validated configs and return :class:`StepResult` records (path, whether it was computed now, seconds),
never arrays. Tasks that read and write files retry (:data:`IO_RETRIES`) unless the error is bad input
(a ForecastingError); a retry is safe because every output is written atomically and skipped once its
manifest says it is finished. Prefect's own result caching is off (``NO_CACHE``): the library's
manifests, keyed on the inputs and a hash of the config, decide what is recomputed, with or without
Prefect.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import ParameterTypeError, SignatureMismatchError
from prefect.futures import as_completed

from forecasting import backtest as bt
from forecasting import quickstart as qs
from forecasting.backtest import StepResult
from forecasting.config import (
    ConfigError,
    ExperimentConfig,
    ForecastRunConfig,
    IngestConfig,
    load_config,
)
from forecasting.errors import ForecastingError
from workflows.downscale import downscale_flow
from workflows.runtime import dask_task_runner, exported_api_url, worker_threads

#: Retries of tasks that read and write files, and the seconds between them.
IO_RETRIES = 2
RETRY_DELAY_SECONDS = 5
#: Start times of a backtest in flight per Dask worker thread.
IN_FLIGHT_PER_THREAD = 2



def _transient(task, task_run, state) -> bool:
    """Retry failures of reading and writing, not bad input: a ForecastingError says what to fix, and a
    retry cannot fix it."""
    try:
        state.result(raise_on_failure=True)
    except ForecastingError:
        return False
    except Exception:  # noqa: BLE001  (anything else may be transient: a busy disk, a dropped connection)
        return True
    return False


_TASK = {"cache_policy": NO_CACHE, "persist_result": False}
_IO = {**_TASK, "retries": IO_RETRIES, "retry_delay_seconds": RETRY_DELAY_SECONDS, "retry_condition_fn": _transient}


def _log(message: str) -> None:
    get_run_logger().info(message)


def _status(result: StepResult) -> str:
    return f"{result.path}: {'done' if result.computed else 'already there'} ({result.seconds:.1f} s)"


# ----------------------------------------------------------------------------------------------
# ingest, train
# ----------------------------------------------------------------------------------------------
@task(name="ingest-store", task_run_name="ingest {job.out}", **_IO)
def ingest_task(job: IngestConfig, overwrite: bool = False) -> StepResult:
    return qs.ingest_job(job, overwrite=overwrite)


@flow(name="ingest")
def ingest_flow(config: str, overwrite: bool = False) -> list[str]:
    """Ingest every ``ingest`` entry of the experiment config ``config`` (stores already made are kept)."""
    jobs = load_config(config).ingest
    if not jobs:
        raise ConfigError(f"config {config} has no 'ingest' entries")
    results = [ingest_task(job, overwrite) for job in jobs]
    for result in results:
        _log(_status(result))
    return [str(r.path) for r in results]


@task(name="train-model", task_run_name="train {out_dir}", **_TASK)
def train_task(experiment: ExperimentConfig, out_dir: str, max_steps: int | None, overwrite: bool) -> StepResult:
    return qs.train_once(experiment, out_dir=out_dir, max_steps=max_steps, overwrite=overwrite)


@flow(name="train")
def train_flow(config: str, out: str | None = None, max_steps: int | None = None, overwrite: bool = False) -> str:
    """Train the model of ``config`` into ``out`` (default ``training.out_dir``, else ``runs/<name>``); a
    finished run is kept, a stopped one continues from its last checkpoint."""
    experiment = load_config(config)
    if experiment.training is None:
        raise ConfigError(f"training needs a 'training' section in the config {config}")
    out_dir = out or experiment.training.out_dir or str(Path("runs") / experiment.name)
    result = train_task(experiment, out_dir, max_steps, overwrite)
    _log(_status(result))
    return str(result.path / "model.pt")


# ----------------------------------------------------------------------------------------------
# The forecast cycle
# ----------------------------------------------------------------------------------------------
@task(name="forecast-start", **_IO)
def forecast_task(run: ForecastRunConfig, start: str | None, overwrite: bool) -> StepResult:
    return bt.forecast_start(run, start, overwrite=overwrite)


@task(name="pending-verifications", **_IO)
def pending_task(run: ForecastRunConfig) -> list[str]:
    return [str(s) for s in bt.pending_verifications(run)]


@task(name="verify-forecast", task_run_name="verify {start}", **_IO)
def verify_task(run: ForecastRunConfig, start: str, overwrite: bool) -> StepResult:
    return bt.verify_run(run, start, overwrite=overwrite)


def _verify_pending(run: ForecastRunConfig, overwrite: bool) -> list[str]:
    pending = pending_task(run)
    _log(f"{len(pending)} earlier forecasts can be verified now: {pending}")
    return [str(verify_task(run, start, overwrite).path) for start in pending]


@flow(name="forecast")
def forecast_flow(config: str, start: str | None = None, overwrite: bool = False) -> dict[str, object]:
    """One forecast of the model of ``config``'s ``forecast`` section from the latest analysis
    time in its stores (or ``start``) into ``OUT/forecasts/<start>.zarr``, then the verification of every
    earlier forecast whose leads the truth now covers."""
    run = bt.load_forecast_run(config)
    made = forecast_task(run, start, overwrite)
    _log(_status(made))
    return {"forecast": str(made.path), "verified": _verify_pending(run, overwrite)}


@flow(name="verify")
def verify_flow(config: str, overwrite: bool = False) -> list[str]:
    """Verify every forecast of ``OUT/forecasts`` whose leads the truth now covers and that is not verified."""
    return _verify_pending(bt.load_forecast_run(config), overwrite)


# ----------------------------------------------------------------------------------------------
# Backtest
# ----------------------------------------------------------------------------------------------
@task(name="backtest-plan", **_IO)
def backtest_plan_task(run: ForecastRunConfig, overwrite: bool) -> list[str]:
    """Check the start times against the stores, compute the climatologies, clear a killed run's temporaries."""
    starts = bt.backtest_starts(run)
    bt.prepare_backtest(run, overwrite=overwrite)
    for folder in ("scores", "forecasts"):
        bt.remove_stale_temporaries(Path(run.out) / folder)
    return [str(s) for s in starts]


@task(name="score-start", task_run_name="score {start}", **_IO)
def score_task(run: ForecastRunConfig, start: str, overwrite: bool) -> StepResult:
    return bt.score_start(run, start, overwrite=overwrite)


@task(name="backtest-summary", **_IO)
def summary_task(run: ForecastRunConfig, starts: list[str], overwrite: bool) -> StepResult:
    return bt.summarise_backtest(run, pd.DatetimeIndex(starts), overwrite=overwrite)


@flow(name="backtest-start-times")
def score_starts_flow(run: ForecastRunConfig, starts: list[str], overwrite: bool = False) -> dict[str, bool]:
    """Score ``starts`` on this flow's task runner, :data:`IN_FLIGHT_PER_THREAD` per worker thread at a time
    (memory stays flat however many start times there are); start -> computed now (False: its scores were
    there already)."""
    in_flight = IN_FLIGHT_PER_THREAD * worker_threads()
    done: dict[str, bool] = {}
    for first in range(0, len(starts), in_flight):
        batch = {start: score_task.submit(run, start, overwrite) for start in starts[first:first + in_flight]}
        start_of = {id(future): start for start, future in batch.items()}
        for future in as_completed(list(batch.values())):
            done[start_of[id(future)]] = future.result().computed
        _log(f"scored {len(done)}/{len(starts)} start times ({sum(done.values())} computed now)")
    return done


@flow(name="backtest")
def backtest_flow(config: str, overwrite: bool = False, address: str | None = None,
                  workers: int | None = None) -> dict[str, object]:
    """Score every start time of ``config``'s ``forecast`` section on a Dask cluster, then write the
    summary; start times already scored are skipped, so an interrupted backtest run again computes only
    the missing ones. The cluster: the scheduler at ``address`` (else the config's ``dask.address``), or a
    LocalCluster of ``workers`` (else ``dask.n_workers``) workers."""
    run = bt.load_forecast_run(config)
    update = {k: v for k, v in {"address": address, "n_workers": workers}.items() if v is not None}
    if update:
        run = run.model_copy(update={"dask": run.dask.model_copy(update=update)})
    starts = backtest_plan_task(run, overwrite)
    with exported_api_url():  # LocalCluster worker processes must talk to this flow's API
        done = score_starts_flow.with_options(task_runner=dask_task_runner(run.dask))(run, starts, overwrite)
    summary = summary_task(run, starts, overwrite)
    computed = sorted(s for s, now in done.items() if now)
    _log(f"backtest of {len(starts)} start times: {len(computed)} scored now, {len(starts) - len(computed)} "
         f"already scored; summary {summary.path / 'summary.md'}")
    return {"summary": str(summary.path), "computed": computed,
            "reused": sorted(s for s, now in done.items() if not now)}


# ----------------------------------------------------------------------------------------------
# Quickstart
# ----------------------------------------------------------------------------------------------
#: Quickstart steps that only read and write files (retried); training is not retried (it resumes).
_IO_STEPS = ("simulate", "ingest", "baselines", "forecast", "verify", "compare")


@task(name="quickstart-step", **_TASK)
def quickstart_step(plan: qs.QuickstartPlan, name: str, overwrite: bool, progress: bool) -> qs.StepRecord:
    return qs.run_step(plan, name, overwrite=overwrite, progress=progress)


@task(name="quickstart-report", **_IO)
def quickstart_report(plan: qs.QuickstartPlan, records: list[qs.StepRecord]) -> str:
    return str(qs.write_report(plan, records))


@flow(name="quickstart")
def quickstart_flow(workdir: str = "data/quickstart", fast: bool = False, overwrite: bool = False,
                    progress: bool = False) -> str:
    """The whole pipeline on the built-in data into ``workdir`` (see forecasting.quickstart); returns the
    path of ``report.md``. Steps already done are reused."""
    plan = qs.plan_quickstart(workdir, fast=fast)
    plan.workdir.mkdir(parents=True, exist_ok=True)
    names = qs.step_names(plan)
    records = []
    for i, name in enumerate(names):
        retries = IO_RETRIES if name.split(" ", 1)[0] in _IO_STEPS else 0
        step = quickstart_step.with_options(task_run_name=name, retries=retries,
                                            retry_delay_seconds=RETRY_DELAY_SECONDS, retry_condition_fn=_transient)
        record = step(plan, name, overwrite, progress)
        _log(f"[{i + 1}/{len(names)}] {name}: {'done' if record.computed else 'already there'} "
             f"in {record.seconds:.1f} s")
        records.append(record)
    return quickstart_report(plan, records)


#: Flows by name, for ``forecast flow NAME`` and the ``flow`` key of ``forecast serve`` deployments
#: (forecasting.config.FlowName lists the same names).
FLOWS = {
    "ingest": ingest_flow,
    "train": train_flow,
    "forecast": forecast_flow,
    "verify": verify_flow,
    "backtest": backtest_flow,
    "quickstart": quickstart_flow,
    "downscale": downscale_flow,
}


def run_flow(name: str, parameters: dict[str, object]) -> object:
    """Run the flow ``name`` of :data:`FLOWS` with ``parameters``, checked against its signature first.

    Raises ForecastingError naming the flow and the parameter that does not fit.
    """
    chosen = FLOWS[name]
    try:
        chosen.validate_parameters(parameters)
    except (ParameterTypeError, SignatureMismatchError) as exc:
        raise ForecastingError(f"flow {name}: {exc}") from None
    return chosen(**parameters)
