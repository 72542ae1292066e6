"""Benchmark: ``forecast verify``'s engine (gridded truth + stations) wall time and peak memory vs start times.

A 10-member ensemble with 6-hourly leads out to 10 days (40 leads) from daily 00 UTC starts in 2021 is
scored by :func:`forecasting.verification.verify.verify` (every gridded metric, ACC included, rank
histograms, spectra, and the station metrics; no reference, no plots, ``chunk_starts=8``) against a
gridded truth and 100 stations, on the coarse built-in grid (global 5.625 degrees, 32 x 64) with
``geopotential`` at 500 hPa and ``2m_temperature``. The number of start times doubles (92, 183, 365 =
a quarter, a half and the whole year); each measured run is a fresh subprocess that reports its wall
time and its peak resident memory (``getrusage(RUSAGE_SELF).ru_maxrss``) as well as the resident
memory after the imports, so a flat peak shows that memory does not grow with the number of starts.

Inputs are synthetic, built once per size into a cache directory under /tmp (never the repository)
and outside the measured subprocess:

* truth store (``write_store``): 2021-01-01 00 UTC to 2022-01-10 00 UTC, 6-hourly (1501 times); each
  variable is a zonal-mean profile with a seasonal cycle (and a diurnal cycle for 2m_temperature), a
  wavenumber-4 wave travelling east at 10 degrees/day, and seeded white noise. Units ``m**2 s**-2``, K.
* forecast Zarr (``write_forecast``), built lazily with dask (the full one is 365 x 40 x 10 x 2 x
  2048 float32, about 2.4 GB, never in memory as a whole), one chunk per (start, lead): member
  ``i`` is ``truth(valid time) + s(lead) (z_0 + z_i)`` with standard-normal fields ``z`` seeded by
  (variable, start, lead), so the ensemble is statistically consistent (spread-skill ratio near 1) and
  the error grows with lead: ``s`` rises from 30 to 800 m**2 s**-2 (geopotential) and from 0.4 to 3 K
  (2m_temperature) between 6 h and 240 h. Smaller sets are the first starts of the larger ones.
* observation store (``write_observation_store``): 100 stations drawn uniformly on the sphere
  (latitudes within 80 degrees), the truth's 2m_temperature interpolated bilinearly to them
  (``interpolate_to_points``) plus 0.8 K of noise, with 2 % of the observations missing.

One JSON line per size: ``seconds`` is the median wall time of ``runs`` runs (3 when the first takes
less than ``--repeat-below`` seconds, else 1), ``cpu_seconds`` the median CPU time of the process (all
threads; steadier than wall time on a shared machine), ``peak_rss_mb`` the median peak, ``check`` a few
scores at the longest lead. ``--quick`` is a smoke run (23 and 46 starts, 10 leads; about 3 minutes);
``--starts``/``--leads`` pick other sizes. Usage::

    python benchmarks/bench_verify.py [--quick] [--starts N ...] [--leads L] [--cache DIR] [--repeat-below 60]

On the shared 2-core machine the full mode takes about 4 minutes to build its inputs the first time
(2.9 GB of forecasts in the cache), then 15 to 20 minutes with each size run once: one start costs
1.3 to 1.9 s, so the 365-start run alone takes 8 to 12 minutes. A single measured run, e.g. for a
profiler (``py-spy record -- python benchmarks/bench_verify.py --worker --starts 92``), is
``--worker`` with one ``--starts`` on inputs already in the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: Bump when the synthetic inputs change, so stale caches are not reused.
INPUT_VERSION = "v1"
N_LAT, N_LON = 32, 64
N_MEMBERS = 10
N_STATIONS = 100
STEP_HOURS = 6
MAX_LEAD_HOURS = 240
FIRST_START = "2021-01-01"
TRUTH_TIMES = (365 + MAX_LEAD_HOURS // 24) * 24 // STEP_HOURS + 1  # 2021-01-01 00 UTC .. 2022-01-10 00 UTC
FULL = {"starts": (92, 183, 365), "leads": 40}
QUICK = {"starts": (23, 46), "leads": 10}
# Member spread s(lead) at 6 h and at 240 h, linear in lead between them (units of the variable).
SPREAD = {"geopotential": (30.0, 800.0), "2m_temperature": (0.4, 3.0)}
OBS_NOISE_K = 0.8
OBS_MISSING_FRACTION = 0.02


# ----------------------------------------------------------------------------------------------
# Synthetic inputs (built once, outside the measured process)
# ----------------------------------------------------------------------------------------------
def truth_dataset(seed: int = 0):
    """The synthetic truth, in memory (1501 x 32 x 64 x 2 float32, about 25 MB); see the module docstring."""
    import numpy as np
    import pandas as pd
    import xarray as xr

    times = pd.date_range(FIRST_START, periods=TRUTH_TIMES, freq=f"{STEP_HOURS}h")
    lat = -90.0 + (np.arange(N_LAT) + 0.5) * 180.0 / N_LAT
    lon = np.arange(N_LON) * 360.0 / N_LON
    days = ((times - times[0]) / pd.Timedelta("1D")).to_numpy()[:, None, None]  # (time, 1, 1)
    phi = np.deg2rad(lat)[None, :, None]  # (1, lat, 1)
    lam = np.deg2rad(lon)[None, None, :]  # (1, 1, lon)
    season = np.cos(2 * np.pi * (days - 196.0) / 365.25)  # +1 in mid July
    wave = np.cos(4 * (lam - np.deg2rad(10.0) * days)) * np.cos(phi) ** 2
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((2, times.size, N_LAT, N_LON))
    geopotential = 5.6e4 - 4.0e3 * np.sin(phi) ** 2 + 8.0e2 * np.sin(phi) * season + 6.0e2 * wave + 50.0 * noise[0]
    local_hour = (days * 24.0 + np.rad2deg(lam) / 15.0) % 24.0
    t2m = (
        300.0 - 45.0 * np.sin(phi) ** 2 + 12.0 * np.sin(phi) * season + 5.0 * np.cos(2 * np.pi * (local_hour - 14) / 24)
        + 3.0 * wave + 0.5 * noise[1]
    )
    return xr.Dataset(
        {
            "geopotential": (("time", "level", "latitude", "longitude"), geopotential[:, None].astype(np.float32),
                             {"units": "m**2 s**-2"}),
            "2m_temperature": (("time", "latitude", "longitude"), t2m.astype(np.float32), {"units": "K"}),
        },
        coords={"time": times, "level": ("level", [500.0], {"units": "hPa"}), "latitude": lat, "longitude": lon},
        attrs={"source": "bench_verify synthetic truth"},
    )


def forecast_dataset(truth, *, n_starts: int, n_leads: int, seed: int = 1):
    """The lazy ensemble forecast (time, prediction_timedelta, realization, [level], latitude, longitude).

    ``truth``: the in-memory truth of :func:`truth_dataset`. One dask chunk per (start, lead), all members.
    """
    import dask.array as da
    import numpy as np
    import pandas as pd
    import xarray as xr

    starts = pd.date_range(FIRST_START, periods=n_starts, freq="1D")
    lead_hours = np.arange(1, n_leads + 1) * STEP_HOURS
    leads = pd.to_timedelta(lead_hours, unit="h")
    valid = pd.DatetimeIndex((starts.values[:, None] + leads.values[None, :]).ravel())
    valid_index = pd.DatetimeIndex(truth["time"].values).get_indexer(valid).reshape(n_starts, n_leads)
    assert np.all(valid_index >= 0), "the truth must cover every valid time"
    data_vars = {}
    for k, (name, (s_first, s_last)) in enumerate(SPREAD.items()):
        values = truth[name].values  # (truth time, [level], lat, lon)
        field_shape = values.shape[1:]
        spread = s_first + (s_last - s_first) * (lead_hours - STEP_HOURS) / (MAX_LEAD_HOURS - STEP_HOURS)

        def block(template, block_info=None, values=values, spread=spread, k=k, field_shape=field_shape):
            i, j = block_info[0]["chunk-location"][:2]
            z = np.random.default_rng((seed, k, i, j)).standard_normal((N_MEMBERS + 1, *field_shape), dtype=np.float32)
            members = values[valid_index[i, j]] + np.float32(spread[j]) * (z[:1] + z[1:])  # (member, ...)
            return members[None, None].astype(np.float32)

        shape = (n_starts, n_leads, N_MEMBERS, *field_shape)
        template = da.empty(shape, chunks=(1, 1, N_MEMBERS, *field_shape), dtype=np.float32)
        dims = ("time", "prediction_timedelta", "realization", *truth[name].dims[1:])
        data_vars[name] = (dims, template.map_blocks(block, dtype=np.float32), dict(truth[name].attrs))
    coords = {
        "time": starts,
        "prediction_timedelta": leads,
        "realization": np.arange(N_MEMBERS),
        **{c: truth[c] for c in ("level", "latitude", "longitude")},
    }
    return xr.Dataset(data_vars, coords=coords)


def observation_dataset(truth, seed: int = 2):
    """Station observations of 2m_temperature: (time, station), via the canonical table; see the module docstring."""
    import numpy as np
    import pandas as pd

    from forecasting.data.observations import observations_to_dataset
    from forecasting.verification.stations import interpolate_to_points

    rng = np.random.default_rng(seed)
    lat = np.rad2deg(np.arcsin(rng.uniform(-np.sin(np.deg2rad(80.0)), np.sin(np.deg2rad(80.0)), N_STATIONS)))
    lon = rng.uniform(0.0, 360.0, N_STATIONS)
    at_stations = interpolate_to_points(truth["2m_temperature"], latitude=lat, longitude=lon)  # (time, station)
    values = at_stations.transpose("station", "time").values.astype(np.float64)
    values = values + OBS_NOISE_K * rng.standard_normal(values.shape)
    kept = rng.uniform(size=values.shape) >= OBS_MISSING_FRACTION  # absent rows are missing observations
    station, time_index = np.nonzero(kept)
    ids = np.array([f"S{i:03d}" for i in range(N_STATIONS)])
    table = pd.DataFrame({
        "station_id": ids[station],
        "latitude": lat[station],
        "longitude": lon[station],
        "elevation": rng.uniform(0.0, 1500.0, N_STATIONS)[station],
        "time": truth["time"].values[time_index],
        "2m_temperature": values[station, time_index],
    })
    return observations_to_dataset(table)


def build_inputs(cache: Path, *, sizes: tuple[int, ...], n_leads: int) -> dict[str, Path]:
    """Truth, observations and one forecast per size in ``cache``; what is already there is reused."""
    import xarray as xr

    from forecasting.data.store import write_observation_store, write_store
    from forecasting.inference import write_forecast

    cache.mkdir(parents=True, exist_ok=True)
    paths = {"truth": cache / "truth.zarr", "observations": cache / "observations.zarr"}
    if not paths["truth"].exists():
        write_store(truth_dataset(), paths["truth"], attrs={"source": "bench_verify synthetic truth"})
    truth = xr.open_zarr(paths["truth"], consolidated=None).load()
    if not paths["observations"].exists():
        write_observation_store(observation_dataset(truth), paths["observations"])
    for n in sizes:
        path = forecast_path(cache, n, n_leads)
        if not path.exists():
            started = time.perf_counter()
            write_forecast(forecast_dataset(truth, n_starts=n, n_leads=n_leads), path, model="bench-synthetic")
            print(f"built {path} in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return paths


def forecast_path(cache: Path, n_starts: int, n_leads: int) -> Path:
    return cache / f"forecast_{n_starts}starts_{n_leads}leads.zarr"


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------
def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(cache: Path, *, n_starts: int, n_leads: int) -> None:
    """One measured ``verify`` in this (fresh) process; prints a JSON line with seconds and memory."""
    from forecasting.verification.verify import verify

    baseline = _rss_mb()
    cpu_start = time.process_time()
    with tempfile.TemporaryDirectory(prefix="bench_verify_out_") as tmp:
        start = time.perf_counter()
        result = verify(
            forecast_path(cache, n_starts, n_leads),
            truth_path=cache / "truth.zarr",
            observations_path=cache / "observations.zarr",
            reference=None,
            out_dir=Path(tmp) / "verify",
            plots=False,
            chunk_starts=8,
        )
        seconds = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu_start
        score = result.scores["score"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    last = score["prediction_timedelta"].values[-1]
    check = {  # a few scores at the longest lead, to show the inputs behave as described
        "z500_rmse_global": float(score.sel(metric="rmse", variable="geopotential@500", region="global",
                                            prediction_timedelta=last).values[0]),
        "t2m_ssr_global": float(score.sel(metric="spread_skill_ratio", variable="2m_temperature", region="global",
                                          prediction_timedelta=last).values[0]),
        "t2m_rmse_stations": float(score.sel(metric="rmse", variable="2m_temperature", region="stations",
                                             prediction_timedelta=last).values[0]),
    }
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "baseline_rss_mb": baseline,
                      "peak_rss_mb": peak, "check": check}))


def measure(cache: Path, *, n_starts: int, n_leads: int, repeat_below: float) -> dict[str, object]:
    """Fresh-subprocess runs of one size: 3 if the first took under ``repeat_below`` seconds, else 1.

    ``cache``: the versioned input directory (``--cache``/``INPUT_VERSION``).
    """
    runs = []
    while len(runs) < 3:
        out = subprocess.run(
            [sys.executable, __file__, "--worker", "--cache", str(cache.parent), "--starts", str(n_starts),
             "--leads", str(n_leads)],
            capture_output=True, text=True,
        )
        if out.returncode != 0:
            raise RuntimeError(f"measured run of {n_starts} starts failed:\n{out.stderr[-4000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        if runs[0]["seconds"] >= repeat_below:
            break
    return {
        "benchmark": "verify",
        "starts": n_starts,
        "members": N_MEMBERS,
        "leads": n_leads,
        "stations": N_STATIONS,
        "grid": f"{N_LAT}x{N_LON}",
        "seconds": round(statistics.median(r["seconds"] for r in runs), 2),
        "seconds_per_start": round(statistics.median(r["seconds"] for r in runs) / n_starts, 3),
        "cpu_seconds": round(statistics.median(r["cpu_seconds"] for r in runs), 2),
        "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in runs), 1),
        "baseline_rss_mb": round(statistics.median(r["baseline_rss_mb"] for r in runs), 1),
        "runs": len(runs),
        "all_seconds": [round(r["seconds"], 2) for r in runs],
        "load_average_1min": round(os.getloadavg()[0], 2),
        "check": {k: round(v, 3) for k, v in runs[-1]["check"].items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 23 and 46 starts, 10 leads")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "bench_verify_cache",
                        help="where the synthetic inputs are built and kept (default /tmp/bench_verify_cache)")
    parser.add_argument("--repeat-below", type=float, default=60.0, metavar="SECONDS",
                        help="run a size 3 times when its first run takes less than this (default 60)")
    parser.add_argument("--clean", action="store_true", help="delete the cache directory at the end")
    parser.add_argument("--worker", action="store_true", help="internal: one measured run on cached inputs")
    parser.add_argument("--starts", type=int, nargs="+",
                        help="numbers of start times to run instead of the mode's (one with --worker)")
    parser.add_argument("--leads", type=int, help="number of leads instead of the mode's (40, or 10 with --quick)")
    args = parser.parse_args()
    cache = args.cache / INPUT_VERSION
    setup = QUICK if args.quick else FULL
    sizes = tuple(args.starts or setup["starts"])
    n_leads = args.leads or setup["leads"]
    if not all(1 <= n <= 365 for n in sizes) or not 1 <= n_leads <= MAX_LEAD_HOURS // STEP_HOURS:
        parser.error(f"starts must lie in 1..365 and leads in 1..{MAX_LEAD_HOURS // STEP_HOURS}; "
                     f"found {list(sizes)} and {n_leads}")
    if args.worker:
        if len(sizes) != 1:
            parser.error(f"--worker runs one size; found --starts {list(sizes)}")
        worker(cache, n_starts=sizes[0], n_leads=n_leads)
        return
    build_inputs(cache, sizes=sizes, n_leads=n_leads)
    for n_starts in sizes:
        print(json.dumps(measure(cache, n_starts=n_starts, n_leads=n_leads, repeat_below=args.repeat_below)),
              flush=True)
    if args.clean:
        shutil.rmtree(args.cache)


if __name__ == "__main__":
    main()
