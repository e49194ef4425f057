"""The GPU benchmark's CPU-size run: every part of it executes and the result says where it ran."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.e2e]


def test_bench_gpu_small_runs_every_part_on_cpu(tmp_path):
    # Prepare
    out = tmp_path / "bench_gpu.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    # Execute: steps, encoding, the in-process loop and a Flower simulation (2 clients, 2 rounds)
    proc = subprocess.run(
        [sys.executable, "experiments/bench_gpu.py", "--small", "--rounds", "2", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    # Assert
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["measured_on_gpu"] is False and res["note"].startswith("Not measured on a GPU")
    assert res["spec"]["model"] == "fedsec-tiny-clip" and res["spec"]["device"] == "cpu"
    assert res["steps"]["coop_step_ms"] > 0 and res["steps"]["badpromptfl_step_ms"] > 0  # no timing compared
    assert res["steps"]["encode_images_per_s"] > 0
    assert len(res["inprocess"]["round_s"]) == 2
    (row,) = res["flower"]
    assert "error" not in row, row
    assert len(row["round_s"]) == 2 and row["ratio_to_inprocess"] > 0
    assert "Not measured on a GPU" in out.with_suffix(".md").read_text()


def test_committed_gpu_result_names_its_card():
    # Prepare / Execute
    res = json.loads((ROOT / "experiments" / "results" / "bench_gpu.json").read_text())
    # Assert: a committed result either names the GPU it ran on or says it has none
    if res["measured_on_gpu"]:
        assert res["device"]["gpu"] and res["spec"]["model"] == "ViT-B-16" and res["spec"]["image_size"] == 224
        assert {row["num_gpus"] for row in res["flower"]} == {1.0, 0.5, 0.25}
    else:
        assert res["note"].startswith("Not measured on a GPU")
