"""forecasting.models: the interaction network against a naive loop, and the encoder-processor-decoder network."""

from __future__ import annotations

import inspect
import io

import numpy as np
import pytest
import torch

import forecasting.models as models
from forecasting.errors import SchemaError
from forecasting.graphs import Region, build_forecast_graph
from forecasting.models import MLP, EncodeProcessDecode, GraphTensors, InteractionNetwork, graph_tensors

REGION = Region(lat_min=50.0, lat_max=70.0, lon_min=0.0, lon_max=30.0)
N_INPUT, N_OUTPUT, N_NOISE = 10, 4, 3


def _coarse_axes() -> tuple[np.ndarray, np.ndarray]:
    """16 x 32 cell-centre grid (11.25 degrees)."""
    return -90.0 + (np.arange(16) + 0.5) * 180.0 / 16, np.arange(32) * 360.0 / 32


def _regional_axes() -> tuple[np.ndarray, np.ndarray]:
    """5 x 7 points, 5 degrees apart, over REGION."""
    return np.arange(50.0, 70.1, 5.0), np.arange(0.0, 30.1, 5.0)


def _build(kind: str):
    coarse_lat, coarse_lon = _coarse_axes()
    regional_lat, regional_lon = _regional_axes()
    if kind == "stretched":
        return build_forecast_graph(
            coarse_lat=coarse_lat, coarse_lon=coarse_lon, regional_lat=regional_lat, regional_lon=regional_lon,
            region=REGION, global_level=1, regional_level=3, margin_deg=5.0,
        )
    if kind == "global":
        return build_forecast_graph(
            coarse_lat=coarse_lat, coarse_lon=coarse_lon, region=None, global_level=2, regional_level=2,
            margin_deg=0.0,
        )
    return build_forecast_graph(
        coarse_lat=coarse_lat, coarse_lon=coarse_lon, regional_lat=regional_lat, regional_lon=regional_lon,
        region=REGION, global_level=None, regional_level=3, margin_deg=5.0, limited_area=True,
    )


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def graph() -> GraphTensors:
    return graph_tensors(_build("stretched"))


def _model(graph: GraphTensors, *, seed: int = 0, **kwargs) -> EncodeProcessDecode:
    torch.manual_seed(seed)
    options = dict(n_input=N_INPUT, n_output=N_OUTPUT, hidden=16, processor_layers=2)
    options.update(kwargs)
    return EncodeProcessDecode(graph=graph, **options)


def _inputs(graph: GraphTensors, batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, graph.num_data_nodes, N_INPUT, generator=generator)
    noise = torch.randn(batch, graph.num_mesh_nodes, N_NOISE, generator=generator)
    return x, noise


# ----------------------------------------------------------------------------------------------
# GraphTensors
# ----------------------------------------------------------------------------------------------
def test_graph_tensors_have_torch_dtypes_and_match_the_graph():
    graph = _build("stretched")
    tensors = graph_tensors(graph)
    assert tensors.num_data_nodes == len(graph.data_xyz) and tensors.num_mesh_nodes == graph.mesh.num_nodes
    for name in ("mesh_edges", "encoder_edges", "decoder_edges"):
        assert getattr(tensors, name).dtype == torch.int64
    for name in ("data_node_features", "data_area_weight", "mesh_node_features", "mesh_edge_features",
                 "encoder_edge_features", "decoder_edge_features"):
        assert getattr(tensors, name).dtype == torch.float32
    assert tensors.data_is_regional.dtype == torch.bool
    assert int(tensors.data_is_regional.sum()) == int(graph.data_is_regional.sum())
    np.testing.assert_array_equal(tensors.decoder_edges.numpy(), graph.decoder_edges)
    moved = tensors.to("cpu")
    assert isinstance(moved, GraphTensors) and moved.mesh_edges.device.type == "cpu"


