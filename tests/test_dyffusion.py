"""forecasting.diffusion.dyffusion: the ``dyffusion`` family. The stochastic interpolator keeps its dropout when
forecasting, cold sampling (Algorithm 2) yields every intermediate lead and chains windows, and end to end on the
tiny stores of tests/test_forecasters.py: one ``forecast train`` trains the interpolator, then the forecaster with
the interpolator frozen, lowering both losses; ``forecast predict`` writes distinct, reproducible members;
members do not depend on the batching; checkpoints round-trip; bad settings fail before anything is written."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from lightning.fabric.utilities.seed import seed_everything

from forecasting.config import ConfigError, ExperimentConfig
from forecasting.diffusion import conditional
from forecasting.diffusion.dyffusion import (
    DYffusion,
    DYffusionForecaster,
    DYffusionObjective,
    network_evaluations,
    sampling_schedule,
)
from forecasting.errors import SchemaError
from forecasting.forecasters import FAMILIES, GLOBAL, build_forecaster
from forecasting.inference import with_sampling
from forecasting.schema import LEAD, MEMBER, TIME
from forecasting.training.checkpoint import load_checkpoint
from forecasting.training.train import TRAINABLE, train
from tests import diffusion_helpers
from tests.diffusion_helpers import (
    STARTS,
    assert_checkpoint_of_another_family_is_rejected,
    assert_checkpoint_round_trip_gives_identical_forecasts,
    assert_members_do_not_depend_on_the_batching,
    assert_predict_writes_distinct_reproducible_members,
    assert_training_is_rejected_before_writing,
    tiny_experiment,
    train_with_cli,
    validation_batch,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

stores = diffusion_helpers.stores  # the shared module-scoped fixtures
analysis = diffusion_helpers.analysis

HORIZON = 3
STAGE_ONE, MAX_STEPS = 40, 90
SMALL_MODEL = {"family": "dyffusion", "base_channels": 8, "channel_mult": [1, 2], "embedding_dim": 16,
               "horizon": HORIZON, "input_steps": 2, "interpolator_steps": STAGE_ONE, "member_batch": 4}


def dyffusion_config(stores: tuple[Path, Path], *, model: dict | None = None, training: dict | None = None,
                     data: dict | None = None) -> ExperimentConfig:
    """A tiny DYffusion experiment on ``stores`` (coarse, regional): 40 interpolator and 50 forecaster steps."""
    return tiny_experiment(
        stores, name="tiny-dyffusion", model={**SMALL_MODEL, **(model or {})}, data=data,
        training={"max_steps": MAX_STEPS, "weight_decay": 0.01, "val_every": STAGE_ONE,
                  "checkpoint_every": MAX_STEPS, **(training or {})},
    )


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def trained(stores, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One ``forecast train`` of both stages (40 + 50 steps) and one stopped at the end of stage 1, the initial
    weights, and the validation losses of both stages before and after (same windows, same noise and dropout)."""
    config = dyffusion_config(stores)
    root = tmp_path_factory.mktemp("dyffusion-run")
    seed_everything(0, verbose=False)  # as train() does before building the model: the same initial weights
    setup = TRAINABLE["dyffusion"](config)
    initial = _state(setup.model)
    batch = validation_batch(setup)

    def losses(model: DYffusion) -> dict[str, float]:
        out = {}
        saved = model.trained_steps.clone()
        for stage, counter in ((1, 0), (2, STAGE_ONE)):
            model.trained_steps.fill_(counter)
            torch.manual_seed(0)
            with torch.no_grad():
                metrics = setup.objective(model, batch, steps=1, generator=torch.Generator().manual_seed(0))
            assert metrics["stage"].item() == stage
            out[stage] = metrics["interpolation_rmse" if stage == 1 else "forecast_rmse"].item()
        model.trained_steps.copy_(saved)
        return out

    before = losses(setup.model)
    checkpoint = train_with_cli(config, root, "full")
    stopped = train(config, out_dir=root / "stage1", max_steps=STAGE_ONE, progress=False)
    full = DYffusionForecaster.from_checkpoint(load_checkpoint(checkpoint))
    return {"config": config, "checkpoint": checkpoint, "initial": initial, "before": before,
            "after": losses(full.model), "full": _state(full.model),
            "stage1": _state(DYffusionForecaster.from_checkpoint(load_checkpoint(stopped.checkpoint)).model)}


def _fake(horizon: int, calls: dict[str, int], end_change: float):
    """A forecaster that predicts ``x_t + end_change`` and an exact linear interpolator, counting calls."""

    def forecast(state, states, i, forcings, static, generators=None):
        calls["forecaster"] += 1
        return states[:, -1] + end_change

    def interpolate(states, end, i, forcings, static, generators=None):
        calls["interpolator"] += 1
        return states[:, -1] + (i / horizon).view(-1, 1, 1, 1) * (end - states[:, -1])

    return forecast, interpolate


# ----------------------------------------------------------------------------------------------
# The networks and the sampler
# ----------------------------------------------------------------------------------------------
def _tiny_model(*, forecaster_dropout: float = 0.0, forecaster_dropout_at_inference: bool = False) -> DYffusion:
    return DYffusion(
        n_channels=2, n_forcings=4, n_static=1, input_steps=2, horizon=HORIZON, step_hours=6.0,
        latitude=np.linspace(-60, 60, 4), residual_scale=np.array([2.0, 0.5]), periodic_lon=True,
        interpolator_dropout=0.3, forecaster_dropout_at_inference=forecaster_dropout_at_inference,
        unet={"base_channels": 8, "channel_mult": (1,), "embedding_dim": 8, "dropout": forecaster_dropout},
    )


