"""forecasting.diffusion.rolling: the ``rolling`` family. The rolling and init schedules against the paper's formulas,
the noise growing over the window, a sampling pass that finishes the first frame exactly, and end to end on the
tiny stores of tests/test_forecasters.py: ``forecast train`` lowers the loss, ``forecast predict`` writes the
forecast layout with distinct, reproducible members past the training window, checkpoints round-trip, and bad
settings fail before anything is written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from torch import Tensor

from forecasting.config import ConfigError, ExperimentConfig
from forecasting.diffusion.rolling import (
    RollingDiffusion,
    RollingDiffusionForecaster,
    RollingObjective,
    RollingSchedule,
    init_local_times,
    rolling_local_times,
)
from forecasting.diffusion.samplers import evaluations
from forecasting.errors import SchemaError
from forecasting.forecasters import FAMILIES, GLOBAL, REGIONAL, build_forecaster
from forecasting.inference import with_sampling
from forecasting.schema import LEAD, MEMBER, TIME
from forecasting.training.checkpoint import load_checkpoint
from forecasting.training.train import TRAINABLE
from tests import diffusion_helpers
from tests.diffusion_helpers import (
    STARTS,
    assert_checkpoint_of_another_family_is_rejected,
    assert_checkpoint_round_trip_gives_identical_forecasts,
    assert_members_do_not_depend_on_the_batching,
    assert_predict_writes_distinct_reproducible_members,
    assert_training_is_rejected_before_writing,
    denoiser_training_run,
    tiny_experiment,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

stores = diffusion_helpers.stores  # the shared module-scoped fixtures
analysis = diffusion_helpers.analysis

WINDOW = 3
SMALL_MODEL = {"family": "rolling", "base_channels": 8, "channel_mult": [1, 2], "embedding_dim": 16, "window": WINDOW,
               "sampling_steps": 2, "init_steps": 3, "member_batch": 4}


def rolling_config(stores: tuple[Path, Path], *, model: dict | None = None, training: dict | None = None,
                   data: dict | None = None) -> ExperimentConfig:
    """A tiny rolling-diffusion experiment on ``stores`` (coarse, regional): 80 optimiser steps."""
    return tiny_experiment(
        stores, name="tiny-rolling", model={**SMALL_MODEL, **(model or {})}, data=data,
        training={"max_steps": 80, "val_every": 40, "checkpoint_every": 80, **(training or {})},
    )


@pytest.fixture(scope="module")
def trained(stores, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """80 optimiser steps of ``forecast train`` on the global grid, with the loss on the validation windows
    before and after (same windows, same noise) and for a network that outputs zero."""
    return denoiser_training_run(
        rolling_config(stores), tmp_path_factory.mktemp("rolling-run"), RollingDiffusionForecaster,
        lambda model: model.network.out_conv.conv,
    )


# ----------------------------------------------------------------------------------------------
# The schedules
# ----------------------------------------------------------------------------------------------
def test_local_times_follow_the_rolling_and_init_schedules():
    """t_k = (k + t) / W and t_k^init = clip(k / W + t); a rolling pass ends where the shifted window starts,
    and the init pass goes from all-noise to the rolling window's state at t = 0."""
    t = torch.tensor([1.0, 0.5, 0.0])
    np.testing.assert_allclose(rolling_local_times(t, 4).numpy(),
                               [[0.25, 0.5, 0.75, 1.0], [0.125, 0.375, 0.625, 0.875], [0.0, 0.25, 0.5, 0.75]])
    np.testing.assert_allclose(init_local_times(t, 4).numpy(),
                               [[1.0, 1.0, 1.0, 1.0], [0.5, 0.75, 1.0, 1.0], [0.0, 0.25, 0.5, 0.75]])
    end, start = rolling_local_times(torch.tensor(0.0), 4), rolling_local_times(torch.tensor(1.0), 4)
    np.testing.assert_allclose(end[1:].numpy(), start[:-1].numpy())  # frame k + 1 at t = 0 is frame k at t = 1
    assert start[-1] == 1.0 and end[0] == 0.0  # the appended frame is pure noise, the emitted one clean


