"""End-to-end: `flwr run .` simulations on the embedded model through fedsec's launcher."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedsec.launch import run
from tests.conftest import ROOT, needs_fmnist

pytestmark = [pytest.mark.e2e, needs_fmnist]

SMALL = {
    "num-server-rounds": 3,
    "k-shot": 8,
    "local-steps": 15,
    "eval-samples": 2000,
    "asr-eval-samples": 500,
}
#: Two quick rounds of 3 clients for the learners' runs.
TINY = {**SMALL, "num-server-rounds": 2, "k-shot": 4, "local-steps": 4, "eval-samples": 300, "lr": 0.1}


def test_promptfl_simulation_beats_zero_shot(tmp_path):
    # Prepare / Execute: 4 clients, 3 rounds, FedAvg, no attack
    summary = run(ROOT, {**SMALL, "run-dir": str(tmp_path / "run")}, num_supernodes=4, quiet=True)
    # Assert: accuracy rises above zero-shot (v2, shared context: 45.8% -> 53.0% in these 3 rounds), and the run
    # directory is complete
    assert summary["clean_acc"] > summary["zero_shot_acc"] + 0.05
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert all(r["asr"] is None for r in rows) and "round_s" in rows[-1]
    for name in ("config.json", "summary.json", "final_prompt.npz", "final_prompt.json", "flwr.log"):
        assert (tmp_path / "run" / name).exists(), name
    assert len(list((tmp_path / "run" / "checkpoints").glob("round_*.npz"))) == 4
    ident = json.loads((tmp_path / "run" / "final_prompt.json").read_text())
    assert len(ident["checkpoint_sha256"]) == 64 and ident["classnames"][0] == "t-shirt"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["num-server-rounds"] == 3


def test_attack_run_records_asr_trigger_and_detection(tmp_path):
    # Prepare / Execute: BadPromptFL, 1 of 4 clients malicious, Krum (a detecting defense)
    cfg = {
        **SMALL,
        "num-server-rounds": 2,
        "attack": "badpromptfl",
        "trigger-steps": 20,  # the default fits the trigger for 100 steps a round; this test checks records only
        "num-malicious": 1,
        "strategy": "krum",
        "num-byzantine": 1,
        "run-dir": str(tmp_path / "run"),
    }
    summary = run(ROOT, cfg, num_supernodes=4, quiet=True)
    # Assert
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["asr"] is None and all(r["asr"] is not None for r in rows[1:])
    assert all(0.0 <= r["trigger_only_asr"] <= 1.0 and 0.0 <= r["shadow_clean_acc"] <= 1.0 for r in rows[1:])
    # the benign-only shadow prompt is trained by the 3 benign clients every round (fedsec.shadow)
    assert [r["shadow_replies"] for r in rows[1:]] == [3, 3]
    assert all(0.0 <= r["trigger_zs_asr"] <= 1.0 and 0.0 <= r["clean_target_rate"] <= 1.0 for r in rows[1:])
    assert "trigger_zs_asr" in summary and "clean_target_rate" in summary and "shadow_clean_acc" in summary
    assert all("det_tpr" in r and "mal_cos_dist" in r for r in rows[1:])
    assert summary["malicious_partitions"] and len(summary["malicious_partitions"]) == 1
    assert sorted(p.name for p in (tmp_path / "run" / "attacker").glob("round_*")) == ["round_0001", "round_0002"]


def test_badnets_on_a_visual_prompt_learner_under_fltrust(tmp_path):
    # Prepare / Execute: BadNets, 1 of 3 clients malicious, VPT-deep (tokens before every image block, text prompt
    # fixed), FLTrust (its server update trains the same learner on the root set), 2 rounds; the shadow federation
    # trains vpt too
    cfg = {**TINY, "asr-eval-samples": 200, "learner": "vpt-deep", "vpt-tokens": 2, "attack": "badnets"}
    cfg.update({"num-malicious": 1, "strategy": "fltrust", "run-dir": str(tmp_path / "run")})
    run(ROOT, cfg, num_supernodes=3, quiet=True)
    # Assert: only vpt travelled and was saved (depth x tokens x width) and it moved; the text context stayed at its
    # init; every round after the first has ASR and both trigger-alone baselines, the shadow's 2 benign replies
    # trained its own vpt (kept in the checkpoint); the run's identity says where the tokens enter the encoder
    with np.load(tmp_path / "run" / "final_prompt.npz") as z:
        saved = {k: z[k] for k in z.files}
    with np.load(tmp_path / "run" / "checkpoints" / "round_0000.npz") as z:
        first = {k: z[k] for k in z.files}
    ident = json.loads((tmp_path / "run" / "final_prompt.json").read_text())
    assert ident["learner"] == "vpt-deep" and ident["learned_arrays"] == ["vpt"]
    assert saved["vpt"].shape == (ident["visual_prompt"]["depth"], 2, saved["vpt"].shape[2])
    assert not np.array_equal(saved["vpt"], first["vpt"]) and np.array_equal(saved["ctx"], first["ctx"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(0.0 <= r[k] <= 1.0 for r in rows[1:] for k in ("asr", "trigger_only_asr", "trigger_zs_asr"))
    assert [r["shadow_replies"] for r in rows[1:]] == [2, 2] and 0.0 < rows[-1]["shadow_clean_acc"] <= 1.0
    with np.load(tmp_path / "run" / "checkpoints" / "round_0002.npz") as z:
        assert {"vpt", "shadow_vpt", "ctx", "shadow_ctx"} <= set(z.files)
        assert not np.array_equal(z["vpt"], z["shadow_vpt"])


def test_blended_on_clip_adapter_federates_the_adapter(tmp_path):
    # Prepare / Execute: Blended, 1 of 3 clients malicious, CLIP-Adapter (features cached, adapter learned), 2 rounds
    cfg = {**TINY, "asr-eval-samples": 200, "learner": "clip-adapter", "attack": "blended", "num-malicious": 1}
    cfg["run-dir"] = str(tmp_path / "run")
    run(ROOT, cfg, num_supernodes=3, quiet=True)
    # Assert: the adapter's two matrices are the run's arrays, moved, and kept with the shadow's; ASR is measured
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["asr"] <= 1.0 and 0.0 <= r["trigger_only_asr"] <= 1.0 for r in rows[1:])
    ident = json.loads((tmp_path / "run" / "final_prompt.json").read_text())
    assert ident["learner"] == "clip-adapter" and ident["learned_arrays"] == ["adapter-down", "adapter-up"]
    with (
        np.load(tmp_path / "run" / "checkpoints" / "round_0000.npz") as z0,
        np.load(tmp_path / "run" / "final_prompt.npz") as zf,
    ):
        assert {"shadow_adapter-down", "shadow_adapter-up"} <= set(z0.files)
        assert not np.array_equal(z0["adapter-up"], zf["adapter-up"])
