"""The Forecaster interface, the wrappers every torch forecaster is built from, and the family registry.

One call for every model (shared/DESIGN.md): initial conditions in as xarray, a forecast out as xarray.

* **Initial conditions**: an analysis ``xr.Dataset`` per grid (dims ``time``, optional ``level``,
  ``latitude``, ``longitude``; canonical variable names and units, static fields such as
  ``land_sea_mask`` without a time dim). A forecaster on one grid takes the Dataset itself; one on several
  grids (the stretched-grid model: ``"global"`` and ``"regional"``) takes a mapping grid name -> Dataset.
  Each start time needs the ``input_steps`` analysis times ending at it, ``step`` apart.
* **Forecast**: the WeatherBench2 layout: dims ``time`` (start), ``prediction_timedelta`` (1..N steps),
  ``realization``, optional ``level``, ``latitude``, ``longitude``, coordinate ``valid_time``; a Dataset for
  a Dataset input, a mapping grid -> Dataset for a mapping input. :meth:`Forecaster.iterate` yields the
  same lead by lead (:class:`LeadChunk`), so a writer can stream any number of steps in constant memory.

Torch forecasters are made of small wrappers around a network that sees only normalised tensors, as in
GraphCast (Lam et al. 2023; ``normalization.InputsAndResiduals`` and ``autoregressive.Predictor``):

* :class:`StepInputs`: what one step sees, tensors on data nodes in physical units:
  states ``(B, T_in, N, C)``, forcings ``(B, T_in + 1, N, F)`` (input times and the target time), static
  fields ``(B, N, S)``, boundary values at the target time ``(B, N, C)`` (limited-area models), and the
  noise source of probabilistic models;
* :class:`InputsAndResiduals`: normalises states, static fields and boundary with the training store's
  mean and std, calls the inner network, and returns ``last state + output * tendency_std`` (residual
  prediction; a network that outputs zero reproduces persistence exactly);
* :class:`BoundaryOverwrite`: sets the boundary strip of a limited-area model to the boundary values at
  every step (Oskarsson et al. 2023, "Graph-based neural weather prediction for limited area modeling");
* :class:`Rollout`: the autoregressive loop, as a generator (inference, constant memory) or a tensor of
  all steps (training with backpropagation through the rollout).

:class:`NodeLayout` is the one adapter between grids and data nodes: it gathers ``(..., C, H, W)`` fields of
each grid into node order ``(..., N, C)`` with the graph's ``data_grid_index`` and scatters them back,
filling the coarse points that the stretched graph dropped inside the regional box from the regional
nodes in their cells (``model.nesting: cutout``, the default; ``overlap`` and ``refine`` keep them as nodes,
and ``refine`` adds the interpolated coarse tendency to the regional nodes', see :func:`coarse_base`).
:class:`Channels` turns Datasets into channel stacks and back.

Families (:data:`FAMILIES`, picked by ``model.family`` in the config): ``graph``
(:class:`GraphForecaster`: stretched-grid, global or limited-area GNN, deterministic or probabilistic),
``persistence`` and ``climatology`` (:mod:`forecasting.verification.baselines` behind the same interface).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
import xarray as xr
from scipy.spatial import cKDTree
from torch import Tensor, nn

from forecasting.config import (
    ClimatologyModelConfig,
    ConfigError,
    ExperimentConfig,
    ForecastDataConfig,
    GraphModelConfig,
)
from forecasting.data.statistics import STATISTIC, is_validity_mask
from forecasting.data.store import open_store, read_statistics
from forecasting.data.torch_dataset import FORCING_NAMES, time_forcings
from forecasting.errors import SchemaError
from forecasting.graphs import ForecastGraph, Region, build_forecast_graph, lat_lon_to_xyz
from forecasting.models import EncodeProcessDecode, graph_tensors
from forecasting.regrid import COORD_ATOL as _COORD_ATOL
from forecasting.regrid import bilinear_weights
from forecasting.schema import LAT, LEAD, LEVEL, LON, MEMBER, TIME, with_valid_time
from forecasting.verification.baselines import climatology, climatology_forecast, persistence_forecast

if TYPE_CHECKING:
    from forecasting.training.checkpoint import Checkpoint

__all__ = [
    "FAMILIES",
    "GLOBAL",
    "REGIONAL",
    "BoundaryOverwrite",
    "Channels",
    "ClimatologyForecaster",
    "Forecaster",
    "GraphForecaster",
    "GraphStepNetwork",
    "InputsAndResiduals",
    "LeadChunk",
    "NodeLayout",
    "Normalisation",
    "PersistenceForecaster",
    "Rollout",
    "StepInputs",
    "bilinear_weights",
    "boundary_strip",
    "build_forecaster",
    "check_axis",
    "coarse_base",
    "draw_noise",
    "member_seed",
    "step_text",
]

GLOBAL = "global"
REGIONAL = "regional"


# ----------------------------------------------------------------------------------------------
# Channels: Dataset <-> (..., C, H, W) arrays
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Channels:
    """The forecast variables as channels: one per variable without a level dim, one per (variable, level).

    Order: ``variables`` in order, levels ascending within a variable, named ``"<variable>@<level:g>"`` as
    :class:`~forecasting.data.torch_dataset.WindowDataset` names them. Every variable with a level dim uses
    every level of ``levels`` (a training store has one level axis).
    """

    variables: tuple[str, ...]
    has_level: tuple[bool, ...]
    levels: tuple[float, ...]
    units: tuple[str, ...]

    @classmethod
    def from_dataset(
        cls,
        ds: xr.Dataset,
        variables: Sequence[str] | None,
        *,
        source: str,
        static: bool = False,
        extra_dims: Sequence[str] = (),
    ) -> Channels:
        """Channels of ``variables`` (None: every time-dependent variable, or every static one with ``static``).

        Raises SchemaError naming ``source`` when a variable is missing or has dims other than
        ``(time, [level], latitude, longitude)`` (``([level], latitude, longitude)`` for static ones) and
        ``extra_dims`` (e.g. the lead and member dims of a forecast).
        """
        features = [str(n) for n in ds.data_vars if not is_validity_mask(ds, str(n))]
        if variables is None:
            variables = [n for n in features if (TIME in ds[n].dims) != static]
        missing = [v for v in variables if v not in ds.data_vars]
        if missing:
            raise SchemaError(
                f"{source}: variables {missing} are not in the store; it has {sorted(map(str, ds.data_vars))}"
            )
        allowed = ({LEVEL, LAT, LON} if static else {TIME, LEVEL, LAT, LON}) | set(extra_dims)
        for name in variables:
            dims = ds[name].dims
            if (TIME in dims) == static or not set(dims) <= allowed or LAT not in dims or LON not in dims:
                kind = "static" if static else "time-dependent"
                raise SchemaError(
                    f"{source}: variable {name!r} has dims {dims}; a {kind} variable needs dims "
                    f"({'' if static else 'time, '}[level,] latitude, longitude)"
                )
        has_level = tuple(LEVEL in ds[v].dims for v in variables)
        levels = tuple(float(x) for x in ds[LEVEL].values) if any(has_level) else ()
        units = tuple(str(ds[v].attrs.get("units", "")) for v in variables)
        return cls(tuple(variables), has_level, levels, units)

    @property
    def names(self) -> tuple[str, ...]:
        out: list[str] = []
        for name, leveled in zip(self.variables, self.has_level, strict=True):
            out.extend(f"{name}@{level:g}" for level in self.levels) if leveled else out.append(name)
        return tuple(out)

    def __len__(self) -> int:
        return len(self.names)

    def per_channel(self, values: Mapping[str, float], *, key: str, default: float = 1.0) -> np.ndarray:
        """One value per channel (C,), float64, from ``values`` per variable or per channel name (a channel's
        own value wins over its variable's; ``default`` for the rest). Raises ConfigError naming the config
        ``key`` and the keys of ``values`` that are neither a variable nor a channel."""
        names = self.names
        unknown = sorted(set(values) - set(names) - set(self.variables))
        if unknown:
            raise ConfigError(
                f"{key} names {unknown}, which are neither variables {list(self.variables)} "
                f"nor channels {list(names)}"
            )
        return np.array([values.get(name, values.get(name.split("@")[0], default)) for name in names],
                        dtype=np.float64)

    def loss_weights(self, variable_weights: Mapping[str, float]) -> np.ndarray:
        """Per-channel loss weights (C,), float64, mean 1, from weights per variable or per channel name
        (a channel's own weight wins over its variable's; default 1).

        Raises ConfigError naming keys that are neither a variable nor a channel, or when all weights are 0.
        """
        weights = self.per_channel(variable_weights, key="training.variable_weights")
        if weights.sum() <= 0:
            raise ConfigError("training.variable_weights leave every channel with weight 0")
        return weights / weights.mean()

    def check_matches(self, ds: xr.Dataset, *, source: str, extra_dims: Sequence[str] = ()) -> None:
        """Raise SchemaError unless ``ds`` holds these variables with the same level dims, levels and units
        (and no dims but those of an analysis and ``extra_dims``)."""
        other = Channels.from_dataset(ds, self.variables, source=source, extra_dims=extra_dims)
        problems = []
        if other.has_level != self.has_level or (any(self.has_level) and not np.allclose(other.levels, self.levels)):
            problems.append(f"levels {list(other.levels)} (expected {list(self.levels)})")
        bad_units = {
            v: u for v, u, want in zip(self.variables, other.units, self.units, strict=True) if u != want
        }
        if bad_units:
            problems.append(f"units {bad_units} (expected {dict(zip(self.variables, self.units, strict=True))})")
        if problems:
            raise SchemaError(f"{source}: the variables differ from the model's: " + "; ".join(problems))

    def stack(self, ds: xr.Dataset) -> np.ndarray:
        """Stack the variables of ``ds`` (dims ``(..., [level], latitude, longitude)``) as channels.

        Returns float32 of shape ``(..., C, H, W)``; the leading dims are those of the first variable
        (every variable must share them). No variables (static fields of a model without any) give
        shape ``(0, H, W)``.
        """
        if not self.variables:
            return np.zeros((0, ds.sizes[LAT], ds.sizes[LON]), dtype=np.float32)
        parts = []
        for name, leveled in zip(self.variables, self.has_level, strict=True):
            var = ds[name]
            if leveled:
                var = var.sel({LEVEL: list(self.levels)}).transpose(..., LEVEL, LAT, LON)
                parts.append(np.asarray(var.values, dtype=np.float32))
            else:
                parts.append(np.asarray(var.transpose(..., LAT, LON).values, dtype=np.float32)[..., None, :, :])
        return np.concatenate(parts, axis=-3)

    def unstack(
        self, values: np.ndarray, *, dims: Sequence[str], coords: Mapping[str, Any], lat: np.ndarray, lon: np.ndarray
    ) -> xr.Dataset:
        """The inverse of :meth:`stack`: ``values`` of shape ``(*lead_shape, C, H, W)`` with ``dims`` naming the
        leading axes; returns a Dataset with dims ``(*dims, [level], latitude, longitude)`` and units attrs."""
        out: dict[str, xr.DataArray] = {}
        position = 0
        for name, leveled, units in zip(self.variables, self.has_level, self.units, strict=True):
            if leveled:
                block = values[..., position : position + len(self.levels), :, :]
                position += len(self.levels)
                out[name] = xr.DataArray(block, dims=(*dims, LEVEL, LAT, LON), attrs={"units": units})
            else:
                out[name] = xr.DataArray(values[..., position, :, :], dims=(*dims, LAT, LON), attrs={"units": units})
                position += 1
        all_coords = {**coords, LAT: lat, LON: lon}
        if any(self.has_level):
            all_coords[LEVEL] = np.asarray(self.levels)
        return xr.Dataset(out, coords=all_coords)

    def to_dict(self) -> dict[str, list]:
        return {
            "variables": list(self.variables),
            "has_level": list(self.has_level),
            "levels": list(self.levels),
            "units": list(self.units),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Sequence]) -> Channels:
        return cls(
            tuple(str(v) for v in data["variables"]),
            tuple(bool(v) for v in data["has_level"]),
            tuple(float(v) for v in data["levels"]),
            tuple(str(v) for v in data["units"]),
        )


@dataclass(frozen=True, eq=False)
class Normalisation:
    """Per-channel statistics of the training store (GraphCast normalisation).

    Attributes (float64 NumPy):
        mean, std, tendency_std: Shape (C,) of the forecast channels; ``tendency_std`` is the std of the
            change over one model step. A zero or missing std is replaced by 1, a zero or missing
            tendency std by the std (a constant field).
        static_mean, static_std: Shape (S,) of the static channels.
    """

    mean: np.ndarray
    std: np.ndarray
    tendency_std: np.ndarray
    static_mean: np.ndarray
    static_std: np.ndarray

    @classmethod
    def from_statistics(
        cls, stats: xr.Dataset, channels: Channels, static: Channels, *, source: str
    ) -> Normalisation:
        """Pick the channels' rows from a store's statistics (dims ``(statistic, [level])`` per variable)."""
        missing = [v for v in (*channels.variables, *static.variables) if v not in stats.data_vars]
        if missing:
            raise SchemaError(f"{source}: statistics lack variables {missing}; they have {sorted(stats.data_vars)}")

        def rows(spec: Channels, statistic: str) -> np.ndarray:
            out = []
            for name, leveled in zip(spec.variables, spec.has_level, strict=True):
                var = stats[name].sel({STATISTIC: statistic})
                if leveled:
                    var = var.sel({LEVEL: list(spec.levels)})
                out.append(np.atleast_1d(np.asarray(var.values, dtype=np.float64)))
            return np.concatenate(out) if out else np.zeros(0)

        std = _positive(rows(channels, "std"), np.ones(len(channels)))
        return cls(
            mean=rows(channels, "mean"),
            std=std,
            tendency_std=_positive(rows(channels, "tendency_std"), std),
            static_mean=rows(static, "mean"),
            static_std=_positive(rows(static, "std"), np.ones(len(static))),
        )

    def to_dict(self) -> dict[str, Tensor]:
        """Plain float64 tensors (what a checkpoint stores)."""
        return {k: torch.from_numpy(np.asarray(getattr(self, k), dtype=np.float64)) for k in self._keys()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Tensor]) -> Normalisation:
        return cls(**{k: np.asarray(torch.as_tensor(data[k]).numpy(), dtype=np.float64) for k in cls._keys()})

    @staticmethod
    def _keys() -> tuple[str, ...]:
        return ("mean", "std", "tendency_std", "static_mean", "static_std")


def _positive(values: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(values) & (values > 0), values, fallback)


# ----------------------------------------------------------------------------------------------
# Grids <-> data nodes
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class GridLayout:
    """Where one grid's points sit among the data nodes.

    Attributes:
        name: ``"global"`` or ``"regional"``.
        latitude, longitude: 1-D axes of the grid (degrees; latitude ascending).
        nodes: The slice of the node vector holding this grid's nodes.
        grid_index: Shape (n,) int64, row-major index (``lat * W + lon``) of each of those nodes.
        fill_points: Shape (M,) int64, grid points that are no node of this grid (coarse points inside the
            regional box of a stretched graph); their values come from other nodes.
        fill_rows, fill_nodes, fill_weights: Shape (K,) each: fill point ``fill_rows[k]`` receives
            ``fill_weights[k]`` times node ``fill_nodes[k]`` (weights of one point sum to 1).
    """

    name: str
    latitude: np.ndarray
    longitude: np.ndarray
    nodes: slice
    grid_index: np.ndarray
    fill_points: np.ndarray
    fill_rows: np.ndarray
    fill_nodes: np.ndarray
    fill_weights: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.latitude), len(self.longitude))


class NodeLayout:
    """Gather grid fields into the graph's data-node order and scatter node values back onto the grids.

    Node order is the graph's: coarse global nodes first, then regional ones (see
    :func:`~forecasting.graphs.build_forecast_graph`). Coarse points the stretched graph dropped inside the
    regional box are filled on output by the area-weighted mean of the regional nodes whose nearest coarse
    point they are (the nearest regional node where there is none).
    """

    def __init__(self, graph: ForecastGraph) -> None:
        arguments = graph.description["arguments"]
        regional = np.asarray(graph.data_is_regional, dtype=bool)
        n_coarse = int(np.count_nonzero(~regional))
        if np.any(regional[:n_coarse]) or not np.all(regional[n_coarse:]):
            raise SchemaError("the graph's data nodes must list coarse nodes first, then regional ones")
        self.n_nodes = len(regional)
        self.is_regional = regional
        # Node coordinates from the grid axes (exact), not from the unit vectors.
        self.node_latitude = np.zeros(self.n_nodes)
        self.node_longitude = np.zeros(self.n_nodes)
        parts = []
        if n_coarse:
            parts.append((GLOBAL, "coarse", slice(0, n_coarse)))
        if n_coarse < self.n_nodes:
            parts.append((REGIONAL, "regional", slice(n_coarse, self.n_nodes)))
        for _, prefix, nodes in parts:
            lat = np.asarray(arguments[f"{prefix}_lat"], dtype=np.float64)
            lon = np.asarray(arguments[f"{prefix}_lon"], dtype=np.float64)
            i, j = np.divmod(np.asarray(graph.data_grid_index[nodes], dtype=np.int64), len(lon))
            self.node_latitude[nodes], self.node_longitude[nodes] = lat[i], lon[j]
        grids = []
        for name, prefix, nodes in parts:
            lat = np.asarray(arguments[f"{prefix}_lat"], dtype=np.float64)
            lon = np.asarray(arguments[f"{prefix}_lon"], dtype=np.float64)
            index = np.asarray(graph.data_grid_index[nodes], dtype=np.int64)
            missing = np.setdiff1d(np.arange(len(lat) * len(lon)), index)
            rows, fill_nodes, weights = _fill_from_regional(
                lat, lon, missing, regional_nodes=np.flatnonzero(regional), node_lat=self.node_latitude,
                node_lon=self.node_longitude, node_xyz=graph.data_xyz, area=graph.data_area_weight,
            )
            grids.append(GridLayout(name, lat, lon, nodes, index, missing, rows, fill_nodes, weights))
        self.grids: tuple[GridLayout, ...] = tuple(grids)
        self._by_name = {g.name: g for g in self.grids}

    @property
    def grid_names(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.grids)

    def grid(self, name: str) -> GridLayout:
        return self._by_name[name]

    def gather(self, fields: Mapping[str, Tensor]) -> Tensor:
        """Grid fields ``{grid: (..., C, H, W)}`` -> node values ``(..., N, C)`` (same dtype and device)."""
        parts = []
        for grid in self.grids:
            values = fields[grid.name]
            if tuple(values.shape[-2:]) != grid.shape:
                raise SchemaError(
                    f"grid {grid.name!r} fields must end in (latitude, longitude) = {grid.shape}; "
                    f"found shape {tuple(values.shape)}"
                )
            index = torch.as_tensor(grid.grid_index, device=values.device)
            parts.append(values.flatten(-2).index_select(-1, index).transpose(-1, -2))
        return torch.cat(parts, dim=-2)

    def scatter(self, nodes: Tensor) -> dict[str, Tensor]:
        """Node values ``(..., N, C)`` -> grid fields ``{grid: (..., C, H, W)}`` (fill points filled)."""
        if nodes.shape[-2] != self.n_nodes:
            raise SchemaError(f"node values must have {self.n_nodes} nodes in dim -2; found shape {tuple(nodes.shape)}")
        lead = nodes.shape[:-2]
        channels = nodes.shape[-1]
        out = {}
        for grid in self.grids:
            height, width = grid.shape
            flat = nodes.new_zeros((*lead, channels, height * width))
            index = torch.as_tensor(grid.grid_index, device=nodes.device)
            flat[..., index] = nodes[..., grid.nodes, :].transpose(-1, -2)
            if len(grid.fill_points):
                source = nodes[..., torch.as_tensor(grid.fill_nodes, device=nodes.device), :]  # (..., K, C)
                weights = torch.as_tensor(grid.fill_weights, dtype=nodes.dtype, device=nodes.device)[:, None]
                filled = nodes.new_zeros((*lead, len(grid.fill_points), channels))
                filled.index_add_(-2, torch.as_tensor(grid.fill_rows, device=nodes.device), source * weights)
                flat[..., torch.as_tensor(grid.fill_points, device=nodes.device)] = filled.transpose(-1, -2)
            out[grid.name] = flat.reshape(*lead, channels, height, width)
        return out

    def node_forcings(self, times: np.ndarray) -> np.ndarray:
        """Time forcings (:func:`~forecasting.data.torch_dataset.time_forcings`) at the nodes: (T, N, F) float32."""
        grid = time_forcings(np.asarray(times), self.node_longitude, 1)  # (T, F, 1, N)
        return np.ascontiguousarray(grid[:, :, 0, :].transpose(0, 2, 1))


def _nearest_on_axis(axis: np.ndarray, values: np.ndarray, *, period: float | None) -> np.ndarray:
    """Index of the nearest entry of the ascending ``axis`` for each value (circular with ``period``)."""
    if period is not None:
        values = np.mod(values - axis[0], period) + axis[0]
        extended = np.append(axis, axis[0] + period)
    else:
        extended = axis
    pos = np.clip(np.searchsorted(extended, values), 1, len(extended) - 1)
    left = pos - 1
    nearest = np.where(values - extended[left] <= extended[pos] - values, left, pos)
    return nearest % len(axis)


def _fill_from_regional(
    clat: np.ndarray,
    clon: np.ndarray,
    missing: np.ndarray,
    *,
    regional_nodes: np.ndarray,
    node_lat: np.ndarray,
    node_lon: np.ndarray,
    node_xyz: np.ndarray,
    area: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, nodes, weights) filling each missing coarse point from the regional nodes in its cell."""
    empty = np.zeros(0, dtype=np.int64)
    if len(missing) == 0:
        return empty, empty, np.zeros(0)
    if len(regional_nodes) == 0:
        raise SchemaError(f"{len(missing)} coarse grid points are no data node and there are no regional nodes")
    lat_idx = _nearest_on_axis(clat, node_lat[regional_nodes], period=None)
    lon_idx = _nearest_on_axis(clon, node_lon[regional_nodes], period=360.0)
    nearest_point = lat_idx * len(clon) + lon_idx  # (R,)
    rows = np.minimum(np.searchsorted(missing, nearest_point), len(missing) - 1)  # missing is sorted
    inside = missing[rows] == nearest_point
    rows, nodes = rows[inside], regional_nodes[inside]
    weights = np.asarray(area[nodes], dtype=np.float64)
    lonely = np.setdiff1d(np.arange(len(missing)), rows)
    if len(lonely):
        lat2, lon2 = np.meshgrid(clat, clon, indexing="ij")
        points = missing[lonely]
        xyz = lat_lon_to_xyz(lat2.ravel()[points], lon2.ravel()[points])
        _, nearest = cKDTree(node_xyz[regional_nodes]).query(xyz, k=1)
        rows = np.concatenate([rows, lonely])
        nodes = np.concatenate([nodes, regional_nodes[np.asarray(nearest, dtype=np.int64)]])
        weights = np.concatenate([weights, np.ones(len(lonely))])
    totals = np.bincount(rows, weights=weights, minlength=len(missing))
    return rows, nodes, weights / totals[rows]


