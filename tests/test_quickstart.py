"""`forecast quickstart --fast`: the whole pipeline on the built-in data as a Prefect flow (simulate, ingest,
train every configured model, forecast, verify, compare), with a report, resumable after an interruption."""

from __future__ import annotations

import re

import pytest
import xarray as xr

from forecasting.backtest import manifest_path
from forecasting.cli import main
from forecasting.quickstart import plan_quickstart, step_names
from tests.test_workflows import prefect_harness  # noqa: F401  (the shared harness fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_quickstart_fast_runs_end_to_end_and_resumes(
    tmp_path, capsys, prefect_harness  # noqa: F811  (the shared fixture)
):
    workdir = tmp_path / "qs"
    assert main(["quickstart", "--fast", "--workdir", str(workdir), "--quiet"]) == 0
    assert str(workdir / "report.md") in capsys.readouterr().out
    report = (workdir / "report.md").read_text()
    plan = plan_quickstart(workdir, fast=True)
    names = step_names(plan)
    assert {"train graph", "train graph_ensemble", "verify graph_ensemble", "compare regional_fine"} <= set(names)
    for name in names:
        assert re.search(rf"\| {name} \| computed \| [0-9.]+ \|", report), name
    steps = plan.models["graph_ensemble"].fast_max_steps
    for expected in ("## Models", f"| graph_ensemble | graph | configs/graph.yaml | {steps} |", "### global_coarse",
                     "### regional_fine", "rmse — global", "rmse — region", "rmse — stations", "rmse — domain",
                     "| 2m_temperature | persistence |", "| 2m_temperature | graph_ensemble |",
                     "spread_skill_ratio — global", "Scorecard: graph against persistence", "## Stores"):
        assert expected in report, expected
    figures = re.findall(r"!\[[^]]*\]\(([^)]+)\)", report)
    assert len(figures) >= 8 and all((workdir / f).is_file() for f in figures)
    assert "<table>" in (workdir / "report.html").read_text()
    for store in ("global_coarse.zarr", "regional_fine.zarr", "stations.zarr"):
        assert xr.open_zarr(workdir / store).sizes["time"] == 120
    ensemble = xr.open_zarr(workdir / "forecasts" / "graph_ensemble.zarr" / "regional")
    assert ensemble.sizes["realization"] == 4 and ensemble.sizes["prediction_timedelta"] == 8
    scores = xr.open_dataset(workdir / "verification" / "comparison" / "global_coarse" / "scores.nc")
    assert set(scores["model"].values.tolist()) == {"persistence", "graph", "graph_ensemble"}
    assert set(scores["region"].values.tolist()) == {"global", "region", "stations"}

    # A run interrupted while verifying graph on the regional grid: that output has no manifest yet.
    interrupted = workdir / "verification" / "graph" / "regional_fine"
    manifest_path(interrupted).unlink()
    kept = {p: p.stat().st_mtime_ns for p in workdir.rglob("*.nc") if interrupted not in p.parents}
    assert main(["quickstart", "--fast", "--workdir", str(workdir), "--quiet"]) == 0
    report = (workdir / "report.md").read_text()
    assert re.search(r"\| verify graph \| computed \|", report)
    for name in names:
        if name != "verify graph":
            assert re.search(rf"\| {name} \| already there, not recomputed \|", report), name
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert manifest_path(interrupted).is_file()
