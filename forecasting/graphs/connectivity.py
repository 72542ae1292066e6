"""Coordinates, grid-to-mesh and mesh-to-grid edges, and node/edge features on the unit sphere.

The geometric half of GraphCast's ``grid_mesh_connectivity.py`` and ``model_utils.py`` (Lam et al. 2023),
written for NumPy/SciPy only:

* points are unit vectors ``(N, 3)`` (``x`` towards 0E on the equator, ``y`` towards 90E, ``z`` to the north
  pole); latitudes and longitudes are degrees, longitudes returned in ``[0, 360)``;
* edges are ``(2, E)`` int64 arrays, row 0 indexes the senders, row 1 the receivers, and are returned sorted
  by ``(receiver, sender)`` so that a segment reduction over receivers sees contiguous blocks;
* a radius is a great-circle **angle in radians** (convert km with ``km / EARTH_RADIUS_KM``); k-d tree
  queries run on chord distances ``2 sin(angle / 2)``, which order points exactly as angles do.

Neighbour searches use ``scipy.spatial.cKDTree`` with vectorised queries, so a million grid points and a
level-6 mesh connect in a few seconds.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from forecasting.errors import SchemaError

__all__ = [
    "EARTH_RADIUS_KM",
    "angle_to_chord",
    "chord_to_angle",
    "edge_features",
    "edge_lengths",
    "grid_area_weights",
    "grid_cell_areas",
    "knn_edges",
    "lat_lon_to_xyz",
    "node_features",
    "radius_edges",
    "sort_edges",
    "xyz_to_lat_lon",
]

#: Mean Earth radius (IUGG), used only to report lengths in km.
EARTH_RADIUS_KM = 6371.0


def lat_lon_to_xyz(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Unit vectors of points given in degrees.

    Args:
        lat: Shape (N,), degrees north.
        lon: Shape (N,), degrees east (any range).

    Returns:
        Shape (N, 3) float64.
    """
    phi = np.deg2rad(np.asarray(lat, dtype=np.float64))
    lam = np.deg2rad(np.asarray(lon, dtype=np.float64))
    cos_phi = np.cos(phi)
    return np.stack([cos_phi * np.cos(lam), cos_phi * np.sin(lam), np.sin(phi)], axis=-1)


