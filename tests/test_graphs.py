"""forecasting.graphs alone: mesh geometry, stretched and limited-area meshes, edges, features, (de)serialisation."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from forecasting.errors import SchemaError, SourceError
from forecasting.graphs import (
    ForecastGraph,
    Region,
    build_forecast_graph,
    build_forecast_graph_from_description,
    edge_features,
    encoder_radius,
    global_multimesh,
    grid_area_weights,
    grid_cell_areas,
    icosahedral_meshes,
    knn_edges,
    lat_lon_to_xyz,
    limited_area_mesh,
    multimesh_edges,
    node_features,
    radius_edges,
    stretched_multimesh,
    xyz_to_lat_lon,
)
from forecasting.graphs.icosahedral import face_edges

ROOT = Path(__file__).resolve().parents[1]
MAX_LEVEL = 5
NORDIC = Region(lat_min=55.0, lat_max=72.0, lon_min=0.0, lon_max=32.0)
ACROSS_0E = Region(lat_min=40.0, lat_max=60.0, lon_min=345.0, lon_max=20.0)


@pytest.fixture(scope="module")
def meshes():
    return icosahedral_meshes(MAX_LEVEL)


def _coarse_axes(step: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(-90.0, 90.0 + step / 2, step), np.arange(0.0, 360.0, step)


def _regional_axes(region: Region, step: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    lat = np.arange(region.lat_min, region.lat_max + step / 2, step)
    lon = np.mod(region.lon_min + np.arange(0.0, region.lon_width + step / 2, step), 360.0)
    return lat, lon


def _rotation(seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _angle(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.arccos(np.clip(np.einsum("ij,ij->i", a, b), -1.0, 1.0))


@pytest.fixture(scope="module")
def stretched_graph() -> ForecastGraph:
    coarse_lat, coarse_lon = _coarse_axes()
    regional_lat, regional_lon = _regional_axes(NORDIC)
    return build_forecast_graph(
        coarse_lat=coarse_lat,
        coarse_lon=coarse_lon,
        regional_lat=regional_lat,
        regional_lon=regional_lon,
        region=NORDIC,
        global_level=2,
        regional_level=5,
        margin_deg=4.0,
    )


# ----------------------------------------------------------------------------------------------
# Icosahedral meshes
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("level", range(MAX_LEVEL + 1))
def test_icosahedral_mesh_geometric_invariants(meshes, level):
    mesh = meshes[level]
    v, f = mesh.vertices, mesh.faces
    assert v.shape == (10 * 4**level + 2, 3) and v.dtype == np.float64
    assert f.shape == (20 * 4**level, 3)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-12)
    n_edges = face_edges(f).shape[1]
    assert n_edges == 30 * 4**level
    assert len(v) - n_edges + len(f) == 2  # Euler characteristic of the sphere
    normal = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    assert np.all(np.einsum("ij,ij->i", normal, v[f].sum(axis=1)) > 0), "faces must be counter-clockwise"
    edges = face_edges(f)
    lengths = _angle(v[edges[0]], v[edges[1]])
    assert lengths.max() / lengths.min() < 1.25
    # Each vertex is shared by 5 (the original 12) or 6 faces.
    assert set(np.unique(np.bincount(f.ravel()))) <= {5, 6}
    if level < MAX_LEVEL:
        np.testing.assert_array_equal(meshes[level + 1].vertices[: len(v)], v)


def test_multimesh_has_every_level_once_in_both_directions(meshes):
    edges = multimesh_edges(meshes)
    assert edges.shape == (2, 2 * sum(30 * 4**level for level in range(MAX_LEVEL + 1)))
    pairs = set(map(tuple, edges.T.tolist()))
    assert len(pairs) == edges.shape[1]
    assert pairs == {(r, s) for s, r in pairs}
    assert not np.any(edges[0] == edges[1])
    assert np.all(np.diff(edges[1]) >= 0), "sorted by receiver"


# ----------------------------------------------------------------------------------------------
# Regions and meshes over them
# ----------------------------------------------------------------------------------------------
def test_region_distance_matches_a_dense_sampling_of_the_box():
    rng = np.random.default_rng(3)
    lat = np.rad2deg(np.arcsin(rng.uniform(-1, 1, 300)))
    lon = rng.uniform(0, 360, 300)
    for region in (NORDIC, ACROSS_0E, Region(70.0, 90.0, 100.0, 200.0)):
        box_lat, box_lon = np.meshgrid(
            np.linspace(region.lat_min, region.lat_max, 241),
            region.lon_min + np.linspace(0.0, region.lon_width, 241),
            indexing="ij",
        )
        box = lat_lon_to_xyz(box_lat.ravel(), box_lon.ravel())
        points = lat_lon_to_xyz(lat, lon)
        brute = np.rad2deg(np.arccos(np.clip(points @ box.T, -1, 1)).min(axis=1))
        np.testing.assert_allclose(region.distance_deg(lat, lon), brute, atol=0.1)
        assert np.array_equal(region.distance_deg(lat, lon) == 0, region.contains(lat, lon))


def test_region_wraps_across_0e():
    assert ACROSS_0E.lon_width == 35.0
    inside = ACROSS_0E.contains(np.array([50.0, 50.0, 50.0, 50.0]), np.array([350.0, 0.0, 19.0, 100.0]))
    assert inside.tolist() == [True, True, True, False]
    covering = Region.covering(np.array([41.0, 59.0]), np.array([350.0, 355.0, 0.0, 10.0]))
    assert (covering.lon_min, covering.lon_max) == (350.0, 10.0)
    mesh = stretched_multimesh(global_level=2, regional_level=4, region=ACROSS_0E, margin_deg=2.0)
    lat, lon = xyz_to_lat_lon(mesh.xyz)
    fine = mesh.level_of_node == 4
    assert np.any(fine & (lon > 340)) and np.any(fine & (lon < 25)), "fine nodes on both sides of 0E"
    assert np.all(ACROSS_0E.distance_deg(lat[fine], lon[fine]) <= 2.0 + 1e-9)


def test_stretched_mesh_is_finer_inside_region():
    mesh = stretched_multimesh(global_level=2, regional_level=5, region=NORDIC, margin_deg=4.0)
    spacing = mesh.local_spacing()
    assert spacing[mesh.in_region].mean() < 0.5 * spacing[~mesh.in_region].mean()
    # The same with raw edges: finest-level edges inside vs global-level edges far away.
    lengths = mesh.edge_lengths()
    lat, lon = xyz_to_lat_lon(mesh.xyz)
    far = NORDIC.distance_deg(lat, lon) > 20.0
    inside = (mesh.edge_level == 5) & mesh.in_region[mesh.edges[1]]
    outside = (mesh.edge_level == 2) & far[mesh.edges[1]]
    assert lengths[inside].mean() < 0.5 * lengths[outside].mean()
    # The global levels are complete and come first, in icosahedral order.
    global_vertices = icosahedral_meshes(2)[-1].vertices
    np.testing.assert_array_equal(mesh.xyz[: len(global_vertices)], global_vertices)
    assert np.all(mesh.level_of_node[len(global_vertices) :] > 2)
    # Every refined node lies within the margin, and the finest level reaches all of the region.
    refined = mesh.level_of_node > 2
    assert np.all(NORDIC.distance_deg(lat[refined], lon[refined]) <= 4.0 + 1e-9)
    assert np.all(mesh.local_level()[mesh.in_region] == 5)


def test_stretched_mesh_keeps_exactly_the_full_level_edges_between_kept_nodes():
    """Cross-check against the brute-force construction from the full global meshes."""
    mesh = stretched_multimesh(global_level=1, regional_level=4, region=NORDIC, margin_deg=3.0)
    full = icosahedral_meshes(4)
    finest = full[-1].vertices
    lat, lon = xyz_to_lat_lon(finest)
    created = np.repeat(np.arange(5), np.diff([0] + [len(m.vertices) for m in full]))
    kept = (created <= 1) | (NORDIC.distance_deg(lat, lon) <= 3.0)
    # Map every kept full-mesh vertex to the stretched mesh node at the same place.
    index = {tuple(np.round(p, 12)): i for i, p in enumerate(mesh.xyz)}
    to_mesh = np.array([index.get(tuple(np.round(p, 12)), -1) for p in finest])
    assert np.all(to_mesh[kept] >= 0) and np.all(to_mesh[~kept] == -1)
    expected = set()
    for level, m in enumerate(full):
        e = face_edges(m.faces)
        e = e[:, kept[e[0]] & kept[e[1]]]
        expected |= {(int(to_mesh[a]), int(to_mesh[b]), level) for a, b in e.T}
        expected |= {(int(to_mesh[b]), int(to_mesh[a]), level) for a, b in e.T}
    assert set(zip(mesh.edges[0].tolist(), mesh.edges[1].tolist(), mesh.edge_level.tolist(), strict=True)) == expected


def test_limited_area_mesh_stays_within_region_and_margin():
    mesh = limited_area_mesh(level=5, region=ACROSS_0E, margin_deg=3.0)
    lat, lon = xyz_to_lat_lon(mesh.xyz)
    assert np.all(ACROSS_0E.distance_deg(lat, lon) <= 3.0 + 1e-9)
    assert mesh.in_region.sum() > 0.5 * mesh.num_nodes
    assert set(np.unique(mesh.edge_level)) >= {3, 4, 5}
    assert np.all(np.bincount(mesh.edges[1], minlength=mesh.num_nodes) > 0)


@pytest.mark.parametrize(
    "mesh",
    [
        global_multimesh(level=3),
        stretched_multimesh(global_level=1, regional_level=4, region=ACROSS_0E, margin_deg=2.0),
        limited_area_mesh(level=4, region=NORDIC, margin_deg=2.0),
    ],
    ids=["global", "stretched", "limited-area"],
)
def test_mesh_edges_are_symmetric_unique_and_every_node_receives(mesh):
    triples = set(zip(mesh.edges[0].tolist(), mesh.edges[1].tolist(), mesh.edge_level.tolist(), strict=True))
    assert len(triples) == mesh.edges.shape[1]
    assert triples == {(r, s, level) for s, r, level in triples}
    assert np.all(np.bincount(mesh.edges[1], minlength=mesh.num_nodes) > 0)
    assert not np.any(mesh.edges[0] == mesh.edges[1])


# ----------------------------------------------------------------------------------------------
# Edges and features
# ----------------------------------------------------------------------------------------------
def _random_points(n: int, seed: int) -> np.ndarray:
    p = np.random.default_rng(seed).standard_normal((n, 3))
    return p / np.linalg.norm(p, axis=1, keepdims=True)


def test_radius_and_knn_edges_match_brute_force():
    senders, receivers = _random_points(400, 0), _random_points(150, 1)
    radius = np.random.default_rng(2).uniform(0.05, 0.3, len(receivers))
    angle = np.arccos(np.clip(receivers @ senders.T, -1, 1))  # (Nr, Ns)
    r_idx, s_idx = np.nonzero(angle <= radius[:, None])
    expected = np.stack([s_idx, r_idx])
    np.testing.assert_array_equal(radius_edges(senders, receivers, radius=radius), expected)
    nearest = np.sort(np.argsort(angle, axis=1)[:, :3], axis=1)
    expected = np.stack([nearest.ravel(), np.repeat(np.arange(len(receivers)), 3)])
    np.testing.assert_array_equal(knn_edges(senders, receivers, k=3), expected)


def test_edge_features_length_is_great_circle_distance():
    rng = np.random.default_rng(4)
    lat1, lon1 = rng.uniform(-89, 89, 200), rng.uniform(0, 360, 200)
    lat2, lon2 = rng.uniform(-89, 89, 200), rng.uniform(0, 360, 200)
    p1, l1, p2, l2 = map(np.deg2rad, (lat1, lon1, lat2, lon2))
    haversine = 2 * np.arcsin(
        np.sqrt(np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin((l2 - l1) / 2) ** 2)
    )
    edges = np.stack([np.arange(200), np.arange(200)])
    features = edge_features(lat_lon_to_xyz(lat1, lon1), lat_lon_to_xyz(lat2, lon2), edges)
    assert features.shape == (200, 4) and features.dtype == np.float32
    np.testing.assert_allclose(features[:, 0], haversine, rtol=1e-6, atol=1e-7)


def test_edge_features_local_frame_points_east_and_north():
    receiver = lat_lon_to_xyz(np.array([30.0]), np.array([100.0]))
    senders = lat_lon_to_xyz(np.array([30.0, 31.0]), np.array([101.0, 100.0]))  # east, north
    features = edge_features(senders, receiver, np.array([[0, 1], [0, 0]])).astype(np.float64)
    east, north = features
    assert east[2] > 0 and abs(east[3]) < 0.02 * east[2]
    assert north[3] > 0 and abs(north[2]) < 1e-7
    np.testing.assert_allclose(north[3], np.sin(np.deg2rad(1.0)), rtol=1e-6)
    np.testing.assert_allclose(features[:, 1], np.cos(features[:, 0]) - 1, atol=1e-7)


def test_edge_features_invariant_under_rotation():
    senders, receivers = _random_points(300, 5), _random_points(300, 6)
    edges = knn_edges(senders, receivers, k=4)
    base = edge_features(senders, receivers, edges).astype(np.float64)
    # About the polar axis (a longitude shift) the local frames rotate along: features unchanged.
    c, s = np.cos(1.234), np.sin(1.234)
    about_pole = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(edge_features(senders @ about_pole.T, receivers @ about_pole.T, edges), base, atol=1e-6)
    # Any rotation keeps the length, the radial part and the tangential norm (the frame follows the pole).
    rot = _rotation(7)
    rotated = edge_features(senders @ rot.T, receivers @ rot.T, edges).astype(np.float64)
    np.testing.assert_allclose(rotated[:, :2], base[:, :2], atol=1e-6)
    np.testing.assert_allclose(np.hypot(rotated[:, 2], rotated[:, 3]), np.hypot(base[:, 2], base[:, 3]), atol=1e-6)


def test_coordinates_round_trip_and_node_features():
    lat = np.array([-90.0, -45.0, 0.0, 10.0, 89.0])
    lon = np.array([0.0, 359.5, 180.0, 10.0, 90.0])
    xyz = lat_lon_to_xyz(lat, lon)
    back_lat, back_lon = xyz_to_lat_lon(xyz)
    np.testing.assert_allclose(back_lat, lat, atol=1e-12)
    np.testing.assert_allclose(back_lon[1:], lon[1:], atol=1e-9)
    features = node_features(xyz)
    np.testing.assert_allclose(features[1:, 0], np.cos(np.deg2rad(lat[1:])), atol=1e-6)
    np.testing.assert_allclose(features[1:, 1], np.sin(np.deg2rad(lon[1:])), atol=1e-6)
    # sin(lat) tells the hemispheres apart: mirror points share every other feature.
    np.testing.assert_allclose(features[:, 3], np.sin(np.deg2rad(lat)), atol=1e-6)
    mirror = node_features(lat_lon_to_xyz(-lat, lon))
    np.testing.assert_allclose(mirror[:, :3], features[:, :3], atol=1e-6)
    np.testing.assert_allclose(mirror[:, 3], -features[:, 3], atol=1e-6)


def test_grid_area_weights_follow_cell_areas():
    lat, lon = np.linspace(-90, 90, 37), np.arange(0, 360, 5.0)
    np.testing.assert_allclose(grid_cell_areas(lat, lon).sum(), 4 * np.pi, rtol=1e-12)
    weights = grid_area_weights(lat, lon).reshape(len(lat), len(lon))
    np.testing.assert_allclose(weights.mean(), 1.0)
    np.testing.assert_allclose(weights[18, 0] / weights[12, 0], 1 / np.cos(np.deg2rad(30)), rtol=2e-3)
    # A regional axis crossing 0E has cells of its own spacing.
    regional = grid_cell_areas(np.array([0.0, 1.0]), np.array([359.0, 0.0, 1.0]))
    np.testing.assert_allclose(regional, regional[0], rtol=2e-4)
    np.testing.assert_allclose(regional[0], np.deg2rad(1.0) * (np.sin(np.deg2rad(0.5)) - np.sin(np.deg2rad(-0.5))))


# ----------------------------------------------------------------------------------------------
# The forecast graph
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("setup", ["global", "stretched-radius", "stretched-knn", "limited-area"])
def test_every_data_node_is_encoded_and_decoded_and_every_mesh_node_receives(setup, stretched_graph):
    coarse_lat, coarse_lon = _coarse_axes()
    regional_lat, regional_lon = _regional_axes(ACROSS_0E)
    if setup == "stretched-radius":
        graph = stretched_graph
    elif setup == "global":
        graph = build_forecast_graph(
            coarse_lat=coarse_lat, coarse_lon=coarse_lon, region=None, global_level=3, regional_level=3, margin_deg=0.0
        )
    else:
        graph = build_forecast_graph(
            coarse_lat=coarse_lat,
            coarse_lon=coarse_lon,
            regional_lat=regional_lat,
            regional_lon=regional_lon,
            region=ACROSS_0E,
            global_level=None if setup == "limited-area" else 2,
            regional_level=5,
            margin_deg=3.0,
            encoder="knn" if setup == "stretched-knn" else "radius",
            limited_area=setup == "limited-area",
        )
    nd, nm = len(graph.data_xyz), graph.mesh.num_nodes
    assert np.all(np.bincount(graph.encoder_edges[0], minlength=nd) >= 1)
    assert np.all(np.bincount(graph.encoder_edges[1], minlength=nm) >= 1)
    assert np.all(np.bincount(graph.decoder_edges[1], minlength=nd) == 3)
    assert np.all(np.bincount(graph.mesh.edges[1], minlength=nm) >= 1)
    for edges, n_send in ((graph.encoder_edges, nd), (graph.decoder_edges, nm), (graph.mesh.edges, nm)):
        key = edges[1] * n_send + edges[0]
        assert np.all(np.diff(key) > 0), "edges sorted by (receiver, sender), no duplicates"
    assert graph.encoder_edge_features.shape == (graph.encoder_edges.shape[1], 4)
    assert graph.mesh_edge_features.shape == (graph.mesh.edges.shape[1], 4)
    np.testing.assert_allclose(graph.data_area_weight.mean(), 1.0)
    if setup == "limited-area":
        assert graph.data_is_regional.all() and nd == len(regional_lat) * len(regional_lon)
    if setup == "global":
        # GraphCast's rule alone connects a global grid: no fallback edge is needed.
        assert graph.summary()["encoder_fallback_edges"] == 0


def test_radius_encoder_follows_the_local_mesh_spacing(stretched_graph):
    graph = stretched_graph
    reach = encoder_radius(graph.mesh, factor=0.6)
    assert reach[graph.mesh.in_region].max() < 0.5 * reach[~graph.mesh.in_region].max()
    summary = graph.summary()
    assert summary["encoder_edge_km_in_region"] < 0.5 * summary["encoder_edge_km_outside_region"]
    assert summary["mesh_spacing_km_in_region"] < 0.5 * summary["mesh_spacing_km_outside_region"]
    # Fallback edges exist only where the fine margin mesh lies over coarse data (no data in its reach).
    assert summary["encoder_fallback_edges"] < 0.05 * summary["encoder_edges"]
    # The in-degree means split the encoder edges between the mesh nodes that read the fine grid and the rest.
    readers = summary["mesh_nodes_reading_regional"]
    others = summary["mesh_nodes"] - readers
    assert 0 < readers < summary["mesh_nodes"]
    total = readers * summary["encoder_in_degree_reading_regional"] + others * summary["encoder_in_degree_other"]
    assert total == pytest.approx(summary["encoder_edges"])


def test_a_coarse_mesh_over_the_fine_grid_reads_many_more_data_nodes_there():
    """Without mesh refinement the few mesh nodes over the regional grid each read many fine points: the
    imbalance that ``model.encoder_aggregation: mean`` removes from the encoder's messages."""
    coarse_lat, coarse_lon = _coarse_axes()
    regional_lat, regional_lon = _regional_axes(NORDIC)
    graph = build_forecast_graph(coarse_lat=coarse_lat, coarse_lon=coarse_lon, regional_lat=regional_lat,
                                 regional_lon=regional_lon, region=NORDIC, global_level=2, regional_level=2,
                                 margin_deg=4.0, keep_coarse_in_region=True)
    summary = graph.summary()
    assert summary["encoder_in_degree_reading_regional"] > 3 * summary["encoder_in_degree_other"]


