"""Run-config validation and the pyproject defaults."""

from __future__ import annotations

import pytest
import tomllib

from fedsec.config import ConfigError, RunConfig, all_extra_defaults
from tests.conftest import ROOT


def test_pyproject_defaults_equal_config_defaults():
    # Prepare
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    # Execute
    expected = {**RunConfig.defaults(), **all_extra_defaults()}
    # Assert: every key a user may override is in pyproject, with the same default
    assert table == expected


def test_required_keys_exist():
    keys = set(RunConfig.keys())
    for key in (
        "num-server-rounds",
        "run-dir",
        "seed",
        "dataset",
        "model",
        "pretrained",
        "n-ctx",
        "strategy",
        "attack",
        "num-malicious",
        "target-label",
    ):
        assert key in keys


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"strategy": "krumm"}, r"strategy='krumm' is not allowed; allowed values: .*fedavg"),
        ({"dataset": "imagenet"}, r"dataset='imagenet' is not allowed; allowed values: .*fashion-mnist"),
        ({"attack": "nope"}, r"attack='nope' is not allowed; allowed values: .*none"),
        ({"n-ctx": 0}, r"n-ctx=0 is out of range"),
        ({"num-server-rounds": "3"}, r"num-server-rounds='3' must be of type int"),
        ({"unknown-key": 1}, r"unknown run-config key 'unknown-key'"),
        ({"prompt-template": "a photo"}, r"prompt-template must contain"),
        ({"device": "tpu"}, r"device='tpu' is not allowed; allowed values: auto, cpu, cuda"),
    ],
)
def test_bad_values_give_one_clear_error(values, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_mapping(values)


def test_ints_are_accepted_for_floats_and_round_trip():
    cfg = RunConfig.from_mapping({"lr": 1, "num-server-rounds": 3})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    again = RunConfig.from_mapping(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()


def test_relative_run_dir_resolves_under_runs_root(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSEC_RUNS_ROOT", str(tmp_path))
    assert RunConfig.from_mapping({"run-dir": "a/b"}).resolved_run_dir() == tmp_path / "a" / "b"
    assert RunConfig.from_mapping({"run-dir": "/abs/x"}).resolved_run_dir().as_posix() == "/abs/x"
    auto = RunConfig.from_mapping({}).resolved_run_dir()
    assert auto.parent == tmp_path and auto.name.endswith("-none-fedavg")
    assert RunConfig.from_mapping({}).resolved_run_dir(run_id=42).name == "run-42-none-fedavg"


def test_config_reference_in_docs_is_current():
    # Prepare
    from fedsec.config import config_reference_markdown

    # Execute
    expected = config_reference_markdown()

    # Assert: regenerate with `fedsec config --markdown > docs/config-reference.md`
    assert (ROOT / "docs" / "config-reference.md").read_text() == expected


def test_component_keys_are_checked_against_their_declaration():
    # Prepare / Execute / Assert: a range and a choice declared by components (a wrapper, an attack)
    with pytest.raises(ConfigError, match=r"bounds-trim=1.5 is out of range \[0.0, 0.99\]"):
        RunConfig.from_mapping({"bounds-trim": 1.5})
    with pytest.raises(ConfigError, match=r"attack-mode='both' is not allowed; allowed values: joint, alternating"):
        RunConfig.from_mapping({"attack-mode": "both"})
