"""Cost of downscaling: seconds per member per lead of :meth:`forecasting.downscaling.DownscalingModel.sample`.

A model with random weights (the cost does not depend on them) on a fine grid of the given size samples
``--members`` members of ``--inputs`` coarse fields (already on the fine grid) with the EDM Heun sampler of
``--sampling-steps`` intervals (``2 N - 1`` network evaluations per sample), ``--batch`` samples per network call.
Reported: the median over ``--repeats`` runs after one warm-up run, per sample (= per member per lead), and the
regression-only cost (one network evaluation per input). Prints one JSON line per size:

    {"benchmark": "downscaling", "size": ..., "device": ..., "grid": [H, W], "channels": C, "static": S,
     "base_channels": ..., "sampling_steps": N, "evaluations": 2N - 1, "members": K, "inputs": n,
     "s_per_member_per_lead": ..., "regression_s_per_input": ..., "params": {...}}

Sizes: ``quickstart`` (the built-in regional grid, 14 x 22, 4 channels, 2 static fields, base 16 as in
configs/downscale.yaml), ``era5_uk`` (28 x 28, 1 channel, configs/downscale_era5_uk.yaml) and ``large``
(128 x 128, 4 channels, base 32). Usage:

    PYTHONPATH=. python benchmarks/bench_downscaling.py                      # CPU, quickstart and era5_uk
    PYTHONPATH=. python benchmarks/bench_downscaling.py --size large --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import pandas as pd
import torch

from forecasting.config import DownscalingModelConfig
from forecasting.downscaling import DownscalingModel
from forecasting.forecasters import Channels, Normalisation

SIZES = {
    "quickstart": {"shape": (14, 22), "channels": 4, "static": 2, "base_channels": 16},
    "era5_uk": {"shape": (28, 28), "channels": 1, "static": 0, "base_channels": 16},
    "large": {"shape": (128, 128), "channels": 4, "static": 2, "base_channels": 32},
}


def build(size: str, *, sampling_steps: int, batch: int, device: str) -> DownscalingModel:
    spec = SIZES[size]
    height, width = spec["shape"]
    n_channels, n_static = spec["channels"], spec["static"]
    channels = Channels(tuple(f"v{i}" for i in range(n_channels)), (False,) * n_channels, (), ("1",) * n_channels)
    static = Channels(tuple(f"s{i}" for i in range(n_static)), (False,) * n_static, (), ("1",) * n_static)
    normalisation = Normalisation(
        mean=np.zeros(n_channels), std=np.ones(n_channels), tendency_std=np.ones(n_channels),
        static_mean=np.zeros(n_static), static_std=np.ones(n_static),
    )
    config = DownscalingModelConfig(stage="both", regression_steps=1, base_channels=spec["base_channels"],
                                    sampling_steps=sampling_steps, member_batch=batch)
    model = DownscalingModel(
        model_config=config, channels=channels, static=static, normalisation=normalisation,
        detail_rms=np.full(n_channels, 0.5), latitude=45.0 + 0.25 * np.arange(height),
        longitude=0.25 * np.arange(width), static_normalised=np.zeros((n_static, height, width), dtype=np.float32),
        coarse_spacing=(1.0, 1.0), valid_seconds=[0], regression_steps=1,
    )
    model.network.trained_steps.fill_(2)  # past the regression stage: samples use the denoiser
    return model.to(device)


def run(size: str, *, members: int, inputs: int, sampling_steps: int, batch: int, repeats: int, device: str) -> dict:
    model = build(size, sampling_steps=sampling_steps, batch=batch, device=device)
    height, width = SIZES[size]["shape"]
    rng = np.random.default_rng(0)
    coarse = rng.normal(size=(inputs, len(model.channels), height, width)).astype(np.float32)
    valid = pd.date_range("2000-01-01", periods=inputs, freq="6h").values
    seeds = list(range(inputs * members))

    def timed(samples: int, sampling: bool) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        if sampling:
            model.sample(coarse, valid_times=valid, samples=samples, seeds=seeds[: inputs * samples], batch=batch)
        else:
            model.network.trained_steps.fill_(0)  # regression only
            model.sample(coarse, valid_times=valid, samples=1, seeds=seeds[:inputs], batch=batch)
            model.network.trained_steps.fill_(2)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - started

    timed(members, True)
    sampled = statistics.median(timed(members, True) for _ in range(repeats))
    regression = statistics.median(timed(1, False) for _ in range(repeats))
    network = model.network
    return {
        "benchmark": "downscaling", "size": size, "device": device, "grid": [height, width],
        "channels": len(model.channels), "static": len(model.static), "base_channels": SIZES[size]["base_channels"],
        "sampling_steps": sampling_steps, "evaluations": 2 * sampling_steps - 1, "members": members, "inputs": inputs,
        "batch": batch, "threads": torch.get_num_threads(),
        "s_per_member_per_lead": round(sampled / (members * inputs), 5),
        "regression_s_per_input": round(regression / inputs, 5),
        "params": {"regression": sum(p.numel() for p in network.regression.parameters()),
                   "denoiser": sum(p.numel() for p in network.denoiser.parameters())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), action="append", help="default: quickstart and era5_uk")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--inputs", type=int, default=4)
    parser.add_argument("--sampling-steps", type=int, default=18)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    with torch.no_grad():
        for size in args.size or ["quickstart", "era5_uk"]:
            print(json.dumps(run(size, members=args.members, inputs=args.inputs, sampling_steps=args.sampling_steps,
                                 batch=args.batch, repeats=args.repeats, device=args.device)), flush=True)


if __name__ == "__main__":
    main()