def test_edge_features_are_normalised_by_the_longest_edge_of_each_set(graph):
    model = _model(graph)
    for name in ("encoder", "mesh", "decoder"):
        attr = getattr(model, f"{name}_edge_attr")
        raw = getattr(graph, f"{name}_edge_features")
        assert float(attr[:, 0].max()) == pytest.approx(1.0)
        torch.testing.assert_close(attr * raw[:, 0].max(), raw)


# ----------------------------------------------------------------------------------------------
# Interaction network
# ----------------------------------------------------------------------------------------------
def _naive_interaction(net: InteractionNetwork, h_src, h_dst, e, edges, *, mean: bool = False):
    """Edge-by-edge, node-by-node reference of the interaction network (unsplit first Linear); ``mean``
    divides each receiver's sum by its number of incoming edges."""
    w_first = torch.cat([net.edge_proj.weight, net.src_proj.weight, net.dst_proj.weight], dim=1)  # (H, 3H)
    batch, n_edges = h_src.shape[0], edges.shape[1]
    e_new = torch.zeros(batch, n_edges, h_src.shape[2], dtype=h_src.dtype)
    for b in range(batch):
        for k in range(n_edges):
            s, r = int(edges[0, k]), int(edges[1, k])
            edge = e[min(b, e.shape[0] - 1), k]
            first = w_first @ torch.cat([edge, h_src[b, s], h_dst[b, r]]) + net.edge_proj.bias
            e_new[b, k] = edge + net.edge_rest(first)
    h_new = torch.zeros_like(h_dst)
    for b in range(batch):
        for i in range(h_dst.shape[1]):
            total, count = torch.zeros(h_dst.shape[2], dtype=h_dst.dtype), 0
            for k in range(n_edges):
                if int(edges[1, k]) == i:
                    total, count = total + e_new[b, k], count + 1
            if mean and count:
                total = total / count
            h_new[b, i] = h_dst[b, i] + net.node_mlp(torch.cat([h_dst[b, i], total]))
    return h_new, e_new


@pytest.fixture
def tiny_bipartite():
    """7 senders, 5 receivers (receiver 4 gets no edge), a repeated edge, batch 2, float64."""
    torch.manual_seed(0)
    edges = torch.tensor([[0, 3, 6, 1, 1, 2, 5, 4, 0, 3, 3], [2, 0, 0, 1, 1, 3, 2, 2, 0, 3, 1]])
    h_src = torch.randn(2, 7, 8, dtype=torch.float64)
    h_dst = torch.randn(2, 5, 8, dtype=torch.float64)
    e = torch.randn(1, edges.shape[1], 8, dtype=torch.float64)
    net = InteractionNetwork(8, mlp_hidden_layers=2).double()
    return net, h_src, h_dst, e, edges


def test_interaction_network_sum_aggregation_equals_naive_loop(tiny_bipartite):
    net, h_src, h_dst, e, edges = tiny_bipartite
    h_new, e_new = net(h_src, h_dst, e, edges)
    h_ref, e_ref = _naive_interaction(net, h_src, h_dst, e, edges)
    assert h_new.shape == (2, 5, 8) and e_new.shape == (2, edges.shape[1], 8)
    torch.testing.assert_close(e_new, e_ref)
    torch.testing.assert_close(h_new, h_ref)
    # A receiver without edges aggregates a zero sum.
    expected = h_dst[:, 4] + net.node_mlp(torch.cat([h_dst[:, 4], torch.zeros_like(h_dst[:, 4])], -1))
    torch.testing.assert_close(h_new[:, 4], expected)


