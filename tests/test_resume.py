"""A ServerApp killed with kill -9 resumes from its run directory's checkpoint and ends like an uninterrupted run.

The rule is FLAME, whose noise generator is strategy state: the resumed run must
continue it from the checkpoint (``checkpoints/strategy_NNNN.npz``), or its
final prompt would differ from the uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedsec.launch import descendants, run
from tests.conftest import ROOT, needs_fmnist

pytestmark = [pytest.mark.e2e, needs_fmnist]

CFG = {"num-server-rounds": 3, "k-shot": 4, "local-steps": 5, "eval-samples": 1000, "seed": 3, "strategy": "flame"}


def _rows(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _serverapp_pids(root: int) -> list[int]:
    """The ServerApp processes under our launcher ``root`` (never another run's on a shared machine).

    In simulation the ServerApp runs inside flwr-simulation; in a deployment, in flwr-serverapp.
    """
    out = []
    for pid in descendants(root):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "flwr-serverapp" in cmdline or "flwr-simulation" in cmdline:
            out.append(pid)
    return out


def test_kill_9_then_resume_matches_uninterrupted(tmp_path):
    # Prepare: the reference run, uninterrupted
    ref = run(ROOT, {**CFG, "run-dir": str(tmp_path / "ref")}, num_supernodes=2, quiet=True)
    # Execute: the same run, kill -9 its ServerApp (and the launcher) once round 1 is checkpointed ...
    target = tmp_path / "cut"
    cmd = [
        sys.executable,
        "-m",
        "fedsec.launch",
        "--num-supernodes",
        "2",
        "-c",
        " ".join(f"{k}={v}" for k, v in CFG.items()),
        "-c",
        f"run-dir='{target}'",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (target / "checkpoints" / "round_0001.npz").exists():
        time.sleep(0.2)
    for pid in _serverapp_pids(proc.pid):
        os.kill(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    cut_rounds = [r["round"] for r in _rows(target)]
    # ... then resume it (the next launcher reaps the orphaned SuperLink by its PID file)
    resumed = run(ROOT, {**CFG, "run-dir": str(target), "resume": True}, num_supernodes=2, quiet=True)
    # Assert: it was really cut, and the resumed run ends with the uninterrupted run's metrics
    assert max(cut_rounds) < 3
    rows, ref_rows = _rows(target), _rows(tmp_path / "ref")
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for a, b in zip(rows, ref_rows, strict=True):
        assert a["clean_acc"] == pytest.approx(b["clean_acc"], abs=2e-3), a["round"]
    assert resumed["clean_acc"] == pytest.approx(ref["clean_acc"], abs=2e-3)
    # Assert: the strategy state of the newest rounds was kept, and the final prompts agree (FLAME's noise continued)
    assert sorted(p.name for p in (target / "checkpoints").glob("strategy_*.npz")) == [
        f"strategy_{r:04d}.npz" for r in (2, 3)
    ]
    with np.load(target / "final_prompt.npz") as a, np.load(tmp_path / "ref" / "final_prompt.npz") as b:
        np.testing.assert_allclose(a["ctx"], b["ctx"], rtol=0, atol=1e-6)
