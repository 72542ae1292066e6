"""forecasting.diffusion.perturbations: smooth Gaussian random fields of unit variance, reproducible per sample,
correlated over the requested length, continuous across the date line on a global grid; initial states
perturbed by the same field at every input time, scaled by each channel's tendency std."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from forecasting.diffusion.perturbations import change_std_map, perturb_initial_states, smooth_noise


def _generators(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + k) for k in range(n)]


def _lag_correlation(fields: torch.Tensor, dim: int, lag: int = 1) -> float:
    a = fields - fields.mean(dim=(-2, -1), keepdim=True)
    b = torch.roll(a, shifts=lag, dims=dim)
    return float((a * b).mean() / (a * a).mean())


def test_fields_have_unit_variance_and_the_requested_smoothness():
    fields = smooth_noise((4, 2, 32, 64), _generators(4), length=3.0, periodic_lon=True)
    assert fields.shape == (4, 2, 32, 64)
    torch.testing.assert_close(fields.std(dim=(-2, -1)), torch.ones(4, 2), atol=1e-5, rtol=0)
    # a Gaussian kernel of std L gives a field correlation exp(-d^2 / (4 L^2)): 0.97 at one cell, 0.33 at 6
    assert _lag_correlation(fields, dim=-1, lag=1) > 0.9
    assert _lag_correlation(fields, dim=-1, lag=6) < 0.6
    white = smooth_noise((4, 2, 32, 64), _generators(4), length=0.3, periodic_lon=True)
    assert abs(_lag_correlation(white, dim=-1, lag=1)) < 0.2


def test_fields_repeat_per_generator_whatever_the_batch():
    both = smooth_noise((2, 3, 16, 32), _generators(2, seed=5), length=2.0, periodic_lon=True)
    second = smooth_noise((1, 3, 16, 32), _generators(1, seed=6), length=2.0, periodic_lon=True)
    torch.testing.assert_close(both[1:], second)
    assert not torch.allclose(both[0], both[1])


def test_global_fields_are_continuous_across_the_date_line():
    periodic = smooth_noise((8, 1, 16, 32), _generators(8), length=3.0, periodic_lon=True)
    # the jump between the last and first longitude is like any neighbour's
    wrap = (periodic[..., 0] - periodic[..., -1]).pow(2).mean()
    inner = (periodic[..., 1:] - periodic[..., :-1]).pow(2).mean()
    assert wrap < 2 * inner


def test_perturbation_is_the_same_at_every_input_time_and_scales_with_the_tendency_std():
    states = torch.randn(3, 2, 2, 16, 32, generator=torch.Generator().manual_seed(1))
    scale = torch.tensor([0.1, 0.5])
    out = perturb_initial_states(states, _generators(3), amplitude=2.0, length=2.0, tendency_scale=scale,
                                 periodic_lon=True)
    delta = out - states
    torch.testing.assert_close(delta[:, 0], delta[:, 1])  # input tendencies untouched
    torch.testing.assert_close(delta.std(dim=(-2, -1))[:, 0], (2.0 * scale).expand(3, 2), atol=1e-5, rtol=1e-5)
    same = perturb_initial_states(states, _generators(3), amplitude=0.0, length=2.0, tendency_scale=scale,
                                  periodic_lon=True)
    assert same is states


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"amplitude": -1.0, "length": 2.0}, "amplitude must not be negative"),
    ({"amplitude": 1.0, "length": 0.0}, "length must be positive"),
])
def test_bad_settings_are_rejected(kwargs, message):
    states = torch.zeros(1, 1, 1, 4, 8)
    with pytest.raises(ValueError, match=message):
        perturb_initial_states(states, _generators(1), tendency_scale=torch.ones(1), periodic_lon=True, **kwargs)


def test_one_generator_per_sample_is_required():
    with pytest.raises(ValueError, match="one generator per sample"):
        smooth_noise((2, 1, 4, 8), _generators(1), length=1.0, periodic_lon=False)


def test_a_change_std_map_has_unit_area_weighted_rms_and_follows_the_deviations():
    latitude = np.linspace(-80.0, 80.0, 8)
    std = np.ones((2, 8, 16))
    std[0, :, 8:] = 3.0  # channel 0 varies three times as much in the eastern half
    std[1] *= 5.0
    weights = np.cos(np.deg2rad(latitude))[:, None]
    for power in (1.0, 0.5):
        spatial = change_std_map(std, latitude, power=power)
        rms = np.sqrt((spatial**2 * weights).sum(axis=(1, 2)) / (weights.sum() * 16))
        np.testing.assert_allclose(rms, [1.0, 1.0], rtol=1e-12)
        np.testing.assert_allclose(spatial[0, :, 8:] / spatial[0, :, :8], 3.0**power, rtol=1e-12)
        np.testing.assert_allclose(spatial[1], 1.0, rtol=1e-12)  # a uniform channel is left alone
    std[1] = 0.0
    with pytest.raises(ValueError, match=r"channels \[1\] have no finite, nonzero change deviations"):
        change_std_map(std, latitude)
    with pytest.raises(ValueError, match="std must have shape"):
        change_std_map(std[0], latitude)


def test_a_spatial_scale_multiplies_the_perturbation_point_by_point():
    states = torch.zeros(3, 2, 2, 8, 16)
    spatial = torch.ones(2, 8, 16)
    spatial[:, :, :8] = 0.0
    spatial[1, :, 8:] = 2.0
    kwargs = {"amplitude": 1.0, "length": 1.0, "tendency_scale": torch.ones(2), "periodic_lon": True}
    plain = perturb_initial_states(states, _generators(3), **kwargs)
    shaped = perturb_initial_states(states, _generators(3), spatial_scale=spatial, **kwargs)
    torch.testing.assert_close(shaped, plain * spatial)
    assert float(shaped[..., :8].abs().max()) == 0.0 and float(shaped[..., 8:].abs().max()) > 0
    with pytest.raises(ValueError, match=r"spatial_scale must have shape \(2, 8, 16\)"):
        perturb_initial_states(states, _generators(3), spatial_scale=spatial[:, :4], **kwargs)
