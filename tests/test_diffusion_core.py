"""forecasting.diffusion.edm and forecasting.diffusion.samplers: EDM preconditioning and loss against their
formulas and against the ideal denoiser of Gaussian data; every sampler against the exact probability-flow
transport of a Gaussian, its order of accuracy, its number of network evaluations, churn and reproducibility.

For data ``y ~ N(mu, s^2)`` the ideal denoiser is ``D*(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu)`` and
the probability-flow ODE ``dx/dsigma = (x - D*) / sigma`` keeps ``(x - mu) / sqrt(s^2 + sigma^2)`` constant, so
noise ``x_0 = sigma_max eps`` ends at ``mu + s (sigma_max eps - mu) / sqrt(s^2 + sigma_max^2)``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from forecasting.diffusion import (
    SAMPLERS,
    Denoiser,
    EDMConfig,
    denoising_loss,
    evaluations,
    karras_sigmas,
    loss_weight,
    preconditioning,
    sample,
    sample_training_sigma,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class ConstantNetwork(nn.Module):
    """F(x) = value everywhere (value 0: D = c_skip x, the ideal denoiser of N(0, sigma_data^2) data)."""

    def __init__(self, channels: int, value: float = 0.0) -> None:
        super().__init__()
        self.channels, self.value = channels, value

    def forward(self, x: torch.Tensor, *, noise: torch.Tensor, lead_time: torch.Tensor | None) -> torch.Tensor:
        return torch.full((x.shape[0], self.channels, *x.shape[2:]), self.value, dtype=x.dtype)


# ----------------------------------------------------------------------------------------------
# Preconditioning and loss
# ----------------------------------------------------------------------------------------------
def test_preconditioning_matches_the_edm_formulas():
    sigma = torch.tensor([1e-3, 0.1, 0.5, 1.0, 3.0, 80.0], dtype=torch.float64)
    sd = 0.5
    c_skip, c_out, c_in, c_noise = preconditioning(sigma, sd)
    s = sigma.numpy()
    np.testing.assert_allclose(c_skip.numpy(), sd**2 / (s**2 + sd**2), rtol=1e-12)
    np.testing.assert_allclose(c_out.numpy(), s * sd / np.sqrt(s**2 + sd**2), rtol=1e-12)
    np.testing.assert_allclose(c_in.numpy(), 1 / np.sqrt(s**2 + sd**2), rtol=1e-12)
    np.testing.assert_allclose(c_noise.numpy(), np.log(s) / 4, rtol=1e-12)
    # Broadcastable: a (B, 1, 1, 1) sigma gives (B, 1, 1, 1) coefficients.
    assert all(c.shape == (6, 1, 1, 1) for c in preconditioning(sigma.view(6, 1, 1, 1), sd))


def test_skip_connection_takes_over_as_noise_vanishes():
    tiny, huge = torch.tensor([1e-8], dtype=torch.float64), torch.tensor([1e6], dtype=torch.float64)
    c_skip, c_out, _, _ = preconditioning(tiny, 1.0)
    assert c_skip.item() == pytest.approx(1.0, abs=1e-12) and c_out.item() == pytest.approx(1e-8, rel=1e-6)
    c_skip, c_out, _, _ = preconditioning(huge, 1.0)
    assert c_skip.item() == pytest.approx(0.0, abs=1e-11) and c_out.item() == pytest.approx(1.0, rel=1e-9)


def test_loss_weight_is_the_inverse_square_of_c_out():
    sigma = torch.logspace(-3, 2, 20, dtype=torch.float64)
    for sd in (0.5, 1.0, 2.0):
        _, c_out, _, _ = preconditioning(sigma, sd)
        np.testing.assert_allclose((loss_weight(sigma, sd) * c_out**2).numpy(), 1.0, rtol=1e-12)


@pytest.mark.parametrize("sigma_data", [0.5, 1.0, 2.0])
def test_ideal_gaussian_denoiser_has_unit_loss_at_every_noise_level(sigma_data):
    """Data y ~ N(0, sd^2): D* = c_skip x (a zero network). Then D* - y = sigma (sd^2 n - sigma y) / (sigma^2 + sd^2),
    whose mean square is sigma^2 sd^2 / (sigma^2 + sd^2) = 1 / lambda: the weighted loss is 1 on average. A
    network off by a constant a everywhere has loss 1 + a^2 (the effective target has unit variance)."""
    generator = torch.Generator().manual_seed(0)
    y = sigma_data * torch.randn((40, 1, 50, 50), generator=generator, dtype=torch.float64)
    for sigma_value in (0.01, 0.3, 1.0, 5.0, 60.0):
        sigma = torch.full((40,), sigma_value, dtype=torch.float64)
        ideal = Denoiser(ConstantNetwork(1), sigma_data=sigma_data)
        x = y + sigma_value * torch.randn(y.shape, generator=generator, dtype=torch.float64)
        np.testing.assert_allclose(ideal(x, sigma).numpy(), (x * sigma_data**2 / (sigma_value**2 + sigma_data**2)).numpy())
        loss = denoising_loss(ideal, y, sigma, generator=generator, sigma_data=sigma_data)
        assert loss.shape == y.shape  # unreduced
        assert loss.mean().item() == pytest.approx(1.0, abs=0.03), sigma_value
        off = Denoiser(ConstantNetwork(1, 0.5), sigma_data=sigma_data)
        loss = denoising_loss(off, y, sigma, generator=generator, sigma_data=sigma_data)
        assert loss.mean().item() == pytest.approx(1.25, abs=0.04), sigma_value


def test_denoiser_feeds_the_network_scaled_input_condition_and_noise_level():
    seen = {}

    class Probe(nn.Module):
        def forward(self, x, *, noise, lead_time):
            seen.update(x=x, noise=noise, lead_time=lead_time)
            return torch.ones((x.shape[0], 2, *x.shape[2:]))

    x = torch.randn(3, 2, 4, 5)
    condition = torch.randn(3, 7, 4, 5)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    lead = torch.tensor([6.0, 12.0, 18.0])
    out = Denoiser(Probe(), sigma_data=1.0)(x, sigma, condition, lead_time=lead)
    c_skip, c_out, c_in, c_noise = preconditioning(sigma.view(3, 1, 1, 1), 1.0)
    torch.testing.assert_close(seen["x"][:, :2], c_in * x)
    torch.testing.assert_close(seen["x"][:, 2:], condition)
    torch.testing.assert_close(seen["noise"], c_noise.view(3))
    torch.testing.assert_close(seen["lead_time"], lead)
    torch.testing.assert_close(out, c_skip * x + c_out)
    with pytest.raises(ValueError, match=r"sigma must have shape \(3,\)"):
        Denoiser(Probe())(x, sigma[:2])
    with pytest.raises(ValueError, match="condition must have shape"):
        Denoiser(Probe())(x, sigma, condition[:, :, :3])


def test_loss_refuses_a_sigma_data_other_than_the_denoisers():
    with pytest.raises(ValueError, match="differs from the denoiser's 0.5"):
        denoising_loss(Denoiser(ConstantNetwork(1), sigma_data=0.5), torch.zeros(2, 1, 3, 3), torch.ones(2))


def test_training_noise_levels_are_log_normal_and_reproducible():
    config = EDMConfig()
    sigma = sample_training_sigma(200_000, config, generator=torch.Generator().manual_seed(3), device="cpu")
    assert sigma.shape == (200_000,) and bool((sigma > 0).all())
    assert sigma.log().mean().item() == pytest.approx(config.p_mean, abs=0.01)
    assert sigma.log().std().item() == pytest.approx(config.p_std, abs=0.01)
    again = sample_training_sigma(200_000, config, generator=torch.Generator().manual_seed(3), device="cpu")
    torch.testing.assert_close(sigma, again)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        EDMConfig(sigma_min=1.0, sigma_max=0.5)


# ----------------------------------------------------------------------------------------------
# Schedule and samplers
# ----------------------------------------------------------------------------------------------
def test_karras_schedule_follows_eq_5_and_ends_at_zero():
    sigmas = karras_sigmas(5, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    assert sigmas.shape == (6,) and sigmas[-1].item() == 0.0
    i = np.arange(5)
    want = (80.0 ** (1 / 7) + i / 4 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    np.testing.assert_allclose(sigmas[:-1].numpy(), want, rtol=1e-6)
    assert karras_sigmas(1, sigma_min=0.002, sigma_max=80.0).tolist() == [80.0, 0.0]
    with pytest.raises(ValueError, match="steps must be >= 1"):
        karras_sigmas(0, sigma_min=0.002, sigma_max=80.0)


MU, S, SIGMA_MAX = 2.0, 0.5, 80.0


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The exact denoiser of N(MU, S^2) data."""
    sigma = sigma.view(-1, *([1] * (x.ndim - 1)))
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