def boundary_strip(shape: tuple[int, int], grid_index: np.ndarray, width: int) -> np.ndarray:
    """Whether each node (row-major ``grid_index`` on a grid of ``shape``) lies within ``width`` points of
    the grid's edge: the boundary strip of a limited-area model. Shape (n,) bool."""
    height, wide = shape
    if 2 * width >= min(height, wide):
        raise SchemaError(
            f"boundary_width {width} leaves no interior on a regional grid of {height} x {wide} points"
        )
    i, j = np.divmod(np.asarray(grid_index, dtype=np.int64), wide)
    return (i < width) | (i >= height - width) | (j < width) | (j >= wide - width)


# ----------------------------------------------------------------------------------------------
# Torch step models and wrappers
# ----------------------------------------------------------------------------------------------
Generators = torch.Generator | Sequence[torch.Generator] | None


@dataclass
class StepInputs:
    """What one model step sees (see the module docstring for units).

    Attributes:
        states: Shape (B, T_in, N, C), the last ``T_in`` states, oldest first.
        forcings: Shape (B, T_in + 1, N, F), forcings at the input times and the target time.
        static: Shape (B, N, S), static fields.
        boundary: Shape (B, N, C), boundary values at the target time (limited-area models), else None.
        generator: The noise source of a probabilistic model: one generator for the whole batch, a sequence
            of one per batch row (reproducible members whatever the batching), or None (torch's default).
    """

    states: Tensor
    forcings: Tensor
    static: Tensor
    boundary: Tensor | None = None
    generator: Generators = None

    def replace(self, **changes: Any) -> StepInputs:
        values = {k: getattr(self, k) for k in ("states", "forcings", "static", "boundary", "generator")}
        values.update(changes)
        return StepInputs(**values)


