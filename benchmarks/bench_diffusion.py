"""Sampling cost of the diffusion families: network evaluations and wall time per member and lead.

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

Side by side, on the same inputs and the defaults of their configs (``--steps`` is the conditional family's):

* ``rolling`` (:class:`~forecasting.diffusion.rolling.RollingDiffusion`, a window of
  ``RollingDiffusionModelConfig().window`` frames): one lead is one sampling pass of ``sampling_steps`` steps,
  the first window a pass of ``init_steps``; per (grid, sampler) a line ``"benchmark": "rolling_sampling"`` with
  ``network_evaluations`` (per lead) and ``first_lead_network_evaluations``, ``seconds_per_member_lead`` and
  ``seconds_per_member_first_lead``;
* ``dyffusion`` (:class:`~forecasting.diffusion.dyffusion.DYffusion`, horizon ``DYffusionModelConfig().horizon``):
  one sampling pass gives all ``h`` leads of a window; per (grid, sampler: ``cold``, ``direct``) a line
  ``"benchmark": "dyffusion_sampling"`` with ``forecaster_evaluations`` and ``interpolator_evaluations`` per
  pass (checked against :func:`~forecasting.diffusion.dyffusion.network_evaluations`), ``network_evaluations``
  per lead (the pass's over ``h``) and ``seconds_per_member_lead`` (the pass's time over ``h``);
* ``spectral_filter`` (:class:`~forecasting.models.SpectralFilter`, the global grid only): the damping every
  family applies to each lead with ``spectral_filter_hours`` set; a line ``"benchmark": "spectral_filter"`` with
  ``seconds_per_member_lead`` (one filter call on the members' 4 channels, no network).

Usage:

    PYTHONPATH=. python benchmarks/bench_diffusion.py                      # CPU, 20 steps, 8 members
    PYTHONPATH=. python benchmarks/bench_diffusion.py --steps 10 --members 4 --threads 1
    PYTHONPATH=. python benchmarks/bench_diffusion.py --device cuda
    PYTHONPATH=. python benchmarks/bench_diffusion.py --family rolling --family dyffusion --grid global
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from forecasting.config import DiffusionModelConfig, DYffusionModelConfig, RollingDiffusionModelConfig
from forecasting.diffusion.conditional import ConditionalDiffusion
from forecasting.diffusion.dyffusion import DYffusion, network_evaluations, sampling_schedule
from forecasting.diffusion.edm import EDMConfig
from forecasting.diffusion.rolling import ROLLING_SAMPLERS, RollingDiffusion, RollingSchedule
from forecasting.diffusion.samplers import SAMPLERS, evaluations, karras_sigmas
from forecasting.models import SpectralFilter

#: Quickstart grids: name -> (latitudes, periodic in longitude).
GRIDS = {
    "global": (-90.0 + (np.arange(32) + 0.5) * 5.625, True),
    "regional": (45.0 + (np.arange(14) + 0.5) * 1.875, False),
}
WIDTHS = {"global": 64, "regional": 22}
CHANNELS, FORCINGS, STATIC, INPUT_STEPS = 4, 4, 2, 2
FAMILIES = ("diffusion", "rolling", "dyffusion", "spectral_filter")


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


def _unet_sizes(config: DiffusionModelConfig | RollingDiffusionModelConfig | DYffusionModelConfig) -> dict:
    return {"base_channels": config.base_channels, "channel_mult": tuple(config.channel_mult),
            "blocks_per_level": config.blocks_per_level, "embedding_dim": config.embedding_dim,
            "dropout": config.dropout}


def _timed(call, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_rolling(grid: str, method: str, *, members: int, repeats: int, device: torch.device) -> dict:
    """Per-lead cost of the rolling family: one pass of ``sampling_steps`` (and the first window's pass)."""
    config = RollingDiffusionModelConfig(sampler=method)
    latitude, periodic = GRIDS[grid]
    height, width = len(latitude), WIDTHS[grid]
    schedule = RollingSchedule(window=config.window, sigma_min=config.sigma_min, sigma_max=config.sigma_max,
                               rho=config.rho)
    model = RollingDiffusion(
        n_channels=CHANNELS, n_forcings=FORCINGS, n_static=STATIC, input_steps=INPUT_STEPS, schedule=schedule,
        latitude=latitude, residual_scale=np.ones(CHANNELS), periodic_lon=periodic, sigma_data=config.sigma_data,
        unet=_unet_sizes(config),
    ).to(device).eval()
    generator = torch.Generator(device=device).manual_seed(0)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=device)

    condition = model.conditioning(normal(members, INPUT_STEPS, CHANNELS, height, width),
                                   normal(members, INPUT_STEPS + config.window, FORCINGS, height, width),
                                   normal(members, STATIC, height, width))
    window = config.sigma_max * normal(members, config.window, CHANNELS, height, width)
    calls = []
    model.network.register_forward_hook(lambda *_: calls.append(1))
    figures = {}
    for name, init, steps in (("lead", False, config.sampling_steps), ("first_lead", True, config.init_steps)):
        def one_pass(init: bool = init, steps: int = steps) -> None:
            model.denoising_pass(window, condition, init=init, steps=steps, method=method)

        _timed(one_pass, device)  # warm-up
        calls.clear()
        times = [_timed(one_pass, device) for _ in range(repeats)]
        counted = len(calls) // repeats
        if counted != evaluations(method, steps):
            raise RuntimeError(f"rolling {method}: counted {counted} evaluations, evaluations() says "
                               f"{evaluations(method, steps)}")
        figures[name] = (counted, statistics.median(times) / members)
    return {
        "benchmark": "rolling_sampling",
        "grid": grid,
        "shape": [height, width],
        "window": config.window,
        "sampler": method,
        "steps": config.sampling_steps,
        "init_steps": config.init_steps,
        "network_evaluations": figures["lead"][0],
        "first_lead_network_evaluations": figures["first_lead"][0],
        "members": members,
        "params": sum(p.numel() for p in model.parameters()),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "seconds_per_member_lead": round(figures["lead"][1], 5),
        "seconds_per_member_first_lead": round(figures["first_lead"][1], 5),
        "seconds_per_evaluation_per_member": round(figures["lead"][1] / figures["lead"][0], 6),
        "repeats": repeats,
    }


