"""Synthetic station network and its 2 m temperature observations, drawn from the simulator's fine grid.

Sites (seeded): a fraction ``region_fraction`` (default 80%) in the region box widened by ``margin_deg``
(cells drawn with weight 0.1 + land fraction, so mostly on land, but an all-sea box still gets stations),
the rest on land elsewhere between 80S and 80N (weight land fraction x cell area). Each site is placed
uniformly inside its fine cell and gets an ``elevation`` = fine-grid orography at the site + a seeded
sub-grid deviation (Gaussian, ``elevation_sd_m``, floored at 0 m).

Observations (every output time): bilinear interpolation of the fine global truth to the site, corrected
to the site's elevation with the lapse rate (-6.5 K/km, as in the simulator's T_eq), plus seeded
representativeness noise (Gaussian, ``noise_k``), with a seeded fraction ``missing_fraction`` of values
missing (NaN). Output is a long table in the observation contract of shared/DESIGN.md: columns
``station_id`` ("SYN0001", ...), ``latitude``, ``longitude``, ``elevation`` (m), ``time``, ``2m_temperature`` (K).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from forecasting.data.simulator import Region


@dataclass(frozen=True)
class StationNetwork:
    """Station sites; every array has shape (station,). Longitudes in [0, 360), elevation in m."""

    station_id: np.ndarray
    latitude: np.ndarray
    longitude: np.ndarray
    elevation: np.ndarray


class BilinearInterpolator:
    """Bilinear interpolation from a regular global grid to points.

    ``grid_lat`` (ascending, equally spaced) and ``grid_lon`` (equally spaced from 0, periodic) are the
    grid's cell centres; points beyond the outermost latitude centres take the edge row.
    """

    def __init__(self, grid_lat: np.ndarray, grid_lon: np.ndarray, lat: np.ndarray, lon: np.ndarray):
        dlat, dlon = grid_lat[1] - grid_lat[0], grid_lon[1] - grid_lon[0]
        y = np.clip((np.asarray(lat) - grid_lat[0]) / dlat, 0.0, len(grid_lat) - 1.0)
        self._i0 = np.minimum(np.floor(y).astype(int), len(grid_lat) - 2)
        self._wy = y - self._i0
        x = np.mod(np.asarray(lon) - grid_lon[0], 360.0) / dlon
        j0 = np.floor(x).astype(int)
        self._wx = x - j0
        self._j0 = j0 % len(grid_lon)
        self._j1 = (j0 + 1) % len(grid_lon)

    def __call__(self, field: np.ndarray) -> np.ndarray:
        """Field (..., lat, lon) -> values at the points (..., point)."""
        i0, i1 = self._i0, self._i0 + 1
        south = field[..., i0, self._j0] * (1.0 - self._wx) + field[..., i0, self._j1] * self._wx
        north = field[..., i1, self._j0] * (1.0 - self._wx) + field[..., i1, self._j1] * self._wx
        return south * (1.0 - self._wy) + north * self._wy


def _draw_cells(rng: np.random.Generator, weights: np.ndarray, n: int) -> np.ndarray:
    """Flat cell indices drawn with probability proportional to ``weights`` (without replacement if possible)."""
    if n == 0:
        return np.empty(0, dtype=int)
    probability = weights.ravel() / weights.sum()
    replace = n > np.count_nonzero(probability)
    return rng.choice(probability.size, size=n, replace=replace, p=probability)


def sample_stations(
    *,
    n_stations: int,
    region: Region,
    latitude: np.ndarray,
    longitude: np.ndarray,
    land_fraction: np.ndarray,
    surface_height: np.ndarray,
    seed: int,
    region_fraction: float = 0.8,
    margin_deg: float = 2.0,
    elevation_sd_m: float = 250.0,
) -> StationNetwork:
    """Draw a seeded station network on the regular fine grid (``latitude`` (lat,), ``longitude`` (lon,)).

    ``land_fraction`` and ``surface_height`` (m) have shape (lat, lon). See the module docstring.
    """
    rng = np.random.default_rng([seed, 2])
    lat2d, lon2d = np.meshgrid(latitude, longitude, indexing="ij")
    near = region.contains(lat2d, lon2d, margin=margin_deg)
    area = np.cos(np.deg2rad(lat2d))
    near_weights = np.where(near, 0.1 + land_fraction, 0.0)
    far_weights = np.where(~near & (np.abs(lat2d) <= 80.0), land_fraction * area, 0.0)
    n_near = round(region_fraction * n_stations)
    cells = np.concatenate([_draw_cells(rng, near_weights, n_near), _draw_cells(rng, far_weights, n_stations - n_near)])
    i, j = np.unravel_index(cells, lat2d.shape)
    dlat, dlon = latitude[1] - latitude[0], longitude[1] - longitude[0]
    lat = np.clip(latitude[i] + rng.uniform(-0.5, 0.5, cells.size) * dlat, -90.0, 90.0)
    lon = np.mod(longitude[j] + rng.uniform(-0.5, 0.5, cells.size) * dlon, 360.0)
    grid_height = BilinearInterpolator(latitude, longitude, lat, lon)(surface_height)
    deviation = np.random.default_rng([seed, 3]).normal(0.0, elevation_sd_m, cells.size)
    station_id = np.array([f"SYN{k + 1:04d}" for k in range(cells.size)])
    return StationNetwork(station_id, lat, lon, np.maximum(grid_height + deviation, 0.0))


def observe_2m_temperature(
    network: StationNetwork,
    *,
    times: np.ndarray,
    truth: np.ndarray,
    grid_height: np.ndarray,
    seed: int,
    noise_k: float = 0.7,
    missing_fraction: float = 0.015,
    lapse_rate: float = 6.5e-3,
) -> pd.DataFrame:
    """Station observations as a long table sorted by station then time.

    ``truth`` (time, station): the fine-grid 2 m temperature interpolated to the sites (K);
    ``grid_height`` (station,): the grid orography interpolated the same way (m).
    """
    n_times, n_stations = truth.shape
    rng = np.random.default_rng([seed, 4])
    values = truth - lapse_rate * (network.elevation - grid_height)[None, :]
    values = values + rng.normal(0.0, noise_k, values.shape)
    values[rng.random(values.shape) < missing_fraction] = np.nan
    return pd.DataFrame(
        {
            "station_id": np.repeat(network.station_id, n_times),
            "latitude": np.repeat(network.latitude, n_times),
            "longitude": np.repeat(network.longitude, n_times),
            "elevation": np.repeat(network.elevation, n_times),
            "time": np.tile(np.asarray(times, dtype="datetime64[ns]"), n_stations),
            "2m_temperature": values.T.reshape(-1).astype(np.float32),
        }
    )
