"""Benchmark: ``WindowDataset`` + ``DataLoader`` samples per second on a quickstart-sized store.

The store is the quickstart's size (see ``bench_ingest.py``: 32 x 64 grid, 1460 six-hourly times,
geopotential/u/v at 500 hPa and 2m_temperature, float32), written once into a temporary directory.
Windows are 2 input steps and 1 target step (4 channels, 4 forcings, no statics); batches of 8 are
drawn in a fixed shuffled order with ``num_workers`` 0 and 2. Each run builds a fresh ``DataLoader``
(worker start-up included) and reads ``BATCHES`` batches; the figure is the median of 3 runs. One JSON
line per ``num_workers``. Usage: ``python benchmarks/bench_loader.py``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

BATCH_SIZE = 8
BATCHES = 60
RUNS = 3


def main() -> None:
    import torch
    from bench_ingest import YEAR_OF_6H, synthetic_dataset

    from forecasting.data.store import write_store
    from forecasting.data.torch_dataset import WindowDataset

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        path = write_store(synthetic_dataset(YEAR_OF_6H), Path(tmp) / "store.zarr")
        dataset = WindowDataset(path, input_steps=2, target_steps=1)
        for workers in (0, 2):
            seconds = []
            for run in range(RUNS):
                loader = torch.utils.data.DataLoader(
                    dataset,
                    batch_size=BATCH_SIZE,
                    num_workers=workers,
                    sampler=torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(run)),
                )
                start = time.perf_counter()
                for i, batch in enumerate(loader):
                    if i + 1 == BATCHES:
                        break
                seconds.append(time.perf_counter() - start)
                del loader
            median_s = statistics.median(seconds)
            print(json.dumps({
                "benchmark": "loader",
                "size": f"{len(dataset)} windows of 2+1 steps x {len(dataset.channels)} channels x 32x64",
                "num_workers": workers,
                "batch_size": BATCH_SIZE,
                "samples": BATCHES * BATCH_SIZE,
                "samples_per_s": round(BATCHES * BATCH_SIZE / median_s, 1),
                "median_s": round(median_s, 3),
                "runs": RUNS,
                "load_average_1min": round(os.getloadavg()[0], 2),
                "batch_shapes": {k: list(v.shape) for k, v in batch.items()},
            }), flush=True)


if __name__ == "__main__":
    main()
