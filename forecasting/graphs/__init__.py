"""Meshes and graphs for the encoder-processor-decoder forecaster; NumPy/SciPy only (no torch import).

* :mod:`~forecasting.graphs.icosahedral`: icosahedral meshes and the GraphCast multi-mesh;
* :mod:`~forecasting.graphs.stretched`: regions, stretched (regionally refined) and limited-area meshes;
* :mod:`~forecasting.graphs.connectivity`: coordinates, radius/k-nearest edges, node and edge features,
  grid cell areas;
* :mod:`~forecasting.graphs.graph`: :class:`MeshGraph`, :class:`ForecastGraph` and :func:`build_forecast_graph`.
"""

# graph before stretched: stretched refers back to graph's MeshGraph (see stretched.py).
from forecasting.graphs.graph import (
    ForecastGraph,
    MeshGraph,
    build_forecast_graph,
    build_forecast_graph_from_description,
    encoder_radius,
)
from forecasting.graphs.connectivity import (
    edge_features,
    grid_area_weights,
    grid_cell_areas,
    knn_edges,
    lat_lon_to_xyz,
    node_features,
    radius_edges,
    xyz_to_lat_lon,
)
from forecasting.graphs.icosahedral import TriangularMesh, icosahedral_meshes, icosahedron, multimesh_edges, refine
from forecasting.graphs.stretched import Region, global_multimesh, limited_area_mesh, stretched_multimesh

__all__ = [
    "ForecastGraph",
    "MeshGraph",
    "Region",
    "TriangularMesh",
    "build_forecast_graph",
    "build_forecast_graph_from_description",
    "edge_features",
    "encoder_radius",
    "global_multimesh",
    "grid_area_weights",
    "grid_cell_areas",
    "icosahedral_meshes",
    "icosahedron",
    "knn_edges",
    "lat_lon_to_xyz",
    "limited_area_mesh",
    "multimesh_edges",
    "node_features",
    "radius_edges",
    "refine",
    "stretched_multimesh",
    "xyz_to_lat_lon",
]
