"""forecasting.diffusion.conditional: the ``diffusion`` family end to end on the tiny stores of
tests/test_forecasters.py: ``forecast train`` lowers the denoising loss, ``forecast predict`` writes the forecast
layout with distinct, reproducible members whatever the batching, the residual convention of training and
inference agree, checkpoints round-trip, and bad input fails before anything is written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from forecasting.config import ConfigError, ExperimentConfig
from forecasting.data.store import open_store
from forecasting.diffusion.conditional import (
    ConditionalDiffusion,
    DenoisingObjective,
    DiffusionForecaster,
)
from forecasting.errors import SchemaError
from forecasting.forecasters import FAMILIES, GLOBAL, REGIONAL, build_forecaster
from forecasting.inference import with_sampling
from forecasting.schema import LEAD, MEMBER, TIME
from forecasting.training.checkpoint import load_checkpoint
from forecasting.training.train import TRAINABLE
from tests import diffusion_helpers
from tests.diffusion_helpers import (
    STARTS,
    assert_check_denoiser_reports_the_noise_left,
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

SMALL_MODEL = {"family": "diffusion", "base_channels": 8, "channel_mult": [1, 2], "embedding_dim": 16,
               "sampling_steps": 4, "member_batch": 4}


def diffusion_config(stores: tuple[Path, Path], *, model: dict | None = None, training: dict | None = None,
                     data: dict | None = None) -> ExperimentConfig:
    """A tiny conditional-diffusion experiment on ``stores`` (coarse, regional): 100 optimiser steps."""
    return tiny_experiment(
        stores, name="tiny-diffusion", model={**SMALL_MODEL, **(model or {})}, data=data,
        training={"max_steps": 100, "val_every": 50, "checkpoint_every": 100, **(training or {})},
    )


@pytest.fixture(scope="module")
def trained(stores, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """100 optimiser steps of ``forecast train`` on the global grid, with the loss on the validation windows
    before and after (same windows, same noise) and for a network that outputs zero."""
    return denoiser_training_run(
        diffusion_config(stores), tmp_path_factory.mktemp("diffusion-run"), DiffusionForecaster,
        lambda model: model.denoiser.network.out_conv.conv,
    )


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def test_training_lowers_the_denoising_loss(trained):
    """The zero network is the ideal denoiser of N(0, 1) residuals, ignoring the conditioning (loss about the
    residuals' variance): the trained model must use the conditioning to beat it, not only undo its random
    initialisation."""
    before, after, zero = trained["before"], trained["after"], trained["zero"]
    assert after < 0.75 * before and after < 0.8 * zero, (before, after, zero)
    checkpoint = load_checkpoint(trained["checkpoint"], family="diffusion")
    assert checkpoint.metadata["global_step"] == 100 and checkpoint.graph is None


def test_check_denoiser_reports_the_noise_left_at_each_level(trained, tmp_path, capsys):
    """``forecast check-denoiser``; ``--sampling sigma_min`` moves the lowest level the sampler visits."""
    table = assert_check_denoiser_reports_the_noise_left(
        trained["checkpoint"], tmp_path, capsys, sampling=["sigma_min=0.1"]
    )
    assert table.sigma.min() == pytest.approx(0.1, rel=1e-5)


def test_objective_weights_channels_and_latitudes_and_refuses_rollouts(stores):
    config = diffusion_config(stores, training={"variable_weights": {"2m_temperature": 0.0}})
    torch.manual_seed(0)
    setup = TRAINABLE["diffusion"](config)
    objective = setup.objective
    assert isinstance(objective, DenoisingObjective) and isinstance(setup.model, ConditionalDiffusion)
    names = build_forecaster(config).channels.names
    np.testing.assert_allclose(objective.channel_weights.numpy(), [2.0 if n != "2m_temperature" else 0.0 for n in names])
    weights = objective.area_weights.numpy()  # mean 1, larger at the equator than near the poles
    assert weights.mean() == pytest.approx(1.0) and weights[4] > 2 * weights[0]
    batch = torch.utils.data.default_collate([setup.train[i] for i in range(2)])
    metrics = objective(setup.model, batch, steps=1, generator=torch.Generator().manual_seed(0))
    assert set(metrics) == {"loss", "denoised_rmse"} and metrics["loss"].requires_grad
    with pytest.raises(ValueError, match="one step at a time"):
        objective(setup.model, batch, steps=2, generator=torch.Generator())


def test_training_target_is_the_residual_in_tendency_std_units(stores):
    """The clean target of a window is (x(t + 6 h) - x(t)) / tendency_std in physical units."""
    config = diffusion_config(stores)
    setup = TRAINABLE["diffusion"](config)
    forecaster = build_forecaster(config)
    window = setup.train[5]
    target = setup.model.residual(window["inputs"][None], window["targets"][None, 0])[0]  # (C, H, W)
    raw = forecaster.channels.stack(open_store(stores[0]).isel(time=[6, 7]))  # the window's last input, its target
    want = (raw[1] - raw[0]) / forecaster.normalisation.tendency_std[:, None, None]
    np.testing.assert_allclose(target.numpy(), want, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Forecasts
# ----------------------------------------------------------------------------------------------
def test_predict_writes_the_forecast_layout_with_distinct_reproducible_members(trained, tmp_path):
    fc = assert_predict_writes_distinct_reproducible_members(
        trained["checkpoint"], tmp_path, steps=2, family="diffusion", name="tiny-diffusion"
    )
    np.testing.assert_array_equal(fc[LEAD].values, pd.to_timedelta([6, 12], unit="h").values)
    assert fc["2m_temperature"].attrs["units"] == "K"


def test_spectral_filter_damps_the_small_scales_of_the_change_and_needs_the_global_grid(trained, analysis, stores):
    diffusion_helpers.assert_spectral_filter_damps_the_change_since_the_start(
        DiffusionForecaster, trained["checkpoint"], analysis[GLOBAL], steps=3
    )
    with pytest.raises(ConfigError, match="spectral_filter_hours needs the global grid"):
        build_forecaster(diffusion_config(stores, model={"grid": "regional", "spectral_filter_hours": 12.0}))


def test_renewed_perturbations_leave_the_first_lead_alone_and_come_every_k_leads(trained, analysis):
    """``--sampling window_perturbation=A``: after every lead (``perturbation_every`` 1, the default) the states
    the next step is conditioned on get a fresh smooth field; the first lead is the plain forecast's exactly.
    With ``perturbation_every=2`` the second lead is the plain one too and the third spreads more."""
    diffusion_helpers.assert_window_perturbations_leave_the_first_window_alone(
        DiffusionForecaster, trained["checkpoint"], analysis[GLOBAL], window=1, amplitude=10.0
    )
    ckpt = load_checkpoint(trained["checkpoint"])
    settings = {"window_perturbation": 10.0, "perturbation_length": 2.0}
    plain = DiffusionForecaster.from_checkpoint(ckpt).forecast(analysis[GLOBAL], steps=3, members=4, starts=STARTS,
                                                               seed=3)
    every_two = DiffusionForecaster.from_checkpoint(with_sampling(ckpt, {**settings, "perturbation_every": 2}))
    fc = every_two.forecast(analysis[GLOBAL], steps=3, members=4, starts=STARTS, seed=3)
    xr.testing.assert_equal(fc.isel({LEAD: slice(0, 2)}), plain.isel({LEAD: slice(0, 2)}))

    def spread(ds: xr.Dataset) -> float:
        return float(ds.isel({LEAD: 2}).std(MEMBER).to_array().mean())

    assert spread(fc) > 1.5 * spread(plain), (spread(fc), spread(plain))
    with pytest.raises(ConfigError, match="perturbation_every"):
        with_sampling(ckpt, {"perturbation_every": 0})


def test_members_do_not_depend_on_the_batching(trained, analysis):
    forecaster = DiffusionForecaster.from_checkpoint(load_checkpoint(trained["checkpoint"]))
    together = assert_members_do_not_depend_on_the_batching(forecaster, analysis[GLOBAL], steps=2)
    # Member 1 of start 2 is the same in a forecast of that start alone.
    alone = forecaster.forecast(analysis[GLOBAL], steps=2, members=2, starts=STARTS[1:], seed=7)
    xr.testing.assert_allclose(alone.isel({MEMBER: 1}), together.isel({TIME: [1], MEMBER: 1}), rtol=1e-5)


def test_predict_sampling_settings_replace_the_checkpoints_for_one_forecast(trained, tmp_path):
    """``--sampling`` changes how the trained network is sampled (here Euler in 2 steps instead of Heun in 4)
    and the forecast's config attribute says so; the checkpoint is untouched."""
    from forecasting.cli import main
    from forecasting.inference import open_forecast, predict

    checkpoint = trained["checkpoint"]
    before = checkpoint.read_bytes()
    common = ["predict", "--checkpoint", str(checkpoint), "--start", STARTS[0], "--members", "2", "--steps", "2"]
    assert main([*common, "--out", str(tmp_path / "default.zarr")]) == 0
    assert main([*common, "--out", str(tmp_path / "euler.zarr"), "--sampling", "sampler=euler",
                 "--sampling", "sampling_steps=2"]) == 0
    default, euler = open_forecast(tmp_path / "default.zarr").load(), open_forecast(tmp_path / "euler.zarr").load()
    assert not np.allclose(default["geopotential"].values, euler["geopotential"].values)
    assert np.isfinite(euler["geopotential"].values).all()
    model = json.loads(euler.attrs["config"])["model"]
    assert (model["sampler"], model["sampling_steps"]) == ("euler", 2)
    assert json.loads(default.attrs["config"])["model"]["sampler"] == "heun"
    assert default.attrs["config_hash"] != euler.attrs["config_hash"]
    # the same settings through the Python API give the same forecast
    again = predict(checkpoint, starts=STARTS[:1], members=2, steps=2, out=tmp_path / "again.zarr",
                    sampling={"sampler": "euler", "sampling_steps": 2})
    xr.testing.assert_equal(open_forecast(again).load()[["geopotential"]], euler[["geopotential"]])
    assert checkpoint.read_bytes() == before


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("input_steps=1", r"no sampling setting \['input_steps'\]; it has \['sampler', 'sampling_steps'"),
        ("sampler=rk4", "sampler"),
        ("sampling_steps=0", "sampling_steps"),
        ("sampling_steps", "--sampling expects KEY=VALUE"),
    ],
)
def test_predict_rejects_bad_sampling_settings_before_writing(trained, tmp_path, capsys, setting, message):
    from forecasting.cli import main

    out = tmp_path / "fc.zarr"
    assert main(["predict", "--checkpoint", str(trained["checkpoint"]), "--start", STARTS[0], "--steps", "1",
                 "--out", str(out), "--sampling", setting]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not list(tmp_path.iterdir())  # nothing written


def test_inference_adds_the_sampled_residual_times_the_tendency_std(stores, analysis):
    """With a denoiser that returns a constant residual r, every sampler ends at r: the first lead is
    x(t) + r * tendency_std and the second x(t) + 2 r * tendency_std (the residual convention of training)."""
    forecaster = build_forecaster(diffusion_config(stores, model={"grid": "regional", "sampler": "dpmpp_2m"}))
    assert isinstance(forecaster, DiffusionForecaster) and forecaster.grids == (REGIONAL,)
    residual = torch.tensor([0.5, -1.0])  # per channel: geopotential@500, 2m_temperature

    class ConstantResidual(torch.nn.Module):
        def forward(self, x, sigma, condition=None, *, lead_time=None):
            return residual[None, :, None, None].expand_as(x)

    forecaster.model.denoiser = ConstantResidual()
    fc = forecaster.forecast(analysis[REGIONAL], steps=2, members=2, starts=STARTS)
    assert dict(fc.sizes) == {TIME: 2, LEAD: 2, MEMBER: 2, "level": 1, "latitude": 6, "longitude": 9}
    names = forecaster.channels.names
    start = forecaster.channels.stack(analysis[REGIONAL].sel(time=STARTS))  # (2, C, H, W)
    got = forecaster.channels.stack(fc.transpose(TIME, LEAD, MEMBER, ...))  # (2, 2, 2, C, H, W)
    step = residual.numpy().astype(np.float64) * forecaster.normalisation.tendency_std
    for lead in (0, 1):
        want = start + (lead + 1) * step[:, None, None]
        for member in (0, 1):
            np.testing.assert_allclose(got[:, lead, member], want, rtol=2e-6, atol=1e-3 * np.abs(step).max(),
                                       err_msg=str(names))


def test_checkpoint_round_trip_gives_identical_forecasts(trained, analysis, tmp_path):
    assert_checkpoint_round_trip_gives_identical_forecasts(
        DiffusionForecaster, trained, analysis[GLOBAL], tmp_path, steps=2
    )


def test_checkpoint_of_another_family_is_rejected(stores, tmp_path):
    assert_checkpoint_of_another_family_is_rejected(DiffusionForecaster, stores, tmp_path)


def test_family_is_registered_for_building_and_training(stores):
    assert "diffusion" in FAMILIES and "diffusion" in TRAINABLE
    forecaster = build_forecaster(diffusion_config(stores))
    assert isinstance(forecaster, DiffusionForecaster) and forecaster.family == "diffusion"
    assert forecaster.grids == (GLOBAL,) and forecaster.input_steps == 2


# ----------------------------------------------------------------------------------------------
# Bad input: clear errors, nothing written
# ----------------------------------------------------------------------------------------------
def test_variable_not_in_the_store_is_rejected_before_writing(stores, tmp_path):
    config = diffusion_config(stores, data={"variables": ["geopotential", "total_cloud_cover"]})
    assert_training_is_rejected_before_writing(
        config, tmp_path, SchemaError, r"global\.zarr: variables \['total_cloud_cover'\] are not in the store"
    )


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"training": {"rollout": [{"at_step": 0, "steps": 1}, {"at_step": 5, "steps": 2}]}}, ConfigError,
         "trains one step at a time"),
        ({"training": {"regional_loss_share": 0.3}}, ConfigError, "regional_loss_share applies to two-grid models"),
        ({"training": {"variable_weights": {"humidity": 1.0}}}, ConfigError, r"names \['humidity'\]"),
        ({"data": {"regional_store": None}, "model": {"grid": "regional"}}, ConfigError,
         "model.grid 'regional' needs data.regional_store"),
        ({"data": {"global_store": "REGIONAL"}}, SchemaError, "longitudes go round the globe"),
        ({"training": {"train_period": ["2001-01-01", None]}}, SchemaError, "training period"),
    ],
)
def test_bad_settings_are_rejected_before_writing(stores, tmp_path, change, error, message):
    data = dict(change.get("data", {}))
    if data.get("global_store") == "REGIONAL":
        data["global_store"] = str(stores[1])
    config = diffusion_config(stores, model=change.get("model"), training=change.get("training"), data=data)
    assert_training_is_rejected_before_writing(config, tmp_path, error, message)