def test_interpolator_dropout_stays_on_when_forecasting_and_the_forecaster_is_deterministic():
    torch.manual_seed(0)
    model = _tiny_model().eval()
    states, end = torch.randn(2, 2, 2, 4, 6), torch.randn(2, 2, 4, 6)
    forcings, static, i = torch.randn(2, 4, 4, 4, 6), torch.randn(2, 1, 4, 6), torch.tensor([1.0, 2.0])
    with torch.no_grad():
        first = model.interpolate(states, end, i, forcings, static)
        second = model.interpolate(states, end, i, forcings, static)
        assert not torch.allclose(first, second)  # a stochastic interpolator
        torch.testing.assert_close(model.forecast(end, states, i, forcings, static),
                                   model.forecast(end, states, i, forcings, static), rtol=0, atol=0)


def test_forecaster_dropout_at_inference_makes_the_forecaster_stochastic_and_seedable():
    torch.manual_seed(0)
    states, state = torch.randn(2, 2, 2, 4, 6), torch.randn(2, 2, 4, 6)
    forcings, static, i = torch.randn(2, 4, 4, 4, 6), torch.randn(2, 1, 4, 6), torch.tensor([0.0, 1.0])
    off = _tiny_model(forecaster_dropout=0.2).eval()  # dropout trained, but off when forecasting
    on = _tiny_model(forecaster_dropout=0.2, forecaster_dropout_at_inference=True).eval()
    on.load_state_dict(off.state_dict())

    def generators(seed: int) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(seed + row) for row in range(2)]

    with torch.no_grad():
        torch.testing.assert_close(off.forecast(state, states, i, forcings, static, generators=generators(0)),
                                   off.forecast(state, states, i, forcings, static, generators=generators(1)),
                                   rtol=0, atol=0)
        first = on.forecast(state, states, i, forcings, static, generators=generators(0))
        torch.testing.assert_close(first, on.forecast(state, states, i, forcings, static, generators=generators(0)),
                                   rtol=0, atol=0)  # the same masks from the same generators
        other = on.forecast(state, states, i, forcings, static, generators=generators(1))
        assert not torch.allclose(first, other)
        assert torch.isfinite(other).all()


def test_sampling_schedule_adds_extra_steps_before_the_first_whole_step():
    assert sampling_schedule(3, 3) == [0.0, 1.0, 2.0]
    assert sampling_schedule(3, 5) == [0.0, 1 / 3, 2 / 3, 1.0, 2.0]
    assert network_evaluations(3, 5) == {"forecaster": 5, "interpolator": 8}
    with pytest.raises(ValueError, match="steps >= horizon"):
        sampling_schedule(3, 2)


@pytest.mark.parametrize("steps", [HORIZON, HORIZON + 2])
def test_cold_sampling_yields_every_intermediate_lead_on_the_interpolated_path(steps):
    """With F returning x_{t+h} and I exact linear interpolation, s^(n) telescopes to I(x_t, x_{t+h}, i_n): the
    whole steps 1 .. h come out in order on the straight path, with N + (2N - 2) network calls."""
    model = _tiny_model()
    calls = {"forecaster": 0, "interpolator": 0}
    model.forecast, model.interpolate = _fake(HORIZON, calls, end_change=0.6)
    states = torch.randn(2, 2, 2, 4, 6)
    seen = []
    out = list(model.cold_sample(states, torch.zeros(2, 1, 4, 6), lambda i: torch.zeros(2, 4, 4, 4, 6),
                                 sampling_schedule(HORIZON, steps)))
    for j, state in out:
        seen.append(j)
        torch.testing.assert_close(state, states[:, -1] + 0.6 * j / HORIZON, rtol=1e-5, atol=1e-5)
    assert seen == [1, 2, 3] and calls == network_evaluations(HORIZON, steps)


def test_an_estimate_offset_enters_the_interpolated_path_in_proportion_to_the_lead():
    """``estimate_offset`` is added to every forecaster estimate: with linear interpolation the state at lead j
    carries j / h of it, all of it at the horizon."""
    model = _tiny_model()
    calls = {"forecaster": 0, "interpolator": 0}
    model.forecast, model.interpolate = _fake(HORIZON, calls, end_change=0.6)
    states = torch.randn(2, 2, 2, 4, 6)
    offset = torch.randn(2, 2, 4, 6)
    out = list(model.cold_sample(states, torch.zeros(2, 1, 4, 6), lambda i: torch.zeros(2, 4, 4, 4, 6),
                                 sampling_schedule(HORIZON, HORIZON + 2), estimate_offset=offset))
    assert [j for j, _ in out] == [1, 2, 3]
    for j, state in out:
        torch.testing.assert_close(state, states[:, -1] + (0.6 + offset) * j / HORIZON, rtol=1e-5, atol=1e-5)


