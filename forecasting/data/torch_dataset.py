"""Training windows from a training store as torch tensors: the one Dataset -> tensor adapter for training.

A window is ``input_steps`` consecutive states followed by ``target_steps`` future states, ``step``
apart, all of which exist in the store (windows never bridge a gap in time). Each state is a stack of
channels: one per variable without a level dim, one per (variable, level) otherwise, named
``"<variable>@<level>"`` (level printed with ``:g``, e.g. ``geopotential@500``), in the order of
``variables`` and ascending level. Shapes of one sample (H = latitude, W = longitude, ascending as in
the store; any lat/lon grid, global or regional):

* ``inputs``   (T_in, C, H, W)   float32, normalised ``(x - mean) / std``
* ``targets``  (T_out, C, H, W)  float32, normalised the same way (state statistics, not tendencies)
* ``forcings`` (T_in + T_out, F, H, W) float32, F = 4: ``cos_day_of_year``, ``sin_day_of_year``,
  ``cos_local_time``, ``sin_local_time`` (see :func:`time_forcings`)
* ``static``   (S, H, W)         float32, normalised with their own mean and std
* ``time``     ()  int64, nanoseconds since 1970-01-01 of the last input step
* ``index``    ()  int64, the window's index

Conventions: statistics default to the store's ``statistics`` group; a std of 0 (a constant field)
normalises with 1 instead. Values missing in the store (NaN outside a ``<var>_mask``) become 0 after
normalisation, i.e. the training mean, so no NaN reaches a network; the masks stay in the store for a
masked loss. A store with a ``realization`` dim of size 1 is used as is; with several members the
constructor raises (pass ``open_store(path).isel(realization=k)`` to train on member ``k``).

Multi-process loading: a dataset built from a path opens the store lazily once per process (keyed by
pid) and never pickles an open store, so it works with ``DataLoader(num_workers=N)``; one sample reads
only the Zarr chunks of its time steps (the store is opened without dask).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import xarray as xr

from forecasting.data.statistics import STATISTIC, compute_statistics, is_validity_mask
from forecasting.data.store import open_store, read_statistics
from forecasting.errors import SchemaError
from forecasting.schema import LAT, LEVEL, LON, MEMBER, TIME, check_time_axis

FORCING_NAMES = ("cos_day_of_year", "sin_day_of_year", "cos_local_time", "sin_local_time")
#: Mean tropical year in days: the period of the day-of-year forcing.
TROPICAL_YEAR_DAYS = 365.24219


def time_forcings(times: np.ndarray, longitude: np.ndarray, n_lat: int) -> np.ndarray:
    """Forcings computed from time and longitude; Shape (T, 4, n_lat, n_lon), float32.

    ``year_progress = frac(days since 1970-01-01 / 365.24219)`` gives ``cos/sin(2 pi year_progress)``
    (the same at every point); ``local_hours = (UTC hours of day + longitude / 15) mod 24`` gives
    ``cos/sin(2 pi local_hours / 24)`` (the same along a meridian).
    """
    ns = times.astype("datetime64[ns]").astype(np.int64)
    days = ns / (86400 * 1e9)
    year_phase = 2 * np.pi * np.mod(days / TROPICAL_YEAR_DAYS, 1.0)  # (T,)
    utc_hours = np.mod(ns, 86400 * 10**9) / (3600 * 1e9)  # (T,)
    local_hours = np.mod(utc_hours[:, None] + np.asarray(longitude, dtype=np.float64)[None, :] / 15.0, 24.0)
    day_phase = 2 * np.pi * local_hours / 24.0  # (T, W)
    n_times, n_lon = len(times), len(longitude)
    out = np.empty((n_times, len(FORCING_NAMES), n_lat, n_lon), dtype=np.float32)
    out[:, 0] = np.cos(year_phase)[:, None, None]
    out[:, 1] = np.sin(year_phase)[:, None, None]
    out[:, 2] = np.cos(day_phase)[:, None, :]
    out[:, 3] = np.sin(day_phase)[:, None, :]
    return out


class WindowDataset(torch.utils.data.Dataset):
    """Windows of (input steps, target steps, forcings) from one store, normalised.

    Shapes: inputs (T_in, C, H, W), targets (T_out, C, H, W), forcings (T_in + T_out, F, H, W),
    static (S, H, W). See the module docstring for names, order and conventions.

    ``store`` is a store path/URL or an xarray Dataset in the canonical layout. ``variables`` defaults to
    every time-dependent data variable, in the store's order, that is not a validity mask ``<var>_mask``;
    ``static_variables`` to every such variable without a time dim (``land_sea_mask`` is a field and
    counts). ``step`` (a multiple of the store's time step) separates
    consecutive states. ``time = (start, end)`` keeps windows whose every step lies in that range
    (inclusive labels). ``statistics`` defaults to the store's (for a Dataset without statistics: computed
    from all its times). ``normalise=False`` returns raw values (``denormalise`` is then the identity).
    """

    channels: tuple[str, ...]
    forcing_names: tuple[str, ...]
    static_names: tuple[str, ...]

    def __init__(
        self,
        store: str | Path | xr.Dataset,
        *,
        variables: Sequence[str] | None = None,
        input_steps: int = 2,
        target_steps: int = 1,
        step: str | pd.Timedelta = "6h",
        time: tuple[str | None, str | None] | None = None,
        statistics: xr.Dataset | None = None,
        static_variables: Sequence[str] | None = None,
        normalise: bool = True,
    ) -> None:
        if input_steps < 1 or target_steps < 0:
            raise ValueError(f"need input_steps >= 1 and target_steps >= 0; found {input_steps}, {target_steps}")
        if isinstance(store, xr.Dataset):
            self._location: str | None = None
            self._given: xr.Dataset | None = store
            self.source = "<dataset>"
        else:
            self._location = str(store)
            self._given = None
            self.source = self._location
        self._cache: xr.Dataset | None = None
        self._cache_pid: int | None = None
        ds = self._dataset

        features = [str(n) for n in ds.data_vars if not is_validity_mask(ds, str(n))]
        time_vars = [n for n in features if TIME in ds[n].dims]
        static_vars = [n for n in features if TIME not in ds[n].dims]
        if isinstance(variables, str):
            variables = [variables]
        if isinstance(static_variables, str):
            static_variables = [static_variables]
        self.variables = tuple(time_vars if variables is None else variables)
        self.static_variables = tuple(static_vars if static_variables is None else static_variables)
        self._check_requested(ds, self.variables, want_time=True)
        self._check_requested(ds, self.static_variables, want_time=False)
        self.channels = tuple(_channel_names(ds, self.variables))
        self.static_names = tuple(_channel_names(ds, self.static_variables))
        self.forcing_names = FORCING_NAMES
        self.input_steps, self.target_steps = int(input_steps), int(target_steps)

        times = ds[TIME].values
        store_step = check_time_axis(times, source=self.source).step
        self.step = pd.Timedelta(step)
        if self.step <= pd.Timedelta(0) or (store_step is not None and self.step % store_step != pd.Timedelta(0)):
            raise SchemaError(
                f"{self.source}: window step {self.step} is not a positive multiple of the store's time "
                f"step {store_step}"
            )
        length = self.input_steps + self.target_steps
        self._positions = _window_positions(times, self.step, length, time)
        if len(self._positions) == 0:
            raise SchemaError(
                f"{self.source}: no window of {length} times {self.step} apart lies within "
                f"{'the store' if time is None else f'time range {time}'}; the store has {times.size} times "
                f"from {pd.Timestamp(times[0])} to {pd.Timestamp(times[-1])}"
            )
        self._times = times
        self._longitude = ds[LON].values
        self._n_lat = ds.sizes[LAT]

        self.normalise = bool(normalise)
        if self.normalise:
            stats = statistics if statistics is not None else self._default_statistics(ds)
            self._mean, self._std = _channel_statistics(stats, ds, self.variables, source=self.source)
            static_mean, static_std = _channel_statistics(stats, ds, self.static_variables, source=self.source)
        else:
            self._mean = np.zeros(len(self.channels), dtype=np.float32)
            self._std = np.ones(len(self.channels), dtype=np.float32)
            static_mean = np.zeros(len(self.static_names), dtype=np.float32)
            static_std = np.ones(len(self.static_names), dtype=np.float32)
        static = _stack_channels(ds, self.static_variables, time_positions=None)  # (S, H, W)
        self._static = torch.from_numpy(normalised(static, static_mean[:, None, None], static_std[:, None, None]))
        self._mean_t = torch.from_numpy(self._mean)[:, None, None]  # (C, 1, 1)
        self._std_t = torch.from_numpy(self._std)[:, None, None]

    # -- store access, once per process ------------------------------------------------------------
    @property
    def _dataset(self) -> xr.Dataset:
        """The store (or given Dataset), member-selected, opened in this process."""
        pid = os.getpid()
        if self._cache is None or self._cache_pid != pid:
            if self._given is not None:
                ds = self._given
            else:
                assert self._location is not None
                ds = open_store(self._location, use_dask=False)
            self._cache = _single_member(ds, source=self.source)
            self._cache_pid = pid
        return self._cache

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state["_cache"] = None
        state["_cache_pid"] = None
        return state

    def _default_statistics(self, ds: xr.Dataset) -> xr.Dataset:
        if self._location is not None:
            return read_statistics(self._location)
        return compute_statistics(ds, train_period=None)

    def _check_requested(self, ds: xr.Dataset, names: Sequence[str], *, want_time: bool) -> None:
        missing = [n for n in names if n not in ds.data_vars]
        if missing:
            raise SchemaError(
                f"{self.source}: requested variables {missing} are not in the store; it has "
                f"{sorted(map(str, ds.data_vars))}"
            )
        allowed = {TIME, LEVEL, LAT, LON} if want_time else {LEVEL, LAT, LON}
        for name in names:
            dims = ds[name].dims
            if (TIME in dims) != want_time or not set(dims) <= allowed or LAT not in dims or LON not in dims:
                kind = "time-dependent" if want_time else "static"
                raise SchemaError(
                    f"{self.source}: variable {name!r} has dims {dims}; a {kind} variable needs dims "
                    f"({'time, ' if want_time else ''}[level,] latitude, longitude)"
                )

    # -- the Dataset protocol ----------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._positions.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        n = len(self)
        i = index + n if index < 0 else index
        if not 0 <= i < n:
            raise IndexError(f"window {index} out of range for {n} windows")
        positions = self._positions[i]
        frames = _stack_channels(self._dataset, self.variables, time_positions=positions)  # (T, C, H, W)
        frames = normalised(frames, self._mean[None, :, None, None], self._std[None, :, None, None])
        times = self._times[positions]
        return {
            "inputs": torch.from_numpy(frames[: self.input_steps]),
            "targets": torch.from_numpy(frames[self.input_steps :]),
            "forcings": torch.from_numpy(time_forcings(times, self._longitude, self._n_lat)),
            "static": self._static,
            "time": torch.tensor(int(times[self.input_steps - 1].astype("datetime64[ns]").astype(np.int64))),
            "index": torch.tensor(i, dtype=torch.int64),
        }

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        """Undo the channel-wise normalisation of ``x`` with shape (..., C, H, W); returns a new tensor."""
        if x.ndim < 3 or x.shape[-3] != len(self.channels):
            raise ValueError(f"expected (..., {len(self.channels)}, H, W); found shape {tuple(x.shape)}")
        return x * self._std_t.to(x.device, x.dtype) + self._mean_t.to(x.device, x.dtype)

    def window_times(self, index: int) -> np.ndarray:
        """The datetime64 times of window ``index``: Shape (T_in + T_out,)."""
        return self._times[self._positions[index]]


def _single_member(ds: xr.Dataset, *, source: str) -> xr.Dataset:
    if MEMBER not in ds.dims:
        return ds
    if ds.sizes[MEMBER] == 1:
        return ds.isel({MEMBER: 0})
    raise SchemaError(
        f"{source}: the store has {ds.sizes[MEMBER]} ensemble members (dim 'realization'); WindowDataset "
        "trains on one state per time: pass open_store(path).isel(realization=k) to use member k"
    )


def _channel_names(ds: xr.Dataset, names: Sequence[str]) -> list[str]:
    out = []
    for name in names:
        if LEVEL in ds[name].dims:
            out.extend(f"{name}@{level:g}" for level in ds[LEVEL].values)
        else:
            out.append(name)
    return out


def _stack_channels(ds: xr.Dataset, names: Sequence[str], *, time_positions: np.ndarray | None) -> np.ndarray:
    """Read ``names`` and stack them as channels: (T, C, H, W) with time positions, else (C, H, W); float32."""
    parts = []
    for name in names:
        var = ds[name]
        if time_positions is not None:
            var = var.isel({TIME: time_positions})
        values = np.asarray(var.values, dtype=np.float32)
        if LEVEL not in var.dims:
            values = values[..., None, :, :] if time_positions is not None else values[None]
        parts.append(values)
    if not parts:
        n_lat, n_lon = ds.sizes[LAT], ds.sizes[LON]
        shape = (0, n_lat, n_lon) if time_positions is None else (len(time_positions), 0, n_lat, n_lon)
        return np.zeros(shape, dtype=np.float32)
    return np.concatenate(parts, axis=-3)


def normalised(values: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(values - mean) / std`` as float32 with NaN (missing values) set to 0, the training mean; ``mean`` and
    ``std`` broadcast against ``values`` (e.g. (C, 1, 1) against (..., C, H, W))."""
    out = (values - mean) / std
    return np.nan_to_num(out, nan=0.0).astype(np.float32, copy=False)


