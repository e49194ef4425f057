"""Issue 18: bad input fails at once with one clear line; run directories are never mixed or lost.

Unit-level: no Flower process is started here (see ``test_hardening_e2e.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tomllib

from fedsec.config import ConfigError, RunConfig
from fedsec.launch import LaunchError, app_config_defaults, failure_cause, load_toml, prepare
from fedsec.preflight import check_config, check_keys, check_nodes
from fedsec.rundir import RunDir, RunDirError, claim, config_diff
from tests.conftest import ROOT

DEFAULTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
DIGITS = {"dataset": "digits", "k-shot": 4}


def _launch(*args: str, cwd: Path = ROOT, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_LOCAL_")}
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "fedsec.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    return proc, time.monotonic() - t0


# ---------------------------------------------------------------- 7: config errors early, naming the key
@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"num-server-rounds": "ten"}, r"num-server-rounds='ten' must be of type int"),
        ({"num-server-rouns": 3}, r"unknown run-config key 'num-server-rouns'; did you mean 'num-server-rounds'"),
        ({"strategi": "krum"}, r"unknown run-config key 'strategi'"),
    ],
)
def test_fast_key_check_names_the_key(values, message):
    # Prepare / Execute / Assert: the check needs only the pyproject table
    with pytest.raises(ConfigError, match=message):
        check_keys(values, DEFAULTS)


def test_launcher_config_error_is_one_line_exit_2_within_5_s_and_starts_no_flower(tmp_path):
    # Prepare
    run_dir = tmp_path / "run"
    # Execute
    proc, wall = _launch("run", "-c", "num-server-rounds='ten'", "-c", f"run-dir='{run_dir}'")
    # Assert: one line naming key and value, exit 2, fast, nothing created
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "fedsec run: error: run-config num-server-rounds='ten' must be of type int"
    ]
    assert wall < 5.0
    assert not run_dir.exists()


def test_launcher_deep_config_error_before_flower_starts(tmp_path):
    # Prepare: a value only the registries know is wrong
    run_dir = tmp_path / "run"
    # Execute
    proc, _ = _launch("run", "-c", "strategy='krumm'", "-c", f"run-dir='{run_dir}'", "--num-supernodes", "2")
    # Assert
    assert proc.returncode == 2
    assert "run-config strategy='krumm' is not allowed; allowed values:" in proc.stderr
    assert "Traceback" not in proc.stderr and not run_dir.exists()


@pytest.mark.parametrize(
    ("values", "nodes", "message"),
    [
        ({"attack": "badnets", "num-malicious": 3}, 2, r"num-malicious=3 exceeds the 2 clients"),
        ({"attack": "badnets", "num-malicious": 1, "malicious-ids": "0,5"}, 3, r"malicious-ids='0,5': \[5\] not in"),
        ({"min-train-nodes": 3}, 2, r"min-train-nodes=3 exceeds the 2 SuperNodes"),
        ({}, 0, r"--num-supernodes=0"),
    ],
)
def test_cross_key_rules_against_the_federation(values, nodes, message):
    # Prepare
    cfg = RunConfig.from_mapping(values)
    # Execute / Assert
    with pytest.raises(ConfigError, match=message):
        check_nodes(cfg, nodes)


def test_target_label_beyond_the_classes_is_refused_case_5():
    # Prepare: 10 classes, target 10 (the malicious clients used to crash every round, ASR 0.0%)
    values = {**DIGITS, "attack": "badnets", "num-malicious": 1, "target-label": 10, "pretrained": "none"}
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"target-label=10 is not a class of digits \(10 classes: 0..9\)"):
        check_config(values, num_nodes=3)


def test_n_ctx_must_match_ctx_init_tokens():
    # Prepare / Execute / Assert
    with pytest.raises(ConfigError, match=r"n-ctx=6 but ctx-init='a photo of a' has 4 tokens; set n-ctx=4"):
        check_config({**DIGITS, "n-ctx": 6, "pretrained": "none"}, num_nodes=3)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"patch-size": 40}, r"patch-size=40 does not fit the 32 px input of fedsec-tiny-clip-v2; set 1..32"),
        ({"patch-top": 30}, r"patch-top=30: a 8 px patch there leaves the 32 px image; set patch-top in 0..24"),
    ],
)
def test_a_patch_trigger_must_fit_the_image(values, message):
    # Prepare
    base = {**DIGITS, "attack": "badnets", "num-malicious": 1, "pretrained": "none"}
    # Execute / Assert
    with pytest.raises(ConfigError, match=message):
        check_config({**base, **values}, num_nodes=3)


def test_missing_data_and_checkpoint_are_named(tmp_path):
    # Prepare / Execute / Assert
    with pytest.raises(ConfigError, match=r"dataset='fashion-mnist' data-root='.*empty'.*not found"):
        check_config({"data-root": str(tmp_path / "empty")}, num_nodes=3)
    bad = tmp_path / "bad"
    bad.mkdir()
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        (bad / f"{stem}.gz").write_bytes(b"not gzip")
    with pytest.raises(ConfigError, match=r"data-root='.*bad'.*train-images-idx3-ubyte.gz is unreadable"):
        check_config({"data-root": str(bad)}, num_nodes=3)
    with pytest.raises(ConfigError, match=r"pretrained='.*nope.pt'.*does not exist"):
        check_config({**DIGITS, "pretrained": str(tmp_path / "nope.pt")}, num_nodes=3)


def test_toml_syntax_error_names_file_and_line(tmp_path):
    # Prepare
    bad = tmp_path / "exp.toml"
    bad.write_text('num-server-rounds = 3\nstrategy = "krum\n')
    # Execute / Assert
    with pytest.raises(LaunchError, match=r"exp\.toml: TOML syntax error: .*line 2"):
        load_toml(bad)


def test_a_grid_file_with_a_syntax_error_is_named(tmp_path):
    # Prepare
    from fedsec.sweep import load_grid

    grid = tmp_path / "grid.toml"
    grid.write_text("[grid]\nseed = [0,, 1]\n")
    # Execute / Assert
    with pytest.raises(LaunchError, match=r"grid\.toml: TOML syntax error: .*line 2"):
        load_grid(grid)


def test_a_folder_that_is_not_the_app_is_named(tmp_path):
    # Prepare / Execute / Assert
    with pytest.raises(LaunchError, match=r"is not the fedsec app folder \(no pyproject.toml\).*--app"):
        app_config_defaults(tmp_path)
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "other"\n')
    with pytest.raises(LaunchError, match=r"has no \[tool.flwr.app\]"):
        app_config_defaults(tmp_path)


def test_config_write_outside_the_repo_is_a_clear_error(tmp_path):
    # Prepare / Execute
    proc, _ = _launch("config", "--write", cwd=tmp_path)
    # Assert
    assert proc.returncode == 2
    assert "is not the fedsec app's pyproject.toml" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- 1-4: a run directory holds one run
def _finished_run(path: Path, config: dict) -> dict[str, bytes]:
    rd = RunDir.create(path, config)
    rd.append_metrics({"round": 0, "clean_acc": 0.5})
    rd.write_checkpoint(0, {"ctx": np.zeros((2, 3), np.float32)})
    rd.write_json("summary.json", {"clean_acc": 0.5})
    (path / "flwr.log").write_text("old log\n")
    return {p.name: p.read_bytes() for p in path.rglob("*") if p.is_file()}


def test_rerun_into_a_finished_run_is_refused_and_touches_nothing_case_1(tmp_path):
    # Prepare
    path = tmp_path / "run"
    cfg = RunConfig.from_mapping({"run-dir": str(path)}).to_dict()
    before = _finished_run(path, cfg)
    # Execute / Assert: a plain re-run and a resume are both refused
    with pytest.raises(RunDirError, match=r"holds a finished run \(summary.json\).*--overwrite"):
        claim(path, {**cfg, "strategy": "krum"}, resume=False)
    with pytest.raises(RunDirError, match=r"resume=true but run-dir .* holds a finished run"):
        claim(path, cfg, resume=True)
    # Assert: every file is unchanged (case 3: resume used to delete summary.json)
    assert {p.name: p.read_bytes() for p in path.rglob("*") if p.is_file()} == before


def test_resume_with_a_changed_config_lists_the_keys_case_2(tmp_path):
    # Prepare: an unfinished run (checkpoint, no summary)
    path = tmp_path / "run"
    cfg = RunConfig.from_mapping({"run-dir": str(path)}).to_dict()
    rd = RunDir.create(path, cfg)
    rd.write_checkpoint(1, {"ctx": np.zeros(3, np.float32)})
    # Execute / Assert
    with pytest.raises(RunDirError, match=r"config differs .*seed: 0 -> 5; strategy: 'fedavg' -> 'krum'"):
        claim(path, {**cfg, "seed": 5, "strategy": "krum", "resume": True}, resume=True)
    assert claim(path, {**cfg, "resume": True}, resume=True) == "resume"
    with pytest.raises(RunDirError, match=r"holds an unfinished run \(rounds up to 1\); continue it with resume=true"):
        claim(path, cfg, resume=False)


def test_resume_on_a_missing_or_empty_directory_is_refused_case_4(tmp_path):
    # Prepare
    (tmp_path / "empty").mkdir()
    # Execute / Assert
    with pytest.raises(RunDirError, match=r"run-dir .*missing does not exist; drop resume=true"):
        claim(tmp_path / "missing", {}, resume=True)
    with pytest.raises(RunDirError, match=r"holds no checkpoint"):
        claim(tmp_path / "empty", {}, resume=True)


def test_foreign_files_and_failed_starts(tmp_path):
    # Prepare: a folder with unrelated files; a folder a failed start left behind
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("x")
    RunDir.create(tmp_path / "failed", {"seed": 0})
    (tmp_path / "failed" / "flwr.log").write_text("Traceback ...\n")
    # Execute / Assert
    with pytest.raises(RunDirError, match=r"not empty and holds no fedsec run \(thesis.tex\)"):
        claim(tmp_path / "home", {}, resume=False)
    assert claim(tmp_path / "failed", {"seed": 1}, resume=False) == "new"


def test_overwrite_moves_the_previous_run_aside_never_deletes(tmp_path):
    # Prepare
    path = tmp_path / "run"
    before = _finished_run(path, {"seed": 0})
    values = {**DIGITS, "pretrained": "none", "run-dir": str(path)}
    # Execute
    with pytest.raises(RunDirError):
        prepare(ROOT, values, num_supernodes=2)
    _, cfg, run_dir = prepare(ROOT, values, num_supernodes=2, overwrite=True)
    # Assert: the old run is intact beside the new (empty) directory
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and not path.exists() and run_dir == path and cfg.dataset == "digits"
    assert {p.name: p.read_bytes() for p in aside[0].rglob("*") if p.is_file()} == before


def test_config_diff_ignores_resume_only():
    # Prepare / Execute / Assert
    assert config_diff({"a": 1, "resume": False}, {"a": 1, "resume": True}) == []
    assert config_diff({"a": 1}, {"a": 1.5, "b": 2}) == ["a: 1 -> 1.5", "b: '<absent>' -> 2"]


# ---------------------------------------------------------------- 8: the ServerApp's error reaches the terminal
LOG = """$ flwr run ...
[   29.5s] INFO :      [fedsec] run directory: /tmp/x
[   63.1s] \x1b[91mERROR \x1b[0m:     Simulation raised an exception
[   63.1s] Traceback (most recent call last):
[   63.1s]   File "/x/fedsec/models/prompt.py", line 122, in __init__
[   63.1s]     raise ValueError(
[   63.1s] ValueError: n-ctx=6 but ctx-init 'a photo of a' has 4 tokens
[   63.1s] \x1b[91mERROR \x1b[0m:     Exit Code: 700
"""


def test_failure_cause_is_the_serverapps_exception_line():
    # Prepare / Execute / Assert
    assert failure_cause(LOG) == "ValueError: n-ctx=6 but ctx-init 'a photo of a' has 4 tokens"
    assert failure_cause("INFO : round 1/1\n") == ""
    assert failure_cause("ERROR :     Exit Code: 700\n") == "ERROR :     Exit Code: 700"


def test_every_malicious_client_failing_is_an_error():
    # Prepare: 4 nodes, partitions 0..3; partition 2 malicious; round 1: nodes 10, 11, 13 replied, node 12 failed
    from strategies.server_app import malicious_failure

    known: dict[int, int] = {}
    info = {"partitions": {10: 0, 11: 1, 13: 3}, "failed_replies": 1, "failed_nodes": [12], "num_sent": 4}
    ok = {"partitions": {10: 0, 11: 1, 12: 2, 13: 3}, "failed_replies": 0, "failed_nodes": [], "num_sent": 4}
    benign_fail = {"partitions": {10: 0, 12: 2, 13: 3}, "failed_replies": 1, "failed_nodes": [11], "num_sent": 4}
    # Execute
    problem = malicious_failure(info, [2], known, ["error reply: ClientAppException: IndexError: target 10"])
    # Assert
    assert problem is not None and "every malicious client failed" in problem and "IndexError: target 10" in problem
    assert malicious_failure(ok, [2], known, []) is None
    assert malicious_failure(benign_fail, [2], known, ["error reply: x"]) is None
    assert malicious_failure(info, [], known, []) is None
    all_failed = {"partitions": {}, "failed_replies": 4, "failed_nodes": [10, 11, 12, 13], "num_sent": 4}
    assert malicious_failure(all_failed, [2], known, ["error reply: x"]) is None


def test_failed_sweep_cells_are_in_the_report_with_their_reason(tmp_path):
    # Prepare: one finished run directory and one failure
    from fedsec.sweep import report, write_failures

    path = tmp_path / "runs" / "strategy=fedavg"
    _finished_run(path, {"strategy": "fedavg", "seed": 0})
    failures = {"strategy=krum": "ConfigError: run-config min-train-nodes=5 exceeds the 2 SuperNodes"}
    # Execute
    report([path], tmp_path / "out" / "grid", ["strategy"], failures=failures)
    side = write_failures(tmp_path / "out" / "grid", failures)
    # Assert
    md = (tmp_path / "out" / "grid.md").read_text()
    assert "**Failed runs**" in md and "| strategy=krum | ConfigError: run-config min-train-nodes=5" in md
    assert side is not None and "strategy=krum" in side.read_text()


def test_report_names_why_a_run_directory_is_unfinished(tmp_path):
    # Prepare: a run whose ServerApp failed, and one cut after round 1
    from fedsec.sweep import unfinished_reason

    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "flwr.log").write_text(LOG)
    cut = tmp_path / "cut"
    RunDir.create(cut, {}).write_checkpoint(1, {"ctx": np.zeros(2, np.float32)})
    # Execute / Assert
    assert (
        unfinished_reason(failed) == "ValueError: n-ctx=6 but ctx-init 'a photo of a' has 4 tokens (no round finished)"
    )
    assert unfinished_reason(cut) == "unfinished: stopped after round 1"


# ---------------------------------------------------------------- 10: checkpoints
def test_garbage_checkpoint_is_named_without_unsafe_advice(tmp_path):
    # Prepare
    from fedsec.models.checkpoint import CheckpointMismatch, check_checkpoint
    from fedsec.models.factory import register_configs

    register_configs()
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint" * 10)
    # Execute / Assert
    with pytest.raises(CheckpointMismatch, match=r"junk.pt is not a readable PyTorch/safetensors state_dict") as exc:
        check_checkpoint("fedsec-tiny-clip", junk)
    assert "weights_only=False" not in str(exc.value)


def test_checkpoint_of_another_architecture_names_the_mismatch(tmp_path, random_clip):
    # Prepare: the tiny CLIP's state_dict with a wider text tower under another name
    import open_clip
    import torch

    from fedsec.models.checkpoint import CheckpointMismatch, check_checkpoint
    from fedsec.models.factory import create_clip

    cfg = open_clip.get_model_config("fedsec-tiny-clip")
    wide = {**cfg, "text_cfg": {**cfg["text_cfg"], "width": 64, "heads": 2}}
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "fedsec-test-narrow.json").write_text(json.dumps(wide))
    open_clip.add_model_config(tmp_path / "cfg")
    good = tmp_path / "tiny.pt"
    torch.save(random_clip.model.state_dict(), good)
    try:
        # Execute / Assert: the mismatch is named before open_clip tries to load it
        with pytest.raises(
            CheckpointMismatch, match=r"does not fit model 'fedsec-test-narrow': \d+ shape mismatches \("
        ):
            check_checkpoint("fedsec-test-narrow", good)
        with pytest.raises(CheckpointMismatch, match=r"vs model \["):
            create_clip("fedsec-test-narrow", str(good))
        check_checkpoint("fedsec-tiny-clip", good)  # the right model loads it
    finally:  # open_clip's registry is global: the test model must not leak into test_catalog's comparison
        from open_clip.factory import _MODEL_CONFIGS

        _MODEL_CONFIGS.pop("fedsec-test-narrow", None)


# ---------------------------------------------------------------- 11: client-reported sizes, FoolsGold
def test_reported_weights_are_bounded_at_a_multiple_of_the_median():
    # Prepare
    from strategies.validation import cap_weights

    # Execute
    capped = cap_weights([160, 160, 150, 1e9], 2.0)
    # Assert: the liar counts as 2 x the median; honest sizes untouched; 0 = off
    assert capped == [160, 160, 150, 320.0]
    assert cap_weights([160, 1e9], 0.0) == [160, 1e9]


def test_an_inflated_num_examples_does_not_take_over_fedavg():
    # Prepare: three honest clients at 0, one liar at 10 claiming a billion examples
    from flwr.serverapp.strategy import FedAvg

    from strategies.validation import Validated
    from tests.strategy_helpers import ctx_of, run_round, train_content

    contents = {n: train_content(np.zeros((1, 2), np.float32), num_examples=100) for n in (1, 2, 3)}
    contents[4] = train_content(np.full((1, 2), 10.0, np.float32), num_examples=10**9)
    strategy = Validated(FedAvg(fraction_evaluate=0.0), max_weight_ratio=2.0)
    # Execute
    arrays, _, _ = run_round(strategy, np.zeros((1, 2), np.float32), contents, server_round=1)
    # Assert: weight 200 of 500, not ~1.0
    np.testing.assert_allclose(ctx_of(arrays), np.full((1, 2), 10.0 * 200 / 500), rtol=1e-6)


def test_foolsgold_caps_update_norms_at_1_by_default():
    # Prepare
    from strategies.foolsgold import FoolsGold, cap_norms
    from strategies.registry import STRATEGIES, load_all
    from tests.strategy_helpers import make_sctx

    load_all()
    updates = np.array([[3.0, 4.0], [0.3, 0.4]])
    # Execute
    capped = cap_norms(updates, 1.0)
    strategy = STRATEGIES.get("foolsgold")(make_sctx("foolsgold", 3))
    # Assert
    np.testing.assert_allclose(capped, [[0.6, 0.8], [0.3, 0.4]])
    np.testing.assert_array_equal(cap_norms(updates, 0.0), updates)
    assert isinstance(strategy, FoolsGold) and strategy.norm_cap == 1.0


def test_foolsgold_identical_histories_do_not_depend_on_rounding():
    # Prepare: identical histories, one copy perturbed in the last bits
    from strategies.foolsgold import foolsgold_weights

    rng = np.random.default_rng(0)
    h = rng.normal(size=64)
    exact = np.stack([h, h, h])
    rounded = np.stack([h, h * (1 + 1e-15), h + 1e-17])
    # Execute
    w_exact, w_rounded = foolsgold_weights(exact), foolsgold_weights(rounded)
    # Assert: the same weights, all zero (sybils), either way
    np.testing.assert_array_equal(w_exact, w_rounded)
    np.testing.assert_array_equal(w_exact, 0.0)
