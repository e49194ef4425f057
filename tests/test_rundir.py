"""Run directory writing and reading."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedsec.rundir import RunDir


def test_run_dir_round_trip(tmp_path):
    # Prepare
    rd = RunDir.create(tmp_path / "run", {"seed": 1, "lr": 0.1})
    ctx = np.arange(8, dtype=np.float32).reshape(2, 4)
    # Execute
    rd.append_metrics({"round": 0, "clean_acc": 0.5, "asr": None, "x": np.float32(1.5)})
    rd.append_metrics({"round": 1, "clean_acc": 0.7, "asr": float("nan")})
    rd.write_checkpoint(0, {"ctx": ctx * 0})
    rd.write_checkpoint(1, {"ctx": ctx})
    rd.write_json("summary.json", {"clean_acc": 0.7})
    rd.write_final_prompt(ctx, {"model": "m", "classnames": ["a", "b"]})
    # Assert
    assert rd.config() == {"lr": 0.1, "seed": 1}
    rows = rd.metrics()
    assert [r["round"] for r in rows] == [0, 1] and rows[0]["x"] == 1.5 and rows[1]["asr"] is None
    rnd, arrays = rd.last_checkpoint()
    assert rnd == 1 and np.array_equal(arrays["ctx"], ctx)
    assert rd.summary() == {"clean_acc": 0.7}
    assert json.loads((rd.path / "final_prompt.json").read_text())["classnames"] == ["a", "b"]
    assert np.array_equal(np.load(rd.path / "final_prompt.npz")["ctx"], ctx)


def test_run_dir_must_be_absolute():
    with pytest.raises(ValueError, match="absolute"):
        RunDir.create("relative/dir", {})
