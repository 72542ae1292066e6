"""The graphs of the encoder-processor-decoder forecaster: mesh, grid-to-mesh and mesh-to-grid edges.

GraphCast (Lam et al. 2023) and the AIFS stretched-grid model (Nipen et al.) map data nodes (grid points)
to a mesh with an encoder, process on the mesh and decode back to the data nodes. :func:`build_forecast_graph`
builds all of it from grid coordinates:

* **data nodes**: the coarse global grid points, then the fine regional grid points. Coarse points inside
  the regional grid's box are dropped when a regional grid is given (as Nipen et al. cut ERA5 out of the
  MEPS domain): otherwise one place would be two data nodes with two different analyses, and the loss would
  count that area twice. ``keep_coarse_in_region=True`` keeps them (the box is then seen at both
  resolutions, and a model can predict its large scales on the coarse nodes as everywhere else).
  ``data_grid_index`` maps every node back to its row-major position in its own grid;
* **mesh**: the global multi-mesh, the stretched multi-mesh or the limited-area mesh
  (:mod:`forecasting.graphs.stretched`);
* **encoder** (data -> mesh): ``"radius"`` joins every data node within ``encoder_radius_factor`` times the
  longest mesh edge of a mesh node's local refinement level (GraphCast uses 0.6 of the finest level's longest
  edge); ``"knn"`` joins every data node to its ``encoder_k`` nearest mesh nodes. Either way every data node
  sends at least one edge and every mesh node receives at least one: a data node with no mesh node in reach
  sends to its nearest mesh node, and a mesh node with no data node in reach (margins of a limited-area
  mesh) receives from its nearest data node. :meth:`ForecastGraph.summary` counts these fallback edges;
* **decoder** (mesh -> data): every data node receives from its ``decoder_k`` nearest mesh nodes.

Edges are ``(2, E)`` int64, row 0 the sender and row 1 the receiver, sorted by (receiver, sender); encoder
edges index (data, mesh), decoder edges (mesh, data). Features follow :mod:`forecasting.graphs.connectivity`.
A :class:`ForecastGraph` saves to and loads from a plain ``.npz`` (no pickle) with a JSON description of the
builder's arguments, so a checkpoint can carry the graph and check it against a rebuild.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy.spatial import cKDTree

from forecasting.errors import SchemaError, SourceError
from forecasting.graphs.connectivity import (
    EARTH_RADIUS_KM,
    edge_features,
    edge_lengths,
    grid_cell_areas,
    knn_edges,
    lat_lon_to_xyz,
    node_features,
    radius_edges,
    sort_edges,
    xyz_to_lat_lon,
)
from forecasting.graphs.stretched import (
    Region,
    validate_level,
    validate_margin,
    global_multimesh,
    limited_area_mesh,
    stretched_multimesh,
)

__all__ = [
    "FORMAT_VERSION",
    "ForecastGraph",
    "MeshGraph",
    "build_forecast_graph",
    "build_forecast_graph_from_description",
    "encoder_radius",
]

#: Version of the ``.npz`` layout and of ``description``; bump when either changes meaning.
FORMAT_VERSION = 1
_BUILDER = "forecasting.graphs.build_forecast_graph"


def _check_array(owner: str, name: str, value: np.ndarray, shape: tuple, kind: str) -> None:
    """Raise SchemaError unless ``value`` has ``shape`` (None matches any length) and dtype kind ``kind``."""
    ok = value.ndim == len(shape) and all(s is None or s == v for s, v in zip(shape, value.shape, strict=True))
    if not ok or value.dtype.kind not in kind:
        raise SchemaError(
            f"{owner}.{name} must have shape {tuple('N' if s is None else s for s in shape)} and dtype kind "
            f"'{kind}'; found shape {value.shape}, dtype {value.dtype}"
        )


@dataclass(frozen=True, eq=False)
class MeshGraph:
    """A (multi-)mesh on the unit sphere.

    Attributes:
        xyz: Shape (N, 3) float64 unit vectors.
        edges: Shape (2, E) int64, row 0 sender, row 1 receiver, both directions of every edge, sorted by
            (receiver, sender).
        level_of_node: Shape (N,) int64, the refinement level on which each node first appears.
        in_region: Shape (N,) bool, inside the region box (the margin excluded); all False without a region.
        edge_level: Shape (E,) int64, the refinement level each edge belongs to.
    """

    xyz: np.ndarray
    edges: np.ndarray
    level_of_node: np.ndarray
    in_region: np.ndarray
    edge_level: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.xyz)
        _check_array("MeshGraph", "xyz", self.xyz, (n, 3), "f")
        _check_array("MeshGraph", "edges", self.edges, (2, None), "iu")
        _check_array("MeshGraph", "level_of_node", self.level_of_node, (n,), "iu")
        _check_array("MeshGraph", "in_region", self.in_region, (n,), "b")
        _check_array("MeshGraph", "edge_level", self.edge_level, (self.edges.shape[1],), "iu")
        if self.edges.size and (self.edges.min() < 0 or self.edges.max() >= n):
            raise SchemaError(
                f"MeshGraph.edges index nodes outside [0, {n}); found [{self.edges.min()}, {self.edges.max()}]"
            )

    @property
    def num_nodes(self) -> int:
        return len(self.xyz)

    @property
    def finest_level(self) -> int:
        """The finest refinement level with any edge."""
        return int(self.edge_level.max())

    def edge_lengths(self) -> np.ndarray:
        """Great-circle length of every edge in radians; shape (E,)."""
        return edge_lengths(self.xyz, self.xyz, self.edges)

    def level_max_edge_length(self) -> np.ndarray:
        """Longest edge of each level in radians; shape (finest_level + 1,), NaN for a level with no edge."""
        out = np.full(self.finest_level + 1, np.nan)
        np.fmax.at(out, self.edge_level, self.edge_lengths())
        return out

    def local_level(self) -> np.ndarray:
        """The refinement level that describes the mesh spacing around each node; shape (N,) int64.

        It is the finest level on which the node has its complete icosahedral ring of neighbours (5 for the
        12 icosahedron vertices, 6 for the others); nodes on the seam of a refined area, whose finest ring is
        cut, thus count as coarse and keep the coarse reach. A node with no complete ring on any level (the
        rim of a limited-area mesh) takes the finest level it has edges on.
        """
        n_levels = self.finest_level + 1
        receiver = self.edges[1]
        degree = np.bincount(receiver * n_levels + self.edge_level, minlength=self.num_nodes * n_levels)
        degree = degree.reshape(self.num_nodes, n_levels)  # (N, levels)
        full_degree = np.where(self.level_of_node == 0, 5, 6)
        levels = np.arange(n_levels)
        complete = np.where(degree >= full_degree[:, None], levels, -1).max(axis=1)
        present = np.where(degree > 0, levels, -1).max(axis=1)
        return np.where(complete >= 0, complete, present).astype(np.int64)

    def local_spacing(self) -> np.ndarray:
        """Mean length in radians of the edges each node receives on its :meth:`local_level`; shape (N,)."""
        local = self.local_level()
        on_level = self.edge_level == local[self.edges[1]]
        receiver = self.edges[1][on_level]
        total = np.bincount(receiver, weights=self.edge_lengths()[on_level], minlength=self.num_nodes)
        count = np.bincount(receiver, minlength=self.num_nodes)
        return total / np.maximum(count, 1)


def encoder_radius(mesh: MeshGraph, *, factor: float) -> np.ndarray:
    """Reach of each mesh node in the radius encoder: ``factor`` x longest edge of its local level.

    Returns shape (N_mesh,), great-circle radians (see :meth:`MeshGraph.local_level`).
    """
    return factor * mesh.level_max_edge_length()[mesh.local_level()]


@dataclass(frozen=True, eq=False)
class ForecastGraph:
    """Everything the graph forecaster needs besides the weights.

    Attributes:
        data_xyz: Shape (Nd, 3) float64, data nodes (coarse nodes first, then regional ones).
        data_is_regional: Shape (Nd,) bool, True for nodes of the regional grid.
        data_grid_index: Shape (Nd,) int64, row-major index of each node in its own grid
            (``lat_index * n_lon + lon_index``), to gather a (lat, lon) field into node order.
        data_area_weight: Shape (Nd,) float64, each node's own grid cell area, normalised to mean 1 over
            all data nodes (coarse and regional cells keep their true relative sizes).
        data_node_features: Shape (Nd, 4) float32, :func:`~forecasting.graphs.connectivity.node_features`.
        mesh: The processor's :class:`MeshGraph`.
        mesh_node_features: Shape (Nm, 4) float32.
        mesh_edge_features: Shape (Em, 4) float32, :func:`~forecasting.graphs.connectivity.edge_features`.
        encoder_edges: Shape (2, Ee) int64, row 0 data node, row 1 mesh node.
        encoder_edge_features: Shape (Ee, 4) float32.
        decoder_edges: Shape (2, Ed) int64, row 0 mesh node, row 1 data node.
        decoder_edge_features: Shape (Ed, 4) float32.
        description: JSON-serialisable ``{"format_version", "builder", "arguments"}``; the arguments
            rebuild the graph with :func:`build_forecast_graph_from_description`.
    """

    data_xyz: np.ndarray
    data_is_regional: np.ndarray
    data_grid_index: np.ndarray
    data_area_weight: np.ndarray
    data_node_features: np.ndarray
    mesh: MeshGraph
    mesh_node_features: np.ndarray
    mesh_edge_features: np.ndarray
    encoder_edges: np.ndarray
    encoder_edge_features: np.ndarray
    decoder_edges: np.ndarray
    decoder_edge_features: np.ndarray
    description: dict

    def __post_init__(self) -> None:
        nd, nm = len(self.data_xyz), self.mesh.num_nodes
        owner = "ForecastGraph"
        _check_array(owner, "data_xyz", self.data_xyz, (nd, 3), "f")
        _check_array(owner, "data_is_regional", self.data_is_regional, (nd,), "b")
        _check_array(owner, "data_grid_index", self.data_grid_index, (nd,), "iu")
        _check_array(owner, "data_area_weight", self.data_area_weight, (nd,), "f")
        _check_array(owner, "data_node_features", self.data_node_features, (nd, None), "f")
        _check_array(owner, "mesh_node_features", self.mesh_node_features, (nm, None), "f")
        _check_array(owner, "mesh_edge_features", self.mesh_edge_features, (self.mesh.edges.shape[1], None), "f")
        _check_array(owner, "encoder_edges", self.encoder_edges, (2, None), "iu")
        n_enc, n_dec = self.encoder_edges.shape[1], self.decoder_edges.shape[1]
        _check_array(owner, "encoder_edge_features", self.encoder_edge_features, (n_enc, None), "f")
        _check_array(owner, "decoder_edges", self.decoder_edges, (2, None), "iu")
        _check_array(owner, "decoder_edge_features", self.decoder_edge_features, (n_dec, None), "f")
        for name, edges, (n_send, n_recv) in (
            ("encoder_edges", self.encoder_edges, (nd, nm)),
            ("decoder_edges", self.decoder_edges, (nm, nd)),
        ):
            if edges.size and not (
                0 <= edges[0].min() and edges[0].max() < n_send and 0 <= edges[1].min() and edges[1].max() < n_recv
            ):
                raise SchemaError(f"{owner}.{name} index outside ({n_send} senders, {n_recv} receivers)")

    # ------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Node and edge counts and mean lengths (km), inside and outside the region; JSON-serialisable.

        "In region" for an edge means its mesh end lies in the region box. Mean lengths are None where
        there is nothing to average. ``mesh_spacing_km_*`` is the mean of :meth:`MeshGraph.local_spacing`.
        ``encoder_fallback_edges`` counts encoder edges longer than the radius rule allows (added so that no
        data or mesh node is left out); None for the knn encoder, which has no radius.
        ``encoder_in_degree_*`` are the mean numbers of encoder edges into the mesh nodes that read at least
        one regional data node and into the others: over a dense fine grid on a coarse mesh the first is
        far larger, which matters for summed messages (``model.encoder_aggregation``).
        """
        mesh = self.mesh

        def mean_km(values: np.ndarray, mask: np.ndarray) -> float | None:
            return float(values[mask].mean() * EARTH_RADIUS_KM) if mask.any() else None

        spacing = mesh.local_spacing()
        enc_len = self.encoder_edge_features[:, 0].astype(np.float64)
        dec_len = self.decoder_edge_features[:, 0].astype(np.float64)
        enc_in = mesh.in_region[self.encoder_edges[1]]
        dec_in = mesh.in_region[self.decoder_edges[0]]
        arguments = self.description.get("arguments", {})
        fallback = None
        if arguments.get("encoder") == "radius":
            reach = encoder_radius(mesh, factor=arguments["encoder_radius_factor"])[self.encoder_edges[1]]
            fallback = int(np.count_nonzero(enc_len > reach * (1 + 1e-5)))
        in_degree = np.bincount(self.encoder_edges[1], minlength=mesh.num_nodes)
        reads_regional = np.zeros(mesh.num_nodes, dtype=bool)
        reads_regional[self.encoder_edges[1][self.data_is_regional[self.encoder_edges[0]]]] = True

        def mean_degree(mask: np.ndarray) -> float | None:
            return float(in_degree[mask].mean()) if mask.any() else None

        return {
            "data_nodes": int(len(self.data_xyz)),
            "data_nodes_coarse": int(np.count_nonzero(~self.data_is_regional)),
            "data_nodes_regional": int(np.count_nonzero(self.data_is_regional)),
            "mesh_nodes": int(mesh.num_nodes),
            "mesh_nodes_in_region": int(np.count_nonzero(mesh.in_region)),
            "mesh_nodes_outside_region": int(np.count_nonzero(~mesh.in_region)),
            "mesh_finest_level": mesh.finest_level,
            "mesh_edges": int(mesh.edges.shape[1]),
            "encoder_edges": int(self.encoder_edges.shape[1]),
            "decoder_edges": int(self.decoder_edges.shape[1]),
            "encoder_fallback_edges": fallback,
            "mesh_nodes_reading_regional": int(np.count_nonzero(reads_regional)),
            "encoder_in_degree_reading_regional": mean_degree(reads_regional),
            "encoder_in_degree_other": mean_degree(~reads_regional),
            "mesh_spacing_km_in_region": mean_km(spacing, mesh.in_region),
            "mesh_spacing_km_outside_region": mean_km(spacing, ~mesh.in_region),
            "encoder_edge_km_in_region": mean_km(enc_len, enc_in),
            "encoder_edge_km_outside_region": mean_km(enc_len, ~enc_in),
            "decoder_edge_km_in_region": mean_km(dec_len, dec_in),
            "decoder_edge_km_outside_region": mean_km(dec_len, ~dec_in),
        }

    # ------------------------------------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("mesh", "description")}
        arrays.update({f"mesh_{f.name}": getattr(self.mesh, f.name) for f in fields(self.mesh)})
        return arrays

    def to_npz(self, path: str | os.PathLike) -> None:
        """Write every array and the JSON description to an uncompressed ``.npz`` (atomically, via rename).

        The file holds plain numeric arrays plus ``description_json`` (a 0-d unicode array) and
        ``format_version``, so :meth:`from_npz` reads it with ``allow_pickle=False``.
        """
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as fh:
                np.savez(
                    fh,
                    format_version=np.array(FORMAT_VERSION),
                    description_json=np.array(json.dumps(self.description, sort_keys=True)),
                    **self._arrays(),
                )
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def from_npz(cls, path: str | os.PathLike) -> ForecastGraph:
        """Read a graph written by :meth:`to_npz`; SourceError if the file is missing, unreadable or incomplete."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as npz:
                contents = {key: npz[key] for key in npz.files}
        except (OSError, ValueError) as exc:
            raise SourceError(f"cannot read forecast graph {path}: {exc}") from exc
        version = int(contents.get("format_version", -1))
        if version != FORMAT_VERSION:
            raise SourceError(f"forecast graph {path} has format_version {version}; this code reads {FORMAT_VERSION}")
        mesh_names = [f.name for f in fields(MeshGraph)]
        graph_names = [f.name for f in fields(cls) if f.name not in ("mesh", "description")]
        expected = ["description_json", *graph_names, *(f"mesh_{n}" for n in mesh_names)]
        missing = [key for key in expected if key not in contents]
        if missing:
            raise SourceError(f"forecast graph {path} lacks arrays {missing}")
        try:
            mesh = MeshGraph(**{n: contents[f"mesh_{n}"] for n in mesh_names})
            return cls(
                mesh=mesh,
                description=json.loads(str(contents["description_json"])),
                **{n: contents[n] for n in graph_names},
            )
        except SchemaError as exc:
            raise SourceError(f"forecast graph {path} is inconsistent: {exc}") from exc

    # ------------------------------------------------------------------------------------------
    def plot(self, path: str | os.PathLike) -> None:
        """Save a PNG map (plate carree, no coastlines) of data nodes (grey), mesh nodes coloured by the level
        they first appear on, the mesh edges of each node's local level, and the region box: the globe, and
        with a region a second panel zoomed on it.

        At most 200,000 data nodes are drawn (an even subsample; the title says so).
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.collections import LineCollection
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle
        from matplotlib.ticker import FuncFormatter

        mesh = self.mesh
        region_dict = self.description.get("arguments", {}).get("region")
        region = Region(**region_dict) if region_dict is not None else None
        margin = float(self.description.get("arguments", {}).get("margin_deg", 0.0))
        stride = max(1, int(np.ceil(len(self.data_xyz) / 200_000)))
        d_lat, d_lon = xyz_to_lat_lon(self.data_xyz[::stride])
        regional = self.data_is_regional[::stride]
        m_lat, m_lon = xyz_to_lat_lon(mesh.xyz)
        on_level = mesh.edge_level == mesh.local_level()[mesh.edges[1]]
        send, recv = mesh.edges[0][on_level], mesh.edges[1][on_level]

        fig = Figure(figsize=(12, 11 if region is not None else 6), dpi=110, layout="constrained")
        FigureCanvasAgg(fig)
        # A panel shows longitudes lon0 .. lon0 + 360 so that a region crossing 0E is drawn in one piece.
        panels = [(0.0, (0.0, 360.0), (-90.0, 90.0))]
        if region is not None:
            lat_pad = margin + 5.0
            # The margin is in great-circle degrees: wider in longitude away from the equator.
            poleward = np.cos(np.deg2rad(max(abs(region.lat_min), abs(region.lat_max))))
            lon_pad = min(90.0, margin / max(poleward, 0.2) + 3.0)
            panels.append(
                (
                    region.lon_min - lon_pad - 1.0,
                    (region.lon_min - lon_pad, region.lon_min + region.lon_width + lon_pad),
                    (max(-90.0, region.lat_min - lat_pad), min(90.0, region.lat_max + lat_pad)),
                )
            )
        axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
        for ax, (lon0, xlim, ylim) in zip(axes, panels, strict=True):
            def shift(lon: np.ndarray, lon0: float = lon0) -> np.ndarray:
                return lon0 + np.mod(lon - lon0, 360.0)

            for subset, colour, label in ((~regional, "0.75", "coarse"), (regional, "0.5", "regional")):
                ax.scatter(
                    shift(d_lon[subset]), d_lat[subset], s=0.5, c=colour, linewidths=0, label=f"{label} data nodes"
                )
            x = shift(m_lon)
            segments = np.stack([np.stack([x[send], m_lat[send]], 1), np.stack([x[recv], m_lat[recv]], 1)], axis=1)
            segments = segments[np.abs(segments[:, 0, 0] - segments[:, 1, 0]) < 180.0]  # skip wrapping edges
            ax.add_collection(LineCollection(segments, colors="tab:blue", linewidths=0.25, alpha=0.6))
            points = ax.scatter(x, m_lat, s=4, c=mesh.level_of_node, cmap="viridis", linewidths=0, zorder=3)
            if region is not None:
                start = float(shift(np.array(region.lon_min)))
                for offset in (0.0, -360.0):  # the second copy shows the part that wraps past lon0 + 360
                    ax.add_patch(
                        Rectangle(
                            (start + offset, region.lat_min),
                            region.lon_width,
                            region.lat_max - region.lat_min,
                            fill=False,
                            ec="red",
                            lw=1.2,
                            zorder=4,
                            label="region" if offset == 0.0 else None,
                        )
                    )
            ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value % 360:g}"))
            ax.set_xlim(*xlim)
            ax.set_ylim(*ylim)
            ax.set_xlabel("longitude (degrees east)")
            ax.set_ylabel("latitude (degrees north)")
            ax.set_aspect("equal")
        axes[0].legend(loc="lower left", markerscale=6, fontsize=8)
        fig.colorbar(points, ax=list(axes), label="mesh level of node", shrink=0.6)
        s = self.summary()
        axes[0].set_title(
            f"{s['data_nodes']:,} data nodes (every {stride} drawn), {s['mesh_nodes']:,} mesh nodes, "
            f"{s['mesh_edges']:,} mesh edges (local-level edges drawn), finest level {s['mesh_finest_level']}",
            fontsize=9,
        )
        path = Path(path)
        tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
        try:
            fig.savefig(tmp, format="png")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------
