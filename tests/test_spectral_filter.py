"""forecasting.models.spectral_filter: spherical-harmonic hyperdiffusion damps each degree by its analytic
factor, leaves the mean and the large scales alone, never amplifies, and composes over steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from forecasting.models import SpectralFilter

N_LAT, N_LON = 32, 64  # the built-in coarse grid


def _harmonic(filt: SpectralFilter, degree: int, order: int) -> torch.Tensor:
    """The real field of one spherical-harmonic coefficient (degree, order) on the filter's grid."""
    coefficients = torch.zeros(1, filt.sht.lmax, filt.sht.mmax, dtype=torch.complex64)
    coefficients[0, degree, order] = 1.0
    return filt.isht(coefficients)


@pytest.mark.parametrize(("tau", "p"), [(1.0, 4), (3.0, 2)])
def test_each_degree_is_damped_by_the_hyperdiffusion_factor(tau, p):
    filt = SpectralFilter(N_LAT, N_LON, e_folding_steps=tau, order=p)
    largest = filt.sht.lmax - 1
    for degree, order in [(0, 0), (3, 1), (12, 5), (20, 3), (largest, 2)]:
        x = _harmonic(filt, degree, order)
        want = np.exp(-((degree * (degree + 1) / (largest * (largest + 1))) ** p) / tau)
        y = filt(x)
        np.testing.assert_allclose(y.numpy(), want * x.numpy(), atol=2e-5 * float(x.abs().max()))
    # the largest degree decays by e in tau steps
    assert float(filt.gain(tau)[-1]) == pytest.approx(np.exp(-1.0), rel=1e-6)


def test_mean_and_large_scales_are_kept_and_nothing_is_amplified():
    filt = SpectralFilter(N_LAT, N_LON, e_folding_steps=1.0)
    constant = torch.full((N_LAT, N_LON), 5.0)
    torch.testing.assert_close(filt(constant), constant, atol=1e-4, rtol=0)
    smooth = 3 * _harmonic(filt, 2, 1) + _harmonic(filt, 5, 4)
    torch.testing.assert_close(filt(smooth), smooth, atol=1e-3 * float(smooth.abs().max()), rtol=0)
    noise = torch.randn(200, N_LAT, N_LON, generator=torch.Generator().manual_seed(0))
    damped = filt(noise)
    power_before = filt.sht(noise).abs().square().mean(dim=0)
    power_after = filt.sht(damped).abs().square().mean(dim=0)
    assert bool((power_after <= power_before * (1 + 1e-4) + 1e-8).all())
    # grid-scale content the transform does not represent is damped at the rate of the largest degree
    unresolved = noise - filt.isht(filt.sht(noise))
    assert float(filt(unresolved).square().mean()) < 0.5 * float(unresolved.square().mean())
    assert float(damped.var()) < 0.6 * float(noise.var())


def test_steps_compose_and_zero_steps_is_the_identity():
    filt = SpectralFilter(N_LAT, N_LON, e_folding_steps=2.0)
    x = torch.randn(3, 2, N_LAT, N_LON, generator=torch.Generator().manual_seed(1))  # any leading dims
    torch.testing.assert_close(filt(filt(x)), filt(x, steps=2), atol=2e-4, rtol=0)
    assert filt(x, steps=0) is x
    assert filt(x).shape == x.shape and filt(x.double()).dtype == torch.float64


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="e_folding_steps > 0"):
        SpectralFilter(N_LAT, N_LON, e_folding_steps=0.0)
    with pytest.raises(ValueError, match="order >= 1"):
        SpectralFilter(N_LAT, N_LON, e_folding_steps=1.0, order=0)
    with pytest.raises(ValueError, match="too small"):
        SpectralFilter(2, 4, e_folding_steps=1.0)