def run_dyffusion(grid: str, sampler: str, *, members: int, repeats: int, device: torch.device) -> dict:
    """Per-lead cost of DYffusion: one sampling pass (``cold`` or ``direct``) over the horizon, divided by the
    horizon."""
    config = DYffusionModelConfig()
    latitude, periodic = GRIDS[grid]
    height, width = len(latitude), WIDTHS[grid]
    horizon = config.horizon
    schedule = sampling_schedule(horizon, config.sampling_steps or horizon)
    model = DYffusion(
        n_channels=CHANNELS, n_forcings=FORCINGS, n_static=STATIC, input_steps=INPUT_STEPS, horizon=horizon,
        step_hours=6.0, latitude=latitude, residual_scale=np.ones(CHANNELS), periodic_lon=periodic,
        interpolator_dropout=config.interpolator_dropout, unet=_unet_sizes(config),
    ).to(device).eval()
    generator = torch.Generator(device=device).manual_seed(0)
    states = torch.randn((members, INPUT_STEPS, CHANNELS, height, width), generator=generator, device=device)
    static = torch.randn((members, STATIC, height, width), generator=generator, device=device)
    forcings = torch.randn((members, INPUT_STEPS + 2, FORCINGS, height, width), generator=generator, device=device)
    calls = {"forecaster": [], "interpolator": []}
    for name, log in calls.items():
        getattr(model, name).register_forward_hook(lambda *_, log=log: log.append(1))

    def one_pass() -> None:
        for _ in model.sample_window(sampler, states, static, lambda i: forcings, schedule):
            pass

    _timed(one_pass, device)  # warm-up
    for log in calls.values():
        log.clear()
    times = [_timed(one_pass, device) for _ in range(repeats)]
    counted = {name: len(log) // repeats for name, log in calls.items()}
    expected = network_evaluations(horizon, len(schedule), sampler)
    if counted != expected:
        raise RuntimeError(f"dyffusion ({sampler}): counted {counted}, network_evaluations() says {expected}")
    per_member_pass = statistics.median(times) / members
    per_lead = sum(counted.values()) / horizon
    return {
        "benchmark": "dyffusion_sampling",
        "grid": grid,
        "shape": [height, width],
        "sampler": sampler,
        "horizon": horizon,
        "steps": len(schedule) if sampler == "cold" else 1,
        "forecaster_evaluations": counted["forecaster"],
        "interpolator_evaluations": counted["interpolator"],
        "network_evaluations": round(per_lead, 3),
        "members": members,
        "params": sum(p.numel() for p in model.parameters()),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "seconds_per_member_lead": round(per_member_pass / horizon, 5),
        "seconds_per_evaluation_per_member": round(per_member_pass / sum(counted.values()), 6),
        "repeats": repeats,
    }


def run_spectral_filter(*, members: int, repeats: int, device: torch.device) -> dict:
    latitude, _ = GRIDS["global"]
    height, width = len(latitude), WIDTHS["global"]
    filt = SpectralFilter(height, width, e_folding_steps=2.0).to(device)
    fields = torch.randn(members, 4, height, width, device=device)
    _timed(lambda: filt(fields), device)  # warm-up
    times = [_timed(lambda: filt(fields), device) for _ in range(repeats)]
    return {
        "benchmark": "spectral_filter", "grid": "global", "shape": [height, width], "members": members,
        "device": str(device), "threads": torch.get_num_threads(),
        "seconds_per_member_lead": round(statistics.median(times) / members, 6), "repeats": repeats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=DiffusionModelConfig().sampling_steps)
    parser.add_argument("--members", type=int, default=DiffusionModelConfig().member_batch)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--grid", choices=sorted(GRIDS), action="append", help="grids (default: both)")
    parser.add_argument("--family", choices=FAMILIES, action="append",
                        help="families, and the spectral filter (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    families = args.family or list(FAMILIES)
    for grid in args.grid or list(GRIDS):
        if "diffusion" in families:
            for method in SAMPLERS:
                print(json.dumps(run(grid, method, steps=args.steps, members=args.members, repeats=args.repeats,
                                     device=device)), flush=True)
        if "rolling" in families:
            for method in ROLLING_SAMPLERS:
                print(json.dumps(run_rolling(grid, method, members=args.members, repeats=args.repeats,
                                             device=device)), flush=True)
        if "dyffusion" in families:
            for method in ("cold", "direct"):
                print(json.dumps(run_dyffusion(grid, method, members=args.members, repeats=args.repeats,
                                               device=device)), flush=True)
        if "spectral_filter" in families and grid == "global":
            print(json.dumps(run_spectral_filter(members=args.members, repeats=args.repeats, device=device)),
                  flush=True)


if __name__ == "__main__":
    main()