def test_estimate_perturbations_spread_the_first_window_and_repeat_for_a_seed(trained, analysis):
    """``--sampling estimate_perturbation=A``: one fresh field per member and window added to the forecaster's
    estimates. 0 is the plain forecast exactly; A > 0 spreads every window, repeats for a seed and does not
    depend on the batching."""
    ckpt = load_checkpoint(trained["checkpoint"])
    steps = 2 * HORIZON
    plain = DYffusionForecaster.from_checkpoint(ckpt).forecast(analysis[GLOBAL], steps=steps, members=3,
                                                              starts=STARTS, seed=7)
    zero = DYffusionForecaster.from_checkpoint(with_sampling(ckpt, {"estimate_perturbation": 0.0}))
    xr.testing.assert_equal(zero.forecast(analysis[GLOBAL], steps=steps, members=3, starts=STARTS, seed=7), plain)
    perturbed = DYffusionForecaster.from_checkpoint(with_sampling(ckpt, {"estimate_perturbation": 3.0}))
    first = assert_members_do_not_depend_on_the_batching(perturbed, analysis[GLOBAL], steps=steps)
    xr.testing.assert_equal(
        DYffusionForecaster.from_checkpoint(with_sampling(ckpt, {"estimate_perturbation": 3.0})).forecast(
            analysis[GLOBAL], steps=steps, members=3, starts=STARTS, seed=7),
        first,
    )

    def spread(fc: xr.Dataset, lead: int) -> float:
        return float(fc.isel({LEAD: lead}).std(MEMBER).to_array().mean())

    for lead in (0, HORIZON - 1, steps - 1):
        assert spread(first, lead) > 1.5 * spread(plain, lead), (lead, spread(first, lead), spread(plain, lead))
    assert np.isfinite(first.to_array().values).all()
    with pytest.raises(ConfigError, match="estimate_perturbation"):
        with_sampling(ckpt, {"estimate_perturbation": -1.0})


def _i_dependent_fake(horizon: int, calls: dict[str, int], seen: list[float]):
    """Stand-ins whose forecaster's estimate depends on the interpolation time: ``x_t + 0.5 (1 + i)`` (so cold
    sampling, which asks at every whole step, ends elsewhere than direct sampling), recording each ``i``; the
    interpolator is exact linear interpolation."""
    _, interpolate = _fake(horizon, calls, end_change=0.0)

    def forecast(state, states, i, forcings, static, generators=None):
        calls["forecaster"] += 1
        seen.append(float(i[0]))
        return states[:, -1] + 0.5 * (1.0 + i).view(-1, 1, 1, 1)

    return forecast, interpolate


def test_direct_sampling_calls_the_forecaster_once_and_interpolates_towards_its_estimate():
    """``direct``: one forecaster call, at i = 0 from x_t; its estimate (plus the offset) is the window's end and
    the whole steps between are I(x_t, estimate, j); h - 1 interpolator calls. Cold sampling of the same networks
    asks the forecaster at every whole step and ends at its last estimate's value."""
    model = _tiny_model()
    states = torch.randn(2, 2, 2, 4, 6)
    offset = torch.randn(2, 2, 4, 6)
    static, forcings = torch.zeros(2, 1, 4, 6), (lambda i: torch.zeros(2, 4, 4, 4, 6))
    calls, seen = {"forecaster": 0, "interpolator": 0}, []
    model.forecast, model.interpolate = _i_dependent_fake(HORIZON, calls, seen)
    out = list(model.sample_window("direct", states, static, forcings, [0.0], estimate_offset=offset))
    assert [j for j, _ in out] == [1, 2, 3] and seen == [0.0]
    assert calls == network_evaluations(HORIZON, HORIZON, "direct") == {"forecaster": 1, "interpolator": HORIZON - 1}
    for j, state in out:
        torch.testing.assert_close(state, states[:, -1] + (0.5 + offset) * j / HORIZON, rtol=1e-5, atol=1e-5)

    calls, seen = {"forecaster": 0, "interpolator": 0}, []
    model.forecast, model.interpolate = _i_dependent_fake(HORIZON, calls, seen)
    cold = list(model.sample_window("cold", states, static, forcings, sampling_schedule(HORIZON, HORIZON)))
    assert seen == [0.0, 1.0, 2.0] and calls == network_evaluations(HORIZON, HORIZON, "cold")
    assert not torch.allclose(cold[-1][1], out[-1][1])
    with pytest.raises(ValueError, match="unknown DYffusion sampler 'warm'"):
        model.sample_window("warm", states, static, forcings, [0.0])
    with pytest.raises(ValueError, match="unknown DYffusion sampler"):
        network_evaluations(HORIZON, HORIZON, "warm")


@pytest.mark.parametrize("sampler", ["cold", "direct"])
def test_forecasts_beyond_the_horizon_chain_windows_from_the_last_state(stores, analysis, sampler):
    forecaster = build_forecaster(dyffusion_config(stores, model={"sampler": sampler}))
    assert isinstance(forecaster, DYffusionForecaster)
    calls = {"forecaster": 0, "interpolator": 0}
    forecaster.model.forecast, forecaster.model.interpolate = _fake(HORIZON, calls, end_change=0.6)
    steps = 2 * HORIZON + 1
    fc = forecaster.forecast(analysis[GLOBAL], steps=steps, members=2, starts=STARTS)
    assert dict(fc.sizes) == {TIME: 2, LEAD: steps, MEMBER: 2, "level": 1, "latitude": 8, "longitude": 16}
    np.testing.assert_array_equal(fc[LEAD].values, pd.to_timedelta(6 * np.arange(1, steps + 1), unit="h").values)
    start = forecaster.channels.stack(analysis[GLOBAL].sel(time=STARTS))  # (2, C, H, W)
    got = forecaster.channels.stack(fc.isel({MEMBER: 0}).transpose(TIME, LEAD, ...))  # (2, steps, C, H, W)
    std = forecaster.normalisation.std[:, None, None]
    for lead in range(1, steps + 1):  # the straight path continues through window boundaries
        np.testing.assert_allclose(got[:, lead - 1], start + 0.6 * lead / HORIZON * std, rtol=1e-5,
                                   atol=1e-4 * std.max())
    # 3 windows, 1 batch of 4 samples
    assert calls == {k: 3 * n for k, n in network_evaluations(HORIZON, HORIZON, sampler).items()}