def draw_noise(shape: tuple[int, ...], generator: Generators, *, device: torch.device) -> Tensor:
    """Standard normal noise of ``shape`` (batch first), one row per generator when given a sequence."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=device)
    if len(generator) != shape[0]:
        raise SchemaError(f"{len(generator)} noise generators for a batch of {shape[0]}")
    return torch.stack([torch.randn(shape[1:], generator=g, device=device) for g in generator])


class GraphStepNetwork(nn.Module):
    """The graph family's network on normalised inputs: node features in, normalised tendency out.

    Per data node the input is: the ``T_in`` normalised states ``(T_in * C)``, the forcings of the input and
    target times ``((T_in + 1) * F)``, the normalised static fields ``(S)``, optional constant node flags
    (``is_regional`` of a stretched graph), for a limited-area model the normalised boundary values at
    the target time on the boundary strip (zero elsewhere) plus the strip mask ``(C + 1)``, and with
    ``detail_base`` (``(index, weight)`` of :func:`coarse_base`) the regional nodes' fine detail ``(T_in * C)``:
    each input state minus its bilinear interpolation from the coarse nodes, on the last R nodes (zero on the
    others). A probabilistic
    network (``noise_channels > 0``) draws its mesh noise ``(B, N_mesh, noise_channels)`` from the inputs'
    generator at every step. Output: ``(B, N, C)``, float32.
    """

    def __init__(
        self,
        *,
        graph: ForecastGraph,
        n_channels: int,
        n_forcings: int,
        n_static: int,
        input_steps: int,
        hidden: int,
        processor_layers: int,
        mlp_hidden_layers: int,
        noise_channels: int,
        checkpoint_processor: bool,
        encoder_aggregation: Literal["sum", "mean"],
        node_flags: np.ndarray | None,
        boundary_mask: np.ndarray | None,
        detail_base: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        super().__init__()
        tensors = graph_tensors(graph)
        self.input_steps, self.n_channels = input_steps, n_channels
        self.noise_channels = noise_channels
        flags = torch.zeros((tensors.num_data_nodes, 0)) if node_flags is None else torch.as_tensor(
            np.asarray(node_flags, dtype=np.float32).reshape(tensors.num_data_nodes, -1)
        )
        self.register_buffer("node_flags", flags, persistent=False)
        self.has_boundary = boundary_mask is not None
        mask = torch.zeros(tensors.num_data_nodes) if boundary_mask is None else torch.as_tensor(
            np.asarray(boundary_mask, dtype=np.float32)
        )
        self.register_buffer("boundary_mask", mask, persistent=False)
        self.has_detail = detail_base is not None
        index, weight = detail_base if detail_base is not None else (np.zeros((0, 4)), np.zeros((0, 4)))
        self.register_buffer("detail_index", torch.as_tensor(np.asarray(index, dtype=np.int64)), persistent=False)
        self.register_buffer("detail_weight", torch.as_tensor(np.asarray(weight, dtype=np.float32)), persistent=False)
        n_input = (
            input_steps * n_channels
            + (input_steps + 1) * n_forcings
            + n_static
            + flags.shape[1]
            + (n_channels + 1 if self.has_boundary else 0)
            + (input_steps * n_channels if self.has_detail else 0)
        )
        self.network = EncodeProcessDecode(
            graph=tensors,
            n_input=n_input,
            n_output=n_channels,
            hidden=hidden,
            processor_layers=processor_layers,
            mlp_hidden_layers=mlp_hidden_layers,
            noise_channels=noise_channels,
            checkpoint_processor=checkpoint_processor,
            encoder_aggregation=encoder_aggregation,
        )

    def forward(self, inputs: StepInputs) -> Tensor:
        states = inputs.states
        batch, steps, nodes, channels = states.shape
        if steps != self.input_steps or channels != self.n_channels:
            raise SchemaError(
                f"GraphStepNetwork states must have shape (B, {self.input_steps}, N, {self.n_channels}); "
                f"found {tuple(states.shape)}"
            )
        parts = [
            states.permute(0, 2, 1, 3).reshape(batch, nodes, steps * channels),
            inputs.forcings.permute(0, 2, 1, 3).reshape(batch, nodes, -1),
            inputs.static,
            self.node_flags.to(states.dtype).expand(batch, -1, -1),
        ]
        if self.has_boundary:
            if inputs.boundary is None:
                raise SchemaError("a limited-area step needs boundary values at the target time; found None")
            mask = self.boundary_mask.to(states.dtype)[None, :, None]
            parts += [inputs.boundary * mask, mask.expand(batch, -1, -1)]
        if self.has_detail:
            n_regional = self.detail_index.shape[0]
            interpolated = (states[:, :, self.detail_index] * self.detail_weight[:, :, None]).sum(dim=3)  # (B, T, R, C)
            detail = torch.zeros_like(states)
            detail[:, :, -n_regional:] = states[:, :, -n_regional:] - interpolated
            parts.append(detail.permute(0, 2, 1, 3).reshape(batch, nodes, steps * channels))
        x = torch.cat(parts, dim=-1)  # (B, N, n_input)
        noise = None
        if self.noise_channels:
            shape = (batch, self.network.num_mesh_nodes, self.noise_channels)
            noise = draw_noise(shape, inputs.generator, device=x.device).to(x.dtype)
        return self.network(x, noise).float()


def coarse_base(layout: NodeLayout) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear weights from the coarse nodes to the regional nodes: ``(index, weight)``, each (R, 4).

    ``index`` holds node indices of coarse nodes (every coarse grid point must be a node: a graph built
    with ``keep_coarse_in_region``), row ``r`` belongs to the ``r``-th regional node; weights sum to 1.
    """
    if REGIONAL not in layout.grid_names or GLOBAL not in layout.grid_names:
        raise SchemaError(f"a coarse base for the regional nodes needs both grids; the graph has {layout.grid_names}")
    coarse = layout.grid(GLOBAL)
    if len(coarse.fill_points):
        raise SchemaError(
            f"a coarse base for the regional nodes needs every coarse grid point as a node; {len(coarse.fill_points)} "
            "were dropped inside the regional box (build the graph with keep_coarse_in_region=True)"
        )
    node_of_point = np.empty(coarse.shape[0] * coarse.shape[1], dtype=np.int64)
    node_of_point[coarse.grid_index] = np.arange(coarse.nodes.start, coarse.nodes.stop)
    # bilinear_weights wants ascending axes: interpolate on the sorted latitudes and map rows back.
    order = np.argsort(coarse.latitude)
    regional = layout.grid(REGIONAL).nodes
    index, weight = bilinear_weights(
        coarse.latitude[order], coarse.longitude, layout.node_latitude[regional], layout.node_longitude[regional],
        source="coarse grid",
    )
    rows, cols = np.divmod(index, len(coarse.longitude))
    return node_of_point[order[rows] * len(coarse.longitude) + cols], weight


