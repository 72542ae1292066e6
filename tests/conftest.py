"""Shared fixtures: the real-data folder, small canonical datasets, and a quiet environment."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = ROOT.parent / "shared" / "data" / "real"

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The folder of small real ERA5 and station files; tests using it skip when it is absent."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real test data not found at {REAL_DATA} (../shared/data/real beside the project)")
    return REAL_DATA


def make_canonical_dataset(
    *, n_times: int = 8, n_lat: int = 6, n_lon: int = 12, levels=(500.0, 850.0), seed: int = 0, start="2000-01-01"
) -> xr.Dataset:
    """A small dataset already in the canonical layout, with analytic-ish random values."""
    rng = np.random.default_rng(seed)
    time = pd.date_range(start, periods=n_times, freq="6h")
    lat = np.linspace(-75, 75, n_lat)
    lon = np.arange(n_lon) * (360.0 / n_lon)
    level = np.asarray(levels, dtype=float)
    z = 5.4e4 + 100 * rng.standard_normal((n_times, len(level), n_lat, n_lon))
    t2m = 280 + 5 * rng.standard_normal((n_times, n_lat, n_lon))
    ds = xr.Dataset(
        {
            "geopotential": (("time", "level", "latitude", "longitude"), z.astype("float32"), {"units": "m**2 s**-2"}),
            "2m_temperature": (("time", "latitude", "longitude"), t2m.astype("float32"), {"units": "K"}),
        },
        coords={"time": time, "level": ("level", level, {"units": "hPa"}), "latitude": lat, "longitude": lon},
    )
    return ds


@pytest.fixture
def canonical_dataset() -> xr.Dataset:
    return make_canonical_dataset()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module: its models are tiny and the test machine is shared."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