def test_interaction_network_mean_aggregation_equals_naive_loop_and_ignores_repeated_senders(tiny_bipartite):
    """The mean divides each receiver's summed messages by its in-degree; so sending every message of a
    receiver twice leaves a mean-aggregating node unchanged (but doubles a sum)."""
    _, h_src, h_dst, e, edges = tiny_bipartite
    torch.manual_seed(1)
    net = InteractionNetwork(8, mlp_hidden_layers=2, aggregation="mean").double()
    h_new, e_new = net(h_src, h_dst, e, edges)
    h_ref, e_ref = _naive_interaction(net, h_src, h_dst, e, edges, mean=True)
    torch.testing.assert_close(e_new, e_ref)
    torch.testing.assert_close(h_new, h_ref)
    expected = h_dst[:, 4] + net.node_mlp(torch.cat([h_dst[:, 4], torch.zeros_like(h_dst[:, 4])], -1))
    torch.testing.assert_close(h_new[:, 4], expected)  # no edges: zeros, as with the sum
    doubled_edges, doubled_e = torch.cat([edges, edges], dim=1), torch.cat([e, e], dim=1)
    torch.testing.assert_close(net(h_src, h_dst, doubled_e, doubled_edges)[0], h_new)
    summing = InteractionNetwork(8, mlp_hidden_layers=2).double()
    summing.load_state_dict(net.state_dict())
    assert not torch.allclose(summing(h_src, h_dst, doubled_e, doubled_edges)[0], summing(h_src, h_dst, e, edges)[0])
    with pytest.raises(ValueError, match="aggregation must be 'sum' or 'mean'; found 'max'"):
        InteractionNetwork(8, aggregation="max")


def test_interaction_network_is_equivariant_to_edge_and_node_order(tiny_bipartite):
    net, h_src, h_dst, e, edges = tiny_bipartite
    h_new, e_new = net(h_src, h_dst, e, edges)
    edge_order = torch.randperm(edges.shape[1], generator=torch.Generator().manual_seed(2))
    h_perm, e_perm = net(h_src, h_dst, e[:, edge_order], edges[:, edge_order])
    torch.testing.assert_close(h_perm, h_new)
    torch.testing.assert_close(e_perm, e_new[:, edge_order])
    # Relabel senders and receivers: outputs are relabelled the same way.
    src_order, dst_order = torch.randperm(7), torch.randperm(5)
    src_new_label, dst_new_label = torch.argsort(src_order), torch.argsort(dst_order)
    relabelled = torch.stack([src_new_label[edges[0]], dst_new_label[edges[1]]])
    h_rel, e_rel = net(h_src[:, src_order], h_dst[:, dst_order], e, relabelled)
    torch.testing.assert_close(h_rel, h_new[:, dst_order])
    torch.testing.assert_close(e_rel, e_new)


def test_mlp_layout():
    mlp = MLP(5, 3, hidden=[7, 11], layer_norm=True)
    kinds = [type(m).__name__ for m in mlp.net]
    assert kinds == ["Linear", "SiLU", "Linear", "SiLU", "Linear", "LayerNorm"]
    assert mlp(torch.randn(2, 4, 5)).shape == (2, 4, 3)
    assert [type(m).__name__ for m in MLP(5, 3, hidden=[], layer_norm=False).net] == ["Linear"]


# ----------------------------------------------------------------------------------------------
# Encoder-processor-decoder
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["stretched", "global", "limited_area"])
def test_output_shape_on_every_graph_kind(kind):
    graph = graph_tensors(_build(kind))
    model = _model(graph)
    x, _ = _inputs(graph, batch=3)
    y = model(x)
    assert y.shape == (3, graph.num_data_nodes, N_OUTPUT) and y.dtype == torch.float32
    assert torch.isfinite(y).all()


def test_gradients_reach_every_parameter(graph):
    model = _model(graph, noise_channels=N_NOISE, mlp_hidden_layers=2)
    x, noise = _inputs(graph)
    (model(x, noise) ** 2).mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []


