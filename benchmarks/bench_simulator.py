"""Cost of the built-in simulator per simulated year at nlat 64 and 128; one JSON line per grid and thread count.

Each grid is timed end to end through ``simulate`` (dynamics, output on the fine and coarse grids,
stations): a one-output run measures the fixed set-up (tables, land mask, orography, datasets) and a run
of ``--days`` after a 2-day spin-up the cost per simulated day. Median of ``--repeats`` runs.

    python benchmarks/bench_simulator.py [--nlat 64 128] [--threads 1 2] [--repeats 3] [--days 30]

Threads: 2 threads only pay off on an otherwise idle machine; when another process competes for the two
cores, the OpenMP threads wait on each other and a step is several times slower than on one thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

from forecasting.data.simulator import DAYS_PER_YEAR, SimulationSettings, simulate

SPINUP_DAYS = 2.0


def _wall_seconds(settings: SimulationSettings) -> float:
    started = time.perf_counter()
    simulate(settings)
    return time.perf_counter() - started


def measure(nlat: int, *, threads: int, repeats: int, days: float) -> dict:
    """Median wall times of a one-output run (the fixed set-up) and of a run of ``days``; their difference
    over the simulated days is the cost per day."""
    base = SimulationSettings(nlat=nlat, nlon=2 * nlat, num_threads=threads)
    setup_run = dataclasses.replace(base, spinup_days=0.0, years=1.0 / (4 * DAYS_PER_YEAR))
    long_run = dataclasses.replace(base, spinup_days=SPINUP_DAYS, years=days / DAYS_PER_YEAR)
    _wall_seconds(setup_run)  # warm-up: land-mask cache, allocator, thread pool
    setup = statistics.median(_wall_seconds(setup_run) for _ in range(repeats))
    long = statistics.median(_wall_seconds(long_run) for _ in range(repeats))
    simulated_days = SPINUP_DAYS + (long_run.n_times - 1) / 4
    per_day = (long - setup) / simulated_days
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
        "default_run_seconds_estimate": setup + per_day * (DAYS_PER_YEAR + base.spinup_days),
        "threads": threads,
        "repeats": repeats,
        "load_average_1min": os.getloadavg()[0],  # other processes on the machine inflate the timings
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nlat", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--days", type=float, default=30.0, help="simulated days of the long run")
    args = parser.parse_args()
    for nlat in args.nlat:
        for threads in args.threads:
            print(json.dumps(measure(nlat, threads=threads, repeats=args.repeats, days=args.days)), flush=True)


if __name__ == "__main__":
    main()