def test_coarse_nodes_inside_the_regional_grid_are_replaced_by_regional_nodes(stretched_graph):
    graph = stretched_graph
    coarse_lat, coarse_lon = _coarse_axes()
    regional_lat, regional_lon = _regional_axes(NORDIC)
    coarse = ~graph.data_is_regional
    lat_i, lon_i = np.divmod(graph.data_grid_index[coarse], len(coarse_lon))
    np.testing.assert_allclose(graph.data_xyz[coarse], lat_lon_to_xyz(coarse_lat[lat_i], coarse_lon[lon_i]))
    assert not NORDIC.contains(coarse_lat[lat_i], coarse_lon[lon_i]).any()
    assert coarse.sum() == len(coarse_lat) * len(coarse_lon) - NORDIC.contains(
        *np.meshgrid(coarse_lat, coarse_lon, indexing="ij")
    ).sum()
    assert graph.data_is_regional.sum() == len(regional_lat) * len(regional_lon)
    np.testing.assert_array_equal(graph.data_grid_index[~coarse], np.arange(len(regional_lat) * len(regional_lon)))
    # Regional 1-degree cells weigh about (1/5)^2 of the 5-degree coarse cells at the same latitude.
    lat, _ = xyz_to_lat_lon(graph.data_xyz)
    at_60 = np.isclose(lat, 60.0)
    ratio = graph.data_area_weight[at_60 & ~coarse].mean() / graph.data_area_weight[at_60 & coarse].mean()
    np.testing.assert_allclose(ratio, 1 / 25, rtol=0.02)