@pytest.mark.parametrize("rho", [7.0, -10.0])
def test_noise_grows_over_the_window_from_zero_to_sigma_max(rho):
    schedule = RollingSchedule(window=4, sigma_min=0.002, sigma_max=80.0, rho=rho)
    t = torch.linspace(0.0, 1.0, 21, dtype=torch.float64)
    rolling = schedule.sigmas(t, init=False)  # (21, 4)
    init = schedule.sigmas(t, init=True)
    assert (rolling.diff(dim=1) > 0).all() and (rolling.diff(dim=0) > 0).all()  # along the window and with t
    assert (init.diff(dim=1) >= 0).all() and (init.diff(dim=0) >= 0).all()
    assert rolling[0, 0] == 0.0 and rolling[-1, -1].item() == pytest.approx(80.0)
    np.testing.assert_allclose(init[-1].numpy(), 80.0)  # the first window starts from pure noise
    tiny = schedule.noise(torch.tensor([1e-9]))
    assert tiny.item() == pytest.approx(0.002, rel=1e-3)  # sigma_min just above tau = 0
    # Over its W passes of S uniform steps a frame meets EDM's schedule formula at W S evenly spaced local times.
    tau = torch.linspace(1.0, 0.0, 4 * 5 + 1, dtype=torch.float64)[:-1]
    low, high = 0.002 ** (1 / rho), 80.0 ** (1 / rho)
    np.testing.assert_allclose(schedule.noise(tau).numpy(), (low + tau.numpy() * (high - low)) ** rho, rtol=1e-12)
    with pytest.raises(ValueError, match="rho != 0"):
        RollingSchedule(window=4, sigma_min=0.002, sigma_max=80.0, rho=0.0)


def _tiny_model(window: int = 3) -> RollingDiffusion:
    return RollingDiffusion(
        n_channels=2, n_forcings=4, n_static=1, input_steps=2,
        schedule=RollingSchedule(window=window, sigma_min=0.002, sigma_max=80.0, rho=-10.0),
        latitude=np.linspace(-60, 60, 4), residual_scale=np.array([2.0, 0.5]), periodic_lon=True, sigma_data=1.0,
        unet={"base_channels": 8, "channel_mult": (1,), "embedding_dim": 8},
    )


def _noised_window_with_exact_denoiser(
    model: RollingDiffusion, shape: tuple[int, ...], *, init: bool, seed: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, list[Tensor]]:
    """A clean window y of ``shape``, the model's denoiser replaced by one that always returns y (recording the
    noise levels it is called with), and y noised at the levels of t = 1: returns (y, x_0, noise, levels at
    t = 1, levels at t = 0, calls)."""
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randn(shape, generator=generator)
    calls: list[Tensor] = []

    def denoise(x, sigma, condition):
        calls.append(sigma.clone())
        return clean

    model.denoise = denoise
    start = model.schedule.sigmas(torch.tensor(1.0), init=init).float()  # (W,)
    end = model.schedule.sigmas(torch.tensor(0.0), init=init).float()
    noise = torch.randn(clean.shape, generator=generator)
    x0 = clean + start.view(1, -1, 1, 1, 1) * noise
    return clean, x0, noise, start, end, calls