# ----------------------------------------------------------------------------------------------
# Training: two stages in one run
# ----------------------------------------------------------------------------------------------
def test_one_train_call_trains_the_interpolator_then_the_forecaster_with_the_interpolator_frozen(trained):
    initial, stage1, full = trained["initial"], trained["stage1"], trained["full"]
    assert int(full["trained_steps"]) == MAX_STEPS and int(stage1["trained_steps"]) == STAGE_ONE
    interpolator = [k for k in initial if k.startswith("interpolator.")]
    forecaster = [k for k in initial if k.startswith("forecaster.")]
    assert interpolator and forecaster
    # Stage 1 trained the interpolator alone ...
    assert any(not torch.equal(stage1[k], initial[k]) for k in interpolator)
    assert all(torch.equal(stage1[k], initial[k]) for k in forecaster)
    # ... and stage 2 (weight decay on) left it exactly as stage 1 ended while training the forecaster.
    assert all(torch.equal(full[k], stage1[k]) for k in interpolator)
    assert any(not torch.equal(full[k], initial[k]) for k in forecaster)


def test_training_lowers_the_interpolation_and_forecast_errors(trained):
    before, after = trained["before"], trained["after"]
    assert after[1] < 0.8 * before[1] and after[2] < 0.8 * before[2], (before, after)
    checkpoint = load_checkpoint(trained["checkpoint"], family="dyffusion")
    assert checkpoint.metadata["global_step"] == MAX_STEPS and checkpoint.graph is None


def test_objective_stages_follow_the_step_counter(stores):
    setup = TRAINABLE["dyffusion"](dyffusion_config(stores, model={"lookahead_weight": 0.0}))
    objective, model = setup.objective, setup.model
    assert isinstance(objective, DYffusionObjective) and isinstance(model, DYffusion)
    batch = torch.utils.data.default_collate([setup.train[i] for i in range(3)])
    model.train()
    first = objective(model, batch, steps=1, generator=torch.Generator().manual_seed(0))
    assert first["stage"].item() == 1 and int(model.trained_steps) == 1 and "interpolation_rmse" in first
    model.trained_steps.fill_(STAGE_ONE)
    second = objective(model, batch, steps=1, generator=torch.Generator().manual_seed(0))
    assert second["stage"].item() == 2 and set(second) == {"stage", "loss", "forecast_rmse"}
    assert not any(p.requires_grad for p in model.interpolator.parameters())
    assert second["loss"].requires_grad
    with pytest.raises(ValueError, match="without rollouts"):
        objective(model, batch, steps=2, generator=torch.Generator())


def test_chained_windows_train_the_forecaster_from_its_own_sampled_states(stores):
    """training_windows K: the batch holds K windows of targets; stage 1 is unchanged (first window), stage 2
    samples k ~ U{0 .. K-1} windows with the model and trains on window k + 1 against its true end."""
    setup = TRAINABLE["dyffusion"](dyffusion_config(stores, model={"training_windows": 3, "lookahead_weight": 0.0}))
    objective, model = setup.objective, setup.model
    assert isinstance(objective, DYffusionObjective) and objective.training_windows == 3
    batch = torch.utils.data.default_collate([setup.train[i] for i in range(3)])
    assert batch["targets"].shape[1] == 3 * HORIZON and batch["forcings"].shape[1] == 2 + 3 * HORIZON
    model.train()
    first = objective(model, batch, steps=1, generator=torch.Generator().manual_seed(0))
    assert first["stage"].item() == 1 and "sampled_windows" not in first
    model.trained_steps.fill_(STAGE_ONE)
    seen: dict[int, float] = {}
    for seed in range(12):
        torch.manual_seed(0)
        metrics = objective(model, batch, steps=1, generator=torch.Generator().manual_seed(seed))
        assert metrics["stage"].item() == 2 and metrics["loss"].requires_grad
        seen[int(metrics["sampled_windows"])] = metrics["forecast_rmse"].item()
    assert set(seen) == {0, 1, 2}

    # Window k + 1 is trained from the states the model sampled over the first k windows: with stand-in
    # networks (the forecaster adds a constant change, the interpolator is linear) the sampled states are known
    # exactly, and the forecaster's loss is measured against window k + 1's true end.
    calls = {"forecaster": 0, "interpolator": 0}
    change = 0.25
    forecast, interpolate = _fake(HORIZON, calls, change)
    starts_seen: list[torch.Tensor] = []

    def recording_forecast(state, states, i, forcings, static, generators=None):
        starts_seen.append(states[:, -1].detach().clone())
        return forecast(state, states, i, forcings, static, generators)

    model.forecast, model.interpolate = recording_forecast, interpolate
    def drawn(seed: int) -> int:  # the objective's first draw from a generator of this seed
        return int(torch.randint(0, 3, (1,), generator=torch.Generator().manual_seed(seed)))

    seed = next(s for s in range(100) if drawn(s) == 2)
    metrics = objective(model, batch, steps=1, generator=torch.Generator().manual_seed(seed))
    assert int(metrics["sampled_windows"]) == 2
    # two sampled windows of HORIZON forecaster calls each, then the trained one's single call
    assert calls["forecaster"] == 2 * HORIZON + 1
    torch.testing.assert_close(starts_seen[-1], batch["inputs"][:, -1].float() + 2 * change)
    expected = torch.sqrt((((batch["inputs"][:, -1].float() + 3 * change - batch["targets"][:, 3 * HORIZON - 1].float())
                            * model.residual_scale) ** 2 * objective.point_weights(torch.device("cpu"))).mean())
    torch.testing.assert_close(metrics["forecast_rmse"], expected)


