"""The built-in dataset: run the simulator from a validated :class:`SimulationConfig` and write it."""

from __future__ import annotations

from pathlib import Path

from forecasting.config import SimulationConfig
from forecasting.errors import StoreError


def run_simulation(config: SimulationConfig, out: Path, *, overwrite: bool = False, progress: bool = False) -> dict[str, Path]:
    """Simulate and write ``out/{global_coarse.nc, regional_fine.nc, stations.parquet, simulation.json}``.

    Refuses an existing ``out`` before any computation unless ``overwrite``.
    """
    if out.exists() and not overwrite:
        raise StoreError(f"output directory {out} already exists; pass --overwrite to replace it")
    from forecasting.data.simulator import Region, SimulationSettings, simulate, write_simulation

    settings = SimulationSettings(
        years=config.years,
        seed=config.seed,
        spinup_days=config.spinup_days,
        nlat=config.nlat,
        nlon=config.nlon,
        n_stations=config.n_stations,
        region=Region(*config.region.as_tuple()),
    )
    result = simulate(settings, progress=progress)
    return write_simulation(result, out, overwrite=overwrite)