def _channel_statistics(
    stats: xr.Dataset, ds: xr.Dataset, names: Sequence[str], *, source: str
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, std) as float32 arrays of shape (C,), in channel order; std 0 becomes 1."""
    missing = [n for n in names if n not in stats.data_vars]
    if missing:
        raise SchemaError(
            f"{source}: statistics lack variables {missing}; they have {sorted(map(str, stats.data_vars))}"
        )
    means, stds = [], []
    for name in names:
        var = stats[name]
        if LEVEL in ds[name].dims:
            var = var.sel({LEVEL: ds[LEVEL].values})
        means.append(np.atleast_1d(var.sel({STATISTIC: "mean"}).values))
        stds.append(np.atleast_1d(var.sel({STATISTIC: "std"}).values))
    mean = np.concatenate(means) if means else np.zeros(0)
    std = np.concatenate(stds) if stds else np.ones(0)
    std = np.where(std > 0, std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)


def _window_positions(
    times: np.ndarray, step: pd.Timedelta, length: int, period: tuple[str | None, str | None] | None
) -> np.ndarray:
    """Store positions of every complete window: Shape (n_windows, length), int64.

    A window starts at each stored time ``t0`` for which every ``t0 + k * step`` (k < length) is stored
    and, with ``period``, lies within it.
    """
    index = pd.DatetimeIndex(times)
    allowed = np.ones(len(index), dtype=bool)
    if period is not None:
        start, end = period
        inside = pd.Series(np.arange(len(index)), index=index).loc[slice(start, end)].to_numpy()
        allowed = np.zeros(len(index), dtype=bool)
        allowed[inside] = True
    offsets = step.to_timedelta64() * np.arange(length)  # (length,)
    wanted = times[:, None] + offsets[None, :]  # (N, length)
    positions = np.searchsorted(times, wanted)
    clipped = np.minimum(positions, len(times) - 1)
    found = (positions < len(times)) & (times[clipped] == wanted) & allowed[clipped]
    complete = found.all(axis=1)
    return clipped[complete].astype(np.int64)
