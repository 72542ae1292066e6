"""Training-step time and peak memory of the encoder-processor-decoder graph network.

One step is forward + MSE loss + backward + AdamW step on random inputs and targets; the figure is the
median (and minimum) of ``--steps`` steps after ``--warmup`` warm-up steps. Prints one JSON line per
configuration:

    {"benchmark": "graph_network", "size": ..., "device": ..., "data_nodes": ..., "mesh_nodes": ...,
     "edges": {"encoder": ..., "mesh": ..., "decoder": ...}, "hidden": ..., "layers": ..., "batch": ...,
     "params": ..., "step_s_median": ..., "step_s_min": ..., "peak_mem_gb" | "peak_rss_mb": ..., "fits": ...}

Sizes (``--size``):

* ``quickstart`` (default): the quickstart's data nodes, a 32 x 64 coarse global grid (5.625 degrees) plus
  the 1.875-degree regional box lat 45..72, lon 0..40 (14 x 22 points); mesh global level 3 refined to
  level 5 over the box (5-degree margin); inputs 2 steps x 8 state channels + 4 forcings + 2 static = 22,
  outputs 8; batch 4; hidden 64 and 128 x 4 and 8 processor layers; fp32.
* ``tiny``: a 16 x 32 grid plus a small regional box, mesh level 1 refined to 3, hidden 32, 2 layers: a
  seconds-long run of the same code path as the large sizes (use it to check the script on CPU).
* ``1deg``: the yardstick of ``shared/bench/gnn_baseline.py``: 181 x 360 grid (65,160 nodes), global
  mesh level 6 (40,962 nodes, 327,660 edges), encoder 4 nearest mesh nodes per grid node, decoder 3,
  78 channels in and out, hidden 512, 16 layers, batch 1, bf16 autocast, 10 steps after 3 warm-up.
* ``0.25deg``: the same on a 721 x 1440 grid (1,038,240 nodes) with activation checkpointing of the
  processor; reports ``"fits": false`` with the error when it runs out of memory.

On CUDA, times are taken between ``torch.cuda.synchronize()`` calls and memory is
``torch.cuda.max_memory_allocated()``. On CPU each configuration runs in its own process, so that its peak
resident memory (``ru_maxrss``) is its own; ``baseline_rss_mb`` is the resident memory after building the
graph and the model, before the first step. Usage:

    PYTHONPATH=. python benchmarks/bench_graph_network.py                          # CPU, quickstart grid
    PYTHONPATH=. python benchmarks/bench_graph_network.py --device cpu --size tiny
    PYTHONPATH=. python benchmarks/bench_graph_network.py --device cuda --size 1deg [--compile]
    PYTHONPATH=. python benchmarks/bench_graph_network.py --device cuda --size 0.25deg
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Size:
    """Defaults of one benchmark size; command-line options override them."""

    hidden: tuple[int, ...]
    layers: tuple[int, ...]
    batch: int
    n_input: int
    n_output: int
    dtype: str
    warmup: int
    steps: int
    checkpoint_processor: bool


SIZES = {
    "tiny": Size((32,), (2,), 2, 10, 4, "fp32", 1, 2, False),
    "quickstart": Size((64, 128), (4, 8), 4, 22, 8, "fp32", 2, 5, False),
    "1deg": Size((512,), (16,), 1, 78, 78, "bf16", 3, 10, False),
    "0.25deg": Size((512,), (16,), 1, 78, 78, "bf16", 2, 5, True),
}


def _cell_centres(n_lat: int) -> tuple[np.ndarray, np.ndarray]:
    """Regular grid of n_lat x 2 n_lat cell centres, longitudes from 0 (the built-in simulator's layout)."""
    return -90.0 + (np.arange(n_lat) + 0.5) * 180.0 / n_lat, np.arange(2 * n_lat) * 180.0 / n_lat


def build_graph(size: str):
    """The :class:`~forecasting.graphs.ForecastGraph` of a benchmark size (see the module docstring)."""
    from forecasting.graphs import Region, build_forecast_graph

    if size == "tiny":
        lat, lon = _cell_centres(16)
        return build_forecast_graph(
            coarse_lat=lat, coarse_lon=lon, regional_lat=np.arange(50.0, 70.1, 5.0),
            regional_lon=np.arange(0.0, 30.1, 5.0), region=Region(50.0, 70.0, 0.0, 30.0),
            global_level=1, regional_level=3, margin_deg=5.0,
        )
    if size == "quickstart":
        lat, lon = _cell_centres(32)
        fine_lat, fine_lon = _cell_centres(96)  # the quickstart's T63 model grid
        region = Region(45.0, 72.0, 0.0, 40.0)
        return build_forecast_graph(
            coarse_lat=lat, coarse_lon=lon,
            regional_lat=fine_lat[(fine_lat >= region.lat_min) & (fine_lat <= region.lat_max)],
            regional_lon=fine_lon[(fine_lon >= region.lon_min) & (fine_lon <= region.lon_max)],
            region=region, global_level=3, regional_level=5, margin_deg=5.0,
        )
    step = {"1deg": 1.0, "0.25deg": 0.25}[size]
    n_lat = int(round(180 / step)) + 1
    return build_forecast_graph(
        coarse_lat=np.linspace(-90.0, 90.0, n_lat), coarse_lon=np.arange(2 * (n_lat - 1)) * step, region=None,
        global_level=6, regional_level=6, margin_deg=0.0, encoder="knn", encoder_k=4, decoder_k=3,
    )


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("VmRSS not found in /proc/self/status")


def run_one(args: argparse.Namespace, hidden: int, layers: int) -> dict:
    """Build the graph and model of one configuration and time its training steps."""
    from forecasting.models import EncodeProcessDecode, graph_tensors

    size = SIZES[args.size]
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    start = time.perf_counter()
    graph = build_graph(args.size)
    build_s = time.perf_counter() - start
    tensors = graph_tensors(graph).to(device)
    torch.manual_seed(0)
    model = EncodeProcessDecode(
        graph=tensors, n_input=size.n_input, n_output=size.n_output, hidden=hidden, processor_layers=layers,
        noise_channels=args.noise_channels, checkpoint_processor=size.checkpoint_processor,
    ).to(device)
    step_model = torch.compile(model) if args.compile else model
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = args.batch or size.batch
    dtype = args.dtype or size.dtype
    x = torch.randn(batch, tensors.num_data_nodes, size.n_input, device=device)
    target = torch.randn(batch, tensors.num_data_nodes, size.n_output, device=device)
    noise = (
        torch.randn(batch, tensors.num_mesh_nodes, args.noise_channels, device=device)
        if args.noise_channels else None
    )
    record = {
        "benchmark": "graph_network", "size": args.size,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "data_nodes": tensors.num_data_nodes, "mesh_nodes": tensors.num_mesh_nodes,
        "edges": {"encoder": int(tensors.encoder_edges.shape[1]), "mesh": int(tensors.mesh_edges.shape[1]),
                  "decoder": int(tensors.decoder_edges.shape[1])},
        "n_input": size.n_input, "n_output": size.n_output, "hidden": hidden, "layers": layers, "batch": batch,
        "noise_channels": args.noise_channels, "params": sum(p.numel() for p in model.parameters()),
        "dtype": dtype, "checkpoint_processor": size.checkpoint_processor, "compile": args.compile,
        "graph_build_s": round(build_s, 2), "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    else:
        record["baseline_rss_mb"] = round(_rss_mb(), 1)
    times = []
    try:
        for i in range(size.warmup + (args.steps or size.steps)):
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
                output = step_model(x, noise)
            loss = torch.nn.functional.mse_loss(output.float(), target)
            loss.backward()
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize(device)
            if i >= size.warmup:
                times.append(time.perf_counter() - t0)
    except (torch.OutOfMemoryError, MemoryError) as error:
        record.update(fits=False, error=f"{type(error).__name__}: {str(error).splitlines()[0]}")
    else:
        record.update(fits=True, step_s_median=round(statistics.median(times), 4), step_s_min=round(min(times), 4),
                      loss=round(loss.item(), 4))
    if cuda:
        record["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    else:
        record["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--size", default="quickstart", choices=sorted(SIZES))
    parser.add_argument("--hidden", type=int, nargs="+", help="latent widths (default: per size)")
    parser.add_argument("--layers", type=int, nargs="+", help="processor layers (default: per size)")
    parser.add_argument("--batch", type=int, help="batch size (default: per size)")
    parser.add_argument("--steps", type=int, help="timed steps (default: per size)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], help="bf16 runs under autocast (default: per size)")
    parser.add_argument("--noise-channels", type=int, default=0, help="> 0 times the probabilistic model")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (inductor)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads on CPU (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    combos = list(itertools.product(args.hidden or size.hidden, args.layers or size.layers))
    if torch.device(args.device).type == "cpu" and len(combos) > 1:
        # One process per configuration, so that each peak resident memory is its own.
        for hidden, layers in combos:
            command = [sys.executable, __file__, *_passed_options(args), "--hidden", str(hidden),
                       "--layers", str(layers)]
            print(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip(), flush=True)
        return
    for hidden, layers in combos:
        print(json.dumps(run_one(args, hidden, layers)), flush=True)


def _passed_options(args: argparse.Namespace) -> list[str]:
    """The command-line options of ``args`` except hidden and layers, to hand on to a child process."""
    options = ["--device", args.device, "--size", args.size, "--noise-channels", str(args.noise_channels)]
    for name in ("batch", "steps", "dtype", "threads"):
        if getattr(args, name) is not None:
            options += [f"--{name}", str(getattr(args, name))]
    if args.compile:
        options.append("--compile")
    return options


if __name__ == "__main__":
    main()
