"""Icosahedral triangular meshes on the unit sphere and the multi-mesh built from them.

Follows the mesh construction of GraphCast (Lam et al. 2023, ``icosahedral_mesh.py``): a regular
icosahedron is refined ``level`` times by splitting every triangle into four, with the new vertices (edge
midpoints) projected back onto the unit sphere. Refinement level ``l`` has ``10 * 4**l + 2`` vertices,
``30 * 4**l`` edges and ``20 * 4**l`` faces. The multi-mesh is the union of the edges of all levels on the
vertex set of the finest one, so a message can travel far in one hop along a coarse-level edge.

Conventions:

* vertices are unit vectors, ``float64``, shape ``(N, 3)``;
* faces are vertex indices, ``int64``, shape ``(F, 3)``, ordered counter-clockwise seen from outside
  (the normal ``(b - a) x (c - a)`` points away from the centre);
* refining keeps the parent's vertices first, in the same order, and appends the midpoints, so the vertices
  of level ``l`` are a prefix of those of level ``l + 1`` and one index addresses a vertex on every level;
* edges are ``(2, E)`` ``int64`` arrays, row 0 the sender and row 1 the receiver.

NumPy only, no ML imports: the module is tested alone (``tests/test_graphs.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["TriangularMesh", "face_edges", "icosahedral_meshes", "icosahedron", "multimesh_edges", "refine"]


@dataclass(frozen=True)
class TriangularMesh:
    """A triangulated surface on the unit sphere.

    Attributes:
        vertices: Shape (N, 3), float64 unit vectors.
        faces: Shape (F, 3), int64 vertex indices, counter-clockwise seen from outside.
    """

    vertices: np.ndarray
    faces: np.ndarray


def icosahedron() -> TriangularMesh:
    """The regular icosahedron inscribed in the unit sphere: 12 vertices, 20 faces (refinement level 0).

    Vertices are the cyclic permutations of ``(0, +-1, +-phi)`` scaled to unit length (phi the golden ratio),
    so two vertices lie in each coordinate plane and none sits on a pole.
    """
    phi = (1.0 + np.sqrt(5.0)) / 2.0
    vertices = np.array(
        [
            [-1.0, phi, 0.0],
            [1.0, phi, 0.0],
            [-1.0, -phi, 0.0],
            [1.0, -phi, 0.0],
            [0.0, -1.0, phi],
            [0.0, 1.0, phi],
            [0.0, -1.0, -phi],
            [0.0, 1.0, -phi],
            [phi, 0.0, -1.0],
            [phi, 0.0, 1.0],
            [-phi, 0.0, -1.0],
            [-phi, 0.0, 1.0],
        ]
    )
    vertices /= np.linalg.norm(vertices, axis=1, keepdims=True)
    faces = np.array(
        [
            [0, 11, 5],
            [0, 5, 1],
            [0, 1, 7],
            [0, 7, 10],
            [0, 10, 11],
            [1, 5, 9],
            [5, 11, 4],
            [11, 10, 2],
            [10, 7, 6],
            [7, 1, 8],
            [3, 9, 4],
            [3, 4, 2],
            [3, 2, 6],
            [3, 6, 8],
            [3, 8, 9],
            [4, 9, 5],
            [2, 4, 11],
            [6, 2, 10],
            [8, 6, 7],
            [9, 8, 1],
        ],
        dtype=np.int64,
    )
    return TriangularMesh(vertices=vertices, faces=faces)


def split_faces(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split each face into four around the projected midpoints of its edges.

    Args:
        vertices: Shape (N, 3), unit vectors; the indices in ``faces`` refer to it.
        faces: Shape (F, 3), counter-clockwise.

    Returns:
        ``(midpoints, children)``: midpoints of shape (M, 3), one per distinct edge of ``faces`` (ordered by
        the edge's sorted vertex pair), which the caller appends after ``vertices`` (midpoint ``m`` gets index
        ``len(vertices) + m``); children of shape (4 F, 3), counter-clockwise, the four children of face
        ``f`` at rows ``4 f .. 4 f + 3`` (three corner triangles, then the centre one).
    """
    n_vertices = len(vertices)
    a, b, c = faces[:, 0], faces[:, 1], faces[:, 2]
    # The three edges of every face as (F, 3) pairs, keyed by their sorted vertex pair so both faces that
    # share an edge find the same midpoint.
    first = np.stack([a, b, c], axis=1)
    second = np.stack([b, c, a], axis=1)
    keys = np.minimum(first, second) * n_vertices + np.maximum(first, second)  # (F, 3)
    unique_keys, inverse = np.unique(keys.ravel(), return_inverse=True)
    lo, hi = np.divmod(unique_keys, n_vertices)
    midpoints = vertices[lo] + vertices[hi]
    midpoints /= np.linalg.norm(midpoints, axis=1, keepdims=True)
    mid = (inverse + n_vertices).reshape(-1, 3)  # (F, 3): midpoints of edges ab, bc, ca
    ab, bc, ca = mid[:, 0], mid[:, 1], mid[:, 2]
    children = np.stack(
        [
            np.stack([a, ab, ca], axis=1),
            np.stack([ab, b, bc], axis=1),
            np.stack([ca, bc, c], axis=1),
            np.stack([ab, bc, ca], axis=1),
        ],
        axis=1,
    ).reshape(-1, 3)  # (4 F, 3)
    return midpoints, children.astype(np.int64)