def test_keep_coarse_in_region_keeps_every_coarse_node_and_old_descriptions_still_cut_out(stretched_graph):
    import json

    coarse_lat, coarse_lon = _coarse_axes()
    regional_lat, regional_lon = _regional_axes(NORDIC)
    arguments = dict(stretched_graph.description["arguments"], region=NORDIC, keep_coarse_in_region=True)
    graph = build_forecast_graph(**arguments)
    coarse = ~graph.data_is_regional
    np.testing.assert_array_equal(graph.data_grid_index[coarse], np.arange(len(coarse_lat) * len(coarse_lon)))
    assert graph.data_is_regional.sum() == len(regional_lat) * len(regional_lon)
    np.testing.assert_array_equal(graph.mesh.edges, stretched_graph.mesh.edges)  # the same mesh
    np.testing.assert_allclose(graph.data_area_weight.mean(), 1.0)
    assert np.all(np.bincount(graph.decoder_edges[1], minlength=len(graph.data_xyz)) == 3)
    rebuilt = build_forecast_graph_from_description(json.loads(json.dumps(graph.description)))
    np.testing.assert_array_equal(rebuilt.data_grid_index, graph.data_grid_index)
    # A description written before the option existed rebuilds the cut-out graph it was made from.
    old = json.loads(json.dumps(stretched_graph.description))
    del old["arguments"]["keep_coarse_in_region"]
    np.testing.assert_array_equal(build_forecast_graph_from_description(old).data_xyz, stretched_graph.data_xyz)
    with pytest.raises(SchemaError, match="keep_coarse_in_region=True needs a regional grid"):
        build_forecast_graph(coarse_lat=coarse_lat, coarse_lon=coarse_lon, region=None, global_level=2,
                             regional_level=2, margin_deg=0.0, keep_coarse_in_region=True)


