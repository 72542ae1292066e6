"""forecasting.diffusion.diagnostics and ``forecast check-denoiser``: the share of the noise a denoiser leaves
at each noise level its sampler visits, on the tiny stores of tests/test_forecasters.py.

The bookkeeping is checked with denoisers whose answers are known (the identity leaves all the noise, a zero
output leaves none of it but all of the target's error), the levels against the samplers' schedules, and the
command line on bad input. The command on trained models is tested with each family
(tests/test_conditional_diffusion.py, tests/test_rolling_diffusion.py:
``diffusion_helpers.assert_check_denoiser_reports_the_noise_left``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from forecasting.cli import main
from forecasting.config import ConfigError
from forecasting.data.store import open_store
from forecasting.diffusion.diagnostics import CHECK_COLUMNS, denoising_check
from forecasting.diffusion.samplers import karras_sigmas
from forecasting.errors import SchemaError
from forecasting.forecasters import build_forecaster
from tests import diffusion_helpers
from tests.test_conditional_diffusion import diffusion_config
from tests.test_forecasters import VAL_START, graph_config
from tests.test_rolling_diffusion import WINDOW, rolling_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

stores = diffusion_helpers.stores  # the shared module-scoped fixtures

PERIOD = (VAL_START, None)


class Constant(nn.Module):
    """A stand-in denoiser of the conditional family: ``D(x) = x`` (``identity``) or ``D(x) = 0``."""

    def __init__(self, identity: bool) -> None:
        super().__init__()
        self.identity = identity

    def forward(self, x, sigma, condition):
        return x if self.identity else torch.zeros_like(x)


# A fresh forecaster per test: the tests swap its network's denoiser for a stand-in. (pytest's monkeypatch
# cannot undo that on a torch submodule, which lives in ``_modules``, not the instance ``__dict__``: pytest 9.2
# deletes the attribute instead of restoring it.)
@pytest.fixture
def conditional(stores):
    return build_forecaster(diffusion_config(stores))


@pytest.fixture
def rolling(stores):
    return build_forecaster(rolling_config(stores))


def test_conditional_levels_are_the_sampler_schedule(conditional, stores):
    conditional.model.denoiser = Constant(identity=True)
    table = denoising_check(conditional, stores[0], period=PERIOD, samples=4)
    assert list(table.columns) == list(CHECK_COLUMNS)
    steps = conditional.model_config.sampling_steps
    edm = conditional.edm
    expected = karras_sigmas(steps, sigma_min=edm.sigma_min, sigma_max=edm.sigma_max, rho=edm.rho)[:-1].numpy()
    assert len(table) == steps * len(conditional.channels) and set(table.frame) == {0}
    np.testing.assert_allclose(table.drop_duplicates("step").sigma, expected, rtol=1e-6)
    # The identity removes nothing: all the noise is left, and the error is the noise itself.
    np.testing.assert_allclose(table.noise_left, 1.0, rtol=1e-5)
    assert (table.small_scale_error > 0).all() and np.isfinite(table.large_scale_error).all()


def test_a_zero_denoiser_removes_the_noise_and_keeps_the_whole_target_as_error(conditional, stores):
    conditional.model.denoiser = Constant(identity=False)
    table = denoising_check(conditional, stores[0], period=PERIOD, samples=4)
    np.testing.assert_allclose(table.small_scale_error, 1.0, rtol=1e-5)
    np.testing.assert_allclose(table.large_scale_error, 1.0, rtol=1e-5)
    # The error is the target, so the share "left" is the target's power over the noise's: it falls as sigma^-2.
    for _, rows in table.groupby("channel"):
        scaled = rows.noise_left * rows.sigma**2
        assert rows.noise_left.is_monotonic_increasing  # sigma descends with the step
        np.testing.assert_allclose(scaled, scaled.median(), rtol=0.5)


def test_rolling_levels_are_each_frames_level_over_a_pass(rolling, stores):
    rolling.model.denoise = lambda x, sigma, condition: x
    table = denoising_check(rolling, stores[0], period=PERIOD, samples=4)
    passes = rolling.model_config.sampling_steps
    assert len(table) == WINDOW * passes * len(rolling.channels)
    for (frame, step), rows in table.groupby(["frame", "step"]):
        t = torch.tensor([1.0 - step / passes], dtype=torch.float64)
        expected = float(rolling.schedule.sigmas(t, init=False)[0, frame])
        np.testing.assert_allclose(rows.sigma, expected, rtol=1e-6)
    np.testing.assert_allclose(table.noise_left, 1.0, rtol=1e-5)


def test_bad_input_gets_a_clear_error_and_writes_nothing(stores, conditional, tmp_path, capsys):
    graph = build_forecaster(graph_config(stores, model={"mode": "global"}))
    path = graph.save_checkpoint(tmp_path / "graph.pt", config=graph_config(stores, model={"mode": "global"}))
    out = tmp_path / "table.csv"
    assert main(["check-denoiser", "--checkpoint", str(path), "--out", str(out)]) == 2
    assert "holds a 'graph' model, which has no noise-level denoiser" in capsys.readouterr().err
    assert main(["check-denoiser", "--checkpoint", str(tmp_path / "absent.pt"), "--out", str(out)]) == 2
    assert "no checkpoint file" in capsys.readouterr().err
    assert main(["check-denoiser", "--checkpoint", str(path), "--samples", "0"]) == 2
    assert "--samples must be >= 1" in capsys.readouterr().err
    assert not out.exists()
    out.write_text("kept")
    assert main(["check-denoiser", "--checkpoint", str(path), "--out", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err and out.read_text() == "kept"
    # The regional store lacks nothing but is another grid; a period without windows names the store.
    with pytest.raises(SchemaError, match="grid .* is not the model's"):
        denoising_check(conditional, stores[1], period=PERIOD, samples=2)
    with pytest.raises(SchemaError, match=str(stores[0])):
        denoising_check(conditional, stores[0], period=("2005-01-01", None), samples=2)
    with pytest.raises(ConfigError, match="samples must be >= 1"):
        denoising_check(conditional, stores[0], samples=0)
    # Missing values in the windows are named, not turned into NaN ratios.
    holed = open_store(stores[0]).load()
    name = conditional.channels.variables[0]
    holed[name] = holed[name].where(holed.time < np.datetime64(VAL_START))
    with pytest.raises(SchemaError, match=f"{name} has missing values in the windows checked"):
        denoising_check(conditional, holed, period=PERIOD, samples=2)

