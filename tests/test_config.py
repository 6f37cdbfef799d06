"""Typed configs: presets, YAML, overrides, and errors that name the field and the allowed values."""
from __future__ import annotations

import json

import pytest

from cxrray.cli import main
from cxrray.config import ConfigError, load_config, resolve_salt


def test_presets_yaml_and_overrides_compose(tmp_path):
    assert load_config().ingest.size == 64
    assert load_config("paper").ingest.size == 256
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("preset: small\ningest:\n  fit: crop\n  decode:\n    voi: none\n")
    cfg = load_config(yaml_file, ["ingest.shard_samples=7", "ingest.split_fractions={train: 1}"])
    assert (cfg.preset, cfg.ingest.size, cfg.ingest.fit, cfg.ingest.decode.voi) == ("small", 128, "crop", "none")
    assert cfg.ingest.shard_samples == 7 and cfg.ingest.split_fractions == {"train": 1}


@pytest.mark.parametrize("override,expected", [
    ("ingest.fit=stretch", "ingest.fit: Input should be 'pad' or 'crop'"),
    ("ingest.size=abc", "ingest.size: Input should be a valid integer"),
    ("ingest.size=8", "ingest.size: Input should be greater than or equal to 16"),
    ("ingest.decode.voi=maybe", "ingest.decode.voi: Input should be 'auto' or 'none'"),
    ("ingest.sise=64", "ingest.sise: unknown field (allowed: dataset, decode, fit, salt, salt_env, shard_samples, size"),
    ("ingest.size", "is not key=value"),
])
def test_bad_values_name_the_field_and_allowed_values(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert expected in str(err.value)


def test_unknown_preset_and_cli_exit_code(capsys):
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config("huge")
    assert main(["config", "--set", "ingest.fit=stretch"]) == 2
    assert "ingest.fit: Input should be 'pad' or 'crop'" in capsys.readouterr().err
    assert main(["config", "--config", "small"]) == 0
    assert json.loads(capsys.readouterr().out)["ingest"]["size"] == 128


def test_salt_is_secret(monkeypatch):
    cfg = load_config("tiny", ["ingest.salt=hunter2"])
    assert resolve_salt(cfg.ingest) == "hunter2"
    assert "hunter2" not in cfg.model_dump_json()
    monkeypatch.delenv("CXRRAY_SALT")
    with pytest.raises(ConfigError, match="CXRRAY_SALT"):
        resolve_salt(load_config().ingest)
