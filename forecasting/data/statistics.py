"""Normalisation statistics of a training store: per variable and level mean, std and 6-hour tendency std.

The three numbers per channel are the ones graph and diffusion forecasters normalise with: inputs by
``(x - mean) / std`` and residuals (``x(t + 6 h) - x(t)``) by ``tendency_std``, as in GraphCast
(Lam et al. 2023, "Learning skillful medium-range global weather forecasting", Section 3 and
``normalization.py``). Conventions here:

* Statistics are unweighted over every point (no latitude weighting), over ``time``, ``realization``,
  ``latitude`` and ``longitude``, separately for each ``level``; they use only the training period.
* NaN-aware: points outside a variable's ``<var>_mask`` (True = valid) and NaN values are skipped.
* std is the population std (ddof 0). Each dask chunk is reduced by one task to its count, mean and
  centred sum of squares per level (float64), and these partials are merged with the pairwise update of
  Chan, Golub & LeVeque (1983, "Algorithms for computing the sample variance"), which is numerically
  stable (no sum-of-squares cancellation). The same task reduces the chunk's tendencies, reading the few
  later steps its last pairs need from the next chunk; so each chunk is read by one task (and a few
  of its steps by the previous one), memory stays at a few chunks whatever the length of the store,
  and all variables run in one ``dask.compute``.
* The tendency uses the pairs ``(t, t + lag)`` that both exist in the training period (gaps are never
  bridged). ``lag`` is ``tendency_hours`` when the store's step divides it (hourly store: 6 steps;
  6-hourly: 1 step); otherwise (e.g. a daily store) one store step, and the ``tendency_hours`` attribute
  records that step in hours. With no pair at all (a single time) ``tendency_std`` is NaN.
* Static variables (no ``time`` dim) get mean and std over space and ``tendency_std`` = 0: they do not
  change in time, so their tendency is exactly zero.

Layout of the result: a Dataset with the data variables of the input (validity masks ``<var>_mask`` and
non-float variables excluded), each with dims ``(statistic, [level])`` and float64 values, coordinate
``statistic = ["mean", "std", "tendency_std"]``, and attrs ``train_period`` (ISO first and last time
used), ``tendency_hours``, ``n_times`` and ``n_tendency_pairs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import dask
import numpy as np
import pandas as pd
import xarray as xr

from forecasting.errors import StoreError
from forecasting.schema import LEVEL, TIME, check_time_axis

if TYPE_CHECKING:
    import distributed
    from dask.delayed import Delayed

STATISTIC = "statistic"
STATISTIC_NAMES = ("mean", "std", "tendency_std")
#: Suffix of the validity masks ``check_values`` adds (``<var>_mask``, True = valid).
MASK_SUFFIX = "_mask"


def compute_statistics(
    ds: xr.Dataset,
    *,
    train_period: tuple[str | None, str | None] | None,
    tendency_hours: float = 6,
    client: distributed.Client | None = None,
) -> xr.Dataset:
    """Mean, std and tendency std of every float variable of ``ds`` over ``train_period`` (computed now).

    ``ds`` is a canonical gridded dataset with a ``time`` dim, usually lazy (dask); ``train_period`` is
    ``(start, end)`` with inclusive label bounds as in ``ds.sel(time=slice(start, end))``, either may be
    None (open), and None means all times. ``client`` is an optional ``distributed.Client`` to compute on
    (otherwise dask's current scheduler, which is an active Client if there is one).

    Returns the small, in-memory statistics Dataset described in the module docstring.
    Raises :class:`StoreError` when the period holds no times or ``ds`` has no time dim.
    """
    plan = _StatisticsPlan(ds, train_period=train_period, tendency_hours=tendency_hours)
    computed = dask.compute(*plan.lazy, scheduler=client) if client is not None else dask.compute(*plan.lazy)
    return plan.assemble(computed)


def select_train_period(ds: xr.Dataset, train_period: tuple[str | None, str | None] | None) -> xr.Dataset:
    """``ds`` over the train period (inclusive labels, None = open); :class:`StoreError` if it holds no times."""
    if TIME not in ds.dims:
        raise StoreError(f"statistics need a 'time' dim; the dataset has dims {dict(ds.sizes)}")
    start, end = train_period if train_period is not None else (None, None)
    train = ds.sel({TIME: slice(start, end)})
    if train.sizes[TIME] == 0:
        all_times = ds[TIME].values
        raise StoreError(
            f"train period {start} .. {end} holds no times; the data spans "
            f"{pd.Timestamp(all_times[0])} .. {pd.Timestamp(all_times[-1])}"
        )
    return train


class _StatisticsPlan:
    """The lazy work of :func:`compute_statistics`: ``lazy`` is a list of dask Delayed partials
    (count, mean, centred sum of squares) of one chunk each; :meth:`assemble` merges their results."""

    def __init__(
        self, ds: xr.Dataset, *, train_period: tuple[str | None, str | None] | None, tendency_hours: float = 6
    ) -> None:
        train = select_train_period(ds, train_period)
        times = train[TIME].values
        store_step = check_time_axis(ds[TIME].values, source="statistics input").step
        lag, lag_hours = _tendency_lag(store_step, tendency_hours)
        first, second = _tendency_pairs(times, lag, store_step)
        names = [
            str(name)
            for name, var in train.data_vars.items()
            if np.issubdtype(var.dtype, np.floating) and not is_validity_mask(train, str(name))
        ]
        self.lazy: list[Delayed] = []
        self._layout: list[tuple[str, int, bool]] = []  # name, number of partials, static
        self._templates: dict[str, xr.DataArray] = {}
        for name in names:
            var = train[name]
            parts = _variable_partials(var, _validity_mask(train, name), first, second)
            self.lazy.extend(parts)
            self._layout.append((name, len(parts), TIME not in var.dims))
            level = {LEVEL: train[LEVEL].variable} if LEVEL in var.dims else {}
            self._templates[name] = xr.DataArray(
                np.zeros((len(STATISTIC_NAMES), *(v.size for v in level.values()))),
                dims=(STATISTIC, *level),
                coords={STATISTIC: list(STATISTIC_NAMES), **level},
                attrs={"units": var.attrs.get("units", "")},
            )
        self._attrs = {
            "train_period": [_iso(times[0]), _iso(times[-1])],
            "tendency_hours": float(lag_hours),
            "n_times": int(times.size),
            "n_tendency_pairs": int(first.size),
        }

    def assemble(self, computed: Sequence[np.ndarray]) -> xr.Dataset:
        """The statistics Dataset from the computed partials of :attr:`lazy` (same order)."""
        out = xr.Dataset(coords={STATISTIC: list(STATISTIC_NAMES)})
        position = 0
        for name, n_parts, static in self._layout:
            parts = computed[position : position + n_parts]
            position += n_parts
            mean, std = _mean_std(_merge([part[0] for part in parts]))
            if static:
                tendency_std = np.zeros_like(std)
            else:  # NaN when there is no pair
                tendency_std = _mean_std(_merge([part[1] for part in parts]))[1]
            out[name] = self._templates[name].copy(data=np.stack([mean, std, tendency_std]))
        out.attrs = dict(self._attrs)
        return out


def is_validity_mask(ds: xr.Dataset, name: str) -> bool:
    """Whether ``name`` is the validity mask ``<var>_mask`` of another variable of ``ds`` (True = valid).

    ``land_sea_mask`` is a field, not a validity mask: there is no variable ``land_sea``.
    """
    return name.endswith(MASK_SUFFIX) and name[: -len(MASK_SUFFIX)] in ds.data_vars


def _iso(value: np.datetime64) -> str:
    return pd.Timestamp(value).isoformat()


def _tendency_lag(step: pd.Timedelta | None, tendency_hours: float) -> tuple[pd.Timedelta | None, float]:
    """The lag of the tendency and its length in hours: ``tendency_hours`` if the step divides it, else one step."""
    wanted = pd.Timedelta(hours=tendency_hours)
    if step is None:
        return None, float(tendency_hours)
    if wanted % step == pd.Timedelta(0):
        return wanted, float(tendency_hours)
    return step, step / pd.Timedelta(hours=1)


def _tendency_pairs(
    times: np.ndarray, lag: pd.Timedelta | None, step: pd.Timedelta | None
) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``(first, second)`` of every pair with ``times[second] - times[first] == lag``, by ``first``.

    The time axis is increasing with minimum spacing ``step``, so the partner of a time lies at most
    ``lag / step`` positions later (a gap moves it closer); pairs never bridge a missing time.
    """
    if lag is None or step is None:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    firsts, seconds = [], []
    for offset in range(1, min(int(lag // step), times.size - 1) + 1):
        found = np.flatnonzero((times[offset:] - times[:-offset]) == lag.to_timedelta64())
        firsts.append(found)
        seconds.append(found + offset)
    if not firsts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    first, second = np.concatenate(firsts), np.concatenate(seconds)
    order = np.argsort(first, kind="stable")
    return first[order].astype(np.int64), second[order].astype(np.int64)


def _validity_mask(ds: xr.Dataset, name: str) -> np.ndarray | None:
    """The variable's ``<name>_mask`` (True = valid) as a boolean array shaped like one time step, or None."""
    mask_name = f"{name}{MASK_SUFFIX}"
    if mask_name not in ds.data_vars:
        return None
    var = ds[name]
    step = var.isel({TIME: 0}, drop=True) if TIME in var.dims else var
    return ds[mask_name].astype(bool).broadcast_like(step).transpose(*step.dims).values


def _variable_partials(
    var: xr.DataArray, mask: np.ndarray | None, first: np.ndarray, second: np.ndarray
) -> list[Delayed]:
    """One Delayed per chunk along time giving its value and tendency partials: Shape (2, 3, [level]).

    The task of a chunk reads that chunk and, for pairs whose first time lies in it and second beyond
    it, only those later steps; so each chunk is read by one task (and a few steps of it by the
    previous one), and dask can stream through the store with a few chunks in memory.
    """
    level_axis = var.dims.index(LEVEL) if LEVEL in var.dims else None
    if TIME not in var.dims:
        none = np.zeros(0, dtype=np.int64)
        return [dask.delayed(_block_partials)(var.data, None, none, none, mask, level_axis)]
    data = var.chunk({str(d): -1 for d in var.dims if d != TIME}).data
    bounds = np.cumsum((0, *data.chunks[0]))
    # Raw graph keys (not optimised per block), so the partner slices share the chunk reads.
    blocks = data.to_delayed(optimize_graph=False).ravel()
    parts = []
    for b, block in enumerate(blocks):
        start, stop = int(bounds[b]), int(bounds[b + 1])
        lo, hi = np.searchsorted(first, [start, stop])
        firsts, seconds = first[lo:hi], second[lo:hi]
        beyond = np.unique(seconds[seconds >= stop])
        partner = None
        if beyond.size:
            contiguous = beyond[-1] - beyond[0] + 1 == beyond.size
            partner = data[int(beyond[0]) : int(beyond[-1]) + 1] if contiguous else data[beyond]
        # indices into concat(block, partner) along time
        in_ext = np.where(seconds < stop, seconds - start, (stop - start) + np.searchsorted(beyond, seconds))
        parts.append(dask.delayed(_block_partials)(block, partner, firsts - start, in_ext, mask, level_axis))
    return parts


def _block_partials(
    block: np.ndarray,
    partner: np.ndarray | None,
    first: np.ndarray,
    second: np.ndarray,
    mask: np.ndarray | None,
    level_axis: int | None,
) -> np.ndarray:
    """Value moments of ``block`` and tendency moments of ``ext[second] - ext[first]``; Shape (2, 3, [level]).

    ``ext`` is ``block`` followed along time by ``partner`` (the later steps some pairs need).
    """
    x = np.asarray(block)
    values = _moments(x, mask, level_axis)
    if first.size == 0:
        return np.stack([values, np.zeros_like(values)])
    ext = x if partner is None else np.concatenate([x, np.asarray(partner)])
    tendency = ext[second].astype(np.float64) - ext[first].astype(np.float64)
    return np.stack([values, _moments(tendency, mask, level_axis)])


def _moments(block: np.ndarray, mask: np.ndarray | None, level_axis: int | None) -> np.ndarray:
    """Count, mean and centred sum of squares of the non-NaN, unmasked values of one block.

    Reduces every axis but ``level_axis``; ``mask`` is shaped like one time step. Shape (3, [level]), float64.
    """
    x = np.asarray(block, dtype=np.float64)
    valid = ~np.isnan(x)
    if mask is not None:
        valid &= mask if x.ndim == mask.ndim else mask[None]
    axes = tuple(a for a in range(x.ndim) if a != level_axis)
    count = valid.sum(axis=axes)
    total = np.where(valid, x, 0.0).sum(axis=axes)
    mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    expanded = mean if level_axis is None else np.expand_dims(mean, axes)
    m2 = np.where(valid, (x - expanded) ** 2, 0.0).sum(axis=axes)
    return np.stack([count.astype(np.float64), mean, m2])


def _merge(partials: Sequence[np.ndarray]) -> np.ndarray:
    """Merge (count, mean, M2) partials pairwise (Chan, Golub & LeVeque 1983); Shape (3, [level])."""
    count, mean, m2 = (np.zeros_like(partials[0][0]) for _ in range(3))
    for n_b, mean_b, m2_b in partials:
        total = count + n_b
        share = np.divide(n_b, total, out=np.zeros_like(total), where=total > 0)
        delta = mean_b - mean
        m2 = m2 + m2_b + delta**2 * count * share
        mean = mean + delta * share
        count = total
    return np.stack([count, mean, m2])


def _mean_std(merged: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, population std) from merged partials; NaN where no value was counted."""
    count, mean, m2 = merged
    has = count > 0
    safe = np.where(has, count, 1.0)
    return np.where(has, mean, np.nan), np.where(has, np.sqrt(np.maximum(m2, 0.0) / safe), np.nan)
