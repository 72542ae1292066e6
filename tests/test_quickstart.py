"""`forecast quickstart --fast`: the whole pipeline on the built-in data, resumable, with a report."""

from __future__ import annotations

import xarray as xr

from forecasting.cli import main


def test_quickstart_fast_runs_end_to_end_and_resumes(tmp_path, capsys):
    workdir = tmp_path / "qs"
    assert main(["quickstart", "--fast", "--workdir", str(workdir), "--quiet"]) == 0
    assert str(workdir / "report.md") in capsys.readouterr().out
    report = (workdir / "report.md").read_text()
    for expected in ("## Stores", "global_coarse", "regional_fine", "stations", "## Verification of the baselines",
                     "rmse — global", "rmse — stations", "| 2m_temperature | persistence |"):
        assert expected in report, expected
    for store in ("global_coarse.zarr", "regional_fine.zarr", "stations.zarr"):
        assert xr.open_zarr(workdir / store).sizes["time"] == 120
    scores = xr.open_dataset(workdir / "verification" / "global_coarse" / "scores.nc")
    assert set(scores.region.values) == {"global", "region", "stations"}
    assert list((workdir / "verification" / "global_coarse" / "plots").glob("map_*.png"))
    # a second run finds every output and recomputes nothing
    before = {p: p.stat().st_mtime_ns for p in (workdir / "verification").rglob("*.nc")}
    assert main(["quickstart", "--fast", "--workdir", str(workdir), "--quiet"]) == 0
    assert "already there, not recomputed" in (workdir / "report.md").read_text()
    assert {p: p.stat().st_mtime_ns for p in (workdir / "verification").rglob("*.nc")} == before
