"""forecasting.models.unet: any grid size, exact periodicity in longitude on global grids, conditioning on noise
level and lead time, gradients, switchable dropout."""

from __future__ import annotations

import pytest
import torch

from forecasting.models import UNet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_unet(**kwargs) -> UNet:
    torch.manual_seed(0)
    return UNet(3, 2, base_channels=8, embedding_dim=16, **kwargs)


def inputs(height: int, width: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn((batch, 3, height, width), generator=generator)
    return x, torch.linspace(-1.5, 1.0, batch), torch.linspace(6.0, 48.0, batch)


@pytest.mark.parametrize("periodic_lon", [True, False])
@pytest.mark.parametrize(("height", "width"), [(29, 21), (32, 64), (20, 29), (1, 3)])
def test_output_has_the_input_grid_for_any_size(height, width, periodic_lon):
    net = small_unet(periodic_lon=periodic_lon)
    x, noise, lead = inputs(height, width)
    out = net(x, noise=noise, lead_time=lead)
    assert out.shape == (2, 2, height, width) and bool(torch.isfinite(out).all())


def test_global_unet_is_periodic_in_longitude():
    """Rolling the input by k columns rolls the output by k (k a multiple of 2 ** (levels - 1) = 4)."""
    x, noise, lead = inputs(32, 64)
    net = small_unet(periodic_lon=True).eval()
    out = net(x, noise=noise, lead_time=lead)
    for k in (4, 20, -8):
        rolled = net(x.roll(k, dims=-1), noise=noise, lead_time=lead)
        torch.testing.assert_close(rolled, out.roll(k, dims=-1), rtol=1e-5, atol=1e-5)
    # A regional network pads by replication at its edges instead, so it is not periodic.
    regional = small_unet(periodic_lon=False).eval()
    out = regional(x, noise=noise, lead_time=lead)
    assert (regional(x.roll(4, dims=-1), noise=noise, lead_time=lead) - out.roll(4, dims=-1)).abs().max() > 1e-2


def test_conditioning_changes_the_output():
    x, noise, lead = inputs(20, 29)
    net = small_unet(periodic_lon=False).eval()
    out = net(x, noise=noise, lead_time=lead)
    assert (net(x, noise=noise + 0.5, lead_time=lead) - out).abs().mean() > 1e-3
    assert (net(x, noise=noise, lead_time=lead + 24.0) - out).abs().mean() > 1e-3
    # Each sample sees its own condition: changing sample 1's noise level leaves sample 0 alone.
    changed = net(x, noise=torch.stack([noise[0], noise[1] + 1.0]), lead_time=lead)
    torch.testing.assert_close(changed[0], out[0])
    assert (changed[1] - out[1]).abs().mean() > 1e-3


def test_conditions_are_required_exactly_as_declared():
    x, noise, lead = inputs(8, 16)
    noise_only = small_unet(conditions=("noise",))
    assert noise_only(x, noise=noise).shape == (2, 2, 8, 16)
    with pytest.raises(ValueError, match="'lead_time' must be None"):
        noise_only(x, noise=noise, lead_time=lead)
    with pytest.raises(ValueError, match="'noise' must be given"):
        noise_only(x)
    with pytest.raises(ValueError, match=r"must have shape \(2,\)"):
        noise_only(x, noise=noise[:1])
    with pytest.raises(ValueError, match="conditions must be distinct names"):
        UNet(3, 2, conditions=("noise", "temperature"))
    with pytest.raises(ValueError, match=r"input must have shape \(B, 3, H, W\)"):
        noise_only(torch.zeros(2, 4, 8, 16), noise=noise)
    unconditioned = small_unet(conditions=())
    assert unconditioned(x).shape == (2, 2, 8, 16)


def test_gradients_reach_every_parameter_and_the_input():
    x, noise, lead = inputs(21, 29)
    x.requires_grad_(True)
    net = small_unet(periodic_lon=False)
    net(x, noise=noise, lead_time=lead).square().mean().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missing, missing
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)


def test_dropout_is_off_at_inference_unless_kept_on():
    x, noise, lead = inputs(8, 16)
    net = small_unet(dropout=0.3).eval()
    torch.testing.assert_close(net(x, noise=noise, lead_time=lead), net(x, noise=noise, lead_time=lead))
    net.dropout_at_inference = True
    torch.manual_seed(1)
    first = net(x, noise=noise, lead_time=lead)
    assert (net(x, noise=noise, lead_time=lead) - first).abs().mean() > 1e-4