def test_regional_nodes_can_be_left_out_of_the_encoder():
    """regional_encoder=False: the mesh reads exactly the coarse-only graph's encoder edges, the fine nodes keep
    their decoder edges, the option survives the description and needs the coarse points in the box."""
    import json

    coarse_lat, coarse_lon = _coarse_axes()
    regional_lat, regional_lon = _regional_axes(NORDIC)
    common = dict(coarse_lat=coarse_lat, coarse_lon=coarse_lon, region=NORDIC, global_level=2, regional_level=2,
                  margin_deg=4.0)
    both = build_forecast_graph(**common, regional_lat=regional_lat, regional_lon=regional_lon,
                                keep_coarse_in_region=True)
    coarse_only = build_forecast_graph(**common, regional_lat=regional_lat, regional_lon=regional_lon,
                                       keep_coarse_in_region=True, regional_encoder=False)
    fine = np.flatnonzero(coarse_only.data_is_regional)
    assert np.isin(both.encoder_edges[0], fine).any()
    assert not np.isin(coarse_only.encoder_edges[0], fine).any()
    # Coarse nodes come first in both graphs, so the remaining edges are those of the graph without fine nodes.
    plain = build_forecast_graph(coarse_lat=coarse_lat, coarse_lon=coarse_lon, region=None, global_level=2,
                                 regional_level=2, margin_deg=0.0)
    np.testing.assert_array_equal(coarse_only.encoder_edges, plain.encoder_edges)
    np.testing.assert_array_equal(coarse_only.decoder_edges, both.decoder_edges)
    assert coarse_only.summary()["encoder_edges"] == plain.encoder_edges.shape[1]
    rebuilt = build_forecast_graph_from_description(json.loads(json.dumps(coarse_only.description)))
    np.testing.assert_array_equal(rebuilt.encoder_edges, coarse_only.encoder_edges)
    assert "regional_encoder" not in both.description["arguments"]  # descriptions from before the option rebuild
    with pytest.raises(SchemaError, match="regional_encoder=False needs keep_coarse_in_region=True"):
        build_forecast_graph(**common, regional_lat=regional_lat, regional_lon=regional_lon, regional_encoder=False)