def refine(mesh: TriangularMesh) -> TriangularMesh:
    """Split every triangle into four; the new vertices (edge midpoints) are projected onto the sphere.

    The parent's vertices come first in the same order, so they are a prefix of the refined mesh's vertices.
    """
    midpoints, children = split_faces(mesh.vertices, mesh.faces)
    return TriangularMesh(vertices=np.concatenate([mesh.vertices, midpoints]), faces=children)


def icosahedral_meshes(level: int) -> list[TriangularMesh]:
    """The icosahedron and its refinements: ``[level 0, level 1, ..., level]`` (``level + 1`` meshes)."""
    if level < 0:
        raise ValueError(f"icosahedral mesh level must be >= 0; found {level}")
    meshes = [icosahedron()]
    for _ in range(level):
        meshes.append(refine(meshes[-1]))
    return meshes


def face_edges(faces: np.ndarray) -> np.ndarray:
    """The distinct undirected edges of a set of faces.

    Args:
        faces: Shape (F, 3) vertex indices.

    Returns:
        Shape (2, E) int64 with row 0 < row 1, sorted lexicographically; each undirected edge once.
    """
    first = faces.ravel().astype(np.int64)
    second = np.roll(faces, -1, axis=1).ravel().astype(np.int64)
    n = int(faces.max()) + 1 if faces.size else 1
    lo, hi = np.divmod(np.unique(np.minimum(first, second) * n + np.maximum(first, second)), n)
    return np.stack([lo, hi])


def symmetric_edges(undirected: np.ndarray) -> np.ndarray:
    """Both directions of undirected edges: shape (2, E) -> (2, 2 E), forward edges first."""
    return np.concatenate([undirected, undirected[::-1]], axis=1)


def multimesh_edges(meshes: list[TriangularMesh]) -> np.ndarray:
    """Directed edges of the multi-mesh: the edges of every level, both directions, on the finest vertex set.

    Relies on the prefix property (a coarse level's vertex indices are valid on the finest level). Edges of
    different levels never coincide (a level-``l`` edge is split by a midpoint on level ``l + 1``), so the
    count is ``2 * sum_l 30 * 4**l`` for a full icosahedral hierarchy; duplicates are removed anyway.

    Args:
        meshes: Meshes of increasing refinement where each one's vertices are a prefix of the next one's.

    Returns:
        Shape (2, E) int64, row 0 sender, row 1 receiver, sorted by (receiver, sender).
    """
    undirected = np.concatenate([face_edges(m.faces) for m in meshes], axis=1)
    directed = symmetric_edges(undirected)
    n = int(directed.max()) + 1
    receiver, sender = np.divmod(np.unique(directed[1] * n + directed[0]), n)
    return np.stack([sender, receiver])