def test_chained_windows_sample_with_the_models_sampler(stores):
    """With ``sampler: direct`` the windows sampled before the trained one are sampled directly too: one
    forecaster call each, at i = 0."""
    config = dyffusion_config(stores, model={"training_windows": 3, "lookahead_weight": 0.0, "sampler": "direct"})
    setup = TRAINABLE["dyffusion"](config)
    objective, model = setup.objective, setup.model
    assert objective.sampler == "direct"
    batch = torch.utils.data.default_collate([setup.train[i] for i in range(2)])
    model.train()
    model.trained_steps.fill_(STAGE_ONE)
    calls, seen = {"forecaster": 0, "interpolator": 0}, []
    model.forecast, model.interpolate = _i_dependent_fake(HORIZON, calls, seen)

    def drawn(seed: int) -> int:  # the objective's first draw from a generator of this seed
        return int(torch.randint(0, 3, (1,), generator=torch.Generator().manual_seed(seed)))

    seed = next(s for s in range(100) if drawn(s) == 2)
    metrics = objective(model, batch, steps=1, generator=torch.Generator().manual_seed(seed))
    assert int(metrics["sampled_windows"]) == 2
    assert calls["forecaster"] == 2 + 1 and seen[:2] == [0.0, 0.0]
    with pytest.raises(ValueError, match="unknown DYffusion sampler"):
        DYffusionObjective(area_weights=np.ones(8), channel_weights=np.ones(4), interpolator_steps=1,
                           lookahead_weight=0.0, sampler="warm")


def test_forecaster_times_start_trains_the_forecaster_at_the_windows_start_only(stores):
    """``forecaster_times: start``: every stage-2 sample trains the forecaster at i = 0 from x_t itself (no
    interpolator call), against the window's true end; with ``all`` the times spread over 0 .. h-1."""
    def stage_two(model_settings: dict) -> dict:
        """Six stage-2 calls with stand-in networks: the times the forecaster was asked at, the call counts,
        the last metrics, the batch, the objective and the model."""
        setup = TRAINABLE["dyffusion"](dyffusion_config(stores, model=model_settings))
        objective, model = setup.objective, setup.model
        batch = torch.utils.data.default_collate([setup.train[i] for i in range(4)])
        model.train()
        model.trained_steps.fill_(STAGE_ONE)
        calls, times = {"forecaster": 0, "interpolator": 0}, []
        forecast, model.interpolate = _fake(HORIZON, calls, end_change=0.25)

        def recording(state, states, i, forcings, static, generators=None):
            times.extend(i.tolist())
            if bool((i == 0).all()):  # the window's start state itself
                torch.testing.assert_close(state, states[:, -1])
            return forecast(state, states, i, forcings, static, generators)

        model.forecast = recording
        for seed in range(6):
            metrics = objective(model, batch, steps=1, generator=torch.Generator().manual_seed(seed))
        return {"times": times, "calls": calls, "metrics": metrics, "batch": batch, "objective": objective,
                "model": model}

    start = stage_two({"sampler": "direct", "lookahead_weight": 0.0, "forecaster_times": "start"})
    assert start["objective"].forecaster_times == "start"
    assert set(start["times"]) == {0.0} and len(start["times"]) == 6 * 4
    assert start["calls"] == {"forecaster": 6, "interpolator": 0}
    inputs, end = start["batch"]["inputs"][:, -1].float(), start["batch"]["targets"][:, HORIZON - 1].float()
    expected = torch.sqrt((((inputs + 0.25 - end) * start["model"].residual_scale) ** 2
                           * start["objective"].point_weights(torch.device("cpu"))).mean())
    torch.testing.assert_close(start["metrics"]["forecast_rmse"], expected)
    every = stage_two({"sampler": "direct", "lookahead_weight": 0.0})
    assert set(every["times"]) == {float(i) for i in range(HORIZON)}


def test_forecaster_times_start_needs_the_direct_sampler_and_no_look_ahead(stores, trained):
    for model, found in (({"sampler": "cold", "lookahead_weight": 0.0}, "sampler 'cold' and lookahead_weight 0.0"),
                         ({"sampler": "direct", "lookahead_weight": 0.5}, "sampler 'direct' and lookahead_weight 0.5")):
        with pytest.raises(ConfigError, match=rf"forecaster_times 'start' trains .* found {found}"):
            dyffusion_config(stores, model={**model, "forecaster_times": "start"})
    with pytest.raises(ConfigError, match="forecaster_times"):
        dyffusion_config(stores, model={"forecaster_times": "middle"})
    with pytest.raises(ValueError, match="'start' has no look-ahead"):
        DYffusionObjective(area_weights=np.ones(8), channel_weights=np.ones(4), interpolator_steps=1,
                           lookahead_weight=0.5, forecaster_times="start")
    # a checkpoint trained at the start only cannot be cold-sampled (--sampling sampler=cold)
    ckpt = load_checkpoint(trained["checkpoint"])
    started = dataclasses.replace(ckpt, config={**ckpt.config, "model": {
        **ckpt.config["model"], "sampler": "direct", "lookahead_weight": 0.0, "forecaster_times": "start"}})
    assert DYffusionForecaster.from_checkpoint(with_sampling(started, {"initial_perturbation": 0.1}))
    with pytest.raises(ConfigError, match="forecaster_times 'start' trains .* found sampler 'cold'"):
        with_sampling(started, {"sampler": "cold"})


