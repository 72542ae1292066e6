"""Config loading and the CLI's handling of bad input: clear messages, non-zero exit, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from forecasting.cli import main
from forecasting.config import ConfigError, ExperimentConfig, SimulationConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_configs_are_valid():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        assert isinstance(load_config(path), ExperimentConfig), path


def test_unknown_config_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsimulation:\n  years: 1\n  seeed: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'simulation\.seeed'"):
        load_config(bad)


def test_invalid_value_and_yaml_syntax_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("simulation:\n  nlat: 100\n")
    with pytest.raises(ConfigError, match="nlat must be a multiple of 32"):
        load_config(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("simulation: [1, 2\n")
    with pytest.raises(ConfigError, match=r"cannot parse config .*broken\.yaml at line"):
        load_config(broken)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_region_must_be_ordered():
    with pytest.raises(ValueError, match="lat_min"):
        SimulationConfig.model_validate({"region": {"lat_min": 60, "lat_max": 50}})


def test_cli_unknown_config_key_exits_nonzero_and_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("simulation:\n  yeers: 1\n")
    out = tmp_path / "sim"
    assert main(["simulate", "--out", str(out), "--config", str(bad)]) == 2
    assert "unknown key 'simulation.yeers'" in capsys.readouterr().err
    assert not out.exists()


def test_cli_refuses_existing_output_before_working(tmp_path, capsys):
    out = tmp_path / "sim"
    out.mkdir()
    assert main(["simulate", "--out", str(out), "--years", "0.01"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_cli_bad_key_value_option(tmp_path, capsys):
    assert main(["ingest", "x.nc", "--out", str(tmp_path / "o.zarr"), "--units", "t2m"]) == 2
    assert "--units expects KEY=VALUE" in capsys.readouterr().err


def test_cli_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for command in ("quickstart", "simulate", "ingest", "stats"):
        assert command in text


def test_bootstrap_block_length_is_checked_on_the_command_line_and_in_configs(tmp_path, capsys):
    out = tmp_path / "verify"
    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit) as exc:
            main(["verify", "--forecast", "f.zarr", "--truth", "t.zarr", "--out", str(out), "--bootstrap-block", bad])
        assert exc.value.code == 2
        assert "--bootstrap-block" in capsys.readouterr().err and not out.exists()
    config = tmp_path / "backtest.yaml"
    config.write_text("forecast:\n  checkpoint: m.pt\n  out: bt\n  bootstrap_block: 0\n")
    with pytest.raises(ConfigError, match="bootstrap_block"):
        load_config(config)
    config.write_text("forecast:\n  checkpoint: m.pt\n  out: bt\n  bootstrap_block: 3\n")
    assert load_config(config).forecast.bootstrap_block == 3
    config.write_text("forecast:\n  checkpoint: m.pt\n  out: bt\n")
    assert load_config(config).forecast.bootstrap_block == "auto"