@pytest.mark.parametrize(("method", "init"), [("euler", False), ("heun", False), ("heun", True)])
def test_a_pass_finishes_the_first_frame_and_brings_the_others_to_their_next_noise(method, init):
    """With a denoiser that always returns the clean window y, the ODE x(sigma) = y + sigma / sigma_0 (x_0 - y) is
    solved exactly by Euler and Heun steps: from y + sigma_k(t = 1) n, frame 0 ends at y exactly (sigma 0) and
    frame k at y + sigma_k(t = 0) n, the noise it starts the next pass with."""
    model = _tiny_model()
    clean, x0, noise, _, end, calls = _noised_window_with_exact_denoiser(model, (2, 3, 2, 4, 6), init=init, seed=0)
    out = model.denoising_pass(x0, torch.zeros(2, 1, 4, 6), init=init, steps=4, method=method)
    assert len(calls) == evaluations(method, 4)
    assert all((sigma > 0).all() for sigma in calls)  # the network never sees a clean frame
    torch.testing.assert_close(out[:, 0], clean[:, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:, 1:], clean[:, 1:] + end[1:].view(1, 2, 1, 1, 1) * noise[:, 1:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_churn_renews_the_noise_at_the_right_level_and_still_finishes_the_first_frame(method):
    """EDM's churn per frame: with a denoiser that returns the clean window, the first frame still ends at y
    exactly, and every other frame ends at y plus noise of its next pass's level, partly fresh; the network
    sees each churned frame at sigma_k (1 + gamma), gamma = churn / (W steps), and only frames within
    [s_tmin, s_tmax] are churned. The fresh noise comes from one generator per row."""
    model = _tiny_model()
    clean, x0, noise, start, end, calls = _noised_window_with_exact_denoiser(
        model, (3, 3, 2, 16, 32), init=False, seed=1
    )

    def run(churn, s_tmin=0.0, seeds=(5, 6, 7)):
        calls.clear()
        return model.denoising_pass(
            x0, torch.zeros(3, 1, 16, 32), init=False, steps=4, method=method, churn=churn, s_tmin=s_tmin,
            generator=[torch.Generator().manual_seed(s) for s in seeds],
        )

    plain = run(0.0)
    out = run(3.0)
    gamma = 3.0 / (3 * 4)
    torch.testing.assert_close(calls[0][0], start * (1 + gamma))  # every frame churned at its level
    assert len(calls) == evaluations(method, 4)
    torch.testing.assert_close(out[:, 0], clean[:, 0], rtol=0, atol=1e-5)
    scaled = (out[:, 1:] - clean[:, 1:]) / end[1:].view(1, 2, 1, 1, 1)
    assert 0.9 < scaled.pow(2).mean().item() < 1.1  # the next pass's noise level
    same = torch.corrcoef(torch.stack([scaled.flatten(), noise[:, 1:].flatten()]))[0, 1].item()
    assert 0.3 < same < 0.99  # part of the start's noise, part fresh
    torch.testing.assert_close(run(3.0), out)  # reproducible from the generators
    other = run(3.0, seeds=(5, 6, 8))
    torch.testing.assert_close(other[:2], out[:2])  # a row's noise is its own generator's
    assert not torch.allclose(other[2], out[2])
    # s_tmin above every level: nothing is churned, the ODE pass of churn 0.
    torch.testing.assert_close(run(3.0, s_tmin=1e3), plain)
    # s_tmin between the frames' levels: the frames below it keep their scheduled level.
    threshold = float(start[1] + start[2]) / 2
    run(3.0, s_tmin=threshold)
    torch.testing.assert_close(calls[0][0, :2], start[:2])
    torch.testing.assert_close(calls[0][0, 2], start[2] * (1 + gamma))
    run(100.0)  # EDM's cap: gamma <= sqrt(2) - 1
    torch.testing.assert_close(calls[0][0], start * 2**0.5)


def test_objective_noises_each_frame_at_its_local_time_and_weights_frames(stores):
    config = rolling_config(stores)
    torch.manual_seed(0)
    setup = TRAINABLE["rolling"](config)
    assert isinstance(setup.objective, RollingObjective) and isinstance(setup.model, RollingDiffusion)
    batch = torch.utils.data.default_collate([setup.train[i] for i in range(4)])
    assert batch["targets"].shape[1] == WINDOW
    metrics = setup.objective(setup.model, batch, steps=1, generator=torch.Generator().manual_seed(0))
    assert set(metrics) == {"loss", "loss_first_frame", "loss_last_frame"} and metrics["loss"].requires_grad
    weighted = RollingObjective(area_weights=setup.objective.area_weights.numpy(),
                                channel_weights=setup.objective.channel_weights.numpy(), init_fraction=0.25,
                                lognormal=(0.5, 1.2))
    other = weighted(setup.model, batch, steps=1, generator=torch.Generator().manual_seed(0))
    assert other["loss"].item() < metrics["loss"].item()  # weights of at most 1 per frame
    # Frame k is the change from the state before it, in tendency-std units.
    frames = setup.model.frames(batch["inputs"], batch["targets"])
    scale = setup.model.residual_scale
    torch.testing.assert_close(frames[:, 1], (batch["targets"][:, 1] - batch["targets"][:, 0]) * scale)
    torch.testing.assert_close(setup.model.next_state(batch["inputs"][:, -1], frames[:, 0]), batch["targets"][:, 0],
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="without rollouts"):
        setup.objective(setup.model, batch, steps=2, generator=torch.Generator())


# ----------------------------------------------------------------------------------------------
# Training and forecasts
# ----------------------------------------------------------------------------------------------
def test_training_lowers_the_loss(trained):
    """The zero network leaves D = c_skip x; the trained one must beat it and its random initialisation."""
    before, after, zero = trained["before"], trained["after"], trained["zero"]
    assert after < 0.8 * before and after < 0.8 * zero, (before, after, zero)
    checkpoint = load_checkpoint(trained["checkpoint"], family="rolling")
    assert checkpoint.metadata["global_step"] == 80 and checkpoint.graph is None


def test_check_denoiser_reports_the_noise_left_at_each_level(trained, tmp_path, capsys):
    diffusion_helpers.assert_check_denoiser_reports_the_noise_left(trained["checkpoint"], tmp_path, capsys)


def test_predict_writes_distinct_reproducible_members_past_the_training_window(trained, tmp_path):
    steps = 3 * WINDOW + 1
    fc = assert_predict_writes_distinct_reproducible_members(
        trained["checkpoint"], tmp_path, steps=steps, family="rolling", name="tiny-rolling"
    )
    np.testing.assert_array_equal(fc[LEAD].values, pd.to_timedelta(6 * np.arange(1, steps + 1), unit="h").values)


def test_spectral_filter_damps_the_small_scales_of_the_change(trained, analysis):
    diffusion_helpers.assert_spectral_filter_damps_the_change_since_the_start(
        RollingDiffusionForecaster, trained["checkpoint"], analysis[GLOBAL], steps=3
    )


def test_members_do_not_depend_on_the_batching(trained, analysis):
    forecaster = RollingDiffusionForecaster.from_checkpoint(load_checkpoint(trained["checkpoint"]))
    assert_members_do_not_depend_on_the_batching(forecaster, analysis[GLOBAL], steps=4)


def test_churned_members_are_reproducible_and_do_not_depend_on_the_batching(trained, analysis):
    """``--sampling churn=S``: the churn noise comes from each member's own generator, so a churned forecast
    repeats for a seed, whatever the batching, and differs from the ODE's."""
    ckpt = load_checkpoint(trained["checkpoint"])
    plain = RollingDiffusionForecaster.from_checkpoint(ckpt).forecast(analysis[GLOBAL], steps=3, members=3,
                                                                      starts=STARTS, seed=7)
    churned = RollingDiffusionForecaster.from_checkpoint(with_sampling(ckpt, {"churn": 4.0, "s_tmin": 0.5}))
    first = assert_members_do_not_depend_on_the_batching(churned, analysis[GLOBAL], steps=3)
    assert np.isfinite(first.to_array().values).all()
    assert not np.allclose(first.to_array().values, plain.to_array().values)
    with pytest.raises(ConfigError, match="churn"):
        with_sampling(ckpt, {"churn": -1.0})


def test_window_perturbations_leave_the_first_window_alone_and_add_spread_after_it(trained, analysis):
    """``--sampling window_perturbation=A``: after every W emitted leads the states the window is conditioned
    on get a fresh smooth field; the first W leads are the plain forecast's exactly, the next spreads more."""
    diffusion_helpers.assert_window_perturbations_leave_the_first_window_alone(
        RollingDiffusionForecaster, trained["checkpoint"], analysis[GLOBAL], window=WINDOW, amplitude=5.0
    )


def test_perturbation_every_sets_how_often_the_field_is_renewed(trained, analysis):
    """``--sampling perturbation_every=K``: the renewed field comes after every K emitted leads instead of every
    window. K = 1 leaves the first lead as it was and spreads the second; K = W is the default's forecast."""
    ckpt = load_checkpoint(trained["checkpoint"])
    steps, settings = WINDOW + 1, {"window_perturbation": 5.0, "perturbation_length": 2.0}

    def forecast(extra: dict) -> xr.Dataset:
        model = RollingDiffusionForecaster.from_checkpoint(with_sampling(ckpt, {**settings, **extra}))
        return model.forecast(analysis[GLOBAL], steps=steps, members=4, starts=STARTS, seed=3)

    def spread(fc: xr.Dataset, lead: int) -> float:
        return float(fc.isel({LEAD: lead}).std(MEMBER).to_array().mean())

    every_window, each_lead = forecast({}), forecast({"perturbation_every": 1})
    xr.testing.assert_equal(forecast({"perturbation_every": WINDOW}), every_window)
    xr.testing.assert_equal(each_lead.isel({LEAD: 0}), every_window.isel({LEAD: 0}))
    assert spread(each_lead, 1) > 1.5 * spread(every_window, 1), (spread(each_lead, 1), spread(every_window, 1))
    assert np.isfinite(each_lead.to_array().values).all()
    with pytest.raises(ConfigError, match="perturbation_every"):
        with_sampling(ckpt, {"perturbation_every": 0})



def test_checkpoint_round_trip_gives_identical_forecasts(trained, analysis, tmp_path):
    assert_checkpoint_round_trip_gives_identical_forecasts(
        RollingDiffusionForecaster, trained, analysis[GLOBAL], tmp_path, steps=2
    )


def test_checkpoint_of_another_family_is_rejected(stores, tmp_path):
    assert_checkpoint_of_another_family_is_rejected(RollingDiffusionForecaster, stores, tmp_path)


def test_family_is_registered_on_the_regional_grid_too(stores, analysis):
    assert "rolling" in FAMILIES and "rolling" in TRAINABLE
    forecaster = build_forecaster(rolling_config(stores, model={"grid": "regional", "sampler": "euler"}))
    assert isinstance(forecaster, RollingDiffusionForecaster) and forecaster.grids == (REGIONAL,)
    fc = forecaster.forecast(analysis[REGIONAL], steps=2, members=2, starts=STARTS)
    assert dict(fc.sizes) == {TIME: 2, LEAD: 2, MEMBER: 2, "level": 1, "latitude": 6, "longitude": 9}


# ----------------------------------------------------------------------------------------------
# Bad input: clear errors, nothing written
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"training": {"rollout": [{"at_step": 0, "steps": 1}, {"at_step": 5, "steps": 2}]}}, ConfigError,
         "trains whole windows"),
        ({"training": {"regional_loss_share": 0.3}}, ConfigError, "regional_loss_share applies to two-grid models"),
        ({"data": {"global_store": "REGIONAL"}}, SchemaError, "longitudes go round the globe"),
        ({"training": {"train_period": ["2001-01-01", None]}}, SchemaError, "training period"),
    ],
)
def test_bad_settings_are_rejected_before_writing(stores, tmp_path, change, error, message):
    data = dict(change.get("data", {}))
    if data.get("global_store") == "REGIONAL":
        data["global_store"] = str(stores[1])
    config = rolling_config(stores, model=change.get("model"), training=change.get("training"), data=data)
    assert_training_is_rejected_before_writing(config, tmp_path, error, message)


def test_config_rejects_a_flat_schedule(stores):
    with pytest.raises(ConfigError, match="rho must not be 0"):
        rolling_config(stores, model={"rho": 0.0})
    with pytest.raises(ConfigError, match="s_tmin"):
        rolling_config(stores, model={"churn": 2.0, "s_tmin": 5.0, "s_tmax": 1.0})

