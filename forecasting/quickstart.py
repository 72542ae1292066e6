"""The quickstart pipeline on the built-in data, summarised in ``WORKDIR/report.md`` (and ``report.html``).

Steps, in order (:func:`step_names`), each a resumable output of :func:`forecasting.backtest.run_once`:

1. ``simulate``: the built-in dataset (``simulation`` section of configs/quickstart.yaml) into ``raw/``;
2. ``ingest <store>``: analysis-ready stores ``global_coarse.zarr``, ``regional_fine.zarr``, ``stations.zarr``,
   with statistics over the first three quarters of the record (the training period);
3. ``baselines <store>``: persistence (and, on a full year, climatology) forecasts in ``forecasts/``;
4. ``train <model>``: each model of the ``quickstart.models`` list, a small version of an experiment config
   (configs/graph.yaml ...) trained on the quickstart stores into ``runs/<model>`` (:func:`model_config`);
5. ``forecast <model>``: its ensemble forecasts ``forecasts/<model>.zarr``;
6. ``verify <model>`` / ``verify <baseline> <store>``: ``forecast verify`` outputs in ``verification/<model>/
   <store>``, against the gridded truth and the stations, with a scorecard against persistence;
7. ``compare <store>``: every model and baseline of a grid side by side (tables, lead-time curves and
   scorecards, :func:`forecasting.backtest.write_summary`) in ``verification/comparison/<store>``;

and finally :func:`write_report`. Forecasts start at 00 UTC every ``start_every`` through the held-out
last quarter of the record. A step whose output is complete and made from the same settings and inputs is
not recomputed, so an interrupted run, started again, resumes at the first unfinished step; ``overwrite``
recomputes everything. The report lists every step with its wall time (and whether it was reused).
:func:`run_quickstart` runs the steps one after the other; ``workflows.flows.quickstart_flow`` runs the
same steps as Prefect tasks.
"""

from __future__ import annotations

import copy
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import xarray as xr

from forecasting.backtest import (
    StepResult,
    checkpoint_grids,
    forecast_grids,
    output_key,
    run_once,
    write_summary,
)
from forecasting.config import (
    ConfigError,
    ExperimentConfig,
    IngestConfig,
    QuickstartConfig,
    QuickstartModelConfig,
    SimulationConfig,
    load_config,
    load_yaml,
    parse_config,
)
from forecasting.errors import ForecastingError, StoreError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
QUICKSTART_CONFIG = PROJECT_ROOT / "configs" / "quickstart.yaml"

FAST_SIMULATION = {"years": 30 / 365, "spinup_days": 10.0, "nlat": 64, "nlon": 128, "n_stations": 60}
#: The quickstart's stores: name -> raw file of the simulation.
STORES = {"global_coarse": "global_coarse.nc", "regional_fine": "regional_fine.nc", "stations": "stations.parquet"}
#: Forecaster grid -> the quickstart store holding its initial conditions and truth.
GRID_STORES = {"global": "global_coarse", "regional": "regional_fine"}
BASELINES = ("persistence", "climatology")
#: Share of the record used for training and statistics; the rest is held out for verification.
TRAIN_FRACTION = 0.75
#: The quickstart's wall-time budget on 2 CPU cores (shown in the report).
BUDGET_SECONDS = 15 * 60

Log = Callable[[str], None]


@dataclass(frozen=True)
class QuickstartPlan:
    """Everything a quickstart run is made of: where, how big, which models. See :func:`plan_quickstart`."""

    workdir: Path
    fast: bool
    simulation: SimulationConfig
    settings: QuickstartConfig
    models: dict[str, QuickstartModelConfig]

    @property
    def raw(self) -> Path:
        return self.workdir / "raw"

    def store(self, name: str) -> Path:
        return self.workdir / f"{name}.zarr"

    @property
    def forecast_steps(self) -> int:
        return self.settings.fast_forecast_steps if self.fast else self.settings.forecast_steps

    @property
    def start_every(self) -> pd.Timedelta:
        return pd.Timedelta(self.settings.fast_start_every if self.fast else self.settings.start_every)

    @property
    def baselines(self) -> tuple[str, ...]:
        # a climatology needs about a year of record: the 30-day --fast run has persistence alone
        return ("persistence",) if self.fast else BASELINES


