"""The quickstart pipeline on the built-in data, summarised in ``WORKDIR/report.md``:

simulate the built-in dataset, ingest it (coarse global, fine regional, stations), make persistence and
climatology forecasts for the held-out last quarter of the record, and verify them against the gridded
truth and the stations (scores, scorecard, plots). Each step is skipped when its output already exists
(unless ``overwrite``), so an interrupted run resumes where it stopped. Training the learned forecasters
joins this pipeline as the orchestration issue wires it in (``forecast train configs/graph.yaml`` works
on the stores this writes).
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import xarray as xr

from forecasting.config import SimulationConfig, load_config
from forecasting.data.builtin import run_simulation
from forecasting.data.store import store_train_period
from forecasting.data.ingest import describe_store, ingest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
QUICKSTART_CONFIG = PROJECT_ROOT / "configs" / "quickstart.yaml"

FAST_SIMULATION = {"years": 30 / 365, "spinup_days": 10.0, "nlat": 64, "nlon": 128, "n_stations": 60}


def quickstart_simulation_config(*, fast: bool) -> SimulationConfig:
    """The quickstart's simulation settings: the YAML's, or a small, quick variant for tests."""
    base = load_config(QUICKSTART_CONFIG).simulation if QUICKSTART_CONFIG.exists() else SimulationConfig()
    if not fast:
        return base
    return SimulationConfig.model_validate({**base.model_dump(), **FAST_SIMULATION})


def train_period_of(path: Path, fraction: float = 0.75) -> tuple[str, str]:
    """The first ``fraction`` of a raw simulation file's times, as the training period for statistics."""
    with xr.open_dataset(path) as ds:
        times = pd.DatetimeIndex(ds.time.values)
    last = times[max(int(len(times) * fraction) - 1, 0)]
    return (str(times[0]), str(last))


def run_quickstart(workdir: Path, *, fast: bool = False, overwrite: bool = False, progress: bool = True) -> Path:
    """Run the pipeline into ``workdir`` and return the path of ``workdir/report.md``."""
    workdir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    config = quickstart_simulation_config(fast=fast)

    raw = workdir / "raw"
    t0 = time.perf_counter()
    if overwrite or not (raw / "simulation.json").exists():
        run_simulation(config, raw, overwrite=True, progress=progress)
    timings["simulate"] = time.perf_counter() - t0

    train = train_period_of(raw / "global_coarse.nc")
    stores = {
        "global_coarse": (raw / "global_coarse.nc", workdir / "global_coarse.zarr"),
        "regional_fine": (raw / "regional_fine.nc", workdir / "regional_fine.zarr"),
        "stations": (raw / "stations.parquet", workdir / "stations.zarr"),
    }
    descriptions: dict[str, str] = {}
    for name, (source, out) in stores.items():
        t0 = time.perf_counter()
        if overwrite or not out.exists():
            report = ingest([str(source)], out, overwrite=True, train_period=train, progress=progress)
            descriptions[name] = report.describe()
        else:
            descriptions[name] = f"{out} (already there, not recomputed)"
        timings[f"ingest {name}"] = time.perf_counter() - t0

    verifications = {}
    for grid in ("global_coarse", "regional_fine"):
        t0 = time.perf_counter()
        verifications[grid] = _baselines_and_verify(workdir, grid=grid, fast=fast, overwrite=overwrite)
        timings[f"baselines + verify {grid}"] = time.perf_counter() - t0

    report_path = workdir / "report.md"
    _write_report(report_path, config=config, train=train, stores=stores, descriptions=descriptions, timings=timings,
                  verifications=verifications)
    return report_path


def test_starts(store: Path, *, lead_days: float, fraction: float = 0.75) -> pd.DatetimeIndex:
    """Daily 00 UTC start times in the held-out part of the record that leave room for ``lead_days``."""
    with xr.open_zarr(store) as ds:
        times = pd.DatetimeIndex(ds.time.values)
    first = times[int(len(times) * fraction)].ceil("D")
    last = times[-1] - pd.Timedelta(days=lead_days)
    return pd.date_range(first, last, freq="1D")


def _baselines_and_verify(workdir: Path, *, grid: str, fast: bool, overwrite: bool) -> Path:
    """Persistence and climatology forecasts for the held-out starts, verified (climatology vs persistence)."""
    from forecasting.inference import baseline_forecast, write_forecast
    from forecasting.verification.verify import open_truth, verify

    steps = 8 if fast else 20  # 2 or 5 days of 6-hourly leads
    store = workdir / f"{grid}.zarr"
    out = workdir / "verification" / grid
    if out.exists() and not overwrite:
        return out
    starts = test_starts(store, lead_days=steps / 4)
    truth = open_truth(store)
    leads = pd.to_timedelta([6 * (i + 1) for i in range(steps)], unit="h")
    period = store_train_period(store)
    forecasts = {}
    # a climatology needs about a year of record: the 30-day --fast run verifies persistence alone
    kinds = ("persistence",) if fast else ("persistence", "climatology")
    for kind in kinds:
        path = workdir / "forecasts" / f"{kind}_{grid}.zarr"
        if overwrite or not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fc = baseline_forecast(truth, kind=kind, init_times=starts, leads=leads, climatology_period=period)
            write_forecast(fc, path, model=kind, overwrite=True, config={"kind": kind, "store": str(store)})
        forecasts[kind] = path
    out.parent.mkdir(parents=True, exist_ok=True)
    model, reference = ("persistence", None) if fast else ("climatology", "persistence")
    config = quickstart_simulation_config(fast=fast)
    regions = {"region": config.region.as_tuple()} if grid == "global_coarse" else None
    verify(forecasts[model], out_dir=out, truth_path=store, observations_path=workdir / "stations.zarr",
           reference=reference, regions=regions, n_resamples=500, overwrite=True, plots=True)
    return out


def _write_report(path: Path, *, config, train, stores, descriptions, timings, verifications) -> None:
    lines = [
        "# Quickstart report",
        "",
        f"Built-in data: {config.years * 365:.0f} simulated days after {config.spinup_days:.0f} days of spin-up, "
        f"model grid {config.nlat} x {config.nlon}, seed {config.seed}, {config.n_stations} stations; "
        f"regional box lat {config.region.lat_min}..{config.region.lat_max}, "
        f"lon {config.region.lon_min}..{config.region.lon_max}.",
        f"Training period used for normalisation statistics: {train[0]} to {train[1]}.",
        "",
        "## Timings",
        "",
        "| step | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.1f} |" for k, v in timings.items()],
        "",
        "## Stores",
    ]
    for name, (_, out) in stores.items():
        lines += ["", f"### {name}", "", "```", descriptions[name], "", describe_store(out), "```"]
        qc = out.with_name(out.name + ".qc.md")
        if qc.exists():
            lines += ["", f"QC report: [{qc.name}]({qc.name})"]
    lines += ["", "## Verification of the baselines", "",
              "Baseline forecasts (climatology, with persistence as the scorecard reference; persistence alone in "
              "the --fast run) scored against the truth and the stations, for daily starts in the held-out last "
              "quarter of the record."]
    for grid, folder in verifications.items():
        summary = (folder / "summary.md").read_text()
        body = summary.split("\n", 1)[1] if summary.startswith("# ") else summary
        body = body.replace("](plots/", f"](verification/{grid}/plots/")
        lines += ["", f"### {grid}", "", body.replace("\n## ", "\n#### ")]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