class InputsAndResiduals(nn.Module):
    """Normalise the inputs of ``core`` and turn its output into the next state (GraphCast residuals).

    ``core(StepInputs)`` sees ``(x - mean) / std`` for states and boundary values and the static fields
    normalised with their own statistics; it returns the normalised tendency ``(B, N, C)``. The next state
    is ``states[:, -1] + output * tendency_std`` in physical units (float32). The statistics are
    non-persistent buffers: a checkpoint stores them once, as :class:`Normalisation`.

    ``regional_base`` (``(index, weight)`` of :func:`coarse_base`) adds to the tendency of the last R nodes
    (the regional ones) the bilinear interpolation of the coarse nodes' tendencies, so the network's output
    there is a correction to the coarse grid's motion (``model.nesting: refine``).
    """

    def __init__(
        self,
        core: nn.Module,
        normalisation: Normalisation,
        *,
        regional_base: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        super().__init__()
        self.core = core
        for name in ("mean", "std", "tendency_std", "static_mean", "static_std"):
            values = torch.as_tensor(np.asarray(getattr(normalisation, name), dtype=np.float32))
            self.register_buffer(name, values, persistent=False)
        self.has_base = regional_base is not None
        index, weight = regional_base if regional_base is not None else (np.zeros((0, 4)), np.zeros((0, 4)))
        self.register_buffer("base_index", torch.as_tensor(np.asarray(index, dtype=np.int64)), persistent=False)
        self.register_buffer("base_weight", torch.as_tensor(np.asarray(weight, dtype=np.float32)), persistent=False)

    def forward(self, inputs: StepInputs) -> Tensor:
        states = inputs.states.float()
        normalised = inputs.replace(
            states=(states - self.mean) / self.std,
            static=(inputs.static.float() - self.static_mean) / self.static_std,
            boundary=None if inputs.boundary is None else (inputs.boundary.float() - self.mean) / self.std,
        )
        tendency = self.core(normalised).float()
        if self.has_base:
            n_regional = self.base_index.shape[0]
            base = (tendency[:, self.base_index] * self.base_weight[:, :, None]).sum(dim=2)  # (B, R, C)
            tendency = torch.cat([tendency[:, :-n_regional], tendency[:, -n_regional:] + base], dim=1)
        return states[:, -1] + tendency * self.tendency_std


class BoundaryOverwrite(nn.Module):
    """Set the boundary strip (``strip``: (N,) bool) of the inner step's output to the boundary values."""

    def __init__(self, inner: nn.Module, strip: np.ndarray) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("strip", torch.as_tensor(np.asarray(strip, dtype=bool)), persistent=False)

    def forward(self, inputs: StepInputs) -> Tensor:
        if inputs.boundary is None:
            raise SchemaError("a limited-area step needs boundary values at the target time; found None")
        predicted = self.inner(inputs)
        return torch.where(self.strip[:, None], inputs.boundary.to(predicted.dtype), predicted)


class Rollout(nn.Module):
    """Autoregressive rollout of a one-step model (GraphCast ``autoregressive.Predictor``).

    ``step(StepInputs) -> (B, N, C)`` predicts the state one step after ``states[:, -1]``; each prediction
    is appended to the window of the last ``input_steps`` states and fed back.
    """

    def __init__(self, step: nn.Module, *, input_steps: int) -> None:
        super().__init__()
        self.step = step
        self.input_steps = input_steps

    def iterate(
        self,
        initial: Tensor,
        *,
        static: Tensor,
        forcings: Callable[[int], Tensor],
        steps: int,
        boundary: Callable[[int], Tensor] | None = None,
        generator: Generators = None,
    ) -> Iterator[Tensor]:
        """Yield the states of steps 1..``steps``, each (B, N, C), keeping only ``input_steps`` in memory.

        ``initial``: (B, T_in, N, C); ``forcings(k)``: (B, T_in + 1, N, F) for the step from ``k`` to ``k + 1``
        (the input times and the target time); ``boundary(k)``: (B, N, C) at the target time of step ``k``.
        """
        if initial.shape[1] != self.input_steps:
            raise SchemaError(
                f"a rollout needs {self.input_steps} input states in dim 1; found shape {tuple(initial.shape)}"
            )
        window = initial
        for k in range(steps):
            inputs = StepInputs(
                states=window,
                forcings=forcings(k),
                static=static,
                boundary=boundary(k) if boundary is not None else None,
                generator=generator,
            )
            state = self.step(inputs)
            yield state
            window = torch.cat([window[:, 1:], state[:, None].to(window.dtype)], dim=1)

    def forward(
        self,
        initial: Tensor,
        *,
        static: Tensor,
        forcings: Tensor,
        steps: int,
        boundary: Tensor | None = None,
        generator: Generators = None,
    ) -> Tensor:
        """All ``steps`` states at once: (B, steps, N, C), differentiable through the whole rollout.

        ``forcings``: (B, T_in + steps, N, F) over every input and target time; ``boundary``: (B, steps, N, C).
        """
        t_in = self.input_steps
        if forcings.shape[1] < t_in + steps:
            raise SchemaError(f"a {steps}-step rollout needs forcings at {t_in + steps} times; found {forcings.shape[1]}")
        return torch.stack(
            list(
                self.iterate(
                    initial,
                    static=static,
                    forcings=lambda k: forcings[:, k : k + t_in + 1],
                    steps=steps,
                    boundary=None if boundary is None else (lambda k: boundary[:, k]),
                    generator=generator,
                )
            ),
            dim=1,
        )


# ----------------------------------------------------------------------------------------------
# The xarray interface
# ----------------------------------------------------------------------------------------------
Initial = xr.Dataset | Mapping[str, xr.Dataset]


@dataclass(frozen=True)
class LeadChunk:
    """One lead of a forecast for a group of start times.

    Attributes:
        starts: Positions of the group's start times among all start times.
        lead: Index of the lead (0 is one step after the start).
        grids: Grid name -> Dataset with dims (time, prediction_timedelta [size 1], realization, [level],
            latitude, longitude), in memory.
    """

    starts: slice
    lead: int
    grids: dict[str, xr.Dataset]


class Forecaster(ABC):
    """Initial conditions in, forecast out (see the module docstring). Subclasses implement :meth:`_iterate`.

    Attributes:
        family: The registry key (:data:`FAMILIES`).
        grids: Grid names the forecaster reads and writes, e.g. ``("global", "regional")``.
        step: Time between consecutive leads.
        input_steps: Analysis times each start needs (ending at the start).
        channels: The forecast variables.
    """

    family: ClassVar[str]
    grids: tuple[str, ...]
    step: pd.Timedelta
    input_steps: int
    channels: Channels

    @classmethod
    @abstractmethod
    def from_config(cls, config: ExperimentConfig, *, checkpoint: Checkpoint | None = None) -> Forecaster:
        """Build from a validated config (and a checkpoint for trained families)."""

    def forecast(
        self,
        initial: Initial,
        *,
        steps: int,
        members: int = 1,
        starts: Sequence | pd.DatetimeIndex | None = None,
        boundary: xr.Dataset | None = None,
        seed: int = 0,
        batch_size: int | None = None,
    ) -> xr.Dataset | dict[str, xr.Dataset]:
        """The whole forecast in memory (see :meth:`iterate` for the arguments).

        Returns a Dataset (input a Dataset) or a mapping grid -> Dataset (input a mapping), each in the
        forecast layout with ``prediction_timedelta`` = step, 2 step, ... and a ``valid_time`` coordinate.
        """
        grids = self._initial_mapping(initial)
        start_index = self.start_times(grids, starts)
        per_grid: dict[str, dict[int, dict[int, xr.Dataset]]] = {g: {} for g in self.grids}
        for chunk in self.iterate(
            grids, steps=steps, members=members, starts=start_index, boundary=boundary, seed=seed,
            batch_size=batch_size,
        ):
            for name, ds in chunk.grids.items():
                per_grid[name].setdefault(chunk.starts.start, {})[chunk.lead] = ds
        out = {}
        for name, groups in per_grid.items():
            blocks = [
                xr.concat([groups[g][k] for k in sorted(groups[g])], dim=LEAD) for g in sorted(groups)
            ]
            out[name] = with_valid_time(xr.concat(blocks, dim=TIME) if len(blocks) > 1 else blocks[0])
        return out[self.grids[0]] if isinstance(initial, xr.Dataset) else out

    def iterate(
        self,
        initial: Initial,
        *,
        steps: int,
        members: int = 1,
        starts: Sequence | pd.DatetimeIndex | None = None,
        boundary: xr.Dataset | None = None,
        seed: int = 0,
        batch_size: int | None = None,
    ) -> Iterator[LeadChunk]:
        """Yield the forecast lead by lead (for each group of start times: leads 0..steps-1 in order).

        Args:
            initial: The analysis per grid (see the module docstring).
            steps: Leads to forecast (>= 1).
            members: Ensemble members (deterministic forecasters repeat their one forecast).
            starts: Start times; None: the last time of ``initial``.
            boundary: Boundary source of a limited-area forecaster: an analysis (time dim) or a forecast
                (time, prediction_timedelta, realization) on a grid covering the region.
            seed: Seed of the members' noise; member ``m`` of a start is the same whatever the batching.
            batch_size: Samples (start times x members) per model call; None: all at once.
        """
        if steps < 1 or members < 1:
            raise SchemaError(f"steps and members must be >= 1; found steps={steps}, members={members}")
        grids = self._initial_mapping(initial)
        start_index = self.start_times(grids, starts)
        self.check_initial(grids, start_index)
        group = len(start_index) if batch_size is None else max(1, batch_size // members)
        for first in range(0, len(start_index), group):
            selected = slice(first, min(first + group, len(start_index)))
            yield from self._iterate(
                grids, starts=start_index[selected], positions=selected, steps=steps, members=members,
                boundary=boundary, seed=seed,
            )

    @abstractmethod
    def _iterate(
        self,
        initial: Mapping[str, xr.Dataset],
        *,
        starts: pd.DatetimeIndex,
        positions: slice,
        steps: int,
        members: int,
        boundary: xr.Dataset | None,
        seed: int,
    ) -> Iterator[LeadChunk]:
        """Yield the chunks of one group of start times (``positions`` among all starts), leads in order."""

    def leads(self, steps: int) -> pd.TimedeltaIndex:
        """The ``prediction_timedelta`` axis of a ``steps``-step forecast: step, 2 step, ..."""
        return pd.TimedeltaIndex([self.step * (k + 1) for k in range(steps)])

    def start_times(self, initial: Mapping[str, xr.Dataset], starts: Sequence | pd.DatetimeIndex | None) -> pd.DatetimeIndex:
        """The start times as a DatetimeIndex (None: the last time of the first grid's analysis)."""
        if starts is None:
            return pd.DatetimeIndex([initial[self.grids[0]][TIME].values[-1]])
        try:
            index = pd.DatetimeIndex(pd.to_datetime(np.atleast_1d(np.asarray(starts))))
        except (TypeError, ValueError) as exc:
            raise SchemaError(f"cannot read start times {starts!r}: {exc}") from None
        if len(index) == 0 or index.has_duplicates:
            raise SchemaError(f"start times must be unique and at least one; found {list(map(str, index))}")
        return index

    def check_initial(self, initial: Mapping[str, xr.Dataset], starts: pd.DatetimeIndex) -> None:
        """Raise SchemaError unless each grid's analysis holds the variables and every start's input times."""
        for name in self.grids:
            ds = initial[name]
            source = f"initial conditions ({name} grid)"
            self.channels.check_matches(ds, source=source)
            self._input_positions(ds, starts, source=source)

    def _input_positions(self, ds: xr.Dataset, starts: pd.DatetimeIndex, *, source: str) -> np.ndarray:
        """Positions in ``ds.time`` of each start's input times: (n_starts, input_steps), oldest first."""
        offsets = np.array([self.step * (k - self.input_steps + 1) for k in range(self.input_steps)], dtype="m8[ns]")
        wanted = starts.values[:, None] + offsets[None, :]
        index = pd.DatetimeIndex(ds[TIME].values)
        positions = index.get_indexer(wanted.ravel())
        if np.any(positions < 0):
            absent = pd.DatetimeIndex(wanted.ravel()[positions < 0])
            raise SchemaError(
                f"{source}: {len(absent)} input times are not in the analysis, which spans {index[0]} .. "
                f"{index[-1]}: {[str(t) for t in absent[:5]]} (each start needs {self.input_steps} times "
                f"{self.step} apart ending at it)"
            )
        return positions.reshape(wanted.shape)

    def _initial_mapping(self, initial: Initial) -> dict[str, xr.Dataset]:
        if isinstance(initial, xr.Dataset):
            if len(self.grids) != 1:
                raise SchemaError(
                    f"this {self.family} forecaster uses grids {list(self.grids)}: pass a mapping grid -> Dataset"
                )
            return {self.grids[0]: initial}
        missing = [g for g in self.grids if g not in initial]
        if missing:
            raise SchemaError(f"initial conditions lack grids {missing}; this forecaster uses {list(self.grids)}")
        return {g: initial[g] for g in self.grids}

    def _chunk_dataset(
        self, values: np.ndarray, *, starts: pd.DatetimeIndex, lead: int, members: int, lat: np.ndarray, lon: np.ndarray
    ) -> xr.Dataset:
        """Values (n_starts, members, C, H, W) of lead ``lead`` as a Dataset with a size-1 lead dim."""
        return self.channels.unstack(
            values[:, None],
            dims=(TIME, LEAD, MEMBER),
            coords={TIME: starts.values, LEAD: [(self.step * (lead + 1)).to_timedelta64()], MEMBER: np.arange(members)},
            lat=lat,
            lon=lon,
        )


def _expand_members(ds: xr.Dataset, members: int) -> xr.Dataset:
    """Repeat the one member of a deterministic forecast ``members`` times."""
    out = ds.isel({MEMBER: np.zeros(members, dtype=np.int64)})
    return out.assign_coords({MEMBER: np.arange(members)})


class PersistenceForecaster(Forecaster):
    """Persistence (:func:`~forecasting.verification.baselines.persistence_forecast`) on each grid."""

    family = "persistence"

    def __init__(self, *, grids: Sequence[str], channels: Channels, step: pd.Timedelta) -> None:
        self.grids = tuple(grids)
        self.channels = channels
        self.step = pd.Timedelta(step)
        self.input_steps = 1

    @classmethod
    def from_config(cls, config: ExperimentConfig, *, checkpoint: Checkpoint | None = None) -> PersistenceForecaster:
        data = _require_data(config)
        grids, channels = _baseline_grids_and_channels(data)
        return cls(grids=grids, channels=channels, step=pd.Timedelta(data.step))

    def _iterate(self, initial, *, starts, positions, steps, members, boundary, seed) -> Iterator[LeadChunk]:
        forecasts = {
            name: persistence_forecast(
                initial[name][list(self.channels.variables)], init_times=starts, leads=self.leads(steps),
                source=f"initial conditions ({name} grid)",
            )
            for name in self.grids
        }
        for k in range(steps):
            yield LeadChunk(positions, k, {
                name: _expand_members(fc.isel({LEAD: [k]}).drop_vars("valid_time").load(), members)
                for name, fc in forecasts.items()
            })


class ClimatologyForecaster(Forecaster):
    """Climatology (:func:`~forecasting.verification.baselines.climatology`) of each grid's analysis.

    The initial conditions must hold the climatology period (e.g. the whole training store).
    """

    family = "climatology"

    def __init__(
        self, *, grids: Sequence[str], channels: Channels, step: pd.Timedelta, period, smoothing_days: int
    ) -> None:
        self.grids = tuple(grids)
        self.channels = channels
        self.step = pd.Timedelta(step)
        self.input_steps = 1
        self.period = period
        self.smoothing_days = smoothing_days

    @classmethod
    def from_config(cls, config: ExperimentConfig, *, checkpoint: Checkpoint | None = None) -> ClimatologyForecaster:
        data = _require_data(config)
        model = config.model
        assert isinstance(model, ClimatologyModelConfig)
        grids, channels = _baseline_grids_and_channels(data)
        return cls(grids=grids, channels=channels, step=pd.Timedelta(data.step), period=model.period,
                   smoothing_days=model.smoothing_days)

    def _iterate(self, initial, *, starts, positions, steps, members, boundary, seed) -> Iterator[LeadChunk]:
        forecasts = {}
        for name in self.grids:
            ds = initial[name][list(self.channels.variables)]
            period = self.period or tuple(initial[name].attrs.get("train_period") or (None, None))
            times = pd.DatetimeIndex(ds[TIME].values)
            period = (period[0] or str(times[0]), period[1] or str(times[-1]))
            clim = climatology(ds, period=period, smoothing_days=self.smoothing_days, source=f"{name} analysis")
            forecasts[name] = climatology_forecast(clim, init_times=starts, leads=self.leads(steps))
        for k in range(steps):
            yield LeadChunk(positions, k, {
                name: _expand_members(fc.isel({LEAD: [k]}).drop_vars("valid_time").load(), members)
                for name, fc in forecasts.items()
            })


def _require_data(config: ExperimentConfig) -> ForecastDataConfig:
    if config.data is None:
        raise ConfigError("the config has no 'data' section naming the stores (data.global_store, data.regional_store)")
    return config.data


def _baseline_grids_and_channels(data: ForecastDataConfig) -> tuple[list[str], Channels]:
    paths = {GLOBAL: data.global_store, REGIONAL: data.regional_store}
    grids = [g for g, p in paths.items() if p is not None]
    first = paths[grids[0]]
    channels = Channels.from_dataset(open_store(first), data.variables, source=str(first))
    return grids, channels


# ----------------------------------------------------------------------------------------------
# The graph family
# ----------------------------------------------------------------------------------------------
class GraphForecaster(Forecaster):
    """The stretched-grid (or global, or limited-area) graph forecaster; see the module docstring.

    Build it with :meth:`from_stores` (untrained, for training) or :meth:`from_checkpoint`. Attributes:
    ``model_config``, ``channels``, ``static`` (static input channels), ``normalisation``, ``graph``,
    ``layout`` (:class:`NodeLayout`), ``rollout`` (:class:`Rollout` of the wrapped step model) and, for a
    limited-area model, ``strip`` (the boundary strip, (N,) bool).
    """

    family = "graph"

    def __init__(
        self,
        *,
        model_config: GraphModelConfig,
        channels: Channels,
        static: Channels,
        normalisation: Normalisation,
        graph: ForecastGraph,
        step: pd.Timedelta,
    ) -> None:
        self.model_config = model_config
        self.channels = channels
        self.static = static
        self.normalisation = normalisation
        self.graph = graph
        self.step = pd.Timedelta(step)
        self.input_steps = model_config.input_steps
        self.layout = NodeLayout(graph)
        self.grids = self.layout.grid_names
        self.limited_area = model_config.mode == "limited_area"
        self.strip: np.ndarray | None = None
        if self.limited_area:
            grid = self.layout.grid(REGIONAL)
            self.strip = boundary_strip(grid.shape, grid.grid_index, model_config.boundary_width)
        two_grids = len(self.grids) == 2
        # refine's base, which detail_inputs (refine only) measures the fine nodes against too
        base = coarse_base(self.layout) if model_config.nesting == "refine" else None
        core = GraphStepNetwork(
            graph=graph,
            n_channels=len(channels),
            n_forcings=len(FORCING_NAMES),
            n_static=len(static),
            input_steps=self.input_steps,
            hidden=model_config.hidden,
            processor_layers=model_config.processor_layers,
            mlp_hidden_layers=model_config.mlp_hidden_layers,
            noise_channels=model_config.noise_channels,
            checkpoint_processor=model_config.checkpoint_processor,
            encoder_aggregation=model_config.encoder_aggregation,
            node_flags=self.layout.is_regional[:, None] if two_grids else None,
            boundary_mask=self.strip,
            detail_base=base if model_config.detail_inputs else None,
        )
        step_model: nn.Module = InputsAndResiduals(core, normalisation, regional_base=base)
        if self.strip is not None:
            step_model = BoundaryOverwrite(step_model, self.strip)
        self.rollout = Rollout(step_model, input_steps=self.input_steps)

    @property
    def probabilistic(self) -> bool:
        return self.model_config.noise_channels > 0

    @property
    def device(self) -> torch.device:
        return next(self.rollout.parameters()).device

    def to(self, device: torch.device | str) -> GraphForecaster:
        """Move the model to ``device`` (in place); returns self."""
        self.rollout.to(device)
        return self

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: ExperimentConfig, *, checkpoint: Checkpoint | None = None) -> GraphForecaster:
        if checkpoint is not None:
            return cls.from_checkpoint(checkpoint)
        model = config.model
        assert isinstance(model, GraphModelConfig)
        return cls.from_stores(model, _require_data(config))

    @classmethod
    def from_stores(cls, model: GraphModelConfig, data: ForecastDataConfig) -> GraphForecaster:
        """An untrained forecaster for the stores of ``data``: checks them, reads statistics, builds the graph.

        Raises ConfigError when the mode's stores are not given, SchemaError when variables are missing,
        the grids disagree, or the region does not hold the regional grid.
        """
        needs = {"stretched": (GLOBAL, REGIONAL), "global": (GLOBAL,), "limited_area": (REGIONAL, GLOBAL)}[model.mode]
        paths = {GLOBAL: data.global_store, REGIONAL: data.regional_store}
        absent = [f"data.{g}_store" for g in needs if paths[g] is None]
        if absent:
            raise ConfigError(f"model.mode {model.mode!r} needs {' and '.join(absent)}")
        stores = {g: open_store(paths[g]) for g in needs}
        # Statistics of the grid whose nodes dominate: the global one, or the regional one of a limited-area
        # model (whose global store only supplies boundary values).
        main = REGIONAL if model.mode == "limited_area" else GLOBAL
        node_grids = (REGIONAL,) if model.mode == "limited_area" else needs
        channels = Channels.from_dataset(stores[main], data.variables, source=str(paths[main]))
        static = Channels.from_dataset(stores[main], data.static_variables, source=str(paths[main]), static=True)
        for name, ds in stores.items():
            channels.check_matches(ds, source=str(paths[name]))
            if name in node_grids:
                Channels.from_dataset(ds, static.variables, source=str(paths[name]), static=True)
        normalisation = Normalisation.from_statistics(
            read_statistics(paths[main]), channels, static, source=f"statistics of {paths[main]}"
        )
        graph = _build_graph(model, stores, paths)
        return cls(
            model_config=model, channels=channels, static=static, normalisation=normalisation, graph=graph,
            step=pd.Timedelta(data.step),
        )

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint) -> GraphForecaster:
        """Rebuild from a checkpoint written by :meth:`save_checkpoint` (weights loaded, eval mode)."""
        from forecasting.config import parse_config

        config = parse_config(checkpoint.config, source=str(checkpoint.path))
        model = config.model
        if not isinstance(model, GraphModelConfig) or checkpoint.graph is None:
            raise SchemaError(f"{checkpoint.path}: not a graph forecaster checkpoint (family {checkpoint.family!r})")
        data = checkpoint.data
        forecaster = cls(
            model_config=model,
            channels=Channels.from_dict(data["channels"]),
            static=Channels.from_dict(data["static"]),
            normalisation=Normalisation.from_dict(checkpoint.statistics),
            graph=checkpoint.graph,
            step=pd.Timedelta(data["step"]),
        )
        try:
            forecaster.rollout.load_state_dict(checkpoint.state_dict)
        except RuntimeError as exc:
            raise SchemaError(f"{checkpoint.path}: the weights do not fit the model its config describes: {exc}") from None
        forecaster.rollout.eval()
        return forecaster

    def save_checkpoint(
        self, path: str | Path, *, config: ExperimentConfig, metadata: Mapping[str, Any] | None = None
    ) -> Path:
        """Write this model (weights, ``config``, statistics, graph, channels) as a checkpoint file.

        ``config`` is the experiment config the model was built from; it is stored fully resolved, so
        :meth:`from_checkpoint` rebuilds the same model. See :mod:`forecasting.training.checkpoint`.
        """
        from forecasting.training.checkpoint import save_checkpoint

        data = {
            "channels": self.channels.to_dict(),
            "static": self.static.to_dict(),
            "step": step_text(self.step),
            "grids": list(self.grids),
        }
        return save_checkpoint(
            path,
            family=self.family,
            config=config.model_dump(mode="json"),
            state_dict=self.rollout.state_dict(),
            statistics=self.normalisation.to_dict(),
            graph=self.graph,
            data=data,
            metadata=metadata,
        )

    # -- training support ------------------------------------------------------------------------
    def loss_node_weights(self, regional_share: float | None) -> np.ndarray:
        """Per-node loss weights (N,), summing to 1: cell areas, zero on a limited-area boundary strip, and the
        regional nodes scaled to ``regional_share`` of the total when given (two grids)."""
        weights = np.asarray(self.graph.data_area_weight, dtype=np.float64).copy()
        if self.strip is not None:
            weights[self.strip] = 0.0
        regional = self.layout.is_regional
        if regional_share is not None and regional.any() and (~regional).any():
            weights[regional] *= regional_share / weights[regional].sum()
            weights[~regional] *= (1.0 - regional_share) / weights[~regional].sum()
        return weights / weights.sum()

    def channel_weights(self, variable_weights: Mapping[str, float]) -> np.ndarray:
        """Per-channel loss weights (C,), mean 1: :meth:`Channels.loss_weights` of the forecast channels."""
        return self.channels.loss_weights(variable_weights)

    # -- inference -------------------------------------------------------------------------------
    def check_initial(self, initial: Mapping[str, xr.Dataset], starts: pd.DatetimeIndex) -> None:
        super().check_initial(initial, starts)
        for grid in self.layout.grids:
            ds = initial[grid.name]
            source = f"initial conditions ({grid.name} grid)"
            check_axis(ds, LAT, grid.latitude, source=source)
            check_axis(ds, LON, grid.longitude, source=source)
            missing = [v for v in self.static.variables if v not in ds.data_vars]
            if missing:
                raise SchemaError(f"{source}: static variables {missing} are not in the analysis")

    def _iterate(self, initial, *, starts, positions, steps, members, boundary, seed) -> Iterator[LeadChunk]:
        device = self.device
        n_starts = len(starts)
        batch = n_starts * members
        states, static = {}, {}
        for grid in self.layout.grids:
            ds = initial[grid.name]
            index = self._input_positions(ds, starts, source=f"initial conditions ({grid.name} grid)")
            picked = ds[list(self.channels.variables)].isel({TIME: index.ravel()})
            stacked = self.channels.stack(picked).reshape(n_starts, self.input_steps, len(self.channels), *grid.shape)
            states[grid.name] = torch.from_numpy(stacked)
            static[grid.name] = torch.from_numpy(self.static.stack(ds[list(self.static.variables)]))
        initial_nodes = self.layout.gather(states).repeat_interleave(members, dim=0).to(device)  # (B, T_in, N, C)
        static_nodes = self.layout.gather(static).to(device).expand(batch, -1, -1)  # (B, N, S)

        input_times = starts.values[:, None] + np.array(
            [self.step * (k - self.input_steps + 1) for k in range(self.input_steps)], dtype="m8[ns]"
        )[None, :]

        def forcings(k: int) -> Tensor:
            times = np.concatenate(
                [input_times + np.timedelta64(self.step * k), (starts + self.step * (k + 1)).values[:, None]], axis=1
            )  # (n_starts, T_in + 1)
            values = np.stack([self.layout.node_forcings(row) for row in times])  # (n_starts, T_in + 1, N, F)
            return torch.from_numpy(values).repeat_interleave(members, dim=0).to(device)

        boundary_fn = self._boundary_source(boundary, starts, members) if self.limited_area else None
        generators = [
            torch.Generator(device=device).manual_seed(member_seed(seed, start, m))
            for start in starts for m in range(members)
        ] if self.probabilistic else None

        was_training = self.rollout.training
        self.rollout.eval()
        try:
            with torch.no_grad():
                for k, state in enumerate(
                    self.rollout.iterate(
                        initial_nodes, static=static_nodes, forcings=forcings, steps=steps, boundary=boundary_fn,
                        generator=generators,
                    )
                ):
                    fields = self.layout.scatter(state.float().cpu())
                    chunk = {}
                    for grid in self.layout.grids:
                        values = fields[grid.name].numpy().reshape(n_starts, members, len(self.channels), *grid.shape)
                        chunk[grid.name] = self._chunk_dataset(
                            values, starts=starts, lead=k, members=members, lat=initial[grid.name][LAT].values,
                            lon=initial[grid.name][LON].values,
                        )
                    yield LeadChunk(positions, k, chunk)
        finally:
            self.rollout.train(was_training)

    def _boundary_source(
        self, boundary: xr.Dataset | None, starts: pd.DatetimeIndex, members: int
    ) -> Callable[[int], Tensor]:
        """Boundary values (B, N, C) at the target time of step k, from an analysis or a forecast."""
        if boundary is None:
            raise SchemaError(
                "a limited-area forecast needs a boundary dataset (an analysis or a forecast on a grid covering the region)"
            )
        source = "boundary dataset"
        self.channels.check_matches(boundary, source=source, extra_dims=(LEAD, MEMBER))
        grid = self.layout.grid(REGIONAL)
        node_lat = self.layout.node_latitude[grid.nodes]
        node_lon = self.layout.node_longitude[grid.nodes]
        index, weight = bilinear_weights(boundary[LAT].values, boundary[LON].values, node_lat, node_lon, source=source)
        index_t, weight_t = torch.from_numpy(index), torch.from_numpy(weight.astype(np.float32))
        device = self.device
        is_forecast = LEAD in boundary.dims
        n_lat, n_lon = boundary.sizes[LAT], boundary.sizes[LON]

        if is_forecast:
            have = pd.DatetimeIndex(boundary[TIME].values)
            absent = starts[have.get_indexer(starts) < 0]
            if len(absent):
                raise SchemaError(f"{source}: start times {[str(t) for t in absent[:5]]} are not forecasts in it")
            b_members = boundary.sizes[MEMBER] if MEMBER in boundary.dims else 1

        def at_step(k: int) -> Tensor:
            lead = self.step * (k + 1)
            if is_forecast:
                lead_index = pd.TimedeltaIndex(boundary[LEAD].values).get_indexer([lead])[0]
                if lead_index < 0:
                    raise SchemaError(f"{source}: lead {lead} is not in the boundary forecast")
                picked = boundary[list(self.channels.variables)].sel({TIME: starts.values}).isel({LEAD: lead_index})
                if MEMBER in picked.dims:
                    picked = picked.isel({MEMBER: np.arange(members) % b_members})
                    values = self.channels.stack(picked)  # (n_starts, members, C, h, w)
                else:
                    values = np.repeat(self.channels.stack(picked)[:, None], members, axis=1)
                values = values.reshape(len(starts) * members, len(self.channels), n_lat * n_lon)
            else:
                valid = (starts + lead).values
                have = pd.DatetimeIndex(boundary[TIME].values)
                pos = have.get_indexer(valid)
                if np.any(pos < 0):
                    raise SchemaError(
                        f"{source}: valid times {[str(t) for t in pd.DatetimeIndex(valid[pos < 0])[:5]]} are not "
                        f"in the boundary analysis ({have[0]} .. {have[-1]})"
                    )
                values = self.channels.stack(boundary[list(self.channels.variables)].isel({TIME: pos}))
                values = np.repeat(values.reshape(len(starts), len(self.channels), n_lat * n_lon), members, axis=0)
            flat = torch.from_numpy(values)  # (B, C, h * w)
            interpolated = (flat[..., index_t] * weight_t).sum(-1)  # (B, C, n_regional)
            nodes = torch.zeros((flat.shape[0], self.layout.n_nodes, len(self.channels)))
            nodes[:, grid.nodes] = interpolated.transpose(1, 2)
            return nodes.to(device)

        return at_step


