"""Build time and peak memory of ``build_forecast_graph`` for 10^4, 10^5 and 10^6 data nodes.

Each case runs in its own Python process so its peak resident memory (``ru_maxrss``) is its own; the
process's resident memory after imports, before building, is reported as ``baseline_rss_mb``.
Prints one JSON line per case:

    {"benchmark": "graph_build", "case": ..., "data_nodes": ..., "mesh_level": ..., "seconds": ...,
     "peak_rss_mb": ..., ...}

``seconds`` is the median of ``runs`` builds (3, or 1 for the 10^6 case). Usage:

    PYTHONPATH=. python benchmarks/bench_graphs.py                 # all cases, the 10^6 one last
    PYTHONPATH=. python benchmarks/bench_graphs.py --cases 1e4 1e5  # a subset
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np


def _axis(n: int, step: float, *, poles: bool) -> np.ndarray:
    """Equiangular latitudes: with the poles (ERA5 0.25 degree style) or cell centres (WeatherBench2 style)."""
    return np.linspace(-90.0, 90.0, n) if poles else -90.0 + step / 2 + step * np.arange(n)


def _case_arguments(name: str) -> dict:
    from forecasting.graphs import Region

    if name == "1e4":  # 2.5 degrees, 72 x 144 = 10,368 points
        return dict(coarse_lat=_axis(72, 2.5, poles=False), coarse_lon=np.arange(144) * 2.5, region=None,
                    global_level=4, regional_level=4, margin_deg=0.0)
    if name == "1e5":  # 0.75 degrees, 240 x 480 = 115,200 points
        return dict(coarse_lat=_axis(240, 0.75, poles=False), coarse_lon=np.arange(480) * 0.75, region=None,
                    global_level=5, regional_level=5, margin_deg=0.0)
    if name == "1e6":  # ERA5 0.25 degrees, 721 x 1440 = 1,038,240 points
        return dict(coarse_lat=_axis(721, 0.25, poles=True), coarse_lon=np.arange(1440) * 0.25, region=None,
                    global_level=6, regional_level=6, margin_deg=0.0)
    if name == "stretched-1e5":  # 1 degree global + 0.1 degree Nordic box, mesh level 5 refined to 8
        region = Region(55.0, 72.0, 0.0, 32.0)
        return dict(coarse_lat=_axis(181, 1.0, poles=True), coarse_lon=np.arange(360) * 1.0,
                    regional_lat=np.arange(55.0, 72.0 + 1e-9, 0.1), regional_lon=np.arange(0.0, 32.0 + 1e-9, 0.1),
                    region=region, global_level=5, regional_level=8, margin_deg=5.0)
    raise SystemExit(f"unknown case {name!r}")


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("VmRSS not found in /proc/self/status")


def run_case(name: str, repeats: int) -> dict:
    from forecasting.graphs import build_forecast_graph

    arguments = _case_arguments(name)
    baseline = _rss_mb()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        graph = build_forecast_graph(**arguments)
        seconds.append(time.perf_counter() - start)
        summary = graph.summary()
        del graph
    return {
        "benchmark": "graph_build",
        "case": name,
        "data_nodes": summary["data_nodes"],
        "mesh_level": summary["mesh_finest_level"],
        "global_level": arguments["global_level"],
        "mesh_nodes": summary["mesh_nodes"],
        "mesh_edges": summary["mesh_edges"],
        "encoder_edges": summary["encoder_edges"],
        "decoder_edges": summary["decoder_edges"],
        "encoder_fallback_edges": summary["encoder_fallback_edges"],
        "seconds": round(statistics.median(seconds), 3),
        "runs": repeats,
        "seconds_all": [round(s, 3) for s in seconds],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "baseline_rss_mb": round(baseline, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["1e4", "1e5", "stretched-1e5", "1e6"])
    parser.add_argument("--run-case", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=None, help="builds per case (default 3; 1 for 1e6)")
    args = parser.parse_args()
    if args.run_case:
        print(json.dumps(run_case(args.run_case, args.repeats)), flush=True)
        return
    for name in args.cases:
        repeats = args.repeats or (1 if name == "1e6" else 3)
        subprocess.run([sys.executable, __file__, "--run-case", name, "--repeats", str(repeats)], check=True)


if __name__ == "__main__":
    main()
