"""forecasting.forecasters: the Forecaster interface, node layout, wrappers, rollout, registry, limited-area and
probabilistic modes, on tiny synthetic stores written with forecasting.data.store.write_store.

``make_stores`` and ``graph_config`` are shared with tests/test_training.py and tests/test_checkpoint.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from forecasting.config import ConfigError, ExperimentConfig, parse_config
from forecasting.data.store import open_store, write_store
from forecasting.errors import SchemaError
from forecasting.forecasters import (
    FAMILIES,
    GLOBAL,
    REGIONAL,
    ClimatologyForecaster,
    GraphForecaster,
    InputsAndResiduals,
    PersistenceForecaster,
    Rollout,
    StepInputs,
    bilinear_weights,
    boundary_strip,
    build_forecaster,
    coarse_base,
)
from forecasting.schema import LEAD, MEMBER, TIME, VALID_TIME, validate_forecast
from forecasting.verification.baselines import climatology, climatology_forecast, persistence_forecast

COARSE_LAT = -90.0 + (np.arange(8) + 0.5) * 22.5  # 8 x 16 cell centres, 22.5 degrees
COARSE_LON = np.arange(16) * 22.5
REGIONAL_LAT = np.arange(45.0, 70.1, 5.0)  # 6 x 9 points, 5 degrees, inside the box 45..72 N, 0..40 E
REGIONAL_LON = np.arange(0.0, 40.1, 5.0)
TRAIN_END = "2000-01-10T18"
VAL_START = "2000-01-11"


def synthetic_analysis(lat: np.ndarray, lon: np.ndarray, *, n_times: int = 60, seed: int = 0) -> xr.Dataset:
    """A learnable world: a wave travelling 10 degrees east per 6 h whose amplitude follows a slow random walk
    (the same on every grid), over a zonal mean; ``geopotential`` on 500 hPa and ``2m_temperature``, with the
    statics ``geopotential_at_surface`` and ``land_sea_mask``; six-hourly from 2000-01-01."""
    rng = np.random.default_rng(seed)
    time = pd.date_range("2000-01-01", periods=n_times, freq="6h")
    amplitude = 1.0 + 0.05 * np.cumsum(rng.standard_normal(n_times))[:, None, None]
    la = np.deg2rad(lat)[None, :, None]
    phase = np.deg2rad(lon)[None, None, :] - np.deg2rad(10.0) * np.arange(n_times)[:, None, None]
    z = 5.4e4 + 800.0 * amplitude * np.cos(la) * np.sin(2 * phase) + 2000.0 * np.cos(la) ** 2
    t2m = 280.0 + 20.0 * np.cos(la) + 3.0 * amplitude * np.cos(la) * np.cos(phase)
    la0, lo0 = la[0], np.deg2rad(lon)[None, :]
    return xr.Dataset(
        {
            "geopotential": (("time", "level", "latitude", "longitude"), z[:, None].astype("float32"),
                             {"units": "m**2 s**-2"}),
            "2m_temperature": (("time", "latitude", "longitude"), t2m.astype("float32"), {"units": "K"}),
            "geopotential_at_surface": (("latitude", "longitude"),
                                        (1000.0 * (1 + np.sin(3 * lo0) * np.cos(la0))).astype("float32"),
                                        {"units": "m**2 s**-2"}),
            "land_sea_mask": (("latitude", "longitude"), (np.sin(2 * lo0 + la0) > 0).astype("float32"), {"units": "1"}),
        },
        coords={"time": time, "level": ("level", np.array([500], dtype=np.int32), {"units": "hPa"}),
                "latitude": lat, "longitude": lon},
    )


def make_stores(root: Path, *, n_times: int = 60) -> tuple[Path, Path]:
    """Write the coarse global and fine regional training stores (statistics over the first 40 times)."""
    period = (None, TRAIN_END)
    coarse = write_store(synthetic_analysis(COARSE_LAT, COARSE_LON, n_times=n_times), root / "global.zarr",
                         train_period=period)
    regional = write_store(synthetic_analysis(REGIONAL_LAT, REGIONAL_LON, n_times=n_times), root / "regional.zarr",
                           train_period=period)
    return coarse, regional


def graph_config(stores: tuple[Path, Path], *, model: dict | None = None, training: dict | None = None,
                 data: dict | None = None) -> ExperimentConfig:
    """A tiny graph-forecaster experiment on ``stores`` (coarse, regional)."""
    return parse_config({
        "name": "tiny",
        "model": {"family": "graph", "hidden": 16, "processor_layers": 2, "global_level": 1, "regional_level": 2,
                  "margin_deg": 5.0, **(model or {})},
        "data": {"global_store": str(stores[0]), "regional_store": str(stores[1]), **(data or {})},
        "training": {"train_period": [None, TRAIN_END], "val_period": [VAL_START, None], **(training or {})},
    })


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_stores(tmp_path_factory.mktemp("forecasters"))


@pytest.fixture(scope="module")
def initial(stores) -> dict[str, xr.Dataset]:
    return {GLOBAL: open_store(stores[0]), REGIONAL: open_store(stores[1])}


def _silence(forecaster: GraphForecaster) -> None:
    """Make the network predict a zero tendency (last layer of the output MLP all zero)."""
    last = forecaster.rollout.step.core.network.output.net[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()


STARTS = ["2000-01-03T00", "2000-01-04T06"]


def test_stretched_forecast_has_forecast_layout_on_both_grids(stores, initial):
    torch.manual_seed(0)
    forecaster = build_forecaster(graph_config(stores))
    assert isinstance(forecaster, GraphForecaster) and forecaster.grids == (GLOBAL, REGIONAL)
    fc = forecaster.forecast(initial, steps=3, members=2, starts=STARTS)
    assert set(fc) == {GLOBAL, REGIONAL}
    for grid, ds in fc.items():
        validate_forecast(ds, source=grid)
        assert dict(ds.sizes) == {TIME: 2, LEAD: 3, MEMBER: 2, "level": 1,
                                  "latitude": initial[grid].sizes["latitude"],
                                  "longitude": initial[grid].sizes["longitude"]}
        assert ds["geopotential"].dims == (TIME, LEAD, MEMBER, "level", "latitude", "longitude")
        np.testing.assert_array_equal(ds["latitude"].values, initial[grid]["latitude"].values)
        assert ds["2m_temperature"].attrs["units"] == "K"
        assert np.isfinite(ds["geopotential"].values).all()


def test_rollout_length_leads_and_valid_times(stores, initial):
    forecaster = build_forecaster(graph_config(stores, model={"mode": "global"}))
    assert forecaster.grids == (GLOBAL,)
    fc = forecaster.forecast(initial[GLOBAL], steps=5, starts=STARTS)  # a Dataset in, a Dataset out
    assert isinstance(fc, xr.Dataset)
    np.testing.assert_array_equal(fc[LEAD].values, pd.to_timedelta([6, 12, 18, 24, 30], unit="h").values)
    expected = pd.DatetimeIndex(STARTS).values[:, None] + fc[LEAD].values[None, :]
    np.testing.assert_array_equal(fc[VALID_TIME].values, expected)
    chunks = list(forecaster.iterate(initial[GLOBAL], steps=5, starts=STARTS, batch_size=1))
    assert [(c.starts.start, c.lead) for c in chunks] == [(s, k) for s in (0, 1) for k in range(5)]


def test_zero_tendency_reproduces_persistence_exactly(stores, initial):
    forecaster = build_forecaster(graph_config(stores))
    _silence(forecaster)
    fc = forecaster.forecast(initial, steps=3, starts=STARTS)
    for grid in (GLOBAL, REGIONAL):
        expected = persistence_forecast(initial[grid][["geopotential", "2m_temperature"]], init_times=STARTS,
                                        leads=fc[grid][LEAD].values)
        layout = forecaster.layout.grid(grid)
        got = fc[grid]["2m_temperature"].values.reshape(2, 3, 1, -1)
        want = expected["2m_temperature"].values.reshape(2, 3, 1, -1)
        # Every grid point that is a data node persists bit for bit.
        np.testing.assert_array_equal(got[..., layout.grid_index], want[..., layout.grid_index])
        if grid == GLOBAL:
            # The coarse points dropped inside the regional box come from the regional nodes in their cells.
            assert 0 < len(layout.fill_points) < 5
            regional = initial[REGIONAL]["2m_temperature"].sel(time=STARTS[0]).values.ravel()
            for row, point in enumerate(layout.fill_points):
                take = layout.fill_rows == row
                nodes = layout.fill_nodes[take] - forecaster.layout.grid(REGIONAL).nodes.start
                index = forecaster.layout.grid(REGIONAL).grid_index[nodes]
                value = np.sum(layout.fill_weights[take] * regional[index])
                np.testing.assert_allclose(got[0, 0, 0, point], value, rtol=1e-6)


def test_inputs_and_residuals_normalise_inputs_and_scale_tendencies(stores):
    forecaster = build_forecaster(graph_config(stores))
    norm = forecaster.normalisation
    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, inputs: StepInputs) -> torch.Tensor:
            seen["states"] = inputs.states
            return torch.ones_like(inputs.states[:, -1])

    step = InputsAndResiduals(Probe(), norm)
    states = torch.from_numpy(np.stack([norm.mean, norm.mean + norm.std]).astype(np.float32))[None, :, None, :]
    out = step(StepInputs(states=states, forcings=torch.zeros(1, 3, 1, 4), static=torch.zeros(1, 1, 2)))
    np.testing.assert_allclose(seen["states"][0, :, 0].numpy(), [[0, 0], [1, 1]], atol=1e-5)
    np.testing.assert_allclose(out[0, 0].numpy(), norm.mean + norm.std + norm.tendency_std, rtol=1e-6)


def test_rollout_feeds_predictions_back(stores):
    class AddOne(torch.nn.Module):
        def forward(self, inputs: StepInputs) -> torch.Tensor:
            return inputs.states[:, -1] + inputs.states[:, 0] * 0 + 1

    rollout = Rollout(AddOne(), input_steps=2)
    out = rollout(torch.zeros(1, 2, 3, 1), static=torch.zeros(1, 3, 0), forcings=torch.zeros(1, 6, 3, 4), steps=4)
    assert out.shape == (1, 4, 3, 1)
    np.testing.assert_array_equal(out[0, :, 0, 0].numpy(), [1, 2, 3, 4])
    with pytest.raises(SchemaError, match="needs forcings at 7 times"):
        rollout(torch.zeros(1, 2, 3, 1), static=torch.zeros(1, 3, 0), forcings=torch.zeros(1, 6, 3, 4), steps=5)


def test_layout_gather_scatter_round_trip(stores, initial):
    layout = build_forecaster(graph_config(stores)).layout
    fields = {g: torch.randn(2, 3, *layout.grid(g).shape) for g in (GLOBAL, REGIONAL)}
    nodes = layout.gather(fields)
    assert nodes.shape == (2, layout.n_nodes, 3)
    back = layout.scatter(nodes)
    torch.testing.assert_close(back[REGIONAL], fields[REGIONAL], rtol=0, atol=0)
    kept = torch.as_tensor(layout.grid(GLOBAL).grid_index)
    torch.testing.assert_close(back[GLOBAL].flatten(-2)[..., kept], fields[GLOBAL].flatten(-2)[..., kept], rtol=0, atol=0)
    # Forcings at the nodes are those of the grids (they depend on time and longitude only).
    times = initial[GLOBAL]["time"].values[:2]
    assert layout.node_forcings(times).shape == (2, layout.n_nodes, 4)


def test_registry_selects_families_and_baselines_match_the_baseline_module(stores, initial):
    assert set(FAMILIES) >= {"graph", "persistence", "climatology"}
    persistence = build_forecaster(parse_config({
        "model": {"family": "persistence"}, "data": {"global_store": str(stores[0]), "regional_store": str(stores[1])},
    }))
    assert isinstance(persistence, PersistenceForecaster) and persistence.grids == (GLOBAL, REGIONAL)
    fc = persistence.forecast(initial, steps=2, members=2, starts=STARTS)
    expected = persistence_forecast(initial[REGIONAL][["2m_temperature", "geopotential"]], init_times=STARTS,
                                    leads=pd.to_timedelta([6, 12], unit="h"))
    np.testing.assert_array_equal(fc[REGIONAL]["geopotential"].isel(realization=1).values,
                                  expected["geopotential"].isel(realization=0).values)
    clim = build_forecaster(parse_config({
        "model": {"family": "climatology", "period": ["2000-01-01", TRAIN_END], "smoothing_days": 731},
        "data": {"global_store": str(stores[0])},
    }))
    assert isinstance(clim, ClimatologyForecaster)
    got = clim.forecast(initial[GLOBAL], steps=2, starts=STARTS)
    want = climatology_forecast(
        climatology(initial[GLOBAL][["2m_temperature", "geopotential"]], period=("2000-01-01", TRAIN_END),
                    smoothing_days=731), init_times=STARTS, leads=pd.to_timedelta([6, 12], unit="h"))
    np.testing.assert_allclose(got["2m_temperature"].values, want["2m_temperature"].values)
    with pytest.raises(ConfigError, match="does not match any of the expected tags"):
        parse_config({"model": {"family": "transformer"}})


def test_probabilistic_members_differ_and_do_not_depend_on_batching(stores, initial):
    torch.manual_seed(0)
    forecaster = build_forecaster(graph_config(stores, model={"noise_channels": 4}))
    assert forecaster.probabilistic
    together = forecaster.forecast(initial, steps=2, members=3, starts=STARTS, seed=7)
    apart = forecaster.forecast(initial, steps=2, members=3, starts=STARTS, seed=7, batch_size=3)
    other = forecaster.forecast(initial, steps=2, members=3, starts=STARTS, seed=8)
    for grid in (GLOBAL, REGIONAL):
        z = together[grid]["geopotential"].values
        assert np.abs(z[:, :, 0] - z[:, :, 1]).max() > 0 and np.abs(z[:, :, 1] - z[:, :, 2]).max() > 0
        # The same noise whatever the batching; float32 sums over other batch shapes may differ in the last bit.
        batching = np.abs(z - apart[grid]["geopotential"].values).max()
        assert batching <= 1e-6 * np.abs(z).max()
        assert np.abs(z - other[grid]["geopotential"].values).max() > 100 * max(batching, 1e-3)


def test_limited_area_strip_takes_boundary_values_from_analysis_or_forecast(stores, initial):
    forecaster = build_forecaster(graph_config(stores, model={"mode": "limited_area", "boundary_width": 1}))
    assert forecaster.grids == (REGIONAL,)
    grid = forecaster.layout.grid(REGIONAL)
    strip = boundary_strip(grid.shape, grid.grid_index, 1)
    assert strip.sum() == 2 * 6 + 2 * 9 - 4
    index, weight = bilinear_weights(COARSE_LAT, COARSE_LON, forecaster.layout.node_latitude,
                                     forecaster.layout.node_longitude, source="test")
    fc = forecaster.forecast(initial[REGIONAL], steps=2, starts=STARTS[:1], boundary=initial[GLOBAL])
    for k in range(2):
        valid = pd.Timestamp(STARTS[0]) + pd.Timedelta(hours=6 * (k + 1))
        coarse = initial[GLOBAL]["2m_temperature"].sel(time=valid).values.ravel()
        want = (coarse[index] * weight).sum(axis=1)[strip]
        got = fc["2m_temperature"].isel(time=0, prediction_timedelta=k, realization=0).values.ravel()[grid.grid_index]
        np.testing.assert_allclose(got[strip], want, rtol=1e-6)
    # A forecast as the boundary source: persistence of the coarse analysis holds the start values.
    boundary = persistence_forecast(initial[GLOBAL], init_times=STARTS[:1], leads=pd.to_timedelta([6, 12], unit="h"))
    fc = forecaster.forecast(initial[REGIONAL], steps=2, starts=STARTS[:1], boundary=boundary)
    coarse = initial[GLOBAL]["2m_temperature"].sel(time=STARTS[0]).values.ravel()
    got = fc["2m_temperature"].isel(time=0, prediction_timedelta=1, realization=0).values.ravel()[grid.grid_index]
    np.testing.assert_allclose(got[strip], (coarse[index] * weight).sum(axis=1)[strip], rtol=1e-6)
    with pytest.raises(SchemaError, match="needs a boundary dataset"):
        forecaster.forecast(initial[REGIONAL], steps=1, starts=STARTS[:1])


def test_overlap_and_refine_nesting_keep_the_coarse_box_and_refine_adds_the_interpolated_coarse_tendency(
    stores, initial
):
    cutout = build_forecaster(graph_config(stores)).layout
    for nesting in ("overlap", "refine"):
        forecaster = build_forecaster(graph_config(stores, model={"nesting": nesting}))
        layout = forecaster.layout
        coarse = layout.grid(GLOBAL)
        # Every coarse point is a node again; the regional nodes are the same as with the cut-out.
        assert len(coarse.fill_points) == 0 and coarse.nodes.stop == len(COARSE_LAT) * len(COARSE_LON)
        assert layout.n_nodes == cutout.n_nodes + len(cutout.grid(GLOBAL).fill_points)
        assert forecaster.graph.description["arguments"]["keep_coarse_in_region"] is True
        fc = forecaster.forecast(initial, steps=2, starts=STARTS)
        assert all(np.isfinite(ds["geopotential"].values).all() for ds in fc.values())
        _silence(forecaster)  # a zero network output persists on both grids, base or not
        fc = forecaster.forecast(initial, steps=2, starts=STARTS[:1])
        for grid in (GLOBAL, REGIONAL):
            np.testing.assert_array_equal(fc[grid]["2m_temperature"].values[0, 1, 0],
                                          initial[grid]["2m_temperature"].sel(time=STARTS[0]).values)

    # refine: the regional tendency is the network's own plus the bilinear interpolation of the coarse one's.
    forecaster = build_forecaster(graph_config(stores, model={"nesting": "refine"}))
    layout, norm = forecaster.layout, forecaster.normalisation
    regional = layout.is_regional
    lat, lon = layout.node_latitude, layout.node_longitude
    linear = torch.from_numpy(np.where(regional, 0.25, 0.01 * lat + 0.002 * lon).astype(np.float32))

    class Probe(torch.nn.Module):
        def forward(self, inputs: StepInputs) -> torch.Tensor:
            return linear[None, :, None].expand(inputs.states.shape[0], -1, inputs.states.shape[-1])

    index, weight = coarse_base(layout)
    np.testing.assert_array_equal(forecaster.rollout.step.base_index.numpy(), index)  # what the model uses
    step = InputsAndResiduals(Probe(), norm, regional_base=(index, weight))
    states = torch.zeros(1, 2, layout.n_nodes, len(norm.mean))  # zero: the tendency is the output, exact in float32
    out = step(StepInputs(states=states, forcings=torch.zeros(1, 3, layout.n_nodes, 4),
                          static=torch.zeros(1, layout.n_nodes, 2)))
    tendency = ((out[0] - states[0, -1]) / torch.from_numpy(norm.tendency_std.astype(np.float32))).numpy()
    want = np.where(regional, 0.25 + 0.01 * lat + 0.002 * lon, 0.01 * lat + 0.002 * lon)
    np.testing.assert_allclose(tendency, np.repeat(want[:, None], tendency.shape[1], axis=1), rtol=1e-5, atol=1e-5)

    with pytest.raises(ConfigError, match="nesting 'refine' joins the two grids"):
        graph_config(stores, model={"mode": "global", "nesting": "refine"})


def test_detail_inputs_give_the_regional_nodes_their_departure_from_the_interpolated_coarse_states(stores, initial):
    """``detail_inputs``: the network's input gains T_in * C columns holding, on the regional nodes, each input
    state minus its bilinear interpolation from the coarse nodes (zero on a linear field, the bump on top of
    it), and zeros on every other node; only with ``nesting: refine``."""
    forecaster = build_forecaster(graph_config(stores, model={"nesting": "refine", "detail_inputs": True}))
    plain = build_forecaster(graph_config(stores, model={"nesting": "refine"}))
    core, layout = forecaster.rollout.step.core, forecaster.layout
    steps, channels = core.input_steps, core.n_channels
    width = plain.rollout.step.core.network.data_embed.net[0].in_features
    assert core.network.data_embed.net[0].in_features == width + steps * channels

    seen: list[torch.Tensor] = []

    def record(x, noise=None):
        seen.append(x)
        return torch.zeros(x.shape[0], x.shape[1], channels)

    core.network.forward = record
    regional = torch.from_numpy(layout.is_regional)
    lat = torch.from_numpy(layout.node_latitude.astype(np.float32))
    lon = torch.from_numpy(layout.node_longitude.astype(np.float32))
    bump = torch.where(regional, torch.sin(lat) * torch.cos(lon), torch.zeros(()))
    field = 0.01 * lat + 0.002 * lon + bump  # linear in the box, which bilinear interpolation keeps exactly
    states = field[None, None, :, None].expand(1, steps, -1, channels) * torch.arange(1, channels + 1)
    core(StepInputs(states=states, forcings=torch.zeros(1, steps + 1, layout.n_nodes, 4),
                    static=torch.zeros(1, layout.n_nodes, 2)))
    detail = seen[0][0, :, -steps * channels:].reshape(layout.n_nodes, steps, channels)
    want = bump[:, None, None] * torch.arange(1, channels + 1)
    torch.testing.assert_close(detail, want.expand(-1, steps, -1), rtol=1e-4, atol=1e-4)
    assert float(detail[~regional].abs().max()) == 0.0

    forecaster = build_forecaster(graph_config(stores, model={"nesting": "refine", "detail_inputs": True}))
    fc = forecaster.forecast(initial, steps=2, starts=STARTS)
    assert all(np.isfinite(ds[v].values).all() for ds in fc.values() for v in ds.data_vars)
    with pytest.raises(ConfigError, match="detail_inputs measures the regional nodes .* nesting is 'cutout'"):
        graph_config(stores, model={"detail_inputs": True})


def test_a_stretched_model_without_regional_encoder_edges_forecasts_both_grids(stores, initial):
    """``regional_encoder: false``: the fine nodes only receive from the mesh (no encoder edges leave them);
    the model still forecasts both grids. Refused with ``cutout``, which would leave the mesh over the box
    nothing to read."""
    config = graph_config(stores, model={"nesting": "refine", "regional_encoder": False})
    forecaster = build_forecaster(config)
    regional = np.flatnonzero(forecaster.graph.data_is_regional)
    assert not np.isin(forecaster.graph.encoder_edges[0], regional).any()
    assert np.isin(forecaster.graph.decoder_edges[1], regional).any()
    fc = forecaster.forecast(initial, steps=2, starts=STARTS)
    assert set(fc) == {GLOBAL, REGIONAL}
    assert all(np.isfinite(ds[v].values).all() for ds in fc.values() for v in ds.data_vars)
    with pytest.raises(ConfigError, match="regional_encoder: false .* nesting 'cutout' drops"):
        graph_config(stores, model={"regional_encoder": False})


def test_bilinear_weights_reproduce_linear_fields_and_wrap_round_the_globe():
    lat, lon = np.array([-10.0, 0.0, 10.0]), np.arange(0.0, 360.0, 90.0)
    index, weight = bilinear_weights(lat, lon, np.array([5.0, -2.5, 0.0]), np.array([45.0, 315.0, 360.0]), source="t")
    field = (2.0 * lat[:, None] + 0.0 * lon[None, :]).ravel()
    np.testing.assert_allclose((field[index] * weight).sum(1), [10.0, -5.0, 0.0])
    ramp = np.tile(np.array([0.0, 1.0, 2.0, 3.0]), 3)  # longitude index as the field
    np.testing.assert_allclose((ramp[index] * weight).sum(1), [0.5, 1.5, 0.0])  # 315E lies between 270E and 0E
    with pytest.raises(SchemaError, match="do not cover"):
        bilinear_weights(lat, np.array([0.0, 10.0]), np.array([0.0]), np.array([20.0]), source="small box")


def test_initial_conditions_are_checked(stores, initial):
    forecaster = build_forecaster(graph_config(stores))
    with pytest.raises(SchemaError, match="input times are not in the analysis"):
        forecaster.forecast(initial, steps=1, starts=["2000-01-01T00"])  # needs 1999-12-31T18 too
    with pytest.raises(SchemaError, match=r"variables \['geopotential'\] are not in the store"):
        forecaster.forecast({**initial, REGIONAL: initial[REGIONAL].drop_vars("geopotential")}, steps=1, starts=STARTS)
    with pytest.raises(SchemaError, match="latitude has 8 values"):
        forecaster.forecast({GLOBAL: initial[GLOBAL], REGIONAL: initial[GLOBAL]}, steps=1, starts=STARTS)
