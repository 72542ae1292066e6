"""The quickstart pipeline on the built-in data: simulate, ingest, summarise in ``WORKDIR/report.md``.

Each step is skipped when its output already exists (unless ``overwrite``), so an interrupted run
resumes where it stopped. Later stages (training, forecasting, verification) join this pipeline as
they are built.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import xarray as xr

from forecasting.config import SimulationConfig, load_config
from forecasting.data.builtin import run_simulation
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

    report_path = workdir / "report.md"
    _write_report(report_path, config=config, train=train, stores=stores, descriptions=descriptions, timings=timings)
    return report_path


def _write_report(path: Path, *, config, train, stores, descriptions, timings) -> None:
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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
