"""What the tests of the one-grid diffusion families share (tests/test_conditional_diffusion.py,
tests/test_rolling_diffusion.py, tests/test_dyffusion.py): tiny experiment configs on the stores of
tests/test_forecasters.py, the module-scoped ``stores`` and ``analysis`` fixtures, a ``forecast train`` run with
losses before and after, and the checks every family passes (``forecast predict`` output, checkpoint round
trip, checkpoints of another family, bad settings rejected before anything is written).

Import the fixtures by name into a test module (``from tests.diffusion_helpers import analysis, stores``); each
test module gets its own stores.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
import yaml

from forecasting.cli import main
from forecasting.config import ExperimentConfig, parse_config
from forecasting.data.store import open_store
from forecasting.diffusion.conditional import OneGridDiffusionForecaster
from forecasting.errors import SchemaError
from forecasting.forecasters import GLOBAL, REGIONAL, build_forecaster
from forecasting.inference import open_forecast, predict
from forecasting.schema import LEAD, MEMBER, TIME
from forecasting.training.checkpoint import load_checkpoint
from forecasting.training.train import TRAINABLE, TrainingSetup, train
from tests.test_forecasters import TRAIN_END, VAL_START, graph_config, make_stores

#: Two start times inside the validation period of the tiny stores.
STARTS = ["2000-01-12T00", "2000-01-13T06"]
#: Dims of a three-member forecast of STARTS on the tiny global grid, without the lead dim.
GLOBAL_SIZES = {TIME: 2, MEMBER: 3, "level": 1, "latitude": 8, "longitude": 16}


def tiny_experiment(
    stores: tuple[Path, Path],
    *,
    name: str,
    model: dict[str, Any],
    training: dict[str, Any],
    data: dict[str, Any] | None = None,
) -> ExperimentConfig:
    """An experiment on ``stores`` (coarse, regional): ``model`` as given; training on the stores' training
    period, validation on the rest, batches of 8, learning rate 3e-3 after 5 warm-up steps, 2 validation
    batches, updated with ``training`` (at least ``max_steps``, ``val_every`` and ``checkpoint_every``)."""
    return parse_config({
        "name": name,
        "model": model,
        "data": {"global_store": str(stores[0]), "regional_store": str(stores[1]), **(data or {})},
        "training": {"train_period": [None, TRAIN_END], "val_period": [VAL_START, None], "batch_size": 8,
                     "learning_rate": 3e-3, "warmup_steps": 5, "val_batches": 2, **training},
    })


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny coarse global and fine regional stores of tests/test_forecasters.py (one pair per test module)."""
    return make_stores(tmp_path_factory.mktemp("stores"))


@pytest.fixture(scope="module")
def analysis(stores) -> dict[str, xr.Dataset]:
    """The two stores in memory, by grid name: initial conditions for forecasts."""
    return {GLOBAL: open_store(stores[0]).load(), REGIONAL: open_store(stores[1]).load()}


def validation_batch(setup: TrainingSetup) -> dict[str, torch.Tensor]:
    """Every validation window of ``setup`` in one batch."""
    return torch.utils.data.default_collate([setup.val[i] for i in range(len(setup.val))])


def train_with_cli(config: ExperimentConfig, root: Path, run: str = "run") -> Path:
    """Write ``config`` as YAML under ``root``, train it with ``forecast train --out root/run``; the checkpoint."""
    path = root / f"{config.name}.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    assert main(["train", str(path), "--out", str(root / run), "--quiet"]) == 0
    return root / run / "model.pt"


