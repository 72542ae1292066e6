"""Multi-meshes refined over a region: the stretched-grid mesh and the limited-area mesh.

Stretched grid (Nipen et al., "Regional data-driven weather modeling with a global stretched-grid"): the
icosahedron is refined over the whole globe up to ``global_level`` and further, up to ``regional_level``,
only over a region plus a margin. Limited area (Oskarsson et al., "Graph-based neural weather prediction
for limited area modeling"): only the region plus margin is meshed, at every level.

Construction (both cases, one routine). The result is a **point set with multi-level edges**, not one
conforming triangulation (the anemoi-graphs "stretched" convention):

* the nodes created on level ``l`` are the vertices of the full level-``l`` icosahedral mesh that are new on
  that level (edge midpoints of level ``l - 1``); a node is kept if ``l <= keep_all_level`` (every node of
  the global levels of a stretched mesh) or if it lies within ``margin_deg`` great-circle degrees of the
  region box;
* the edges of level ``l`` are the edges of the full level-``l`` icosahedral mesh whose two end nodes are
  both kept; every edge appears in both directions and the levels never share an edge;
* the full fine levels are never built globally: going from level ``l`` to ``l + 1`` only the triangles
  whose bounding cap comes within the margin of the region are split (a conservative test, so no kept node
  or edge is missed), which keeps a level-10 regional refinement cheap.

Along the edge of the refined area the coarse triangles carry kept midpoints that are joined to the coarse
vertices by fine edges, so the mesh stays connected across the seam, but the fine and coarse triangles are
not stitched into one triangulation (hanging nodes remain). Nodes left without any edge (possible only in a
limited-area mesh whose margin is thinner than the finest mesh spacing) are dropped.

NumPy only; ``tests/test_graphs.py`` tests this module alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from forecasting.errors import SchemaError

# graph.py imports this module for its builders and defines MeshGraph, which the builders here return:
# bind the module (resolved at call time) rather than the class to keep the import cycle harmless.
from forecasting.graphs import graph as graph_module
from forecasting.graphs.connectivity import xyz_to_lat_lon
from forecasting.graphs.icosahedral import face_edges, icosahedron, split_faces, symmetric_edges

if TYPE_CHECKING:
    from forecasting.graphs.graph import MeshGraph

__all__ = ["Region", "global_multimesh", "limited_area_mesh", "stretched_multimesh"]

#: Finest refinement level accepted (level 12 has 168 million vertices globally, ~5 km spacing).
MAX_LEVEL = 12


@dataclass(frozen=True)
class Region:
    """A latitude/longitude box in degrees.

    ``lat_min < lat_max`` within [-90, 90]; longitudes within [0, 360]. ``lon_min > lon_max`` wraps across
    the 0 meridian (e.g. ``lon_min=350, lon_max=20``); ``lon_min=0, lon_max=360`` is the full circle.
    Bounds are inclusive.
    """

    lat_min: float
    lat_max: float
    lon_min: float
    lon_max: float

    def __post_init__(self) -> None:
        for name in ("lat_min", "lat_max", "lon_min", "lon_max"):
            value = getattr(self, name)
            if not np.isfinite(value):
                raise SchemaError(f"Region {name} must be finite; found {value}")
            object.__setattr__(self, name, float(value))
        if not -90.0 <= self.lat_min < self.lat_max <= 90.0:
            raise SchemaError(
                f"Region latitudes must satisfy -90 <= lat_min < lat_max <= 90; found lat_min={self.lat_min}, "
                f"lat_max={self.lat_max}"
            )
        for name in ("lon_min", "lon_max"):
            if not 0.0 <= getattr(self, name) <= 360.0:
                raise SchemaError(f"Region {name} must lie in [0, 360]; found {getattr(self, name)}")
        if self.lon_width == 0.0:
            raise SchemaError(f"Region has zero longitude width: lon_min={self.lon_min}, lon_max={self.lon_max}")

    @property
    def lon_width(self) -> float:
        """Eastward extent from ``lon_min`` to ``lon_max`` in degrees, in (0, 360]."""
        if self.lon_max - self.lon_min >= 360.0:
            return 360.0
        return float((self.lon_max - self.lon_min) % 360.0)

    @classmethod
    def covering(cls, lat: np.ndarray, lon: np.ndarray) -> Region:
        """The smallest box holding all points: latitude extent, and the shortest longitude arc (which may wrap).

        Args:
            lat: Any shape, degrees. lon: Any shape, degrees (taken modulo 360).
        """
        lat = np.asarray(lat, dtype=np.float64).ravel()
        lon = np.unique(np.mod(np.asarray(lon, dtype=np.float64).ravel(), 360.0))
        if len(lon) == 1:
            raise SchemaError(f"cannot form a region from a single longitude {lon[0]}")
        # The arc is the complement of the widest gap between consecutive longitudes around the circle.
        gaps = np.diff(np.concatenate([lon, [lon[0] + 360.0]]))
        widest = int(np.argmax(gaps))
        lon_min = lon[(widest + 1) % len(lon)]
        lon_max = lon[widest]
        return cls(float(lat.min()), float(lat.max()), float(lon_min), float(lon_max))

    def to_dict(self) -> dict[str, float]:
        """The four bounds as a JSON-serialisable dict (``Region(**d)`` rebuilds it)."""
        return asdict(self)

    def _in_lon_range(self, lon: np.ndarray) -> np.ndarray:
        if self.lon_width >= 360.0:
            return np.ones(lon.shape, dtype=bool)
        return np.mod(lon - self.lon_min, 360.0) <= self.lon_width

    def contains(self, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
        """Whether points (degrees, same shape) lie inside the box, bounds included; bool, same shape."""
        lat = np.asarray(lat, dtype=np.float64)
        lon = np.asarray(lon, dtype=np.float64)
        return (lat >= self.lat_min) & (lat <= self.lat_max) & self._in_lon_range(lon)

    def distance_deg(self, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
        """Great-circle distance in degrees from points to the box (0 inside); same shape as the inputs.

        A point within the box's longitudes is nearest to the box along its meridian. Any other point is
        nearest to one of the two bounding meridian segments (the parallels' nearest points then are the
        corners), and the nearest point on a meridian segment maximises ``p . q(theta)`` over the segment's
        latitudes: the clipped stationary latitude or one of the two ends.
        """
        lat = np.asarray(lat, dtype=np.float64)
        lon = np.asarray(lon, dtype=np.float64)
        along = np.maximum(np.maximum(self.lat_min - lat, lat - self.lat_max), 0.0)
        if self.lon_width >= 360.0:
            return along
        phi = np.deg2rad(lat)
        best = np.full(lat.shape, -1.0)
        for edge_lon in (self.lon_min, self.lon_max):
            t = np.cos(phi) * np.cos(np.deg2rad(lon - edge_lon))
            z = np.sin(phi)
            stationary = np.rad2deg(np.arctan2(z, t))
            for theta in (np.clip(stationary, self.lat_min, self.lat_max), self.lat_min, self.lat_max):
                theta = np.deg2rad(theta)
                best = np.maximum(best, t * np.cos(theta) + z * np.sin(theta))
        across = np.rad2deg(np.arccos(np.clip(best, -1.0, 1.0)))
        return np.where(self._in_lon_range(lon), along, across)


def validate_level(name: str, level: int) -> int:
    """``level`` as an int if it is a refinement level in [0, MAX_LEVEL]; SchemaError naming ``name`` otherwise."""
    if isinstance(level, bool) or int(level) != level or not 0 <= level <= MAX_LEVEL:
        raise SchemaError(f"{name} must be an integer in [0, {MAX_LEVEL}]; found {level!r}")
    return int(level)


def validate_margin(margin_deg: float) -> float:
    """``margin_deg`` as a float if finite and >= 0; SchemaError otherwise."""
    if not np.isfinite(margin_deg) or margin_deg < 0:
        raise SchemaError(f"margin_deg must be a finite number >= 0 (great-circle degrees); found {margin_deg}")
    return float(margin_deg)


def _masked_multimesh(
    *, finest_level: int, keep_all_level: int, region: Region | None, margin_deg: float
) -> MeshGraph:
    """The multi-mesh whose level-``l`` nodes are all kept for ``l <= keep_all_level``, else only near the region.

    See the module docstring. ``region`` may be None only when ``keep_all_level == finest_level``.
    """
    base = icosahedron()
    vertices = base.vertices  # (N_internal, 3): every vertex created so far, kept or not
    created = np.zeros(len(vertices), dtype=np.int64)

    def near(points: np.ndarray, slack_deg: np.ndarray | float = 0.0) -> np.ndarray:
        lat, lon = xyz_to_lat_lon(points)
        return region.distance_deg(lat, lon) <= margin_deg + slack_deg

    kept = np.ones(len(vertices), dtype=bool) if keep_all_level >= 0 else near(vertices)
    faces = base.faces
    level_edges = []  # (level, undirected (2, E)) on internal indices
    for level in range(finest_level + 1):
        undirected = face_edges(faces)
        both = kept[undirected[0]] & kept[undirected[1]]
        level_edges.append((level, undirected[:, both]))
        if level == finest_level:
            break
        if level >= keep_all_level:
            # Split only triangles whose bounding cap (around the normalised centroid) can reach the
            # region plus margin: a child node outside every such cap is farther than the margin.
            corners = vertices[faces]  # (F, 3 corners, 3)
            centre = corners.sum(axis=1)
            centre /= np.linalg.norm(centre, axis=1, keepdims=True)
            cap = np.rad2deg(np.arccos(np.clip(np.einsum("fcx,fx->fc", corners, centre), -1.0, 1.0)).max(axis=1))
            faces = faces[near(centre, cap + 1e-9)]
        midpoints, faces = split_faces(vertices, faces)
        vertices = np.concatenate([vertices, midpoints])
        created = np.concatenate([created, np.full(len(midpoints), level + 1, dtype=np.int64)])
        kept_new = np.ones(len(midpoints), dtype=bool) if level + 1 <= keep_all_level else near(midpoints)
        kept = np.concatenate([kept, kept_new])

    levels = np.concatenate([np.full(e.shape[1], lvl, dtype=np.int64) for lvl, e in level_edges])
    undirected = np.concatenate([e for _, e in level_edges], axis=1)
    # Keep only nodes with at least one edge (see module docstring), numbered in creation order.
    connected = np.zeros(len(vertices), dtype=bool)
    connected[undirected.ravel()] = True
    node_ids = np.flatnonzero(kept & connected)
    if len(node_ids) == 0:
        raise SchemaError(
            f"no mesh node lies within {margin_deg} degrees of {region}; widen the margin or refine further "
            f"(finest level {finest_level})"
        )
    new_index = np.full(len(vertices), -1, dtype=np.int64)
    new_index[node_ids] = np.arange(len(node_ids))
    edges = symmetric_edges(new_index[undirected])
    edge_level = np.concatenate([levels, levels])
    order = np.argsort(edges[1] * len(node_ids) + edges[0])
    xyz = vertices[node_ids]
    if region is None:
        in_region = np.zeros(len(node_ids), dtype=bool)
    else:
        lat, lon = xyz_to_lat_lon(xyz)
        in_region = region.contains(lat, lon)
    return graph_module.MeshGraph(
        xyz=xyz,
        edges=edges[:, order],
        level_of_node=created[node_ids],
        in_region=in_region,
        edge_level=edge_level[order],
    )


def global_multimesh(*, level: int) -> MeshGraph:
    """The plain GraphCast multi-mesh: every node and edge of levels 0..``level``; ``in_region`` all False."""
    level = validate_level("level", level)
    return _masked_multimesh(finest_level=level, keep_all_level=level, region=None, margin_deg=0.0)


def stretched_multimesh(*, global_level: int, regional_level: int, region: Region, margin_deg: float) -> MeshGraph:
    """Global multi-mesh to ``global_level``, refined to ``regional_level`` within ``margin_deg`` of ``region``.

    Args:
        global_level: Finest level present everywhere.
        regional_level: Finest level near the region, >= ``global_level``.
        region: The box of interest; ``MeshGraph.in_region`` flags nodes inside it (margin excluded).
        margin_deg: Great-circle degrees around the box that are refined as well, so the fine mesh reaches
            beyond the regional data and the transition to coarse spacing happens outside the region.

    Returns:
        A :class:`MeshGraph`; ``level_of_node`` is the level on which each node first appears, nodes are
        numbered by that level (the global icosahedral levels first, in their own order).
    """
    global_level = validate_level("global_level", global_level)
    regional_level = validate_level("regional_level", regional_level)
    if regional_level < global_level:
        raise SchemaError(f"regional_level ({regional_level}) must be >= global_level ({global_level})")
    return _masked_multimesh(
        finest_level=regional_level,
        keep_all_level=global_level,
        region=region,
        margin_deg=validate_margin(margin_deg),
    )


def limited_area_mesh(*, level: int, region: Region, margin_deg: float) -> MeshGraph:
    """Multi-mesh of levels 0..``level`` restricted to nodes within ``margin_deg`` of ``region``.

    Every node lies within ``margin_deg`` great-circle degrees of the box; the edges of each level join kept
    nodes only, so a coarse level contributes edges only where two of its nodes fall inside.
    """
    level = validate_level("level", level)
    return _masked_multimesh(
        finest_level=level, keep_all_level=-1, region=region, margin_deg=validate_margin(margin_deg)
    )