def test_npz_round_trip_is_exact_and_needs_no_pickle(stretched_graph, tmp_path):
    path = tmp_path / "graph.npz"
    stretched_graph.to_npz(path)
    with zipfile.ZipFile(path) as archive:
        assert not [n for n in archive.namelist() if n.startswith(".")]
    with np.load(path, allow_pickle=False) as raw:
        assert all(raw[key].dtype != object for key in raw.files)
    loaded = ForecastGraph.from_npz(path)
    for name, value in stretched_graph._arrays().items():
        got = loaded._arrays()[name]
        assert got.dtype == value.dtype, name
        np.testing.assert_array_equal(got, value, err_msg=name)
    assert loaded.description == stretched_graph.description
    assert loaded.summary() == stretched_graph.summary()
    assert [p.name for p in tmp_path.iterdir()] == ["graph.npz"], "no temporary file left behind"


def test_npz_errors_name_the_file(tmp_path):
    with pytest.raises(SourceError, match="missing.npz"):
        ForecastGraph.from_npz(tmp_path / "missing.npz")
    partial = tmp_path / "partial.npz"
    np.savez(partial, format_version=np.array(1), description_json=np.array("{}"))
    with pytest.raises(SourceError, match=r"partial\.npz lacks arrays \[.*data_xyz"):
        ForecastGraph.from_npz(partial)