def denoiser_training_run(
    config: ExperimentConfig,
    root: Path,
    forecaster_class: type[OneGridDiffusionForecaster],
    output_conv: Callable[[torch.nn.Module], torch.nn.Conv2d],
) -> dict[str, Any]:
    """``forecast train`` of ``config`` under ``root``, with the objective's loss on the validation windows (same
    windows, same noise) of the initial network (``torch.manual_seed(0)``), of that network with its output
    convolution ``output_conv(network)`` zeroed, and of the trained one.

    Returns ``config``, ``checkpoint`` (path) and the losses ``before``, ``zero`` and ``after``.
    """
    torch.manual_seed(0)
    setup = TRAINABLE[config.model.family](config)
    batch = validation_batch(setup)

    def loss(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return setup.objective(model, batch, steps=1, generator=torch.Generator().manual_seed(0))["loss"].item()

    before = loss(setup.model)
    conv = output_conv(setup.model)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
    zero_network = loss(setup.model)
    checkpoint = train_with_cli(config, root)
    after = loss(forecaster_class.from_checkpoint(load_checkpoint(checkpoint)).model)
    return {"config": config, "checkpoint": checkpoint, "before": before, "after": after, "zero": zero_network}


def assert_predict_writes_distinct_reproducible_members(
    checkpoint: Path, tmp_path: Path, *, steps: int, family: str, name: str
) -> xr.Dataset:
    """``forecast predict`` of three members from STARTS writes the forecast layout on the global grid with
    plausible 500 hPa geopotential, members that differ everywhere, the same forecast for the same seed and
    another for another seed. Returns the forecast (loaded)."""
    out = tmp_path / "fc.zarr"
    assert main(["predict", "--checkpoint", str(checkpoint), "--start", STARTS[0], "--start", STARTS[1],
                 "--members", "3", "--steps", str(steps), "--out", str(out)]) == 0
    fc = open_forecast(out).load()
    assert dict(fc.sizes) == {**GLOBAL_SIZES, LEAD: steps}
    assert fc.attrs["model_family"] == family and fc.attrs["model"] == name
    z = fc["geopotential"].values
    assert np.isfinite(z).all() and 5.0e4 < z.mean() < 5.8e4
    assert float(fc["2m_temperature"].std(MEMBER).min()) > 0  # members differ everywhere, at every lead
    again = predict(checkpoint, starts=STARTS, members=3, steps=steps, out=tmp_path / "again.zarr", seed=0)
    xr.testing.assert_equal(open_forecast(again).load()[["geopotential", "2m_temperature"]],
                            fc[["geopotential", "2m_temperature"]])
    other = predict(checkpoint, starts=STARTS, members=3, steps=steps, out=tmp_path / "other.zarr", seed=1)
    assert not np.allclose(open_forecast(other)["geopotential"].values, z)
    return fc


def assert_members_do_not_depend_on_the_batching(
    forecaster: OneGridDiffusionForecaster, initial: xr.Dataset, *, steps: int
) -> xr.Dataset:
    """Three members of STARTS (seed 7) are the same sampled all at once and one sample per network call (the
    forecaster's ``member_batch`` is left at 1). Returns the forecast sampled at once."""
    together = forecaster.forecast(initial, steps=steps, members=3, starts=STARTS, seed=7)
    forecaster.model_config = forecaster.model_config.model_copy(update={"member_batch": 1})
    one_by_one = forecaster.forecast(initial, steps=steps, members=3, starts=STARTS, seed=7, batch_size=3)
    xr.testing.assert_allclose(together, one_by_one, rtol=1e-5)
    return together


def assert_checkpoint_round_trip_gives_identical_forecasts(
    forecaster_class: type[OneGridDiffusionForecaster], trained: dict, initial: xr.Dataset, tmp_path: Path,
    *, steps: int,
) -> OneGridDiffusionForecaster:
    """A copy of the trained checkpoint, rebuilt through the family registry, forecasts exactly as the
    original (seed 3). Returns the rebuilt forecaster."""
    first = forecaster_class.from_checkpoint(load_checkpoint(trained["checkpoint"]))
    copy = first.save_checkpoint(tmp_path / "copy.pt", config=trained["config"])
    second = build_forecaster(trained["config"], checkpoint=load_checkpoint(copy))
    assert isinstance(second, forecaster_class)
    a = first.forecast(initial, steps=steps, members=2, starts=STARTS, seed=3)
    b = second.forecast(initial, steps=steps, members=2, starts=STARTS, seed=3)
    xr.testing.assert_equal(a, b)
    return second


def assert_checkpoint_of_another_family_is_rejected(
    forecaster_class: type[OneGridDiffusionForecaster], stores: tuple[Path, Path], tmp_path: Path
) -> None:
    """A graph-family checkpoint fails to load as ``forecaster_class`` with an error naming file and families."""
    graph = build_forecaster(graph_config(stores, model={"mode": "global"}))
    path = graph.save_checkpoint(tmp_path / "graph.pt", config=graph_config(stores, model={"mode": "global"}))
    family = forecaster_class.family
    with pytest.raises(SchemaError, match=rf"graph\.pt holds a 'graph' model, not a '{family}' one"):
        forecaster_class.from_checkpoint(load_checkpoint(path))


def assert_training_is_rejected_before_writing(
    config: ExperimentConfig, tmp_path: Path, error: type[Exception], message: str
) -> None:
    """``train(config)`` raises ``error`` matching ``message`` and leaves no run directory behind."""
    with pytest.raises(error, match=message):
        train(config, out_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def assert_spectral_filter_damps_the_change_since_the_start(
    family: type[OneGridDiffusionForecaster], checkpoint: Path, initial: xr.Dataset, *, steps: int
) -> None:
    """``--sampling spectral_filter_hours``: the forecast's change since its initial state loses power at the
    grid's smaller scales against the same forecast without the filter (same seed)."""
    from forecasting.inference import with_sampling
    from forecasting.models import SpectralFilter

    ckpt = load_checkpoint(checkpoint)
    plain = family.from_checkpoint(ckpt)
    damped = family.from_checkpoint(with_sampling(ckpt, {"spectral_filter_hours": 6.0, "spectral_filter_order": 2}))
    assert plain.spectral_filter is None and isinstance(damped.spectral_filter, SpectralFilter)
    forecasts = [f.forecast(initial, steps=steps, members=2, starts=STARTS, seed=5) for f in (plain, damped)]
    transform = damped.spectral_filter.sht
    small = slice(transform.lmax // 2, None)

    def small_scale_power(fc: xr.Dataset) -> float:
        total = 0.0
        for name, field in fc.data_vars.items():
            start = initial[name].sel({TIME: fc[TIME]}).compute()
            change = (field.compute() - start).transpose(..., "latitude", "longitude")
            assert np.isfinite(change.values).all()
            coefficients = transform(torch.as_tensor(change.values, dtype=torch.float32))
            total += float(coefficients[..., small, :].abs().square().mean()) / float(initial[name].var())
        return total

    before, after = (small_scale_power(fc) for fc in forecasts)
    assert after < 0.7 * before, (before, after)
    assert forecasts[1].sizes == forecasts[0].sizes


def assert_check_denoiser_reports_the_noise_left(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture, *, sampling: list[str] = ()
) -> pd.DataFrame:
    """``forecast check-denoiser`` on a trained ``checkpoint``: the tables go to the terminal and the CSV, and the
    denoiser takes out nearly all the noise at its highest level and less of it at its lowest (over all frames
    of a rolling window). ``sampling``: ``KEY=VALUE`` settings passed with ``--sampling``. Returns the table."""
    from forecasting.diffusion.diagnostics import CHECK_COLUMNS

    out = tmp_path / "check.csv"
    args = ["check-denoiser", "--checkpoint", str(checkpoint), "--samples", "4", "--out", str(out)]
    for setting in sampling:
        args += ["--sampling", setting]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "noise_left" in printed and "small_scale_error" in printed and str(out) in printed
    table = pd.read_csv(out)
    assert list(table.columns) == list(CHECK_COLUMNS) and not list(tmp_path.glob("*.partial"))
    for _, rows in table.groupby("channel"):
        highest, lowest = rows.loc[rows.sigma.idxmax()], rows.loc[rows.sigma.idxmin()]
        assert highest.noise_left < 0.1 < lowest.noise_left, rows
    return table


def assert_window_perturbations_leave_the_first_window_alone(
    forecaster_class: type[OneGridDiffusionForecaster], checkpoint: Path, initial: xr.Dataset, *, window: int,
    amplitude: float,
) -> xr.Dataset:
    """``--sampling window_perturbation=amplitude`` on a model whose window is ``window`` leads: the first
    ``window`` leads are the plain forecast's exactly, lead ``window`` spreads over 1.5 times as much, the
    forecast repeats for a seed and a negative amplitude is refused. Returns the perturbed forecast."""
    from forecasting.config import ConfigError
    from forecasting.inference import with_sampling

    ckpt = load_checkpoint(checkpoint)
    steps = 2 * window
    plain = forecaster_class.from_checkpoint(ckpt).forecast(initial, steps=steps, members=4, starts=STARTS, seed=3)
    renewed = forecaster_class.from_checkpoint(
        with_sampling(ckpt, {"window_perturbation": amplitude, "perturbation_length": 2.0})
    )
    first = renewed.forecast(initial, steps=steps, members=4, starts=STARTS, seed=3)
    xr.testing.assert_equal(renewed.forecast(initial, steps=steps, members=4, starts=STARTS, seed=3), first)
    xr.testing.assert_equal(first.isel({LEAD: slice(0, window)}), plain.isel({LEAD: slice(0, window)}))

    def spread(fc: xr.Dataset) -> float:
        return float(fc.isel({LEAD: window}).std(MEMBER).to_array().mean())

    assert spread(first) > 1.5 * spread(plain), (spread(first), spread(plain))
    assert np.isfinite(first.to_array().values).all()
    with pytest.raises(ConfigError, match="window_perturbation"):
        with_sampling(ckpt, {"window_perturbation": -1.0})
    return first
