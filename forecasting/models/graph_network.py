"""The encoder-processor-decoder graph network of the stretched-grid graph forecaster.

Layout as in GraphCast (Lam et al. 2023) and the AIFS stretched-grid model (Nipen et al.): data nodes
(the coarse global grid plus the fine regional grid) are embedded, encoded onto a regionally refined
multi-mesh by one :class:`~forecasting.models.layers.InteractionNetwork` (data -> mesh), processed by
``processor_layers`` interaction networks on the mesh, and decoded back onto the data nodes by one more
(mesh -> data), followed by an output MLP. The graph itself (:class:`~forecasting.graphs.ForecastGraph`,
NumPy) enters as :class:`GraphTensors`; the network returns the raw per-node output, which the caller's
wrapper turns into a state (residual prediction and normalisation are not done here).

Probabilistic mode (``noise_channels > 0``), following AIFS-CRPS (Lang et al. 2024): every ensemble member
gets its own latent noise field on the mesh nodes, ``(B, N_mesh, noise_channels)``. It is embedded by an
MLP and enters every processor layer through a :class:`~forecasting.models.layers.ConditionalLayerNorm`
at the end of the node update, so it modulates the mesh latents throughout the processor instead of only
once at its input. With the same input, different noise gives different members; the same noise gives
the same member. The model is trained with the fair CRPS by the caller.

Edge features arrive raw (radians; see :func:`forecasting.graphs.connectivity.edge_features`) and are
divided, per edge set, by that set's longest edge (GraphCast), computed once at construction.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from forecasting.errors import SchemaError
from forecasting.graphs import ForecastGraph
from forecasting.models.layers import MLP, InteractionNetwork

__all__ = ["EncodeProcessDecode", "GraphTensors", "graph_tensors"]


@dataclass(frozen=True, eq=False)
class GraphTensors:
    """Torch views of a :class:`~forecasting.graphs.ForecastGraph`: what the network needs of the graph.

    Attributes:
        data_node_features: Shape (Nd, Fn) float32, static position features of the data nodes.
        data_area_weight: Shape (Nd,) float32, cell areas normalised to mean 1 (for area-weighted losses).
        data_is_regional: Shape (Nd,) bool, True for the fine regional grid's nodes.
        mesh_node_features: Shape (Nm, Fn) float32.
        mesh_edges: Shape (2, Em) int64, row 0 sender, row 1 receiver (mesh -> mesh).
        mesh_edge_features: Shape (Em, Fe) float32, raw (column 0 the length in radians).
        encoder_edges: Shape (2, Ee) int64, row 0 data node, row 1 mesh node.
        encoder_edge_features: Shape (Ee, Fe) float32, raw.
        decoder_edges: Shape (2, Ed) int64, row 0 mesh node, row 1 data node.
        decoder_edge_features: Shape (Ed, Fe) float32, raw.
    """

    data_node_features: Tensor
    data_area_weight: Tensor
    data_is_regional: Tensor
    mesh_node_features: Tensor
    mesh_edges: Tensor
    mesh_edge_features: Tensor
    encoder_edges: Tensor
    encoder_edge_features: Tensor
    decoder_edges: Tensor
    decoder_edge_features: Tensor

    @property
    def num_data_nodes(self) -> int:
        return self.data_node_features.shape[0]

    @property
    def num_mesh_nodes(self) -> int:
        return self.mesh_node_features.shape[0]

    def to(self, device: torch.device | str) -> GraphTensors:
        """The same tensors on ``device`` (dtypes unchanged)."""
        return GraphTensors(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def graph_tensors(graph: ForecastGraph) -> GraphTensors:
    """Convert a NumPy :class:`~forecasting.graphs.ForecastGraph` into :class:`GraphTensors` on the CPU.

    Edges become int64, features and area weights float32 (no float64 reaches the network).
    """

    def floats(array: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))

    def longs(array: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))

    return GraphTensors(
        data_node_features=floats(graph.data_node_features),
        data_area_weight=floats(graph.data_area_weight),
        data_is_regional=torch.from_numpy(np.ascontiguousarray(graph.data_is_regional, dtype=bool)),
        mesh_node_features=floats(graph.mesh_node_features),
        mesh_edges=longs(graph.mesh.edges),
        mesh_edge_features=floats(graph.mesh_edge_features),
        encoder_edges=longs(graph.encoder_edges),
        encoder_edge_features=floats(graph.encoder_edge_features),
        decoder_edges=longs(graph.decoder_edges),
        decoder_edge_features=floats(graph.decoder_edge_features),
    )


def _normalised_edge_features(features: Tensor) -> Tensor:
    """Raw edge features divided by the set's longest edge (column 0); unchanged for an empty or zero set."""
    longest = features[:, 0].max() if features.shape[0] else features.new_ones(())
    return features / torch.where(longest > 0, longest, torch.ones_like(longest))


