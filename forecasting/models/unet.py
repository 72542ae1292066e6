"""A U-Net on latitude-longitude grids, conditioned on scalars (noise level, lead time) by FiLM.

The backbone of the grid diffusion models (the EDM network ``F``; Karras et al. 2022 use the DDPM++/ADM
U-Nets of Song et al. 2021 and Dhariwal & Nichol 2021, whose residual blocks with group norm, SiLU and
an embedding-driven scale and shift this follows; FiLM: Perez et al. 2018, "FiLM: Visual Reasoning with a
General Conditioning Layer").

Grid conventions: fields are ``(B, C, H, W)`` with H latitude (ascending) and W longitude. Every spatial
padding, the input's and every 3x3 convolution's, is *circular in longitude* on a global grid
(``periodic_lon``: the last column neighbours the first) and *replicate* elsewhere (in latitude always, at
the poles and the edges of a regional box; in longitude too on a regional grid). Any H, W works: the input
is padded to a multiple of ``2 ** (levels - 1)`` (split evenly between both sides) and the output cropped
back. With W a multiple of that factor a global model is exactly equivariant to rolling the input by any
multiple of it in longitude (average pooling and nearest upsampling keep that symmetry).

Conditioning: each scalar condition (``"noise"``: the EDM ``c_noise``; ``"lead_time"``: hours) is
embedded with sinusoidal features at log-spaced periods suited to its range, passed through an MLP, and
the sum of the conditions' embeddings sets a per-channel scale and shift inside every residual block:
``h = GroupNorm(h) * (1 + scale) + shift``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CONDITION_PERIODS", "UNet"]

#: Shortest and longest period of the sinusoidal features of each condition, in its units (``noise``:
#: ``c_noise = ln(sigma) / 4``, about -1.6 .. 1.1 for sigma in 0.002 .. 80; ``lead_time``: hours).
CONDITION_PERIODS: dict[str, tuple[float, float]] = {"noise": (0.05, 20.0), "lead_time": (1.0, 2000.0)}


def _pad(x: Tensor, *, top: int, bottom: int, left: int, right: int, periodic_lon: bool) -> Tensor:
    """Pad (B, C, H, W): longitude circular (``periodic_lon``) or replicate, latitude replicate."""
    if (left or right) and periodic_lon:
        # Indexing rather than F.pad(mode="circular"), which refuses to wrap more than once (W < padding).
        columns = torch.arange(-left, x.shape[-1] + right, device=x.device) % x.shape[-1]
        x = x.index_select(-1, columns)
    elif left or right:
        x = F.pad(x, (left, right, 0, 0), mode="replicate")
    if top or bottom:
        x = F.pad(x, (0, 0, top, bottom), mode="replicate")
    return x


def _groups(channels: int) -> int:
    """Group-norm groups: up to 32, dividing ``channels``."""
    return math.gcd(channels, 32)


class GridConv(nn.Module):
    """A 3x3 convolution with the grid's padding (circular in longitude when ``periodic_lon``)."""

    def __init__(self, in_channels: int, out_channels: int, *, periodic_lon: bool) -> None:
        super().__init__()
        self.periodic_lon = periodic_lon
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(_pad(x, top=1, bottom=1, left=1, right=1, periodic_lon=self.periodic_lon))