def step_text(step: pd.Timedelta) -> str:
    """``step`` as checkpoints store it: whole hours as ``"6h"``, otherwise seconds as ``"90s"``."""
    seconds = int(step.total_seconds())
    return f"{seconds // 3600}h" if seconds % 3600 == 0 else f"{seconds}s"


def member_seed(seed: int, start: pd.Timestamp, member: int) -> int:
    """A 63-bit seed for member ``member`` of the forecast from ``start``, independent of batching."""
    ns = int(pd.Timestamp(start).value)
    state = np.random.SeedSequence([seed, ns & 0xFFFFFFFF, (ns >> 32) & 0xFFFFFFFF, member]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def check_axis(ds: xr.Dataset, dim: str, expected: np.ndarray, *, source: str) -> None:
    """Raise SchemaError naming ``source`` unless ``ds[dim]`` matches the model's axis ``expected`` (degrees,
    within the regridding tolerance)."""
    have = np.asarray(ds[dim].values, dtype=np.float64)
    if have.shape != expected.shape or not np.allclose(have, expected, atol=_COORD_ATOL):
        raise SchemaError(
            f"{source}: {dim} has {have.size} values {have[:3].tolist()}..; the model's grid has {expected.size} "
            f"values {expected[:3].tolist()}.."
        )


def _build_graph(model: GraphModelConfig, stores: Mapping[str, xr.Dataset], paths: Mapping[str, str | None]) -> ForecastGraph:
    """The model's graph from the stores' grids; checks that the region holds the regional grid."""
    coarse = stores[GLOBAL]
    regional = stores.get(REGIONAL)
    region = None
    kwargs: dict[str, Any] = {}
    if model.mode in ("stretched", "limited_area"):
        assert regional is not None
        rlat = np.asarray(regional[LAT].values, dtype=np.float64)
        rlon = np.asarray(regional[LON].values, dtype=np.float64)
        covering = Region.covering(rlat, rlon)
        if model.region is not None:
            region = Region(*model.region.as_tuple())
            lat2, lon2 = np.meshgrid(rlat, rlon, indexing="ij")
            inside = (
                (lat2 >= region.lat_min - _COORD_ATOL)
                & (lat2 <= region.lat_max + _COORD_ATOL)
                & (np.mod(lon2 - region.lon_min + _COORD_ATOL, 360.0) <= region.lon_width + 2 * _COORD_ATOL)
            )
            if not inside.all():
                raise SchemaError(
                    f"model.region (lat {region.lat_min:g}..{region.lat_max:g}, lon {region.lon_min:g}.."
                    f"{region.lon_max:g}) does not hold the regional grid of {paths[REGIONAL]} (lat "
                    f"{covering.lat_min:g}..{covering.lat_max:g}, lon {covering.lon_min:g}..{covering.lon_max:g}, "
                    f"{int((~inside).sum())} of {inside.size} points outside); use a region that holds it, or leave "
                    "model.region unset to take the regional grid's box"
                )
        else:
            region = covering
        kwargs.update(regional_lat=rlat, regional_lon=rlon)
    return build_forecast_graph(
        coarse_lat=coarse[LAT].values,
        coarse_lon=coarse[LON].values,
        region=region,
        global_level=None if model.mode == "limited_area" else model.global_level,
        regional_level=model.global_level if model.mode == "global" else model.regional_level,
        margin_deg=model.margin_deg if region is not None else 0.0,
        encoder=model.encoder,
        encoder_radius_factor=model.encoder_radius_factor,
        encoder_k=model.encoder_k,
        decoder_k=model.decoder_k,
        limited_area=model.mode == "limited_area",
        keep_coarse_in_region=model.nesting != "cutout",
        regional_encoder=model.regional_encoder,
        **kwargs,
    )


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------
def _diffusion_family() -> type[Forecaster]:
    """The ``diffusion`` family's class; its module builds on this one, so it is imported on first use."""
    from forecasting.diffusion.conditional import DiffusionForecaster

    return DiffusionForecaster


def _rolling_family() -> type[Forecaster]:
    """The ``rolling`` family's class (imported on first use, as the ``diffusion`` family)."""
    from forecasting.diffusion.rolling import RollingDiffusionForecaster

    return RollingDiffusionForecaster


def _dyffusion_family() -> type[Forecaster]:
    """The ``dyffusion`` family's class (imported on first use, as the ``diffusion`` family)."""
    from forecasting.diffusion.dyffusion import DYffusionForecaster

    return DYffusionForecaster


#: Model families by the config's ``model.family``: the class, or a function returning it for a family whose
#: module imports this one (imported when first asked for, so there is no import cycle).
FAMILIES: dict[str, type[Forecaster] | Callable[[], type[Forecaster]]] = {
    "graph": GraphForecaster,
    "persistence": PersistenceForecaster,
    "climatology": ClimatologyForecaster,
    "diffusion": _diffusion_family,
    "rolling": _rolling_family,
    "dyffusion": _dyffusion_family,
}


def build_forecaster(config: ExperimentConfig, *, checkpoint: Checkpoint | None = None) -> Forecaster:
    """The forecaster ``config.model`` describes (weights from ``checkpoint`` for trained families).

    Raises ConfigError when the config has no model section or names a family with no registered class.
    """
    if config.model is None:
        raise ConfigError("the config has no 'model' section")
    family = config.model.family
    if family not in FAMILIES:
        raise ConfigError(f"unknown model family {family!r}; known families: {sorted(FAMILIES)}")
    entry = FAMILIES[family]
    forecaster_class = entry if isinstance(entry, type) else entry()
    return forecaster_class.from_config(config, checkpoint=checkpoint)
