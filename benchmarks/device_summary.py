"""Short summary of benchmarks/device_checks.sh's JSON lines in a directory: the graph network's step time against
the plain torch-geometric baseline at the same size (the ratio the graph-forecaster issue asks for), whether the
0.25-degree size fits, and the diffusion families' sampling cost per member and lead.

    python3 benchmarks/device_summary.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def read_lines(path: Path) -> list[dict]:
    """The JSON objects of ``path``, one per line; lines that are not JSON objects are skipped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def graph_summary(records: list[dict]) -> list[str]:
    """Lines on the graph network: each run, then the baseline's median step over each of ours at its size."""
    lines = []
    baseline = [r for r in records if "impl" in r]
    ours = [r for r in records if r.get("benchmark") == "graph_network"]
    for r in baseline:
        lines.append(f"baseline {r['impl']}: {r.get('grid_nodes')} grid nodes, {r.get('mesh_nodes')} mesh nodes, "
                     f"step {r.get('step_s_median')} s (median), peak {r.get('peak_mem_gb')} GB")
    for r in ours:
        if r.get("fits", True):
            detail = f"step {r.get('step_s_median')} s (median), peak {r.get('peak_mem_gb', r.get('peak_rss_mb'))}"
        else:
            detail = f"does not fit: {r.get('error')}"
        lines.append(f"ours {r.get('size')}{' compiled' if r.get('compile') else ''}: {r.get('data_nodes')} data "
                     f"nodes, {r.get('mesh_nodes')} mesh nodes, {detail}")
    for b in baseline:
        for r in ours:
            if r.get("data_nodes") == b.get("grid_nodes") and r.get("step_s_median"):
                ratio = b["step_s_median"] / r["step_s_median"]
                lines.append(f"ratio baseline {b['impl']} / ours {r.get('size')}"
                             f"{' compiled' if r.get('compile') else ''}: {ratio:.2f}x (target >= 4)")
    return lines or ["no graph-network lines"]


def diffusion_summary(records: list[dict]) -> list[str]:
    """One line per diffusion sampling record: family, grid, sampler, evaluations and seconds per member-lead."""
    lines = []
    for r in records:
        if r.get("benchmark") == "spectral_filter":
            lines.append(f"spectral filter: {r.get('seconds_per_member_lead')} s per member and lead")
        elif "sampling" in str(r.get("benchmark")):
            lines.append(f"{r['benchmark']} {r.get('grid')} {r.get('sampler')}: {r.get('network_evaluations')} "
                         f"network evaluations, {r.get('seconds_per_member_lead')} s per member and lead "
                         f"({r.get('device')})")
    return lines or ["no diffusion lines"]


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python3 benchmarks/device_summary.py OUT_DIR")
    out = Path(sys.argv[1])
    if not out.is_dir():
        sys.exit(f"{out}: not a directory")
    print("\n".join(graph_summary(read_lines(out / "graph_network.jsonl"))))
    print("\n".join(diffusion_summary(read_lines(out / "diffusion.jsonl"))))


if __name__ == "__main__":
    main()
