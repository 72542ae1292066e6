"""Cost of the built-in simulator per simulated year, at nlat 64 and 128; prints one JSON line per grid.

Each grid is timed end to end through ``simulate`` (dynamics, output on the fine and coarse grids,
stations) for a short and a long run; the difference gives the cost per simulated day without the fixed
set-up (tables, land mask, orography), which is reported separately. Median of ``--repeats`` runs.

    python benchmarks/bench_simulator.py [--nlat 64 128] [--threads 2] [--repeats 3] [--days 30]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

from forecasting.data.simulator import DAYS_PER_YEAR, SimulationSettings, simulate

SHORT_DAYS = 2.0
SPINUP_DAYS = 2.0


def _wall_seconds(settings: SimulationSettings) -> float:
    started = time.perf_counter()
    simulate(settings)
    return time.perf_counter() - started


def measure(nlat: int, *, threads: int, repeats: int, days: float) -> dict:
    """Median wall time of a short and a long run; the per-day cost is their difference over the extra days."""
    base = SimulationSettings(nlat=nlat, nlon=2 * nlat, spinup_days=SPINUP_DAYS, num_threads=threads, n_stations=100)
    short = dataclasses.replace(base, years=SHORT_DAYS / DAYS_PER_YEAR)
    long = dataclasses.replace(base, years=days / DAYS_PER_YEAR)
    _wall_seconds(short)  # warm-up: land-mask cache, allocator, thread pool
    short_s = statistics.median(_wall_seconds(short) for _ in range(repeats))
    long_s = statistics.median(_wall_seconds(long) for _ in range(repeats))
    extra_days = (long.n_times - short.n_times) / 4
    per_day = (long_s - short_s) / extra_days
    setup = short_s - per_day * (SPINUP_DAYS + short.n_times / 4)
    steps_per_day = 86400.0 / base.timestep_seconds
    return {
        "benchmark": "simulator",
        "nlat": nlat,
        "nlon": 2 * nlat,
        "truncation": base.truncation,
        "timestep_minutes": base.timestep_seconds / 60.0,
        "seconds_per_simulated_year": per_day * DAYS_PER_YEAR,
        "steps_per_second": steps_per_day / per_day,
        "setup_seconds": setup,
        "default_run_seconds_estimate": setup + per_day * (DAYS_PER_YEAR + SimulationSettings().spinup_days),
        "threads": threads,
        "repeats": repeats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nlat", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--days", type=float, default=30.0, help="simulated days of the long run")
    args = parser.parse_args()
    for nlat in args.nlat:
        print(json.dumps(measure(nlat, threads=args.threads, repeats=args.repeats, days=args.days)), flush=True)


if __name__ == "__main__":
    main()
