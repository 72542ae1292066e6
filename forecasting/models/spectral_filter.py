"""Scale-selective damping (hyperdiffusion) of fields on a global latitude-longitude grid.

A learned forecaster rolled out autoregressively adds a little small-scale error at every step, and nothing
takes it away again: over a few days the power at the grid's smallest scales piles up far above the truth's
(the README's spectra). Numerical weather prediction models meet the same problem with scale-selective
diffusion, and learned emulators have borrowed it (Chattopadhyay & Hassanzadeh 2023, "Long-term instability of
deep learning-based digital twins of the climate system: the cause and a solution", arXiv 2304.07029, who
low-pass filter every step of the rollout). :class:`SpectralFilter` is implicit hyperdiffusion of order ``p``
over a time ``dt``, in spherical harmonics: the coefficient of total degree ``l`` is multiplied by

    f(l) = exp(-(dt / tau) (l (l + 1) / (L (L + 1)))^p)

with ``L`` the largest degree the grid's transform resolves and ``tau`` the e-folding time at ``L``. It is
isotropic on the sphere (it depends on ``l`` only), leaves the global mean alone (``f(0) = 1``) and barely
touches the large scales for ``p >= 2``. The transform is torch-harmonics' ``RealSHT`` / ``InverseRealSHT``
on Gauss-Legendre nodes, which the grid's equally spaced latitudes approximate (a smooth field round-trips to
about 1e-5 of its range); whatever a field holds beyond the transform's reach (grid-scale content the
triangular truncation does not represent) is damped at the rate of ``L``:

    D(x) = f(L) x + ISHT((f(l) - f(L)) SHT(x))

so a field the transform represents gets exactly ``f(l)``, and none is amplified.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torch_harmonics import InverseRealSHT, RealSHT


class SpectralFilter(nn.Module):
    """Implicit hyperdiffusion of order ``order`` with e-folding time ``e_folding_steps`` (in steps) at the
    grid's largest resolved degree (see the module docstring).

    Args:
        n_lat, n_lon: The global grid's size (latitudes from pole to pole, longitudes round the globe).
        e_folding_steps: ``tau / dt`` for one step: the number of steps over which the largest resolved degree
            decays by ``e``. Positive.
        order: ``p``, at least 1 (4: scale-selective, as the built-in simulator's own hyperdiffusion).

    ``forward(x, steps=1.0)`` damps fields ``x`` of shape (..., n_lat, n_lon) over ``steps`` steps.
    """

    def __init__(self, n_lat: int, n_lon: int, *, e_folding_steps: float, order: int = 4) -> None:
        super().__init__()
        if not e_folding_steps > 0 or order < 1:
            raise ValueError(f"need e_folding_steps > 0 and order >= 1; found {e_folding_steps}, {order}")
        if n_lat < 4 or n_lon < 8:
            raise ValueError(f"the grid is too small for a spherical-harmonic filter: {n_lat} x {n_lon}")
        self.sht = RealSHT(n_lat, n_lon, grid="legendre-gauss")
        self.isht = InverseRealSHT(n_lat, n_lon, grid="legendre-gauss")
        degrees = np.arange(self.sht.lmax, dtype=np.float64)
        largest = degrees[-1]
        rate = (degrees * (degrees + 1) / (largest * (largest + 1))) ** order / e_folding_steps
        self.register_buffer("rate", torch.as_tensor(rate, dtype=torch.float32), persistent=False)  # (lmax,)

    def gain(self, steps: float = 1.0) -> Tensor:
        """``f(l)`` over ``steps`` steps for ``l = 0 .. L``: (L + 1,)."""
        return torch.exp(-float(steps) * self.rate)

    def forward(self, x: Tensor, steps: float = 1.0) -> Tensor:
        if steps == 0:
            return x
        gain = self.gain(steps)
        floor = gain[-1]
        coefficients = self.sht(x.float())  # (..., lmax, mmax), complex
        damped = self.isht(coefficients * (gain - floor).to(coefficients.dtype)[:, None])
        return (floor * x.float() + damped).to(x.dtype)