def test_chained_windows_are_refused_without_enough_targets(stores):
    setup = TRAINABLE["dyffusion"](dyffusion_config(stores, model={"training_windows": 2}))
    batch = torch.utils.data.default_collate([setup.train[i] for i in range(2)])
    batch["targets"] = batch["targets"][:, :HORIZON]
    with pytest.raises(ValueError, match=r"2 window\(s\) of a horizon of 3 steps need 6 targets; found 3"):
        setup.objective(setup.model, batch, steps=1, generator=torch.Generator())


# ----------------------------------------------------------------------------------------------
# Forecasts and checkpoints
# ----------------------------------------------------------------------------------------------
def test_predict_writes_distinct_reproducible_members(trained, tmp_path):
    assert_predict_writes_distinct_reproducible_members(
        trained["checkpoint"], tmp_path, steps=2 * HORIZON + 1, family="dyffusion", name="tiny-dyffusion"
    )


def test_members_do_not_depend_on_the_batching(trained, analysis):
    """Each sample's interpolator dropout has its own generator: the same members whatever the batches, over
    two chained windows; and a start forecast alone gets the members it gets among others."""
    forecaster = DYffusionForecaster.from_checkpoint(load_checkpoint(trained["checkpoint"]))
    together = assert_members_do_not_depend_on_the_batching(forecaster, analysis[GLOBAL], steps=HORIZON + 1)
    alone = forecaster.forecast(analysis[GLOBAL], steps=HORIZON + 1, members=3, starts=STARTS[1:], seed=7)
    xr.testing.assert_allclose(alone, together.isel({TIME: [1]}), rtol=1e-5)
    assert float(abs(together.isel({MEMBER: 0}) - together.isel({MEMBER: 1})).to_array().max()) > 0


def test_checkpoint_round_trip_gives_identical_forecasts(trained, analysis, tmp_path):
    second = assert_checkpoint_round_trip_gives_identical_forecasts(
        DYffusionForecaster, trained, analysis[GLOBAL], tmp_path, steps=4
    )
    assert int(second.model.trained_steps) == MAX_STEPS


def test_checkpoint_of_another_family_is_rejected(stores, tmp_path):
    assert "dyffusion" in FAMILIES and "dyffusion" in TRAINABLE
    assert_checkpoint_of_another_family_is_rejected(DYffusionForecaster, stores, tmp_path)


# ----------------------------------------------------------------------------------------------
# Bad input: clear errors, nothing written
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": {"interpolator_steps": MAX_STEPS}}, "so that the forecaster stage gets steps"),
        ({"training": {"rollout": [{"at_step": 0, "steps": 1}, {"at_step": 5, "steps": 2}]}}, "without rollouts"),
        ({"training": {"val_rollout_steps": 3}}, "validates whole windows"),
    ],
)
def test_bad_settings_are_rejected_before_writing(stores, tmp_path, change, message):
    config = dyffusion_config(stores, model=change.get("model"), training=change.get("training"))
    assert_training_is_rejected_before_writing(config, tmp_path, ConfigError, message)


def test_forecaster_dropout_at_inference_needs_a_forecaster_dropout(stores):
    with pytest.raises(ConfigError, match=r"forecaster_dropout_at_inference needs a forecaster dropout above 0"):
        dyffusion_config(stores, model={"forecaster_dropout_at_inference": True})
    assert dyffusion_config(stores, model={"forecaster_dropout_at_inference": True, "dropout": 0.1})


def test_forecaster_dropout_at_inference_is_a_sampling_choice(trained):
    """``--sampling forecaster_dropout_at_inference=...`` rebuilds the forecaster with Monte Carlo dropout on or
    off, validated like the config: on needs a forecaster trained with dropout (the tiny one has none)."""
    ckpt = load_checkpoint(trained["checkpoint"])
    off = DYffusionForecaster.from_checkpoint(with_sampling(ckpt, {"forecaster_dropout_at_inference": False}))
    assert off.model.forecaster.dropout_at_inference is False
    with pytest.raises(ConfigError, match="forecaster_dropout_at_inference needs a forecaster dropout above 0"):
        with_sampling(ckpt, {"forecaster_dropout_at_inference": True})


def test_config_needs_a_sampling_step_per_whole_step(stores):
    with pytest.raises(ConfigError, match=r"sampling_steps \(2\) must be at least the horizon \(3\)"):
        dyffusion_config(stores, model={"sampling_steps": 2})
    with pytest.raises(ConfigError, match=r"sampling_steps \(5\) sets the schedule of cold sampling"):
        dyffusion_config(stores, model={"sampling_steps": 5, "sampler": "direct"})
    with pytest.raises(ConfigError, match="sampler"):
        dyffusion_config(stores, model={"sampler": "warm"})