class EncodeProcessDecode(nn.Module):
    """Encoder (data -> mesh), processor (mesh -> mesh, ``processor_layers`` times), decoder (mesh -> data).

    Args:
        graph: The graph as :class:`GraphTensors`; its tensors become non-persistent buffers (they travel with
            the graph, which a checkpoint stores separately, and move with ``.to(device)``).
        n_input: Channels per data node of ``x`` (input states of all input steps, forcings, static fields).
        n_output: Channels per data node of the output.
        hidden: Width H of all latents.
        processor_layers: Interaction networks on the mesh.
        mlp_hidden_layers: Hidden layers (width H) of every MLP.
        noise_channels: Channels of the mesh noise field in probabilistic mode; 0 for a deterministic model.
        checkpoint_processor: Recompute each processor layer in the backward pass
            (``torch.utils.checkpoint``, non-reentrant) instead of storing its activations: less memory at
            large sizes for about one more processor forward pass. Only active while gradients are enabled.
        encoder_aggregation: How each mesh node combines the messages of its data nodes, ``"sum"``
            (GraphCast) or ``"mean"`` (one scale for mesh nodes over the fine grid and elsewhere; see
            :mod:`forecasting.models.layers`). The processor and decoder always sum.

    Raises:
        TypeError: ``graph`` is not a :class:`GraphTensors` (e.g. a path: modules take tensors, not files).
        ValueError: a size argument is out of range.
    """

    def __init__(
        self,
        *,
        graph: GraphTensors,
        n_input: int,
        n_output: int,
        hidden: int = 128,
        processor_layers: int = 8,
        mlp_hidden_layers: int = 1,
        noise_channels: int = 0,
        checkpoint_processor: bool = False,
        encoder_aggregation: Literal["sum", "mean"] = "sum",
    ) -> None:
        super().__init__()
        if not isinstance(graph, GraphTensors):
            raise TypeError(
                f"EncodeProcessDecode graph must be GraphTensors (see graph_tensors()); found {type(graph).__name__}"
            )
        for name, value, minimum in (
            ("n_input", n_input, 1),
            ("n_output", n_output, 1),
            ("hidden", hidden, 1),
            ("processor_layers", processor_layers, 0),
            ("mlp_hidden_layers", mlp_hidden_layers, 1),
            ("noise_channels", noise_channels, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"EncodeProcessDecode {name} must be an integer >= {minimum}; found {value!r}")
        self.n_input, self.n_output, self.hidden = n_input, n_output, hidden
        self.noise_channels = noise_channels
        self.checkpoint_processor = bool(checkpoint_processor)
        self.num_data_nodes, self.num_mesh_nodes = graph.num_data_nodes, graph.num_mesh_nodes

        buffers = {
            "data_node_features": graph.data_node_features.float(),
            "mesh_node_features": graph.mesh_node_features.float(),
            "encoder_edges": graph.encoder_edges.long(),
            "encoder_edge_attr": _normalised_edge_features(graph.encoder_edge_features.float()),
            "mesh_edges": graph.mesh_edges.long(),
            "mesh_edge_attr": _normalised_edge_features(graph.mesh_edge_features.float()),
            "decoder_edges": graph.decoder_edges.long(),
            "decoder_edge_attr": _normalised_edge_features(graph.decoder_edge_features.float()),
        }
        for name, tensor in buffers.items():
            self.register_buffer(name, tensor, persistent=False)

        widths = [hidden] * mlp_hidden_layers

        def latent_mlp(n_in: int) -> MLP:
            return MLP(n_in, hidden, hidden=widths, layer_norm=True)

        n_node_features = graph.data_node_features.shape[1]
        n_edge_features = graph.mesh_edge_features.shape[1]
        self.data_embed = latent_mlp(n_input + n_node_features)
        self.mesh_embed = latent_mlp(graph.mesh_node_features.shape[1])
        self.encoder_edge_embed = latent_mlp(graph.encoder_edge_features.shape[1])
        self.mesh_edge_embed = latent_mlp(n_edge_features)
        self.decoder_edge_embed = latent_mlp(graph.decoder_edge_features.shape[1])
        self.encoder = InteractionNetwork(hidden, mlp_hidden_layers=mlp_hidden_layers, aggregation=encoder_aggregation)
        # GraphCast also updates the data-node latents after the encoder (they send nothing more there).
        self.data_update = latent_mlp(hidden)
        self.noise_embed = (
            MLP(noise_channels, hidden, hidden=widths, layer_norm=False) if noise_channels > 0 else None
        )
        self.processor = nn.ModuleList(
            InteractionNetwork(
                hidden, mlp_hidden_layers=mlp_hidden_layers, condition_channels=hidden if noise_channels else 0
            )
            for _ in range(processor_layers)
        )
        self.decoder = InteractionNetwork(hidden, mlp_hidden_layers=mlp_hidden_layers)
        self.output = MLP(hidden, n_output, hidden=widths, layer_norm=False)

    def _check_inputs(self, x: Tensor, noise: Tensor | None) -> None:
        expected = ("batch", self.num_data_nodes, self.n_input)
        if x.ndim != 3 or x.shape[1] != self.num_data_nodes or x.shape[2] != self.n_input:
            raise SchemaError(
                f"EncodeProcessDecode input x must have shape (batch, data_node, channel) = {expected}; "
                f"found {tuple(x.shape)}"
            )
        if self.noise_channels == 0:
            if noise is not None:
                raise SchemaError(
                    "EncodeProcessDecode was built deterministic (noise_channels=0) but got noise of shape "
                    f"{tuple(noise.shape)}"
                )
            return
        wanted = (x.shape[0], self.num_mesh_nodes, self.noise_channels)
        if noise is None:
            raise SchemaError(f"EncodeProcessDecode is probabilistic: noise of shape {wanted} is required; found None")
        if tuple(noise.shape) != wanted:
            raise SchemaError(
                f"EncodeProcessDecode noise must have shape (batch, mesh_node, noise_channel) = {wanted}; "
                f"found {tuple(noise.shape)}"
            )

    def forward(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        """Map per-node inputs to per-node outputs.

        Args:
            x: Shape (B, N_data, n_input), normalised inputs, data nodes in the graph's order.
            noise: Shape (B, N_mesh, noise_channels) in probabilistic mode (e.g. standard normal, one draw per
                member); None for a deterministic model.

        Returns:
            Shape (B, N_data, n_output), the raw output (the caller adds it to the last input state).

        Raises:
            SchemaError: ``x`` or ``noise`` has the wrong shape, or noise is given to (or missing from) a model
                built without (with) ``noise_channels``.
        """
        self._check_inputs(x, noise)
        batch = x.shape[0]
        static = self.data_node_features.to(x.dtype).unsqueeze(0).expand(batch, -1, -1)
        h_data = self.data_embed(torch.cat([x, static], dim=-1))  # (B, Nd, H)
        h_mesh = self.mesh_embed(self.mesh_node_features).unsqueeze(0).expand(batch, -1, -1)  # (B, Nm, H)

        e_encoder = self.encoder_edge_embed(self.encoder_edge_attr).unsqueeze(0)  # (1, Ee, H)
        h_mesh, _ = self.encoder(h_data, h_mesh, e_encoder, self.encoder_edges)
        h_data = h_data + self.data_update(h_data)

        condition = self.noise_embed(noise) if self.noise_embed is not None else None  # (B, Nm, H) or None
        e_mesh = self.mesh_edge_embed(self.mesh_edge_attr).unsqueeze(0)  # (1, Em, H), (B, Em, H) after a layer
        recompute = self.checkpoint_processor and torch.is_grad_enabled()
        for layer in self.processor:
            if recompute:
                h_mesh, e_mesh = checkpoint(
                    layer, h_mesh, h_mesh, e_mesh, self.mesh_edges, condition, use_reentrant=False
                )
            else:
                h_mesh, e_mesh = layer(h_mesh, h_mesh, e_mesh, self.mesh_edges, condition)

        e_decoder = self.decoder_edge_embed(self.decoder_edge_attr).unsqueeze(0)  # (1, Ed, H)
        h_data, _ = self.decoder(h_mesh, h_data, e_decoder, self.decoder_edges)
        return self.output(h_data)  # (B, Nd, n_output)
