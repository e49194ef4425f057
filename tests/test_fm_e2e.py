"""End-to-end: fm-poison through server fusion, against activation bounds, in a `flwr run` simulation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedsec.launch import run
from tests.conftest import ROOT, needs_fmnist

pytestmark = [pytest.mark.e2e, needs_fmnist]


def test_fm_poison_with_activation_bounds_runs_and_reports_both_metrics(tmp_path):
    # Prepare: 3 clients, 2 rounds, small settings; the FM-FL papers' fixed patch; CLIP-Adapter, so fusion and
    # bounds act on a learner's named arrays (adapter-down, adapter-up) and on its own hidden layer
    cfg = {
        "learner": "clip-adapter",
        "lr": 2.0,
        "num-server-rounds": 2,
        "k-shot": 4,
        "local-steps": 5,
        "eval-samples": 1000,
        "asr-eval-samples": 300,
        "attack": "fm-poison",
        "num-malicious": 0,
        "fm-trigger": "patch",
        "server-fusion": "tune",
        "fusion-steps": 10,
        "synthetic-per-class": 10,
        "activation-bounds": True,
        "bounds-steps": 3,
        "bounds-layers": "visual.transformer.resblocks.*,adapter.hidden",
        "run-dir": str(tmp_path / "run"),
    }
    # Execute
    summary = run(ROOT, cfg, num_supernodes=3, quiet=True)
    # Assert: metrics with and without bounds every trained round; bounds checkpointed and saved
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert 0.0 <= r["clean_acc"] <= 1.0 and 0.0 <= r["clean_acc_nobounds"] <= 1.0
        assert 0.0 <= r["asr"] <= 1.0 and 0.0 <= r["asr_nobounds"] <= 1.0
    assert summary["malicious_partitions"] == [] and "asr_nobounds" in summary
    assert (tmp_path / "run" / "attacker" / "round_0000" / "p-1.pt").exists()
    with np.load(tmp_path / "run" / "final_bounds.npz") as z:
        assert len(z.files) == 5 and z[z.files[0]].shape == (65, 128) and z["adapter.hidden"].shape == (32,)
    with np.load(tmp_path / "run" / "checkpoints" / "round_0002.npz") as z:
        assert sum(k.startswith("bounds:") for k in z.files) == 5
        assert {"adapter-down", "adapter-up"} <= set(z.files)
    assert json.loads((tmp_path / "run" / "final_prompt.json").read_text())["learner"] == "clip-adapter"