def test_the_sampler_is_a_sampling_choice(trained, analysis):
    """``--sampling sampler=direct`` samples the trained checkpoint directly: other forecasts than cold sampling,
    finite, spread over members, repeated for a seed and independent of the batching."""
    ckpt = load_checkpoint(trained["checkpoint"])
    cold = DYffusionForecaster.from_checkpoint(ckpt).forecast(analysis[GLOBAL], steps=2 * HORIZON, members=3,
                                                             starts=STARTS, seed=7)
    direct = DYffusionForecaster.from_checkpoint(with_sampling(ckpt, {"sampler": "direct"}))
    assert direct.schedule == [0.0]
    first = assert_members_do_not_depend_on_the_batching(direct, analysis[GLOBAL], steps=2 * HORIZON)
    again = DYffusionForecaster.from_checkpoint(with_sampling(ckpt, {"sampler": "direct"})).forecast(
        analysis[GLOBAL], steps=2 * HORIZON, members=3, starts=STARTS, seed=7)
    xr.testing.assert_equal(again, first)
    assert np.isfinite(first.to_array().values).all()
    assert float(abs(first - cold).to_array().max()) > 0
    assert float(first.std(MEMBER).to_array().mean()) > 0


def test_a_perturbation_map_follows_the_stores_change_deviations(trained, analysis):
    """``--sampling perturbation_map_hours=H``: every perturbation field is shaped by the std of the H-hour change
    at each point over the store's statistics period (scaled to unit area-weighted rms); the forecast then
    differs from the unshaped one. A store without its ``train_period`` is refused, naming the attribute."""
    ckpt = load_checkpoint(trained["checkpoint"])
    settings = {"initial_perturbation": 2.0, "estimate_perturbation": 1.0}
    plain = DYffusionForecaster.from_checkpoint(with_sampling(ckpt, settings))
    shaped = DYffusionForecaster.from_checkpoint(with_sampling(ckpt, {**settings, "perturbation_map_hours": 12.0}))
    ds = analysis[GLOBAL]
    a = plain.forecast(ds, steps=HORIZON, members=3, starts=STARTS, seed=7)
    b = shaped.forecast(ds, steps=HORIZON, members=3, starts=STARTS, seed=7)
    assert plain.perturbation_map is None and shaped.perturbation_map is not None
    period = slice(*ds.attrs["train_period"])
    sub = ds[list(shaped.channels.variables)].sel(time=period)
    change = (sub.shift(time=-2) - sub).isel(time=slice(None, -2))  # 12 h = 2 steps of the tiny store
    std = shaped.channels.stack(change.std("time"))
    weights = np.cos(np.deg2rad(shaped.latitude))[:, None]
    want = std / np.sqrt((std**2 * weights).sum(axis=(1, 2)) / (weights.sum() * std.shape[2]))[:, None, None]
    np.testing.assert_allclose(shaped.perturbation_map.numpy(), want, rtol=1e-4)
    assert np.isfinite(b.to_array().values).all()
    assert float(abs(a - b).to_array().max()) > 0

    # On a long store a fixed random subset of the pairs is used: the same every time, unit rms, not the full map
    assert change.sizes["time"] > 6
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(conditional, "PERTURBATION_MAP_PAIRS", 6)
        subset, again = shaped._perturbation_map(ds).numpy(), shaped._perturbation_map(ds).numpy()
    np.testing.assert_array_equal(subset, again)
    assert np.isfinite(subset).all() and not np.allclose(subset, want, rtol=1e-3)
    np.testing.assert_allclose(np.sqrt((subset**2 * weights).sum(axis=(1, 2)) / (weights.sum() * std.shape[2])), 1.0,
                               rtol=1e-5)

    bare = ds.copy()
    bare.attrs = {k: v for k, v in ds.attrs.items() if k != "train_period"}
    message = "perturbation_map_hours needs the store's statistics period .*'train_period'"
    with pytest.raises(SchemaError, match=message):
        shaped.forecast(bare, steps=1, members=2, starts=STARTS)
    with pytest.raises(ConfigError, match="perturbation_map_power"):
        with_sampling(ckpt, {"perturbation_map_power": 0.0})


def test_initial_perturbations_add_reproducible_spread_and_none_leaves_the_forecast_alone(trained, analysis):
    """``--sampling initial_perturbation=A``: each member starts from its own smooth perturbation of the analysis
    (forecasting.diffusion.perturbations); the same seed gives the same members, and 0 is the checkpoint's
    forecast exactly."""
    ckpt = load_checkpoint(trained["checkpoint"])
    plain = DYffusionForecaster.from_checkpoint(ckpt).forecast(analysis[GLOBAL], steps=2, members=4,
                                                              starts=STARTS, seed=3)
    zero = DYffusionForecaster.from_checkpoint(with_sampling(ckpt, {"initial_perturbation": 0.0}))
    xr.testing.assert_equal(zero.forecast(analysis[GLOBAL], steps=2, members=4, starts=STARTS, seed=3), plain)
    perturbed = DYffusionForecaster.from_checkpoint(
        with_sampling(ckpt, {"initial_perturbation": 3.0, "perturbation_length": 2.0})
    )
    first = perturbed.forecast(analysis[GLOBAL], steps=2, members=4, starts=STARTS, seed=3)
    xr.testing.assert_equal(perturbed.forecast(analysis[GLOBAL], steps=2, members=4, starts=STARTS, seed=3), first)

    def spread(fc: xr.Dataset) -> float:
        return float(fc.isel({LEAD: 0}).std(MEMBER).to_array().mean())

    assert spread(first) > 1.5 * spread(plain), (spread(first), spread(plain))
    with pytest.raises(ConfigError, match="initial_perturbation"):
        with_sampling(ckpt, {"initial_perturbation": -1.0})


