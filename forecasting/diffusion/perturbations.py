"""Perturbed initial states for the one-grid diffusion families: a second source of ensemble spread.

An ensemble whose members all start from the same analysis gets its spread from the model alone (the sampler's
noise, dropout). Operational ensembles also perturb the initial state, since the analysis is uncertain; ML
ensembles have done so with Gaussian noise (FourCastNet, Pathak et al. 2022), spatially smooth noise (Perlin noise
in Pangu-Weather's ensemble, Bi et al. 2023) or bred vectors (the huge SFNO ensembles of Mahesh et al. 2024). Here each
member adds to its normalised input states a Gaussian random field: white noise smoothed by a Gaussian of
``length`` grid cells (circular in longitude on a global grid), rescaled to unit variance per field, times
``amplitude`` times the channel's 6-hour tendency standard deviation. The same field goes to every input time, so
the input tendencies are not disturbed. ``length`` is in grid cells, not kilometres: on a latitude-longitude
grid the fields are more correlated in distance towards the poles. An optional map (C, H, W) multiplies the
fields point by point, so that the amplitude can follow the local variability (:func:`change_std_map`).

Torch only, normalised tensors in and out; no file I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def smooth_noise(shape: Sequence[int], generators: Sequence[torch.Generator], *, length: float,
                 periodic_lon: bool, device: torch.device | str = "cpu") -> Tensor:
    """Gaussian random fields of unit variance, (N, C, H, W), sample ``n`` drawn from ``generators[n]``.

    White noise convolved with a Gaussian of standard deviation ``length`` grid cells along latitude and
    longitude (circular padding in longitude when ``periodic_lon``, edge values repeated otherwise), then
    divided by each field's spatial standard deviation.
    """
    n, c, h, w = shape
    if len(generators) != n:
        raise ValueError(f"smooth_noise needs one generator per sample: {len(generators)} for {n} samples")
    if not length > 0:
        raise ValueError(f"the perturbation length must be positive (grid cells); found {length}")
    noise = torch.stack([torch.randn((c, h, w), generator=g, device=device) for g in generators])
    radius = max(1, math.ceil(3 * length))
    x = torch.arange(-radius, radius + 1, dtype=noise.dtype, device=noise.device)
    kernel = torch.exp(-0.5 * (x / length) ** 2)
    kernel = kernel / kernel.sum()
    fields = noise.reshape(n * c, 1, h, w)
    lon_radius = min(radius, w - 1) if periodic_lon else radius
    fields = F.pad(fields, (lon_radius, lon_radius, 0, 0), mode="circular" if periodic_lon else "replicate")
    fields = F.conv2d(fields, kernel[radius - lon_radius : radius + lon_radius + 1].view(1, 1, 1, -1))
    fields = F.pad(fields, (0, 0, radius, radius), mode="replicate")
    fields = F.conv2d(fields, kernel.view(1, 1, -1, 1)).reshape(n, c, h, w)
    return fields / fields.std(dim=(-2, -1), keepdim=True).clamp_min(1e-12)


def change_std_map(std: np.ndarray, latitude: np.ndarray, *, power: float = 1.0) -> np.ndarray:
    """A perturbation map (C, H, W) from per-point standard deviations ``std`` (C, H, W) of a change: ``std **
    power`` divided by its area-weighted (cos latitude) root-mean-square per channel, so a field multiplied by
    it keeps its mean amplitude. Raises ValueError for a channel whose deviations are all zero or not finite."""
    std = np.asarray(std, dtype=np.float64)
    if std.ndim != 3 or std.shape[1] != len(latitude):
        raise ValueError(f"std must have shape (C, {len(latitude)}, W); found {std.shape}")
    weights = np.cos(np.deg2rad(np.asarray(latitude, dtype=np.float64)))[:, None]
    scaled = std**power
    rms = np.sqrt((scaled**2 * weights).sum(axis=(1, 2)) / (weights.sum() * std.shape[2]))
    bad = [c for c in range(std.shape[0]) if not np.isfinite(scaled[c]).all() or not rms[c] > 0]
    if bad:
        raise ValueError(f"channels {bad} have no finite, nonzero change deviations to make a perturbation map of")
    return scaled / rms[:, None, None]


def perturb_initial_states(states: Tensor, generators: Sequence[torch.Generator], *, amplitude: float,
                           length: float, tendency_scale: Tensor, periodic_lon: bool,
                           spatial_scale: Tensor | None = None) -> Tensor:
    """``states`` (N, T_in, C, H, W), normalised, plus one smooth field per sample (:func:`smooth_noise`) of
    standard deviation ``amplitude * tendency_scale`` per channel (``tendency_scale``, (C,), is the 6-hour
    tendency std over the std: the normalised size of one step's change), the same at every input time;
    ``spatial_scale`` (C, H, W), when given, multiplies each field point by point."""
    if amplitude < 0:
        raise ValueError(f"the perturbation amplitude must not be negative; found {amplitude}")
    if amplitude == 0:
        return states
    n, _, c, h, w = states.shape
    fields = smooth_noise((n, c, h, w), generators, length=length, periodic_lon=periodic_lon, device=states.device)
    scale = amplitude * tendency_scale.to(states.device, states.dtype)[None, :, None, None]
    if spatial_scale is not None:
        if tuple(spatial_scale.shape) != (c, h, w):
            raise ValueError(f"spatial_scale must have shape {(c, h, w)}; found {tuple(spatial_scale.shape)}")
        scale = scale * spatial_scale.to(states.device, states.dtype)[None]
    return states + (fields * scale)[:, None]