def test_model_overfits_a_fixed_target(graph):
    model = _model(graph, hidden=32, processor_layers=2)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(1, graph.num_data_nodes, N_INPUT, generator=generator)
    target = torch.randn(1, graph.num_data_nodes, N_OUTPUT, generator=generator)  # memorise white noise
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(250):
        loss = torch.nn.functional.mse_loss(model(x), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    final = float(np.mean(losses[-10:]))
    assert final < losses[0] / 10, (losses[0], final)


def test_noise_changes_members_only_in_probabilistic_mode(graph):
    x, noise = _inputs(graph)
    deterministic = _model(graph)
    with pytest.raises(SchemaError, match="deterministic"):
        deterministic(x, noise)
    probabilistic = _model(graph, noise_channels=N_NOISE)
    with pytest.raises(SchemaError, match="noise of shape"):
        probabilistic(x)
    with pytest.raises(SchemaError, match=r"found \(2, \d+, 2\)"):
        probabilistic(x, noise[..., :2])
    with torch.no_grad():
        same = probabilistic(x, noise), probabilistic(x, noise.clone())
        other = probabilistic(x, torch.randn_like(noise))
        # Two members of one initial state in one batch: same x, different noise.
        members = probabilistic(x[:1].expand(2, -1, -1), noise)
        twins = probabilistic(x[:1].expand(2, -1, -1), noise[:1].expand(2, -1, -1))
    torch.testing.assert_close(same[0], same[1], rtol=0, atol=0)
    assert (other - same[0]).abs().mean() > 1e-3
    assert (members[0] - members[1]).abs().mean() > 1e-3
    torch.testing.assert_close(twins[0], twins[1], rtol=0, atol=0)


def test_wrong_input_shape_is_reported(graph):
    model = _model(graph)
    with pytest.raises(SchemaError, match=rf"found \(2, {graph.num_data_nodes - 1}, {N_INPUT}\)"):
        model(torch.zeros(2, graph.num_data_nodes - 1, N_INPUT))


def test_checkpointed_processor_gives_same_outputs_and_gradients(graph):
    plain = _model(graph, noise_channels=N_NOISE)
    recomputed = _model(graph, seed=5, noise_channels=N_NOISE, checkpoint_processor=True)
    recomputed.load_state_dict(plain.state_dict())
    x, noise = _inputs(graph)
    outputs = []
    for model in (plain, recomputed):
        y = model(x, noise)
        (y**2).mean().backward()
        outputs.append(y.detach())
    torch.testing.assert_close(outputs[0], outputs[1])
    grads = dict(plain.named_parameters())
    for name, p in recomputed.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, msg=name)


def test_state_dict_round_trip_holds_weights_only(graph):
    model = _model(graph, noise_channels=N_NOISE)
    state = model.state_dict()
    assert not any(key.endswith(("_edges", "_edge_attr", "_node_features")) for key in state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = _model(graph, seed=9, noise_channels=N_NOISE)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    x, noise = _inputs(graph)
    with torch.no_grad():
        torch.testing.assert_close(restored(x, noise), model(x, noise), rtol=0, atol=0)


def test_bf16_autocast_forward_on_cpu(graph):
    model = _model(graph, noise_channels=N_NOISE)
    x, noise = _inputs(graph)
    with torch.no_grad():
        reference = model(x, noise)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x, noise)
    assert y.shape == reference.shape and torch.isfinite(y).all()
    assert (y.float() - reference).abs().max() < 0.1 * reference.abs().max()


def test_model_traces_as_one_graph_under_torch_compile(graph):
    """Dynamo captures the whole forward without graph breaks (eager backend: no code generation)."""
    model = _model(graph, processor_layers=1, noise_channels=N_NOISE)
    x, noise = _inputs(graph)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, noise), model(x, noise))


def test_no_torch_module_takes_a_path(graph, tmp_path):
    path = tmp_path / "graph.npz"
    _build("stretched").to_npz(path)
    for graph_argument in (path, str(path)):
        with pytest.raises(TypeError, match="GraphTensors"):
            EncodeProcessDecode(graph=graph_argument, n_input=N_INPUT, n_output=N_OUTPUT)
    module_classes = [
        obj for obj in vars(models).values() if inspect.isclass(obj) and issubclass(obj, torch.nn.Module)
    ]
    assert {cls.__name__ for cls in module_classes} >= {"EncodeProcessDecode", "InteractionNetwork", "MLP"}
    for cls in module_classes:
        for parameter in inspect.signature(cls.__init__).parameters.values():
            annotation = str(parameter.annotation)
            assert "path" not in parameter.name.lower() and "Path" not in annotation and annotation != "str", (
                cls.__name__, parameter.name, annotation,
            )