def exact_transport(eps: torch.Tensor) -> torch.Tensor:
    """Where the probability-flow ODE takes x = SIGMA_MAX eps (module docstring)."""
    return MU + S * (SIGMA_MAX * eps - MU) / math.sqrt(S**2 + SIGMA_MAX**2)


def unit_noise(n: int = 20_000, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn((n, 1), generator=torch.Generator().manual_seed(seed), dtype=dtype)


#: Relative error of the std allowed after 32 steps: Euler is first order, the others second order.
STD_TOLERANCE = {"euler": 0.10, "heun": 0.03, "dpmpp_2m": 0.03}


@pytest.mark.parametrize("method", SAMPLERS)
def test_every_sampler_turns_noise_into_the_gaussian_data_distribution(method):
    sigmas = karras_sigmas(32, sigma_min=0.002, sigma_max=SIGMA_MAX)
    x = sample(gaussian_denoiser, unit_noise(), sigmas, method=method)
    assert x.shape == (20_000, 1)
    assert x.mean().item() == pytest.approx(MU, abs=0.05)
    assert x.std().item() == pytest.approx(S, rel=STD_TOLERANCE[method])


def test_second_order_samplers_beat_euler_and_converge_at_their_order():
    eps = unit_noise(2_000, dtype=torch.float64)
    exact = exact_transport(eps)

    def error(method: str, steps: int) -> float:
        sigmas = karras_sigmas(steps, sigma_min=0.002, sigma_max=SIGMA_MAX).double()
        return (sample(gaussian_denoiser, eps, sigmas, method=method) - exact).abs().max().item()

    for steps in (16, 32):
        assert error("heun", steps) < 0.5 * error("euler", steps)
        assert error("dpmpp_2m", steps) < 0.5 * error("euler", steps)
    # Doubling the steps halves Euler's error and quarters the second-order solvers' (roughly).
    assert 1.7 < error("euler", 32) / error("euler", 64) < 2.3
    assert error("heun", 32) / error("heun", 64) > 3.3
    assert error("dpmpp_2m", 32) / error("dpmpp_2m", 64) > 3.3


@pytest.mark.parametrize("method", SAMPLERS)
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_evaluations_counts_the_network_calls(method, steps):
    calls = []

    def counting(x, sigma):
        calls.append(sigma[0].item())
        return gaussian_denoiser(x, sigma)

    sample(counting, unit_noise(4), karras_sigmas(steps, sigma_min=0.002, sigma_max=SIGMA_MAX), method=method)
    assert len(calls) == evaluations(method, steps)
    assert evaluations("heun", steps) == 2 * steps - 1
    # With churn the count is the same; the noise level of a churned step is raised.
    calls.clear()
    sample(counting, unit_noise(4), karras_sigmas(steps, sigma_min=0.002, sigma_max=SIGMA_MAX), method=method,
           churn=1.0, generator=torch.Generator().manual_seed(0))
    assert len(calls) == evaluations(method, steps)
    assert calls[0] > SIGMA_MAX


#: Relative error of the std allowed with churn after 128 steps (churned DPM-Solver++ steps are first order).
CHURN_STD_TOLERANCE = {"euler": 0.06, "heun": 0.02, "dpmpp_2m": 0.06}


@pytest.mark.parametrize("method", SAMPLERS)
def test_churn_keeps_the_distribution(method):
    sigmas = karras_sigmas(128, sigma_min=0.002, sigma_max=SIGMA_MAX)
    noise = unit_noise()
    deterministic = sample(gaussian_denoiser, noise, sigmas, method=method)
    churned = sample(gaussian_denoiser, noise, sigmas, method=method, churn=5.0, s_tmin=0.01, s_tmax=50.0,
                     generator=torch.Generator().manual_seed(1))
    assert (churned - deterministic).abs().mean().item() > 0.05  # the stochastic path was taken
    assert churned.mean().item() == pytest.approx(MU, abs=0.03)
    assert churned.std().item() == pytest.approx(S, rel=CHURN_STD_TOLERANCE[method])


def test_same_generator_gives_the_same_samples_and_rows_do_not_depend_on_the_batch():
    sigmas = karras_sigmas(6, sigma_min=0.002, sigma_max=SIGMA_MAX)
    noise = unit_noise(8)

    def run(seed: int) -> torch.Tensor:
        return sample(gaussian_denoiser, noise, sigmas, churn=5.0, generator=torch.Generator().manual_seed(seed))

    torch.testing.assert_close(run(4), run(4), rtol=0, atol=0)
    assert not torch.equal(run(4), run(5))
    # One generator per row: row 2's sample is the same alone or among others.
    together = sample(gaussian_denoiser, noise[:3], sigmas, churn=5.0,
                      generator=[torch.Generator().manual_seed(10 + i) for i in range(3)])
    alone = sample(gaussian_denoiser, noise[2:3], sigmas, churn=5.0, generator=[torch.Generator().manual_seed(12)])
    torch.testing.assert_close(together[2:3], alone, rtol=0, atol=0)


def test_samplers_reject_bad_arguments():
    sigmas = karras_sigmas(4, sigma_min=0.002, sigma_max=SIGMA_MAX)
    with pytest.raises(ValueError, match="unknown sampler 'rk4'"):
        sample(gaussian_denoiser, unit_noise(2), sigmas, method="rk4")
    with pytest.raises(ValueError, match="unknown sampler"):
        evaluations("rk4", 3)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample(gaussian_denoiser, unit_noise(2), sigmas.flip(0))
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        sample(gaussian_denoiser, unit_noise(3), sigmas, churn=1.0, generator=[torch.Generator()] * 2)


def test_every_sampling_key_is_a_setting_of_its_familys_config():
    """``--sampling`` keys (forecasting.inference.SAMPLING_KEYS) must name fields of the family's model config,
    or with_sampling could never apply them."""
    from forecasting.config import DiffusionModelConfig, DYffusionModelConfig, RollingDiffusionModelConfig
    from forecasting.inference import SAMPLING_KEYS

    classes = {"diffusion": DiffusionModelConfig, "rolling": RollingDiffusionModelConfig,
               "dyffusion": DYffusionModelConfig}
    assert set(SAMPLING_KEYS) == set(classes)
    for family, keys in SAMPLING_KEYS.items():
        missing = [key for key in keys if key not in classes[family].model_fields]
        assert not missing, (family, missing)