def xyz_to_lat_lon(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Latitude and longitude (degrees, longitude in ``[0, 360)``) of points of shape (N, 3) (need not be unit)."""
    xyz = np.asarray(xyz, dtype=np.float64)
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    lat = np.rad2deg(np.arctan2(z, np.hypot(x, y)))
    lon = np.mod(np.rad2deg(np.arctan2(y, x)), 360.0)
    # mod can return 360.0 for tiny negative angles; fold it back.
    lon = np.where(lon >= 360.0, 0.0, lon)
    return lat, lon


def angle_to_chord(angle: np.ndarray | float) -> np.ndarray:
    """Chord length on the unit sphere of a great-circle angle in radians (same shape)."""
    return 2.0 * np.sin(np.minimum(np.asarray(angle, dtype=np.float64), np.pi) / 2.0)


def chord_to_angle(chord: np.ndarray) -> np.ndarray:
    """Great-circle angle in radians of a chord length on the unit sphere: ``2 asin(chord / 2)`` (same shape).

    Exact to rounding for short chords, within ~1e-8 rad near antipodes.
    """
    return 2.0 * np.arcsin(np.minimum(np.asarray(chord, dtype=np.float64) / 2.0, 1.0))


def sort_edges(edges: np.ndarray) -> np.ndarray:
    """Edges of shape (2, E) ordered by (receiver, sender)."""
    if edges.shape[1] == 0:
        return edges.astype(np.int64)
    key = edges[1].astype(np.int64) * (int(edges[0].max()) + 1) + edges[0]
    return edges[:, np.argsort(key, kind="stable")].astype(np.int64)


def radius_edges(senders_xyz: np.ndarray, receivers_xyz: np.ndarray, *, radius: float | np.ndarray) -> np.ndarray:
    """Connect every sender within a great-circle angle ``radius`` of a receiver.

    Args:
        senders_xyz: Shape (Ns, 3) unit vectors.
        receivers_xyz: Shape (Nr, 3) unit vectors.
        radius: Great-circle angle in radians: a scalar, or shape (Nr,) for one radius per receiver
            (used by the stretched encoder, whose mesh spacing varies). Inclusive (``<=``).

    Returns:
        Shape (2, E) int64, row 0 sender index, row 1 receiver index, sorted by (receiver, sender).
        Receivers with no sender in reach get no edge; the caller decides what to do with them.
    """
    senders_xyz = np.asarray(senders_xyz, dtype=np.float64)
    receivers_xyz = np.asarray(receivers_xyz, dtype=np.float64)
    radius = np.broadcast_to(np.asarray(radius, dtype=np.float64), (len(receivers_xyz),))
    if np.any(radius < 0):
        raise ValueError(f"radius must be >= 0 radians; found minimum {radius.min()}")
    if len(senders_xyz) == 0 or len(receivers_xyz) == 0:
        return np.zeros((2, 0), dtype=np.int64)
    chord = angle_to_chord(radius)
    sender_tree = cKDTree(senders_xyz)
    parts = []
    # One sparse distance matrix per distinct radius: few in practice (one per refinement level), so this
    # stays vectorised without paying the largest radius everywhere.
    for value in np.unique(chord):
        members = np.flatnonzero(chord == value)
        receiver_tree = cKDTree(receivers_xyz[members])
        # A hair of slack so points at exactly the radius survive the tree's floating-point comparisons.
        pairs = sender_tree.sparse_distance_matrix(
            receiver_tree, value * (1.0 + 1e-9) + 1e-15, output_type="ndarray"
        )
        keep = pairs["v"] <= value * (1.0 + 1e-12)
        parts.append(np.stack([pairs["i"][keep].astype(np.int64), members[pairs["j"][keep]]]))
    return sort_edges(np.concatenate(parts, axis=1))


def knn_edges(senders_xyz: np.ndarray, receivers_xyz: np.ndarray, *, k: int) -> np.ndarray:
    """Connect every receiver to its ``k`` nearest senders (all of them if there are fewer than ``k``).

    Args:
        senders_xyz: Shape (Ns, 3) unit vectors.
        receivers_xyz: Shape (Nr, 3) unit vectors.
        k: Neighbours per receiver, >= 1.

    Returns:
        Shape (2, Nr * min(k, Ns)) int64, row 0 sender, row 1 receiver, sorted by (receiver, sender).
        Ties between equidistant senders are broken by the k-d tree, deterministically for a given input.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1; found {k}")
    senders_xyz = np.asarray(senders_xyz, dtype=np.float64)
    receivers_xyz = np.asarray(receivers_xyz, dtype=np.float64)
    k = min(k, len(senders_xyz))
    if k == 0 or len(receivers_xyz) == 0:
        return np.zeros((2, 0), dtype=np.int64)
    _, nearest = cKDTree(senders_xyz).query(receivers_xyz, k=k)
    nearest = np.sort(np.asarray(nearest, dtype=np.int64).reshape(len(receivers_xyz), k), axis=1)  # (Nr, k)
    receiver = np.repeat(np.arange(len(receivers_xyz), dtype=np.int64), k)
    return np.stack([nearest.ravel(), receiver])  # already in (receiver, sender) order


def edge_lengths(senders_xyz: np.ndarray, receivers_xyz: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Great-circle lengths in radians of edges (2, E); shape (E,) (see :func:`chord_to_angle`)."""
    return chord_to_angle(np.linalg.norm(senders_xyz[edges[0]] - receivers_xyz[edges[1]], axis=1))


def edge_features(senders_xyz: np.ndarray, receivers_xyz: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """GraphCast-style edge features: length and the sender's displacement in the receiver's local frame.

    The local frame of a receiver at (lat, lon) is the rotation that brings the receiver to lat 0, lon 0,
    i.e. to ``(1, 0, 0)``: its axes are ``up`` (the receiver itself), ``east`` ``(-sin lon, cos lon, 0)`` and
    ``north`` ``(-sin lat cos lon, -sin lat sin lon, cos lat)``. With ``d = sender - receiver``:

    * column 0: great-circle length of the edge in radians;
    * column 1: ``d . up`` (``cos(length) - 1``, always <= 0: how far the sender lies below the tangent plane);
    * column 2: ``d . east``; column 3: ``d . north`` (both ~ the eastward/northward angle in radians for
      short edges).

    Invariances: the features do not change when every point is rotated about the polar axis (a longitude
    shift). Under a general rotation the length, column 1 and the tangential norm ``hypot(col 2, col 3)`` are
    unchanged while columns 2-3 turn by the angle the rotation turns "north" at the receiver (the frame is
    tied to the geographic pole, as in GraphCast). The features are raw (radians); GraphCast divides them by
    the longest edge of each edge set, which is left to the model's normalisation.

    Args:
        senders_xyz: Shape (Ns, 3) unit vectors.
        receivers_xyz: Shape (Nr, 3) unit vectors.
        edges: Shape (2, E), row 0 into ``senders_xyz``, row 1 into ``receivers_xyz``.

    Returns:
        Shape (E, 4) float32.
    """
    r = receivers_xyz[edges[1]]  # (E, 3)
    d = senders_xyz[edges[0]] - r  # (E, 3)
    lon = np.arctan2(r[:, 1], r[:, 0])
    sin_lat = r[:, 2]
    cos_lat = np.hypot(r[:, 0], r[:, 1])
    east = np.stack([-np.sin(lon), np.cos(lon), np.zeros_like(lon)], axis=1)
    north = np.stack([-sin_lat * np.cos(lon), -sin_lat * np.sin(lon), cos_lat], axis=1)
    features = np.stack(
        [
            chord_to_angle(np.linalg.norm(d, axis=1)),
            np.einsum("ij,ij->i", d, r),
            np.einsum("ij,ij->i", d, east),
            np.einsum("ij,ij->i", d, north),
        ],
        axis=1,
    )
    return features.astype(np.float32)


def node_features(xyz: np.ndarray) -> np.ndarray:
    """Static position features of nodes: ``(cos lat, sin lon, cos lon, sin lat)``.

    The first three are GraphCast's; ``sin lat`` tells the hemispheres apart, which ``cos lat`` cannot:
    the sign of the Coriolis parameter ``f = 2 Omega sin(lat)`` and of the seasons depend on it (anemoi
    gives its models ``sin`` and ``cos`` of latitude for the same reason). Continuous across the dateline
    and smooth at the poles (where ``cos lat`` is 0 and the longitude terms, undefined there, do not matter
    much). Args: xyz of shape (N, 3). Returns: shape (N, 4) float32.
    """
    xyz = np.asarray(xyz, dtype=np.float64)
    norm = np.linalg.norm(xyz, axis=1)
    cos_lat = np.hypot(xyz[:, 0], xyz[:, 1]) / norm
    sin_lat = xyz[:, 2] / norm
    lon = np.arctan2(xyz[:, 1], xyz[:, 0])
    return np.stack([cos_lat, np.sin(lon), np.cos(lon), sin_lat], axis=1).astype(np.float32)


def _cell_bounds(centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper cell bounds halfway between neighbouring centres, the ends mirrored (shape (n,) each)."""
    if len(centres) == 1:
        raise SchemaError(f"cannot infer a cell size from a single coordinate value {centres}")
    mids = (centres[1:] + centres[:-1]) / 2.0
    lower = np.concatenate([[centres[0] - (mids[0] - centres[0])], mids])
    upper = np.concatenate([mids, [centres[-1] + (centres[-1] - mids[-1])]])
    return lower, upper


def grid_cell_areas(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Solid angles (steradians) of the cells of a regular lat/lon grid, flattened row-major (lat, lon).

    A cell spans halfway to each neighbouring centre; the outermost latitude bounds are mirrored and clipped
    at +-90, so a 0.25-degree grid that includes the poles gives the pole rows a 0.125-degree cap slice
    (the WeatherBench2 convention). A longitude axis that closes the circle (a global grid) gives every
    column the same width; otherwise the outer columns are mirrored.

    Args:
        lat: Shape (n_lat,), strictly monotonic, degrees within [-90, 90].
        lon: Shape (n_lon,), degrees; consecutive values (modulo 360) step strictly one way round.

    Returns:
        Shape (n_lat * n_lon,) float64.
    """
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    order = np.argsort(lat)
    lower, upper = _cell_bounds(lat[order])
    lower, upper = np.clip(lower, -90.0, 90.0), np.clip(upper, -90.0, 90.0)
    band = np.empty_like(lat)
    band[order] = np.sin(np.deg2rad(upper)) - np.sin(np.deg2rad(lower))
    if len(lon) == 1:
        raise SchemaError(f"cannot infer a cell width from a single longitude {lon}")
    # Unwrap so a regional axis crossing 0E (..., 359.5, 0.0, 0.5, ...) becomes monotonic.
    steps = np.mod(np.diff(lon), 360.0)
    unwrapped = np.concatenate([[lon[0]], lon[0] + np.cumsum(steps)])
    span = unwrapped[-1] - unwrapped[0] + steps.mean()
    if np.isclose(span, 360.0, atol=1e-6 * 360.0):
        width = np.full(len(lon), 360.0 / len(lon))
    else:
        lo, hi = _cell_bounds(unwrapped)
        width = hi - lo
    return np.outer(band, np.deg2rad(width)).ravel()


def grid_area_weights(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Cell areas of a regular lat/lon grid normalised to mean 1, flattened row-major; shape (n_lat * n_lon,).

    See :func:`grid_cell_areas` for the cell convention. For a union of grids (coarse global plus fine
    regional) normalise the concatenated :func:`grid_cell_areas` of both grids instead, so each node keeps
    its own grid's cell area.
    """
    areas = grid_cell_areas(lat, lon)
    return areas / areas.mean()
