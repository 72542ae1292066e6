"""benchmarks/device_summary.py: the GPU check's summary pairs the plain baseline with the project's graph network
at the same grid size and reports their step-time ratio; a size that does not fit says so."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device_summary.py"


def _module():
    spec = importlib.util.spec_from_file_location("device_summary", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_summary_reports_the_ratio_at_the_same_size_and_what_did_not_fit(tmp_path):
    lines = [
        {"impl": "plain-pyg", "grid_nodes": 65160, "mesh_nodes": 40962, "step_s_median": 0.3, "peak_mem_gb": 53.1},
        "a warning line that is not JSON",
        {"benchmark": "graph_network", "size": "1deg", "data_nodes": 65160, "mesh_nodes": 40962, "compile": False,
         "fits": True, "step_s_median": 0.12, "peak_mem_gb": 20.0},
        {"benchmark": "graph_network", "size": "0.25deg", "data_nodes": 1038240, "mesh_nodes": 40962,
         "compile": False, "fits": False, "error": "OutOfMemoryError: CUDA out of memory"},
    ]
    (tmp_path / "graph_network.jsonl").write_text(
        "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    )
    (tmp_path / "diffusion.jsonl").write_text(json.dumps(
        {"benchmark": "dyffusion_sampling", "grid": "global", "sampler": "direct", "network_evaluations": 1.0,
         "seconds_per_member_lead": 0.01, "device": "cuda"}
    ))
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True,
                            check=True)
    assert "ratio baseline plain-pyg / ours 1deg: 2.50x (target >= 4)" in result.stdout
    assert "ours 0.25deg: 1038240 data nodes, 40962 mesh nodes, does not fit: OutOfMemoryError" in result.stdout
    assert "dyffusion_sampling global direct: 1.0 network evaluations, 0.01 s per member and lead" in result.stdout
    # A ratio only between runs of the same grid size
    summary = _module().graph_summary
    assert not any("ratio" in line for line in summary([lines[0], lines[3]]))
    assert sum("ratio" in line for line in summary([lines[0], lines[2], lines[3]])) == 1


def test_the_summary_names_a_missing_directory(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "absent")], capture_output=True, text=True)
    assert result.returncode != 0 and "absent: not a directory" in result.stderr