class ScalarEmbedding(nn.Module):
    """Sinusoidal features of a scalar per sample at log-spaced periods, then an MLP: (B,) -> (B, dim)."""

    def __init__(self, dim: int, *, periods: tuple[float, float]) -> None:
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"embedding_dim must be even and >= 2; found {dim}")
        shortest, longest = periods
        frequencies = 2 * math.pi / torch.logspace(math.log10(longest), math.log10(shortest), dim // 2, dtype=torch.float64)
        self.register_buffer("frequencies", frequencies.float(), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, value: Tensor) -> Tensor:
        phase = value.float()[:, None] * self.frequencies[None, :]  # (B, dim / 2)
        return self.mlp(torch.cat([phase.cos(), phase.sin()], dim=-1))


class ResidualBlock(nn.Module):
    """GroupNorm -> SiLU -> conv -> GroupNorm with FiLM from the embedding -> SiLU -> dropout -> conv, plus skip."""

    def __init__(self, in_channels: int, out_channels: int, *, embedding_dim: int, dropout: float, periodic_lon: bool) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_channels), in_channels)
        self.conv1 = GridConv(in_channels, out_channels, periodic_lon=periodic_lon)
        self.film = nn.Linear(embedding_dim, 2 * out_channels)
        self.norm2 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.conv2 = GridConv(out_channels, out_channels, periodic_lon=periodic_lon)
        self.dropout = dropout
        self.skip = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, embedding: Tensor, *, dropout_active: bool,
                generators: Sequence[torch.Generator] | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(embedding)[:, :, None, None].chunk(2, dim=1)  # (B, C_out, 1, 1) each
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        if generators is not None and dropout_active and self.dropout > 0:
            h = h * _dropout_mask(h, self.dropout, generators)
        else:
            h = F.dropout(h, p=self.dropout, training=dropout_active)
        return self.skip(x) + self.conv2(h)


def _dropout_mask(h: Tensor, p: float, generators: Sequence[torch.Generator]) -> Tensor:
    """Inverted-dropout mask of ``h`` (B, ...), sample ``b`` drawn from ``generators[b]`` alone, so a sample's
    mask does not depend on the other samples of its batch."""
    if len(generators) != h.shape[0]:
        raise ValueError(f"one dropout generator per sample is needed: {h.shape[0]} samples, {len(generators)} generators")
    keep = torch.stack([torch.rand(h.shape[1:], generator=g, device=h.device) >= p for g in generators])
    return keep.to(h.dtype) / (1.0 - p)