def _latitudes(name: str, values: Any) -> np.ndarray:
    lat = np.asarray(values, dtype=np.float64)
    if lat.ndim != 1 or len(lat) < 2:
        raise SchemaError(f"{name} must be a 1-D axis of at least 2 latitudes; found shape {lat.shape}")
    if not np.all(np.isfinite(lat)) or lat.min() < -90 or lat.max() > 90:
        raise SchemaError(f"{name} must be finite and within [-90, 90]; found range [{lat.min()}, {lat.max()}]")
    steps = np.diff(lat)
    if not (np.all(steps > 0) or np.all(steps < 0)):
        raise SchemaError(f"{name} must be strictly monotonic; found {lat[:4]} ...")
    return lat


def _longitudes(name: str, values: Any) -> np.ndarray:
    lon = np.asarray(values, dtype=np.float64)
    if lon.ndim != 1 or len(lon) < 2:
        raise SchemaError(f"{name} must be a 1-D axis of at least 2 longitudes; found shape {lon.shape}")
    if not np.all(np.isfinite(lon)) or lon.min() < 0 or lon.max() >= 360:
        raise SchemaError(f"{name} must be finite and within [0, 360); found range [{lon.min()}, {lon.max()}]")
    # Eastward steps modulo 360, so a regional axis may wrap across 0E (..., 359.5, 0.0, 0.5, ...).
    steps = np.mod(np.diff(lon), 360.0)
    if not np.all((steps > 0) & (steps < 180)) or steps.sum() >= 360.0:
        raise SchemaError(f"{name} must step eastward, at most once round the globe; found {lon[:4]} ...")
    return lon