def test_window_perturbations_leave_the_first_window_alone_and_add_spread_after_it(trained, analysis):
    """``--sampling window_perturbation=A``: a fresh smooth field at the start of every window after the first;
    the first window's leads are the plain forecast's exactly, later leads spread more."""
    diffusion_helpers.assert_window_perturbations_leave_the_first_window_alone(
        DYffusionForecaster, trained["checkpoint"], analysis[GLOBAL], window=HORIZON, amplitude=3.0
    )



def test_spectral_filter_damps_the_small_scales_of_the_change(trained, analysis):
    diffusion_helpers.assert_spectral_filter_damps_the_change_since_the_start(
        DYffusionForecaster, trained["checkpoint"], analysis[GLOBAL], steps=2 * HORIZON
    )


def test_perturbation_scales_set_each_channels_share_and_name_unknown_keys(trained, analysis):
    """``perturbation_scales`` multiplies the perturbation amplitude per variable or channel (a channel's own
    value wins); zero everywhere is the plain forecast exactly; unknown names and negative values fail."""
    ckpt = load_checkpoint(trained["checkpoint"])
    plain = DYffusionForecaster.from_checkpoint(ckpt)
    variables = plain.channels.variables
    base = plain.perturbation_scale.numpy()
    names = plain.channels.names
    first = names[0]
    scaled = DYffusionForecaster.from_checkpoint(
        with_sampling(ckpt, {"perturbation_scales": {variables[0]: 0.5, first: 2.0}})
    )
    expected = base.copy()
    expected[[n.split("@")[0] == variables[0] for n in names]] *= 0.5
    expected[0] = 2.0 * base[0]
    np.testing.assert_allclose(scaled.perturbation_scale.numpy(), expected, rtol=1e-6)

    off = DYffusionForecaster.from_checkpoint(with_sampling(ckpt, {
        "initial_perturbation": 3.0, "window_perturbation": 3.0, "perturbation_scales": dict.fromkeys(variables, 0.0),
    }))
    steps = 2 * HORIZON
    xr.testing.assert_equal(
        off.forecast(analysis[GLOBAL], steps=steps, members=2, starts=STARTS, seed=3),
        plain.forecast(analysis[GLOBAL], steps=steps, members=2, starts=STARTS, seed=3),
    )
    with pytest.raises(ConfigError, match=r"model.perturbation_scales names \['not_a_variable'\]"):
        DYffusionForecaster.from_checkpoint(with_sampling(ckpt, {"perturbation_scales": {"not_a_variable": 1.0}}))
    with pytest.raises(ConfigError, match="perturbation_scales"):
        with_sampling(ckpt, {"perturbation_scales": {variables[0]: -1.0}})


def test_initial_perturbation_scales_size_the_start_alone(trained, analysis):
    """``initial_perturbation_scales`` multiplies the initial perturbation per variable or channel on top of
    ``perturbation_scales`` and leaves the perturbations renewed at later windows as they are; unknown names and
    negative values fail, naming the key."""
    ckpt = load_checkpoint(trained["checkpoint"])
    plain = DYffusionForecaster.from_checkpoint(ckpt)
    variables = plain.channels.variables
    names = plain.channels.names
    scaled = DYffusionForecaster.from_checkpoint(
        with_sampling(ckpt, {"initial_perturbation_scales": {variables[0]: 3.0}})
    )
    states = torch.zeros(2, 2, len(names), len(plain.latitude), len(plain.longitude))

    def field(initial: bool) -> torch.Tensor:
        generators = [torch.Generator().manual_seed(i) for i in range(2)]
        return scaled._perturbed(states, generators, 1.0, initial=initial)

    start, later = field(True), field(False)
    want = np.array([3.0 if n.split("@")[0] == variables[0] else 1.0 for n in names])
    for c, factor in enumerate(want):
        torch.testing.assert_close(start[:, :, c], factor * later[:, :, c])
    np.testing.assert_allclose(scaled.perturbation_scale.numpy(), plain.perturbation_scale.numpy())

    # No initial perturbation in any channel: the forecast with renewed ones only, exactly
    settings = {"initial_perturbation": 3.0, "window_perturbation": 3.0, "estimate_perturbation": 0.0}
    off = DYffusionForecaster.from_checkpoint(
        with_sampling(ckpt, {**settings, "initial_perturbation_scales": dict.fromkeys(variables, 0.0)})
    )
    renewed = DYffusionForecaster.from_checkpoint(with_sampling(ckpt, {**settings, "initial_perturbation": 0.0}))
    steps = 2 * HORIZON
    a = off.forecast(analysis[GLOBAL], steps=steps, members=2, starts=STARTS, seed=3)
    xr.testing.assert_equal(a, renewed.forecast(analysis[GLOBAL], steps=steps, members=2, starts=STARTS, seed=3))
    assert float(a.isel({LEAD: -1}).std(MEMBER).to_array().mean()) > 0
    with pytest.raises(ConfigError, match=r"model.initial_perturbation_scales names \['not_a_variable'\]"):
        DYffusionForecaster.from_checkpoint(
            with_sampling(ckpt, {"initial_perturbation_scales": {"not_a_variable": 1.0}})
        )
    with pytest.raises(ConfigError, match="initial_perturbation_scales"):
        with_sampling(ckpt, {"initial_perturbation_scales": {variables[0]: -1.0}})