def test_description_rebuilds_the_same_graph(stretched_graph):
    import json

    description = json.loads(json.dumps(stretched_graph.description))
    rebuilt = build_forecast_graph_from_description(description)
    for name, value in stretched_graph._arrays().items():
        np.testing.assert_array_equal(rebuilt._arrays()[name], value, err_msg=name)


def test_invalid_arguments_raise_schema_errors_naming_the_value():
    coarse_lat, coarse_lon = _coarse_axes()
    common = dict(region=None, global_level=2, regional_level=2, margin_deg=0.0)
    with pytest.raises(SchemaError, match=r"coarse_lon .*\[0, 360\).*-10"):
        build_forecast_graph(coarse_lat=coarse_lat, coarse_lon=coarse_lon - 10, **common)
    with pytest.raises(SchemaError, match="coarse_lat must be strictly monotonic"):
        build_forecast_graph(coarse_lat=np.r_[coarse_lat, 0.0], coarse_lon=coarse_lon, **common)
    with pytest.raises(SchemaError, match="global_level must be None when limited_area=True"):
        build_forecast_graph(
            coarse_lat=coarse_lat,
            coarse_lon=coarse_lon,
            regional_lat=coarse_lat[:3],
            regional_lon=coarse_lon[:3],
            region=NORDIC,
            global_level=2,
            regional_level=4,
            margin_deg=1.0,
            limited_area=True,
        )
    with pytest.raises(SchemaError, match="regional_level.*must be >= global_level"):
        stretched_multimesh(global_level=4, regional_level=3, region=NORDIC, margin_deg=1.0)
    with pytest.raises(SchemaError, match="lat_min=80.0, lat_max=70.0"):
        Region(80.0, 70.0, 0.0, 10.0)


def test_plot_writes_a_png(stretched_graph, tmp_path):
    path = tmp_path / "graph.png"
    stretched_graph.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["graph.png"]


def test_graphs_package_does_not_import_torch():
    code = "import sys, forecasting.graphs; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT)})