def _resolve(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else PROJECT_ROOT / p


def plan_quickstart(workdir: str | Path, *, fast: bool = False,
                    config_path: str | Path = QUICKSTART_CONFIG) -> QuickstartPlan:
    """Read the quickstart config (``simulation`` and ``quickstart`` sections) into a plan for ``workdir``.

    ``fast``: the small variant (a 30-day low-resolution simulation, ``fast_*`` settings). Raises
    ConfigError for a bad config, a model config that cannot be read, or two models with the same name.
    """
    config = load_config(config_path)
    simulation = config.simulation
    if fast:
        simulation = SimulationConfig.model_validate({**simulation.model_dump(), **FAST_SIMULATION})
    settings = config.quickstart or QuickstartConfig()
    models: dict[str, QuickstartModelConfig] = {}
    for index, entry in enumerate(settings.models):
        name = entry.name or str(load_yaml(_resolve(entry.config)).get("name") or Path(entry.config).stem)
        where = f"invalid config {config_path}: 'quickstart.models.{index}'"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ConfigError(f"{where}: name {name!r} may hold only letters, digits, '_', '.' and '-'")
        if name in models or name in BASELINES:
            raise ConfigError(
                f"{where} is named {name!r}, which {'another model' if name in models else 'a baseline'} "
                "already uses; give it another 'name'"
            )
        models[name] = entry
    return QuickstartPlan(workdir=Path(workdir), fast=fast, simulation=simulation, settings=settings, models=models)


def step_names(plan: QuickstartPlan) -> list[str]:
    """The steps of a run, in order (see the module docstring)."""
    grids = [s for s in STORES if s != "stations"]
    names = ["simulate", *[f"ingest {s}" for s in STORES], *[f"baselines {g}" for g in grids]]
    names += [f"train {m}" for m in plan.models] + [f"forecast {m}" for m in plan.models]
    names += [f"verify {b} {g}" for b in plan.baselines for g in grids] + [f"verify {m}" for m in plan.models]
    return names + [f"compare {g}" for g in grids]


@dataclass(frozen=True)
class StepRecord:
    """A finished step: its name, output, whether it ran (False: reused) and its wall time in seconds."""

    name: str
    path: Path
    computed: bool
    seconds: float


def run_step(plan: QuickstartPlan, name: str, *, overwrite: bool = False, progress: bool = False) -> StepRecord:
    """Run the step ``name`` of :func:`step_names` (its inputs must exist: run the steps in order)."""
    started = time.perf_counter()
    kind, _, what = name.partition(" ")
    if kind == "simulate":
        result = simulate(plan, overwrite=overwrite, progress=progress)
    elif kind == "ingest":
        result = ingest_store(plan, what, overwrite=overwrite, progress=progress)
    elif kind == "baselines":
        result = baseline_forecasts(plan, what, overwrite=overwrite)
    elif kind == "train":
        result = train_model(plan, what, overwrite=overwrite, progress=progress)
    elif kind == "forecast":
        result = forecast_model(plan, what, overwrite=overwrite)
    elif kind == "verify":
        model, _, store = what.partition(" ")
        result = verify_baseline(plan, model, store, overwrite=overwrite) if store else verify_model(
            plan, model, overwrite=overwrite)
    elif kind == "compare":
        result = compare(plan, what, overwrite=overwrite)
    else:
        raise ForecastingError(f"unknown quickstart step {name!r}; steps are {step_names(plan)}")
    return StepRecord(name=name, path=result.path, computed=result.computed, seconds=time.perf_counter() - started)


def run_quickstart(workdir: Path, *, fast: bool = False, overwrite: bool = False, progress: bool = True,
                   log: Log | None = None) -> Path:
    """Run every step in this process and write the report; returns ``workdir/report.md``."""
    say = log or (print if progress else (lambda _: None))
    plan = plan_quickstart(workdir, fast=fast)
    plan.workdir.mkdir(parents=True, exist_ok=True)
    records = []
    names = step_names(plan)
    for i, name in enumerate(names):
        say(f"[{i + 1}/{len(names)}] {name} ...")
        record = run_step(plan, name, overwrite=overwrite, progress=progress)
        status = "done" if record.computed else "already there"
        say(f"[{i + 1}/{len(names)}] {name}: {status} in {record.seconds:.1f} s")
        records.append(record)
    return write_report(plan, records)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def simulate(plan: QuickstartPlan, *, overwrite: bool = False, progress: bool = False) -> StepResult:
    """The built-in dataset into ``WORKDIR/raw`` (global_coarse.nc, regional_fine.nc, stations.parquet)."""
    from forecasting.data.builtin import run_simulation

    key = output_key({"simulation": plan.simulation.model_dump(mode="json")})
    return run_once(plan.raw, key=key, overwrite=overwrite,
                    make=lambda: run_simulation(plan.simulation, plan.raw, overwrite=True, progress=progress))


def train_period_of(path: Path, fraction: float = TRAIN_FRACTION) -> tuple[str, str]:
    """The first ``fraction`` of a raw simulation file's times, as the training period for statistics."""
    with xr.open_dataset(path) as ds:
        times = pd.DatetimeIndex(ds.time.values)
    last = times[max(int(len(times) * fraction) - 1, 0)]
    return (str(times[0]), str(last))


def ingest_job(job: IngestConfig, *, overwrite: bool = False, progress: bool = False,
               inputs: tuple[Path, ...] = ()) -> StepResult:
    """One ``ingest`` entry of an experiment config, skipped when its store was made from the same entry and
    inputs (its local sources, and ``inputs``: e.g. the folder they were made in)."""
    from forecasting.data.ingest import ingest
    from forecasting.data.sources import Selection

    local = [Path(s) for s in job.sources if Path(s).exists()]
    key = output_key({"ingest": job.model_dump(mode="json")}, [*inputs, *local])
    selection = Selection(
        variables=tuple(job.variables) if job.variables else None,
        levels=tuple(job.levels) if job.levels else None,
        time=job.time,
        area=job.area,
    )
    return run_once(Path(job.out), key=key, overwrite=overwrite, make=lambda: ingest(
        job.sources, Path(job.out), selection=selection, options=job.conform.to_options(), overwrite=True,
        train_period=job.train_period, dask_address=job.dask_address, progress=progress))


def ingest_store(plan: QuickstartPlan, name: str, *, overwrite: bool = False, progress: bool = False) -> StepResult:
    """Ingest the raw file of store ``name`` (:data:`STORES`) into ``WORKDIR/<name>.zarr``."""
    if name not in STORES:
        raise ForecastingError(f"unknown quickstart store {name!r}; stores are {list(STORES)}")
    source = plan.raw / STORES[name]
    if not source.exists():
        raise StoreError(f"{source} does not exist: run the 'simulate' step first")
    job = IngestConfig(sources=[str(source)], out=str(plan.store(name)),
                       train_period=train_period_of(plan.raw / STORES["global_coarse"]))
    return ingest_job(job, overwrite=overwrite, progress=progress, inputs=(plan.raw,))


def forecast_starts(plan: QuickstartPlan) -> pd.DatetimeIndex:
    """Start times at 00 UTC every ``start_every`` in the held-out part of the record that leave room for
    every lead within it."""
    with xr.open_zarr(plan.store("global_coarse"), consolidated=None) as ds:
        times = pd.DatetimeIndex(ds.time.values)
        step = pd.Timedelta(ds.attrs.get("time_step", "6h"))
    first = times[int(len(times) * TRAIN_FRACTION)].ceil("D")
    last = times[-1] - plan.forecast_steps * step
    starts = pd.date_range(first, last, freq=plan.start_every)
    if len(starts) == 0:
        raise ForecastingError(
            f"the held-out record {first} .. {times[-1]} is too short for {plan.forecast_steps} leads of {step}: "
            "simulate more days or forecast fewer steps"
        )
    return starts


def _leads(plan: QuickstartPlan, store: Path) -> pd.TimedeltaIndex:
    with xr.open_zarr(store, consolidated=None) as ds:
        step = pd.Timedelta(ds.attrs.get("time_step", "6h"))
    return pd.TimedeltaIndex([step * (k + 1) for k in range(plan.forecast_steps)])


def baseline_path(plan: QuickstartPlan, kind: str, store: str) -> Path:
    return plan.workdir / "forecasts" / f"{kind}_{store}.zarr"


def baseline_forecasts(plan: QuickstartPlan, store: str, *, overwrite: bool = False) -> StepResult:
    """The baselines' forecasts of ``store`` for the quickstart's start times; returns the last one's step."""
    from forecasting.data.store import store_train_period
    from forecasting.inference import baseline_forecast, write_forecast
    from forecasting.verification.verify import open_truth

    starts = forecast_starts(plan)
    truth_path = plan.store(store)
    leads = _leads(plan, truth_path)
    result = None
    for kind in plan.baselines:
        path = baseline_path(plan, kind, store)
        settings = {"kind": kind, "store": str(truth_path), "starts": [str(s) for s in starts],
                    "leads": [str(x) for x in leads]}

        def make(kind=kind, path=path, settings=settings) -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            forecast = baseline_forecast(open_truth(truth_path), kind=kind, init_times=starts, leads=leads,
                                         climatology_period=store_train_period(truth_path))
            write_forecast(forecast, path, model=kind, overwrite=True, config=settings)

        result = run_once(path, key=output_key(settings, [truth_path]), make=make, overwrite=overwrite)
    assert result is not None
    return result


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in, mappings key by key (a new dict; inputs untouched)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _scaled_rollout(stages: list[dict[str, int]], *, configured: int, steps: int) -> list[dict[str, int]]:
    """The rollout schedule of a ``configured``-step run shrunk to ``steps`` steps (stages that would start
    at the same step as the one before are dropped)."""
    out: list[dict[str, int]] = []
    for stage in stages:
        at = round(int(stage["at_step"]) * steps / max(configured, 1))
        if (not out or at > out[-1]["at_step"]) and at < steps:
            out.append({"at_step": at, "steps": int(stage["steps"])})
    return out or [{"at_step": 0, "steps": 1}]


def model_config(plan: QuickstartPlan, name: str) -> ExperimentConfig:
    """The experiment config of quickstart model ``name``: its YAML with the entry's overrides, the
    quickstart stores, the training period of the stores' statistics and the held-out rest as validation,
    and a run of ``max_steps`` (``fast_max_steps``, validated on one batch) steps with the rollout schedule
    scaled to it."""
    entry = plan.models[name]
    source = _resolve(entry.config)
    raw = _merge(load_yaml(source), entry.overrides)
    steps = entry.fast_max_steps if plan.fast else entry.max_steps
    _, train_end = train_period_of(plan.raw / STORES["global_coarse"])
    raw["name"] = name
    raw["data"] = {**raw.get("data", {}), "global_store": str(plan.store("global_coarse")),
                   "regional_store": str(plan.store("regional_fine"))}
    training = dict(raw.get("training") or {})
    configured = int(training.get("max_steps", steps))
    training.update({
        "train_period": [None, train_end],
        "val_period": [str(pd.Timestamp(train_end) + pd.Timedelta(hours=1)), None],
        "max_steps": steps,
        "rollout": _scaled_rollout(training.get("rollout") or [{"at_step": 0, "steps": 1}], configured=configured,
                                   steps=steps),
        "warmup_steps": min(int(training.get("warmup_steps", 0)), steps // 4),
        "val_every": min(int(training.get("val_every", steps)), steps),
        "checkpoint_every": min(int(training.get("checkpoint_every", steps)), steps),
        "log_every": min(int(training.get("log_every", steps)), steps),
        "out_dir": None,
    })
    if plan.fast:
        training["val_batches"] = 1  # enough to show a validation loss, quick on any machine
    raw["training"] = training
    return parse_config(raw, source=f"{source} (quickstart model {name!r})")


def run_dir(plan: QuickstartPlan, name: str) -> Path:
    return plan.workdir / "runs" / name


def train_once(config: ExperimentConfig, *, out_dir: str | Path, max_steps: int | None = None,
               overwrite: bool = False, progress: bool = False) -> StepResult:
    """Train ``config`` into ``out_dir`` unless a finished run of the same config (and ``max_steps``) on the
    same stores is there; a run stopped half-way continues from its last Lightning checkpoint when its
    config is unchanged (otherwise it starts again)."""
    from forecasting.training.train import LAST_CHECKPOINT, train

    out = Path(out_dir)
    resolved = config.model_dump(mode="json")
    stores = [config.data.global_store, config.data.regional_store] if config.data is not None else []
    key = output_key({"train": resolved, "max_steps": max_steps}, stores)

    def make() -> None:
        saved = out / "config.json"
        resume = (not overwrite and (out / LAST_CHECKPOINT).is_file() and saved.is_file()
                  and json.loads(saved.read_text()) == resolved)
        train(config, out_dir=out, resume=resume, overwrite=not resume, max_steps=max_steps, progress=progress)

    return run_once(out, key=key, make=make, overwrite=overwrite)


def train_model(plan: QuickstartPlan, name: str, *, overwrite: bool = False, progress: bool = False) -> StepResult:
    """Train quickstart model ``name`` (:func:`model_config`) into ``WORKDIR/runs/<name>``."""
    return train_once(model_config(plan, name), out_dir=run_dir(plan, name), overwrite=overwrite, progress=progress)


def model_forecast_path(plan: QuickstartPlan, name: str) -> Path:
    return plan.workdir / "forecasts" / f"{name}.zarr"


def forecast_model(plan: QuickstartPlan, name: str, *, overwrite: bool = False) -> StepResult:
    """Ensemble forecasts of model ``name`` for the quickstart's start times in ``forecasts/<name>.zarr``."""
    from forecasting.inference import predict

    starts = forecast_starts(plan)
    members = plan.models[name].members
    out = model_forecast_path(plan, name)
    checkpoint = run_dir(plan, name) / "model.pt"
    stores = {grid: str(plan.store(store)) for grid, store in GRID_STORES.items()}
    settings = {"forecast": name, "starts": [str(s) for s in starts], "members": members,
                "steps": plan.forecast_steps}

    def make() -> None:
        if not checkpoint.is_file():
            raise StoreError(f"{checkpoint} does not exist: run the 'train {name}' step first")
        out.parent.mkdir(parents=True, exist_ok=True)
        predict(checkpoint, starts=starts, members=members, steps=plan.forecast_steps, out=out,
                stores={g: stores[g] for g in checkpoint_grids(checkpoint)}, overwrite=True)

    return run_once(out, key=output_key(settings, [run_dir(plan, name)]), make=make, overwrite=overwrite)


# ----------------------------------------------------------------------------------------------
# Verification
# ----------------------------------------------------------------------------------------------
def verification_path(plan: QuickstartPlan, model: str, store: str) -> Path:
    return plan.workdir / "verification" / model / store


def _regions(plan: QuickstartPlan, store: str) -> dict[str, tuple[float, float, float, float]] | None:
    return {"region": plan.simulation.region.as_tuple()} if store == "global_coarse" else None


def _verify(plan: QuickstartPlan, forecast: Path, *, out: Path, store: str, reference: str | None,
            inputs: list[Path], overwrite: bool) -> StepResult:
    from forecasting.verification.verify import verify

    settings = {"verify": str(forecast), "store": store, "reference": reference,
                "bootstrap": plan.settings.bootstrap, "regions": _regions(plan, store)}

    def make() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        verify(forecast, out_dir=out, truth_path=plan.store(store), observations_path=plan.store("stations"),
               reference=reference, regions=_regions(plan, store), n_resamples=plan.settings.bootstrap,
               overwrite=True, plots=False)

    key = output_key(settings, [*inputs, plan.store(store), plan.store("stations")])
    return run_once(out, key=key, make=make, overwrite=overwrite)


def verify_baseline(plan: QuickstartPlan, kind: str, store: str, *, overwrite: bool = False) -> StepResult:
    """Verify a baseline's forecasts of ``store`` (climatology with persistence as the scorecard reference)."""
    forecast = baseline_path(plan, kind, store)
    reference = None if kind == "persistence" else baseline_path(plan, "persistence", store)
    return _verify(plan, forecast, out=verification_path(plan, kind, store), store=store,
                   reference=str(reference) if reference else None,
                   inputs=[forecast, *([reference] if reference else [])], overwrite=overwrite)


def verify_model(plan: QuickstartPlan, name: str, *, overwrite: bool = False) -> StepResult:
    """Verify model ``name`` on each grid it forecasts, with persistence as the scorecard reference."""
    forecast = model_forecast_path(plan, name)
    if not forecast.exists():
        raise StoreError(f"{forecast} does not exist: run the 'forecast {name}' step first")
    results = []
    for grid, path in forecast_grids(forecast).items():
        store = GRID_STORES[grid]
        reference = baseline_path(plan, "persistence", store)
        results.append(_verify(plan, path, out=verification_path(plan, name, store), store=store,
                               reference=str(reference), inputs=[forecast, reference], overwrite=overwrite))
    return StepResult(plan.workdir / "verification" / name, any(r.computed for r in results),
                      sum(r.seconds for r in results))


def comparison_path(plan: QuickstartPlan, store: str) -> Path:
    return plan.workdir / "verification" / "comparison" / store


def _verified(plan: QuickstartPlan, store: str) -> dict[str, Path]:
    """Model or baseline -> its verification folder on ``store``, for those that forecast that grid."""
    names = [*plan.baselines, *plan.models]
    return {n: verification_path(plan, n, store) for n in names if verification_path(plan, n, store).exists()}


def compare(plan: QuickstartPlan, store: str, *, overwrite: bool = False) -> StepResult:
    """Every model and baseline verified on ``store`` side by side in ``verification/comparison/<store>``:
    score tables, lead-time curves, and the scorecards of the trained models against persistence."""
    folders = _verified(plan, store)
    if not folders:
        raise StoreError(f"nothing was verified on {store}: run the 'verify' steps first")
    out = comparison_path(plan, store)

    def make() -> None:
        parts, cards = [], {}
        for name, folder in folders.items():
            with xr.open_dataset(folder / "scores.nc") as ds:
                scores = ds.load()
            parts.append(scores.sel(model=[name]) if name in scores["model"].values else scores)
            if name in plan.models and (folder / "scorecard.nc").exists():
                with xr.open_dataset(folder / "scorecard.nc") as card:
                    cards[f"{name}_vs_persistence"] = card.load()
        combined = xr.concat(parts, dim="model", join="outer", coords="minimal", compat="override",
                             data_vars="all")
        intro = (f"Models and baselines on the `{store}` grid: {', '.join(folders)}; "
                 f"{len(forecast_starts(plan))} start times from the held-out part of the record.")
        write_summary(out, scores=combined, scorecards=cards, title=f"Comparison on {store}", intro=intro)

    key = output_key({"compare": store, "models": list(folders)}, list(folders.values()))
    return run_once(out, key=key, make=make, overwrite=overwrite)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def _last_losses(folder: Path) -> dict[str, float]:
    """The last logged ``train/loss`` and ``val/loss`` of a run (from its CSV logs)."""
    files = sorted(folder.glob("logs/version_*/metrics.csv"))
    out: dict[str, float] = {}
    for path in files:
        frame = pd.read_csv(path)
        for column in ("train/loss", "val/loss"):
            if column in frame and frame[column].notna().any():
                out[column] = float(frame[column].dropna().iloc[-1])
    return out


def write_report(plan: QuickstartPlan, records: list[StepRecord]) -> Path:
    """Write ``WORKDIR/report.md`` and ``WORKDIR/report.html`` from the finished steps; returns report.md."""
    from forecasting.data.ingest import describe_store

    sim = plan.simulation
    total = sum(r.seconds for r in records)
    lines = [
        "# Quickstart report",
        "",
        (f"Built-in data: {sim.years * 365:.0f} simulated days after {sim.spinup_days:.0f} days of spin-up, "
         f"model grid {sim.nlat} x {sim.nlon}, seed {sim.seed}, {sim.n_stations} stations; regional box lat "
         f"{sim.region.lat_min}..{sim.region.lat_max}, lon {sim.region.lon_min}..{sim.region.lon_max}"
         f"{' (--fast variant)' if plan.fast else ''}. The first {TRAIN_FRACTION:.0%} of the record is the "
         f"training period (normalisation statistics, model training); forecasts start at 00 UTC every "
         f"{plan.start_every / pd.Timedelta(hours=1):g} h through the rest and run {plan.forecast_steps} steps."),
        "",
        "## Timings",
        "",
        (f"Time spent in the steps of this run: {total:.0f} s (the budget of the whole quickstart is "
         f"{BUDGET_SECONDS / 60:.0f} minutes on 2 CPU cores). A step already done by an earlier run with the same "
         "settings is reused, not recomputed."),
        "",
        "| step | status | seconds |",
        "|---|---|---:|",
        *[f"| {r.name} | {'computed' if r.computed else 'already there, not recomputed'} | {r.seconds:.1f} |"
          for r in records],
    ]
    if plan.models:
        header = "| model | family | config | steps | last train loss | last val loss | members | checkpoint |"
        lines += ["", "## Models", "", header, "|---|---|---|---:|---:|---:|---:|---|"]
        for name, entry in plan.models.items():
            config = model_config(plan, name)
            losses = _last_losses(run_dir(plan, name))
            family = config.model.family if config.model is not None else "?"
            steps = config.training.max_steps if config.training is not None else "?"
            lines.append(
                f"| {name} | {family} | {entry.config} | {steps} | {losses.get('train/loss', float('nan')):.4g} | "
                f"{losses.get('val/loss', float('nan')):.4g} | {entry.members} | "
                f"{(run_dir(plan, name) / 'model.pt').relative_to(plan.workdir)} |"
            )
    lines += ["", "## Verification", "",
              ("Every model and baseline scored against the gridded truth and the stations over the held-out start "
               "times, with scorecards of the trained models against persistence. Full outputs (scores.nc, "
               "scores.csv, scorecard, per-station scores) are in `verification/<model>/<store>/`.")]
    for store in (s for s in STORES if s != "stations"):
        folder = comparison_path(plan, store)
        if not (folder / "summary.md").exists():
            continue
        summary = (folder / "summary.md").read_text()
        body = summary.split("\n", 1)[1] if summary.startswith("# ") else summary
        body = body.replace("](plots/", f"]({folder.relative_to(plan.workdir).as_posix()}/plots/")
        lines += ["", f"### {store}", "", body.replace("\n### ", "\n#### ").strip()]
    lines += ["", "## Stores"]
    for name in STORES:
        out = plan.store(name)
        if out.exists():
            lines += ["", f"### {name}", "", "```", describe_store(out), "```"]
        qc = out.with_name(out.name + ".qc.md")
        if qc.exists():
            lines += ["", f"QC report: [{qc.name}]({qc.name})"]
    text = "\n".join(lines) + "\n"
    path = plan.workdir / "report.md"
    _write_text(path, text)
    _write_text(plan.workdir / "report.html", _html(text, title="Quickstart report"))
    return path


def _html(markdown: str, *, title: str) -> str:
    """A standalone HTML page of the report (markdown-it, which rich already depends on)."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(markdown)
    style = ("body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 6px}"
             "img{max-width:48%;margin:2px}pre{background:#f6f6f6;padding:.5em;overflow-x:auto}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title>"
            f"<style>{style}</style></head><body>\n{body}</body></html>\n")


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