def _grid_points(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Unit vectors of all grid points, row-major (lat, lon); shape (n_lat * n_lon, 3)."""
    lat2, lon2 = np.meshgrid(lat, lon, indexing="ij")
    return lat_lon_to_xyz(lat2.ravel(), lon2.ravel())


def _nearest(senders_xyz: np.ndarray, receivers_xyz: np.ndarray) -> np.ndarray:
    """Index of the nearest sender of every receiver; shape (Nr,)."""
    return np.asarray(cKDTree(senders_xyz).query(receivers_xyz, k=1)[1], dtype=np.int64)


def build_forecast_graph(
    *,
    coarse_lat: Any,
    coarse_lon: Any,
    regional_lat: Any = None,
    regional_lon: Any = None,
    region: Region | None,
    global_level: int | None,
    regional_level: int,
    margin_deg: float,
    encoder: Literal["radius", "knn"] = "radius",
    encoder_radius_factor: float = 0.6,
    encoder_k: int = 3,
    decoder_k: int = 3,
    limited_area: bool = False,
    keep_coarse_in_region: bool = False,
    regional_encoder: bool = True,
) -> ForecastGraph:
    """Build data nodes, mesh, encoder and decoder edges and their features (see the module docstring).

    Args:
        coarse_lat, coarse_lon: 1-D axes (degrees) of the coarse global grid; latitudes strictly monotonic,
            longitudes in [0, 360) stepping eastward. Unused (but validated) when ``limited_area``.
        regional_lat, regional_lon: 1-D axes of the fine regional grid, or both None. The longitude axis may
            wrap across 0E.
        region: The refinement box; None builds the plain global multi-mesh (then no regional grid and
            ``regional_level == global_level``).
        global_level: Finest mesh level everywhere; must be None when ``limited_area``.
        regional_level: Finest mesh level within ``margin_deg`` of ``region``.
        margin_deg: Great-circle degrees around ``region`` that are refined too (and, for a limited-area
            mesh, the extent of the mesh beyond the box).
        encoder: ``"radius"`` or ``"knn"``.
        encoder_radius_factor: Radius encoder reach, in units of the longest mesh edge of the local level.
        encoder_k: Mesh nodes each data node sends to with the knn encoder.
        decoder_k: Mesh nodes each data node receives from.
        limited_area: Use only the regional grid and the limited-area mesh of ``regional_level``.
        keep_coarse_in_region: Keep the coarse points inside the regional grid's box as data nodes (by
            default they are dropped). Needs a regional grid; not with ``limited_area``.
        regional_encoder: Whether the regional nodes send to the mesh. False (with ``keep_coarse_in_region``)
            gives them decoder edges only: the mesh reads the coarse grid alone, as a global model's does, and
            the fine nodes only receive from it.

    Returns:
        A :class:`ForecastGraph` whose ``description`` records these arguments.

    Raises:
        SchemaError: an axis or argument is invalid; the message names it and the value found.
    """
    coarse_lat = _latitudes("coarse_lat", coarse_lat)
    coarse_lon = _longitudes("coarse_lon", coarse_lon)
    if (regional_lat is None) != (regional_lon is None):
        raise SchemaError("regional_lat and regional_lon must be given together; found only one of them")
    has_regional = regional_lat is not None
    if has_regional:
        regional_lat = _latitudes("regional_lat", regional_lat)
        regional_lon = _longitudes("regional_lon", regional_lon)
    if region is not None and not isinstance(region, Region):
        raise SchemaError(f"region must be a Region or None; found {type(region).__name__}")
    regional_level = validate_level("regional_level", regional_level)
    margin_deg = validate_margin(margin_deg)
    if encoder not in ("radius", "knn"):
        raise SchemaError(f"encoder must be 'radius' or 'knn'; found {encoder!r}")
    if not np.isfinite(encoder_radius_factor) or encoder_radius_factor <= 0:
        raise SchemaError(f"encoder_radius_factor must be > 0; found {encoder_radius_factor}")
    for name, k in (("encoder_k", encoder_k), ("decoder_k", decoder_k)):
        if isinstance(k, bool) or int(k) != k or k < 1:
            raise SchemaError(f"{name} must be an integer >= 1; found {k!r}")

    if keep_coarse_in_region and (limited_area or not has_regional):
        raise SchemaError(
            "keep_coarse_in_region=True needs a regional grid and a global mesh (not limited_area); found "
            f"regional grid: {has_regional}, limited_area: {limited_area}"
        )
    if not regional_encoder and not keep_coarse_in_region:
        raise SchemaError(
            "regional_encoder=False needs keep_coarse_in_region=True: the mesh over the regional box must read the "
            "coarse points there"
        )
    if limited_area:
        if region is None or not has_regional:
            raise SchemaError("limited_area=True needs a region and a regional grid (regional_lat, regional_lon)")
        if global_level is not None:
            raise SchemaError(
                f"global_level must be None when limited_area=True (no global mesh); found {global_level}"
            )
        mesh = limited_area_mesh(level=regional_level, region=region, margin_deg=margin_deg)
    else:
        global_level = validate_level("global_level", global_level)
        if region is None:
            if has_regional:
                raise SchemaError("a regional grid needs a region to refine the mesh over; found region=None")
            if regional_level != global_level:
                raise SchemaError(
                    f"without a region regional_level must equal global_level; found {regional_level} != {global_level}"
                )
            mesh = global_multimesh(level=global_level)
        else:
            mesh = stretched_multimesh(
                global_level=global_level, regional_level=regional_level, region=region, margin_deg=margin_deg
            )

    # Data nodes: coarse (minus the regional grid's box unless kept), then regional; each with its own cell area.
    xyz_parts, regional_parts, index_parts, area_parts = [], [], [], []
    if not limited_area:
        coarse_xyz = _grid_points(coarse_lat, coarse_lon)
        keep = np.ones(len(coarse_xyz), dtype=bool)
        if has_regional and not keep_coarse_in_region:
            lat2, lon2 = np.meshgrid(coarse_lat, coarse_lon, indexing="ij")
            keep = ~Region.covering(regional_lat, regional_lon).contains(lat2.ravel(), lon2.ravel())
        kept = np.flatnonzero(keep)
        xyz_parts.append(coarse_xyz[kept])
        regional_parts.append(np.zeros(len(kept), dtype=bool))
        index_parts.append(kept.astype(np.int64))
        area_parts.append(grid_cell_areas(coarse_lat, coarse_lon)[kept])
    if has_regional:
        regional_xyz = _grid_points(regional_lat, regional_lon)
        xyz_parts.append(regional_xyz)
        regional_parts.append(np.ones(len(regional_xyz), dtype=bool))
        index_parts.append(np.arange(len(regional_xyz), dtype=np.int64))
        area_parts.append(grid_cell_areas(regional_lat, regional_lon))
    data_xyz = np.concatenate(xyz_parts)
    area = np.concatenate(area_parts)
    is_regional = np.concatenate(regional_parts)

    # Encoder: data -> mesh, with fallbacks so that no sending data node and no mesh node is left out.
    senders = np.arange(len(data_xyz)) if regional_encoder else np.flatnonzero(~is_regional)
    if encoder == "radius":
        encoder_edges = radius_edges(
            data_xyz[senders], mesh.xyz, radius=encoder_radius(mesh, factor=encoder_radius_factor)
        )
    else:
        encoder_edges = knn_edges(mesh.xyz, data_xyz[senders], k=encoder_k)[::-1]  # (mesh, data) -> (data, mesh)
    lonely_data = np.flatnonzero(np.bincount(encoder_edges[0], minlength=len(senders)) == 0)
    if len(lonely_data):
        fallback = np.stack([lonely_data, _nearest(mesh.xyz, data_xyz[senders][lonely_data])])
        encoder_edges = np.concatenate([encoder_edges, fallback], axis=1)
    lonely_mesh = np.flatnonzero(np.bincount(encoder_edges[1], minlength=mesh.num_nodes) == 0)
    if len(lonely_mesh):
        fallback = np.stack([_nearest(data_xyz[senders], mesh.xyz[lonely_mesh]), lonely_mesh])
        encoder_edges = np.concatenate([encoder_edges, fallback], axis=1)
    encoder_edges = np.stack([senders[encoder_edges[0]], encoder_edges[1]])
    encoder_edges = sort_edges(encoder_edges)
    decoder_edges = knn_edges(mesh.xyz, data_xyz, k=decoder_k)

    description = {
        "format_version": FORMAT_VERSION,
        "builder": _BUILDER,
        "arguments": {
            "coarse_lat": coarse_lat.tolist(),
            "coarse_lon": coarse_lon.tolist(),
            "regional_lat": regional_lat.tolist() if has_regional else None,
            "regional_lon": regional_lon.tolist() if has_regional else None,
            "region": region.to_dict() if region is not None else None,
            "global_level": global_level,
            "regional_level": regional_level,
            "margin_deg": margin_deg,
            "encoder": encoder,
            "encoder_radius_factor": float(encoder_radius_factor),
            "encoder_k": int(encoder_k),
            "decoder_k": int(decoder_k),
            "limited_area": bool(limited_area),
            "keep_coarse_in_region": bool(keep_coarse_in_region),
            **({} if regional_encoder else {"regional_encoder": False}),  # older descriptions lack the key
        },
    }
    return ForecastGraph(
        data_xyz=data_xyz,
        data_is_regional=is_regional,
        data_grid_index=np.concatenate(index_parts),
        data_area_weight=area / area.mean(),
        data_node_features=node_features(data_xyz),
        mesh=mesh,
        mesh_node_features=node_features(mesh.xyz),
        mesh_edge_features=edge_features(mesh.xyz, mesh.xyz, mesh.edges),
        encoder_edges=encoder_edges,
        encoder_edge_features=edge_features(data_xyz, mesh.xyz, encoder_edges),
        decoder_edges=decoder_edges,
        decoder_edge_features=edge_features(mesh.xyz, data_xyz, decoder_edges),
        description=description,
    )


def build_forecast_graph_from_description(description: dict) -> ForecastGraph:
    """Rebuild a graph from its ``description`` (e.g. one stored in a checkpoint) to check or replace it."""
    if description.get("builder") != _BUILDER or description.get("format_version") != FORMAT_VERSION:
        raise SchemaError(
            f"graph description must come from {_BUILDER} format_version {FORMAT_VERSION}; found builder "
            f"{description.get('builder')!r}, format_version {description.get('format_version')!r}"
        )
    arguments = dict(description["arguments"])
    if arguments["region"] is not None:
        arguments["region"] = Region(**arguments["region"])
    return build_forecast_graph(**arguments)
