"""Sampling cost of the conditional diffusion family: network evaluations and wall time per member and lead.

One lead of ``--members`` members is one call of :class:`~forecasting.diffusion.conditional.ConditionalDiffusion`
(the sampler integrating from ``sigma_max`` to 0 on the EDM schedule with ``--steps`` intervals), on random
normalised inputs of the quickstart's shapes: 4 state channels (``geopotential@500``, ``u/v@500``,
``2m_temperature``) x 2 input steps, 4 time forcings x 3 times, 2 static fields, on the coarse global grid
(32 x 64, 5.625 degrees, periodic) and the fine regional grid (14 x 22, 1.875 degrees over 45..72 N, 0..40 E). The network
is the config's default U-Net (:class:`~forecasting.config.DiffusionModelConfig`), untrained (the cost does not
depend on the weights). Network evaluations are counted with a forward hook and checked against
:func:`~forecasting.diffusion.samplers.evaluations`. Each figure is the median of ``--repeats`` timed calls after
one warm-up call. One JSON line per (grid, sampler):

    {"benchmark": "diffusion_sampling", "grid": ..., "shape": [H, W], "sampler": ..., "steps": ...,
     "network_evaluations": ..., "members": ..., "params": ..., "device": ..., "threads": ...,
     "seconds_per_member_lead": ..., "seconds_per_evaluation_per_member": ..., "repeats": ...}

Usage:

    PYTHONPATH=. python benchmarks/bench_diffusion.py                      # CPU, 20 steps, 8 members
    PYTHONPATH=. python benchmarks/bench_diffusion.py --steps 10 --members 4 --threads 1
    PYTHONPATH=. python benchmarks/bench_diffusion.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from forecasting.config import DiffusionModelConfig
from forecasting.diffusion.conditional import ConditionalDiffusion
from forecasting.diffusion.edm import EDMConfig
from forecasting.diffusion.samplers import SAMPLERS, evaluations, karras_sigmas

#: Quickstart grids: name -> (latitudes, periodic in longitude).
GRIDS = {
    "global": (-90.0 + (np.arange(32) + 0.5) * 5.625, True),
    "regional": (45.0 + (np.arange(14) + 0.5) * 1.875, False),
}
WIDTHS = {"global": 64, "regional": 22}
CHANNELS, FORCINGS, STATIC, INPUT_STEPS = 4, 4, 2, 2


def build(grid: str, device: torch.device) -> ConditionalDiffusion:
    config = DiffusionModelConfig()
    latitude, periodic = GRIDS[grid]
    model = ConditionalDiffusion(
        n_channels=CHANNELS, n_forcings=FORCINGS, n_static=STATIC, input_steps=INPUT_STEPS, latitude=latitude,
        residual_scale=np.ones(CHANNELS), periodic_lon=periodic, sigma_data=EDMConfig().sigma_data,
        unet={"base_channels": config.base_channels, "channel_mult": tuple(config.channel_mult),
              "blocks_per_level": config.blocks_per_level, "embedding_dim": config.embedding_dim,
              "dropout": config.dropout},
    )
    return model.to(device).eval()


def run(grid: str, method: str, *, steps: int, members: int, repeats: int, device: torch.device) -> dict:
    model = build(grid, device)
    height, width = len(GRIDS[grid][0]), WIDTHS[grid]
    generator = torch.Generator(device=device).manual_seed(0)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=device)

    states = normal(members, INPUT_STEPS, CHANNELS, height, width)
    forcings = normal(members, INPUT_STEPS + 1, FORCINGS, height, width)
    static = normal(members, STATIC, height, width)
    edm = EDMConfig()
    sigmas = karras_sigmas(steps, sigma_min=edm.sigma_min, sigma_max=edm.sigma_max, rho=edm.rho, device=device)
    calls = []
    model.denoiser.network.register_forward_hook(lambda *_: calls.append(1))

    def one_lead() -> float:
        noise = normal(members, CHANNELS, height, width)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model(states, forcings, static, noise=noise, sigmas=sigmas, method=method)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    one_lead()  # warm-up
    calls.clear()
    times = [one_lead() for _ in range(repeats)]
    counted = len(calls) // repeats
    if counted != evaluations(method, steps):
        raise RuntimeError(f"{method}: counted {counted} network evaluations, evaluations() says {evaluations(method, steps)}")
    per_member = statistics.median(times) / members
    return {
        "benchmark": "diffusion_sampling",
        "grid": grid,
        "shape": [height, width],
        "sampler": method,
        "steps": steps,
        "network_evaluations": counted,
        "members": members,
        "params": sum(p.numel() for p in model.parameters()),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "seconds_per_member_lead": round(per_member, 5),
        "seconds_per_evaluation_per_member": round(per_member / counted, 6),
        "repeats": repeats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=DiffusionModelConfig().sampling_steps)
    parser.add_argument("--members", type=int, default=DiffusionModelConfig().member_batch)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--grid", choices=sorted(GRIDS), action="append", help="grids (default: both)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    for grid in args.grid or list(GRIDS):
        for method in SAMPLERS:
            print(json.dumps(run(grid, method, steps=args.steps, members=args.members, repeats=args.repeats,
                                 device=device)), flush=True)


if __name__ == "__main__":
    main()
