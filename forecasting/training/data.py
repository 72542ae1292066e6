"""Training data of the graph family: store windows gathered onto data nodes, and a resumable sampler.

:class:`NodeWindowDataset` joins one :class:`~forecasting.data.torch_dataset.WindowDataset` per grid (the
coarse global store and the fine regional store) on their window start times and gathers every field into
the graph's node order with :class:`~forecasting.forecasters.NodeLayout`. Values stay in physical units:
normalisation is the model's job (:class:`~forecasting.forecasters.InputsAndResiduals`). One sample:

* ``inputs``   (T_in, N, C)         the input states, oldest first
* ``targets``  (T_out, N, C)        the following states
* ``forcings`` (T_in + T_out, N, F) time forcings of every time of the window
* ``static``   (N, S)               static fields
* ``boundary`` (T_out, N, C)        limited-area models only: the global store bilinearly interpolated to
  the regional nodes at the target times (the boundary values of those steps)
* ``time``     ()                   int64 ns of the last input time

:class:`ResumableSampler` is an endless random order whose position is the number of samples already
drawn, so a run resumed at optimiser step ``s`` continues with exactly the samples an uninterrupted run
would have seen (each rank of a distributed run takes every ``world_size``-th sample).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import lightning as L
import numpy as np
import torch
import xarray as xr
from torch.utils.data import DataLoader, Dataset, Subset

from forecasting.data.store import open_store
from forecasting.data.torch_dataset import WindowDataset
from forecasting.errors import SchemaError
from forecasting.forecasters import REGIONAL, GraphForecaster, bilinear_weights
from forecasting.schema import LAT, LON

__all__ = ["ForecastDataModule", "NodeWindowDataset", "ResumableSampler", "open_training_store"]


def open_training_store(path: str | Path, *, in_memory: bool) -> xr.Dataset | str:
    """The store at ``path`` loaded into memory (``in_memory``), else the path (each worker opens it lazily)."""
    if in_memory:
        return open_store(path, use_dask=False).load()
    return str(path)


class NodeWindowDataset(Dataset):
    """Windows of every grid of ``forecaster`` (and its boundary source), matched by time, on data nodes.

    Args:
        forecaster: A :class:`~forecasting.forecasters.GraphForecaster` (its layout, channels, step).
        stores: Grid name -> store path or in-memory Dataset, for every grid of the forecaster.
        boundary_store: The global store (path or Dataset) for a limited-area forecaster; else None.
        target_steps: States after the inputs in each window.
        time: ``(start, end)`` inclusive labels; windows lie wholly inside (None: all times).
        source: Names the data in error messages.

    Raises SchemaError when no window exists in every store.
    """

    def __init__(
        self,
        forecaster: GraphForecaster,
        stores: Mapping[str, xr.Dataset | str],
        *,
        boundary_store: xr.Dataset | str | None,
        target_steps: int,
        time: tuple[str | None, str | None] | None,
        source: str,
    ) -> None:
        self.layout = forecaster.layout
        variables = list(forecaster.channels.variables)
        statics = list(forecaster.static.variables)

        def windows(store: xr.Dataset | str, static_variables: list[str]) -> WindowDataset:
            return WindowDataset(
                store,
                variables=variables,
                input_steps=forecaster.input_steps,
                target_steps=target_steps,
                step=forecaster.step,
                time=time,
                static_variables=static_variables,
                normalise=False,
            )

        self.windows = {grid: windows(stores[grid], statics) for grid in forecaster.grids}
        self.boundary: WindowDataset | None = None
        self._boundary_index = self._boundary_weight = None
        if forecaster.limited_area:
            if boundary_store is None:
                raise SchemaError(f"{source}: a limited-area model needs the global store as its boundary source")
            self.boundary = windows(boundary_store, [])
            grid = self.layout.grid(REGIONAL)
            src = boundary_store if isinstance(boundary_store, xr.Dataset) else open_store(boundary_store)
            index, weight = bilinear_weights(
                src[LAT].values, src[LON].values, self.layout.node_latitude[grid.nodes],
                self.layout.node_longitude[grid.nodes], source=f"{source} (boundary store)",
            )
            self._boundary_index = torch.from_numpy(index)
            self._boundary_weight = torch.from_numpy(weight.astype(np.float32))
        sources = [*self.windows.values(), *([self.boundary] if self.boundary is not None else [])]
        starts = [np.array([w.window_times(i)[0] for i in range(len(w))]) for w in sources]
        common = starts[0]
        for other in starts[1:]:
            common = np.intersect1d(common, other)
        if len(common) == 0:
            raise SchemaError(
                f"{source}: the stores share no window of {forecaster.input_steps + target_steps} times "
                f"{forecaster.step} apart{'' if time is None else f' within {time}'}"
            )
        # (n_windows, n_sources): the window of each source for each common start time.
        self._index = np.stack([np.searchsorted(s, common) for s in starts], axis=1)

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self._index[index]
        samples = {grid: w[int(row[k])] for k, (grid, w) in enumerate(self.windows.items())}
        gather = self.layout.gather
        out = {
            key: gather({grid: s[key] for grid, s in samples.items()})
            for key in ("inputs", "targets", "forcings", "static")
        }
        out["time"] = next(iter(samples.values()))["time"]
        if self.boundary is not None:
            targets = self.boundary[int(row[-1])]["targets"]  # (T_out, C, h, w)
            flat = targets.flatten(-2)
            values = (flat[..., self._boundary_index] * self._boundary_weight).sum(-1)  # (T_out, C, n_regional)
            boundary = torch.zeros_like(out["targets"])
            boundary[:, self.layout.grid(REGIONAL).nodes] = values.transpose(-1, -2)
            out["boundary"] = boundary
        return out


class ResumableSampler(torch.utils.data.Sampler[int]):
    """An endless random order of ``n`` indices that can start at any position (see the module docstring).

    Pass ``e`` = 0, 1, ... of the whole sequence is a permutation of ``range(n)`` drawn from
    ``numpy.random.default_rng([seed, e])``; rank ``r`` of ``world_size`` takes global positions
    ``p * world_size + r`` for its positions ``p = start, start + 1, ...``. Has no length (Lightning then
    counts optimiser steps, not epochs).
    """

    def __init__(self, n: int, *, seed: int, start: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if n < 1:
            raise ValueError(f"ResumableSampler needs n >= 1; found {n}")
        self.n, self.seed, self.start, self.rank, self.world_size = n, seed, start, rank, world_size
        self._cached: tuple[int, np.ndarray] | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return self._cached[1]

    def __iter__(self) -> Iterator[int]:
        position = self.start
        while True:
            epoch, offset = divmod(position * self.world_size + self.rank, self.n)
            yield int(self._permutation(epoch)[offset])
            position += 1


class ForecastDataModule(L.LightningDataModule):
    """Training and validation loaders.

    The training loader is endless and starts at sample ``global_step * batch_size`` of this rank's
    :class:`ResumableSampler` stream (Lightning restores ``global_step`` before asking for it, so
    ``--resume`` continues the exact sequence). Validation uses ``val_batches * batch_size`` windows
    spread evenly over the validation period (fixed, in order; shared out across ranks); an empty
    loader list when there is no validation set.
    """

    def __init__(
        self,
        train: Dataset,
        val: Dataset | None,
        *,
        batch_size: int,
        num_workers: int,
        seed: int,
        val_batches: int,
    ) -> None:
        super().__init__()
        self.train, self.val = train, val
        self.batch_size, self.num_workers, self.seed, self.val_batches = batch_size, num_workers, seed, val_batches

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank()
        step = self.trainer.global_step if self.trainer is not None else 0
        sampler = ResumableSampler(
            len(self.train), seed=self.seed, start=step * self.batch_size, rank=rank, world_size=world
        )
        return DataLoader(
            self.train, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val is None:
            return []
        rank, world = self._rank()
        count = min(len(self.val), self.val_batches * self.batch_size)
        picks = np.unique(np.linspace(0, len(self.val) - 1, count).round().astype(np.int64))[rank::world]
        return DataLoader(
            Subset(self.val, picks.tolist()), batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

