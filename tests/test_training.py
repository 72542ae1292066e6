"""forecasting.training: losses, schedules, the resumable sampler, node windows, learning on a synthetic problem,
exact resume through the CLI, and bad input rejected before anything is written."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import yaml

from forecasting.cli import main
from forecasting.config import ConfigError, parse_config
from forecasting.errors import ForecastingError, SchemaError
from forecasting.forecasters import GraphForecaster, build_forecaster
from forecasting.training.checkpoint import load_checkpoint
from forecasting.training.data import NodeWindowDataset, ResumableSampler
from forecasting.training.module import ForecastModule, fair_crps, learning_rate_factor
from forecasting.training.train import TRAINABLE, train
from forecasting.verification.metrics import crps
from test_forecasters import graph_config, make_stores


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_stores(tmp_path_factory.mktemp("training"))


def _write_config(path: Path, config) -> Path:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


# ----------------------------------------------------------------------------------------------
# Losses and schedules
# ----------------------------------------------------------------------------------------------
def test_fair_crps_analytic_values():
    # Two members either side of the truth: mean |x - y| = 1 and the spread term is 4 / (2 * 2 * 1) = 1.
    assert fair_crps(torch.tensor([0.0, 2.0]), torch.tensor(1.0)).item() == pytest.approx(0.0)
    # x = (0, 1, 3), y = 0: 4/3 - (2 * (1 + 3 + 2)) / (2 * 3 * 2) = 1/3.
    assert fair_crps(torch.tensor([0.0, 1.0, 3.0]), torch.tensor(0.0)).item() == pytest.approx(1.0 / 3.0)
    # Identical members: the CRPS is the absolute error.
    assert fair_crps(torch.full((4,), 2.5), torch.tensor(1.0)).item() == pytest.approx(1.5)
    with pytest.raises(ValueError, match="at least 2 members"):
        fair_crps(torch.zeros(1, 3), torch.zeros(3), dim=0)


def test_fair_crps_matches_pairwise_formula_and_the_verification_metric():
    rng = np.random.default_rng(0)
    ens = rng.standard_normal((5, 7, 3))  # (member, ...)
    obs = rng.standard_normal((7, 3))
    got = fair_crps(torch.from_numpy(ens), torch.from_numpy(obs), dim=0).numpy()
    pairs = np.abs(ens[:, None] - ens[None, :]).sum(axis=(0, 1))
    want = np.abs(ens - obs).mean(axis=0) - pairs / (2 * 5 * 4)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    fc = xr.DataArray(ens, dims=("realization", "x", "y"))
    metric = crps(fc, xr.DataArray(obs, dims=("x", "y")), fair=True, preserve_dims=["x", "y"], weights=None)
    np.testing.assert_allclose(got, metric.values, rtol=1e-10)
    # Differentiable through the sort.
    x = torch.tensor([[0.0], [1.0], [3.0]], requires_grad=True)
    fair_crps(x, torch.full((1,), -1.0), dim=0).sum().backward()
    # d/dx_k = sign(x_k - y) / K - 2 (2k - K + 1) / (2 K (K - 1)) for the sorted members.
    np.testing.assert_allclose(x.grad[:, 0].numpy(), [1 / 3 + 1 / 3, 1 / 3, 1 / 3 - 1 / 3], atol=1e-7)


def test_learning_rate_warms_up_then_decays_along_a_cosine():
    factors = [learning_rate_factor(s, warmup_steps=4, max_steps=14, floor=0.1) for s in range(16)]
    np.testing.assert_allclose(factors[:4], [0.25, 0.5, 0.75, 1.0])
    assert factors[4] == pytest.approx(1.0)
    assert factors[9] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert factors[14] == pytest.approx(0.1) and factors[15] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(factors[4:]))


def test_rollout_schedule_lengthens_the_rollout():
    module = ForecastModule(torch.nn.Linear(1, 1), lambda *a, **k: {}, learning_rate=1e-3, max_steps=10,
                            rollout=[(0, 1), (5, 2), (8, 4)])
    assert [module.rollout_steps(s) for s in (0, 4, 5, 7, 8, 100)] == [1, 1, 2, 2, 4, 4]


def test_resumable_sampler_continues_the_same_stream_and_splits_ranks():
    whole = list(itertools.islice(iter(ResumableSampler(7, seed=3)), 20))
    assert sorted(whole[:7]) == list(range(7)) and sorted(whole[7:14]) == list(range(7))
    resumed = list(itertools.islice(iter(ResumableSampler(7, seed=3, start=9)), 11))
    assert resumed == whole[9:]
    ranks = [list(itertools.islice(iter(ResumableSampler(7, seed=3, rank=r, world_size=2)), 10)) for r in (0, 1)]
    assert [x for pair in zip(*ranks) for x in pair] == whole


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def test_node_windows_hold_every_grid_in_node_order(stores):
    forecaster = build_forecaster(graph_config(stores))
    assert isinstance(forecaster, GraphForecaster)
    windows = NodeWindowDataset(forecaster, {"global": str(stores[0]), "regional": str(stores[1])},
                                boundary_store=None, target_steps=3, time=(None, "2000-01-10T18"), source="test")
    sample = windows[0]
    n, c = forecaster.layout.n_nodes, len(forecaster.channels)
    assert sample["inputs"].shape == (2, n, c) and sample["targets"].shape == (3, n, c)
    assert sample["forcings"].shape == (5, n, 4) and sample["static"].shape == (n, 2)
    assert len(windows) == 40 - 5 + 1  # 40 six-hourly times up to 2000-01-10T18, windows of 5
    # Physical units: geopotential near 5.4e4 on every node.
    geopotential = forecaster.channels.names.index("geopotential@500")
    assert 5.0e4 < float(sample["inputs"][..., geopotential].mean()) < 5.8e4
    lam = build_forecaster(graph_config(stores, model={"mode": "limited_area"}))
    lam_windows = NodeWindowDataset(lam, {"regional": str(stores[1])}, boundary_store=str(stores[0]), target_steps=2,
                                    time=None, source="test")
    assert lam_windows[0]["boundary"].shape == (2, lam.layout.n_nodes, c)


# ----------------------------------------------------------------------------------------------
# Learning and resuming
# ----------------------------------------------------------------------------------------------
class _Persistence(torch.nn.Module):
    """A rollout that repeats the last input state (the reference a trained model must beat)."""

    def forward(self, initial, *, static, forcings, steps, boundary=None, generator=None):
        return initial[:, -1:].expand(-1, steps, -1, -1)


@pytest.mark.parametrize("nesting", ["cutout", "refine"])
def test_training_reduces_the_loss_and_beats_persistence(stores, tmp_path, nesting):
    config = graph_config(stores, model={"nesting": nesting},
                          training={"max_steps": 100, "batch_size": 4, "learning_rate": 1e-2,
                                    "warmup_steps": 5, "val_every": 50, "val_batches": 2})
    torch.manual_seed(0)
    setup = TRAINABLE["graph"](config)
    batch = torch.utils.data.default_collate([setup.val[i] for i in range(len(setup.val))])

    def loss(model: torch.nn.Module) -> float:
        return setup.objective(model, batch, steps=1, generator=torch.Generator().manual_seed(0))["loss"].item()

    before, persistence = loss(setup.model), loss(_Persistence())
    result = train(config, out_dir=tmp_path / "run", progress=False)
    assert result.global_step == 100
    trained = GraphForecaster.from_checkpoint(load_checkpoint(result.checkpoint))
    assert trained.model_config.nesting == nesting
    after = loss(trained.rollout)
    assert after < 0.6 * before and after < 0.7 * persistence, (before, after, persistence)
    assert "val/loss" in result.metrics and (tmp_path / "run" / "logs" / "version_0" / "metrics.csv").is_file()


def test_resume_continues_exactly(stores, tmp_path):
    """2 steps + resume for 2 more == 4 steps straight, bit for bit: probabilistic (fair CRPS, noise streams),
    with the rollout growing to 2 steps at step 3, through the CLI."""
    config = graph_config(stores, model={"noise_channels": 2}, training={
        "max_steps": 4, "batch_size": 2, "warmup_steps": 1, "val_every": 1, "val_batches": 1, "checkpoint_every": 1,
        "rollout": [{"at_step": 0, "steps": 1}, {"at_step": 3, "steps": 2}], "ensemble_size": 2,
    })
    path = _write_config(tmp_path / "tiny.yaml", config)
    straight, pieces = tmp_path / "straight", tmp_path / "pieces"
    assert main(["train", str(path), "--out", str(straight), "--quiet"]) == 0
    assert main(["train", str(path), "--out", str(pieces), "--max-steps", "2", "--quiet"]) == 0
    assert load_checkpoint(pieces / "model.pt").metadata["global_step"] == 2
    assert main(["train", str(path), "--out", str(pieces), "--quiet"]) == 2  # the run exists: refuse to clobber
    assert main(["train", str(path), "--out", str(pieces), "--resume", "--quiet"]) == 0
    a, b = load_checkpoint(straight / "model.pt"), load_checkpoint(pieces / "model.pt")
    assert b.metadata["global_step"] == 4
    assert a.state_dict.keys() == b.state_dict.keys()
    for name in a.state_dict:
        assert torch.equal(a.state_dict[name], b.state_dict[name]), name


def test_init_from_starts_from_a_checkpoints_weights(stores, tmp_path):
    """training.init_from loads a trained model's weights (here then barely moved by a tiny learning rate);
    a network of other sizes or a missing file is refused before the run directory is made."""
    base = train(graph_config(stores, training={"max_steps": 2, "batch_size": 2, "val_every": 1, "val_batches": 1}),
                 out_dir=tmp_path / "base", progress=False)
    tune = {"max_steps": 1, "batch_size": 2, "val_every": 1, "val_batches": 1, "learning_rate": 1e-12,
            "warmup_steps": 0, "rollout": [{"at_step": 0, "steps": 2}]}
    tuned = train(graph_config(stores, training={**tune, "init_from": str(base.checkpoint)}),
                  out_dir=tmp_path / "tuned", progress=False)
    fresh = train(graph_config(stores, training=tune), out_dir=tmp_path / "fresh", progress=False)
    a, b, c = (load_checkpoint(r.checkpoint).state_dict for r in (base, tuned, fresh))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)
    wider = graph_config(stores, model={"hidden": 24}, training={**tune, "init_from": str(base.checkpoint)})
    with pytest.raises(ConfigError, match=r"training.init_from .*model.pt: its network does not match .*other shapes"):
        train(wider, out_dir=tmp_path / "wider", progress=False)
    refine = graph_config(stores, model={"nesting": "refine"}, training={**tune, "init_from": str(base.checkpoint)})
    with pytest.raises(ConfigError, match=r"trained with model.nesting 'cutout' and the config asks for 'refine'"):
        train(refine, out_dir=tmp_path / "refine", progress=False)
    mean = graph_config(stores, model={"encoder_aggregation": "mean"},
                        training={**tune, "init_from": str(base.checkpoint)})
    with pytest.raises(ConfigError, match=r"model.encoder_aggregation 'sum' and the config asks for 'mean'"):
        train(mean, out_dir=tmp_path / "mean", progress=False)
    missing = graph_config(stores, training={**tune, "init_from": str(tmp_path / "nope.pt")})
    with pytest.raises(ConfigError, match=r"nope.pt does not exist"):
        train(missing, out_dir=tmp_path / "missing", progress=False)
    assert not any((tmp_path / name).exists() for name in ("wider", "refine", "mean", "missing"))


def test_a_global_model_starts_a_stretched_one(stores, tmp_path):
    """Transfer learning: a coarse-only model's weights start a stretched model (refine, detail inputs). Every
    weight is the global model's; the data-node embedding's first layer gets zero columns for the stretched
    model's extra inputs (regional flag, fine detail), inserted before the node position features. A stretched
    model does not start a global one."""
    sizes = {"processor_layers": 1, "global_level": 2, "regional_level": 2}
    short = {"max_steps": 2, "batch_size": 2, "val_every": 1, "val_batches": 1}
    base = train(graph_config(stores, model={**sizes, "mode": "global"}, training=short),
                 out_dir=tmp_path / "global", progress=False)
    tune = {**short, "max_steps": 1, "learning_rate": 1e-12, "warmup_steps": 0}
    stretched = graph_config(stores, model={**sizes, "nesting": "refine", "detail_inputs": True},
                             training={**tune, "init_from": str(base.checkpoint)})
    tuned = train(stretched, out_dir=tmp_path / "stretched", progress=False)
    theirs, ours = load_checkpoint(base.checkpoint).state_dict, load_checkpoint(tuned.checkpoint).state_dict
    assert theirs.keys() == ours.keys()
    first = "step.core.network.data_embed.net.0.weight"
    for name in theirs:
        if name != first:
            assert torch.allclose(theirs[name], ours[name], atol=1e-6), name
    forecaster = build_forecaster(stretched)
    n_position = forecaster.rollout.step.core.network.data_node_features.shape[1]
    old, new = theirs[first], ours[first]
    extra = new.shape[1] - old.shape[1]
    assert extra == 1 + 2 * len(forecaster.channels)  # the regional flag; the detail of 2 input steps' channels
    n_old = old.shape[1] - n_position
    assert torch.allclose(new[:, :n_old], old[:, :n_old], atol=1e-6)
    assert new[:, n_old:n_old + extra].abs().max() < 1e-9  # zero, moved by one step at a 1e-12 rate
    assert torch.allclose(new[:, n_old + extra:], old[:, n_old:], atol=1e-6)
    back = graph_config(stores, model={**sizes, "mode": "global"}, training={**tune, "init_from": str(tuned.checkpoint)})
    with pytest.raises(ConfigError, match=r"trained with model.mode 'stretched' and the config asks for 'global'"):
        train(back, out_dir=tmp_path / "back", progress=False)
    assert not (tmp_path / "back").exists()


# ----------------------------------------------------------------------------------------------
# Bad input: clear errors, no run directory
# ----------------------------------------------------------------------------------------------
def test_variables_not_in_the_store_are_rejected_before_writing(stores, tmp_path):
    config = graph_config(stores, data={"variables": ["geopotential", "total_cloud_cover"]})
    with pytest.raises(SchemaError, match=r"global\.zarr: variables \['total_cloud_cover'\] are not in the store"):
        train(config, out_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_region_outside_the_grid_is_rejected_before_writing(stores, tmp_path):
    region = {"lat_min": -40.0, "lat_max": -10.0, "lon_min": 100.0, "lon_max": 150.0}
    config = graph_config(stores, model={"region": region})
    with pytest.raises(SchemaError, match=r"model\.region \(lat -40\.\.-10, lon 100\.\.150\) does not hold the regional grid"):
        train(config, out_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    path = _write_config(tmp_path / "bad.yaml", config)
    assert main(["train", str(path), "--out", str(tmp_path / "cli"), "--quiet"]) == 2
    assert not (tmp_path / "cli").exists()


def test_config_sections_family_and_resume_are_checked(stores, tmp_path):
    persistence = parse_config({"model": {"family": "persistence"}, "data": {"global_store": str(stores[0])},
                                "training": {}})
    with pytest.raises(ConfigError, match="'persistence' has nothing to train"):
        train(persistence, out_dir=tmp_path / "p", progress=False)
    with pytest.raises(ConfigError, match="needs a 'training' section"):
        train(parse_config({"model": {"family": "graph"}, "data": {"global_store": str(stores[0])}}),
              out_dir=tmp_path / "p", progress=False)
    with pytest.raises(ForecastingError, match="nothing to resume"):
        train(graph_config(stores), out_dir=tmp_path / "none", resume=True, progress=False)
    with pytest.raises(ConfigError, match="rollout stages must have increasing at_step"):
        graph_config(stores, training={"rollout": [{"at_step": 0, "steps": 1}, {"at_step": 0, "steps": 2}]})
    with pytest.raises(ConfigError, match="needs data.regional_store"):
        build_forecaster(parse_config({"model": {"family": "graph"}, "data": {"global_store": str(stores[0])}}))
    with pytest.raises(ConfigError, match=r"variable_weights names \['humidity'\]"):
        build_forecaster(graph_config(stores)).channel_weights({"humidity": 2.0})


def test_objective_weights_nodes_and_channels(stores):
    forecaster = build_forecaster(graph_config(stores))
    weights = forecaster.loss_node_weights(0.5)
    assert weights.sum() == pytest.approx(1.0)
    assert weights[forecaster.layout.is_regional].sum() == pytest.approx(0.5)
    natural = forecaster.loss_node_weights(None)
    assert natural[forecaster.layout.is_regional].sum() < 0.1  # the box is a small part of the globe
    channel = forecaster.channel_weights({"geopotential": 3.0})
    np.testing.assert_allclose(channel, [0.5, 1.5])  # (2m_temperature, geopotential@500), mean 1
    lam = build_forecaster(graph_config(stores, model={"mode": "limited_area"}))
    assert (lam.loss_node_weights(None)[lam.strip] == 0).all()