class UNet(nn.Module):
    """U-Net on a latitude-longitude grid (see the module docstring).

    Args:
        in_channels, out_channels: Channels of the input and the output.
        base_channels: Width of the first level; level ``i`` has ``base_channels * channel_mult[i]``.
        channel_mult: One multiplier per resolution level (``levels = len(channel_mult)``; each level below the
            first halves H and W).
        blocks_per_level: Residual blocks per level on the way down (one more on the way up, taking the skip).
        embedding_dim: Width of the condition embeddings (even).
        conditions: Scalar conditions the network takes, from :data:`CONDITION_PERIODS`; empty: none.
        dropout: Dropout probability inside the residual blocks (active in training mode, and at inference
            when :attr:`dropout_at_inference` is set, e.g. for DYffusion's stochastic interpolator).
        periodic_lon: Global grid (circular padding in longitude); False for a regional grid.

    Shape: ``x`` (B, in_channels, H, W) -> (B, out_channels, H, W), float32, any H and W.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        base_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2, 2),
        blocks_per_level: int = 1,
        embedding_dim: int = 64,
        conditions: Sequence[str] = ("noise", "lead_time"),
        dropout: float = 0.0,
        periodic_lon: bool = True,
    ) -> None:
        super().__init__()
        unknown = [c for c in conditions if c not in CONDITION_PERIODS]
        if unknown or len(set(conditions)) != len(conditions):
            raise ValueError(f"conditions must be distinct names from {sorted(CONDITION_PERIODS)}; found {list(conditions)}")
        if in_channels < 1 or out_channels < 1 or base_channels < 1 or blocks_per_level < 1 or not channel_mult:
            raise ValueError(
                "UNet needs in_channels, out_channels, base_channels, blocks_per_level >= 1 and at least one "
                f"channel_mult; found {in_channels}, {out_channels}, {base_channels}, {blocks_per_level}, {list(channel_mult)}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); found {dropout}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.conditions = tuple(conditions)
        self.periodic_lon = periodic_lon
        self.levels = len(channel_mult)
        self.dropout_at_inference = False
        self.embeddings = nn.ModuleDict({
            name: ScalarEmbedding(embedding_dim, periods=CONDITION_PERIODS[name]) for name in self.conditions
        })
        widths = [base_channels * int(m) for m in channel_mult]
        block = {"embedding_dim": embedding_dim, "dropout": dropout, "periodic_lon": periodic_lon}

        self.stem = GridConv(in_channels, widths[0], periodic_lon=periodic_lon)
        self.down = nn.ModuleList()
        channels, skips = widths[0], []
        for width in widths:
            blocks = nn.ModuleList()
            for _ in range(blocks_per_level):
                blocks.append(ResidualBlock(channels, width, **block))
                channels = width
            self.down.append(blocks)
            skips.append(channels)
        self.middle = nn.ModuleList([ResidualBlock(channels, channels, **block) for _ in range(2)])
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level in reversed(range(self.levels)):
            width = widths[level]
            blocks = nn.ModuleList([ResidualBlock(channels + skips[level], width, **block)])
            channels = width
            blocks.extend(ResidualBlock(channels, width, **block) for _ in range(blocks_per_level))
            self.up.append(blocks)
            if level > 0:
                self.upsample.append(GridConv(channels, widths[level - 1], periodic_lon=periodic_lon))
                channels = widths[level - 1]
        self.out_norm = nn.GroupNorm(_groups(channels), channels)
        self.out_conv = GridConv(channels, out_channels, periodic_lon=periodic_lon)
        self.embedding_dim = embedding_dim

    def forward(self, x: Tensor, *, noise: Tensor | None = None, lead_time: Tensor | None = None,
                generators: Sequence[torch.Generator] | None = None) -> Tensor:
        """``x`` (B, in_channels, H, W); ``noise`` (B,) ``c_noise`` values, ``lead_time`` (B,) hours, each required
        when listed in ``conditions`` and refused otherwise. ``generators``: one per sample, for active dropout
        whose masks must not depend on the batch (else torch's global generator). Returns (B, out_channels, H, W)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet input must have shape (B, {self.in_channels}, H, W); found {tuple(x.shape)}")
        batch, _, height, width = x.shape
        embedding = x.new_zeros((batch, self.embedding_dim), dtype=torch.float32)
        for name, value in (("noise", noise), ("lead_time", lead_time)):
            if (value is not None) != (name in self.conditions):
                raise ValueError(
                    f"UNet conditions are {list(self.conditions)}: {name!r} must be "
                    f"{'given' if name in self.conditions else 'None'}"
                )
            if value is not None:
                value = torch.as_tensor(value, device=x.device)
                if value.shape != (batch,):
                    raise ValueError(f"condition {name!r} must have shape ({batch},); found {tuple(value.shape)}")
                embedding = embedding + self.embeddings[name](value)
        embedding = F.silu(embedding).to(x.dtype)

        factor = 2 ** (self.levels - 1)
        pad_h, pad_w = -height % factor, -width % factor
        h = _pad(
            x, top=pad_h // 2, bottom=pad_h - pad_h // 2, left=pad_w // 2, right=pad_w - pad_w // 2,
            periodic_lon=self.periodic_lon,
        )
        active = self.training or self.dropout_at_inference
        h = self.stem(h)
        skips = []
        for level, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, embedding, dropout_active=active, generators=generators)
            skips.append(h)
            if level < self.levels - 1:
                h = F.avg_pool2d(h, 2)
        for block in self.middle:
            h = block(h, embedding, dropout_active=active, generators=generators)
        for i, blocks in enumerate(self.up):
            h = torch.cat([h, skips.pop()], dim=1)
            for block in blocks:
                h = block(h, embedding, dropout_active=active, generators=generators)
            if i < self.levels - 1:
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.out_conv(F.silu(self.out_norm(h)))
        top, left = pad_h // 2, pad_w // 2
        return h[:, :, top : top + height, left : left + width]
