"""Building blocks of the graph forecaster: MLPs, conditional layer norm and the interaction network.

The interaction network follows GraphCast (Lam et al. 2023, "Learning skillful medium-range global weather
forecasting", supplement 3.4) and the AIFS encoder-processor-decoder (Lang et al. 2024; Nipen et al. for
the stretched grid): for an edge set from sender nodes to receiver nodes,

    e'_k = e_k + MLP_e([e_k, h_src[s_k], h_dst[r_k]])            (edge update)
    h'_i = h_i + MLP_n([h_i, sum_{k: r_k = i} e'_k])              (node update, sum aggregation)

or, with ``aggregation="mean"``, the sum divided by the receiver's number of incoming edges. Sums are
GraphCast's choice, where every receiver has about the same number of senders. On a stretched grid whose
mesh is not refined over the fine grid, the mesh nodes there receive an order of magnitude more encoder
edges than the rest (they read dozens of fine points where other mesh nodes read a few coarse ones), so
their summed messages differ in scale from every other node's; a mean keeps one scale for all (the AIFS
encoder, a graph transformer, normalises its messages by attention weights, which also sum to one).

Conventions: node latents are ``(B, N, H)`` (batch, node, feature); edge latents ``(B, E, H)`` or ``(1, E, H)``
when they are the same for every sample (embedded static edge features); edges are ``(2, E)`` integer
tensors, row 0 the sender index, row 1 the receiver index. Nothing here loops over nodes or edges in Python
or depends on edge values for shapes, so the modules run under ``torch.compile`` and bf16 autocast.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["MLP", "ConditionalLayerNorm", "InteractionNetwork"]


class MLP(nn.Module):
    """``Linear -> SiLU -> ... -> Linear``, optionally followed by a LayerNorm over the last dim.

    Args:
        in_features: Width of the input (last dim).
        out_features: Width of the output.
        hidden: Widths of the hidden layers, in order; empty gives a single Linear.
        layer_norm: Append ``LayerNorm(out_features)`` (GraphCast normalises every latent MLP output).

    Shape: ``(..., in_features) -> (..., out_features)``.
    """

    def __init__(self, in_features: int, out_features: int, *, hidden: Sequence[int], layer_norm: bool) -> None:
        super().__init__()
        widths = [in_features, *hidden, out_features]
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            if i > 0:
                layers.append(nn.SiLU())
            layers.append(nn.Linear(n_in, n_out))
        if layer_norm:
            layers.append(nn.LayerNorm(out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ConditionalLayerNorm(nn.Module):
    """LayerNorm whose scale and shift are predicted from a per-node condition (AIFS-CRPS, GenCast).

    ``y = LN(x) * (1 + scale(c)) + shift(c)`` with ``(scale, shift) = Linear(c)``, LN without affine
    parameters. The Linear's bias starts at zero, so the mean modulation is the identity; its weights keep
    PyTorch's default initialisation, so different conditions give different outputs from the first step.

    Shapes: x ``(B, N, features)``, condition ``(B, N, condition_channels)`` -> ``(B, N, features)``.
    """

    def __init__(self, features: int, condition_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(features, elementwise_affine=False)
        self.modulation = nn.Linear(condition_channels, 2 * features)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: Tensor, condition: Tensor) -> Tensor:
        scale, shift = self.modulation(condition).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class InteractionNetwork(nn.Module):
    """One GraphCast-style message-passing step from sender nodes to receiver nodes (see the module docstring).

    The first Linear of the edge MLP acts on ``[e, h_src[s], h_dst[r]]``; it is computed as
    ``W_e e + (W_s h_src)[s] + (W_d h_dst)[r]``: the node parts are projected once per node and then
    gathered, so the only per-edge matmuls are ``W_e e`` and the later layers. Messages are summed into the
    receivers with ``index_add_`` (a receiver without edges gets a zero sum).

    Args:
        hidden: Width H of node and edge latents.
        mlp_hidden_layers: Hidden layers (of width H) in the edge and node MLPs; >= 1.
        condition_channels: When > 0 the node MLP ends in a :class:`ConditionalLayerNorm` driven by a
            per-receiver condition of this width (the noise of a probabilistic model); otherwise in a plain
            LayerNorm.
        aggregation: ``"sum"`` (GraphCast) or ``"mean"`` of the incoming messages (a receiver without edges
            gets zeros either way).
    """

    def __init__(
        self, hidden: int, *, mlp_hidden_layers: int = 1, condition_channels: int = 0,
        aggregation: Literal["sum", "mean"] = "sum",
    ) -> None:
        super().__init__()
        if aggregation not in ("sum", "mean"):
            raise ValueError(f"InteractionNetwork aggregation must be 'sum' or 'mean'; found {aggregation!r}")
        self.aggregation = aggregation
        if mlp_hidden_layers < 1:
            raise ValueError(f"InteractionNetwork needs mlp_hidden_layers >= 1; found {mlp_hidden_layers}")
        if condition_channels < 0:
            raise ValueError(f"InteractionNetwork needs condition_channels >= 0; found {condition_channels}")
        self.edge_proj = nn.Linear(hidden, hidden)
        self.src_proj = nn.Linear(hidden, hidden, bias=False)
        self.dst_proj = nn.Linear(hidden, hidden, bias=False)
        # The rest of the edge MLP after its (split) first Linear.
        self.edge_rest = nn.Sequential(
            nn.SiLU(), MLP(hidden, hidden, hidden=[hidden] * (mlp_hidden_layers - 1), layer_norm=True)
        )
        self.node_mlp = MLP(2 * hidden, hidden, hidden=[hidden] * mlp_hidden_layers, layer_norm=condition_channels == 0)
        self.node_norm = ConditionalLayerNorm(hidden, condition_channels) if condition_channels > 0 else None

    def forward(
        self, h_src: Tensor, h_dst: Tensor, e: Tensor, edges: Tensor, condition: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Update receiver nodes and edges.

        Args:
            h_src: Shape (B, Ns, H), sender latents (may be the same tensor as ``h_dst``).
            h_dst: Shape (B, Nd, H), receiver latents.
            e: Shape (B, E, H) or (1, E, H), edge latents.
            edges: Shape (2, E) integer, row 0 indexes ``h_src``, row 1 ``h_dst``.
            condition: Shape (B, Nd, C) per-receiver condition; required iff ``condition_channels > 0``.

        Returns:
            ``(h_dst_new, e_new)`` of shapes (B, Nd, H) and (B, E, H).
        """
        if (condition is None) != (self.node_norm is None):
            raise ValueError(
                "InteractionNetwork condition must be given exactly when condition_channels > 0; found "
                f"condition={'None' if condition is None else tuple(condition.shape)}, "
                f"conditional={self.node_norm is not None}"
            )
        sender, receiver = edges[0], edges[1]
        pre = (
            self.edge_proj(e)
            + self.src_proj(h_src).index_select(1, sender)
            + self.dst_proj(h_dst).index_select(1, receiver)
        )  # (B, E, H)
        e_new = e + self.edge_rest(pre)  # (B, E, H)
        batch, n_dst = e_new.shape[0], h_dst.shape[1]
        aggregated = e_new.new_zeros((batch, n_dst, e_new.shape[2])).index_add_(1, receiver, e_new)  # (B, Nd, H)
        if self.aggregation == "mean":
            counts = e_new.new_zeros((n_dst,)).index_add_(0, receiver, e_new.new_ones(receiver.shape))  # (Nd,)
            aggregated = aggregated / counts.clamp(min=1).unsqueeze(-1)
        update = self.node_mlp(torch.cat([h_dst.expand(batch, -1, -1), aggregated.to(h_dst.dtype)], dim=-1))
        if self.node_norm is not None:
            update = self.node_norm(update, condition)
        return h_dst + update, e_new
