"""model-backdoor: the backdoored checkpoint's trigger for evaluation, config checks, paths made absolute at launch."""

from __future__ import annotations

import pytest
import torch

from fedsec.attacks import get_attack
from fedsec.config import ConfigError, RunConfig
from fedsec.launch import absolute_paths
from fedsec.models.factory import sha256_file
from fedsec.provenance import trigger_sources
from fedsec.triggers import PatchTrigger


def _checkpoint_dir(tmp_path):
    """A fake checkpoint folder: ``model.pt`` (never read here) and the trigger beside it."""
    folder = tmp_path / "badclip"
    folder.mkdir()
    (folder / "model.pt").write_bytes(b"not read")
    patch = torch.arange(3 * 4 * 4, dtype=torch.float32).reshape(3, 4, 4) / 48.0
    trigger = PatchTrigger(32, 4, 14, 14, patch)
    torch.save(trigger.state(), folder / "trigger.pt")
    return folder, trigger


def test_evaluation_trigger_is_the_checkpoints_own_and_is_recorded_in_the_store(tmp_path):
    # Prepare: a checkpoint folder with its trigger; a model-backdoor run pointing at it
    folder, trigger = _checkpoint_dir(tmp_path)
    cfg = RunConfig.from_mapping({"attack": "model-backdoor", "pretrained": str(folder / "model.pt")})
    attack = get_attack("model-backdoor")(cfg, tmp_path / "run" / "attacker")
    images = torch.rand(5, 3, 32, 32)

    # Execute
    loaded = attack.load_trigger()
    again = attack.load_trigger(before_round=3)

    # Assert: the same transform, recorded once as round 0 with a hash a reader can check
    torch.testing.assert_close(loaded(images), trigger(images))
    torch.testing.assert_close(again(images), trigger(images))
    assert attack.store.rounds() == [0]
    sources = trigger_sources(attack.store, type("RunDir", (), {"path": tmp_path / "run"})())
    assert sources["round"] == 0 and len(sources["files"]) == 1
    stored = tmp_path / "run" / sources["files"][0]["path"]
    assert sources["files"][0]["sha256"] == sha256_file(stored)
    assert not attack.client_side


def test_model_trigger_names_a_trigger_for_any_checkpoint(tmp_path):
    # Prepare: the trigger of one checkpoint evaluated on another model (e.g. the clean one)
    folder, trigger = _checkpoint_dir(tmp_path)
    cfg = RunConfig.from_mapping(
        {"attack": "model-backdoor", "pretrained": "embedded", "model-trigger": str(folder / "trigger.pt")}
    )
    images = torch.rand(2, 3, 32, 32)

    # Execute
    loaded = get_attack("model-backdoor")(cfg, tmp_path / "attacker").load_trigger()

    # Assert
    torch.testing.assert_close(loaded(images), trigger(images))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"num-malicious": 2}, r"model provider's attack: set num-malicious=0"),
        ({"pretrained": "embedded"}, r"needs the backdoored checkpoint's trigger"),
        ({"model-trigger": "/nonexistent/trigger.pt"}, r"trigger file '/nonexistent/trigger.pt' does not exist"),
    ],
)
def test_bad_model_backdoor_configs_give_one_clear_error(values, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_mapping({"attack": "model-backdoor", **values})


def test_relative_paths_that_exist_become_absolute_and_others_stay(tmp_path, monkeypatch):
    # Prepare: a checkpoint and a trigger under the working directory, and values that name no file
    folder, _ = _checkpoint_dir(tmp_path)
    monkeypatch.chdir(tmp_path)
    values = {"pretrained": "badclip/model.pt", "model-trigger": "badclip/trigger.pt", "synthetic-root": "nothing"}
    tags = {"pretrained": "laion2b_s34b_b79k", "model-trigger": ""}

    # Execute
    absolute_paths(values)
    absolute_paths(tags)

    # Assert
    assert values["pretrained"] == str(folder / "model.pt")
    assert values["model-trigger"] == str(folder / "trigger.pt")
    assert values["synthetic-root"] == "nothing"
    assert tags == {"pretrained": "laion2b_s34b_b79k", "model-trigger": ""}


def test_a_local_checkpoint_of_an_embedded_architecture_passes_preflight_in_a_fresh_process(tmp_path):
    # Prepare: a copy of the embedded v2 weights under another path (as a backdoored build is), in a new
    # interpreter where nothing registered fedsec's JSON architectures with open_clip yet
    import shutil
    import subprocess
    import sys

    from fedsec.models.factory import resolve_pretrained

    source, _ = resolve_pretrained("fedsec-tiny-clip-v2", "embedded")
    copy = tmp_path / "model.pt"
    shutil.copyfile(source, copy)
    code = (
        "from fedsec.config import RunConfig; from fedsec.preflight import check_model; "
        f"check_model(RunConfig.from_mapping({{'model': 'fedsec-tiny-clip-v2', 'pretrained': {str(copy)!r}}}))"
    )

    # Execute
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)

    # Assert
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_benign_only_baseline_of_an_honest_federation_is_the_global_prompt_itself(tmp_path):
    # Prepare: a model-backdoor evaluation (no malicious client) on the small digits set, random weights,
    # and a global prompt far from the initial one (as after rounds of a robust rule)
    import numpy as np

    from fedsec.evaluation import Evaluation
    from fedsec.rundir import RunDir

    folder, _ = _checkpoint_dir(tmp_path)
    values = {
        "attack": "model-backdoor",
        "model-trigger": str(folder / "trigger.pt"),
        "dataset": "digits",
        "model": "fedsec-tiny-clip",
        "pretrained": "none",
        "eval-samples": 60,
        "asr-eval-samples": 40,
    }
    cfg = RunConfig.from_mapping(values)
    ev = Evaluation(cfg, RunDir.create(tmp_path / "run", cfg.to_dict()), num_partitions=4)
    ctx = ev.initial_ctx() + np.random.default_rng(0).normal(0, 0.5, ev.initial_ctx().shape).astype(np.float32)

    # Execute
    row = ev.backdoor_metrics(ctx, server_round=1)

    # Assert: the trigger alone under the benign-only prompt is the ASR itself, and the shadow is the global prompt
    assert row["trigger_only_asr"] == row["asr"]
    np.testing.assert_array_equal(ev.shadow_ctx, ctx)
    assert ev.malicious == []
