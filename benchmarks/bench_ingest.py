"""Benchmark: ``write_store`` throughput and peak memory as the number of times grows.

The data are the quickstart's size: a global 5.625-degree grid (32 x 64), one year of 6-hourly times
(1460), ``geopotential``, ``u_component_of_wind`` and ``v_component_of_wind`` at 500 hPa and
``2m_temperature``, float32, synthesised lazily with seeded dask random numbers (so the input is never
in memory as a whole); then 2x and 4x the number of times. Each run is a fresh subprocess that writes
the store (data and statistics) into a temporary directory and reports its wall time and peak resident
memory (``getrusage(RUSAGE_SELF).ru_maxrss``), as well as the resident memory after the imports, before
the write. One JSON line per size: ``mb_per_s`` is uncompressed MB (10**6 bytes) of data per second,
medians of 3 runs. Usage: ``python benchmarks/bench_ingest.py``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
N_LAT, N_LON = 32, 64
YEAR_OF_6H = 1460
RUNS = 3
FACTORS = (1, 2, 4)


def synthetic_dataset(n_times: int, *, seed: int = 0):
    """The quickstart-sized canonical dataset, lazy (dask), with chunks of 73 times (about 0.6 MB a field)."""
    import dask.array as da
    import numpy as np
    import pandas as pd
    import xarray as xr

    rng = da.random.default_rng(seed)
    chunks = 73

    def field(offset: float, scale: float, *level: int):
        shape = (n_times, *level, N_LAT, N_LON)
        noise = rng.standard_normal(shape, chunks=(chunks, *level, N_LAT, N_LON), dtype=np.float32)
        return (offset + scale * noise).astype(np.float32)

    coords = {
        "time": pd.date_range("2000-01-01", periods=n_times, freq="6h"),
        "level": ("level", [500.0], {"units": "hPa"}),
        "latitude": np.linspace(-87.1875, 87.1875, N_LAT),
        "longitude": np.arange(N_LON) * 5.625,
    }
    upper = ("time", "level", "latitude", "longitude")
    return xr.Dataset(
        {
            "geopotential": (upper, field(5.5e4, 800.0, 1), {"units": "m**2 s**-2"}),
            "u_component_of_wind": (upper, field(10.0, 12.0, 1), {"units": "m s**-1"}),
            "v_component_of_wind": (upper, field(0.0, 10.0, 1), {"units": "m s**-1"}),
            "2m_temperature": (("time", "latitude", "longitude"), field(280.0, 15.0), {"units": "K"}),
        },
        coords=coords,
        attrs={"source": "bench_ingest synthetic"},
    )


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(n_times: int) -> None:
    """One measured write in this (fresh) process; prints a JSON line with seconds, bytes and memory."""
    sys.path.insert(0, str(ROOT))
    from forecasting.data.store import write_store

    ds = synthetic_dataset(n_times)
    baseline = _rss_mb()
    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as tmp:
        start = time.perf_counter()
        write_store(ds, Path(tmp) / "store.zarr", train_period=(None, None))
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "nbytes": int(ds.nbytes), "baseline_rss_mb": baseline, "peak_rss_mb": peak}))


def main() -> None:
    for factor in FACTORS:
        n_times = YEAR_OF_6H * factor
        runs = []
        for _ in range(RUNS):
            out = subprocess.run(
                [sys.executable, __file__, "--worker", str(n_times)], check=True, capture_output=True, text=True
            )
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        median_s = statistics.median(r["seconds"] for r in runs)
        megabytes = runs[0]["nbytes"] / 1e6
        print(json.dumps({
            "benchmark": "ingest",
            "size": f"{factor}x: {n_times} times x 4 fields x {N_LAT}x{N_LON} float32",
            "n_times": n_times,
            "mb": round(megabytes, 1),
            "mb_per_s": round(megabytes / median_s, 1),
            "median_s": round(median_s, 2),
            "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in runs), 1),
            "baseline_rss_mb": round(statistics.median(r["baseline_rss_mb"] for r in runs), 1),
            "runs": RUNS,
        }), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", type=int, metavar="N_TIMES", help="internal: run one measured write")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
    else:
        main()
